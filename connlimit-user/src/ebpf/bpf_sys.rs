//! The raw `bpf()` system calls connlimit makes beside aya's: pinning and
//! opening pins relative to a directory descriptor, attaching a program by
//! descriptor, reading a link's target, marking a socket in a socket
//! storage map.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
/// Attach types (uapi `enum bpf_attach_type`).
pub(crate) const BPF_CGROUP_SOCK_OPS: u32 = 3;
pub(crate) const BPF_SK_LOOKUP: u32 = 36;

/// `bpf(cmd, attr)` with `attr` zero-padded to 128 bytes.
fn bpf(cmd: libc::c_long, fields: &[(usize, u64, usize)]) -> io::Result<i64> {
    let mut attr = [0u8; 128];
    for &(offset, value, size) in fields {
        attr[offset..offset + size].copy_from_slice(&value.to_ne_bytes()[..size]);
    }
    // SAFETY: a zeroed, sufficiently sized bpf_attr with the fields set.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: a descriptor the kernel just returned to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn fd_path(dir: BorrowedFd<'_>, file: &str) -> io::Result<CString> {
    CString::new(format!("/proc/self/fd/{}/{file}", dir.as_raw_fd())).map_err(io::Error::other)
}

pub(crate) fn obj_get(dir: BorrowedFd<'_>, file: &str) -> io::Result<OwnedFd> {
    let path = fd_path(dir, file)?;
    bpf(BPF_OBJ_GET, &[(0, path.as_ptr() as u64, 8)]).map(owned)
}

pub(crate) fn obj_pin(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, file: &str) -> io::Result<()> {
    let path = fd_path(dir, file)?;
    bpf(BPF_OBJ_PIN, &[(0, path.as_ptr() as u64, 8), (8, fd.as_raw_fd() as u64, 4)]).map(drop)
}

pub(crate) fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    bpf(BPF_PROG_GET_FD_BY_ID, &[(0, u64::from(id), 4)]).map(owned)
}

/// Attaches `prog` to `target` (a cgroup or a network namespace) as `attach_type`.
pub(crate) fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let fields = [(0, prog.as_raw_fd() as u64, 4), (4, target.as_raw_fd() as u64, 4), (8, u64::from(attach_type), 4)];
    bpf(BPF_LINK_CREATE, &fields).map(owned)
}

/// A cgroup or netns link's program id and target: the cgroup id, or the
/// namespace's inode (0 once the kernel released either).
pub(crate) fn link_info(link: BorrowedFd<'_>) -> io::Result<(u32, u64)> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then at offset 16
    // the union whose cgroup member starts with cgroup_id (u64) and whose
    // netns member with netns_ino (u32, then the attach type).
    let mut info = [0u8; 64];
    let fields = [(0, link.as_raw_fd() as u64, 4), (4, info.len() as u64, 4), (8, info.as_mut_ptr() as u64, 8)];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &fields)?;
    let prog_id = u32::from_ne_bytes(info[8..12].try_into().expect("4 bytes"));
    const BPF_LINK_TYPE_NETNS: u32 = 5;
    let link_type = u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes"));
    let target = if link_type == BPF_LINK_TYPE_NETNS {
        u64::from(u32::from_ne_bytes(info[16..20].try_into().expect("4 bytes")))
    } else {
        u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes"))
    };
    Ok((prog_id, target))
}

/// Sets `key` to `value` in `map` (for a socket storage map the key is a
/// socket's descriptor; for a sockmap, the value is).
pub(crate) fn map_update<K, V>(map: BorrowedFd<'_>, key: &K, value: &V) -> io::Result<()> {
    let fields = [
        (0, map.as_raw_fd() as u64, 4),
        (8, std::ptr::from_ref(key) as u64, 8),
        (16, std::ptr::from_ref(value) as u64, 8),
        (24, 0, 8),
    ];
    bpf(BPF_MAP_UPDATE_ELEM, &fields).map(drop)
}

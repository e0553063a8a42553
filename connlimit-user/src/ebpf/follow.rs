//! Following a guarded cgroup that is removed and made again (a systemd
//! unit or a container restarting): the sock_ops link stays on the dead
//! cgroup, so the owner's upkeep looks at the guarded path each round and,
//! when a new directory stands there, attaches the same program (same
//! maps, same counts) to it.
//!
//! The new link is pinned as `link_sock_ops_<cgroup id>` (bpffs allows no
//! dot in a name) beside the old ones, which stay until the kernel releases
//! their cgroup: a connection that outlives its cgroup still runs the
//! cgroup's programs, so its close is seen and its count dropped. Dropping
//! a link earlier would detach them and leak the count.

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use connlimit_common::maps::InstanceInfo;

use super::{
    EbpfError, Instance, PinRoot,
    instance::{LINK_PINS, SOCK_OPS_PROGRAM_PIN},
    mounts,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_CGROUP_SOCK_OPS: u32 = 3;

/// Where the sock_ops link of an instance is pinned.
const SOCK_OPS_PIN: &str = LINK_PINS[1];

/// What the upkeep of an instance knows about the path it guards.
#[derive(Debug)]
pub(crate) struct Follow {
    path: PathBuf,
    /// Said in the log already (once per absence).
    gone_said: bool,
    /// The last re-attach failure said in the log.
    failure_said: Option<String>,
}

/// What a look at the guarded path found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Look {
    /// The attached cgroup stands there, or nothing can be said.
    Same,
    /// A new cgroup stood there; the program is attached to it now.
    Followed,
    /// Nothing stands there, or it could not be attached.
    Gone,
}

impl Follow {
    pub(crate) fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), gone_said: false, failure_said: None }
    }

    /// Compares the cgroup at the guarded path with the attached one and,
    /// if a new one stands there, attaches to it.
    pub(crate) fn look(&mut self, instance: &mut Instance) -> Look {
        let Ok(attached) = instance.info().map(|i| i.cgroup_ino) else { return Look::Same };
        let name = instance.name().to_owned();
        match std::fs::metadata(&self.path) {
            Ok(m) if m.ino() == attached => Look::Same,
            Ok(_) => match repoint(instance, &self.path) {
                Ok(()) => {
                    tracing::info!(
                        instance = %name, cgroup = %self.path.display(),
                        "the guarded cgroup was made again: enforcing on the new one, counts kept"
                    );
                    self.gone_said = false;
                    self.failure_said = None;
                    Look::Followed
                }
                Err(e) => {
                    let e = e.to_string();
                    if self.failure_said.as_ref() != Some(&e) {
                        tracing::error!(
                            instance = %name, cgroup = %self.path.display(), error = %e,
                            "not enforcing: the guarded cgroup was made again but cannot be attached; \
                             tried again every 200 ms"
                        );
                        self.failure_said = Some(e);
                    }
                    Look::Gone
                }
            },
            Err(_) => {
                if !self.gone_said {
                    tracing::warn!(
                        instance = %name, cgroup = %self.path.display(),
                        "not enforcing: the guarded cgroup is gone (its service or container stopped); \
                         enforcement resumes by itself when it is made again"
                    );
                    self.gone_said = true;
                }
                Look::Gone
            }
        }
    }
}

/// Attaches the instance's sock_ops program to the cgroup at `path`, pins
/// the new link beside the old ones, and then records the new cgroup: in
/// that order, so that a crash in between leaves a link the next owner
/// finds (and only records), never a cgroup on record without a link.
fn repoint(instance: &mut Instance, path: &Path) -> Result<(), EbpfError> {
    let fail = |what: &str, e: io::Error| EbpfError::system(format!("{what} for {}", path.display()), e);
    mounts::require_cgroup2_dir(path)?;
    let name = instance.name().to_owned();
    let dir = File::open(Instance::dir_of(&name)).map_err(|_| EbpfError::NoSuchInstance(name.clone()))?;
    // The cgroup opened is the one attached and recorded, whatever stands
    // at the path by then.
    let cgroup = File::open(path).map_err(|e| fail("opening the cgroup", e))?;
    let ino = cgroup.metadata().map_err(|e| fail("reading the cgroup", e))?.ino();
    if ino == instance.info()?.cgroup_ino {
        return Ok(());
    }
    let pin = format!("{SOCK_OPS_PIN}_{ino}");
    let already = obj_get(dir.as_fd(), &pin).and_then(|l| link_info(l.as_fd())).is_ok_and(|(_, c)| c == ino);
    if !already {
        let prog = match obj_get(dir.as_fd(), SOCK_OPS_PROGRAM_PIN) {
            Ok(prog) => prog,
            // Instances attached before the program was pinned: by id, which
            // takes CAP_SYS_ADMIN.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let first = obj_get(dir.as_fd(), SOCK_OPS_PIN).map_err(|e| fail("opening the sock_ops link", e))?;
                let (prog_id, _) = link_info(first.as_fd()).map_err(|e| fail("reading the sock_ops link", e))?;
                prog_by_id(prog_id).map_err(|e| fail("opening the sock_ops program", e))?
            }
            Err(e) => return Err(fail("opening the sock_ops program", e)),
        };
        // Enforcing from here: not held up by other instances' attaches,
        // which hold the pin root's lock while their programs load.
        let link = link_create(prog.as_fd(), cgroup.as_fd()).map_err(|e| fail("attaching the sock_ops program", e))?;
        let root = PinRoot::write()?;
        if !root.is_instance(&name) {
            // Detached meanwhile: dropping `link` detaches it from the new cgroup too.
            return Err(EbpfError::NoSuchInstance(name));
        }
        // bpffs renames no pin, so the first link keeps its name (the links
        // of dead cgroups hold nothing once the kernel releases them).
        // Unpinned, the link goes with this function: the old cgroup stays
        // on record and the next round tries again.
        obj_pin(link.as_fd(), dir.as_fd(), &pin).map_err(|e| fail("pinning the new link", e))?;
    }
    // Only the owner writes an owned instance's info; read it now, after
    // anything the owner changed meanwhile.
    let info = instance.info()?;
    instance.set_info(InstanceInfo { cgroup_ino: ino, ..info })?;
    prune_released(dir.as_fd());
    Ok(())
}

/// Unpins the links made by [`repoint`] whose cgroup the kernel has
/// released (no socket of it is left), which detaches nothing in use.
fn prune_released(dir: BorrowedFd<'_>) {
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else { return };
    let prefix = format!("{SOCK_OPS_PIN}_");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str().filter(|f| f.starts_with(&prefix)) else { continue };
        let released = obj_get(dir, file).and_then(|l| link_info(l.as_fd())).is_ok_and(|(_, cgroup)| cgroup == 0);
        if released && let Ok(c) = CString::new(file) {
            // SAFETY: valid directory fd and NUL-terminated name.
            unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
        }
    }
}

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

fn obj_get(dir: BorrowedFd<'_>, file: &str) -> io::Result<OwnedFd> {
    let path = fd_path(dir, file)?;
    bpf(BPF_OBJ_GET, &[(0, path.as_ptr() as u64, 8)]).map(owned)
}

fn obj_pin(fd: BorrowedFd<'_>, dir: BorrowedFd<'_>, file: &str) -> io::Result<()> {
    let path = fd_path(dir, file)?;
    bpf(BPF_OBJ_PIN, &[(0, path.as_ptr() as u64, 8), (8, fd.as_raw_fd() as u64, 4)]).map(drop)
}

fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    bpf(BPF_PROG_GET_FD_BY_ID, &[(0, u64::from(id), 4)]).map(owned)
}

fn link_create(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let fields =
        [(0, prog.as_raw_fd() as u64, 4), (4, cgroup.as_raw_fd() as u64, 4), (8, u64::from(BPF_CGROUP_SOCK_OPS), 4)];
    bpf(BPF_LINK_CREATE, &fields).map(owned)
}

/// A cgroup link's program id and cgroup id (0 once the kernel released
/// the cgroup).
fn link_info(link: BorrowedFd<'_>) -> io::Result<(u32, u64)> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then at offset 16
    // the union whose cgroup member starts with cgroup_id (u64).
    let mut info = [0u8; 64];
    let fields = [(0, link.as_raw_fd() as u64, 4), (4, info.len() as u64, 4), (8, info.as_mut_ptr() as u64, 8)];
    bpf(BPF_OBJ_GET_INFO_BY_FD, &fields)?;
    let prog_id = u32::from_ne_bytes(info[8..12].try_into().expect("4 bytes"));
    Ok((prog_id, u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes"))))
}

//! Facts about this machine the loader checks before touching the kernel.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
};

use super::EbpfError;

/// This process's network namespace, as an nsfs path (the default
/// namespace to guard).
pub const OWN_NETNS: &str = "/proc/self/ns/net";

/// Where bpffs is mounted and connlimit pins its instances.
pub const BPFFS: &str = "/sys/fs/bpf";
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A Linux capability connlimit may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Its name, as in capabilities(7) and systemd's `AmbientCapabilities=`.
    pub name: &'static str,
    /// Its bit in the capability sets.
    pub bit: u32,
}

/// Reading pins under a root-only bpffs directory one does not own.
pub const CAP_DAC_READ_SEARCH: Capability = Capability { name: "CAP_DAC_READ_SEARCH", bit: 2 };
/// Loading and attaching networking programs (sock_ops, sk_lookup).
pub const CAP_NET_ADMIN: Capability = Capability { name: "CAP_NET_ADMIN", bit: 12 };
/// Opening another user's `/proc/<pid>/ns/net` (`run --pid`).
pub const CAP_SYS_PTRACE: Capability = Capability { name: "CAP_SYS_PTRACE", bit: 19 };
/// Full verifier latitude (pointer comparisons, Spectre-mitigation
/// exemptions) that the programs rely on.
pub const CAP_PERFMON: Capability = Capability { name: "CAP_PERFMON", bit: 38 };
/// Creating maps and loading programs.
pub const CAP_BPF: Capability = Capability { name: "CAP_BPF", bit: 39 };

/// What attaching an instance needs: checked up front so that a missing
/// one gives one clear error rather than an EPERM half-way.
pub const ATTACH_CAPABILITIES: [Capability; 3] = [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON];

/// The effective capability set of this process (`CapEff` in
/// /proc/self/status).
pub fn effective_capabilities() -> Result<u64, EbpfError> {
    let status =
        fs::read_to_string("/proc/self/status").map_err(|e| EbpfError::system("reading /proc/self/status", e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| EbpfError::system("reading /proc/self/status", anyhow::anyhow!("no CapEff line")))
}

/// CAP_SYS_ADMIN: the kernel accepts it in place of CAP_BPF and CAP_PERFMON
/// (`bpf_capable()`, `perfmon_capable()`), as kernels before 5.8 required.
const CAP_SYS_ADMIN_BIT: u32 = 21;

/// Fails with [`EbpfError::MissingCapabilities`], naming each missing one,
/// unless this process holds all of `needed` in its effective set.
pub fn require_capabilities(needed: &[Capability]) -> Result<(), EbpfError> {
    let effective = effective_capabilities()?;
    let held = |c: &Capability| {
        effective & (1 << c.bit) != 0
            || ([CAP_BPF.bit, CAP_PERFMON.bit].contains(&c.bit) && effective & (1 << CAP_SYS_ADMIN_BIT) != 0)
    };
    let missing: Vec<&str> = needed.iter().filter(|c| !held(c)).map(|c| c.name).collect();
    if missing.is_empty() { Ok(()) } else { Err(EbpfError::MissingCapabilities(missing.join(", "))) }
}

/// Fails with [`EbpfError::PinsInaccessible`] if this process may not
/// enter and read `path` (or, while it does not exist, its nearest existing
/// ancestor): bpffs and connlimit's pin root are root-only by default.
pub fn require_access(path: &Path) -> Result<(), EbpfError> {
    let mut at = path;
    loop {
        let c = CString::new(at.as_os_str().as_bytes()).map_err(|e| EbpfError::system("checking a path", e))?;
        // SAFETY: `c` is NUL-terminated. AT_EACCESS checks with the
        // effective ids and capabilities, as opening will.
        if unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), libc::R_OK | libc::X_OK, libc::AT_EACCESS) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match (e.kind(), at.parent()) {
            (io::ErrorKind::NotFound, Some(parent)) => at = parent,
            (io::ErrorKind::PermissionDenied, _) => return Err(EbpfError::PinsInaccessible(at.to_owned())),
            _ => return Ok(()),
        }
    }
}

pub(crate) fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs is plain data; the kernel fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
    Ok(st.f_type as i64)
}

/// Fails with [`EbpfError::BpffsMissing`] unless bpffs is mounted at [`BPFFS`].
pub fn require_bpffs() -> Result<(), EbpfError> {
    match fs_magic(Path::new(BPFFS)) {
        Ok(BPF_FS_MAGIC) => Ok(()),
        _ => Err(EbpfError::BpffsMissing(BPFFS.into())),
    }
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo
/// (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf, EbpfError> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(|e| EbpfError::system("reading /proc/self/mountinfo", e))?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split(' ').next()? == "cgroup2").then(|| left.split(' ').nth(4).map(unescape_mount_path))?
        })
        .ok_or(EbpfError::NoCgroup2)
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape_mount_path(s: &str) -> PathBuf {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(b) = octal {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Checks that `dir` is a cgroup v2 directory.
pub fn require_cgroup2_dir(dir: &Path) -> Result<(), EbpfError> {
    match fs_magic(dir) {
        Ok(CGROUP2_SUPER_MAGIC) => Ok(()),
        _ => Err(EbpfError::NotCgroup2(dir.to_owned(), cgroup2_mount()?)),
    }
}

/// The cgroup v2 directory process `pid` belongs to.
pub fn cgroup_of_pid(pid: u32) -> Result<PathBuf, EbpfError> {
    let file = format!("/proc/{pid}/cgroup");
    let text = fs::read_to_string(&file).map_err(|e| EbpfError::system(format!("reading {file}"), e))?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| EbpfError::system(format!("reading {file}"), format!("process {pid} is in no cgroup v2")))?;
    Ok(cgroup2_mount()?.join(relative.trim_start_matches('/')))
}

/// Whether `dir` is the root of the cgroup v2 hierarchy (its mount point):
/// every process on the host not placed in a cgroup of its own is in it.
pub fn is_cgroup2_root(dir: &Path) -> bool {
    match (cgroup2_mount(), fs::canonicalize(dir)) {
        (Ok(mount), Ok(dir)) => fs::canonicalize(mount).is_ok_and(|mount| mount == dir),
        _ => false,
    }
}

/// A network namespace's identity: the device and inode of its nsfs file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetnsId {
    /// Device number.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
}

impl NetnsId {
    /// The identity of the namespace file `path` (e.g. `/proc/self/ns/net`).
    pub fn of(path: &Path) -> Result<Self, EbpfError> {
        let meta = fs::metadata(path).map_err(|e| EbpfError::Netns(path.to_owned(), e))?;
        Ok(Self { dev: meta.dev(), ino: meta.ino() })
    }
}

/// The cookie of the network namespace at `netns` (`SO_NETNS_COOKIE`, Linux
/// 5.14+), or 0 when the kernel cannot say: then sock_ops counts the
/// guarded cgroup's sockets of every namespace.
pub fn netns_cookie(netns: &Path) -> u64 {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let cookie = super::sock_diag::in_netns(netns, || {
        // SAFETY: plain syscalls on a socket we own.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: a u64 out-buffer of the stated length.
        let rc = unsafe {
            libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
        };
        if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(cookie) }
    });
    cookie.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the network namespace's cookie (Linux 5.14+); sockets of the cgroup in other namespaces will be counted too");
        0
    })
}

/// The inode of a directory (cgroup ids are cgroupfs inodes).
pub fn inode(path: &Path) -> Result<u64, EbpfError> {
    fs::metadata(path).map(|m| m.ino()).map_err(|e| EbpfError::system(format!("reading {}", path.display()), e))
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data; CLOCK_MONOTONIC always exists.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_and_checked() {
        let effective = effective_capabilities().unwrap();
        // Whatever this process holds, it holds; what it lacks is named.
        let mine: Vec<Capability> =
            [CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON].into_iter().filter(|c| effective & (1 << c.bit) != 0).collect();
        require_capabilities(&mine).unwrap();
        let absent = Capability { name: "CAP_NOT_A_REAL_ONE", bit: 63 };
        let err = require_capabilities(&[absent]).unwrap_err().to_string();
        assert!(err.starts_with("connlimit lacks CAP_NOT_A_REAL_ONE;"), "{err}");
    }

    #[test]
    fn mount_paths_unescape() {
        assert_eq!(unescape_mount_path("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mount_path("/sys/fs/cgroup/unified"), PathBuf::from("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn this_machine_has_a_cgroup2_mount() {
        let mount = cgroup2_mount().unwrap();
        require_cgroup2_dir(&mount).unwrap();
        assert!(require_cgroup2_dir(Path::new("/tmp")).is_err());
        assert!(is_cgroup2_root(&mount));
        assert!(is_cgroup2_root(&mount.join(".")));
        assert!(!is_cgroup2_root(Path::new("/tmp")));
    }
}

//! Where the file systems connlimit needs are mounted: bpffs (for pins)
//! and the cgroup v2 hierarchy (for the cgroups it guards).

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
};

use super::EbpfError;

/// Where bpffs is mounted and connlimit pins its instances.
pub const BPFFS: &str = "/sys/fs/bpf";
pub(crate) const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

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

/// The inode of a directory (cgroup ids are cgroupfs inodes).
pub fn inode(path: &Path) -> Result<u64, EbpfError> {
    fs::metadata(path).map(|m| m.ino()).map_err(|e| EbpfError::system(format!("reading {}", path.display()), e))
}

/// Opens the cgroup with id `id` by its file handle (a cgroupfs handle is
/// the id); ESTALE once it was removed. Needs CAP_DAC_READ_SEARCH.
fn open_cgroup(id: u64) -> io::Result<fs::File> {
    const FILEID_KERNFS: i32 = 0xfe;
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: u64,
    }
    let mount = fs::File::open(cgroup2_mount().map_err(io::Error::other)?)?;
    let handle = Handle { bytes: 8, kind: FILEID_KERNFS, id };
    // SAFETY: a valid file_handle with its 8 bytes of handle.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            std::os::fd::AsRawFd::as_raw_fd(&mount),
            &handle as *const Handle,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just opened for us.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd as i32) })
}

/// Whether a cgroup with id `id` exists (was not removed). `None` when it
/// cannot be told, e.g. without CAP_DAC_READ_SEARCH.
pub fn cgroup_exists(id: u64) -> Option<bool> {
    match open_cgroup(id) {
        Ok(_) => Some(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOENT)) => Some(false),
        Err(_) => None,
    }
}

/// The ids of the cgroup with id `id` and of every cgroup below it (their
/// sockets run the programs attached to it); just `id` when its directory
/// cannot be found.
pub fn cgroup_subtree(id: u64) -> std::collections::HashSet<u64> {
    let mut ids = std::collections::HashSet::from([id]);
    let Ok(dir) = open_cgroup(id) else { return ids };
    let Ok(path) = fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dir))) else {
        return ids;
    };
    let mut stack = vec![path];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(m) = entry.metadata() {
                    ids.insert(m.ino());
                }
                stack.push(entry.path());
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

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

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

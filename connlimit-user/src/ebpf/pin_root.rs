//! The pin root: the bpffs directory holding one directory of pins per
//! instance, and the lock that keeps changes to them consistent.
//!
//! - Only a root that nobody but root controls is used: owned by root, not
//!   a symbolic link, not writable by group or others, on bpffs.
//! - Writers (attach, adopt, set, detach) hold an exclusive `flock` on the
//!   root directory; readers (status, top, config) a shared one.
//! - A new instance is built in a temporary directory (`@staging-<name>-<pid>`:
//!   `@` is in no instance name, and bpffs refuses names with a dot)
//!   and renamed into place, so it appears all at once. The leftovers of a
//!   writer that died half-way are never listed, and the next writer
//!   removes them.
//! - Everything below the root is reached through directory descriptors
//!   (`openat`, `unlinkat`, `O_NOFOLLOW`): no symbolic link is followed.

use std::{
    ffi::{CStr, CString, OsStr, OsString},
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::DirBuilderExt},
    },
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use connlimit_common::maps::InstanceInfo;

use super::{EbpfError, mounts};

/// The default pin root.
pub const PIN_ROOT: &str = "/sys/fs/bpf/connlimit";

/// Environment variable naming another pin root (an absolute path on
/// bpffs), for tests and for hosts that keep several sets of instances.
pub const PIN_ROOT_ENV: &str = "CONNLIMIT_PIN_ROOT";

/// How long to wait for another writer to finish.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Prefix of the temporary directory a new instance is built in.
const STAGING_PREFIX: &str = "@staging-";

/// The pin root in use: `$CONNLIMIT_PIN_ROOT`, or [`PIN_ROOT`].
pub fn pin_root() -> PathBuf {
    match std::env::var_os(PIN_ROOT_ENV) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => PathBuf::from(PIN_ROOT),
    }
}

/// The pin root, opened, checked and locked: shared by [`PinRoot::read`],
/// exclusive by [`PinRoot::write`]. The lock is released on drop.
#[derive(Debug)]
pub struct PinRoot {
    dir: OwnedFd,
    path: PathBuf,
}

fn cstring(bytes: &OsStr) -> io::Result<CString> {
    CString::new(bytes.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The system user the packaged unit runs connlimit as.
pub const SERVICE_USER: &str = "connlimit";

/// Whether `uid` is [`SERVICE_USER`] and the pin root `path` sits in a
/// directory only root can change (bpffs mounted 0700, as connlimit and
/// systemd mount it): then root made the pin root and gave it to that
/// user, and no other user can have put it there.
fn is_service_users(uid: libc::uid_t, path: &Path) -> bool {
    let Ok(name) = std::ffi::CString::new(SERVICE_USER) else { return false };
    // SAFETY: a NUL-terminated name; the result is read at once, before any
    // other call that could reuse its storage.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    // SAFETY: non-null entries point at a valid passwd record.
    if entry.is_null() || unsafe { (*entry).pw_uid } != uid {
        return false;
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    fs::metadata(parent).is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0 && m.mode() & 0o022 == 0
    })
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// `openat(dir, name, O_DIRECTORY | O_NOFOLLOW)`.
fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    let c = cstring(name)?;
    // SAFETY: `c` is NUL-terminated; the returned fd is ours.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
fn stat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    let c = cstring(name)?;
    // SAFETY: stat is plain data the kernel fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, NUL-terminated name, valid out-pointer.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Names in directory `dir` (not `.` and `..`), unsorted.
fn entries(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    // fdopendir takes ownership of its descriptor: give it a duplicate.
    // SAFETY: plain syscalls; the stream is closed below.
    let dup = check(unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) })?;
    let stream = unsafe { libc::fdopendir(dup) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: `dup` is ours and was not taken.
        unsafe { libc::close(dup) };
        return Err(e);
    }
    let mut names = Vec::new();
    // SAFETY: `stream` is a valid directory stream until closedir; a
    // duplicate shares its offset with `dir`, so start from the beginning.
    unsafe {
        libc::rewinddir(stream);
        loop {
            let entry = libc::readdir(stream);
            if entry.is_null() {
                break;
            }
            let name = CStr::from_ptr((*entry).d_name.as_ptr()).to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_owned());
            }
        }
        libc::closedir(stream);
    }
    Ok(names)
}

fn unlink_at(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
    let c = cstring(name)?;
    // SAFETY: valid fd and NUL-terminated name. unlinkat never follows a
    // symbolic link: it removes the link itself.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }).map(drop)
}

/// A path that reaches `name` inside the directory open as `dir`, whatever
/// happens to the directory's own path meanwhile (for the bpf syscalls,
/// which take paths).
pub(crate) fn fd_path(dir: BorrowedFd<'_>, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

impl PinRoot {
    /// Opens the pin root for reading, with a shared lock; `None` if it
    /// does not exist yet (then no instance does).
    pub fn read() -> Result<Option<Self>, EbpfError> {
        Self::open(false)
    }

    /// Opens the pin root for changing instances, with an exclusive lock,
    /// creating it (mode 0700) if needed, and removes what writers that
    /// died half-way left behind.
    pub fn write() -> Result<Self, EbpfError> {
        let root = Self::open(true)?
            .ok_or_else(|| EbpfError::system(format!("creating {}", pin_root().display()), "it vanished"))?;
        root.clear_leftovers();
        Ok(root)
    }

    /// The root's path (for messages: everything goes through its descriptor).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(write: bool) -> Result<Option<Self>, EbpfError> {
        let path = pin_root();
        let refuse = |problem: &str, fix: String| EbpfError::UnsafePinRoot {
            path: path.clone(),
            problem: problem.to_owned(),
            fix,
        };
        if !path.is_absolute() {
            return Err(refuse("is not an absolute path", format!("set {PIN_ROOT_ENV} to an absolute path on bpffs")));
        }
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(refuse(
                    "is a symbolic link",
                    format!("remove the link (`rm {}`); connlimit creates the directory itself", path.display()),
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !write {
                    return Ok(None);
                }
                let parent = path.parent().unwrap_or(Path::new("/"));
                if mounts::fs_magic(parent).ok() != Some(mounts::BPF_FS_MAGIC) {
                    return Err(EbpfError::BpffsMissing(parent.to_owned()));
                }
                match fs::DirBuilder::new().mode(0o700).create(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(EbpfError::system(format!("creating {}", path.display()), e)),
                }
            }
            Err(e) => return Err(EbpfError::system(format!("reading {}", path.display()), e)),
        }
        let c = cstring(path.as_os_str()).map_err(|e| EbpfError::system(format!("opening {}", path.display()), e))?;
        // SAFETY: NUL-terminated path; the fd is ours.
        let fd =
            unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP) => refuse(
                    "is a symbolic link",
                    format!("remove the link (`rm {}`); connlimit creates the directory itself", path.display()),
                ),
                Some(libc::ENOTDIR) => refuse("is not a directory", format!("remove it (`rm {}`)", path.display())),
                _ => EbpfError::system(format!("opening {}", path.display()), e),
            });
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };

        // Check what we opened, not the path, so nothing can be swapped in between.
        // SAFETY: plain data the kernel fills.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        check(unsafe { libc::fstat(dir.as_raw_fd(), &mut st) })
            .map_err(|e| EbpfError::system(format!("reading {}", path.display()), e))?;
        let secure = format!(
            "check what it holds, then give it to root alone (`chown root:root {0} && chmod 0700 {0}`) or remove it",
            path.display()
        );
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        // Root's, ours, or the service user's (the systemd unit runs as
        // `connlimit` and owns the root it is given, which root's `status`
        // and `top` then read): nobody else may control it.
        if st.st_uid != 0 && st.st_uid != me && !is_service_users(st.st_uid, &path) {
            return Err(refuse(
                &format!("is owned by uid {}, not root (or uid {me}, which runs connlimit)", st.st_uid),
                secure,
            ));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(refuse(&format!("is writable by group or others (mode {:04o})", st.st_mode & 0o7777), secure));
        }
        // SAFETY: plain data the kernel fills; valid fd and out-pointer.
        let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
        check(unsafe { libc::fstatfs(dir.as_raw_fd(), &mut sfs) })
            .map_err(|e| EbpfError::system(format!("reading {}", path.display()), e))?;
        #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
        if sfs.f_type as i64 != mounts::BPF_FS_MAGIC {
            return Err(refuse(
                "is not on a BPF filesystem",
                format!(
                    "mount bpffs, root-only (`mount -t bpf -o mode=0700 bpf {}`), or point {PIN_ROOT_ENV} into one",
                    mounts::BPFFS
                ),
            ));
        }

        // Writers hold the lock for the length of one change (an attach
        // takes the longest: well under a second), so a minute means one
        // is stuck; say so rather than hang.
        let operation = if write { libc::LOCK_EX } else { libc::LOCK_SH };
        let deadline = std::time::Instant::now() + LOCK_TIMEOUT;
        loop {
            // SAFETY: valid fd.
            if unsafe { libc::flock(dir.as_raw_fd(), operation | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EWOULDBLOCK) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Some(libc::EWOULDBLOCK) => {
                    return Err(EbpfError::system(
                        format!("locking {}", path.display()),
                        format!(
                            "another connlimit has been changing instances for {} s; find it with `ps -C connlimit` \
                             and stop it, then retry",
                            LOCK_TIMEOUT.as_secs()
                        ),
                    ));
                }
                _ => return Err(EbpfError::system(format!("locking {}", path.display()), e)),
            }
        }
        Ok(Some(Self { dir, path }))
    }

    /// Removes the temporary directories of writers that died half-way
    /// (only a writer holding the exclusive lock creates one, and it
    /// renames or removes it before letting go).
    fn clear_leftovers(&self) {
        let Ok(names) = entries(self.dir.as_fd()) else { return };
        for name in names.iter().filter(|n| n.as_bytes().starts_with(STAGING_PREFIX.as_bytes())) {
            match self.remove_dir(name) {
                Ok(()) => tracing::info!(
                    leftover = %self.path.join(name).display(),
                    "removed what an interrupted attach left behind"
                ),
                Err(e) => tracing::warn!(
                    leftover = %self.path.join(name).display(), error = %e,
                    "could not remove what an interrupted attach left behind"
                ),
            }
        }
    }

    /// Names of the instances, sorted: real directories only, never a
    /// symbolic link or a temporary directory.
    pub fn names(&self) -> Result<Vec<String>, EbpfError> {
        let names =
            entries(self.dir.as_fd()).map_err(|e| EbpfError::system(format!("listing {}", self.path.display()), e))?;
        let mut names: Vec<String> = names
            .into_iter()
            .filter_map(|n| n.into_string().ok())
            .filter(|n| super::Instance::validate_name(n).is_ok() && self.is_instance(n))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Whether `name` is an instance directory (not a symbolic link).
    pub(crate) fn is_instance(&self, name: &str) -> bool {
        stat_at(self.dir.as_fd(), OsStr::new(name)).is_ok_and(|st| is_dir(&st))
    }

    /// Opens instance directory `name`; a symbolic link is refused.
    pub(crate) fn open_dir(&self, name: &str) -> io::Result<OwnedFd> {
        open_dir_at(self.dir.as_fd(), OsStr::new(name))
    }

    /// Removes directory `name` and the pins in it, following no link.
    pub(crate) fn remove_dir(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        let name = name.as_ref();
        let dir = open_dir_at(self.dir.as_fd(), name)?;
        for entry in entries(dir.as_fd())? {
            unlink_at(dir.as_fd(), &entry, 0)?;
        }
        unlink_at(self.dir.as_fd(), name, libc::AT_REMOVEDIR)
    }

    /// A temporary directory to build instance `name` in; removed on drop
    /// unless [`Staging::commit`] renamed it into place.
    pub(crate) fn stage(&self, name: &str) -> Result<Staging<'_>, EbpfError> {
        if self.is_instance(name) {
            return Err(EbpfError::InstanceExists(name.to_owned()));
        }
        let temp = format!("{STAGING_PREFIX}{name}-{}", std::process::id());
        let c = cstring(OsStr::new(&temp)).map_err(|e| EbpfError::system("naming a staging directory", e))?;
        // SAFETY: valid fd and NUL-terminated name.
        check(unsafe { libc::mkdirat(self.dir.as_raw_fd(), c.as_ptr(), 0o700) })
            .map_err(|e| EbpfError::system(format!("creating {}", self.path.join(&temp).display()), e))?;
        let dir = self
            .open_dir(&temp)
            .map_err(|e| EbpfError::system(format!("opening {}", self.path.join(&temp).display()), e))?;
        Ok(Staging { root: self, name: name.to_owned(), temp, dir, committed: false })
    }
}

/// A new instance's pins, in a directory no reader lists yet.
pub(crate) struct Staging<'a> {
    root: &'a PinRoot,
    name: String,
    temp: String,
    dir: OwnedFd,
    committed: bool,
}

impl Staging<'_> {
    /// The path of pin `file` in the staging directory.
    pub(crate) fn pin_path(&self, file: &str) -> PathBuf {
        fd_path(self.dir.as_fd(), file)
    }

    /// Makes a pin root-only (bpffs pins default to 0600; keep it so).
    pub(crate) fn restrict(&self, file: &str) -> io::Result<()> {
        let c = cstring(OsStr::new(file))?;
        // SAFETY: valid fd and NUL-terminated name; the pin was just made by us.
        check(unsafe { libc::fchmodat(self.dir.as_raw_fd(), c.as_ptr(), 0o600, 0) }).map(drop)
    }

    /// Renames the staging directory to the instance's name, atomically.
    pub(crate) fn commit(mut self) -> Result<(), EbpfError> {
        crash_point("before-commit");
        let (from, to) = (cstring(OsStr::new(&self.temp)), cstring(OsStr::new(&self.name)));
        let (Ok(from), Ok(to)) = (from, to) else {
            return Err(EbpfError::BadName(self.name.clone()));
        };
        let fd = self.root.dir.as_raw_fd();
        // Through syscall(2): musl (the static release build) has no
        // renameat2 wrapper.
        // SAFETY: valid fds and NUL-terminated names, which outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::c_long::from(fd),
                from.as_ptr(),
                libc::c_long::from(fd),
                to.as_ptr(),
                libc::c_long::from(libc::RENAME_NOREPLACE),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::AlreadyExists {
                EbpfError::InstanceExists(self.name.clone())
            } else {
                EbpfError::system(format!("renaming {} into place", self.root.path.join(&self.temp).display()), e)
            });
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging<'_> {
    fn drop(&mut self) {
        if !self.committed
            && let Err(e) = self.root.remove_dir(&self.temp)
        {
            tracing::warn!(dir = %self.root.path.join(&self.temp).display(), error = %e, "could not remove a staging directory");
        }
    }
}

/// Test hook (debug builds only): with `CONNLIMIT_TEST_CRASH_AT=<point>`
/// the process kills itself with SIGKILL at that point, as a crash would.
pub(crate) fn crash_point(point: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("CONNLIMIT_TEST_CRASH_AT").is_ok_and(|p| p == point) {
        // SAFETY: plain syscall.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
    let _ = point;
}

/// Test hook (debug builds only): with `CONNLIMIT_TEST_DELAY_AT=<point>:<ms>`
/// the process sleeps that long at that point, to hold a race window open.
#[doc(hidden)]
pub fn test_delay(point: &str) {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("CONNLIMIT_TEST_DELAY_AT")
        .ok()
        .and_then(|v| v.strip_prefix(point)?.strip_prefix(':')?.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms.min(10_000)));
    }
    let _ = point;
}

/// The layout version recorded in a pinned `INSTANCE` map (0 if it
/// predates versioning), read as raw bytes since its value may be laid out
/// differently from this version's [`InstanceInfo`].
pub(crate) fn pinned_layout_version(path: &Path) -> Result<u32, EbpfError> {
    let what = || format!("reading {}", path.display());
    let map = MapData::from_pin(path).map_err(|e| EbpfError::system(what(), e))?;
    let size = map.info().map_err(|e| EbpfError::system(what(), e))?.value_size() as usize;
    let offset = std::mem::offset_of!(InstanceInfo, layout_version);
    if size < offset + 4 {
        return Ok(0);
    }
    let mut value = vec![0u8; size];
    let key = 0u32;
    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = LookupAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    // SAFETY: `attr` points at a key and a value buffer of the map's sizes,
    // both alive across the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_ELEM, &attr as *const LookupAttr, size_of::<LookupAttr>() as u32)
    };
    if rc != 0 {
        return Err(EbpfError::system(what(), io::Error::last_os_error()));
    }
    Ok(u32::from_ne_bytes([value[offset], value[offset + 1], value[offset + 2], value[offset + 3]]))
}

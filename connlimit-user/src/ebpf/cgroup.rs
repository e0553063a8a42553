//! A cgroup v2 directory of connlimit's own, for servers it starts.
//!
//! A socket belongs to the cgroup of the process that created it (an
//! accepted socket inherits its listener's), so a server must be in the
//! cgroup before it creates its listener: [`Cgroup::add_on_exec`] moves a
//! child process in between fork and exec.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use super::{EbpfError, mounts};

/// A cgroup v2 directory created by connlimit. Dropping it kills the
/// processes still in it and removes the directory.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `name` directly under the cgroup v2 mount.
    pub fn create(name: &str) -> Result<Self, EbpfError> {
        let path = mounts::cgroup2_mount()?.join(name);
        fs::create_dir(&path).map_err(|e| EbpfError::system(format!("creating the cgroup {}", path.display()), e))?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the child that `command` spawns join this cgroup before it
    /// executes its program.
    pub fn add_on_exec(&self, command: &mut Command) {
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes()).expect("no NUL in a path");
        // SAFETY: between fork and exec only async-signal-safe calls are
        // made (open, write, close), on memory allocated before the fork.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // "0" means the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Whether any process is in the cgroup or a cgroup below it
    /// (`populated` in `cgroup.events`, which the kernel updates as
    /// processes come and go and signals as a file modification).
    pub fn populated(&self) -> bool {
        populated(&self.path)
    }

    /// Process ids in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

/// Whether the cgroup v2 directory `dir` holds any process, itself or below
/// (see [`Cgroup::populated`]); when `cgroup.events` cannot be read, whether
/// `cgroup.procs` lists any.
pub fn populated(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()),
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..200 {
            let procs = self.procs();
            if procs.is_empty() && fs::remove_dir(&self.path).is_ok() {
                return;
            }
            for pid in procs {
                // SAFETY: signalling processes of our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(cgroup = %self.path.display(), "could not remove the cgroup");
    }
}

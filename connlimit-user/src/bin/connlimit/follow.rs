//! `exec` follows the server's cgroup, not only its first process, as a
//! service manager does for forking services: a server that daemonizes
//! (nginx, lighttpd, most `/etc/init.d` servers) stays guarded until the
//! last process of its cgroup has exited.
//!
//! connlimit makes itself a child subreaper, so the daemon a launcher
//! leaves behind is reparented to connlimit: it is reaped here, and its exit
//! status is seen, instead of lingering as a zombie under a PID 1 that may
//! not reap.

use std::{
    fs, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result};
use connlimit::ebpf::{cgroup::Cgroup, mounts};
use tokio::{io::unix::AsyncFd, signal::unix::Signal};

use crate::enforce::Signals;

/// Makes this process the reaper of its orphaned descendants.
pub(crate) fn become_subreaper() -> Result<()> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error()).context("becoming the reaper of the server's processes");
    }
    Ok(())
}

/// An exit status as a shell reports it: the code, or 128 + the signal.
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) }
}

/// Reaps every child that has exited, without blocking: (pid, exit code).
/// `None` once no child is left at all.
fn reap() -> Option<Vec<(i32, i32)>> {
    let mut reaped = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: a valid out-pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => return Some(reaped),
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => continue,
            -1 => return if reaped.is_empty() { None } else { Some(reaped) },
            pid if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) => reaped.push((pid, exit_code(status))),
            _ => {}
        }
    }
}

/// The PID in a pid file, if the file holds one.
fn read_pid_file(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok().filter(|&pid: &i32| pid > 0)
}

/// `cgroup.events` watched with inotify: the kernel signals a modification
/// when `populated` changes.
struct EventsWatch {
    fd: AsyncFd<OwnedFd>,
}

impl EventsWatch {
    fn new(dir: &Path) -> io::Result<Self> {
        // SAFETY: plain syscall; the fd is owned below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let path =
            std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.join("cgroup.events").as_os_str()))?;
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), libc::IN_MODIFY) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns `fd`, which stays open until it drops.
        Ok(Self { fd: unsafe { AsyncFd::register(fd) }? })
    }

    /// Waits for the next modification.
    async fn changed(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let drained = ready.try_io(|fd| {
                let mut buf = [0u8; 4096];
                // SAFETY: reading into a buffer of the stated length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
            if let Ok(result) = drained {
                return result;
            }
        }
    }
}

/// The server started by `exec`: its first process and its cgroup.
pub(crate) struct Server<'a> {
    pub cgroup: &'a Cgroup,
    /// The process connlimit started.
    pub first: i32,
    /// Where the server writes its main PID, if the operator said.
    pub pid_file: Option<PathBuf>,
}

/// What supervising the server saw.
#[derive(Debug, Default)]
struct Seen {
    /// The first process's exit code, once it has exited.
    first: Option<i32>,
    /// The main PID last read from the pid file.
    main_pid: Option<i32>,
    /// The main PID's exit code, if connlimit reaped it.
    main: Option<i32>,
    /// The exit code of the last other process connlimit reaped.
    last_other: Option<i32>,
}

impl Seen {
    fn record(&mut self, first: i32, (pid, code): (i32, i32)) {
        if pid == first {
            self.first = Some(code);
        } else {
            tracing::debug!(pid, code, "reaped a process of the server");
            if Some(pid) == self.main_pid {
                self.main = Some(code);
            }
            self.last_other = Some(code);
        }
    }

    /// connlimit's exit code: the first process's if it failed, else the
    /// main process's (the pid file's, else the last one reaped), else 0.
    fn exit_code(&self) -> i32 {
        match self.first {
            Some(code) if code != 0 => code,
            _ => self.main.or(self.last_other).unwrap_or(0),
        }
    }
}

impl Server<'_> {
    /// Whether `pid` is a process of the server's cgroup (a pid file may be
    /// stale and its PID reused by anybody).
    fn owns(&self, pid: i32) -> bool {
        u32::try_from(pid).is_ok_and(|pid| mounts::cgroup_of_pid(pid).is_ok_and(|c| c == self.cgroup.path()))
    }

    /// Passes `signal` on: to the main PID from the pid file, else to the
    /// first process while it runs, else to every process in the cgroup.
    fn forward(&self, signal: i32, seen: &mut Seen) {
        let main = self.pid_file.as_deref().and_then(read_pid_file).filter(|&pid| self.owns(pid));
        let targets = match main {
            Some(pid) => {
                seen.main_pid = Some(pid);
                vec![pid]
            }
            None if seen.first.is_none() => vec![self.first],
            None => self.cgroup.procs(),
        };
        if let Some(file) = self.pid_file.as_deref().filter(|_| main.is_none() && seen.first.is_some()) {
            tracing::warn!(pid_file = %file.display(), "the pid file names no process of the server; signalling every process in its cgroup");
        }
        tracing::info!(signal, pids = ?targets, "passing the signal on to the server");
        for pid in targets {
            // SAFETY: signalling processes of the server's own cgroup (or
            // our child, which is in it).
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Runs until the first process has exited and the cgroup is empty,
    /// passing signals on; returns the exit code for connlimit (see
    /// [`Seen::exit_code`]).
    pub(crate) async fn supervise(&self, signals: &mut Signals, children: &mut Signal) -> i32 {
        let watch = EventsWatch::new(self.cgroup.path())
            .inspect_err(|e| tracing::warn!(error = %e, "cannot watch cgroup.events; checking it every second instead"))
            .ok();
        let mut seen = Seen::default();
        let mut announced = false;
        loop {
            for reaped in reap().unwrap_or_default() {
                seen.record(self.first, reaped);
            }
            if let Some(code) = seen.first {
                // A daemon writes its pid file after its launcher exits;
                // a stale one names no process of the cgroup.
                if let Some(pid) = self.pid_file.as_deref().and_then(read_pid_file).filter(|&p| self.owns(p)) {
                    seen.main_pid = Some(pid);
                }
                if !self.cgroup.populated() {
                    break;
                }
                if !announced {
                    announced = true;
                    let remaining = self.cgroup.procs().len();
                    if code == 0 {
                        tracing::info!(
                            remaining,
                            "the server's first process exited with status 0, leaving processes in its cgroup (a daemon); guarding until they exit"
                        );
                    } else {
                        tracing::warn!(
                            code,
                            remaining,
                            "the server's first process failed, leaving processes in its cgroup; guarding until they exit (stop them with SIGTERM)"
                        );
                    }
                }
            }
            tokio::select! {
                _ = children.recv() => {}
                Some(Ok(())) = async { Some(watch.as_ref()?.changed().await) } => {}
                signal = signals.next() => self.forward(signal, &mut seen),
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        // A process leaves its cgroup before it becomes a zombie: reap the
        // last ones (the daemon's main process) for their status.
        for _ in 0..100 {
            match reap() {
                None => break,
                Some(reaped) => reaped.into_iter().for_each(|r| seen.record(self.first, r)),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        seen.exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_documented_order() {
        let first = 10;
        let mut seen = Seen::default();
        assert_eq!(seen.exit_code(), 0);
        seen.record(first, (first, 0));
        assert_eq!(seen.exit_code(), 0, "a server that exits 0 alone");
        seen.record(first, (11, 143));
        assert_eq!(seen.exit_code(), 143, "a daemon killed by SIGTERM");
        seen.main_pid = Some(12);
        seen.record(first, (12, 0));
        seen.record(first, (13, 1));
        assert_eq!(seen.exit_code(), 0, "the pid file's process wins over later ones");
        let mut failed = Seen::default();
        failed.record(first, (11, 0));
        failed.record(first, (first, 3));
        assert_eq!(failed.exit_code(), 3, "a failed first process wins");
    }

    #[test]
    fn pid_files_are_read_strictly() {
        let dir = std::env::temp_dir().join(format!("connlimit-pidfile-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pid");
        for (text, pid) in
            [("1234\n", Some(1234)), ("  77  ", Some(77)), ("0\n", None), ("-1", None), ("x", None), ("", None)]
        {
            fs::write(&file, text).unwrap();
            assert_eq!(read_pid_file(&file), pid, "{text:?}");
        }
        assert_eq!(read_pid_file(&dir.join("missing")), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exit_statuses_read_like_a_shell() {
        // Built as the kernel encodes them: code << 8, or the signal number.
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGTERM), 128 + libc::SIGTERM);
    }
}

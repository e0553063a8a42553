//! File descriptors: the process's limit (`RLIMIT_NOFILE`), raised to the
//! hard limit by a long-running `connlimit`, and the reserve that its
//! network endpoints (the 429 responder, `/metrics`) leave untouched, so
//! that the upkeep, a reload and the other endpoint always get the
//! descriptors they need however many clients connect.
//!
//! Linux hands out the lowest free descriptor, so a connection accepted as
//! descriptor `n` means `n` others are open: an endpoint keeps a connection
//! only while `n + reserve < limit` ([`may_keep`]), and otherwise closes it
//! at once (`/metrics` may keep it in place of an idle one it closes).
//! Connections therefore do not hold the top [`reserve`] descriptors,
//! whatever else is open. An accept that fails for want of descriptors or
//! memory pauses the loop ([`AcceptPause`]), so it never spins.

use std::{
    io,
    os::{fd::RawFd, unix::process::CommandExt},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Most descriptors kept in reserve (fewer under a small limit: a quarter
/// of it).
pub const RESERVE: u64 = 128;

/// The soft limit before [`raise_limit`] raised it (0: not raised).
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(0);

/// What [`raise_limit`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit found.
    pub before: u64,
    /// The soft limit now.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
}

fn get() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (or, if the kernel
/// refuses that, to `fs.nr_open`). Programs this process starts get the
/// old soft limit back ([`restore_on_exec`]).
pub fn raise_limit() -> io::Result<Raised> {
    let limit = get()?;
    let before = limit.rlim_cur;
    let mut want = limit.rlim_max;
    // SAFETY: reads the struct we pass.
    let set = |soft: libc::rlim_t| unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &libc::rlimit { rlim_cur: soft, rlim_max: limit.rlim_max })
    };
    if want > limit.rlim_cur && set(want) != 0 {
        // A hard limit of "unlimited" is above what the kernel allows.
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(limit.rlim_cur);
        want = nr_open.min(limit.rlim_max).max(limit.rlim_cur);
        if set(want) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let now = get()?;
    let _ = ORIGINAL_SOFT.compare_exchange(0, before, Ordering::Relaxed, Ordering::Relaxed);
    Ok(Raised { before, soft: now.rlim_cur, hard: now.rlim_max })
}

/// Makes the program `command` starts run with the soft limit this process
/// had before [`raise_limit`] (a server may rely on it, e.g. one that uses
/// `select`).
pub fn restore_on_exec(command: &mut Command) {
    let original = ORIGINAL_SOFT.load(Ordering::Relaxed);
    if original == 0 {
        return;
    }
    // SAFETY: getrlimit and setrlimit are async-signal-safe and use only
    // the stack.
    unsafe {
        command.pre_exec(move || {
            let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && original < limit.rlim_cur {
                limit.rlim_cur = original;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The soft limit now.
pub fn limit() -> u64 {
    get().map(|l| l.rlim_cur).unwrap_or(1024)
}

/// Descriptors the network endpoints leave to the rest of the process
/// under a soft limit of `limit`: [`RESERVE`], or a quarter of a small limit.
pub fn reserve(limit: u64) -> u64 {
    (limit / 4).min(RESERVE)
}

/// Whether an endpoint may keep a connection it accepted as descriptor
/// `fd`: false when keeping it would eat into the [`reserve`].
pub fn may_keep(fd: RawFd) -> bool {
    let limit = limit();
    u64::try_from(fd).is_ok_and(|fd| fd + reserve(limit) < limit)
}

/// Descriptors this process has open now (reads `/proc/self/fd`).
pub fn open_count() -> io::Result<usize> {
    // Less the directory's own descriptor.
    Ok(std::fs::read_dir("/proc/self/fd")?.count().saturating_sub(1))
}

/// How long an accept loop pauses after a failed accept: out of
/// descriptors or memory, from 100 ms, doubling to 1 s while it lasts;
/// anything else, 10 ms. Never zero, so a loop never spins.
#[derive(Debug, Default)]
pub struct AcceptPause {
    /// Consecutive pauses for want of resources.
    starved: u32,
}

impl AcceptPause {
    /// Minimum pause after an accept error that is not about resources.
    pub const OTHER: Duration = Duration::from_millis(10);
    /// First pause for want of descriptors or memory.
    pub const FIRST: Duration = Duration::from_millis(100);
    /// Longest pause.
    pub const MAX: Duration = Duration::from_secs(1);

    /// An accept succeeded (and its connection was kept).
    pub fn ok(&mut self) {
        self.starved = 0;
    }

    /// The pause after accept failed with `error`, and whether it was for
    /// want of resources (worth a log line).
    pub fn after_error(&mut self, error: &io::Error) -> (Duration, bool) {
        match error.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => (self.starving(), true),
            _ => (Self::OTHER, false),
        }
    }

    fn starving(&mut self) -> Duration {
        let pause = Self::FIRST.saturating_mul(1 << self.starved.min(4)).min(Self::MAX);
        self.starved = self.starved.saturating_add(1);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_a_bound_and_reset() {
        let mut pause = AcceptPause::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let pauses: Vec<Duration> = (0..6).map(|_| pause.after_error(&emfile).0).collect();
        assert_eq!(pauses[0], AcceptPause::FIRST);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]) && pauses[5] == AcceptPause::MAX, "{pauses:?}");
        pause.ok();
        assert_eq!(pause.after_error(&emfile).0, AcceptPause::FIRST);
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(pause.after_error(&aborted), (AcceptPause::OTHER, false));
    }

    #[test]
    fn the_reserve_is_kept_below_the_limit() {
        assert_eq!(reserve(1024), RESERVE);
        assert_eq!(reserve(100), 25);
        let limit = limit();
        assert!(may_keep(3) || limit <= 3 + reserve(limit));
        assert!(!may_keep(i32::try_from(limit).unwrap_or(i32::MAX)));
        assert!(!may_keep(-1));
        assert!(open_count().unwrap() >= 3);
    }
}

//! Who owns an instance, and handing it over.
//!
//! An instance's links are always pinned, so the kernel keeps enforcing
//! the last config, with its counts, whatever happens to the process that
//! attached it. That process is the instance's *owner*, recorded as a PID
//! plus the process's start time: a PID is trusted only while the process
//! holding it started at the recorded time, so a reused PID is never
//! mistaken for the owner (nor signalled).
//!
//! - A graceful exit of the owner detaches the instance, or with
//!   `--persist` leaves it enforcing, owned by nobody.
//! - A crash (`kill -9`) leaves it enforcing and *orphaned*: the same `run`
//!   command adopts it ([`Instance::adopt`]); `connlimit detach` removes it.

use std::{fs, io, time::Duration, time::Instant};

use connlimit_common::maps::{INFO_PERSIST, InstanceInfo, KernelConfig};

use super::{AttachOptions, EbpfError, Instance, PinRoot, capabilities, guard, mounts, netns};

/// A process, identified by its PID and its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
    pub start_ticks: u64,
}

/// Field 3 (state) and field 22 (start time) of `/proc/<pid>/stat`.
fn stat_of(pid: u32) -> Option<(char, u64)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `fields` now starts at field 4; field 22 is 18 further.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

impl Owner {
    /// This process.
    pub fn current() -> Result<Self, EbpfError> {
        let pid = std::process::id();
        let (_, start_ticks) =
            stat_of(pid).ok_or_else(|| EbpfError::system("reading /proc/self/stat", "no start time"))?;
        Ok(Self { pid, start_ticks })
    }

    /// The owner recorded in `info`, if any.
    pub fn recorded(info: &InstanceInfo) -> Option<Self> {
        (info.pid != 0).then_some(Self { pid: info.pid, start_ticks: info.owner_start_ticks })
    }

    /// Whether this process is still running: a process has the PID, it
    /// started at the recorded time, and it has not exited (a zombie has).
    pub fn is_running(&self) -> bool {
        matches!(stat_of(self.pid), Some((state, start)) if start == self.start_ticks && !matches!(state, 'Z' | 'X'))
    }

    /// Sends `signal` to this process, race-free: through a pidfd opened
    /// first and checked against the start time after, so a PID reused in
    /// between is never signalled. `Ok(false)` if the process is gone.
    pub fn signal(&self, signal: i32) -> io::Result<bool> {
        // SAFETY: plain syscall; the fd is closed below.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid as libc::pid_t, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ESRCH) { Ok(false) } else { Err(e) };
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        // The pidfd names whichever process had the PID when it was opened:
        // if that one started at the recorded time, it is the owner.
        if !self.is_running() {
            return Ok(false);
        }
        use std::os::fd::AsRawFd;
        // SAFETY: valid pidfd; no siginfo.
        let rc = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) { Ok(false) } else { Err(e) }
    }
}

/// Who holds an instance now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// The owner is running.
    Owned(Owner),
    /// The owner exited without letting go (it crashed or was killed): the
    /// kernel still enforces, and nobody will detach the instance.
    Orphaned(Owner),
    /// Nobody: a persisted instance whose owner exited gracefully.
    Unowned,
}

impl Ownership {
    /// Reads it from an instance's info.
    pub fn of(info: &InstanceInfo) -> Self {
        match Owner::recorded(info) {
            Some(owner) if owner.is_running() => Self::Owned(owner),
            Some(owner) => Self::Orphaned(owner),
            None => Self::Unowned,
        }
    }
}

/// What [`Instance::detach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detached {
    /// Removed the pins directly (nobody owned it, or `force`).
    Removed,
    /// Asked the running owner to stop (SIGTERM), and it let go.
    StoppedOwner(u32),
}

impl Instance {
    /// Whether the instance stays enforcing when its owner exits gracefully.
    pub fn is_persistent(&self) -> bool {
        self.info().is_ok_and(|info| info.flags & INFO_PERSIST != 0)
    }

    /// Who holds the instance now.
    pub fn ownership(&self) -> Result<Ownership, EbpfError> {
        Ok(Ownership::of(&self.info()?))
    }

    /// Takes over the existing instance `options.name`, with its counts,
    /// as its new owner: when it is orphaned (its owner crashed) or
    /// persisted with no owner, and attached to the same cgroup and network
    /// namespace. Its ports and config become `options`'. Fails if another
    /// running process owns it, if another connlimit version pinned it, or
    /// if another instance in the namespace guards one of the ports.
    pub fn adopt(options: &AttachOptions) -> Result<Self, EbpfError> {
        let name = &options.name;
        Self::validate_name(name)?;
        options.config.validate()?;
        let ports = guard::normalize_ports(&options.ports)?;
        capabilities::require_access(&super::pin_root())?;
        mounts::require_cgroup2_dir(&options.cgroup)?;
        let netns = netns::NetnsId::of(&options.netns)?;
        let cgroup_ino = mounts::inode(&options.cgroup)?;
        let me = Owner::current()?;

        let root = PinRoot::write()?;
        let mut instance = Self::open_in(&root, name)?;
        let info = instance.info()?;
        if let Ownership::Owned(owner) = Ownership::of(&info)
            && owner.pid != me.pid
        {
            return Err(EbpfError::InstanceHeld { name: name.clone(), pid: owner.pid });
        }
        // A guarded cgroup made again since (a restarted service) is the
        // same target: the upkeep attaches to the new one.
        let same_cgroup = info.cgroup_ino == cgroup_ino || mounts::cgroup_exists(info.cgroup_ino) == Some(false);
        if !same_cgroup || (info.netns_dev, info.netns_ino) != (netns.dev, netns.ino) {
            return Err(EbpfError::AdoptMismatch(name.clone()));
        }
        guard::refuse_taken_ports(&root, &ports, netns, Some(name))?;
        instance.set_ports(&ports)?;
        let kernel = KernelConfig {
            epoch_ns: super::kernel_config::validated_epoch_ns(options.reservation_epoch)?,
            flags: options.when_full.flag() | options.refuse_with.flag(),
            ..instance.kernel_config()?
        };
        instance.write_config(&options.config, kernel)?;
        instance.set_info(InstanceInfo {
            pid: me.pid,
            owner_start_ticks: me.start_ticks,
            flags: (info.flags & !INFO_PERSIST) | if options.persist { INFO_PERSIST } else { 0 },
            ..info
        })?;
        Ok(instance)
    }

    /// Lets go of an instance this process owns: detaches it (removes its
    /// pins and waits until the kernel has freed its programs) when
    /// `detach`, else leaves it enforcing, owned by nobody. An instance that
    /// another process owns by now (it was removed and attached again) is
    /// left alone. Returns whether it was detached.
    pub fn disown(self, detach: bool) -> Result<bool, EbpfError> {
        let name = self.name().to_owned();
        drop(self);
        let detached = disown(&name, detach)?;
        if let Some(programs) = &detached {
            super::attachments::wait_until_freed(programs);
        }
        Ok(detached.is_some())
    }

    /// Detaches instance `name` from any process: a running owner (`run`
    /// or `exec`) is asked to stop with SIGTERM and lets go itself (an
    /// `exec` ends its server first); an orphaned or unowned instance is
    /// removed directly. With `force`, the pins are removed directly in
    /// any case, whatever connlimit version pinned them (a running owner
    /// keeps its programs attached until it exits).
    pub fn detach(name: &str, force: bool) -> Result<Detached, EbpfError> {
        Self::validate_name(name)?;
        capabilities::require_access(&super::pin_root())?;
        let owner = {
            let root = PinRoot::write()?;
            if !root.is_instance(name) {
                return Err(EbpfError::NoSuchInstance(name.to_owned()));
            }
            if force {
                return remove_and_wait(root, name);
            }
            match Self::open_in(&root, name)?.ownership()? {
                Ownership::Owned(owner) => owner,
                Ownership::Orphaned(_) | Ownership::Unowned => {
                    return remove_and_wait(root, name);
                }
            }
            // The lock is released here: the owner needs it to let go.
        };
        let signalled = owner
            .signal(libc::SIGTERM)
            .map_err(|e| EbpfError::system(format!("signalling process {}, which owns {name:?}", owner.pid), e))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        // Wait for the owner to let go; if it exits without doing so, the
        // instance is an orphan: remove it.
        while owner.is_running() {
            if !PinRoot::read()?.is_some_and(|root| root.is_instance(name)) {
                return Ok(Detached::StoppedOwner(owner.pid));
            }
            if Instant::now() > deadline {
                return Err(EbpfError::system(
                    format!("detaching {name:?}"),
                    format!(
                        "process {} did not let go within 10 s; `connlimit detach --name {name} --force` removes the pins",
                        owner.pid
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The owner is gone. A persisted instance it left enforcing, or one
        // it left orphaned, goes too; one another process adopted meanwhile
        // stays.
        let root = PinRoot::write()?;
        if root.is_instance(name) {
            if let Ownership::Owned(other) = Self::open_in(&root, name)?.ownership()? {
                return Err(EbpfError::InstanceHeld { name: name.to_owned(), pid: other.pid });
            }
            remove_and_wait(root, name)?;
        }
        Ok(if signalled { Detached::StoppedOwner(owner.pid) } else { Detached::Removed })
    }
}

/// The [`Instance::disown`] of instance `name` by this process. Returns
/// the IDs of the programs to wait for if it was detached (the caller may
/// still hold them), `None` if it was left enforcing.
pub(crate) fn disown(name: &str, detach: bool) -> Result<Option<Vec<u32>>, EbpfError> {
    let me = Owner::current()?;
    let root = PinRoot::write()?;
    if !root.is_instance(name) {
        return Ok(Some(Vec::new()));
    }
    let mut instance = Instance::open_in(&root, name)?;
    let info = instance.info()?;
    if Owner::recorded(&info) != Some(me) {
        tracing::warn!(instance = %name, "another process owns the instance now; leaving it alone");
        return Ok(None);
    }
    if detach {
        drop(instance);
        return remove_locked(root, name).map(Some);
    }
    instance.set_info(InstanceInfo { pid: 0, owner_start_ticks: 0, ..info })?;
    Ok(None)
}

fn remove_and_wait(root: PinRoot, name: &str) -> Result<Detached, EbpfError> {
    let programs = remove_locked(root, name)?;
    super::attachments::wait_until_freed(&programs);
    Ok(Detached::Removed)
}

/// Removes instance `name`'s pins, detaching its programs unless a process
/// still holds them, and releases the lock. Returns the programs' IDs.
pub(crate) fn remove_locked(root: PinRoot, name: &str) -> Result<Vec<u32>, EbpfError> {
    let dir = root.path().join(name);
    let programs = root.open_dir(name).map(|fd| super::instance::linked_programs(&fd)).unwrap_or_default();
    root.remove_dir(name).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP) => EbpfError::NoSuchInstance(name.to_owned()),
        _ => EbpfError::system(format!("removing {}", dir.display()), e),
    })?;
    Ok(programs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_its_own_running_owner() {
        let me = Owner::current().unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.start_ticks > 0);
        assert!(me.is_running());
        let info = InstanceInfo { pid: me.pid, owner_start_ticks: me.start_ticks, ..InstanceInfo::default() };
        assert_eq!(Ownership::of(&info), Ownership::Owned(me));
        assert_eq!(Ownership::of(&InstanceInfo::default()), Ownership::Unowned);
    }

    #[test]
    fn a_pid_with_another_start_time_is_not_the_owner_and_is_never_signalled() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let real = stat_of(pid).unwrap().1;
        let impostor = Owner { pid, start_ticks: real + 1 };
        assert!(!impostor.is_running());
        let info = InstanceInfo { pid, owner_start_ticks: real + 1, ..InstanceInfo::default() };
        assert_eq!(Ownership::of(&info), Ownership::Orphaned(impostor));
        assert!(!impostor.signal(libc::SIGTERM).unwrap());
        assert!(child.try_wait().unwrap().is_none(), "signalled a process that only shares the PID");

        let owner = Owner { pid, start_ticks: real };
        assert!(owner.is_running());
        assert!(owner.signal(libc::SIGTERM).unwrap());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
        // Exited (and reaped): no longer running, not signalled.
        assert!(!owner.is_running());
        assert!(!owner.signal(libc::SIGTERM).unwrap());
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        // The command name (from the program's file name) may hold spaces
        // and parentheses.
        let dir = std::env::temp_dir().join(format!("connlimit-owner-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("a) 1 2 (b");
        let _ = std::fs::remove_file(&program);
        std::os::unix::fs::symlink("/bin/sleep", &program).unwrap();
        let mut child = std::process::Command::new(&program).arg("30").spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", child.id())).unwrap();
        assert_eq!(comm.trim(), "a) 1 2 (b");
        let (state, start) = stat_of(child.id()).unwrap();
        assert!(matches!(state, 'S' | 'R'), "{state}");
        assert!(Owner { pid: child.id(), start_ticks: start }.is_running());
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

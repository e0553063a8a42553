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
//!
//! A container started again also has a new network namespace. An instance
//! that guards a namespace other than its owner's (a container named by
//! PID) moves with the cgroup's processes: once none of them is left in the
//! guarded namespace and one is in another (not the owner's own, where a
//! runtime's helper may pass through), the lookup program is attached
//! there too (pinned as `link_lookup_<namespace inode>`), and sock_ops
//! counts that namespace's sockets from then on (see [`move_netns`]).

use std::{
    ffi::CString,
    fs::File,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use connlimit_common::maps::InstanceInfo;

use super::{
    EbpfError, Instance, PinRoot,
    bpf_sys::{BPF_CGROUP_SOCK_OPS, BPF_SK_LOOKUP, link_create, link_info, obj_get, obj_pin, prog_by_id},
    instance::{LINK_PINS, SOCK_OPS_PROGRAM_PIN},
    mounts,
};

/// Where the lookup link of an instance is pinned.
const LOOKUP_PIN: &str = LINK_PINS[0];
/// Where the sock_ops link of an instance is pinned.
const SOCK_OPS_PIN: &str = LINK_PINS[1];
/// Most processes of the guarded cgroup looked at for their namespace each
/// round; a cgroup with more is not followed into another namespace (every
/// process must have left the old one).
const NETNS_SCAN_MAX: usize = 4096;

/// What the upkeep of an instance knows about the path it guards.
#[derive(Debug)]
pub(crate) struct Follow {
    path: PathBuf,
    /// Said in the log already (once per absence).
    gone_said: bool,
    /// The last re-attach failure said in the log.
    failure_said: Option<String>,
    /// The last failure to move to a new network namespace said in the log.
    netns_failure_said: Option<String>,
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
        Self { path: path.to_owned(), gone_said: false, failure_said: None, netns_failure_said: None }
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

impl Follow {
    /// For an instance guarding a network namespace other than its owner's:
    /// when the guarded cgroup's processes have all left that namespace for
    /// another one, moves the instance there and returns the new namespace
    /// (the owner's upkeep and responder move with it).
    pub(crate) fn look_netns(&mut self, instance: &mut Instance) -> Option<File> {
        let info = instance.info().ok()?;
        let own = std::fs::metadata("/proc/self/ns/net").ok()?;
        let guarded = (info.netns_dev, info.netns_ino);
        if guarded == (own.dev(), own.ino()) {
            return None;
        }
        let (netns, ino) = moved_to(&self.path, guarded, (own.dev(), own.ino()))?;
        let name = instance.name().to_owned();
        match move_netns(instance, &netns) {
            Ok(()) => {
                tracing::info!(
                    instance = %name, cgroup = %self.path.display(), netns = ino,
                    "the guarded processes are in a new network namespace (their container started again): \
                     enforcing there, counts kept"
                );
                self.netns_failure_said = None;
                Some(netns)
            }
            Err(e) => {
                let e = e.to_string();
                if self.netns_failure_said.as_ref() != Some(&e) {
                    tracing::error!(
                        instance = %name, cgroup = %self.path.display(), error = %e,
                        "not enforcing: the guarded processes moved to a new network namespace that cannot be \
                         attached (needs CAP_SYS_ADMIN); tried again every 200 ms"
                    );
                    self.netns_failure_said = Some(e);
                }
                None
            }
        }
    }
}

/// The namespace the processes of the cgroup at `path` (and below) moved
/// to, opened, with its inode: `None` while any of them is still in
/// `guarded`, none is in a namespace other than `own`, or there are too
/// many to look at all of them.
fn moved_to(path: &Path, guarded: (u64, u64), own: (u64, u64)) -> Option<(File, u64)> {
    let pids = cgroup_pids(path, NETNS_SCAN_MAX + 1);
    if pids.len() > NETNS_SCAN_MAX {
        return None;
    }
    let mut found = None;
    for pid in pids {
        let ns = format!("/proc/{pid}/ns/net");
        let Ok(m) = std::fs::metadata(&ns) else { continue };
        let id = (m.dev(), m.ino());
        if id == guarded {
            return None;
        }
        if id != own && found.is_none() {
            // Opened now: the file names this namespace whatever the process does next.
            found = File::open(&ns)
                .ok()
                .filter(|f| f.metadata().is_ok_and(|m| (m.dev(), m.ino()) == id))
                .map(|f| (f, id.1));
        }
    }
    found
}

/// Up to `max` processes of the cgroup at `path` and the cgroups below it.
fn cgroup_pids(path: &Path, max: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if pids.len() >= max {
            pids.truncate(max);
            break;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
    }
    pids
}

/// Moves the instance to the network namespace `netns`: sock_ops counts
/// that namespace's sockets (its cookie is written first, so a handshake
/// completing there from now on is counted), then the lookup program is
/// attached there and the link pinned, then the namespace is recorded; all
/// under the pin root's lock, as `set` changes the configuration, and the
/// old cookie put back if the lookup program cannot be attached. The links
/// of namespaces the kernel has released are unpinned.
fn move_netns(instance: &mut Instance, netns: &File) -> Result<(), EbpfError> {
    let fail = |what: &str, e: io::Error| EbpfError::system(format!("{what} in the new network namespace"), e);
    let name = instance.name().to_owned();
    let meta = netns.metadata().map_err(|e| fail("reading the namespace", e))?;
    let dir = File::open(Instance::dir_of(&name)).map_err(|_| EbpfError::NoSuchInstance(name.clone()))?;
    let netns_path = PathBuf::from(format!("/proc/self/fd/{}", netns.as_raw_fd()));
    // 0 would count the cgroup's sockets of every namespace.
    let cookie = match super::netns::netns_cookie(&netns_path) {
        0 => return Err(fail("reading the cookie", io::Error::other("setns needs CAP_SYS_ADMIN"))),
        cookie => cookie,
    };
    let first = obj_get(dir.as_fd(), LOOKUP_PIN).map_err(|e| fail("opening the lookup link", e))?;
    let (prog_id, _) = link_info(first.as_fd()).map_err(|e| fail("reading the lookup link", e))?;
    let prog = prog_by_id(prog_id).map_err(|e| fail("opening the lookup program", e))?;
    let root = PinRoot::write()?;
    if !root.is_instance(&name) {
        return Err(EbpfError::NoSuchInstance(name));
    }
    let old_cookie = instance.kernel_config()?.netns_cookie;
    instance.set_netns_cookie(cookie)?;
    let attached = link_create(prog.as_fd(), netns.as_fd(), BPF_SK_LOOKUP)
        .map_err(|e| fail("attaching the lookup program", e))
        .and_then(|link| {
            obj_pin(link.as_fd(), dir.as_fd(), &format!("{LOOKUP_PIN}_{}", meta.ino()))
                .map_err(|e| fail("pinning the lookup link", e))
        });
    if let Err(e) = attached {
        let _ = instance.set_netns_cookie(old_cookie);
        return Err(e);
    }
    let info = instance.info()?;
    instance.set_info(InstanceInfo { netns_dev: meta.dev(), netns_ino: meta.ino(), ..info })?;
    prune_released(dir.as_fd(), LOOKUP_PIN);
    Ok(())
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
        let link = link_create(prog.as_fd(), cgroup.as_fd(), BPF_CGROUP_SOCK_OPS)
            .map_err(|e| fail("attaching the sock_ops program", e))?;
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
    prune_released(dir.as_fd(), SOCK_OPS_PIN);
    Ok(())
}

/// Unpins the links made by [`repoint`] or [`move_netns`] (pinned as
/// `<first>_<inode>`) whose cgroup or namespace the kernel has released (no
/// socket of it is left), which detaches nothing in use.
fn prune_released(dir: BorrowedFd<'_>, first: &str) {
    let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else { return };
    let prefix = format!("{first}_");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str().filter(|f| f.starts_with(&prefix)) else { continue };
        let released = obj_get(dir, file).and_then(|l| link_info(l.as_fd())).is_ok_and(|(_, target)| target == 0);
        if released && let Ok(c) = CString::new(file) {
            // SAFETY: valid directory fd and NUL-terminated name.
            unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) };
        }
    }
}

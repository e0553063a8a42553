//! What the process owning an instance does for it in user space, on a
//! thread inside the guarded network namespace:
//!
//! - **Ending connections the kernel asks to end.** A handshake that
//!   completes after its reservation is gone (a client that held back its
//!   final ACK, say) is judged when it completes; sock_ops cannot close a
//!   socket, so when such a connection is over the limit the kernel reports
//!   it in the `ENDINGS` ring buffer and this thread ends it with
//!   `SOCK_DESTROY` (`CONFIG_INET_DIAG_DESTROY`). The client gets a RST; the
//!   server's next read or write on it fails.
//! - **Carrying counts the kernel cannot see.** Connections open before the
//!   instance attached were never counted by sock_ops, and after a change
//!   of prefix length, connections stay counted under their old keys. From
//!   a socket-diagnostics dump of the established connections of the cgroup (and those below it) on
//!   the guarded ports, this thread writes, for each client key, how many
//!   of its connections the kernel does not count under it (`CARRIED`,
//!   which only user space writes); the kernel adds them to the key's
//!   count. It does so at start, a second later (to catch connections that
//!   completed while the programs were attaching), then each second while
//!   anything is carried or after the grouping or the untracked count
//!   changes.
//! - **Following the guarded cgroup** when it is removed and made again
//!   (see [`follow`](super::follow)): looked at each round, so at most
//!   [`POLL`] after the new directory appears; and, for an instance
//!   guarding a namespace other than its owner's, following the cgroup's
//!   processes into a new network namespace (a container started again),
//!   with this thread and the 429 responder.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use connlimit_common::maps::{ClientKey, Ending};

use super::{
    EbpfError, Instance,
    follow::{Follow, Look},
    sock_diag,
};
use crate::addr;

/// How often the thread looks at its stop flag while nothing arrives.
const POLL: Duration = Duration::from_millis(200);
/// How often carried counts are brought up to date while they matter.
const RECONCILE: Duration = Duration::from_secs(1);

/// The upkeep thread of an instance; it stops when this is dropped.
#[derive(Debug)]
pub struct Upkeep {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Whether this owner runs a 429 responder (see [`super::Responder`]),
    /// which this thread owns.
    responding: bool,
}

impl Upkeep {
    /// Starts the upkeep of `instance` (a handle of its own on the maps),
    /// ending what `ring` reports, in the network namespace `netns_file`,
    /// and owning `responder`. Follows the cgroup at `cgroup` if it is made
    /// again.
    pub(crate) fn start(
        ring: RingBuf<MapData>,
        instance: Instance,
        netns_file: std::fs::File,
        cgroup: &Path,
        responder: Option<super::Responder>,
    ) -> Result<Self, EbpfError> {
        let follow = Follow::new(cgroup);
        let responding = responder.is_some();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("connlimit-upkeep".into())
            .spawn(move || {
                let diag = sock_diag::enter_netns(&netns_file).and_then(|()| sock_diag::SockDiag::open());
                let diag = match diag {
                    Ok(diag) => diag,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut work = Work { instance, diag, ring, carrying: Carrying::default(), follow, responder };
                work.reconcile();
                let _ = ready_tx.send(Ok(()));
                while !stopping.load(Ordering::Relaxed) {
                    work.end_what_is_asked();
                    if work.follow.look(&mut work.instance) == Look::Followed {
                        // Connections made in the new cgroup before the
                        // program was attached to it are carried.
                        work.carrying = Carrying::default();
                    }
                    if let Some(netns) = work.follow.look_netns(&mut work.instance) {
                        work.move_to(&netns);
                    }
                    work.reconcile_if_due();
                    wait_readable(&work.ring, POLL);
                }
            })
            .map_err(|e| EbpfError::system("starting the upkeep thread", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self { stop, thread: Some(thread), responding }),
            Ok(Err(e)) => Err(EbpfError::system("opening a socket-diagnostics socket in the guarded namespace", e)),
            Err(_) => Err(EbpfError::system("starting the upkeep thread", "it stopped")),
        }
    }
}

impl Upkeep {
    /// Whether this owner answers refusals with 429 when asked to.
    pub fn has_responder(&self) -> bool {
        self.responding
    }
}

impl Drop for Upkeep {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// When carried counts were last brought up to date, and what they
/// depended on then.
#[derive(Debug, Default)]
struct Carrying {
    last: Option<Instant>,
    /// Reconciles so far (the second one is always made).
    rounds: u32,
    keys: usize,
    grouping: (u8, u8),
    untracked: u64,
}

struct Work {
    instance: Instance,
    diag: sock_diag::SockDiag,
    ring: RingBuf<MapData>,
    carrying: Carrying,
    follow: Follow,
    responder: Option<super::Responder>,
}

impl Work {
    /// Moves this thread, its socket-diagnostics socket and the 429
    /// responder into the network namespace `netns`, where the instance
    /// now enforces, and counts again what is open there.
    fn move_to(&mut self, netns: &std::fs::File) {
        let name = self.instance.name().to_owned();
        match sock_diag::enter_netns(netns).and_then(|()| sock_diag::SockDiag::open()) {
            Ok(diag) => self.diag = diag,
            Err(e) => tracing::error!(
                instance = %name, error = %e,
                "cannot follow into the new network namespace (setns needs CAP_SYS_ADMIN): \
                 over-limit connections completed there are not ended"
            ),
        }
        if let Some(responder) = self.responder.take() {
            match responder.restart(netns) {
                Ok(responder) => self.responder = Some(responder),
                Err(e) => tracing::warn!(instance = %name, error = %e, "no 429 responder: refusals get a reset"),
            }
        }
        self.carrying = Carrying::default();
    }

    fn end_what_is_asked(&mut self) {
        let name = self.instance.name().to_owned();
        while let Some(item) = self.ring.next() {
            if item.len() < size_of::<Ending>() {
                continue;
            }
            // SAFETY: the kernel wrote an `Ending` (plain integers); length checked.
            let ending: Ending = unsafe { item.as_ptr().cast::<Ending>().read_unaligned() };
            drop(item);
            let client = addr::from_words(ending.flow.client);
            match self.diag.destroy(&ending.flow, ending.cookie) {
                Ok(()) => tracing::info!(
                    instance = %name, %client, port = ending.flow.local_port,
                    "ended a connection the server must not hold (over the limit when its handshake completed, or not countable)"
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    instance = %name, %client, error = %e,
                    "could not end a connection over the limit (needs CONFIG_INET_DIAG_DESTROY)"
                ),
            }
        }
    }

    fn reconcile_if_due(&mut self) {
        let due = self.carrying.last.is_none_or(|t| t.elapsed() >= RECONCILE);
        if !due {
            return;
        }
        let (grouping, untracked) = self.inputs();
        let needed = self.carrying.rounds < 2
            || self.carrying.keys > 0
            || grouping.is_some_and(|g| g != self.carrying.grouping)
            || untracked.is_some_and(|u| u != self.carrying.untracked);
        if needed {
            self.reconcile_with(grouping, untracked);
        } else {
            self.carrying.last = Some(Instant::now());
        }
    }

    /// What carried counts depend on besides the sockets: the grouping, and
    /// the count of connections admitted uncounted.
    fn inputs(&self) -> (Option<(u8, u8)>, Option<u64>) {
        let grouping = self.instance.kernel_config().map(|k| (k.ipv4_prefix_len, k.ipv6_prefix_len)).ok();
        (grouping, self.instance.stats().map(|s| s.untracked).ok())
    }

    fn reconcile(&mut self) {
        let (grouping, untracked) = self.inputs();
        self.reconcile_with(grouping, untracked);
    }

    /// Brings the carried counts up to date; `grouping` and `untracked`
    /// were read just before, so a change during the dump is seen next time.
    fn reconcile_with(&mut self, grouping: Option<(u8, u8)>, untracked: Option<u64>) {
        match self.carried() {
            Ok(carried) => {
                if let Err(e) = self.instance.write_carried(&carried) {
                    tracing::warn!(instance = %self.instance.name(), error = %e, "could not update carried counts");
                }
                if self.carrying.rounds == 0 && !carried.is_empty() {
                    let n: u32 = carried.values().sum();
                    tracing::info!(instance = %self.instance.name(), connections = n, "counting connections that were open before attaching");
                }
                self.carrying.keys = carried.len();
            }
            Err(e) => {
                tracing::warn!(instance = %self.instance.name(), error = %e, "could not reconcile carried counts")
            }
        }
        self.carrying.rounds += 1;
        self.carrying.last = Some(Instant::now());
        if let Some(grouping) = grouping {
            self.carrying.grouping = grouping;
        }
        if let Some(untracked) = untracked {
            self.carrying.untracked = untracked;
        }
    }

    /// For each client key, the established connections of the guarded
    /// cgroup and those below it on the guarded ports that belong to it but that the kernel does not count
    /// under it.
    fn carried(&self) -> Result<HashMap<ClientKey, u32>, EbpfError> {
        let config = self.instance.config()?;
        // The programs run for the cgroups below the guarded one too.
        let subtree = super::mounts::cgroup_subtree(self.instance.info()?.cgroup_ino);
        let sockets = self
            .diag
            .connections(self.instance.socket_states())
            .map_err(|e| EbpfError::system("listing the established connections", e))?;
        let mut guarded: HashMap<u16, bool> = HashMap::new();
        let mut carried = HashMap::new();
        for s in sockets.iter().filter(|s| subtree.contains(&s.cgroup_id)) {
            let is_guarded = match guarded.get(&s.local_port) {
                Some(&g) => g,
                None => {
                    let g = self.instance.guards(s.local_port)?;
                    guarded.insert(s.local_port, g);
                    g
                }
            };
            if !is_guarded || config.is_exempt(s.remote) {
                continue;
            }
            let key = ClientKey::grouped(&addr::to_words(s.remote), config.ipv4_prefix_len, config.ipv6_prefix_len);
            if s.counted_under != Some(key) {
                *carried.entry(key).or_insert(0) += 1;
            }
        }
        Ok(carried)
    }
}

fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) {
    let mut fd = libc::pollfd { fd: ring.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut fd, 1, timeout.as_millis() as i32) };
}

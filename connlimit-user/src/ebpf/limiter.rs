//! [`EbpfLimiter`], a kernel-enforced limiter owned by this process, and
//! the [`AttachOptions`] it is attached with.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use aya::{Ebpf, programs::links::FdLink};

use super::{
    ClientCount, DEFAULT_RESERVATION_EPOCH, EbpfError, Instance, PinRoot, RefuseWith, Upkeep, WhenFull, attachments,
    loader, log, netns, owner,
};
use crate::{Config, PeerAddr, Stats};

/// What to attach to and how.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    pub(super) name: String,
    pub(super) cgroup: PathBuf,
    pub(super) netns: PathBuf,
    pub(super) ports: Vec<u16>,
    pub(super) config: Config,
    pub(super) persist: bool,
    pub(super) reservation_epoch: Duration,
    pub(super) when_full: WhenFull,
    pub(super) refuse_with: RefuseWith,
    pub(super) max_clients: Option<u32>,
}

impl AttachOptions {
    /// Options for instance `name`, counting the connections of the
    /// processes in the cgroup v2 directory `cgroup`, in the caller's
    /// network namespace, with no port and no limit yet.
    pub fn new(name: impl Into<String>, cgroup: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            cgroup: cgroup.into(),
            netns: PathBuf::from(netns::OWN_NETNS),
            ports: Vec::new(),
            config: Config::default(),
            persist: false,
            reservation_epoch: DEFAULT_RESERVATION_EPOCH,
            when_full: WhenFull::default(),
            refuse_with: RefuseWith::default(),
            max_clients: None,
        }
    }

    /// Guards local TCP port `port` (may be given several times).
    pub fn port(mut self, port: u16) -> Self {
        self.ports.push(port);
        self
    }

    /// Guards these local TCP ports as well.
    pub fn ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.ports.extend(ports);
        self
    }

    /// Attaches the lookup program in the network namespace at `path` (an
    /// nsfs file: `/proc/<pid>/ns/net`, `/run/netns/<name>`) instead of the
    /// caller's.
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = path.into();
        self
    }

    /// The limits to enforce from the start.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Keeps enforcing after this process exits gracefully: dropping the
    /// limiter leaves everything in place, owned by nobody (remove it later
    /// with [`Instance::remove`]). Without it, dropping the limiter detaches
    /// it. Either way the links are pinned, so if this process crashes the
    /// kernel keeps enforcing, and the instance is left orphaned (see
    /// [`owner`]).
    pub fn persist(mut self, persist: bool) -> Self {
        self.persist = persist;
        self
    }

    /// How long an admitted handshake holds its slot before completing: a
    /// SYN that never completes (spoofed, or abandoned) frees its slot
    /// between one and two epochs after it arrived; a handshake completing
    /// later is judged again then. Default: 1 s; from
    /// [`MIN_RESERVATION_EPOCH`](super::MIN_RESERVATION_EPOCH) to
    /// [`MAX_RESERVATION_EPOCH`](super::MAX_RESERVATION_EPOCH).
    pub fn reservation_epoch(mut self, epoch: Duration) -> Self {
        self.reservation_epoch = epoch;
        self
    }

    /// What to do with a connection that cannot be counted because a map is
    /// full. Default: [`WhenFull::Closed`].
    pub fn when_full(mut self, when_full: WhenFull) -> Self {
        self.when_full = when_full;
        self
    }

    /// How to refuse a connection over a limit: a TCP reset (the default) or
    /// an HTTP 429 answered by this process (see [`RefuseWith`]). Change it
    /// live with [`EbpfLimiter::set_refuse_with`].
    pub fn refuse_with(mut self, refuse_with: RefuseWith) -> Self {
        self.refuse_with = refuse_with;
        self
    }

    /// How many client keys the kernel tracks at once (default 131072), both
    /// those holding connections and those with handshakes in flight. Past
    /// it, a new client holding connections meets the [`WhenFull`] policy;
    /// handshake state is evicted least recently used first.
    pub fn max_clients(mut self, max: u32) -> Self {
        self.max_clients = Some(max);
        self
    }
}

impl AttachOptions {
    /// Checks what [`EbpfLimiter::attach`] checks before it touches the
    /// kernel (options, capabilities, kernel features, that the cgroup is a
    /// cgroup v2 directory, the network namespace, ports taken by other
    /// instances), with instance `replacing` out of the way; changes
    /// nothing. For replacing an instance only once its successor can start.
    pub fn check(&self, replacing: Option<&str>) -> Result<(), EbpfError> {
        loader::check(self, replacing)
    }
}

/// A limiter enforced by the kernel, owned by this process. Dropping it
/// detaches the programs and removes the pins, unless it was attached with
/// [`AttachOptions::persist`].
pub struct EbpfLimiter {
    instance: Mutex<Instance>,
    name: String,
    /// Leave the pins when let go of ([`AttachOptions::persist`]).
    keep_pins: bool,
    /// Already let go of (by [`EbpfLimiter::detach`]).
    released: bool,
    program_ids: Vec<u32>,
    _upkeep: Upkeep,
    _log: Option<log::KernelLog>,
    // While these live, the programs stay attached.
    _links: [FdLink; 2],
    _ebpf: Ebpf,
}

impl EbpfLimiter {
    /// Loads the programs, writes the config, attaches, and pins the maps
    /// and links; the instance appears in the pin root all at once. On
    /// error nothing is left attached or pinned. What can be checked first
    /// is: the options, the capabilities, and the kernel's features
    /// ([`EbpfError::MissingKernelFeatures`]).
    pub fn attach(options: AttachOptions) -> Result<Self, EbpfError> {
        let (name, keep_pins) = (options.name.clone(), options.persist);
        let loader::Attached { instance, program_ids, upkeep, log, links, ebpf } = loader::attach(options)?;
        Ok(Self {
            instance: Mutex::new(instance),
            name,
            keep_pins,
            released: false,
            program_ids,
            _upkeep: upkeep,
            _log: log,
            _links: links,
            _ebpf: ebpf,
        })
    }

    fn instance(&self) -> MutexGuard<'_, Instance> {
        self.instance.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The instance name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether enforcement outlives a graceful exit ([`AttachOptions::persist`]).
    pub fn is_persistent(&self) -> bool {
        self.instance().is_persistent()
    }

    /// Replaces the configuration; the next SYN sees it. Lowering the limit
    /// closes nothing, it only refuses new connections.
    pub fn set_config(&self, config: Config) -> Result<(), EbpfError> {
        let _lock = PinRoot::write()?;
        self.instance().set_config(&config)
    }

    /// The configuration in force, read from the kernel (so it includes
    /// changes made by other processes, e.g. `connlimit set`).
    pub fn config(&self) -> Result<Config, EbpfError> {
        self.instance().config()
    }

    /// Whether the kernel enforces now: `false` while the guarded cgroup is
    /// gone (its service stopped); this limiter attaches to the cgroup made
    /// again at the same path by itself, within a fraction of a second.
    /// `true` when it cannot be told.
    pub fn is_enforcing(&self) -> bool {
        self.instance().enforcing().ok().flatten() != Some(false)
    }

    /// Whether the lookups that local socket-diagnostics queries make (no
    /// packet) are told from packets, so that they take no slot, refuse
    /// nothing and reveal nothing: the kernel lets connlimit hook
    /// `inet_diag_cmd_exact` (kprobes, or fentry when it is in the kernel
    /// image). See the README's threat model.
    pub fn tells_diagnostics_apart(&self) -> bool {
        self.instance().info().is_ok_and(|i| i.flags & connlimit_common::maps::INFO_DIAG_PROBE != 0)
    }

    /// Established connections counted under the client key of `peer`.
    pub fn num_open(&self, peer: &impl PeerAddr) -> Result<u32, EbpfError> {
        let ip: IpAddr = peer.peer_ip().map_err(|e| EbpfError::system("reading the peer address", e))?;
        self.instance().num_open(ip)
    }

    /// Every tracked client key with its figures, most open first.
    pub fn clients(&self) -> Result<Vec<ClientCount>, EbpfError> {
        self.instance().clients()
    }

    /// Totals since the instance was attached.
    pub fn stats(&self) -> Result<Stats, EbpfError> {
        self.instance().stats()
    }

    /// How the kernel refuses connections over a limit.
    pub fn refuse_with(&self) -> Result<RefuseWith, EbpfError> {
        self.instance().refuse_with()
    }

    /// Changes how the kernel refuses connections over a limit; the next
    /// SYN sees it.
    pub fn set_refuse_with(&self, refuse_with: RefuseWith) -> Result<(), EbpfError> {
        let _lock = PinRoot::write()?;
        self.instance().set_refuse_with(refuse_with)
    }

    /// Established connections across all clients (what
    /// [`Config::max_conns_total`] limits).
    pub fn total_open(&self) -> Result<u64, EbpfError> {
        self.instance().total_open()
    }

    /// Detaches now and returns once the kernel has let go of the
    /// programs, reporting errors that dropping would only log. A persisted
    /// instance stays attached: this process just lets go of it.
    pub fn detach(mut self) -> Result<(), EbpfError> {
        let result = owner::disown(&self.name, !self.keep_pins);
        let mut wait_for = std::mem::take(&mut self.program_ids);
        if !matches!(result, Ok(Some(_))) {
            wait_for.clear();
        }
        self.released = true;
        drop(self);
        attachments::wait_until_freed(&wait_for);
        result.map(drop)
    }
}

impl std::fmt::Debug for EbpfLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfLimiter").field("name", &self.name).field("keep_pins", &self.keep_pins).finish()
    }
}

impl Drop for EbpfLimiter {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // Detach, or leave a persisted instance owned by nobody, so that
        // nobody takes this (still running) process for its owner.
        if let Err(e) = owner::disown(&self.name, !self.keep_pins) {
            tracing::warn!(instance = %self.name, error = %e, "could not let go of the instance");
        }
    }
}

//! The kernel limiter (Linux): the same limits as [`Limiter`](crate::Limiter),
//! enforced by eBPF for any server process, including ones that were never
//! written to know about it.
//!
//! An instance is two programs and their maps:
//!
//! - a `sock_ops` program on a cgroup v2 directory counts the established
//!   connections of the server processes in it, per client key, and sees
//!   each one close;
//! - an `sk_lookup` program on a network namespace refuses a new connection
//!   to a guarded port with an immediate RST when its client is at the
//!   limit. The server process never sees it.
//!
//! The maps and the programs' links are pinned under
//! `/sys/fs/bpf/connlimit/<name>/` (see [`mod@pin_root`]) so another process
//! (the `connlimit` CLI) can read counts and change the config live,
//! through [`Instance`], and so the kernel keeps enforcing if the process
//! that attached the instance crashes (see [`owner`]).
//!
//! ```no_run
//! use connlimit::{Config, ebpf::{AttachOptions, EbpfLimiter}};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The cgroup the server runs in, e.g. its systemd service's.
//! let cgroup = "/sys/fs/cgroup/system.slice/my-api.service";
//! let limiter = EbpfLimiter::attach(AttachOptions::new("my-api", cgroup).port(8080).config(Config::new(10)))?;
//! limiter.set_config(Config::new(20))?; // takes effect for the next SYN
//! for c in limiter.clients()? {
//!     println!("{} holds {} connections, {} refused", c.client, c.open, c.refused);
//! }
//! # Ok(()) }
//! ```

pub mod attachments;
pub mod cgroup;
mod error;
mod guard;
pub mod host;
mod instance;
pub mod listeners;
mod log;
mod object;
pub mod owner;
pub mod pin_root;
mod responder;
pub mod sock_diag;
mod upkeep;

use std::{
    fs::File,
    net::IpAddr,
    path::PathBuf,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, SkLookup, SockOps, links::FdLink},
};
use connlimit_common::{
    maps::{FLAG_FULL_CLOSED, INFO_PERSIST, InstanceInfo, KernelConfig, LAYOUT_VERSION, names, programs},
    pending::{MAX_EPOCH_NS, MIN_EPOCH_NS},
};

pub use error::EbpfError;
pub use instance::{ClientCount, Instance};
pub use owner::{Detached, Owner, Ownership};
pub use pin_root::{PIN_ROOT, PIN_ROOT_ENV, PinRoot, pin_root};
pub use responder::{BACKLOG, MAX_RESPONDING, RefuseWith, Responder, WRITE_DEADLINE};
pub use upkeep::Upkeep;

use crate::{Config, PeerAddr, Stats};

use object::OBJECT;
pub use object::{OBJECT_HASH, OBJECT_SHA256, hash_hex};

/// The default reservation epoch (see [`AttachOptions::reservation_epoch`]).
pub const DEFAULT_RESERVATION_EPOCH: Duration = Duration::from_secs(1);
/// The shortest reservation epoch accepted: below it, a burst of SYNs from
/// one client on a slow path could outlive its reservations.
pub const MIN_RESERVATION_EPOCH: Duration = Duration::from_millis(10);
/// The longest reservation epoch accepted (a spoofed SYN holds a slot for
/// up to two).
pub const MAX_RESERVATION_EPOCH: Duration = Duration::from_nanos(MAX_EPOCH_NS);
const _: () = assert!(MIN_RESERVATION_EPOCH.as_nanos() >= MIN_EPOCH_NS as u128);

/// What the kernel does with a connection it cannot count because a map is
/// full (more client keys with open connections, or more connections, than
/// the maps hold; see [`AttachOptions::max_clients`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WhenFull {
    /// Admit it uncounted (`Stats::untracked`): availability first. Anyone
    /// who can hold more open connections from distinct client keys than the
    /// map holds then escapes the limit for the excess.
    Open,
    /// End it right after its handshake (`Stats::ended`): the limit holds.
    /// The map fills only with keys that hold live connections (SYNs cannot
    /// fill it), so this refuses new clients only while that many hold
    /// connections at once.
    #[default]
    Closed,
}

impl WhenFull {
    pub(crate) fn flag(self) -> u16 {
        match self {
            Self::Open => 0,
            Self::Closed => FLAG_FULL_CLOSED,
        }
    }
}

impl std::fmt::Display for WhenFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Open => "open",
            Self::Closed => "closed",
        })
    }
}

impl std::str::FromStr for WhenFull {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(Self::Open),
            "closed" => Ok(Self::Closed),
            _ => Err(format!(
                "{s:?} is not a full-map policy; use `open` (admit uncounted) or `closed` (end the connection)"
            )),
        }
    }
}

/// What to attach to and how.
#[derive(Clone, Debug)]
pub struct AttachOptions {
    name: String,
    cgroup: PathBuf,
    netns: PathBuf,
    ports: Vec<u16>,
    config: Config,
    persist: bool,
    reservation_epoch: Duration,
    when_full: WhenFull,
    refuse_with: RefuseWith,
    max_clients: Option<u32>,
}

impl AttachOptions {
    /// Options for instance `name`, counting the connections of the
    /// processes in the cgroup v2 directory `cgroup`, in the caller's
    /// network namespace, with no port and no limit yet.
    pub fn new(name: impl Into<String>, cgroup: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            cgroup: cgroup.into(),
            netns: PathBuf::from(host::OWN_NETNS),
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
    /// [`MIN_RESERVATION_EPOCH`] to [`MAX_RESERVATION_EPOCH`].
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

/// The reservation epoch as the kernel config holds it, once checked.
pub(crate) fn validated_epoch_ns(epoch: Duration) -> Result<u64, EbpfError> {
    if !(MIN_RESERVATION_EPOCH..=MAX_RESERVATION_EPOCH).contains(&epoch) {
        return Err(EbpfError::BadEpoch(epoch));
    }
    Ok(epoch.as_nanos() as u64)
}

impl EbpfLimiter {
    /// Loads the programs, writes the config, attaches, and pins the maps
    /// and links; the instance appears in the pin root all at once. On
    /// error nothing is left attached or pinned.
    pub fn attach(options: AttachOptions) -> Result<Self, EbpfError> {
        let AttachOptions {
            name,
            cgroup,
            netns,
            mut ports,
            config,
            persist,
            reservation_epoch,
            when_full,
            refuse_with,
            max_clients,
        } = options;
        Instance::validate_name(&name)?;
        config.validate()?;
        let epoch_ns = validated_epoch_ns(reservation_epoch)?;
        ports = guard::normalize_ports(&ports)?;
        host::require_capabilities(&host::ATTACH_CAPABILITIES)?;
        host::require_access(&pin_root())?;
        host::require_cgroup2_dir(&cgroup)?;
        let netns_id = host::NetnsId::of(&netns)?;
        let netns_file = File::open(&netns).map_err(|e| EbpfError::Netns(netns.clone(), e))?;
        let cgroup_file =
            File::open(&cgroup).map_err(|e| EbpfError::system(format!("opening {}", cgroup.display()), e))?;
        let owner = owner::Owner::current()?;
        // Held until the instance is in place: attaches, adoptions and
        // changes happen one at a time.
        let root = PinRoot::write()?;
        if root.is_instance(&name) {
            return Err(EbpfError::InstanceExists(name));
        }
        guard::refuse_taken_ports(&root, &ports, netns_id, None)?;

        let mut loader = EbpfLoader::new();
        if let Some(max) = max_clients {
            loader.map_max_entries(names::CLIENTS, max);
            loader.map_max_entries(names::PENDING, max);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| EbpfError::system("loading the eBPF object", e))?;
        let log = log::KernelLog::start(&mut ebpf);

        // Removed on error, and never listed: built aside, renamed into place.
        let staging = root.stage(&name)?;
        Instance::pin_new(&staging, ebpf.maps().filter(|(n, _)| names::ALL.contains(n)))?;
        let mut instance = Instance::from_maps(&name, |map| {
            ebpf.take_map(map).ok_or_else(|| EbpfError::system("loading the eBPF object", format!("no map {map}")))
        })?;
        let base = KernelConfig {
            epoch_ns,
            netns_cookie: host::netns_cookie(&netns),
            flags: when_full.flag() | refuse_with.flag(),
            ..KernelConfig::default()
        };
        instance.write_config(&config, base)?;
        // A new instance guards nothing yet: no need to read the port table.
        instance.guard_ports(&ports)?;
        let started = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        instance.set_info(InstanceInfo {
            netns_dev: netns_id.dev,
            netns_ino: netns_id.ino,
            cgroup_ino: host::inode(&cgroup)?,
            started_unix_secs: started.as_secs(),
            pid: owner.pid,
            _pad: 0,
            owner_start_ticks: owner.start_ticks,
            layout_version: LAYOUT_VERSION,
            flags: if persist { INFO_PERSIST } else { 0 },
            object_hash: OBJECT_HASH,
        })?;

        let upkeep = instance.start_upkeep(&netns)?;
        let links = attach_programs(&mut ebpf, &cgroup_file, &netns_file)?;
        // Pinned links keep the kernel enforcing if this process crashes.
        let links = pin_links(&staging, links)?;
        staging.commit()?;
        drop(root);
        tracing::info!(
            instance = %name, ?ports, cgroup = %cgroup.display(), netns = %netns.display(),
            limit = config.max_conns_per_client_ip, persist, "connlimit attached"
        );
        listeners::warn_about(&netns, &ports, &cgroup);
        let program_ids = links.iter().filter_map(|l| l.info().ok()).map(|i| i.program_id()).collect();
        Ok(Self {
            instance: Mutex::new(instance),
            name,
            keep_pins: persist,
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

/// Pins the links so the programs stay attached after this process exits.
fn pin_links(staging: &pin_root::Staging<'_>, [lookup, sock_ops]: [FdLink; 2]) -> Result<[FdLink; 2], EbpfError> {
    let pin = |link: FdLink, file: &str| {
        link.pin(staging.pin_path(file))
            .map(FdLink::from)
            .map_err(|e| EbpfError::system(format!("pinning link {file}"), e))
    };
    Ok([pin(lookup, instance::LINK_PINS[0])?, pin(sock_ops, instance::LINK_PINS[1])?])
}

/// Loads and attaches both programs; returns their links (lookup, sock_ops)
/// detached from the programs' ownership, for pinning.
fn attach_programs(ebpf: &mut Ebpf, cgroup: &File, netns: &File) -> Result<[FdLink; 2], EbpfError> {
    fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, EbpfError> {
        ebpf.program_mut(name).ok_or_else(|| EbpfError::system("loading the eBPF object", format!("no program {name}")))
    }

    let sock_ops: &mut SockOps = program(ebpf, programs::SOCK_OPS)?
        .try_into()
        .map_err(|e| EbpfError::system("loading the sock_ops program", e))?;
    sock_ops.load().map_err(|e| EbpfError::system("loading the sock_ops program", e))?;
    let id = sock_ops
        // A link attachment: it coexists with other programs on the cgroup.
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(|e| EbpfError::system("attaching the sock_ops program to the cgroup", e))?;
    let sock_ops_link: FdLink = sock_ops
        .take_link(id)
        .map_err(|e| EbpfError::system("attaching the sock_ops program", e))?
        .try_into()
        .map_err(|e| EbpfError::system("attaching the sock_ops program", e))?;

    let lookup: &mut SkLookup = program(ebpf, programs::LOOKUP)?
        .try_into()
        .map_err(|e| EbpfError::system("loading the sk_lookup program", e))?;
    lookup.load().map_err(|e| match io_error(&e) {
        Some(io) if is_unsupported(io) => {
            EbpfError::NoSkLookup(std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(0)))
        }
        _ => EbpfError::system("loading the sk_lookup program", e),
    })?;
    let id = lookup.attach(netns).map_err(|e| match io_error(&e) {
        Some(io) if is_unsupported(io) => {
            EbpfError::NoSkLookup(std::io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(0)))
        }
        _ => EbpfError::system("attaching the sk_lookup program to the network namespace", e),
    })?;
    let our_id = lookup.info().map(|i| i.id()).ok();
    let lookup_link: FdLink =
        lookup.take_link(id).map_err(|e| EbpfError::system("attaching the sk_lookup program", e))?.into();

    attachments::warn_about_others(netns, our_id);
    Ok([lookup_link, sock_ops_link])
}

fn io_error(e: &aya::programs::ProgramError) -> Option<&std::io::Error> {
    match e {
        aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }) => Some(io_error),
        aya::programs::ProgramError::LoadError { io_error, .. } => Some(io_error),
        _ => None,
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    // EINVAL for an unknown program or attach type; ENOTSUPP (524) from some kernels.
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524))
}

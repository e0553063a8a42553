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
//! The maps are pinned under `/sys/fs/bpf/connlimit/<name>/` so another
//! process (the `connlimit` CLI) can read counts and change the config live,
//! through [`Instance`].
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
pub mod host;
mod instance;
mod log;

use std::{
    fs::File,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, SkLookup, SockOps, links::FdLink},
};
use connlimit_common::maps::{InstanceInfo, names, programs};

pub use error::EbpfError;
pub use instance::{ClientCount, Instance, PIN_ROOT};

use crate::{Config, PeerAddr, Stats};

/// The kernel programs, built for the BPF target by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/connlimit.bpf.o"));

/// The default reservation epoch (see [`AttachOptions::reservation_epoch`]).
pub const DEFAULT_RESERVATION_EPOCH: Duration = Duration::from_secs(1);

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
    max_clients: Option<u32>,
    max_connections: Option<u32>,
}

impl AttachOptions {
    /// Options for instance `name`, counting the connections of the
    /// processes in the cgroup v2 directory `cgroup`, in the caller's
    /// network namespace, with no port and no limit yet.
    pub fn new(name: impl Into<String>, cgroup: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            cgroup: cgroup.into(),
            netns: PathBuf::from("/proc/self/ns/net"),
            ports: Vec::new(),
            config: Config::default(),
            persist: false,
            reservation_epoch: DEFAULT_RESERVATION_EPOCH,
            max_clients: None,
            max_connections: None,
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

    /// Keeps enforcing after this process exits: the programs' links are
    /// pinned too, and dropping the limiter leaves everything in place
    /// (remove it later with [`Instance::remove`]).
    pub fn persist(mut self, persist: bool) -> Self {
        self.persist = persist;
        self
    }

    /// How long an admitted handshake holds its slot before completing: a
    /// SYN that never completes (spoofed, or abandoned) frees its slot
    /// between one and two epochs after it arrived. Default: 1 s.
    pub fn reservation_epoch(mut self, epoch: Duration) -> Self {
        self.reservation_epoch = epoch;
        self
    }

    /// How many client keys the kernel tracks at once (default 131072); the
    /// least recently seen idle ones make room for new ones.
    pub fn max_clients(mut self, max: u32) -> Self {
        self.max_clients = Some(max);
        self
    }

    /// How many established connections the kernel can count at once
    /// (default 262144); past that, new ones are admitted uncounted.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = Some(max);
        self
    }
}

/// A limiter enforced by the kernel. Dropping it detaches the programs and
/// removes the pins, unless it was attached with [`AttachOptions::persist`].
pub struct EbpfLimiter {
    instance: Mutex<Instance>,
    name: String,
    /// Leave the pins when dropped (persisted, or already removed).
    keep_pins: bool,
    program_ids: Vec<u32>,
    _log: Option<log::KernelLog>,
    // While these live, the programs stay attached.
    _links: [FdLink; 2],
    _ebpf: Ebpf,
}

/// Removes an instance's pins if attaching fails half-way.
struct PinGuard(Option<String>);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(name) = &self.0 {
            let _ = Instance::unpin(name);
        }
    }
}

impl EbpfLimiter {
    /// Loads the programs, writes the config, attaches, and pins the maps.
    /// On error nothing is left attached or pinned.
    pub fn attach(options: AttachOptions) -> Result<Self, EbpfError> {
        let AttachOptions {
            name,
            cgroup,
            netns,
            mut ports,
            config,
            persist,
            reservation_epoch,
            max_clients,
            max_connections,
        } = options;
        Instance::validate_name(&name)?;
        config.validate()?;
        ports.sort_unstable();
        ports.dedup();
        if ports.is_empty() {
            return Err(EbpfError::NoPorts);
        }
        if ports.contains(&0) {
            return Err(EbpfError::PortZero);
        }
        host::require_capabilities(&host::ATTACH_CAPABILITIES)?;
        host::require_bpffs()?;
        host::require_access(Path::new(PIN_ROOT))?;
        host::require_cgroup2_dir(&cgroup)?;
        let netns_id = host::NetnsId::of(&netns)?;
        let netns_file = File::open(&netns).map_err(|e| EbpfError::Netns(netns.clone(), e))?;
        let cgroup_file =
            File::open(&cgroup).map_err(|e| EbpfError::system(format!("opening {}", cgroup.display()), e))?;
        if Instance::dir_of(&name).exists() {
            return Err(EbpfError::InstanceExists(name));
        }
        refuse_taken_ports(&ports, netns_id)?;

        let mut loader = EbpfLoader::new();
        if let Some(max) = max_clients {
            loader.map_max_entries(names::CLIENTS, max);
        }
        if let Some(max) = max_connections {
            loader.map_max_entries(names::CONNS, max);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| EbpfError::system("loading the eBPF object", e))?;
        let log = log::KernelLog::start(&mut ebpf);

        Instance::pin_new(&name, ebpf.maps().filter(|(n, _)| names::ALL.contains(n)))?;
        let mut guard = PinGuard(Some(name.clone()));
        let mut instance = Instance::from_maps(&name, |map| {
            ebpf.take_map(map)
                .ok_or_else(|| EbpfError::system("loading the eBPF object", anyhow::anyhow!("no map {map}")))
        })?;
        instance.write_config(&config, reservation_epoch.as_nanos().clamp(1, u64::MAX as u128) as u64)?;
        // A new instance guards nothing yet: no need to read the port table.
        instance.guard_ports(&ports)?;
        let started = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        instance.set_info(InstanceInfo {
            netns_dev: netns_id.dev,
            netns_ino: netns_id.ino,
            cgroup_ino: host::inode(&cgroup)?,
            started_unix_secs: started.as_secs(),
            pid: std::process::id(),
            _pad: 0,
        })?;

        let mut links = attach_programs(&mut ebpf, &cgroup_file, &netns_file)?;
        if persist {
            links = pin_links(&name, links)?;
        }
        guard.0 = None;
        tracing::info!(
            instance = %name, ?ports, cgroup = %cgroup.display(), netns = %netns.display(),
            limit = config.max_conns_per_client_ip, persist, "connlimit attached"
        );
        let program_ids = links.iter().filter_map(|l| l.info().ok()).map(|i| i.program_id()).collect();
        Ok(Self {
            instance: Mutex::new(instance),
            name,
            keep_pins: persist,
            program_ids,
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

    /// Whether enforcement outlives this limiter ([`AttachOptions::persist`]).
    pub fn is_persistent(&self) -> bool {
        self.instance().is_persistent()
    }

    /// Replaces the configuration; the next SYN sees it. Lowering the limit
    /// closes nothing, it only refuses new connections.
    pub fn set_config(&self, config: Config) -> Result<(), EbpfError> {
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

    /// Connections the kernel is tracking until they close.
    pub fn tracked_connections(&self) -> Result<usize, EbpfError> {
        self.instance().tracked_connections()
    }

    /// Detaches now and returns once the kernel has let go of the
    /// programs, reporting errors that dropping would only log. A persisted
    /// instance stays attached: this process just lets go of it.
    pub fn detach(mut self) -> Result<(), EbpfError> {
        let result = if self.keep_pins { Ok(()) } else { Instance::unpin(&self.name) };
        let wait_for = if self.keep_pins { Vec::new() } else { std::mem::take(&mut self.program_ids) };
        self.keep_pins = true;
        drop(self);
        attachments::wait_until_freed(&wait_for);
        result
    }
}

impl std::fmt::Debug for EbpfLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfLimiter").field("name", &self.name).field("keep_pins", &self.keep_pins).finish()
    }
}

impl Drop for EbpfLimiter {
    fn drop(&mut self) {
        if !self.keep_pins
            && let Err(e) = Instance::unpin(&self.name)
        {
            tracing::warn!(instance = %self.name, error = %e, "could not remove the pins");
        }
    }
}

/// Fails if another instance in the same network namespace guards a port.
fn refuse_taken_ports(ports: &[u16], netns: host::NetnsId) -> Result<(), EbpfError> {
    for other in Instance::list()? {
        let instance = match Instance::open(&other) {
            Ok(instance) => instance,
            Err(e) => {
                tracing::warn!(instance = %other, error = %e, "skipping an unreadable instance");
                continue;
            }
        };
        let info = instance.info()?;
        if (info.netns_dev, info.netns_ino) != (netns.dev, netns.ino) {
            continue;
        }
        for &port in ports {
            if instance.guards(port)? {
                return Err(EbpfError::PortTaken { port, instance: other });
            }
        }
    }
    Ok(())
}

/// Pins the links so the programs stay attached after this process exits.
fn pin_links(name: &str, [lookup, sock_ops]: [FdLink; 2]) -> Result<[FdLink; 2], EbpfError> {
    let pin = |link: FdLink, file: &str| {
        let path = Instance::dir_of(name).join(file);
        link.pin(&path).map(FdLink::from).map_err(|e| EbpfError::system(format!("pinning {}", path.display()), e))
    };
    Ok([pin(lookup, instance::LINK_PINS[0])?, pin(sock_ops, instance::LINK_PINS[1])?])
}

/// Loads and attaches both programs; returns their links (lookup, sock_ops)
/// detached from the programs' ownership, for pinning.
fn attach_programs(ebpf: &mut Ebpf, cgroup: &File, netns: &File) -> Result<[FdLink; 2], EbpfError> {
    fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program, EbpfError> {
        ebpf.program_mut(name)
            .ok_or_else(|| EbpfError::system("loading the eBPF object", anyhow::anyhow!("no program {name}")))
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

//! A limiter instance as it lives in bpffs: its maps, pinned under
//! `/sys/fs/bpf/connlimit/<name>/` (see [`pin_root`](super::pin_root)),
//! readable and writable by root processes.

use std::{
    net::IpAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf, SockMap, lpm_trie::Key},
    programs::links::{FdLink, PinnedLink},
};
use connlimit_common::{
    established,
    maps::{
        ClientKey, ClientState, ExemptKey, FLAG_DRY_RUN, FLAG_EXEMPT, FLAG_FULL_CLOSED, FLAG_REFUSE_429, InstanceInfo,
        KernelConfig, LAYOUT_VERSION, PendingState, Stat, TotalState, names,
    },
    pending::{Pending, epoch_of},
};

use super::{
    EbpfError, RefuseWith, WhenFull, host,
    pin_root::{self, PinRoot, Staging, fd_path},
};
use crate::{Cidr, Config, NetworkLimit, Stats, addr};

/// Pin names of the links of a persisted instance.
pub(crate) const LINK_PINS: [&str; 2] = ["link_lookup", "link_sock_ops"];

/// One client key's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientCount {
    /// The client key: the address cut to the prefix length in force when
    /// it was first seen (see `prefix_len`).
    pub client: IpAddr,
    /// The key's prefix length within its family (32 or 128 for a single
    /// address).
    pub prefix_len: u8,
    /// An exempt client, counted under its own address and never refused.
    pub exempt: bool,
    /// Established connections now.
    pub open: u32,
    /// Handshakes admitted and not yet established.
    pub reserved: u32,
    /// Connections that completed their handshake, since tracking began.
    pub accepted: u64,
    /// Connections refused (in dry-run: that would have been).
    pub refused: u64,
}

/// Handles on one instance's maps.
pub struct Instance {
    name: String,
    config: Array<MapData, KernelConfig>,
    ports: Array<MapData, u8>,
    /// Exempt prefixes (limit 0) and per-network limits.
    networks: LpmTrie<MapData, ExemptKey, u32>,
    total: Array<MapData, TotalState>,
    clients: HashMap<MapData, ClientKey, ClientState>,
    pending: HashMap<MapData, ClientKey, PendingState>,
    /// Each counted connection's state, in socket storage (read through
    /// sock_diag).
    sockets: MapData,
    carried: HashMap<MapData, ClientKey, u32>,
    /// Non-zero while `carried` has entries.
    carrying: Array<MapData, u32>,
    stats: PerCpuArray<MapData, u64>,
    info: Array<MapData, InstanceInfo>,
    /// Taken by the one upkeep thread of this handle.
    endings: Option<RingBuf<MapData>>,
    /// Taken by the 429 responder the endings worker runs.
    responder: Option<SockMap<MapData>>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").field("name", &self.name).finish_non_exhaustive()
    }
}

fn sys(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    let what = what.into();
    move |e| EbpfError::system(what, e)
}

impl Instance {
    /// Checks that `name` can name an instance (and its pin directory:
    /// bpffs refuses names with a dot).
    pub fn validate_name(name: &str) -> Result<(), EbpfError> {
        let ok =
            (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b));
        if ok { Ok(()) } else { Err(EbpfError::BadName(name.to_owned())) }
    }

    /// The pin directory of instance `name` (for messages; pins are
    /// reached through the locked [`PinRoot`]).
    pub fn dir_of(name: &str) -> PathBuf {
        pin_root::pin_root().join(name)
    }

    /// Names of the instances pinned on this machine, sorted.
    pub fn list() -> Result<Vec<String>, EbpfError> {
        host::require_access(&pin_root::pin_root())?;
        match PinRoot::read()? {
            Some(root) => root.names(),
            None => Ok(Vec::new()),
        }
    }

    /// Opens the pinned maps of the running instance `name`.
    pub fn open(name: &str) -> Result<Self, EbpfError> {
        Self::validate_name(name)?;
        host::require_access(&pin_root::pin_root())?;
        let root = PinRoot::read()?.ok_or_else(|| EbpfError::NoSuchInstance(name.to_owned()))?;
        Self::open_in(&root, name)
    }

    /// Opens the pinned maps of instance `name` under a pin root the caller
    /// holds (for writing, to change the instance without a race). Fails if
    /// another connlimit version pinned it.
    pub fn open_in(root: &PinRoot, name: &str) -> Result<Self, EbpfError> {
        Self::validate_name(name)?;
        let no_such = || EbpfError::NoSuchInstance(name.to_owned());
        let dir = root.open_dir(name).map_err(|_| no_such())?;
        if !fd_path(dir.as_fd(), names::CONFIG).exists() {
            return Err(no_such());
        }
        let version = pin_root::pinned_layout_version(&fd_path(dir.as_fd(), names::INSTANCE))?;
        if version != LAYOUT_VERSION {
            return Err(EbpfError::LayoutMismatch { name: name.to_owned(), found: version });
        }
        Self::from_maps(name, |map| {
            let (path, shown) = (fd_path(dir.as_fd(), map), root.path().join(name).join(map));
            let data = MapData::from_pin(&path).map_err(sys(format!("opening {}", shown.display())))?;
            Map::from_map_data(data).map_err(sys(format!("opening {}", shown.display())))
        })
    }

    /// Takes handles on the maps `take` yields by name.
    pub(crate) fn from_maps(
        name: &str,
        mut take: impl FnMut(&str) -> Result<Map, EbpfError>,
    ) -> Result<Self, EbpfError> {
        macro_rules! typed {
            ($name:expr) => {
                take($name)?.try_into().map_err(sys(format!("map {}", $name)))?
            };
        }
        Ok(Self {
            name: name.to_owned(),
            config: typed!(names::CONFIG),
            ports: typed!(names::PORTS),
            networks: typed!(names::NETWORKS),
            total: typed!(names::TOTAL),
            clients: typed!(names::CLIENTS),
            pending: typed!(names::PENDING),
            sockets: match take(names::SOCKETS)? {
                Map::SkStorage(data) => data,
                _ => return Err(EbpfError::system(format!("map {}", names::SOCKETS), "not a socket storage map")),
            },
            carried: typed!(names::CARRIED),
            carrying: typed!(names::CARRYING),
            stats: typed!(names::STATS),
            info: typed!(names::INSTANCE),
            endings: Some(typed!(names::ENDINGS)),
            responder: Some(typed!(names::RESPONDER)),
        })
    }

    /// Pins `maps` into the staging directory of a new instance.
    pub(crate) fn pin_new<'a>(
        staging: &Staging<'_>,
        maps: impl IntoIterator<Item = (&'a str, &'a Map)>,
    ) -> Result<(), EbpfError> {
        maps.into_iter().try_for_each(|(map_name, map)| {
            let path = staging.pin_path(map_name);
            map.pin(&path).map_err(|e| EbpfError::system(format!("pinning map {map_name}"), e))?;
            staging.restrict(map_name).map_err(|e| EbpfError::system(format!("restricting map {map_name}"), e))
        })
    }

    /// Detaches instance `name` from another process, whoever owns it:
    /// removes its pins (detaching its programs) and waits until the
    /// kernel has freed them. [`Instance::detach`] asks a running owner
    /// to let go instead.
    pub fn remove(name: &str) -> Result<(), EbpfError> {
        Self::detach(name, true).map(drop)
    }

    /// The instance's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn kernel_config(&self) -> Result<KernelConfig, EbpfError> {
        self.config.get(&0, 0).map_err(sys("reading the config map"))
    }

    /// The configuration in force, as the kernel reads it. A network limit
    /// of 0 is an exempt prefix to the kernel, and is read back as one.
    pub fn config(&self) -> Result<Config, EbpfError> {
        let k = self.kernel_config()?;
        let (mut exempt, mut network_limits) = (Vec::new(), Vec::new());
        for entry in self.networks.iter() {
            let (key, limit) = entry.map_err(sys("reading the networks map"))?;
            let words = key.data().addr;
            let addr = addr::from_words(words);
            let len = key.prefix_len() - ExemptKey::prefix_len(&words, 0);
            let cidr = Cidr::new(addr, len as u8).map_err(|e| EbpfError::system("reading the networks map", e))?;
            match limit {
                0 => exempt.push(cidr),
                n => network_limits.push(NetworkLimit::new(cidr, n)),
            }
        }
        exempt.sort_by_key(|c| (c.addr(), c.prefix_len()));
        network_limits.sort_by_key(|n| (n.cidr.addr(), n.cidr.prefix_len()));
        Ok(Config {
            max_conns_per_client_ip: k.max_conns_per_client,
            ipv4_prefix_len: k.ipv4_prefix_len,
            ipv6_prefix_len: k.ipv6_prefix_len,
            exempt,
            network_limits,
            max_conns_total: k.max_conns_total,
            dry_run: k.flags & FLAG_DRY_RUN != 0,
        })
    }

    /// Replaces the configuration. Network entries (exempt prefixes and
    /// network limits) are written before the limits change and stale ones
    /// removed after, so no exempt client is ever limited in between.
    pub fn set_config(&mut self, config: &Config) -> Result<(), EbpfError> {
        config.validate()?;
        let kernel = self.kernel_config()?;
        self.write_config(config, kernel)
    }

    /// What the kernel does when a count cannot be kept because a map is full.
    pub fn when_full(&self) -> Result<WhenFull, EbpfError> {
        let closed = self.kernel_config()?.flags & FLAG_FULL_CLOSED != 0;
        Ok(if closed { WhenFull::Closed } else { WhenFull::Open })
    }

    /// Changes what the kernel does when a map is full.
    pub fn set_when_full(&mut self, when_full: WhenFull) -> Result<(), EbpfError> {
        let mut kernel = self.kernel_config()?;
        kernel.flags = (kernel.flags & !FLAG_FULL_CLOSED) | when_full.flag();
        self.config.set(0, kernel, 0).map_err(sys("writing the config map"))
    }

    /// How the kernel refuses connections over a limit.
    pub fn refuse_with(&self) -> Result<RefuseWith, EbpfError> {
        Ok(RefuseWith::from_flags(self.kernel_config()?.flags))
    }

    /// Changes how the kernel refuses connections over a limit. With
    /// [`RefuseWith::Http429`] the process owning the instance answers;
    /// when there is none, refusals stay resets.
    pub fn set_refuse_with(&mut self, refuse_with: RefuseWith) -> Result<(), EbpfError> {
        let mut kernel = self.kernel_config()?;
        kernel.flags = (kernel.flags & !FLAG_REFUSE_429) | refuse_with.flag();
        self.config.set(0, kernel, 0).map_err(sys("writing the config map"))
    }

    /// Writes `config`, keeping the other fields of `base` (epoch, namespace,
    /// full-map policy, how to refuse).
    pub(crate) fn write_config(&mut self, config: &Config, base: KernelConfig) -> Result<(), EbpfError> {
        let old: Vec<Key<ExemptKey>> = self.networks.keys().filter_map(Result::ok).collect();
        let key = |c: &Cidr| {
            let words = addr::to_words(c.addr());
            Key::new(ExemptKey::prefix_len(&words, u32::from(c.prefix_len())), ExemptKey::of(&words))
        };
        // Exempt is limit 0; a network limit on the same prefix is refused
        // by `Config::validate`.
        let new: Vec<(Key<ExemptKey>, u32)> = config
            .exempt
            .iter()
            .map(|c| (key(c), 0))
            .chain(config.network_limits.iter().map(|n| (key(&n.cidr), n.limit)))
            .collect();
        for (key, limit) in &new {
            self.networks.insert(key, limit, 0).map_err(sys("writing the networks map"))?;
        }
        let kernel = KernelConfig {
            max_conns_per_client: config.max_conns_per_client_ip,
            ipv4_prefix_len: config.ipv4_prefix_len,
            ipv6_prefix_len: config.ipv6_prefix_len,
            max_conns_total: config.max_conns_total,
            flags: (base.flags & (FLAG_FULL_CLOSED | FLAG_REFUSE_429))
                | if config.dry_run { FLAG_DRY_RUN } else { 0 }
                | if new.is_empty() { 0 } else { FLAG_EXEMPT },
            ..base
        };
        self.config.set(0, kernel, 0).map_err(sys("writing the config map"))?;
        let same = |a: &Key<ExemptKey>, b: &Key<ExemptKey>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
        for key in old.iter().filter(|k| !new.iter().any(|(n, _)| same(k, n))) {
            let _ = self.networks.remove(key);
        }
        Ok(())
    }

    /// The reservation epoch: a handshake that never completes holds its
    /// slot for one to two of these.
    pub fn reservation_epoch(&self) -> Result<Duration, EbpfError> {
        Ok(Duration::from_nanos(self.kernel_config()?.epoch_ns))
    }

    /// The guarded local ports, ascending.
    pub fn ports(&self) -> Result<Vec<u16>, EbpfError> {
        let mut ports = Vec::new();
        for (port, on) in self.ports.iter().enumerate() {
            if on.map_err(sys("reading the ports map"))? != 0 {
                ports.push(port as u16);
            }
        }
        Ok(ports)
    }

    /// Guards exactly `ports` from now on: new ones are added before old
    /// ones are dropped. Connections already counted on a dropped port are
    /// still counted until they close.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<(), EbpfError> {
        let old = self.ports()?;
        self.guard_ports(ports)?;
        for port in old.into_iter().filter(|p| !ports.contains(p)) {
            self.ports.set(u32::from(port), 0, 0).map_err(sys("writing the ports map"))?;
        }
        Ok(())
    }

    /// Adds `ports` to the guarded ones.
    pub(crate) fn guard_ports(&mut self, ports: &[u16]) -> Result<(), EbpfError> {
        if ports.is_empty() {
            return Err(EbpfError::NoPorts);
        }
        if ports.contains(&0) {
            return Err(EbpfError::PortZero);
        }
        for &port in ports {
            self.ports.set(u32::from(port), 1, 0).map_err(sys("writing the ports map"))?;
        }
        Ok(())
    }

    /// Whether `port` is guarded.
    pub fn guards(&self, port: u16) -> Result<bool, EbpfError> {
        Ok(self.ports.get(&u32::from(port), 0).map_err(sys("reading the ports map"))? != 0)
    }

    /// What the instance is attached to.
    pub fn info(&self) -> Result<InstanceInfo, EbpfError> {
        self.info.get(&0, 0).map_err(sys("reading the instance map"))
    }

    pub(crate) fn set_info(&mut self, info: InstanceInfo) -> Result<(), EbpfError> {
        self.info.set(0, info, 0).map_err(sys("writing the instance map"))
    }

    /// Established connections counted under the client key of `ip` (its
    /// own address if it is exempt).
    pub fn num_open(&self, ip: IpAddr) -> Result<u32, EbpfError> {
        let config = self.config()?;
        let words = addr::to_words(ip);
        let key = if config.is_exempt(ip) {
            ClientKey::exempt(&words)
        } else {
            ClientKey::grouped(&words, config.ipv4_prefix_len, config.ipv6_prefix_len)
        };
        let counted = match self.clients.get(&key, 0) {
            Ok(state) => established::count(state.established),
            Err(aya::maps::MapError::KeyNotFound) => 0,
            Err(e) => return Err(EbpfError::system("reading the clients map", e)),
        };
        Ok(counted + self.carried.get(&key, 0).unwrap_or(0))
    }

    /// Every tracked client key with its figures, most open connections
    /// first (then most refused): keys holding connections, and keys with
    /// handshakes in flight or refusals on record.
    pub fn clients(&self) -> Result<Vec<ClientCount>, EbpfError> {
        let now = epoch_of(host::monotonic_ns(), self.kernel_config()?.epoch_ns);
        let mut all: std::collections::HashMap<ClientKey, ClientCount> = std::collections::HashMap::new();
        let blank = |key: &ClientKey| {
            let addr = addr::from_words(key.addr);
            let family_bits = if addr.is_ipv4() { 96 } else { 0 };
            ClientCount {
                client: addr,
                prefix_len: if key.is_exempt() { 128 - family_bits } else { key.prefix_len.saturating_sub(family_bits) }
                    as u8,
                exempt: key.is_exempt(),
                open: 0,
                reserved: 0,
                accepted: 0,
                refused: 0,
            }
        };
        for entry in self.clients.iter() {
            let (key, state) = match entry {
                Ok(kv) => kv,
                // An entry removed while we walk the map.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(EbpfError::system("reading the clients map", e)),
            };
            let c = all.entry(key).or_insert_with(|| blank(&key));
            c.open = established::count(state.established);
            c.accepted = state.accepted;
        }
        for (key, n) in self.carried.iter().filter_map(Result::ok) {
            all.entry(key).or_insert_with(|| blank(&key)).open += n;
        }
        for entry in self.pending.iter() {
            let (key, state) = match entry {
                Ok(kv) => kv,
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(EbpfError::system("reading the pending map", e)),
            };
            let c = all.entry(key).or_insert_with(|| blank(&key));
            c.reserved = Pending(state.reservations).reserved(now);
            c.refused = state.refused;
        }
        let mut all: Vec<ClientCount> = all.into_values().collect();
        all.sort_by(|a, b| b.open.cmp(&a.open).then(b.refused.cmp(&a.refused)).then(a.client.cmp(&b.client)));
        Ok(all)
    }

    /// Starts the instance's [`Upkeep`](super::Upkeep) in the network
    /// namespace `netns` it guards: ending the connections the kernel asks
    /// to end, and counting those it cannot see. The process owning an
    /// instance runs it (once per handle); [`EbpfLimiter`](super::EbpfLimiter)
    /// does so itself.
    pub fn start_upkeep(&mut self, netns: &Path) -> Result<super::Upkeep, EbpfError> {
        let ring = self
            .endings
            .take()
            .ok_or_else(|| EbpfError::system("starting the upkeep thread", "this handle's was started already"))?;
        // The owner's other duty: answering refusals with 429 (when asked;
        // its listeners idle otherwise). Without it, refusals are resets.
        let responder = match self.responder.take().map(|map| super::Responder::start(map, netns, &self.name)) {
            Some(Ok(responder)) => Some(responder),
            Some(Err(e)) => {
                tracing::warn!(instance = %self.name, error = %e, "no 429 responder: refusals get a reset");
                None
            }
            None => None,
        };
        Ok(super::Upkeep::start(ring, self.duplicate()?, netns)?.with_responder(responder))
    }

    /// Another handle on the same maps (the ring buffer stays with this one).
    fn duplicate(&self) -> Result<Self, EbpfError> {
        use aya::maps::IterableMap;
        fn reopen<M: TryFrom<Map, Error = aya::maps::MapError>>(data: &MapData) -> Result<M, EbpfError> {
            let fd = data.fd().as_fd().try_clone_to_owned().map_err(|e| EbpfError::system("duplicating a map", e))?;
            let data = MapData::from_fd(fd).map_err(sys("duplicating a map"))?;
            Map::from_map_data(data).map_err(sys("duplicating a map"))?.try_into().map_err(sys("duplicating a map"))
        }
        Ok(Self {
            name: self.name.clone(),
            config: reopen(self.config.map())?,
            ports: reopen(self.ports.map())?,
            networks: reopen(self.networks.map())?,
            total: reopen(self.total.map())?,
            clients: reopen(self.clients.map())?,
            pending: reopen(self.pending.map())?,
            sockets: {
                let fd = self.sockets.fd().as_fd().try_clone_to_owned();
                MapData::from_fd(fd.map_err(|e| EbpfError::system("duplicating a map", e))?)
                    .map_err(sys("duplicating a map"))?
            },
            carried: reopen(self.carried.map())?,
            carrying: reopen(self.carrying.map())?,
            stats: reopen(self.stats.map())?,
            info: reopen(self.info.map())?,
            endings: None,
            responder: None,
        })
    }

    /// The socket storage map of counted connections, for
    /// [`SockDiag::connections`](super::sock_diag::SockDiag::connections).
    pub(crate) fn socket_states(&self) -> BorrowedFd<'_> {
        self.sockets.fd().as_fd()
    }

    /// Replaces the carried counts with `carried` (see [`Upkeep`](super::Upkeep)).
    pub(crate) fn write_carried(
        &mut self,
        carried: &std::collections::HashMap<ClientKey, u32>,
    ) -> Result<(), EbpfError> {
        let old: Vec<ClientKey> = self.carried.keys().filter_map(Result::ok).collect();
        // The kernel looks into `carried` only while `carrying` says so: set
        // before the first entry is written, cleared after the last is gone.
        if !carried.is_empty() {
            self.carrying.set(0, 1, 0).map_err(sys("writing the carrying map"))?;
        }
        for (key, n) in carried {
            self.carried.insert(key, n, 0).map_err(sys("writing the carried map"))?;
        }
        for key in old.iter().filter(|k| !carried.contains_key(k)) {
            let _ = self.carried.remove(key);
        }
        if carried.is_empty() {
            self.carrying.set(0, 0, 0).map_err(sys("writing the carrying map"))?;
        }
        Ok(())
    }

    /// Totals since the instance was attached.
    pub fn stats(&self) -> Result<Stats, EbpfError> {
        let total = |stat: Stat| -> Result<u64, EbpfError> {
            let per_cpu = self.stats.get(&(stat as u32), 0).map_err(sys("reading the stats map"))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(Stats {
            accepted: total(Stat::Accepted)?,
            refused: total(Stat::Refused)?,
            dry_run_refused: total(Stat::DryRunRefused)?,
            untracked: total(Stat::Untracked)?,
            steered: total(Stat::Steered)?,
            ended: total(Stat::Ended)?,
            unconfirmed: total(Stat::Unconfirmed)?,
            endings_lost: total(Stat::EndingsLost)?,
            total_refused: total(Stat::TotalRefused)?,
            responded: total(Stat::Responded)?,
            responder_missing: total(Stat::ResponderMissing)?,
        })
    }

    /// Established connections the instance counts now, across all clients
    /// (what the total limit holds them to).
    pub fn total_open(&self) -> Result<u64, EbpfError> {
        Ok(self.total.get(&0, 0).map_err(sys("reading the total map"))?.established)
    }
}

/// IDs of the programs whose links are pinned in instance directory `dir`.
pub(crate) fn linked_programs(dir: &OwnedFd) -> Vec<u32> {
    LINK_PINS
        .iter()
        .filter_map(|pin| PinnedLink::from_pin(fd_path(dir.as_fd(), pin)).ok())
        .filter_map(|link| FdLink::from(link).info().ok().map(|info| info.program_id()))
        .collect()
}

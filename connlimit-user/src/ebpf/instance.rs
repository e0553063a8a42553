//! A limiter instance as it lives in bpffs: its maps, pinned under
//! `/sys/fs/bpf/connlimit/<name>/`, readable and writable by any root process.

use std::{
    fs,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::links::{FdLink, PinnedLink},
};
use connlimit_common::{
    addr::AddrWords,
    maps::{ClientKey, ClientState, FLAG_DRY_RUN, FLAG_EXEMPT, InstanceInfo, KernelConfig, Stat, names},
    occupancy::{Occupancy, epoch_tag},
};

use super::{EbpfError, host};
use crate::{Cidr, Config, Stats, addr};

/// Directory holding one subdirectory of pins per instance.
pub const PIN_ROOT: &str = "/sys/fs/bpf/connlimit";
/// Pin names of the links of a persisted instance.
pub(crate) const LINK_PINS: [&str; 2] = ["link_lookup", "link_sock_ops"];

/// One client key's figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientCount {
    /// The client key: the address cut to the prefix length in force when
    /// it was first seen.
    pub client: IpAddr,
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
    exempt: LpmTrie<MapData, AddrWords, u8>,
    clients: HashMap<MapData, ClientKey, ClientState>,
    conns: HashMap<MapData, u64, ClientKey>,
    stats: PerCpuArray<MapData, u64>,
    info: Array<MapData, InstanceInfo>,
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
    /// Checks that `name` can name an instance (and its pin directory).
    pub fn validate_name(name: &str) -> Result<(), EbpfError> {
        let ok = (1..=64).contains(&name.len())
            && !name.starts_with('.')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok { Ok(()) } else { Err(EbpfError::BadName(name.to_owned())) }
    }

    /// The pin directory of instance `name`.
    pub fn dir_of(name: &str) -> PathBuf {
        Path::new(PIN_ROOT).join(name)
    }

    /// Names of the instances pinned on this machine, sorted.
    pub fn list() -> Result<Vec<String>, EbpfError> {
        host::require_access(Path::new(PIN_ROOT))?;
        let entries = match fs::read_dir(PIN_ROOT) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(EbpfError::system(format!("listing {PIN_ROOT}"), e)),
        };
        let mut names: Vec<String> =
            entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| !n.starts_with('.')).collect();
        names.sort();
        Ok(names)
    }

    /// Opens the pinned maps of the running instance `name`.
    pub fn open(name: &str) -> Result<Self, EbpfError> {
        Self::validate_name(name)?;
        let dir = Self::dir_of(name);
        host::require_access(&dir)?;
        if !dir.join(names::CONFIG).exists() {
            return Err(EbpfError::NoSuchInstance(name.to_owned()));
        }
        Self::from_maps(name, |map| {
            let path = dir.join(map);
            let data = MapData::from_pin(&path).map_err(sys(format!("opening {}", path.display())))?;
            Map::from_map_data(data).map_err(sys(format!("opening {}", path.display())))
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
            exempt: typed!(names::EXEMPT),
            clients: typed!(names::CLIENTS),
            conns: typed!(names::CONNS),
            stats: typed!(names::STATS),
            info: typed!(names::INSTANCE),
        })
    }

    /// Pins `maps` into a new directory for instance `name` (root-only).
    /// On failure, whatever was pinned is removed again.
    pub(crate) fn pin_new<'a>(name: &str, maps: impl IntoIterator<Item = (&'a str, &'a Map)>) -> Result<(), EbpfError> {
        let root = Path::new(PIN_ROOT);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|e| EbpfError::system(format!("creating {PIN_ROOT}"), e))?;
        let dir = Self::dir_of(name);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(EbpfError::InstanceExists(name.to_owned()));
            }
            Err(e) => return Err(EbpfError::system(format!("creating {}", dir.display()), e)),
        }
        let pinned = maps.into_iter().try_for_each(|(map_name, map)| {
            let path = dir.join(map_name);
            map.pin(&path).map_err(|e| EbpfError::system(format!("pinning {}", path.display()), e))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(|e| EbpfError::system(format!("restricting {}", path.display()), e))
        });
        if pinned.is_err() {
            let _ = Self::unpin(name);
        }
        pinned
    }

    /// Removes instance `name`'s pins. Its programs stay attached only as
    /// long as some process still holds them.
    pub(crate) fn unpin(name: &str) -> Result<(), EbpfError> {
        let dir = Self::dir_of(name);
        let entries = fs::read_dir(&dir).map_err(|e| EbpfError::system(format!("reading {}", dir.display()), e))?;
        for entry in entries.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        fs::remove_dir(&dir).map_err(|e| EbpfError::system(format!("removing {}", dir.display()), e))
    }

    /// Detaches a persisted instance from another process: removes its link
    /// pins (detaching its programs) and its map pins.
    pub fn remove(name: &str) -> Result<(), EbpfError> {
        Self::validate_name(name)?;
        let dir = Self::dir_of(name);
        host::require_access(&dir)?;
        if !dir.exists() {
            return Err(EbpfError::NoSuchInstance(name.to_owned()));
        }
        let programs: Vec<u32> = LINK_PINS
            .iter()
            .filter_map(|pin| PinnedLink::from_pin(dir.join(pin)).ok())
            .filter_map(|link| FdLink::from(link).info().ok().map(|info| info.program_id()))
            .collect();
        Self::unpin(name)?;
        super::attachments::wait_until_freed(&programs);
        Ok(())
    }

    /// The instance's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn kernel_config(&self) -> Result<KernelConfig, EbpfError> {
        self.config.get(&0, 0).map_err(sys("reading the config map"))
    }

    /// The configuration in force, as the kernel reads it.
    pub fn config(&self) -> Result<Config, EbpfError> {
        let k = self.kernel_config()?;
        let mut exempt = Vec::new();
        for entry in self.exempt.keys() {
            let key = entry.map_err(sys("reading the exempt map"))?;
            let addr = addr::from_words(key.data());
            let len = key.prefix_len().saturating_sub(if addr.is_ipv4() { 96 } else { 0 });
            exempt.push(Cidr::new(addr, len as u8).map_err(|e| EbpfError::system("reading the exempt map", e))?);
        }
        exempt.sort_by_key(|c| (c.addr(), c.prefix_len()));
        Ok(Config {
            max_conns_per_client_ip: k.max_conns_per_client,
            ipv4_prefix_len: k.ipv4_prefix_len,
            ipv6_prefix_len: k.ipv6_prefix_len,
            exempt,
            dry_run: k.flags & FLAG_DRY_RUN != 0,
        })
    }

    /// Replaces the configuration. Newly exempt prefixes are added before the
    /// limit changes and old ones removed after, so no exempt client is
    /// ever limited in between.
    pub fn set_config(&mut self, config: &Config) -> Result<(), EbpfError> {
        config.validate()?;
        let epoch_ns = self.kernel_config()?.epoch_ns;
        self.write_config(config, epoch_ns)
    }

    pub(crate) fn write_config(&mut self, config: &Config, epoch_ns: u64) -> Result<(), EbpfError> {
        let old: Vec<Key<AddrWords>> = self.exempt.keys().filter_map(Result::ok).collect();
        let new: Vec<Key<AddrWords>> = config
            .exempt
            .iter()
            .map(|c| {
                let (len, words) = c.to_kernel();
                Key::new(len, words)
            })
            .collect();
        for key in &new {
            self.exempt.insert(key, 1, 0).map_err(sys("writing the exempt map"))?;
        }
        let kernel = KernelConfig {
            max_conns_per_client: config.max_conns_per_client_ip,
            ipv4_prefix_len: config.ipv4_prefix_len,
            ipv6_prefix_len: config.ipv6_prefix_len,
            flags: if config.dry_run { FLAG_DRY_RUN } else { 0 } | if new.is_empty() { 0 } else { FLAG_EXEMPT },
            epoch_ns,
        };
        self.config.set(0, kernel, 0).map_err(sys("writing the config map"))?;
        let same = |a: &Key<AddrWords>, b: &Key<AddrWords>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
        for key in old.iter().filter(|k| !new.iter().any(|n| same(k, n))) {
            let _ = self.exempt.remove(key);
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

    /// Whether the instance's links are pinned, so it keeps enforcing with
    /// no process holding it.
    pub fn is_persistent(&self) -> bool {
        LINK_PINS.iter().all(|pin| Self::dir_of(&self.name).join(pin).exists())
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

    /// Established connections counted under the client key of `ip`.
    pub fn num_open(&self, ip: IpAddr) -> Result<u32, EbpfError> {
        let k = self.kernel_config()?;
        let key = ClientKey { addr: addr::to_words(addr::client_key(ip, k.ipv4_prefix_len, k.ipv6_prefix_len)) };
        match self.clients.get(&key, 0) {
            Ok(state) => Ok(Occupancy(state.occupancy).established()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(0),
            Err(e) => Err(EbpfError::system("reading the clients map", e)),
        }
    }

    /// Every tracked client key with its figures, most open connections
    /// first (then most refused).
    pub fn clients(&self) -> Result<Vec<ClientCount>, EbpfError> {
        let now = epoch_tag(host::monotonic_ns(), self.kernel_config()?.epoch_ns);
        let mut all = Vec::new();
        for entry in self.clients.iter() {
            let (key, state) = match entry {
                Ok(kv) => kv,
                // An entry evicted while we walk the map.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(EbpfError::system("reading the clients map", e)),
            };
            let o = Occupancy(state.occupancy);
            all.push(ClientCount {
                client: addr::from_words(key.addr),
                open: o.established(),
                reserved: o.reserved(now),
                accepted: state.accepted,
                refused: state.refused,
            });
        }
        all.sort_by(|a, b| b.open.cmp(&a.open).then(b.refused.cmp(&a.refused)).then(a.client.cmp(&b.client)));
        Ok(all)
    }

    /// Connections the kernel is tracking to their close.
    pub fn tracked_connections(&self) -> Result<usize, EbpfError> {
        Ok(self.conns.keys().filter(Result::is_ok).count())
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
        })
    }
}

//! A limiter instance as it lives in bpffs: its maps, pinned under
//! `/sys/fs/bpf/connlimit/<name>/` (see [`pin_root`](super::pin_root)),
//! readable and writable by root processes. What the maps hold is read and
//! written in [`kernel_config`](super::kernel_config) (the configuration)
//! and [`counts`](super::counts) (what the kernel counts).

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf},
    programs::links::{FdLink, PinnedLink},
};
use connlimit_common::maps::{
    ClientKey, ClientState, ExemptKey, InstanceInfo, KernelConfig, LAYOUT_VERSION, PendingState, TotalState, names,
};

use super::{
    EbpfError, capabilities,
    pin_root::{self, PinRoot, Staging, fd_path},
};

/// Pin names of the links of a persisted instance.
pub(crate) const LINK_PINS: [&str; 2] = ["link_lookup", "link_sock_ops"];
/// Pin name of the link of the `connlimit_diag` kprobe, when attached.
pub(crate) const DIAG_LINK_PIN: &str = "link_diag";
/// Where the sock_ops program itself is pinned: an owner attaches it to a
/// guarded cgroup made again (`follow`), and opening a pin takes only
/// access to the file, where opening a program by id takes CAP_SYS_ADMIN,
/// which the packaged unit does not grant.
pub(crate) const SOCK_OPS_PROGRAM_PIN: &str = "prog_sock_ops";

/// Handles on one instance's maps.
pub struct Instance {
    pub(super) name: String,
    pub(super) config: Array<MapData, KernelConfig>,
    /// The guarded ports, a bit each (see [`port_bit`](connlimit_common::maps::port_bit)).
    pub(super) ports: Array<MapData, u64>,
    /// Exempt prefixes (limit 0) and per-network limits.
    pub(super) networks: LpmTrie<MapData, ExemptKey, u32>,
    pub(super) total: Array<MapData, TotalState>,
    pub(super) clients: HashMap<MapData, ClientKey, ClientState>,
    pub(super) pending: HashMap<MapData, ClientKey, PendingState>,
    /// Each counted connection's state, in socket storage (read through
    /// sock_diag).
    pub(super) sockets: MapData,
    pub(super) carried: HashMap<MapData, ClientKey, u32>,
    /// Non-zero while `carried` has entries.
    pub(super) carrying: Array<MapData, u32>,
    pub(super) stats: PerCpuArray<MapData, u64>,
    pub(super) info: Array<MapData, InstanceInfo>,
    /// Taken by the one upkeep thread of this handle.
    pub(super) endings: Option<RingBuf<MapData>>,
    /// Taken by the 429 responder the endings worker runs.
    pub(super) responder: Option<super::responder::ResponderMaps>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance").field("name", &self.name).finish_non_exhaustive()
    }
}

pub(super) fn sys(what: impl Into<String>) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
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
        capabilities::require_access(&pin_root::pin_root())?;
        match PinRoot::read()? {
            Some(root) => root.names(),
            None => Ok(Vec::new()),
        }
    }

    /// Opens the pinned maps of the running instance `name`.
    pub fn open(name: &str) -> Result<Self, EbpfError> {
        Self::validate_name(name)?;
        capabilities::require_access(&pin_root::pin_root())?;
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
            responder: Some(super::responder::ResponderMaps {
                listeners: match take(names::RESPONDER)? {
                    Map::SockMap(data) => data,
                    _ => return Err(EbpfError::system(format!("map {}", names::RESPONDER), "not a sockmap")),
                },
                own: match take(names::OWN_SOCKETS)? {
                    Map::SkStorage(data) => data,
                    _ => {
                        return Err(EbpfError::system(
                            format!("map {}", names::OWN_SOCKETS),
                            "not a socket storage map",
                        ));
                    }
                },
            }),
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

    /// What the instance is attached to.
    pub fn info(&self) -> Result<InstanceInfo, EbpfError> {
        self.info.get(&0, 0).map_err(sys("reading the instance map"))
    }

    pub(crate) fn set_info(&mut self, info: InstanceInfo) -> Result<(), EbpfError> {
        self.info.set(0, info, 0).map_err(sys("writing the instance map"))
    }

    /// Starts the instance's [`Upkeep`](super::Upkeep) in the network
    /// namespace `netns` it guards: ending the connections the kernel asks
    /// to end, counting those it cannot see, and attaching to the cgroup at
    /// `cgroup` again when it is removed and made again. The process owning an
    /// instance runs it (once per handle); [`EbpfLimiter`](super::EbpfLimiter)
    /// does so itself.
    pub fn start_upkeep(&mut self, netns: &Path, cgroup: &Path) -> Result<super::Upkeep, EbpfError> {
        let ring = self
            .endings
            .take()
            .ok_or_else(|| EbpfError::system("starting the upkeep thread", "this handle's was started already"))?;
        // The owner's other duty: answering refusals with 429 (when asked;
        // its listeners idle otherwise). Without it, refusals are resets.
        let netns_file = std::fs::File::open(netns).map_err(|e| EbpfError::Netns(netns.to_owned(), e))?;
        let responder = match self.responder.take().map(|maps| super::Responder::start(maps, &netns_file, &self.name)) {
            Some(Ok(responder)) => Some(responder),
            Some(Err(e)) => {
                tracing::warn!(instance = %self.name, error = %e, "no 429 responder: refusals get a reset");
                None
            }
            None => None,
        };
        super::Upkeep::start(ring, self.duplicate()?, netns_file, cgroup, responder)
    }

    /// Whether the kernel enforces for the instance's guarded cgroup: `false`
    /// once that cgroup is gone (until its owner attaches to the one made
    /// again at the same path); `None` when it cannot be told (without
    /// CAP_DAC_READ_SEARCH).
    pub fn enforcing(&self) -> Result<Option<bool>, EbpfError> {
        Ok(super::mounts::cgroup_exists(self.info()?.cgroup_ino))
    }

    /// The socket storage map of counted connections, for
    /// [`SockDiag::connections`](super::sock_diag::SockDiag::connections).
    pub(crate) fn socket_states(&self) -> BorrowedFd<'_> {
        self.sockets.fd().as_fd()
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
}

/// IDs of the programs whose links are pinned in instance directory `dir`.
pub(crate) fn linked_programs(dir: &OwnedFd) -> Vec<u32> {
    LINK_PINS
        .iter()
        .chain([&DIAG_LINK_PIN])
        .filter_map(|pin| PinnedLink::from_pin(fd_path(dir.as_fd(), pin)).ok())
        .filter_map(|link| FdLink::from(link).info().ok().map(|info| info.program_id()))
        .collect()
}

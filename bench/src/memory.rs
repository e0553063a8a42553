//! Kernel memory per tracked client, from the kernel's accounting of the
//! instance's maps.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use connlimit::{
    Config,
    ebpf::{AttachOptions, EbpfLimiter, Instance},
};
use connlimit_common::maps::{ClientKey, ClientState, PendingState, capacity, names};
use harness::{Netns, TestCgroup, unique};

pub struct Footprint {
    pub clients: u32,
    pub is_default: bool,
    pub clients_map_bytes: u64,
    pub all_maps_bytes: u64,
}

/// `memlock` of a map, as its fdinfo reports it.
fn memlock(map: &MapData) -> Result<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no memlock in the map's fdinfo")
}

pub fn measure() -> Result<Vec<Footprint>> {
    let mut out = Vec::new();
    for (clients, is_default) in [(100_000, false), (1_000_000, false), (capacity::CLIENTS, true)] {
        let netns = Netns::new()?;
        let cgroup = TestCgroup::create(&unique("connlimit-bench"))?;
        let name = unique("bench-mem");
        let limiter = EbpfLimiter::attach(
            AttachOptions::new(&name, cgroup.path())
                .netns(netns.path())
                .port(9000)
                .config(Config::new(10))
                .max_clients(clients),
        )?;
        let dir = Instance::dir_of(&name);
        let open = |map: &str| MapData::from_pin(dir.join(map)).with_context(|| format!("opening {map}"));
        // Fill the tables as that many clients holding connections would
        // (each has counts and handshake state).
        let mut table: HashMap<MapData, ClientKey, ClientState> =
            Map::from_map_data(open(names::CLIENTS)?)?.try_into()?;
        let mut pending: HashMap<MapData, ClientKey, PendingState> =
            Map::from_map_data(open(names::PENDING)?)?.try_into()?;
        for i in 0..clients {
            let addr = connlimit::addr::to_words(std::net::IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()));
            let key = ClientKey::grouped(&addr, 32, 128);
            table.insert(key, ClientState::default(), 0)?;
            pending.insert(key, PendingState::default(), 0)?;
        }
        let clients_map_bytes = memlock(&open(names::CLIENTS)?)? + memlock(&open(names::PENDING)?)?;
        let mut all_maps_bytes = 0;
        for map in names::ALL {
            all_maps_bytes += memlock(&open(map)?)?;
        }
        eprintln!("memory {clients} clients: CLIENTS {clients_map_bytes} B, all maps {all_maps_bytes} B");
        out.push(Footprint { clients, is_default, clients_map_bytes, all_maps_bytes });
        drop((table, pending));
        limiter.detach()?;
    }
    Ok(out)
}

/// Fills instance `name`'s `CLIENTS` map with `n` entries of clients that
/// never connect (10.x addresses), as if that many held connections;
/// returns how many were added.
pub fn fill_clients(name: &str, n: u32) -> Result<u32> {
    let path = Instance::dir_of(name).join(names::CLIENTS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let mut table: HashMap<MapData, ClientKey, ClientState> = Map::from_map_data(data)?.try_into()?;
    for i in 0..n {
        let addr = connlimit::addr::to_words(std::net::IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()));
        table.insert(ClientKey::grouped(&addr, 32, 128), ClientState::default(), 0)?;
    }
    Ok(n)
}

/// Entries in instance `name`'s `CLIENTS` map.
pub fn count_clients(name: &str) -> Result<usize> {
    let path = Instance::dir_of(name).join(names::CLIENTS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let table: HashMap<MapData, ClientKey, ClientState> = Map::from_map_data(data)?.try_into()?;
    Ok(table.keys().filter(Result::is_ok).count())
}

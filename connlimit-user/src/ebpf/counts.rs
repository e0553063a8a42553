//! What the kernel counts: each client key's figures, the instance's
//! totals and statistics, and the connections it tracks to their close.

use std::net::IpAddr;

use connlimit_common::{
    established,
    maps::{ClientKey, Stat},
    pending::{Pending, epoch_of},
};

use super::{EbpfError, Instance, clock, instance::sys};
use crate::{Stats, addr};

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

impl Instance {
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
        let now = epoch_of(clock::monotonic_ns(), self.kernel_config()?.epoch_ns);
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
        let mut stats = Stats::default();
        for stat in Stat::ALL {
            stats.set(stat, total(stat)?);
        }
        Ok(stats)
    }

    /// Established connections the instance counts now, across all clients
    /// (what the total limit holds them to).
    pub fn total_open(&self) -> Result<u64, EbpfError> {
        Ok(self.total.get(&0, 0).map_err(sys("reading the total map"))?.established)
    }
}

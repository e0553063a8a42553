//! The kernel's view of the configuration: [`Config`], [`WhenFull`],
//! [`RefuseWith`] and the reservation epoch as the `CONFIG` map's
//! [`KernelConfig`] holds them, and the `NETWORKS` trie and `PORTS` table
//! beside it.

use std::time::Duration;

use aya::maps::{IterableMap, lpm_trie::Key};
use connlimit_common::{
    maps::{ExemptKey, FLAG_DRY_RUN, FLAG_EXEMPT, FLAG_FULL_CLOSED, FLAG_REFUSE_429, KernelConfig, port_bit},
    pending::{MAX_EPOCH_NS, MIN_EPOCH_NS},
};

use super::{EbpfError, Instance, RefuseWith, instance::sys, map_batch};
use crate::{Cidr, Config, NetworkLimit, addr};

/// The default reservation epoch (see [`AttachOptions::reservation_epoch`](super::AttachOptions::reservation_epoch)).
pub const DEFAULT_RESERVATION_EPOCH: Duration = Duration::from_secs(1);
/// The shortest reservation epoch accepted: below it, a burst of SYNs from
/// one client on a slow path could outlive its reservations.
pub const MIN_RESERVATION_EPOCH: Duration = Duration::from_millis(10);
/// The longest reservation epoch accepted (a spoofed SYN holds a slot for
/// up to two).
pub const MAX_RESERVATION_EPOCH: Duration = Duration::from_nanos(MAX_EPOCH_NS);
const _: () = assert!(MIN_RESERVATION_EPOCH.as_nanos() >= MIN_EPOCH_NS as u128);

/// The reservation epoch as the kernel config holds it, once checked.
pub(crate) fn validated_epoch_ns(epoch: Duration) -> Result<u64, EbpfError> {
    if !(MIN_RESERVATION_EPOCH..=MAX_RESERVATION_EPOCH).contains(&epoch) {
        return Err(EbpfError::BadEpoch(epoch));
    }
    Ok(epoch.as_nanos() as u64)
}

/// What the kernel does with a connection it cannot count because a map is
/// full (more client keys with open connections, or more connections, than
/// the maps hold; see [`AttachOptions::max_clients`](super::AttachOptions::max_clients)).
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

impl Instance {
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

    /// Changes the network namespace whose sockets sock_ops counts (its
    /// cookie; 0: every namespace's), when the guarded processes moved.
    pub(crate) fn set_netns_cookie(&mut self, cookie: u64) -> Result<(), EbpfError> {
        let kernel = KernelConfig { netns_cookie: cookie, ..self.kernel_config()? };
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

    /// The guarded local ports, ascending: the whole `PORTS` bitmap
    /// (8 KiB), read in one system call.
    pub fn ports(&self) -> Result<Vec<u16>, EbpfError> {
        let words = self.port_words()?;
        Ok((0..=u16::MAX)
            .filter(|&port| {
                let (word, bit) = port_bit(port);
                words.get(word as usize).is_some_and(|w| w & bit != 0)
            })
            .collect())
    }

    /// Guards exactly `ports` from now on: new ones are added before old
    /// ones are dropped. Connections already counted on a dropped port are
    /// still counted until they close.
    pub fn set_ports(&mut self, ports: &[u16]) -> Result<(), EbpfError> {
        let old = self.port_words()?;
        let new = with_ports(vec![0; old.len()], ports)?;
        // Additions first (each changed word with its old and new bits),
        // then the words that lose a bit.
        let both: Vec<u64> = old.iter().zip(&new).map(|(o, n)| o | n).collect();
        self.write_port_words(&old, &both)?;
        self.write_port_words(&both, &new)
    }

    /// Adds `ports` to the guarded ones.
    pub(crate) fn guard_ports(&mut self, ports: &[u16]) -> Result<(), EbpfError> {
        let old = self.port_words()?;
        let new = with_ports(old.clone(), ports)?;
        self.write_port_words(&old, &new)
    }

    /// Whether `port` is guarded.
    pub fn guards(&self, port: u16) -> Result<bool, EbpfError> {
        let (word, bit) = port_bit(port);
        Ok(self.ports.get(&word, 0).map_err(sys("reading the ports map"))? & bit != 0)
    }

    /// The `PORTS` bitmap, whole.
    fn port_words(&self) -> Result<Vec<u64>, EbpfError> {
        map_batch::array_values::<u64>(self.ports.map()).map_err(|e| EbpfError::system("reading the ports map", e))
    }

    /// Writes the words of `new` that differ from `old`.
    fn write_port_words(&mut self, old: &[u64], new: &[u64]) -> Result<(), EbpfError> {
        for (index, (o, n)) in old.iter().zip(new).enumerate() {
            if o != n {
                self.ports.set(index as u32, n, 0).map_err(sys("writing the ports map"))?;
            }
        }
        Ok(())
    }
}

/// The `PORTS` bitmap `words` with `ports` set too; an error for an empty
/// list or port 0.
fn with_ports(mut words: Vec<u64>, ports: &[u16]) -> Result<Vec<u64>, EbpfError> {
    if ports.is_empty() {
        return Err(EbpfError::NoPorts);
    }
    if ports.contains(&0) {
        return Err(EbpfError::PortZero);
    }
    for &port in ports {
        let (word, bit) = port_bit(port);
        if let Some(w) = words.get_mut(word as usize) {
            *w |= bit;
        }
    }
    Ok(words)
}

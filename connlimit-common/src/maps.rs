//! The maps the kernel programs and user space share: names, keys, values.
//!
//! | map | type | key | value | written by |
//! |---|---|---|---|---|
//! | `CONFIG` | array, 1 entry | `u32` 0 | [`KernelConfig`] | user space |
//! | `PORTS` | array, 65536 entries | local port | `u8` (1 = guarded) | user space |
//! | `EXEMPT` | LPM trie | prefix + [`AddrWords`] | `u8` | user space |
//! | `CLIENTS` | LRU hash | [`ClientKey`] | [`ClientState`] | kernel |
//! | `RESERVATIONS` | array, slot = [`FlowKey::slot`] | `u32` | [`Reservation`] | kernel |
//! | `CONNS` | hash | socket cookie (`u64`) | [`ClientKey`] | kernel |
//! | `STATS` | per-CPU array | [`Stat`] | `u64` | kernel |
//! | `INSTANCE` | array, 1 entry | `u32` 0 | [`InstanceInfo`] | user space |

use crate::addr::AddrWords;

/// Map names, as the kernel object declares them and user space opens them.
pub mod names {
    /// See [`KernelConfig`](super::KernelConfig).
    pub const CONFIG: &str = "CONFIG";
    /// Guarded local ports.
    pub const PORTS: &str = "PORTS";
    /// Exempt client prefixes.
    pub const EXEMPT: &str = "EXEMPT";
    /// Per-client occupancy and counters.
    pub const CLIENTS: &str = "CLIENTS";
    /// Admitted handshakes not yet established.
    pub const RESERVATIONS: &str = "RESERVATIONS";
    /// Counted established connections, by socket cookie.
    pub const CONNS: &str = "CONNS";
    /// Global counters.
    pub const STATS: &str = "STATS";
    /// What this instance guards, for other processes to read.
    pub const INSTANCE: &str = "INSTANCE";
    /// Every map, in the order user space pins them.
    pub const ALL: [&str; 8] = [CONFIG, PORTS, EXEMPT, CLIENTS, RESERVATIONS, CONNS, STATS, INSTANCE];
}

/// Program names, as the kernel object declares them.
pub mod programs {
    /// The `sk_lookup` program that refuses connections over the limit.
    pub const LOOKUP: &str = "connlimit_lookup";
    /// The `sock_ops` program that counts established connections.
    pub const SOCK_OPS: &str = "connlimit_sock_ops";
}

/// Default sizes of the maps, in entries. User space may resize the ones it
/// is told to before loading.
pub mod capacity {
    /// Exempt prefixes.
    pub const EXEMPT: u32 = 4096;
    /// Client keys tracked at once; the least recently seen are evicted.
    pub const CLIENTS: u32 = 1 << 17;
    /// Slots for handshakes in flight (a power of two); a new handshake
    /// whose flow hashes to a taken slot overwrites it.
    pub const RESERVATIONS: u32 = 1 << 16;
    /// Established connections counted at once.
    pub const CONNS: u32 = 1 << 18;
}

/// `KernelConfig::flags`: count and report what would be refused, refuse nothing.
pub const FLAG_DRY_RUN: u16 = 1;
/// `KernelConfig::flags`: the `EXEMPT` trie has entries (when clear, the
/// lookup program skips it).
pub const FLAG_EXEMPT: u16 = 1 << 1;

/// Entries in the `PORTS` array: one per TCP port.
pub const PORT_COUNT: u32 = 1 << 16;

/// The live configuration, one entry in `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// Most concurrent connections per client key; 0 means unlimited.
    pub max_conns_per_client: u32,
    /// IPv4 clients are grouped by this many leading bits (0..=32).
    pub ipv4_prefix_len: u8,
    /// IPv6 clients are grouped by this many leading bits (0..=128).
    pub ipv6_prefix_len: u8,
    /// [`FLAG_DRY_RUN`], [`FLAG_EXEMPT`].
    pub flags: u16,
    /// Length of a reservation epoch: a reservation whose handshake never
    /// completes is released between one and two epochs after its SYN.
    pub epoch_ns: u64,
}

/// A client key: a client address cut to the configured prefix length
/// (see [`crate::addr::client_key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The masked address.
    pub addr: AddrWords,
}

/// What the kernel keeps per client key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientState {
    /// A packed [`Occupancy`](crate::occupancy::Occupancy) word, updated atomically.
    pub occupancy: u64,
    /// Connections of this client that completed their handshake.
    pub accepted: u64,
    /// Connections of this client refused (or, in dry-run, that would have been).
    pub refused: u64,
}

/// One TCP connection, from the server's side. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The client's full address (not grouped).
    pub client: AddrWords,
    /// The server's local address.
    pub local: AddrWords,
    /// The client's port.
    pub client_port: u16,
    /// The server's (guarded) port.
    pub local_port: u16,
}

impl FlowKey {
    /// The flow's slot in the `RESERVATIONS` table: a multiplicative hash of
    /// its words, cheap enough for every SYN.
    #[inline(always)]
    pub fn slot(&self) -> u32 {
        let words = [
            self.client[0],
            self.client[1],
            self.client[2],
            self.client[3],
            self.local[3],
            (self.client_port as u32) << 16 | self.local_port as u32,
        ];
        let mut h: u32 = 0;
        let mut i = 0;
        while i < words.len() {
            h = (h.rotate_left(5) ^ words[i]).wrapping_mul(0x9e37_79b9);
            i += 1;
        }
        (h ^ (h >> 16)) & (capacity::RESERVATIONS - 1)
    }
}

/// A slot reserved at the SYN of an admitted connection: one entry of the
/// `RESERVATIONS` table, found by the flow's [`slot`](FlowKey::slot).
///
/// The table is direct-mapped, with no lock: two handshakes in flight whose
/// flows share a slot overwrite each other. A lost reservation only delays
/// the release of its slot until its epoch expires, so the limit is never
/// exceeded because of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reservation {
    /// The flow holding the slot.
    pub flow: FlowKey,
    /// The client key the slot was taken from.
    pub client: ClientKey,
    /// The epoch tag the reservation was booked under.
    pub tag: u16,
    /// 1 while the reservation is held, 0 once claimed or never used.
    pub held: u16,
}

/// Indices into the `STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Connections counted at handshake completion.
    Accepted = 0,
    /// Connections refused with a reset.
    Refused = 1,
    /// Connections that dry-run mode let through over the limit.
    DryRunRefused = 2,
    /// Connections not counted because a map was full (fail open).
    Untracked = 3,
    /// Lookups where another sk_lookup program had already selected a socket,
    /// so a refusal by this one would not hold.
    Steered = 4,
}

impl Stat {
    /// Number of counters in `STATS`.
    pub const COUNT: u32 = 5;
}

/// The layout of an instance's pinned state (map value layouts and the
/// set of maps), recorded in [`InstanceInfo::layout_version`]. Bump it
/// whenever a pinned map changes shape, so a connlimit never opens or
/// adopts an instance another version pinned. 0 means a connlimit from
/// before versioning.
pub const LAYOUT_VERSION: u32 = 1;

/// [`InstanceInfo::flags`]: a graceful exit of the owner leaves the instance
/// enforcing (`--persist`) instead of detaching it.
pub const INFO_PERSIST: u32 = 1;

/// What an instance guards and who owns it, written by the loader (and by
/// a process that adopts the instance) into `INSTANCE`, so another process
/// (the CLI) can describe it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Device and inode of the network namespace the lookup program is in.
    pub netns_dev: u64,
    /// See `netns_dev`.
    pub netns_ino: u64,
    /// Inode of the cgroup v2 directory the sock_ops program is attached to.
    pub cgroup_ino: u64,
    /// When the instance was attached, seconds since the Unix epoch.
    pub started_unix_secs: u64,
    /// Process that owns it (attached or adopted it); 0 when no process
    /// does (a persisted instance whose owner exited gracefully).
    pub pid: u32,
    /// Padding; zero.
    pub _pad: u32,
    /// Start time of the owner process, in clock ticks since boot (field 22
    /// of `/proc/<pid>/stat`): the owner is `pid` only while a process
    /// with this start time has that PID, so a reused PID is never trusted.
    pub owner_start_ticks: u64,
    /// [`LAYOUT_VERSION`] of the connlimit that pinned the instance.
    pub layout_version: u32,
    /// [`INFO_PERSIST`].
    pub flags: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are `repr(C)`, `Copy`, made of integers, and have no
    // implicit padding (explicit padding fields are plain integers).
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::ClientState {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Reservation {}
    unsafe impl aya::Pod for super::InstanceInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn slots_spread_flows_over_the_table() {
        let mut seen = [false; capacity::RESERVATIONS as usize];
        let mut distinct = 0;
        for port in 1..=1000u16 {
            let flow = FlowKey {
                client: [0, 0, 0xffff_0000, 0x0100_007f],
                client_port: port,
                local_port: 80,
                ..FlowKey::default()
            };
            let slot = flow.slot() as usize;
            assert!(slot < seen.len());
            distinct += usize::from(!seen[slot]);
            seen[slot] = true;
        }
        assert!(distinct > 990, "{distinct} distinct slots for 1000 flows");
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<KernelConfig>(), 16);
        assert_eq!(size_of::<ClientKey>(), 16);
        assert_eq!(size_of::<ClientState>(), 24);
        assert_eq!(size_of::<FlowKey>(), 36);
        assert_eq!(size_of::<Reservation>(), 56);
        assert_eq!(size_of::<InstanceInfo>(), 56);
        // Older connlimits read the version at this offset.
        assert_eq!(core::mem::offset_of!(InstanceInfo, layout_version), 48);
    }
}

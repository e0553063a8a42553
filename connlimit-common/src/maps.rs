//! The maps the kernel programs and user space share: names, keys, values.
//!
//! | map | type | key | value | written by |
//! |---|---|---|---|---|
//! | `CONFIG` | array, 1 entry | `u32` 0 | [`KernelConfig`] | user space |
//! | `PORTS` | array, 1024 entries | [`port_bit`]'s word | `u64`: a bit per local port (set = guarded) | user space |
//! | `NETWORKS` | LPM trie | [`ExemptKey`] | `u32`: the per-client limit in the prefix, 0 = exempt | user space |
//! | `RESPONDER` | sockmap, 2 entries | [`RESPONDER_V4`], [`RESPONDER_V6`] | the 429 responder's listeners | user space (the owner) |
//! | `TOTAL` | array, 1 entry | `u32` 0 | [`TotalState`]: the instance's connections across all clients | kernel |
//! | `CLIENTS` | hash | [`ClientKey`] | [`ClientState`]: established connections | kernel, at handshake completion and close |
//! | `PENDING` | LRU hash | [`ClientKey`] | [`PendingState`]: handshakes in flight, refusals | kernel, at SYN |
//! | `HANDSHAKES` | LRU hash | [`FlowKey`] | [`Handshake`] | kernel, at SYN |
//! | `LAST_SYN` | per-CPU array, 1 entry | `u32` 0 | [`LastSyn`] | kernel, at SYN |
//! | `SOCKETS` | socket storage | a socket | [`SocketState`]: the key a connection is counted under | kernel |
//! | `CARRIED` | hash | [`ClientKey`] | `u32`: connections of the key the kernel does not count under it | user space |
//! | `CARRYING` | array, 1 entry | `u32` 0 | `u32`: non-zero while `CARRIED` has entries | user space |
//! | `ENDINGS` | ring buffer | | [`Ending`] | kernel → user space |
//! | `STATS` | per-CPU array | [`Stat`] | `u64` | kernel |
//! | `INSTANCE` | array, 1 entry | `u32` 0 | [`InstanceInfo`] | user space |
//!
//! Counts that must never be forgotten live where only a completed
//! handshake puts them: `CLIENTS`, a plain hash map, and each counted
//! socket's own storage (`SOCKETS`, freed with the socket); what a SYN
//! creates (`PENDING`, `HANDSHAKES`) lives apart, in bounded LRU maps, so a
//! flood of SYNs from any number of addresses can evict only handshake
//! state, never a count.

use crate::addr::{AddrWords, V4_MAPPED_PREFIX_LEN, is_v4_mapped, mask};

/// Map names, as the kernel object declares them and user space opens them.
pub mod names {
    /// See [`KernelConfig`](super::KernelConfig).
    pub const CONFIG: &str = "CONFIG";
    /// Guarded local ports.
    pub const PORTS: &str = "PORTS";
    /// Per-network limits and exempt client prefixes.
    pub const NETWORKS: &str = "NETWORKS";
    /// The instance's connections across all clients.
    pub const TOTAL: &str = "TOTAL";
    /// The 429 responder's listening sockets.
    pub const RESPONDER: &str = "RESPONDER";
    /// Established connections per client key.
    pub const CLIENTS: &str = "CLIENTS";
    /// Handshakes in flight and refusals per client key.
    pub const PENDING: &str = "PENDING";
    /// Admitted handshakes not yet established, by flow.
    pub const HANDSHAKES: &str = "HANDSHAKES";
    /// The last SYN each CPU admitted, until a listener takes it.
    pub const LAST_SYN: &str = "LAST_SYN";
    /// Each counted connection's state, in its socket's storage.
    pub const SOCKETS: &str = "SOCKETS";
    /// connlimit's own sockets (the 429 responder's listeners and what they
    /// accept), which sock_ops never judges.
    pub const OWN_SOCKETS: &str = "OWN_SOCKETS";
    /// Connections of a key that the kernel does not count under it (open
    /// before the instance attached, or counted under a key of an earlier
    /// grouping), kept up to date by the owning process.
    pub const CARRIED: &str = "CARRIED";
    /// Whether `CARRIED` has entries (so the kernel skips it when empty).
    pub const CARRYING: &str = "CARRYING";
    /// Connections the kernel asks user space to end.
    pub const ENDINGS: &str = "ENDINGS";
    /// Flows a socket-diagnostics query is about to look up (see the
    /// `connlimit_diag` program).
    pub const DIAG_LOOKUPS: &str = "DIAG_LOOKUPS";
    /// When `DIAG_LOOKUPS` was last written, so lookups skip it otherwise.
    pub const DIAG_LAST: &str = "DIAG_LAST";
    /// Global counters.
    pub const STATS: &str = "STATS";
    /// What this instance guards, for other processes to read.
    pub const INSTANCE: &str = "INSTANCE";
    /// Every map, in the order user space pins them.
    pub const ALL: [&str; 16] = [
        CONFIG,
        PORTS,
        NETWORKS,
        CLIENTS,
        PENDING,
        HANDSHAKES,
        LAST_SYN,
        SOCKETS,
        CARRIED,
        CARRYING,
        ENDINGS,
        STATS,
        INSTANCE,
        TOTAL,
        RESPONDER,
        OWN_SOCKETS,
    ];
}

/// Program names, as the kernel object declares them.
pub mod programs {
    /// The `sk_lookup` program that refuses connections over the limit.
    pub const LOOKUP: &str = "connlimit_lookup";
    /// The `sock_ops` program that counts established connections.
    pub const SOCK_OPS: &str = "connlimit_sock_ops";
    /// The kprobe that marks the flows socket-diagnostics queries look up.
    pub const DIAG: &str = "connlimit_diag";
    /// The same as fentry, for kernels without kprobes.
    pub const DIAG_FENTRY: &str = "connlimit_diag_fentry";
    /// The kernel function [`DIAG`] and [`DIAG_FENTRY`] hook: every socket-diagnostics query
    /// for one socket (and `SOCK_DESTROY`) passes through it, with the
    /// request as its fifth argument, on Linux 6.1 to 6.18 at least.
    pub const DIAG_FUNCTION: &str = "inet_diag_cmd_exact";
    /// [`DIAG_FUNCTION`]'s argument (from 0) that is the request.
    pub const DIAG_REQUEST_ARG: usize = 4;
}

/// Default sizes of the maps, in entries. User space may resize the ones it
/// is told to before loading.
pub mod capacity {
    /// Exempt prefixes and per-network limits together (`NETWORKS`).
    pub const EXEMPT: u32 = 4096;
    /// Client keys holding established connections at once.
    pub const CLIENTS: u32 = 1 << 17;
    /// Client keys with handshakes in flight or recent refusals (LRU).
    pub const PENDING: u32 = 1 << 17;
    /// Handshakes in flight (LRU).
    pub const HANDSHAKES: u32 = 1 << 16;
    /// Client keys with carried connections.
    pub const CARRIED: u32 = 1 << 16;
    /// Bytes of the `ENDINGS` ring buffer (a power of two, whole pages):
    /// room for about 5,000 endings between two reads by user space.
    pub const ENDINGS_BYTES: u32 = 1 << 18;
}

/// `KernelConfig::flags`: count and report what would be refused, refuse nothing.
pub const FLAG_DRY_RUN: u16 = 1;
/// `KernelConfig::flags`: the `NETWORKS` trie (exempt prefixes and
/// per-network limits) has entries (when clear, the programs skip it).
pub const FLAG_EXEMPT: u16 = 1 << 1;
/// `KernelConfig::flags`: when `CLIENTS` is full (or a socket's storage
/// cannot be had), end the
/// connection that cannot be counted (fail closed) instead of admitting it
/// uncounted (fail open).
pub const FLAG_FULL_CLOSED: u16 = 1 << 2;

/// `KernelConfig::flags`: answer a refused connection with HTTP 429 by
/// handing it to the responder's listener in `RESPONDER`; with no listener
/// there (its owner is gone), refuse it with a reset.
pub const FLAG_REFUSE_429: u16 = 1 << 3;

/// `RESPONDER` index of the IPv4 listener.
pub const RESPONDER_V4: u32 = 0;
/// `RESPONDER` index of the IPv6 listener.
pub const RESPONDER_V6: u32 = 1;

/// TCP ports: one bit each in the `PORTS` bitmap.
pub const PORT_COUNT: u32 = 1 << 16;
/// Words of the `PORTS` bitmap (8 KiB, read whole in one system call).
pub const PORT_WORDS: u32 = PORT_COUNT / 64;

/// Where local port `port`'s bit is in the `PORTS` bitmap: the word's index
/// and the bit's mask in it.
#[inline(always)]
pub const fn port_bit(port: u16) -> (u32, u64) {
    (port as u32 / 64, 1 << (port % 64))
}

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
    /// [`FLAG_DRY_RUN`], [`FLAG_EXEMPT`], [`FLAG_FULL_CLOSED`], [`FLAG_REFUSE_429`].
    pub flags: u16,
    /// Length of a reservation epoch, at least
    /// [`MIN_EPOCH_NS`](crate::pending::MIN_EPOCH_NS): a reservation whose
    /// handshake never completes is released one to two epochs after its SYN.
    pub epoch_ns: u64,
    /// Cookie of the guarded network namespace: sock_ops ignores sockets of
    /// other namespaces (a cgroup can span several). 0 = no filter.
    pub netns_cookie: u64,
    /// Most concurrent connections of the instance across all clients;
    /// 0 means unlimited.
    pub max_conns_total: u32,
    /// Padding; zero.
    pub _pad: u32,
}

/// A client key: a client address cut to a prefix length (see
/// [`ClientKey::grouped`]), or a whole exempt address ([`ClientKey::exempt`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The masked address.
    pub addr: AddrWords,
    /// How many leading bits of the 128-bit form `addr` keeps (IPv4 keys
    /// count the 96 bits of the `::ffff:` prefix), so keys of different
    /// groupings never mix.
    pub prefix_len: u32,
}

impl ClientKey {
    /// The key a client address is counted under: the address cut to the
    /// prefix length of its family (IPv4 /`ipv4_prefix_len`, IPv6
    /// /`ipv6_prefix_len`). IPv4-mapped IPv6 addresses group as IPv4.
    #[inline(always)]
    pub const fn grouped(addr: &AddrWords, ipv4_prefix_len: u8, ipv6_prefix_len: u8) -> Self {
        let prefix_len = if is_v4_mapped(addr) {
            V4_MAPPED_PREFIX_LEN + if ipv4_prefix_len > 32 { 32 } else { ipv4_prefix_len as u32 }
        } else if ipv6_prefix_len > 128 {
            128
        } else {
            ipv6_prefix_len as u32
        };
        Self { addr: mask(addr, prefix_len), prefix_len }
    }

    /// The key of an exempt client: its whole address. Exempt connections
    /// are counted for the record but never refused, and never use up the
    /// allowance of the network they are in.
    #[inline(always)]
    pub const fn exempt(addr: &AddrWords) -> Self {
        Self { addr: *addr, prefix_len: EXEMPT_KEY }
    }

    /// Whether this is an exempt client's key.
    #[inline(always)]
    pub const fn is_exempt(&self) -> bool {
        self.prefix_len == EXEMPT_KEY
    }

    /// Whether `other` is the same key, compared field by field (the BPF
    /// target has no `memcmp` for a derived comparison to call).
    #[inline(always)]
    pub const fn same_as(&self, other: &Self) -> bool {
        self.prefix_len == other.prefix_len
            && self.addr[0] == other.addr[0]
            && self.addr[1] == other.addr[1]
            && self.addr[2] == other.addr[2]
            && self.addr[3] == other.addr[3]
    }
}

/// `ClientKey::prefix_len` of exempt keys: out of the range of real prefix
/// lengths, so an exempt key never equals a grouped one.
const EXEMPT_KEY: u32 = 0xff;

/// The `NETWORKS` trie's key data: the address family ahead of the address,
/// so an IPv6 prefix (even `::/0`) never matches an IPv4 client through its
/// mapped form.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExemptKey {
    /// 4 or 6, big-endian (the trie matches bytes in order).
    pub family: u32,
    /// The address (IPv4 in its mapped form).
    pub addr: AddrWords,
}

impl ExemptKey {
    /// Leading bits of the family word, always part of a prefix.
    pub const FAMILY_BITS: u32 = 32;

    /// The key of a client address, looked up with the full length.
    #[inline(always)]
    pub const fn of(addr: &AddrWords) -> Self {
        let family: u32 = if is_v4_mapped(addr) { 4 } else { 6 };
        Self { family: family.to_be(), addr: *addr }
    }

    /// The trie prefix length of a CIDR of `prefix_len` bits within its
    /// own family (0..=32 for IPv4, 0..=128 for IPv6).
    #[inline(always)]
    pub const fn prefix_len(addr: &AddrWords, prefix_len: u32) -> u32 {
        let family_len = if is_v4_mapped(addr) { V4_MAPPED_PREFIX_LEN } else { 0 };
        Self::FAMILY_BITS + family_len + prefix_len
    }

    /// The trie prefix length that matches one whole address.
    pub const FULL_LEN: u32 = Self::FAMILY_BITS + 128;
}

/// Established connections of one client key (`CLIENTS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientState {
    /// The count word (see [`crate::established`]), updated atomically.
    pub established: u64,
    /// Connections counted under this key since its entry was made.
    pub accepted: u64,
}

/// Handshake-time state of one client key (`PENDING`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingState {
    /// A packed [`Pending`](crate::pending::Pending) word, updated atomically.
    pub reservations: u64,
    /// Connections of this key refused (or, in dry-run, that would have been).
    pub refused: u64,
    /// Random, set when the entry is made: a [`Handshake`] booked in an
    /// entry that was evicted since (the map is LRU) does not match the new
    /// entry's, so its reservation is known to be gone.
    pub generation: u32,
    /// Padding; zero.
    pub _pad: u32,
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

/// An admitted handshake holding a reservation (`HANDSHAKES`, by flow).
/// Whoever deletes the entry owns the reservation: the completed handshake
/// that turns it into its connection's slot, or the next SYN on the same CPU
/// that finds no listener took it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handshake {
    /// The client key the slot was taken from.
    pub client: ClientKey,
    /// The [`PendingState::generation`] of the entry it was booked in.
    pub generation: u32,
    /// The epoch the client's reservation was booked in.
    pub epoch: u64,
    /// The epoch the instance-wide reservation was booked in.
    pub total_epoch: u64,
    /// Which slots the handshake holds: [`SLOT_CLIENT`], [`SLOT_TOTAL`].
    pub slots: u32,
    /// Padding; zero.
    pub _pad: u32,
}

/// [`Handshake::slots`]: a reservation in the client's `PENDING` word.
pub const SLOT_CLIENT: u32 = 1;
/// [`Handshake::slots`]: a reservation in the `TOTAL` word.
pub const SLOT_TOTAL: u32 = 1 << 1;

/// A counted connection's own state, in its socket's storage (`SOCKETS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketState {
    /// 1 while the connection is counted; its close clears it atomically,
    /// so the count falls exactly once.
    pub counted: u64,
    /// The key the connection is counted under.
    pub client: ClientKey,
    /// Padding; zero.
    pub _pad: u32,
}

/// The instance's connections across all clients (`TOTAL`, one entry),
/// for the total limit. Exempt clients' connections count here too.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TotalState {
    /// A packed [`Pending`](crate::pending::Pending) word: handshakes in
    /// flight holding an instance-wide slot (booked only while a total
    /// limit is set).
    pub reservations: u64,
    /// Established connections counted (each with its `SOCKETS` state),
    /// updated atomically.
    pub established: u64,
}

/// The last SYN a CPU admitted (`LAST_SYN`, per CPU). A SYN that a listener
/// of the guarded cgroup takes is seen by sock_ops on the same CPU before
/// that CPU looks up another packet; one that no listener takes (no server
/// yet, or a stray ACK that only looked like a new connection) is released
/// by the next lookup, so only real SYNs to real listeners hold reservations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LastSyn {
    /// The flow.
    pub flow: FlowKey,
    /// 1 until a listener of the guarded cgroup takes the SYN.
    pub unconfirmed: u32,
    /// When it was admitted (monotonic ns).
    pub at_ns: u64,
}

/// A connection the kernel asks user space to end (`ENDINGS`): it completed
/// its handshake without a live reservation while its client was at the
/// limit (or, failing closed, could not be counted).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ending {
    /// The server-side socket's cookie.
    pub cookie: u64,
    /// Its flow.
    pub flow: FlowKey,
    /// Padding; zero.
    pub _pad: u32,
}

/// Indices into the `STATS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Connections counted at handshake completion.
    Accepted = 0,
    /// Connections refused with a reset at their SYN.
    Refused = 1,
    /// Connections that dry-run mode let through over the limit.
    DryRunRefused = 2,
    /// Connections admitted uncounted because a map was full (failing open).
    Untracked = 3,
    /// Lookups where another sk_lookup program had already selected a socket,
    /// so a refusal by this one would not hold.
    Steered = 4,
    /// Connections ended after their handshake: over the limit with no live
    /// reservation (a handshake completed too late), or, failing closed,
    /// not countable because a map was full.
    Ended = 5,
    /// Reservations released because no listener of the guarded cgroup took
    /// their packet (no server yet, a stray packet, or a listener in another
    /// cgroup).
    Unconfirmed = 6,
    /// Endings user space was not told of because `ENDINGS` was full.
    EndingsLost = 7,
    /// Connections refused (or ended, or in dry-run let through) because
    /// the instance was at its total limit; also counted in `Refused`,
    /// `Ended` or `DryRunRefused`.
    TotalRefused = 8,
    /// Refused connections handed to the 429 responder (also in `Refused`).
    Responded = 9,
    /// Refused connections that were to get a 429 but got a reset: no
    /// responder listener was there (its owner is gone).
    ResponderMissing = 10,
}

impl Stat {
    /// Number of counters in `STATS`.
    pub const COUNT: u32 = 11;

    /// Every statistic, in `STATS` order: what `status`, `top`, their JSON
    /// and `/metrics` iterate, so none is shown in one and missing from
    /// another.
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::Accepted,
        Stat::Refused,
        Stat::DryRunRefused,
        Stat::Untracked,
        Stat::Steered,
        Stat::Ended,
        Stat::Unconfirmed,
        Stat::EndingsLost,
        Stat::TotalRefused,
        Stat::Responded,
        Stat::ResponderMissing,
    ];

    /// What the statistic is called and means, defined once for every
    /// place that shows it.
    pub const fn info(self) -> StatInfo {
        let (name, metric, help) = match self {
            Stat::Accepted => ("accepted", "connlimit_accepted", "Connections admitted and counted"),
            Stat::Refused => (
                "refused",
                "connlimit_refused",
                "Connections refused because their client (or the instance) was at its limit",
            ),
            Stat::DryRunRefused => (
                "dry_run_refused",
                "connlimit_dry_run_refused",
                "Connections over the limit that dry-run mode let through",
            ),
            Stat::Untracked => {
                ("untracked", "connlimit_untracked", "Connections admitted uncounted because a kernel map was full")
            }
            Stat::Steered => (
                "steered",
                "connlimit_steered",
                "Refusals overridden by another sk_lookup program steering the connection",
            ),
            Stat::Ended => (
                "ended",
                "connlimit_ended",
                "Connections ended right after their handshake (over the limit with no live reservation, or not countable with when-full closed)",
            ),
            Stat::Unconfirmed => (
                "unconfirmed",
                "connlimit_unconfirmed",
                "Reservations released because no listener of the guarded cgroup took their packet",
            ),
            Stat::EndingsLost => (
                "endings_lost",
                "connlimit_endings_lost",
                "Connections to end that user space was not told of because the ENDINGS ring buffer was full",
            ),
            Stat::TotalRefused => (
                "total_refused",
                "connlimit_total_limit_refused",
                "Connections refused because the instance was at its total limit (also in refused, ended or dry_run_refused)",
            ),
            Stat::Responded => (
                "responded",
                "connlimit_responded",
                "Refused connections answered with HTTP 429 by the responder (also in refused)",
            ),
            Stat::ResponderMissing => (
                "responder_missing",
                "connlimit_responder_missing",
                "Refusals reset because no process held the 429 responder",
            ),
        };
        StatInfo { stat: self, name, metric, help, kind: StatKind::Counter }
    }
}

/// How a statistic behaves over time (its Prometheus type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    /// Only goes up, from 0 when the instance is attached; the Prometheus
    /// family is served with the `_total` suffix.
    Counter,
}

/// A statistic's names and meaning (see [`Stat::info`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatInfo {
    /// Which statistic.
    pub stat: Stat,
    /// Its field in `status --json`, `top --json` and the library's `Stats`.
    pub name: &'static str,
    /// Its Prometheus family, without the `_total` a counter is served with.
    pub metric: &'static str,
    /// One line saying what it counts (the metric's HELP).
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: StatKind,
}

/// The layout of an instance's pinned state (map value layouts and the
/// set of maps), recorded in [`InstanceInfo::layout_version`]. Bump it
/// whenever a pinned map changes shape, so a connlimit never opens or
/// adopts an instance another version pinned. 0 means a connlimit from
/// before versioning.
pub const LAYOUT_VERSION: u32 = 5;

/// [`InstanceInfo::flags`]: a graceful exit of the owner leaves the instance
/// enforcing (`--persist`) instead of detaching it.
pub const INFO_PERSIST: u32 = 1;

/// [`InstanceInfo::flags`]: the `connlimit_diag` probe is attached, so the
/// lookups socket-diagnostics queries make are told from packets.
pub const INFO_DIAG_PROBE: u32 = 1 << 1;

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
    /// [`INFO_PERSIST`], [`INFO_DIAG_PROBE`].
    pub flags: u32,
    /// The first 8 bytes of the SHA-256 of the kernel object the instance
    /// runs (what `connlimit --version` shows); zero if not recorded.
    pub object_hash: [u8; 8],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are `repr(C)`, `Copy`, made of integers, and have no
    // implicit padding (explicit padding fields are plain integers).
    unsafe impl aya::Pod for super::KernelConfig {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::ClientState {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::PendingState {}
    unsafe impl aya::Pod for super::ExemptKey {}
    unsafe impl aya::Pod for super::Handshake {}
    unsafe impl aya::Pod for super::TotalState {}
    unsafe impl aya::Pod for super::SocketState {}
    unsafe impl aya::Pod for super::LastSyn {}
    unsafe impl aya::Pod for super::Ending {}
    unsafe impl aya::Pod for super::InstanceInfo {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;
    use core::mem::size_of;

    fn v4(a: u8, b: u8, c: u8, d: u8) -> AddrWords {
        v4_mapped(u32::from_ne_bytes([a, b, c, d]))
    }

    #[test]
    fn keys_of_different_groupings_and_exempt_keys_never_mix() {
        let a = v4(10, 1, 2, 0);
        assert_eq!(ClientKey::grouped(&v4(10, 1, 2, 3), 24, 128), ClientKey { addr: a, prefix_len: 120 });
        assert_ne!(ClientKey::grouped(&a, 24, 128), ClientKey::grouped(&a, 32, 128));
        assert_ne!(ClientKey::exempt(&a), ClientKey::grouped(&a, 32, 128));
        assert!(ClientKey::exempt(&a).is_exempt() && !ClientKey::grouped(&a, 32, 128).is_exempt());
        assert_eq!(ClientKey::grouped(&a, 200, 200).prefix_len, 128, "lengths are clamped");
    }

    #[test]
    fn exempt_keys_carry_the_family() {
        let mapped = v4(192, 0, 2, 1);
        assert_ne!(ExemptKey::of(&mapped).family, ExemptKey::of(&[0, 0, 0, 1u32.to_be()]).family);
        assert_eq!(ExemptKey::prefix_len(&mapped, 24), 32 + 96 + 24);
        assert_eq!(ExemptKey::prefix_len(&[0; 4], 0), 32);
    }

    #[test]
    fn every_port_has_its_own_bit() {
        let mut seen = std::collections::HashSet::new();
        for port in 0..=u16::MAX {
            let (word, bit) = port_bit(port);
            assert!(word < PORT_WORDS && bit.count_ones() == 1);
            assert!(seen.insert((word, bit)));
        }
    }

    #[test]
    fn every_statistic_is_listed_once_in_order_with_distinct_names() {
        for (i, stat) in Stat::ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i);
            let info = stat.info();
            assert_eq!(info.stat, *stat);
            assert!(info.metric.starts_with("connlimit_") && !info.metric.ends_with("_total"), "{info:?}");
            assert!(!info.help.is_empty() && !info.help.contains('\n'));
            for other in &Stat::ALL[i + 1..] {
                assert_ne!(info.name, other.info().name);
                assert_ne!(info.metric, other.info().metric);
            }
        }
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<KernelConfig>(), 32);
        assert_eq!(size_of::<ClientKey>(), 20);
        assert_eq!(size_of::<ExemptKey>(), 20);
        assert_eq!(size_of::<ClientState>(), 16);
        assert_eq!(size_of::<PendingState>(), 24);
        assert_eq!(size_of::<FlowKey>(), 36);
        assert_eq!(size_of::<Handshake>(), 48);
        assert_eq!(size_of::<TotalState>(), 16);
        assert_eq!(size_of::<SocketState>(), 32);
        assert_eq!(size_of::<LastSyn>(), 48);
        assert_eq!(size_of::<Ending>(), 48);
        assert_eq!(size_of::<InstanceInfo>(), 64);
        // Older connlimits read the version at this offset.
        assert_eq!(core::mem::offset_of!(InstanceInfo, layout_version), 48);
    }
}

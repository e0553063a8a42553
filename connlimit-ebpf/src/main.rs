//! connlimit's kernel side: two small programs around shared maps.
//!
//! - `connlimit_lookup` (sk_lookup, per network namespace) runs when a packet
//!   for a guarded port finds no established socket: a SYN, or a stray
//!   packet. It reserves a slot for the client or, when the client is at its
//!   limit, returns `SK_DROP`, which makes the kernel answer a SYN with a RST.
//! - `connlimit_sock_ops` (sock_ops, per cgroup v2) sees the server's sockets:
//!   it confirms that a listener took an admitted SYN (when the listener
//!   makes a request socket, or answers with a SYN cookie), counts the connection
//!   when its handshake completes (re-checking the limit when the
//!   handshake's reservation is gone), and gives the slot back, exactly once,
//!   when the socket closes.
//!
//! The arithmetic lives in `connlimit_common` (`pending`, `established`);
//! this file only wires kernel events to it. The README's threat model says
//! what each step defends against.
// Built for the BPF target by connlimit-user's build script. On the host it
// builds as an empty program, so `cargo clippy --workspace` checks it too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod atomic;

use aya_ebpf::{
    bindings::{
        BPF_F_CLONE, BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_HDR_OPT_LEN_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RWND_INIT, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE,
        bpf_sk_lookup, bpf_sock_ops, sk_action,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_map_lookup_percpu_elem,
        bpf_probe_read_kernel, bpf_sk_storage_get,
    },
    macros::{btf_map, fentry, kprobe, map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockMap, lpm_trie::Key},
    programs::{FEntryContext, ProbeContext, SkLookupContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use connlimit_common::{
    addr::{AddrWords, v4_mapped},
    established::{self, Step},
    maps::{
        ClientKey, ClientState, Ending, ExemptKey, FLAG_DRY_RUN, FLAG_EXEMPT, FLAG_FULL_CLOSED, FLAG_REFUSE_429,
        FlowKey, Handshake, InstanceInfo, KernelConfig, LastSyn, PORT_COUNT, PORT_WORDS, PendingState, RESPONDER_V4,
        RESPONDER_V6, SLOT_CLIENT, SLOT_TOTAL, SocketState, Stat, TotalState, capacity, port_bit,
    },
    pending::{Epochs, Pending, is_live},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const TCP_CLOSE: u32 = 7;
/// `args[0]` of `BPF_SOCK_OPS_HDR_OPT_LEN_CB` for a SYN-ACK carrying a SYN
/// cookie (uapi `bpf.h`, since 5.10; an anonymous enum in the bindings).
const BPF_WRITE_HDR_TCP_SYNACK_COOKIE: u32 = 2;
/// Compare-and-swap retries on a word. Each failure means another CPU's
/// update went through, so running out takes that many other updates of the
/// same word during one attempt. Running out of reservation attempts refuses
/// (a SYN, or a handshake judged at completion, which is then ended: a
/// client whose own handshakes contend that hard is flooding); running out
/// while counting an established connection meets the `WhenFull` policy.
const CAS_ATTEMPTS: u32 = 8;
/// Attempts to find a live `CLIENTS` entry while another CPU removes a
/// retired one.
const ENTRY_ATTEMPTS: u32 = 2;
/// An unconfirmed SYN older than this on another CPU was not taken by a
/// listener (a listener takes a SYN microseconds after its lookup, on the
/// same CPU, in the same softirq).
const STALE_SYN_NS: u64 = 1_000_000;
/// CPUs whose unconfirmed SYNs a refusal looks at; on bigger machines the
/// rest expire with their epoch.
const MAX_CPUS: u32 = 64;
/// How long a flow marked by a socket-diagnostics query waits for its
/// lookup: the query runs it at once, in the same system call, but the
/// task may be preempted in between. A packet of that exact flow meanwhile
/// passes unreserved and is judged when its handshake completes.
const DIAG_WINDOW_NS: u64 = 1_000_000_000;

#[map]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);
#[map]
static PORTS: Array<u64> = Array::with_max_entries(PORT_WORDS, 0);
// Per-network limits: the longest prefix holding a client gives its limit;
// 0 makes it exempt.
#[map]
static NETWORKS: LpmTrie<ExemptKey, u32> = LpmTrie::with_max_entries(capacity::EXEMPT, BPF_F_NO_PREALLOC);
// The total limit's state: one word of reservations and one count, shared
// by all clients.
#[map]
static TOTAL: Array<TotalState> = Array::with_max_entries(1, 0);
// The 429 responder's listeners (IPv4, IPv6), put there by the owning
// process; a socket leaves the map when it closes.
#[map]
static RESPONDER: SockMap = SockMap::with_max_entries(2, 0);
// Not LRU: an entry is a live count, made by a completed handshake and
// removed when its count returns to zero. Nothing a SYN does can evict it.
#[map]
static CLIENTS: HashMap<ClientKey, ClientState> = HashMap::with_max_entries(capacity::CLIENTS, BPF_F_NO_PREALLOC);
// LRU: made by SYNs, so bounded and evictable. Losing an entry loses only
// reservations (the handshake is then judged again when it completes).
#[map]
static PENDING: LruHashMap<ClientKey, PendingState> = LruHashMap::with_max_entries(capacity::PENDING, 0);
#[map]
static HANDSHAKES: LruHashMap<FlowKey, Handshake> = LruHashMap::with_max_entries(capacity::HANDSHAKES, 0);
#[map]
static LAST_SYN: PerCpuArray<LastSyn> = PerCpuArray::with_max_entries(1, 0);
// Each counted connection's own state, the promise that its close will be
// counted: made with the socket's storage and freed with the socket, so no
// table fills up and nothing is inserted into or deleted from a shared map
// per connection.
#[btf_map]
static SOCKETS: SkStorage<SocketState> = SkStorage::new();
// connlimit's own sockets: the 429 responder's listeners, marked by the
// owning process, and (`BPF_F_CLONE`) every connection they accept, which
// carries the guarded port and, when connlimit runs inside the guarded
// cgroup, runs this program: it is never judged.
#[btf_map]
static OWN_SOCKETS: ClonedSkStorage<u32> = ClonedSkStorage::new();
// Written by user space only (a single writer: no lost updates).
#[map]
static CARRIED: HashMap<ClientKey, u32> = HashMap::with_max_entries(capacity::CARRIED, BPF_F_NO_PREALLOC);
// Non-zero while `CARRIED` has entries: set before the first is written,
// cleared after the last is removed. Almost always zero, which spares every
// admission a look-up in an empty hash map.
#[map]
static CARRYING: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static ENDINGS: RingBuf = RingBuf::with_byte_size(capacity::ENDINGS_BYTES, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
// Flows a socket-diagnostics query is looking up, and when; written by
// `connlimit_diag`, each taken by the lookup it announces. LRU: a query
// that found an established socket runs no lookup, and its entry ages out.
#[map]
static DIAG_LOOKUPS: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(1024, 0);
// When `DIAG_LOOKUPS` was last written: lookups look there only for
// `DIAG_WINDOW_NS` after, so the SYN path pays one array read otherwise.
#[map]
static DIAG_LAST: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static INSTANCE: Array<InstanceInfo> = Array::with_max_entries(1, 0);

#[sk_lookup]
pub fn connlimit_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands the program a valid context.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP || !is_guarded(lookup.local_port) {
        return sk_action::SK_PASS;
    }
    let Some(config) = CONFIG.get(0) else {
        return sk_action::SK_PASS;
    };
    if config.max_conns_per_client == 0 && config.max_conns_total == 0 && config.flags & FLAG_EXEMPT == 0 {
        return sk_action::SK_PASS;
    }
    let flow = lookup_flow(lookup);
    let now_ns = now_ns();
    if is_diagnostic(&flow, now_ns) {
        // No packet: a local process asked about this flow. It reserves,
        // refuses and counts nothing, and hears what it would hear below
        // the limit, whatever the client's state.
        return sk_action::SK_PASS;
    }
    let epochs = Epochs::at(now_ns, config.epoch_ns);
    release_unconfirmed_syn(&epochs);
    let (client, limit) = client_key(config, &flow.client);
    if client.is_exempt() || (limit == 0 && config.max_conns_total == 0) {
        return sk_action::SK_PASS;
    }
    let pending = pending_state(&client);
    if is_admitted_handshake(config, &flow, pending, &epochs) {
        return sk_action::SK_PASS;
    }
    match admit(config, &flow, &client, pending, limit, now_ns) {
        ADMITTED => sk_action::SK_PASS,
        over => refuse(&ctx, config, pending, over == OVER_TOTAL),
    }
}

/// Whether this lookup is the kernel answering a socket-diagnostics query
/// about `flow` (`ss -K`, any local user's `NETLINK_SOCK_DIAG` request for
/// one socket), marked a moment ago by `connlimit_diag`; takes the mark.
fn is_diagnostic(flow: &FlowKey, now_ns: u64) -> bool {
    let recent = |at: u64| now_ns.saturating_sub(at) <= DIAG_WINDOW_NS;
    if !DIAG_LAST.get(0).is_some_and(|&at| recent(at)) {
        return false;
    }
    // SAFETY: entries are plain data.
    match unsafe { DIAG_LOOKUPS.get(flow) } {
        Some(&at) if recent(at) => DIAG_LOOKUPS.remove(flow).is_ok(),
        _ => false,
    }
}

/// `struct inet_diag_req_v2` (uapi `linux/inet_diag.h`).
#[repr(C)]
#[derive(Clone, Copy)]
struct DiagRequest {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    // struct inet_diag_sockid: ports and addresses in network order.
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// A socket-diagnostics query for one socket is starting
/// (`inet_diag_cmd_exact`). If no established socket matches, the kernel
/// runs the lookup programs for its flow (the query's source is the local
/// end, its destination the client), from the querying process, with no
/// packet: mark the flow so that `connlimit_lookup` knows. Two ways in,
/// whichever the kernel offers: a kprobe (`CONFIG_KPROBES`, the function in
/// a module as on Debian) or fentry (the function in the kernel image's
/// BTF).
#[kprobe]
pub fn connlimit_diag(ctx: ProbeContext) -> u32 {
    if let Some(req) = ctx.arg::<*const DiagRequest>(connlimit_common::maps::programs::DIAG_REQUEST_ARG) {
        mark_diagnostic(req);
    }
    0
}

/// [`connlimit_diag`] as fentry.
#[fentry(function = "inet_diag_cmd_exact")]
pub fn connlimit_diag_fentry(ctx: FEntryContext) -> u32 {
    mark_diagnostic(ctx.arg::<*const DiagRequest>(connlimit_common::maps::programs::DIAG_REQUEST_ARG));
    0
}

/// Marks the flow the request `req` (kernel memory) asks about.
#[inline(always)]
fn mark_diagnostic(req: *const DiagRequest) {
    // SAFETY: a helper copying kernel memory, which fails cleanly.
    let Ok(req) = (unsafe { bpf_probe_read_kernel(req) }) else {
        return;
    };
    let family = u32::from(req.family);
    if u32::from(req.protocol) != IPPROTO_TCP || (family != AF_INET && family != AF_INET6) {
        return;
    }
    let (client, local) =
        if family == AF_INET { (v4_mapped(req.dst[0]), v4_mapped(req.src[0])) } else { (req.dst, req.src) };
    let flow = FlowKey { client, local, client_port: u16::from_be(req.dport), local_port: u16::from_be(req.sport) };
    let now = now_ns();
    let _ = DIAG_LOOKUPS.insert(flow, now, 0);
    if let Some(last) = DIAG_LAST.get_ptr_mut(0) {
        // SAFETY: the array's one entry; a plain aligned store.
        unsafe { last.write_volatile(now) };
    }
}

/// Whether `flow` is a handshake admitted at its SYN in the last two
/// epochs, come back for its SYN-cookie ACK or a retransmitted SYN (the
/// context carries no TCP flags): it passes without taking another slot,
/// and `on_established` judges again whatever of its slots has expired.
///
/// Only while its client (`pending`) has live reservations, or under a
/// total limit, can there be one, so without a total limit new SYNs, a
/// flood's included, are spared the look-up almost always.
fn is_admitted_handshake(config: &KernelConfig, flow: &FlowKey, pending: *mut PendingState, epochs: &Epochs) -> bool {
    // SAFETY: a non-null `pending` points into a live map entry.
    let client_reserved =
        !pending.is_null() && Pending(unsafe { (*pending).reservations }).reserved(epochs.client) != 0;
    // Under a total limit, a handshake admitted in the last two (client)
    // epochs passes even once its shorter-lived total slot has expired: a
    // SYN-cookie ACK slower than the total epoch is judged when its
    // handshake completes, not refused at the ACK (which the flood the
    // short total epoch is there for would make likely).
    // SAFETY: entries are plain data.
    (client_reserved || config.max_conns_total != 0)
        && unsafe { HANDSHAKES.get(flow) }.is_some_and(|h| h.slots != 0 && is_live(h.epoch, epochs.client))
}

/// What [`admit`] decided. (Plain numbers: a returned tuple or enum with
/// data would be passed on the stack, which BPF calls cannot do.)
const ADMITTED: u32 = 0;
const OVER_CLIENT: u32 = 1;
const OVER_TOTAL: u32 = 2;

/// Reserves a slot for a new connection of `client` (limited to `limit`,
/// 0 = unlimited; `pending` is its handshake state, null if none could be
/// had) and one under the total limit: [`ADMITTED`], or which limit refuses
/// it. (Inlined: BPF calls take at most five arguments.)
#[inline(always)]
fn admit(
    config: &KernelConfig,
    flow: &FlowKey,
    client: &ClientKey,
    pending: *mut PendingState,
    limit: u32,
    now_ns: u64,
) -> u32 {
    if pending.is_null() {
        // No handshake state: admit, and judge the connection when it completes.
        return ADMITTED;
    }
    let epochs = Epochs::at(now_ns, config.epoch_ns);
    let epoch = epochs.client;
    // SAFETY: `pending` points into a live map entry.
    let generation = unsafe { (*pending).generation };
    let mut handshake = Handshake { client: *client, generation, epoch: 0, total_epoch: 0, slots: 0, _pad: 0 };
    if limit != 0 {
        // SAFETY: `pending` is non-null and points into a live map entry.
        let mut booked = unsafe { connlimit_reserve(pending, client, epoch, limit) };
        // At the limit: free another CPU's SYN that no listener took, if
        // there is one, and try once more.
        if booked == NOT_BOOKED && release_stale_syn(&epochs, now_ns) {
            // SAFETY: as above.
            booked = unsafe { connlimit_reserve(pending, client, epoch, limit) };
        }
        if booked == NOT_BOOKED {
            return OVER_CLIENT;
        }
        handshake.slots = SLOT_CLIENT;
        handshake.epoch = booked;
    }
    if config.max_conns_total != 0 {
        let booked = connlimit_reserve_total(epochs.total, config.max_conns_total);
        if booked == NOT_BOOKED {
            release_handshake(&handshake, pending, &epochs);
            return OVER_TOTAL;
        }
        handshake.slots |= SLOT_TOTAL;
        handshake.total_epoch = booked;
        if limit == 0 {
            // When it was admitted (see `is_admitted_handshake`).
            handshake.epoch = epoch;
        }
    }
    // NOEXIST: a copy of the same SYN on another CPU holds it already.
    if HANDSHAKES.insert(flow, handshake, BPF_NOEXIST as u64).is_ok() {
        if let Some(last) = LAST_SYN.get_ptr_mut(0) {
            // SAFETY: this CPU's value of a per-CPU array.
            unsafe { last.write(LastSyn { flow: *flow, unconfirmed: 1, at_ns: now_ns }) };
        }
    } else {
        release_handshake(&handshake, pending, &epochs);
    }
    ADMITTED
}

/// Refuses a SYN over a limit (`total`: the instance's total limit).
fn refuse(ctx: &SkLookupContext, config: &KernelConfig, pending: *mut PendingState, total: bool) -> u32 {
    // SAFETY: the kernel hands the program a valid context.
    let lookup = unsafe { &*ctx.lookup };
    if config.flags & FLAG_DRY_RUN != 0 {
        // Admitted without a reservation: sock_ops judges it when its
        // handshake completes, and records the would-be refusal then.
        return sk_action::SK_PASS;
    }
    if total {
        count(Stat::TotalRefused);
    }
    count_refusal(pending);
    count(Stat::Refused);
    // SAFETY: reading the union's pointer member, which the kernel sets.
    if !unsafe { lookup.__bindgen_anon_1.__bindgen_anon_1.sk }.is_null() {
        // An earlier program chose a socket: the kernel will ignore our drop.
        count(Stat::Steered);
    }
    if config.flags & FLAG_REFUSE_429 != 0 {
        // The responder's listener takes the connection and answers 429.
        // Its sockets are marked in `OWN_SOCKETS`, so nothing counts it.
        let index = if read_ctx(&lookup.family) == AF_INET { RESPONDER_V4 } else { RESPONDER_V6 };
        if RESPONDER.redirect_sk_lookup(ctx, index, 0).is_ok() {
            count(Stat::Responded);
            return sk_action::SK_PASS;
        }
        count(Stat::ResponderMissing);
    }
    sk_action::SK_DROP
}

/// Takes a slot for `client` in its handshake state `pending` if it holds
/// fewer than `limit`; returns the epoch it was booked in, or
/// [`NOT_BOOKED`].
///
/// Every admission (a SYN, or a handshake judged at completion) is this one
/// compare-and-swap on the reservations word, with the established count
/// read after the word: a completed handshake adds to `established` before
/// it gives its reservation back (which changes the word), so a decision
/// can overcount a connection for an instant, never miss one.
///
/// A global BPF function: the verifier checks it once, however many places
/// call it.
///
/// # Safety
/// `pending` is null or points into a live `PENDING` entry; `client` is null
/// or valid to read.
#[unsafe(no_mangle)]
#[inline(never)]
pub unsafe extern "C" fn connlimit_reserve(
    pending: *mut PendingState,
    client: *const ClientKey,
    epoch: u64,
    limit: u32,
) -> u64 {
    if pending.is_null() || client.is_null() {
        return NOT_BOOKED;
    }
    // A copy on the stack: Linux 6.1's verifier takes a map key from the
    // stack or a map value, not from a global function's pointer argument
    // (`R2 type=mem expected=fp, ...`; 6.12 takes it). Volatile, so the
    // compiler cannot hand the argument itself to the look-up.
    // SAFETY: see the function's contract.
    let client = unsafe { client.read_volatile() };
    // SAFETY: as above.
    compare_and_swap::<CAS_ATTEMPTS, _>(unsafe { &raw mut (*pending).reservations }, |w| {
        let held = established_count(&client).saturating_add(carried_count(&client));
        Pending(w).try_reserve(epoch, held, limit).map(|(p, booked)| (p.0, booked))
    })
    .unwrap_or(NOT_BOOKED)
}

/// What [`connlimit_reserve`] and [`connlimit_reserve_total`] return when
/// no slot was taken.
const NOT_BOOKED: u64 = u64::MAX;

/// Takes an instance-wide slot if the instance holds fewer than `limit`
/// connections; returns the epoch it was booked in, or [`NOT_BOOKED`]. A
/// global BPF function (see [`connlimit_reserve`]).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn connlimit_reserve_total(epoch: u64, limit: u32) -> u64 {
    let Some(total) = TOTAL.get_ptr_mut(0) else {
        return NOT_BOOKED;
    };
    // SAFETY: `total` points into a live map entry.
    compare_and_swap::<CAS_ATTEMPTS, _>(unsafe { &raw mut (*total).reservations }, |w| {
        // Read after the word, as in `connlimit_reserve`. SAFETY: as above;
        // an aligned 64-bit load is atomic on BPF.
        let established = unsafe { (&raw const (*total).established).read_volatile() }.min(u32::MAX as u64) as u32;
        Pending(w).try_reserve(epoch, established, limit).map(|(p, booked)| (p.0, booked))
    })
    .unwrap_or(NOT_BOOKED)
}

/// Gives back the slots a handshake holds (`pending`: its client's
/// handshake state, or null).
fn release_handshake(h: &Handshake, pending: *mut PendingState, epochs: &Epochs) {
    if h.slots & SLOT_CLIENT != 0 && is_booked_in(h, pending) {
        // SAFETY: `pending` points into a live map entry.
        compare_and_swap::<CAS_ATTEMPTS, _>(unsafe { &raw mut (*pending).reservations }, |w| {
            Some((Pending(w).release(epochs.client, h.epoch).0, ()))
        });
    }
    if h.slots & SLOT_TOTAL != 0 {
        connlimit_release_total(epochs.total, h.total_epoch);
    }
}

/// Whether `pending` is the handshake-state entry `h` was booked in (an
/// evicted entry took its reservations with it; a new one has another
/// generation).
fn is_booked_in(h: &Handshake, pending: *mut PendingState) -> bool {
    // SAFETY: a non-null `pending` points into a live map entry.
    !pending.is_null() && unsafe { (*pending).generation } == h.generation
}

/// Gives back an instance-wide reservation booked in epoch `booked`.
/// A global BPF function, checked once by the verifier (see
/// [`connlimit_reserve_total`]); returns 0.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn connlimit_release_total(epoch: u64, booked: u64) -> u64 {
    if let Some(total) = TOTAL.get_ptr_mut(0) {
        // SAFETY: `total` points into a live map entry.
        compare_and_swap::<CAS_ATTEMPTS, _>(unsafe { &raw mut (*total).reservations }, |w| {
            Some((Pending(w).release(epoch, booked).0, ()))
        });
    }
    0
}

/// Those of the slots of `handshake` booked in the last two epochs of
/// their kind.
fn live_slots(handshake: &Handshake, epochs: &Epochs) -> u32 {
    let client = if is_live(handshake.epoch, epochs.client) { SLOT_CLIENT } else { 0 };
    let total = if is_live(handshake.total_epoch, epochs.total) { SLOT_TOTAL } else { 0 };
    handshake.slots & (client | total)
}

/// The slots of `handshake` that still stand, or `None` when none does:
/// those booked in the last two epochs of their kind, a client slot only in
/// the client's current handshake state `pending`.
fn held_slots(handshake: &Handshake, pending: *mut PendingState, epochs: &Epochs) -> Option<Handshake> {
    let mut slots = live_slots(handshake, epochs);
    if !is_booked_in(handshake, pending) {
        slots &= !SLOT_CLIENT;
    }
    (slots != 0).then_some(Handshake { slots, ..*handshake })
}

/// Whether a connection of `client` (limited to `limit`) is judged at all:
/// neither exempt nor free of every limit.
fn is_judged(config: &KernelConfig, client: &ClientKey, limit: u32) -> bool {
    !client.is_exempt() && (limit != 0 || config.max_conns_total != 0)
}

/// Ends the handshake of `flow` and returns its reservation, if no one else
/// did first: whoever deletes the entry owns it.
fn claim_handshake(flow: &FlowKey) -> Option<Handshake> {
    // SAFETY: entries are plain data, copied out before the removal.
    let handshake = unsafe { HANDSHAKES.get(flow) }.copied()?;
    HANDSHAKES.remove(flow).is_ok().then_some(handshake)
}

/// Releases the reservation of a handshake no listener took.
fn release_unclaimed(flow: &FlowKey, epochs: &Epochs) {
    if let Some(h) = claim_handshake(flow) {
        release_handshake(&h, PENDING.get_ptr_mut(h.client).unwrap_or(core::ptr::null_mut()), epochs);
        count(Stat::Unconfirmed);
    }
}

/// The previous SYN this CPU admitted was not taken by a listener of the
/// guarded cgroup (or sock_ops would have confirmed it before this lookup):
/// it holds no slot.
fn release_unconfirmed_syn(epochs: &Epochs) {
    let Some(last) = LAST_SYN.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value of a per-CPU array.
    let last = unsafe { &mut *last };
    if last.unconfirmed != 0 {
        last.unconfirmed = 0;
        release_unclaimed(&last.flow, epochs);
    }
}

/// At the limit: releases one SYN another CPU admitted that no listener
/// took (each CPU's is normally released by its own next lookup); whether
/// there was one.
fn release_stale_syn(epochs: &Epochs, now_ns: u64) -> bool {
    let map = (&raw const LAST_SYN).cast_mut().cast();
    let key = 0u32;
    // The scan only finds; the release, with its compare-and-swap loop, runs
    // once after it, which keeps the program small for the verifier.
    let mut stale: Option<FlowKey> = None;
    for cpu in 0..MAX_CPUS {
        // SAFETY: a helper reading another CPU's value of our per-CPU array;
        // it returns null past the last CPU.
        let last = unsafe { bpf_map_lookup_percpu_elem(map, (&raw const key).cast(), cpu) }.cast::<LastSyn>();
        if last.is_null() {
            break;
        }
        // SAFETY: non-null pointers from the helper point at a map value.
        let last = unsafe { &mut *last };
        if last.unconfirmed != 0 && now_ns.saturating_sub(last.at_ns) > STALE_SYN_NS {
            last.unconfirmed = 0;
            stale = Some(last.flow);
            break;
        }
    }
    match stale {
        Some(flow) => {
            release_unclaimed(&flow, epochs);
            true
        }
        None => false,
    }
}

#[sock_ops]
pub fn connlimit_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_RWND_INIT => on_syn_taken(&ctx),
        // A listener's SYN-ACK carrying a SYN cookie (see `on_listen`).
        BPF_SOCK_OPS_HDR_OPT_LEN_CB if ctx.arg(0) & BPF_WRITE_HDR_TCP_SYNACK_COOKIE != 0 => on_syn_taken(&ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => on_listen(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// A socket of the cgroup started listening: ask to be called when it
/// sizes the options of its SYN-ACKs, so that its SYN-cookie SYN-ACKs are
/// seen.
///
/// A SYN answered with a cookie gets a request socket with no listener
/// attached (`inet_reqsk_alloc(.., !want_cookie)`), so the kernel runs no
/// cgroup program for it at `RWND_INIT` (`sk_to_full_sk` gives null); the
/// SYN-ACK's option callback runs the listener's programs explicitly
/// (`BPF_CGROUP_RUN_PROG_SOCK_OPS_SK`), and only for a listener with this
/// flag. Its accepted sockets inherit the flag: `on_established` clears it,
/// so that only SYN-ACKs call the program, never data segments.
///
/// Cost: one more run of this program per SYN-ACK a listener of the cgroup
/// sends (for one without a cookie, a test of the op and of `args[0]`; for
/// a cookie one, what `RWND_INIT` costs: a per-CPU look-up and a 40-byte
/// compare), and one more helper call per accepted connection.
fn on_listen(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
}

/// A listener of the cgroup took a SYN (it made a request socket, or sent a
/// SYN-ACK with a cookie): if it is the one this CPU just admitted, its
/// reservation stands. Both callbacks run in the SYN's own softirq, on the
/// CPU that looked it up, before any other lookup there.
fn on_syn_taken(ctx: &SockOpsContext) {
    let Some(last) = LAST_SYN.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's value of a per-CPU array.
    let last = unsafe { &mut *last };
    if last.unconfirmed != 0 && last.flow == socket_flow(ctx) {
        last.unconfirmed = 0;
    }
}

/// A server-side handshake completed on a socket of the cgroup.
fn on_established(ctx: &SockOpsContext) {
    // Inherited from its listener (see `on_listen`), and of no use here.
    let flags = ctx.cb_flags();
    if flags & BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG != 0 {
        let _ = ctx.set_cb_flags((flags & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG) as i32);
    }
    if !is_guarded(ctx.local_port()) {
        return;
    }
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    if config.flags & FLAG_REFUSE_429 != 0 && is_own(ctx) {
        return; // a refused client's connection to the 429 responder
    }
    // SAFETY: a helper taking the program's own context.
    if config.netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.ops.cast()) } != config.netns_cookie {
        return; // a socket of the cgroup in another network namespace
    }
    let flow = socket_flow(ctx);
    let epochs = Epochs::at(now_ns(), config.epoch_ns);
    let claimed = claim_handshake(&flow);
    let (key, limit) = client_key(config, &flow.client);
    // The key the handshake was booked under (normally the same) and its
    // handshake state, if a limit is in play.
    let mut client = claimed.map_or(key, |h| h.client);
    let books_client = claimed.is_some_and(|h| h.slots & SLOT_CLIENT != 0);
    let mut pending =
        if books_client || is_judged(config, &client, limit) { pending_state(&client) } else { core::ptr::null_mut() };
    let held = claimed.and_then(|h| held_slots(&h, pending, &epochs));
    if let Some(late) = claimed
        && held.is_none()
    {
        // A reservation that expired (the client held back its final ACK)
        // or whose handshake state was evicted no longer holds a slot: give
        // back what of it still stands.
        release_handshake(&late, pending, &epochs);
    }
    if held.is_none_or(|h| h.slots & SLOT_CLIENT == 0) && !client.same_as(&key) {
        // Without a client slot, the handshake is judged now, under its
        // current key, as a SYN would be.
        client = key;
        pending = if is_judged(config, &key, limit) { pending_state(&key) } else { core::ptr::null_mut() };
    }
    // The slots this connection takes: those its handshake holds, and for
    // each limit it holds none under, one taken now exactly as a SYN would
    // (so every admission goes through the same compare-and-swap).
    let mut slots = held.unwrap_or(Handshake { client, ..Handshake::default() });
    let (mut over, mut over_total) = (false, false);
    if slots.slots & SLOT_CLIENT == 0 && limit != 0 && !pending.is_null() {
        // SAFETY: `pending` is non-null and points into a live map entry.
        match unsafe { connlimit_reserve(pending, &client, epochs.client, limit) } {
            NOT_BOOKED => over = true,
            booked => {
                slots.slots |= SLOT_CLIENT;
                slots.epoch = booked;
                // SAFETY: `pending` points into a live map entry.
                slots.generation = unsafe { (*pending).generation };
            }
        }
    }
    if slots.slots & SLOT_TOTAL == 0 && config.max_conns_total != 0 && !client.is_exempt() {
        match connlimit_reserve_total(epochs.total, config.max_conns_total) {
            NOT_BOOKED => over_total = true,
            booked => {
                slots.slots |= SLOT_TOTAL;
                slots.total_epoch = booked;
            }
        }
    }
    let counted = count_connection(ctx, &client);
    if counted.is_ok() {
        add_total();
    }
    // Counted before released: a concurrent admission sees the slot taken
    // throughout (see `connlimit_reserve`).
    release_handshake(&slots, pending, &epochs);
    match counted {
        Ok(()) if !over && !over_total => count(Stat::Accepted),
        Ok(()) => {
            count(Stat::Accepted);
            if over_total {
                count(Stat::TotalRefused);
            }
            count_refusal(pending);
            if config.flags & FLAG_DRY_RUN != 0 {
                count(Stat::DryRunRefused);
            } else {
                end(ctx, &flow);
            }
        }
        Err(()) if config.flags & FLAG_FULL_CLOSED != 0 && !client.is_exempt() => end(ctx, &flow),
        Err(()) => {
            count(Stat::Untracked);
            warn!(ctx, "connlimit: a map is full; a connection is not counted");
        }
    }
}

/// One more connection of the instance (the total limit's count).
fn add_total() {
    if let Some(total) = TOTAL.get_ptr_mut(0) {
        // SAFETY: `total` points into a live map entry, 8-byte aligned.
        add(unsafe { &raw mut (*total).established }, 1);
    }
}

/// One connection of the instance fewer.
fn remove_total() {
    if let Some(total) = TOTAL.get_ptr_mut(0) {
        // Adding 2^64 - 1 subtracts one; every decrement follows its increment.
        // SAFETY: `total` points into a live map entry, 8-byte aligned.
        add(unsafe { &raw mut (*total).established }, u64::MAX);
    }
}

/// Counts a new connection of `client` and asks to see it close; an error
/// when it cannot be counted (`CLIENTS` is full, the socket's storage cannot
/// be had, or the client's entry kept being removed under us).
fn count_connection(ctx: &SockOpsContext, client: &ClientKey) -> Result<(), ()> {
    // Ask to hear of this socket's state changes, to see it close.
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32).map_err(|_| ())?;
    let state = socket_state(ctx, BPF_SK_STORAGE_GET_F_CREATE);
    if state.is_null() {
        return Err(());
    }
    // Marked before it is counted, and never counted twice. (The socket's
    // callbacks run one at a time, under its lock.)
    // SAFETY: `state` points into this socket's storage, 8-byte aligned.
    if unsafe { atomic::compare_exchange(&raw mut (*state).counted, 0, 1) }.is_err() {
        return Err(());
    }
    // SAFETY: as above.
    unsafe { (*state).client = *client };
    if !add_established(client) {
        // SAFETY: as above.
        unsafe { (*state).counted = 0 };
        return Err(());
    }
    Ok(())
}

/// One more established connection for `client`, in an entry made if it is
/// new; `false` when no entry can be had.
fn add_established(client: &ClientKey) -> bool {
    for _ in 0..ENTRY_ATTEMPTS {
        let state = match CLIENTS.get_ptr_mut(client) {
            Some(state) => state,
            None => {
                // Losing a race to create it is fine: the winner's entry is used.
                // SAFETY: a helper with no arguments.
                let fresh =
                    ClientState { established: established::fresh(unsafe { bpf_get_prandom_u32() }), accepted: 0 };
                let _ = CLIENTS.insert(client, fresh, BPF_NOEXIST as u64);
                let Some(state) = CLIENTS.get_ptr_mut(client) else {
                    return false;
                };
                state
            }
        };
        // SAFETY: `state` points into a live map entry.
        let word = unsafe { &raw mut (*state).established };
        let added = compare_and_swap::<CAS_ATTEMPTS, _>(word, |w| match established::increment(w) {
            Step::Write(next) => Some((next, true)),
            Step::Retired => Some((w, false)),
        });
        match added {
            Some(true) => {
                // SAFETY: as above.
                add(unsafe { &raw mut (*state).accepted }, 1);
                return true;
            }
            Some(false) => {} // the entry is being removed by the close of its last connection
            None => return false,
        }
    }
    false
}

/// One established connection fewer for `client`; the entry goes when its
/// count reaches zero.
fn remove_established(client: &ClientKey) {
    let Some(state) = CLIENTS.get_ptr_mut(client) else {
        return;
    };
    // SAFETY: `state` points into a live map entry that counts this
    // connection, so it cannot be retired or reused before this add.
    let word = unsafe { &raw mut (*state).established };
    let before = unsafe { atomic::fetch_add(word, established::DECREMENT) };
    // Retire the word only if nothing was added since, and only this
    // entry's word (its tag): then the removal cannot lose a count.
    if let Some((expected, retired)) = established::retirement(before)
        // SAFETY: as above; a failed exchange changes nothing.
        && unsafe { atomic::compare_exchange(word, expected, retired) }.is_ok()
    {
        let _ = CLIENTS.remove(client);
    }
}

/// Asks user space to end a connection the server must not hold.
fn end(ctx: &SockOpsContext, flow: &FlowKey) {
    count(Stat::Ended);
    let ending = Ending { cookie: socket_cookie(ctx), flow: *flow, _pad: 0 };
    if ENDINGS.output::<Ending>(&ending, 0).is_err() {
        count(Stat::EndingsLost);
    }
}

/// A socket of the cgroup reached TCP_CLOSE, by whatever path: FIN from
/// either side, RST, abort, timeout, or the move to TIME_WAIT.
fn on_close(ctx: &SockOpsContext) {
    let state = socket_state(ctx, 0);
    if state.is_null() {
        return;
    }
    // Whoever clears `counted` gives the slot back: exactly once.
    // SAFETY: `state` points into this socket's storage, 8-byte aligned.
    if unsafe { atomic::compare_exchange(&raw mut (*state).counted, 1, 0) }.is_ok() {
        // SAFETY: as above.
        remove_established(unsafe { &(*state).client });
        remove_total();
    }
}

/// The key `addr` is counted under (its own if exempt, else its group's)
/// and its limit: the one of the longest network prefix holding it, else
/// the instance's.
fn client_key(config: &KernelConfig, addr: &AddrWords) -> (ClientKey, u32) {
    if config.flags & FLAG_EXEMPT != 0 {
        match NETWORKS.get(Key::new(ExemptKey::FULL_LEN, ExemptKey::of(addr))) {
            Some(&0) => return (ClientKey::exempt(addr), 0),
            Some(&limit) => return (ClientKey::grouped(addr, config.ipv4_prefix_len, config.ipv6_prefix_len), limit),
            None => {}
        }
    }
    (ClientKey::grouped(addr, config.ipv4_prefix_len, config.ipv6_prefix_len), config.max_conns_per_client)
}

/// Established connections counted under `client`.
fn established_count(client: &ClientKey) -> u32 {
    CLIENTS.get_ptr(client).map_or(0, |state| {
        // SAFETY: `state` points into a live map entry; an aligned 64-bit
        // load is atomic on BPF.
        established::count(unsafe { (&raw const (*state).established).read_volatile() })
    })
}

/// Connections of `client` that user space counts for it (see `CARRIED`).
fn carried_count(client: &ClientKey) -> u32 {
    if CARRYING.get(0).is_none_or(|&n| n == 0) {
        return 0;
    }
    // SAFETY: entries are plain data.
    unsafe { CARRIED.get(client) }.copied().unwrap_or(0)
}

/// The client's handshake state, made if it is new; null if no entry can
/// be had.
fn pending_state(client: &ClientKey) -> *mut PendingState {
    if let Some(state) = PENDING.get_ptr_mut(client) {
        return state;
    }
    // SAFETY: a helper with no arguments.
    let fresh = PendingState { generation: unsafe { bpf_get_prandom_u32() }, ..PendingState::default() };
    let _ = PENDING.insert(client, fresh, BPF_NOEXIST as u64);
    PENDING.get_ptr_mut(client).unwrap_or(core::ptr::null_mut())
}

/// One more refusal of the client whose handshake state is `pending` (null:
/// none to count it in).
fn count_refusal(pending: *mut PendingState) {
    if !pending.is_null() {
        // SAFETY: `pending` points into a live map entry.
        add(unsafe { &raw mut (*pending).refused }, 1);
    }
}

/// The flow a lookup is for.
fn lookup_flow(lookup: &bpf_sk_lookup) -> FlowKey {
    // Every context field is read once, unconditionally: were the compiler
    // to pick the field by family, it would compute a context offset at run
    // time, which the verifier rejects.
    let (family, remote_port) = (read_ctx(&lookup.family), read_ctx(&lookup.remote_port));
    let (remote4, local4) = (read_ctx(&lookup.remote_ip4), read_ctx(&lookup.local_ip4));
    let (remote6, local6) = (read_ctx(&lookup.remote_ip6), read_ctx(&lookup.local_ip6));
    let (client, local) = if family == AF_INET { (v4_mapped(remote4), v4_mapped(local4)) } else { (remote6, local6) };
    FlowKey { client, local, client_port: u16::from_be(remote_port), local_port: lookup.local_port as u16 }
}

/// The flow of a socket (or request socket) sock_ops is called for.
fn socket_flow(ctx: &SockOpsContext) -> FlowKey {
    // SAFETY: the kernel hands the program a valid context.
    let ops: &bpf_sock_ops = unsafe { &*ctx.ops };
    // Read every field unconditionally (see `lookup_flow`).
    let (family, remote_port, local_port) =
        (read_ctx(&ops.family), read_ctx(&ops.remote_port), read_ctx(&ops.local_port));
    let (remote4, local4) = (read_ctx(&ops.remote_ip4), read_ctx(&ops.local_ip4));
    let (remote6, local6) = (read_ctx(&ops.remote_ip6), read_ctx(&ops.local_ip6));
    // A dual-stack socket of an IPv4 client holds the mapped form already.
    let (client, local) = if family == AF_INET { (v4_mapped(remote4), v4_mapped(local4)) } else { (remote6, local6) };
    // `remote_port` is big-endian in the low 16 bits of the word on some
    // kernels and shifted into the high 16 bits on others; the other half is
    // zero either way.
    FlowKey {
        client,
        local,
        client_port: u16::from_be(((remote_port >> 16) | (remote_port & 0xffff)) as u16),
        local_port: local_port as u16,
    }
}

/// The storage `SOCKETS` keeps on the socket sock_ops is called for, made
/// if `flags` says [`BPF_SK_STORAGE_GET_F_CREATE`]; null if there is none.
fn socket_state(ctx: &SockOpsContext, flags: u32) -> *mut SocketState {
    // SAFETY: the kernel hands the program a valid context.
    let sk = read_ctx(unsafe { &(*ctx.ops).__bindgen_anon_2.sk });
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    // SAFETY: a helper taking the context's socket and our storage map.
    unsafe {
        bpf_sk_storage_get((&raw const SOCKETS).cast_mut().cast(), sk.cast(), core::ptr::null_mut(), flags.into())
    }
    .cast()
}

/// Whether the socket sock_ops is called for is connlimit's own (see
/// `OWN_SOCKETS`).
fn is_own(ctx: &SockOpsContext) -> bool {
    // SAFETY: the kernel hands the program a valid context.
    let sk = read_ctx(unsafe { &(*ctx.ops).__bindgen_anon_2.sk });
    // SAFETY: a helper taking the context's socket and our storage map.
    !sk.is_null()
        && !unsafe {
            bpf_sk_storage_get((&raw const OWN_SOCKETS).cast_mut().cast(), sk.cast(), core::ptr::null_mut(), 0)
        }
        .is_null()
}

fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: a helper taking the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// A context field, read with one load exactly where the source reads it.
#[inline(always)]
fn read_ctx<T: Copy>(field: &T) -> T {
    // SAFETY: a reference is valid to read.
    unsafe { core::ptr::read_volatile(field) }
}

fn is_guarded(local_port: u32) -> bool {
    let (word, bit) = port_bit(local_port as u16);
    local_port < PORT_COUNT && PORTS.get(word).is_some_and(|&w| w & bit != 0)
}

/// Applies `f` to the 64-bit word at `word` atomically: `f` returns the new
/// value and a result, or `None` to leave the word alone. `None` also when
/// the word kept changing under us.
fn compare_and_swap<const ATTEMPTS: u32, T>(word: *mut u64, f: impl Fn(u64) -> Option<(u64, T)>) -> Option<T> {
    // SAFETY: callers pass pointers into live map entries, 8-byte aligned,
    // whose every writer goes through atomics. An aligned 64-bit load is
    // atomic on BPF; a stale value costs a retry.
    let mut seen = unsafe { word.read_volatile() };
    for _ in 0..ATTEMPTS {
        let (next, out) = f(seen)?;
        if next == seen {
            return Some(out);
        }
        // SAFETY: as above.
        match unsafe { atomic::compare_exchange(word, seen, next) } {
            Ok(()) => return Some(out),
            Err(actual) => seen = actual,
        }
    }
    None
}

/// Adds `n` to a counter in map memory.
fn add(counter: *mut u64, n: u64) {
    // SAFETY: callers pass pointers into live map entries, 8-byte aligned.
    unsafe { atomic::add(counter, n) }
}

fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        add(counter, 1);
    }
}

fn now_ns() -> u64 {
    // SAFETY: a helper with no arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// A socket storage map whose values a listener's accepted sockets inherit
/// (`BPF_F_CLONE`, which aya's `SkStorage` does not set): the BTF map
/// definition the loader reads, as aya lays it out.
#[repr(C)]
struct ClonedSkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholder pointers the loader reads as BTF, never dereferenced.
unsafe impl<T> Sync for ClonedSkStorage<T> {}

impl<T> ClonedSkStorage<T> {
    const fn new() -> Self {
        use core::ptr::null;
        Self { r#type: null(), key: null(), value: null(), max_entries: null(), map_flags: null() }
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

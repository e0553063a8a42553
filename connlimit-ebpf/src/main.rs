//! connlimit's kernel side: two small programs around shared maps.
//!
//! - `connlimit_lookup` (sk_lookup, per network namespace) runs when a packet
//!   for a guarded port finds no established socket: in practice a SYN. It
//!   reserves a slot for the client or, when the client is at its limit,
//!   returns `SK_DROP`, which makes the kernel answer the SYN with a RST.
//! - `connlimit_sock_ops` (sock_ops, per cgroup v2) sees the server's sockets:
//!   it turns the reservation into an established count when the handshake
//!   completes and gives the slot back, exactly once, when the socket closes.
//!
//! All arithmetic on a client's slots lives in `connlimit_common::occupancy`;
//! this file only wires kernel events to it.
// Built for the BPF target by connlimit-user's build script. On the host it
// builds as an empty program, so `cargo clippy --workspace` checks it too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

mod atomic;

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, sk_action,
    },
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{map, sk_lookup, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::{SkLookupContext, SockOpsContext},
};
use aya_log_ebpf::warn;
use connlimit_common::{
    addr::{AddrWords, client_key, v4_mapped},
    maps::{
        ClientKey, ClientState, FLAG_DRY_RUN, FLAG_EXEMPT, FlowKey, InstanceInfo, KernelConfig, PORT_COUNT,
        Reservation, Stat, capacity,
    },
    occupancy::{Occupancy, epoch_tag, is_live},
};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const TCP_CLOSE: u32 = 7;
/// Compare-and-swap retries on a client's word. Each failure means another
/// CPU's update went through, so this is only reached under a contention no
/// machine of a few dozen CPUs produces.
const CAS_ATTEMPTS: u32 = 64;

#[map]
static CONFIG: Array<KernelConfig> = Array::with_max_entries(1, 0);
#[map]
static PORTS: Array<u8> = Array::with_max_entries(PORT_COUNT, 0);
#[map]
static EXEMPT: LpmTrie<AddrWords, u8> = LpmTrie::with_max_entries(capacity::EXEMPT, BPF_F_NO_PREALLOC);
// LRU: the least recently seen client makes room (normally an idle one, whose
// entry is remade on its next SYN; see the README on capacities).
#[map]
static CLIENTS: LruHashMap<ClientKey, ClientState> = LruHashMap::with_max_entries(capacity::CLIENTS, 0);
// Direct-mapped by `FlowKey::slot`: no hashing helper, no lock, no
// allocation on the SYN path (see `Reservation` for why collisions are safe).
#[map]
static RESERVATIONS: Array<Reservation> = Array::with_max_entries(capacity::RESERVATIONS, 0);
// Not LRU: an entry here is the promise that the close will be counted.
// Keyed by socket cookie: unique per socket, and cheap to hash.
#[map]
static CONNS: HashMap<u64, ClientKey> = HashMap::with_max_entries(capacity::CONNS, BPF_F_NO_PREALLOC);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
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
    if config.max_conns_per_client == 0 {
        return sk_action::SK_PASS;
    }
    // Every context field is read once, unconditionally: were the compiler
    // to pick the field by family, it would compute a context offset at run
    // time, which the verifier rejects.
    let (family, remote_port) = (read(&lookup.family), read(&lookup.remote_port));
    let (remote4, local4) = (read(&lookup.remote_ip4), read(&lookup.local_ip4));
    let (remote6, local6) = (read(&lookup.remote_ip6), read(&lookup.local_ip6));
    let (client, local) = if family == AF_INET { (v4_mapped(remote4), v4_mapped(local4)) } else { (remote6, local6) };
    let flow = FlowKey { client, local, client_port: u16::from_be(remote_port), local_port: lookup.local_port as u16 };
    let now = epoch_tag(now_ns(), config.epoch_ns);

    // The context carries no TCP flags. A handshake admitted at its SYN comes
    // back here for its SYN-cookie ACK or a retransmitted SYN: let it through.
    let slot = flow.slot();
    if let Some(r) = RESERVATIONS.get(slot)
        && r.held != 0
        && r.flow == flow
        && is_live(r.tag, now)
    {
        return sk_action::SK_PASS;
    }
    if config.flags & FLAG_EXEMPT != 0 && EXEMPT.get(Key::new(128, flow.client)).is_some() {
        return sk_action::SK_PASS;
    }

    let client = ClientKey { addr: client_key(&flow.client, config.ipv4_prefix_len, config.ipv6_prefix_len) };
    let Some(state) = client_state(&client) else {
        count(Stat::Untracked);
        return sk_action::SK_PASS;
    };
    let limit = config.max_conns_per_client;
    if let Some(tag) = update(state, |o| o.try_reserve(now, limit)) {
        if let Some(r) = RESERVATIONS.get_ptr_mut(slot) {
            // SAFETY: `r` points into the array map's value memory.
            unsafe { r.write(Reservation { flow, client, tag, held: 1 }) };
        }
        return sk_action::SK_PASS;
    }

    // SAFETY: `state` points into a live map entry.
    add(unsafe { &raw mut (*state).refused }, 1);
    if config.flags & FLAG_DRY_RUN != 0 {
        count(Stat::DryRunRefused);
        return sk_action::SK_PASS;
    }
    count(Stat::Refused);
    // SAFETY: reading the union's pointer member, which the kernel sets.
    if !unsafe { lookup.__bindgen_anon_1.__bindgen_anon_1.sk }.is_null() {
        // An earlier program chose a socket: the kernel will ignore our drop.
        count(Stat::Steered);
    }
    sk_action::SK_DROP
}

#[sock_ops]
pub fn connlimit_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => on_established(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// A server-side handshake completed on a socket of the cgroup.
fn on_established(ctx: &SockOpsContext) {
    if !is_guarded(ctx.local_port()) {
        return;
    }
    let Some(config) = CONFIG.get(0) else {
        return;
    };
    let flow = socket_flow(ctx);
    // Claim the handshake's reservation, if its slot still holds it.
    let reservation = RESERVATIONS.get_ptr_mut(flow.slot()).and_then(|r| {
        // SAFETY: `r` points into the array map's value memory.
        let r = unsafe { &mut *r };
        (r.held != 0 && r.flow == flow).then(|| {
            r.held = 0;
            *r
        })
    });
    let client = match reservation {
        Some(r) => r.client,
        None => ClientKey { addr: client_key(&flow.client, config.ipv4_prefix_len, config.ipv6_prefix_len) },
    };
    let Some(state) = client_state(&client) else {
        return untracked(ctx);
    };
    let cookie = socket_cookie(ctx);
    // Ask to hear of this socket's state changes, to see it close.
    if ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32).is_err()
        || CONNS.insert(cookie, client, BPF_NOEXIST as u64).is_err()
    {
        return untracked(ctx);
    }
    let now = epoch_tag(now_ns(), config.epoch_ns);
    let tag = reservation.map(|r| r.tag);
    if update(state, |o| Some((o.establish(now, tag), ()))).is_none() {
        let _ = CONNS.remove(cookie);
        return untracked(ctx);
    }
    // SAFETY: `state` points into a live map entry.
    add(unsafe { &raw mut (*state).accepted }, 1);
    count(Stat::Accepted);
}

/// A socket of the cgroup reached TCP_CLOSE, by whatever path: FIN from
/// either side, RST, abort, timeout, or the move to TIME_WAIT.
fn on_close(ctx: &SockOpsContext) {
    let cookie = socket_cookie(ctx);
    // SAFETY: entries are plain data, copied out before the removal.
    let Some(client) = (unsafe { CONNS.get(cookie) }).copied() else {
        return;
    };
    // Whoever removes the entry gives the slot back: exactly once.
    if CONNS.remove(cookie).is_err() {
        return;
    }
    if let Some(state) = CLIENTS.get_ptr_mut(client) {
        update(state, |o| Some((o.close(), ())));
    }
}

fn untracked(ctx: &SockOpsContext) {
    count(Stat::Untracked);
    warn!(ctx, "connlimit: a map is full; a connection is not counted");
}

fn socket_flow(ctx: &SockOpsContext) -> FlowKey {
    // SAFETY: the kernel hands the program a valid context.
    let ops = unsafe { &*ctx.ops };
    // Read every field unconditionally (see `connlimit_lookup`).
    let (family, remote_port, local_port) = (read(&ops.family), read(&ops.remote_port), read(&ops.local_port));
    let (remote4, local4) = (read(&ops.remote_ip4), read(&ops.local_ip4));
    let (remote6, local6) = (read(&ops.remote_ip6), read(&ops.local_ip6));
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

fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: a helper taking the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.ops.cast()) }
}

/// A context field, read exactly where it is written in the source.
#[inline(always)]
fn read<T: Copy>(field: &T) -> T {
    // SAFETY: a reference is valid to read.
    unsafe { core::ptr::read_volatile(field) }
}

fn is_guarded(local_port: u32) -> bool {
    local_port < PORT_COUNT && PORTS.get(local_port).is_some_and(|&on| on != 0)
}

/// The client's entry, made if it is new.
fn client_state(client: &ClientKey) -> Option<*mut ClientState> {
    if let Some(state) = CLIENTS.get_ptr_mut(client) {
        return Some(state);
    }
    // Losing a race to create it is fine: the winner's entry is used.
    let _ = CLIENTS.insert(client, ClientState::default(), BPF_NOEXIST as u64);
    CLIENTS.get_ptr_mut(client)
}

/// Applies `f` to the client's occupancy word atomically; `None` if `f`
/// refuses or the word kept changing under us.
fn update<T>(state: *mut ClientState, f: impl Fn(Occupancy) -> Option<(Occupancy, T)>) -> Option<T> {
    // SAFETY: `state` points into a live map entry, 8-byte aligned; every
    // writer of this field goes through atomics.
    let word = unsafe { &raw mut (*state).occupancy };
    // An aligned 64-bit load is atomic on BPF; a stale value costs a retry.
    let mut seen = unsafe { word.read_volatile() };
    for _ in 0..CAS_ATTEMPTS {
        let (next, out) = f(Occupancy(seen))?;
        // SAFETY: as above.
        match unsafe { atomic::compare_exchange(word, seen, next.0) } {
            Ok(()) => return Some(out),
            Err(actual) => seen = actual,
        }
    }
    None
}

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

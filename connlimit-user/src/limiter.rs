//! The user-space limiter: go-connlimit's `Limiter`, in Rust.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use arc_swap::ArcSwap;
use connlimit_common::maps::Stat;

use crate::{Config, ConfigError, Error, PeerAddr};

/// Counts are split over this many independently locked maps, so threads
/// accepting different clients rarely wait for each other.
const SHARDS: usize = 64;

/// Limits concurrent connections per client IP inside one process.
///
/// Cheap to clone (clones share counts and configuration). Works on any OS;
/// on Linux, the eBPF limiter enforces the same
/// configuration in the kernel for servers that do not use this library.
///
/// ```
/// use connlimit::{Config, Limiter};
/// use std::net::IpAddr;
///
/// let limiter = Limiter::new(Config::new(2))?;
/// let client: IpAddr = "198.51.100.7".parse()?;
/// let a = limiter.accept(&client)?;
/// let _b = limiter.accept(&client)?;
/// assert!(limiter.accept(&client).unwrap_err().is_limit_reached());
/// drop(a); // closing a connection frees its slot
/// let _c = limiter.accept(&client)?;
/// assert_eq!(limiter.num_open(&client), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Default)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    config: ArcSwap<Config>,
    shards: Box<[Mutex<HashMap<Key, u32>>]>,
    shard_hasher: RandomState,
    /// Connections held across all clients, for the total limit.
    total: AtomicU32,
    accepted: AtomicU64,
    refused: AtomicU64,
    dry_run_refused: AtomicU64,
    total_refused: AtomicU64,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            config: ArcSwap::from_pointee(Config::default()),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            shard_hasher: RandomState::new(),
            total: AtomicU32::new(0),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            dry_run_refused: AtomicU64::new(0),
            total_refused: AtomicU64::new(0),
        }
    }
}

/// Totals since a limiter was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections admitted.
    pub accepted: u64,
    /// Connections refused.
    pub refused: u64,
    /// Connections over the limit that dry-run mode admitted.
    pub dry_run_refused: u64,
    /// Kernel limiter only: connections left uncounted because a map was
    /// full (they were admitted).
    pub untracked: u64,
    /// Kernel limiter only: refusals another sk_lookup program overrode by
    /// steering the connection to a socket.
    pub steered: u64,
    /// Kernel limiter only: connections ended right after their handshake,
    /// because it completed with no live reservation while the client was at
    /// its limit (or, with `WhenFull::Closed`, because a map was full).
    pub ended: u64,
    /// Kernel limiter only: reservations released because no listener of
    /// the guarded cgroup took their packet (nothing listening yet, stray
    /// packets, or a listener outside the cgroup).
    pub unconfirmed: u64,
    /// Kernel limiter only: connections to end that user space was not told
    /// of (the ring buffer was full).
    pub endings_lost: u64,
    /// Connections refused (or, in dry-run, that would have been) because
    /// the total limit was reached; also counted in `refused` (or
    /// `ended`, `dry_run_refused`).
    pub total_refused: u64,
    /// Kernel limiter only: refused connections answered with HTTP 429 by
    /// the responder (also in `refused`).
    pub responded: u64,
    /// Kernel limiter only: refusals that were to get a 429 but got a reset
    /// because no process held the responder.
    pub responder_missing: u64,
}

impl Stats {
    /// The figure of statistic `stat` (the table of every statistic, with
    /// names and meanings, is [`Stat::ALL`] and [`Stat::info`]).
    pub fn get(&self, stat: Stat) -> u64 {
        match stat {
            Stat::Accepted => self.accepted,
            Stat::Refused => self.refused,
            Stat::DryRunRefused => self.dry_run_refused,
            Stat::Untracked => self.untracked,
            Stat::Steered => self.steered,
            Stat::Ended => self.ended,
            Stat::Unconfirmed => self.unconfirmed,
            Stat::EndingsLost => self.endings_lost,
            Stat::TotalRefused => self.total_refused,
            Stat::Responded => self.responded,
            Stat::ResponderMissing => self.responder_missing,
        }
    }

    /// Sets the figure of statistic `stat`.
    pub fn set(&mut self, stat: Stat, value: u64) {
        *match stat {
            Stat::Accepted => &mut self.accepted,
            Stat::Refused => &mut self.refused,
            Stat::DryRunRefused => &mut self.dry_run_refused,
            Stat::Untracked => &mut self.untracked,
            Stat::Steered => &mut self.steered,
            Stat::Ended => &mut self.ended,
            Stat::Unconfirmed => &mut self.unconfirmed,
            Stat::EndingsLost => &mut self.endings_lost,
            Stat::TotalRefused => &mut self.total_refused,
            Stat::Responded => &mut self.responded,
            Stat::ResponderMissing => &mut self.responder_missing,
        } = value;
    }

    /// Every statistic with its field name, in [`Stat::ALL`]'s order.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Stat::ALL.into_iter().map(|stat| (stat.info().name, self.get(stat)))
    }
}

impl Limiter {
    /// A limiter enforcing `config`.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let limiter = Self::default();
        limiter.set_config(config)?;
        Ok(limiter)
    }

    /// Counts a new connection under its client and returns the [`Slot`] it
    /// holds, or [`Error::LimitReached`] when the client already holds its
    /// limit (the longest matching network limit, else the per-client one)
    /// or the limiter its [total limit](Config::max_conns_total). Over a
    /// limit nothing is counted.
    ///
    /// Exempt clients are counted under their own address, never refused,
    /// and never use up the allowance of the network they are in (as in the
    /// kernel limiter). In dry-run mode nobody is refused and
    /// [`Stats::dry_run_refused`] records who would have been.
    pub fn accept(&self, conn: &impl PeerAddr) -> Result<Slot, Error> {
        let ip = conn.peer_ip().map_err(Error::PeerAddr)?;
        let config = self.inner.config.load();
        let (limit, exempt) = config.limit_for(ip);
        let key = Key::of(&config, ip, exempt);
        let mut shard = self.inner.shard(key);
        let open = shard.get(&key).copied().unwrap_or(0);
        let over_client = limit > 0 && open >= limit && !exempt;
        // Taken under the shard lock, so the per-client and the total check
        // pass or fail together.
        let total = config.max_conns_total;
        let taken = self.inner.total.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            let over_total = total > 0 && n >= total && !exempt;
            (!over_client && !over_total).then_some(n + 1)
        });
        if taken.is_err() {
            let over_total = !over_client;
            if !config.dry_run {
                drop(shard);
                self.inner.refused.fetch_add(1, Ordering::Relaxed);
                if over_total {
                    self.inner.total_refused.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(client = %key.addr, over_total, "connection refused: at a limit");
                return Err(Error::LimitReached);
            }
            self.inner.total.fetch_add(1, Ordering::AcqRel);
            self.inner.dry_run_refused.fetch_add(1, Ordering::Relaxed);
            if over_total {
                self.inner.total_refused.fetch_add(1, Ordering::Relaxed);
            }
            tracing::debug!(client = %key.addr, over_total, "dry run: connection over a limit admitted");
        }
        *shard.entry(key).or_insert(0) += 1;
        drop(shard);
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { held: Some((self.inner.clone(), key)) })
    }

    /// Replaces the configuration atomically; readers never block. Lowering
    /// the limit closes nothing: it only refuses new connections until
    /// clients are back under it. Slots keep the key they were counted
    /// under, so changing prefix lengths never unbalances counts.
    pub fn set_config(&self, config: Config) -> Result<(), ConfigError> {
        config.validate()?;
        self.inner.config.store(Arc::new(config));
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// Connections currently counted under the client key of `peer` (its
    /// own address if it is exempt; 0 if its address cannot be read).
    pub fn num_open(&self, peer: &impl PeerAddr) -> u32 {
        let Ok(ip) = peer.peer_ip() else { return 0 };
        let config = self.inner.config.load();
        let key = Key::of(&config, ip, config.is_exempt(ip));
        self.inner.shard(key).get(&key).copied().unwrap_or(0)
    }

    /// Connections held now across all clients (what the total limit counts).
    pub fn total_open(&self) -> u32 {
        self.inner.total.load(Ordering::Acquire)
    }

    /// Every client key holding connections now, with its count, most first.
    pub fn clients(&self) -> Vec<(IpAddr, u32)> {
        let mut all: Vec<_> = self
            .inner
            .shards
            .iter()
            .flat_map(|s| lock(s).iter().map(|(k, v)| (k.addr, *v)).collect::<Vec<_>>())
            .collect();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        all
    }

    /// Totals since this limiter was made.
    pub fn stats(&self) -> Stats {
        Stats {
            accepted: self.inner.accepted.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
            dry_run_refused: self.inner.dry_run_refused.load(Ordering::Relaxed),
            total_refused: self.inner.total_refused.load(Ordering::Relaxed),
            ..Stats::default()
        }
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter").field("config", &self.config()).field("stats", &self.stats()).finish()
    }
}

/// What a connection is counted under: its group's key, or an exempt
/// client's own address (the flag keeps the two apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    addr: IpAddr,
    exempt: bool,
}

impl Key {
    fn of(config: &Config, ip: IpAddr, exempt: bool) -> Self {
        if exempt {
            Self { addr: crate::addr::canonical(ip), exempt: true }
        } else {
            Self { addr: config.client_key(ip), exempt: false }
        }
    }
}

impl Inner {
    fn shard(&self, key: Key) -> MutexGuard<'_, HashMap<Key, u32>> {
        let index = self.shard_hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shards[index])
    }

    fn release(&self, key: Key) {
        let mut shard = self.shard(key);
        if let Some(open) = shard.get_mut(&key) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            *open -= 1;
            if *open == 0 {
                // Clients with nothing open take no memory.
                shard.remove(&key);
            }
        }
    }
}

/// The critical sections cannot panic, so a poisoned lock still holds
/// consistent counts.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One connection's place in its client's count; dropping it frees the place.
///
/// The Rust form of go-connlimit's `free` function: [`free`](Slot::free) may
/// be called any number of times, and a slot that was never counted
/// ([`Slot::empty`]) frees nothing.
#[must_use = "dropping a Slot frees it at once"]
pub struct Slot {
    held: Option<(Arc<Inner>, Key)>,
}

impl Slot {
    /// A slot that holds nothing, for connections that were never counted.
    pub fn empty() -> Self {
        Self { held: None }
    }

    /// Gives the place back now. Later calls, and the drop, do nothing.
    pub fn free(&mut self) {
        if let Some((inner, key)) = self.held.take() {
            inner.release(key);
        }
    }

    /// The client key this slot is counted under, while it is held.
    pub fn client(&self) -> Option<IpAddr> {
        self.held.as_ref().map(|(_, key)| key.addr)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.free();
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").field("client", &self.client()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn zero_value_is_unlimited_but_counts() {
        let limiter = Limiter::default();
        let slots: Vec<_> = (0..1000).map(|_| limiter.accept(&ip("10.0.0.1")).unwrap()).collect();
        assert_eq!(limiter.num_open(&ip("10.0.0.1")), 1000);
        drop(slots);
        assert_eq!(limiter.num_open(&ip("10.0.0.1")), 0);
        assert!(limiter.clients().is_empty());
    }

    #[test]
    fn free_is_idempotent_and_empty_slots_free_nothing() {
        let limiter = Limiter::new(Config::new(2)).unwrap();
        let _keep = limiter.accept(&ip("10.0.0.1")).unwrap();
        let mut s = limiter.accept(&ip("10.0.0.1")).unwrap();
        s.free();
        s.free();
        drop(s);
        Slot::empty().free();
        assert_eq!(limiter.num_open(&ip("10.0.0.1")), 1);
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_client() {
        let limiter = Limiter::new(Config::new(1)).unwrap();
        let _a = limiter.accept(&ip("192.0.2.1")).unwrap();
        assert!(limiter.accept(&ip("::ffff:192.0.2.1")).unwrap_err().is_limit_reached());
        assert_eq!(limiter.num_open(&ip("::ffff:192.0.2.1")), 1);
    }

    #[test]
    fn prefix_grouping_and_live_prefix_change_stay_balanced() {
        let limiter = Limiter::new(Config::new(2).with_ipv6_prefix_len(64)).unwrap();
        let a = limiter.accept(&ip("2001:db8::1")).unwrap();
        let _b = limiter.accept(&ip("2001:db8::2")).unwrap();
        assert!(limiter.accept(&ip("2001:db8::3")).is_err(), "same /64");
        let _other = limiter.accept(&ip("2001:db8:0:1::1")).unwrap();
        limiter.set_config(Config::new(2)).unwrap();
        drop(a); // frees under the /64 key it was counted under
        assert_eq!(limiter.clients().iter().map(|c| c.1).sum::<u32>(), 2);
    }

    #[test]
    fn exempt_clients_are_counted_never_refused() {
        let limiter = Limiter::new(Config::new(1).with_exempt(["10.9.0.0/16".parse().unwrap()])).unwrap();
        let slots: Vec<_> = (0..5).map(|_| limiter.accept(&ip("10.9.1.1")).unwrap()).collect();
        assert_eq!(limiter.num_open(&ip("10.9.1.1")), 5);
        drop(slots);
    }

    #[test]
    fn exempt_clients_leave_their_network_its_allowance() {
        let config = Config::new(1).with_ipv4_prefix_len(24).with_exempt(["10.9.1.1".parse().unwrap()]);
        let limiter = Limiter::new(config).unwrap();
        let _lb: Vec<_> = (0..3).map(|_| limiter.accept(&ip("10.9.1.1")).unwrap()).collect();
        let neighbour = limiter.accept(&ip("10.9.1.2")).expect("the /24 still has its one slot");
        assert_eq!(neighbour.client(), Some(ip("10.9.1.0")));
        assert!(limiter.accept(&ip("10.9.1.3")).is_err());
        assert_eq!((limiter.num_open(&ip("10.9.1.1")), limiter.num_open(&ip("10.9.1.2"))), (3, 1));
    }

    #[test]
    fn dry_run_admits_and_reports() {
        let limiter = Limiter::new(Config::new(1).with_dry_run(true)).unwrap();
        let _a = limiter.accept(&ip("10.0.0.1")).unwrap();
        let _b = limiter.accept(&ip("10.0.0.1")).unwrap();
        assert_eq!(limiter.stats(), Stats { accepted: 2, dry_run_refused: 1, ..Stats::default() });
    }

    #[test]
    fn lowering_the_limit_closes_nothing() {
        let limiter = Limiter::new(Config::new(3)).unwrap();
        let held: Vec<_> = (0..3).map(|_| limiter.accept(&ip("10.0.0.1")).unwrap()).collect();
        limiter.set_config(Config::new(1)).unwrap();
        assert_eq!(limiter.num_open(&ip("10.0.0.1")), 3);
        assert!(limiter.accept(&ip("10.0.0.1")).is_err());
        drop(held);
        assert!(limiter.accept(&ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn a_rejected_config_changes_nothing() {
        let limiter = Limiter::new(Config::new(3)).unwrap();
        assert!(limiter.set_config(Config::new(3).with_ipv4_prefix_len(40)).is_err());
        assert_eq!(*limiter.config(), Config::new(3));
    }

    #[test]
    fn concurrent_accept_and_free_return_to_zero() {
        let limiter = Limiter::new(Config::new(4)).unwrap();
        std::thread::scope(|s| {
            for t in 0..8 {
                let limiter = &limiter;
                s.spawn(move || {
                    for i in 0..5_000u32 {
                        let client = IpAddr::from([10, 0, (t % 2) as u8, (i % 7) as u8]);
                        if let Ok(slot) = limiter.accept(&client) {
                            assert!(limiter.num_open(&client) <= 4);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(limiter.clients().is_empty(), "{:?}", limiter.clients());
    }

    #[derive(Clone, Debug)]
    enum Op {
        Accept(u8),
        Free(usize),
        SetLimit(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u8..6).prop_map(Op::Accept),
            4 => any::<usize>().prop_map(Op::Free),
            1 => (0u32..5).prop_map(Op::SetLimit),
        ]
    }

    proptest! {
        /// Any sequence of accepts, frees (some repeated) and limit changes
        /// leaves the limiter's counts equal to a plain model's.
        #[test]
        fn counts_match_a_model(ops in prop::collection::vec(op(), 0..200)) {
            let limiter = Limiter::new(Config::new(2)).unwrap();
            let mut limit = 2u32;
            let mut slots: Vec<(u8, Slot)> = Vec::new();
            let mut model: HashMap<u8, u32> = HashMap::new();
            for op in ops {
                match op {
                    Op::Accept(c) => {
                        let open = model.get(&c).copied().unwrap_or(0);
                        let want = limit == 0 || open < limit;
                        match limiter.accept(&IpAddr::from([10, 0, 0, c])) {
                            Ok(slot) => { prop_assert!(want); *model.entry(c).or_default() += 1; slots.push((c, slot)); }
                            Err(e) => { prop_assert!(!want); prop_assert!(e.is_limit_reached()); }
                        }
                    }
                    Op::Free(i) if !slots.is_empty() => {
                        let i = i % slots.len();
                        let c = slots[i].0;
                        slots[i].1.free();
                        slots[i].1.free();
                        drop(slots.remove(i));
                        let n = model.get_mut(&c).unwrap();
                        *n -= 1;
                        if *n == 0 { model.remove(&c); }
                    }
                    Op::Free(_) => {}
                    Op::SetLimit(l) => { limit = l; limiter.set_config(Config::new(l)).unwrap(); }
                }
                let mut seen: Vec<(u8, u32)> = limiter.clients().into_iter().map(|(ip, n)| match ip {
                    IpAddr::V4(v4) => (v4.octets()[3], n),
                    IpAddr::V6(_) => unreachable!(),
                }).collect();
                seen.sort();
                let mut want: Vec<(u8, u32)> = model.iter().map(|(k, v)| (*k, *v)).collect();
                want.sort();
                prop_assert_eq!(seen, want);
            }
        }
    }
}

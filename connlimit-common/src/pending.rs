//! A client's admitted, not yet established handshakes, in one atomic word.
//!
//! The kernel admits a connection at its SYN, but sees it established only
//! one round trip later. To stay exact under a burst of parallel SYNs, the
//! lookup program *reserves* a slot for every SYN it admits, and checks
//! `established + reserved < limit` with one compare-and-swap on this word,
//! so two CPUs can never both take the last slot.
//!
//! A reservation whose handshake never completes (a spoofed SYN, a client
//! that gave up) must not hold its slot forever, and nothing in the kernel
//! says that it failed. So reservations are kept in two buckets by *epoch*
//! (a fixed slice of the monotonic clock): the current epoch and the one
//! before. When the word is next touched in a later epoch, older buckets are
//! dropped, so a reservation is released at the latest two epochs after its
//! SYN, with no timer and no sweeper. (A handshake that completes later than
//! that is judged again when it completes: see the README's threat model.)
//!
//! The word records the *whole* epoch number, not a wrapping tag: with an
//! epoch of at least [`MIN_EPOCH_NS`], every value of a 64-bit nanosecond
//! clock has an epoch number below 2^[`EPOCH_BITS`], so no two epochs ever
//! alias, however long a word sits idle.
//!
//! Layout, low bits first: epoch number (42 bits), reservations booked in
//! that epoch (11 bits), reservations booked in the epoch before (11 bits).

/// Bits of the epoch number kept in the word.
pub const EPOCH_BITS: u32 = 42;
/// The shortest epoch: `u64::MAX / MIN_EPOCH_NS < 2^EPOCH_BITS`, so the
/// epoch number of any clock value fits the word (4.2 ms).
pub const MIN_EPOCH_NS: u64 = 1 << (64 - EPOCH_BITS);
/// The longest epoch user space accepts (a reservation is held for up to two).
pub const MAX_EPOCH_NS: u64 = 60_000_000_000;
/// Most handshakes one client key can have in flight per epoch.
pub const MAX_RESERVED_PER_EPOCH: u32 = (1 << BUCKET_BITS) - 1;

const BUCKET_BITS: u32 = 11;
const CUR_SHIFT: u32 = EPOCH_BITS;
const PREV_SHIFT: u32 = CUR_SHIFT + BUCKET_BITS;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
const BUCKET_MASK: u64 = (1 << BUCKET_BITS) - 1;

/// The epoch number of a moment: `now_ns / epoch_ns`. An epoch shorter than
/// [`MIN_EPOCH_NS`] (user space never writes one) is taken as that minimum.
#[inline(always)]
pub const fn epoch_of(now_ns: u64, epoch_ns: u64) -> u64 {
    let epoch_ns = if epoch_ns < MIN_EPOCH_NS { MIN_EPOCH_NS } else { epoch_ns };
    now_ns / epoch_ns
}

/// The total limit's reservations live this fraction of the epoch (an
/// epoch of their own, at least [`MIN_EPOCH_NS`]). Nothing tells a SYN
/// spoofed from a random address from a new client's before its handshake
/// completes, so a flood holds up to rate × 2 × (total epoch) instance-wide
/// slots: at the default 1 s epoch, 6,000 SYNs a second hold at most 750
/// (62.5 ms each), where the whole epoch let them hold the total. A
/// handshake slower than that is judged again when it completes, exactly
/// (an over-limit one is then ended rather than refused). It also lets the
/// one word take 16 times as many honest new connections a second.
pub const TOTAL_EPOCH_DIVISOR: u64 = 16;

/// The epoch numbers of one moment: the clients' epoch and the total
/// limit's shorter one (see [`TOTAL_EPOCH_DIVISOR`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Epochs {
    /// For a client key's reservations.
    pub client: u64,
    /// For the total limit's reservations.
    pub total: u64,
}

impl Epochs {
    /// The epochs of `now_ns` under an epoch of `epoch_ns`.
    #[inline(always)]
    pub const fn at(now_ns: u64, epoch_ns: u64) -> Self {
        Self { client: epoch_of(now_ns, epoch_ns), total: epoch_of(now_ns, epoch_ns / TOTAL_EPOCH_DIVISOR) }
    }
}

/// Whether a reservation booked in epoch `booked` is still held in epoch
/// `now`. A booking "ahead" of `now` was made by a CPU that read the clock a
/// moment later: still held.
#[inline(always)]
pub const fn is_live(booked: u64, now: u64) -> bool {
    now <= booked || now - booked <= 1
}

/// The packed reservations word of one client key (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Pending(pub u64);

impl Pending {
    #[inline(always)]
    const fn pack(epoch: u64, cur: u32, prev: u32) -> Self {
        Self((epoch & EPOCH_MASK) | (cur as u64) << CUR_SHIFT | (prev as u64) << PREV_SHIFT)
    }

    /// The epoch the current bucket belongs to.
    #[inline(always)]
    pub const fn epoch(self) -> u64 {
        self.0 & EPOCH_MASK
    }

    #[inline(always)]
    const fn cur(self) -> u32 {
        ((self.0 >> CUR_SHIFT) & BUCKET_MASK) as u32
    }

    #[inline(always)]
    const fn prev(self) -> u32 {
        ((self.0 >> PREV_SHIFT) & BUCKET_MASK) as u32
    }

    /// The same reservations as seen in epoch `now`: buckets older than the
    /// previous epoch are released.
    #[inline(always)]
    pub const fn at(self, now: u64) -> Self {
        let epoch = self.epoch();
        if now <= epoch {
            // Same epoch, or `now` was read just before another CPU moved the
            // word into the next one: nothing to release.
            self
        } else if now - epoch == 1 {
            Self::pack(now, 0, self.cur())
        } else {
            Self::pack(now, 0, 0)
        }
    }

    /// Reservations still held in epoch `now`.
    #[inline(always)]
    pub const fn reserved(self, now: u64) -> u32 {
        let p = self.at(now);
        p.cur() + p.prev()
    }

    /// Takes a slot for a new handshake if the client holds fewer than
    /// `limit` (its `established` connections plus its live reservations).
    /// Returns the new word and the epoch the reservation was booked in (to
    /// hand back to [`release`](Self::release)), or `None` at the limit.
    #[inline(always)]
    pub const fn try_reserve(self, now: u64, established: u32, limit: u32) -> Option<(Self, u64)> {
        let p = self.at(now);
        let reserved = p.cur() + p.prev();
        if established >= limit || reserved >= limit - established || p.cur() >= MAX_RESERVED_PER_EPOCH {
            return None;
        }
        Some((Self::pack(p.epoch(), p.cur() + 1, p.prev()), p.epoch()))
    }

    /// Gives back a reservation booked in epoch `booked`, if it is still
    /// held: its handshake completed (and is now counted as established),
    /// or is known to have failed.
    #[inline(always)]
    pub const fn release(self, now: u64, booked: u64) -> Self {
        let p = self.at(now);
        let (mut cur, mut prev) = (p.cur(), p.prev());
        if booked == p.epoch() && cur > 0 {
            cur -= 1;
        } else if booked + 1 == p.epoch() && prev > 0 {
            prev -= 1;
        }
        Self::pack(p.epoch(), cur, prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reserve_up_to_the_limit_then_refuse() {
        let mut p = Pending::default();
        for _ in 0..7 {
            p = p.try_reserve(5, 3, 10).expect("below the limit").0;
        }
        assert_eq!(p.reserved(5), 7);
        assert!(p.try_reserve(5, 3, 10).is_none());
        assert!(Pending::default().try_reserve(5, 10, 10).is_none());
        assert!(Pending::default().try_reserve(5, 11, 10).is_none(), "over the limit (lowered) refuses");
    }

    #[test]
    fn releasing_gives_the_slot_back() {
        let (p, booked) = Pending::default().try_reserve(7, 0, 1).unwrap();
        assert!(p.try_reserve(7, 0, 1).is_none());
        let p = p.release(7, booked);
        assert_eq!(p.reserved(7), 0);
        assert_eq!(p.release(7, booked), p, "a second release gives nothing back");
    }

    #[test]
    fn reservations_expire_within_two_epochs() {
        let (p, _) = Pending::default().try_reserve(100, 0, 1).unwrap();
        assert_eq!(p.reserved(101), 1, "still held in the next epoch");
        assert_eq!(p.reserved(102), 0, "released two epochs later");
        assert!(p.try_reserve(102, 0, 1).is_some());
    }

    #[test]
    fn a_late_release_takes_nothing_from_newer_bookings() {
        let (p, old) = Pending::default().try_reserve(1, 0, 5).unwrap();
        let (p, _) = p.try_reserve(3, 0, 5).unwrap();
        assert_eq!(p.release(3, old).reserved(3), 1);
    }

    #[test]
    fn a_cpu_reading_the_previous_epoch_releases_nothing() {
        let (p, _) = Pending::default().try_reserve(9, 0, 3).unwrap();
        let (p, booked) = p.try_reserve(8, 0, 3).unwrap();
        assert_eq!((booked, p.reserved(9)), (9, 2));
    }

    /// The bug this layout fixes: with a 16-bit tag, a word idle for more
    /// than half the tag's cycle looked like it was booked in the future
    /// and was never released.
    #[test]
    fn no_epoch_aliases_at_any_clock_value() {
        let epoch_ns = MIN_EPOCH_NS;
        let late = epoch_of(u64::MAX, epoch_ns);
        assert!(late < 1 << EPOCH_BITS);
        let (p, _) = Pending::default().try_reserve(late, 0, 1).unwrap();
        assert_eq!(p.epoch(), late);
        assert_eq!(p.reserved(late), 1);
        // A fresh word (epoch 0) is 2^42 - 1 epochs behind: empty.
        assert!(Pending::default().try_reserve(late, 0, 1).is_some());
        for idle in [2u64, 1 << 15, (1 << 15) + 1, 1 << 16, (1 << 16) + 1, 1 << 32, (1 << 41) + 7] {
            let (p, _) = Pending::default().try_reserve(3, 0, 1).unwrap();
            assert_eq!(p.reserved(3 + idle), 0, "idle for {idle} epochs");
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Reserve,
        Release(usize),
        Establish,
        Close,
        /// The clock moves by this many nanoseconds.
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Reserve),
            3 => (0usize..64).prop_map(Op::Release),
            1 => Just(Op::Establish),
            2 => Just(Op::Close),
            2 => prop_oneof![
                0u64..2_000_000_000,
                // Idle gaps past any 16- or 32-bit tag cycle, and huge ones.
                (1u64 << 16)..(1u64 << 50),
                any::<u64>().prop_map(|n| n >> 2),
            ]
            .prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a model that keeps every reservation with its booking
        /// epoch: from any start on the 64-bit clock, with any epoch length
        /// user space accepts and any gaps, the word holds exactly the
        /// model's live reservations and never admits past the limit.
        #[test]
        fn matches_a_model(
            start in any::<u64>(),
            epoch_ns in MIN_EPOCH_NS..=MAX_EPOCH_NS,
            limit in 1u32..20,
            ops in prop::collection::vec(op(), 0..200),
        ) {
            let mut word = Pending::default();
            let mut clock = start;
            let mut established = 0u32;
            let mut booked: std::vec::Vec<u64> = std::vec::Vec::new();
            for op in ops {
                let now = epoch_of(clock, epoch_ns);
                prop_assert!(now < 1 << EPOCH_BITS);
                booked.retain(|&b| is_live(b, now));
                match op {
                    Op::Reserve => {
                        let model_ok = established + (booked.len() as u32) < limit;
                        match word.try_reserve(now, established, limit) {
                            Some((next, epoch)) => {
                                prop_assert!(model_ok);
                                prop_assert_eq!(epoch, now);
                                booked.push(epoch);
                                word = next;
                            }
                            None => prop_assert!(!model_ok),
                        }
                    }
                    Op::Release(i) if !booked.is_empty() => {
                        let b = booked.remove(i % booked.len());
                        word = word.release(now, b);
                        established += 1;
                    }
                    Op::Release(_) | Op::Establish => established += 1,
                    Op::Close => established = established.saturating_sub(1),
                    Op::Advance(ns) => clock = clock.saturating_add(ns),
                }
                let now = epoch_of(clock, epoch_ns);
                let live = booked.iter().filter(|&&b| is_live(b, now)).count() as u32;
                prop_assert_eq!(word.reserved(now), live);
            }
        }
    }
}

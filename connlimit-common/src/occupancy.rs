//! A client's open connections and in-flight reservations, in one atomic word.
//!
//! The kernel admits a connection at its SYN, but counts it as established
//! only one round trip later. To stay exact under a burst of parallel SYNs,
//! the lookup program *reserves* a slot for every SYN it admits, and the limit
//! is checked against `established + reserved` with a single compare-and-swap
//! on this word, so two CPUs can never both take the last slot.
//!
//! A reservation whose handshake never completes (a spoofed SYN, a client that
//! gave up) must not hold its slot forever, and nothing in the kernel tells us
//! it failed. So reservations are kept in two buckets by *epoch* (a fixed
//! time slice, the reservation timeout): the current epoch and the one
//! before. When the word is next touched in a later epoch, older buckets are
//! dropped. A reservation is therefore released at the latest two epochs
//! after it was made, without any timer or user-space sweeper.
//!
//! Layout, low bits first: epoch tag (16 bits, the current bucket's epoch
//! modulo 2^16), reservations in the tag's epoch (14 bits), reservations in
//! the epoch before it (14 bits), established connections (20 bits).

/// Most established connections one client key can hold in the kernel.
pub const MAX_ESTABLISHED: u32 = (1 << EST_BITS) - 1;
/// Most reservations one client key can take within one epoch.
pub const MAX_RESERVED_PER_EPOCH: u32 = (1 << BUCKET_BITS) - 1;

const TAG_BITS: u32 = 16;
const BUCKET_BITS: u32 = 14;
const EST_BITS: u32 = 20;
const CUR_SHIFT: u32 = TAG_BITS;
const PREV_SHIFT: u32 = CUR_SHIFT + BUCKET_BITS;
const EST_SHIFT: u32 = PREV_SHIFT + BUCKET_BITS;
const BUCKET_MASK: u64 = (1 << BUCKET_BITS) - 1;

/// The packed occupancy word of one client key (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(transparent)]
pub struct Occupancy(pub u64);

/// The epoch tag of a moment: `now_ns / epoch_ns`, modulo 2^16.
#[inline(always)]
pub const fn epoch_tag(now_ns: u64, epoch_ns: u64) -> u16 {
    // An epoch of 0 would divide by zero; treat it as the smallest epoch.
    let epoch_ns = if epoch_ns == 0 { 1 } else { epoch_ns };
    (now_ns / epoch_ns) as u16
}

/// Whether a reservation booked under epoch `tag` is still held in epoch `now`.
#[inline(always)]
pub const fn is_live(tag: u16, now: u16) -> bool {
    let age = now.wrapping_sub(tag);
    // A tag "ahead" of `now` was booked by a CPU that read the clock a moment later.
    age <= 1 || age >= 0x8000
}

impl Occupancy {
    #[inline(always)]
    const fn pack(tag: u16, cur: u32, prev: u32, established: u32) -> Self {
        Self(tag as u64 | (cur as u64) << CUR_SHIFT | (prev as u64) << PREV_SHIFT | (established as u64) << EST_SHIFT)
    }

    #[inline(always)]
    const fn tag(self) -> u16 {
        self.0 as u16
    }

    #[inline(always)]
    const fn cur(self) -> u32 {
        ((self.0 >> CUR_SHIFT) & BUCKET_MASK) as u32
    }

    #[inline(always)]
    const fn prev(self) -> u32 {
        ((self.0 >> PREV_SHIFT) & BUCKET_MASK) as u32
    }

    /// Established connections.
    #[inline(always)]
    pub const fn established(self) -> u32 {
        (self.0 >> EST_SHIFT) as u32
    }

    /// The same occupancy as seen in epoch `now`: buckets older than the
    /// previous epoch are released.
    #[inline(always)]
    pub const fn at(self, now: u16) -> Self {
        let age = now.wrapping_sub(self.tag());
        if age == 0 || age >= 0x8000 {
            // Same epoch, or `now` was read just before another CPU moved the
            // word into the next epoch: nothing to release.
            self
        } else if age == 1 {
            Self::pack(now, 0, self.cur(), self.established())
        } else {
            Self::pack(now, 0, 0, self.established())
        }
    }

    /// Reservations still held in epoch `now`.
    #[inline(always)]
    pub const fn reserved(self, now: u16) -> u32 {
        let o = self.at(now);
        o.cur() + o.prev()
    }

    /// Slots held in epoch `now`: established connections plus reservations.
    #[inline(always)]
    pub const fn held(self, now: u16) -> u32 {
        self.established() + self.reserved(now)
    }

    /// Takes one slot for a new connection if fewer than `limit` are held.
    /// Returns the new word and the epoch tag the reservation was booked
    /// under (to hand back to [`establish`](Self::establish)), or `None` when
    /// the client is at its limit.
    #[inline(always)]
    pub const fn try_reserve(self, now: u16, limit: u32) -> Option<(Self, u16)> {
        let o = self.at(now);
        let held = o.established() + o.cur() + o.prev();
        if held >= limit || o.cur() >= MAX_RESERVED_PER_EPOCH || held >= MAX_ESTABLISHED {
            return None;
        }
        Some((Self::pack(o.tag(), o.cur() + 1, o.prev(), o.established()), o.tag()))
    }

    /// A handshake completed: counts the connection as established and, if
    /// it was admitted with a reservation booked under `reserved` that is
    /// still held, turns that reservation into the connection's slot.
    #[inline(always)]
    pub const fn establish(self, now: u16, reserved: Option<u16>) -> Self {
        let o = self.at(now);
        let (mut cur, mut prev) = (o.cur(), o.prev());
        if let Some(tag) = reserved {
            if tag == o.tag() && cur > 0 {
                cur -= 1;
            } else if tag == o.tag().wrapping_sub(1) && prev > 0 {
                prev -= 1;
            }
        }
        let est = o.established();
        let est = if est < MAX_ESTABLISHED { est + 1 } else { est };
        Self::pack(o.tag(), cur, prev, est)
    }

    /// An established connection closed.
    #[inline(always)]
    pub const fn close(self) -> Self {
        let est = self.established();
        let est = if est > 0 { est - 1 } else { 0 };
        Self::pack(self.tag(), self.cur(), self.prev(), est)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reserve_up_to_the_limit_then_refuse() {
        let mut o = Occupancy::default();
        for _ in 0..10 {
            o = o.try_reserve(5, 10).expect("below the limit").0;
        }
        assert_eq!(o.held(5), 10);
        assert!(o.try_reserve(5, 10).is_none());
    }

    #[test]
    fn establishing_moves_a_reservation_into_established() {
        let (o, tag) = Occupancy::default().try_reserve(7, 1).unwrap();
        let o = o.establish(7, Some(tag));
        assert_eq!((o.established(), o.reserved(7)), (1, 0));
        // Still at the limit: the reservation became the connection's slot.
        assert!(o.try_reserve(7, 1).is_none());
        assert_eq!(o.close().held(7), 0);
    }

    #[test]
    fn reservations_expire_within_two_epochs() {
        let (o, _) = Occupancy::default().try_reserve(100, 1).unwrap();
        assert_eq!(o.reserved(101), 1, "still held in the next epoch");
        assert_eq!(o.reserved(102), 0, "released two epochs later");
        assert!(o.try_reserve(102, 1).is_some());
    }

    #[test]
    fn a_late_handshake_counts_without_double_freeing() {
        let (o, tag) = Occupancy::default().try_reserve(1, 5).unwrap();
        let (o, _) = o.try_reserve(3, 5).unwrap(); // a newer reservation, epoch 3
        let o = o.establish(3, Some(tag)); // epoch-1 reservation already expired
        assert_eq!((o.established(), o.reserved(3)), (1, 1));
    }

    #[test]
    fn a_cpu_reading_the_previous_epoch_releases_nothing() {
        let (o, _) = Occupancy::default().try_reserve(9, 3).unwrap();
        let (o, tag) = o.try_reserve(8, 3).unwrap();
        assert_eq!((tag, o.reserved(9)), (9, 2));
    }

    #[test]
    fn epoch_tags_wrap() {
        let (o, tag) = Occupancy::default().try_reserve(u16::MAX, 2).unwrap();
        assert_eq!(o.reserved(0), 1);
        assert_eq!(o.establish(0, Some(tag)).reserved(0), 0);
        assert_eq!(epoch_tag(3_500, 1_000), 3);
        assert_eq!(epoch_tag(5, 0), 5);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Reserve,
        Establish(usize),
        EstablishUnreserved,
        Close,
        Tick,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Reserve),
            3 => (0usize..64).prop_map(Op::Establish),
            1 => Just(Op::EstablishUnreserved),
            3 => Just(Op::Close),
            1 => Just(Op::Tick),
        ]
    }

    proptest! {
        /// Against a model that keeps every reservation with its epoch:
        /// the word holds exactly the model's established count and live
        /// reservations, and never admits past the limit.
        #[test]
        fn matches_a_model(limit in 1u32..20, ops in prop::collection::vec(op(), 0..300)) {
            let mut word = Occupancy::default();
            let mut now: u16 = 0;
            let mut established = 0u32;
            let mut reservations: std::vec::Vec<u16> = std::vec::Vec::new();
            for op in ops {
                // Reservations older than the previous epoch are gone.
                reservations.retain(|&t| now.wrapping_sub(t) <= 1);
                match op {
                    Op::Reserve => {
                        let model_ok = established + (reservations.len() as u32) < limit;
                        match word.try_reserve(now, limit) {
                            Some((next, tag)) => {
                                prop_assert!(model_ok);
                                prop_assert_eq!(tag, now);
                                reservations.push(tag);
                                word = next;
                            }
                            None => prop_assert!(!model_ok),
                        }
                    }
                    Op::Establish(i) if !reservations.is_empty() => {
                        let tag = reservations.remove(i % reservations.len());
                        word = word.establish(now, Some(tag));
                        established += 1;
                    }
                    Op::Establish(_) | Op::EstablishUnreserved => {
                        word = word.establish(now, None);
                        established += 1;
                    }
                    Op::Close => {
                        word = word.close();
                        established = established.saturating_sub(1);
                    }
                    Op::Tick => now = now.wrapping_add(1),
                }
                prop_assert_eq!(word.established(), established);
                let live = reservations.iter().filter(|&&t| now.wrapping_sub(t) <= 1).count() as u32;
                prop_assert_eq!(word.reserved(now), live);
            }
        }
    }
}

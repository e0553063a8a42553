//! A client key's established connections, in one atomic word that can be
//! retired.
//!
//! `CLIENTS` entries exist only while their key holds connections: the close
//! that takes a count to zero removes the entry, so the map holds live counts
//! only and nothing else can fill it. Removing must never lose a concurrent
//! increment, so the remover first *retires* the word (zero → [`RETIRED`])
//! with a compare-and-swap; an increment that finds the word retired waits
//! for the removal and makes a fresh entry instead.
//!
//! Each entry's word carries a random *tag*, set when the entry is made:
//! the memory of a removed entry can be reused at once for another key, and
//! a compare-and-swap that expects this entry's tag can never act on that
//! other key's word. A decrement needs no compare-and-swap at all: the
//! connection it releases keeps the count at one or more until then.
//!
//! Layout, low bits first: count (32 bits), tag (31 bits), retired (1 bit).

/// Set in a word whose entry is being removed: it counts nothing any more.
pub const RETIRED: u64 = 1 << 63;
const TAG_SHIFT: u32 = 32;
const TAG_MASK: u64 = ((1 << 31) - 1) << TAG_SHIFT;

/// What a compare-and-swap on the word should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write this value.
    Write(u64),
    /// The entry is being removed: make a new one and try again.
    Retired,
}

/// The word of a new entry: no connections, tagged with `random`.
#[inline(always)]
pub const fn fresh(random: u32) -> u64 {
    // Never zero, so a fresh word is never mistaken for an untagged one.
    ((random as u64) << TAG_SHIFT | 1 << TAG_SHIFT) & TAG_MASK
}

/// Connections counted in `word` (a retired word counts none).
#[inline(always)]
pub const fn count(word: u64) -> u32 {
    if word & RETIRED != 0 { 0 } else { word as u32 }
}

/// One more connection.
#[inline(always)]
pub const fn increment(word: u64) -> Step {
    if word & RETIRED != 0 {
        Step::Retired
    } else if word as u32 == u32::MAX {
        Step::Write(word)
    } else {
        Step::Write(word + 1)
    }
}

/// What to add to a word, atomically, to release one connection it counts.
pub const DECREMENT: u64 = u64::MAX;

/// After a decrement that returned `before`: the compare-and-swap that
/// retires the word if that was its last connection, as `(expected, new)`.
/// It fails (leaving the entry in place) if a connection was added since,
/// or if the memory now belongs to another entry (another tag).
#[inline(always)]
pub const fn retirement(before: u64) -> Option<(u64, u64)> {
    if count(before) == 1 {
        let tag = before & TAG_MASK;
        Some((tag, tag | RETIRED))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_and_down_and_retires_only_its_own_empty_word() {
        let mut w = fresh(0x1234_5678);
        assert_eq!(count(w), 0);
        for _ in 0..3 {
            let Step::Write(next) = increment(w) else { panic!("live word") };
            w = next;
        }
        assert_eq!(count(w), 3);
        for left in [2, 1] {
            assert_eq!(retirement(w), None);
            w = w.wrapping_add(DECREMENT);
            assert_eq!(count(w), left);
        }
        let (expected, new) = retirement(w).expect("the last connection");
        w = w.wrapping_add(DECREMENT);
        assert_eq!(w, expected, "the emptied word is what the retirement expects");
        assert_eq!((count(new), increment(new)), (0, Step::Retired));
        assert_ne!(expected, fresh(0x0bad_cafe), "another entry's empty word does not match");
        assert_eq!(increment(u32::MAX as u64 | fresh(1)), Step::Write(u32::MAX as u64 | fresh(1)), "saturates");
        assert_ne!(fresh(0), 0);
    }
}

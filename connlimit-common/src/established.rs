//! A client key's established connections, in one atomic word that can be
//! retired.
//!
//! `CLIENTS` entries exist only while their key holds connections: the close
//! that takes a count to zero removes the entry, so the map holds live counts
//! only and nothing else can fill it. Removing must never lose a concurrent
//! increment, so the remover first *retires* the word (zero → [`RETIRED`])
//! with a compare-and-swap; an increment that finds the word retired waits
//! for the removal and makes a fresh entry instead.

/// Set in a word whose entry is being removed: it counts nothing any more.
pub const RETIRED: u64 = 1 << 63;

/// What a compare-and-swap on the word should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Write this value.
    Write(u64),
    /// The entry is being removed: make a new one and try again.
    Retired,
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

/// One connection fewer; never below zero, never touching a retired word.
#[inline(always)]
pub const fn decrement(word: u64) -> u64 {
    if word & RETIRED != 0 || word == 0 { word } else { word - 1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_and_down_and_stays_retired() {
        let mut w = 0;
        for _ in 0..3 {
            let Step::Write(next) = increment(w) else { panic!("live word") };
            w = next;
        }
        assert_eq!(count(w), 3);
        for _ in 0..5 {
            w = decrement(w);
        }
        assert_eq!((w, count(w)), (0, 0));
        assert_eq!(increment(RETIRED), Step::Retired);
        assert_eq!(decrement(RETIRED), RETIRED);
        assert_eq!(count(RETIRED), 0);
        assert_eq!(increment(u32::MAX as u64), Step::Write(u32::MAX as u64), "saturates");
    }
}

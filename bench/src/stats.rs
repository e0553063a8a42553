//! Summaries of repeated measurements: medians, and how far the median of
//! a few noisy repetitions can be trusted.

use std::fmt;

/// The confidence the report's intervals aim for (at least).
pub const CONFIDENCE: f64 = 0.9;

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

/// The median of per-repetition ratios, with a distribution-free
/// confidence interval for it.
#[derive(Debug, Clone, Copy)]
pub struct Ratio {
    pub median: f64,
    pub low: f64,
    pub high: f64,
}

impl Ratio {
    /// Of the per-repetition ratios `a[i] / b[i]`.
    pub fn of(a: &[f64], b: &[f64]) -> Self {
        debug_assert_eq!(a.len(), b.len(), "ratios pair repetitions");
        let mut r: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
        r.sort_by(f64::total_cmp);
        let (low, high) = match interval_rank(r.len()) {
            Some(k) => (r[k - 1], r[r.len() - k]),
            None => (f64::NAN, f64::NAN),
        };
        Ratio { median: median(r), low, high }
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No interval (too few repetitions, a failed one), or none worth
        // printing (a reference row against itself).
        if self.low.is_nan() || self.high.is_nan() || self.low == self.high {
            write!(f, "{:.3}×", self.median)
        } else {
            write!(f, "{:.3}× ({:.2}–{:.2})", self.median, self.low, self.high)
        }
    }
}

/// What the report's intervals are, for `reps` repetitions.
pub fn intervals_explained(reps: usize) -> String {
    match interval_rank(reps) {
        Some(k) => format!(
            "Every ratio is the median of per-repetition ratios; in brackets, the {o}smallest and the {o}largest of \
             them: an interval that holds the true median ratio with {:.1} % confidence, assuming independent, \
             identically distributed repetitions and nothing about their distribution (order statistics). A target \
             inside the interval is not resolved by the run; and of this report's many intervals, about one in {:.0} \
             is expected to miss.",
            coverage(reps, k) * 100.0,
            1.0 / (1.0 - coverage(reps, k)),
            o = ordinal(k),
        ),
        None => format!(
            "Every ratio is the median of per-repetition ratios; {reps} repetitions are too few to bound it with \
             {:.0} % confidence ({} are enough).",
            CONFIDENCE * 100.0,
            (1..).find(|&n| interval_rank(n).is_some()).unwrap_or(0),
        ),
    }
}

/// "", "2nd ", "3rd ", "11th "…: which order statistic bounds an interval.
fn ordinal(k: usize) -> String {
    let suffix = match (k % 10, k % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    if k == 1 { String::new() } else { format!("{k}{suffix} ") }
}

/// The largest `k` for which the `k`-th smallest and the `k`-th largest of
/// `n` independent repetitions bound their population's median with at
/// least [`CONFIDENCE`]: each repetition falls below the median with
/// probability ½, so the interval misses it with probability
/// 2·P(Binomial(n, ½) < k). `None` when even the whole range falls short.
pub fn interval_rank(n: usize) -> Option<usize> {
    (1..=n.div_ceil(2)).take_while(|&k| coverage(n, k) >= CONFIDENCE).last()
}

/// The probability that `[x(k), x(n+1-k)]` holds the median.
pub fn coverage(n: usize, k: usize) -> f64 {
    let below: f64 = (0..k).map(|i| binomial(n, i)).sum::<f64>() / 2f64.powi(n as i32);
    1.0 - 2.0 * below
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_repetitions_give_their_range_at_94_per_cent() {
        assert_eq!(interval_rank(5), Some(1));
        assert!((coverage(5, 1) - 0.9375).abs() < 1e-12);
    }

    #[test]
    fn more_repetitions_narrow_the_interval() {
        // 10: the 2nd smallest to the 2nd largest (97.9 %); the 3rd pair
        // would cover only 89 %.
        assert_eq!(interval_rank(10), Some(2));
        assert!(coverage(10, 3) < CONFIDENCE);
        assert_eq!(interval_rank(20), Some(6));
    }

    #[test]
    fn too_few_repetitions_give_no_interval() {
        // Three repetitions bracket the median only 75 % of the time.
        assert_eq!(interval_rank(3), None);
        assert_eq!(interval_rank(0), None);
        let r = Ratio::of(&[1.0, 2.0, 3.0], &[1.0, 1.0, 1.0]);
        assert_eq!(r.median, 2.0);
        assert_eq!(r.to_string(), "2.000×");
    }

    #[test]
    fn the_report_names_the_order_statistic() {
        assert!(intervals_explained(5).contains("the smallest and the largest of them"));
        assert!(intervals_explained(5).contains("93.8 % confidence"));
        assert!(intervals_explained(10).contains("the 2nd smallest and the 2nd largest"));
        assert!(intervals_explained(4).contains("(5 are enough)"));
        assert_eq!([21, 22, 23, 11, 112].map(ordinal), ["21st ", "22nd ", "23rd ", "11th ", "112th "]);
    }

    #[test]
    fn ratios_pair_repetitions() {
        let r = Ratio::of(&[9.0, 10.0, 12.0, 8.0, 10.0], &[10.0, 10.0, 10.0, 10.0, 10.0]);
        assert_eq!((r.median, r.low, r.high), (1.0, 0.8, 1.2));
        assert_eq!(r.to_string(), "1.000× (0.80–1.20)");
        // A reference against itself needs no interval.
        let same = [3.0, 4.0, 5.0, 6.0, 7.0];
        assert_eq!(Ratio::of(&same, &same).to_string(), "1.000×");
    }
}

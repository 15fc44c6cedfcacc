//! Means over documents with percentile-bootstrap 95% confidence intervals (seeded, so reports are
//! reproducible), and the number of documents behind each.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A mean with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Mean over documents.
    pub mean: f64,
    /// 2.5th percentile of the bootstrap means.
    pub ci_low: f64,
    /// 97.5th percentile of the bootstrap means.
    pub ci_high: f64,
    /// Documents.
    pub n: usize,
}

/// Resamples used for the interval.
pub const BOOTSTRAP_SAMPLES: usize = 2000;

/// Mean of `values` with a 95% percentile-bootstrap interval from `BOOTSTRAP_SAMPLES` resamples seeded by `seed`.
pub fn bootstrap_mean(values: &[f64], seed: u64) -> Estimate {
    let n = values.len();
    if n == 0 {
        return Estimate {
            mean: f64::NAN,
            ci_low: f64::NAN,
            ci_high: f64::NAN,
            n,
        };
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..BOOTSTRAP_SAMPLES)
        .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| {
        means[((q * (BOOTSTRAP_SAMPLES - 1) as f64).round() as usize).min(BOOTSTRAP_SAMPLES - 1)]
    };
    Estimate {
        mean,
        ci_low: at(0.025),
        ci_high: at(0.975),
        n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_scores_have_a_point_interval() {
        let e = bootstrap_mean(&[0.75; 8], 1);
        assert_eq!((e.mean, e.ci_low, e.ci_high, e.n), (0.75, 0.75, 0.75, 8));
    }

    #[test]
    fn interval_brackets_the_mean_narrows_with_n_and_is_reproducible() {
        let five: Vec<f64> = [1.0, 0.0, 1.0, 1.0, 0.0].to_vec();
        let e5 = bootstrap_mean(&five, 7);
        assert_eq!(e5.mean, 0.6);
        assert!(e5.ci_low < 0.6 && e5.ci_high > 0.6);
        assert_eq!(e5, bootstrap_mean(&five, 7));
        let many: Vec<f64> = five.iter().cycle().take(500).copied().collect();
        let e500 = bootstrap_mean(&many, 7);
        assert!(
            e500.ci_high - e500.ci_low < (e5.ci_high - e5.ci_low) / 4.0,
            "{e5:?} {e500:?}"
        );
        // Five documents cannot separate 0.6 from 0.4: the interval is wide (the reference's 5-document trap).
        assert!(e5.ci_low <= 0.4);
    }

    #[test]
    fn empty_is_nan_with_zero_n() {
        let e = bootstrap_mean(&[], 0);
        assert!(e.mean.is_nan() && e.n == 0);
    }
}

//! Choosing the next token from logits, in the order transformers' logits processors apply:
//! repetition penalty -> temperature -> top-k -> top-p -> softmax -> draw. Temperature 0 is greedy.
//! The random stream is ChaCha8 seeded by the request, so a seed reproduces a generation exactly. The choice itself
//! is [`medvl_kernels::reference::sample`], which a decode plan's sampling kernel computes on the device from the
//! same draws.

use medvl_kernels::reference;
pub use medvl_kernels::reference::argmax;
use medvl_kernels::sample::RowSampling;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// > 1 discourages tokens already in the sequence (CTRL-style, as transformers: logit / p if positive,
    /// > logit * p if negative); 1 disables it.
    pub repetition_penalty: f32,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        self.row().check().map_err(EngineError::Request)
    }

    /// The parameters as a decode plan's sampling kernel takes them (without the seed).
    pub fn row(&self) -> RowSampling {
        RowSampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
        }
    }

    /// True when the choice is a plain argmax of the raw logits (no state, no host-side processing needed).
    pub fn is_plain_greedy(&self) -> bool {
        self.row().is_plain_greedy()
    }
}

/// A sampler with its random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler seeded with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits` is modified in place; `history` is every token of the sequence so far
    /// (prompt included, as transformers' repetition penalty uses). One uniform draw when the temperature is
    /// above 0, none when greedy.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let row = self.params.row();
        let draw = if row.draws() { self.rng.random() } else { 0.0 };
        reference::sample(logits, &row, history, draw)
    }

    /// The next `n` draws [`Self::sample`] would use, taken from the stream (none for a greedy sampler, which
    /// draws nothing): a decode plan that samples on the device takes them at admission.
    pub fn take_draws(&mut self, n: usize) -> Vec<f64> {
        if self.params.row().draws() {
            (0..n).map(|_| self.rng.random()).collect()
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
        }
    }

    fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(p).unwrap();
        (0..n)
            .map(|_| s.sample(&mut logits.to_vec(), &[]))
            .collect()
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.5, -1.0, 2.9];

    #[test]
    fn greedy_is_argmax_with_first_tie() {
        assert_eq!(draws(SamplingParams::default(), &LOGITS, 3), vec![1, 1, 1]);
        assert_eq!(argmax(&[0.5, 2.0, 2.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let a = draws(params(1.0, 0, 1.0, 7), &LOGITS, 64);
        assert_eq!(a, draws(params(1.0, 0, 1.0, 7), &LOGITS, 64));
        assert_ne!(a, draws(params(1.0, 0, 1.0, 8), &LOGITS, 64));
        // With temperature 1 every token with real mass shows up in 64 draws.
        for t in [0, 1, 2, 4] {
            assert!(a.contains(&t), "{t} never drawn in {a:?}");
        }
    }

    #[test]
    fn top_k_one_is_greedy() {
        assert!(
            draws(params(1.5, 1, 1.0, 3), &LOGITS, 50)
                .iter()
                .all(|&t| t == 1)
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        // Probabilities (T=1) of ids 1, 4, 2 are 0.375, 0.339, 0.228: the first two hold 0.715 < 0.75,
        // so top_p 0.75 keeps {1, 4, 2} and top_p 0.6 keeps {1, 4}.
        let kept = |top_p| {
            let mut d = draws(params(1.0, 0, top_p, 11), &LOGITS, 400);
            d.sort_unstable();
            d.dedup();
            d
        };
        assert_eq!(kept(0.75), vec![1, 2, 4]);
        assert_eq!(kept(0.6), vec![1, 4]);
        assert_eq!(kept(0.1), vec![1]);
    }

    #[test]
    fn repetition_penalty_as_transformers() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        let mut logits = vec![1.0, 3.0, 2.5, -1.0, 2.9];
        // Token 1 seen: 3.0 / 2 = 1.5; token 3 seen: -1 * 2 = -2; the greedy pick moves to id 4.
        assert_eq!(s.sample(&mut logits, &[1, 3, 1]), 4);
        assert_eq!(logits, vec![1.0, 1.5, 2.5, -2.0, 2.9]);
    }

    #[test]
    fn invalid_params_are_named() {
        let err = Sampler::new(params(-1.0, 0, 1.0, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("temperature"), "{err}");
        let err = Sampler::new(params(1.0, 0, 0.0, 0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("top_p"), "{err}");
    }
}

//! Choosing the next token from logits, in the order transformers' logits processors apply:
//! repetition penalty -> temperature -> top-k -> top-p -> softmax -> draw. Temperature 0 is greedy.
//! The random stream is ChaCha8 seeded by the request, so a seed reproduces a generation exactly.

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
        let bad = |what: String| Err(EngineError::Request(what));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// True when the choice is a plain argmax of the raw logits (no state, no host-side processing needed).
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && self.repetition_penalty == 1.0
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
    /// (prompt included, as transformers' repetition penalty uses).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for &t in &seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 {
                        *l * p.repetition_penalty
                    } else {
                        *l / p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, highest first (ties by id, so the order is deterministic).
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            order.truncate(p.top_k);
        }
        let max = logits[order[0]] / p.temperature;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| f64::from(logits[i] / p.temperature - max).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|&q| {
                    mass += q;
                    mass >= f64::from(p.top_p)
                })
                .map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let draw: f64 = self.rng.random();
        let mut acc = 0.0;
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if draw < acc {
                return order[i] as u32;
            }
        }
        order[probs.len() - 1] as u32
    }
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
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

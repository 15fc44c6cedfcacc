//! Greedy generation through the engine equals transformers' `generate(do_sample=False)` for 32 new tokens on
//! three prompts (one image, two images, text only) of the tiny reference model (`fixtures/generate.py`).

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{cases, fixtures};
use medvl_engine::{Engine, GenerateParams};
use medvl_model::backend::Cpu;

#[test]
fn greedy_32_tokens_equal_transformers() {
    let engine = Engine::<Cpu>::load(&fixtures().join("hub"), Default::default()).unwrap();
    // transformers generated with eos_token_id=None: all 32 tokens, whatever they are.
    let params = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(32)
    };
    for case in cases() {
        assert_eq!(case.expected.len(), 32);
        let out = engine
            .generate_ids(&case.prompt, &case.images, &params, |_| {})
            .unwrap();
        assert_eq!(out.token_ids, case.expected, "{}", case.name);
        assert_eq!(out.prompt_tokens, case.prompt.len());
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_top_k_1_is_greedy() {
    let engine = Engine::<Cpu>::load(&fixtures().join("hub"), Default::default()).unwrap();
    let text_only = cases().into_iter().find(|c| c.name == "text_only").unwrap();
    let sampled = |temperature, top_k, seed| {
        let mut params = GenerateParams {
            ignore_eos: true,
            ..GenerateParams::greedy(12)
        };
        params.sampling.temperature = temperature;
        params.sampling.top_k = top_k;
        params.sampling.seed = seed;
        engine
            .generate_ids(&text_only.prompt, &[], &params, |_| {})
            .unwrap()
            .token_ids
    };
    assert_eq!(sampled(1.0, 0, 5), sampled(1.0, 0, 5));
    assert_ne!(sampled(1.0, 0, 5), sampled(1.0, 0, 6));
    assert_eq!(sampled(0.8, 1, 9), text_only.expected[..12].to_vec());
}

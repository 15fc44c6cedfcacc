//! Greedy generation through the engine equals transformers' `generate(do_sample=False)` for 32 new tokens on
//! three prompts (one image, two images, text only) of the tiny reference model (`fixtures/generate.py`).

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};

use medvl_engine::{Engine, GenerateParams};
use medvl_model::backend::Cpu;
use medvl_model::image::{ProcessorConfig, preprocess_bytes};
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny")
}

fn ids(st: &SafeTensors<'_>, name: &str) -> Vec<u32> {
    let view = st.tensor(name).unwrap();
    view.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

#[test]
fn greedy_32_tokens_equal_transformers() {
    let engine = Engine::<Cpu>::load(&fixtures().join("hub"), Default::default()).unwrap();
    let processor = ProcessorConfig::from_model_dir(&fixtures().join("hub")).unwrap();
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let image = |name: &str| {
        preprocess_bytes(&std::fs::read(fixtures().join(name)).unwrap(), &processor).unwrap()
    };
    // transformers generated with eos_token_id=None: all 32 tokens, whatever they are.
    let params = GenerateParams {
        ignore_eos: true,
        ..GenerateParams::greedy(32)
    };
    for (case, images) in [
        ("one_image", vec![image("page.png")]),
        ("two_images", vec![image("page.png"), image("stamp.png")]),
        ("text_only", vec![]),
    ] {
        let prompt = ids(&st, &format!("{case}.input_ids"));
        let expected = ids(&st, &format!("{case}.greedy"));
        assert_eq!(expected.len(), 32);
        let out = engine
            .generate_ids(&prompt, &images, &params, |_| {})
            .unwrap();
        assert_eq!(out.token_ids, expected, "{case}");
        assert_eq!(out.prompt_tokens, prompt.len());
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_top_k_1_is_greedy() {
    let engine = Engine::<Cpu>::load(&fixtures().join("hub"), Default::default()).unwrap();
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let prompt = ids(&st, "text_only.input_ids");
    let sampled = |temperature, top_k, seed| {
        let mut params = GenerateParams {
            ignore_eos: true,
            ..GenerateParams::greedy(12)
        };
        params.sampling.temperature = temperature;
        params.sampling.top_k = top_k;
        params.sampling.seed = seed;
        engine
            .generate_ids(&prompt, &[], &params, |_| {})
            .unwrap()
            .token_ids
    };
    assert_eq!(sampled(1.0, 0, 5), sampled(1.0, 0, 5));
    assert_ne!(sampled(1.0, 0, 5), sampled(1.0, 0, 6));
    assert_eq!(
        sampled(0.8, 1, 9),
        ids(&st, "text_only.greedy")[..12].to_vec()
    );
}

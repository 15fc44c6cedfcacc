//! NF4 through the model: the tiny reference model's logits equal transformers + bitsandbytes NF4 (double quant,
//! f32 compute, CPU backend; `fixtures/nf4.py`), both when loading the checkpoint bitsandbytes saved
//! (`fixtures/tiny/nf4-bnb`) and when quantizing the f32 checkpoint while loading it.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};

use medvl_model::backend::Cpu;
use medvl_model::image::{ProcessorConfig, preprocess_bytes};
use medvl_model::layers::LinearWeight;
use medvl_model::{PixelValues, QuantizeOptions, QwenVl, load_dir, load_dir_with};
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn ids(st: &SafeTensors<'_>, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

fn quantized_linears(model: &QwenVl<Cpu>) -> (usize, usize) {
    let mut linears = vec![&model.visual.merger.fc1, &model.visual.merger.fc2];
    for b in &model.visual.blocks {
        linears.extend([
            &b.attn.qkv,
            &b.attn.proj,
            &b.mlp.gate_proj,
            &b.mlp.up_proj,
            &b.mlp.down_proj,
        ]);
    }
    for l in &model.text.layers {
        let a = &l.self_attn;
        linears.extend([
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &l.mlp.gate_proj,
            &l.mlp.up_proj,
            &l.mlp.down_proj,
        ]);
    }
    let nf4 = linears
        .iter()
        .filter(|l| matches!(l.weight, LinearWeight::Nf4(_)))
        .count();
    (nf4, linears.len())
}

/// Max |a - b| / max |b| of every prompt's logits against bitsandbytes'.
fn logits_error(model: &QwenVl<Cpu>) -> f32 {
    let device = Default::default();
    let ref_bytes = std::fs::read(fixtures().join("tiny/reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&ref_bytes).unwrap();
    let bnb_bytes = std::fs::read(fixtures().join("nf4/tiny_logits.safetensors")).unwrap();
    let bnb = SafeTensors::deserialize(&bnb_bytes).unwrap();
    let processor = ProcessorConfig::from_model_dir(&fixtures().join("tiny/hub")).unwrap();
    let image = |n: &str| -> PixelValues {
        preprocess_bytes(
            &std::fs::read(fixtures().join(format!("tiny/{n}.png"))).unwrap(),
            &processor,
        )
        .unwrap()
    };
    let mut worst = 0.0f32;
    for (case, images) in [
        ("one_image", vec![image("page")]),
        ("two_images", vec![image("page"), image("stamp")]),
        ("text_only", vec![]),
    ] {
        let prompt = ids(&reference, &format!("{case}.input_ids"));
        let mut cache = model.new_cache();
        let prefill = model
            .prefill(&prompt, &images, &mut cache, &device)
            .unwrap();
        let ours: Vec<f32> = model.logits(prefill.hidden).into_data().to_vec().unwrap();
        let theirs = f32s(&bnb, &format!("{case}.logits"));
        let diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let scale = theirs.iter().map(|b| b.abs()).fold(0.0, f32::max);
        println!("{case}: NF4 logits max rel error {:.2e}", diff / scale);
        worst = worst.max(diff / scale);
    }
    worst
}

#[test]
fn bitsandbytes_checkpoint_loads_and_matches() {
    let model = load_dir::<Cpu>(&fixtures().join("tiny/nf4-bnb"), &Default::default()).unwrap();
    // transformers quantizes every linear layer but lm_head.
    assert_eq!(quantized_linears(&model), (43, 43));
    assert!(
        model
            .text
            .lm_head
            .as_ref()
            .is_some_and(|h| !h.is_quantized())
    );
    let err = logits_error(&model);
    assert!(err <= 1e-4, "max rel error {err}");
}

#[test]
fn quantize_while_loading_matches_bitsandbytes() {
    let model = load_dir_with::<Cpu>(
        &fixtures().join("tiny/v5"),
        &Default::default(),
        Some(QuantizeOptions::default()),
    )
    .unwrap();
    assert_eq!(quantized_linears(&model), (43, 43));
    // Same NF4 codes and scales as bitsandbytes; only double-quantized scales may differ on rare near ties.
    let err = logits_error(&model);
    assert!(err <= 1e-3, "max rel error {err}");
}

#[test]
fn skip_list_keeps_modules_dense() {
    let options = QuantizeOptions {
        skip: vec!["lm_head".into(), "visual".into()],
        ..Default::default()
    };
    let model = load_dir_with::<Cpu>(
        &fixtures().join("tiny/hub"),
        &Default::default(),
        Some(options),
    )
    .unwrap();
    // Only the 21 decoder projections are quantized.
    assert_eq!(quantized_linears(&model), (21, 43));
    let with_head = load_dir_with::<Cpu>(
        &fixtures().join("tiny/hub"),
        &Default::default(),
        Some(QuantizeOptions::default().with_lm_head()),
    )
    .unwrap();
    assert!(
        with_head
            .text
            .lm_head
            .as_ref()
            .is_some_and(|h| h.is_quantized())
    );
}

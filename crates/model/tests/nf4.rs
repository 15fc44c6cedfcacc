//! NF4 through the model: the tiny reference model's logits equal transformers + bitsandbytes NF4 (double quant,
//! f32 compute, CPU backend; `fixtures/nf4.py`), both when loading the checkpoint bitsandbytes saved
//! (`fixtures/tiny/nf4-bnb`) and when quantizing the f32 checkpoint while loading it.

#![allow(clippy::unwrap_used, missing_docs)]

use std::path::{Path, PathBuf};

use burn::prelude::Backend;
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

/// Per prompt: (max |a - b| / max |b|, relative Frobenius error) of the logits against bitsandbytes' in `fixture`.
fn logits_errors<B: Backend>(model: &QwenVl<B>, fixture: &str) -> Vec<(&'static str, f32, f32)> {
    let device = Default::default();
    let ref_bytes = std::fs::read(fixtures().join("tiny/reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&ref_bytes).unwrap();
    let bnb_bytes = std::fs::read(fixtures().join(fixture)).unwrap();
    let bnb = SafeTensors::deserialize(&bnb_bytes).unwrap();
    let processor = ProcessorConfig::from_model_dir(&fixtures().join("tiny/hub")).unwrap();
    let image = |n: &str| -> PixelValues {
        preprocess_bytes(
            &std::fs::read(fixtures().join(format!("tiny/{n}.png"))).unwrap(),
            &processor,
        )
        .unwrap()
    };
    let mut errors = Vec::new();
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
        let ours: Vec<f32> = model
            .logits(prefill.hidden)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        let theirs = f32s(&bnb, &format!("{case}.logits"));
        assert_eq!(ours.len(), theirs.len(), "{case}: logits size");
        let diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let scale = theirs.iter().map(|b| b.abs()).fold(0.0, f32::max);
        let sq = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
        let frobenius =
            sq(&mut ours.iter().zip(&theirs).map(|(a, b)| a - b)) / sq(&mut theirs.iter().copied());
        println!(
            "{case}: NF4 logits max rel error {:.2e}, rel Frobenius {frobenius:.2e}",
            diff / scale
        );
        errors.push((case, diff / scale, frobenius));
    }
    errors
}

/// The worst max-relative error of [`logits_errors`] against bitsandbytes' CPU (f32) logits.
fn logits_error(model: &QwenVl<Cpu>) -> f32 {
    logits_errors(model, "nf4/tiny_logits.safetensors")
        .into_iter()
        .map(|e| e.1)
        .fold(0.0, f32::max)
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

/// On CUDA in bf16: the checkpoint bitsandbytes saved, loaded by medvl, (a) against transformers + bitsandbytes on
/// the CPU in f32 (`fixtures/nf4.py`) within the bf16 tolerance of the fidelity tests (relative Frobenius error
/// <= 2e-2), and (b) against transformers + bitsandbytes' CUDA kernels with bf16 compute (`fixtures/nf4.py
/// --cuda`, made on the GPU machine): two bf16 computations, each within 2e-2 of the f32 result, so within
/// 2e-2 * sqrt(2) ~ 3e-2 of each other.
#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use medvl_model::backend::CudaBf16;

    #[test]
    #[ignore = "needs an NVIDIA GPU: run with `just test-cuda`"]
    fn cuda_bf16_nf4_matches_bitsandbytes() {
        let model =
            load_dir::<CudaBf16>(&fixtures().join("tiny/nf4-bnb"), &Default::default()).unwrap();
        for (fixture, tolerance) in [
            ("nf4/tiny_logits.safetensors", 2e-2),
            ("nf4/tiny_logits_cuda_bf16.safetensors", 3e-2),
        ] {
            println!("against {fixture}");
            for (case, max_rel, frobenius) in logits_errors(&model, fixture) {
                assert!(
                    frobenius <= tolerance,
                    "{fixture} {case}: rel Frobenius error {frobenius} (max rel {max_rel})"
                );
            }
        }
    }
}

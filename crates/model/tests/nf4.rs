//! NF4 through the model: the tiny reference model's logits equal transformers + bitsandbytes NF4 (double quant,
//! f32 compute, CPU backend; `fixtures/nf4.py`), both when loading the checkpoint bitsandbytes saved
//! (`fixtures/tiny/nf4-bnb`) and when quantizing the f32 checkpoint while loading it.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{fixtures, logits_errors};
use medvl_model::backend::Cpu;
use medvl_model::layers::LinearWeight;
use medvl_model::{QuantizeOptions, QwenVl, load_dir, load_dir_with};

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

/// A model's NF4 weight dequantizes to exactly bitsandbytes' values (`Nf4Tensor::dequantize`, bit-exact with
/// `dequantize_4bit` in `crates/nf4/tests`), with double-quantized scales kept as stored (one byte per block) and
/// plain ones as given: odd shapes with a partial last block, a partial last nested block, block sizes 64 and 128.
#[test]
fn nf4_weight_dequantizes_as_bitsandbytes() {
    use medvl_model::layers::{Nf4Scales, Nf4Weight};
    let device = Default::default();
    for (shape, blocksize) in [
        ([7, 100], 64),
        ([300, 64], 64),
        ([260, 128], 128),
        ([1, 64], 64),
    ] {
        let n = shape[0] * shape[1];
        let values: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 0.37).sin() * (1.0 + (i / 97) as f32)).powi(3))
            .collect();
        for double_quant in [true, false] {
            let tensor = medvl_nf4::quantize(&values, &shape, blocksize, double_quant).unwrap();
            let weight = Nf4Weight::<Cpu>::from_host(&tensor, &device);
            let blocks = n.div_ceil(blocksize);
            assert_eq!(weight.blocks(), blocks);
            match &weight.scales {
                Nf4Scales::Double(d) => {
                    assert!(double_quant, "{shape:?}");
                    assert_eq!(d.codes.dims(), [blocks.div_ceil(4)]);
                    assert_eq!(d.nested.dims(), [blocks.div_ceil(256)]);
                }
                Nf4Scales::Plain(s) => {
                    assert!(!double_quant, "{shape:?}");
                    assert_eq!(s.dims(), [blocks]);
                }
            }
            let got = weight.dequantize().into_data().to_vec::<f32>().unwrap();
            assert_eq!(
                got,
                tensor.dequantize(),
                "{shape:?} double quant {double_quant}"
            );
            assert_eq!(weight.packed_bytes().unwrap(), tensor.packed);
        }
    }
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

    /// On CUDA every NF4 weight of the model is dequantized by the CubeCL kernel (not the tensor-op fallback),
    /// as the tensor ops do it to within one unit in the last place (bf16 and f32).
    #[test]
    #[ignore = "needs an NVIDIA GPU: run with `just test-cuda`"]
    fn cuda_dequantization_kernel_equals_tensor_ops() {
        use burn::tensor::DType;
        let model =
            load_dir::<CudaBf16>(&fixtures().join("tiny/nf4-bnb"), &Default::default()).unwrap();
        let mut checked = 0;
        for layer in &model.text.layers {
            for linear in [
                &layer.self_attn.q_proj,
                &layer.self_attn.k_proj,
                &layer.mlp.down_proj,
            ] {
                let LinearWeight::Nf4(w) = &linear.weight else {
                    panic!("NF4")
                };
                for dtype in [DType::BF16, DType::F32] {
                    let fused = w.dense_by_kernel(dtype).expect("a CUDA tensor").unwrap();
                    assert_eq!(fused.dtype(), dtype);
                    let fused = fused.into_data().convert::<f32>().to_vec::<f32>().unwrap();
                    let ops = w.dequantize().cast(dtype).into_data().convert::<f32>();
                    let ops = ops.to_vec::<f32>().unwrap();
                    assert_eq!(fused.len(), ops.len());
                    // CUDA fuses the double-quantized scale's `map[code] * nested + offset` into one
                    // multiply-add (one rounding, where the tensor ops round twice): a value may move by one unit
                    // in the last place of the type, no more.
                    let ulp: i64 = if dtype == DType::BF16 { 1 << 16 } else { 2 };
                    let worst = fused
                        .iter()
                        .zip(&ops)
                        .map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).abs())
                        .max()
                        .unwrap_or(0);
                    assert!(
                        worst <= ulp,
                        "{:?} {dtype:?}: values differ by {worst} f32 units",
                        w.shape
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 0);
    }

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

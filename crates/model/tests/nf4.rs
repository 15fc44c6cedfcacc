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

/// With `QuantizeOptions::everything()` the token embedding and lm_head are NF4 too: the lookup returns exactly
/// bitsandbytes' dequantized rows of the checkpoint's table (quantized on the host here by `medvl_nf4`, bit-exact
/// with `quantize_4bit` in `crates/nf4/tests`), and a tied head multiplies by the same dequantized table.
#[test]
fn quantized_embedding_looks_up_bitsandbytes_rows() {
    use burn::tensor::{Int, Tensor, TensorData};
    let device = Default::default();
    let dir = fixtures().join("tiny/v5");
    let dense = load_dir::<Cpu>(&dir, &device).unwrap();
    let mut model =
        load_dir_with::<Cpu>(&dir, &device, Some(QuantizeOptions::everything())).unwrap();
    assert_eq!(quantized_linears(&model), (43, 43));
    assert!(
        model
            .text
            .lm_head
            .as_ref()
            .is_some_and(|h| h.is_quantized())
    );
    let LinearWeight::Dense(table) = &dense.text.embed_tokens else {
        panic!("the default options keep the embedding dense")
    };
    let LinearWeight::Nf4(nf4) = &model.text.embed_tokens else {
        panic!("everything() quantizes the embedding")
    };
    let [vocab, hidden] = table.val().dims();
    let values = table.val().into_data().to_vec::<f32>().unwrap();
    let host = medvl_nf4::quantize(&values, &[vocab, hidden], 64, true)
        .unwrap()
        .dequantize();
    let ids = [[5i64, 0, 1023, 5], [17, 400, 2, 999]];
    let got = model
        .text
        .embed(Tensor::<Cpu, 2, Int>::from_data(
            TensorData::new(ids.concat(), [2, 4]),
            &device,
        ))
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let want: Vec<f32> = ids
        .concat()
        .iter()
        .flat_map(|&r| host[r as usize * hidden..(r as usize + 1) * hidden].to_vec())
        .collect();
    assert_eq!(got, want);
    // The NF4 table is not the dense one (so the check above would catch a dense lookup).
    assert_ne!(got[..hidden], values[5 * hidden..6 * hidden]);
    // Tied head: logits = hidden . dequantized table^T.
    let x = Tensor::<Cpu, 2>::from_data(
        TensorData::new(
            (0..2 * hidden).map(|i| (i as f32 * 0.1).sin()).collect(),
            [2, hidden],
        ),
        &device,
    );
    let reference = x.clone().matmul(nf4.dequantize().transpose());
    model.text.lm_head = None;
    let logits = model.text.logits(x);
    let (a, b) = (
        logits.into_data().to_vec::<f32>().unwrap(),
        reference.into_data().to_vec::<f32>().unwrap(),
    );
    assert_eq!(a.len(), 2 * vocab);
    for (i, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
            "logit {i}: {a} against {b}"
        );
    }
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
            // The row lookup (an NF4 embedding) gives the same rows, repeated and in any order.
            let ids = [shape[0] - 1, 0, shape[0] / 2, 0];
            let rows = weight
                .dequantize_rows(burn::tensor::Tensor::from_data(
                    burn::tensor::TensorData::new(ids.map(|i| i as i64).to_vec(), [ids.len()]),
                    &device,
                ))
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&r| tensor.dequantize()[r * shape[1]..(r + 1) * shape[1]].to_vec())
                .collect();
            assert_eq!(
                rows, want,
                "{shape:?} double quant {double_quant} rows {ids:?}"
            );
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

    /// The NF4 embedding lookup at the 7B's table size (152064 x 3584, double-quantized scales, codes drawn at
    /// random), 1,300 ids (a page's prompt) with the first and last rows: the CUDA kernel gives bitsandbytes'
    /// `code * scale` of those rows (host `Nf4Tensor` arithmetic) rounded once to bf16, within one unit in the
    /// last place for the fused multiply-add of the block scale; and the tensor-op path on the device gives the
    /// same rows.
    #[test]
    #[ignore = "needs an NVIDIA GPU: run with `just test-cuda`"]
    fn cuda_row_lookup_at_the_7b_embedding_size() {
        use burn::tensor::{DType, Int, Tensor, TensorData};
        use medvl_model::layers::Nf4Weight;
        use medvl_nf4::{Absmax, DYNAMIC_MAP, NF4_CODE, Nf4Tensor};
        let (vocab, hidden) = (152_064usize, 3584usize);
        let n = vocab * hidden;
        let blocks = n / 64;
        // A fixed pseudo-random byte stream (xorshift), so the test needs no generator crate.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut byte = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        };
        let tensor = Nf4Tensor {
            packed: (0..n / 2).map(|_| byte()).collect(),
            absmax: Absmax::Double {
                codes: (0..blocks).map(|_| byte()).collect(),
                nested_absmax: (0..blocks.div_ceil(256))
                    .map(|i| 0.01 + (i % 97) as f32 * 1e-4)
                    .collect(),
                nested_code: DYNAMIC_MAP.to_vec(),
                offset: 0.02,
            },
            blocksize: 64,
            shape: vec![vocab, hidden],
        };
        let scales = tensor.absmax.to_f32();
        let device = Default::default();
        let weight = Nf4Weight::<CudaBf16>::from_host(&tensor, &device);
        let ids: Vec<i64> = (0..1300i64)
            .map(|i| match i {
                0 => vocab as i64 - 1,
                1 => 0,
                _ => (i * 7919 + 151_655) % vocab as i64,
            })
            .collect();
        let ids_tensor = || {
            Tensor::<CudaBf16, 1, Int>::from_data(
                TensorData::new(ids.clone(), [ids.len()]),
                &device,
            )
        };
        let read = |t: Tensor<CudaBf16, 2>| t.into_data().convert::<f32>().to_vec::<f32>().unwrap();
        // The kernel's rows are read before the tensor ops run, so that a fault of the latter cannot hide them.
        let by_kernel = read(weight.rows(ids_tensor(), DType::BF16));
        let by_ops = read(weight.dequantize_rows(ids_tensor()).cast(DType::BF16));
        let ulp = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs() >> 16;
        let mut worst = [0i64; 2];
        for (r, &id) in ids.iter().enumerate() {
            for c in 0..hidden {
                let i = id as usize * hidden + c;
                let host = half::bf16::from_f32(NF4_CODE[tensor.code(i) as usize] * scales[i / 64]);
                let host = host.to_f32();
                worst[0] = worst[0].max(ulp(by_kernel[r * hidden + c], host));
                worst[1] = worst[1].max(ulp(by_ops[r * hidden + c], host));
            }
        }
        eprintln!(
            "row lookup, bf16 units in the last place from the host: kernel {}, tensor ops {}",
            worst[0], worst[1]
        );
        assert!(worst[0] <= 1 && worst[1] <= 1, "{worst:?}");
    }

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

    /// The input gradient of an NF4 linear layer under burn's autodiff on CUDA, through the dequantization kernel
    /// (checked: the autodiff tensors are recognised), at the 7B's and the vision tower's shapes and odd ones,
    /// 1-64 rows, bf16 and f32: `grad_y W` against the f64 host product with bitsandbytes' dequantized `W`, within
    /// the type's precision relative to the sum of |products| (the weight and the gradient are rounded to the type
    /// before the products; f32 matmuls run on TF32 tensor cores, 10 mantissa bits, so f32 gets bf16's bound).
    #[test]
    #[ignore = "needs an NVIDIA GPU: run with `just test-cuda`"]
    fn cuda_nf4_input_gradient() {
        use medvl_model::backend::CudaF32;
        type Bf16 = burn_autodiff::Autodiff<CudaBf16>;
        type F32 = burn_autodiff::Autodiff<CudaF32>;
        for ([out, inp], rows) in [
            ([37, 320], 1),
            ([37, 320], 64),
            ([3584, 3584], 7),
            ([512, 3584], 64),
            ([18944, 3584], 1),
            ([3584, 18944], 5),
            ([1280, 3420], 17),
        ] {
            let tensor =
                medvl_nf4::quantize(&pseudo(out * inp, 7, 1.0), &[out, inp], 64, true).unwrap();
            // Gradients exact in bf16, so that both types multiply the same values.
            let g: Vec<f32> = pseudo(rows * out, 8, 1.0)
                .into_iter()
                .map(|v| half::bf16::from_f32(v).to_f32())
                .collect();
            let w = tensor.dequantize();
            let want = matmul(&g, &w, [rows, out, inp]);
            let abs_g: Vec<f32> = g.iter().map(|v| v.abs()).collect();
            let abs_w: Vec<f32> = w.iter().map(|v| v.abs()).collect();
            let magnitude = matmul(&abs_g, &abs_w, [rows, out, inp]);
            for (name, eps, got) in [
                (
                    "bf16",
                    2f64.powi(-8),
                    input_gradient::<Bf16>(&tensor, &g, rows),
                ),
                // burn's f32 matmul on CUDA runs on TF32 tensor cores: both operands cut to 10 mantissa bits
                // (measured up to 2.4 * 2^-10 at 64 rows on an H100).
                (
                    "f32",
                    2f64.powi(-8),
                    input_gradient::<F32>(&tensor, &g, rows),
                ),
            ] {
                let worst = got
                    .iter()
                    .zip(&want)
                    .zip(&magnitude)
                    .map(|((g, w), m)| (*g as f64 - w).abs() / m.max(f64::MIN_POSITIVE))
                    .fold(0.0, f64::max);
                println!(
                    "{out}x{inp}, {rows} rows, {name}: worst error {:.3} of the tolerance",
                    worst / eps
                );
                assert!(
                    worst <= eps,
                    "{out}x{inp} {rows} rows {name}: error {worst}"
                );
            }
        }
    }

    /// `d/dx sum(linear(x) * g)` for an NF4 linear layer on `B`, checking that the kernel dequantizes it.
    fn input_gradient<B: burn::tensor::backend::AutodiffBackend>(
        tensor: &medvl_nf4::Nf4Tensor,
        g: &[f32],
        rows: usize,
    ) -> Vec<f32> {
        use burn::tensor::{Tensor, TensorData};
        use medvl_model::layers::{Linear, Nf4Weight};
        let device = Default::default();
        let [out, inp] = [tensor.shape[0], tensor.shape[1]];
        let weight = Nf4Weight::<B>::from_host(tensor, &device);
        let dtype = Tensor::<B, 1>::zeros([1], &device).dtype();
        assert!(
            matches!(weight.dense_by_kernel(dtype), Some(Ok(_))),
            "the kernel takes the autodiff backend's tensors"
        );
        let linear = Linear::<B> {
            weight: LinearWeight::Nf4(weight),
            bias: None,
            lora: None,
        };
        let x = Tensor::<B, 2>::from_data(
            TensorData::new(pseudo(rows * inp, 9, 1.0), [rows, inp]),
            &device,
        )
        .require_grad();
        let upstream = Tensor::<B, 2>::from_data(TensorData::new(g.to_vec(), [rows, out]), &device);
        let grads = (linear.forward(x.clone()) * upstream).sum().backward();
        x.grad(&grads)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap()
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

/// Deterministic values in about `[-scale, scale]`, different per `seed`.
fn pseudo(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618 + seed as f32 * 1.7).sin() * 43758.547).fract() * 2.0 * scale)
        .collect()
}

/// `a [m, k] x b [k, n]` in f64.
fn matmul(a: &[f32], b: &[f32], [m, k, n]: [usize; 3]) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p] as f64;
            for j in 0..n {
                out[i * n + j] += av * b[p * n + j] as f64;
            }
        }
    }
    out
}

fn transpose(a: &[f32], [rows, cols]: [usize; 2]) -> Vec<f32> {
    (0..rows * cols)
        .map(|i| a[(i % rows) * cols + i / rows])
        .collect()
}

/// The worst `|got - want|` relative to the largest `|want|`.
fn worst_relative(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let largest = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((*g as f64 - w).abs()));
    worst / largest
}

/// QLoRA's backward through an NF4 linear layer with a LoRA adapter, under burn's autodiff on the CPU: the gradient
/// with respect to the input is `grad_y (W + s B A)` with `W` bitsandbytes' dequantized weight, the adapter's `A`
/// gets `s B^T grad_y^T x`, the bias `sum grad_y`, and the frozen NF4 base no gradient at all (hand-worked in f64
/// from `Nf4Tensor::dequantize`, bit-exact with bitsandbytes).
#[test]
fn nf4_linear_backward_gives_the_input_gradient() {
    use burn::module::Param;
    use burn::tensor::{Tensor, TensorData};
    use medvl_model::layers::{Linear, Lora, Nf4Scales, Nf4Weight};
    type Train = burn_autodiff::Autodiff<Cpu>;
    let device = Default::default();
    let rank = 4;
    let scale = 2.0;
    for ([out, inp], blocksize, rows) in [([7, 100], 64, 3), ([48, 64], 64, 1), ([33, 256], 128, 5)]
    {
        let tensor =
            medvl_nf4::quantize(&pseudo(out * inp, 1, 1.0), &[out, inp], blocksize, true).unwrap();
        let w = tensor.dequantize();
        let (a, b) = (pseudo(rank * inp, 2, 0.1), pseudo(out * rank, 3, 0.1));
        let (x, g, bias) = (
            pseudo(rows * inp, 4, 1.0),
            pseudo(rows * out, 5, 1.0),
            pseudo(out, 6, 1.0),
        );
        let param = |v: &[f32], shape: [usize; 2]| {
            Param::from_tensor(Tensor::<Train, 2>::from_data(
                TensorData::new(v.to_vec(), shape),
                &device,
            ))
        };
        let linear = Linear::<Train> {
            weight: LinearWeight::Nf4(Nf4Weight::from_host(&tensor, &device)),
            bias: Some(Param::from_tensor(Tensor::from_data(
                TensorData::new(bias, [out]),
                &device,
            ))),
            lora: Some(Lora {
                a: param(&a, [rank, inp]),
                b: param(&b, [out, rank]),
                scale,
            }),
        };
        let input =
            Tensor::<Train, 3>::from_data(TensorData::new(x.clone(), [1, rows, inp]), &device)
                .require_grad();
        let upstream =
            Tensor::<Train, 3>::from_data(TensorData::new(g.clone(), [1, rows, out]), &device);
        let grads = (linear.forward(input.clone()) * upstream).sum().backward();

        // grad_x = g (W + s B A): [rows, out] x [out, inp].
        let ba = matmul(&b, &a, [out, rank, inp]);
        let effective: Vec<f32> = w
            .iter()
            .zip(&ba)
            .map(|(w, ba)| (*w as f64 + scale * ba) as f32)
            .collect();
        let want = matmul(&g, &effective, [rows, out, inp]);
        let got = input
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let err = worst_relative(&got, &want);
        assert!(err <= 1e-5, "{out}x{inp}: input gradient off by {err}");

        // grad_A = s B^T g^T x: [rank, out] x [out, rows] x [rows, inp].
        let bt_gt = matmul(
            &transpose(&b, [out, rank]),
            &transpose(&g, [rows, out]),
            [rank, out, rows],
        );
        let bt_gt: Vec<f32> = bt_gt.iter().map(|v| (v * scale) as f32).collect();
        let want_a = matmul(&bt_gt, &x, [rank, rows, inp]);
        let lora = linear.lora.as_ref().unwrap();
        let got_a = lora
            .a
            .grad(&grads)
            .unwrap()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let err = worst_relative(&got_a, &want_a);
        assert!(err <= 1e-5, "{out}x{inp}: adapter gradient off by {err}");
        let want_bias: Vec<f64> = (0..out)
            .map(|n| (0..rows).map(|m| g[m * out + n] as f64).sum())
            .collect();
        let got_bias = linear.bias.as_ref().unwrap().grad(&grads).unwrap();
        let err = worst_relative(&got_bias.into_data().to_vec::<f32>().unwrap(), &want_bias);
        assert!(err <= 1e-5, "{out}x{inp}: bias gradient off by {err}");

        // The NF4 base is frozen: nothing in it receives a gradient.
        let LinearWeight::Nf4(base) = &linear.weight else {
            unreachable!()
        };
        assert!(base.code.grad(&grads).is_none());
        let Nf4Scales::Double(d) = &base.scales else {
            panic!("double-quantized")
        };
        assert!(d.nested.grad(&grads).is_none() && d.map.grad(&grads).is_none());
    }
}

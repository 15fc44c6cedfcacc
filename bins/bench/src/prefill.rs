//! `medvl-bench kernels --prefill`: the NF4 products of a page's prefill computed two ways on the same data, in
//! the same run: (a) what the model runs, the weight dequantized to a bf16 scratch matrix by
//! `medvl_kernels::dequant` (through `Nf4Weight::dense`) followed by burn's autotuned matmul, and (b) the fused
//! tensor-core NF4 GEMM (`medvl_kernels::gemm::gemm_nf4`), which dequantizes tiles in shared memory. Shapes: the
//! decoder's projections at the token counts of a 1,260- and a 2,772-image-token page, the vision tower's at its
//! patch counts (4 per token) and the merger's. Each case also reports how far (b)'s output is from (a)'s, so
//! that a fast wrong kernel cannot pass for a fast one.

use anyhow::{Context, Result};
use burn::tensor::Tensor;
use burn::tensor::{DType, TensorData};
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::Runtime;
use medvl_engine::plan::random_nf4;
use medvl_kernels::gemm;
use medvl_kernels::nf4::Nf4Matrix;
use medvl_kernels::{Buffer, KernelError};
use medvl_model::backend::CudaBf16;
use medvl_model::layers::Nf4Weight;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use medvl_kernels::probe::CopyProbe;

/// `(name, out, in, rows of activations)`.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("decoder q_proj / o_proj", 3584, 3584, 1300),
    ("decoder k_proj / v_proj", 512, 3584, 1300),
    ("decoder gate_proj / up_proj", 18944, 3584, 1300),
    ("decoder down_proj", 3584, 18944, 1300),
    ("decoder q_proj / o_proj", 3584, 3584, 2800),
    ("decoder k_proj / v_proj", 512, 3584, 2800),
    ("decoder gate_proj / up_proj", 18944, 3584, 2800),
    ("decoder down_proj", 3584, 18944, 2800),
    ("vision qkv", 3840, 1280, 11088),
    ("vision proj", 1280, 1280, 11088),
    ("vision gate_proj / up_proj", 3420, 1280, 11088),
    ("vision down_proj", 1280, 3420, 11088),
    ("merger fc1", 5120, 5120, 2772),
    ("merger fc2", 3584, 5120, 2772),
];

/// One shape, both ways.
#[derive(Serialize)]
pub(crate) struct PrefillCase {
    name: &'static str,
    rows: usize,
    cols: usize,
    /// Activation rows (tokens or patches).
    m: usize,
    /// The dequantization kernel alone (NF4 -> bf16 `[rows, cols]`).
    dequantize_us: f64,
    /// burn's matmul on the dense bf16 weight alone.
    matmul_us: f64,
    /// Both, as the model runs them.
    dequantize_matmul_us: f64,
    /// The fused NF4 tensor-core GEMM (`None` where it does not take the shape: widths not a multiple of 32).
    nf4_gemm_us: Option<f64>,
    /// `2 m rows cols / dequantize_matmul_us`.
    dequantize_matmul_tflops: f64,
    nf4_gemm_tflops: Option<f64>,
    /// Largest |GEMM - matmul| over the largest |matmul| output.
    gemm_difference: Option<f64>,
}

/// Measures every shape; `launches` per timing.
pub(crate) fn measure(probe: &CopyProbe, launches: usize) -> Result<Vec<PrefillCase>> {
    type B = CudaBf16;
    let device = Default::default();
    let client = CudaRuntime::client(&device);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    println!(
        "| matrix | out x in | rows | dequantize us | matmul us | dequantize + matmul us | TFLOP/s | NF4 GEMM us | TFLOP/s | GEMM / (dequantize + matmul) | GEMM difference |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut cases = Vec::new();
    for &(name, rows, cols, m) in SHAPES {
        let tensor = random_nf4(&mut rng, rows, cols);
        let weight = Nf4Weight::<B>::from_host(&tensor, &device);
        let matrix =
            Nf4Matrix::upload(&client, &tensor).with_context(|| format!("upload {rows}x{cols}"))?;
        let x_host: Vec<half::bf16> = (0..m * cols)
            .map(|_| half::bf16::from_f32(rng.random_range(-1.0f32..1.0)))
            .collect();
        let x = Tensor::<B, 2>::from_data(TensorData::new(x_host.clone(), [m, cols]), &device);
        let x_buf = Buffer::<half::bf16>::from_slice(&client, &x_host);
        let y = Buffer::<half::bf16>::empty(&client, m * rows);
        let dense_t = weight.dense(DType::BF16).transpose();

        let (dequantize_s, _) = probe.time(&client, launches, || {
            drop(weight.dense(DType::BF16));
            Ok::<_, KernelError>(())
        })?;
        let (matmul_s, _) = probe.time(&client, launches, || {
            drop(x.clone().matmul(dense_t.clone()));
            Ok::<_, KernelError>(())
        })?;
        let (both_s, _) = probe.time(&client, launches, || {
            drop(x.clone().matmul(weight.dense(DType::BF16).transpose()));
            Ok::<_, KernelError>(())
        })?;
        let gemm = if cols.is_multiple_of(32) {
            let (gemm_s, _) = probe.time(&client, launches, || {
                gemm::gemm_nf4(&client, &x_buf, m, &matrix, &y)
            })?;
            let reference = x.clone().matmul(dense_t).into_data().convert::<f32>();
            let reference = reference.to_vec::<f32>().context("matmul output")?;
            let fused = y.read(&client)?;
            let largest = reference.iter().fold(0f32, |a, v| a.max(v.abs()));
            let difference = fused
                .iter()
                .zip(&reference)
                .fold(0f32, |a, (f, r)| a.max((f.to_f32() - r).abs()))
                / largest;
            Some((gemm_s, difference as f64))
        } else {
            None
        };

        let flops = 2.0 * (m * rows * cols) as f64;
        let case = PrefillCase {
            name,
            rows,
            cols,
            m,
            dequantize_us: dequantize_s * 1e6,
            matmul_us: matmul_s * 1e6,
            dequantize_matmul_us: both_s * 1e6,
            nf4_gemm_us: gemm.map(|g| g.0 * 1e6),
            dequantize_matmul_tflops: flops / both_s / 1e12,
            nf4_gemm_tflops: gemm.map(|g| flops / g.0 / 1e12),
            gemm_difference: gemm.map(|g| g.1),
        };
        let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "| {name} | {rows}x{cols} | {m} | {:.1} | {:.1} | {:.1} | {:.0} | {} | {} | {} | {} |",
            case.dequantize_us,
            case.matmul_us,
            case.dequantize_matmul_us,
            case.dequantize_matmul_tflops,
            or_dash(case.nf4_gemm_us.map(|v| format!("{v:.1}"))),
            or_dash(case.nf4_gemm_tflops.map(|v| format!("{v:.0}"))),
            or_dash(
                case.nf4_gemm_us
                    .map(|v| format!("{:.2}", v / case.dequantize_matmul_us))
            ),
            or_dash(case.gemm_difference.map(|v| format!("{v:.1e}"))),
        );
        cases.push(case);
    }
    Ok(cases)
}

//! The NF4 GEMV kernels against the plain host reference (`medvl_kernels::reference::nf4_gemv`), over the decode
//! shapes of Qwen2.5-VL-7B, odd shapes, batch sizes 1-8, block sizes, plain and double-quantized scales, and f32/bf16
//! activations; the gated unit (`silu(gate) * up` of a stacked gate/up matrix); and the tensor-core NF4 GEMM (`medvl_kernels::gemm`) for more rows and the tensor-core GEMV
//! (`medvl_kernels::mma`, 1-32 rows), against the same reference.
//!
//! Runs on whichever CubeCL runtime the features enable: `wgpu` (CI: Mesa's lavapipe, a software Vulkan driver,
//! f32 activations only since WGSL has no bf16) and `cuda` (`--ignored` on the GPU machine).
#![allow(clippy::unwrap_used, missing_docs)]

use cubecl::prelude::*;
use half::bf16;
use medvl_kernels::gemm::{self, GemmTiling};
use medvl_kernels::mma::{self, MmaTiling};
use medvl_kernels::nf4::{self, Activation, GemvTiling, Nf4Matrix};
use medvl_kernels::{Buffer, KernelError, probe, reference};
use medvl_nf4::{Absmax, NESTED_BLOCKSIZE, NF4_CODE, Nf4Tensor, quantize};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Activation types as the host sees them.
trait Host: Activation + Copy {
    fn host_from(v: f32) -> Self;
    fn host_to(self) -> f32;
    /// Relative precision of one stored value.
    const EPS: f32;
}
impl Host for f32 {
    fn host_from(v: f32) -> Self {
        v
    }
    fn host_to(self) -> f32 {
        self
    }
    const EPS: f32 = f32::EPSILON;
}
impl Host for half::f16 {
    fn host_from(v: f32) -> Self {
        half::f16::from_f32(v)
    }
    fn host_to(self) -> f32 {
        half::f16::to_f32(self)
    }
    const EPS: f32 = 1.0 / 1024.0;
}
impl Host for bf16 {
    fn host_from(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn host_to(self) -> f32 {
        bf16::to_f32(self)
    }
    const EPS: f32 = 1.0 / 128.0;
}

fn random_weight(rows: usize, cols: usize, blocksize: usize, double: bool, seed: u64) -> Nf4Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // A few large values so that block scales differ widely, as in real weights.
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| {
            let v: f32 = rng.random_range(-0.05..0.05);
            if i % 997 == 0 { v * 20.0 } else { v }
        })
        .collect();
    quantize(&values, &[rows, cols], blocksize, double).unwrap()
}

/// Runs the kernel and checks every output against the reference; returns the worst error in units of the
/// tolerance (<= 1 passes).
fn check<R: Runtime, F: Host>(
    client: &ComputeClient<R>,
    weight: &Nf4Tensor,
    batch: usize,
    seed: u64,
) -> f32 {
    check_with::<R, F>(client, weight, batch, seed, None)
}

fn check_with<R: Runtime, F: Host>(
    client: &ComputeClient<R>,
    weight: &Nf4Tensor,
    batch: usize,
    seed: u64,
    tiling: Option<GemvTiling>,
) -> f32 {
    check_stack::<R, F>(client, &[weight], batch, seed, tiling)
}

/// [`check_with`] for the matrix `Nf4Matrix::stack` makes of `parts`: its outputs are each part's, one after the
/// other.
fn check_stack<R: Runtime, F: Host>(
    client: &ComputeClient<R>,
    parts: &[&Nf4Tensor],
    batch: usize,
    seed: u64,
    tiling: Option<GemvTiling>,
) -> f32 {
    let cols = parts[0].shape[1];
    let rows: usize = parts.iter().map(|p| p.shape[0]).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<F> = (0..batch * cols)
        .map(|_| F::host_from(rng.random_range(-1.0..1.0)))
        .collect();
    let x_f32: Vec<f32> = x.iter().map(|v| v.host_to()).collect();

    let matrix = Nf4Matrix::stack(client, parts).unwrap();
    let x_dev = Buffer::from_slice(client, &x);
    let y_dev = Buffer::<F>::empty(client, batch * rows);
    match tiling {
        Some(tiling) => nf4::gemv_tiled(client, &x_dev, batch, &matrix, &y_dev, tiling).unwrap(),
        None => nf4::gemv(client, &x_dev, batch, &matrix, &y_dev).unwrap(),
    }
    let got = y_dev.read(client).unwrap();

    // Tolerance: f32 accumulation over `cols` products, plus one rounding of the output to F.
    let mut worst = 0.0f32;
    let mut first_row = 0;
    for weight in parts {
        let part_rows = weight.shape[0];
        let expected = reference::nf4_gemv(&x_f32, batch, weight);
        let w = weight.dequantize();
        for b in 0..batch {
            for n in 0..part_rows {
                let magnitude: f32 = (0..cols)
                    .map(|k| (x_f32[b * cols + k] * w[n * cols + k]).abs())
                    .sum();
                let e = expected[b * part_rows + n];
                let tol = 1e-5 * magnitude + F::EPS * e.abs() + 1e-6;
                let value = got[b * rows + first_row + n].host_to();
                let err = (value - e).abs() / tol;
                assert!(
                    err <= 1.0,
                    "{rows}x{cols} batch {batch} block {} {tiling:?}: y[{b},{}] = {value} expected {e} (tolerance {tol})",
                    weight.blocksize,
                    first_row + n,
                );
                worst = worst.max(err);
            }
        }
        first_row += part_rows;
    }
    worst
}

/// Stacked matrices (the plan's fused q/k/v and gate/up): each part quantized on its own, so with its own
/// double-quantization offset; parts that are whole nested blocks keep double quantization, others fall back to
/// f32 scales, and both give each part's products.
fn stacked<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    // 64x256 = 256 blocks of 64 = one nested block: double quantization survives the stack.
    let q = random_weight(64, 256, 64, true, 1);
    let k = random_weight(64, 256, 64, true, 2);
    let v = random_weight(24, 256, 64, true, 3);
    let offsets: Vec<f32> = [&q, &k, &v]
        .iter()
        .map(|t| match t.absmax {
            medvl_nf4::Absmax::Double { offset, .. } => offset,
            medvl_nf4::Absmax::Plain(_) => f32::NAN,
        })
        .collect();
    assert!(
        offsets[0] != offsets[1],
        "the parts' offsets should differ: {offsets:?}"
    );
    assert!(
        Nf4Matrix::stack(client, &[&q, &k, &v])
            .unwrap()
            .double_quant()
    );
    for batch in [1, 3, 8] {
        check_stack::<R, F>(client, &[&q, &k, &v], batch, 5, None);
    }
    // 8x256 = 32 blocks, not a whole nested block: f32 scales.
    let small = random_weight(8, 256, 64, true, 4);
    let plain = Nf4Matrix::stack(client, &[&small, &q]).unwrap();
    assert!(!plain.double_quant());
    check_stack::<R, F>(client, &[&small, &q], 2, 6, None);
    // Different widths, and a part that is not whole blocks, are refused.
    let narrow = random_weight(64, 128, 64, true, 5);
    assert!(matches!(
        Nf4Matrix::stack(client, &[&q, &narrow]),
        Err(KernelError::Unsupported(_))
    ));
    let ragged = random_weight(1, 96, 64, false, 6);
    let ragged2 = random_weight(2, 96, 64, false, 7);
    assert!(matches!(
        Nf4Matrix::stack(client, &[&ragged, &ragged2]),
        Err(KernelError::Unsupported(_))
    ));
}

/// The gated unit (`nf4::gemv_glu`): a stacked `[gate; up]` matrix's two halves multiplied, `silu(gate) * up`
/// written, against the host reference's products; widths of 10 and 32 chunks per row (and the 7B's gate/up
/// where `large`), batches 1-8. Odd row counts are refused.
fn gated_unit<R: Runtime, F: Host>(client: &ComputeClient<R>, large: bool) {
    let mut shapes = vec![(74, 320), (128, 1024)];
    if large {
        shapes.push((2 * 18944, 3584));
    }
    for (rows, cols) in shapes {
        let weight = random_weight(rows, cols, 64, true, rows as u64);
        let matrix = Nf4Matrix::upload(client, &weight).unwrap();
        let w = weight.dequantize();
        let width = rows / 2;
        for batch in [1, 3, 8] {
            let mut rng = ChaCha8Rng::seed_from_u64(batch as u64);
            let x: Vec<F> = (0..batch * cols)
                .map(|_| F::host_from(rng.random_range(-1.0..1.0)))
                .collect();
            let x_f32: Vec<f32> = x.iter().map(|v| v.host_to()).collect();
            let out = Buffer::<F>::empty(client, batch * width);
            nf4::gemv_glu(
                client,
                &Buffer::from_slice(client, &x),
                batch,
                &matrix,
                &out,
            )
            .unwrap();
            let got = out.read(client).unwrap();
            let products = reference::nf4_gemv(&x_f32, batch, &weight);
            // Each product's tolerance as in `check_stack` (accumulation, one rounding to F), carried through
            // `silu(g) * u` (|silu'| < 1.1), plus the roundings of silu and of the result.
            let tolerance = |b: usize, n: usize| {
                let magnitude: f32 = (0..cols)
                    .map(|k| (x_f32[b * cols + k] * w[n * cols + k]).abs())
                    .sum();
                1e-5 * magnitude + F::EPS * products[b * rows + n].abs() + 1e-6
            };
            for b in 0..batch {
                for j in 0..width {
                    let (g, u) = (products[b * rows + j], products[b * rows + width + j]);
                    let silu = g / (1.0 + (-g).exp());
                    let expected = silu * u;
                    let tol = 1.1 * tolerance(b, j) * u.abs()
                        + (silu.abs() + 1.1 * tolerance(b, j)) * tolerance(b, width + j)
                        + F::EPS * silu.abs() * u.abs()
                        + 2.0 * F::EPS * expected.abs()
                        + 1e-6;
                    let value = got[b * width + j].host_to();
                    assert!(
                        (value - expected).abs() <= tol,
                        "{rows}x{cols} batch {batch}: out[{b},{j}] = {value} expected {expected} (tolerance {tol})"
                    );
                }
            }
        }
    }
    let odd = Nf4Matrix::upload(client, &random_weight(5, 96, 32, true, 3)).unwrap();
    let x = Buffer::<F>::empty(client, 96);
    let out = Buffer::<F>::empty(client, 3);
    assert!(matches!(
        nf4::gemv_glu(client, &x, 1, &odd, &out),
        Err(KernelError::Unsupported(_))
    ));
}

/// Shapes `[out, in]`: the 7B decoder's q/o, k/v, gate/up and down projections, the vision MLP's, and odd ones
/// (rows not a multiple of the 4 rows a cube computes; widths that are not a multiple of 32, where blocks straddle
/// rows and the general kernel runs).
const SHAPES: &[(usize, usize)] = &[
    (3584, 3584),
    (512, 3584),
    (18944, 3584),
    (3584, 18944),
    (3420, 1280),
    (1280, 3420),
    (5, 96),
    (7, 100),
    (3, 33),
    (1, 64),
];

fn shapes_and_batches<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
        let weight = random_weight(rows, cols, 64, true, i as u64);
        // Every batch size on the small shapes; 1 and 8 on the large ones (the host reference is slow).
        let batches: &[usize] = if rows * cols < 1 << 20 {
            &[1, 2, 3, 4, 5, 6, 7, 8]
        } else {
            &[1, 8]
        };
        for &batch in batches {
            let worst = check::<R, F>(client, &weight, batch, 100 + batch as u64);
            eprintln!("{rows}x{cols} batch {batch}: worst error {worst:.3} of tolerance");
        }
    }
}

/// Every tiling of the aligned kernel, on row counts that are and are not multiples of the rows per cube, with
/// row sets whose stream does and does not fill the lanes (10, 32 and 3 chunks per row), and lane pairs sharing
/// scales (an even number of rows per set, widths 320 and 1024) or not.
fn every_tiling<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    for (rows, cols) in [(37, 320), (64, 1024), (5, 96)] {
        let weight = random_weight(rows, cols, 64, true, rows as u64);
        for sets in [1, 2, 5] {
            let (per_set, batches): (&[usize], &[usize]) = if sets == 1 {
                (&[1, 3, 4], &[1, 3, 8])
            } else {
                (&[2, 3], &[3])
            };
            for &rows_per_plane in per_set {
                for unroll in [1, 4] {
                    for split in [1, 4] {
                        for &batch in batches {
                            let tiling = GemvTiling {
                                rows_per_plane,
                                unroll,
                                split,
                                sets,
                                paired: true,
                            };
                            check_with::<R, F>(client, &weight, batch, 9, Some(tiling));
                        }
                    }
                }
            }
        }
    }
}

fn block_sizes_and_plain_scales<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    for blocksize in [32, 64, 128, 256, 4096] {
        for double in [true, false] {
            for (rows, cols) in [(40, 256), (9, 100)] {
                let weight = random_weight(rows, cols, blocksize, double, blocksize as u64);
                check::<R, F>(client, &weight, 3, 7);
            }
        }
    }
}

fn rejects_bad_launches<R: Runtime>(client: &ComputeClient<R>) {
    let weight = random_weight(8, 64, 64, true, 1);
    let matrix = Nf4Matrix::upload(client, &weight).unwrap();
    let x = Buffer::<f32>::empty(client, 9 * 64);
    let y = Buffer::<f32>::empty(client, 9 * 8);
    for batch in [0, 9] {
        let err = nf4::gemv(client, &x, batch, &matrix, &y).unwrap_err();
        assert!(matches!(err, KernelError::Unsupported(_)), "{err}");
    }
    let small = Buffer::<f32>::empty(client, 7);
    let err = nf4::gemv(client, &x, 1, &matrix, &small).unwrap_err();
    assert!(
        matches!(
            err,
            KernelError::BufferTooSmall {
                what: "y",
                needed: 8,
                ..
            }
        ),
        "{err}"
    );
    let three_d = quantize(&[0.5; 8], &[2, 2, 2], 64, true).unwrap();
    assert!(matches!(
        Nf4Matrix::upload(client, &three_d),
        Err(KernelError::Unsupported(_))
    ));
}

/// A tensor-core product: the GEMM or the GEMV of `medvl_kernels::mma`, with its default tiling or another.
#[derive(Debug, Clone, Copy)]
enum TensorCores {
    Gemm(Option<GemmTiling>),
    Mma(Option<MmaTiling>),
}

/// The GEMM of `m` rows against the reference. Its weights are rounded to `F` before the products (as
/// bitsandbytes dequantizes), so the tolerance is `F`'s precision relative to the sum of |products|.
fn check_gemm<R: Runtime, F: Host>(
    client: &ComputeClient<R>,
    weight: &Nf4Tensor,
    m: usize,
    tiling: Option<GemmTiling>,
) -> f32 {
    check_tensor_cores::<R, F>(client, weight, m, TensorCores::Gemm(tiling))
}

/// [`check_gemm`] for either tensor-core product. The GEMV's table rounds each NF4 value to `F` before the block
/// scale (the GEMM rounds the scaled value): the same one rounding of the weight, the same tolerance.
fn check_tensor_cores<R: Runtime, F: Host>(
    client: &ComputeClient<R>,
    weight: &Nf4Tensor,
    m: usize,
    tiling: TensorCores,
) -> f32 {
    let (rows, cols) = (weight.shape[0], weight.shape[1]);
    let mut rng = ChaCha8Rng::seed_from_u64(m as u64);
    let x: Vec<F> = (0..m * cols)
        .map(|_| F::host_from(rng.random_range(-1.0..1.0)))
        .collect();
    let x_f32: Vec<f32> = x.iter().map(|v| v.host_to()).collect();
    let expected = reference::nf4_gemv(&x_f32, m, weight);
    let matrix = Nf4Matrix::upload(client, weight).unwrap();
    let x_dev = Buffer::from_slice(client, &x);
    let y_dev = Buffer::<F>::empty(client, m * rows);
    match tiling {
        TensorCores::Gemm(Some(t)) => {
            gemm::gemm_nf4_tiled(client, &x_dev, m, &matrix, &y_dev, t).unwrap()
        }
        TensorCores::Gemm(None) => gemm::gemm_nf4(client, &x_dev, m, &matrix, &y_dev).unwrap(),
        TensorCores::Mma(Some(t)) => {
            mma::gemv_mma_tiled(client, &x_dev, m, &matrix, &y_dev, t).unwrap()
        }
        TensorCores::Mma(None) => mma::gemv_mma(client, &x_dev, m, &matrix, &y_dev).unwrap(),
    }
    let got = y_dev.read(client).unwrap();
    let w = weight.dequantize();
    let mut worst = 0.0f32;
    for b in 0..m {
        for n in 0..rows {
            let magnitude: f32 = (0..cols)
                .map(|k| (x_f32[b * cols + k] * w[n * cols + k]).abs())
                .sum();
            let e = expected[b * rows + n];
            let tol = F::EPS * (magnitude / 2.0 + e.abs()) + 1e-6;
            let value = got[b * rows + n].host_to();
            let err = (value - e).abs() / tol;
            assert!(
                err <= 1.0,
                "{tiling:?} {rows}x{cols}, {m} rows: y[{b},{n}] = {value} expected {e} (tolerance {tol})"
            );
            worst = worst.max(err);
        }
    }
    worst
}

/// The tensor-core GEMM over the 7B's shapes at decode batches past the GEMV's 8 rows and a prefill-sized one,
/// odd shapes (outputs not a multiple of the tile, rows not a multiple of 16, a width that ends inside a stage),
/// and every tiling on a small shape.
fn gemm_shapes<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    let cases: [(usize, usize, &[usize]); 6] = [
        (3584, 3584, &[9, 32][..]),
        (4608, 3584, &[32][..]),
        (18944, 3584, &[17, 32][..]),
        (3584, 18944, &[32][..]),
        (37, 320, &[1, 9, 16, 33, 100][..]),
        (100, 96, &[20][..]),
    ];
    for (i, (rows, cols, ms)) in cases.into_iter().enumerate() {
        let weight = random_weight(rows, cols, 64, true, 40 + i as u64);
        for &m in ms {
            let worst = check_gemm::<R, F>(client, &weight, m, None);
            eprintln!("GEMM {rows}x{cols} m {m}: worst error {worst:.3} of tolerance");
        }
    }
    let weight = random_weight(70, 640, 64, false, 50);
    for m_frags in [1, 2, 4] {
        for n_planes in [1, 2, 4] {
            for k_chunks in [2, 4, 8] {
                let tiling = GemmTiling {
                    m_frags,
                    n_planes,
                    k_chunks,
                };
                check_gemm::<R, F>(client, &weight, 40, Some(tiling));
            }
        }
    }
}

/// The tensor-core GEMV over the 7B's decode shapes at 1, 8 and 32 rows and in between, odd shapes (rows not a
/// multiple of 16, fewer sub-blocks than planes, block sizes 128 and plain scales), every tiling on a small shape.
fn mma_shapes<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    let cases: [(usize, usize, usize, bool, &[usize]); 8] = [
        (4608, 3584, 64, true, &[1, 8, 32][..]),
        (3584, 3584, 64, true, &[1, 5][..]),
        (37888, 3584, 64, true, &[1, 32][..]),
        (3584, 18944, 64, true, &[1, 17, 32][..]),
        (37, 320, 64, true, &[1, 2, 3, 7, 8, 9, 16, 24, 31, 32][..]),
        (100, 64, 64, false, &[4][..]),
        (50, 640, 128, true, &[3][..]),
        (16, 1024, 256, false, &[12][..]),
    ];
    for (i, (rows, cols, blocksize, double, ms)) in cases.into_iter().enumerate() {
        let weight = random_weight(rows, cols, blocksize, double, 60 + i as u64);
        for &m in ms {
            let worst = check_tensor_cores::<R, F>(client, &weight, m, TensorCores::Mma(None));
            eprintln!("tensor-core GEMV {rows}x{cols} m {m}: worst error {worst:.3} of tolerance");
        }
    }
    let weight = random_weight(70, 1280, 64, true, 70);
    for split in [1, 2, 4, 8] {
        for unroll in [1, 2, 3, 4] {
            for copies in [1, 4, 32] {
                // One cube per tile, and a cube per multiprocessor (here at most one tile each; below, several).
                for cubes_per_sm in [0, 1] {
                    let tiling = MmaTiling {
                        split,
                        unroll,
                        copies,
                        cubes_per_sm,
                    };
                    check_tensor_cores::<R, F>(client, &weight, 11, TensorCores::Mma(Some(tiling)));
                }
            }
        }
    }
    // Cubes looping over several tiles: 288 tiles, one cube per multiprocessor (132 on an H100/H200).
    let weight = random_weight(4608, 3584, 64, true, 71);
    let persistent = MmaTiling {
        cubes_per_sm: 1,
        ..MmaTiling::for_shape(4608, 3584, 17)
    };
    for m in [1, 17] {
        check_tensor_cores::<R, F>(client, &weight, m, TensorCores::Mma(Some(persistent)));
    }
}

/// Where the device has no m16n8k16 product for `F` (f32; lavapipe), the tensor-core GEMV says so; widths and
/// block sizes it does not take and batches past 32 are refused.
fn mma_refuses_unsupported<R: Runtime, F: Host>(client: &ComputeClient<R>, supported: bool) {
    assert_eq!(mma::supported::<R, F>(client), supported);
    let refused = |rows: usize, cols: usize, blocksize: usize, m: usize| {
        let weight = random_weight(rows, cols, blocksize, false, 3);
        let matrix = Nf4Matrix::upload(client, &weight).unwrap();
        let x = Buffer::<F>::empty(client, m.max(1) * cols);
        let y = Buffer::<F>::empty(client, m.max(1) * rows);
        let err = mma::gemv_mma(client, &x, m, &matrix, &y).unwrap_err();
        assert!(matches!(&err, KernelError::Unsupported(_)), "{err}");
        err.to_string()
    };
    if supported {
        assert!(refused(16, 96, 32, 1).contains("multiples of 64"));
        assert!(refused(16, 64, 64, 33).contains("1 to 32 rows"));
        assert!(refused(16, 64, 64, 0).contains("1 to 32 rows"));
    } else {
        let err = refused(16, 64, 64, 1);
        assert!(err.contains("tensor-core"), "{err}");
    }
}

/// The dense GEMM against f64 products of the same (rounded) values: 7B shapes and odd ones.
fn gemm_dense_shapes<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    for (rows, cols, m) in [
        (3584, 3584, 32),
        (37888, 3584, 9),
        (37, 320, 33),
        (100, 96, 20),
    ] {
        let mut rng = ChaCha8Rng::seed_from_u64((rows + m) as u64);
        let w: Vec<F> = (0..rows * cols)
            .map(|_| F::host_from(rng.random_range(-0.05..0.05)))
            .collect();
        let x: Vec<F> = (0..m * cols)
            .map(|_| F::host_from(rng.random_range(-1.0..1.0)))
            .collect();
        let matrix = medvl_kernels::decode::DenseMatrix::upload(client, &w, rows, cols).unwrap();
        let x_dev = Buffer::from_slice(client, &x);
        let y_dev = Buffer::<F>::empty(client, m * rows);
        gemm::gemm_dense(client, &x_dev, m, &matrix, &y_dev).unwrap();
        let got = y_dev.read(client).unwrap();
        for b in 0..m {
            for n in (0..rows).step_by(7) {
                let (mut dot, mut magnitude) = (0f64, 0f64);
                for k in 0..cols {
                    let p =
                        f64::from(x[b * cols + k].host_to()) * f64::from(w[n * cols + k].host_to());
                    dot += p;
                    magnitude += p.abs();
                }
                let tol = 1e-5 * magnitude + f64::from(F::EPS) * dot.abs() + 1e-6;
                let value = f64::from(got[b * rows + n].host_to());
                assert!(
                    (value - dot).abs() <= tol,
                    "dense GEMM {rows}x{cols}, {m} rows: y[{b},{n}] = {value} expected {dot} (tolerance {tol})"
                );
            }
        }
    }
}

/// Without tensor cores for the type (f32 anywhere; lavapipe), the GEMM says so instead of launching.
fn gemm_refuses_unsupported<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    let weight = random_weight(16, 64, 64, true, 1);
    let matrix = Nf4Matrix::upload(client, &weight).unwrap();
    let x = Buffer::<F>::empty(client, 16 * 64);
    let y = Buffer::<F>::empty(client, 16 * 16);
    let err = gemm::gemm_nf4(client, &x, 16, &matrix, &y).unwrap_err();
    assert!(
        matches!(&err, KernelError::Unsupported(m) if m.contains("tensor-core")),
        "{err}"
    );
    assert!(!gemm::supported::<R, F>(client));
}

fn copy_probe_copies<R: Runtime>(client: &ComputeClient<R>) {
    // More vectors than one grid covers, so the grid-stride loop runs several rounds.
    let values: Vec<u32> = (0..4 * 256 * 4096 * 2 + 8).map(|i| i * 7 + 1).collect();
    let src = Buffer::from_slice(client, &values);
    let dst = Buffer::<u32>::empty(client, values.len());
    probe::copy(client, &src, &dst).unwrap();
    assert!(dst.read(client).unwrap() == values, "copy differs");
    let odd = Buffer::from_slice(client, &[1u32, 2, 3]);
    assert!(probe::copy(client, &odd, &odd).is_err());
}

/// `code * scale` of every value (f32), with the double-quantized block scales computed as bitsandbytes does
/// (`map[code] * nested`, then `+ offset`: two roundings) and as one fused multiply-add (one rounding), which is
/// what CUDA compiles the kernels' `map[code] * nested + offset` to.
fn dequantized_both(t: &Nf4Tensor) -> [Vec<f32>; 2] {
    let unfused = t.absmax.to_f32();
    let fused = match &t.absmax {
        Absmax::Plain(v) => v.clone(),
        Absmax::Double {
            codes,
            nested_absmax,
            nested_code,
            offset,
        } => codes
            .iter()
            .enumerate()
            .map(|(b, &c)| {
                nested_code[c as usize].mul_add(nested_absmax[b / NESTED_BLOCKSIZE], *offset)
            })
            .collect(),
    };
    [unfused, fused].map(|scales| {
        (0..t.numel())
            .map(|i| NF4_CODE[t.code(i) as usize] * scales[i / t.blocksize])
            .collect()
    })
}

/// The dequantization kernel writes the host's `code * scale` (f32) rounded once to `F`, as bitsandbytes'
/// `dequantize_4bit` (with the block scale's multiply-add fused or not): double-quantized and plain scales,
/// block sizes 32-256, sizes with a partial last word and block, a stack of separately quantized parts, the 7B's
/// vision MLP shape.
fn dequantize_exactly<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    let mut cases: Vec<(Nf4Matrix, [Vec<f32>; 2])> = Vec::new();
    for (i, &(rows, cols, blocksize, double)) in [
        (1, 64, 64, true),
        (7, 100, 64, true),
        (3, 33, 32, false),
        (300, 64, 64, true),
        (64, 96, 128, false),
        (5, 1024, 256, true),
        (1280, 3420, 64, true),
    ]
    .iter()
    .enumerate()
    {
        let weight = random_weight(rows, cols, blocksize, double, 50 + i as u64);
        assert_eq!(dequantized_both(&weight)[0], weight.dequantize());
        cases.push((
            Nf4Matrix::upload(client, &weight).unwrap(),
            dequantized_both(&weight),
        ));
    }
    let parts = [
        random_weight(256, 64, 64, true, 60),
        random_weight(40, 64, 64, true, 61),
    ];
    let [a, b] = parts.each_ref().map(dequantized_both);
    let host = [0, 1].map(|k| [a[k].clone(), b[k].clone()].concat());
    let stack = Nf4Matrix::stack(client, &[&parts[0], &parts[1]]).unwrap();
    assert!(stack.double_quant());
    cases.push((stack, host));
    let mut fused = 0;
    for (matrix, [host, host_fused]) in cases {
        let out = Buffer::<F>::empty(client, host.len());
        medvl_kernels::dequant::dequantize(client, &matrix, &out).unwrap();
        let got = out.read(client).unwrap();
        let (rows, cols) = (matrix.rows(), matrix.cols());
        for (i, g) in got.iter().enumerate() {
            let bits = |v: f32| F::host_from(v).host_to().to_bits();
            let g = g.host_to().to_bits();
            if g != bits(host[i]) {
                assert_eq!(
                    g,
                    bits(host_fused[i]),
                    "{rows}x{cols} value {i}: {} against {} (or {} fused)",
                    f32::from_bits(g),
                    host[i],
                    host_fused[i]
                );
                fused += 1;
            }
        }
    }
    eprintln!("dequantize: {fused} values took the fused scale");
    // Too small an output buffer is refused.
    let weight = Nf4Matrix::upload(client, &random_weight(4, 64, 64, true, 70)).unwrap();
    let small = Buffer::<F>::empty(client, 255);
    assert!(matches!(
        medvl_kernels::dequant::dequantize(client, &weight, &small),
        Err(KernelError::BufferTooSmall { .. })
    ));
}

/// The row lookup writes rows of the dequantization kernel's output (bitsandbytes' `code * scale`, rounded once to
/// `F`): double-quantized and plain scales, block sizes 32-128, rows that start inside a block, repeated and
/// out-of-range ids (row 0), the 7B embedding's width.
fn dequantize_rows_exactly<R: Runtime, F: Host>(client: &ComputeClient<R>) {
    for (i, &(rows, cols, blocksize, double)) in [
        (10, 64, 64, true),
        (300, 40, 64, true),
        (50, 96, 32, false),
        (600, 3584, 64, true),
        (20, 24, 128, false),
    ]
    .iter()
    .enumerate()
    {
        let weight = random_weight(rows, cols, blocksize, double, 80 + i as u64);
        let matrix = Nf4Matrix::upload(client, &weight).unwrap();
        let full = Buffer::<F>::empty(client, rows * cols);
        medvl_kernels::dequant::dequantize(client, &matrix, &full).unwrap();
        let full = full.read(client).unwrap();
        let ids: Vec<u32> = vec![
            rows as u32 - 1,
            0,
            3,
            3,
            rows as u32,
            u32::MAX,
            (rows / 2) as u32,
        ];
        let out = Buffer::<F>::empty(client, ids.len() * cols);
        let ids_buffer = Buffer::from_slice(client, &ids);
        medvl_kernels::dequant::dequantize_rows(client, &matrix, &ids_buffer, ids.len(), &out)
            .unwrap();
        let got = out.read(client).unwrap();
        let host = weight.dequantize();
        for (b, &id) in ids.iter().enumerate() {
            let row = if (id as usize) < rows { id as usize } else { 0 };
            for c in 0..cols {
                let (g, want) = (got[b * cols + c], full[row * cols + c]);
                assert_eq!(
                    g.host_to().to_bits(),
                    want.host_to().to_bits(),
                    "{rows}x{cols} id {id} column {c}"
                );
                // The host's bitsandbytes values, to the last place of F (or one fused rounding off).
                let h = F::host_from(host[row * cols + c]).host_to();
                assert!(
                    (g.host_to() - h).abs() <= h.abs() * 1e-2 + 1e-6,
                    "{g:?} {h}"
                );
            }
        }
    }
    let weight = Nf4Matrix::upload(client, &random_weight(4, 60, 32, false, 90)).unwrap();
    let ids = Buffer::from_slice(client, &[0u32]);
    let out = Buffer::<F>::empty(client, 60);
    assert!(matches!(
        medvl_kernels::dequant::dequantize_rows(client, &weight, &ids, 1, &out),
        Err(KernelError::Unsupported(_))
    ));
    let weight = Nf4Matrix::upload(client, &random_weight(4, 64, 64, true, 91)).unwrap();
    assert!(matches!(
        medvl_kernels::dequant::dequantize_rows(client, &weight, &ids, 2, &out),
        Err(KernelError::BufferTooSmall { .. })
    ));
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

    fn client() -> ComputeClient<WgpuRuntime> {
        WgpuRuntime::client(&WgpuDevice::default())
    }

    #[test]
    fn shapes_and_batches_f32() {
        shapes_and_batches::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn block_sizes_and_plain_scales_f32() {
        block_sizes_and_plain_scales::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn rejects_bad_launches_wgpu() {
        rejects_bad_launches::<WgpuRuntime>(&client());
    }

    #[test]
    fn every_tiling_f32() {
        every_tiling::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn gemm_refuses_f32_and_lavapipe() {
        gemm_refuses_unsupported::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn mma_refuses_f32_and_lavapipe() {
        mma_refuses_unsupported::<WgpuRuntime, f32>(&client(), false);
    }

    #[test]
    fn dequantize_f32() {
        dequantize_exactly::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn dequantize_rows_f32() {
        dequantize_rows_exactly::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn gated_unit_f32() {
        gated_unit::<WgpuRuntime, f32>(&client(), false);
    }

    #[test]
    fn stacked_f32() {
        stacked::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn copy_probe_wgpu() {
        copy_probe_copies::<WgpuRuntime>(&client());
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use cubecl::cuda::{CudaDevice, CudaRuntime};

    fn client() -> ComputeClient<CudaRuntime> {
        CudaRuntime::client(&CudaDevice::default())
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_shapes_and_batches() {
        shapes_and_batches::<CudaRuntime, f32>(&client());
        shapes_and_batches::<CudaRuntime, bf16>(&client());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_block_sizes_and_plain_scales() {
        block_sizes_and_plain_scales::<CudaRuntime, f32>(&client());
        block_sizes_and_plain_scales::<CudaRuntime, bf16>(&client());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_rejects_bad_launches() {
        rejects_bad_launches::<CudaRuntime>(&client());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_gated_unit() {
        gated_unit::<CudaRuntime, f32>(&client(), true);
        gated_unit::<CudaRuntime, bf16>(&client(), true);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_every_tiling() {
        // bf16 only: the f32 kernels are the same code with 4-value vectors, which CI runs on lavapipe; each
        // tiling is its own kernel to compile, and both types took over 4 minutes on a fresh machine.
        every_tiling::<CudaRuntime, bf16>(&client());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_gemm() {
        let client = client();
        gemm_shapes::<CudaRuntime, bf16>(&client);
        gemm_shapes::<CudaRuntime, half::f16>(&client);
        gemm_dense_shapes::<CudaRuntime, bf16>(&client);
        gemm_refuses_unsupported::<CudaRuntime, f32>(&client);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_mma() {
        let client = client();
        mma_shapes::<CudaRuntime, bf16>(&client);
        mma_shapes::<CudaRuntime, half::f16>(&client);
        mma_refuses_unsupported::<CudaRuntime, bf16>(&client, true);
        mma_refuses_unsupported::<CudaRuntime, f32>(&client, false);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_dequantize() {
        dequantize_exactly::<CudaRuntime, f32>(&client());
        dequantize_exactly::<CudaRuntime, bf16>(&client());
        dequantize_exactly::<CudaRuntime, half::f16>(&client());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_dequantize_rows() {
        dequantize_rows_exactly::<CudaRuntime, f32>(&client());
        dequantize_rows_exactly::<CudaRuntime, bf16>(&client());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_stacked() {
        stacked::<CudaRuntime, f32>(&client());
        stacked::<CudaRuntime, bf16>(&client());
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn cuda_copy_probe() {
        copy_probe_copies::<CudaRuntime>(&client());
    }
}

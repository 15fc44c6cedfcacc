//! Matrix products with more activation rows than the GEMV takes, on the tensor cores:
//! `y[m, n] = sum_k x[m, k] * W[n, k]` for any number of rows `m` (decode batches past 8, prefill).
//!
//! Each cube computes a tile of `16 * m_frags` rows by `16 * n_planes` outputs. Stage by stage along `k`, its
//! 128 units dequantize the weight tile (NF4 in the bitsandbytes layout of [`Nf4Matrix`]: codes looked up in a
//! 16-entry table, times the block scale, rounded to the activation type as bitsandbytes' dequantization does)
//! and copy the activation tile into shared memory; then each of its 4 planes multiplies 16x16x16 fragments with
//! CubeCL's `cmma` (bf16 or f16 in, f32 accumulation). With fewer than 4 planes along `n` the others split the
//! stage's width (split-K inside the cube) and the planes' sums are added through shared memory at the end. The
//! weight is read once per 16 * `m_frags` rows.
//!
//! The tensor cores are needed: [`supported`] says whether the device has them for the activation type
//! (NVIDIA since Volta for f16, Ampere for bf16; not CPU Vulkan drivers).

use cubecl::ir::features::MmaConfig;
use cubecl::prelude::*;

use crate::nf4::{Activation, Nf4Matrix, Scales, block_scale, decode_word, load_codebook};
use crate::{Buffer, KernelError};

/// Planes (warps) per cube.
const PLANES: usize = 4;

/// How [`gemm_nf4`] tiles the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmTiling {
    /// 16-row fragments of `x` per cube (the cube's rows are `16 * m_frags`).
    pub m_frags: usize,
    /// Planes along the outputs, each 16 wide (1, 2 or 4); the other `4 / n_planes` split the width.
    pub n_planes: usize,
    /// 32-wide chunks of the width each plane takes per stage (even).
    pub k_chunks: usize,
}

impl GemmTiling {
    /// The tiling for `rows` outputs and `m` activation rows: wide matrices (gate/up, lm_head) give every plane
    /// its own outputs; narrower ones (q/k/v, o, down) need split-K to fill the GPU. Shared memory stays under
    /// 48 KiB per cube.
    pub fn for_shape(rows: usize, m: usize) -> Self {
        let m_frags = m.div_ceil(16).clamp(1, 2);
        if rows >= 16384 {
            Self {
                m_frags,
                n_planes: 4,
                k_chunks: 4,
            }
        } else {
            Self {
                m_frags,
                n_planes: 1,
                k_chunks: 2,
            }
        }
    }

    fn validate(self) -> Result<(), KernelError> {
        if !(1..=4).contains(&self.m_frags)
            || ![1, 2, 4].contains(&self.n_planes)
            || !(2..=8).contains(&self.k_chunks)
            || !self.k_chunks.is_multiple_of(2)
        {
            return Err(KernelError::Unsupported(format!(
                "GEMM tiling {self:?}: m_frags 1-4, n_planes 1, 2 or 4, k_chunks even, 2-8"
            )));
        }
        Ok(())
    }
}

/// Whether the device multiplies `F` fragments (16x16x16, f32 accumulation) on its tensor cores.
pub fn supported<R: Runtime, F: Activation>(client: &ComputeClient<R>) -> bool {
    let ty = F::as_type_native_unchecked().storage_type();
    client
        .properties()
        .features
        .matmul
        .cmma
        .contains(&MmaConfig {
            a_type: ty,
            b_type: ty,
            cd_type: f32::as_type_native_unchecked().storage_type(),
            m: 16,
            n: 16,
            k: 16,
        })
}

/// `y = x W^T` for an NF4 `W`: `x` is `[m, cols]`, `y` is `[m, rows]`, both row-major in `F` (bf16 or f16), any
/// `m >= 1`; `cols` a multiple of 32. Launches one kernel; nothing is read back.
pub fn gemm_nf4<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    m: usize,
    weight: &Nf4Matrix,
    y: &Buffer<F>,
) -> Result<(), KernelError> {
    gemm_nf4_tiled(
        client,
        x,
        m,
        weight,
        y,
        GemmTiling::for_shape(weight.rows, m),
    )
}

/// [`gemm_nf4`] with an explicit tiling.
pub fn gemm_nf4_tiled<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    m: usize,
    weight: &Nf4Matrix,
    y: &Buffer<F>,
    tiling: GemmTiling,
) -> Result<(), KernelError> {
    tiling.validate()?;
    if !supported::<R, F>(client) {
        return Err(KernelError::Unsupported(format!(
            "the device has no 16x16x16 tensor-core product for {} activations",
            std::any::type_name::<F>()
        )));
    }
    if m == 0 || !weight.cols.is_multiple_of(32) {
        return Err(KernelError::Unsupported(format!(
            "GEMM of {m} rows by a {}x{} NF4 matrix: at least one row and a width that is a multiple of 32",
            weight.rows, weight.cols
        )));
    }
    if m * weight.cols >= u32::MAX as usize || m * weight.rows >= u32::MAX as usize {
        return Err(KernelError::Unsupported(format!(
            "{m} rows of {} inputs and {} outputs: more values than 32-bit indexing covers",
            weight.cols, weight.rows
        )));
    }
    x.check("x", m * weight.cols)?;
    y.check("y", m * weight.rows)?;
    let plane = crate::plane_size(client);
    let cube_count = CubeCount::Static(
        (weight.rows as u32).div_ceil(16 * tiling.n_planes as u32),
        (m as u32).div_ceil(16 * tiling.m_frags as u32),
        1,
    );
    let (codes, scales, offsets, map, double_quant) = match &weight.scales {
        Scales::Double {
            codes,
            nested,
            offsets,
            map,
        } => (codes, nested, offsets, map, true),
        // The code, offset and map arguments are not read without double quantization.
        Scales::Plain(absmax) => (&weight.packed, absmax, absmax, &weight.codebook, false),
    };
    // SAFETY: every array is passed with the element count of its own buffer; the kernel reads `x` only below
    // row `m` and column `cols`, the weight only below row `rows`, and writes `y` only inside `[m, rows]`, all
    // checked above.
    #[allow(unsafe_code)]
    unsafe {
        gemm_nf4_kernel::launch_unchecked::<F, R>(
            client,
            cube_count,
            CubeDim::new_2d(plane, PLANES as u32),
            16 / size_of::<F>(),
            x.array_arg(),
            weight.packed.array_arg(),
            codes.array_arg(),
            scales.array_arg(),
            offsets.array_arg(),
            map.array_arg(),
            weight.codebook.array_arg(),
            y.array_arg(),
            m as u32,
            weight.rows as u32,
            weight.cols as u32,
            weight.blocksize as u32,
            double_quant,
            tiling.m_frags,
            tiling.n_planes,
            tiling.k_chunks,
        );
    }
    Ok(())
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemm_nf4_kernel<F: Float, NX: Size>(
    x: &Array<Vector<F, NX>>,
    packed: &Array<Vector<u32, Const<4>>>,
    codes: &Array<u32>,
    scales: &Array<f32>,
    offsets: &Array<f32>,
    map: &Array<f32>,
    codebook: &Array<f32>,
    y: &mut Array<F>,
    m: u32,
    rows: u32,
    cols: u32,
    #[comptime] blocksize: u32,
    #[comptime] double_quant: bool,
    #[comptime] m_frags: usize,
    #[comptime] n_planes: usize,
    #[comptime] k_chunks: usize,
) {
    let table = load_codebook(codebook);
    let k_planes = comptime!(PLANES / n_planes);
    let tile_m = comptime!(16 * m_frags);
    let tile_n = comptime!(16 * n_planes);
    // Width of one plane's part of a stage, and of the whole stage.
    let plane_k = comptime!(32 * k_chunks);
    let stage_k = comptime!(plane_k * k_planes);
    let stage_units = comptime!(tile_n * stage_k / 32);
    let nx = NX::value();
    let x_vectors = comptime!(tile_m * stage_k) / nx;

    // Fragment loads and stores need 32-byte aligned rows: every row offset below is a multiple of 16 values.
    let mut xs = SharedMemory::<F>::new_aligned(comptime!(tile_m * stage_k), 32usize);
    let mut ws = SharedMemory::<F>::new_aligned(comptime!(tile_n * stage_k), 32usize);
    let mut sums = SharedMemory::<f32>::new_aligned(comptime!(k_planes * tile_m * tile_n), 32usize);

    let n0 = CUBE_POS_X * comptime!(tile_n as u32);
    let m0 = CUBE_POS_Y * comptime!(tile_m as u32);
    let plane = UNIT_POS_Y as usize;
    let plane_n = plane % n_planes;
    let plane_kk = plane / n_planes;
    let chunks = cols / 32;
    let x_row_vectors = cols as usize / nx;

    let mut accs = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..m_frags {
        accs.push(cmma::Matrix::<f32>::from_value(
            cmma::MatrixIdent::Accumulator,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::Undefined,
            0.0,
        ));
    }
    let mut values = Array::<f32>::new(8usize);

    for k0 in range_stepped(0, cols, comptime!(stage_k as u32)) {
        // The weight tile: `tile_n` rows of `stage_k` values, 32 (one 16-byte word group, inside one block) per
        // unit of work; rows past the end re-read the last row, widths past the end are zeros.
        for unit in range_stepped(UNIT_POS, comptime!(stage_units as u32), CUBE_DIM) {
            let r = unit / comptime!((stage_k / 32) as u32);
            let c = unit % comptime!((stage_k / 32) as u32);
            let chunk = k0 / 32 + c;
            let base = (r * comptime!(stage_k as u32) + c * 32) as usize;
            if chunk < chunks {
                let mut row = n0 + r;
                if row >= rows {
                    row = rows - 1;
                }
                let words = packed[(row * chunks + chunk) as usize];
                let scale = block_scale(
                    (row * cols + chunk * 32) / blocksize,
                    codes,
                    scales,
                    offsets,
                    map,
                    double_quant,
                );
                #[unroll]
                for w in 0..4usize {
                    decode_word(words[w], &table, &mut values, 0usize);
                    #[unroll]
                    for j in 0..8usize {
                        ws[base + w * 8 + j] = F::cast_from(values[j] * scale);
                    }
                }
            } else {
                #[unroll]
                for j in 0..32usize {
                    ws[base + j] = F::cast_from(0.0f32);
                }
            }
        }
        // The activation tile: `tile_m` rows of `stage_k` values; rows past `m` and widths past the end are
        // zeros.
        for v in range_stepped(UNIT_POS as usize, x_vectors, CUBE_DIM as usize) {
            let r = v / (stage_k / nx);
            let c = v % (stage_k / nx);
            let col = k0 as usize + c * nx;
            let base = r * stage_k + c * nx;
            if m0 as usize + r < m as usize && col < cols as usize {
                let xv = x[(m0 as usize + r) * x_row_vectors + col / nx];
                #[unroll]
                for e in 0..nx {
                    xs[base + e] = xv[e];
                }
            } else {
                #[unroll]
                for e in 0..nx {
                    xs[base + e] = F::cast_from(0.0f32);
                }
            }
        }
        sync_cube();
        // This plane's outputs `16 * plane_n ..` over its part of the stage.
        #[unroll]
        for kk in 0..comptime!(plane_k / 16) {
            let col = plane_kk * plane_k + kk * 16;
            let b = cmma::Matrix::<F>::from_slice(
                cmma::MatrixIdent::B,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::ColMajor,
                &ws.slice(plane_n * 16 * stage_k + col, comptime!(tile_n * stage_k)),
                comptime!(stage_k as u32),
            );
            #[unroll]
            for i in 0..m_frags {
                let a = cmma::Matrix::<F>::from_slice(
                    cmma::MatrixIdent::A,
                    16usize,
                    16usize,
                    16usize,
                    cmma::MatrixLayout::RowMajor,
                    &xs.slice(i * 16 * stage_k + col, comptime!(tile_m * stage_k)),
                    comptime!(stage_k as u32),
                );
                let acc = accs.index(i);
                cmma::execute::<F, F, f32, f32>(&a, &b, acc, acc);
            }
        }
        sync_cube();
    }

    // Each plane's sums into shared memory, then the planes that split the width are added and written.
    #[unroll]
    for i in 0..m_frags {
        let start = plane_kk * tile_m * tile_n + i * 16 * tile_n + plane_n * 16;
        cmma::store(
            &mut sums.slice_mut(start, comptime!(k_planes * tile_m * tile_n)),
            accs.index(i),
            comptime!(tile_n as u32),
            cmma::MatrixLayout::RowMajor,
        );
    }
    sync_cube();
    for at in range_stepped(UNIT_POS, comptime!((tile_m * tile_n) as u32), CUBE_DIM) {
        let r = at / comptime!(tile_n as u32);
        let c = at % comptime!(tile_n as u32);
        if m0 + r < m && n0 + c < rows {
            let mut total = 0.0f32;
            #[unroll]
            for p in 0..k_planes {
                total += sums[p * tile_m * tile_n + at as usize];
            }
            y[((m0 + r) * rows + n0 + c) as usize] = F::cast_from(total);
        }
    }
}

//! Matrix products with more activation rows than the GEMV takes, on the tensor cores:
//! `y[m, n] = sum_k x[m, k] * W[n, k]` for any number of rows `m` (decode batches past 8, prefill).
//!
//! Weights NF4 ([`gemm_nf4`]) or dense in the activation type ([`gemm_dense`]). Each cube computes a tile of
//! `16 * m_frags` rows by `16 * n_planes` outputs. Stage by stage along `k`, its 128 units fill the weight tile
//! in shared memory (NF4 in the bitsandbytes layout of [`Nf4Matrix`] dequantized: codes looked up in a 16-entry
//! table, times the block scale, rounded to the activation type as bitsandbytes' dequantization does; dense
//! copied) and copy the activation tile beside it; then each of its 4 planes multiplies 16x16x16 fragments with
//! CubeCL's `cmma` (bf16 or f16 in, f32 accumulation). With fewer than 4 planes along `n` the others split the
//! stage's width (split-K inside the cube) and the planes' sums are added through shared memory at the end. The
//! weight is read once per `16 * m_frags` rows.
//!
//! The tensor cores are needed: [`supported`] says whether the device has them for the activation type
//! (NVIDIA since Volta for f16, Ampere for bf16; not CPU Vulkan drivers).

use cubecl::ir::features::MmaConfig;
use cubecl::prelude::*;

use crate::decode::DenseMatrix;
use crate::nf4::{Activation, Nf4Matrix, block_scale, decode_word, load_codebook};
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
    check_launch::<R, F>(client, x, m, weight.rows, weight.cols, y, tiling)?;
    let (codes, scales, offsets, map, double_quant) = weight.scale_args();
    // SAFETY: every array is passed with the element count of its own buffer; the kernel reads `x` only below
    // row `m` and column `cols`, the weight only below row `rows`, and writes `y` only inside `[m, rows]`, all
    // checked above.
    #[allow(unsafe_code)]
    unsafe {
        gemm_nf4_kernel::launch_unchecked::<F, R>(
            client,
            cube_count(m, weight.rows, tiling),
            CubeDim::new_2d(crate::plane_size(client), PLANES as u32),
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

/// `y = x W^T` for a dense `W` in the activation type: `x` is `[m, cols]`, `y` is `[m, rows]`, row-major, any
/// `m >= 1`; `cols` a multiple of 32. Launches one kernel; nothing is read back.
pub fn gemm_dense<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    m: usize,
    weight: &DenseMatrix<F>,
    y: &Buffer<F>,
) -> Result<(), KernelError> {
    let tiling = GemmTiling::for_shape(weight.rows, m);
    check_launch::<R, F>(client, x, m, weight.rows, weight.cols, y, tiling)?;
    // SAFETY: as in `gemm_nf4_tiled`: the arrays are passed with their own lengths, and the kernel stays inside
    // `[m, cols]`, `[rows, cols]` and `[m, rows]`, checked above.
    #[allow(unsafe_code)]
    unsafe {
        gemm_dense_kernel::launch_unchecked::<F, R>(
            client,
            cube_count(m, weight.rows, tiling),
            CubeDim::new_2d(crate::plane_size(client), PLANES as u32),
            16 / size_of::<F>(),
            x.array_arg(),
            weight.weight.array_arg(),
            y.array_arg(),
            m as u32,
            weight.rows as u32,
            weight.cols as u32,
            tiling.m_frags,
            tiling.n_planes,
            tiling.k_chunks,
        );
    }
    Ok(())
}

/// The checks every GEMM launch makes: tiling, tensor cores, shapes, buffer lengths.
fn check_launch<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    m: usize,
    rows: usize,
    cols: usize,
    y: &Buffer<F>,
    tiling: GemmTiling,
) -> Result<(), KernelError> {
    tiling.validate()?;
    if size_of::<F>() != 2 || !supported::<R, F>(client) {
        return Err(KernelError::Unsupported(format!(
            "the device has no 16x16x16 tensor-core product for {} activations",
            std::any::type_name::<F>()
        )));
    }
    if m == 0 || !cols.is_multiple_of(32) {
        return Err(KernelError::Unsupported(format!(
            "GEMM of {m} rows by a {rows}x{cols} matrix: at least one row and a width that is a multiple of 32"
        )));
    }
    if m * cols >= u32::MAX as usize
        || m * rows >= u32::MAX as usize
        || rows * cols >= u32::MAX as usize
    {
        return Err(KernelError::Unsupported(format!(
            "{m} rows of {cols} inputs and {rows} outputs: more values than 32-bit indexing covers"
        )));
    }
    x.check("x", m * cols)?;
    y.check("y", m * rows)
}

/// One cube per tile of outputs and rows.
fn cube_count(m: usize, rows: usize, tiling: GemmTiling) -> CubeCount {
    CubeCount::Static(
        (rows as u32).div_ceil(16 * tiling.n_planes as u32),
        (m as u32).div_ceil(16 * tiling.m_frags as u32),
        1,
    )
}

/// The sizes of a cube's tiles for a tiling (compile-time constants of the kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Tile {
    m_frags: usize,
    n_planes: usize,
    /// Planes splitting the width.
    k_planes: usize,
    /// Rows of `x` per cube.
    m: usize,
    /// Outputs per cube.
    n: usize,
    /// Width of one plane's part of a stage.
    plane_k: usize,
    /// Width of a stage.
    stage_k: usize,
    /// Values from one row of a shared tile to the next: the stage's width plus 8, so that consecutive rows
    /// start 16 bytes apart in the banks (fragment loads of 16 rows then spread over all of them) and every
    /// fragment stays 32-byte aligned.
    stride: usize,
}

impl Tile {
    fn new(m_frags: usize, n_planes: usize, k_chunks: usize) -> Self {
        let k_planes = PLANES / n_planes;
        Self {
            m_frags,
            n_planes,
            k_planes,
            m: 16 * m_frags,
            n: 16 * n_planes,
            plane_k: 32 * k_chunks,
            stage_k: 32 * k_chunks * k_planes,
            stride: 32 * k_chunks * k_planes + 8,
        }
    }
}

/// Zeroed accumulators, one per 16-row fragment of the cube's rows.
#[cube]
fn accumulators(#[comptime] m_frags: usize) -> Sequence<cmma::Matrix<f32>> {
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
    accs
}

/// Copies the activation tile of the stage at `k0` into `xs` (`tile.m` rows of `tile.stage_k` values, 16 bytes
/// per load and store); rows past `m` and widths past `cols` are zeros.
#[cube]
fn load_x_tile<F: Float, NX: Size>(
    x: &Array<Vector<F, NX>>,
    xs: &mut SharedMemory<Vector<F, NX>>,
    m: u32,
    cols: u32,
    m0: u32,
    k0: u32,
    #[comptime] tile: Tile,
) {
    let nx = NX::value();
    let row_vectors = comptime!(tile.stage_k) / nx;
    for v in range_stepped(
        UNIT_POS as usize,
        comptime!(tile.m * tile.stage_k) / nx,
        CUBE_DIM as usize,
    ) {
        let r = v / row_vectors;
        let c = v % row_vectors;
        let col = k0 as usize + c * nx;
        let at = (r * comptime!(tile.stride) + c * nx) / nx;
        if m0 as usize + r < m as usize && col < cols as usize {
            xs[at] = x[(m0 as usize + r) * (cols as usize / nx) + col / nx];
        } else {
            xs[at] = Vector::new(F::cast_from(0.0f32));
        }
    }
}

/// This plane's products over its part of the stage: outputs `16 * (plane % n_planes)..` of the cube, every
/// row fragment.
#[cube]
fn multiply_stage<F: Float, NX: Size>(
    xs: &SharedMemory<Vector<F, NX>>,
    ws: &SharedMemory<Vector<F, NX>>,
    accs: &Sequence<cmma::Matrix<f32>>,
    #[comptime] tile: Tile,
) {
    let nx = NX::value();
    let plane = UNIT_POS_Y as usize;
    let plane_n = plane % comptime!(tile.n_planes);
    let plane_kk = plane / comptime!(tile.n_planes);
    let stride = comptime!(tile.stride as u32);
    #[unroll]
    for kk in 0..comptime!(tile.plane_k / 16) {
        let col = plane_kk * comptime!(tile.plane_k) + kk * 16;
        let b = cmma::Matrix::<F>::from_value(
            cmma::MatrixIdent::B,
            16usize,
            16usize,
            16usize,
            cmma::MatrixLayout::ColMajor,
            F::cast_from(0.0f32),
        );
        cmma::load(
            &b,
            &ws.slice(
                (plane_n * 16 * comptime!(tile.stride) + col) / nx,
                comptime!(tile.n * tile.stride) / nx,
            ),
            stride,
        );
        #[unroll]
        for i in 0..comptime!(tile.m_frags) {
            let a = cmma::Matrix::<F>::from_value(
                cmma::MatrixIdent::A,
                16usize,
                16usize,
                16usize,
                cmma::MatrixLayout::RowMajor,
                F::cast_from(0.0f32),
            );
            cmma::load(
                &a,
                &xs.slice(
                    (i * 16 * comptime!(tile.stride) + col) / nx,
                    comptime!(tile.m * tile.stride) / nx,
                ),
                stride,
            );
            let acc = accs.index(i);
            cmma::execute::<F, F, f32, f32>(&a, &b, acc, acc);
        }
    }
}

/// Each plane's sums into shared memory, then the planes that split the width added and written to
/// `y[m0.., n0..]` inside `[m, rows]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_tile<F: Float>(
    accs: &Sequence<cmma::Matrix<f32>>,
    y: &mut Array<F>,
    m: u32,
    rows: u32,
    m0: u32,
    n0: u32,
    #[comptime] tile: Tile,
) {
    let size = comptime!(tile.m * tile.n);
    let mut sums = SharedMemory::<f32>::new_aligned(comptime!(tile.k_planes * size), 32usize);
    let plane = UNIT_POS_Y as usize;
    let plane_n = plane % comptime!(tile.n_planes);
    let plane_kk = plane / comptime!(tile.n_planes);
    #[unroll]
    for i in 0..comptime!(tile.m_frags) {
        let start = plane_kk * size + i * 16 * comptime!(tile.n) + plane_n * 16;
        cmma::store(
            &mut sums.slice_mut(start, comptime!(tile.k_planes * size)),
            accs.index(i),
            comptime!(tile.n as u32),
            cmma::MatrixLayout::RowMajor,
        );
    }
    sync_cube();
    for at in range_stepped(UNIT_POS, comptime!(size as u32), CUBE_DIM) {
        let r = at / comptime!(tile.n as u32);
        let c = at % comptime!(tile.n as u32);
        if m0 + r < m && n0 + c < rows {
            let mut total = 0.0f32;
            #[unroll]
            for p in 0..comptime!(tile.k_planes) {
                total += sums[p * size + at as usize];
            }
            y[((m0 + r) * rows + n0 + c) as usize] = F::cast_from(total);
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemm_nf4_kernel<F: Float, NX: Size>(
    x: &Array<Vector<F, NX>>,
    packed: &Array<u32>,
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
    let tile = comptime!(Tile::new(m_frags, n_planes, k_chunks));
    let nx = NX::value();
    // Units of work: one u32 of codes (8 values, one 16-byte store), four per 32-value chunk.
    let stage_words = comptime!(tile.n * tile.stage_k / 8);
    let words_per_row = comptime!((tile.stage_k / 8) as u32);
    // Fragment loads and stores need 32-byte aligned rows: every row offset is a multiple of 16 values.
    let mut xs =
        SharedMemory::<Vector<F, NX>>::new_aligned(comptime!(tile.m * tile.stride / nx), 32usize);
    let mut ws =
        SharedMemory::<Vector<F, NX>>::new_aligned(comptime!(tile.n * tile.stride / nx), 32usize);
    let n0 = CUBE_POS_X * comptime!(tile.n as u32);
    let m0 = CUBE_POS_Y * comptime!(tile.m as u32);
    let chunks = cols / 32;
    let accs = accumulators(m_frags);
    let mut values = Array::<f32>::new(8usize);

    for k0 in range_stepped(0, cols, comptime!(tile.stage_k as u32)) {
        // The weight tile: `tile.n` rows of `stage_k` values; consecutive units take consecutive words of a row
        // (coalesced loads, conflict-free stores). Rows past the end re-read the last row, widths past the end
        // are zeros.
        for unit in range_stepped(UNIT_POS, comptime!(stage_words as u32), CUBE_DIM) {
            let r = unit / words_per_row;
            let c = unit % words_per_row;
            let chunk = k0 / 32 + c / 4;
            let at = ((r * comptime!(tile.stride as u32) + c * 8) as usize) / nx;
            if chunk < chunks {
                let mut row = n0 + r;
                if row >= rows {
                    row = rows - 1;
                }
                let word = packed[((row * chunks + chunk) * 4 + c % 4) as usize];
                let scale = block_scale::<Array<f32>>(
                    (row * cols + chunk * 32) / blocksize,
                    codes,
                    scales,
                    offsets,
                    map,
                    double_quant,
                );
                decode_word(word, &table, &mut values, 0usize);
                let mut v = Vector::<F, NX>::empty();
                #[unroll]
                for j in 0..nx {
                    v[j] = F::cast_from(values[j] * scale);
                }
                ws[at] = v;
            } else {
                ws[at] = Vector::new(F::cast_from(0.0f32));
            }
        }
        load_x_tile(x, &mut xs, m, cols, m0, k0, tile);
        sync_cube();
        multiply_stage(&xs, &ws, &accs, tile);
        sync_cube();
    }
    write_tile(&accs, y, m, rows, m0, n0, tile);
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemm_dense_kernel<F: Float, NX: Size>(
    x: &Array<Vector<F, NX>>,
    weight: &Array<Vector<F, NX>>,
    y: &mut Array<F>,
    m: u32,
    rows: u32,
    cols: u32,
    #[comptime] m_frags: usize,
    #[comptime] n_planes: usize,
    #[comptime] k_chunks: usize,
) {
    let tile = comptime!(Tile::new(m_frags, n_planes, k_chunks));
    let nx = NX::value();
    let row_vectors = comptime!(tile.stage_k) / nx;
    let mut xs =
        SharedMemory::<Vector<F, NX>>::new_aligned(comptime!(tile.m * tile.stride / nx), 32usize);
    let mut ws =
        SharedMemory::<Vector<F, NX>>::new_aligned(comptime!(tile.n * tile.stride / nx), 32usize);
    let n0 = CUBE_POS_X * comptime!(tile.n as u32);
    let m0 = CUBE_POS_Y * comptime!(tile.m as u32);
    let accs = accumulators(m_frags);

    for k0 in range_stepped(0, cols, comptime!(tile.stage_k as u32)) {
        // The weight tile, 16 bytes per load and store; rows past the end re-read the last row, widths past the
        // end are zeros.
        for v in range_stepped(
            UNIT_POS as usize,
            comptime!(tile.n * tile.stage_k) / nx,
            CUBE_DIM as usize,
        ) {
            let r = v / row_vectors;
            let c = v % row_vectors;
            let col = k0 as usize + c * nx;
            let at = (r * comptime!(tile.stride) + c * nx) / nx;
            if col < cols as usize {
                let mut row = n0 as usize + r;
                if row >= rows as usize {
                    row = rows as usize - 1;
                }
                ws[at] = weight[row * (cols as usize / nx) + col / nx];
            } else {
                ws[at] = Vector::new(F::cast_from(0.0f32));
            }
        }
        load_x_tile(x, &mut xs, m, cols, m0, k0, tile);
        sync_cube();
        multiply_stage(&xs, &ws, &accs, tile);
        sync_cube();
    }
    write_tile(&accs, y, m, rows, m0, n0, tile);
}

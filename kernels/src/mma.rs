//! The NF4 matrix-vector product on the tensor cores, for decode batches of 1 to 32 rows:
//! `y[b, n] = sum_k x[b, k] * W[n, k]`, the weight in the bitsandbytes layout of [`Nf4Matrix`], read once.
//!
//! The GEMV of [`crate::nf4`] spends about five instructions per code (a shift, a mask, a table read, an FMA per
//! activation row and the conversion of each activation), which keeps it at about half the memory bandwidth on
//! an H100 and makes every added activation row cost more FMAs. Here each plane (warp) computes 16 output rows
//! with `mma.m16n8k16` (bf16 or f16 in, f32 accumulation), one instruction per 16 rows x 16 codes x 8 activation
//! rows: the only per-code work left is turning a byte (two codes) into the pair of half-precision values the
//! fragment register holds, one read of a 256-entry table in shared memory ([`Nf4Matrix`] keeps it per type).
//!
//! Layout: lane `(g, q) = (lane / 4, lane % 4)` holds rows `g` and `g + 8` of the fragment's 16. For every
//! 64-value sub-block `j` of a row, lane `q` loads the row's 8 bytes `32 j + 8 q ..` (16 codes, inside one scale
//! block) for both of its rows; the four mma steps of the sub-block take two bytes each (codes `4 s .. 4 s + 4`
//! of the lane's 16). The dot product does not care in which order `k` is summed, so the fragment's `k` index is
//! mapped to these codes, and lane `(g, q)` loads the matching 4 activations of row `8 t + g` for the `B`
//! fragment. The four steps of a sub-block accumulate into a scratch fragment that is then multiplied by the two
//! rows' block scales and added to the sums: the scales are applied in f32, once per 64 products.
//!
//! The half-precision table rounds each NF4 value to the activation type before the products (bitsandbytes
//! rounds the scaled value instead): both are one rounding of the weight.
//!
//! Each cube copies the pair table (32 copies by default, copy `c` of entry `e` at `e * 32 + c`, so that lane `l`
//! always reads bank `l`: random bytes cost no bank conflicts) and the double-quantization map to shared memory,
//! then computes its 16-row tile, or with [`MmaTiling::cubes_per_sm`] every `CUBE_COUNT`-th tile (the tables
//! filled once for several tiles; measured no faster on an H200, docs/KERNELS.md).

use std::sync::atomic::{AtomicBool, Ordering};

use cubecl::ir::features::MmaConfig;
use cubecl::prelude::*;

use crate::decode::DenseMatrix;
use crate::nf4::{Activation, Nf4Matrix, block_scale};
use crate::{Buffer, KernelError};

/// Most activation rows one launch takes (four 8-row fragments).
pub const MAX_ROWS: usize = 32;

/// The fewest activation rows for which this kernel beats the plain GEMV of [`crate::nf4`] on an H100 at the 7B's
/// shapes (`medvl-bench kernels`, docs/KERNELS.md); callers choose, this is the measured default.
pub const PREFERRED_FROM: usize = 4;

/// The most activation rows per launch that keep this kernel fast on an H100: 32 rows (four fragments per plane)
/// take 1.4-3x as long as two launches of 16 (`medvl-bench kernels`, docs/KERNELS.md).
pub const PREFERRED_MAX: usize = 16;

static PREVIOUS_TILING: AtomicBool = AtomicBool::new(false);

/// Process-wide: [`gemv_mma`] takes the tiling it took before the conflict-free table
/// ([`MmaTiling::previous_for_shape`]), so that benchmarks can compare both in one process. Off by default; both
/// compute the same sums.
pub fn set_previous_tiling(previous: bool) {
    PREVIOUS_TILING.store(previous, Ordering::Relaxed);
}

/// Shared memory a cube may take: what CUDA gives a kernel without opting in to more.
const SHARED_BYTES: usize = 48 * 1024;

/// How [`gemv_mma`] splits its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaTiling {
    /// Planes sharing one 16-row tile, each over every `split`-th 64-value sub-block (split-K in the cube).
    pub split: usize,
    /// Sub-blocks each lane loads before using any.
    pub unroll: usize,
    /// Copies of the 256-entry pair table in shared memory, lane `l` reading copy `l % copies` (fewer bank
    /// conflicts, more shared memory; 32: none).
    pub copies: usize,
    /// Cubes per streaming multiprocessor, each looping over every `cubes`-th 16-row tile, so that a cube fills its
    /// tables once for many tiles; 0: one cube per tile.
    pub cubes_per_sm: usize,
}

impl MmaTiling {
    /// The tiling for a `cols`-wide matrix and `batch` activation rows: 8 planes per 16-row tile (fewer when the
    /// width has fewer than 8 sub-blocks), one sub-block in flight per lane, one cube per tile. The sweep of `medvl-bench kernels
    /// --mma-sweep` on an H100 (docs/KERNELS.md) found 8 planes best or within a few percent of it at every shape
    /// of the 7B at 1 and 32 rows: more planes per cube share one table fill and fill the GPU for the matrices of
    /// few rows.
    ///
    /// Since 2026-11-28 the table has 32 copies from 9 activation rows on (no bank conflicts: 5% more tokens/s
    /// in the 7B step at 32 rows on an H200; at 8 rows the step was 5% slower with them, docs/KERNELS.md);
    /// [`set_previous_tiling`] takes the single copy of before at every batch, for comparisons on the same card.
    pub fn for_shape(rows: usize, cols: usize, batch: usize) -> Self {
        if PREVIOUS_TILING.load(Ordering::Relaxed) || batch <= 8 {
            return Self::previous_for_shape(rows, cols);
        }
        Self {
            copies: 32,
            ..Self::previous_for_shape(rows, cols)
        }
    }

    /// The tiling [`gemv_mma`] used before the conflict-free table (2026-11-28).
    pub fn previous_for_shape(_rows: usize, cols: usize) -> Self {
        let sub_blocks = (cols / 64).max(1);
        let mut split = 8;
        while split > sub_blocks {
            split /= 2;
        }
        Self {
            split,
            unroll: 1,
            copies: 1,
            cubes_per_sm: 0,
        }
    }

    fn validate(self) -> Result<(), KernelError> {
        if ![1, 2, 4, 8].contains(&self.split)
            || !(1..=4).contains(&self.unroll)
            || ![1, 2, 4, 8, 16, 32].contains(&self.copies)
            || self.cubes_per_sm > 16
        {
            return Err(KernelError::Unsupported(format!(
                "tensor-core GEMV tiling {self:?}: split 1, 2, 4 or 8, unroll 1-4, copies a power of two up to 32, \
                 at most 16 cubes per multiprocessor"
            )));
        }
        Ok(())
    }

    /// The cubes a launch over `rows` rows takes on this device: one per 16-row tile, or with `cubes_per_sm`
    /// that many per multiprocessor (never more than the tiles).
    fn cube_count<R: Runtime>(self, client: &ComputeClient<R>, rows: usize) -> u32 {
        let tiles = rows.div_ceil(16) as u32;
        let sms = client
            .properties()
            .hardware
            .num_streaming_multiprocessors
            .unwrap_or(1);
        match self.cubes_per_sm {
            0 => tiles,
            n => tiles.min(n as u32 * sms),
        }
    }
}

/// Whether the device has the `m16n8k16` tensor-core product for `F` with f32 accumulation (NVIDIA since
/// Ampere for bf16; not f32, not CPU Vulkan drivers).
pub fn supported<R: Runtime, F: Activation>(client: &ComputeClient<R>) -> bool {
    let ty = F::as_type_native_unchecked().storage_type();
    F::PAIR_TABLE.is_some()
        && client
            .properties()
            .features
            .matmul
            .mma
            .contains(&MmaConfig {
                a_type: ty,
                b_type: ty,
                cd_type: f32::as_type_native_unchecked().storage_type(),
                m: 16,
                n: 8,
                k: 16,
            })
}

/// Whether [`gemv_mma`] takes this weight and batch where it is [`supported`]: 1 to [`MAX_ROWS`] rows, a width
/// and a block size that are multiples of 64.
pub fn takes(weight: &Nf4Matrix, batch: usize) -> bool {
    (1..=MAX_ROWS).contains(&batch)
        && weight.cols.is_multiple_of(64)
        && weight.blocksize.is_multiple_of(64)
}

/// `y = x W^T`: `x` is `[batch, cols]`, `y` is `[batch, rows]`, row-major in `F` (bf16 or f16), `batch` in
/// `1..=32`. Launches one kernel; nothing is read back.
pub fn gemv_mma<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    batch: usize,
    weight: &Nf4Matrix,
    y: &Buffer<F>,
) -> Result<(), KernelError> {
    let tiling = MmaTiling::for_shape(weight.rows, weight.cols, batch);
    gemv_mma_tiled(client, x, batch, weight, y, tiling)
}

/// [`gemv_mma`] with an explicit tiling (for benchmarks).
pub fn gemv_mma_tiled<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    batch: usize,
    weight: &Nf4Matrix,
    y: &Buffer<F>,
    tiling: MmaTiling,
) -> Result<(), KernelError> {
    tiling.validate()?;
    let Some(table) = F::PAIR_TABLE else {
        return Err(unsupported::<F>());
    };
    if !supported::<R, F>(client) {
        return Err(unsupported::<F>());
    }
    if !(1..=MAX_ROWS).contains(&batch) {
        return Err(KernelError::Unsupported(format!(
            "batch {batch}: the tensor-core GEMV takes 1 to {MAX_ROWS} rows per launch"
        )));
    }
    if !takes(weight, batch) {
        return Err(KernelError::Unsupported(format!(
            "a {}x{} NF4 matrix with blocks of {}: the tensor-core GEMV needs a width and block size that are \
             multiples of 64",
            weight.rows, weight.cols, weight.blocksize
        )));
    }
    x.check("x", batch * weight.cols)?;
    y.check("y", batch * weight.rows)?;
    let (codes, scales, offsets, map, double_quant) = weight.scale_args();
    // Fewer copies of the table where its copies, the map and the split-K sums would pass the shared memory a
    // cube may take (many activation rows).
    let tiles = batch.div_ceil(8);
    let sums = tiling.split * 4 * tiles * 32;
    let mut copies = tiling.copies;
    while copies > 1 && 4 * (256 * copies + 256 + sums) > SHARED_BYTES {
        copies /= 2;
    }
    let cube_count = CubeCount::Static(tiling.cube_count(client, weight.rows), 1, 1);
    let cube_dim = CubeDim::new_2d(32, tiling.split as u32);
    // SAFETY: every array is passed with the element count of its own buffer; the kernel reads `x` below row
    // `batch` and column `cols`, the weight's codes below row `rows` (the packed words are a multiple of 16
    // bytes, `cols / 2` bytes per row), scales through `block_scale` as the GEMV does, 256 entries of its pair
    // table, and writes `y` inside `[batch, rows]`, all checked above.
    #[allow(unsafe_code)]
    unsafe {
        gemv_mma_kernel::launch_unchecked::<F, R>(
            client,
            cube_count,
            cube_dim,
            x.array_arg(),
            weight.packed.array_arg(),
            codes.array_arg(),
            scales.array_arg(),
            offsets.array_arg(),
            map.array_arg(),
            weight.pairs.slice(table * 256, 256)?.array_arg(),
            y.array_arg(),
            weight.rows as u32,
            weight.cols as u32,
            batch as u32,
            tiles,
            weight.blocksize as u32,
            double_quant,
            tiling.split,
            tiling.unroll,
            copies,
        );
    }
    Ok(())
}

fn unsupported<F>() -> KernelError {
    KernelError::Unsupported(format!(
        "the device has no m16n8k16 tensor-core product for {} activations",
        std::any::type_name::<F>()
    ))
}

/// The pair table of every NF4 byte value for the half-precision type `bits` converts to: entry `v` holds the
/// value of code `v >> 4` (the first of the byte's two codes) in its low 16 bits and of `v & 15` in its high.
pub(crate) fn pair_table(codebook: &[f32; 16], bits: impl Fn(f32) -> u16) -> Vec<u32> {
    (0..256usize)
        .map(|v| u32::from(bits(codebook[v >> 4])) | (u32::from(bits(codebook[v & 15])) << 16))
        .collect()
}

/// The fragment register of byte `byte` (0-7) of the lane's 8 loaded bytes.
#[cube]
fn pair<F: Float>(
    words: Vector<u32, Const<2>>,
    table: &SharedMemory<u32>,
    #[comptime] byte: usize,
    #[comptime] copies: u32,
) -> Vector<F, Const<2>> {
    let entry = (words[byte / 4] >> comptime!((byte % 4) as u32 * 8)) & 0xFF;
    Vector::<F, Const<2>>::reinterpret(table[(entry * copies + UNIT_POS_X % copies) as usize])
}

/// The `A` fragment of mma step `step` (0-3) of a sub-block: rows `g` (`low`) and `g + 8` (`high`), fragment
/// columns `2q, 2q + 1` from byte `2 step` and `2q + 8, 2q + 9` from byte `2 step + 1`.
#[cube]
fn a_fragment<F: Float>(
    low: Vector<u32, Const<2>>,
    high: Vector<u32, Const<2>>,
    table: &SharedMemory<u32>,
    #[comptime] step: usize,
    #[comptime] copies: u32,
) -> Array<Vector<F, Const<2>>> {
    let mut a = Array::<Vector<F, Const<2>>>::new(4usize);
    a[0usize] = pair::<F>(low, table, 2 * step, copies);
    a[1usize] = pair::<F>(high, table, 2 * step, copies);
    a[2usize] = pair::<F>(low, table, 2 * step + 1, copies);
    a[3usize] = pair::<F>(high, table, 2 * step + 1, copies);
    a
}

/// The `A` fragment of a dense mma step from 8 values of each of the lane's two rows (`low`: row `g`, `high`:
/// row `g + 8`; 4 words of two values): the step of `half` 0 takes words 0 and 1, of `half` 1 words 2 and 3.
#[cube]
fn dense_fragment<F: Float>(
    low: Vector<u32, Const<4>>,
    high: Vector<u32, Const<4>>,
    #[comptime] half: usize,
) -> Array<Vector<F, Const<2>>> {
    let mut a = Array::<Vector<F, Const<2>>>::new(4usize);
    a[0usize] = Vector::<F, Const<2>>::reinterpret(low[comptime!(half * 2)]);
    a[1usize] = Vector::<F, Const<2>>::reinterpret(high[comptime!(half * 2)]);
    a[2usize] = Vector::<F, Const<2>>::reinterpret(low[comptime!(half * 2 + 1)]);
    a[3usize] = Vector::<F, Const<2>>::reinterpret(high[comptime!(half * 2 + 1)]);
    a
}

/// The `B` fragment of mma step `step` from the lane's 16 activations (`words`: 8 pairs): fragment rows
/// `2q, 2q + 1` from pair `2 step` and `2q + 8, 2q + 9` from pair `2 step + 1`.
#[cube]
fn b_fragment<F: Float>(
    words: &Array<Vector<u32, Const<4>>>,
    #[comptime] step: usize,
) -> Array<Vector<F, Const<2>>> {
    let mut b = Array::<Vector<F, Const<2>>>::new(2usize);
    let half = words[comptime!(step / 2)];
    b[0usize] = Vector::<F, Const<2>>::reinterpret(half[comptime!((step % 2) * 2)]);
    b[1usize] = Vector::<F, Const<2>>::reinterpret(half[comptime!((step % 2) * 2 + 1)]);
    b
}

/// The four mma steps (m16n8k16) of a sub-block of 64 values against activation tile `n` (the lane's row of it)
/// from value `k`, `a0..a3` the steps' `A` fragments (NF4 or dense rows alike). Returns the tile's sums:
/// `[0]` for row `g`, `[1]` for row `g + 8`, each of activation rows `2q` and `2q + 1`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn sub_block_sums<F: Float>(
    a0: &Array<Vector<F, Const<2>>>,
    a1: &Array<Vector<F, Const<2>>>,
    a2: &Array<Vector<F, Const<2>>>,
    a3: &Array<Vector<F, Const<2>>>,
    x: &Array<Vector<u32, Const<4>>>,
    n: u32,
    k: u32,
    cols: u32,
    batch: u32,
) -> Array<Vector<f32, Const<2>>> {
    let mma = cmma::MmaDefinition::<F, F, f32>::new(16usize, 8usize, 16usize);
    let mut sums = Array::<Vector<f32, Const<2>>>::new(2usize);
    sums[0usize] = Vector::new(0.0f32);
    sums[1usize] = Vector::new(0.0f32);
    let words = activations(x, n, k, cols, batch);
    let b0 = b_fragment::<F>(&words, 0usize);
    mma.execute_inplace(a0, &b0, &mut sums);
    let b1 = b_fragment::<F>(&words, 1usize);
    mma.execute_inplace(a1, &b1, &mut sums);
    let b2 = b_fragment::<F>(&words, 2usize);
    mma.execute_inplace(a2, &b2, &mut sums);
    let b3 = b_fragment::<F>(&words, 3usize);
    mma.execute_inplace(a3, &b3, &mut sums);
    sums
}

/// The lane's 16 activations of row `n` from `k` (two 16-byte loads), zeros past the batch.
#[cube]
fn activations(
    x: &Array<Vector<u32, Const<4>>>,
    n: u32,
    k: u32,
    cols: u32,
    batch: u32,
) -> Array<Vector<u32, Const<4>>> {
    let mut words = Array::<Vector<u32, Const<4>>>::new(2usize);
    if n < batch {
        let at = ((n * cols + k) / 8) as usize;
        words[0usize] = x[at];
        words[1usize] = x[at + 1];
    } else {
        words[0usize] = Vector::new(0u32);
        words[1usize] = Vector::new(0u32);
    }
    words
}

// `manual_div_ceil`: the tile count in the kernel is written `(rows + 15) / 16`, the form CubeCL compiles.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, clippy::manual_div_ceil)]
fn gemv_mma_kernel<F: Float>(
    x: &Array<Vector<u32, Const<4>>>,
    packed: &Array<Vector<u32, Const<2>>>,
    codes: &Array<u32>,
    scales: &Array<f32>,
    offsets: &Array<f32>,
    map: &Array<f32>,
    pairs: &Array<u32>,
    y: &mut Array<F>,
    rows: u32,
    cols: u32,
    batch: u32,
    #[comptime] tiles: usize,
    #[comptime] blocksize: u32,
    #[comptime] double_quant: bool,
    #[comptime] split: usize,
    #[comptime] unroll: usize,
    #[comptime] copies: usize,
) {
    let copies_u = comptime!(copies as u32);
    // The cube fills the table (each entry stored `copies` times, copy `c` of entry `e` at `e * copies + c`, so
    // that with 32 copies lane `l` always reads bank `l`) and the double-quantization map (its reads are gathers
    // of random entries), once for all the tiles it computes.
    // Unit `e` loads entry `e` once and stores its copies starting at copy `e`, so that the 32 units of a plane
    // store to 32 different banks each time.
    let mut table = SharedMemory::<u32>::new(comptime!(256 * copies));
    for e in range_stepped(UNIT_POS, 256u32, CUBE_DIM) {
        let pair = pairs[e as usize];
        #[unroll]
        for c in 0..copies {
            table[(e * copies_u + (comptime!(c as u32) + e) % copies_u) as usize] = pair;
        }
    }
    let mut map_s = SharedMemory::<f32>::new(256usize);
    if comptime!(double_quant) {
        for i in range_stepped(UNIT_POS, 256u32, CUBE_DIM) {
            map_s[i as usize] = map[i as usize];
        }
    }
    sync_cube();

    let lane = UNIT_POS_X;
    let (g, q) = (lane / 4, lane % 4);
    let sub_blocks = cols / 64;
    let row_words = cols / 16;
    let per_plane = (sub_blocks + comptime!(split as u32 - 1)) / comptime!(split as u32);
    // One cube per tile, or (`cubes_per_sm`) every `CUBE_COUNT_X`-th tile: the same for every unit of the cube,
    // so that the sums' barriers are reached by all.
    for tile in range_stepped(CUBE_POS_X, (rows + 15) / 16, CUBE_COUNT_X) {
        let first = tile * 16;
        // Rows past the end re-read the last row; their sums are not written.
        let row_low = if first + g < rows {
            first + g
        } else {
            rows - 1
        };
        let row_high = if first + g + 8 < rows {
            first + g + 8
        } else {
            rows - 1
        };

        let mut acc = Array::<f32>::new(comptime!(4 * tiles));
        #[unroll]
        for i in 0..comptime!(4 * tiles) {
            acc[i] = 0.0;
        }
        let mut low = Array::<Vector<u32, Const<2>>>::new(unroll);
        let mut high = Array::<Vector<u32, Const<2>>>::new(unroll);
        let mut scale_low = Array::<f32>::new(unroll);
        let mut scale_high = Array::<f32>::new(unroll);
        for i0 in range_stepped(0, per_plane, comptime!(unroll as u32)) {
            #[unroll]
            for u in 0..unroll {
                let j = (i0 + comptime!(u as u32)) * comptime!(split as u32) + UNIT_POS_Y;
                if j < sub_blocks {
                    low[u] = packed[(row_low * row_words + 4 * j + q) as usize];
                    high[u] = packed[(row_high * row_words + 4 * j + q) as usize];
                    scale_low[u] = block_scale::<SharedMemory<f32>>(
                        (row_low * cols + 64 * j) / blocksize,
                        codes,
                        scales,
                        offsets,
                        &map_s,
                        double_quant,
                    );
                    scale_high[u] = block_scale::<SharedMemory<f32>>(
                        (row_high * cols + 64 * j) / blocksize,
                        codes,
                        scales,
                        offsets,
                        &map_s,
                        double_quant,
                    );
                }
            }
            #[unroll]
            for u in 0..unroll {
                let j = (i0 + comptime!(u as u32)) * comptime!(split as u32) + UNIT_POS_Y;
                if j < sub_blocks {
                    let a0 = a_fragment::<F>(low[u], high[u], &table, 0usize, copies_u);
                    let a1 = a_fragment::<F>(low[u], high[u], &table, 1usize, copies_u);
                    let a2 = a_fragment::<F>(low[u], high[u], &table, 2usize, copies_u);
                    let a3 = a_fragment::<F>(low[u], high[u], &table, 3usize, copies_u);
                    let k = 64 * j + 16 * q;
                    #[unroll]
                    for t in 0..tiles {
                        let n = comptime!(t as u32 * 8) + g;
                        let sums = sub_block_sums::<F>(&a0, &a1, &a2, &a3, x, n, k, cols, batch);
                        let low_sums = sums[0usize];
                        let high_sums = sums[1usize];
                        acc[comptime!(4 * t)] += low_sums[0usize] * scale_low[u];
                        acc[comptime!(4 * t + 1)] += low_sums[1usize] * scale_low[u];
                        acc[comptime!(4 * t + 2)] += high_sums[0usize] * scale_high[u];
                        acc[comptime!(4 * t + 3)] += high_sums[1usize] * scale_high[u];
                    }
                }
            }
        }

        write_sums(y, &acc, rows, batch, first, lane, tiles, split);
        if comptime!(split > 1) {
            // The next tile's partial sums reuse the shared memory the first plane has just read.
            sync_cube();
        }
    }
}

/// Writes a plane's tile sums (`acc`: per 8-row activation tile, rows `g`/`g + 8` x activation rows `2q`/`2q + 1`)
/// to `y`; with split-K, every plane's sums go through shared memory and the first plane adds them up.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_sums<F: Float>(
    y: &mut Array<F>,
    acc: &Array<f32>,
    rows: u32,
    batch: u32,
    first: u32,
    lane: u32,
    #[comptime] tiles: usize,
    #[comptime] split: usize,
) {
    let (g, q) = (lane / 4, lane % 4);
    let mut totals = Array::<f32>::new(comptime!(4 * tiles));
    #[unroll]
    for i in 0..comptime!(4 * tiles) {
        totals[i] = acc[i];
    }
    if comptime!(split > 1) {
        let outputs = comptime!(4 * tiles);
        let mut partial = SharedMemory::<f32>::new(comptime!(split * 4 * tiles * 32));
        #[unroll]
        for i in 0..outputs {
            partial[((UNIT_POS_Y * comptime!(outputs as u32) + comptime!(i as u32)) * 32 + lane)
                as usize] = acc[i];
        }
        sync_cube();
        if UNIT_POS_Y == 0 {
            #[unroll]
            for i in 0..outputs {
                let mut total = 0.0f32;
                #[unroll]
                for p in 0..split {
                    total += partial[((comptime!((p * outputs + i) as u32)) * 32 + lane) as usize];
                }
                totals[i] = total;
            }
        }
    }
    if UNIT_POS_Y == 0 {
        #[unroll]
        for t in 0..tiles {
            #[unroll]
            for i in 0..4usize {
                let row = first + g + comptime!((i / 2) as u32 * 8);
                let n = comptime!(t as u32 * 8 + (i % 2) as u32) + 2 * q;
                if row < rows && n < batch {
                    y[(n * rows + row) as usize] = F::cast_from(totals[comptime!(4 * t + i)]);
                }
            }
        }
    }
}

/// Whether [`gemv_mma_dense`] takes a dense `[rows, cols]` weight and batch where it is [`supported`]: 1 to
/// [`MAX_ROWS`] rows and a width that is a multiple of 64.
pub fn takes_dense<F>(weight: &DenseMatrix<F>, batch: usize) -> bool {
    (1..=MAX_ROWS).contains(&batch) && weight.cols.is_multiple_of(64)
}

/// `y = x W^T` for a dense weight in `F` (bf16 or f16) on the tensor cores, as [`gemv_mma`] does for NF4: each
/// plane computes 16 output rows with `mma.m16n8k16`, the weight read once for every activation row (one
/// launch takes 1 to 32). Each lane loads 16 consecutive values of each of its two rows per 64-value sub-block
/// (two 16-byte loads each), in the order the NF4 kernel's codes take, so the activation fragments are the same.
pub fn gemv_mma_dense<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    batch: usize,
    weight: &DenseMatrix<F>,
    y: &Buffer<F>,
) -> Result<(), KernelError> {
    if !supported::<R, F>(client) {
        return Err(unsupported::<F>());
    }
    if !takes_dense(weight, batch) {
        return Err(KernelError::Unsupported(format!(
            "batch {batch} on a {}x{} dense matrix: the tensor-core GEMV takes 1 to {MAX_ROWS} rows and a width \
             that is a multiple of 64",
            weight.rows, weight.cols
        )));
    }
    x.check("x", batch * weight.cols)?;
    y.check("y", batch * weight.rows)?;
    weight
        .weight
        .check("dense weight", weight.rows * weight.cols)?;
    let split = MmaTiling::for_shape(weight.rows, weight.cols, batch).split;
    let cube_count = CubeCount::Static(weight.rows.div_ceil(16) as u32, 1, 1);
    let cube_dim = CubeDim::new_2d(32, split as u32);
    // SAFETY: the kernel reads `x` below row `batch` and column `cols`, the weight below row `rows` (16-byte
    // vectors of a row-major `[rows, cols]` matrix, `cols` a multiple of 64), and writes `y` inside
    // `[batch, rows]`, all checked above.
    #[allow(unsafe_code)]
    unsafe {
        gemv_mma_dense_kernel::launch_unchecked::<F, R>(
            client,
            cube_count,
            cube_dim,
            x.array_arg(),
            weight.weight.array_arg(),
            y.array_arg(),
            weight.rows as u32,
            weight.cols as u32,
            batch as u32,
            batch.div_ceil(8),
            split,
        );
    }
    Ok(())
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_mma_dense_kernel<F: Float>(
    x: &Array<Vector<u32, Const<4>>>,
    w: &Array<Vector<u32, Const<4>>>,
    y: &mut Array<F>,
    rows: u32,
    cols: u32,
    batch: u32,
    #[comptime] tiles: usize,
    #[comptime] split: usize,
) {
    let lane = UNIT_POS_X;
    let (g, q) = (lane / 4, lane % 4);
    let first = CUBE_POS_X * 16;
    // Rows past the end re-read the last row; their sums are not written.
    let row_low = if first + g < rows {
        first + g
    } else {
        rows - 1
    };
    let row_high = if first + g + 8 < rows {
        first + g + 8
    } else {
        rows - 1
    };
    let sub_blocks = cols / 64;
    let mut acc = Array::<f32>::new(comptime!(4 * tiles));
    #[unroll]
    for i in 0..comptime!(4 * tiles) {
        acc[i] = 0.0;
    }
    for j in range_stepped(UNIT_POS_Y, sub_blocks, comptime!(split as u32)) {
        // The lane's 16 values of each row: 8 words of two values, word `m` holding values `2m, 2m + 1`.
        let k = 64 * j + 16 * q;
        let low0 = w[((row_low * cols + k) / 8) as usize];
        let low1 = w[((row_low * cols + k) / 8 + 1) as usize];
        let high0 = w[((row_high * cols + k) / 8) as usize];
        let high1 = w[((row_high * cols + k) / 8 + 1) as usize];
        // Step `s` takes values `4s .. 4s + 4`: words `2s` and `2s + 1`.
        let a0 = dense_fragment::<F>(low0, high0, 0usize);
        let a1 = dense_fragment::<F>(low0, high0, 1usize);
        let a2 = dense_fragment::<F>(low1, high1, 0usize);
        let a3 = dense_fragment::<F>(low1, high1, 1usize);
        #[unroll]
        for t in 0..tiles {
            let n = comptime!(t as u32 * 8) + g;
            let sums = sub_block_sums::<F>(&a0, &a1, &a2, &a3, x, n, k, cols, batch);
            let low_sums = sums[0usize];
            let high_sums = sums[1usize];
            acc[comptime!(4 * t)] += low_sums[0usize];
            acc[comptime!(4 * t + 1)] += low_sums[1usize];
            acc[comptime!(4 * t + 2)] += high_sums[0usize];
            acc[comptime!(4 * t + 3)] += high_sums[1usize];
        }
    }
    write_sums(y, &acc, rows, batch, first, lane, tiles, split);
}

#[cfg(test)]
mod tests {
    use super::*;
    use medvl_nf4::NF4_CODE;

    #[test]
    fn pair_table_puts_the_high_nibble_in_the_low_half() {
        let bf16 = |v: f32| half::bf16::from_f32(v).to_bits();
        let table = pair_table(&NF4_CODE, bf16);
        assert_eq!(table.len(), 256);
        // Byte 0x1F: codes 1 (first, high nibble) and 15 (1.0 = 0x3F80 in bf16).
        assert_eq!(table[0x1F] & 0xFFFF, u32::from(bf16(NF4_CODE[1])));
        assert_eq!(table[0x1F] >> 16, 0x3F80);
        // Byte 0x70: code 7 is 0.0, code 0 is -1.0 (0xBF80).
        assert_eq!(table[0x70], 0xBF80 << 16);
    }
}

//! NF4 matrix-vector products for decode: `y[b, n] = sum_k x[b, k] * W[n, k]` for 1-8 rows of `x`, reading the
//! bitsandbytes-packed weight once.
//!
//! The weight stays in the bitsandbytes layout (two 4-bit codes per byte, high nibble first, over the row-major
//! flattened matrix; one scale per `blocksize` consecutive values, double-quantized as an 8-bit code into the
//! dynamic map times a per-256-block f32 scale plus an offset), so a pre-quantized checkpoint is uploaded byte for
//! byte. Two kernels:
//! - `gemv_aligned` when `cols % 32 == 0` (every decode-path matrix of Qwen2.5-VL): one plane (warp) per 1-4
//!   output rows, or per several such sets of rows taken as one stream of chunks ([`GemvTiling`]); each lane
//!   issues several 16-byte loads (32 codes each, always inside one block) before using them, looks the codes up
//!   (a plane shuffle on CUDA, a 16-entry table in shared memory elsewhere), multiplies them by the activations
//!   (16-byte loads, each used for all the set's rows) and applies the block scale once per 32 products (lane
//!   pairs reading one block share its decoding); the plane then sums its lanes.
//! - `gemv_any` for other widths (blocks then straddle rows): one code per lane per step, exact but slower.

use std::sync::atomic::{AtomicBool, Ordering};

use cubecl::prelude::*;
use medvl_nf4::{Absmax, NESTED_BLOCKSIZE, NF4_CODE, Nf4Tensor, le_words};

use crate::{Buffer, KernelError};

/// Most rows of `x` one launch multiplies (the decode batch is split into launches of at most this many).
pub const MAX_BATCH: usize = 8;

/// Planes (warps) per cube.
const PLANES_PER_CUBE: u32 = 4;

/// Most shared memory the aligned GEMV's copy of the activations may take per cube (all batch rows, each padded
/// to whole groups of 32 chunks): with the rest of the kernel's, within the 16 KiB every runtime offers.
const X_SHARED_BYTES: usize = 12 * 1024;

/// Groups of 32 chunks of 32 activations per batch row that the aligned GEMV keeps in shared memory, 0 when
/// they do not fit in [`X_SHARED_BYTES`] (the activations are then read from global memory).
fn x_groups<F>(batch: usize, cols: usize) -> usize {
    let groups = cols.div_ceil(32).div_ceil(32);
    if batch * groups * 32 * 32 * size_of::<F>() <= X_SHARED_BYTES {
        groups
    } else {
        0
    }
}

/// Block scales on the device.
// One per matrix, built once and never moved on a hot path: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
pub enum Scales {
    /// Double quantization: `scale[b] = map[codes[b]] * nested[b / 256] + offsets[b / 256]`. The offset is kept
    /// per nested block so that matrices quantized separately (each with its own mean offset) can be stacked into
    /// one ([`Nf4Matrix::stack`]).
    Double {
        /// One 8-bit code per block, four per word (little-endian).
        codes: Buffer<u32>,
        /// One f32 scale per nested block of 256 blocks.
        nested: Buffer<f32>,
        /// One f32 offset per nested block.
        offsets: Buffer<f32>,
        /// The 256-entry map the codes index.
        map: Buffer<f32>,
    },
    /// One f32 per block.
    Plain(Buffer<f32>),
}

/// An NF4 weight matrix `[rows, cols]` (`[out_features, in_features]`) on the device, in the bitsandbytes layout.
/// A clone reads the same device memory.
#[derive(Clone)]
pub struct Nf4Matrix {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) blocksize: usize,
    /// The packed codes as little-endian words, zero-padded to a multiple of 16 bytes.
    pub(crate) packed: Buffer<u32>,
    scales: Scales,
    /// The 16 NF4 code values.
    pub(crate) codebook: Buffer<f32>,
    /// The tensor-core GEMV's tables of code pairs ([`crate::mma`]): bf16 values, then f16.
    pub(crate) pairs: Buffer<u32>,
}

/// [`Nf4Matrix::pairs`] on the device.
fn pair_tables<R: Runtime>(client: &ComputeClient<R>) -> Buffer<u32> {
    let mut tables = crate::mma::pair_table(&NF4_CODE, |v| half::bf16::from_f32(v).to_bits());
    tables.extend(crate::mma::pair_table(&NF4_CODE, |v| {
        half::f16::from_f32(v).to_bits()
    }));
    Buffer::from_slice(client, &tables)
}

/// The `[rows, cols]` of a 2-D tensor.
fn matrix_shape(tensor: &Nf4Tensor) -> Result<[usize; 2], KernelError> {
    match tensor.shape.as_slice() {
        &[rows, cols] => Ok([rows, cols]),
        other => Err(KernelError::Unsupported(format!(
            "an NF4 matrix must be 2-D, got shape {other:?}"
        ))),
    }
}

/// Whether stacking `parts` keeps their double quantization: every part double-quantized with the same map,
/// and every part but the last a whole number of nested blocks (so that the nested index of a block stays
/// `block / 256` in the stack).
fn stack_keeps_double_quant(parts: &[&Nf4Tensor]) -> bool {
    let Some(Absmax::Double { nested_code, .. }) = parts.first().map(|p| &p.absmax) else {
        return false;
    };
    parts.iter().enumerate().all(|(i, p)| match &p.absmax {
        Absmax::Double {
            codes,
            nested_code: map,
            ..
        } => map == nested_code && (i + 1 == parts.len() || codes.len() % NESTED_BLOCKSIZE == 0),
        Absmax::Plain(_) => false,
    })
}

impl Nf4Matrix {
    /// Uploads a 2-D NF4 tensor.
    pub fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        tensor: &Nf4Tensor,
    ) -> Result<Self, KernelError> {
        Self::stack(client, &[tensor])
    }

    /// Uploads 2-D NF4 tensors of the same width and block size stacked along their rows, as one matrix: one
    /// launch then computes all their products (q/k/v, gate/up). Every part but the last must hold a whole number
    /// of blocks. Double-quantized scales stay double-quantized when the parts share the 8-bit map and all but the
    /// last hold a whole number of nested blocks (every projection of Qwen2.5-VL); otherwise the stack keeps
    /// each block's scale as an f32 (the same values, 3 more bytes per block).
    pub fn stack<R: Runtime>(
        client: &ComputeClient<R>,
        parts: &[&Nf4Tensor],
    ) -> Result<Self, KernelError> {
        let Some(first) = parts.first() else {
            return Err(KernelError::Unsupported(
                "stacking no NF4 matrices".to_string(),
            ));
        };
        let [_, cols] = matrix_shape(first)?;
        let blocksize = first.blocksize;
        let mut rows = 0;
        for (i, part) in parts.iter().enumerate() {
            part.validate()?;
            let [r, c] = matrix_shape(part)?;
            if c != cols || part.blocksize != blocksize {
                return Err(KernelError::Unsupported(format!(
                    "stacking NF4 matrices of widths {cols} and {c}, block sizes {blocksize} and {}",
                    part.blocksize
                )));
            }
            if i + 1 < parts.len() && !(r * c).is_multiple_of(blocksize) {
                return Err(KernelError::Unsupported(format!(
                    "stacking a {r}x{c} NF4 matrix whose {} values are not whole blocks of {blocksize}",
                    r * c
                )));
            }
            rows += r;
        }
        if rows * cols >= u32::MAX as usize {
            return Err(KernelError::Unsupported(format!(
                "{rows}x{cols} has more values than 32-bit indexing covers"
            )));
        }
        let scales = if stack_keeps_double_quant(parts) {
            let (mut codes, mut nested, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
            let mut map: &[f32] = &[];
            for part in parts {
                if let Absmax::Double {
                    codes: c,
                    nested_absmax,
                    nested_code,
                    offset,
                } = &part.absmax
                {
                    codes.extend_from_slice(c);
                    nested.extend_from_slice(nested_absmax);
                    offsets.extend(std::iter::repeat_n(*offset, nested_absmax.len()));
                    map = nested_code;
                }
            }
            Scales::Double {
                codes: Buffer::from_slice(client, &le_words(&codes, 4)),
                nested: Buffer::from_slice(client, &nested),
                offsets: Buffer::from_slice(client, &offsets),
                map: Buffer::from_slice(client, map),
            }
        } else {
            let absmax: Vec<f32> = parts.iter().flat_map(|p| p.absmax.to_f32()).collect();
            Scales::Plain(Buffer::from_slice(client, &absmax))
        };
        let packed: Vec<u8> = parts
            .iter()
            .flat_map(|p| p.packed.iter().copied())
            .collect();
        Ok(Self {
            rows,
            cols,
            blocksize,
            packed: Buffer::from_slice(client, &le_words(&packed, 16)),
            scales,
            codebook: Buffer::from_slice(client, &NF4_CODE),
            pairs: pair_tables(client),
        })
    }

    /// A `[rows, cols]` NF4 matrix whose codes and scales are already on the device (e.g. a model's, shared):
    /// `packed` holds the bitsandbytes byte stream as little-endian words (at least `ceil(rows * cols / 8)`; a
    /// multiple of 4 words when `cols % 32 == 0`, as the 16-byte loads need), `scales` the block scales.
    pub fn from_device<R: Runtime>(
        client: &ComputeClient<R>,
        packed: Buffer<u32>,
        scales: Scales,
        rows: usize,
        cols: usize,
        blocksize: usize,
    ) -> Result<Self, KernelError> {
        let n = rows * cols;
        if n >= u32::MAX as usize || !blocksize.is_power_of_two() {
            return Err(KernelError::Unsupported(format!(
                "a {rows}x{cols} NF4 matrix with blocks of {blocksize}"
            )));
        }
        packed.check("NF4 codes", n.div_ceil(8))?;
        if cols.is_multiple_of(32) && !packed.len().is_multiple_of(4) {
            return Err(KernelError::Unsupported(format!(
                "{} code words: the 16-byte loads need a multiple of 4",
                packed.len()
            )));
        }
        let blocks = n.div_ceil(blocksize);
        match &scales {
            Scales::Plain(absmax) => absmax.check("NF4 block scales", blocks)?,
            Scales::Double {
                codes,
                nested,
                offsets,
                map,
            } => {
                codes.check("NF4 8-bit scale codes", blocks.div_ceil(4))?;
                nested.check("NF4 nested scales", blocks.div_ceil(NESTED_BLOCKSIZE))?;
                offsets.check("NF4 scale offsets", blocks.div_ceil(NESTED_BLOCKSIZE))?;
                map.check("NF4 scale map", 256)?;
            }
        }
        Ok(Self {
            rows,
            cols,
            blocksize,
            packed,
            scales,
            codebook: Buffer::from_slice(client, &NF4_CODE),
            pairs: pair_tables(client),
        })
    }

    /// The scale arrays as the kernels take them: the 8-bit codes, the nested (or per-block) scales, the
    /// offsets, the map, and whether the scales are double-quantized. Without double quantization the code,
    /// offset and map arguments are not read, and other buffers stand in for them.
    #[allow(clippy::type_complexity)]
    pub(crate) fn scale_args(
        &self,
    ) -> (&Buffer<u32>, &Buffer<f32>, &Buffer<f32>, &Buffer<f32>, bool) {
        match &self.scales {
            Scales::Double {
                codes,
                nested,
                offsets,
                map,
            } => (codes, nested, offsets, map, true),
            Scales::Plain(absmax) => (&self.packed, absmax, absmax, &self.codebook, false),
        }
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether the block scales are double-quantized on the device (false: one f32 per block).
    pub fn double_quant(&self) -> bool {
        matches!(self.scales, Scales::Double { .. })
    }

    /// Bytes one product reads from the weight (packed codes and scales).
    pub fn weight_bytes(&self) -> usize {
        let blocks = (self.rows * self.cols).div_ceil(self.blocksize);
        let scales = match self.scales {
            Scales::Double { .. } => blocks + blocks.div_ceil(NESTED_BLOCKSIZE) * 8 + 256 * 4,
            Scales::Plain(_) => blocks * 4,
        };
        (self.rows * self.cols).div_ceil(2) + scales
    }
}

/// Element types the kernels take activations in, with their conversions on the host.
pub trait Activation: Float + CubeElement {
    /// The nearest value (round to nearest even).
    fn from_host(value: f32) -> Self;
    /// The value as f32 (exact).
    fn to_host(self) -> f32;
    /// [`Self::from_host`] of each value. Implemented per type here (not as a generic default), so that the
    /// conversion of a model's weights is compiled with this crate's optimisations wherever it is called from.
    fn from_host_slice(values: &[f32]) -> Vec<Self>;
    /// Which of [`Nf4Matrix`]'s half-precision pair tables the tensor-core GEMV ([`crate::mma`]) reads for this
    /// type (0: bf16, 1: f16); `None` for types the tensor cores do not take.
    const PAIR_TABLE: Option<usize>;
}
impl Activation for f32 {
    const PAIR_TABLE: Option<usize> = None;
    fn from_host(value: f32) -> Self {
        value
    }
    fn from_host_slice(values: &[f32]) -> Vec<Self> {
        values.to_vec()
    }
    fn to_host(self) -> f32 {
        self
    }
}
impl Activation for half::bf16 {
    const PAIR_TABLE: Option<usize> = Some(0);
    fn from_host(value: f32) -> Self {
        half::bf16::from_f32(value)
    }
    fn from_host_slice(values: &[f32]) -> Vec<Self> {
        use half::slice::HalfFloatSliceExt;
        let mut out = vec![Self::ZERO; values.len()];
        out.convert_from_f32_slice(values);
        out
    }
    fn to_host(self) -> f32 {
        half::bf16::to_f32(self)
    }
}
impl Activation for half::f16 {
    const PAIR_TABLE: Option<usize> = Some(1);
    fn from_host(value: f32) -> Self {
        half::f16::from_f32(value)
    }
    fn from_host_slice(values: &[f32]) -> Vec<Self> {
        use half::slice::HalfFloatSliceExt;
        let mut out = vec![Self::ZERO; values.len()];
        out.convert_from_f32_slice(values);
        out
    }
    fn to_host(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// How the aligned GEMV kernel splits its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvTiling {
    /// Output rows of one set, sharing each activation load between them.
    pub rows_per_plane: usize,
    /// Chunks of 32 codes per row each lane loads before using them.
    pub unroll: usize,
    /// Planes sharing the same rows, each over part of the width (split-K inside a cube); 1 for none.
    pub split: usize,
    /// Sets of `rows_per_plane` rows one plane (or, with split-K, one cube) computes, their chunks taken by the
    /// lanes as one stream: with 2 sets a width of 112 chunks (3584 values) fills 32 lanes in 7 steps instead of
    /// leaving half of them idle in every row's fourth. 1 to 8.
    pub sets: usize,
    /// Let lane pairs reading one block share its scale where they can (see [`gemv_tiled`]).
    pub paired: bool,
}

impl GemvTiling {
    /// The tiling [`gemv`] uses for a `rows x cols` matrix and `batch` activation rows: the best of the sweep
    /// `medvl-bench kernels --sweep` measured on an H100 (docs/KERNELS.md). Matrices with few rows need split-K to
    /// fill the GPU; larger batches gain most from sharing each activation load between 4 rows; large matrices at
    /// batch 1-3 take two sets of 4 rows per plane when that keeps every lane busy.
    pub fn for_shape(rows: usize, cols: usize, batch: usize) -> Self {
        let chunks = cols / 32;
        let sets = if rows >= 16384
            && batch < 4
            && !chunks.is_multiple_of(32)
            && (2 * chunks).is_multiple_of(32)
        {
            2
        } else {
            1
        };
        // The previous split, with one chunk per lane and row in flight everywhere (the large matrices at batch
        // 1-3 took two).
        Self {
            unroll: 1,
            sets,
            paired: true,
            ..Self::previous_for_shape(rows, batch)
        }
    }

    /// The tiling [`gemv`] used before row sets and lane pairs sharing scales (2026-11-27), which it uses again
    /// after [`set_previous_gemv`]: for comparisons on the same card.
    pub fn previous_for_shape(rows: usize, batch: usize) -> Self {
        let (rows_per_plane, unroll, split) = match (rows, batch) {
            (..1024, _) => (2, 1, 4),
            (_, 4..) => (4, 1, 1),
            (16384.., _) => (4, 2, 1),
            _ => (4, 1, 4),
        };
        Self {
            rows_per_plane,
            unroll,
            split,
            sets: 1,
            paired: false,
        }
    }
}

/// `y = x W^T`: `x` is `[batch, cols]`, `y` is `[batch, rows]`, both row-major in `F`, `batch` in `1..=8`.
/// Launches one kernel; nothing is read back.
pub fn gemv<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    batch: usize,
    weight: &Nf4Matrix,
    y: &Buffer<F>,
) -> Result<(), KernelError> {
    let tiling = if PREVIOUS_GEMV.load(Ordering::Relaxed) {
        GemvTiling::previous_for_shape(weight.rows, batch)
    } else {
        GemvTiling::for_shape(weight.rows, weight.cols, batch)
    };
    gemv_tiled(client, x, batch, weight, y, tiling)
}

/// A gated unit in one launch: `out[b, j] = F(silu(F(gate))) * F(up)` where `gate` and `up` are rows `j` and
/// `width + j` of `x weight^T` (`weight` stacks `2 * width` rows, gate projection first, as the decode plan's
/// gate/up matrix): what [`gemv`] into `[batch, 2 * width]` followed by a SiLU-and-multiply kernel computes, with
/// the same roundings. `x`: `[batch, cols]`, `out`: `[batch, width]`, `batch` in `1..=8`. Each plane takes gate and
/// up rows `j..` as its two row sets. Widths a multiple of 32 only.
pub fn gemv_glu<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    batch: usize,
    weight: &Nf4Matrix,
    out: &Buffer<F>,
) -> Result<(), KernelError> {
    if !takes_glu(weight) {
        return Err(KernelError::Unsupported(format!(
            "a gated unit of a {}x{} NF4 matrix (an even number of rows, a width a multiple of 32)",
            weight.rows, weight.cols
        )));
    }
    let tiling = GemvTiling {
        sets: 2,
        split: 1,
        ..GemvTiling::for_shape(weight.rows, weight.cols, batch)
    };
    launch_gemv(client, x, batch, weight, out, tiling, true)
}

/// Whether [`gemv_glu`] takes `weight`: an even number of rows (gate over up), a width a multiple of 32.
pub fn takes_glu(weight: &Nf4Matrix) -> bool {
    weight.rows.is_multiple_of(2) && weight.cols.is_multiple_of(32)
}

/// [`gemv`] with an explicit tiling (for benchmarks; the general kernel for widths not a multiple of 32 ignores it).
pub fn gemv_tiled<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    batch: usize,
    weight: &Nf4Matrix,
    y: &Buffer<F>,
    tiling: GemvTiling,
) -> Result<(), KernelError> {
    launch_gemv(client, x, batch, weight, y, tiling, false)
}

/// [`gemv_tiled`], or with `glu` [`gemv_glu`]'s gated output (`tiling` then has two sets and no split-K).
fn launch_gemv<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    batch: usize,
    weight: &Nf4Matrix,
    y: &Buffer<F>,
    tiling: GemvTiling,
    glu: bool,
) -> Result<(), KernelError> {
    if !(1..=MAX_BATCH).contains(&batch) {
        return Err(KernelError::Unsupported(format!(
            "batch {batch}: the NF4 GEMV takes 1 to {MAX_BATCH} rows per launch"
        )));
    }
    if ![
        tiling.rows_per_plane,
        tiling.unroll,
        tiling.split,
        tiling.sets,
    ]
    .iter()
    .all(|v| (1..=8).contains(v))
    {
        return Err(KernelError::Unsupported(format!(
            "tiling {tiling:?}: 1 to 8 each"
        )));
    }
    x.check("x", batch * weight.cols)?;
    let out_rows = if glu { weight.rows / 2 } else { weight.rows };
    y.check("y", batch * out_rows)?;
    let plane = crate::plane_size(client);
    let aligned = weight.cols.is_multiple_of(32);
    let split = aligned && tiling.split > 1;
    // Output rows per plane: a gated unit's two sets cover the same output rows.
    let set_rows = (tiling.rows_per_plane * if glu { 1 } else { tiling.sets }) as u32;
    let rows_per_cube = match (aligned, split) {
        (false, _) => PLANES_PER_CUBE,
        (true, false) => PLANES_PER_CUBE * set_rows,
        (true, true) => set_rows,
    };
    let planes = if split {
        tiling.split as u32
    } else {
        PLANES_PER_CUBE
    };
    let cube_count = CubeCount::Static((out_rows as u32).div_ceil(rows_per_cube), 1, 1);
    let cube_dim = CubeDim::new_2d(plane, planes);
    let (codes, scales, offsets, map, double_quant) = weight.scale_args();
    // Split-K cubes cover only a few rows each: copying the activations to shared memory would read about as many
    // bytes as the cube's weights (measured slower at 3584 rows).
    let x_groups = if split {
        0
    } else {
        x_groups::<F>(batch, weight.cols)
    };
    // Lane pairs share their scales when their two chunks always lie in one block: blocks of 64 values or more,
    // widths a multiple of 64 (an even chunk count, so that a pair never straddles two rows or sets) and an even
    // number of rows per set.
    let paired = tiling.paired
        && weight.blocksize >= 64
        && weight.cols.is_multiple_of(64)
        && tiling.rows_per_plane.is_multiple_of(2);
    // SAFETY: every array is passed with the element count of its own buffer, and the kernels index only inside
    // the shapes checked above (`rows`, `cols`, `batch`) plus the scale arrays sized by `Nf4Tensor::validate`.
    #[allow(unsafe_code)]
    unsafe {
        if aligned {
            gemv_aligned::launch_unchecked::<F, R>(
                client,
                cube_count.clone(),
                cube_dim,
                16 / size_of::<F>(),
                x.array_arg(),
                weight.packed.array_arg(),
                codes.array_arg(),
                scales.array_arg(),
                offsets.array_arg(),
                map.array_arg(),
                weight.codebook.array_arg(),
                y.array_arg(),
                weight.rows as u32,
                weight.cols as u32,
                batch,
                weight.blocksize as u32,
                double_quant,
                tiling.rows_per_plane,
                tiling.unroll,
                if split { tiling.split } else { 1 },
                tiling.sets,
                shuffle_lookup(client),
                x_groups,
                paired,
                glu,
            );
        } else {
            gemv_any::launch_unchecked::<F, R>(
                client,
                cube_count,
                cube_dim,
                x.array_arg(),
                weight.packed.array_arg(),
                codes.array_arg(),
                scales.array_arg(),
                offsets.array_arg(),
                map.array_arg(),
                weight.codebook.array_arg(),
                y.array_arg(),
                weight.rows as u32,
                weight.cols as u32,
                batch,
                weight.blocksize as u32,
                double_quant,
            );
        }
    }
    Ok(())
}

/// Whether the GEMV looks codes up with plane shuffles ([`decode_word_shuffled`]): on CUDA with 32-lane planes,
/// where a shuffle reads only the low 5 bits of its source lane. Elsewhere (e.g. Vulkan, whose subgroup shuffle
/// leaves other lane numbers undefined, or planes of fewer than 16 lanes) the shared-memory table.
pub(crate) fn shuffle_lookup<R: Runtime>(client: &ComputeClient<R>) -> bool {
    R::name(client) == "cuda" && crate::plane_size(client) == 32
}

static PREVIOUS_GEMV: AtomicBool = AtomicBool::new(false);

/// Process-wide: [`gemv`] takes the tiling it took before row sets and lane pairs sharing scales
/// ([`GemvTiling::previous_for_shape`]), so that benchmarks can compare both in one process. Off by default; both
/// compute the same sums.
pub fn set_previous_gemv(previous: bool) {
    PREVIOUS_GEMV.store(previous, Ordering::Relaxed);
}

/// The scale of block `block`, with the double-quantization map in global or shared memory.
#[cube]
pub(crate) fn block_scale<M: List<f32>>(
    block: u32,
    codes: &Array<u32>,
    scales: &Array<f32>,
    offsets: &Array<f32>,
    map: &M,
    #[comptime] double_quant: bool,
) -> f32 {
    if comptime!(double_quant) {
        let code = (codes[(block / 4) as usize] >> ((block % 4) * 8)) & 0xFF;
        let nested = (block / 256) as usize;
        map.read(code as usize) * scales[nested] + offsets[nested]
    } else {
        scales[block as usize]
    }
}

/// The 16 NF4 values in shared memory, loaded by the first 16 units of the cube.
#[cube]
pub(crate) fn load_codebook(codebook: &Array<f32>) -> SharedMemory<f32> {
    let mut table = SharedMemory::<f32>::new(16usize);
    if UNIT_POS < 16 {
        table[UNIT_POS as usize] = codebook[UNIT_POS as usize];
    }
    sync_cube();
    table
}

/// Decodes the 8 codes of one little-endian u32 of packed bytes (byte 0 first, high nibble first) into
/// `values[base..base + 8]`.
#[cube]
pub(crate) fn decode_word(
    word: u32,
    table: &SharedMemory<f32>,
    values: &mut Array<f32>,
    #[comptime] base: usize,
) {
    values[base] = table[((word >> 4) & 0xF) as usize];
    values[base + 1] = table[(word & 0xF) as usize];
    values[base + 2] = table[((word >> 12) & 0xF) as usize];
    values[base + 3] = table[((word >> 8) & 0xF) as usize];
    values[base + 4] = table[((word >> 20) & 0xF) as usize];
    values[base + 5] = table[((word >> 16) & 0xF) as usize];
    values[base + 6] = table[((word >> 28) & 0xF) as usize];
    values[base + 7] = table[((word >> 24) & 0xF) as usize];
}

/// [`decode_word`] through plane shuffles instead of a shared-memory table: lane `l` holds code value `l % 16`
/// in `lane_value`. CUDA's shuffle reads the source lane from the low 5 bits of its operand (PTX `shfl.sync.idx`:
/// `b[4:0]`), and lanes `l` and `l + 16` hold the same value, so a code needs a shift and no mask or address
/// arithmetic. Every lane of the plane must take part.
#[cube]
pub(crate) fn decode_word_shuffled(
    word: u32,
    lane_value: f32,
    values: &mut Array<f32>,
    #[comptime] base: usize,
) {
    values[base] = plane_shuffle(lane_value, word >> 4);
    values[base + 1] = plane_shuffle(lane_value, word);
    values[base + 2] = plane_shuffle(lane_value, word >> 12);
    values[base + 3] = plane_shuffle(lane_value, word >> 8);
    values[base + 4] = plane_shuffle(lane_value, word >> 20);
    values[base + 5] = plane_shuffle(lane_value, word >> 16);
    values[base + 6] = plane_shuffle(lane_value, word >> 28);
    values[base + 7] = plane_shuffle(lane_value, word >> 24);
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_aligned<F: Float, NX: Size>(
    x: &Array<Vector<F, NX>>,
    packed: &Array<Vector<u32, Const<4>>>,
    codes: &Array<u32>,
    scales: &Array<f32>,
    offsets: &Array<f32>,
    map: &Array<f32>,
    codebook: &Array<f32>,
    y: &mut Array<F>,
    rows: u32,
    cols: u32,
    #[comptime] batch: usize,
    #[comptime] blocksize: u32,
    #[comptime] double_quant: bool,
    #[comptime] rows_per_plane: usize,
    #[comptime] unroll: usize,
    #[comptime] split: usize,
    #[comptime] sets: usize,
    #[comptime] shuffle: bool,
    #[comptime] x_groups: usize,
    #[comptime] paired: bool,
    #[comptime] glu: bool,
) {
    // With `x_groups > 0` the activations are copied to shared memory once per cube (one coalesced pass), laid
    // out so that the lanes of a plane, which take consecutive chunks of 32 values, read consecutive 16-byte
    // vectors: vector `k` of chunk `c` goes to `(c / 32) * 32 * vpc + k * 32 + c % 32` of its batch row (`vpc`
    // vectors per chunk). From global memory those reads are 64 bytes apart and most of the L1 traffic.
    let nxc = NX::value();
    let vpc = comptime!(32 / nxc);
    let group_len = comptime!(x_groups * 32 * vpc);
    let mut xs = SharedMemory::<Vector<F, NX>>::new(comptime!((batch * group_len).max(1)));
    if comptime!(x_groups > 0) {
        let row_vectors = cols / comptime!(nxc as u32);
        for i in range_stepped(UNIT_POS, comptime!(batch as u32) * row_vectors, CUBE_DIM) {
            let b = i / row_vectors;
            let j = i % row_vectors;
            let c = j / comptime!(vpc as u32);
            let k = j % comptime!(vpc as u32);
            let at = b * comptime!(group_len as u32)
                + (c / 32) * comptime!(32 * vpc as u32)
                + k * 32
                + c % 32;
            xs[at as usize] = x[i as usize];
        }
    }
    // The double-quantization map in shared memory: its lookups are gathers of random entries.
    let mut map_s = SharedMemory::<f32>::new(256usize);
    if comptime!(double_quant) {
        for i in range_stepped(UNIT_POS, 256u32, CUBE_DIM) {
            map_s[i as usize] = map[i as usize];
        }
    }
    // The table is read without `shuffle`; with it, loading the table still gives the barrier after the copies to
    // shared memory above.
    let table = load_codebook(codebook);
    // With `shuffle`, lane `l` holds code value `l % 16` and a code is looked up with a plane shuffle.
    let lane_value = codebook[(UNIT_POS_X % 16) as usize];
    // A plane (without split-K) or a cube (with it) computes `sets` sets of `rows_per_plane` consecutive rows. The
    // chunks of its sets, one set after the other, form one stream of `sets * chunks` that its lanes take in
    // turn, so that a width whose chunk count is not a multiple of the lanes does not leave lanes idle in every
    // row's last step (3584 values: 112 chunks, 3.5 per lane; two sets: 7). Each lane's activation load serves
    // the `rows_per_plane` rows of the set its chunk belongs to. Without split-K each plane has rows of its own;
    // with it, the cube's planes share the same rows and each takes every `split`-th group of chunks.
    // With `glu` (two sets, no split-K) the matrix stacks gate rows over as many up rows: set 0 takes gate rows,
    // set 1 the up rows `rows / 2` further, and the plane writes `silu(gate) * up` for its rows.
    let out_rows = if comptime!(glu) { rows / 2 } else { rows };
    let mut set_stride = out_rows;
    if comptime!(!glu) {
        set_stride = comptime!(rows_per_plane as u32);
    }
    let plane_rows = comptime!(if glu {
        rows_per_plane
    } else {
        sets * rows_per_plane
    });
    let (first_row, lane, width) = if comptime!(split == 1) {
        (
            (CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y) * comptime!(plane_rows as u32),
            UNIT_POS_X,
            CUBE_DIM_X,
        )
    } else {
        (
            CUBE_POS_X * comptime!((sets * rows_per_plane) as u32),
            UNIT_POS_Y * CUBE_DIM_X + UNIT_POS_X,
            CUBE_DIM_X * CUBE_DIM_Y,
        )
    };
    if first_row < out_rows {
        let nx = NX::value();
        let per_word = comptime!(8 / nx);
        let chunks = cols / 32;
        let stream = chunks * comptime!(sets as u32);
        let slots = comptime!(rows_per_plane * unroll);
        let outputs = comptime!(batch * rows_per_plane);
        let mut acc = Array::<f32>::new(sets * outputs);
        #[unroll]
        for i in 0..sets * outputs {
            acc[i] = 0.0;
        }
        let mut words = Array::<Vector<u32, Const<4>>>::new(slots);
        let mut block_scales = Array::<f32>::new(slots);
        let mut values = Array::<f32>::new(8 * rows_per_plane);
        let mut dots = Array::<f32>::new(outputs);
        let mut set_of = Array::<u32>::new(unroll);
        let mut chunk_of = Array::<u32>::new(unroll);
        // Each step, lane `i` takes stream positions `first + u * width + i` (`u < unroll`) and issues every load
        // of the step before using any. Rows past the end re-read the last row; their sums are not written.
        // Lanes past the end of the stream re-read its last chunk and add nothing, so that every lane of the
        // plane takes part in the shuffles.
        for first in range_stepped(0, stream, width * comptime!(unroll as u32)) {
            #[unroll]
            for u in 0..unroll {
                let wanted = first + width * comptime!(u as u32) + lane;
                let position = if wanted < stream { wanted } else { stream - 1 };
                // The set of `position` without a division: `sets` is small and known when compiling.
                let mut set = 0u32;
                #[unroll]
                for s in 1..sets {
                    set += select(position >= chunks * comptime!(s as u32), 1u32, 0u32);
                }
                let chunk = position - set * chunks;
                set_of[u] = set;
                chunk_of[u] = chunk;
                let set_row = first_row + set * set_stride;
                // With `paired`, lanes `2k` and `2k + 1` read chunks of the same block: each decodes the scales
                // of every other row and takes its partner's for the rest.
                let odd = lane & 1;
                #[unroll]
                for r in 0..rows_per_plane {
                    let candidate = set_row + comptime!(r as u32);
                    let row = select(candidate < rows, candidate, rows - 1);
                    words[u * rows_per_plane + r] = packed[(row * chunks + chunk) as usize];
                    if comptime!(!paired || r % 2 == 0) {
                        let scale_row = if comptime!(paired) {
                            let candidate = set_row + comptime!(r as u32) + odd;
                            select(candidate < rows, candidate, rows - 1)
                        } else {
                            row
                        };
                        let mine = block_scale::<SharedMemory<f32>>(
                            (scale_row * cols + chunk * 32) / blocksize,
                            codes,
                            scales,
                            offsets,
                            &map_s,
                            double_quant,
                        );
                        if comptime!(paired) {
                            let other = plane_shuffle_xor(mine, 1);
                            block_scales[u * rows_per_plane + r] = select(odd == 0, mine, other);
                            block_scales[u * rows_per_plane + r + 1] =
                                select(odd == 0, other, mine);
                        } else {
                            block_scales[u * rows_per_plane + r] = mine;
                        }
                    }
                }
            }
            #[unroll]
            for u in 0..unroll {
                let valid = first + width * comptime!(u as u32) + lane < stream;
                let chunk = chunk_of[u];
                #[unroll]
                for i in 0..outputs {
                    dots[i] = 0.0;
                }
                // Word `w` of the chunk holds codes `8w..8w + 8`: decode it for every row, then multiply by
                // the matching 8 activations of each batch row (loaded once for all the set's rows).
                #[unroll]
                for w in 0..4usize {
                    #[unroll]
                    for r in 0..rows_per_plane {
                        let word = words[u * rows_per_plane + r];
                        if comptime!(shuffle) {
                            decode_word_shuffled(word[w], lane_value, &mut values, r * 8);
                        } else {
                            decode_word(word[w], &table, &mut values, r * 8);
                        }
                    }
                    #[unroll]
                    for b in 0..batch {
                        let base = (b * cols as usize + chunk as usize * 32 + w * 8) / nx;
                        #[unroll]
                        for v in 0..per_word {
                            let xv = if comptime!(x_groups > 0) {
                                let c = chunk as usize;
                                xs[b * group_len
                                    + (c / 32) * comptime!(32 * vpc)
                                    + comptime!((w * per_word + v) * 32)
                                    + c % 32]
                            } else {
                                x[base + v]
                            };
                            #[unroll]
                            for e in 0..nx {
                                let xe = f32::cast_from(xv[e]);
                                #[unroll]
                                for r in 0..rows_per_plane {
                                    dots[b * rows_per_plane + r] += xe * values[r * 8 + v * nx + e];
                                }
                            }
                        }
                    }
                }
                #[unroll]
                for s in 0..sets {
                    let mine = valid && set_of[u] == comptime!(s as u32);
                    #[unroll]
                    for i in 0..outputs {
                        let sum = dots[i] * block_scales[u * rows_per_plane + i % rows_per_plane];
                        acc[s * outputs + i] += select(mine, sum, 0.0);
                    }
                }
            }
        }
        // `acc[(s * batch + b) * rows_per_plane + r]`: set `s`, batch row `b`, row `r` of the set.
        if comptime!(glu) {
            // Rounded to `F` as the stacked product's output would be, then as a separate SiLU-and-multiply
            // kernel computes it.
            #[unroll]
            for i in 0..outputs {
                let gate = F::cast_from(plane_sum(acc[i]));
                let up = F::cast_from(plane_sum(acc[outputs + i]));
                let b = comptime!(i / rows_per_plane);
                let row = first_row + comptime!((i % rows_per_plane) as u32);
                if UNIT_POS_X == 0 && row < out_rows {
                    y[b * out_rows as usize + row as usize] = crate::decode::gated::<F>(gate, up);
                }
            }
        } else if comptime!(split == 1) {
            #[unroll]
            for i in 0..sets * outputs {
                let total = plane_sum(acc[i]);
                let s = comptime!(i / outputs);
                let b = comptime!((i % outputs) / rows_per_plane);
                let row = first_row + comptime!((s * rows_per_plane + i % rows_per_plane) as u32);
                if UNIT_POS_X == 0 && row < rows {
                    y[b * rows as usize + row as usize] = F::cast_from(total);
                }
            }
        } else {
            // Each plane's sums through shared memory; the first unit adds the planes' and writes.
            let all = comptime!(sets * outputs);
            let mut partial = SharedMemory::<f32>::new(comptime!(split * sets * outputs));
            #[unroll]
            for i in 0..all {
                let total = plane_sum(acc[i]);
                if UNIT_POS_X == 0 {
                    partial[UNIT_POS_Y as usize * all + i] = total;
                }
            }
            sync_cube();
            if UNIT_POS == 0 {
                #[unroll]
                for i in 0..all {
                    let mut total = 0.0f32;
                    #[unroll]
                    for p in 0..split {
                        total += partial[p * all + i];
                    }
                    let s = comptime!(i / outputs);
                    let b = comptime!((i % outputs) / rows_per_plane);
                    let row =
                        first_row + comptime!((s * rows_per_plane + i % rows_per_plane) as u32);
                    if row < rows {
                        y[b * rows as usize + row as usize] = F::cast_from(total);
                    }
                }
            }
        }
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn gemv_any<F: Float>(
    x: &Array<F>,
    packed: &Array<u32>,
    codes: &Array<u32>,
    scales: &Array<f32>,
    offsets: &Array<f32>,
    map: &Array<f32>,
    codebook: &Array<f32>,
    y: &mut Array<F>,
    rows: u32,
    cols: u32,
    #[comptime] batch: usize,
    #[comptime] blocksize: u32,
    #[comptime] double_quant: bool,
) {
    let table = load_codebook(codebook);
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row < rows {
        let mut acc = Array::<f32>::new(batch);
        #[unroll]
        for b in 0..batch {
            acc[b] = 0.0;
        }
        for col in range_stepped(UNIT_POS_X, cols, CUBE_DIM_X) {
            let index = row * cols + col;
            let byte = (packed[(index / 8) as usize] >> (((index / 2) % 4) * 8)) & 0xFF;
            let code = if (index & 1) == 0 {
                byte >> 4
            } else {
                byte & 0xF
            };
            let scale = block_scale::<Array<f32>>(
                index / blocksize,
                codes,
                scales,
                offsets,
                map,
                double_quant,
            );
            let w = table[code as usize] * scale;
            #[unroll]
            for b in 0..batch {
                acc[b] += w * f32::cast_from(x[b * cols as usize + col as usize]);
            }
        }
        #[unroll]
        for b in 0..batch {
            let total = plane_sum(acc[b]);
            if UNIT_POS_X == 0 {
                y[b * rows as usize + row as usize] = F::cast_from(total);
            }
        }
    }
}

//! The kernels of a decoder step other than the NF4 products: embedding lookup, residual add + RMSNorm, the dense
//! GEMV, q/k/v bias + rotary + KV-cache append, attention of one new token per sequence over its cache (split
//! over the cache, then combined: flash-decoding), the SiLU-gated product, and greedy argmax.
//!
//! Every launcher takes [`Buffer`]s laid out row-major, one row per sequence of the batch, checks their lengths
//! against the shapes it is given, and launches one kernel without reading anything back. Arithmetic follows
//! transformers' bf16 decoder: values are stored in the activation type `F` after each operation as PyTorch does,
//! reductions (norms, dot products, softmax) run in f32.

// Inside kernels, `u32::max_value()` and `f32::min_value()` are CubeCL's `Numeric` methods (runtime values a
// variable can start from), not std's legacy constants.
#![allow(clippy::legacy_numeric_constants)]

use cubecl::prelude::*;

use crate::nf4::Activation;
use crate::{Buffer, KernelError, plane_cube, plane_size};

/// Planes (warps) per cube for the row-reduction kernels.
const PLANES: u32 = 4;

/// Planes per attention cube: each scores as many consecutive cache positions as it has lanes, so a cube covers
/// `ATTENTION_PLANES x plane size` positions ([`attention_chunk`]); longer caches are split over several cubes and
/// combined.
const ATTENTION_PLANES: u32 = 4;

/// Cubes (sequences x key/value heads x splits) from which an attention cube takes a whole GQA group of queries
/// (fewer, larger cubes reading each key and value once); below it, one query head per cube.
pub const GROUPED_ATTENTION_CUBES: usize = 256;

/// Most query heads sharing one key/value head that the attention kernel takes.
pub const MAX_ATTENTION_GROUP: usize = 8;

/// Cache positions one attention cube covers on `client`'s device (4 planes of its plane size: 128 on NVIDIA).
pub fn attention_chunk<R: Runtime>(client: &ComputeClient<R>) -> usize {
    ATTENTION_PLANES as usize * plane_size(client) as usize
}

/// Values per 16-byte (or narrower) load of a key row of `head_dim` values of `size` bytes each.
fn key_vector(head_dim: usize, size: usize) -> usize {
    [16 / size, 4, 2]
        .into_iter()
        .find(|&n| n > 0 && head_dim.is_multiple_of(n))
        .unwrap_or(1)
}

/// Splits whose partial outputs each unit of the attention combine loads before adding any (the 7B's 1,300-token
/// pages take 11 splits: one round of loads).
const COMBINE_UNROLL: usize = 16;

/// Partial results per row of the first argmax stage.
const ARGMAX_GROUPS: usize = 64;

/// Most activation rows one dense GEMV launch multiplies.
pub const MAX_DENSE_BATCH: usize = 8;

/// Largest head dimension the attention kernels take.
pub const MAX_HEAD_DIM: usize = 256;

fn row_cube<R: Runtime>(client: &ComputeClient<R>) -> CubeDim {
    CubeDim::new_2d(plane_size(client), PLANES)
}

fn elementwise(n: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static((n as u32).div_ceil(256), 1, 1),
        CubeDim::new_1d(256),
    )
}

fn unsupported(what: String) -> KernelError {
    KernelError::Unsupported(what)
}

/// A dense weight matrix `[rows, cols]` (`[out_features, in_features]`) in the activation type. A clone reads the
/// same device memory.
#[derive(Clone)]
pub struct DenseMatrix<F> {
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) weight: Buffer<F>,
}

impl<F: Activation> DenseMatrix<F> {
    /// Uploads a row-major `[rows, cols]` matrix.
    pub fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        values: &[F],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if values.len() != rows * cols {
            return Err(unsupported(format!(
                "a {rows}x{cols} matrix needs {} values, got {}",
                rows * cols,
                values.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            weight: Buffer::from_slice(client, values),
        })
    }

    /// A row-major `[rows, cols]` matrix already on the device (e.g. a model's weight, shared).
    pub fn from_buffer(weight: Buffer<F>, rows: usize, cols: usize) -> Result<Self, KernelError> {
        weight.check("dense weight", rows * cols)?;
        Ok(Self { rows, cols, weight })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The row-major values.
    pub fn weight(&self) -> &Buffer<F> {
        &self.weight
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes one product reads from the weight.
    pub fn weight_bytes(&self) -> usize {
        self.rows * self.cols * size_of::<F>()
    }
}

/// `y = x W^T` for a dense `W`: `x` is `[batch, cols]`, `y` `[batch, rows]`, `batch` in `1..=8`. One plane per
/// output row, 16-byte loads when `cols` allows them.
pub fn gemv_dense<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    x: &Buffer<F>,
    batch: usize,
    weight: &DenseMatrix<F>,
    y: &Buffer<F>,
) -> Result<(), KernelError> {
    if !(1..=MAX_DENSE_BATCH).contains(&batch) {
        return Err(unsupported(format!(
            "batch {batch}: the dense GEMV takes 1 to {MAX_DENSE_BATCH} rows per launch"
        )));
    }
    let (rows, cols) = (weight.rows, weight.cols);
    x.check("x", batch * cols)?;
    y.check("y", batch * rows)?;
    let wide = 16 / size_of::<F>();
    let vector = if cols.is_multiple_of(wide) { wide } else { 1 };
    let cube_count = CubeCount::Static((rows as u32).div_ceil(PLANES), 1, 1);
    // SAFETY: the arrays are passed with their own lengths, checked above to cover `batch x cols`,
    // `rows x cols` and `batch x rows`, which is all the kernel indexes.
    #[allow(unsafe_code)]
    unsafe {
        gemv_dense_kernel::launch_unchecked::<F, R>(
            client,
            cube_count,
            row_cube(client),
            vector,
            x.array_arg(),
            weight.weight.array_arg(),
            y.array_arg(),
            rows as u32,
            (cols / vector) as u32,
            batch,
        );
    }
    Ok(())
}

/// One adapted part of a (possibly stacked) product: rows `row_start..row_start + rows` of its output get
/// `(z_part B^T) * scale` added, where `z_part` is the part's `rank` columns of the adapter activations `z = x A^T`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPart {
    /// First output row of the part in the product's output.
    pub row_start: usize,
    /// Output rows of the part.
    pub rows: usize,
    /// The adapter's rank.
    pub rank: usize,
    /// `alpha / rank` (or rsLoRA's `alpha / sqrt(rank)`).
    pub scale: f32,
    /// `B`, row-major `[rows, rank]`.
    pub b: Vec<f32>,
}

/// The up-projections of the LoRA adapters of one product (up to [`MAX_LORA_PARTS`] parts, each over its own rows
/// of the output), on the device: `z` holds the parts' down-projections side by side, `[batch, sum of ranks]`, in
/// the order of the parts.
pub struct LoraUp<F> {
    b: Buffer<F>,
    /// Per part: row start, rows, column of `z`, rank, offset into `b`.
    parts: Buffer<u32>,
    scales: Buffer<f32>,
    count: usize,
    out_width: usize,
    z_width: usize,
}

/// Most adapted parts one product has (q, k and v stacked).
pub const MAX_LORA_PARTS: usize = 3;

impl<F: Activation> LoraUp<F> {
    /// Uploads the parts of a product whose output is `out_width` wide. Parts must not overlap and must lie
    /// inside the output.
    pub fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        out_width: usize,
        parts: &[LoraPart],
    ) -> Result<Self, KernelError> {
        if parts.is_empty() || parts.len() > MAX_LORA_PARTS {
            return Err(unsupported(format!(
                "{} adapted parts in one product (1 to {MAX_LORA_PARTS})",
                parts.len()
            )));
        }
        let mut table = Vec::with_capacity(parts.len() * 5);
        let mut b = Vec::new();
        let mut z_width = 0;
        let mut sorted: Vec<&LoraPart> = parts.iter().collect();
        sorted.sort_by_key(|p| p.row_start);
        for pair in sorted.windows(2) {
            if pair[0].row_start + pair[0].rows > pair[1].row_start {
                return Err(unsupported(format!(
                    "adapted rows {}..{} and {}..{} overlap",
                    pair[0].row_start,
                    pair[0].row_start + pair[0].rows,
                    pair[1].row_start,
                    pair[1].row_start + pair[1].rows
                )));
            }
        }
        for part in parts {
            if part.rank == 0 || part.b.len() != part.rows * part.rank {
                return Err(unsupported(format!(
                    "a LoRA B of {} values for {} rows of rank {}",
                    part.b.len(),
                    part.rows,
                    part.rank
                )));
            }
            if part.row_start + part.rows > out_width {
                return Err(unsupported(format!(
                    "adapted rows {}..{} of an output {out_width} wide",
                    part.row_start,
                    part.row_start + part.rows
                )));
            }
            table
                .extend([part.row_start, part.rows, z_width, part.rank, b.len()].map(|v| v as u32));
            z_width += part.rank;
            b.extend(F::from_host_slice(&part.b));
        }
        let scales: Vec<f32> = parts.iter().map(|p| p.scale).collect();
        Ok(Self {
            b: Buffer::from_slice(client, &b),
            parts: Buffer::from_slice(client, &table),
            scales: Buffer::from_slice(client, &scales),
            count: parts.len(),
            out_width,
            z_width,
        })
    }

    /// Columns of `z` (the sum of the parts' ranks).
    pub fn z_width(&self) -> usize {
        self.z_width
    }

    /// Bytes one launch reads from `B`.
    pub fn weight_bytes(&self) -> usize {
        self.b.len() * size_of::<F>()
    }
}

/// `y[b, n] += F(F(z_p[b] . B_p[n - start_p]) * scale_p)` for every row `n` of an adapted part `p`, rounded to `F`
/// after the product, the scaling and the sum as transformers + PEFT do in `F`; other rows are left as they are.
/// `z`: `[batch, up.z_width()]`, `y`: `[batch, out_width]`. One plane per output row.
pub fn lora_add<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    z: &Buffer<F>,
    batch: usize,
    up: &LoraUp<F>,
    y: &Buffer<F>,
) -> Result<(), KernelError> {
    if batch == 0 {
        return Err(unsupported("batch 0".into()));
    }
    z.check("z", batch * up.z_width)?;
    y.check("y", batch * up.out_width)?;
    let cube_count = CubeCount::Static((up.out_width as u32).div_ceil(PLANES), 1, 1);
    // SAFETY: `z` and `y` cover `batch` rows (checked above); the part table was validated by `LoraUp::upload`
    // (parts inside the output, `b` holding `rows x rank` values each).
    #[allow(unsafe_code)]
    unsafe {
        lora_add_kernel::launch_unchecked::<F, R>(
            client,
            cube_count,
            row_cube(client),
            z.array_arg(),
            up.b.array_arg(),
            up.parts.array_arg(),
            up.scales.array_arg(),
            y.array_arg(),
            up.out_width as u32,
            up.z_width as u32,
            batch as u32,
            up.count,
        );
    }
    Ok(())
}

/// `out[b] = table[ids[b]]` for `batch` rows of width `hidden`.
pub fn embed<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    table: &Buffer<F>,
    ids: &Buffer<u32>,
    batch: usize,
    hidden: usize,
    out: &Buffer<F>,
) -> Result<(), KernelError> {
    ids.check("ids", batch)?;
    out.check("out", batch * hidden)?;
    table.check("table", hidden)?;
    let vocab = table.len() / hidden;
    // SAFETY: ids are checked against the table's rows inside the kernel; every other index is within the
    // lengths checked above.
    #[allow(unsafe_code)]
    unsafe {
        embed_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(batch as u32, 1, 1),
            CubeDim::new_1d(256),
            table.array_arg(),
            ids.array_arg(),
            out.array_arg(),
            hidden as u32,
            vocab as u32,
        );
    }
    Ok(())
}

/// For each of `batch` rows: `residual += delta` when `delta` is given (stored in `F`), then
/// `out = F(residual * rsqrt(mean(residual^2) + eps)) * weight`, as transformers' `RMSNorm` after a residual add.
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    residual: &Buffer<F>,
    delta: Option<&Buffer<F>>,
    weight: &Buffer<F>,
    batch: usize,
    eps: f32,
    out: &Buffer<F>,
) -> Result<(), KernelError> {
    let hidden = weight.len();
    residual.check("residual", batch * hidden)?;
    out.check("out", batch * hidden)?;
    if let Some(delta) = delta {
        delta.check("delta", batch * hidden)?;
    }
    // Up to 1024 units per row: one row per cube leaves most of the GPU idle, so each unit should take few
    // values.
    let (cube_dim, planes) = plane_cube(client, 1024);
    // SAFETY: every index is below `batch * hidden`, checked above for each array (`delta` is not read when
    // absent; the residual stands in for it).
    #[allow(unsafe_code)]
    unsafe {
        add_rms_norm_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(batch as u32, 1, 1),
            cube_dim,
            residual.array_arg(),
            delta.unwrap_or(residual).array_arg(),
            weight.array_arg(),
            out.array_arg(),
            hidden as u32,
            eps,
            delta.is_some(),
            planes as usize,
            hidden.div_ceil(cube_dim.num_elems() as usize),
        );
    }
    Ok(())
}

/// The shapes of one decoder layer's attention, shared by the attention launchers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Cache slots per sequence.
    pub capacity: usize,
    /// Sequences.
    pub batch: usize,
}

impl AttentionShape {
    fn validate(&self) -> Result<(), KernelError> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(unsupported(format!(
                "{} query heads over {} key/value heads",
                self.heads, self.kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim > MAX_HEAD_DIM || self.head_dim == 0 {
            return Err(unsupported(format!(
                "head dimension {} (even, at most {MAX_HEAD_DIM})",
                self.head_dim
            )));
        }
        if self.heads / self.kv_heads > MAX_ATTENTION_GROUP {
            return Err(unsupported(format!(
                "{} query heads per key/value head (at most {MAX_ATTENTION_GROUP})",
                self.heads / self.kv_heads
            )));
        }
        Ok(())
    }

    /// Values in one layer's key (or value) cache: `[batch, kv_heads, capacity, head_dim]`.
    pub fn cache_len(&self) -> usize {
        self.batch * self.kv_heads * self.capacity * self.head_dim
    }
}

/// Scratch space of the split attention: per sequence, head and split, `head_dim` partial outputs and the
/// running max and sum.
pub struct AttentionScratch {
    out: Buffer<f32>,
    stats: Buffer<f32>,
    splits: usize,
}

impl AttentionScratch {
    /// Scratch for caches of up to `shape.capacity` positions.
    pub fn new<R: Runtime>(client: &ComputeClient<R>, shape: AttentionShape) -> Self {
        let splits = shape.capacity.div_ceil(attention_chunk(client)).max(1);
        let rows = shape.batch * shape.heads * splits;
        Self {
            out: Buffer::empty(client, rows * shape.head_dim),
            stats: Buffer::empty(client, rows * 2),
            splits,
        }
    }
}

/// The new token of each sequence straight out of its fused q/k/v projection, which the attention rotates and
/// appends to the cache itself: `qkv` is `[batch, (heads + 2 * kv_heads) * head_dim]` (queries, keys, values),
/// `bias` its `[(heads + 2 * kv_heads) * head_dim]` bias, `inv_freq` the `[head_dim / 2]` rotary inverse
/// frequencies, `deltas[b]` what sequence `b`'s position adds to its cache length (M-RoPE's offset; the three
/// position sections are equal during decode).
#[derive(Clone, Copy)]
pub struct NewToken<'a, F: Activation> {
    /// The fused projection's output.
    pub qkv: &'a Buffer<F>,
    /// Its bias.
    pub bias: &'a Buffer<F>,
    /// Rotary inverse frequencies.
    pub inv_freq: &'a Buffer<f32>,
    /// Position offsets per sequence.
    pub deltas: &'a Buffer<i32>,
}

/// Cache positions whose values one attention lane loads before using them.
const VALUE_UNROLL: usize = 8;

/// Values per load of a value row in the attention's value pass: lanes take consecutive vectors of a row, as
/// wide as 16 bytes allow while every lane of a plane still has one.
fn value_vector(head_dim: usize, size: usize, plane_width: usize) -> usize {
    [8, 4, 2]
        .into_iter()
        .find(|&n| n * size <= 16 && head_dim.is_multiple_of(n) && head_dim / n >= plane_width)
        .unwrap_or(1)
}

/// One decode step's attention for each sequence's new token, grouped-query, scaled by `1 / sqrt(head_dim)`:
/// adds the biases to `new`'s query, key and value, rotates query and key by the sequence's position
/// (`lens[b] + deltas[b]`), writes key and value into cache slot `lens[b]`, and attends over slots
/// `0..=lens[b]`; `out`: `[batch, heads * head_dim]`. One launch does all of it but the splits' combine (a
/// second). `max_tokens` bounds `lens[b] + 1` over the batch and sets how many splits are launched; caches are
/// `[batch, kv_heads, capacity, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attend<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    shape: AttentionShape,
    new: NewToken<'_, F>,
    (k_cache, v_cache): (&Buffer<F>, &Buffer<F>),
    lens: &Buffer<u32>,
    max_tokens: usize,
    scratch: &AttentionScratch,
    out: &Buffer<F>,
) -> Result<(), KernelError> {
    shape.validate()?;
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
        batch,
        capacity,
    } = shape;
    if max_tokens > capacity {
        return Err(unsupported(format!(
            "{max_tokens} tokens in a cache of {capacity} slots"
        )));
    }
    let width = (heads + 2 * kv_heads) * head_dim;
    new.qkv.check("qkv", batch * width)?;
    new.bias.check("qkv bias", width)?;
    new.inv_freq.check("inv_freq", head_dim / 2)?;
    new.deltas.check("deltas", batch)?;
    out.check("out", batch * heads * head_dim)?;
    k_cache.check("k_cache", shape.cache_len())?;
    v_cache.check("v_cache", shape.cache_len())?;
    lens.check("lens", batch)?;
    let splits = max_tokens.div_ceil(attention_chunk(client)).max(1);
    if splits > scratch.splits || scratch.stats.len() < batch * heads * scratch.splits * 2 {
        return Err(unsupported(format!(
            "attention scratch for {} splits, {splits} needed",
            scratch.splits
        )));
    }
    let scale = 1.0 / (head_dim as f32).sqrt();
    let ratio = heads / kv_heads;
    // Whole GQA groups per cube read each key and value once for the group, but give `ratio` times fewer cubes:
    // only when there are enough of them to fill the device.
    let group = if batch * kv_heads * splits >= GROUPED_ATTENTION_CUBES {
        ratio
    } else {
        1
    };
    let plane_width = plane_size(client) as usize;
    let value_width = value_vector(head_dim, size_of::<F>(), plane_width);
    // SAFETY: lengths checked above; the kernels index slots below `lens[b] + 1 <= max_tokens <= capacity`
    // (the caller's bound; slots past a sequence's tokens are not read, lanes without one read slot 0) and
    // splits below the scratch's.
    #[allow(unsafe_code)]
    unsafe {
        attend_split_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(splits as u32, (heads / group) as u32, batch as u32),
            CubeDim::new_2d(plane_width as u32, ATTENTION_PLANES),
            key_vector(head_dim, size_of::<F>()),
            value_width,
            new.qkv.array_arg(),
            new.bias.array_arg(),
            new.inv_freq.array_arg(),
            new.deltas.array_arg(),
            k_cache.array_arg(),
            v_cache.array_arg(),
            lens.array_arg(),
            scratch.out.array_arg(),
            scratch.stats.array_arg(),
            capacity as u32,
            scale,
            ratio as u32,
            head_dim,
            group,
            (head_dim / value_width).div_ceil(plane_width),
            ATTENTION_PLANES as usize,
            plane_width,
        );
        attend_combine_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(heads as u32, batch as u32, 1),
            CubeDim::new_1d(head_dim.min(256) as u32),
            scratch.out.array_arg(),
            scratch.stats.array_arg(),
            out.array_arg(),
            head_dim as u32,
            splits as u32,
        );
    }
    Ok(())
}

/// `out[b, j] = F(silu(gate_up[b, j])) * gate_up[b, width + j]`: `gate_up` is `[batch, 2 * width]` (the fused
/// gate and up projections), `out` is `[batch, width]`.
pub fn silu_mul<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    gate_up: &Buffer<F>,
    batch: usize,
    width: usize,
    out: &Buffer<F>,
) -> Result<(), KernelError> {
    let n = batch * width;
    gate_up.check("gate_up", 2 * n)?;
    out.check("out", n)?;
    let (count, dim) = elementwise(n);
    // SAFETY: indices below `n`, checked above.
    #[allow(unsafe_code)]
    unsafe {
        silu_mul_kernel::launch_unchecked::<F, R>(
            client,
            count,
            dim,
            gate_up.array_arg(),
            out.array_arg(),
            n as u32,
            width as u32,
        );
    }
    Ok(())
}

/// Scratch space of the two-stage argmax: per row, the best value and index of each group of the vocabulary.
pub struct ArgmaxScratch {
    values: Buffer<f32>,
    indices: Buffer<u32>,
}

impl ArgmaxScratch {
    /// Scratch for up to `batch` rows.
    pub fn new<R: Runtime>(client: &ComputeClient<R>, batch: usize) -> Self {
        Self {
            values: Buffer::empty(client, batch * ARGMAX_GROUPS),
            indices: Buffer::empty(client, batch * ARGMAX_GROUPS),
        }
    }
}

/// Greedy decoding: `ids[b]` = the first index of the largest of `logits[b]` (`[batch, vocab]`), and `lens[b]`
/// moves one slot on (the step's token is now cached). Two launches: groups of the vocabulary in parallel, then
/// one cube per row over the groups' winners.
pub fn argmax_advance<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    logits: &Buffer<F>,
    batch: usize,
    vocab: usize,
    scratch: &ArgmaxScratch,
    ids: &Buffer<u32>,
    lens: &Buffer<u32>,
) -> Result<(), KernelError> {
    logits.check("logits", batch * vocab)?;
    ids.check("ids", batch)?;
    lens.check("lens", batch)?;
    scratch
        .values
        .check("argmax scratch", batch * ARGMAX_GROUPS)?;
    let (partial_dim, partial_planes) = plane_cube(client, 256);
    let (final_dim, final_planes) = plane_cube(client, ARGMAX_GROUPS as u32);
    // SAFETY: indices below `batch * vocab`, `batch * ARGMAX_GROUPS` and `batch`, checked above.
    #[allow(unsafe_code)]
    unsafe {
        argmax_partial_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(ARGMAX_GROUPS as u32, batch as u32, 1),
            partial_dim,
            logits.array_arg(),
            scratch.values.array_arg(),
            scratch.indices.array_arg(),
            vocab as u32,
            partial_planes as usize,
        );
        argmax_final_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(batch as u32, 1, 1),
            final_dim,
            scratch.values.array_arg(),
            scratch.indices.array_arg(),
            ids.array_arg(),
            lens.array_arg(),
            ARGMAX_GROUPS as u32,
            final_planes as usize,
        );
    }
    Ok(())
}

/// One unit per value of `len` tokens of one sequence's keys or values; `None` when there are none.
fn cache_copy_dims(shape: AttentionShape, len: usize) -> Option<(CubeCount, CubeDim)> {
    let n = shape.kv_heads * len * shape.head_dim;
    (n > 0).then(|| elementwise(n))
}

/// Moves the first `len` tokens of sequence `from` of a cache `[batch, kv_heads, capacity, head_dim]` (keys or
/// values) to sequence `to` of the same cache, so that a batch keeps its sequences in its first slots when an
/// earlier one ends. One buffer read and written: the two sequences' regions do not overlap.
pub fn move_cache<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    shape: AttentionShape,
    cache: &Buffer<F>,
    from: usize,
    to: usize,
    len: usize,
) -> Result<(), KernelError> {
    shape.validate()?;
    if from >= shape.batch || to >= shape.batch || from == to || len > shape.capacity {
        return Err(unsupported(format!(
            "moving {len} tokens from sequence {from} to {to} of {} in {} slots",
            shape.batch, shape.capacity
        )));
    }
    cache.check("cache", shape.cache_len())?;
    let Some((count, dim)) = cache_copy_dims(shape, len) else {
        return Ok(());
    };
    // SAFETY: both sequences below `batch`, positions below `len <= capacity`, the cache's length checked.
    #[allow(unsafe_code)]
    unsafe {
        move_cache_kernel::launch_unchecked::<F, R>(
            client,
            count,
            dim,
            cache.array_arg(),
            from as u32,
            to as u32,
            shape.kv_heads as u32,
            len as u32,
            shape.capacity as u32,
            shape.head_dim as u32,
        );
    }
    Ok(())
}

/// Copies the first `len` tokens of one sequence's keys or values `src` (`[kv_heads, src_slots, head_dim]`, e.g.
/// a prefill's cache with room after its tokens, or `src_slots == len`) into slots `0..len` of sequence `seq` of a
/// cache `[batch, kv_heads, capacity, head_dim]`.
pub fn write_cache<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    shape: AttentionShape,
    src: &Buffer<F>,
    src_slots: usize,
    seq: usize,
    len: usize,
    cache: &Buffer<F>,
) -> Result<(), KernelError> {
    shape.validate()?;
    if seq >= shape.batch || len > shape.capacity || len > src_slots {
        return Err(unsupported(format!(
            "sequence {seq} of {} with {len} tokens (of {src_slots} in the source) in {} slots",
            shape.batch, shape.capacity
        )));
    }
    src.check("src", shape.kv_heads * src_slots * shape.head_dim)?;
    cache.check("cache", shape.cache_len())?;
    let Some((count, dim)) = cache_copy_dims(shape, len) else {
        return Ok(());
    };
    // SAFETY: sources below `n`, destinations inside sequence `seq`'s first `len <= capacity` slots.
    #[allow(unsafe_code)]
    unsafe {
        write_cache_kernel::launch_unchecked::<F, R>(
            client,
            count,
            dim,
            src.array_arg(),
            cache.array_arg(),
            seq as u32,
            shape.kv_heads as u32,
            src_slots as u32,
            len as u32,
            shape.capacity as u32,
            shape.head_dim as u32,
        );
    }
    Ok(())
}

/// Sum over the cube (a 2-D cube of `planes` planes), available to every unit.
#[cube]
fn cube_sum(value: f32, #[comptime] planes: usize) -> f32 {
    let mut shared = SharedMemory::<f32>::new(planes);
    let partial = plane_sum(value);
    if UNIT_POS_X == 0 {
        shared[UNIT_POS_Y as usize] = partial;
    }
    sync_cube();
    let mut total = 0.0f32;
    #[unroll]
    for p in 0..planes {
        total += shared[p];
    }
    total
}

#[cube(launch_unchecked)]
fn gemv_dense_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    y: &mut Array<F>,
    rows: u32,
    vectors: u32,
    #[comptime] batch: usize,
) {
    let row = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if row < rows {
        let n = N::value();
        let mut acc = Array::<f32>::new(batch);
        #[unroll]
        for b in 0..batch {
            acc[b] = 0.0;
        }
        for i in range_stepped(UNIT_POS_X, vectors, CUBE_DIM_X) {
            let wv = w[(row * vectors + i) as usize];
            #[unroll]
            for b in 0..batch {
                let xv = x[b * vectors as usize + i as usize];
                #[unroll]
                for e in 0..n {
                    acc[b] += f32::cast_from(wv[e]) * f32::cast_from(xv[e]);
                }
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

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn lora_add_kernel<F: Float>(
    z: &Array<F>,
    b: &Array<F>,
    parts: &Array<u32>,
    scales: &Array<f32>,
    y: &mut Array<F>,
    out_width: u32,
    z_width: u32,
    batch: u32,
    #[comptime] count: usize,
) {
    let n = CUBE_POS_X * CUBE_DIM_Y + UNIT_POS_Y;
    if n < out_width {
        // 1 + the part that holds row `n`, 0 for none.
        let mut found = 0u32;
        #[unroll]
        for p in 0..count {
            let start = parts[p * 5];
            if n >= start && n < start + parts[p * 5 + 1] {
                found = comptime!(p as u32 + 1);
            }
        }
        if found > 0 {
            let part = found - 1;
            let at = (part * 5) as usize;
            let column = parts[at + 2];
            let rank = parts[at + 3];
            let row = parts[at + 4] + (n - parts[at]) * rank;
            let scale = scales[part as usize];
            for s in 0..batch {
                let mut dot = 0.0f32;
                for j in range_stepped(UNIT_POS_X, rank, CUBE_DIM_X) {
                    dot += f32::cast_from(b[(row + j) as usize])
                        * f32::cast_from(z[(s * z_width + column + j) as usize]);
                }
                let total = plane_sum(dot);
                if UNIT_POS_X == 0 {
                    let delta = F::cast_from(f32::cast_from(F::cast_from(total)) * scale);
                    let at = (s * out_width + n) as usize;
                    y[at] = F::cast_from(f32::cast_from(y[at]) + f32::cast_from(delta));
                }
            }
        }
    }
}

#[cube(launch_unchecked)]
fn embed_kernel<F: Float>(
    table: &Array<F>,
    ids: &Array<u32>,
    out: &mut Array<F>,
    hidden: u32,
    vocab: u32,
) {
    let b = CUBE_POS_X;
    // An id outside the table reads row 0 rather than memory past the table.
    let mut id = ids[b as usize];
    if id >= vocab {
        id = 0;
    }
    for i in range_stepped(UNIT_POS_X, hidden, CUBE_DIM_X) {
        out[(b * hidden + i) as usize] = table[(id * hidden + i) as usize];
    }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn add_rms_norm_kernel<F: Float>(
    residual: &mut Array<F>,
    delta: &Array<F>,
    weight: &Array<F>,
    out: &mut Array<F>,
    hidden: u32,
    eps: f32,
    #[comptime] add: bool,
    #[comptime] planes: usize,
    #[comptime] per_unit: usize,
) {
    // Unit `i` takes values `i, i + units, ...` (`per_unit` of them), all loaded before any is used and kept in
    // registers between the two passes. Units past the row read value 0 and write nothing.
    let base = CUBE_POS_X * hidden;
    let mut rows = Array::<F>::new(per_unit);
    let mut weights = Array::<F>::new(per_unit);
    #[unroll]
    for u in 0..per_unit {
        let i = UNIT_POS + comptime!(u as u32) * CUBE_DIM;
        let at = select(i < hidden, i, 0);
        rows[u] = residual[(base + at) as usize];
        if comptime!(add) {
            rows[u] += delta[(base + at) as usize];
        }
        weights[u] = weight[at as usize];
    }
    let mut squares = 0.0f32;
    #[unroll]
    for u in 0..per_unit {
        let i = UNIT_POS + comptime!(u as u32) * CUBE_DIM;
        if i < hidden {
            if comptime!(add) {
                residual[(base + i) as usize] = rows[u];
            }
            let value = f32::cast_from(rows[u]);
            squares += value * value;
        }
    }
    let total = cube_sum(squares, planes);
    let inv = 1.0f32 / f32::sqrt(total / f32::cast_from(hidden) + eps);
    #[unroll]
    for u in 0..per_unit {
        let i = UNIT_POS + comptime!(u as u32) * CUBE_DIM;
        if i < hidden {
            out[(base + i) as usize] = F::cast_from(f32::cast_from(rows[u]) * inv) * weights[u];
        }
    }
}

/// `N` consecutive values of `values` from `first`, as a vector of `F`.
#[cube]
fn vector_from<F: Float, N: Size>(values: &SharedMemory<f32>, first: u32) -> Vector<F, N> {
    let mut v = Vector::<F, N>::empty();
    #[unroll]
    for e in 0..N::value() {
        v[e] = F::cast_from(values[first as usize + e]);
    }
    v
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attend_split_kernel<F: Float, N: Size, NV: Size>(
    qkv: &Array<F>,
    bias: &Array<F>,
    inv_freq: &Array<f32>,
    deltas: &Array<i32>,
    k_cache: &mut Array<Vector<F, N>>,
    v_cache: &mut Array<Vector<F, NV>>,
    lens: &Array<u32>,
    part_out: &mut Array<f32>,
    part_stats: &mut Array<f32>,
    capacity: u32,
    scale: f32,
    ratio: u32,
    #[comptime] head_dim: usize,
    #[comptime] group: usize,
    #[comptime] lane_vectors: usize,
    #[comptime] planes: usize,
    #[comptime] plane_width: usize,
) {
    // Cube `(split, qg, b)` takes query heads `qg * group ..` (`group` of them, all on one key/value head: the
    // whole GQA group, or one head when the batch is too small to fill the device with whole groups). Lane `i`
    // of plane `p` scores position `start + i` against every query of the group (the whole key row in 16-byte
    // loads, no reduction across lanes); for the values, the lanes split a row and the plane goes over its
    // positions.
    let split = CUBE_POS_X;
    let qg = CUBE_POS_Y;
    let b = CUBE_POS_Z;
    let splits = CUBE_COUNT_X;
    let heads = CUBE_COUNT_Y * comptime!(group as u32);
    let kv_heads = heads / ratio;
    let kvh = qg * comptime!(group as u32) / ratio;
    let lane = UNIT_POS_X;
    let plane = UNIT_POS_Y;
    let width = CUBE_DIM_X;
    let half = comptime!(head_dim as u32 / 2);
    // The new token sits at `slot`: its key and value are computed here from the projection, not read.
    let slot = lens[b as usize];
    let tokens = slot + 1;
    let start = (split * comptime!(planes as u32) + plane) * width;
    let cube_start = split * comptime!(planes as u32) * width;
    let holds_new = slot >= cube_start && slot < cube_start + comptime!(planes as u32) * width;
    let cache_row = (b * kv_heads + kvh) * capacity;
    let j = start + lane;
    let valid = j < tokens;
    // The lane's cached key, loaded before anything else so that its loads are in flight with the projection's
    // below. Lanes without a cached position read slot 0 and use nothing of it.
    let n = N::value();
    let vectors = comptime!(head_dim / n);
    let mut keys = Array::<Vector<F, N>>::new(vectors);
    let key_row = (cache_row + select(j < slot, j, 0)) * comptime!(vectors as u32);
    #[unroll]
    for v in 0..vectors {
        keys[v] = k_cache[key_row as usize + v];
    }
    let nv = NV::value();
    let row_vectors = comptime!(head_dim / nv);
    // The group's queries with their bias, rotated (in `F`, as the projection's output is stored) and scaled,
    // in shared memory; the cube holding the new position also computes its key and value.
    let position = f32::cast_from(i32::cast_from(slot) + deltas[b as usize]);
    let qkv_row = b * (heads + 2 * kv_heads) * comptime!(head_dim as u32);
    let mut query = SharedMemory::<f32>::new(comptime!(group * head_dim));
    for u in range_stepped(UNIT_POS, comptime!((group * head_dim / 2) as u32), CUBE_DIM) {
        let g = u / half;
        let i = u % half;
        let angle = position * inv_freq[i as usize];
        let cos = F::cast_from(f32::cos(angle));
        let sin = F::cast_from(f32::sin(angle));
        let col = (qg * comptime!(group as u32) + g) * comptime!(head_dim as u32) + i;
        let x1 = qkv[(qkv_row + col) as usize] + bias[col as usize];
        let x2 = qkv[(qkv_row + col + half) as usize] + bias[(col + half) as usize];
        let at = g * comptime!(head_dim as u32) + i;
        query[at as usize] = f32::cast_from(x1 * cos - x2 * sin) * scale;
        query[(at + half) as usize] = f32::cast_from(x2 * cos + x1 * sin) * scale;
    }
    let mut new_k = SharedMemory::<f32>::new(head_dim);
    let mut new_v = SharedMemory::<f32>::new(head_dim);
    if holds_new {
        for i in range_stepped(UNIT_POS, half, CUBE_DIM) {
            let angle = position * inv_freq[i as usize];
            let cos = F::cast_from(f32::cos(angle));
            let sin = F::cast_from(f32::sin(angle));
            let k_col = (heads + kvh) * comptime!(head_dim as u32) + i;
            let v_col = k_col + kv_heads * comptime!(head_dim as u32);
            let x1 = qkv[(qkv_row + k_col) as usize] + bias[k_col as usize];
            let x2 = qkv[(qkv_row + k_col + half) as usize] + bias[(k_col + half) as usize];
            new_k[i as usize] = f32::cast_from(x1 * cos - x2 * sin);
            new_k[(i + half) as usize] = f32::cast_from(x2 * cos + x1 * sin);
            new_v[i as usize] =
                f32::cast_from(qkv[(qkv_row + v_col) as usize] + bias[v_col as usize]);
            new_v[(i + half) as usize] = f32::cast_from(
                qkv[(qkv_row + v_col + half) as usize] + bias[(v_col + half) as usize],
            );
        }
    }
    sync_cube();
    // The new key and value into the cache, by one cube per key/value head (the first query head's); no cube
    // of this launch reads that slot from the cache.
    let in_group = (qg * comptime!(group as u32)) % ratio;
    if holds_new && in_group == 0 {
        let row = cache_row + slot;
        for v in range_stepped(UNIT_POS, comptime!(vectors as u32), CUBE_DIM) {
            k_cache[(row * comptime!(vectors as u32) + v) as usize] =
                vector_from::<F, N>(&new_k, v * comptime!(n as u32));
        }
        for v in range_stepped(UNIT_POS, comptime!(row_vectors as u32), CUBE_DIM) {
            v_cache[(row * comptime!(row_vectors as u32) + v) as usize] =
                vector_from::<F, NV>(&new_v, v * comptime!(nv as u32));
        }
    }
    if j == slot {
        #[unroll]
        for v in 0..vectors {
            keys[v] = vector_from::<F, N>(&new_k, comptime!((v * n) as u32));
        }
    }
    let mut scores = Array::<f32>::new(group);
    #[unroll]
    for g in 0..group {
        scores[g] = 0.0;
    }
    #[unroll]
    for v in 0..vectors {
        let kv = keys[v];
        #[unroll]
        for e in 0..n {
            let k = f32::cast_from(kv[e]);
            #[unroll]
            for g in 0..group {
                scores[g] += query[g * head_dim + v * n + e] * k;
            }
        }
    }
    // Per query: the plane's max and the softmax weights of its positions, shared with the plane through shared
    // memory for the value pass.
    let mut weights = SharedMemory::<f32>::new(comptime!(planes * group * plane_width));
    let mut maxima = Array::<f32>::new(group);
    let mut sums = Array::<f32>::new(group);
    #[unroll]
    for g in 0..group {
        let mut score = f32::min_value();
        if valid {
            score = scores[g];
        }
        let top = plane_max(score);
        let mut w = 0.0f32;
        if valid {
            w = f32::exp(score - top);
        }
        maxima[g] = top;
        sums[g] = plane_sum(w);
        weights[(plane as usize * group + g) * plane_width + lane as usize] = w;
    }
    sync_cube();
    // Values: lane `i` accumulates vectors `i, i + width, ...` of every query's output over the plane's
    // positions, `VALUE_UNROLL` positions' loads in flight at a time (all of a plane's at once take more
    // registers than a thread has: measured slower).
    let mut acc = Array::<f32>::new(comptime!(group * lane_vectors * nv));
    #[unroll]
    for i in 0..comptime!(group * lane_vectors * nv) {
        acc[i] = 0.0;
    }
    let mut count = 0u32;
    if start < tokens {
        count = tokens - start;
        if count > width {
            count = width;
        }
    }
    for p0 in range_stepped(0, count, comptime!(VALUE_UNROLL as u32)) {
        let mut values = Array::<Vector<F, NV>>::new(comptime!(VALUE_UNROLL * lane_vectors));
        #[unroll]
        for u in 0..VALUE_UNROLL {
            let position = start + p0 + comptime!(u as u32);
            let row =
                (cache_row + select(position < slot, position, 0)) * comptime!(row_vectors as u32);
            #[unroll]
            for t in 0..lane_vectors {
                let vi = lane + comptime!(t as u32) * width;
                let at = select(vi < comptime!(row_vectors as u32), vi, 0);
                values[u * lane_vectors + t] = v_cache[(row + at) as usize];
                if position == slot {
                    values[u * lane_vectors + t] =
                        vector_from::<F, NV>(&new_v, at * comptime!(nv as u32));
                }
            }
        }
        #[unroll]
        for u in 0..VALUE_UNROLL {
            let p = p0 + comptime!(u as u32);
            if p < count {
                #[unroll]
                for g in 0..group {
                    let w = weights[(plane as usize * group + g) * plane_width + p as usize];
                    #[unroll]
                    for t in 0..lane_vectors {
                        let vv = values[u * lane_vectors + t];
                        #[unroll]
                        for e in 0..nv {
                            acc[(g * lane_vectors + t) * nv + e] += w * f32::cast_from(vv[e]);
                        }
                    }
                }
            }
        }
    }
    // The planes' partial softmaxes combined through shared memory (a plane without positions has sum 0 and
    // the lowest max, so it weighs nothing).
    let mut plane_max_s = SharedMemory::<f32>::new(comptime!(planes * group));
    let mut plane_sum_s = SharedMemory::<f32>::new(comptime!(planes * group));
    let mut plane_out = SharedMemory::<f32>::new(comptime!(planes * group * head_dim));
    #[unroll]
    for g in 0..group {
        if lane == 0 {
            plane_max_s[plane as usize * group + g] = maxima[g];
            plane_sum_s[plane as usize * group + g] = sums[g];
        }
        #[unroll]
        for t in 0..lane_vectors {
            let vi = lane + comptime!(t as u32) * width;
            if vi < comptime!(row_vectors as u32) {
                #[unroll]
                for e in 0..nv {
                    let d = vi * comptime!(nv as u32) + comptime!(e as u32);
                    plane_out[(plane as usize * group + g) * head_dim + d as usize] =
                        acc[(g * lane_vectors + t) * nv + e];
                }
            }
        }
    }
    sync_cube();
    for i in range_stepped(UNIT_POS, comptime!((group * head_dim) as u32), CUBE_DIM) {
        let g = i / comptime!(head_dim as u32);
        let d = i % comptime!(head_dim as u32);
        let mut top = f32::min_value();
        #[unroll]
        for p in 0..planes {
            let m = plane_max_s[p * group + g as usize];
            if m > top {
                top = m;
            }
        }
        let mut o = 0.0f32;
        let mut total = 0.0f32;
        #[unroll]
        for p in 0..planes {
            let w = f32::exp(plane_max_s[p * group + g as usize] - top);
            o += plane_out[(p * group + g as usize) * head_dim + d as usize] * w;
            total += plane_sum_s[p * group + g as usize] * w;
        }
        let h = qg * comptime!(group as u32) + g;
        let out_row = (b * heads + h) * splits + split;
        part_out[(out_row * comptime!(head_dim as u32) + d) as usize] = o;
        if d == 0 {
            part_stats[(out_row * 2) as usize] = top;
            part_stats[(out_row * 2 + 1) as usize] = total;
        }
    }
}

/// Splits' partial results combined per sequence and head, one unit per dimension: each unit loads the maxima,
/// sums and its dimension's partial outputs of `COMBINE_UNROLL` splits at once (one round of loads for caches
/// up to `COMBINE_UNROLL` splits long) and folds them into a running softmax (rescaled when a later group has a
/// larger maximum).
#[cube(launch_unchecked)]
fn attend_combine_kernel<F: Float>(
    part_out: &Array<f32>,
    part_stats: &Array<f32>,
    out: &mut Array<F>,
    head_dim: u32,
    splits: u32,
) {
    let h = CUBE_POS_X;
    let b = CUBE_POS_Y;
    let heads = CUBE_COUNT_X;
    let first = (b * heads + h) * splits;
    for d in range_stepped(UNIT_POS, head_dim, CUBE_DIM) {
        let mut top = f32::min_value();
        let mut sum = 0.0f32;
        let mut acc = 0.0f32;
        for s0 in range_stepped(0, splits, comptime!(COMBINE_UNROLL as u32)) {
            let mut maxima = Array::<f32>::new(COMBINE_UNROLL);
            let mut sums = Array::<f32>::new(COMBINE_UNROLL);
            let mut outs = Array::<f32>::new(COMBINE_UNROLL);
            #[unroll]
            for u in 0..COMBINE_UNROLL {
                // Past the last split: the last one again, weighed 0 below.
                let s = first
                    + select(
                        s0 + comptime!(u as u32) < splits,
                        s0 + comptime!(u as u32),
                        splits - 1,
                    );
                maxima[u] = part_stats[(s * 2) as usize];
                sums[u] = part_stats[(s * 2 + 1) as usize];
                outs[u] = part_out[(s * head_dim + d) as usize];
            }
            let mut group_top = top;
            #[unroll]
            for u in 0..COMBINE_UNROLL {
                group_top = f32::max(group_top, maxima[u]);
            }
            let rescale = f32::exp(top - group_top);
            acc *= rescale;
            sum *= rescale;
            #[unroll]
            for u in 0..COMBINE_UNROLL {
                let w = f32::exp(maxima[u] - group_top);
                let w = select(s0 + comptime!(u as u32) < splits, w, 0.0);
                acc += outs[u] * w;
                sum += sums[u] * w;
            }
            top = group_top;
        }
        out[((b * heads + h) * head_dim + d) as usize] = F::cast_from(acc / sum);
    }
}

#[cube(launch_unchecked)]
fn silu_mul_kernel<F: Float>(gate_up: &Array<F>, out: &mut Array<F>, n: u32, width: u32) {
    let i = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    if i < n {
        let gate = i + (i / width) * width;
        out[i as usize] = gated::<F>(gate_up[gate as usize], gate_up[(gate + width) as usize]);
    }
}

/// `F(silu(gate)) * up` in `F`, the gate taken as stored: what `silu_mul` writes and the NF4 GEMV's gated unit
/// (`nf4::gemv_glu`) too, so that the two give the same values.
#[cube]
pub(crate) fn gated<F: Float>(gate: F, up: F) -> F {
    let g = f32::cast_from(gate);
    F::cast_from(g / (1.0f32 + f32::exp(-g))) * up
}

/// The index of the cube's best `(value, index)` (the smallest index among equal values), in every unit.
#[cube]
fn cube_argmax(best: f32, index: u32, #[comptime] planes: usize) -> u32 {
    let none = u32::max_value();
    let plane_best = plane_max(best);
    let candidate = if best == plane_best { index } else { none };
    let plane_index = plane_min(candidate);
    let mut values = SharedMemory::<f32>::new(planes);
    let mut indices = SharedMemory::<u32>::new(planes);
    if UNIT_POS_X == 0 {
        values[UNIT_POS_Y as usize] = plane_best;
        indices[UNIT_POS_Y as usize] = plane_index;
    }
    sync_cube();
    let mut top = values[0];
    let mut at = indices[0];
    #[unroll]
    for p in 1..planes {
        let value = values[p];
        if value > top || (value == top && indices[p] < at) {
            top = value;
            at = indices[p];
        }
    }
    at
}

#[cube(launch_unchecked)]
fn argmax_partial_kernel<F: Float>(
    logits: &Array<F>,
    part_values: &mut Array<f32>,
    part_indices: &mut Array<u32>,
    vocab: u32,
    #[comptime] planes: usize,
) {
    let group = CUBE_POS_X;
    let groups = CUBE_COUNT_X;
    let b = CUBE_POS_Y;
    let per = vocab.div_ceil(groups);
    let start = group * per;
    let mut end = start + per;
    if end > vocab {
        end = vocab;
    }
    let mut best = f32::min_value();
    let mut index = u32::max_value();
    // Ascending with a strict comparison: each unit keeps the first of its ties.
    for i in range_stepped(start + UNIT_POS, end, CUBE_DIM) {
        let value = f32::cast_from(logits[(b * vocab + i) as usize]);
        if value > best {
            best = value;
            index = i;
        }
    }
    let at = cube_argmax(best, index, planes);
    if UNIT_POS == 0 {
        let slot = (b * groups + group) as usize;
        part_indices[slot] = at;
        if at == u32::max_value() {
            part_values[slot] = f32::min_value();
        } else {
            part_values[slot] = f32::cast_from(logits[(b * vocab + at) as usize]);
        }
    }
}

#[cube(launch_unchecked)]
fn argmax_final_kernel(
    part_values: &Array<f32>,
    part_indices: &Array<u32>,
    ids: &mut Array<u32>,
    lens: &mut Array<u32>,
    groups: u32,
    #[comptime] planes: usize,
) {
    let b = CUBE_POS_X;
    let mut best = f32::min_value();
    let mut index = u32::max_value();
    for g in range_stepped(UNIT_POS, groups, CUBE_DIM) {
        let value = part_values[(b * groups + g) as usize];
        let at = part_indices[(b * groups + g) as usize];
        if value > best || (value == best && at < index) {
            best = value;
            index = at;
        }
    }
    let mut at = cube_argmax(best, index, planes);
    if UNIT_POS == 0 {
        if at == u32::max_value() {
            at = 0;
        }
        ids[b as usize] = at;
        lens[b as usize] += 1;
    }
}

#[cube(launch_unchecked)]
fn write_cache_kernel<F: Float>(
    src: &Array<F>,
    cache: &mut Array<F>,
    seq: u32,
    kv_heads: u32,
    src_slots: u32,
    len: u32,
    capacity: u32,
    head_dim: u32,
) {
    let i = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    if i < kv_heads * len * head_dim {
        let d = i % head_dim;
        let t = (i / head_dim) % len;
        let kh = i / (head_dim * len);
        cache[(((seq * kv_heads + kh) * capacity + t) * head_dim + d) as usize] =
            src[((kh * src_slots + t) * head_dim + d) as usize];
    }
}

#[cube(launch_unchecked)]
fn move_cache_kernel<F: Float>(
    cache: &mut Array<F>,
    from: u32,
    to: u32,
    kv_heads: u32,
    len: u32,
    capacity: u32,
    head_dim: u32,
) {
    let i = CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X;
    if i < kv_heads * len * head_dim {
        let d = i % head_dim;
        let t = (i / head_dim) % len;
        let kh = i / (head_dim * len);
        let src = ((from * kv_heads + kh) * capacity + t) * head_dim + d;
        let dst = ((to * kv_heads + kh) * capacity + t) * head_dim + d;
        cache[dst as usize] = cache[src as usize];
    }
}

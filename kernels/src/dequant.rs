//! NF4 weights dequantized on the device in one pass: `W[n, k] = code * scale` in f32, rounded once to the
//! output type, as bitsandbytes' `dequantize_4bit` (on CUDA a double-quantized block scale `map[code] * nested +
//! offset` is one fused multiply-add, rounded once where bitsandbytes rounds twice: a value can differ from
//! bitsandbytes' by one unit in the last place). The prefill multiplies many rows at once, where a
//! dense matmul on the dequantized weight is the fast path; this kernel replaces the chain of tensor ops
//! (unpack, look up, expand the scales, multiply, cast) that would otherwise build that weight.

use cubecl::prelude::*;

use crate::nf4::{Activation, Nf4Matrix, block_scale, decode_word, load_codebook};
use crate::{Buffer, KernelError};

/// Units per cube.
const CUBE_UNITS: u32 = 256;

/// Most cubes along x (the limit of some runtimes; CUDA allows more, wgpu does not).
const MAX_CUBES_X: u32 = 65_535;

/// `out = W` as `[rows, cols]`, row-major in `F`. One launch; nothing is read back.
pub fn dequantize<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    weight: &Nf4Matrix,
    out: &Buffer<F>,
) -> Result<(), KernelError> {
    let n = weight.rows * weight.cols;
    out.check("dequantized weight", n)?;
    if weight.blocksize < 8 {
        return Err(KernelError::Unsupported(format!(
            "blocks of {}: a code word (8 codes) must lie in one block",
            weight.blocksize
        )));
    }
    let words = n.div_ceil(8) as u32;
    let cubes = words.div_ceil(CUBE_UNITS);
    let (x, y) = (cubes.min(MAX_CUBES_X), cubes.div_ceil(MAX_CUBES_X));
    let (codes, scales, offsets, map, double_quant) = weight.scale_args();
    // SAFETY: every array is passed with the element count of its own buffer; the kernel reads word `w` of the
    // codes only for `w < ceil(n / 8)` (the packed buffer holds at least that many), the scales of blocks below
    // `ceil(n / blocksize)` (sized by the matrix's constructors), and writes `out` below `n` (checked above).
    #[allow(unsafe_code)]
    unsafe {
        // Whole words of 8 values (every matrix of Qwen2.5-VL): one vector store of 8 values per unit.
        if n.is_multiple_of(8) {
            dequantize_vectors::launch_unchecked::<F, R>(
                client,
                CubeCount::Static(x, y, 1),
                CubeDim::new_1d(CUBE_UNITS),
                8,
                weight.packed.array_arg(),
                codes.array_arg(),
                scales.array_arg(),
                offsets.array_arg(),
                map.array_arg(),
                weight.codebook.array_arg(),
                out.array_arg(),
                words,
                weight.blocksize as u32,
                double_quant,
            );
            return Ok(());
        }
        dequantize_words::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(x, y, 1),
            CubeDim::new_1d(CUBE_UNITS),
            weight.packed.array_arg(),
            codes.array_arg(),
            scales.array_arg(),
            offsets.array_arg(),
            map.array_arg(),
            weight.codebook.array_arg(),
            out.array_arg(),
            n as u32,
            weight.blocksize as u32,
            double_quant,
        );
    }
    Ok(())
}

/// `out[b] = W[ids[b]]` for `batch` ids, rows of `[batch, cols]` in `F`: an embedding lookup into an NF4 table
/// that dequantizes only the rows it reads (one cube per id). An id past the table's rows reads row 0 (as
/// [`crate::decode::embed`] does), never memory past the table. Needs whole words per row (`cols % 8 == 0`).
pub fn dequantize_rows<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    weight: &Nf4Matrix,
    ids: &Buffer<u32>,
    batch: usize,
    out: &Buffer<F>,
) -> Result<(), KernelError> {
    let cols = weight.cols;
    if !cols.is_multiple_of(8) || weight.blocksize < 8 {
        return Err(KernelError::Unsupported(format!(
            "rows of {cols} values in blocks of {}: a row lookup needs whole code words (8 codes) per row and \
             per block",
            weight.blocksize
        )));
    }
    ids.check("ids", batch)?;
    out.check("rows", batch * cols)?;
    if batch == 0 {
        return Ok(());
    }
    let (codes, scales, offsets, map, double_quant) = weight.scale_args();
    // SAFETY: the kernel clamps each id below `rows`, so it reads words below `rows * cols / 8` (the packed
    // buffer holds at least that many) and the scales of blocks below `ceil(rows * cols / blocksize)`; it reads
    // `ids` below `batch` and writes `out` below `batch * cols` (both checked above).
    #[allow(unsafe_code)]
    unsafe {
        dequantize_rows_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(batch as u32, 1, 1),
            CubeDim::new_1d(CUBE_UNITS),
            8,
            weight.packed.array_arg(),
            codes.array_arg(),
            scales.array_arg(),
            offsets.array_arg(),
            map.array_arg(),
            weight.codebook.array_arg(),
            ids.array_arg(),
            out.array_arg(),
            (cols / 8) as u32,
            weight.rows as u32,
            weight.blocksize as u32,
            double_quant,
        );
    }
    Ok(())
}

/// Cube `b` writes row `ids[b]` of the weight into row `b` of `out`, one 8-value vector per code word.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn dequantize_rows_kernel<F: Float, N: Size>(
    packed: &Array<u32>,
    codes: &Array<u32>,
    scales: &Array<f32>,
    offsets: &Array<f32>,
    map: &Array<f32>,
    codebook: &Array<f32>,
    ids: &Array<u32>,
    out: &mut Array<Vector<F, N>>,
    words_per_row: u32,
    rows: u32,
    #[comptime] blocksize: u32,
    #[comptime] double_quant: bool,
) {
    let table = load_codebook(codebook);
    let b = CUBE_POS_X;
    let mut id = ids[b as usize];
    if id >= rows {
        id = 0;
    }
    let mut values = Array::<f32>::new(8usize);
    for i in range_stepped(UNIT_POS_X, words_per_row, CUBE_DIM_X) {
        let word = id * words_per_row + i;
        decode_word(packed[word as usize], &table, &mut values, 0usize);
        let scale = block_scale::<Array<f32>>(
            word * 8 / blocksize,
            codes,
            scales,
            offsets,
            map,
            double_quant,
        );
        let mut v = Vector::<F, N>::empty();
        #[unroll]
        for k in 0..8usize {
            v[k] = F::cast_from(values[k] * scale);
        }
        out[(b * words_per_row + i) as usize] = v;
    }
}

/// Unit `w` decodes code word `w` (codes `8w..8w + 8`, one block) and writes its values.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn dequantize_words<F: Float>(
    packed: &Array<u32>,
    codes: &Array<u32>,
    scales: &Array<f32>,
    offsets: &Array<f32>,
    map: &Array<f32>,
    codebook: &Array<f32>,
    out: &mut Array<F>,
    n: u32,
    #[comptime] blocksize: u32,
    #[comptime] double_quant: bool,
) {
    let table = load_codebook(codebook);
    let word = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    let first = word * 8;
    if first < n {
        let mut values = Array::<f32>::new(8usize);
        decode_word(packed[word as usize], &table, &mut values, 0usize);
        let scale =
            block_scale::<Array<f32>>(first / blocksize, codes, scales, offsets, map, double_quant);
        #[unroll]
        for i in 0..8u32 {
            if first + i < n {
                out[(first + i) as usize] = F::cast_from(values[i as usize] * scale);
            }
        }
    }
}

/// [`dequantize_words`] for a whole number of words: unit `w` writes its 8 values as one vector.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn dequantize_vectors<F: Float, N: Size>(
    packed: &Array<u32>,
    codes: &Array<u32>,
    scales: &Array<f32>,
    offsets: &Array<f32>,
    map: &Array<f32>,
    codebook: &Array<f32>,
    out: &mut Array<Vector<F, N>>,
    words: u32,
    #[comptime] blocksize: u32,
    #[comptime] double_quant: bool,
) {
    let table = load_codebook(codebook);
    let word = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * CUBE_DIM_X + UNIT_POS_X;
    if word < words {
        let mut values = Array::<f32>::new(8usize);
        decode_word(packed[word as usize], &table, &mut values, 0usize);
        let scale = block_scale::<Array<f32>>(
            word * 8 / blocksize,
            codes,
            scales,
            offsets,
            map,
            double_quant,
        );
        let mut v = Vector::<F, N>::empty();
        #[unroll]
        for i in 0..8usize {
            v[i] = F::cast_from(values[i] * scale);
        }
        out[word as usize] = v;
    }
}

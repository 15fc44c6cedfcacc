//! NF4 quantization exactly as bitsandbytes does it (`quantize_4bit(quant_type="nf4")`, blocksize 64 by default,
//! optional double quantization of the block scales), on the host. Knows nothing of models or GPUs.
//!
//! Reference: bitsandbytes 0.50.2 `backends/default/ops.py` (`quantize_4bit`, `dequantize_4bit`) and its CPU
//! backend (`quantize_blockwise` for the double quantization); fixtures by `fixtures/nf4.py`.
//!
//! Layout of a quantized `[out, in]` weight (row-major, flattened): blocks of `blocksize` consecutive values share
//! one absmax; each value becomes the index of the nearest NF4 code of `value / absmax`; two indices per byte, the
//! even element in the high nibble. With double quantization the absmax vector is itself quantized: its mean is
//! subtracted (`offset`), then 8-bit codes of the signed dynamic map in blocks of 256 with one f32 scale each.

use serde::{Deserialize, Serialize};

pub mod bnb;

/// The NF4 code book: `bitsandbytes.functional.get_4bit_type("nf4")`, the normal-float 4-bit values of the QLoRA
/// paper (Dettmers et al. 2023, appendix E), indexed by the 4-bit code. Digits as printed by bitsandbytes.
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_5,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694,
    0.722_956_836_223_602_3,
    1.0,
];

/// The signed 8-bit dynamic map used to double-quantize block scales: `bitsandbytes.functional.create_dynamic_map()`
/// (signed, 7 exponent bits), as f32, sorted; it is also stored in every checkpoint as `nested_quant_map`.
/// Values printed by bitsandbytes 0.50.2 (`fixtures/nf4.py` checks them).
#[allow(clippy::excessive_precision, clippy::unreadable_literal)]
pub const DYNAMIC_MAP: [f32; 256] = [
    -0.992968738079071,
    -0.9789062738418579,
    -0.96484375,
    -0.9507812261581421,
    -0.936718761920929,
    -0.922656238079071,
    -0.9085937738418579,
    -0.89453125,
    -0.8804687261581421,
    -0.866406261920929,
    -0.852343738079071,
    -0.8382812738418579,
    -0.82421875,
    -0.8101562261581421,
    -0.796093761920929,
    -0.782031238079071,
    -0.7679687738418579,
    -0.75390625,
    -0.7398437261581421,
    -0.725781261920929,
    -0.7117187976837158,
    -0.6976562738418579,
    -0.68359375,
    -0.6695312261581421,
    -0.655468761920929,
    -0.6414062976837158,
    -0.6273437738418579,
    -0.61328125,
    -0.5992187261581421,
    -0.585156261920929,
    -0.5710937976837158,
    -0.5570312738418579,
    -0.54296875,
    -0.5289062261581421,
    -0.5148437023162842,
    -0.500781238079071,
    -0.48671871423721313,
    -0.47265625,
    -0.4585937261581421,
    -0.44453126192092896,
    -0.43046873807907104,
    -0.4164062440395355,
    -0.40234375,
    -0.3882812261581421,
    -0.37421876192092896,
    -0.36015623807907104,
    -0.3460937440395355,
    -0.33203125,
    -0.3179687261581421,
    -0.30390626192092896,
    -0.28984373807907104,
    -0.2757812738418579,
    -0.26171875,
    -0.24765624105930328,
    -0.23359374701976776,
    -0.21953125298023224,
    -0.20546874403953552,
    -0.19140625,
    -0.17734375596046448,
    -0.16328124701976776,
    -0.14921875298023224,
    -0.13515624403953552,
    -0.12109375,
    -0.10703125596046448,
    -0.09859374910593033,
    -0.09578125923871994,
    -0.09296875447034836,
    -0.09015624970197678,
    -0.08734375238418579,
    -0.08453124761581421,
    -0.08171875774860382,
    -0.07890625298023224,
    -0.07609374821186066,
    -0.07328125089406967,
    -0.07046874612569809,
    -0.0676562562584877,
    -0.06484375149011612,
    -0.062031250447034836,
    -0.05921875312924385,
    -0.05640624836087227,
    -0.053593751043081284,
    -0.05078125,
    -0.047968748956918716,
    -0.04515625163912773,
    -0.04234374687075615,
    -0.039531249552965164,
    -0.03671875223517418,
    -0.033906251192092896,
    -0.031093750149011612,
    -0.028281250968575478,
    -0.025468749925494194,
    -0.02265625074505806,
    -0.019843751564621925,
    -0.017031250521540642,
    -0.014218750409781933,
    -0.011406250298023224,
    -0.009718749672174454,
    -0.009156249463558197,
    -0.008593750186264515,
    -0.008031249977648258,
    -0.0074687497690320015,
    -0.006906250026077032,
    -0.006343749817460775,
    -0.005781250074505806,
    -0.0052187503315508366,
    -0.0046562496572732925,
    -0.004093749914318323,
    -0.0035312497057020664,
    -0.002968749962747097,
    -0.002406249986961484,
    -0.001843750011175871,
    -0.001281249918974936,
    -0.0009437500848434865,
    -0.0008312499849125743,
    -0.0007187500596046448,
    -0.0006062500760890543,
    -0.000493750034365803,
    -0.0003812500217463821,
    -0.0002687500382307917,
    -0.00015625001105945557,
    -8.874999912222847e-05,
    -6.625000241911039e-05,
    -4.374999844003469e-05,
    -2.1249998098937795e-05,
    -7.749999895168003e-06,
    -3.250000190746505e-06,
    -5.500000384017767e-07,
    0.0,
    5.500000384017767e-07,
    3.250000190746505e-06,
    7.749999895168003e-06,
    2.1249998098937795e-05,
    4.374999844003469e-05,
    6.625000241911039e-05,
    8.874999912222847e-05,
    0.00015625001105945557,
    0.0002687500382307917,
    0.0003812500217463821,
    0.000493750034365803,
    0.0006062500760890543,
    0.0007187500596046448,
    0.0008312499849125743,
    0.0009437500848434865,
    0.001281249918974936,
    0.001843750011175871,
    0.002406249986961484,
    0.002968749962747097,
    0.0035312497057020664,
    0.004093749914318323,
    0.0046562496572732925,
    0.0052187503315508366,
    0.005781250074505806,
    0.006343749817460775,
    0.006906250026077032,
    0.0074687497690320015,
    0.008031249977648258,
    0.008593750186264515,
    0.009156249463558197,
    0.009718749672174454,
    0.011406250298023224,
    0.014218750409781933,
    0.017031250521540642,
    0.019843751564621925,
    0.02265625074505806,
    0.025468749925494194,
    0.028281250968575478,
    0.031093750149011612,
    0.033906251192092896,
    0.03671875223517418,
    0.039531249552965164,
    0.04234374687075615,
    0.04515625163912773,
    0.047968748956918716,
    0.05078125,
    0.053593751043081284,
    0.05640624836087227,
    0.05921875312924385,
    0.062031250447034836,
    0.06484375149011612,
    0.0676562562584877,
    0.07046874612569809,
    0.07328125089406967,
    0.07609374821186066,
    0.07890625298023224,
    0.08171875774860382,
    0.08453124761581421,
    0.08734375238418579,
    0.09015624970197678,
    0.09296875447034836,
    0.09578125923871994,
    0.09859374910593033,
    0.10703125596046448,
    0.12109375,
    0.13515624403953552,
    0.14921875298023224,
    0.16328124701976776,
    0.17734375596046448,
    0.19140625,
    0.20546874403953552,
    0.21953125298023224,
    0.23359374701976776,
    0.24765624105930328,
    0.26171875,
    0.2757812738418579,
    0.28984373807907104,
    0.30390626192092896,
    0.3179687261581421,
    0.33203125,
    0.3460937440395355,
    0.36015623807907104,
    0.37421876192092896,
    0.3882812261581421,
    0.40234375,
    0.4164062440395355,
    0.43046873807907104,
    0.44453126192092896,
    0.4585937261581421,
    0.47265625,
    0.48671871423721313,
    0.500781238079071,
    0.5148437023162842,
    0.5289062261581421,
    0.54296875,
    0.5570312738418579,
    0.5710937976837158,
    0.585156261920929,
    0.5992187261581421,
    0.61328125,
    0.6273437738418579,
    0.6414062976837158,
    0.655468761920929,
    0.6695312261581421,
    0.68359375,
    0.6976562738418579,
    0.7117187976837158,
    0.725781261920929,
    0.7398437261581421,
    0.75390625,
    0.7679687738418579,
    0.782031238079071,
    0.796093761920929,
    0.8101562261581421,
    0.82421875,
    0.8382812738418579,
    0.852343738079071,
    0.866406261920929,
    0.8804687261581421,
    0.89453125,
    0.9085937738418579,
    0.922656238079071,
    0.936718761920929,
    0.9507812261581421,
    0.96484375,
    0.9789062738418579,
    0.992968738079071,
    1.0,
];

/// Blocks of the double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// What can be wrong with a quantization request or a stored quantized tensor.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Nf4Error {
    /// The block size is not a power of two in 32..=4096.
    #[error("NF4 blocksize must be a power of two between 32 and 4096, got {0}")]
    Blocksize(usize),
    /// A value is infinite or NaN.
    #[error("cannot quantize a non-finite value ({value}) at index {index}")]
    NonFinite {
        /// Flat index.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Stored parts do not fit together.
    #[error("inconsistent NF4 tensor: {0}")]
    Inconsistent(String),
}

/// The block scales of an NF4 tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantization: `scale[b] = nested_code[codes[b]] * nested_absmax[b / 256] + offset`.
    Double {
        /// One 8-bit code per block.
        codes: Vec<u8>,
        /// One f32 scale per 256 blocks.
        nested_absmax: Vec<f32>,
        /// The dynamic map the codes index (`nested_quant_map`).
        nested_code: Vec<f32>,
        /// Mean of the original scales, subtracted before quantizing.
        offset: f32,
    },
}

/// A weight in NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Two codes per byte, even element in the high nibble; `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    /// Block scales.
    pub absmax: Absmax,
    /// Values per block.
    pub blocksize: usize,
    /// Logical shape (`[out, in]` for a linear weight).
    pub shape: Vec<usize>,
}

fn check_blocksize(blocksize: usize) -> Result<(), Nf4Error> {
    if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
        return Err(Nf4Error::Blocksize(blocksize));
    }
    Ok(())
}

/// Index of the NF4 code nearest to `scaled` (in [-1, 1]): the number of code midpoints strictly below it, so an
/// exact midpoint goes to the lower code (torch.bucketize, right=False).
pub fn nf4_index(scaled: f32) -> u8 {
    let mut index = 0;
    for i in 0..15 {
        let mid = (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0;
        index += u8::from(mid < scaled);
    }
    index
}

/// Quantizes `values` (row-major, `shape`) to NF4 with `blocksize`, optionally double-quantizing the scales.
pub fn quantize(
    values: &[f32],
    shape: &[usize],
    blocksize: usize,
    double_quant: bool,
) -> Result<Nf4Tensor, Nf4Error> {
    check_blocksize(blocksize)?;
    if shape.iter().product::<usize>() != values.len() {
        return Err(Nf4Error::Inconsistent(format!(
            "{} values for shape {shape:?}",
            values.len()
        )));
    }
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Nf4Error::NonFinite { index, value });
    }
    // Blocks are independent: large tensors are split among the cores at block boundaries.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let blocks = values.len().div_ceil(blocksize);
    let per_thread = blocks.div_ceil(threads).max((1 << 16) / blocksize) * blocksize;
    let (mut codes, absmax) = if values.len() <= per_thread {
        quantize_blocks(values, blocksize)
    } else {
        std::thread::scope(|scope| {
            let parts: Vec<_> = values
                .chunks(per_thread)
                .map(|part| scope.spawn(move || quantize_blocks(part, blocksize)))
                .collect();
            let mut codes = Vec::with_capacity(values.len() + 1);
            let mut absmax = Vec::with_capacity(blocks);
            for part in parts {
                let (c, a) = part.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                codes.extend(c);
                absmax.extend(a);
            }
            (codes, absmax)
        })
    };
    if codes.len() % 2 == 1 {
        codes.push(nf4_index(0.0));
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if double_quant {
        double_quantize(&absmax)
    } else {
        Absmax::Plain(absmax)
    };
    Ok(Nf4Tensor {
        packed,
        absmax,
        blocksize,
        shape: shape.to_vec(),
    })
}

/// NF4 codes (one per byte) and absmax of consecutive blocks of `values`.
fn quantize_blocks(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(values.len() + 1);
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        absmax.push(max);
        let max = max.max(1e-38);
        if block.len() == blocksize {
            // Full blocks multiply by the reciprocal, the tail block divides (as bitsandbytes does).
            let inv = 1.0 / max;
            codes.extend(block.iter().map(|v| nf4_index((v * inv).clamp(-1.0, 1.0))));
        } else {
            codes.extend(block.iter().map(|v| nf4_index((v / max).clamp(-1.0, 1.0))));
        }
    }
    (codes, absmax)
}

/// Index of the code of `map` (sorted) nearest to `x`; on a tie the lower one.
fn nearest(map: &[f32], x: f32) -> u8 {
    let right = map.partition_point(|&c| c <= x).clamp(1, map.len() - 1);
    let left = right - 1;
    if (x - map[right]).abs() < (x - map[left]).abs() {
        right as u8
    } else {
        left as u8
    }
}

/// Double quantization of block scales: subtract their mean, then 8-bit dynamic-map codes in blocks of 256.
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset =
        (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let mut codes = Vec::with_capacity(centered.len());
    let mut nested_absmax = Vec::with_capacity(centered.len().div_ceil(NESTED_BLOCKSIZE));
    for block in centered.chunks(NESTED_BLOCKSIZE) {
        let max = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        nested_absmax.push(max);
        codes.extend(block.iter().map(|&v| nearest(&DYNAMIC_MAP, v / max)));
    }
    Absmax::Double {
        codes,
        nested_absmax,
        nested_code: DYNAMIC_MAP.to_vec(),
        offset,
    }
}

/// `bytes` as little-endian 32-bit words (byte `4w` in the low bits of word `w`), zero-padded to a multiple of
/// `align` bytes and to at least one word: how packed codes and 8-bit scale codes sit on a device that reads
/// them a word at a time.
pub fn le_words(bytes: &[u8], align: usize) -> Vec<u32> {
    let align = align.max(4).next_multiple_of(4);
    let mut padded = bytes.to_vec();
    padded.resize(bytes.len().div_ceil(align).max(1) * align, 0);
    padded
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect()
}

impl Absmax {
    /// The f32 scale of every block.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
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
                    nested_code[c as usize] * nested_absmax[b / NESTED_BLOCKSIZE] + offset
                })
                .collect(),
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double { codes, .. } => codes.len(),
        }
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Nf4Tensor {
    /// Number of logical values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Checks that the parts fit together.
    pub fn validate(&self) -> Result<(), Nf4Error> {
        check_blocksize(self.blocksize)?;
        let n = self.numel();
        if self.packed.len() != n.div_ceil(2) {
            return Err(Nf4Error::Inconsistent(format!(
                "{} packed bytes for {n} values (shape {:?}), expected {}",
                self.packed.len(),
                self.shape,
                n.div_ceil(2)
            )));
        }
        if self.absmax.len() != n.div_ceil(self.blocksize) {
            return Err(Nf4Error::Inconsistent(format!(
                "{} block scales for {n} values in blocks of {}",
                self.absmax.len(),
                self.blocksize
            )));
        }
        if let Absmax::Double {
            codes,
            nested_absmax,
            nested_code,
            ..
        } = &self.absmax
            && (nested_code.len() != 256
                || nested_absmax.len() != codes.len().div_ceil(NESTED_BLOCKSIZE))
        {
            return Err(Nf4Error::Inconsistent(format!(
                "double quantization with {} nested scales and a {}-entry map for {} blocks",
                nested_absmax.len(),
                nested_code.len(),
                codes.len()
            )));
        }
        Ok(())
    }

    /// The 4-bit code of value `i`.
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Dequantizes to f32 (`NF4_CODE[code] * absmax[block]` in f32, as bitsandbytes).
    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax.to_f32();
        (0..self.numel())
            .map(|i| NF4_CODE[self.code(i) as usize] * absmax[i / self.blocksize])
            .collect()
    }
}

//! The leaf blocks shared by the vision tower and the decoder: the one [`Linear`], [`RmsNorm`] and the SwiGLU
//! [`Mlp`].
//!
//! Reference: transformers v5.17 `Qwen2_5_VLRMSNorm`, `Qwen2_5_VLMLP`, `Qwen2MLP`.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::{DType, FloatDType, Int};

/// A linear layer `y = x W^T + b` with the weight in the PyTorch layout `[out, in]`.
///
/// This is the one linear layer of the model: every projection of the vision tower and the decoder goes
/// through it, so that quantized (and later adapted) weights change this type, not the model code.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// The weight, dense or quantized.
    pub weight: LinearWeight<B>,
    /// `[out_features]`, when the layer has a bias.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter on top of the weight (unmerged), when one is loaded ([`crate::lora`]).
    pub lora: Option<Lora<B>>,
}

/// A LoRA adapter of one linear layer: adds `(x A^T) B^T * scale`.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[r, in_features]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[out_features, r]`.
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / r` (`alpha / sqrt(r)` with rsLoRA).
    #[module(skip)]
    pub scale: f64,
}

/// How a linear layer stores its weight.
#[derive(Module, Debug)]
pub enum LinearWeight<B: Backend> {
    /// `[out_features, in_features]` in the backend's float dtype.
    Dense(Param<Tensor<B, 2>>),
    /// NF4 codes and block scales (bitsandbytes layout), dequantized on the fly.
    Nf4(Nf4Weight<B>),
}

/// An NF4 weight on the device: packed codes and block scales, in bitsandbytes' layout and precision. The codes
/// are bitsandbytes' byte stream (two per byte, high nibble first) read as little-endian 32-bit words, eight codes
/// per word, exactly the bits the CubeCL kernels of `medvl-kernels` read, in half a byte per weight.
/// [`Nf4Weight::dequantize`] is the reference path (dequantize with tensor ops in f32, as bitsandbytes, then a
/// dense matmul); the fused CubeCL kernels of `medvl-kernels` replace it on CUDA and read the same buffers.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// `[ceil(out * in / 8)]` words of packed codes (the byte stream zero-padded to whole words).
    pub packed: Tensor<B, 1, Int>,
    /// The block scales (f32 whatever the model's float type).
    pub scales: Nf4Scales<B>,
    /// The 16 NF4 values (f32).
    pub code: Tensor<B, 1>,
    /// `[out_features, in_features]`.
    #[module(skip)]
    pub shape: [usize; 2],
    /// Values per block.
    #[module(skip)]
    pub blocksize: usize,
}

/// Whether NF4 weights on burn's CUDA backend are dequantized by the CubeCL kernel (the default) rather than by
/// tensor ops ([`Nf4Weight::dense`]); process-wide, for comparisons (`medvl-bench page --compare-nf4-dequant`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
static FUSED_DEQUANTIZE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns the NF4 dequantization kernel on or off for the whole process (see [`Nf4Weight::dense`]).
pub fn set_fused_dequantize(enabled: bool) {
    FUSED_DEQUANTIZE.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

/// The block scales of an [`Nf4Weight`], f32 tensors in any model.
#[derive(Module, Debug)]
pub enum Nf4Scales<B: Backend> {
    /// `[blocks]`: one scale per block.
    Plain(Tensor<B, 1>),
    /// bitsandbytes' double quantization kept as stored: one byte per block instead of four.
    Double(DoubleQuant<B>),
}

/// Double-quantized block scales: `scale[b] = map[code[b]] * nested[b / 256] + offsets[b / 256]`, in f32.
#[derive(Module, Debug)]
pub struct DoubleQuant<B: Backend> {
    /// `[ceil(blocks / 4)]` words of 8-bit codes, four per word, little-endian (block `4w` in the low byte).
    pub codes: Tensor<B, 1, Int>,
    /// `[ceil(blocks / 256)]`: one scale per nested block of 256 blocks.
    pub nested: Tensor<B, 1>,
    /// `[ceil(blocks / 256)]`: the offset added back (bitsandbytes' one mean per weight, repeated per nested
    /// block so that weights stacked into one keep their own).
    pub offsets: Tensor<B, 1>,
    /// `[256]`: the map the codes index (bitsandbytes' `nested_quant_map`).
    pub map: Tensor<B, 1>,
}

/// An f32 tensor in any model (the default float type may be bf16).
fn f32_tensor<B: Backend>(values: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::F32))
}

/// Bytes as a tensor of little-endian 32-bit words (the bits as i32, burn's integer type).
fn word_tensor<B: Backend>(bytes: &[u8], device: &B::Device) -> Tensor<B, 1, Int> {
    let words: Vec<i32> = medvl_nf4::le_words(bytes, 4)
        .into_iter()
        .map(|w| w as i32)
        .collect();
    let len = words.len();
    Tensor::from_data(TensorData::new(words, [len]), device)
}

/// The fields of every word, in the order of `shifts`: `(word >> shift) & mask` for each shift, as
/// `[words * shifts.len()]` integers.
fn unpack<B: Backend>(words: Tensor<B, 1, Int>, shifts: &[i32], mask: i32) -> Tensor<B, 1, Int> {
    let n = words.dims()[0];
    let per = shifts.len();
    let shifts =
        Tensor::<B, 1, Int>::from_data(TensorData::new(shifts.to_vec(), [per]), &words.device())
            .reshape([1, per])
            .expand([n, per]);
    words
        .reshape([n, 1])
        .expand([n, per])
        .bitwise_right_shift(shifts)
        .bitwise_and_scalar(mask.elem())
        .reshape([n * per])
}

/// `[groups]` -> `[len]`: each value repeated `size` times, the tail cut.
fn repeat_each<B: Backend>(values: Tensor<B, 1>, size: usize, len: usize) -> Tensor<B, 1> {
    let groups = values.dims()[0];
    values
        .reshape([groups, 1])
        .expand([groups, size])
        .reshape([groups * size])
        .narrow(0, 0, len)
}

/// The first `len` bytes of a tensor of little-endian 32-bit words, read back to the host.
fn word_bytes<B: Backend>(
    words: &Tensor<B, 1, Int>,
    len: usize,
    what: &'static str,
) -> Result<Vec<u8>, crate::error::ModelError> {
    let words = words
        .clone()
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| crate::error::ModelError::Readback {
            what,
            reason: format!("{e:?}"),
        })?;
    let mut bytes: Vec<u8> = words
        .into_iter()
        .flat_map(|w| (w as i32).to_le_bytes())
        .collect();
    bytes.truncate(len);
    Ok(bytes)
}

impl<B: Backend> DoubleQuant<B> {
    /// The 8-bit codes of the first `blocks` blocks, read back to the host.
    pub fn code_bytes(&self, blocks: usize) -> Result<Vec<u8>, crate::error::ModelError> {
        word_bytes(&self.codes, blocks, "NF4 scale codes")
    }
}

impl<B: Backend> Nf4Scales<B> {
    /// The f32 scale of each of the first `blocks` blocks.
    pub fn resolve(&self, blocks: usize) -> Tensor<B, 1> {
        match self {
            Self::Plain(scales) => scales.clone().narrow(0, 0, blocks),
            Self::Double(d) => {
                let codes = unpack(d.codes.clone(), &[0, 8, 16, 24], 0xFF).narrow(0, 0, blocks);
                let nested = medvl_nf4::NESTED_BLOCKSIZE;
                d.map.clone().select(0, codes) * repeat_each(d.nested.clone(), nested, blocks)
                    + repeat_each(d.offsets.clone(), nested, blocks)
            }
        }
    }
}

impl<B: Backend> Nf4Scales<B> {
    /// The f32 scales of the blocks `blocks` (indices, any order): [`Self::resolve`] at those blocks only.
    pub fn resolve_at(&self, blocks: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        match self {
            Self::Plain(scales) => scales.clone().select(0, blocks),
            Self::Double(d) => {
                // Code of block b: byte b % 4 of word b / 4. Indices are non-negative, so `/` and `%` by powers
                // of two are shifts and masks: exact where CubeCL's CUDA integer remainder (computed through
                // f32) is not, past 2^24.
                let shifts = blocks.clone().bitwise_and_scalar(3.elem()).mul_scalar(8);
                let codes = d
                    .codes
                    .clone()
                    .select(0, blocks.clone().bitwise_right_shift_scalar(2.elem()))
                    .bitwise_right_shift(shifts)
                    .bitwise_and_scalar(0xFF.elem());
                let nested_shift = medvl_nf4::NESTED_BLOCKSIZE.trailing_zeros() as i32;
                let nested = blocks.bitwise_right_shift_scalar(nested_shift.elem());
                d.map.clone().select(0, codes) * d.nested.clone().select(0, nested.clone())
                    + d.offsets.clone().select(0, nested)
            }
        }
    }
}

impl<B: Backend> Nf4Weight<B> {
    /// Uploads a host NF4 tensor of shape `[out, in]`, keeping double-quantized scales double-quantized.
    pub fn from_host(tensor: &medvl_nf4::Nf4Tensor, device: &B::Device) -> Self {
        let scales = match &tensor.absmax {
            medvl_nf4::Absmax::Plain(scales) => {
                Nf4Scales::Plain(f32_tensor(scales.clone(), device))
            }
            medvl_nf4::Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                offset,
            } => Nf4Scales::Double(DoubleQuant {
                codes: word_tensor(codes, device),
                nested: f32_tensor(nested_absmax.clone(), device),
                offsets: f32_tensor(vec![*offset; nested_absmax.len()], device),
                map: f32_tensor(nested_code.clone(), device),
            }),
        };
        Self {
            packed: word_tensor(&tensor.packed, device),
            scales,
            code: f32_tensor(medvl_nf4::NF4_CODE.to_vec(), device),
            shape: [tensor.shape[0], tensor.shape[1]],
            blocksize: tensor.blocksize,
        }
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        (self.shape[0] * self.shape[1]).div_ceil(self.blocksize)
    }

    /// The packed codes as bitsandbytes stores them: `ceil(out * in / 2)` bytes, high nibble first.
    pub fn packed_bytes(&self) -> Result<Vec<u8>, crate::error::ModelError> {
        let [out, inp] = self.shape;
        word_bytes(&self.packed, (out * inp).div_ceil(2), "NF4 codes")
    }

    /// The dense `[out, in]` weight in `dtype`, for a matmul: on burn's CUDA backend one CubeCL kernel
    /// (`medvl_kernels::dequant`), elsewhere (or with [`set_fused_dequantize`] off) [`Self::dequantize`] and a
    /// cast. Both compute `code * scale` in f32 and round once, as bitsandbytes.
    pub fn dense(&self, dtype: DType) -> Tensor<B, 2> {
        #[cfg(feature = "cuda")]
        if FUSED_DEQUANTIZE.load(std::sync::atomic::Ordering::Relaxed) {
            match self.dense_by_kernel(dtype) {
                Some(Ok(dense)) => return dense,
                Some(Err(e)) => {
                    tracing::warn!("the NF4 dequantization kernel failed ({e}); using tensor ops")
                }
                None => {}
            }
        }
        self.dequantize().cast(dtype)
    }

    /// [`Self::dense`] by the CubeCL kernel: `None` when the weight is not on burn's CUDA backend, an error when the
    /// kernel cannot take it.
    #[cfg(feature = "cuda")]
    pub fn dense_by_kernel(&self, dtype: DType) -> Option<Result<Tensor<B, 2>, String>> {
        crate::fused::dequantize(self, dtype)
    }

    /// Rows `ids` of the weight, `[ids, in]` in `dtype`: an embedding lookup that dequantizes only the rows it
    /// reads. On burn's CUDA backend one CubeCL kernel (`medvl_kernels::dequant::dequantize_rows`), elsewhere
    /// (or with [`set_fused_dequantize`] off) [`Self::dequantize_rows`] and a cast; both round `code * scale`
    /// (f32) once, as [`Self::dense`].
    pub fn rows(&self, ids: Tensor<B, 1, Int>, dtype: DType) -> Tensor<B, 2> {
        #[cfg(feature = "cuda")]
        if FUSED_DEQUANTIZE.load(std::sync::atomic::Ordering::Relaxed) {
            match crate::fused::rows(self, &ids, dtype) {
                Some(Ok(rows)) => return rows,
                Some(Err(e)) => {
                    tracing::warn!("the NF4 row-lookup kernel failed ({e}); using tensor ops")
                }
                None => {}
            }
        }
        self.dequantize_rows(ids).cast(dtype)
    }

    /// Rows `ids` of the weight, `[ids, in]` in f32, as the same rows of [`Self::dequantize`], through tensor ops
    /// (the reference path, any backend).
    pub fn dequantize_rows(&self, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        let [out, inp] = self.shape;
        let n = ids.dims()[0];
        let device = ids.device();
        // Index of every value read: ids * in + column, [n * in].
        let columns = Tensor::<B, 1, Int>::arange(0..inp as i64, &device).reshape([1, inp]);
        let values = (ids
            .clamp(0, out as i64 - 1)
            .mul_scalar(inp as i64)
            .reshape([n, 1])
            + columns)
            .reshape([n * inp]);
        // Value v is code v % 8 of word v / 8, at the shift that `dequantize` gives code v % 8 (shifts and masks,
        // as in `Nf4Scales::resolve_at`: the block size is a power of two).
        let shifts = Tensor::<B, 1, Int>::from_data(
            TensorData::new(vec![4i32, 0, 12, 8, 20, 16, 28, 24], [8]),
            &device,
        );
        let codes = self
            .packed
            .clone()
            .select(0, values.clone().bitwise_right_shift_scalar(3.elem()))
            .bitwise_right_shift(shifts.select(0, values.clone().bitwise_and_scalar(7.elem())))
            .bitwise_and_scalar(0xF.elem());
        let block_shift = self.blocksize.trailing_zeros() as i32;
        let scales = self
            .scales
            .resolve_at(values.bitwise_right_shift_scalar(block_shift.elem()));
        (self.code.clone().select(0, codes) * scales).reshape([n, inp])
    }

    /// The dense `[out, in]` weight in f32 through tensor ops (the reference path, any backend):
    /// `code[nibble] * scale[block]`, as bitsandbytes computes it.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let [out, inp] = self.shape;
        let n = out * inp;
        // Code i of a word sits at bits SHIFTS[i]..+4 (byte 0 lowest, high nibble first within a byte).
        let codes =
            unpack(self.packed.clone(), &[4, 0, 12, 8, 20, 16, 28, 24], 0xF).narrow(0, 0, n);
        let values = self.code.clone().select(0, codes);
        let scales = repeat_each(self.scales.resolve(self.blocks()), self.blocksize, n);
        (values * scales).reshape([out, inp])
    }
}

impl<B: Backend> Linear<B> {
    /// Wraps loaded dense tensors.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: LinearWeight::Dense(Param::from_tensor(weight)),
            bias: bias.map(Param::from_tensor),
            lora: None,
        }
    }

    /// `[out_features, in_features]`.
    pub fn shape(&self) -> [usize; 2] {
        match &self.weight {
            LinearWeight::Dense(w) => w.val().dims(),
            LinearWeight::Nf4(w) => w.shape,
        }
    }

    /// True when the weight is quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, LinearWeight::Nf4(_))
    }

    /// # Shapes
    /// - `x`: `[..., in_features]` -> `[..., out_features]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let weight = match &self.weight {
            LinearWeight::Dense(w) => w.val(),
            LinearWeight::Nf4(w) => w.dense(x.dtype()),
        };
        let y = burn::tensor::module::linear(
            x.clone(),
            weight.transpose(),
            self.bias.as_ref().map(|b| b.val()),
        );
        match &self.lora {
            Some(lora) => {
                use burn::tensor::module::linear;
                let down = linear(x, lora.a.val().transpose(), None);
                y + linear(down, lora.b.val().transpose(), None) * lora.scale
            }
            None => y,
        }
    }
}

/// RMSNorm computed in f32 and cast back before the weight multiplies it, as transformers does.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Added to the mean square.
    #[module(skip)]
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Wraps a loaded weight.
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// # Shapes
    /// - `x`: `[..., hidden]` -> same
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let variance = x.clone().square().mean_dim(D - 1);
        let normed = (x * (variance + self.eps).sqrt().recip()).cast(dtype);
        let hidden = self.weight.dims()[0];
        let mut shape = [1; D];
        shape[D - 1] = hidden;
        normed * self.weight.val().reshape(shape)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[intermediate, hidden]`.
    pub gate_proj: Linear<B>,
    /// `[intermediate, hidden]`.
    pub up_proj: Linear<B>,
    /// `[hidden, intermediate]`.
    pub down_proj: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// - `x`: `[..., hidden]` -> same
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

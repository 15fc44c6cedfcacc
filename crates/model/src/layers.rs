//! The leaf blocks shared by the vision tower and the decoder: the one [`Linear`], [`RmsNorm`] and the SwiGLU
//! [`Mlp`].
//!
//! Reference: transformers v5.17 `Qwen2_5_VLRMSNorm`, `Qwen2_5_VLMLP`, `Qwen2MLP`.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::{FloatDType, Int};

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

/// An NF4 weight on the device: packed codes and one f32 scale per block. The codes are bitsandbytes' byte
/// stream (two per byte, high nibble first) read as little-endian 32-bit words, eight codes per word, exactly the
/// bits the CubeCL kernels of `medvl-kernels` read, in half a byte per weight.
/// This is the reference path (dequantize with tensor ops, then a dense matmul); the fused CubeCL kernels of
/// `medvl-kernels` replace it on CUDA.
#[derive(Module, Debug)]
pub struct Nf4Weight<B: Backend> {
    /// `[ceil(out * in / 8)]` words of packed codes (the byte stream zero-padded to whole words).
    pub packed: Tensor<B, 1, Int>,
    /// `[blocks]` scales (double quantization already resolved).
    pub absmax: Tensor<B, 1>,
    /// The 16 NF4 values.
    pub code: Tensor<B, 1>,
    /// `[out_features, in_features]`.
    #[module(skip)]
    pub shape: [usize; 2],
    /// Values per block.
    #[module(skip)]
    pub blocksize: usize,
}

impl<B: Backend> Nf4Weight<B> {
    /// Uploads a host NF4 tensor of shape `[out, in]`.
    pub fn from_host(tensor: &medvl_nf4::Nf4Tensor, device: &B::Device) -> Self {
        let shape = [tensor.shape[0], tensor.shape[1]];
        let packed: Vec<i32> = tensor
            .packed
            .chunks(4)
            .map(|c| {
                let mut word = [0u8; 4];
                word[..c.len()].copy_from_slice(c);
                i32::from_le_bytes(word)
            })
            .collect();
        let words = packed.len();
        let absmax = tensor.absmax.to_f32();
        Self {
            packed: Tensor::from_data(TensorData::new(packed, [words]), device),
            absmax: Tensor::from_data(TensorData::new(absmax.clone(), [absmax.len()]), device),
            code: Tensor::from_data(TensorData::new(medvl_nf4::NF4_CODE.to_vec(), [16]), device),
            shape,
            blocksize: tensor.blocksize,
        }
    }

    /// The packed codes as bitsandbytes stores them: `ceil(out * in / 2)` bytes, high nibble first.
    pub fn packed_bytes(&self) -> Result<Vec<u8>, crate::error::ModelError> {
        let [out, inp] = self.shape;
        let words = self
            .packed
            .clone()
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .map_err(|e| crate::error::ModelError::Readback {
                what: "NF4 codes",
                reason: format!("{e:?}"),
            })?;
        let mut bytes: Vec<u8> = words
            .into_iter()
            .flat_map(|w| (w as i32).to_le_bytes())
            .collect();
        bytes.truncate((out * inp).div_ceil(2));
        Ok(bytes)
    }

    /// The dense `[out, in]` weight: `code[nibble] * absmax[block]`.
    pub fn dequantize(&self) -> Tensor<B, 2> {
        let [out, inp] = self.shape;
        let n = out * inp;
        let words = self.packed.dims()[0];
        let device = self.packed.device();
        // Code i of a word sits at bits SHIFTS[i]..+4 (byte 0 lowest, high nibble first within a byte).
        const SHIFTS: [i32; 8] = [4, 0, 12, 8, 20, 16, 28, 24];
        let shifts = Tensor::<B, 1, Int>::from_data(TensorData::new(SHIFTS.to_vec(), [8]), &device)
            .reshape([1, 8])
            .expand([words, 8]);
        let codes = self
            .packed
            .clone()
            .reshape([words, 1])
            .expand([words, 8])
            .bitwise_right_shift(shifts)
            .bitwise_and_scalar(0xF.elem())
            .reshape([8 * words])
            .narrow(0, 0, n);
        let values = self.code.clone().select(0, codes);
        let blocks = self.absmax.dims()[0];
        // [blocks] -> [blocks, blocksize] -> [blocks * blocksize] -> first n
        let scales = self
            .absmax
            .clone()
            .reshape([blocks, 1])
            .expand([blocks, self.blocksize])
            .reshape([blocks * self.blocksize]);
        (values * scales.narrow(0, 0, n)).reshape([out, inp])
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
            LinearWeight::Nf4(w) => w.dequantize(),
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

//! The leaf blocks shared by the vision tower and the decoder: the one [`Linear`], [`RmsNorm`] and the SwiGLU
//! [`Mlp`].
//!
//! Reference: transformers v5.17 `Qwen2_5_VLRMSNorm`, `Qwen2_5_VLMLP`, `Qwen2MLP`.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::activation::silu;

/// A linear layer `y = x W^T + b` with the weight in the PyTorch layout `[out, in]`.
///
/// This is the one linear layer of the model: every projection of the vision tower and the decoder goes
/// through it, so that quantized and adapted weights change this type, not the model code.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out_features]`, when the layer has a bias.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// Wraps loaded tensors.
    pub fn new(weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
        }
    }

    /// `[out_features, in_features]`.
    pub fn shape(&self) -> [usize; 2] {
        self.weight.val().dims()
    }

    /// # Shapes
    /// - `x`: `[..., in_features]` -> `[..., out_features]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        burn::tensor::module::linear(
            x,
            self.weight.val().transpose(),
            self.bias.as_ref().map(|b| b.val()),
        )
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

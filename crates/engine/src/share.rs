//! A decode plan that shares the model's device memory (CubeCL backends: CUDA in production).
//!
//! [`DecodePlan::from_model`] copies every weight through the host into buffers of its own, so that a model and
//! its plan hold the weights twice. [`DecodePlan::sharing_model`] instead takes the model's device buffers as
//! they are: the embedding, the lm_head, o_proj and down_proj (NF4 codes or dense values) are read in place; q/k/v
//! and gate/up, which the plan multiplies as one stacked matrix each, are concatenated on the device once, and the
//! model's projections become views into the stacked buffer (burn slices: the same memory), so the originals are
//! freed. NF4 block scales, norms, biases and LoRA adapters (small) are copied as before.

use burn::module::Param;
use burn::prelude::{Int, Tensor};
use burn::tensor::TensorPrimitive;
pub use burn_cubecl::FloatElement;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::prelude::ComputeClient;
use medvl_kernels::decode::DenseMatrix;
use medvl_kernels::nf4::{Activation, Nf4Matrix};
use medvl_kernels::{Buffer, KernelError};
use medvl_model::QwenVl;
use medvl_model::layers::{Linear, LinearWeight};

use crate::error::{EngineError, Result};
use crate::plan::{
    DecodePlan, HostMatrix, Layer, LayerLora, LayerSmall, Matrix, PlanConfig, host_values,
};

/// The backend whose buffers a plan can share: burn's CubeCL backend without fusion, float type `F`.
pub type Cube<R, F> = CubeBackend<R, F, i32, u8>;

fn kernel_err(what: &str) -> impl Fn(KernelError) -> EngineError + '_ {
    move |e| EngineError::Plan(format!("{what}: {e}"))
}

/// The device buffer of a float tensor (contiguous, in `F`).
fn float_buffer<R: CubeRuntime, F: Activation + FloatElement>(
    tensor: Tensor<Cube<R, F>, 2>,
    what: &str,
) -> Result<Buffer<F>> {
    let primitive = match tensor.into_primitive() {
        TensorPrimitive::Float(t) => t,
        TensorPrimitive::QFloat(_) => {
            return Err(EngineError::Plan(format!(
                "{what}: a burn-quantized tensor"
            )));
        }
    };
    if !primitive.is_contiguous() || primitive.dtype.size() != size_of::<F>() {
        return Err(EngineError::Plan(format!(
            "{what}: not a contiguous tensor of the plan's activation type ({:?})",
            primitive.dtype
        )));
    }
    let len = primitive.meta.shape().num_elements();
    Buffer::from_handle(primitive.handle, len).map_err(kernel_err(what))
}

/// The device buffer of the NF4 code words (i32 in burn, the same bits as the kernels' u32).
fn code_buffer<R: CubeRuntime, F: FloatElement>(
    tensor: Tensor<Cube<R, F>, 1, Int>,
    what: &str,
) -> Result<Buffer<u32>> {
    let primitive = tensor.into_primitive();
    if !primitive.is_contiguous() || primitive.dtype.size() != 4 {
        return Err(EngineError::Plan(format!(
            "{what}: NF4 codes not contiguous 32-bit words ({:?})",
            primitive.dtype
        )));
    }
    let len = primitive.meta.shape().num_elements();
    Buffer::from_handle(primitive.handle, len).map_err(kernel_err(what))
}

/// `parts` stacked along their rows as one plan matrix, sharing the model's memory: a single part is read in
/// place; several are concatenated on the device and each part of the model becomes a view of its rows. Parts
/// with LoRA adapters keep them (the adapters are copied by the plan separately). Mixed formats (some NF4, some
/// dense) go through the host as [`DecodePlan::from_model`] does.
fn share<R: CubeRuntime, F: Activation + FloatElement>(
    client: &ComputeClient<R>,
    parts: &mut [&mut Linear<Cube<R, F>>],
    what: &str,
) -> Result<Matrix<F>> {
    let shapes: Vec<[usize; 2]> = parts.iter().map(|l| l.shape()).collect();
    let cols = shapes[0][1];
    if shapes.iter().any(|s| s[1] != cols) {
        return Err(EngineError::Plan(format!(
            "{what}: parts of different widths {shapes:?}"
        )));
    }
    let rows: usize = shapes.iter().map(|s| s[0]).sum();
    let nf4 = parts.iter().filter(|l| l.is_quantized()).count();
    if nf4 == parts.len() {
        return share_nf4(client, parts, &shapes, what);
    }
    if nf4 > 0 {
        let hosts = parts
            .iter()
            .map(|l| HostMatrix::from_linear(l))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<(&HostMatrix, [usize; 2])> = hosts.iter().zip(shapes).collect();
        return Matrix::stack(client, &refs, what);
    }
    let values: Vec<Tensor<Cube<R, F>, 2>> = parts
        .iter()
        .map(|l| match &l.weight {
            LinearWeight::Dense(w) => w.val(),
            LinearWeight::Nf4(_) => unreachable!("all parts are dense here"),
        })
        .collect();
    let stacked = if values.len() == 1 {
        values.into_iter().next().expect("one part")
    } else {
        let stacked = Tensor::cat(values, 0);
        let mut start = 0;
        for (part, [r, _]) in parts.iter_mut().zip(&shapes) {
            part.weight =
                LinearWeight::Dense(Param::from_tensor(stacked.clone().narrow(0, start, *r)));
            start += r;
        }
        stacked
    };
    let weight = float_buffer(stacked, what)?;
    Ok(Matrix::Dense(
        DenseMatrix::from_buffer(weight, rows, cols).map_err(kernel_err(what))?,
    ))
}

fn share_nf4<R: CubeRuntime, F: Activation + FloatElement>(
    client: &ComputeClient<R>,
    parts: &mut [&mut Linear<Cube<R, F>>],
    shapes: &[[usize; 2]],
    what: &str,
) -> Result<Matrix<F>> {
    let mut codes = Vec::with_capacity(parts.len());
    let mut scales = Vec::new();
    let mut blocksize = None;
    for (i, part) in parts.iter().enumerate() {
        let LinearWeight::Nf4(w) = &part.weight else {
            unreachable!("all parts are NF4 here")
        };
        let [r, c] = shapes[i];
        if blocksize.is_some_and(|b| b != w.blocksize) {
            return Err(EngineError::Plan(format!(
                "{what}: parts of different block sizes"
            )));
        }
        blocksize = Some(w.blocksize);
        // Every part but the last must end on a code word and a block, so that the stack's indices are the
        // parts' indices shifted by whole words and blocks.
        if i + 1 < parts.len()
            && (!(r * c).is_multiple_of(8) || !(r * c).is_multiple_of(w.blocksize))
        {
            return Err(EngineError::Plan(format!(
                "{what}: a {r}x{c} part is not whole code words and blocks of {}",
                w.blocksize
            )));
        }
        codes.push(w.packed.clone());
        let mut s = host_values(w.absmax.clone())?;
        s.truncate((r * c).div_ceil(w.blocksize));
        scales.extend(s);
    }
    let rows: usize = shapes.iter().map(|s| s[0]).sum();
    let cols = shapes[0][1];
    let stacked = if codes.len() == 1 {
        codes.into_iter().next().expect("one part")
    } else {
        let stacked = Tensor::cat(codes, 0);
        let mut start = 0;
        for (part, [r, c]) in parts.iter_mut().zip(shapes) {
            let words = (r * c).div_ceil(8);
            if let LinearWeight::Nf4(w) = &mut part.weight {
                w.packed = stacked.clone().narrow(0, start, words);
            }
            start += words;
        }
        stacked
    };
    let packed = code_buffer(stacked, what)?;
    let scales = Buffer::from_slice(client, &scales);
    Ok(Matrix::Nf4(Box::new(
        Nf4Matrix::from_device(client, packed, scales, rows, cols, blocksize.unwrap_or(64))
            .map_err(kernel_err(what))?,
    )))
}

impl<R: CubeRuntime, F: Activation + FloatElement> DecodePlan<R, F> {
    /// A plan for the decoder of a model on the same device that shares the model's weights instead of copying
    /// them (module docs): afterwards the model's q/k/v and gate/up projections are views of the plan's stacked
    /// matrices, and both compute as before. The client must be the model's device's (`R::client(device)`).
    pub fn sharing_model(
        client: &ComputeClient<R>,
        model: &mut QwenVl<Cube<R, F>>,
        batch: usize,
        capacity: usize,
    ) -> Result<Self> {
        let text = &mut model.text;
        let config = PlanConfig::new(&text.config, batch, capacity);
        config.check()?;
        let mut layers = Vec::with_capacity(text.layers.len());
        for (index, layer) in text.layers.iter_mut().enumerate() {
            let name = |what: &str| format!("layer {index} {what}");
            let small = LayerSmall::from_model(layer)?;
            let lora = LayerLora::from_model(layer)?;
            let attn = &mut layer.self_attn;
            let matrices = [
                share(
                    client,
                    &mut [&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj],
                    &name("q/k/v_proj"),
                )?,
                share(client, &mut [&mut attn.o_proj], &name("o_proj"))?,
                share(
                    client,
                    &mut [&mut layer.mlp.gate_proj, &mut layer.mlp.up_proj],
                    &name("gate/up_proj"),
                )?,
                share(client, &mut [&mut layer.mlp.down_proj], &name("down_proj"))?,
            ];
            layers.push(Layer::assemble(
                client, &config, &small, &lora, matrices, index,
            )?);
        }
        let embed = float_buffer(text.embed_tokens.val(), "embedding")?;
        let lm_head = match &mut text.lm_head {
            Some(head) => share(client, &mut [head], "lm_head")?,
            None => Matrix::Dense(
                DenseMatrix::from_buffer(embed.clone(), config.vocab, config.hidden)
                    .map_err(kernel_err("tied lm_head"))?,
            ),
        };
        let norm = host_values(text.norm.weight.val())?;
        Self::assemble(client, config, embed, &norm, lm_head, layers)
    }
}

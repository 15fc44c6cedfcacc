//! A decode plan that shares the model's device memory (CubeCL backends: CUDA in production).
//!
//! [`DecodePlan::from_model`] copies every weight through the host into buffers of its own, so that a model and
//! its plan hold the weights twice. [`DecodePlan::sharing_model`] instead takes the model's device buffers as
//! they are: the embedding, the lm_head, o_proj and down_proj (NF4 codes or dense values) are read in place; q/k/v
//! and gate/up, which the plan multiplies as one stacked matrix each, are concatenated on the device once, and the
//! model's projections become views into the stacked buffer (burn slices: the same memory), so the originals are
//! freed. NF4 block scales are shared the same way: double-quantized as bitsandbytes stores them (one byte per
//! block) when the parts can be stacked so, else resolved to one f32 per block. Norms, biases and LoRA adapters
//! (small) are copied.

use burn::module::Param;
use burn::prelude::{Int, Tensor};
use burn::tensor::{BasicOps, TensorPrimitive};
pub use burn_cubecl::FloatElement;
use burn_cubecl::{CubeBackend, CubeRuntime};
use cubecl::CubeElement;
use cubecl::prelude::ComputeClient;
use medvl_kernels::decode::DenseMatrix;
use medvl_kernels::nf4::{Activation, Nf4Matrix, Scales};
use medvl_kernels::{Buffer, KernelError};
use medvl_model::QwenVl;
use medvl_model::layers::{DoubleQuant, Linear, LinearWeight, Nf4Scales, Nf4Weight};
use medvl_nf4::NESTED_BLOCKSIZE;

use crate::error::{EngineError, Result};
use crate::plan::{
    DecodePlan, HostMatrix, KvBuffers, Layer, LayerLora, LayerSmall, Matrix, PlanConfig,
    host_values,
};

/// The backend whose buffers a plan can share: burn's CubeCL backend without fusion, float type `F`.
pub type Cube<R, F> = CubeBackend<R, F, i32, u8>;

fn kernel_err(what: &str) -> impl Fn(KernelError) -> EngineError + '_ {
    move |e| EngineError::Plan(format!("{what}: {e}"))
}

/// The device buffer of a float tensor, contiguous, whose values are `T`s (the plan's activation type for
/// weights, f32 for NF4 scales).
fn float_buffer<R: CubeRuntime, F: FloatElement, T: CubeElement, const D: usize>(
    tensor: Tensor<Cube<R, F>, D>,
    what: &str,
) -> Result<Buffer<T>> {
    let primitive = match tensor.into_primitive() {
        TensorPrimitive::Float(t) => t,
        TensorPrimitive::QFloat(_) => {
            return Err(EngineError::Plan(format!(
                "{what}: a burn-quantized tensor"
            )));
        }
    };
    if !primitive.is_contiguous() || primitive.dtype.size() != size_of::<T>() {
        return Err(EngineError::Plan(format!(
            "{what}: not a contiguous tensor of {}-byte values ({:?})",
            size_of::<T>(),
            primitive.dtype
        )));
    }
    let len = primitive.meta.shape().num_elements();
    Buffer::from_handle(primitive.handle, len).map_err(kernel_err(what))
}

/// The device buffer of 32-bit words held in a burn integer tensor (i32 in burn, the same bits as the kernels'
/// u32): NF4 codes and 8-bit scale codes.
fn word_buffer<R: CubeRuntime, F: FloatElement>(
    tensor: Tensor<Cube<R, F>, 1, Int>,
    what: &str,
) -> Result<Buffer<u32>> {
    let primitive = tensor.into_primitive();
    if !primitive.is_contiguous() || primitive.dtype.size() != 4 {
        return Err(EngineError::Plan(format!(
            "{what}: not contiguous 32-bit words ({:?})",
            primitive.dtype
        )));
    }
    let len = primitive.meta.shape().num_elements();
    Buffer::from_handle(primitive.handle, len).map_err(kernel_err(what))
}

/// `parts` concatenated along their first dimension on the device, and each part as a view of its rows of the
/// result (burn slices: the same memory), so that the parts can give up their own memory. One part is returned
/// as it is.
fn stack_rows<B, const D: usize, K>(
    parts: Vec<Tensor<B, D, K>>,
) -> (Tensor<B, D, K>, Vec<Tensor<B, D, K>>)
where
    B: burn::prelude::Backend,
    K: BasicOps<B>,
{
    if parts.len() == 1 {
        return (parts[0].clone(), parts);
    }
    let lengths: Vec<usize> = parts.iter().map(|p| p.dims()[0]).collect();
    let stacked = Tensor::cat(parts, 0);
    let mut start = 0;
    let views = lengths
        .into_iter()
        .map(|len| {
            start += len;
            stacked.clone().narrow(0, start - len, len)
        })
        .collect();
    (stacked, views)
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
    let (stacked, views) = stack_rows(values);
    for (part, view) in parts.iter_mut().zip(views) {
        part.weight = LinearWeight::Dense(Param::from_tensor(view));
    }
    let weight = float_buffer(stacked, what)?;
    Ok(Matrix::Dense(
        DenseMatrix::from_buffer(weight, rows, cols).map_err(kernel_err(what))?,
    ))
}

/// The NF4 weights of `parts`.
fn nf4_weights<'a, B: burn::prelude::Backend>(
    parts: &'a [&mut Linear<B>],
) -> impl Iterator<Item = &'a Nf4Weight<B>> {
    parts.iter().map(|l| match &l.weight {
        LinearWeight::Nf4(w) => w,
        LinearWeight::Dense(_) => unreachable!("all parts are NF4 here"),
    })
}

/// Whether the double-quantized scales of `weights` can be stacked as they are: all double-quantized with one
/// map, and all but the last a whole number of nested blocks (so that block `b` of the stack finds its nested
/// scale at `b / 256`).
fn double_quant_stacks<B: burn::prelude::Backend>(weights: &[&Nf4Weight<B>]) -> Result<bool> {
    let mut first_map = None;
    for (i, w) in weights.iter().enumerate() {
        let Nf4Scales::Double(d) = &w.scales else {
            return Ok(false);
        };
        if i + 1 < weights.len() && !w.blocks().is_multiple_of(NESTED_BLOCKSIZE) {
            return Ok(false);
        }
        let map = host_values(d.map.clone())?;
        match &first_map {
            None => first_map = Some(map),
            Some(first) if *first != map => return Ok(false),
            Some(_) => {}
        }
    }
    Ok(true)
}

fn share_nf4<R: CubeRuntime, F: Activation + FloatElement>(
    client: &ComputeClient<R>,
    parts: &mut [&mut Linear<Cube<R, F>>],
    shapes: &[[usize; 2]],
    what: &str,
) -> Result<Matrix<F>> {
    let weights: Vec<&Nf4Weight<_>> = nf4_weights(parts).collect();
    let blocksize = weights[0].blocksize;
    for (i, w) in weights.iter().enumerate() {
        let [r, c] = shapes[i];
        if w.blocksize != blocksize {
            return Err(EngineError::Plan(format!(
                "{what}: parts of different block sizes"
            )));
        }
        // Every part but the last must end on a code word and a block, so that the stack's indices are the
        // parts' indices shifted by whole words and blocks.
        if i + 1 < weights.len()
            && (!(r * c).is_multiple_of(8) || !(r * c).is_multiple_of(blocksize))
        {
            return Err(EngineError::Plan(format!(
                "{what}: a {r}x{c} part is not whole code words and blocks of {blocksize}"
            )));
        }
    }
    let double = double_quant_stacks(&weights)?;
    let (packed, packed_views) = stack_rows(weights.iter().map(|w| w.packed.clone()).collect());
    let scales = if double {
        let double_quant = |w: &Nf4Weight<_>| match &w.scales {
            Nf4Scales::Double(d) => d.clone(),
            Nf4Scales::Plain(_) => unreachable!("checked double-quantized"),
        };
        let dq: Vec<DoubleQuant<_>> = weights.iter().map(|w| double_quant(w)).collect();
        let map = dq[0].map.clone();
        let (codes, codes_views) = stack_rows(dq.iter().map(|d| d.codes.clone()).collect());
        let (nested, nested_views) = stack_rows(dq.iter().map(|d| d.nested.clone()).collect());
        let (offsets, offsets_views) = stack_rows(dq.iter().map(|d| d.offsets.clone()).collect());
        for (((part, codes), nested), offsets) in parts
            .iter_mut()
            .zip(codes_views)
            .zip(nested_views)
            .zip(offsets_views)
        {
            if let LinearWeight::Nf4(w) = &mut part.weight
                && let Nf4Scales::Double(d) = &mut w.scales
            {
                (d.codes, d.nested, d.offsets) = (codes, nested, offsets);
            }
        }
        Scales::Double {
            codes: word_buffer(codes, what)?,
            nested: float_buffer(nested, what)?,
            offsets: float_buffer(offsets, what)?,
            map: float_buffer(map, what)?,
        }
    } else {
        // Scales in other forms are resolved to one f32 per block; plain scales become views as the codes do.
        let all_plain = weights
            .iter()
            .all(|w| matches!(w.scales, Nf4Scales::Plain(_)));
        let resolved = weights
            .iter()
            .map(|w| w.scales.resolve(w.blocks()))
            .collect();
        let (scales, views) = stack_rows(resolved);
        if all_plain {
            for (part, view) in parts.iter_mut().zip(views) {
                if let LinearWeight::Nf4(w) = &mut part.weight {
                    w.scales = Nf4Scales::Plain(view);
                }
            }
        }
        Scales::Plain(float_buffer(scales, what)?)
    };
    for (part, view) in parts.iter_mut().zip(packed_views) {
        if let LinearWeight::Nf4(w) = &mut part.weight {
            w.packed = view;
        }
    }
    let rows: usize = shapes.iter().map(|s| s[0]).sum();
    let cols = shapes[0][1];
    let packed = word_buffer(packed, what)?;
    Ok(Matrix::Nf4(Box::new(
        Nf4Matrix::from_device(client, packed, scales, rows, cols, blocksize)
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
        // The embedding as a linear layer of its own (a single part is read in place, not copied).
        let mut table = Linear {
            weight: text.embed_tokens.clone(),
            bias: None,
            lora: None,
        };
        let embed = share(client, &mut [&mut table], "embedding")?;
        text.embed_tokens = table.weight;
        let lm_head = match &mut text.lm_head {
            Some(head) => share(client, &mut [head], "lm_head")?,
            None => embed.clone(),
        };
        let norm = host_values(text.norm.weight.val())?;
        let mut plan = Self::assemble(client, config, embed, &norm, lm_head, layers)?;
        plan.hand_over_on_device();
        Ok(plan)
    }

    /// Admits prefills of a model on this plan's device ([`crate::Prefilled::from_cache`] of a `Cube<R, F>` cache) by
    /// copying their cache buffers on the device, one launch per layer and tensor, instead of through host memory
    /// (plans from [`DecodePlan::sharing_model`] do from the start). Prefills from other backends still go through
    /// the host.
    pub fn hand_over_on_device(&mut self) {
        self.set_device_kv(cube_kv::<R, F>);
    }
}

/// The device buffers of a prefill's cache when it was a `Cube<R, F>` model's ([`crate::plan::DeviceKv`]).
fn cube_kv<R: CubeRuntime, F: Activation + FloatElement>(
    layers: &(dyn std::any::Any + Send),
) -> Option<Result<KvBuffers<F>>> {
    type CacheTensors<R, F> = Vec<(Tensor<Cube<R, F>, 4>, Tensor<Cube<R, F>, 4>)>;
    let layers = layers.downcast_ref::<CacheTensors<R, F>>()?;
    Some(
        layers
            .iter()
            .map(|(k, v)| {
                Ok((
                    float_buffer::<R, F, F, 4>(k.clone(), "cached keys")?,
                    float_buffer::<R, F, F, 4>(v.clone(), "cached values")?,
                ))
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use burn::prelude::Backend;
    use burn_cubecl::CubeRuntime;
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    use medvl_model::layers::{Linear, LinearWeight, Nf4Scales, Nf4Weight};
    use medvl_nf4::Nf4Tensor;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::{Cube, share};
    use crate::plan::Matrix;

    fn quantized(rng: &mut ChaCha8Rng, rows: usize, double_quant: bool) -> Nf4Tensor {
        let values: Vec<f32> = (0..rows * 64)
            .map(|_| rng.random_range(-1.0..1.0) * rng.random_range(0.01..2.0))
            .collect();
        medvl_nf4::quantize(&values, &[rows, 64], 64, double_quant).unwrap()
    }

    /// Shares the `[rows, 64]` parts as one plan matrix, then checks that each part still dequantizes to
    /// bitsandbytes' values, which parts' scales stayed double-quantized, and that the matrix's product is the
    /// stacked weight's.
    fn check<R: CubeRuntime>(device: &R::Device, parts: &[(usize, bool)], stacked_double: bool)
    where
        Cube<R, f32>: Backend<Device = R::Device>,
    {
        let client = R::client(device);
        let mut rng = ChaCha8Rng::seed_from_u64(parts.len() as u64);
        let tensors: Vec<Nf4Tensor> = parts
            .iter()
            .map(|&(rows, double)| quantized(&mut rng, rows, double))
            .collect();
        let mut linears: Vec<Linear<Cube<R, f32>>> = tensors
            .iter()
            .map(|t| Linear {
                weight: LinearWeight::Nf4(Nf4Weight::from_host(t, device)),
                bias: None,
                lora: None,
            })
            .collect();
        let mut refs: Vec<&mut Linear<Cube<R, f32>>> = linears.iter_mut().collect();
        let Matrix::Nf4(matrix) = share(&client, &mut refs, "test").unwrap() else {
            panic!("an NF4 matrix")
        };
        assert_eq!(matrix.double_quant(), stacked_double);
        let mut weight = Vec::new();
        for ((linear, tensor), &(_, double)) in linears.iter().zip(&tensors).zip(parts) {
            let LinearWeight::Nf4(w) = &linear.weight else {
                panic!("still NF4")
            };
            assert_eq!(matches!(w.scales, Nf4Scales::Double(_)), double);
            let values = w.dequantize().into_data().to_vec::<f32>().unwrap();
            assert_eq!(values, tensor.dequantize());
            weight.extend(values);
        }
        let rows = matrix.rows();
        assert_eq!(rows * 64, weight.len());
        let x: Vec<f32> = (0..64).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (x_dev, y_dev) = (
            medvl_kernels::Buffer::from_slice(&client, &x),
            medvl_kernels::Buffer::<f32>::empty(&client, rows),
        );
        medvl_kernels::nf4::gemv(&client, &x_dev, 1, &matrix, &y_dev).unwrap();
        let y = y_dev.read(&client).unwrap();
        for (r, got) in y.iter().enumerate() {
            let row = &weight[r * 64..(r + 1) * 64];
            let want: f64 = row.iter().zip(&x).map(|(w, x)| *w as f64 * *x as f64).sum();
            let bound: f64 = row.iter().zip(&x).map(|(w, x)| (w * x).abs() as f64).sum();
            assert!(
                (*got as f64 - want).abs() <= 1e-5 * bound + 1e-6,
                "row {r}: {got} against {want}"
            );
        }
    }

    // The burn backend needs a device burn knows: CUDA here (burn's wgpu device is not built in CI).
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn double_quantized_parts_stack_without_resolving_their_scales() {
        let device = CudaDevice::default();
        // Three weights quantized separately (each its own mean offset); all but the last whole nested blocks
        // (256 blocks of 64 values), the last ending in a partial one.
        check::<CudaRuntime>(&device, &[(256, true), (512, true), (3, true)], true);
        // One part is read in place.
        check::<CudaRuntime>(&device, &[(100, true)], true);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn parts_that_straddle_nested_blocks_resolve_to_one_scale_per_block() {
        let device = CudaDevice::default();
        check::<CudaRuntime>(&device, &[(8, true), (4, true)], false);
        check::<CudaRuntime>(&device, &[(256, true), (4, false)], false);
        check::<CudaRuntime>(&device, &[(8, false), (4, false)], false);
    }
}

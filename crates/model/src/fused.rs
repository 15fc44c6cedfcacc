//! `medvl-kernels`' CubeCL kernels inside the model, on burn's CubeCL backend for CUDA: an NF4 weight is
//! dequantized by one kernel ([`medvl_kernels::dequant`]) instead of the chain of tensor ops of
//! [`Nf4Weight::dequantize`]. The model stays generic over the backend: the CUDA path is found at run time from
//! the tensors' primitive types, and every other backend (the CPU in tests) runs the tensor-op reference, which
//! computes the same values.
//!
//! Under burn's autodiff (QLoRA training) the same kernel runs on the tensors the autodiff backend wraps: the
//! dequantized weight is a constant of the graph (the NF4 base is frozen), so the linear layer's backward with
//! respect to its input is `grad_y W` over the very matrix the forward used.

use std::any::{Any, TypeId};

use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, TensorPrimitive};
use burn_autodiff::Autodiff;
use burn_cubecl::FloatElement;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use medvl_kernels::Buffer;
use medvl_kernels::nf4::{Activation, Nf4Matrix, Scales};

use crate::layers::{Nf4Scales, Nf4Weight};

type Cuda = CudaRuntime;

/// burn's un-fused CUDA backend with float type `F` (the inner backend of `Autodiff<_>` in training).
type CudaBackend<F> = burn_cubecl::CubeBackend<Cuda, F, i32, u8>;

/// The float tensors of `Autodiff<CudaBackend<F>>` (whatever its checkpointing strategy: the tensor type is the
/// same).
type Tracked<F> =
    <Autodiff<CudaBackend<F>> as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

/// The CUDA tensor behind a burn primitive, when it is one.
fn cube<T: Any>(primitive: T) -> Option<CubeTensor<Cuda>> {
    (Box::new(primitive) as Box<dyn Any>)
        .downcast::<CubeTensor<Cuda>>()
        .ok()
        .map(|t| *t)
}

/// The CUDA tensor behind a float primitive: burn's CUDA tensor itself, or the one an autodiff tensor of the
/// un-fused CUDA backend (f32, bf16 or f16) wraps.
fn float_cube<T: Any>(primitive: T) -> Option<CubeTensor<Cuda>> {
    fn tracked<F: FloatElement>(any: Box<dyn Any>) -> Result<CubeTensor<Cuda>, Box<dyn Any>> {
        any.downcast::<Tracked<F>>()
            .map(|t| Autodiff::<CudaBackend<F>>::inner(*t))
    }
    let any = match (Box::new(primitive) as Box<dyn Any>).downcast::<CubeTensor<Cuda>>() {
        Ok(t) => return Some(*t),
        Err(any) => any,
    };
    tracked::<f32>(any)
        .or_else(tracked::<half::bf16>)
        .or_else(tracked::<half::f16>)
        .ok()
}

/// A CUDA tensor as the float primitive `P`: itself, or wrapped as a constant of the autodiff graph (no
/// gradient flows into it) when `P` is an autodiff tensor of the un-fused CUDA backend.
fn float_primitive<P: Any>(tensor: CubeTensor<Cuda>) -> Option<P> {
    fn constant<F: FloatElement>(tensor: CubeTensor<Cuda>) -> Box<dyn Any> {
        Box::new(Autodiff::<CudaBackend<F>>::from_inner(tensor))
    }
    let target = TypeId::of::<P>();
    let any: Box<dyn Any> = if target == TypeId::of::<CubeTensor<Cuda>>() {
        Box::new(tensor)
    } else if target == TypeId::of::<Tracked<f32>>() {
        constant::<f32>(tensor)
    } else if target == TypeId::of::<Tracked<half::bf16>>() {
        constant::<half::bf16>(tensor)
    } else if target == TypeId::of::<Tracked<half::f16>>() {
        constant::<half::f16>(tensor)
    } else {
        return None;
    };
    any.downcast::<P>().ok().map(|p| *p)
}

fn int_tensor<B: Backend>(tensor: &Tensor<B, 1, Int>) -> Option<CubeTensor<Cuda>> {
    cube(tensor.clone().into_primitive())
}

fn float_tensor<B: Backend>(tensor: &Tensor<B, 1>) -> Option<CubeTensor<Cuda>> {
    match tensor.clone().into_primitive() {
        TensorPrimitive::Float(t) => float_cube(t),
        TensorPrimitive::QFloat(_) => None,
    }
}

/// A contiguous device tensor's memory as a kernel buffer of `T`.
fn buffer<T: cubecl::CubeElement>(
    tensor: CubeTensor<Cuda>,
    what: &str,
) -> Result<Buffer<T>, String> {
    if !tensor.is_contiguous() || tensor.dtype.size() != size_of::<T>() {
        return Err(format!(
            "{what}: not contiguous {}-byte values",
            size_of::<T>()
        ));
    }
    let len = tensor.meta.shape().num_elements();
    Buffer::from_handle(tensor.handle, len).map_err(|e| format!("{what}: {e}"))
}

/// `w` as `[out, in]` in `dtype`, dequantized by the CUDA kernel: `None` when the weight is not on burn's CUDA
/// backend (the caller takes the tensor-op path); an error when the kernel cannot run it.
pub(crate) fn dequantize<B: Backend>(
    w: &Nf4Weight<B>,
    dtype: DType,
) -> Option<Result<Tensor<B, 2>, String>> {
    let (matrix, client, device) = match matrix(w)? {
        Ok(parts) => parts,
        Err(e) => return Some(Err(e)),
    };
    let [rows, cols] = w.shape;
    let handle = match dtype {
        DType::BF16 => run::<half::bf16>(&client, &matrix),
        DType::F16 => run::<half::f16>(&client, &matrix),
        DType::F32 => run::<f32>(&client, &matrix),
        other => Err(format!("no NF4 dequantization to {other:?}")),
    };
    Some(handle.and_then(|handle| matrix_of::<B>(client, device, [rows, cols], handle, dtype)))
}

/// Rows `ids` of `w` as `[ids, in]` in `dtype`, by the CUDA row-lookup kernel ([`medvl_kernels::dequant::
/// dequantize_rows`]): `None` when the weight or the ids are not on burn's CUDA backend; an error when the
/// kernel cannot run it.
pub(crate) fn rows<B: Backend>(
    w: &Nf4Weight<B>,
    ids: &Tensor<B, 1, Int>,
    dtype: DType,
) -> Option<Result<Tensor<B, 2>, String>> {
    let ids = int_tensor(ids)?;
    let (matrix, client, device) = match matrix(w)? {
        Ok(parts) => parts,
        Err(e) => return Some(Err(e)),
    };
    let n = ids.meta.shape().num_elements();
    let cols = w.shape[1];
    // The ids are burn's i32: the same bits as the kernel's u32 for every id in the table.
    let ids = match buffer::<u32>(ids, "token ids") {
        Ok(ids) => ids,
        Err(e) => return Some(Err(e)),
    };
    fn lookup<F: Activation>(
        client: &cubecl::prelude::ComputeClient<Cuda>,
        matrix: &Nf4Matrix,
        ids: &Buffer<u32>,
        n: usize,
    ) -> Result<cubecl::server::Handle, String> {
        let out = Buffer::<F>::empty(client, n * matrix.cols());
        medvl_kernels::dequant::dequantize_rows(client, matrix, ids, n, &out)
            .map_err(|e| e.to_string())?;
        Ok(out.handle().clone())
    }
    let handle = match dtype {
        DType::BF16 => lookup::<half::bf16>(&client, &matrix, &ids, n),
        DType::F16 => lookup::<half::f16>(&client, &matrix, &ids, n),
        DType::F32 => lookup::<f32>(&client, &matrix, &ids, n),
        other => Err(format!("no NF4 rows in {other:?}")),
    };
    Some(handle.and_then(|handle| matrix_of::<B>(client, device, [n, cols], handle, dtype)))
}

/// A contiguous `shape` matrix of `dtype` in `handle` on CUDA, as a float tensor of `B`.
fn matrix_of<B: Backend>(
    client: cubecl::prelude::ComputeClient<Cuda>,
    device: <Cuda as cubecl::Runtime>::Device,
    shape: [usize; 2],
    handle: cubecl::server::Handle,
    dtype: DType,
) -> Result<Tensor<B, 2>, String> {
    float_tensor_of::<B, 2>(CubeTensor::new_contiguous(
        client,
        device,
        shape.into(),
        handle,
        dtype,
    ))
}

/// A CUDA tensor as a float tensor of `B`.
fn float_tensor_of<B: Backend, const D: usize>(
    tensor: CubeTensor<Cuda>,
) -> Result<Tensor<B, D>, String> {
    float_primitive::<B::FloatTensorPrimitive>(tensor)
        .map(|t| Tensor::from_primitive(TensorPrimitive::Float(t)))
        .ok_or_else(|| "the backend's float tensors are not CubeCL's".to_string())
}

/// The kernels' view of `w`'s device buffers (no copy), with its client and device: `None` when `w` is not on
/// burn's CUDA backend.
#[allow(clippy::type_complexity)]
fn matrix<B: Backend>(
    w: &Nf4Weight<B>,
) -> Option<
    Result<
        (
            Nf4Matrix,
            cubecl::prelude::ComputeClient<Cuda>,
            <Cuda as cubecl::Runtime>::Device,
        ),
        String,
    >,
> {
    let packed = int_tensor(&w.packed)?;
    let scales = match &w.scales {
        Nf4Scales::Plain(s) => Err(float_tensor(s)?),
        Nf4Scales::Double(d) => Ok((
            int_tensor(&d.codes)?,
            float_tensor(&d.nested)?,
            float_tensor(&d.offsets)?,
            float_tensor(&d.map)?,
        )),
    };
    let [rows, cols] = w.shape;
    let (client, device) = (packed.client.clone(), packed.device.clone());
    let build = || -> Result<Nf4Matrix, String> {
        let scales = match scales {
            Err(plain) => Scales::Plain(buffer(plain, "NF4 scales")?),
            Ok((codes, nested, offsets, map)) => Scales::Double {
                codes: buffer(codes, "NF4 scale codes")?,
                nested: buffer(nested, "NF4 nested scales")?,
                offsets: buffer(offsets, "NF4 scale offsets")?,
                map: buffer(map, "NF4 scale map")?,
            },
        };
        Nf4Matrix::from_device(
            &client,
            buffer(packed, "NF4 codes")?,
            scales,
            rows,
            cols,
            w.blocksize,
        )
        .map_err(|e| e.to_string())
    };
    Some(build().map(|m| (m, client.clone(), device)))
}

fn run<F: Activation>(
    client: &cubecl::prelude::ComputeClient<Cuda>,
    matrix: &Nf4Matrix,
) -> Result<cubecl::server::Handle, String> {
    let out = Buffer::<F>::empty(client, matrix.rows() * matrix.cols());
    medvl_kernels::dequant::dequantize(client, matrix, &out).map_err(|e| e.to_string())?;
    Ok(out.handle().clone())
}

/// Attention within the segments of a packed sequence by [`medvl_kernels::segments::segment_attention`], scaled
/// by `1 / sqrt(head_dim)`: `None` when the tensors are not burn's plain CUDA tensors (other backends, and autodiff,
/// whose graph needs burn's op); an error when the kernel cannot take them.
///
/// # Shapes
/// - `q`, `k`, `v`: `[seq, heads, head_dim]`; `tiles`: a [`medvl_kernels::segments::QueryTiles`] table
/// - returns `[seq, heads, head_dim]`
pub(crate) fn segment_attention<B: Backend>(
    q: &Tensor<B, 3>,
    k: &Tensor<B, 3>,
    v: &Tensor<B, 3>,
    tiles: &Tensor<B, 1, Int>,
) -> Option<Result<Tensor<B, 3>, String>> {
    let plain = |t: &Tensor<B, 3>| match t.clone().into_primitive() {
        TensorPrimitive::Float(t) => cube(t).map(burn_cubecl::kernel::into_contiguous),
        TensorPrimitive::QFloat(_) => None,
    };
    let [seq, heads, head_dim] = q.dims();
    let (q, k, v) = (plain(q)?, plain(k)?, plain(v)?);
    let tiles = int_tensor(tiles)?;
    let (client, device, dtype) = (q.client.clone(), q.device.clone(), q.dtype);
    fn launch<F: Activation>(
        client: &cubecl::prelude::ComputeClient<Cuda>,
        (q, k, v, tiles): (
            CubeTensor<Cuda>,
            CubeTensor<Cuda>,
            CubeTensor<Cuda>,
            CubeTensor<Cuda>,
        ),
        [seq, heads, head_dim]: [usize; 3],
    ) -> Result<cubecl::server::Handle, String> {
        let out = Buffer::<F>::empty(client, seq * heads * head_dim);
        medvl_kernels::segments::segment_attention(
            client,
            (&buffer(q, "q")?, &buffer(k, "k")?, &buffer(v, "v")?),
            &buffer::<u32>(tiles, "query tiles")?,
            seq,
            heads,
            head_dim,
            1.0 / (head_dim as f32).sqrt(),
            &out,
        )
        .map_err(|e| e.to_string())?;
        Ok(out.handle().clone())
    }
    let parts = (q, k, v, tiles);
    let shape = [seq, heads, head_dim];
    let handle = match dtype {
        DType::BF16 => launch::<half::bf16>(&client, parts, shape),
        DType::F16 => launch::<half::f16>(&client, parts, shape),
        DType::F32 => launch::<f32>(&client, parts, shape),
        other => Err(format!("no segment attention in {other:?}")),
    };
    Some(handle.and_then(|handle| {
        float_tensor_of::<B, 3>(CubeTensor::new_contiguous(
            client,
            device,
            shape.into(),
            handle,
            dtype,
        ))
    }))
}

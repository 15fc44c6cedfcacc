//! `medvl-kernels`' CubeCL kernels inside the model, on burn's CubeCL backend for CUDA: an NF4 weight is
//! dequantized by one kernel ([`medvl_kernels::dequant`]) instead of the chain of tensor ops of
//! [`Nf4Weight::dequantize`]. The model stays generic over the backend: the CUDA path is found at run time from
//! the tensors' primitive types, and every other backend (the CPU in tests) runs the tensor-op reference, which
//! computes the same values.

use std::any::Any;

use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use medvl_kernels::Buffer;
use medvl_kernels::nf4::{Activation, Nf4Matrix, Scales};

use crate::layers::{Nf4Scales, Nf4Weight};

type Cuda = CudaRuntime;

/// The CUDA tensor behind a burn primitive, when it is one.
fn cube<T: Any>(primitive: T) -> Option<CubeTensor<Cuda>> {
    (Box::new(primitive) as Box<dyn Any>)
        .downcast::<CubeTensor<Cuda>>()
        .ok()
        .map(|t| *t)
}

fn int_tensor<B: Backend>(tensor: &Tensor<B, 1, Int>) -> Option<CubeTensor<Cuda>> {
    cube(tensor.clone().into_primitive())
}

fn float_tensor<B: Backend>(tensor: &Tensor<B, 1>) -> Option<CubeTensor<Cuda>> {
    match tensor.clone().into_primitive() {
        TensorPrimitive::Float(t) => cube(t),
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
    Some(launch(w, packed, scales, dtype).and_then(|out| {
        (Box::new(out) as Box<dyn Any>)
            .downcast::<B::FloatTensorPrimitive>()
            .map(|t| Tensor::from_primitive(TensorPrimitive::Float(*t)))
            .map_err(|_| "the backend's float tensors are not CubeCL's".to_string())
    }))
}

type DoubleParts = (
    CubeTensor<Cuda>,
    CubeTensor<Cuda>,
    CubeTensor<Cuda>,
    CubeTensor<Cuda>,
);

fn launch<B: Backend>(
    w: &Nf4Weight<B>,
    packed: CubeTensor<Cuda>,
    scales: Result<DoubleParts, CubeTensor<Cuda>>,
    dtype: DType,
) -> Result<CubeTensor<Cuda>, String> {
    let [rows, cols] = w.shape;
    let (client, device) = (packed.client.clone(), packed.device.clone());
    let scales = match scales {
        Err(plain) => Scales::Plain(buffer(plain, "NF4 scales")?),
        Ok((codes, nested, offsets, map)) => Scales::Double {
            codes: buffer(codes, "NF4 scale codes")?,
            nested: buffer(nested, "NF4 nested scales")?,
            offsets: buffer(offsets, "NF4 scale offsets")?,
            map: buffer(map, "NF4 scale map")?,
        },
    };
    let matrix = Nf4Matrix::from_device(
        &client,
        buffer(packed, "NF4 codes")?,
        scales,
        rows,
        cols,
        w.blocksize,
    )
    .map_err(|e| e.to_string())?;
    let handle = match dtype {
        DType::BF16 => run::<half::bf16>(&client, &matrix)?,
        DType::F16 => run::<half::f16>(&client, &matrix)?,
        DType::F32 => run::<f32>(&client, &matrix)?,
        other => return Err(format!("no NF4 dequantization to {other:?}")),
    };
    Ok(CubeTensor::new_contiguous(
        client,
        device,
        [rows, cols].into(),
        handle,
        dtype,
    ))
}

fn run<F: Activation>(
    client: &cubecl::prelude::ComputeClient<Cuda>,
    matrix: &Nf4Matrix,
) -> Result<cubecl::server::Handle, String> {
    let out = Buffer::<F>::empty(client, matrix.rows() * matrix.cols());
    medvl_kernels::dequant::dequantize(client, matrix, &out).map_err(|e| e.to_string())?;
    Ok(out.handle().clone())
}

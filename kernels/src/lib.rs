//! medvl's CubeCL kernels.
//!
//! Each kernel works on raw CubeCL buffers (`Handle`s) so that the decode plan can launch it on preallocated
//! memory without going through burn, and each has a plain host reference beside it (`reference`) that the tests
//! compare against. The kernels are generic over the CubeCL `Runtime`: CUDA in production, wgpu (a software
//! Vulkan driver on CPU-only machines) for the tests in CI.

mod buffer;
pub mod decode;
pub mod dequant;
mod error;
pub mod gemm;
pub mod mma;
pub mod nf4;
pub mod probe;
pub mod reference;
pub mod sample;
pub mod segments;

pub use buffer::Buffer;
pub use error::KernelError;

use cubecl::prelude::{ComputeClient, CubeDim, Runtime};

/// Units per plane (warp) on the client's device: 32 on NVIDIA, whatever the driver reports elsewhere.
pub(crate) fn plane_size<R: Runtime>(client: &ComputeClient<R>) -> u32 {
    client.properties().hardware.plane_size_max.max(1)
}

/// A 2-D cube of whole planes (`x`: lane, `y`: plane) holding about `units` units, 1 to 32 planes; returns it with
/// its plane count.
pub(crate) fn plane_cube<R: Runtime>(client: &ComputeClient<R>, units: u32) -> (CubeDim, u32) {
    let plane = plane_size(client);
    let planes = units.div_ceil(plane).clamp(1, 32);
    (CubeDim::new_2d(plane, planes), planes)
}

//! medvl's CubeCL kernels.
//!
//! Each kernel works on raw CubeCL buffers (`Handle`s) so that the decode plan can launch it on preallocated
//! memory without going through burn, and each has a plain host reference beside it (`reference`) that the tests
//! compare against. The kernels are generic over the CubeCL `Runtime`: CUDA in production, wgpu (a software
//! Vulkan driver on CPU-only machines) for the tests in CI.

mod buffer;
pub mod decode;
mod error;
pub mod nf4;
pub mod probe;
pub mod reference;

pub use buffer::Buffer;
pub use error::KernelError;

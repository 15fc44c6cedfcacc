//! Qwen2.5-VL in Burn: configuration, image processor, vision tower, text decoder, rotary embeddings and
//! weight loading, generic over the Burn [`Backend`](burn::tensor::backend::Backend).
//!
//! This crate computes what HF transformers' `qwen2_5_vl` computes (see `tests/fidelity.rs`). It knows nothing
//! of tokenizers, generation loops, HTTP or CUDA kernels: those live in the crates above it
//! (`medvl-engine`, `medvl-serve`) and below it (`medvl-kernels`).

pub mod attention;
pub mod chat;
pub mod config;
pub mod error;
pub mod image;
pub mod layers;
pub mod loader;
pub mod model;
pub mod quantize;
pub mod rope;
pub mod text;
pub mod tokenizer;
pub mod vision;

pub use config::{QwenVlConfig, TextConfig, TokenIds, VisionConfig};
pub use error::{ModelError, Result};
pub use image::{PixelValues, ProcessorConfig};
pub use loader::{Checkpoint, QuantizeOptions, load_dir, load_dir_with, random, tensor_specs};
pub use model::{ImageFeatures, Prefill, QwenVl};
pub use text::KvCache;
pub use tokenizer::{StreamDecoder, Tokenizer};

/// The backends medvl runs on.
pub mod backend {
    /// CPU backend used by the tests (f32).
    #[cfg(feature = "ndarray")]
    pub type Cpu = burn::backend::NdArray<f32>;

    /// CUDA with burn's kernel fusion, bf16 (the production prefill backend).
    #[cfg(feature = "cuda")]
    pub type CudaBf16 = burn::backend::Cuda<burn::tensor::bf16>;

    /// CUDA without kernel fusion, bf16: every burn op is its own kernel.
    #[cfg(feature = "cuda")]
    pub type CudaBf16Unfused =
        burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, burn::tensor::bf16, i32, u8>;

    /// CUDA with kernel fusion, f32.
    #[cfg(feature = "cuda")]
    pub type CudaF32 = burn::backend::Cuda<f32>;

    /// CUDA without kernel fusion, f32.
    #[cfg(feature = "cuda")]
    pub type CudaF32Unfused = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
}

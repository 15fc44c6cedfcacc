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
#[cfg(feature = "cuda")]
mod fused;
pub mod image;
pub mod layers;
pub mod loader;
pub mod lora;
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

    /// CUDA, bf16, every burn op its own kernel: the production GPU backend. Burn's kernel fusion is not used:
    /// burn-fusion 0.21 computes this model's KV-cache decode step wrongly (f32: decode logits unrelated to the
    /// prefill logits of the same sequence) and panics in its code generator in bf16 (docs/FIDELITY.md).
    #[cfg(feature = "cuda")]
    pub type CudaBf16 =
        burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, burn::tensor::bf16, i32, u8>;

    /// CUDA, f32, unfused.
    #[cfg(feature = "cuda")]
    pub type CudaF32 = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

    /// CUDA with burn's kernel fusion, bf16: kept for the diagnostic GPU tests that document its failure.
    #[cfg(feature = "cuda")]
    pub type CudaBf16Fused = burn::backend::Cuda<burn::tensor::bf16>;

    /// CUDA with burn's kernel fusion, f32 (diagnostic).
    #[cfg(feature = "cuda")]
    pub type CudaF32Fused = burn::backend::Cuda<f32>;
}

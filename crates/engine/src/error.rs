//! The one error type of `medvl-engine`.

/// Everything that can go wrong while resolving a model or generating.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// From the model crate (config, weights, images, tokenizer, input).
    #[error(transparent)]
    Model(#[from] medvl_model::ModelError),
    /// The model could not be found or downloaded.
    #[error("model `{model}`: {reason}")]
    Source {
        /// The directory or hub repo id given.
        model: String,
        /// What went wrong.
        reason: String,
    },
    /// A decode plan cannot be built or run as asked.
    #[error("decode plan: {0}")]
    Plan(String),
    /// A kernel launch was refused.
    #[error(transparent)]
    Kernel(#[from] medvl_kernels::KernelError),
    /// A request is invalid.
    #[error("invalid request: {0}")]
    Request(String),
}

/// Result with [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

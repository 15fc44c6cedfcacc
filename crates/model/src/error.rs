//! The one error type of `medvl-model`.

use std::path::PathBuf;

/// Everything that can go wrong while configuring, loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON of the expected shape.
    #[error("invalid model config{}: {source}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    ConfigJson {
        /// The file, when read from disk.
        path: Option<PathBuf>,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A required config field is absent.
    #[error("model config is missing the field `{field}`")]
    ConfigField {
        /// Dotted field name.
        field: String,
    },
    /// A config field has a value the model cannot use.
    #[error("model config field `{field}`: {reason}")]
    ConfigValue {
        /// Dotted field name.
        field: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A safetensors file is malformed.
    #[error("invalid safetensors file {path}: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint lacks a tensor the model needs.
    #[error("checkpoint has no tensor `{name}` (looked in {files})")]
    MissingTensor {
        /// Name under the hub-original layout.
        name: String,
        /// The files searched.
        files: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` in {path}: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        /// Tensor name as stored.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape on disk.
        found: Vec<usize>,
    },
    /// A tensor has a dtype the loader cannot convert.
    #[error("tensor `{name}` in {path} has dtype {dtype}; expected bf16, f16 or f32")]
    TensorDtype {
        /// Tensor name as stored.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// Dtype on disk.
        dtype: String,
    },
    /// The checkpoint holds tensors the model does not use.
    #[error("checkpoint has {count} unexpected tensor(s), e.g. `{example}` in {path}")]
    UnexpectedTensors {
        /// How many.
        count: usize,
        /// One of them.
        example: String,
        /// The file holding it.
        path: PathBuf,
    },
    /// An image could not be turned into model input.
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// A weight could not be quantized or a stored quantized weight is malformed.
    #[error("NF4 weight `{name}`: {reason}")]
    Quantization {
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer could not be loaded or failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model's chat template is invalid or failed to render.
    #[error("chat template{}: {reason}", source_file.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    ChatTemplate {
        /// Where the template came from, when read from disk.
        source_file: Option<PathBuf>,
        /// What went wrong.
        reason: String,
    },
    /// A tensor could not be read back from the device.
    #[error("reading {what} back from the device: {reason}")]
    Readback {
        /// Which tensor.
        what: &'static str,
        /// The backend's error.
        reason: String,
    },
    /// Model input is inconsistent (token ids vs images, shapes).
    #[error("invalid input: {0}")]
    Input(String),
    /// A LoRA adapter cannot be loaded.
    #[error("LoRA adapter {path}: {reason}")]
    Adapter {
        /// The adapter file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Result with [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

use thiserror::Error;

/// Why a kernel could not be prepared or launched.
#[derive(Debug, Error)]
pub enum KernelError {
    /// A buffer is smaller than the shapes passed with it say.
    #[error("{what}: the buffer holds {len} values, the launch needs {needed}")]
    BufferTooSmall {
        /// Which argument.
        what: &'static str,
        /// Its length.
        len: usize,
        /// What the shapes need.
        needed: usize,
    },
    /// A shape or setting the kernel does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The NF4 tensor is inconsistent.
    #[error(transparent)]
    Nf4(#[from] medvl_nf4::Nf4Error),
    /// The runtime refused the launch.
    #[error("kernel launch failed: {0}")]
    Launch(String),
    /// Waiting for the device failed.
    #[error("device sync failed: {0}")]
    Sync(String),
}

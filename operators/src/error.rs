//! Errors of the operators crate. Every variant names what was wrong (file, key, field,
//! expected and found) so a user can fix the input without reading the code.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cause is part of the message and not a `source`, so that error chains (anyhow's
    /// `{:#}`) do not print it twice.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: not a valid .npy file: {reason}")]
    Npy { path: PathBuf, reason: String },
    #[error("{path}: expected {expected}, found {found}")]
    Array {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{path}: corrupt or truncated safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor { path: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{key}` has dtype {found}, expected bf16, f16 or f32")]
    TensorDtype {
        path: PathBuf,
        key: String,
        found: String,
    },
    #[error("observation: {0}")]
    Observation(String),
    #[error("{0}")]
    Input(String),
    /// A failure of the CUDA driver, NVRTC or cuBLASLt (only with feature `cuda`).
    #[error("CUDA: {0}")]
    Cuda(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }
}

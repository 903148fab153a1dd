//! The engine's one error type. Every failure that input can cause lands here, never in a panic.

use std::path::PathBuf;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A model or optimizer configuration that cannot describe a working model.
    #[error("invalid config: {field}: {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    /// A batch whose shape or contents do not fit the model.
    #[error("invalid batch: {0}")]
    InvalidBatch(String),

    /// A file that could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A checkpoint or export that exists but is not what it claims to be.
    #[error("bad checkpoint {}: {reason}", path.display())]
    BadCheckpoint { path: PathBuf, reason: String },

    /// Parameters that are not finite (NaN or infinite) where finite ones are required.
    #[error("non-finite value in {tensor} at element {index}")]
    NonFinite { tensor: String, index: usize },
}

impl EngineError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        EngineError::InvalidConfig {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        EngineError::BadCheckpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

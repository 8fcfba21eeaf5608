//! The one error type of the store. Every variant names what a user needs to act on:
//! the tensor, the file, the sizes. The Python binding maps each variant to one exception
//! class of `bigmodel.errors` (see `rust/py/src/errors.rs`), so keep the two in step.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store holds no tensor of this name.
    #[error("tensor {name:?} is not in the store {store}")]
    NotFound { name: String, store: String },

    /// Bytes on disk disagree with the index (checksum, truncation, a bad zstd frame, a
    /// file changed under an open store).
    #[error("corrupt store: {file}: tensor {tensor:?}: {detail}")]
    Corrupt {
        file: PathBuf,
        tensor: String,
        detail: String,
    },

    /// A writer did not commit: shards or temporary files without a committed index.
    #[error("incomplete store at {path}: {detail}")]
    Incomplete { path: PathBuf, detail: String },

    /// The index (or a safetensors header, or an offload `index.json`) is not something
    /// we can serve: bad JSON, unknown version or dtype, bounds, overlaps, unsafe file names.
    #[error("invalid store format: {file}: {detail}")]
    Format { file: PathBuf, detail: String },

    /// Bad arguments from the caller (unknown codec, duplicate tensor name in a write, ...).
    #[error("{0}")]
    InvalidArgument(String),

    /// An operating-system failure, with the file it happened on.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(file: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        StoreError::Format {
            file: file.into(),
            detail: detail.into(),
        }
    }

    pub fn corrupt(file: impl Into<PathBuf>, tensor: &str, detail: impl Into<String>) -> Self {
        StoreError::Corrupt {
            file: file.into(),
            tensor: tensor.to_owned(),
            detail: detail.into(),
        }
    }

    /// A copy of this error for another receiver (the gets that waited for one failed
    /// read each get one). An I/O error keeps its OS error code, or its kind and message.
    pub fn duplicate(&self) -> StoreError {
        match self {
            StoreError::NotFound { name, store } => StoreError::NotFound {
                name: name.clone(),
                store: store.clone(),
            },
            StoreError::Corrupt {
                file,
                tensor,
                detail,
            } => StoreError::corrupt(file, tensor, detail.clone()),
            StoreError::Incomplete { path, detail } => StoreError::Incomplete {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::Format { file, detail } => StoreError::format(file, detail.clone()),
            StoreError::InvalidArgument(detail) => StoreError::InvalidArgument(detail.clone()),
            StoreError::Io { path, source } => {
                let copy = match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                };
                StoreError::io(path, copy)
            }
        }
    }
}

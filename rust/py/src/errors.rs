//! The one mapping from `StoreError` to Python exceptions. The classes live in Python
//! (`bigmodel.errors`) so users can import and catch them without touching the extension.

use std::io::ErrorKind;

use bigmodel_store::StoreError;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

/// Converts a store error into the matching `bigmodel.errors` exception (or an `OSError`).
pub fn to_py(err: StoreError) -> PyErr {
    let message = err.to_string();
    let class = match &err {
        StoreError::NotFound { .. } => "TensorNotFoundError",
        StoreError::Corrupt { .. } => "CorruptStoreError",
        StoreError::Incomplete { .. } => "IncompleteStoreError",
        StoreError::Format { .. } => "StoreFormatError",
        StoreError::InvalidArgument(_) => return PyValueError::new_err(message),
        StoreError::Io { source, .. } => return os_error(source, message),
    };
    Python::attach(
        |py| match py.import("bigmodel.errors").and_then(|m| m.getattr(class)) {
            Ok(cls) => PyErr::from_type(
                cls.cast_into().expect("bigmodel.errors holds classes"),
                message,
            ),
            Err(import_error) => import_error,
        },
    )
}

/// `OSError(errno, message)`: Python picks the subclass (FileNotFoundError, PermissionError, ...)
/// from the errno, exactly as for a failing `open()`. Errors the store made itself carry only
/// a kind; the kind's errno gives them the same subclass.
fn os_error(source: &std::io::Error, message: String) -> PyErr {
    let errno = source.raw_os_error().or(match source.kind() {
        ErrorKind::NotFound => Some(libc::ENOENT),
        ErrorKind::PermissionDenied => Some(libc::EACCES),
        ErrorKind::AlreadyExists => Some(libc::EEXIST),
        ErrorKind::OutOfMemory => Some(libc::ENOMEM),
        _ => None,
    });
    match errno {
        Some(errno) => PyOSError::new_err((errno, message)),
        None => PyOSError::new_err(message),
    }
}

pub trait IntoPyResult<T> {
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, StoreError> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

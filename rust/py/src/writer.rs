//! `StoreWriter`: writes a planned set of tensors as a store, committed atomically.

use std::path::PathBuf;
use std::sync::RwLock;

use bigmodel_store::writer::{StoreWriter as CoreWriter, TensorPlan, WriterOptions};
use bigmodel_store::{Codec, DType};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::IntoPyResult;

/// (name, dtype name, shape, codec name) of one planned tensor.
type PlanRow = (String, String, Vec<u64>, String);

#[pyclass(module = "bigmodel._core", frozen)]
pub struct StoreWriter {
    // Writes share the lock (they may run in parallel threads); `commit` takes it exclusively
    // and consumes the core writer, leaving `None`. Locks are only taken with the GIL released,
    // so a thread waiting for one never blocks a thread that needs the GIL to finish.
    inner: RwLock<Option<CoreWriter>>,
}

fn parse_plan(row: PlanRow) -> PyResult<TensorPlan> {
    let (name, dtype, shape, codec) = row;
    let dtype = DType::from_name(&dtype).ok_or_else(|| {
        PyValueError::new_err(format!("tensor {name:?}: unknown dtype {dtype:?}"))
    })?;
    let codec = match codec.as_str() {
        "none" => Codec::None,
        "zstd" => Codec::Zstd,
        other => {
            return Err(PyValueError::new_err(format!(
                "tensor {name:?}: unknown codec {other:?} (expected 'none' or 'zstd')"
            )))
        }
    };
    Ok(TensorPlan {
        name,
        dtype,
        shape,
        codec,
    })
}

#[pymethods]
impl StoreWriter {
    #[new]
    #[pyo3(signature = (path, plan, shard_size, zstd_level=3))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        plan: Vec<PlanRow>,
        shard_size: u64,
        zstd_level: i32,
    ) -> PyResult<Self> {
        let plan = plan
            .into_iter()
            .map(parse_plan)
            .collect::<PyResult<Vec<_>>>()?;
        let opts = WriterOptions {
            shard_size,
            zstd_level,
        };
        let writer = py
            .detach(|| CoreWriter::create(&path, plan, opts))
            .py_err()?;
        Ok(StoreWriter {
            inner: RwLock::new(Some(writer)),
        })
    }

    /// Writes the raw bytes of tensor `name` from any C-contiguous buffer (GIL released).
    fn write(&self, py: Python<'_>, name: &str, data: PyBuffer<u8>) -> PyResult<()> {
        if !data.is_c_contiguous() {
            return Err(PyValueError::new_err(format!(
                "tensor {name:?}: buffer is not contiguous"
            )));
        }
        let (ptr, len) = (data.buf_ptr() as usize, data.len_bytes());
        // SAFETY: `data` holds the exporter's buffer (and a reference to it) until it is dropped at
        // the end of this function, so the memory stays valid while the GIL is released.
        let raw = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        py.detach(|| {
            let guard = self.inner.read().map_err(|_| poisoned())?;
            let writer = guard.as_ref().ok_or_else(committed)?;
            writer.write(name, raw).py_err()
        })
    }

    /// Flushes and commits the store; the writer cannot be used afterwards.
    fn commit(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let writer = self
                .inner
                .write()
                .map_err(|_| poisoned())?
                .take()
                .ok_or_else(committed)?;
            writer.commit().map(drop).py_err()
        })
    }
}

fn poisoned() -> PyErr {
    PyRuntimeError::new_err("a write panicked; the store writer cannot be used any more")
}

fn committed() -> PyErr {
    PyRuntimeError::new_err("the store writer was already committed")
}

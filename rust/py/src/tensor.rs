//! Pinned tensor bytes handed to Python.
//!
//! Python wraps them without copying: `numpy.asarray(obj)` reads `__array_interface__` and
//! keeps `obj` alive as the array's base, `torch.from_numpy` keeps the array alive, so the pin
//! (and with it the mapping or buffer) lives exactly as long as the last tensor viewing it.

use pyo3::prelude::*;
use pyo3::types::PyDict;

#[pyclass(module = "bigmodel._core", frozen)]
pub struct TensorBytes {
    pub(crate) bytes: bigmodel_store::store::TensorBytes,
}

#[pymethods]
impl TensorBytes {
    /// Length in bytes.
    fn __len__(&self) -> usize {
        self.bytes.len()
    }

    /// A one-dimensional, writable uint8 array interface over the pinned bytes. Writes land in
    /// private copy-on-write pages (mappings) or owned buffers: never in the store's files.
    #[getter]
    fn __array_interface__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let interface = PyDict::new(py);
        interface.set_item("version", 3)?;
        interface.set_item("typestr", "|u1")?;
        interface.set_item("shape", (self.bytes.len(),))?;
        interface.set_item("data", (self.bytes.as_ptr() as usize, false))?;
        Ok(interface)
    }
}

//! Pinned tensor bytes handed to Python.
//!
//! Python wraps them without copying, through the buffer protocol (`torch.frombuffer(obj)`,
//! `memoryview(obj)`) or `__array_interface__` (`numpy.asarray(obj)`). Either way the consumer
//! keeps `obj` alive, so the pin (and with it the mapping or buffer) lives exactly as long as
//! the last tensor viewing it.

use std::os::raw::c_int;

use pyo3::ffi;
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

    /// A one-dimensional, writable byte buffer over the pinned bytes (see `__array_interface__`).
    ///
    /// # Safety
    /// Called by Python with a valid `view`; the exporter (`slf`) is kept alive by `view.obj`.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let bytes = &slf.get().bytes;
        let len = isize::try_from(bytes.len()).expect("a tensor's length fits in isize");
        // SAFETY: the pointer and length describe memory pinned as long as `slf` lives, and
        // `PyBuffer_FillInfo` takes a reference to `slf` in `view.obj`.
        let filled = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), bytes.as_ptr().cast(), len, 0, flags)
        };
        match filled {
            -1 => Err(PyErr::fetch(slf.py())),
            _ => Ok(()),
        }
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

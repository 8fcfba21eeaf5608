//! `bigmodel._core`: the thin PyO3 binding of `bigmodel-store`.
//!
//! It holds no logic: it converts types and errors, and releases the GIL around every call
//! that reads, writes or waits. The Python API (`bigmodel.store`) is built on these classes.

mod errors;
mod store;
mod tensor;
mod writer;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::Store>()?;
    m.add_class::<tensor::TensorBytes>()?;
    m.add_class::<writer::StoreWriter>()?;
    m.add("INDEX_FILE", bigmodel_store::index::INDEX_FILE)?;
    m.add("FORMAT_VERSION", bigmodel_store::index::FORMAT_VERSION)?;
    Ok(())
}

//! `Store`: an open store (committed directory or in-place mount) as a Python object.

use std::path::PathBuf;

use bigmodel_store::store::{Store as CoreStore, StoreOptions};
use bigmodel_store::{mount, Entry, Index};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::IntoPyResult;
use crate::tensor::TensorBytes;

/// (name, dtype, shape, raw bytes, stored bytes, file path, codec) of one tensor.
type EntryRow = (
    String,
    &'static str,
    Vec<u64>,
    u64,
    u64,
    String,
    &'static str,
);
/// (path, size in bytes, mounted) of one file.
type FileRow = (String, u64, bool);

#[pyclass(module = "bigmodel._core", frozen)]
pub struct Store {
    inner: CoreStore,
    root: PathBuf,
}

/// `zero_copy=None` is "auto": zero-copy views for a store without a budget, owned direct
/// reads for a store with one (so that the budget bounds real memory, page cache included).
fn options(
    max_resident: Option<u64>,
    read_threads: usize,
    verify_reads: bool,
    zero_copy: Option<bool>,
    populate_views: bool,
) -> StoreOptions {
    StoreOptions {
        max_resident,
        read_threads,
        verify_reads,
        zero_copy: zero_copy.unwrap_or(max_resident.is_none()),
        populate_views,
    }
}

#[pymethods]
impl Store {
    /// Opens the committed store in directory `path` (validating every index entry).
    /// `zero_copy`: see `options`.
    #[staticmethod]
    #[pyo3(signature = (path, max_resident=None, read_threads=2, verify_reads=false, zero_copy=None, populate_views=true))]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        max_resident: Option<u64>,
        read_threads: usize,
        verify_reads: bool,
        zero_copy: Option<bool>,
        populate_views: bool,
    ) -> PyResult<Store> {
        let opts = options(
            max_resident,
            read_threads,
            verify_reads,
            zero_copy,
            populate_views,
        );
        let inner = py.detach(|| CoreStore::open(&path, opts)).py_err()?;
        Ok(Store { inner, root: path })
    }

    /// Serves existing safetensors files in place (nothing is copied or written).
    #[staticmethod]
    #[pyo3(signature = (files, max_resident=None, read_threads=2, verify_reads=false, zero_copy=None, populate_views=true))]
    fn mount_safetensors(
        py: Python<'_>,
        files: Vec<PathBuf>,
        max_resident: Option<u64>,
        read_threads: usize,
        verify_reads: bool,
        zero_copy: Option<bool>,
        populate_views: bool,
    ) -> PyResult<Store> {
        let opts = options(
            max_resident,
            read_threads,
            verify_reads,
            zero_copy,
            populate_views,
        );
        let root = files
            .first()
            .and_then(|f| f.parent())
            .map(PathBuf::from)
            .unwrap_or_default();
        let inner = py
            .detach(|| {
                let index = mount::mount_safetensors(&files)?;
                CoreStore::from_index(index, root.clone(), opts)
            })
            .py_err()?;
        Ok(Store { inner, root })
    }

    /// Serves an accelerate offload folder (`index.json` + `.dat` files) in place.
    #[staticmethod]
    #[pyo3(signature = (folder, max_resident=None, read_threads=2, verify_reads=false, zero_copy=None, populate_views=true))]
    fn mount_offload_folder(
        py: Python<'_>,
        folder: PathBuf,
        max_resident: Option<u64>,
        read_threads: usize,
        verify_reads: bool,
        zero_copy: Option<bool>,
        populate_views: bool,
    ) -> PyResult<Store> {
        let opts = options(
            max_resident,
            read_threads,
            verify_reads,
            zero_copy,
            populate_views,
        );
        let inner = py
            .detach(|| {
                let index = mount::mount_offload_folder(&folder)?;
                CoreStore::from_index(index, folder.clone(), opts)
            })
            .py_err()?;
        Ok(Store {
            inner,
            root: folder,
        })
    }

    /// Commits at `path` a store whose index serves `files` (safetensors) in place.
    #[staticmethod]
    fn write_mount(py: Python<'_>, path: PathBuf, files: Vec<PathBuf>) -> PyResult<()> {
        py.detach(|| {
            let index: Index = mount::mount_safetensors(&files)?;
            mount::write_mount_index(&path, &index)
        })
        .py_err()
    }

    /// Every tensor's metadata, in index order.
    fn entries(&self) -> Vec<EntryRow> {
        let index = self.inner.index();
        index
            .tensors
            .iter()
            .map(|e| entry_row(index, &self.root, e))
            .collect()
    }

    /// Every file the store reads, in index order.
    fn files(&self) -> Vec<FileRow> {
        let index = self.inner.index();
        let path = |i: usize| index.file_path(&self.root, i).display().to_string();
        index
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (path(i), f.size, f.mounted))
            .collect()
    }

    /// Pins and returns the bytes of tensor `name`, reading them if they are not resident.
    fn get(&self, py: Python<'_>, name: &str) -> PyResult<TensorBytes> {
        let bytes = py.detach(|| self.inner.get(name)).py_err()?;
        Ok(TensorBytes { bytes })
    }

    /// Starts background reads of `names`; returns at once.
    fn prefetch(&self, py: Python<'_>, names: Vec<String>) -> PyResult<()> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        py.detach(|| self.inner.prefetch(&names)).py_err()
    }

    fn will_need(&self, py: Python<'_>, names: Vec<String>) -> PyResult<()> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        py.detach(|| self.inner.will_need(&names)).py_err()
    }

    fn populate_in_background(&self, py: Python<'_>, names: Vec<String>) -> PyResult<()> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        py.detach(|| self.inner.populate_in_background(&names))
            .py_err()
    }

    /// Names of the tensors whose bytes do not match their recorded checksum.
    fn verify(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        py.detach(|| self.inner.verify()).py_err()
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let dict = PyDict::new(py);
        for (key, value) in [
            ("hits", s.hits),
            ("misses", s.misses),
            ("prefetch_requests", s.prefetch_requests),
            ("prefetch_hits", s.prefetch_hits),
            ("prefetch_late", s.prefetch_late),
            ("prefetch_dropped", s.prefetch_dropped),
            ("bytes_read", s.bytes_read),
            ("bytes_from_page_cache", s.bytes_from_page_cache),
            ("evictions", s.evictions),
            ("buffers_reused", s.buffers_reused),
            ("resident_bytes", s.resident_bytes),
            ("charged_bytes", s.charged_bytes),
            ("peak_resident_bytes", s.peak_resident_bytes),
            ("pinned_bytes", s.pinned_bytes),
            ("wait_ns", s.wait_ns),
        ] {
            dict.set_item(key, value)?;
        }
        dict.set_item("budget", s.budget)?;
        Ok(dict)
    }

    /// Stops the read threads. Tensors already handed out stay valid.
    fn close(&self, py: Python<'_>) {
        py.detach(|| self.inner.close());
    }
}

fn entry_row(index: &Index, root: &std::path::Path, entry: &Entry) -> EntryRow {
    let codec = match entry.codec {
        bigmodel_store::Codec::None => "none",
        bigmodel_store::Codec::Zstd => "zstd",
    };
    let file = index.file_path(root, entry.file).display().to_string();
    let name = entry.name.clone();
    (
        name,
        entry.dtype.name(),
        entry.shape.clone(),
        entry.raw_length,
        entry.length,
        file,
        codec,
    )
}

//! `Store::verify`: every checksum checked against the bytes on disk, outside the cache.

use std::path::Path;

use crate::direct::DirectFile;
use crate::error::{Result, StoreError};
use crate::index::{Entry, Index};
use crate::mapping;

/// Names of the tensors of `index` (files resolved in `root`) whose bytes on disk do not
/// match their checksum, or cannot be read as recorded (missing file, short file, bad
/// frame); tensors without a checksum are skipped. Reads the files with direct I/O, in file
/// order, through bounded buffers, so the page cache is not filled either. OS failures are
/// errors.
pub(crate) fn failing_tensors(index: &Index, root: &Path) -> Result<Vec<String>> {
    let mut order: Vec<&Entry> = index
        .tensors
        .iter()
        .filter(|e| e.checksum.is_some())
        .collect();
    order.sort_by_key(|e| (e.file, e.offset));
    let mut buffers = mapping::ChecksumBuffers::new(root)?;
    let mut failing = Vec::new();
    // The file being read: its position and handle (`None`: the file is missing).
    let mut open_file: Option<(usize, Option<DirectFile>)> = None;
    for entry in order {
        let path = index.file_path(root, entry.file);
        if open_file
            .as_ref()
            .map_or(true, |(file, _)| *file != entry.file)
        {
            open_file = Some((entry.file, open_for_verify(&path)?));
        }
        let Some((_, Some(file))) = &open_file else {
            failing.push(entry.name.clone());
            continue;
        };
        match mapping::stored_checksum(file, &path, entry, &mut buffers) {
            Ok(sum) if Some(sum) == entry.checksum => {}
            Ok(_) | Err(StoreError::Corrupt { .. }) => failing.push(entry.name.clone()),
            Err(other) => return Err(other),
        }
    }
    Ok(failing)
}

/// Opens a file for `verify`; `None` when it is missing or no longer a regular file (its
/// tensors fail verification). Non-blocking: a FIFO in a file's place must not hang `verify`.
fn open_for_verify(path: &Path) -> Result<Option<DirectFile>> {
    match crate::fs::open_regular(path, "a store data file") {
        Ok(file) => DirectFile::new(file, path).map(Some),
        Err(StoreError::Format { .. }) => Ok(None),
        Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

//! File-system helpers shared by readers and writers: opening regular files without
//! blocking, flushing directory entries, and modification times.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use crate::error::{Result, StoreError};

/// Opens `path` for reading, refusing anything but a regular file (`Format`, naming `what`
/// the file should have been). The open is non-blocking so that a FIFO or a device put in
/// the file's place fails here instead of blocking forever in `open` or `read`; the flag
/// changes nothing for a regular file.
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    let meta = file.metadata().map_err(|e| StoreError::io(path, e))?;
    if meta.is_file() {
        return Ok(file);
    }
    let kind = if meta.is_dir() {
        "a directory"
    } else {
        "a FIFO, socket or device"
    };
    Err(StoreError::format(path, format!("is {kind}, not {what}")))
}

/// Flushes `dir`'s entries (the renames done in it) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// A file's modification time in nanoseconds since the epoch (0 for times before it).
pub fn mtime_ns(meta: &fs::Metadata) -> u64 {
    let nanos = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    u64::try_from(nanos).unwrap_or(0)
}

//! Checksums and the zstd codec. Frames are standard zstd frames, so any zstd decoder
//! (the Python `zstandard` package included) reads them.

use std::path::Path;

use crate::error::{Result, StoreError};

/// The store's checksum: xxh3-64 of the raw (decoded) bytes.
pub fn checksum(raw: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(raw)
}

/// Compresses `raw` into one zstd frame that records its content size.
pub fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(raw, level)
}

/// Decodes one frame into `out`, which must hold exactly `raw_length` bytes. Never
/// allocates more than that: a frame that decodes to any other size is corruption.
pub fn decompress_into(frame: &[u8], out: &mut [u8], file: &Path, tensor: &str) -> Result<()> {
    let mut decoder = zstd::bulk::Decompressor::new().map_err(|e| StoreError::io(file, e))?;
    let written = decoder
        .decompress_to_buffer(frame, out)
        .map_err(|e| StoreError::corrupt(file, tensor, format!("bad zstd frame: {e}")))?;
    if written != out.len() {
        return Err(StoreError::corrupt(
            file,
            tensor,
            format!(
                "zstd frame decodes to {written} bytes, the index records {}",
                out.len()
            ),
        ));
    }
    Ok(())
}

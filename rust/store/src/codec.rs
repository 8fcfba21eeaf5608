//! Checksums and the zstd codec. Frames are standard zstd frames, so any zstd decoder
//! (the Python `zstandard` package included) reads them.

use std::path::Path;

use zstd::zstd_safe::CParameter;

use crate::error::{Result, StoreError};

/// The store's checksum: xxh3-64 of the raw (decoded) bytes.
pub fn checksum(raw: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(raw)
}

/// Compresses `raw` into one zstd frame that records its content size and carries zstd's
/// own content checksum, so a damaged frame fails to decode even when reads are not
/// verified against the index's checksum (4 bytes per frame).
pub fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let mut compressor = zstd::bulk::Compressor::new(level)?;
    compressor.set_parameter(CParameter::ChecksumFlag(true))?;
    compressor.compress(raw)
}

/// The first bytes of every (current, non-skippable) zstd frame.
const ZSTD_MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();

/// Checks a frame's header before anything is allocated for it: the bytes must start a
/// current-format zstd frame (the library would also decode legacy formats, which no
/// writer of ours produces), and a frame that announces a content size other than
/// `raw_length` is corrupt (its announced size is never trusted for an allocation).
/// Frames that announce no size are checked while they decode.
pub fn check_frame_header(frame: &[u8], raw_length: u64, file: &Path, tensor: &str) -> Result<()> {
    if !frame.starts_with(&ZSTD_MAGIC) {
        return Err(StoreError::corrupt(
            file,
            tensor,
            "the bytes do not start with a zstd frame header",
        ));
    }
    match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(announced)) if announced != raw_length => Err(StoreError::corrupt(
            file,
            tensor,
            format!("the zstd frame announces {announced} bytes, the index records {raw_length}"),
        )),
        Ok(_) => Ok(()),
        Err(_) => Err(StoreError::corrupt(
            file,
            tensor,
            "the bytes do not start with a zstd frame header",
        )),
    }
}

/// Decodes one frame into `out`, which must hold exactly `raw_length` bytes. Never
/// allocates more than that: a frame that decodes to any other size is corruption, and so
/// are bytes that are not exactly one frame (the decoder would take several frames in a
/// row as one tensor, where `verify` reads only the first).
pub fn decompress_into(frame: &[u8], out: &mut [u8], file: &Path, tensor: &str) -> Result<()> {
    check_frame_header(frame, out.len() as u64, file, tensor)?;
    match zstd::zstd_safe::find_frame_compressed_size(frame) {
        Ok(end) if end == frame.len() => {}
        Ok(end) => {
            let detail = format!(
                "the zstd frame ends after {end} of the {} bytes the index records",
                frame.len()
            );
            return Err(StoreError::corrupt(file, tensor, detail));
        }
        Err(code) => {
            let detail = format!("bad zstd frame: {}", zstd::zstd_safe::get_error_name(code));
            return Err(StoreError::corrupt(file, tensor, detail));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_size_and_a_checksum() {
        let raw: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let frame = compress(&raw, 3).unwrap();
        let path = Path::new("blob.bin");
        check_frame_header(&frame, raw.len() as u64, path, "t").unwrap();
        let err = check_frame_header(&frame, 7, path, "t").unwrap_err();
        assert!(err.to_string().contains("announces 10000 bytes"), "{err}");
        assert!(check_frame_header(b"nope", 4, path, "t").is_err());
        // Flip one bit of each byte in turn: the content checksum catches every damage the
        // decoder itself would not notice, so a decode that succeeds gives the right bytes
        // (a flip of an unused header bit changes nothing).
        for at in 0..frame.len() {
            let mut damaged = frame.clone();
            damaged[at] ^= 0x10;
            let mut out = vec![0u8; raw.len()];
            let decoded = decompress_into(&damaged, &mut out, path, "t");
            assert!(
                decoded.is_err() || out == raw,
                "byte {at}: wrong bytes served"
            );
        }
    }
}

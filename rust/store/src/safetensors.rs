//! safetensors headers: read (to mount checkpoints in place) and built (for our shards).
//!
//! A safetensors file is an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data section; offsets are relative to the data section's start.
//! The reader never trusts the file: every length and offset is checked before use.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::dtype::{byte_size, DType};
use crate::error::{Result, StoreError};
use crate::index::{ALIGNMENT, BLOCK_ALIGNMENT};
use crate::json;

/// Headers longer than this are refused (the safetensors library uses the same bound),
/// so a corrupt length never makes us allocate gigabytes.
pub const MAX_HEADER_LEN: u64 = 100_000_000;
/// Names of the `U8` entries that fill alignment gaps in our shards.
pub const PAD_PREFIX: &str = "__bigmodel_pad_";
const METADATA_KEY: &str = "__metadata__";

/// One tensor of a safetensors file, with absolute file positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Absolute offset of the first byte in the file.
    pub offset: u64,
    /// Bytes of the tensor (dtype size × product of the shape).
    pub length: u64,
}

/// A parsed header: tensors in file order and the string metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Absolute offset of the data section (8 + header length).
    pub data_start: u64,
    pub tensors: Vec<HeaderEntry>,
    pub metadata: BTreeMap<String, String>,
}

/// True for the padding entries our shards carry; they are not tensors of the store.
pub fn is_padding(name: &str) -> bool {
    name.starts_with(PAD_PREFIX)
}

/// Reads and checks the header of the safetensors file at `path`.
pub fn read_header(path: &Path) -> Result<Header> {
    let mut file = crate::fs::open_regular(path, "a safetensors file")?;
    let file_len = file.metadata().map_err(|e| StoreError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    if file_len < 8 {
        return Err(too_short(path, file_len));
    }
    file.read_exact(&mut len_bytes)
        .map_err(|e| StoreError::io(path, e))?;
    let json_len = checked_header_len(u64::from_le_bytes(len_bytes), file_len, path)?;
    // Bounded by MAX_HEADER_LEN and by the file length, both checked above.
    let mut json = vec![0u8; json_len as usize];
    file.read_exact(&mut json)
        .map_err(|e| StoreError::io(path, e))?;
    parse_json(&json, 8 + json_len, file_len, path)
}

/// Parses a header from the first bytes of a file of `file_len` bytes. `prefix` must
/// hold at least the length field and the JSON; anything after is ignored.
pub fn parse_header(prefix: &[u8], file_len: u64, path: &Path) -> Result<Header> {
    let Some(len_bytes) = prefix.get(..8) else {
        return Err(too_short(path, file_len.min(prefix.len() as u64)));
    };
    let declared = u64::from_le_bytes(len_bytes.try_into().expect("slice of 8 bytes"));
    let json_len = checked_header_len(declared, file_len, path)?;
    let json = usize::try_from(8 + json_len)
        .ok()
        .and_then(|end| prefix.get(8..end))
        .ok_or_else(|| {
            StoreError::format(
                path,
                "the header is truncated (fewer bytes than its length)",
            )
        })?;
    parse_json(json, 8 + json_len, file_len, path)
}

fn too_short(path: &Path, len: u64) -> StoreError {
    StoreError::format(
        path,
        format!("{len} bytes is too short for a safetensors file (needs an 8-byte header length)"),
    )
}

fn checked_header_len(declared: u64, file_len: u64, path: &Path) -> Result<u64> {
    if declared > MAX_HEADER_LEN {
        return Err(StoreError::format(
            path,
            format!("header length {declared} exceeds the limit of {MAX_HEADER_LEN} bytes"),
        ));
    }
    if 8 + declared > file_len {
        return Err(StoreError::format(
            path,
            format!("header length {declared} runs past the end of the file ({file_len} bytes)"),
        ));
    }
    Ok(declared)
}

#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

fn parse_json(json: &[u8], data_start: u64, file_len: u64, path: &Path) -> Result<Header> {
    let doc = json::from_slice(json)
        .map_err(|e| StoreError::format(path, format!("the header is not valid JSON: {e}")))?;
    let Value::Object(doc) = doc else {
        return Err(StoreError::format(path, "the header is not a JSON object"));
    };
    let data_len = file_len - data_start;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(doc.len());
    for (name, value) in doc {
        if name == METADATA_KEY {
            metadata = serde_json::from_value(value).map_err(|e| {
                StoreError::format(path, format!("__metadata__ is not a map of strings: {e}"))
            })?;
        } else {
            let raw: RawTensor = serde_json::from_value(value)
                .map_err(|e| StoreError::format(path, format!("tensor {name:?}: {e}")))?;
            tensors.push(checked_entry(name, raw, data_start, data_len, path)?);
        }
    }
    // Empty tensors first among equal offsets, so the order walks the file front to back.
    tensors.sort_by_key(|t| (t.offset, t.length));
    check_no_overlap(&tensors, path)?;
    Ok(Header {
        data_start,
        tensors,
        metadata,
    })
}

fn checked_entry(
    name: String,
    raw: RawTensor,
    data_start: u64,
    data_len: u64,
    path: &Path,
) -> Result<HeaderEntry> {
    let bad = |detail: String| StoreError::format(path, format!("tensor {name:?}: {detail}"));
    let dtype = DType::from_name(&raw.dtype)
        .ok_or_else(|| bad(format!("unknown dtype {:?}", raw.dtype)))?;
    let (begin, end) = raw.data_offsets;
    if begin > end || end > data_len {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] are outside the data section of {data_len} bytes"
        )));
    }
    let expected = byte_size(dtype, &raw.shape)
        .ok_or_else(|| bad(format!("shape {:?} overflows a 64-bit size", raw.shape)))?;
    if end - begin != expected {
        return Err(bad(format!(
            "data_offsets hold {} bytes, dtype {dtype} shape {:?} needs {expected}",
            end - begin,
            raw.shape
        )));
    }
    Ok(HeaderEntry {
        name,
        dtype,
        shape: raw.shape,
        offset: data_start + begin,
        length: expected,
    })
}

/// Two tensors sharing bytes would alias each other once mapped; the format forbids it.
fn check_no_overlap(sorted: &[HeaderEntry], path: &Path) -> Result<()> {
    let mut previous: Option<&HeaderEntry> = None;
    for tensor in sorted.iter().filter(|t| t.length > 0) {
        if let Some(prev) = previous.filter(|p| p.offset + p.length > tensor.offset) {
            return Err(StoreError::format(
                path,
                format!("tensors {:?} and {:?} overlap", prev.name, tensor.name),
            ));
        }
        previous = Some(tensor);
    }
    Ok(())
}

/// One tensor to place in a shard we write.
#[derive(Debug, Clone, Copy)]
pub struct ShardTensor<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [u64],
}

/// A planned shard: the bytes to write at offset 0 and where each tensor goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// Length field, JSON and space padding; its length is a multiple of
    /// [`BLOCK_ALIGNMENT`], so that the data section starts on a block.
    pub header: Vec<u8>,
    /// Absolute file offset of each input tensor, in input order; aligned as
    /// [`tensor_alignment`] says.
    pub offsets: Vec<u64>,
    /// The whole file's length.
    pub file_len: u64,
}

/// Lays out `tensors` in one safetensors file, in the given order. Because the data
/// section starts on a block, aligning offsets within it aligns them in the file; the
/// gaps become `U8` entries named `__bigmodel_pad_<n>__`, since safetensors requires the
/// entries to tile the data section.
pub fn build_shard_header(tensors: &[ShardTensor]) -> Result<ShardLayout> {
    let mut doc = Map::new();
    let mut relative = Vec::with_capacity(tensors.len());
    let mut cursor = 0u64;
    let mut pads = 0usize;
    for tensor in tensors {
        let length = byte_size(tensor.dtype, tensor.shape).ok_or_else(|| {
            StoreError::InvalidArgument(format!(
                "tensor {:?}: shape {:?} overflows a 64-bit size",
                tensor.name, tensor.shape
            ))
        })?;
        let begin = align_tensor(cursor, length).ok_or_else(|| shard_too_large(tensor.name))?;
        if begin > cursor {
            let pad_name = format!("{PAD_PREFIX}{pads}__");
            doc.insert(
                pad_name,
                entry_json(DType::U8, &[begin - cursor], cursor, begin),
            );
            pads += 1;
        }
        let end = begin
            .checked_add(length)
            .ok_or_else(|| shard_too_large(tensor.name))?;
        doc.insert(
            tensor.name.to_owned(),
            entry_json(tensor.dtype, tensor.shape, begin, end),
        );
        relative.push(begin);
        cursor = end;
    }
    doc.insert(METADATA_KEY.to_owned(), serde_json::json!({"format": "pt"}));
    let header = padded_header(&Value::Object(doc));
    let data_start = header.len() as u64;
    Ok(ShardLayout {
        offsets: relative.iter().map(|r| data_start + r).collect(),
        file_len: data_start + cursor,
        header,
    })
}

fn shard_too_large(name: &str) -> StoreError {
    StoreError::InvalidArgument(format!(
        "tensor {name:?}: the shard would exceed a 64-bit size"
    ))
}

fn entry_json(dtype: DType, shape: &[u64], begin: u64, end: u64) -> Value {
    serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [begin, end]})
}

/// Length field + JSON + spaces up to a multiple of [`BLOCK_ALIGNMENT`] (spaces are valid
/// JSON whitespace, and the safetensors library pads its own headers the same way).
fn padded_header(doc: &Value) -> Vec<u8> {
    let json = serde_json::to_vec(doc).expect("a JSON value always serializes");
    let json_len = (8 + json.len()).next_multiple_of(BLOCK_ALIGNMENT as usize) - 8;
    let mut header = Vec::with_capacity(8 + json_len);
    header.extend_from_slice(&(json_len as u64).to_le_bytes());
    header.extend_from_slice(&json);
    header.resize(8 + json_len, b' ');
    header
}

/// `offset` rounded up to the next multiple of [`ALIGNMENT`]; `None` on overflow.
pub fn align_up(offset: u64) -> Option<u64> {
    offset.checked_next_multiple_of(ALIGNMENT)
}

/// Where a tensor of `length` bytes may start in our shards: tensors of a block or more on
/// a block ([`BLOCK_ALIGNMENT`]), so that direct reads land in place, without moving the
/// bytes; smaller ones, which direct reads copy out of a bounce buffer anyway, on
/// [`ALIGNMENT`] (a block each would cost up to 4 KiB of padding per tensor for nothing).
pub fn tensor_alignment(length: u64) -> u64 {
    match length >= BLOCK_ALIGNMENT {
        true => BLOCK_ALIGNMENT,
        false => ALIGNMENT,
    }
}

/// `offset` rounded up to where a tensor of `length` bytes may start; `None` on overflow.
pub fn align_tensor(offset: u64, length: u64) -> Option<u64> {
    offset.checked_next_multiple_of(tensor_alignment(length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file_bytes(json: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn parse(bytes: &[u8]) -> Result<Header> {
        parse_header(bytes, bytes.len() as u64, &PathBuf::from("t.safetensors"))
    }

    fn format_detail(result: Result<Header>) -> String {
        match result {
            Err(StoreError::Format { file, detail }) => {
                assert_eq!(file, PathBuf::from("t.safetensors"));
                detail
            }
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_valid_header_in_file_order() {
        let json = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},
                       "a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]},
                       "__metadata__":{"format":"pt"}}"#;
        let bytes = file_bytes(json, 16);
        let header = parse(&bytes).unwrap();
        let start = 8 + json.len() as u64;
        assert_eq!(header.data_start, start);
        assert_eq!(header.metadata["format"], "pt");
        let names: Vec<_> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            (header.tensors[1].offset, header.tensors[1].length),
            (start + 8, 8)
        );
        assert_eq!(header.tensors[0].dtype, DType::BF16);
    }

    #[test]
    fn rejects_bad_headers_with_a_reason() {
        let entry = |dtype: &str, shape: &str, offsets: &str| {
            format!(r#"{{"t":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}"#)
        };
        let cases = [
            (entry("F7", "[1]", "[0,4]"), "unknown dtype"),
            (entry("F32", "[2]", "[0,4]"), "needs 8"),
            (entry("F32", "[1]", "[4,12]"), "outside the data section"),
            (entry("F32", "[1]", "[4,0]"), "outside the data section"),
            (
                entry("F64", "[4294967296,4294967296]", "[0,4]"),
                "overflows",
            ),
            (entry("F32", "[-1]", "[0,4]"), "tensor \"t\""),
            ("[1,2]".to_owned(), "not a JSON object"),
            ("{\"t\":".to_owned(), "not valid JSON"),
            (r#"{"__metadata__":{"a":1}}"#.to_owned(), "__metadata__"),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                    "b":{"dtype":"I16","shape":[2],"data_offsets":[2,6]}}"#
                    .to_owned(),
                "overlap",
            ),
        ];
        for (json, reason) in cases {
            let detail = format_detail(parse(&file_bytes(&json, 8)));
            assert!(detail.contains(reason), "{json}: {detail}");
        }
    }

    #[test]
    fn rejects_bad_lengths() {
        assert!(format_detail(parse(&[1, 2, 3])).contains("too short"));
        let mut huge = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(format_detail(parse(&huge)).contains("exceeds the limit"));
        let past_end = file_bytes("{}", 0);
        let detail = format_detail(parse_header(&past_end, 5, Path::new("t.safetensors")));
        assert!(detail.contains("past the end"));
        let detail = format_detail(parse_header(
            &past_end[..9],
            100,
            Path::new("t.safetensors"),
        ));
        assert!(detail.contains("truncated"));
    }

    #[test]
    fn built_header_aligns_every_tensor_and_parses_back() {
        let shapes: [&[u64]; 4] = [&[3], &[], &[0, 5], &[7, 3]];
        let names = ["odd", "scalar", "empty", "matrix"];
        let dtypes = [DType::F16, DType::F64, DType::F32, DType::I8];
        let tensors: Vec<ShardTensor> = (0..4)
            .map(|i| ShardTensor {
                name: names[i],
                dtype: dtypes[i],
                shape: shapes[i],
            })
            .collect();
        let layout = build_shard_header(&tensors).unwrap();
        assert_eq!(layout.header.len() as u64 % BLOCK_ALIGNMENT, 0);
        assert!(layout.offsets.iter().all(|o| o % ALIGNMENT == 0));
        let mut file = layout.header.clone();
        file.resize(layout.file_len as usize, 0);
        let header = parse(&file).unwrap();
        assert_eq!(header.metadata["format"], "pt");
        for (i, name) in names.iter().enumerate() {
            let parsed = header.tensors.iter().find(|t| t.name == *name).unwrap();
            assert_eq!(parsed.offset, layout.offsets[i], "{name}");
            assert_eq!(
                (parsed.dtype, parsed.shape.as_slice()),
                (dtypes[i], shapes[i])
            );
        }
        assert_tiles_data_section(&header, layout.file_len);
    }

    #[test]
    fn tensors_of_a_block_or_more_start_on_a_block() {
        let shapes: [&[u64]; 5] = [&[3], &[1024], &[1023], &[5, 1000], &[7]];
        let tensors: Vec<ShardTensor> = shapes
            .iter()
            .map(|shape| ShardTensor {
                name: "t",
                dtype: DType::F32,
                shape,
            })
            .collect();
        let names = ["a", "b", "c", "d", "e"];
        let tensors: Vec<ShardTensor> = tensors
            .into_iter()
            .zip(names)
            .map(|(t, name)| ShardTensor { name, ..t })
            .collect();
        let layout = build_shard_header(&tensors).unwrap();
        let mut file = layout.header.clone();
        file.resize(layout.file_len as usize, 0);
        let header = parse(&file).unwrap();
        for (tensor, offset) in tensors.iter().zip(&layout.offsets) {
            let length = byte_size(tensor.dtype, tensor.shape).unwrap();
            let expected = if length >= BLOCK_ALIGNMENT {
                BLOCK_ALIGNMENT
            } else {
                ALIGNMENT
            };
            assert_eq!(offset % expected, 0, "{} ({length} bytes)", tensor.name);
            let parsed = header
                .tensors
                .iter()
                .find(|t| t.name == tensor.name)
                .unwrap();
            assert_eq!(parsed.offset, *offset);
        }
        // "c" (4092 bytes) needs no block: it follows "b" without a block of padding.
        assert_eq!(layout.offsets[2], layout.offsets[1] + 4096);
        assert_tiles_data_section(&header, layout.file_len);
    }

    /// safetensors loaders demand entries that cover the data section without gaps.
    fn assert_tiles_data_section(header: &Header, file_len: u64) {
        let mut cursor = header.data_start;
        for t in &header.tensors {
            assert_eq!(t.offset, cursor, "gap before {}", t.name);
            cursor += t.length;
        }
        assert_eq!(cursor, file_len);
        assert!(header.tensors.iter().any(|t| is_padding(&t.name)));
    }
}

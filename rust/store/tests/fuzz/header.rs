//! The `shard_header` target (the safetensors header parser, on a file's first bytes) and
//! the `mount` target (a safetensors file on disk, mounted in place and served).

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use bigmodel_store::dtype::byte_size;
use bigmodel_store::mount::mount_safetensors;
use bigmodel_store::safetensors::{build_shard_header, parse_header, Header, ShardTensor};
use bigmodel_store::DType;

use super::index::{json_tokens, write_fixture_store};
use super::serve::serve_and_check;
use super::{scratch_dir, Outcome, Picks, Target};

/// The safetensors header parser, on the bytes of a file's beginning.
pub struct HeaderTarget {
    seeds: Vec<Vec<u8>>,
    tokens: Vec<Vec<u8>>,
}

impl HeaderTarget {
    pub fn new() -> HeaderTarget {
        let store = scratch_dir();
        let written = write_fixture_store(store.path());
        let mut seeds: Vec<Vec<u8>> = written
            .files
            .iter()
            .filter(|f| f.path.ends_with(".safetensors"))
            .map(|f| fs::read(store.path().join(&f.path)).expect("fixture shard"))
            .collect();
        seeds.push(library_style_file());
        HeaderTarget {
            seeds,
            tokens: json_tokens(&[]),
        }
    }
}

/// A file laid out as the safetensors library writes it: no alignment padding entries,
/// metadata first, tensors packed back to back.
fn library_style_file() -> Vec<u8> {
    let json = br#"{"__metadata__":{"format":"pt"},"bias":{"dtype":"F16","shape":[3],"data_offsets":[0,6]},"weight":{"dtype":"F32","shape":[2,2],"data_offsets":[6,22]}}"#;
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json);
    file.extend((0..22u8).map(|i| i.wrapping_mul(37)));
    file
}

/// A safetensors file with one thing of its header changed, the length field kept true:
/// a tensor shifted (often to an odd, misaligned offset), retyped, reshaped, removed, or a
/// new entry over bytes another one uses.
fn restructure_safetensors(file: &[u8], picks: &mut Picks) -> Option<Vec<u8>> {
    let json_len = usize::try_from(u64::from_le_bytes(file.get(..8)?.try_into().ok()?)).ok()?;
    let json = file.get(8..8usize.checked_add(json_len)?)?;
    let data = &file[8 + json_len..];
    let serde_json::Value::Object(mut header) = serde_json::from_slice(json).ok()? else {
        return None;
    };
    let names: Vec<String> = header
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let name = names.get(picks.below(names.len()))?.clone();
    let entry = header.get_mut(&name)?.as_object_mut()?;
    let offsets = entry.get("data_offsets")?.as_array()?.clone();
    let (begin, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
    let shift = |x: u64, by: i64| x.saturating_add_signed(by);
    match picks.below(6) {
        0 => {
            let by = picks.below(15) as i64 - 7;
            entry.insert(
                "data_offsets".into(),
                serde_json::json!([shift(begin, by), shift(end, by)]),
            );
        }
        1 => {
            let same_size = [
                ["F32", "I32"],
                ["F16", "BF16"],
                ["U8", "I8"],
                ["F64", "I64"],
            ];
            let pair = same_size[picks.below(same_size.len())];
            entry.insert("dtype".into(), pair[picks.below(2)].into());
        }
        2 => {
            entry.insert("dtype".into(), "U8".into());
            entry.insert(
                "shape".into(),
                serde_json::json!([end.saturating_sub(begin)]),
            );
        }
        3 => {
            header.remove(&name);
        }
        4 => {
            let start = picks.below(data.len() + 1) as u64;
            let len = picks.below(data.len() + 1 - start as usize) as u64;
            let extra = serde_json::json!({"dtype": "U8", "shape": [len], "data_offsets": [start, start + len]});
            header.insert(format!("extra{}", picks.below(4)), extra);
        }
        _ => {
            entry.insert("shape".into(), serde_json::json!([]));
        }
    }
    let json = serde_json::to_vec(&header).ok()?;
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    Some(out)
}

/// What `parse_header` promises about a header it accepts for a file of `file_len` bytes.
fn check_header(header: &Header, prefix: &[u8], file_len: u64) -> Result<(), String> {
    let declared = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if header.data_start != 8 + declared || header.data_start > file_len {
        return Err(format!("data section at {} accepted", header.data_start));
    }
    let mut names = HashSet::new();
    let mut previous_end = header.data_start;
    for t in &header.tensors {
        if !names.insert(&t.name) {
            return Err(format!("{:?} accepted twice", t.name));
        }
        let end = t
            .offset
            .checked_add(t.length)
            .ok_or("offset overflow accepted")?;
        if t.offset < header.data_start || end > file_len {
            return Err(format!("{:?} accepted outside the data section", t.name));
        }
        if byte_size(t.dtype, &t.shape) != Some(t.length) {
            return Err(format!("{:?} accepted with a wrong length", t.name));
        }
        if t.length > 0 && t.offset < previous_end {
            return Err(format!("{:?} accepted overlapping its neighbour", t.name));
        }
        if t.length > 0 {
            previous_end = end;
        }
    }
    Ok(())
}

impl Target for HeaderTarget {
    fn seeds(&self) -> &[Vec<u8>] {
        &self.seeds
    }

    fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    fn restructure(&self, seed: &[u8], picks: &mut Picks) -> Option<Vec<u8>> {
        restructure_safetensors(seed, picks)
    }

    fn run(&self, input: &[u8]) -> Result<Outcome, String> {
        let path = Path::new("fuzzed.safetensors");
        // As a whole file, then as the first bytes of a longer one (data beyond the prefix).
        let whole = parse_header(input, input.len() as u64, path);
        if let Ok(header) = &whole {
            check_header(header, input, input.len() as u64)?;
        }
        let longer = input.len() as u64 + 4096;
        if let Ok(header) = parse_header(input, longer, path) {
            check_header(&header, input, longer)?;
        }
        Ok(match whole {
            Ok(_) => Outcome::Accepted,
            Err(_) => Outcome::Refused,
        })
    }
}

/// A safetensors file on disk, mounted in place and read: bytes served must be the file's.
pub struct MountTarget {
    dir: tempfile::TempDir,
    /// The same seeds and dictionary as the header target.
    header: HeaderTarget,
}

impl MountTarget {
    pub fn new() -> MountTarget {
        MountTarget {
            dir: scratch_dir(),
            header: HeaderTarget::new(),
        }
    }
}

impl Target for MountTarget {
    fn seeds(&self) -> &[Vec<u8>] {
        &self.header.seeds
    }

    fn tokens(&self) -> &[Vec<u8>] {
        &self.header.tokens
    }

    fn restructure(&self, seed: &[u8], picks: &mut Picks) -> Option<Vec<u8>> {
        restructure_safetensors(seed, picks)
    }

    fn run(&self, input: &[u8]) -> Result<Outcome, String> {
        let file = self.dir.path().join("model.safetensors");
        fs::write(&file, input).map_err(|e| e.to_string())?;
        let Ok(index) = mount_safetensors(std::slice::from_ref(&file)) else {
            return Ok(Outcome::Refused);
        };
        serve_and_check(&index, self.dir.path(), input.len() % 2 == 0)
    }
}

/// Shard headers built by the writer are parsed back as they were built (a round trip the
/// fuzzer's seeds rely on).
pub fn built_header_round_trips() -> Result<(), String> {
    let shapes: [&[u64]; 3] = [&[3, 5], &[], &[0, 2]];
    let tensors: Vec<ShardTensor> = ["x", "y", "z"]
        .iter()
        .zip(shapes)
        .map(|(name, shape)| ShardTensor {
            name,
            dtype: DType::F16,
            shape,
        })
        .collect();
    let layout = build_shard_header(&tensors).map_err(|e| e.to_string())?;
    let header = parse_header(&layout.header, layout.file_len, Path::new("x.safetensors"))
        .map_err(|e| e.to_string())?;
    check_header(&header, &layout.header, layout.file_len)
}

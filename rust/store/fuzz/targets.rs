//! The fuzz targets: what each one runs on an input, and the promises it checks when the
//! input is accepted (a panic is a failure too): bounds, sizes, bytes served equal to the
//! file's bytes, `verify()` agreeing with the checksums of what `get` served.

#![allow(dead_code)] // each includer uses its own part

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use bigmodel_store::codec::{check_frame_header, checksum, compress, decompress_into};
use bigmodel_store::dtype::byte_size;
use bigmodel_store::mount::{mount_offload_folder, mount_safetensors};
use bigmodel_store::safetensors::{build_shard_header, parse_header, Header, ShardTensor};
use bigmodel_store::writer::{StoreWriter, TensorPlan, WriterOptions};
use bigmodel_store::{Codec, DType, Entry, Index, Store, StoreError, StoreOptions};

use crate::engine::{signature, Rng, Target};

/// Errors only a bug produces: a panic the store caught and reported.
fn check_no_internal_error(error: &StoreError) -> Result<(), String> {
    let text = error.to_string();
    match text.contains("internal error") {
        true => Err(format!("a read panicked inside the store: {text}")),
        false => Ok(()),
    }
}

/// A directory for a target's files: in memory (tmpfs) where the system has one, since
/// stores read their files with direct I/O, which goes to the disk every time (and first
/// writes back what a target just wrote): a memory file system keeps executions fast.
fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temporary directory")
}

// -- Serving an accepted index -------------------------------------------------------------

/// Serves `index` and reads every tensor. Checks what a reader relies on: the served length
/// is the recorded one; for uncompressed tensors of non-mounted files, the bytes are the
/// file's bytes; and `verify()` lists exactly the tensors whose served bytes do not match
/// their checksum (a tensor that cannot be served may or may not be listed).
fn serve_and_check(index: &Index, root: &Path, zero_copy: bool) -> Result<String, String> {
    let options = StoreOptions {
        read_threads: 0,
        zero_copy,
        ..StoreOptions::default()
    };
    let store = match Store::from_index(index.clone(), root.to_owned(), options) {
        Ok(store) => store,
        Err(e) => {
            check_no_internal_error(&e)?;
            return Ok(signature("serve", &e));
        }
    };
    let mut must_fail_verify = Vec::new();
    let mut must_pass_verify = Vec::new();
    for entry in &index.tensors {
        let bytes = match store.get(&entry.name) {
            Ok(bytes) => bytes,
            Err(e) => {
                check_no_internal_error(&e)?;
                continue;
            }
        };
        if bytes.len() as u64 != entry.raw_length {
            return Err(format!("{:?}: served {} bytes", entry.name, bytes.len()));
        }
        if entry.codec == Codec::None {
            let file = index.file_path(root, entry.file);
            let on_disk = fs::read(&file).map_err(|e| e.to_string())?;
            let range = entry.offset as usize..(entry.offset + entry.length) as usize;
            if on_disk[range] != *bytes.as_slice() {
                return Err(format!(
                    "{:?}: served bytes differ from the file",
                    entry.name
                ));
            }
        }
        match entry.checksum {
            Some(sum) if sum == checksum(bytes.as_slice()) => must_pass_verify.push(&entry.name),
            Some(_) => must_fail_verify.push(&entry.name),
            None => {}
        }
    }
    let failing = store.verify().map_err(|e| format!("verify failed: {e}"))?;
    for name in must_fail_verify {
        if !failing.contains(name) {
            return Err(format!(
                "{name:?}: wrong checksum served but verify() passes it"
            ));
        }
    }
    for name in must_pass_verify {
        if failing.contains(name) {
            return Err(format!(
                "{name:?}: right bytes served but verify() fails it"
            ));
        }
    }
    Ok("valid".to_owned())
}

/// What `Index::validate` promises, checked independently on an accepted index.
fn check_validated(index: &Index) -> Result<(), String> {
    let mut names = HashSet::new();
    for entry in &index.tensors {
        if !names.insert(&entry.name) {
            return Err(format!("{:?} accepted twice", entry.name));
        }
        let record = index
            .files
            .get(entry.file)
            .ok_or("file position out of range")?;
        let end = entry
            .offset
            .checked_add(entry.length)
            .ok_or("offset overflow accepted")?;
        if end > record.size {
            return Err(format!(
                "{:?} accepted past the end of its file",
                entry.name
            ));
        }
        if byte_size(entry.dtype, &entry.shape) != Some(entry.raw_length) {
            return Err(format!("{:?} accepted with a wrong raw length", entry.name));
        }
        if !record.mounted && (record.path.contains('/') || record.path == "..") {
            return Err(format!("{:?} accepted outside the store", record.path));
        }
    }
    Ok(())
}

// -- Targets -------------------------------------------------------------------------------

/// The store index: parse, validate against a real store, then serve and read.
pub struct IndexTarget {
    store: tempfile::TempDir,
    base: Index,
    seeds: Vec<Vec<u8>>,
    numbers: Vec<Vec<u8>>,
}

impl IndexTarget {
    pub fn new() -> IndexTarget {
        let store = scratch_dir();
        let written = write_fixture_store(store.path());
        let mut seeds = vec![
            serde_json::to_vec_pretty(&written).expect("index serializes"),
            serde_json::to_vec(&written).expect("index serializes"),
        ];
        // The same data files served as a mount: absolute paths with sizes and mtimes.
        let files: Vec<PathBuf> = written
            .files
            .iter()
            .filter(|f| f.path.ends_with(".safetensors"))
            .map(|f| store.path().join(&f.path))
            .collect();
        let mounted = mount_safetensors(&files).expect("our shards mount");
        seeds.push(serde_json::to_vec(&mounted).expect("index serializes"));
        let numbers = written
            .files
            .iter()
            .map(|f| f.size.to_string().into_bytes())
            .collect();
        IndexTarget {
            store,
            base: written,
            seeds,
            numbers,
        }
    }
}

/// A store with every kind of entry: several shards, a zstd blob, a 0-d and an empty
/// tensor, odd sizes (so alignment gaps exist).
fn write_fixture_store(dir: &Path) -> Index {
    let plan = [
        ("a", DType::F32, vec![4, 4], Codec::None),
        ("b", DType::BF16, vec![3], Codec::None),
        ("s", DType::F64, vec![], Codec::None),
        ("e", DType::F32, vec![0, 3], Codec::None),
        ("z", DType::F32, vec![64], Codec::Zstd),
        ("y", DType::I8, vec![100], Codec::Zstd),
        ("c", DType::U8, vec![7], Codec::None),
    ];
    let plans = plan
        .iter()
        .map(|(name, dtype, shape, codec)| TensorPlan {
            name: (*name).to_owned(),
            dtype: *dtype,
            shape: shape.clone(),
            codec: *codec,
        })
        .collect();
    let options = WriterOptions {
        shard_size: 80,
        ..WriterOptions::default()
    };
    let writer = StoreWriter::create(dir, plans, options).expect("fixture writer");
    for (name, dtype, shape, _) in &plan {
        let len = byte_size(*dtype, shape).expect("small shape") as usize;
        let raw: Vec<u8> = (0..len).map(|i| (i * 7 + name.len()) as u8).collect();
        writer.write(name, &raw).expect("fixture write");
    }
    writer.commit().expect("fixture commit")
}

const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "null",
    "true",
    "false",
    "\"\"",
    "[]",
    "{}",
    "-",
    "\"name\":",
    "\"dtype\":",
    "\"shape\":",
    "\"file\":",
    "\"offset\":",
    "\"length\":",
    "\"codec\":",
    "\"raw_length\":",
    "\"checksum\":",
    "\"mounted\":true,",
    "\"size\":",
    "\"mtime_ns\":",
    "\"path\":",
    "\"zstd\"",
    "\"none\"",
    "\"F32\"",
    "\"BOOL\"",
    "\"F8_E4M3\"",
    "\"I64\"",
    "\"U8\"",
    "\"F17\"",
    "\"..\"",
    "\"/etc/passwd\"",
    "\"a/b\"",
    "\"\\u0000\"",
    "\"data_offsets\":",
    "\"__metadata__\":",
    "\"format\":",
    "\"version\":",
    "\"tensors\":",
    "\"files\":",
    "\"0123456789abcdef\"",
    "\"safetensors_file\":",
    "\"weight_name\":",
    "\"float32\"",
    "\"bfloat16\"",
    "\"bool\"",
    "\"int64\"",
];

fn json_tokens(extra: &[Vec<u8>]) -> Vec<Vec<u8>> {
    JSON_TOKENS
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .chain(extra.iter().cloned())
        .collect()
}

impl Target for IndexTarget {
    fn name(&self) -> &'static str {
        "index"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        self.seeds.clone()
    }

    fn tokens(&self) -> Vec<Vec<u8>> {
        json_tokens(&self.numbers)
    }

    fn structured(&self, rng: &mut Rng) -> Option<Vec<u8>> {
        let mut index = self.base.clone();
        for _ in 0..=rng.below(3) {
            lie_in_index(&mut index, rng);
        }
        serde_json::to_vec(&index).ok()
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        let source = self.store.path().join("fuzzed.index.json");
        let index = match Index::parse(input, &source) {
            Ok(index) => index,
            Err(e) => return Ok(signature("parse", &e)),
        };
        if let Err(e) = index.validate(self.store.path()) {
            return Ok(signature("validate", &e));
        }
        check_validated(&index)?;
        serve_and_check(&index, self.store.path(), input.len() % 2 == 0)
    }
}

/// Changes one thing of a valid index so that it may still validate but no longer tell the
/// truth: a tensor moved onto another's bytes, read with the other codec, given another's
/// checksum, dtype or file; entries removed or swapped.
fn lie_in_index(index: &mut Index, rng: &mut Rng) {
    let count = index.tensors.len();
    if count < 2 {
        return;
    }
    let (at, from) = (rng.below(count), rng.below(count));
    let other = index.tensors[from].clone();
    let file_size = index.files[index.tensors[at].file].size;
    let entry = &mut index.tensors[at];
    match rng.below(9) {
        0 => entry.offset = other.offset,
        1 => entry.offset = (rng.next() % file_size.max(1)) / 64 * 64,
        2 => {
            entry.codec = match entry.codec {
                Codec::None => Codec::Zstd,
                Codec::Zstd => Codec::None,
            };
            if entry.codec == Codec::None {
                entry.length = entry.raw_length;
            }
        }
        3 => entry.file = rng.below(index.files.len()),
        4 => entry.checksum = [None, Some(rng.next()), other.checksum][rng.below(3)],
        5 => {
            // Serve `other`'s bytes under this name: a lie only checksums can expose.
            let name = std::mem::take(&mut entry.name);
            *entry = Entry { name, ..other };
            if from != at {
                index.tensors.remove(from);
            }
        }
        6 => {
            entry.dtype = DType::U8;
            entry.shape = vec![entry.raw_length];
        }
        7 => entry.length = other.length,
        _ => index.tensors.swap(at, from),
    }
}

/// The safetensors header parser, on the bytes of a file's beginning.
pub struct HeaderTarget {
    seeds: Vec<Vec<u8>>,
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
        HeaderTarget { seeds }
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
fn restructure_safetensors(file: &[u8], rng: &mut Rng) -> Option<Vec<u8>> {
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
    let name = names.get(rng.below(names.len()))?.clone();
    let entry = header.get_mut(&name)?.as_object_mut()?;
    let offsets = entry.get("data_offsets")?.as_array()?.clone();
    let (begin, end) = (offsets.first()?.as_u64()?, offsets.get(1)?.as_u64()?);
    let shift = |x: u64, by: i64| x.saturating_add_signed(by);
    match rng.below(6) {
        0 => {
            let by = rng.below(15) as i64 - 7;
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
            let pair = same_size[rng.below(same_size.len())];
            entry.insert("dtype".into(), pair[rng.below(2)].into());
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
            let start = rng.below(data.len() + 1) as u64;
            let len = rng.below(data.len() + 1 - start as usize) as u64;
            let extra = serde_json::json!({"dtype": "U8", "shape": [len], "data_offsets": [start, start + len]});
            header.insert(format!("extra{}", rng.below(4)), extra);
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
    fn name(&self) -> &'static str {
        "shard-header"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        self.seeds.clone()
    }

    fn tokens(&self) -> Vec<Vec<u8>> {
        json_tokens(&[])
    }

    fn structured(&self, rng: &mut Rng) -> Option<Vec<u8>> {
        restructure_safetensors(&self.seeds[rng.below(self.seeds.len())], rng)
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
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
            Ok(_) => "valid".to_owned(),
            Err(e) => signature("header", &e),
        })
    }
}

/// A safetensors file on disk, mounted in place and read: bytes served must be the file's.
pub struct MountTarget {
    dir: tempfile::TempDir,
    seeds: Vec<Vec<u8>>,
}

impl MountTarget {
    pub fn new() -> MountTarget {
        let header = HeaderTarget::new();
        MountTarget {
            dir: scratch_dir(),
            seeds: header.seeds,
        }
    }
}

impl Target for MountTarget {
    fn name(&self) -> &'static str {
        "mount"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        self.seeds.clone()
    }

    fn tokens(&self) -> Vec<Vec<u8>> {
        json_tokens(&[])
    }

    fn structured(&self, rng: &mut Rng) -> Option<Vec<u8>> {
        restructure_safetensors(&self.seeds[rng.below(self.seeds.len())], rng)
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        let file = self.dir.path().join("model.safetensors");
        fs::write(&file, input).map_err(|e| e.to_string())?;
        let index = match mount_safetensors(std::slice::from_ref(&file)) {
            Ok(index) => index,
            Err(e) => return Ok(signature("mount", &e)),
        };
        serve_and_check(&index, self.dir.path(), input.len() % 2 == 0)
    }
}

/// An accelerate offload folder's `index.json`, over two real `.dat` files.
pub struct OffloadTarget {
    dir: tempfile::TempDir,
}

impl OffloadTarget {
    pub fn new() -> OffloadTarget {
        let dir = scratch_dir();
        fs::write(dir.path().join("w.dat"), [7u8; 64]).expect("fixture");
        fs::write(dir.path().join("b.dat"), [9u8; 16]).expect("fixture");
        OffloadTarget { dir }
    }
}

impl Target for OffloadTarget {
    fn name(&self) -> &'static str {
        "offload-index"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        vec![
            br#"{"w": {"dtype": "float32", "shape": [4, 4]}, "b": {"dtype": "float32", "shape": [4]}}"#.to_vec(),
            br#"{"w": {"dtype": "int64", "shape": [8]}, "b": {"dtype": "bool", "shape": [2, 8]}}"#.to_vec(),
        ]
    }

    fn tokens(&self) -> Vec<Vec<u8>> {
        json_tokens(&[b"\"w\"".to_vec(), b"\"b\"".to_vec(), b"\"../w\"".to_vec()])
    }

    fn structured(&self, rng: &mut Rng) -> Option<Vec<u8>> {
        // Mostly sizes that match the `.dat` files (64 and 16 bytes), some that do not.
        const INFOS: &[(&str, &str)] = &[
            ("float32", "[16]"),
            ("float32", "[4, 4]"),
            ("int8", "[64]"),
            ("bool", "[8, 8]"),
            ("float64", "[2]"),
            ("bfloat16", "[8]"),
            ("float16", "[2, 2, 2]"),
            ("uint8", "[16]"),
            ("int64", "[]"),
            ("float32", "[17]"),
            ("complex64", "[8]"),
        ];
        const NAMES: &[&str] = &["w", "b", "x", "../w", "w/b", ""];
        let entries: Vec<String> = (0..=rng.below(3))
            .map(|_| {
                let (dtype, shape) = INFOS[rng.below(INFOS.len())];
                let name = NAMES[rng.below(NAMES.len())];
                format!(r#""{name}": {{"dtype": "{dtype}", "shape": {shape}}}"#)
            })
            .collect();
        Some(format!("{{{}}}", entries.join(", ")).into_bytes())
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        fs::write(self.dir.path().join("index.json"), input).map_err(|e| e.to_string())?;
        let index = match mount_offload_folder(self.dir.path()) {
            Ok(index) => index,
            Err(e) => return Ok(signature("offload", &e)),
        };
        serve_and_check(&index, self.dir.path(), input.len() % 2 == 0)
    }
}

/// One zstd frame and the raw length an index records for it (the input's first 4 bytes,
/// little endian, below 1 MiB): decoded into exactly that many bytes or refused.
pub struct ZstdTarget;

impl ZstdTarget {
    fn framed(raw_length: u32, frame: &[u8]) -> Vec<u8> {
        let mut input = raw_length.to_le_bytes().to_vec();
        input.extend_from_slice(frame);
        input
    }
}

impl Target for ZstdTarget {
    fn name(&self) -> &'static str {
        "zstd-frame"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let raw: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let without_size = {
            let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
            std::io::Write::write_all(&mut encoder, &raw).expect("encode");
            encoder.finish().expect("encode")
        };
        vec![
            Self::framed(3000, &compress(&raw, 3).expect("compress")),
            Self::framed(3000, &without_size),
            Self::framed(0, &compress(&[], 3).expect("compress")),
            Self::framed(8, &compress(&[1; 8], 19).expect("compress")),
        ]
    }

    fn tokens(&self) -> Vec<Vec<u8>> {
        vec![b"\x28\xb5\x2f\xfd".to_vec(), vec![0; 4], vec![0xff; 4]]
    }

    fn run(&self, input: &[u8]) -> Result<String, String> {
        let Some((length, frame)) = input.split_first_chunk::<4>() else {
            return Ok("short".to_owned());
        };
        let raw_length = u32::from_le_bytes(*length) % (1 << 20);
        let (path, tensor) = (Path::new("blob.bin"), "t");
        if let Err(e) = check_frame_header(frame, raw_length.into(), path, tensor) {
            return Ok(signature("frame-header", &e));
        }
        let mut out = vec![0u8; raw_length as usize];
        if let Err(e) = decompress_into(frame, &mut out, path, tensor) {
            return Ok(signature("decode", &e));
        }
        // An independent decoder (streaming, bounded) must agree on what the frame holds.
        let mut reference = Vec::new();
        let decoded = zstd::stream::read::Decoder::new(frame).and_then(|decoder| {
            std::io::Read::read_to_end(
                &mut std::io::Read::take(decoder.single_frame(), u64::from(raw_length) + 1),
                &mut reference,
            )
        });
        match decoded {
            Ok(_) if reference == out => Ok("valid".to_owned()),
            _ => Err("accepted a frame the streaming decoder decodes otherwise".to_owned()),
        }
    }
}

/// Every target, for the example's `--target all` and the tests.
pub fn all_targets() -> Vec<Box<dyn Target>> {
    vec![
        Box::new(IndexTarget::new()),
        Box::new(HeaderTarget::new()),
        Box::new(MountTarget::new()),
        Box::new(OffloadTarget::new()),
        Box::new(ZstdTarget),
    ]
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

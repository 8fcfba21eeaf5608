//! A mutation fuzzer for the store's parsers that runs on stable Rust.
//!
//! Shared (through `#[path]`) by `tests/robust_fuzz.rs`, which runs every target for about a
//! second inside `cargo test`, and `examples/fuzz_store.rs`, for long runs. The engine is the
//! classic loop: take an input from the corpus, apply a few random mutations (bit flips,
//! interesting bytes and numbers, dictionary tokens, deletions, duplications, splices),
//! run the target, and keep the input when its outcome is new. The "outcome" is the error
//! message with numbers and quoted names blanked (or "valid"): a cheap stand-in for
//! coverage that still steers the corpus toward every distinct rejection path.
//!
//! A target fails an input when it panics, or when an accepted input breaks a promise a
//! reader relies on (bounds, sizes, bytes served equal to the file's bytes, `verify()`
//! agreeing with the checksums of what `get` served).

#![allow(dead_code)] // the test and the example each use their own part

use std::cell::Cell;
use std::collections::HashSet;
use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use bigmodel_store::codec::{check_frame_header, checksum, compress, decompress_into};
use bigmodel_store::dtype::byte_size;
use bigmodel_store::mount::{mount_offload_folder, mount_safetensors};
use bigmodel_store::safetensors::{build_shard_header, parse_header, Header, ShardTensor};
use bigmodel_store::writer::{StoreWriter, TensorPlan, WriterOptions};
use bigmodel_store::{Codec, DType, Entry, Index, Store, StoreError, StoreOptions};

/// Inputs never grow past this (mutations that would are cut back).
const MAX_INPUT: usize = 1 << 16;
/// The corpus stops growing here; mutation continues from what it holds.
const MAX_CORPUS: usize = 4096;

/// splitmix64: fast, and good enough to drive mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One thing to fuzz: its seed inputs, its dictionary, and how to run an input.
pub trait Target {
    fn name(&self) -> &'static str;
    fn seeds(&self) -> Vec<Vec<u8>>;
    /// Byte strings worth inserting (JSON syntax, field names, dtype names, numbers).
    fn tokens(&self) -> Vec<Vec<u8>>;
    /// The outcome's signature, or `Err` describing a broken promise.
    fn run(&self, input: &[u8]) -> Result<String, String>;
    /// A structure-aware input (a valid document with a few fields changed): reaches the
    /// paths behind validation far more often than byte mutations do. None by default.
    fn structured(&self, _rng: &mut Rng) -> Option<Vec<u8>> {
        None
    }
}

/// A failing input and what went wrong.
pub struct Failure {
    pub input: Vec<u8>,
    pub message: String,
}

pub struct Report {
    pub target: &'static str,
    pub executions: u64,
    /// Executions whose input was accepted all the way (parsed, validated, served).
    pub accepted: u64,
    pub failures: Vec<Failure>,
    pub corpus: usize,
    pub outcomes: usize,
    pub elapsed: Duration,
}

/// Stops at whichever comes first.
#[derive(Clone, Copy)]
pub struct Budget {
    pub executions: u64,
    pub time: Duration,
}

/// Runs `target` from its seeds until the budget is spent.
pub fn fuzz(target: &dyn Target, budget: Budget, seed: u64) -> Report {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let tokens = target.tokens();
    let mut corpus = target.seeds();
    let mut outcomes = HashSet::new();
    let mut report = Report {
        target: target.name(),
        executions: 0,
        accepted: 0,
        failures: Vec::new(),
        corpus: 0,
        outcomes: 0,
        elapsed: Duration::ZERO,
    };
    for input in corpus.clone() {
        execute(target, input, &mut outcomes, &mut report);
    }
    while report.executions < budget.executions && started.elapsed() < budget.time {
        let structured = match rng.below(2) {
            0 => target.structured(&mut rng),
            _ => None,
        };
        let child = structured.unwrap_or_else(|| {
            let parent = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())];
            mutate(parent, other, &tokens, &mut rng)
        });
        if let Some(new) = execute(target, child, &mut outcomes, &mut report) {
            if corpus.len() < MAX_CORPUS {
                corpus.push(new);
            }
        }
    }
    report.corpus = corpus.len();
    report.outcomes = outcomes.len();
    report.elapsed = started.elapsed();
    report
}

/// Runs one input; returns it back when its outcome was never seen before.
fn execute(
    target: &dyn Target,
    input: Vec<u8>,
    outcomes: &mut HashSet<String>,
    report: &mut Report,
) -> Option<Vec<u8>> {
    report.executions += 1;
    let outcome = quietly(|| target.run(&input));
    match outcome {
        Ok(signature) => {
            report.accepted += u64::from(signature == "valid");
            outcomes.insert(signature).then_some(input)
        }
        Err(message) => {
            report.failures.push(Failure { input, message });
            None
        }
    }
}

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic into `Err` without printing it (the default hook would print
/// every caught panic); panics elsewhere in the process still print as usual.
pub fn quietly(f: impl FnOnce() -> Result<String, String>) -> Result<String, String> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    outcome.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        Err(format!("panicked: {message}"))
    })
}

// -- Mutations -----------------------------------------------------------------------------

const INTERESTING_BYTES: &[u8] = b"\x00\x01\x7f\x80\xff\"\\{}[],:-0123456789 .eE";
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "-0",
    "2",
    "7",
    "63",
    "64",
    "65",
    "128",
    "4095",
    "4096",
    "65536",
    "100000000",
    "100000001",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551552",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "0.5",
    "1e2",
];

/// A child of `parent`: one to four stacked mutations, `other` as a splice partner.
pub fn mutate(parent: &[u8], other: &[u8], tokens: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut data = parent.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(10) {
            0 => flip_bit(&mut data, rng),
            1 => set_interesting_byte(&mut data, rng),
            2 => delete_range(&mut data, rng),
            3 => duplicate_range(&mut data, rng),
            4 => insert_token(&mut data, tokens, rng),
            5 | 6 => replace_number(&mut data, rng),
            7 => data.truncate(rng.below(data.len() + 1)),
            8 => splice(&mut data, other, rng),
            _ => overwrite_length_field(&mut data, rng),
        }
    }
    data.truncate(MAX_INPUT);
    data
}

fn flip_bit(data: &mut [u8], rng: &mut Rng) {
    if !data.is_empty() {
        let at = rng.below(data.len());
        data[at] ^= 1 << rng.below(8);
    }
}

fn set_interesting_byte(data: &mut [u8], rng: &mut Rng) {
    if !data.is_empty() {
        let at = rng.below(data.len());
        data[at] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
    }
}

fn delete_range(data: &mut Vec<u8>, rng: &mut Rng) {
    let start = rng.below(data.len() + 1);
    let end = (start + 1 + rng.below(16)).min(data.len());
    data.drain(start..end.max(start));
}

fn duplicate_range(data: &mut Vec<u8>, rng: &mut Rng) {
    let start = rng.below(data.len() + 1);
    let end = (start + 1 + rng.below(64)).min(data.len());
    let copy: Vec<u8> = data[start..end.max(start)].to_vec();
    let at = rng.below(data.len() + 1);
    data.splice(at..at, copy);
}

fn insert_token(data: &mut Vec<u8>, tokens: &[Vec<u8>], rng: &mut Rng) {
    if tokens.is_empty() {
        return;
    }
    let token = &tokens[rng.below(tokens.len())];
    let at = rng.below(data.len() + 1);
    data.splice(at..at, token.iter().copied());
}

/// Replaces the digits of a number found from a random position with another number.
fn replace_number(data: &mut Vec<u8>, rng: &mut Rng) {
    let from = rng.below(data.len() + 1);
    let Some(start) = data[from..]
        .iter()
        .position(u8::is_ascii_digit)
        .map(|p| p + from)
    else {
        return;
    };
    let end = data[start..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+')))
        .map_or(data.len(), |p| p + start);
    let number = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
    data.splice(start..end, number.bytes());
}

fn splice(data: &mut Vec<u8>, other: &[u8], rng: &mut Rng) {
    let cut = rng.below(data.len() + 1);
    let from = rng.below(other.len() + 1);
    data.truncate(cut);
    data.extend_from_slice(&other[from..]);
}

/// A safetensors length field (the first 8 bytes) set near the truth or to an extreme.
fn overwrite_length_field(data: &mut [u8], rng: &mut Rng) {
    if data.len() < 8 {
        return;
    }
    let truth = (data.len() - 8) as u64;
    let candidates = [
        0,
        truth,
        truth.wrapping_sub(1),
        truth + 1,
        truth.wrapping_sub(rng.below(64) as u64),
        100_000_001,
        u64::MAX,
        u64::MAX - 7,
        rng.next(),
    ];
    let value = candidates[rng.below(candidates.len())];
    data[..8].copy_from_slice(&value.to_le_bytes());
}

// -- Outcome signatures --------------------------------------------------------------------

/// The shape of an error message: kind, with numbers and quoted strings blanked, so that
/// "offset 64 past 60" and "offset 128 past 120" are one outcome.
pub fn signature(kind: &str, error: &StoreError) -> String {
    let variant = match error {
        StoreError::NotFound { .. } => "not-found",
        StoreError::Corrupt { .. } => "corrupt",
        StoreError::Incomplete { .. } => "incomplete",
        StoreError::Format { .. } => "format",
        StoreError::InvalidArgument(_) => "argument",
        StoreError::Io { .. } => "io",
    };
    let mut shape = String::new();
    let mut in_quotes = false;
    for c in error.to_string().chars().take(160) {
        match c {
            '"' | '`' => in_quotes = !in_quotes,
            _ if in_quotes => {}
            '0'..='9' => {
                if !shape.ends_with('#') {
                    shape.push('#');
                }
            }
            _ => shape.push(c),
        }
    }
    format!("{kind}/{variant}/{shape}")
}

/// Errors only a bug produces: a panic the store caught and reported.
fn check_no_internal_error(error: &StoreError) -> Result<(), String> {
    let text = error.to_string();
    match text.contains("internal error") {
        true => Err(format!("a read panicked inside the store: {text}")),
        false => Ok(()),
    }
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
        let store = tempfile::tempdir().expect("temporary directory");
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
        let store = tempfile::tempdir().expect("temporary directory");
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
            dir: tempfile::tempdir().expect("temporary directory"),
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
        let dir = tempfile::tempdir().expect("temporary directory");
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

/// `input` as printable text (escapes for everything else), for failure reports.
pub fn printable(input: &[u8]) -> String {
    input.escape_ascii().to_string()
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

//! The `index` target: an index document, validated against a real store, then served.

use std::path::{Path, PathBuf};

use bigmodel_store::dtype::byte_size;
use bigmodel_store::mount::mount_safetensors;
use bigmodel_store::writer::{StoreWriter, TensorPlan, WriterOptions};
use bigmodel_store::{Codec, DType, Entry, Index};

use super::serve::{check_validated, serve_and_check};
use super::{scratch_dir, Outcome, Picks, Target};

/// The store index: parse, validate against a real store, then serve and read.
pub struct IndexTarget {
    store: tempfile::TempDir,
    seeds: Vec<Vec<u8>>,
    tokens: Vec<Vec<u8>>,
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
        let sizes: Vec<Vec<u8>> = written
            .files
            .iter()
            .map(|f| f.size.to_string().into_bytes())
            .collect();
        IndexTarget {
            store,
            seeds,
            tokens: json_tokens(&sizes),
        }
    }
}

/// A store with every kind of entry: several shards, a zstd blob, a 0-d and an empty
/// tensor, odd sizes (so alignment gaps exist).
pub fn write_fixture_store(dir: &Path) -> Index {
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

pub fn json_tokens(extra: &[Vec<u8>]) -> Vec<Vec<u8>> {
    JSON_TOKENS
        .iter()
        .map(|t| t.as_bytes().to_vec())
        .chain(extra.iter().cloned())
        .collect()
}

impl Target for IndexTarget {
    fn seeds(&self) -> &[Vec<u8>] {
        &self.seeds
    }

    fn tokens(&self) -> &[Vec<u8>] {
        &self.tokens
    }

    fn restructure(&self, seed: &[u8], picks: &mut Picks) -> Option<Vec<u8>> {
        let mut index = Index::parse(seed, Path::new("seed.json")).ok()?;
        lie_in_index(&mut index, picks);
        serde_json::to_vec(&index).ok()
    }

    fn run(&self, input: &[u8]) -> Result<Outcome, String> {
        let source = self.store.path().join("fuzzed.index.json");
        let Ok(index) = Index::parse(input, &source) else {
            return Ok(Outcome::Refused);
        };
        if index.validate(self.store.path()).is_err() {
            return Ok(Outcome::Refused);
        }
        check_validated(&index)?;
        serve_and_check(&index, self.store.path(), input.len() % 2 == 0)
    }
}

/// Changes one thing of a valid index so that it may still validate but no longer tell the
/// truth: a tensor moved onto another's bytes, read with the other codec, given another's
/// checksum, dtype or file; entries removed or swapped.
fn lie_in_index(index: &mut Index, picks: &mut Picks) {
    let count = index.tensors.len();
    if count < 2 {
        return;
    }
    let (at, from) = (picks.below(count), picks.below(count));
    let other = index.tensors[from].clone();
    // The document may be an edited one: its file positions are not checked yet.
    let file_size = index
        .files
        .get(index.tensors[at].file)
        .map_or(0, |f| f.size);
    let entry = &mut index.tensors[at];
    match picks.below(9) {
        0 => entry.offset = other.offset,
        1 => entry.offset = (picks.value() % file_size.max(1)) / 64 * 64,
        2 => {
            entry.codec = match entry.codec {
                Codec::None => Codec::Zstd,
                Codec::Zstd => Codec::None,
            };
            if entry.codec == Codec::None {
                entry.length = entry.raw_length;
            }
        }
        3 => entry.file = picks.below(index.files.len()),
        4 => entry.checksum = [None, Some(picks.value()), other.checksum][picks.below(3)],
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

//! Names of the files a writer puts in a store directory.
//!
//! Every write gets a fresh generation token `<gen>` (16 lowercase hex digits), so a new
//! write never touches the files the committed index points to:
//! - `<gen>-shard-00000.safetensors`, `<gen>-zstd-00000.bin`: committed data files;
//! - `.tmp-<gen>-<suffix>`: the same files (and the index) before their rename;
//! - `.tmp-<gen>.lock`: held with `flock` while the writer lives (see [`crate::cleanup`]).

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Result, StoreError};

const TEMP_PREFIX: &str = ".tmp-";
const LOCK_SUFFIX: &str = ".lock";
const GEN_LEN: usize = 16;

/// A fresh generation token: 16 hex digits, unique across processes and threads in practice
/// (time, pid and a counter are hashed); the writer's exclusive lock-file creation catches
/// the remaining chance of a clash.
pub fn new_generation() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = format!(
        "{nanos}:{}:{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()))
}

/// The committed name of data file `n` of a generation: `<gen>-shard-00000.safetensors`.
pub fn shard_file_name(gen: &str, n: usize) -> String {
    format!("{gen}-shard-{n:05}.safetensors")
}

/// The committed name of zstd blob file `n` of a generation: `<gen>-zstd-00000.bin`.
pub fn blob_file_name(gen: &str, n: usize) -> String {
    format!("{gen}-zstd-{n:05}.bin")
}

/// The name a file of generation `gen` has before its rename: `.tmp-<gen>-<suffix>`, where
/// `suffix` is a committed name without its `<gen>-` prefix, or the index file name.
pub fn temp_file_name(gen: &str, suffix: &str) -> String {
    format!("{TEMP_PREFIX}{gen}-{suffix}")
}

/// The temporary name of a committed data file name (`<gen>-x` -> `.tmp-<gen>-x`).
pub fn temp_name_of(final_name: &str) -> String {
    format!("{TEMP_PREFIX}{final_name}")
}

/// The liveness lock of the writer of generation `gen`: `.tmp-<gen>.lock`.
pub(crate) fn lock_file_name(gen: &str) -> String {
    format!("{TEMP_PREFIX}{gen}{LOCK_SUFFIX}")
}

/// What a directory entry is to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreFile {
    /// A committed data file (shard or zstd blob) of generation `gen`.
    Data { gen: String },
    /// A file of generation `gen` not yet renamed (data or index).
    Temp { gen: String },
    /// The liveness lock of the writer of generation `gen`.
    Lock { gen: String },
}

impl StoreFile {
    pub(crate) fn generation(&self) -> &str {
        match self {
            StoreFile::Data { gen } | StoreFile::Temp { gen } | StoreFile::Lock { gen } => gen,
        }
    }
}

/// Classifies a file name; `None` for anything a writer did not create (user files stay).
pub fn classify(name: &str) -> Option<StoreFile> {
    if let Some(rest) = name.strip_prefix(TEMP_PREFIX) {
        let gen = leading_generation(rest)?;
        return match &rest[GEN_LEN..] {
            LOCK_SUFFIX => Some(StoreFile::Lock { gen }),
            tail if tail.starts_with('-') && tail.len() > 1 => Some(StoreFile::Temp { gen }),
            _ => None,
        };
    }
    let gen = leading_generation(name)?;
    let tail = &name[GEN_LEN..];
    let numbered = |prefix: &str, ext: &str| {
        tail.strip_prefix(prefix)
            .and_then(|t| t.strip_suffix(ext))
            .is_some_and(|digits| digits.len() >= 5 && digits.bytes().all(|b| b.is_ascii_digit()))
    };
    (numbered("-shard-", ".safetensors") || numbered("-zstd-", ".bin"))
        .then_some(StoreFile::Data { gen })
}

fn leading_generation(name: &str) -> Option<String> {
    let gen = name.get(..GEN_LEN)?;
    gen.bytes()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        .then(|| gen.to_owned())
}

/// Names in `dir` that an uncommitted or crashed writer left (sorted). With no committed
/// index, any of them means the directory is an incomplete store rather than no store.
pub fn leftover_files(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = list_dir(dir)?
        .into_iter()
        .filter(|name| classify(name).is_some())
        .collect();
    names.sort();
    Ok(names)
}

pub(crate) fn list_dir(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for item in fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
        let item = item.map_err(|e| StoreError::io(dir, e))?;
        // A name that is not UTF-8 was not written by us: skip it.
        if let Ok(name) = item.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn classifies_only_writer_files() {
        let gen = new_generation();
        let data = |g: &str| Some(StoreFile::Data { gen: g.to_owned() });
        assert_eq!(classify(&shard_file_name(&gen, 3)), data(&gen));
        assert_eq!(classify(&blob_file_name(&gen, 12)), data(&gen));
        let temp = temp_name_of(&shard_file_name(&gen, 0));
        assert_eq!(classify(&temp), Some(StoreFile::Temp { gen: gen.clone() }));
        let index_temp = temp_file_name(&gen, "bigmodel.index.json");
        assert_eq!(
            classify(&index_temp),
            Some(StoreFile::Temp { gen: gen.clone() })
        );
        let lock = format!(".tmp-{gen}.lock");
        assert_eq!(classify(&lock), Some(StoreFile::Lock { gen: gen.clone() }));
        for foreign in [
            "model.safetensors",
            "bigmodel.index.json",
            ".tmp-foo",
            "0123456789ABCDEF-shard-00000.safetensors",
            "0123456789abcdef-shard-0.safetensors",
            "0123456789abcdef-shard-0000x.safetensors",
            ".tmp-0123456789abcdef-",
            ".tmp-0123456789abcdefx",
        ] {
            assert_eq!(classify(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn generations_are_unique() {
        let gens: HashSet<String> = (0..1000).map(|_| new_generation()).collect();
        assert_eq!(gens.len(), 1000);
    }
}

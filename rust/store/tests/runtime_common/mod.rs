//! Hand-built stores for the runtime tests: raw files with tensors at known offsets and an
//! index built in memory, served with `Store::from_index` (independent of the writer).

#![allow(dead_code)] // each test crate uses its own part of these helpers

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bigmodel_store::codec::{checksum, compress};
use bigmodel_store::{Codec, DType, Entry, FileRecord, Index, Store, StoreOptions};

/// How a test tensor is stored, hence served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Uncompressed at a 64-aligned offset of a store file: a zero-copy view.
    View,
    /// A zstd frame in a blob file: decoded into an owned buffer.
    Zstd,
    /// Uncompressed F32 at an offset that is not a multiple of 4, in a mounted file:
    /// copied into an owned buffer.
    Misaligned,
}

/// One tensor to build: name, F32 element count, kind.
pub struct Spec<'a>(pub &'a str, pub usize, pub Kind);

pub struct Built {
    pub dir: tempfile::TempDir,
    pub index: Index,
    /// Expected raw bytes by name.
    pub data: HashMap<String, Vec<u8>>,
}

impl Built {
    pub fn open(&self, options: StoreOptions) -> Store {
        Store::from_index(self.index.clone(), self.dir.path().to_owned(), options)
            .expect("hand-built index is valid")
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The stored size of tensor `name` in bytes.
    pub fn nbytes(&self, name: &str) -> u64 {
        self.data[name].len() as u64
    }
}

/// Deterministic, name-dependent bytes, so a mix-up between tensors is caught.
pub fn pattern(name: &str, len: usize) -> Vec<u8> {
    let mut state = checksum(name.as_bytes()) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub const VIEW_FILE: &str = "data.bin";
pub const BLOB_FILE: &str = "blob.bin";
pub const MOUNTED_FILE: &str = "mounted.bin";

/// Writes the three files (views, zstd frames, a mounted file with misaligned tensors) and
/// the index describing them. Tensors follow each other at the next 64-aligned offset
/// (the mounted file: at 64k + 2), so small neighbours share pages.
pub fn build(specs: &[Spec]) -> Built {
    let dir = tempfile::tempdir().unwrap();
    let mut files: [Vec<u8>; 3] = Default::default();
    let mut data = HashMap::new();
    let mut tensors = Vec::new();
    for Spec(name, elements, kind) in specs {
        let raw = pattern(name, elements * 4);
        let (file, stored, codec) = match kind {
            Kind::View => (0, raw.clone(), Codec::None),
            Kind::Zstd => (1, compress(&raw, 1).unwrap(), Codec::Zstd),
            Kind::Misaligned => (2, raw.clone(), Codec::None),
        };
        let offset = place(&mut files[file], &stored, *kind);
        tensors.push(Entry {
            name: name.to_string(),
            dtype: DType::F32,
            shape: vec![*elements as u64],
            file,
            offset,
            length: stored.len() as u64,
            codec,
            raw_length: raw.len() as u64,
            checksum: Some(checksum(&raw)),
        });
        data.insert(name.to_string(), raw);
    }
    let records = write_files(dir.path(), &files);
    Built {
        index: Index::new(records, tensors),
        dir,
        data,
    }
}

fn place(file: &mut Vec<u8>, stored: &[u8], kind: Kind) -> u64 {
    let mut offset = file.len().next_multiple_of(64);
    if kind == Kind::Misaligned {
        offset += 2;
    }
    file.resize(offset, 0xEE);
    file.extend_from_slice(stored);
    offset as u64
}

fn write_files(dir: &Path, files: &[Vec<u8>; 3]) -> Vec<FileRecord> {
    [VIEW_FILE, BLOB_FILE, MOUNTED_FILE]
        .iter()
        .zip(files)
        .map(|(name, bytes)| {
            let path = dir.join(name);
            fs::write(&path, bytes).unwrap();
            let mounted = *name == MOUNTED_FILE;
            FileRecord {
                path: if mounted {
                    path.display().to_string()
                } else {
                    name.to_string()
                },
                mounted,
                size: bytes.len() as u64,
                mtime_ns: mounted.then(|| mtime_ns(&path)),
            }
        })
        .collect()
}

pub fn mtime_ns(path: &Path) -> u64 {
    let meta = fs::metadata(path).unwrap();
    (meta.mtime() * 1_000_000_000 + meta.mtime_nsec()) as u64
}

/// Options with a budget and no verification.
pub fn budget(bytes: u64, read_threads: usize) -> StoreOptions {
    StoreOptions {
        max_resident: Some(bytes),
        read_threads,
        zero_copy: true,
        ..StoreOptions::default()
    }
}

/// Asserts that `get(name)` returns exactly the bytes written for it.
pub fn assert_bytes(store: &Store, built: &Built, name: &str) {
    let bytes = store.get(name).unwrap();
    assert_eq!(bytes.len(), built.data[name].len(), "{name}");
    assert!(
        bytes.as_slice() == built.data[name].as_slice(),
        "{name}: wrong bytes"
    );
}

/// Polls `done` for up to 10 s (background reads finish on their own schedule).
pub fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

//! The store index: one versioned JSON document listing every tensor and every file.
//!
//! ```json
//! {"format": "bigmodel-store", "version": 1,
//!  "files":   [{"path": "shard-3f2a-00000.safetensors", "size": 1234},
//!              {"path": "/ckpt/model.safetensors", "mounted": true, "size": 99, "mtime_ns": 17...}],
//!  "tensors": [{"name": "w", "dtype": "F32", "shape": [2, 3], "file": 0, "offset": 128,
//!               "length": 24, "codec": "none", "raw_length": 24, "checksum": "9a3c...16 hex"}],
//!  "metadata": {}}
//! ```
//! Files the store wrote are plain names inside the store directory; mounted files (a
//! checkpoint served in place) are absolute paths with the size and mtime seen at mount time.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::dtype::{byte_size, DType};
use crate::error::{Result, StoreError};
use crate::layout;

/// The committed index's file name inside a store directory.
pub const INDEX_FILE: &str = "bigmodel.index.json";
/// The value of the `format` field.
pub const FORMAT_NAME: &str = "bigmodel-store";
/// The index version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Every tensor's data starts at a multiple of this many bytes in its file.
pub const ALIGNMENT: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    None,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// A plain file name inside the store directory or, for a mount, an absolute path.
    pub path: String,
    /// True for files bigmodel did not write (served in place, never modified).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mounted: bool,
    /// The file's length when the index was written.
    pub size: u64,
    /// A mounted file's modification time (ns since the epoch) at mount time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtime_ns: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    #[serde(with = "dtype_name")]
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// Position in `Index::files`.
    pub file: usize,
    pub offset: u64,
    /// Bytes stored in the file (the zstd frame's length for compressed tensors).
    pub length: u64,
    pub codec: Codec,
    /// Bytes of the decoded tensor: dtype size × product of the shape.
    pub raw_length: u64,
    /// xxh3-64 of the raw bytes; `None` for mounted tensors nobody has hashed.
    #[serde(default, with = "checksum_hex")]
    pub checksum: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    pub format: String,
    pub version: u32,
    pub files: Vec<FileRecord>,
    pub tensors: Vec<Entry>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

impl Index {
    pub fn new(files: Vec<FileRecord>, tensors: Vec<Entry>) -> Index {
        Index {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            files,
            tensors,
            metadata: BTreeMap::new(),
        }
    }

    /// Where file `file` lives: a mount's absolute path, or the name joined to `store_dir`.
    pub fn file_path(&self, store_dir: &Path, file: usize) -> PathBuf {
        let record = &self.files[file];
        if record.mounted {
            PathBuf::from(&record.path)
        } else {
            store_dir.join(&record.path)
        }
    }
}

mod dtype_name {
    use super::*;

    pub fn serialize<S: Serializer>(dtype: &DType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(dtype.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DType, D::Error> {
        let name = String::deserialize(d)?;
        DType::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown dtype {name:?}")))
    }
}

mod checksum_hex {
    use super::*;

    pub fn serialize<S: Serializer>(sum: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match sum {
            Some(v) => s.serialize_str(&format!("{v:016x}")),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| {
            u64::from_str_radix(&t, 16)
                .map_err(|_| serde::de::Error::custom(format!("checksum {t:?} is not 16 hex digits")))
        })
        .transpose()
    }
}

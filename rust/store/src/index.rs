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
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::dtype::{byte_size, DType};
use crate::error::{Result, StoreError};
use crate::fs::{mtime_ns, open_regular, sync_dir};
use crate::json;
use crate::layout;

/// The committed index's file name inside a store directory.
pub const INDEX_FILE: &str = "bigmodel.index.json";
/// The value of the `format` field.
pub const FORMAT_NAME: &str = "bigmodel-store";
/// The index version this build writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Every tensor's data starts at a multiple of this many bytes in the files a store writes.
pub const ALIGNMENT: u64 = 64;
/// Stores written since direct reads start tensors of this many bytes or more at a multiple
/// of it (the block of a direct read); see `safetensors::tensor_alignment`. Reads do not
/// rely on it: older stores and mounted files are read from the blocks around a tensor.
pub const BLOCK_ALIGNMENT: u64 = 4096;

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

impl FileRecord {
    /// The one check that a file still is the one this record describes, before any of its
    /// bytes are trusted: `Corrupt` when its size differs, or its mtime differs from the
    /// recorded one (a mount's, or the one a reader saw when it opened the file).
    pub fn check_metadata(&self, meta: &fs::Metadata, path: &Path, tensor: &str) -> Result<()> {
        if meta.len() != self.size {
            let detail = format!(
                "the file is {} bytes, the index records {} (truncated or rewritten)",
                meta.len(),
                self.size
            );
            return Err(StoreError::corrupt(path, tensor, detail));
        }
        let mtime = mtime_ns(meta);
        match self.mtime_ns {
            Some(recorded) if recorded != mtime => {
                let detail = match self.mounted {
                    true => format!("the file was modified after it was mounted (mtime {mtime} ns, recorded {recorded} ns); mount it again"),
                    false => format!("the file was modified after the store was opened (mtime {mtime} ns, {recorded} ns at open)"),
                };
                Err(StoreError::corrupt(path, tensor, detail))
            }
            _ => Ok(()),
        }
    }
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

/// The top level of an index document. Entries stay JSON values here so that an error
/// in one of them can name the tensor.
#[derive(Deserialize)]
struct RawIndex {
    files: Vec<Value>,
    tensors: Vec<Value>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

impl Index {
    /// Parses an index document read from `source` (named in every error). Checks the
    /// `format` and `version` first, so a newer store gets a version error rather than a
    /// confusing field error; unknown dtypes and codecs fail here, naming the tensor.
    pub fn parse(bytes: &[u8], source: &Path) -> Result<Index> {
        let doc: Value = json::from_slice(bytes)
            .map_err(|e| StoreError::format(source, format!("the index is not valid JSON: {e}")))?;
        check_format_and_version(&doc, source)?;
        let raw: RawIndex = serde_json::from_value(doc)
            .map_err(|e| StoreError::format(source, format!("bad index: {e}")))?;
        let files = raw
            .files
            .into_iter()
            .enumerate()
            .map(|(i, value)| parse_item(value, source, || format!("file record #{i}")))
            .collect::<Result<_>>()?;
        let tensors = raw
            .tensors
            .into_iter()
            .enumerate()
            .map(|(i, value)| {
                let label = match value.get("name").and_then(Value::as_str) {
                    Some(name) => format!("tensor {name:?}"),
                    None => format!("tensor #{i}"),
                };
                parse_item(value, source, || label)
            })
            .collect::<Result<_>>()?;
        Ok(Index {
            format: FORMAT_NAME.to_owned(),
            version: FORMAT_VERSION,
            files,
            tensors,
            metadata: raw.metadata,
        })
    }

    /// Reads and validates the committed index of the store at `store_dir`. A directory
    /// with leftovers of an uncommitted write but no index is `Incomplete`.
    pub fn read(store_dir: &Path) -> Result<Index> {
        check_store_dir(store_dir)?;
        let index_path = store_dir.join(INDEX_FILE);
        let bytes = match read_index_file(&index_path, "an index file") {
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(missing_index(store_dir, index_path))
            }
            read => read?,
        };
        let index = Index::parse(&bytes, &index_path)?;
        index.validate(store_dir)?;
        Ok(index)
    }

    /// Checks every entry before anything is served: unique names, sizes against dtype ×
    /// shape, safe file names, files present with their recorded size (and a mount's
    /// mtime), bounds, alignment of store-written data, and no overlaps. Errors name the
    /// file and the tensor.
    pub fn validate(&self, store_dir: &Path) -> Result<()> {
        let index_path = store_dir.join(INDEX_FILE);
        if self.format != FORMAT_NAME || self.version != FORMAT_VERSION {
            return Err(StoreError::format(
                &index_path,
                format!(
                    "format {:?} version {} is not {FORMAT_NAME:?} version {FORMAT_VERSION}",
                    self.format, self.version
                ),
            ));
        }
        let mut files = FileChecker::new(self, store_dir, &index_path);
        let mut names = HashSet::with_capacity(self.tensors.len());
        for entry in &self.tensors {
            if !names.insert(entry.name.as_str()) {
                let detail = format!("tensor {:?} is listed twice", entry.name);
                return Err(StoreError::format(&index_path, detail));
            }
            check_sizes(entry, &index_path)?;
            let path = files.check(entry)?;
            check_placement(entry, &self.files[entry.file], &path)?;
        }
        self.check_overlaps(store_dir)
    }

    /// Commits this index into `store_dir`: written under the temporary name of
    /// generation `gen`, flushed, renamed over `bigmodel.index.json`, and the directory
    /// flushed, so a crash leaves either the old index or the new one.
    pub fn write_atomic(&self, store_dir: &Path, gen: &str) -> Result<()> {
        let temp = store_dir.join(layout::temp_file_name(gen, INDEX_FILE));
        let json = serde_json::to_vec_pretty(self).map_err(|e| StoreError::io(&temp, e.into()))?;
        let target = store_dir.join(INDEX_FILE);
        let committed = write_synced(&temp, &json)
            .and_then(|()| fs::rename(&temp, &target).map_err(|e| StoreError::io(&target, e)));
        if committed.is_err() {
            let _ = fs::remove_file(&temp);
        }
        committed?;
        sync_dir(store_dir)
    }

    fn check_overlaps(&self, store_dir: &Path) -> Result<()> {
        // Empty tensors occupy no bytes, so they overlap nothing.
        let mut spans: Vec<(usize, u64, u64, &str)> = self
            .tensors
            .iter()
            .filter(|e| e.length > 0)
            .map(|e| (e.file, e.offset, e.offset + e.length, e.name.as_str()))
            .collect();
        spans.sort_unstable();
        for pair in spans.windows(2) {
            let ((file, start_a, end_a, a), (next_file, start_b, end_b, b)) = (pair[0], pair[1]);
            if file == next_file && end_a > start_b {
                return Err(StoreError::format(
                    self.file_path(store_dir, file),
                    format!(
                        "tensors {a:?} [{start_a}, {end_a}) and {b:?} [{start_b}, {end_b}) overlap"
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn check_format_and_version(doc: &Value, source: &Path) -> Result<()> {
    if !doc.is_object() {
        return Err(StoreError::format(source, "the index is not a JSON object"));
    }
    let format = doc.get("format");
    if format.and_then(Value::as_str) != Some(FORMAT_NAME) {
        let found = format.map_or_else(|| "(missing)".to_owned(), Value::to_string);
        return Err(StoreError::format(
            source,
            format!("not a bigmodel store index: format is {found}, expected {FORMAT_NAME:?}"),
        ));
    }
    match doc.get("version") {
        Some(v) if v.as_u64() == Some(u64::from(FORMAT_VERSION)) => Ok(()),
        version => Err(StoreError::format(
            source,
            format!(
                "index version {} is not supported: this build reads version {FORMAT_VERSION} \
                 (was the store written by a newer bigmodel?)",
                version.map_or_else(|| "(missing)".to_owned(), Value::to_string)
            ),
        )),
    }
}

fn parse_item<T: serde::de::DeserializeOwned>(
    value: Value,
    source: &Path,
    label: impl FnOnce() -> String,
) -> Result<T> {
    serde_json::from_value(value)
        .map_err(|e| StoreError::format(source, format!("{}: {e}", label())))
}

fn check_store_dir(store_dir: &Path) -> Result<()> {
    let meta = fs::metadata(store_dir).map_err(|e| StoreError::io(store_dir, e))?;
    if meta.is_dir() {
        return Ok(());
    }
    Err(StoreError::format(
        store_dir,
        "is a file, not a store directory (a safetensors file is served in place by a mount)",
    ))
}

fn missing_index(store_dir: &Path, index_path: PathBuf) -> StoreError {
    match layout::leftover_files(store_dir) {
        Ok(leftovers) if !leftovers.is_empty() => StoreError::Incomplete {
            path: store_dir.to_owned(),
            detail: format!(
                "no {INDEX_FILE}, but {} file(s) of an uncommitted write ({}{}): a writer \
                 crashed or is still running; write the store again",
                leftovers.len(),
                leftovers[..leftovers.len().min(3)].join(", "),
                if leftovers.len() > 3 { ", ..." } else { "" },
            ),
        },
        Ok(_) => StoreError::io(
            index_path,
            io::Error::new(
                io::ErrorKind::NotFound,
                "no index: this directory is not a bigmodel store",
            ),
        ),
        Err(e) => e,
    }
}

/// No index is anywhere near this large (about 200 bytes per tensor); a larger "index" is
/// refused before it is read, so a wrong file never makes us allocate its size.
pub const MAX_INDEX_LEN: u64 = 1 << 30;

/// The bytes of an index document (ours, or an offload folder's `index.json`): a regular
/// file (a FIFO in its place would block the reader forever) of at most [`MAX_INDEX_LEN`].
pub fn read_index_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    let file = open_regular(path, what)?;
    let len = file.metadata().map_err(|e| StoreError::io(path, e))?.len();
    if len > MAX_INDEX_LEN {
        let detail = format!("{len} bytes is too large for {what} (the limit is {MAX_INDEX_LEN})");
        return Err(StoreError::format(path, detail));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // A file that grows while it is read is cut at the limit (and then fails to parse).
    file.take(MAX_INDEX_LEN)
        .read_to_end(&mut bytes)
        .map_err(|e| StoreError::io(path, e))?;
    Ok(bytes)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = fs::File::create(path).map_err(|e| StoreError::io(path, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| StoreError::io(path, e))
}

fn check_sizes(entry: &Entry, index_path: &Path) -> Result<()> {
    let bad = |detail: String| {
        StoreError::format(index_path, format!("tensor {:?}: {detail}", entry.name))
    };
    let expected = byte_size(entry.dtype, &entry.shape)
        .ok_or_else(|| bad(format!("shape {:?} overflows a 64-bit size", entry.shape)))?;
    if entry.raw_length != expected {
        return Err(bad(format!(
            "raw_length {} but dtype {} shape {:?} needs {expected} bytes",
            entry.raw_length, entry.dtype, entry.shape
        )));
    }
    if entry.codec == Codec::None && entry.length != entry.raw_length {
        return Err(bad(format!(
            "uncompressed but length {} differs from raw_length {}",
            entry.length, entry.raw_length
        )));
    }
    Ok(())
}

fn check_placement(entry: &Entry, record: &FileRecord, path: &Path) -> Result<()> {
    let bad =
        |detail: String| StoreError::format(path, format!("tensor {:?}: {detail}", entry.name));
    let end = entry.offset.checked_add(entry.length).ok_or_else(|| {
        bad(format!(
            "offset {} + length {} overflows",
            entry.offset, entry.length
        ))
    })?;
    if end > record.size {
        return Err(bad(format!(
            "bytes [{}, {end}) run past the end of the file ({} bytes)",
            entry.offset, record.size
        )));
    }
    if !record.mounted && entry.offset % ALIGNMENT != 0 {
        return Err(bad(format!(
            "offset {} is not a multiple of {ALIGNMENT}",
            entry.offset
        )));
    }
    Ok(())
}

/// Checks each file once, when the first tensor that uses it is validated (so the error
/// can name that tensor).
struct FileChecker<'a> {
    index: &'a Index,
    store_dir: &'a Path,
    index_path: &'a Path,
    checked: Vec<bool>,
    canonical_dir: Option<PathBuf>,
}

impl<'a> FileChecker<'a> {
    fn new(index: &'a Index, store_dir: &'a Path, index_path: &'a Path) -> Self {
        FileChecker {
            index,
            store_dir,
            index_path,
            checked: vec![false; index.files.len()],
            canonical_dir: None,
        }
    }

    /// The path of `entry`'s file, after checking the file once.
    fn check(&mut self, entry: &Entry) -> Result<PathBuf> {
        let Some(record) = self.index.files.get(entry.file) else {
            return Err(StoreError::format(
                self.index_path,
                format!(
                    "tensor {:?}: file position {} is out of range (the index lists {} files)",
                    entry.name,
                    entry.file,
                    self.index.files.len()
                ),
            ));
        };
        let path = self.index.file_path(self.store_dir, entry.file);
        if !self.checked[entry.file] {
            self.check_location(record, &path, &entry.name)?;
            check_file_state(record, &path, &entry.name)?;
            self.checked[entry.file] = true;
        }
        Ok(path)
    }

    /// Mounted files are absolute paths; files we wrote are plain names that stay inside
    /// the store directory even through a symlink (an index is data, not code to trust).
    fn check_location(&mut self, record: &FileRecord, path: &Path, tensor: &str) -> Result<()> {
        let index_path = self.index_path;
        let bad = |detail: &str| {
            StoreError::format(
                index_path,
                format!("tensor {tensor:?}: file {:?} {detail}", record.path),
            )
        };
        if record.mounted {
            return match Path::new(&record.path).is_absolute() {
                true => Ok(()),
                false => Err(bad("is mounted but not an absolute path")),
            };
        }
        if !is_plain_name(&record.path) {
            return Err(bad("is not a plain file name inside the store directory"));
        }
        let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
        if is_link && !self.resolves_inside(path) {
            return Err(bad("is a symlink that leads outside the store directory"));
        }
        Ok(())
    }

    fn resolves_inside(&mut self, path: &Path) -> bool {
        if self.canonical_dir.is_none() {
            self.canonical_dir = fs::canonicalize(self.store_dir).ok();
        }
        match (&self.canonical_dir, fs::canonicalize(path)) {
            (Some(dir), Ok(target)) => target.starts_with(dir),
            // A dangling link: reported as a missing file by the next check.
            (Some(_), Err(_)) => true,
            (None, _) => false,
        }
    }
}

fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// The file exists, is a regular file, and matches its record (see
/// [`FileRecord::check_metadata`]).
fn check_file_state(record: &FileRecord, path: &Path, tensor: &str) -> Result<()> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::corrupt(path, tensor, "the file is missing"))
        }
        Err(e) => return Err(StoreError::io(path, e)),
    };
    if !meta.is_file() {
        let detail = format!("tensor {tensor:?}: not a regular file");
        return Err(StoreError::format(path, detail));
    }
    record.check_metadata(&meta, path, tensor)
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
            // Exactly what `serialize` writes: `from_str_radix` alone would also take "+1f".
            let sixteen_hex = t.len() == 16 && t.bytes().all(|b| b.is_ascii_hexdigit());
            sixteen_hex
                .then(|| u64::from_str_radix(&t, 16).ok())
                .flatten()
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("checksum {t:?} is not 16 hex digits"))
                })
        })
        .transpose()
    }
}

//! Indexes over files bigmodel did not write, served in place without a copy: safetensors
//! checkpoints and accelerate's offload folders (`index.json` + one raw `.dat` per tensor).
//! Nothing is written. Each file is recorded by absolute canonical path with the size and
//! mtime seen now, so a reader notices a file changed after the mount.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::cleanup::{remove_stale_files, WriterLock};
use crate::dtype::{byte_size, DType};
use crate::error::{Result, StoreError};
use crate::fs::mtime_ns;
use crate::index::{self, Codec, Entry, FileRecord, Index};
use crate::json;
use crate::layout;
use crate::safetensors::{self, Header};

/// The offload folder's index, inside the folder.
pub const OFFLOAD_INDEX_FILE: &str = "index.json";

/// An index over the tensors of existing safetensors files (a file listed twice is mounted
/// once). A tensor name found in two files is an error naming both; the padding entries
/// of our own shards are skipped.
pub fn mount_safetensors(files: &[PathBuf]) -> Result<Index> {
    let mut mount = Mount::default();
    for path in files {
        let (file, fresh) = mount.add_file(path)?;
        if !fresh {
            continue;
        }
        let header = safetensors::read_header(Path::new(&mount.files[file].path))?;
        for tensor in header.tensors {
            if !safetensors::is_padding(&tensor.name) {
                let name = tensor.name.clone();
                mount.add_entry(name, file, &tensor)?;
            }
        }
    }
    Ok(mount.into_index())
}

/// Commits `index` (of mounted files only) as the store at `dir`, created if needed: a
/// store whose files are served in place. Validated first; replaces, like a writer's
/// commit, whatever store `dir` held.
pub fn write_mount_index(dir: &Path, index: &Index) -> Result<()> {
    if let Some(file) = index.files.iter().find(|f| !f.mounted) {
        return Err(StoreError::InvalidArgument(format!(
            "{}: a mount index may only list mounted files, not {:?}",
            dir.display(),
            file.path
        )));
    }
    fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
    let gen = layout::new_generation();
    // Held so that no concurrent writer's clean-up takes the temporary index for a leftover.
    let _lock = WriterLock::acquire(dir, &gen)?;
    index.validate(dir)?;
    index.write_atomic(dir, &gen)?;
    remove_stale_files(dir, Some(&gen));
    Ok(())
}

#[derive(Deserialize)]
struct DatInfo {
    dtype: String,
    shape: Vec<u64>,
}

#[derive(Deserialize)]
struct SafetensorsRef {
    safetensors_file: PathBuf,
    weight_name: Option<String>,
}

/// An index over an accelerate offload folder: `index.json` maps each name either to
/// `{"dtype": numpy name, "shape": [...]}` with the raw bytes in `<dir>/<name>.dat`, or to
/// `{"safetensors_file": path, "weight_name": key}` (key defaults to the name). Entries
/// keep the stored dtype: a `"dtype"` cast on a safetensors entry is left to the caller.
pub fn mount_offload_folder(dir: &Path) -> Result<Index> {
    let dir = fs::canonicalize(dir).map_err(|e| StoreError::io(dir, e))?;
    let index_path = dir.join(OFFLOAD_INDEX_FILE);
    let bytes = index::read_index_file(&index_path, "an offload index")?;
    let not_an_object = |detail: String| {
        StoreError::format(&index_path, format!("not a JSON object of tensors{detail}"))
    };
    let doc = match json::from_slice(&bytes).map_err(|e| not_an_object(format!(": {e}")))? {
        Value::Object(doc) => doc,
        _ => return Err(not_an_object(String::new())),
    };
    let mut mount = Mount::default();
    let mut headers: HashMap<usize, Header> = HashMap::new();
    for (name, info) in doc {
        let bad =
            |e: serde_json::Error| StoreError::format(&index_path, format!("tensor {name:?}: {e}"));
        if info.get("safetensors_file").is_some() {
            let reference: SafetensorsRef = serde_json::from_value(info).map_err(bad)?;
            mount.add_safetensors_ref(name, reference, &mut headers)?;
        } else {
            let dat: DatInfo = serde_json::from_value(info).map_err(bad)?;
            mount.add_dat(&dir, &index_path, name, dat)?;
        }
    }
    Ok(mount.into_index())
}

/// An index being built: files by canonical path, and which file holds each name.
#[derive(Default)]
struct Mount {
    files: Vec<FileRecord>,
    file_by_path: HashMap<PathBuf, usize>,
    tensors: Vec<Entry>,
    file_of_name: HashMap<String, usize>,
}

impl Mount {
    /// Records `path` (canonical, with size and mtime); returns its position and whether
    /// it is new.
    fn add_file(&mut self, path: &Path) -> Result<(usize, bool)> {
        let canonical = fs::canonicalize(path).map_err(|e| StoreError::io(path, e))?;
        if let Some(&file) = self.file_by_path.get(&canonical) {
            return Ok((file, false));
        }
        let meta = fs::metadata(&canonical).map_err(|e| StoreError::io(&canonical, e))?;
        if !meta.is_file() {
            return Err(StoreError::format(&canonical, "not a regular file"));
        }
        let path_text = canonical.to_str().ok_or_else(|| {
            StoreError::format(
                &canonical,
                "the path is not valid UTF-8 (the index is JSON)",
            )
        })?;
        self.files.push(FileRecord {
            path: path_text.to_owned(),
            mounted: true,
            size: meta.len(),
            mtime_ns: Some(mtime_ns(&meta)),
        });
        self.file_by_path.insert(canonical, self.files.len() - 1);
        Ok((self.files.len() - 1, true))
    }

    /// Adds an uncompressed, unhashed entry for `name` at `tensor`'s place in `file`.
    fn add_entry(
        &mut self,
        name: String,
        file: usize,
        tensor: &safetensors::HeaderEntry,
    ) -> Result<()> {
        if let Some(&first) = self.file_of_name.get(&name) {
            return Err(StoreError::format(
                &self.files[file].path,
                format!(
                    "tensor {name:?} is also in {}: each name may be mounted once",
                    self.files[first].path
                ),
            ));
        }
        self.file_of_name.insert(name.clone(), file);
        self.tensors.push(Entry {
            name,
            dtype: tensor.dtype,
            shape: tensor.shape.clone(),
            file,
            offset: tensor.offset,
            length: tensor.length,
            codec: Codec::None,
            raw_length: tensor.length,
            checksum: None,
        });
        Ok(())
    }

    /// An offload-folder entry pointing into a safetensors file (headers read once).
    fn add_safetensors_ref(
        &mut self,
        name: String,
        reference: SafetensorsRef,
        headers: &mut HashMap<usize, Header>,
    ) -> Result<()> {
        let (file, fresh) = self.add_file(&reference.safetensors_file)?;
        let path = PathBuf::from(&self.files[file].path);
        if fresh {
            headers.insert(file, safetensors::read_header(&path)?);
        }
        let key = reference.weight_name.as_deref().unwrap_or(&name);
        let tensor = headers[&file]
            .tensors
            .iter()
            .find(|t| t.name == key)
            .cloned()
            .ok_or_else(|| {
                StoreError::format(
                    &path,
                    format!("tensor {name:?}: the file has no tensor {key:?}"),
                )
            })?;
        self.add_entry(name, file, &tensor)
    }

    /// An offload-folder entry stored raw in `<dir>/<name>.dat`.
    fn add_dat(&mut self, dir: &Path, index_path: &Path, name: String, dat: DatInfo) -> Result<()> {
        let bad =
            |detail: String| StoreError::format(index_path, format!("tensor {name:?}: {detail}"));
        // accelerate uses names verbatim as file names; refuse any that would leave the folder.
        if name.contains(['/', '\0']) {
            return Err(bad(
                "the name cannot be a file name in the folder".to_owned()
            ));
        }
        let dtype = DType::from_numpy_name(&dat.dtype)
            .ok_or_else(|| bad(format!("unsupported dtype {:?}", dat.dtype)))?;
        // A 0-d tensor is stored as one element, which is exactly what shape [] sizes to.
        let length = byte_size(dtype, &dat.shape)
            .ok_or_else(|| bad(format!("shape {:?} overflows a 64-bit size", dat.shape)))?;
        let (file, _) = self.add_file(&dir.join(format!("{name}.dat")))?;
        let size = self.files[file].size;
        if size != length {
            return Err(StoreError::corrupt(
                &self.files[file].path,
                &name,
                format!(
                    "the file is {size} bytes, dtype {} shape {:?} needs {length}",
                    dat.dtype, dat.shape
                ),
            ));
        }
        let tensor = safetensors::HeaderEntry {
            name: name.clone(),
            dtype,
            shape: dat.shape,
            offset: 0,
            length,
        };
        self.add_entry(name, file, &tensor)
    }

    fn into_index(self) -> Index {
        Index::new(self.files, self.tensors)
    }
}

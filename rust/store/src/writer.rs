//! [`StoreWriter`]: writes a store from a plan, atomically.
//!
//! The plan (names, dtypes, shapes, codecs) is known up front, so every shard's header
//! and every uncompressed tensor's offset are fixed at creation: tensors may then arrive
//! in any order, from several threads, and go straight from the caller's buffer to their
//! place in the file (one positional write, no copy, no per-tensor fsync). Compressed
//! tensors are compressed by the calling thread, outside any lock, and appended as one
//! zstd frame to the current blob file.
//!
//! Files are written under `.tmp-<gen>-...` names; [`StoreWriter::commit`] flushes them,
//! renames them, commits the index, then removes the previous generation. A writer
//! dropped without commit removes its files, and one killed is cleaned by the next.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cleanup::{remove_stale_files, WriterLock};
use crate::codec;
use crate::dtype::{byte_size, DType};
use crate::error::{Result, StoreError};
use crate::fs::sync_dir;
use crate::index::{Codec, Entry, FileRecord, Index, INDEX_FILE};
use crate::layout;
use crate::safetensors::{self, align_up, ShardTensor};

/// One tensor the writer will receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub codec: Codec,
}

/// How the writer lays out files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Most data bytes per shard or blob file; a larger tensor gets a file of its own.
    pub shard_size: u64,
    /// zstd compression level for tensors planned with `Codec::Zstd`.
    pub zstd_level: i32,
}

impl Default for WriterOptions {
    /// 2 GB shards ("2GB" in the Python API is decimal, as in accelerate) and zstd level 3
    /// (zstd's own default: fast, and most of the gain on weights).
    fn default() -> Self {
        WriterOptions {
            shard_size: 2_000_000_000,
            zstd_level: 3,
        }
    }
}

/// Where a planned tensor goes.
#[derive(Debug, Clone, Copy)]
enum Target {
    Shard { shard: usize, offset: u64 },
    Zstd,
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    blob: usize,
    offset: u64,
    length: u64,
}

#[derive(Debug)]
enum SlotState {
    Pending,
    Writing,
    Written { checksum: u64, frame: Option<Frame> },
}

#[derive(Debug)]
struct Slot {
    plan: TensorPlan,
    raw_length: u64,
    target: Target,
    state: Mutex<SlotState>,
}

/// A data file being written: opened under its temporary name.
#[derive(Debug)]
struct DataFile {
    file: Arc<File>,
    final_name: String,
    temp_path: PathBuf,
    /// Bytes reserved so far in a blob file (they grow frame by frame).
    reserved: u64,
}

/// Writes one store generation; see the module docs. `Sync`: call [`StoreWriter::write`]
/// from several threads at once.
#[derive(Debug)]
pub struct StoreWriter {
    dir: PathBuf,
    gen: String,
    zstd_level: i32,
    shard_size: u64,
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    shards: Vec<DataFile>,
    blobs: Mutex<Vec<DataFile>>,
    committed: bool,
    // Dropped after `Drop::drop` removed the files, so no cleaner sees them unlocked.
    _lock: WriterLock,
}

impl StoreWriter {
    /// Starts a write into `dir` (created if needed): checks the plan, removes what dead
    /// writers left, assigns uncompressed tensors to shards and writes their headers.
    pub fn create(dir: &Path, plan: Vec<TensorPlan>, opts: WriterOptions) -> Result<StoreWriter> {
        let raw_lengths = check_plan(&plan, &opts)?;
        fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let gen = layout::new_generation();
        let lock = WriterLock::acquire(dir, &gen)?;
        remove_stale_files(dir, Some(&gen));
        let groups = group_into_shards(&plan, &raw_lengths, opts.shard_size);
        let by_name = plan
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        let slots = plan
            .into_iter()
            .zip(raw_lengths)
            .map(|(plan, raw_length)| Slot {
                plan,
                raw_length,
                // Uncompressed tensors get their shard position in `create_shards`.
                target: Target::Zstd,
                state: Mutex::new(SlotState::Pending),
            })
            .collect();
        let mut writer = StoreWriter {
            dir: dir.to_owned(),
            gen,
            zstd_level: opts.zstd_level,
            shard_size: opts.shard_size,
            slots,
            by_name,
            shards: Vec::with_capacity(groups.len()),
            blobs: Mutex::new(Vec::new()),
            committed: false,
            _lock: lock,
        };
        // On failure the writer drops here and removes the shards already created.
        writer.create_shards(&groups)?;
        Ok(writer)
    }

    /// Stores the raw bytes (C order, the planned dtype) of tensor `name`. Thread-safe;
    /// a failed write may be retried. Unknown names, wrong lengths and second writes are
    /// `InvalidArgument` errors naming the tensor.
    pub fn write(&self, name: &str, raw: &[u8]) -> Result<()> {
        let slot = self.slot(name)?;
        if raw.len() as u64 != slot.raw_length {
            return Err(StoreError::InvalidArgument(format!(
                "tensor {name:?}: got {} bytes, dtype {} shape {:?} needs {}",
                raw.len(),
                slot.plan.dtype,
                slot.plan.shape,
                slot.raw_length
            )));
        }
        claim(slot)?;
        let stored = self.store(slot, raw);
        let mut state = lock(&slot.state);
        match stored {
            Ok((checksum, frame)) => {
                *state = SlotState::Written { checksum, frame };
                Ok(())
            }
            Err(e) => {
                *state = SlotState::Pending;
                Err(e)
            }
        }
    }

    /// Finishes the write: flushes and renames the data files, commits the index, then
    /// removes the previous generation's files. Fails, naming them, when tensors of the
    /// plan were never written (the previous store then stays as it was).
    pub fn commit(mut self) -> Result<Index> {
        self.check_all_written()?;
        let records = self.finish_files()?;
        sync_dir(&self.dir)?;
        let index = Index::new(records, self.entries());
        if let Err(e) = index.write_atomic(&self.dir, &self.gen) {
            // A failure after the rename (flushing the directory) leaves our index in
            // place: its files must then stay, so Drop may not remove them.
            self.committed = committed_index_is(&self.dir, &index);
            return Err(e);
        }
        self.committed = true;
        remove_stale_files(&self.dir, Some(&self.gen));
        Ok(index)
    }

    /// Creates each shard under its temporary name with its header written and its full
    /// length set (tensors are then written in place), and records the tensors' offsets.
    fn create_shards(&mut self, groups: &[Vec<usize>]) -> Result<()> {
        for (shard, members) in groups.iter().enumerate() {
            let tensors: Vec<ShardTensor> = members
                .iter()
                .map(|&i| ShardTensor {
                    name: &self.slots[i].plan.name,
                    dtype: self.slots[i].plan.dtype,
                    shape: &self.slots[i].plan.shape,
                })
                .collect();
            let layout = safetensors::build_shard_header(&tensors)?;
            let data = open_temp(&self.dir, layout::shard_file_name(&self.gen, shard))?;
            // Owned by the writer before anything is written, so Drop removes it on failure.
            self.shards.push(data);
            let data = &self.shards[shard];
            write_at(data, &layout.header, 0)?;
            // Sparse until written: alignment gaps read as zeros without being written.
            data.file
                .set_len(layout.file_len)
                .map_err(|e| StoreError::io(&data.temp_path, e))?;
            for (&slot, offset) in members.iter().zip(layout.offsets) {
                self.slots[slot].target = Target::Shard { shard, offset };
            }
        }
        Ok(())
    }

    /// Flushes every data file and gives it its final name; returns the index records.
    fn finish_files(&self) -> Result<Vec<FileRecord>> {
        let blobs = lock(&self.blobs);
        self.shards
            .iter()
            .chain(blobs.iter())
            .map(|data| finish_file(&self.dir, data))
            .collect()
    }

    /// The generation token of this write (the prefix of its file names).
    pub fn generation(&self) -> &str {
        &self.gen
    }

    fn slot(&self, name: &str) -> Result<&Slot> {
        self.by_name
            .get(name)
            .map(|&i| &self.slots[i])
            .ok_or_else(|| {
                StoreError::InvalidArgument(format!("tensor {name:?} is not in the write plan"))
            })
    }

    /// Writes `raw` to its place; returns its checksum and, if compressed, its frame.
    fn store(&self, slot: &Slot, raw: &[u8]) -> Result<(u64, Option<Frame>)> {
        let checksum = codec::checksum(raw);
        match slot.target {
            Target::Shard { shard, offset } => {
                let data = &self.shards[shard];
                write_at(data, raw, offset)?;
                Ok((checksum, None))
            }
            Target::Zstd => {
                let frame_bytes = codec::compress(raw, self.zstd_level).map_err(|e| {
                    StoreError::InvalidArgument(format!("tensor {:?}: {e}", slot.plan.name))
                })?;
                let (file, temp_path, frame) = self.reserve_frame(frame_bytes.len() as u64)?;
                file.write_all_at(&frame_bytes, frame.offset)
                    .map_err(|e| StoreError::io(temp_path, e))?;
                Ok((checksum, Some(frame)))
            }
        }
    }

    /// Reserves a 64-aligned range for a frame in the current blob file (starting a new
    /// file when this one would pass `shard_size`). Only the reservation is locked: the
    /// frames of two threads are written at the same time.
    fn reserve_frame(&self, length: u64) -> Result<(Arc<File>, PathBuf, Frame)> {
        let mut blobs = lock(&self.blobs);
        let fits = |b: &DataFile| {
            b.reserved == 0
                || align_up(b.reserved)
                    .and_then(|start| start.checked_add(length))
                    .is_some_and(|end| end <= self.shard_size)
        };
        if !blobs.last().is_some_and(fits) {
            let final_name = layout::blob_file_name(&self.gen, blobs.len());
            blobs.push(open_temp(&self.dir, final_name)?);
        }
        let blob = blobs.len() - 1;
        let data = &mut blobs[blob];
        let offset = align_up(data.reserved).expect("checked by `fits`");
        data.reserved = offset + length;
        let frame = Frame {
            blob,
            offset,
            length,
        };
        Ok((Arc::clone(&data.file), data.temp_path.clone(), frame))
    }

    fn check_all_written(&self) -> Result<()> {
        let missing: Vec<&str> = self
            .slots
            .iter()
            .filter(|s| !matches!(*lock(&s.state), SlotState::Written { .. }))
            .map(|s| s.plan.name.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = missing.iter().take(5).map(|n| format!("{n:?}")).collect();
        Err(StoreError::InvalidArgument(format!(
            "cannot commit the store at {}: {} planned tensor(s) were never written: {}{}",
            self.dir.display(),
            missing.len(),
            shown.join(", "),
            if missing.len() > 5 { ", ..." } else { "" }
        )))
    }

    /// Index entries in plan order; blob files follow the shards in the files list.
    fn entries(&self) -> Vec<Entry> {
        self.slots
            .iter()
            .map(|slot| {
                let SlotState::Written { checksum, frame } = *lock(&slot.state) else {
                    unreachable!("commit checked that every tensor was written")
                };
                let (file, offset, length, codec) = match (slot.target, frame) {
                    (Target::Shard { shard, offset }, _) => {
                        (shard, offset, slot.raw_length, Codec::None)
                    }
                    (Target::Zstd, Some(f)) => {
                        (self.shards.len() + f.blob, f.offset, f.length, Codec::Zstd)
                    }
                    (Target::Zstd, None) => unreachable!("compressed tensors record a frame"),
                };
                Entry {
                    name: slot.plan.name.clone(),
                    dtype: slot.plan.dtype,
                    shape: slot.plan.shape.clone(),
                    file,
                    offset,
                    length,
                    codec,
                    raw_length: slot.raw_length,
                    checksum: Some(checksum),
                }
            })
            .collect()
    }
}

impl Drop for StoreWriter {
    /// An uncommitted writer leaves nothing behind, under either name.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let blobs = self.blobs.get_mut().unwrap_or_else(|p| p.into_inner());
        for data in self.shards.iter().chain(blobs.iter()) {
            let _ = fs::remove_file(&data.temp_path);
            let _ = fs::remove_file(self.dir.join(&data.final_name));
        }
        let _ = fs::remove_file(self.dir.join(layout::temp_file_name(&self.gen, INDEX_FILE)));
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves its data
/// consistent, so a panic in another thread does not make it unusable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn committed_index_is(dir: &Path, index: &Index) -> bool {
    let path = dir.join(INDEX_FILE);
    crate::index::read_index_file(&path, "an index file")
        .ok()
        .and_then(|bytes| Index::parse(&bytes, &path).ok())
        .is_some_and(|on_disk| on_disk == *index)
}

/// Marks `slot` as being written; a second write of the same tensor is refused.
fn claim(slot: &Slot) -> Result<()> {
    let mut state = lock(&slot.state);
    match *state {
        SlotState::Pending => {
            *state = SlotState::Writing;
            Ok(())
        }
        _ => Err(StoreError::InvalidArgument(format!(
            "tensor {:?} is written twice",
            slot.plan.name
        ))),
    }
}

/// Checks names and sizes; returns each tensor's raw byte length.
fn check_plan(plan: &[TensorPlan], opts: &WriterOptions) -> Result<Vec<u64>> {
    if opts.shard_size == 0 {
        return Err(StoreError::InvalidArgument(
            "shard_size must be positive".into(),
        ));
    }
    let mut seen = HashSet::with_capacity(plan.len());
    let mut lengths = Vec::with_capacity(plan.len());
    for tensor in plan {
        let bad = |detail: &str| {
            StoreError::InvalidArgument(format!("tensor {:?}: {detail}", tensor.name))
        };
        if !seen.insert(tensor.name.as_str()) {
            return Err(bad("appears twice in the write plan"));
        }
        // These names are taken by the safetensors header of our shards.
        if tensor.name == "__metadata__" || safetensors::is_padding(&tensor.name) {
            return Err(bad("the name is reserved by the shard format"));
        }
        let length = byte_size(tensor.dtype, &tensor.shape)
            .ok_or_else(|| bad(&format!("shape {:?} overflows a 64-bit size", tensor.shape)))?;
        lengths.push(length);
    }
    Ok(lengths)
}

/// Plan positions of the uncompressed tensors, grouped into shards of at most
/// `shard_size` data bytes (alignment included), in plan order.
fn group_into_shards(plan: &[TensorPlan], raw_lengths: &[u64], shard_size: u64) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut used = 0u64;
    for (slot, tensor) in plan.iter().enumerate() {
        if tensor.codec != Codec::None {
            continue;
        }
        let length = raw_lengths[slot];
        let end =
            safetensors::align_tensor(used, length).and_then(|start| start.checked_add(length));
        match groups.last_mut() {
            Some(group) if end.is_some_and(|end| end <= shard_size) => {
                group.push(slot);
                used = end.expect("checked just above");
            }
            _ => {
                groups.push(vec![slot]);
                used = raw_lengths[slot];
            }
        }
    }
    groups
}

fn open_temp(dir: &Path, final_name: String) -> Result<DataFile> {
    let temp_path = dir.join(layout::temp_name_of(&final_name));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&temp_path)
        .map_err(|e| StoreError::io(&temp_path, e))?;
    Ok(DataFile {
        file: Arc::new(file),
        final_name,
        temp_path,
        reserved: 0,
    })
}

fn write_at(data: &DataFile, bytes: &[u8], offset: u64) -> Result<()> {
    data.file
        .write_all_at(bytes, offset)
        .map_err(|e| StoreError::io(&data.temp_path, e))
}

/// Flushes a data file and gives it its final name; returns its index record.
fn finish_file(dir: &Path, data: &DataFile) -> Result<FileRecord> {
    data.file
        .sync_all()
        .map_err(|e| StoreError::io(&data.temp_path, e))?;
    let size = data
        .file
        .metadata()
        .map_err(|e| StoreError::io(&data.temp_path, e))?
        .len();
    let final_path = dir.join(&data.final_name);
    fs::rename(&data.temp_path, &final_path).map_err(|e| StoreError::io(&final_path, e))?;
    Ok(FileRecord {
        path: data.final_name.clone(),
        mounted: false,
        size,
        mtime_ns: None,
    })
}

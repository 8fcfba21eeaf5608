//! Names of the files a writer puts in a store directory, writer liveness, and the
//! clean-up of what dead writers left behind.
//!
//! Every write gets a fresh generation token `<gen>` (16 lowercase hex digits), so a new
//! write never touches the files the committed index points to:
//! - `<gen>-shard-00000.safetensors`, `<gen>-zstd-00000.bin`: committed data files;
//! - `.tmp-<gen>-<suffix>`: the same files (and the index) before their rename;
//! - `.tmp-<gen>.lock`: held with `flock` while the writer lives. The kernel drops the
//!   lock when the process dies, so "the lock can be taken" means "the writer is dead".

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Result, StoreError};
use crate::index::{Index, INDEX_FILE};

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
    fn generation(&self) -> &str {
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

fn list_dir(dir: &Path) -> Result<Vec<String>> {
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

/// Removes what dead writers left in `dir`: temporary files and locks of every dead
/// generation, and committed data files the committed index does not reference. The
/// generation `own_gen` and writers still alive are left alone. Best effort: a file that
/// cannot be removed stays for the next writer, it never makes a write fail.
pub fn remove_stale_files(dir: &Path, own_gen: Option<&str>) {
    let Ok(names) = list_dir(dir) else { return };
    let mut dead = HashSet::new();
    let mut locks = Vec::new();
    for name in &names {
        let Some(kind) = classify(name) else { continue };
        let gen = kind.generation().to_owned();
        if own_gen == Some(gen.as_str()) || dead.contains(&gen) {
            continue;
        }
        // The lock of a dead writer is held while its files go, so no writer can reuse
        // the generation meanwhile (generations are never reused anyway).
        if let Some(lock) = probe_dead_writer(dir, &gen) {
            locks.push(lock);
            dead.insert(gen);
        }
    }
    // Read after taking the locks: a writer commits its index before it drops its lock.
    let referenced = referenced_files(dir);
    for name in &names {
        match classify(name) {
            Some(StoreFile::Temp { gen }) if dead.contains(&gen) => remove_quietly(dir, name),
            Some(StoreFile::Data { gen })
                if dead.contains(&gen)
                    && referenced.as_ref().is_some_and(|r| !r.contains(name)) =>
            {
                remove_quietly(dir, name)
            }
            _ => {}
        }
    }
    for lock in locks {
        remove_quietly(dir, &lock.name);
    }
}

fn remove_quietly(dir: &Path, name: &str) {
    let _ = fs::remove_file(dir.join(name));
}

/// Names of files in `dir` the committed index references (written, or mounted from
/// `dir` itself): empty with no index, `None` when an index exists but cannot be parsed
/// (then no committed data file may go).
fn referenced_files(dir: &Path) -> Option<HashSet<String>> {
    let path = dir.join(INDEX_FILE);
    let bytes = match crate::index::read_index_file(&path, "an index file") {
        Ok(bytes) => bytes,
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Some(HashSet::new())
        }
        Err(_) => return None,
    };
    let index = Index::parse(&bytes, &path).ok()?;
    // A mount may serve files of this very directory (by absolute path): they stay too.
    let canonical_dir = fs::canonicalize(dir).ok();
    let is_here = |path: &Path| path.parent().map(Path::to_path_buf) == canonical_dir;
    let names = index.files.into_iter().filter_map(|f| {
        if !f.mounted {
            return Some(f.path);
        }
        let path = Path::new(&f.path);
        is_here(path).then(|| path.file_name()?.to_str().map(str::to_owned))?
    });
    Some(names.collect())
}

/// A held lock of a dead writer's generation, released (closed) on drop.
struct DeadWriterLock {
    name: String,
    _file: Option<File>,
}

/// `Some` when the writer of `gen` is dead: no lock file, or a lock nobody holds.
fn probe_dead_writer(dir: &Path, gen: &str) -> Option<DeadWriterLock> {
    let name = format!("{TEMP_PREFIX}{gen}{LOCK_SUFFIX}");
    // Non-blocking: a FIFO under a lock's name must not hang the writer cleaning up.
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(dir.join(&name));
    match opened {
        Ok(file) => try_flock(&file).then_some(DeadWriterLock {
            name,
            _file: Some(file),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(DeadWriterLock { name, _file: None }),
        Err(_) => None,
    }
}

fn try_flock(file: &File) -> bool {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// The liveness lock of one writer: `.tmp-<gen>.lock`, flock-ed for the writer's life and
/// removed when it drops.
#[derive(Debug)]
pub(crate) struct WriterLock {
    path: PathBuf,
    _file: File,
}

impl WriterLock {
    /// Creates and locks the lock file of `gen`. Retries when a cleaner removed the file
    /// between its creation and our flock (it then saw an unheld lock of a writer with no
    /// files yet); fails with `AlreadyExists` if another writer owns `gen`.
    pub(crate) fn acquire(dir: &Path, gen: &str) -> Result<WriterLock> {
        let path = dir.join(format!("{TEMP_PREFIX}{gen}{LOCK_SUFFIX}"));
        loop {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
                .map_err(|e| StoreError::io(&path, e))?;
            // SAFETY: flock on a descriptor we own; blocks only while a cleaner probes it.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(StoreError::io(&path, io::Error::last_os_error()));
            }
            let ours = file.metadata().map_err(|e| StoreError::io(&path, e))?;
            match fs::metadata(&path) {
                Ok(seen) if seen.ino() == ours.ino() && seen.dev() == ours.dev() => {
                    return Ok(WriterLock { path, _file: file })
                }
                _ => continue,
            }
        }
    }
}

impl Drop for WriterLock {
    fn drop(&mut self) {
        // Removed while still held, so no cleaner sees a stale unlocked file of a live gen.
        let _ = fs::remove_file(&self.path);
    }
}

/// Opens `path` for reading, refusing anything but a regular file (`Format`, naming `what`
/// the file should have been). The open is non-blocking so that a FIFO or a device put in
/// the file's place fails here instead of blocking forever in `open` or `read`; the flag
/// changes nothing for a regular file.
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| StoreError::io(path, e))?;
    let meta = file.metadata().map_err(|e| StoreError::io(path, e))?;
    if meta.is_file() {
        return Ok(file);
    }
    let kind = if meta.is_dir() {
        "a directory"
    } else {
        "a FIFO, socket or device"
    };
    Err(StoreError::format(path, format!("is {kind}, not {what}")))
}

/// Flushes `dir`'s entries (the renames done in it) to disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// A file's modification time in nanoseconds since the epoch (0 for times before it).
pub fn mtime_ns(meta: &fs::Metadata) -> u64 {
    let nanos = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    u64::try_from(nanos).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_only_writer_files() {
        let gen = new_generation();
        let data = |g: &str| Some(StoreFile::Data { gen: g.to_owned() });
        assert_eq!(classify(&shard_file_name(&gen, 3)), data(&gen));
        assert_eq!(classify(&blob_file_name(&gen, 12)), data(&gen));
        let temp = temp_name_of(&shard_file_name(&gen, 0));
        assert_eq!(classify(&temp), Some(StoreFile::Temp { gen: gen.clone() }));
        let index_temp = temp_file_name(&gen, INDEX_FILE);
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

    #[test]
    fn held_lock_means_live_writer() {
        let dir = tempfile::tempdir().unwrap();
        let gen = new_generation();
        let lock = WriterLock::acquire(dir.path(), &gen).unwrap();
        assert!(probe_dead_writer(dir.path(), &gen).is_none());
        assert!(WriterLock::acquire(dir.path(), &gen).is_err());
        drop(lock);
        assert!(!dir.path().join(format!(".tmp-{gen}.lock")).exists());
        assert!(probe_dead_writer(dir.path(), &gen).is_some());
    }

    #[test]
    fn stale_files_of_dead_writers_go_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (dead, live) = (new_generation(), new_generation());
        let _live_lock = WriterLock::acquire(dir.path(), &live).unwrap();
        let files = [
            temp_name_of(&shard_file_name(&dead, 0)),
            shard_file_name(&dead, 0),
            temp_name_of(&shard_file_name(&live, 0)),
            shard_file_name(&live, 1),
            "user-notes.txt".to_owned(),
        ];
        for name in &files {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_stale_files(dir.path(), None);
        let left = list_dir(dir.path()).unwrap();
        assert!(!left.contains(&files[0]) && !left.contains(&files[1]));
        for name in &files[2..] {
            assert!(left.contains(name), "{name} was removed");
        }
    }
}

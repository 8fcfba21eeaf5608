//! Writer liveness, and the clean-up of what dead writers left behind in a store directory.
//!
//! A writer holds `.tmp-<gen>.lock` with `flock` while it lives. The kernel drops the lock
//! when the process dies, so "the lock can be taken" means "the writer is dead".

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Result, StoreError};
use crate::index::{read_index_file, Index, INDEX_FILE};
use crate::layout::{classify, list_dir, lock_file_name, StoreFile};

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
    let bytes = match read_index_file(&path, "an index file") {
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
    let name = lock_file_name(gen);
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
        let path = dir.join(lock_file_name(gen));
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{new_generation, shard_file_name, temp_name_of};

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

//! File mappings and the reads that bring one tensor's bytes into memory.
//!
//! Each store file gets one private (copy-on-write) mapping, opened on first use and shared
//! by every tensor of the file. Before any page of a file is touched, its size (and, for a
//! mounted file, its modification time) is compared with the index: a file that changed is
//! reported as [`StoreError::Corrupt`] instead of crashing the process with SIGBUS or
//! serving bytes the index does not describe.
//!
//! What remains possible: a file truncated *while* a view of it is in use (after the check)
//! still makes the next touch of a vanished page raise SIGBUS; no mapping can prevent that.
//! A mounted file rewritten in place without changing size or mtime is not detected either.
//! A store opened with `zero_copy` off never touches its mappings: every tensor is read with
//! direct I/O (`direct.rs`) into an owned buffer, or copied there from pages the page cache
//! already holds (through short-lived mappings of its own, with no SIGBUS either), so a file
//! truncated under it is an error (`Corrupt`), never a signal. Tensors that are not views (zstd frames, tensors misaligned
//! for their dtype) are read the same way by every store.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use memmap2::{MmapMut, MmapOptions};

use crate::buffers::AlignedBuf;
use crate::codec;
use crate::direct::{DirectFile, RangeReader, Source};
use crate::error::{Result, StoreError};
use crate::fs;
use crate::index::{Codec, Entry, FileRecord, Index};

/// The lazily opened mappings of every file of one index.
pub(crate) struct FileSet {
    paths: Vec<PathBuf>,
    records: Vec<FileRecord>,
    maps: Vec<OnceLock<Arc<FileMap>>>,
}

impl FileSet {
    pub fn new(index: &Index, root: &Path) -> FileSet {
        FileSet {
            paths: (0..index.files.len())
                .map(|file| index.file_path(root, file))
                .collect(),
            records: index.files.clone(),
            maps: index.files.iter().map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn path(&self, file: usize) -> &Path {
        &self.paths[file]
    }

    /// The mapping of `file`, opening it on first use. Two threads may race to open it: one
    /// mapping wins, the other is dropped, and both callers use the winner.
    pub fn open(&self, file: usize, tensor: &str) -> Result<&Arc<FileMap>> {
        if let Some(map) = self.maps[file].get() {
            return Ok(map);
        }
        let map = FileMap::open(&self.paths[file], &self.records[file], tensor)?;
        Ok(self.maps[file].get_or_init(|| Arc::new(map)))
    }

    /// The mapping of `file` if some read already opened it.
    pub fn opened(&self, file: usize) -> Option<&Arc<FileMap>> {
        self.maps[file].get()
    }
}

/// One file, open (for direct reads) and mapped copy-on-write over its whole recorded length.
pub(crate) struct FileMap {
    path: PathBuf,
    file: DirectFile,
    map: MmapMut,
    record: FileRecord,
}

impl FileMap {
    fn open(path: &Path, record: &FileRecord, tensor: &str) -> Result<FileMap> {
        // Non-blocking, regular files only: a FIFO put in a file's place must not hang us.
        let file = fs::open_regular(path, "a store data file")?;
        let record = &read_baseline(&file, path, record)?;
        check_metadata(&file, path, record, tensor)?;
        let len = usize::try_from(record.size)
            .map_err(|_| StoreError::format(path, "file too large for this platform"))?;
        // SAFETY: MAP_PRIVATE: writes through the mapping never reach the file. Changes made
        // to the file by others are detected by `check_unchanged` before each read.
        let map = unsafe { MmapOptions::new().len(len).map_copy(&file) }
            .map_err(|e| StoreError::io(path, e))?;
        Ok(FileMap {
            path: path.to_owned(),
            file: DirectFile::new(file, path)?,
            map,
            record: record.clone(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails with `Corrupt` when the file's size differs from the index, or its mtime from
    /// the one recorded at mount (or seen at open): its bytes may no longer be the ones the
    /// index describes.
    pub fn check_unchanged(&self, tensor: &str) -> Result<()> {
        check_metadata(self.file.file(), &self.path, &self.record, tensor)
    }

    /// The mapping bytes `[offset, offset + len)`, or `Format` when the range does not lie
    /// inside the file: memory safety never depends on the index having been validated.
    pub fn bytes(&self, offset: u64, len: u64, tensor: &str) -> Result<&[u8]> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.map.len() as u64);
        match end {
            Some(end) => Ok(&self.map[offset as usize..end as usize]),
            None => Err(StoreError::format(
                &self.path,
                format!("tensor {tensor:?}: bytes {offset}+{len} lie outside the file"),
            )),
        }
    }

    /// The address of byte `offset` of the mapping (checked by `bytes` beforehand).
    fn address(&self, offset: u64) -> NonNull<u8> {
        NonNull::new(self.map.as_ptr().wrapping_add(offset as usize).cast_mut())
            .expect("mapping addresses are non-null")
    }

    /// Faults the pages of `[offset, offset + len)` in now, so the cost is paid by the reader
    /// and resident accounting is true. `MADV_POPULATE_READ` reports a page past the end of
    /// the file as an error (EFAULT) where touching it would raise SIGBUS.
    pub fn populate(&self, offset: u64, len: u64, tensor: &str) -> Result<()> {
        let bytes = self.bytes(offset, len, tensor)?;
        if bytes.is_empty() {
            return Ok(());
        }
        let start = offset as usize / page_size() * page_size();
        let span = offset as usize + bytes.len() - start;
        match madvise(
            self.map.as_ptr() as usize + start,
            span,
            libc::MADV_POPULATE_READ,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                touch_pages(bytes);
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Err(StoreError::corrupt(
                &self.path,
                tensor,
                "the file shrank while its pages were read",
            )),
            Err(e) => Err(StoreError::io(&self.path, e)),
        }
    }

    /// Starts asynchronous readahead of the pages of `[offset, offset + len)`. Advice only:
    /// a failure (or a range past the end) changes nothing that a later read would not see.
    pub fn will_need(&self, offset: u64, len: u64) {
        let start = offset as usize / page_size() * page_size();
        let end = offset.saturating_add(len).min(self.map.len() as u64) as usize;
        if end > start {
            let _ = madvise(
                self.map.as_ptr() as usize + start,
                end - start,
                libc::MADV_WILLNEED,
            );
        }
    }

    /// Gives back the pages lying entirely inside `[offset, offset + len)`. Pages shared with
    /// a neighbouring tensor are kept, so a live neighbour never loses (or re-reads) a byte.
    /// Dropped clean pages are re-read from the file on the next touch.
    pub fn release_pages(&self, offset: u64, len: u64) {
        let start = (offset as usize).next_multiple_of(page_size());
        let end = offset.saturating_add(len) as usize / page_size() * page_size();
        if end > start && end <= self.map.len() {
            // A failure only means the pages stay resident: nothing to report.
            let _ = madvise(
                self.map.as_ptr() as usize + start,
                end - start,
                libc::MADV_DONTNEED,
            );
        }
    }
}

/// A tensor's bytes in memory: a view of its file's mapping, or an owned buffer.
pub(crate) enum Loaded {
    View {
        map: Arc<FileMap>,
        offset: u64,
        len: u64,
    },
    Owned(AlignedBuf),
}

impl Loaded {
    pub fn address(&self) -> NonNull<u8> {
        match self {
            Loaded::View { map, offset, .. } => map.address(*offset),
            Loaded::Owned(buf) => NonNull::new(buf.as_ptr()).expect("buffers are non-null"),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Loaded::View { len, .. } => *len as usize,
            Loaded::Owned(buf) => buf.len(),
        }
    }

    /// Drops a view's pages (see `FileMap::release_pages`); an owned buffer is freed by
    /// dropping it instead.
    pub fn release_pages(&self) {
        if let Loaded::View { map, offset, len } = self {
            map.release_pages(*offset, *len);
        }
    }

    /// An owned buffer's capacity (`None` for a view): what a recycled buffer must match.
    pub fn buffer_capacity(&self) -> Option<usize> {
        match self {
            Loaded::View { .. } => None,
            Loaded::Owned(buf) => Some(buf.capacity()),
        }
    }
}

/// True when the tensor can be served as a view of its file: uncompressed and at an offset
/// aligned to its dtype (mapping bases are page-aligned, so the address is aligned too).
pub(crate) fn is_view(entry: &Entry) -> bool {
    entry.codec == Codec::None && entry.offset % entry.dtype.size() == 0
}

/// How a store brings tensors into memory (from its options).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadMode {
    /// Serve the tensors that can be views (see [`is_view`]) as views of the mapping; when
    /// false, every tensor is read into an owned buffer and no mapping is ever touched.
    pub zero_copy: bool,
    /// Fault a view's pages in when it is read (else on first touch).
    pub populate_views: bool,
    /// Check every tensor's checksum when it is read.
    pub verify: bool,
}

impl ReadMode {
    /// Whether `entry` is served as a view of its file's mapping.
    pub fn serves_view(self, entry: &Entry) -> bool {
        self.zero_copy && is_view(entry)
    }
}

/// Brings `entry`'s bytes into memory: populates a view, or fills an owned buffer (`reuse`
/// when the cache has a fitting one, else a new one). With `mode.verify`, checks the checksum.
/// Also says where an owned read found the bytes (a view's come from the file).
pub(crate) fn load(
    map: &Arc<FileMap>,
    entry: &Entry,
    reuse: Option<AlignedBuf>,
    mode: ReadMode,
) -> Result<(Loaded, Source)> {
    map.check_unchanged(&entry.name)?;
    let (loaded, source) = if mode.serves_view(entry) {
        if mode.populate_views {
            map.populate(entry.offset, entry.length, &entry.name)?;
        }
        let (offset, len) = (entry.offset, entry.length);
        let map = Arc::clone(map);
        (Loaded::View { map, offset, len }, Source::File)
    } else {
        let (buf, source) = load_owned(map, entry, reuse)?;
        (Loaded::Owned(buf), source)
    };
    if mode.verify {
        let raw = map_slice(&loaded);
        verify_checksum(entry, raw, map.path())?;
    }
    Ok((loaded, source))
}

/// Fills an owned buffer with direct reads, or a copy of pages already in the page cache
/// (see `direct.rs`): uncompressed bytes go into the buffer (a recycled buffer's pages are
/// already faulted in); a zstd frame is read into scratch memory and decoded into the buffer.
fn load_owned(
    map: &FileMap,
    entry: &Entry,
    reuse: Option<AlignedBuf>,
) -> Result<(AlignedBuf, Source)> {
    let raw_len = usize::try_from(entry.raw_length)
        .map_err(|_| StoreError::format(map.path(), "tensor too large for this platform"))?;
    let stored_len = map.bytes(entry.offset, entry.length, &entry.name)?.len();
    let buffer = |reuse: Option<AlignedBuf>| match reuse {
        Some(buf) => Ok(buf.reuse_for(raw_len)),
        None => AlignedBuf::new(raw_len).map_err(|e| {
            let detail = format!("tensor {:?} ({raw_len} bytes): {e}", entry.name);
            StoreError::io(map.path(), io::Error::new(e.kind(), detail))
        }),
    };
    let read_failed = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => StoreError::corrupt(
            map.path(),
            &entry.name,
            format!("the file ends before the tensor's bytes ({e})"),
        ),
        _ => StoreError::io(map.path(), e),
    };
    match entry.codec {
        Codec::None => {
            let mut buf = buffer(reuse)?;
            let source = map
                .file
                .read_exact_into(entry.offset, &mut buf)
                .map_err(read_failed)?;
            Ok((buf, source))
        }
        Codec::Zstd => {
            let (decoded, source) = map
                .file
                .with_range(entry.offset, stored_len, |frame| {
                    // Before the buffer exists: a frame announcing another size is corrupt.
                    codec::check_frame_header(frame, entry.raw_length, map.path(), &entry.name)?;
                    let mut buf = buffer(reuse)?;
                    codec::decompress_into(frame, buf.as_mut_slice(), map.path(), &entry.name)?;
                    Ok(buf)
                })
                .map_err(read_failed)?;
            Ok((decoded?, source))
        }
    }
}

fn map_slice(loaded: &Loaded) -> &[u8] {
    // SAFETY: `address()..+len()` is the populated view or the filled buffer, owned by
    // `loaded`, which outlives the returned slice.
    unsafe { std::slice::from_raw_parts(loaded.address().as_ptr(), loaded.len()) }
}

fn verify_checksum(entry: &Entry, raw: &[u8], path: &Path) -> Result<()> {
    match entry.checksum {
        Some(expected) if codec::checksum(raw) != expected => Err(StoreError::corrupt(
            path,
            &entry.name,
            format!("checksum mismatch (the index records {expected:016x})"),
        )),
        _ => Ok(()),
    }
}

/// The memory `verify` reads through, allocated once for all tensors.
pub(crate) struct ChecksumBuffers {
    /// Direct reads land here (page-aligned).
    chunk: AlignedBuf,
    /// Bytes to hash are copied (or decoded) here.
    scratch: Vec<u8>,
}

impl ChecksumBuffers {
    pub fn new(path: &Path) -> Result<ChecksumBuffers> {
        const LEN: usize = 8 << 20;
        Ok(ChecksumBuffers {
            chunk: AlignedBuf::new(LEN).map_err(|e| StoreError::io(path, e))?,
            scratch: vec![0u8; LEN],
        })
    }
}

/// The checksum of `entry`'s raw bytes as stored in `file`, read with direct reads through
/// `buffers` (never through the mapping, the cache or the page cache, so `verify` neither
/// disturbs live tensors nor grows memory). A short file or a bad frame is `Corrupt`.
pub(crate) fn stored_checksum(
    file: &DirectFile,
    path: &Path,
    entry: &Entry,
    buffers: &mut ChecksumBuffers,
) -> Result<u64> {
    let end = entry.offset.checked_add(entry.length).ok_or_else(|| {
        StoreError::format(path, format!("tensor {:?}: offset overflows", entry.name))
    })?;
    let reader = RangeReader::new(file, &mut buffers.chunk, entry.offset, end);
    let scratch = &mut buffers.scratch;
    let (sum, total, reader) = match entry.codec {
        Codec::None => hash_stream(reader, scratch, entry.raw_length),
        Codec::Zstd => {
            let decoder = zstd::stream::read::Decoder::new(reader)
                .map_err(|e| StoreError::io(path, e))?
                .single_frame();
            let (sum, total, decoder) = hash_stream(decoder, scratch, entry.raw_length);
            (sum, total, decoder.finish().into_inner())
        }
    };
    if let Some(failure) = reader.failure {
        return Err(StoreError::io(path, failure));
    }
    match (sum, total) {
        (Ok(sum), total) if total == entry.raw_length => Ok(sum),
        (Ok(_), total) => Err(StoreError::corrupt(
            path,
            &entry.name,
            format!(
                "decodes to {total} bytes or more, the index records {}",
                entry.raw_length
            ),
        )),
        (Err(e), _) => Err(StoreError::corrupt(path, &entry.name, e.to_string())),
    }
}

/// Hashes everything `src` yields, stopping early once more than `limit` bytes came out.
/// Returns the hash, the byte count and `src` (so the caller can look at its failure).
fn hash_stream<R: io::Read>(
    mut src: R,
    scratch: &mut [u8],
    limit: u64,
) -> (io::Result<u64>, u64, R) {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut total = 0u64;
    loop {
        match src.read(scratch) {
            Ok(0) => return (Ok(hasher.digest()), total, src),
            Ok(n) => {
                hasher.update(&scratch[..n]);
                total += n as u64;
                if total > limit {
                    return (Ok(hasher.digest()), total, src);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (Err(e), total, src),
        }
    }
}

fn madvise(address: usize, len: usize, advice: libc::c_int) -> io::Result<()> {
    loop {
        // SAFETY: callers pass page-aligned ranges inside a live mapping they own; the advice
        // values used (POPULATE_READ, WILLNEED, DONTNEED on a private file mapping) never
        // make memory invalid, only absent-until-refaulted.
        let rc = unsafe { libc::madvise(address as *mut libc::c_void, len, advice) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
            return Err(err);
        }
    }
}

/// Faults pages in by reading one byte of each (kernels before 5.14 lack POPULATE_READ).
fn touch_pages(bytes: &[u8]) {
    for page in bytes.chunks(page_size()) {
        // SAFETY: `page` is a non-empty in-bounds slice; the volatile read keeps the compiler
        // from removing a read whose value is unused.
        unsafe { std::ptr::read_volatile(page.as_ptr()) };
    }
}

pub(crate) fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize)
}

/// The record reads are checked against. A mounted file keeps its recorded mtime; a file
/// the store wrote records none, so the mtime seen at open becomes its baseline and a
/// rewrite in place that keeps the size is noticed too.
fn read_baseline(file: &File, path: &Path, record: &FileRecord) -> Result<FileRecord> {
    let mut baseline = record.clone();
    if !record.mounted {
        let meta = file.metadata().map_err(|e| StoreError::io(path, e))?;
        baseline.mtime_ns = Some(fs::mtime_ns(&meta));
    }
    Ok(baseline)
}

/// Checks the open file against its record (the one check: `FileRecord::check_metadata`).
fn check_metadata(file: &File, path: &Path, record: &FileRecord, tensor: &str) -> Result<()> {
    let meta = file.metadata().map_err(|e| StoreError::io(path, e))?;
    record.check_metadata(&meta, path, tensor)
}

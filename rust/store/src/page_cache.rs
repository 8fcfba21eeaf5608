//! What the page cache already holds of a file, and copies out of it that read nothing from
//! the disk: how an owned read (see `DirectFile::copy_if_cached`) serves bytes that another
//! process, or a user who just downloaded the files, left in the page cache, at memory speed
//! and without adding a page to it.
//!
//! Asking: `cachestat` (Linux 6.5+) counts the cached pages of a range in one call (0.2 ms
//! for 1 GiB on this project's machine); older kernels get `mincore` of a fresh mapping of
//! the range, a page at a time (28 ms for 1 GiB, against 100 ms to copy it). Both report
//! nothing cached for a file the process could not open for writing (the kernel hides the
//! page cache of such files), and so does any failure: the caller then reads from the disk.
//!
//! Copying: a buffered `pread` is not enough. When it meets a page that an earlier reader's
//! readahead marked, it starts the kernel's readahead of the pages that follow (measured:
//! copying the 24 MiB cached after a reader read 16 MiB cached 8 MiB more, with
//! `POSIX_FADV_RANDOM` too; on 6.18 `preadv2(RWF_NOWAIT)` also starts readahead, even when it
//! refuses to wait for a missing page). A mapping advised `MADV_RANDOM` reads nothing ahead
//! (the same copy cached nothing more), and `process_vm_readv` from this process copies its
//! pages with the kernel's fault handling: a page the file lost (a truncation) ends the copy
//! short instead of raising SIGBUS, so a read of a changed file still fails cleanly. It costs
//! speed where the page cache holds the file in 4 KiB pages (each is mapped and pinned): a
//! warm pass over the 2 GB benchmark store (`benchmarks/bench_store.py`'s stream, tensors
//! touched) ran at 5.3 GB/s, 7.7 GB/s with `pread` (medians of 6 alternating passes); the
//! mapping size (4 MiB to 1 GiB) changed nothing.
//!
//! A page evicted between the question and the copy is read back (that page alone, no
//! readahead) and stays cached: a window of microseconds, under memory pressure only.

use std::fs::File;
use std::os::fd::AsRawFd;

use memmap2::{Advice, Mmap, MmapOptions};

use crate::mapping::page_size;
use crate::pages;

/// `cachestat(2)`: the same number on every architecture that has it (Linux 6.5+).
const SYS_CACHESTAT: libc::c_long = 451;
/// Copies go through mappings of at most this many bytes, so a large tensor never maps more
/// than this of the page cache into the process at once.
const COPY_CHUNK: usize = 4 << 20;

/// `struct cachestat_range` of the kernel's ABI.
#[repr(C)]
struct CachestatRange {
    offset: u64,
    len: u64,
}

/// `struct cachestat` of the kernel's ABI: page counts.
#[repr(C)]
#[derive(Default)]
struct Cachestat {
    cached: u64,
    dirty: u64,
    writeback: u64,
    evicted: u64,
    recently_evicted: u64,
}

/// Whether every page holding `[offset, offset + len)` of `file` is in the page cache
/// (`len` > 0). False where the kernel does not say (see the module comment), and for a
/// range that does not lie inside the file: a mapping shows zeros past its end.
pub(crate) fn holds(file: &File, offset: u64, len: usize) -> bool {
    let page = page_size() as u64;
    let size = file.metadata().map_or(0, |meta| meta.len());
    let Some(end) = offset.checked_add(len as u64).filter(|&end| end <= size) else {
        return false;
    };
    let pages = end.div_ceil(page) - offset / page;
    cached_pages(file, offset, len) == Some(pages)
}

/// Pages of `[offset, offset + len)` of `file` in the page cache (`len` > 0): `cachestat`,
/// else `mincore`; `None` when neither answers.
pub(crate) fn cached_pages(file: &File, offset: u64, len: usize) -> Option<u64> {
    cachestat(file, offset, len).or_else(|| mincore(file, offset, len))
}

/// Pages of `[offset, offset + len)` in the page cache, from `cachestat`; `None` where the
/// kernel lacks it or refuses.
fn cachestat(file: &File, offset: u64, len: usize) -> Option<u64> {
    let range = CachestatRange {
        offset,
        len: len as u64,
    };
    let mut stat = Cachestat::default();
    // SAFETY: the kernel reads `range` and writes `stat`, both live `repr(C)` values of the
    // layouts it expects; flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0,
        )
    };
    (rc == 0).then_some(stat.cached)
}

/// Pages of `[offset, offset + len)` in the page cache, from `mincore` of a fresh mapping
/// of the range (nothing is read: `mincore` only looks); `None` where it cannot be mapped.
fn mincore(file: &File, offset: u64, len: usize) -> Option<u64> {
    let map = map_range(file, offset, len)?;
    let resident = pages::resident_bytes(&[(map.as_ptr() as usize, map.len())]);
    Some(resident / page_size() as u64)
}

/// Copies `[offset, offset + dst.len())` of `file` into `dst` from the page cache, through
/// mappings advised `MADV_RANDOM`; true when every byte came. Call it on a range [`holds`]
/// found cached: a missing page would be read (without readahead) and stay cached.
pub(crate) fn copy(file: &File, offset: u64, dst: &mut [u8]) -> bool {
    (0u64..)
        .map(|n| offset + n * COPY_CHUNK as u64)
        .zip(dst.chunks_mut(COPY_CHUNK))
        .all(|(at, chunk)| {
            map_range(file, at, chunk.len())
                .filter(|map| map.advise(Advice::Random).is_ok())
                .is_some_and(|map| copy_mapped(&map, chunk))
        })
}

/// A read-only shared mapping of `[offset, offset + len)` of `file`; nothing is read until
/// its pages are touched.
fn map_range(file: &File, offset: u64, len: usize) -> Option<Mmap> {
    // SAFETY: the mapping's pages are only ever read by the kernel: `mincore` looks at them,
    // `process_vm_readv` copies them and turns a page the file no longer has into a short
    // copy instead of SIGBUS.
    unsafe { MmapOptions::new().offset(offset).len(len).map(file) }.ok()
}

/// Copies all of `map` into `dst` (as long) with `process_vm_readv` from this process.
fn copy_mapped(map: &Mmap, dst: &mut [u8]) -> bool {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut copied = 0;
    while copied < dst.len() {
        let rest = dst.len() - copied;
        let local = libc::iovec {
            iov_base: dst[copied..].as_mut_ptr().cast(),
            iov_len: rest,
        };
        let remote = libc::iovec {
            iov_base: map.as_ptr().wrapping_add(copied).cast_mut().cast(),
            iov_len: rest,
        };
        // SAFETY: `local` is `rest` writable bytes of `dst`; `remote` is `rest` mapped bytes
        // of `map`, which the kernel reads with its own fault handling (an error, never a
        // signal). Both live until the call returns. A call copies at most ~2 GiB: loop.
        let done = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        match usize::try_from(done) {
            Ok(done) if done > 0 => copied += done,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn drop_cached(file: &File, offset: u64, len: u64) {
        // SAFETY: advice on a descriptor we own.
        let rc = unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        assert_eq!(rc, 0);
    }

    /// A file of `len` patterned bytes, written (so cached) and synced (so evictable).
    fn written(dir: &std::path::Path, len: usize) -> (File, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 + i / 4099) as u8).collect();
        let path = dir.join("data.bin");
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        (file, bytes)
    }

    const MIB: usize = 1 << 20;

    /// Cached pages of a range by `mincore`, checked against `cachestat` where the kernel
    /// has it.
    fn counted(file: &File, offset: u64, len: usize) -> u64 {
        let by_mincore = mincore(file, offset, len).unwrap();
        if let Some(by_cachestat) = cachestat(file, offset, len) {
            assert_eq!(by_cachestat, by_mincore, "{offset}+{len}");
        }
        by_mincore
    }

    fn pages(offset: u64, len: usize) -> u64 {
        let page = page_size() as u64;
        (offset + len as u64).div_ceil(page) - offset / page
    }

    // Evictions below start and end on 4 MiB: page cache folios (at most 2 MiB here) are
    // aligned to their size, so none straddles a boundary and is kept whole.

    #[test]
    fn holds_needs_every_page_of_the_range_cached() {
        let dir = tempfile::tempdir().unwrap();
        let page = page_size();
        let len = 12 * MIB + 123;
        let (file, _) = written(dir.path(), len);
        // Ranges inside one page, across pages at odd offsets, and the whole file.
        for (offset, count) in [(5, 10), (page as u64 - 1, 2), (3, 3 * MIB), (0, len)] {
            assert_eq!(counted(&file, offset, count), pages(offset, count));
            assert!(holds(&file, offset, count), "{offset}+{count}");
        }
        assert!(
            !holds(&file, len as u64 - 10, 20),
            "past the end of the file"
        );
        drop_cached(&file, 4 * MIB as u64, 4 * MIB as u64);
        assert_eq!(
            counted(&file, 0, len),
            pages(0, len) - (4 * MIB / page) as u64
        );
        assert!(!holds(&file, 3 * MIB as u64, 2 * MIB), "half of it evicted");
        assert!(!holds(&file, 0, len));
        assert!(holds(&file, 5, 3 * MIB), "before the evicted pages");
        assert!(holds(&file, 8 * MIB as u64 + 5, 2 * MIB), "after them");
        drop_cached(&file, 0, 0);
        assert_eq!(counted(&file, 0, len), 0);
        assert!(!holds(&file, 5, 10));
    }

    #[test]
    fn copies_are_bit_identical_and_cache_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let len = 3 * COPY_CHUNK + 5 * page_size() + 77;
        let (file, bytes) = written(dir.path(), len);
        for (offset, count) in [(0, len), (17, 2 * COPY_CHUNK + 9), (len - 3, 3)] {
            let mut dst = vec![0u8; count];
            assert!(copy(&file, offset as u64, &mut dst), "{offset}+{count}");
            assert!(dst == bytes[offset..offset + count], "{offset}+{count}");
        }
        // The end of the file evicted: copying the cached start brings none of it back.
        drop_cached(&file, 8 * MIB as u64, 0);
        let cached = counted(&file, 0, len);
        assert_eq!(cached, pages(0, 8 * MIB));
        let mut dst = vec![0u8; 8 * MIB - 100];
        assert!(copy(&file, 99, &mut dst));
        assert!(dst == bytes[99..99 + dst.len()]);
        assert_eq!(counted(&file, 0, len), cached);
    }

    #[test]
    fn copying_what_a_sequential_reader_left_starts_no_readahead() {
        let dir = tempfile::tempdir().unwrap();
        let len = 64 * MIB;
        let (file, bytes) = written(dir.path(), len);
        drop_cached(&file, 0, 0);
        // Another reader reads 16 MiB in order: the kernel reads ahead of it, and marks a
        // page of what it read ahead to read further when that page is reached.
        let reader = File::open(dir.path().join("data.bin")).unwrap();
        let mut chunk = vec![0u8; 64 << 10];
        for at in (0..16 * MIB).step_by(chunk.len()) {
            reader.read_exact_at(&mut chunk, at as u64).unwrap();
        }
        let page = page_size();
        let cached_prefix = (0..len / page)
            .take_while(|&p| cached_pages(&file, (p * page) as u64, page) == Some(1))
            .count()
            * page;
        assert!(cached_prefix >= 16 * MIB);
        let cached = counted(&file, 0, len);
        let mut dst = vec![0u8; cached_prefix];
        assert!(copy(&file, 0, &mut dst));
        assert!(dst == bytes[..cached_prefix]);
        assert_eq!(counted(&file, 0, len), cached, "the copy started readahead");
    }

    #[test]
    fn a_copy_past_the_end_of_the_file_fails_without_a_signal() {
        let dir = tempfile::tempdir().unwrap();
        let (file, _) = written(dir.path(), 10_000);
        let mut dst = vec![0u8; 3 * page_size()];
        assert!(!copy(&file, 2 * page_size() as u64, &mut dst));
        assert!(!copy(&file, 5, &mut vec![0u8; 20_000]));
    }
}

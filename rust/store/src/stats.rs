//! The numbers that tell a user whether the cache and the prefetcher keep up.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a store's runtime counters (all since the store was opened, or since the
/// runtime was rebuilt in a forked child).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `get` calls that issued no read: the bytes were resident or already being read (a
    /// caller that waited for a read that failed gets its error).
    pub hits: u64,
    /// `get` calls that read the bytes themselves.
    pub misses: u64,
    /// Names passed to `prefetch`.
    pub prefetch_requests: u64,
    /// `get` calls served by a prefetch (completed or still in flight): a subset of `hits`.
    pub prefetch_hits: u64,
    /// `get` calls that found their tensor still queued for a prefetch, not yet started, and
    /// read it themselves rather than wait behind the queue: the read-ahead asked for the
    /// right tensor but the read threads were behind. A subset of `misses`.
    pub prefetch_late: u64,
    /// Prefetches not performed: they did not fit in the budget without evicting pinned
    /// entries or other prefetched entries not used yet (or there are no read threads).
    pub prefetch_dropped: u64,
    /// Bytes read from files (stored bytes: a zstd tensor counts its frame), including
    /// `bytes_from_page_cache`.
    pub bytes_read: u64,
    /// The part of `bytes_read` that owned reads copied from pages already in the page cache
    /// (left there by another process or an earlier read) instead of reading them from the
    /// disk: memory-speed reads, which leave the page cache as they found it.
    pub bytes_from_page_cache: u64,
    /// Entries evicted to stay within the budget.
    pub evictions: u64,
    /// Reads into an owned buffer that refilled a buffer evicted from another tensor (pages
    /// already faulted in) instead of mapping a new one.
    pub buffers_reused: u64,
    /// Memory the cache holds now: owned buffers (of loaded tensors, reads in flight and
    /// queued prefetches) plus the pages of resident views that are in memory (asked of the
    /// kernel when the snapshot is taken; a page shared by two views counts once).
    pub resident_bytes: u64,
    /// What the budget counts now: each loaded tensor, read in flight and queued prefetch
    /// at its charge (an owned buffer's capacity, a view's length). Equal to
    /// `resident_bytes` for owned buffers; a view's pages may hold more than its length.
    pub charged_bytes: u64,
    /// The highest `charged_bytes` seen.
    pub peak_resident_bytes: u64,
    /// Bytes of entries pinned by live `TensorBytes` (and reads in flight for a `get`).
    pub pinned_bytes: u64,
    /// Nanoseconds callers of `get` spent waiting for bytes: reading them or waiting for a
    /// read in flight.
    pub wait_ns: u64,
    /// The residency budget in bytes; `None` means unlimited.
    pub budget: Option<u64>,
}

/// The event counters, bumped without the cache lock.
#[derive(Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub prefetch_requests: AtomicU64,
    pub prefetch_hits: AtomicU64,
    pub prefetch_late: AtomicU64,
    pub prefetch_dropped: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_from_page_cache: AtomicU64,
    pub evictions: AtomicU64,
    pub buffers_reused: AtomicU64,
    pub wait_ns: AtomicU64,
}

impl Counters {
    /// Adds `n` to `counter`. Relaxed: the counters are statistics, not synchronisation.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Fills the event counters of `stats`.
    pub fn fill(&self, stats: &mut Stats) {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        stats.hits = read(&self.hits);
        stats.misses = read(&self.misses);
        stats.prefetch_requests = read(&self.prefetch_requests);
        stats.prefetch_hits = read(&self.prefetch_hits);
        stats.prefetch_late = read(&self.prefetch_late);
        stats.prefetch_dropped = read(&self.prefetch_dropped);
        stats.bytes_read = read(&self.bytes_read);
        stats.bytes_from_page_cache = read(&self.bytes_from_page_cache);
        stats.evictions = read(&self.evictions);
        stats.buffers_reused = read(&self.buffers_reused);
        stats.wait_ns = read(&self.wait_ns);
    }
}

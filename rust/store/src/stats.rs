//! The numbers that tell a user whether the cache and the prefetcher keep up.

use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a store's runtime counters (all since the store was opened, or since the
/// runtime was rebuilt in a forked child).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// `get` calls that issued no read: the bytes were resident or already being read.
    pub hits: u64,
    /// `get` calls that read the bytes themselves.
    pub misses: u64,
    /// Names passed to `prefetch`.
    pub prefetch_requests: u64,
    /// `get` calls served by a prefetch (completed or still in flight): a subset of `hits`.
    pub prefetch_hits: u64,
    /// Prefetches not performed: they did not fit in the budget without evicting pinned
    /// entries or other prefetched entries not used yet (or there are no read threads).
    pub prefetch_dropped: u64,
    /// Bytes read from files (stored bytes: a zstd tensor counts its frame).
    pub bytes_read: u64,
    /// Entries evicted to stay within the budget.
    pub evictions: u64,
    /// Reads into an owned buffer that refilled a buffer evicted from another tensor (pages
    /// already faulted in) instead of mapping a new one.
    pub buffers_reused: u64,
    /// Bytes held by the cache now: loaded tensors and reads in flight.
    pub resident_bytes: u64,
    /// The highest `resident_bytes` seen.
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
    pub prefetch_dropped: AtomicU64,
    pub bytes_read: AtomicU64,
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
        stats.prefetch_dropped = read(&self.prefetch_dropped);
        stats.bytes_read = read(&self.bytes_read);
        stats.evictions = read(&self.evictions);
        stats.buffers_reused = read(&self.buffers_reused);
        stats.wait_ns = read(&self.wait_ns);
    }
}

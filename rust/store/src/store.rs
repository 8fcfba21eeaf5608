//! [`Store`]: serves the tensors of a validated index through the residency cache and the
//! read pool, and [`TensorBytes`], the pinned bytes of one tensor.
//!
//! Fork safety: a child process inherits the parent's locks in whatever state the parent's
//! other threads left them, and none of the parent's read threads. Each runtime (cache,
//! read pool, file mappings) belongs to one process: the first call in a child notices
//! the fork and builds a fresh runtime (new locks, new threads, counters from zero). The
//! parent's runtime is deliberately leaked in the child, never locked nor freed, and
//! `TensorBytes` inherited from the parent stay readable (their memory is leaked with it).

use std::any::Any;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Instant;

use crate::cache::{Acquired, Cache, Need, Reservation};
use crate::direct::Source;
use crate::error::{Result, StoreError};
use crate::index::{Entry, Index};
use crate::mapping::{self, FileSet, Loaded, ReadMode};
use crate::pool::ReadPool;
use crate::stats::{Counters, Stats};
use crate::verify;

/// How a store serves its tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Byte budget of the residency cache; `None` keeps everything that was read.
    pub max_resident: Option<u64>,
    /// Background threads serving `prefetch`; 0 disables prefetching.
    pub read_threads: usize,
    /// Check every tensor's checksum when it is read (costs a hash of its bytes).
    pub verify_reads: bool,
    /// Serve uncompressed tensors at aligned offsets as zero-copy views of a private file
    /// mapping (their pages are the page cache's). When false, every tensor is read with
    /// direct I/O (or copied from the page cache, where another reader left its bytes) into
    /// an owned, page-aligned buffer that is nowhere else: the budget then bounds all the
    /// memory the store's reads take (they leave nothing in the page cache), and
    /// a file truncated under the store fails a read (`Corrupt`) instead of raising SIGBUS
    /// in a tensor. Tensors that cannot be views are read that way in either mode.
    pub zero_copy: bool,
    /// Fault a view's pages in when it is read, so `get` pays for the read and the cache's
    /// resident bytes are true. False leaves the pages to fault in on first touch: with
    /// [`Store::will_need`], a caller can hand out a whole model's views at once and let
    /// the disk stream them in while it computes.
    pub populate_views: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_resident: None,
            read_threads: 2,
            verify_reads: false,
            zero_copy: true,
            populate_views: true,
        }
    }
}

/// A reader over one store: `get` pins a tensor's bytes, `prefetch` reads ahead.
/// All methods take `&self`; a `Store` is shared freely between threads.
pub struct Store {
    index: Arc<Index>,
    root: PathBuf,
    options: StoreOptions,
    slots: HashMap<String, u32>,
    /// The runtime of the current process: a `Box<Runtime>` pointer, replaced (and the old
    /// one leaked) only when a forked child first uses the store, freed in `Drop`.
    runtime: AtomicPtr<Runtime>,
    closed: AtomicBool,
}

impl Store {
    /// Opens the committed store in `dir` (reads and validates its index).
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store> {
        let index = Index::read(dir)?;
        Store::serve(index, dir.to_owned(), options)
    }

    /// Serves an index built in memory (a mount), after validating it against `root`,
    /// the directory its relative file names are resolved in.
    pub fn from_index(index: Index, root: PathBuf, options: StoreOptions) -> Result<Store> {
        index.validate(&root)?;
        Store::serve(index, root, options)
    }

    fn serve(index: Index, root: PathBuf, options: StoreOptions) -> Result<Store> {
        if u32::try_from(index.tensors.len()).is_err() {
            let detail = format!(
                "{} tensors: at most {} are supported",
                index.tensors.len(),
                u32::MAX
            );
            return Err(StoreError::InvalidArgument(detail));
        }
        let slots = (0u32..)
            .zip(&index.tensors)
            .map(|(slot, e)| (e.name.clone(), slot))
            .collect();
        let index = Arc::new(index);
        let runtime = Runtime::start(&index, &root, &options)?;
        Ok(Store {
            index,
            root,
            options,
            slots,
            runtime: AtomicPtr::new(Box::into_raw(Box::new(runtime))),
            closed: AtomicBool::new(false),
        })
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The directory relative file names are resolved in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entry(&self, name: &str) -> Option<&Entry> {
        let slot = *self.slots.get(name)?;
        Some(&self.index.tensors[slot as usize])
    }

    /// The bytes of tensor `name`, resident and pinned until the result is dropped. Reads
    /// them (in this thread) unless they are resident or already being read; then waits for
    /// that read, and gets its error if it fails. A prefetch of them still queued is taken
    /// over: read here, at once.
    pub fn get(&self, name: &str) -> Result<TensorBytes> {
        let slot = self.slot(name)?;
        self.runtime()?.core.get(slot)
    }

    /// Starts background reads of `names` and returns at once. Unknown names fail with
    /// `NotFound` before anything is queued. Tensors already resident or in flight, and
    /// prefetches the budget cannot hold, are skipped (see [`Stats::prefetch_dropped`]).
    pub fn prefetch(&self, names: &[&str]) -> Result<()> {
        let slots = self.slots_of(names)?;
        self.runtime()?.prefetch(&slots);
        Ok(())
    }

    /// Asks the kernel to start reading the bytes of `names` served as views into the page
    /// cache (asynchronous readahead of the mapped ranges) and returns at once; nothing
    /// enters the cache. Lets a caller that will `get` many tensors in a row keep the disk
    /// busy in between. Tensors read into owned buffers are skipped: their pages would take
    /// memory outside the budget.
    pub fn will_need(&self, names: &[&str]) -> Result<()> {
        let slots = self.slots_of(names)?;
        let core = &self.runtime()?.core;
        for slot in slots {
            let entry = &core.index.tensors[slot as usize];
            if !core.mode.serves_view(entry) {
                continue;
            }
            core.files
                .open(entry.file, &entry.name)?
                .will_need(entry.offset, entry.length);
        }
        Ok(())
    }

    /// Faults the pages of the views among `names` in, in order, on a thread of its own, and
    /// returns at once. For views handed out unpopulated (`populate_views: false`): they
    /// become resident soon after, while the caller already computes with them. Failures
    /// are left to the first touch (it raises SIGBUS where a populate reports EFAULT), as
    /// for any unpopulated view. The thread keeps the files mapped until it is done, even if
    /// the store is closed first.
    pub fn populate_in_background(&self, names: &[&str]) -> Result<()> {
        let slots = self.slots_of(names)?;
        let core = Arc::clone(&self.runtime()?.core);
        std::thread::Builder::new()
            .name("bigmodel-populate".into())
            .spawn(move || core.populate_views(&slots))
            .map_err(|e| StoreError::io(&self.root, e))?;
        Ok(())
    }

    fn slots_of(&self, names: &[&str]) -> Result<Vec<u32>> {
        names.iter().map(|name| self.slot(name)).collect()
    }

    /// Counters and byte counts of this process's runtime.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            budget: self.options.max_resident,
            ..Stats::default()
        };
        // A closed store still reports its numbers; a forked child reports its own.
        if let Some(runtime) = self.current_runtime().or_else(|| self.runtime().ok()) {
            runtime.core.cache.snapshot(&mut stats);
        }
        stats
    }

    /// Names of the tensors whose bytes on disk do not match their checksum, or cannot be
    /// read as recorded (missing file, short file, bad frame); tensors without a checksum
    /// are skipped. Neither the cache nor live tensors are affected (see [`verify`]).
    pub fn verify(&self) -> Result<Vec<String>> {
        self.check_open()?;
        verify::failing_tensors(&self.index, &self.root)
    }

    /// Stops the read threads and frees every unpinned tensor. Live `TensorBytes` stay
    /// valid (their memory is freed when the last one drops); later calls fail.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // A runtime inherited through fork is never touched: its locks may be held.
        if let Some(runtime) = self.current_runtime() {
            runtime.shutdown();
        }
    }

    fn slot(&self, name: &str) -> Result<u32> {
        self.slots
            .get(name)
            .copied()
            .ok_or_else(|| StoreError::NotFound {
                name: name.to_owned(),
                store: self.root.display().to_string(),
            })
    }

    fn check_open(&self) -> Result<()> {
        match self.closed.load(Ordering::Acquire) {
            false => Ok(()),
            true => Err(StoreError::InvalidArgument(format!(
                "the store at {} is closed",
                self.root.display()
            ))),
        }
    }

    /// The runtime pointer and the runtime it points to.
    fn load_runtime(&self) -> (*mut Runtime, &Runtime) {
        let pointer = self.runtime.load(Ordering::Acquire);
        // SAFETY: the pointer came from `Box::into_raw` and is freed only by `Drop`, which
        // has exclusive access; runtimes replaced after a fork are leaked, never freed.
        (pointer, unsafe { &*pointer })
    }

    /// The runtime, if it was built in this process (not inherited through fork).
    fn current_runtime(&self) -> Option<&Runtime> {
        let (_, runtime) = self.load_runtime();
        (runtime.core.epoch == fork_epoch()).then_some(runtime)
    }

    /// This process's runtime of an open store, built afresh on the first call after a fork.
    fn runtime(&self) -> Result<&Runtime> {
        self.check_open()?;
        loop {
            let (stale, runtime) = self.load_runtime();
            if runtime.core.epoch == fork_epoch() {
                return Ok(runtime);
            }
            let fresh = Runtime::start(&self.index, &self.root, &self.options)?;
            let fresh = Box::into_raw(Box::new(fresh));
            let swapped =
                self.runtime
                    .compare_exchange(stale, fresh, Ordering::AcqRel, Ordering::Acquire);
            if swapped.is_err() {
                // Another thread of this child installed its runtime first: use that one.
                // SAFETY: `fresh` was never shared.
                drop(unsafe { Box::from_raw(fresh) });
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `&mut self`: no other reference to the runtime exists.
        let runtime = unsafe { Box::from_raw(*self.runtime.get_mut()) };
        if runtime.core.epoch == fork_epoch() {
            runtime.shutdown();
            drop(runtime);
        } else {
            // Inherited through fork: its threads do not exist here and its locks may be
            // held forever, so it must be neither joined nor locked.
            std::mem::forget(runtime);
        }
    }
}

/// The per-process part of a store: the cache and its files, and the read threads.
struct Runtime {
    core: Arc<Core>,
    /// Serves the slots of queued prefetches (reserved in the cache first).
    pool: ReadPool<u32>,
}

impl Runtime {
    fn start(index: &Arc<Index>, root: &Path, options: &StoreOptions) -> Result<Runtime> {
        let core = Arc::new(Core {
            index: Arc::clone(index),
            files: FileSet::new(index, root),
            cache: Cache::new(index.tensors.len(), options.max_resident),
            mode: ReadMode {
                zero_copy: options.zero_copy,
                populate_views: options.populate_views,
                verify: options.verify_reads,
            },
            epoch: fork_epoch(),
        });
        // Open every file now: a writer that later replaces this store deletes the files of
        // the generation we serve, and an open descriptor keeps them readable until we close.
        for entry in &index.tensors {
            core.files.open(entry.file, &entry.name)?;
        }
        let job_core = Arc::clone(&core);
        let job = Arc::new(move |slot| job_core.prefetch_one(slot));
        let pool =
            ReadPool::start(options.read_threads, job).map_err(|e| StoreError::io(root, e))?;
        Ok(Runtime { core, pool })
    }

    /// Reserves each absent tensor in the cache *before* queuing its read, so the tensor is
    /// read once: a `get` that arrives while it is queued takes it over and reads it at once,
    /// one that arrives while it is read waits for that read. Memory evicted for the
    /// reservations is given back here, before the reads are queued.
    fn prefetch(&self, slots: &[u32]) {
        let counters = &self.core.cache.counters;
        Counters::add(&counters.prefetch_requests, slots.len() as u64);
        if !self.pool.has_threads() {
            return Counters::add(&counters.prefetch_dropped, slots.len() as u64);
        }
        let jobs: Vec<u32> = slots
            .iter()
            .copied()
            .filter(|&slot| {
                let entry = &self.core.index.tensors[slot as usize];
                // A tensor too large to hold is left to the `get` that follows to report.
                let Some(need) = self.core.need(entry) else {
                    Counters::add(&counters.prefetch_dropped, 1);
                    return false;
                };
                let Some(released) = self.core.cache.reserve_prefetch(slot, need) else {
                    return false;
                };
                self.core.cache.settle(released);
                true
            })
            .collect();
        if jobs.is_empty() {
            return; // all resident or in flight: waking the read threads would only cost time
        }
        if let Err(refused) = self.pool.submit(jobs) {
            Counters::add(&counters.prefetch_dropped, refused.len() as u64);
            self.core.cancel(refused);
        }
    }

    fn shutdown(&self) {
        let never_ran = self.pool.close();
        self.core.cancel(never_ran);
        self.core.cache.close();
    }
}

/// What tensors, read threads and `TensorBytes` share; outlives the `Store` while any
/// `TensorBytes` lives.
struct Core {
    index: Arc<Index>,
    files: FileSet,
    cache: Cache,
    mode: ReadMode,
    /// The fork epoch this runtime was built in (see `fork_epoch`).
    epoch: u64,
}

impl Core {
    fn populate_views(&self, slots: &[u32]) {
        for &slot in slots {
            let entry = &self.index.tensors[slot as usize];
            if !self.mode.serves_view(entry) {
                continue;
            }
            if let Ok(map) = self.files.open(entry.file, &entry.name) {
                // Advice-like: a failure here is seen by the first touch instead.
                let _ = map.populate(entry.offset, entry.length, &entry.name);
            }
        }
    }

    fn get(self: &Arc<Self>, slot: u32) -> Result<TensorBytes> {
        let entry = &self.index.tensors[slot as usize];
        if self.mode.serves_view(entry) {
            // A resident view of a file that changed would show other bytes, or SIGBUS.
            if let Some(map) = self.files.opened(entry.file) {
                map.check_unchanged(&entry.name)?;
            }
        }
        let need = self.need(entry).ok_or_else(|| self.too_large(entry))?;
        let started = Instant::now();
        let (address, len) = match self.cache.acquire(slot, need) {
            Acquired::Pinned {
                address,
                len,
                waited,
            } => {
                if waited {
                    self.add_wait(started);
                }
                (address, len)
            }
            Acquired::MustLoad(reservation) => {
                let loaded = self.load(slot, reservation);
                let bytes = self.cache.finish_load(slot, loaded);
                self.add_wait(started);
                bytes?
            }
            Acquired::Failed(error) => {
                self.add_wait(started);
                return Err(error);
            }
        };
        Ok(TensorBytes {
            core: Arc::clone(self),
            slot,
            address,
            len,
        })
    }

    /// What admitting `entry` costs; `None` for a tensor too large for any process.
    fn need(&self, entry: &Entry) -> Option<Need> {
        Need::for_entry(entry, self.mode.serves_view(entry))
    }

    /// A read thread's job: perform a read queued by `Runtime::prefetch`, unless a `get`
    /// took it over meanwhile.
    fn prefetch_one(&self, slot: u32) {
        let Some(reservation) = self.cache.start_prefetch(slot) else {
            return;
        };
        #[cfg(test)]
        tests::gate::pass(&self.index.tensors[slot as usize].name);
        let loaded = self.load(slot, reservation);
        // A failure goes to the gets waiting for this read; nobody else asked for it.
        let _ = self.cache.finish_load(slot, loaded);
    }

    /// Gives back the room of queued prefetches that will never run.
    fn cancel(&self, slots: Vec<u32>) {
        for slot in slots {
            self.cache.cancel_prefetch(slot);
        }
    }

    /// Performs a reserved read. Never unwinds: a panic becomes an error, so the slot is
    /// always released and its waiters always woken.
    fn load(&self, slot: u32, reservation: Reservation) -> Result<Loaded> {
        self.cache.settle(reservation.released);
        let entry = &self.index.tensors[slot as usize];
        let reuse = reservation.reuse;
        let read = catch_unwind(AssertUnwindSafe(|| {
            let map = self.files.open(entry.file, &entry.name)?;
            mapping::load(map, entry, reuse, self.mode)
        }))
        .unwrap_or_else(|panic| Err(self.panic_error(entry, panic)));
        let (loaded, source) = read?;
        let counters = &self.cache.counters;
        Counters::add(&counters.bytes_read, entry.length);
        if source == Source::PageCache {
            Counters::add(&counters.bytes_from_page_cache, entry.length);
        }
        Ok(loaded)
    }

    fn panic_error(&self, entry: &Entry, panic: Box<dyn Any + Send>) -> StoreError {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        let detail = format!(
            "internal error while reading tensor {:?}: {message}",
            entry.name
        );
        StoreError::io(self.files.path(entry.file), std::io::Error::other(detail))
    }

    fn too_large(&self, entry: &Entry) -> StoreError {
        let detail = format!(
            "tensor {:?} has {} bytes: more than a process can hold",
            entry.name, entry.raw_length
        );
        let error = std::io::Error::new(std::io::ErrorKind::OutOfMemory, detail);
        StoreError::io(self.files.path(entry.file), error)
    }

    fn add_wait(&self, started: Instant) {
        let waited = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        Counters::add(&self.cache.counters.wait_ns, waited);
    }
}

/// The pinned bytes of one tensor. While it lives the cache cannot evict them and the memory
/// stays valid, even after the store is closed or dropped (it holds the runtime's shared
/// state). With `zero_copy`, uncompressed tensors are views of a private (copy-on-write) file
/// mapping; other tensors are owned buffers. Writing through `as_ptr` never modifies the
/// file; it changes the cached copy until it is evicted, and is the writer's own (unsafe)
/// business.
pub struct TensorBytes {
    core: Arc<Core>,
    slot: u32,
    address: NonNull<u8>,
    len: usize,
}

// SAFETY: the bytes are plain memory kept alive by `core` (pinned: never evicted nor moved);
// `TensorBytes` hands out only a pointer and shared reads.
unsafe impl Send for TensorBytes {}
// SAFETY: as above.
unsafe impl Sync for TensorBytes {}

impl TensorBytes {
    /// The first byte; 64-byte aligned for owned buffers, dtype-aligned for views.
    pub fn as_ptr(&self) -> *mut u8 {
        self.address.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes, pinned and kept alive for `self`'s lifetime.
        unsafe { std::slice::from_raw_parts(self.address.as_ptr(), self.len) }
    }

    /// The index entry (name, dtype, shape, file, codec) of these bytes.
    pub fn entry(&self) -> &Entry {
        &self.core.index.tensors[self.slot as usize]
    }
}

impl std::fmt::Debug for TensorBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entry = self.entry();
        f.debug_struct("TensorBytes")
            .field("name", &entry.name)
            .field("dtype", &entry.dtype)
            .field("shape", &entry.shape)
            .field("len", &self.len)
            .finish()
    }
}

impl Drop for TensorBytes {
    fn drop(&mut self) {
        // In a forked child the parent's cache is never locked (see the module comment).
        if self.core.epoch == fork_epoch() {
            let released = self.core.cache.unpin(self.slot);
            self.core.cache.settle(released);
        }
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;

/// Counts the forks this process descends from: bumped in the child by a `pthread_atfork`
/// handler, so noticing a fork costs one atomic load instead of a `getpid` syscall.
static FORK_EPOCH: AtomicU64 = AtomicU64::new(0);

fn fork_epoch() -> u64 {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: registers a handler that only performs an atomic add, which is
        // async-signal-safe as a fork child handler must be.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
    FORK_EPOCH.load(Ordering::Acquire)
}

extern "C" fn after_fork_in_child() {
    FORK_EPOCH.fetch_add(1, Ordering::AcqRel);
}

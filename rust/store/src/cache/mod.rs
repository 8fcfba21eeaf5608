//! The residency cache: which tensors are in memory, who pins them, and what to evict.
//!
//! Every tensor of the index has one slot: `Absent`; `Queued` (a prefetch reserved room and
//! waits for a read thread); `Loading` (one read in flight; other gets wait for it);
//! `Resident` (bytes in memory, pinned by live `TensorBytes`); or `Evicting` (a view's pages
//! being dropped outside the lock). The cache itself never does I/O: it decides under its
//! lock and hands back `Released` memory and `Reservation`s for the caller to act on once
//! the lock is released, so critical sections stay short.
//!
//! Reads in order of need: a `get` of a tensor whose prefetch is still queued takes the
//! reservation over and reads at once, in its own thread (the read thread skips it later):
//! a demand read never waits behind queued prefetches. Gets of a tensor being read wait
//! for that one read; when it fails, each of them gets its error (no read per waiter), and
//! a later `get` tries again. Memory evicted to admit a prefetch is returned by the thread
//! that queued it, before it queues it, not when a read thread reaches the job.
//!
//! Accounting: `resident` counts the charges of loaded entries, reads in flight and queued
//! prefetches (an owned buffer's capacity; a view's length); `pinned` counts entries
//! pinned by a live `TensorBytes` plus reads in flight for a `get`. Every admission and
//! unpin keeps `resident <= budget + pinned` (in fact `resident <= max(budget, pinned +
//! prefetches queued or in flight)`): unpinned entries are evicted least recently used
//! first, and only pinned bytes may push the cache over its budget (a `get` is always
//! served). A prefetch is admitted only within the budget, and only by evicting entries
//! that are not themselves unused prefetches; otherwise it is dropped. `Stats` reports
//! these charges as `charged_bytes`, and as `resident_bytes` the memory really held: owned
//! buffers, plus the pages of resident views that are in memory, each page once (a view's
//! pages may hold more than its length, or less while they are not faulted in).
//!
//! Recycling: a read that needs a large owned buffer and must evict first evicts the least
//! recently used entry holding a buffer of exactly that capacity (if one is among the oldest
//! entries), and refills that buffer: its pages are already faulted in, which makes the read
//! several times faster than unmapping one buffer and faulting in its twin. Streaming over a
//! model whose layers repeat the same shapes thus reuses the same few buffers. The price: an
//! entry of a shape no read asks for is evicted later than strict LRU order would (a model's
//! embedding stays cached from one forward pass to the next while the blocks stream through
//! the rest of the budget); it is evicted as soon as a read finds no buffer to recycle.

mod evict;
mod lru;
#[cfg(test)]
mod tests;

use std::ptr::NonNull;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::buffers::AlignedBuf;
use crate::error::{Result, StoreError};
use crate::index::Entry;
use crate::mapping::Loaded;
use crate::pages;
use crate::stats::{Counters, Stats};
use lru::Lru;

/// What admitting one tensor costs: its budget charge and, for a tensor that needs an owned
/// buffer, that buffer's capacity (an evicted buffer of exactly that capacity is reused).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Need {
    pub charge: u64,
    pub buffer_capacity: Option<usize>,
}

/// No tensor beyond this many bytes fits in a process (x86-64 and arm64 user address
/// spaces are 128 TiB); refusing them up front also keeps byte counts far from overflow.
const MAX_TENSOR_BYTES: u64 = 1 << 47;

/// How many of the least recently used entries are searched for a buffer to recycle: enough
/// to find one in any realistic mix of shapes, few enough to keep the lock short.
const RECYCLE_SEARCH: usize = 64;

impl Need {
    /// `None` for a tensor too large for any process to hold. `view`: the tensor is served
    /// as a view of its file's mapping (it needs no buffer; it is charged its length, the
    /// bytes a planner sizes it by, though the memory it holds is whole pages).
    pub fn for_entry(entry: &Entry, view: bool) -> Option<Need> {
        if entry.raw_length > MAX_TENSOR_BYTES {
            return None;
        }
        if view {
            return Some(Need {
                charge: entry.length,
                buffer_capacity: None,
            });
        }
        let capacity = AlignedBuf::capacity_for(entry.raw_length as usize)?;
        Some(Need {
            charge: capacity as u64,
            buffer_capacity: Some(capacity),
        })
    }
}

/// Memory evicted under the lock, to give back once it is released. Always pass it to
/// [`Cache::settle`]: until then the evicted views' slots stay `Evicting`.
#[derive(Default)]
pub(crate) struct Released {
    views: Vec<(u32, Loaded)>,
    buffers: Vec<AlignedBuf>,
}

impl Released {
    fn take_buffer(&mut self, capacity: usize) -> Option<AlignedBuf> {
        let at = self.buffers.iter().position(|b| b.capacity() == capacity)?;
        Some(self.buffers.swap_remove(at))
    }
}

/// Room reserved for one read that the caller must now perform, then report with
/// [`Cache::finish_load`]. `reuse` is an evicted buffer of the right capacity, if any.
pub(crate) struct Reservation {
    pub reuse: Option<AlignedBuf>,
    pub released: Released,
}

/// The outcome of [`Cache::acquire`].
pub(crate) enum Acquired {
    /// The bytes are resident and now pinned. `waited`: a read in flight was waited for.
    Pinned {
        address: NonNull<u8>,
        len: usize,
        waited: bool,
    },
    /// The caller must read the tensor (room is reserved) and call `finish_load`.
    MustLoad(Reservation),
    /// The read this caller waited for failed: its error.
    Failed(StoreError),
}

enum Slot {
    Absent,
    /// Room reserved by a prefetch that no read thread has started; `reuse` is the evicted
    /// buffer it will refill.
    Queued {
        need: Need,
        reuse: Option<AlignedBuf>,
    },
    /// Read number `read` in flight, for a `get` (`demand`) or a prefetch; `waiters` gets
    /// wait for it.
    Loading {
        demand: bool,
        need: Need,
        read: u64,
        waiters: u32,
    },
    Resident(Resident),
    Evicting,
}

struct Resident {
    loaded: Loaded,
    charge: u64,
    pins: u32,
    /// Loaded by a prefetch and not yet asked for: a prefetch never evicts these.
    prefetched_unused: bool,
}

/// The error of a failed read, kept until each of the gets that waited for it has a copy.
struct Failure {
    read: u64,
    error: StoreError,
    waiting: u32,
}

struct State {
    slots: Vec<Slot>,
    lru: Lru,
    resident: u64,
    pinned: u64,
    peak: u64,
    /// The budget in force: the configured one, or 0 once the store is closed.
    budget: Option<u64>,
    /// Reads started so far: numbers each read, so a waiter knows whether its read ended.
    reads: u64,
    failures: Vec<Failure>,
}

pub(crate) struct Cache {
    state: Mutex<State>,
    /// Notified whenever a slot leaves `Loading` or `Evicting`.
    settled: Condvar,
    configured_budget: Option<u64>,
    pub counters: Counters,
}

impl Cache {
    pub fn new(slots: usize, budget: Option<u64>) -> Cache {
        let state = State {
            slots: (0..slots).map(|_| Slot::Absent).collect(),
            lru: Lru::new(slots),
            resident: 0,
            pinned: 0,
            peak: 0,
            budget,
            reads: 0,
            failures: Vec::new(),
        };
        Cache {
            state: Mutex::new(state),
            settled: Condvar::new(),
            configured_budget: budget,
            counters: Counters::default(),
        }
    }

    /// The state lock. No code holding it can panic mid-update, so a poisoned lock (a
    /// panic elsewhere in the thread that held it) still guards consistent state.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.settled
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// For `get`: pins the resident entry, waits for a read in flight (and gets its error
    /// if it fails), or reserves room for the caller to read it, taking over a queued
    /// prefetch or evicting least recently used entries as needed.
    pub fn acquire(&self, slot: u32, need: Need) -> Acquired {
        let mut state = self.lock();
        let mut waited = false;
        // The read this get waits for, once it has counted itself among its waiters.
        let mut waiting_for: Option<u64> = None;
        loop {
            if let Some(read) = waiting_for {
                if state.is_reading(slot, read) {
                    state = self.wait(state);
                    continue;
                }
                waiting_for = None;
                if let Some(error) = state.take_failure(read) {
                    Counters::add(&self.counters.hits, 1);
                    return Acquired::Failed(error);
                }
            }
            match &mut state.slots[slot as usize] {
                Slot::Resident(_) => {
                    let (address, len, prefetched) = state.pin(slot);
                    Counters::add(&self.counters.hits, 1);
                    Counters::add(&self.counters.prefetch_hits, u64::from(prefetched));
                    return Acquired::Pinned {
                        address,
                        len,
                        waited,
                    };
                }
                Slot::Loading { read, waiters, .. } => {
                    *waiters += 1;
                    waiting_for = Some(*read);
                    waited = true;
                    state = self.wait(state);
                }
                Slot::Evicting => {
                    waited = true;
                    state = self.wait(state);
                }
                Slot::Queued { .. } => {
                    Counters::add(&self.counters.misses, 1);
                    Counters::add(&self.counters.prefetch_late, 1);
                    let taken = state.start_queued(slot, true);
                    return Acquired::MustLoad(taken.expect("the slot is queued"));
                }
                Slot::Absent => {
                    Counters::add(&self.counters.misses, 1);
                    let mut released = Released::default();
                    state.evict_until_fits(need, false, &mut released, &self.counters);
                    let reuse = state.reserve(slot, need, true, &mut released, &self.counters);
                    return Acquired::MustLoad(Reservation { reuse, released });
                }
            }
        }
    }

    /// For a prefetch: reserves room for reading an absent tensor, within the budget and
    /// without evicting unused prefetches, and marks it queued. Returns the memory evicted
    /// for it, for the caller to `settle` at once; `None` when there is nothing to do
    /// (resident, queued or in flight: a resident entry is marked recently used) or no room
    /// (counted as dropped).
    pub fn reserve_prefetch(&self, slot: u32, need: Need) -> Option<Released> {
        let mut state = self.lock();
        match &state.slots[slot as usize] {
            Slot::Absent => {}
            Slot::Resident(entry) if entry.pins == 0 => {
                state.lru.touch(slot);
                return None;
            }
            _ => return None,
        }
        if !state.prefetch_fits(need.charge) {
            Counters::add(&self.counters.prefetch_dropped, 1);
            return None;
        }
        let mut released = Released::default();
        state.evict_until_fits(need, true, &mut released, &self.counters);
        state.reserve(slot, need, false, &mut released, &self.counters);
        Some(released)
    }

    /// For a read thread: starts the read of a queued prefetch. `None` when a `get` took it
    /// over (or it was cancelled): there is nothing left to do.
    pub fn start_prefetch(&self, slot: u32) -> Option<Reservation> {
        self.lock().start_queued(slot, false)
    }

    /// Gives back the room of a queued prefetch that will never run (if it is still queued).
    pub fn cancel_prefetch(&self, slot: u32) {
        let mut state = self.lock();
        let Slot::Queued { need, .. } = state.slots[slot as usize] else {
            return;
        };
        state.resident -= need.charge;
        let queued = std::mem::replace(&mut state.slots[slot as usize], Slot::Absent);
        drop(state);
        drop(queued); // frees its buffer, outside the lock
    }

    /// Records the end of a read reserved by `acquire` or `start_prefetch` and wakes the
    /// waiters; a failure's error goes to each of them. For the reader, returns its bytes'
    /// address and length (pinned for a `get`), or its error.
    pub fn finish_load(&self, slot: u32, result: Result<Loaded>) -> Result<(NonNull<u8>, usize)> {
        let mut state = self.lock();
        let taken = std::mem::replace(&mut state.slots[slot as usize], Slot::Absent);
        let Slot::Loading {
            demand,
            need,
            read,
            waiters,
        } = taken
        else {
            unreachable!("finish_load of a tensor that is not loading");
        };
        let outcome = match result {
            Ok(loaded) => {
                let bytes = (loaded.address(), loaded.len());
                let entry = Resident {
                    loaded,
                    charge: need.charge,
                    pins: u32::from(demand),
                    prefetched_unused: !demand,
                };
                state.slots[slot as usize] = Slot::Resident(entry);
                if !demand {
                    state.lru.push_back(slot);
                }
                Ok(bytes)
            }
            Err(error) => {
                state.resident -= need.charge;
                if demand {
                    state.pinned -= need.charge;
                }
                if waiters > 0 {
                    let error = error.duplicate();
                    let waiting = waiters;
                    state.failures.push(Failure {
                        read,
                        error,
                        waiting,
                    });
                }
                Err(error)
            }
        };
        drop(state);
        self.settled.notify_all();
        outcome
    }

    /// Drops one pin; evicts what the budget no longer covers. Returns memory to `settle`.
    pub fn unpin(&self, slot: u32) -> Released {
        let mut state = self.lock();
        let Slot::Resident(entry) = &mut state.slots[slot as usize] else {
            unreachable!("unpin of a tensor that is not resident");
        };
        entry.pins -= 1;
        let mut released = Released::default();
        if entry.pins == 0 {
            let charge = entry.charge;
            state.pinned -= charge;
            state.lru.push_back(slot);
            state.evict_over_budget(&mut released, &self.counters);
        }
        released
    }

    /// Gives back evicted memory outside the lock: drops the pages of views (then lets gets
    /// of those tensors proceed) and frees buffers.
    pub fn settle(&self, released: Released) {
        drop(released.buffers);
        if released.views.is_empty() {
            return;
        }
        for (_, loaded) in &released.views {
            loaded.release_pages();
        }
        let mut state = self.lock();
        for (slot, _) in &released.views {
            state.slots[*slot as usize] = Slot::Absent;
        }
        drop(state);
        self.settled.notify_all();
    }

    /// Used when the store closes: evicts every unpinned entry now and each pinned one as
    /// soon as its last pin goes (the budget becomes 0).
    pub fn close(&self) {
        let mut state = self.lock();
        state.budget = Some(0);
        let mut released = Released::default();
        state.evict_over_budget(&mut released, &self.counters);
        drop(state);
        self.settle(released);
    }

    /// Fills `stats`: event counters, a consistent snapshot of the charges, and the memory
    /// held (view pages counted by `mincore`, after the lock is released).
    pub fn snapshot(&self, stats: &mut Stats) {
        self.counters.fill(stats);
        let (owned, views) = {
            let state = self.lock();
            stats.charged_bytes = state.resident;
            stats.peak_resident_bytes = state.peak;
            stats.pinned_bytes = state.pinned;
            state.held_memory()
        };
        stats.budget = self.configured_budget;
        // The views' mappings outlive this call (the runtime holds them); a view evicted
        // meanwhile only makes the count smaller.
        stats.resident_bytes = owned + pages::resident_bytes(&views);
    }
}

impl State {
    fn fits(&self, charge: u64) -> bool {
        self.budget.map_or(true, |budget| {
            self.resident.saturating_add(charge) <= budget
        })
    }

    /// Pins a resident entry; returns its bytes and whether an unused prefetch served it.
    fn pin(&mut self, slot: u32) -> (NonNull<u8>, usize, bool) {
        let Slot::Resident(entry) = &mut self.slots[slot as usize] else {
            unreachable!("pin of a tensor that is not resident");
        };
        entry.pins += 1;
        let first_pin = entry.pins == 1;
        let charge = entry.charge;
        let prefetched = std::mem::take(&mut entry.prefetched_unused);
        let bytes = (entry.loaded.address(), entry.loaded.len(), prefetched);
        if first_pin {
            self.pinned += charge;
            self.lru.remove(slot);
        }
        bytes
    }

    /// Reserves room for reading `slot` (a `get`'s read, or a prefetch queued for a read
    /// thread) and counts its bytes. Returns a just-evicted buffer of the right capacity to
    /// refill, rather than freeing one buffer to allocate its twin.
    fn reserve(
        &mut self,
        slot: u32,
        need: Need,
        demand: bool,
        released: &mut Released,
        counters: &Counters,
    ) -> Option<AlignedBuf> {
        let reuse = need
            .buffer_capacity
            .and_then(|capacity| released.take_buffer(capacity));
        Counters::add(&counters.buffers_reused, u64::from(reuse.is_some()));
        self.resident += need.charge;
        self.peak = self.peak.max(self.resident);
        if !demand {
            self.slots[slot as usize] = Slot::Queued { need, reuse };
            return None;
        }
        self.pinned += need.charge;
        self.slots[slot as usize] = self.loading(need, true);
        reuse
    }

    /// The slot state of a read starting now, under a fresh read number.
    fn loading(&mut self, need: Need, demand: bool) -> Slot {
        self.reads += 1;
        Slot::Loading {
            demand,
            need,
            read: self.reads,
            waiters: 0,
        }
    }

    /// Whether `slot` is still being read by read number `read`.
    fn is_reading(&self, slot: u32, read: u64) -> bool {
        matches!(self.slots[slot as usize], Slot::Loading { read: r, .. } if r == read)
    }

    /// Starts the read of a queued prefetch: by a read thread, or by a `get` (`demand`)
    /// that takes the reservation over to read the tensor itself. `None` when not queued.
    fn start_queued(&mut self, slot: u32, demand: bool) -> Option<Reservation> {
        let Slot::Queued { need, .. } = self.slots[slot as usize] else {
            return None;
        };
        if demand {
            self.pinned += need.charge;
        }
        let loading = self.loading(need, demand);
        let Slot::Queued { reuse, .. } = std::mem::replace(&mut self.slots[slot as usize], loading)
        else {
            unreachable!("checked above");
        };
        Some(Reservation {
            reuse,
            released: Released::default(),
        })
    }

    /// One waiter's copy of the error of failed read `read`, if that read failed.
    fn take_failure(&mut self, read: u64) -> Option<StoreError> {
        let at = self.failures.iter().position(|f| f.read == read)?;
        let failure = &mut self.failures[at];
        failure.waiting -= 1;
        match failure.waiting {
            0 => Some(self.failures.swap_remove(at).error),
            _ => Some(failure.error.duplicate()),
        }
    }

    /// The memory held now: owned buffers (resident, being read into, or kept for a queued
    /// prefetch) and the address ranges of resident views, for `pages::resident_bytes`.
    fn held_memory(&self) -> (u64, Vec<(usize, usize)>) {
        let mut owned = 0;
        let mut views = Vec::new();
        for slot in &self.slots {
            match slot {
                Slot::Resident(entry) if entry.loaded.buffer_capacity().is_some() => {
                    owned += entry.charge;
                }
                Slot::Resident(entry) => {
                    views.push((entry.loaded.address().as_ptr() as usize, entry.loaded.len()));
                }
                Slot::Loading { need, .. } if need.buffer_capacity.is_some() => {
                    owned += need.charge;
                }
                Slot::Queued {
                    reuse: Some(buffer),
                    ..
                } => owned += buffer.capacity() as u64,
                _ => {}
            }
        }
        (owned, views)
    }
}

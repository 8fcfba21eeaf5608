//! The residency cache: which tensors are in memory, who pins them, and what to evict.
//!
//! Every tensor of the index has one slot: `Absent`, `Loading` (one read in flight; others
//! wait for it), `Resident` (bytes in memory, pinned by live `TensorBytes`), or `Evicting`
//! (a view's pages being dropped outside the lock). The cache itself never does I/O: it
//! decides under its lock and hands back `Released` memory and `Reservation`s for the
//! caller to act on once the lock is released, so critical sections stay short.
//!
//! Accounting: `resident` counts loaded entries and reads in flight; `pinned` counts entries
//! pinned by a live `TensorBytes` plus reads in flight for a `get`. Every admission and
//! unpin keeps `resident <= budget + pinned` (in fact `resident <= max(budget, pinned +
//! prefetches in flight)`): unpinned entries are evicted least recently used first, and
//! only pinned bytes may push the cache over its budget (a `get` is always served). A prefetch is admitted only within the budget, and only by evicting entries that
//! are not themselves unused prefetches; otherwise it is dropped.
//!
//! Recycling: a read that needs a large owned buffer and must evict first evicts the least
//! recently used entry holding a buffer of exactly that capacity (if one is among the oldest
//! entries), and refills that buffer: its pages are already faulted in, which makes the read
//! several times faster than unmapping one buffer and faulting in its twin. Streaming over a
//! model whose layers repeat the same shapes thus reuses the same few buffers. The price: an
//! entry of a shape no read asks for is evicted later than strict LRU order would (a model's
//! embedding stays cached from one forward pass to the next while the blocks stream through
//! the rest of the budget); it is evicted as soon as a read finds no buffer to recycle.

use std::ptr::NonNull;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::buffers::{AlignedBuf, RECYCLE_MIN};
use crate::error::Result;
use crate::index::Entry;
use crate::mapping::Loaded;
use crate::stats::{Counters, Stats};

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
    /// as a view of its file's mapping (it needs no buffer).
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
}

enum Slot {
    Absent,
    Loading { demand: bool, charge: u64 },
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

struct State {
    slots: Vec<Slot>,
    lru: Lru,
    resident: u64,
    pinned: u64,
    peak: u64,
    /// The budget in force: the configured one, or 0 once the store is closed.
    budget: Option<u64>,
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

    /// For `get`: pins the resident entry, waits for a read in flight, or reserves room for
    /// the caller to read it (evicting least recently used entries as needed).
    pub fn acquire(&self, slot: u32, need: Need) -> Acquired {
        let mut state = self.lock();
        let mut waited = false;
        loop {
            match &state.slots[slot as usize] {
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
                Slot::Loading { .. } | Slot::Evicting => {
                    waited = true;
                    state = self
                        .settled
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Slot::Absent => {
                    Counters::add(&self.counters.misses, 1);
                    let mut released = Released::default();
                    state.evict_until_fits(need, false, &mut released, &self.counters);
                    let reservation = state.reserve(slot, need, true, released);
                    return Acquired::MustLoad(self.count_reuse(reservation));
                }
            }
        }
    }

    /// For a prefetch: reserves room for reading an absent tensor, within the budget and
    /// without evicting unused prefetches. `None` when there is nothing to do (resident or in
    /// flight: a resident entry is marked recently used) or no room (counted as dropped).
    pub fn reserve_prefetch(&self, slot: u32, need: Need) -> Option<Reservation> {
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
        let reservation = state.reserve(slot, need, false, released);
        Some(self.count_reuse(reservation))
    }

    fn count_reuse(&self, reservation: Reservation) -> Reservation {
        if reservation.reuse.is_some() {
            Counters::add(&self.counters.buffers_reused, 1);
        }
        reservation
    }

    /// Records the end of a read reserved by `acquire` or `reserve_prefetch` and wakes the
    /// waiters. For a `get`, returns its (pinned) bytes' address and length, or its error.
    pub fn finish_load(&self, slot: u32, result: Result<Loaded>) -> Result<(NonNull<u8>, usize)> {
        let mut state = self.lock();
        let Slot::Loading { demand, charge } = state.slots[slot as usize] else {
            unreachable!("finish_load of a tensor that is not loading");
        };
        let outcome = match result {
            Ok(loaded) => {
                let bytes = (loaded.address(), loaded.len());
                let pins = u32::from(demand);
                let entry = Resident {
                    loaded,
                    charge,
                    pins,
                    prefetched_unused: !demand,
                };
                state.slots[slot as usize] = Slot::Resident(entry);
                if !demand {
                    state.lru.push_back(slot);
                }
                Ok(bytes)
            }
            Err(error) => {
                state.resident -= charge;
                if demand {
                    state.pinned -= charge;
                }
                state.slots[slot as usize] = Slot::Absent;
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

    /// Fills `stats` (event counters and a consistent snapshot of the byte counts).
    pub fn snapshot(&self, stats: &mut Stats) {
        self.counters.fill(stats);
        let state = self.lock();
        stats.resident_bytes = state.resident;
        stats.peak_resident_bytes = state.peak;
        stats.pinned_bytes = state.pinned;
        stats.budget = self.configured_budget;
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

    /// Marks `slot` as loading and counts its bytes; reuses a just-evicted buffer of the
    /// right capacity rather than freeing one buffer to allocate its twin.
    fn reserve(
        &mut self,
        slot: u32,
        need: Need,
        demand: bool,
        mut released: Released,
    ) -> Reservation {
        let reuse = need
            .buffer_capacity
            .and_then(|capacity| released.take_buffer(capacity));
        self.slots[slot as usize] = Slot::Loading {
            demand,
            charge: need.charge,
        };
        self.resident += need.charge;
        if demand {
            self.pinned += need.charge;
        }
        self.peak = self.peak.max(self.resident);
        Reservation { reuse, released }
    }

    /// Whether a prefetch of `charge` bytes fits the budget once unpinned entries that are
    /// not unused prefetches are evicted (walking least recently used first).
    fn prefetch_fits(&self, charge: u64) -> bool {
        let Some(budget) = self.budget else {
            return true;
        };
        let mut resident = self.resident.saturating_add(charge);
        let mut cursor = self.lru.front();
        while resident > budget {
            let Some(slot) = cursor else {
                return false;
            };
            if let Slot::Resident(entry) = &self.slots[slot as usize] {
                if !entry.prefetched_unused {
                    resident -= entry.charge.min(resident);
                }
            }
            cursor = self.lru.next(slot);
        }
        true
    }

    /// Evicts unpinned entries (sparing unused prefetches when `spare_prefetched`) until
    /// `need` fits or nothing evictable is left: first one whose buffer `need` can recycle,
    /// then least recently used first.
    fn evict_until_fits(
        &mut self,
        need: Need,
        spare_prefetched: bool,
        out: &mut Released,
        counters: &Counters,
    ) {
        let charge = need.charge;
        if !self.fits(charge) {
            if let Some(slot) = self.recyclable(need, spare_prefetched) {
                self.evict(slot, out, counters);
            }
        }
        let mut cursor = self.lru.front();
        while !self.fits(charge) {
            let Some(slot) = cursor else {
                return;
            };
            cursor = self.lru.next(slot);
            let spared = matches!(&self.slots[slot as usize],
                Slot::Resident(entry) if spare_prefetched && entry.prefetched_unused);
            if !spared {
                self.evict(slot, out, counters);
            }
        }
    }

    /// The least recently used evictable entry, among the oldest `RECYCLE_SEARCH`, holding a
    /// buffer of exactly the (large) capacity `need` asks for.
    fn recyclable(&self, need: Need, spare_prefetched: bool) -> Option<u32> {
        let capacity = need.buffer_capacity.filter(|&c| c >= RECYCLE_MIN)?;
        let mut cursor = self.lru.front();
        for _ in 0..RECYCLE_SEARCH {
            let slot = cursor?;
            if let Slot::Resident(entry) = &self.slots[slot as usize] {
                let spared = spare_prefetched && entry.prefetched_unused;
                if !spared && entry.loaded.buffer_capacity() == Some(capacity) {
                    return Some(slot);
                }
            }
            cursor = self.lru.next(slot);
        }
        None
    }

    /// Evicts least recently used entries while the cache is over its budget: once pins
    /// go, memory they pushed over the budget is given back at once.
    fn evict_over_budget(&mut self, out: &mut Released, counters: &Counters) {
        let Some(budget) = self.budget else {
            return;
        };
        while self.resident > budget {
            let Some(slot) = self.lru.front() else {
                return;
            };
            self.evict(slot, out, counters);
        }
    }

    fn evict(&mut self, slot: u32, out: &mut Released, counters: &Counters) {
        self.lru.remove(slot);
        let taken = std::mem::replace(&mut self.slots[slot as usize], Slot::Absent);
        let Slot::Resident(entry) = taken else {
            unreachable!("only resident entries are in the LRU list");
        };
        self.resident -= entry.charge;
        Counters::add(&counters.evictions, 1);
        match entry.loaded {
            Loaded::Owned(buffer) => out.buffers.push(buffer),
            view => {
                // Until its pages are dropped, a get must not map them in again.
                self.slots[slot as usize] = Slot::Evicting;
                out.views.push((slot, view));
            }
        }
    }
}

const NIL: u32 = u32::MAX;

/// A doubly linked list of slots in least-recently-used order (front = oldest), threaded
/// through per-slot arrays so every operation is O(1) and allocation-free.
struct Lru {
    prev: Vec<u32>,
    next: Vec<u32>,
    linked: Vec<bool>,
    head: u32,
    tail: u32,
}

impl Lru {
    fn new(slots: usize) -> Lru {
        Lru {
            prev: vec![NIL; slots],
            next: vec![NIL; slots],
            linked: vec![false; slots],
            head: NIL,
            tail: NIL,
        }
    }

    fn front(&self) -> Option<u32> {
        (self.head != NIL).then_some(self.head)
    }

    fn next(&self, slot: u32) -> Option<u32> {
        let next = self.next[slot as usize];
        (next != NIL).then_some(next)
    }

    fn push_back(&mut self, slot: u32) {
        debug_assert!(!self.linked[slot as usize]);
        let at = slot as usize;
        self.linked[at] = true;
        self.prev[at] = self.tail;
        self.next[at] = NIL;
        match self.tail {
            NIL => self.head = slot,
            tail => self.next[tail as usize] = slot,
        }
        self.tail = slot;
    }

    fn remove(&mut self, slot: u32) {
        let at = slot as usize;
        if !self.linked[at] {
            return;
        }
        let (prev, next) = (self.prev[at], self.next[at]);
        match prev {
            NIL => self.head = next,
            prev => self.next[prev as usize] = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.prev[next as usize] = prev,
        }
        self.linked[at] = false;
    }

    /// Moves a linked slot to the most recently used end.
    fn touch(&mut self, slot: u32) {
        if self.linked[slot as usize] {
            self.remove(slot);
            self.push_back(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::StoreError;
    use std::sync::mpsc;
    use std::time::Duration;

    const UNIT: usize = 1 << 20;

    fn need() -> Need {
        Need {
            charge: UNIT as u64,
            buffer_capacity: Some(UNIT),
        }
    }

    fn owned(reuse: Option<AlignedBuf>) -> Result<Loaded> {
        let buffer = reuse.unwrap_or_else(|| AlignedBuf::new(UNIT).unwrap());
        Ok(Loaded::Owned(buffer))
    }

    fn read_directly(cache: &Cache, slot: u32) -> NonNull<u8> {
        let Acquired::MustLoad(reservation) = cache.acquire(slot, need()) else {
            panic!("slot {slot} should be absent");
        };
        cache.settle(reservation.released);
        cache.finish_load(slot, owned(reservation.reuse)).unwrap().0
    }

    fn prefetch(cache: &Cache, slot: u32) -> bool {
        let Some(reservation) = cache.reserve_prefetch(slot, need()) else {
            return false;
        };
        cache.settle(reservation.released);
        cache.finish_load(slot, owned(reservation.reuse)).is_ok()
    }

    fn stats(cache: &Cache) -> Stats {
        let mut stats = Stats::default();
        cache.snapshot(&mut stats);
        stats
    }

    #[test]
    fn a_get_of_a_read_in_flight_waits_for_it() {
        let cache = Cache::new(1, None);
        let Acquired::MustLoad(_) = cache.acquire(0, need()) else {
            panic!("first acquire must read");
        };
        std::thread::scope(|scope| {
            let (sender, receiver) = mpsc::channel();
            let cache = &cache;
            scope.spawn(move || {
                let outcome = cache.acquire(0, need());
                sender
                    .send(matches!(outcome, Acquired::Pinned { waited: true, .. }))
                    .unwrap();
            });
            // Not a timing assertion: the waiter must not return while the read is in flight.
            let early = receiver.recv_timeout(Duration::from_millis(50));
            assert!(
                early.is_err(),
                "the second get returned before the read finished"
            );
            cache.finish_load(0, owned(None)).unwrap();
            assert!(
                receiver.recv().unwrap(),
                "the second get waited and then pinned"
            );
        });
        let stats = stats(&cache);
        assert_eq!((stats.hits, stats.misses), (1, 1));
        assert_eq!(stats.pinned_bytes, UNIT as u64);
    }

    #[test]
    fn a_failed_read_releases_its_reservation() {
        let cache = Cache::new(1, Some(UNIT as u64));
        let Acquired::MustLoad(_) = cache.acquire(0, need()) else {
            panic!("first acquire must read");
        };
        assert_eq!(stats(&cache).resident_bytes, UNIT as u64);
        let failure = Err(StoreError::InvalidArgument("boom".into()));
        assert!(cache.finish_load(0, failure).is_err());
        let after = stats(&cache);
        assert_eq!((after.resident_bytes, after.pinned_bytes), (0, 0));
        assert!(
            matches!(cache.acquire(0, need()), Acquired::MustLoad(_)),
            "absent again"
        );
    }

    #[test]
    fn prefetch_spares_unused_prefetches_and_pins() {
        let cache = Cache::new(4, Some(2 * UNIT as u64));
        assert!(prefetch(&cache, 0) && prefetch(&cache, 1));
        assert!(!prefetch(&cache, 2), "would evict an unused prefetch");
        assert_eq!(stats(&cache).prefetch_dropped, 1);

        assert!(matches!(cache.acquire(0, need()), Acquired::Pinned { .. }));
        assert!(!prefetch(&cache, 2), "would evict a pinned entry");
        drop(cache.unpin(0));
        assert!(
            prefetch(&cache, 2),
            "evicts 0, used and unpinned, and spares 1"
        );

        assert!(matches!(cache.acquire(1, need()), Acquired::Pinned { .. }));
        // A demand read may evict anything unpinned, unused prefetches included (slot 2).
        assert!(matches!(cache.acquire(0, need()), Acquired::MustLoad(_)));
        let stats = stats(&cache);
        assert_eq!(
            (stats.prefetch_hits, stats.evictions, stats.prefetch_dropped),
            (2, 2, 2)
        );
    }

    #[test]
    fn a_demand_read_evicts_in_lru_order_and_reuses_the_buffer() {
        let cache = Cache::new(3, Some(2 * UNIT as u64));
        let first = read_directly(&cache, 0);
        read_directly(&cache, 1);
        cache.settle(cache.unpin(0));
        cache.settle(cache.unpin(1));
        // Slot 0 is the least recently used: its buffer becomes slot 2's.
        assert_eq!(read_directly(&cache, 2), first);
        assert!(matches!(cache.acquire(1, need()), Acquired::Pinned { .. }));
        let stats = stats(&cache);
        assert_eq!(
            (stats.evictions, stats.resident_bytes),
            (1, 2 * UNIT as u64)
        );
    }
}

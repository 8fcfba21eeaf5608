//! The eviction policy: which unpinned entries go, and in what order, to admit a read or to
//! bring the cache back within its budget (see the module documentation of `cache`).

use super::{Need, Released, Slot, State, RECYCLE_SEARCH};
use crate::buffers::RECYCLE_MIN;
use crate::mapping::Loaded;
use crate::stats::Counters;

impl State {
    /// Whether a prefetch of `charge` bytes fits the budget once unpinned entries that are
    /// not unused prefetches are evicted (walking least recently used first).
    pub(super) fn prefetch_fits(&self, charge: u64) -> bool {
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
    pub(super) fn evict_until_fits(
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
    pub(super) fn evict_over_budget(&mut self, out: &mut Released, counters: &Counters) {
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

//! Property tests of the residency cache, through the public `Store`:
//! - without read threads the cache is deterministic, so a reference model of the
//!   documented policy (pins never evicted, buffers recycled by capacity, otherwise
//!   unpinned entries evicted least recently used first, only pinned bytes may exceed the
//!   budget) must predict every counter exactly, with views and with owned buffers;
//! - with read threads, prefetches and several callers, the invariants hold at every step:
//!   `charged <= budget + pinned`, every served byte right, and everything released at
//!   the end.

use std::collections::VecDeque;
use std::path::Path;

use bigmodel_store::writer::{StoreWriter, TensorPlan, WriterOptions};
use bigmodel_store::{Codec, DType, Stats, Store, StoreOptions, TensorBytes};
use proptest::prelude::*;

/// Name-dependent bytes, so serving one tensor's bytes under another's name is caught.
fn pattern(index: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + index * 17 + 5) as u8).collect()
}

/// Writes tensors `t0..` of `sizes` bytes (F32, so sizes are multiples of 4).
fn write_store(dir: &Path, sizes: &[usize], codecs: &[Codec]) {
    let plan = sizes
        .iter()
        .zip(codecs)
        .enumerate()
        .map(|(i, (&size, &codec))| TensorPlan {
            name: format!("t{i}"),
            dtype: DType::F32,
            shape: vec![(size / 4) as u64],
            codec,
        })
        .collect();
    let writer = StoreWriter::create(dir, plan, WriterOptions::default()).unwrap();
    for (i, &size) in sizes.iter().enumerate() {
        writer.write(&format!("t{i}"), &pattern(i, size)).unwrap();
    }
    writer.commit().unwrap();
}

fn check_bytes(bytes: &TensorBytes, index: usize) {
    assert_eq!(
        bytes.as_slice(),
        &pattern(index, bytes.len())[..],
        "t{index}"
    );
}

#[derive(Debug, Clone)]
enum Op {
    Get(usize),
    Release(usize),
    Prefetch(usize),
}

fn ops(tensors: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        5 => (0..tensors).prop_map(Op::Get),
        3 => any::<usize>().prop_map(Op::Release),
        1 => (0..tensors).prop_map(Op::Prefetch),
    ];
    prop::collection::vec(op, 1..120)
}

/// Buffers from this capacity on are recycled (the store's `RECYCLE_MIN`, 64 KiB).
const RECYCLE_MIN: u64 = 64 << 10;
/// The largest page size of the platforms the store runs on (x86-64 4 KiB, arm64 up to 64 KiB).
const PAGE: u64 = 64 << 10;

/// The documented policy (see the `cache` module), written as plainly as possible: pins are
/// never evicted; a read that does not fit first evicts the least recently used entry
/// holding an owned buffer of exactly the capacity it needs (when that capacity is at least
/// `RECYCLE_MIN`), then least recently used entries until it fits; an evicted buffer of
/// exactly the needed capacity is refilled (`buffers_reused`); an unpin evicts least
/// recently used entries while the cache is over its budget. (The cache searches only the
/// 64 oldest entries for a buffer to recycle; these stores have at most 10.)
struct Model {
    budget: Option<u64>,
    charges: Vec<u64>,
    /// The owned buffer's capacity of each tensor (`None`: served as a view).
    buffers: Vec<Option<u64>>,
    pins: Vec<u32>,
    resident: Vec<bool>,
    /// Resident and unpinned, least recently used first.
    lru: VecDeque<usize>,
    stats: Stats,
}

impl Model {
    fn new(budget: Option<u64>, charges: Vec<u64>, buffers: Vec<Option<u64>>) -> Model {
        let count = charges.len();
        Model {
            budget,
            charges,
            buffers,
            pins: vec![0; count],
            resident: vec![false; count],
            lru: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    fn get(&mut self, t: usize) {
        if self.resident[t] {
            self.stats.hits += 1;
            if self.pins[t] == 0 {
                self.lru.retain(|&x| x != t);
                self.stats.pinned_bytes += self.charges[t];
            }
        } else {
            self.stats.misses += 1;
            let charge = self.charges[t];
            let mut evicted = Vec::new();
            if self.over_budget(charge) {
                if let Some(at) = self.recyclable(t) {
                    evicted.push(self.evict_at(at));
                }
            }
            while self.over_budget(charge) && !self.lru.is_empty() {
                evicted.push(self.evict_at(0));
            }
            let need = self.buffers[t];
            if need.is_some() && evicted.iter().any(|&e| self.buffers[e] == need) {
                self.stats.buffers_reused += 1;
            }
            self.resident[t] = true;
            self.stats.charged_bytes += charge;
            self.stats.pinned_bytes += charge;
        }
        self.pins[t] += 1;
    }

    /// Where in the LRU order the oldest entry with a buffer `t` can refill is.
    fn recyclable(&self, t: usize) -> Option<usize> {
        let need = self.buffers[t].filter(|&capacity| capacity >= RECYCLE_MIN)?;
        self.lru.iter().position(|&e| self.buffers[e] == Some(need))
    }

    fn release(&mut self, t: usize) {
        self.pins[t] -= 1;
        if self.pins[t] == 0 {
            self.stats.pinned_bytes -= self.charges[t];
            self.lru.push_back(t);
            while self.over_budget(0) && !self.lru.is_empty() {
                self.evict_at(0);
            }
        }
    }

    fn over_budget(&self, extra: u64) -> bool {
        self.budget
            .is_some_and(|b| self.stats.charged_bytes + extra > b)
    }

    fn evict_at(&mut self, at: usize) -> usize {
        let t = self.lru.remove(at).expect("in the LRU list");
        self.resident[t] = false;
        self.stats.charged_bytes -= self.charges[t];
        self.stats.evictions += 1;
        t
    }
}

/// What each tensor costs in the budget, measured (not assumed): the pinned bytes of one
/// `get` on a store opened with `options`.
fn measured_charges(dir: &Path, count: usize, options: StoreOptions) -> Vec<u64> {
    let store = Store::open(dir, options).unwrap();
    (0..count)
        .map(|t| {
            let bytes = store.get(&format!("t{t}")).unwrap();
            check_bytes(&bytes, t);
            store.stats().pinned_bytes
        })
        .collect()
}

fn sizes_and_budget() -> impl Strategy<Value = (Vec<usize>, Vec<Codec>, Option<u64>)> {
    let size = prop_oneof![Just(4usize), 1usize..64, 1usize..4096, 16_000usize..20_000];
    let codec = prop_oneof![3 => Just(Codec::None), 1 => Just(Codec::Zstd)];
    (
        prop::collection::vec((size.prop_map(|s| s * 4), codec), 2..10),
        prop_oneof![1 => Just(None), 6 => (0u64..200_000).prop_map(Some)],
    )
        .prop_map(|(tensors, budget)| {
            let (sizes, codecs) = tensors.into_iter().unzip();
            (sizes, codecs, budget)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn a_single_caller_sees_exactly_the_documented_lru_policy(
        (sizes, codecs, budget) in sizes_and_budget(),
        zero_copy in any::<bool>(),
        operations in ops(10),
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_store(dir.path(), &sizes, &codecs);
        let options = StoreOptions { max_resident: budget, read_threads: 0, zero_copy, ..StoreOptions::default() };
        let charges = measured_charges(dir.path(), sizes.len(), options.clone());
        // Served as views: uncompressed tensors of a zero-copy store (the writer aligns them).
        let buffers = codecs
            .iter()
            .zip(&charges)
            .map(|(&codec, &charge)| (codec == Codec::Zstd || !zero_copy).then_some(charge))
            .collect();
        let store = Store::open(dir.path(), options).unwrap();
        let mut model = Model::new(budget, charges, buffers);
        let mut held: Vec<(usize, TensorBytes)> = Vec::new();
        for op in operations {
            match op {
                Op::Get(t) => {
                    let t = t % sizes.len();
                    let bytes = store.get(&format!("t{t}")).unwrap();
                    check_bytes(&bytes, t);
                    model.get(t);
                    held.push((t, bytes));
                }
                Op::Release(k) if !held.is_empty() => {
                    let (t, bytes) = held.swap_remove(k % held.len());
                    drop(bytes);
                    model.release(t);
                }
                Op::Release(_) => {}
                // No read thread: a prefetch is dropped and changes nothing.
                Op::Prefetch(t) => store.prefetch(&[&format!("t{}", t % sizes.len())]).unwrap(),
            }
            let stats = store.stats();
            let actual = (stats.hits, stats.misses, stats.evictions, stats.buffers_reused,
                          stats.charged_bytes, stats.pinned_bytes);
            let m = &model.stats;
            let expected = (m.hits, m.misses, m.evictions, m.buffers_reused, m.charged_bytes, m.pinned_bytes);
            prop_assert_eq!(actual, expected);
            prop_assert!(budget.map_or(true, |b| stats.charged_bytes <= b + stats.pinned_bytes));
            // The memory really held: owned buffers exactly; a view by the pages in memory
            // of the pages it spans (charged its length: at most two pages less).
            let views = (0..sizes.len()).filter(|&t| model.resident[t] && model.buffers[t].is_none());
            let slack = 2 * PAGE * views.count() as u64;
            match zero_copy {
                false => prop_assert_eq!(stats.resident_bytes, stats.charged_bytes),
                true => prop_assert!(stats.resident_bytes <= stats.charged_bytes + slack),
            }
        }
        held.clear();
        store.close();
        let stats = store.stats();
        prop_assert_eq!((stats.charged_bytes, stats.resident_bytes), (0, 0), "close frees every unpinned tensor");
    }

    #[test]
    fn concurrent_callers_with_prefetch_keep_every_invariant(
        (sizes, codecs, budget) in sizes_and_budget(),
        per_thread in prop::collection::vec(ops(10), 3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        write_store(dir.path(), &sizes, &codecs);
        let options = StoreOptions { max_resident: budget, read_threads: 2, ..StoreOptions::default() };
        let store = Store::open(dir.path(), options).unwrap();
        let gets: usize = std::thread::scope(|scope| {
            let workers: Vec<_> = per_thread
                .iter()
                .map(|operations| scope.spawn(|| run_and_check(&store, operations, sizes.len(), budget)))
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        let stats = store.stats();
        prop_assert_eq!(stats.pinned_bytes, 0);
        prop_assert!(budget.map_or(true, |b| stats.charged_bytes <= b));
        prop_assert_eq!((stats.hits + stats.misses) as usize, gets);
        store.close();
    }
}

/// One caller's operations; checks bytes and the budget invariant after each. Returns the
/// number of gets.
fn run_and_check(store: &Store, operations: &[Op], count: usize, budget: Option<u64>) -> usize {
    let mut held: Vec<TensorBytes> = Vec::new();
    let mut gets = 0;
    for op in operations {
        match *op {
            Op::Get(t) => {
                let bytes = store.get(&format!("t{}", t % count)).unwrap();
                check_bytes(&bytes, t % count);
                held.push(bytes);
                gets += 1;
            }
            Op::Release(k) if !held.is_empty() => drop(held.swap_remove(k % held.len())),
            Op::Release(_) => {}
            Op::Prefetch(t) => {
                let names: Vec<String> = (t..t + 3).map(|i| format!("t{}", i % count)).collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                store.prefetch(&names).unwrap();
            }
        }
        let stats = store.stats();
        if let Some(b) = budget {
            assert!(stats.charged_bytes <= b + stats.pinned_bytes, "{stats:?}");
        }
    }
    gets
}

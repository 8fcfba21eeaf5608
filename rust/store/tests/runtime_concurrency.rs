//! Background reads and many threads: prefetch, in-flight dedupe, a randomized stress run.

mod runtime_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Barrier;
use std::time::Duration;

use bigmodel_store::codec::checksum;
use bigmodel_store::{Store, StoreOptions, TensorBytes};
use runtime_common::{assert_bytes, budget, build, wait_until, Kind, Spec};

const ELEMENTS: usize = 16 * 1024;
const SIZE: u64 = ELEMENTS as u64 * 4;

#[test]
fn prefetch_reads_ahead_and_gets_are_served_from_it() {
    let built = build(&[
        Spec("a", ELEMENTS, Kind::View),
        Spec("b", ELEMENTS, Kind::Zstd),
        Spec("c", ELEMENTS, Kind::Misaligned),
    ]);
    let store = built.open(StoreOptions::default());
    store.prefetch(&["a", "b", "c", "a"]).unwrap();
    wait_until("the prefetches", || {
        store.stats().resident_bytes == 3 * SIZE
    });
    for name in ["c", "b", "a"] {
        assert_bytes(&store, &built, name);
    }
    let stats = store.stats();
    assert_eq!((stats.prefetch_requests, stats.prefetch_hits), (4, 3));
    assert_eq!(
        (stats.hits, stats.misses, stats.prefetch_dropped),
        (3, 0, 0)
    );
    let stored: u64 = built.index.tensors.iter().map(|e| e.length).sum();
    assert_eq!(stats.bytes_read, stored, "every tensor was read once");
}

#[test]
fn prefetch_is_dropped_rather_than_evicting_unused_prefetches_or_pins() {
    let built = build(&[
        Spec("a", ELEMENTS, Kind::View),
        Spec("b", ELEMENTS, Kind::View),
        Spec("c", ELEMENTS, Kind::View),
    ]);
    let store = built.open(budget(2 * SIZE, 1));
    store.prefetch(&["a", "b"]).unwrap();
    wait_until("a and b", || store.stats().resident_bytes == 2 * SIZE);
    store.prefetch(&["c"]).unwrap();
    wait_until("the dropped prefetch", || {
        store.stats().prefetch_dropped == 1
    });
    let a = store.get("a").unwrap();
    let b = store.get("b").unwrap();
    store.prefetch(&["c"]).unwrap(); // both pinned now: nothing may be evicted
    wait_until("the second drop", || store.stats().prefetch_dropped == 2);
    drop(a);
    store.prefetch(&["c"]).unwrap(); // a is used and unpinned: it makes room
                                     // Evicted at once; read by the read thread (a get before it starts would read c itself).
    wait_until("the prefetch of c", || store.stats().bytes_read == 3 * SIZE);
    assert_eq!(store.stats().evictions, 1);
    assert_bytes(&store, &built, "c");
    assert!(b.as_slice() == built.data["b"].as_slice());
    let stats = store.stats();
    assert_eq!((stats.prefetch_hits, stats.misses), (3, 0));
}

#[test]
fn without_read_threads_prefetch_is_counted_as_dropped() {
    let built = build(&[Spec("a", 10, Kind::View)]);
    let store = built.open(budget(1 << 20, 0));
    store.prefetch(&["a", "a"]).unwrap();
    let stats = store.stats();
    assert_eq!((stats.prefetch_requests, stats.prefetch_dropped), (2, 2));
    assert_eq!(stats.resident_bytes, 0);
}

/// Two gets and a prefetch of one tensor, started together: it is read once.
#[test]
fn a_tensor_in_flight_is_never_read_twice() {
    for kind in [Kind::View, Kind::Zstd, Kind::Misaligned] {
        let built = build(&[Spec("big", 1 << 20, kind)]);
        let store = built.open(StoreOptions {
            verify_reads: true, // a slower read widens the window the three calls share
            ..StoreOptions::default()
        });
        let start = Barrier::new(3);
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    start.wait();
                    assert_bytes(&store, &built, "big");
                });
            }
            start.wait();
            store.prefetch(&["big"]).unwrap();
        });
        let stats = store.stats();
        assert_eq!(
            stats.bytes_read,
            store.entry("big").unwrap().length,
            "{kind:?}"
        );
        assert_eq!(stats.hits + stats.misses, 2, "{kind:?}");
        assert!(stats.misses <= 1, "{kind:?}: {stats:?}");
    }
}

/// A deterministic xorshift generator: the stress run needs no external crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn stress_specs() -> Vec<(String, usize, Kind)> {
    let kinds = [Kind::View, Kind::Zstd, Kind::Misaligned];
    (0..24)
        .map(|i| (format!("t{i}"), 1000 + (i * 7919) % 30_000, kinds[i % 3]))
        .collect()
}

fn check(bytes: &TensorBytes) {
    let entry = bytes.entry();
    assert_eq!(
        Some(checksum(bytes.as_slice())),
        entry.checksum,
        "{}",
        entry.name
    );
}

fn random_operations(store: &Store, names: &[String], seed: u64) {
    let mut rng = Rng(seed);
    let mut held: Vec<TensorBytes> = Vec::new();
    for _ in 0..400 {
        let name = names[rng.below(names.len())].as_str();
        match rng.below(10) {
            0..=4 => check(&store.get(name).unwrap()),
            5 | 6 if held.len() < 3 => held.push(store.get(name).unwrap()),
            // Held bytes must survive all the other threads' evictions until dropped.
            5 | 6 => check(&held.swap_remove(rng.below(held.len()))),
            _ => {
                let more = names[rng.below(names.len())].as_str();
                store.prefetch(&[name, more]).unwrap();
            }
        }
    }
    held.iter().for_each(check);
}

/// 8 threads of random gets, holds, drops and prefetches over a working set 4x the
/// budget; a sampler checks the budget invariant throughout. Must finish (no deadlock).
#[test]
fn concurrent_random_operations_stay_correct_and_within_budget() {
    let specs = stress_specs();
    let built = build(
        &specs
            .iter()
            .map(|(n, e, k)| Spec(n, *e, *k))
            .collect::<Vec<_>>(),
    );
    let names: Vec<String> = specs.iter().map(|(n, _, _)| n.clone()).collect();
    let total: u64 = built.data.values().map(|d| d.len() as u64).sum();
    let store = built.open(budget(total / 4, 2));
    let (finished, timeout) = mpsc::channel::<()>();
    let running = AtomicBool::new(true);
    let (store, names) = (&store, &names);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut samples = 0u64;
            while running.load(Ordering::Relaxed) {
                let stats = store.stats();
                let limit = stats.budget.unwrap() + stats.pinned_bytes;
                assert!(stats.charged_bytes <= limit, "over budget: {stats:?}");
                samples += 1;
            }
            samples
        });
        let workers: Vec<_> = (0..8u64)
            .map(|seed| scope.spawn(move || random_operations(store, names, seed + 1)))
            .collect();
        scope.spawn(move || {
            if timeout.recv_timeout(Duration::from_secs(60)).is_err() {
                eprintln!("the stress run did not finish within 60 s: deadlock");
                std::process::abort();
            }
        });
        for worker in workers {
            worker.join().expect("a worker failed");
        }
        finished.send(()).unwrap();
        running.store(false, Ordering::Relaxed);
        assert!(sampler.join().unwrap() > 0);
    });
    let stats = store.stats();
    assert_eq!(stats.pinned_bytes, 0, "every pin was released: {stats:?}");
    assert!(stats.charged_bytes <= total / 4, "{stats:?}");
    assert!(
        stats.evictions > 0 && stats.hits > 0 && stats.misses > 0,
        "{stats:?}"
    );
}

//! Residency cache through the public API: LRU eviction under a budget, pins, close.

mod runtime_common;

use bigmodel_store::{Stats, StoreError};
use runtime_common::{assert_bytes, budget, build, Kind, Spec};

/// 64 KiB tensors: whole pages, so views share no page with a neighbour.
const ELEMENTS: usize = 16 * 1024;
const SIZE: u64 = ELEMENTS as u64 * 4;

fn assert_within_budget(stats: &Stats) {
    let limit = stats.budget.unwrap() + stats.pinned_bytes;
    assert!(
        stats.charged_bytes <= limit,
        "resident over budget + pinned: {stats:?}"
    );
}

#[test]
fn stores_and_tensor_bytes_are_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<bigmodel_store::Store>();
    send_sync::<bigmodel_store::TensorBytes>();
}

#[test]
fn evicts_least_recently_used_first() {
    let built = build(&[
        Spec("a", ELEMENTS, Kind::View),
        Spec("b", ELEMENTS, Kind::Zstd),
        Spec("c", ELEMENTS, Kind::View),
        Spec("d", ELEMENTS, Kind::Misaligned),
    ]);
    let store = built.open(budget(3 * SIZE, 0));
    for name in ["a", "b", "c", "a"] {
        assert_bytes(&store, &built, name);
    }
    // Recency is now b, c, a (oldest first): reading d evicts b only.
    assert_bytes(&store, &built, "d");
    let stats = store.stats();
    assert_eq!((stats.hits, stats.misses, stats.evictions), (1, 4, 1));
    assert_eq!(stats.resident_bytes, 3 * SIZE);

    assert_bytes(&store, &built, "c"); // still resident: a hit, now the most recent
    assert_eq!(store.stats().hits, 2);
    assert_bytes(&store, &built, "b"); // was evicted: read again, evicting a (oldest)
    let stats = store.stats();
    assert_eq!((stats.misses, stats.evictions), (5, 2));
    assert_bytes(&store, &built, "d");
    assert_bytes(&store, &built, "a");
    let stats = store.stats();
    assert_eq!((stats.hits, stats.misses), (3, 6));
    assert_eq!(
        stats.bytes_read,
        built.index.tensors.iter().map(|e| e.length).sum::<u64>() + {
            let entry = |n: &str| store.entry(n).unwrap().length;
            entry("b") + entry("a")
        }
    );
    assert!(stats.peak_resident_bytes <= 3 * SIZE, "{stats:?}");
}

#[test]
fn pinned_entries_are_never_evicted_and_admission_goes_over_budget() {
    let built = build(&[
        Spec("a", ELEMENTS, Kind::View),
        Spec("b", ELEMENTS, Kind::Zstd),
        Spec("c", ELEMENTS, Kind::View),
    ]);
    let store = built.open(budget(SIZE, 0));
    let a = store.get("a").unwrap();
    let a_address = a.as_ptr();
    let b = store.get("b").unwrap();
    let stats = store.stats();
    assert_eq!(
        (stats.resident_bytes, stats.pinned_bytes),
        (2 * SIZE, 2 * SIZE)
    );
    drop(b); // no longer pinned: evicted at once to return within the budget
    let stats = store.stats();
    assert_eq!((stats.resident_bytes, stats.evictions), (SIZE, 1));
    assert_within_budget(&stats);
    let c = store.get("c").unwrap(); // admitted over budget, never evicting the pinned a
    let stats = store.stats();
    assert_eq!(stats.evictions, 1, "{stats:?}");
    assert_eq!(
        (stats.resident_bytes, stats.pinned_bytes),
        (2 * SIZE, 2 * SIZE)
    );
    assert_eq!(a.as_ptr(), a_address);
    assert!(a.as_slice() == built.data["a"].as_slice());
    assert!(c.as_slice() == built.data["c"].as_slice());
    drop(c);
    // Only a is pinned: the cache is back within its budget.
    assert_eq!(store.stats().resident_bytes, SIZE);
    assert_eq!(
        store.get("a").unwrap().as_ptr(),
        a_address,
        "a second pin shares the bytes"
    );
}

#[test]
fn a_zero_budget_keeps_only_what_is_pinned() {
    let built = build(&[
        Spec("a", ELEMENTS, Kind::View),
        Spec("b", ELEMENTS, Kind::Zstd),
    ]);
    let store = built.open(budget(0, 0));
    for _ in 0..3 {
        let a = store.get("a").unwrap();
        let b = store.get("b").unwrap();
        assert!(a.as_slice() == built.data["a"].as_slice());
        assert!(b.as_slice() == built.data["b"].as_slice());
        assert_eq!(store.stats().resident_bytes, 2 * SIZE);
    }
    let stats = store.stats();
    assert_eq!((stats.resident_bytes, stats.pinned_bytes), (0, 0));
    assert_eq!((stats.misses, stats.evictions), (6, 6));
}

#[test]
fn tensor_bytes_outlive_the_store() {
    let built = build(&[
        Spec("view", ELEMENTS, Kind::View),
        Spec("zstd", ELEMENTS, Kind::Zstd),
    ]);
    let store = built.open(budget(SIZE, 2));
    let view = store.get("view").unwrap();
    let owned = store.get("zstd").unwrap();
    drop(store);
    assert!(view.as_slice() == built.data["view"].as_slice());
    assert!(owned.as_slice() == built.data["zstd"].as_slice());
    assert_eq!(view.entry().name, "view");
    // The memory must stay valid until the last handle goes, in either order.
    drop(view);
    assert!(owned.as_slice() == built.data["zstd"].as_slice());
}

#[test]
fn close_frees_unpinned_tensors_and_refuses_further_calls() {
    let built = build(&[
        Spec("a", ELEMENTS, Kind::Zstd),
        Spec("b", ELEMENTS, Kind::View),
    ]);
    let store = built.open(budget(10 * SIZE, 2));
    let a = store.get("a").unwrap();
    assert_bytes(&store, &built, "b");
    assert_eq!(store.stats().resident_bytes, 2 * SIZE);
    store.close();
    let stats = store.stats();
    assert_eq!((stats.resident_bytes, stats.pinned_bytes), (SIZE, SIZE));
    assert!(matches!(store.get("b"), Err(StoreError::InvalidArgument(m)) if m.contains("closed")));
    assert!(store.prefetch(&["b"]).is_err());
    assert!(a.as_slice() == built.data["a"].as_slice());
    drop(a);
    assert_eq!(store.stats().resident_bytes, 0);
    store.close(); // idempotent
}

#[test]
fn unlimited_budget_keeps_everything() {
    let built = build(&[Spec("a", ELEMENTS, Kind::View), Spec("b", 10, Kind::Zstd)]);
    let store = built.open(bigmodel_store::StoreOptions::default());
    assert_bytes(&store, &built, "a");
    assert_bytes(&store, &built, "b");
    assert_bytes(&store, &built, "a");
    let stats = store.stats();
    assert_eq!(stats.budget, None);
    assert_eq!((stats.hits, stats.misses, stats.evictions), (1, 2, 0));
    assert!(stats.resident_bytes >= SIZE + 40);
}

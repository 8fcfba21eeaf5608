//! Unit tests of the cache's decisions, driven by hand: no store, no files, no threads
//! but the test's own.

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

/// A prefetch queued and then run by a (simulated) read thread.
fn prefetch(cache: &Cache, slot: u32) -> bool {
    let Some(released) = cache.reserve_prefetch(slot, need()) else {
        return false;
    };
    cache.settle(released);
    let reservation = cache.start_prefetch(slot).expect("still queued");
    cache.finish_load(slot, owned(reservation.reuse)).is_ok()
}

/// The number of gets waiting for the read of `slot` in flight.
fn waiters(cache: &Cache, slot: u32) -> u32 {
    match cache.lock().slots[slot as usize] {
        Slot::Loading { waiters, .. } => waiters,
        _ => 0,
    }
}

fn wait_until(what: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !what() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
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

#[test]
fn a_get_takes_over_a_queued_prefetch_and_the_read_thread_skips_it() {
    let cache = Cache::new(2, None);
    let released = cache.reserve_prefetch(0, need()).expect("room");
    cache.settle(released);
    let Acquired::MustLoad(reservation) = cache.acquire(0, need()) else {
        panic!("a queued prefetch is read by the get itself, not waited for");
    };
    assert!(
        cache.start_prefetch(0).is_none(),
        "the read thread finds nothing to do"
    );
    cache.finish_load(0, owned(reservation.reuse)).unwrap();
    let stats = stats(&cache);
    assert_eq!((stats.misses, stats.hits, stats.prefetch_hits), (1, 0, 0));
    assert_eq!(
        (stats.charged_bytes, stats.pinned_bytes),
        (UNIT as u64, UNIT as u64)
    );
}

#[test]
fn cancelling_a_queued_prefetch_gives_its_room_back() {
    let cache = Cache::new(2, Some(UNIT as u64));
    cache.settle(cache.reserve_prefetch(0, need()).expect("room"));
    assert_eq!(stats(&cache).charged_bytes, UNIT as u64);
    cache.cancel_prefetch(0);
    assert_eq!(stats(&cache).charged_bytes, 0);
    assert!(cache.start_prefetch(0).is_none());
    assert!(matches!(cache.acquire(0, need()), Acquired::MustLoad(_)));
}

/// Starts a read of slot 0, for a get or for a prefetch.
fn start_read(cache: &Cache, demand: bool) {
    if demand {
        let Acquired::MustLoad(_) = cache.acquire(0, need()) else {
            panic!("slot 0 should be absent");
        };
    } else {
        cache.settle(cache.reserve_prefetch(0, need()).expect("room"));
        cache.start_prefetch(0).expect("queued");
    }
}

#[test]
fn every_waiter_gets_the_error_of_the_one_failed_read() {
    const WAITERS: u32 = 4;
    for demand in [true, false] {
        let cache = Cache::new(1, Some(UNIT as u64));
        start_read(&cache, demand);
        let errors: Vec<String> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..WAITERS)
                .map(|_| {
                    scope.spawn(|| match cache.acquire(0, need()) {
                        Acquired::Failed(error) => error.to_string(),
                        _ => panic!("a waiter of a failed read must get its error"),
                    })
                })
                .collect();
            wait_until(|| waiters(&cache, 0) == WAITERS);
            let failure = Err(StoreError::corrupt("f.bin", "t", "bad bytes"));
            assert!(cache.finish_load(0, failure).is_err());
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(errors.iter().all(|e| e.contains("bad bytes")), "{errors:?}");
        let after = stats(&cache);
        let reads = u64::from(demand);
        assert_eq!((after.misses, after.hits), (reads, u64::from(WAITERS)));
        assert_eq!((after.charged_bytes, after.pinned_bytes), (0, 0));
        assert!(cache.lock().failures.is_empty(), "every copy was taken");
        assert!(
            matches!(cache.acquire(0, need()), Acquired::MustLoad(_)),
            "a later get reads again"
        );
    }
}

#[test]
fn a_get_after_a_failure_reads_again_while_earlier_waiters_get_the_error() {
    let cache = Cache::new(1, None);
    start_read(&cache, true);
    std::thread::scope(|scope| {
        let waiter = scope.spawn(|| matches!(cache.acquire(0, need()), Acquired::Failed(_)));
        wait_until(|| waiters(&cache, 0) == 1);
        let failure = Err(StoreError::InvalidArgument("boom".into()));
        // Whether the waiter wakes before or after the new get below starts a new read of
        // the same tensor, it gets the failure of the read it waited for.
        assert!(cache.finish_load(0, failure).is_err());
        let Acquired::MustLoad(reservation) = cache.acquire(0, need()) else {
            panic!("the tensor is absent again: a new get reads it");
        };
        assert!(
            waiter.join().unwrap(),
            "the first waiter got the failure, not the new read"
        );
        cache.finish_load(0, owned(reservation.reuse)).unwrap();
    });
}

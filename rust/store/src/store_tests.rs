//! The store's read ordering, with its one read thread held at a gate: a demand read is
//! never queued behind prefetches, and memory evicted for a queued prefetch is free at once.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::*;
use crate::writer::{StoreWriter, TensorPlan, WriterOptions};
use crate::DType;

/// Holds the prefetch jobs of chosen tensors: a read thread that reaches one waits here
/// until the test lets it go. Names are unique to each test, so tests running in parallel
/// never hold each other's reads.
pub(super) mod gate {
    use super::*;

    #[derive(Default)]
    struct Gate {
        held: HashSet<String>,
        waiting: HashSet<String>,
    }

    static GATE: Mutex<Option<Gate>> = Mutex::new(None);
    static CHANGED: Condvar = Condvar::new();

    fn with<T>(f: impl FnOnce(&mut Gate) -> T) -> T {
        let mut gate = GATE.lock().unwrap();
        let result = f(gate.get_or_insert_with(Gate::default));
        CHANGED.notify_all();
        result
    }

    pub fn hold(name: &str) {
        with(|gate| gate.held.insert(name.to_owned()));
    }

    pub fn release(name: &str) {
        with(|gate| gate.held.remove(name));
    }

    /// Blocks until a read thread waits at the gate for `name`.
    pub fn wait_for_reader(name: &str) {
        let mut gate = GATE.lock().unwrap();
        while !gate.as_ref().is_some_and(|g| g.waiting.contains(name)) {
            gate = CHANGED.wait(gate).unwrap();
        }
    }

    /// Called by a read thread once it has started a prefetch's read.
    pub fn pass(name: &str) {
        let mut gate = GATE.lock().unwrap();
        while gate.as_ref().is_some_and(|g| g.held.contains(name)) {
            gate.as_mut().unwrap().waiting.insert(name.to_owned());
            CHANGED.notify_all();
            gate = CHANGED.wait(gate).unwrap();
        }
        if let Some(g) = gate.as_mut() {
            g.waiting.remove(name);
        }
    }
}

/// 64 KiB tensors: whole pages, so views share no page with a neighbour.
const ELEMENTS: u64 = 16 * 1024;
const SIZE: u64 = ELEMENTS * 4;

/// A written store of `names` (64 KiB F32 tensors, each filled with its index + 1).
fn write_store(names: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let plan = names
        .iter()
        .map(|name| TensorPlan {
            name: name.to_string(),
            dtype: DType::F32,
            shape: vec![ELEMENTS],
            codec: crate::Codec::None,
        })
        .collect();
    let writer = StoreWriter::create(dir.path(), plan, WriterOptions::default()).unwrap();
    for (i, name) in names.iter().enumerate() {
        writer
            .write(name, &vec![i as u8 + 1; SIZE as usize])
            .unwrap();
    }
    writer.commit().unwrap();
    dir
}

fn one_read_thread(max_resident: Option<u64>) -> StoreOptions {
    StoreOptions {
        max_resident,
        read_threads: 1,
        zero_copy: true,
        ..StoreOptions::default()
    }
}

/// Runs `get(name)` on a thread of its own: `Err` if it has not returned within a minute
/// (a deadlock guard, far beyond any read of 64 KiB; not a measure of speed). A stuck
/// thread is left behind, so the test fails instead of hanging.
fn get_unless_stuck(store: &Arc<Store>, name: &str) -> std::result::Result<TensorBytes, String> {
    let (sender, receiver) = mpsc::channel();
    let (store, owned_name) = (Arc::clone(store), name.to_owned());
    std::thread::spawn(move || sender.send(store.get(&owned_name)));
    match receiver.recv_timeout(Duration::from_secs(60)) {
        Ok(bytes) => Ok(bytes.unwrap()),
        Err(_) => Err(format!(
            "get({name:?}) is stuck behind the held read thread"
        )),
    }
}

#[test]
fn a_get_reads_a_queued_prefetch_itself_instead_of_waiting_behind_the_queue() {
    let dir = write_store(&["order-blocker", "queued"]);
    let store = Arc::new(Store::open(dir.path(), one_read_thread(None)).unwrap());
    gate::hold("order-blocker");
    store.prefetch(&["order-blocker", "queued"]).unwrap();
    gate::wait_for_reader("order-blocker");
    // The only read thread is held inside the first job; "queued" waits behind it.
    let bytes = get_unless_stuck(&store, "queued").unwrap();
    assert!(bytes.as_slice().iter().all(|&b| b == 2));
    let stats = store.stats();
    assert_eq!((stats.misses, stats.hits, stats.prefetch_hits), (1, 0, 0));

    gate::release("order-blocker");
    let blocker = store.get("order-blocker").unwrap();
    assert!(blocker.as_slice().iter().all(|&b| b == 1));
    drop((bytes, blocker));
    store.close(); // joins the read thread: its skipped job is behind it
    let stats = store.stats();
    assert_eq!((stats.hits, stats.prefetch_hits), (1, 1));
    assert_eq!(stats.bytes_read, 2 * SIZE, "each tensor was read once");
}

#[test]
fn memory_evicted_for_a_queued_prefetch_is_free_before_the_read_runs() {
    let dir = write_store(&["evict-blocker", "old", "next"]);
    let store = Arc::new(Store::open(dir.path(), one_read_thread(Some(2 * SIZE))).unwrap());
    drop(store.get("old").unwrap()); // resident, unpinned, used
    gate::hold("evict-blocker");
    store.prefetch(&["evict-blocker"]).unwrap();
    gate::wait_for_reader("evict-blocker");
    // No room for "next" but by evicting "old": its pages go now, not when the held
    // read thread reaches the job of "next".
    store.prefetch(&["next"]).unwrap();
    assert_eq!(store.stats().evictions, 1);
    let old = get_unless_stuck(&store, "old").unwrap();
    assert!(old.as_slice().iter().all(|&b| b == 2));
    assert_eq!(store.stats().misses, 2, "\"old\" was read again, at once");
    gate::release("evict-blocker");
    drop(old);
    store.close();
}

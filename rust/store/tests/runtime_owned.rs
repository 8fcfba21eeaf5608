//! Stores opened with `zero_copy: false`: every tensor is read into an owned buffer, the
//! file mappings are never touched, and evicted buffers are recycled.

mod runtime_common;

use std::fs::{self, OpenOptions};
use std::path::Path;

use bigmodel_store::{Stats, StoreError, StoreOptions};
use runtime_common::{assert_bytes, build, Built, Kind, Spec};
use runtime_common::{BLOB_FILE, MOUNTED_FILE, VIEW_FILE};

fn owned(max_resident: Option<u64>, read_threads: usize) -> StoreOptions {
    StoreOptions {
        max_resident,
        read_threads,
        zero_copy: false,
        ..StoreOptions::default()
    }
}

/// The `Rss` (KiB) of every mapping of `file` in this process, from `/proc/self/smaps`, and
/// whether `address` lies inside one of them.
fn mappings_of(file: &Path, address: usize) -> (Vec<u64>, bool) {
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let file = file.canonicalize().unwrap();
    let (mut rss, mut inside, mut current) = (Vec::new(), false, false);
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let Some((start, end)) = fields[0].split_once('-').filter(|_| fields.len() >= 5) {
            current = fields.get(5).map(Path::new) == Some(file.as_path());
            let start = usize::from_str_radix(start, 16).unwrap_or(usize::MAX);
            let end = usize::from_str_radix(end, 16).unwrap_or(0);
            inside |= current && (start..end).contains(&address);
        } else if current && fields[0] == "Rss:" {
            rss.push(fields[1].parse().unwrap());
        }
    }
    (rss, inside)
}

fn assert_within_budget(stats: &Stats) {
    let limit = stats.budget.unwrap() + stats.pinned_bytes;
    assert!(
        stats.charged_bytes <= limit,
        "over budget + pinned: {stats:?}"
    );
}

#[test]
fn every_kind_is_an_aligned_copy_outside_the_never_touched_mappings() {
    let built = build(&[
        Spec("view", 50_000, Kind::View),
        Spec("zstd", 30_000, Kind::Zstd),
        Spec("misaligned", 20_000, Kind::Misaligned),
        Spec("small", 3, Kind::View),
    ]);
    let store = built.open(owned(None, 0));
    let held: Vec<_> = ["view", "zstd", "misaligned", "small"]
        .iter()
        .map(|name| (name, store.get(name).unwrap()))
        .collect();
    for (name, bytes) in &held {
        assert!(bytes.as_slice() == built.data[**name].as_slice(), "{name}");
        assert_eq!(bytes.as_ptr() as usize % 64, 0, "{name}");
        for file in [VIEW_FILE, BLOB_FILE, MOUNTED_FILE] {
            let (rss, inside) = mappings_of(&built.path(file), bytes.as_ptr() as usize);
            assert!(!inside, "{name} points into the mapping of {file}");
            // pread only: not one page of any mapping was brought in.
            assert!(
                rss.iter().all(|&kib| kib == 0),
                "{file} mapped pages: {rss:?}"
            );
        }
    }
    // A second get of a resident tensor pins the same buffer: no second copy.
    assert_eq!(store.get("view").unwrap().as_ptr(), held[0].1.as_ptr());
}

#[test]
fn a_truncated_file_fails_reads_and_held_tensors_stay_readable() {
    let built = build(&[
        Spec("held", 40_000, Kind::View),
        Spec("later", 40_000, Kind::View),
        Spec("frame", 40_000, Kind::Zstd),
    ]);
    let store = built.open(owned(None, 0));
    let held = store.get("held").unwrap();
    for file in [VIEW_FILE, BLOB_FILE] {
        let file = OpenOptions::new()
            .write(true)
            .open(built.path(file))
            .unwrap();
        file.set_len(100).unwrap();
    }
    // A view would raise SIGBUS here; an owned copy does not depend on the file.
    assert!(held.as_slice() == built.data["held"].as_slice());
    for name in ["later", "frame"] {
        let err = store.get(name).unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { tensor, .. } if tensor == name),
            "{err}"
        );
    }
}

/// Pages of 4 KiB: the capacities of the two shapes below.
const SMALL: usize = 64 * 1024; // elements: 256 KiB
const LARGE: usize = 96 * 1024; // elements: 384 KiB

/// A model-like sequence: layers of two small tensors and one large one.
fn layers(count: usize) -> Built {
    let names: Vec<[String; 3]> = (0..count)
        .map(|l| [format!("{l}.q"), format!("{l}.k"), format!("{l}.mlp")])
        .collect();
    let specs: Vec<Spec> = names
        .iter()
        .flat_map(|[q, k, mlp]| {
            [
                Spec(q, SMALL, Kind::View),
                Spec(k, SMALL, Kind::View),
                Spec(mlp, LARGE, Kind::View),
            ]
        })
        .collect();
    build(&specs)
}

fn names(built: &Built) -> Vec<String> {
    built.index.tensors.iter().map(|e| e.name.clone()).collect()
}

#[test]
fn an_eviction_recycles_a_buffer_of_the_same_capacity_first() {
    let built = layers(1);
    let (small, large) = (SMALL as u64 * 4, LARGE as u64 * 4);
    let store = built.open(owned(Some(small + large), 0));
    drop(store.get("0.mlp").unwrap());
    let q = store.get("0.q").unwrap().as_ptr();
    // Least recently used is 0.mlp, but 0.q holds a buffer 0.k can refill: 0.q goes.
    let k = store.get("0.k").unwrap();
    assert_eq!(k.as_ptr(), q, "0.k reuses 0.q's buffer");
    assert!(k.as_slice() == built.data["0.k"].as_slice());
    drop(k);
    let stats = store.stats();
    assert_eq!((stats.evictions, stats.buffers_reused), (1, 1));
    assert_bytes(&store, &built, "0.mlp");
    assert_eq!(store.stats().hits, 1, "0.mlp was kept");
}

#[test]
fn a_scan_under_a_budget_stops_allocating_once_the_budget_is_full() {
    let built = layers(6);
    let (small, large) = (SMALL as u64 * 4, LARGE as u64 * 4);
    let store = built.open(owned(Some(2 * small + 2 * large), 0));
    for name in names(&built) {
        assert_bytes(&store, &built, &name);
        assert_within_budget(&store.stats());
    }
    let stats = store.stats();
    // 0.q, 0.k, 0.mlp and 1.q fit the budget side by side; from 1.k on, each read evicts
    // a tensor of its own shape and refills its buffer.
    assert_eq!(stats.misses, 18);
    assert_eq!(stats.misses - stats.buffers_reused, 4, "{stats:?}");
    assert_eq!(stats.peak_resident_bytes, 3 * small + large);
}

#[test]
fn prefetched_owned_reads_stay_within_the_budget_and_recycle() {
    let built = layers(8);
    let (small, large) = (SMALL as u64 * 4, LARGE as u64 * 4);
    let store = built.open(owned(Some(3 * small + 3 * large), 2));
    let names = names(&built);
    for (at, name) in names.iter().enumerate() {
        let ahead: Vec<&str> = names[at + 1..].iter().take(4).map(String::as_str).collect();
        store.prefetch(&ahead).unwrap();
        assert_bytes(&store, &built, name);
        assert_within_budget(&store.stats());
    }
    // Every prefetched tensor was then got (a get waits for its read): none is in flight.
    let stats = store.stats();
    assert_eq!(stats.prefetch_hits, stats.hits, "{stats:?}");
    assert!(stats.evictions > 0, "{stats:?}");
    // Reservations are made in this thread, in order, and only tensors already used are
    // evicted: each finds a used tensor of its own shape among them and takes its buffer.
    assert_eq!(stats.buffers_reused, stats.evictions, "{stats:?}");
    assert_within_budget(&stats);
}

#[test]
fn large_tensors_at_any_offset_are_read_whole_from_several_threads() {
    // Larger than one direct-read chunk (4 MiB), at 64-aligned and odd offsets, next to
    // small ones: each read is split, lands mid-block and is moved down to its start.
    let built = build(&[
        Spec("small", 5, Kind::View),
        Spec("big", 1_500_001, Kind::View),
        Spec("odd", 2_100_007, Kind::Misaligned),
        Spec("packed", 1_200_000, Kind::Zstd),
        Spec("tail", 17, Kind::Misaligned),
    ]);
    let names = ["small", "big", "odd", "packed", "tail"];
    let store = built.open(owned(Some(6 << 20), 2));
    std::thread::scope(|scope| {
        for thread in 0..3 {
            let (store, built) = (&store, &built);
            scope.spawn(move || {
                for round in 0..4 {
                    let name = names[(thread + round) % names.len()];
                    store
                        .prefetch(&[names[(thread + round + 1) % names.len()]])
                        .unwrap();
                    let bytes = store.get(name).unwrap();
                    assert_eq!(bytes.as_ptr() as usize % 64, 0, "{name}");
                    assert!(bytes.as_slice() == built.data[name].as_slice(), "{name}");
                }
            });
        }
    });
    assert_within_budget(&store.stats());
    assert_eq!(store.verify().unwrap(), Vec::<String>::new());
}

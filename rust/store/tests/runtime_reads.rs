//! How bytes reach memory: zero-copy views, owned buffers, page release on eviction,
//! files that change under an open store, checksums.

mod runtime_common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bigmodel_store::{StoreError, StoreOptions};
use runtime_common::{assert_bytes, budget, build, Kind, Spec, BLOB_FILE, MOUNTED_FILE, VIEW_FILE};

/// The `(start, end, file offset)` of the mapping of `file` that contains `address`,
/// from `/proc/self/maps`.
fn mapping_containing(address: usize, file: &Path) -> Option<(usize, usize, usize)> {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    let file = file.canonicalize().unwrap();
    maps.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (range, offset) = (fields[0], fields[2]);
        let path = fields.get(5).map(Path::new)?;
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let inside = (start..end).contains(&address) && path == file;
        inside.then(|| (start, end, usize::from_str_radix(offset, 16).unwrap()))
    })
}

#[test]
fn uncompressed_tensors_are_views_of_the_file_mapping() {
    let built = build(&[Spec("a", 1000, Kind::View), Spec("b", 3000, Kind::View)]);
    let store = built.open(StoreOptions::default());
    for name in ["a", "b"] {
        let bytes = store.get(name).unwrap();
        let address = bytes.as_ptr() as usize;
        let (start, _, file_offset) = mapping_containing(address, &built.path(VIEW_FILE))
            .unwrap_or_else(|| panic!("{name} does not point into the mapping of {VIEW_FILE}"));
        assert_eq!(
            (address - start + file_offset) as u64,
            store.entry(name).unwrap().offset
        );
        assert!(bytes.as_slice() == built.data[name].as_slice());
    }
}

/// Resident bytes (`Rss` in `/proc/self/smaps`) of the mapping of `file` containing `address`.
fn resident_bytes_of_mapping(address: usize, file: &Path) -> usize {
    let (start, _, _) = mapping_containing(address, file).expect("a mapping of the file");
    let smaps = fs::read_to_string("/proc/self/smaps").unwrap();
    let header = format!("{start:x}-");
    let block = smaps
        .split_inclusive('\n')
        .skip_while(|line| !line.starts_with(&header))
        .find(|line| line.starts_with("Rss:"))
        .expect("an Rss line for the mapping");
    let kib: usize = block.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn views_are_populated_on_get_unless_told_otherwise() {
    const SIZE: usize = 4 << 20;
    for populate_views in [true, false] {
        let built = build(&[Spec("a", SIZE, Kind::View)]);
        let store = built.open(StoreOptions {
            populate_views,
            ..StoreOptions::default()
        });
        store.will_need(&["a"]).unwrap();
        let bytes = store.get("a").unwrap();
        let resident = resident_bytes_of_mapping(bytes.as_ptr() as usize, &built.path(VIEW_FILE));
        if populate_views {
            assert!(resident >= SIZE, "populated: {resident} bytes resident");
        } else {
            assert!(resident < SIZE / 4, "lazy: {resident} bytes resident");
        }
        assert_bytes(&store, &built, "a"); // a lazy view faults in the file's bytes
    }
}

#[test]
fn lazy_views_are_made_resident_in_the_background() {
    const SIZE: usize = 4 << 20;
    let built = build(&[Spec("a", SIZE, Kind::View)]);
    let store = built.open(StoreOptions {
        populate_views: false,
        ..StoreOptions::default()
    });
    let bytes = store.get("a").unwrap();
    let resident = || resident_bytes_of_mapping(bytes.as_ptr() as usize, &built.path(VIEW_FILE));
    assert!(resident() < SIZE / 4);
    store.populate_in_background(&["a"]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while resident() < SIZE && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        resident() >= SIZE,
        "{} of {SIZE} bytes resident",
        resident()
    );
    assert!(matches!(
        store.populate_in_background(&["nope"]),
        Err(StoreError::NotFound { .. })
    ));
}

#[test]
fn will_need_checks_names_and_reads_nothing_into_the_cache() {
    let built = build(&[Spec("a", 1000, Kind::View), Spec("z", 1000, Kind::Zstd)]);
    let store = built.open(StoreOptions::default());
    store.will_need(&["a", "z"]).unwrap();
    assert_eq!(store.stats().bytes_read, 0);
    assert!(matches!(
        store.will_need(&["a", "nope"]),
        Err(StoreError::NotFound { name, .. }) if name == "nope"
    ));
}

#[test]
fn compressed_and_misaligned_tensors_are_aligned_owned_copies() {
    let built = build(&[
        Spec("z", 5000, Kind::Zstd),
        Spec("m", 70_000, Kind::Misaligned),
        Spec("small", 3, Kind::Misaligned),
    ]);
    let store = built.open(StoreOptions::default());
    for name in ["z", "m", "small"] {
        let bytes = store.get(name).unwrap();
        assert_eq!(bytes.as_ptr() as usize % 64, 0, "{name}");
        assert!(bytes.as_slice() == built.data[name].as_slice(), "{name}");
        let address = bytes.as_ptr() as usize;
        for file in [BLOB_FILE, MOUNTED_FILE] {
            assert!(
                mapping_containing(address, &built.path(file)).is_none(),
                "{name} in {file}"
            );
        }
    }
}

#[test]
fn empty_tensors_are_served() {
    let built = build(&[
        Spec("e", 0, Kind::View),
        Spec("ez", 0, Kind::Zstd),
        Spec("x", 1, Kind::View),
    ]);
    let store = built.open(budget(0, 1));
    for name in ["e", "ez", "x"] {
        assert_bytes(&store, &built, name);
    }
    assert!(store.get("e").unwrap().is_empty());
}

#[test]
fn unknown_names_are_not_found() {
    let built = build(&[Spec("a", 10, Kind::View)]);
    let store = built.open(StoreOptions::default());
    let err = store.get("nope").unwrap_err();
    assert!(
        matches!(&err, StoreError::NotFound { name, .. } if name == "nope"),
        "{err}"
    );
    assert!(matches!(
        store.prefetch(&["a", "nope"]),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(
        store.stats().prefetch_requests,
        0,
        "nothing is queued when a name is unknown"
    );
    assert!(store.entry("nope").is_none());
    assert_eq!(store.entry("a").unwrap().shape, vec![10]);
}

#[test]
fn writes_to_a_view_stay_private() {
    let built = build(&[Spec("a", 100, Kind::View)]);
    let store = built.open(StoreOptions::default());
    let bytes = store.get("a").unwrap();
    // SAFETY: in bounds of a live TensorBytes; nobody else reads these bytes meanwhile.
    unsafe { *bytes.as_ptr() = !built.data["a"][0] };
    assert_eq!(bytes.as_slice()[0], !built.data["a"][0]);
    let on_disk = fs::read(built.path(VIEW_FILE)).unwrap();
    assert_eq!(on_disk[0], built.data["a"][0], "the file must not change");
}

/// `a` spans page 0 and the start of page 1; `b` starts inside page 1 (shared with `a`).
/// Evicting `a` must drop page 0 (its private writes vanish) and keep page 1, where a live
/// `b` was written to.
#[test]
fn eviction_releases_only_pages_inside_the_tensor() {
    let a_elements = 1100; // 4400 bytes: [0, 4400)
    let built = build(&[
        Spec("a", a_elements, Kind::View),
        Spec("b", 2000, Kind::View),
    ]);
    let b_offset = built.index.tensors[1].offset as usize;
    assert!(b_offset < 8192 && b_offset > 4096, "b starts inside page 1");
    let store = built.open(budget(a_elements as u64 * 4, 0));

    let a = store.get("a").unwrap();
    // SAFETY: writes inside the live tensors' bytes (private copy-on-write pages).
    unsafe {
        *a.as_ptr() = !built.data["a"][0]; // page 0: only a's
        *a.as_ptr().add(4399) = !built.data["a"][4399]; // page 1: shared with b
    }
    drop(a);
    let b = store.get("b").unwrap(); // over budget with a unpinned: evicts a
                                     // SAFETY: as above.
    unsafe { *b.as_ptr() = !built.data["b"][0] };
    assert_eq!(store.stats().evictions, 1);

    let a = store.get("a").unwrap(); // b is pinned: both resident now
    assert_eq!(
        a.as_slice()[0],
        built.data["a"][0],
        "page 0 was released and re-read"
    );
    assert_eq!(
        a.as_slice()[4399],
        !built.data["a"][4399],
        "shared page 1 was kept"
    );
    assert_eq!(
        b.as_slice()[0],
        !built.data["b"][0],
        "the live neighbour kept its bytes"
    );
    assert!(b.as_slice()[1..] == built.data["b"][1..]);
}

fn rewrite_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[!byte[0]], offset).unwrap();
}

#[test]
fn a_truncated_file_is_corrupt_not_a_crash() {
    let built = build(&[Spec("a", 5000, Kind::View), Spec("b", 5000, Kind::View)]);
    let store = built.open(StoreOptions::default());
    assert_bytes(&store, &built, "a");
    let path = built.path(VIEW_FILE);
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(100)
        .unwrap();
    for name in ["a", "b"] {
        match store.get(name) {
            Err(StoreError::Corrupt {
                file,
                tensor,
                detail,
            }) => {
                assert_eq!((file.as_path(), tensor.as_str()), (path.as_path(), name));
                assert!(detail.contains("bytes"), "{detail}");
            }
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
    }
}

#[test]
fn a_grown_file_or_a_touched_mount_is_corrupt() {
    let built = build(&[Spec("a", 100, Kind::Zstd), Spec("m", 100, Kind::Misaligned)]);
    let store = built.open(StoreOptions::default());
    let blob = OpenOptions::new()
        .write(true)
        .open(built.path(BLOB_FILE))
        .unwrap();
    blob.set_len(blob.metadata().unwrap().len() + 4).unwrap();
    assert!(matches!(store.get("a"), Err(StoreError::Corrupt { .. })));

    let mounted = OpenOptions::new()
        .write(true)
        .open(built.path(MOUNTED_FILE))
        .unwrap();
    mounted
        .set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let err = store.get("m").unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { detail, .. } if detail.contains("mtime")),
        "{err}"
    );
}

#[test]
fn verify_names_the_damaged_tensors() {
    let built = build(&[
        Spec("good", 1000, Kind::View),
        Spec("bad_view", 1000, Kind::View),
        Spec("bad_zstd", 1000, Kind::Zstd),
        Spec("good_zstd", 1000, Kind::Zstd),
    ]);
    let store = built.open(StoreOptions::default());
    assert!(store.verify().unwrap().is_empty());
    let entry = |name: &str| store.entry(name).unwrap().clone();
    rewrite_byte(&built.path(VIEW_FILE), entry("bad_view").offset + 17);
    let zstd = entry("bad_zstd");
    rewrite_byte(&built.path(BLOB_FILE), zstd.offset + zstd.length / 2);
    assert_eq!(
        store.verify().unwrap(),
        vec!["bad_view".to_owned(), "bad_zstd".to_owned()]
    );
}

#[test]
fn verify_reads_reports_a_bad_checksum_on_get() {
    let built = build(&[Spec("a", 1000, Kind::View), Spec("b", 1000, Kind::View)]);
    rewrite_byte(&built.path(VIEW_FILE), built.index.tensors[0].offset + 5);
    let checked = built.open(StoreOptions {
        verify_reads: true,
        ..StoreOptions::default()
    });
    let err = checked.get("a").unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { tensor, file, detail }
            if tensor == "a" && file.ends_with(VIEW_FILE) && detail.contains("checksum")),
        "{err}"
    );
    assert_bytes(&checked, &built, "b");
    let only_b = built.open(StoreOptions::default());
    drop(only_b.get("b").unwrap());
    assert_eq!(
        checked.stats().charged_bytes,
        only_b.stats().charged_bytes,
        "the failed read holds no memory"
    );
    // Without verification the damaged bytes are served as they are.
    let unchecked = built.open(StoreOptions::default());
    assert_eq!(
        unchecked.get("a").unwrap().as_slice()[5],
        !built.data["a"][5]
    );
}

#[test]
fn a_tensor_larger_than_memory_is_an_error_not_a_crash() {
    let mut built = build(&[Spec("z", 10, Kind::Zstd)]);
    built.index.tensors[0].shape = vec![1 << 46]; // 256 TiB of F32 claimed by a tiny frame
    built.index.tensors[0].raw_length = 1 << 48;
    let store = built.open(budget(1 << 20, 1));
    store.prefetch(&["z"]).unwrap();
    let err = store.get("z").unwrap_err();
    assert!(
        matches!(&err, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::OutOfMemory),
        "{err}"
    );
    assert_eq!(store.stats().resident_bytes, 0);
}

#[test]
fn a_store_written_by_the_writer_is_served() {
    use bigmodel_store::writer::{StoreWriter, TensorPlan, WriterOptions};
    use bigmodel_store::{Codec, DType, Store};
    let dir = tempfile::tempdir().unwrap();
    let plan: Vec<TensorPlan> = [("w", Codec::None), ("z", Codec::Zstd), ("b", Codec::None)]
        .into_iter()
        .map(|(name, codec)| TensorPlan {
            name: name.to_owned(),
            dtype: DType::BF16,
            shape: vec![3, 1001],
            codec,
        })
        .collect();
    let writer = StoreWriter::create(dir.path(), plan, WriterOptions::default()).unwrap();
    for name in ["w", "z", "b"] {
        writer
            .write(name, &runtime_common::pattern(name, 6006))
            .unwrap();
    }
    writer.commit().unwrap();
    let store = Store::open(dir.path(), budget(8000, 1)).unwrap();
    for name in ["w", "z", "b", "w"] {
        let bytes = store.get(name).unwrap();
        assert!(
            bytes.as_slice() == runtime_common::pattern(name, 6006).as_slice(),
            "{name}"
        );
        assert_eq!(bytes.entry().dtype, DType::BF16);
    }
    assert!(store.verify().unwrap().is_empty());
    assert!(store.stats().evictions > 0);
}

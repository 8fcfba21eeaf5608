//! StoreWriter: round trips through Index::read, file layout (valid, aligned safetensors
//! shards; zstd blobs), concurrency, argument errors and crash safety.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use bigmodel_store::codec;
use bigmodel_store::index::{ALIGNMENT, BLOCK_ALIGNMENT, INDEX_FILE};
use bigmodel_store::safetensors::{self, is_padding};
use bigmodel_store::writer::{StoreWriter, TensorPlan, WriterOptions};
use bigmodel_store::{Codec, DType, Entry, Index, StoreError};

fn plan(name: &str, dtype: DType, shape: &[u64], codec: Codec) -> TensorPlan {
    TensorPlan {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        codec,
    }
}

/// Deterministic bytes for a planned tensor, different per name.
fn raw_bytes(tensor: &TensorPlan) -> Vec<u8> {
    let len = tensor.shape.iter().product::<u64>() * tensor.dtype.size();
    let seed = codec::checksum(tensor.name.as_bytes());
    (0..len)
        .map(|i| (i.wrapping_mul(seed | 1) >> 3) as u8)
        .collect()
}

fn mixed_plan() -> Vec<TensorPlan> {
    vec![
        plan("embed.weight", DType::F32, &[33, 7], Codec::None),
        plan("scalar", DType::F64, &[], Codec::None),
        plan("empty", DType::BF16, &[0, 4], Codec::None),
        plan("mask", DType::Bool, &[5], Codec::None),
        plan("packed", DType::F16, &[100, 3], Codec::Zstd),
        plan("packed_empty", DType::I64, &[0], Codec::Zstd),
        plan("fp8", DType::F8E4M3, &[9], Codec::None),
    ]
}

/// Writes `tensors` (in reverse plan order, to show order does not matter) and commits.
fn write_store(dir: &Path, tensors: &[TensorPlan], opts: WriterOptions) -> Index {
    let writer = StoreWriter::create(dir, tensors.to_vec(), opts).unwrap();
    for tensor in tensors.iter().rev() {
        writer.write(&tensor.name, &raw_bytes(tensor)).unwrap();
    }
    writer.commit().unwrap()
}

/// The raw bytes of `entry` as stored, decoded.
fn read_back(dir: &Path, index: &Index, entry: &Entry) -> Vec<u8> {
    let path = index.file_path(dir, entry.file);
    let file = fs::read(&path).unwrap();
    let stored = &file[entry.offset as usize..(entry.offset + entry.length) as usize];
    match entry.codec {
        Codec::None => stored.to_vec(),
        Codec::Zstd => {
            let mut out = vec![0u8; entry.raw_length as usize];
            codec::decompress_into(stored, &mut out, &path, &entry.name).unwrap();
            out
        }
    }
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn round_trip_through_index_read() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = mixed_plan();
    let index = write_store(dir.path(), &tensors, WriterOptions::default());
    assert_eq!(Index::read(dir.path()).unwrap(), index);
    for (tensor, entry) in tensors.iter().zip(&index.tensors) {
        let raw = raw_bytes(tensor);
        assert_eq!(
            (&entry.name, entry.dtype, &entry.shape),
            (&tensor.name, tensor.dtype, &tensor.shape)
        );
        assert_eq!(entry.codec, tensor.codec);
        assert_eq!(entry.offset % ALIGNMENT, 0, "{} is not aligned", entry.name);
        assert_eq!(entry.checksum, Some(codec::checksum(&raw)));
        assert_eq!(read_back(dir.path(), &index, entry), raw, "{}", entry.name);
    }
}

#[test]
fn tensors_of_a_block_or_more_start_on_a_block_so_direct_reads_land_in_place() {
    let dir = tempfile::tempdir().unwrap();
    // Small and large tensors interleaved, as a model's weights and biases are.
    let tensors: Vec<TensorPlan> = (0..6)
        .flat_map(|n| {
            [
                plan(
                    &format!("l{n}.weight"),
                    DType::F32,
                    &[33 + n, 40],
                    Codec::None,
                ),
                plan(&format!("l{n}.bias"), DType::F16, &[33 + n], Codec::None),
            ]
        })
        .collect();
    let index = write_store(dir.path(), &tensors, WriterOptions::default());
    for entry in &index.tensors {
        let alignment = match entry.length >= BLOCK_ALIGNMENT {
            true => BLOCK_ALIGNMENT,
            false => ALIGNMENT,
        };
        assert_eq!(entry.offset % alignment, 0, "{} is not aligned", entry.name);
    }
    // Still one valid safetensors file that holds exactly these bytes.
    let header = safetensors::read_header(&dir.path().join(&index.files[0].path)).unwrap();
    for (tensor, entry) in tensors.iter().zip(&index.tensors) {
        let listed = header
            .tensors
            .iter()
            .find(|t| t.name == entry.name)
            .unwrap();
        assert_eq!(listed.offset, entry.offset);
        assert_eq!(read_back(dir.path(), &index, entry), raw_bytes(tensor));
    }
}

#[test]
fn shards_are_valid_safetensors_and_zstd_lives_apart() {
    let dir = tempfile::tempdir().unwrap();
    let index = write_store(dir.path(), &mixed_plan(), WriterOptions::default());
    let names: Vec<&str> = index.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[0].ends_with("-shard-00000.safetensors") && names[1].ends_with("-zstd-00000.bin")
    );
    let header = safetensors::read_header(&dir.path().join(names[0])).unwrap();
    assert_eq!(header.data_start % ALIGNMENT, 0);
    assert_eq!(
        header.metadata.get("format").map(String::as_str),
        Some("pt")
    );
    let mut cursor = header.data_start;
    for tensor in &header.tensors {
        assert_eq!(tensor.offset, cursor, "the entries tile the data section");
        cursor += tensor.length;
        if is_padding(&tensor.name) {
            assert_eq!(tensor.dtype, DType::U8);
            continue;
        }
        let entry = index
            .tensors
            .iter()
            .find(|e| e.name == tensor.name)
            .unwrap();
        assert_eq!((entry.file, entry.offset), (0, tensor.offset));
        assert_eq!((entry.dtype, &entry.shape), (tensor.dtype, &tensor.shape));
    }
    assert_eq!(cursor, index.files[0].size);
    let in_shard = header
        .tensors
        .iter()
        .filter(|t| !is_padding(&t.name))
        .count();
    assert_eq!(in_shard, 5, "the two zstd tensors are not in the shard");
}

#[test]
fn shard_size_bounds_files_and_big_tensors_get_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = vec![
        plan("a", DType::U8, &[400], Codec::None),
        plan("b", DType::U8, &[400], Codec::None),
        plan("c", DType::U8, &[400], Codec::None),
        plan("huge", DType::U8, &[5000], Codec::None),
        plan("d", DType::U8, &[10], Codec::None),
        plan("z1", DType::U8, &[200], Codec::Zstd),
        plan("z2", DType::U8, &[200], Codec::Zstd),
    ];
    let opts = WriterOptions {
        shard_size: 1000,
        zstd_level: 1,
    };
    let index = write_store(dir.path(), &tensors, opts);
    let files: Vec<usize> = index.tensors.iter().map(|e| e.file).collect();
    // a+b fit in 1000 bytes (b starts at 448); c starts a shard; huge gets its own; d follows.
    assert_eq!(&files[..5], [0, 0, 1, 2, 3]);
    // Two frames of at most ~220 bytes share one blob file.
    assert_eq!(files[5], files[6]);
    assert_eq!(index.files.len(), 5);
    for (tensor, entry) in tensors.iter().zip(&index.tensors) {
        assert_eq!(read_back(dir.path(), &index, entry), raw_bytes(tensor));
    }
}

#[test]
fn frames_past_shard_size_start_a_new_blob() {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<TensorPlan> = (0..3)
        .map(|i| plan(&format!("z{i}"), DType::U8, &[3000], Codec::Zstd))
        .collect();
    let writer = StoreWriter::create(
        dir.path(),
        tensors.clone(),
        WriterOptions {
            shard_size: 3000,
            zstd_level: 1,
        },
    )
    .unwrap();
    // Incompressible bytes: each frame is a little over 3000 bytes, one per blob.
    let noise = |seed: u64| -> Vec<u8> {
        (0..3000u64)
            .map(|i| (codec::checksum(&(i ^ seed << 20).to_le_bytes()) >> 7) as u8)
            .collect()
    };
    for (i, tensor) in tensors.iter().enumerate() {
        writer.write(&tensor.name, &noise(i as u64)).unwrap();
    }
    let index = writer.commit().unwrap();
    let files: BTreeSet<usize> = index.tensors.iter().map(|e| e.file).collect();
    assert_eq!(files.len(), 3);
    for (i, entry) in index.tensors.iter().enumerate() {
        assert_eq!(read_back(dir.path(), &index, entry), noise(i as u64));
    }
}

#[test]
fn two_threads_write_and_compress_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<TensorPlan> = (0..40)
        .map(|i| {
            let codec = if i % 2 == 0 { Codec::Zstd } else { Codec::None };
            plan(
                &format!("layer{i}.weight"),
                DType::F32,
                &[64, 17 + i],
                codec,
            )
        })
        .collect();
    let writer =
        StoreWriter::create(dir.path(), tensors.clone(), WriterOptions::default()).unwrap();
    std::thread::scope(|scope| {
        for half in tensors.chunks(20) {
            let writer = &writer;
            scope.spawn(move || {
                for tensor in half {
                    writer.write(&tensor.name, &raw_bytes(tensor)).unwrap();
                }
            });
        }
    });
    let index = writer.commit().unwrap();
    Index::read(dir.path()).unwrap();
    for (tensor, entry) in tensors.iter().zip(&index.tensors) {
        assert_eq!(read_back(dir.path(), &index, entry), raw_bytes(tensor));
    }
}

fn invalid_argument(result: Result<impl std::fmt::Debug, StoreError>, needle: &str) {
    match result {
        Err(StoreError::InvalidArgument(text)) => assert!(text.contains(needle), "{text}"),
        other => panic!("expected InvalidArgument about {needle}, got {other:?}"),
    }
}

#[test]
fn bad_plans_and_writes_are_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let opts = WriterOptions::default();
    let twice = vec![plan("w", DType::F32, &[1], Codec::None); 2];
    invalid_argument(
        StoreWriter::create(dir.path(), twice, opts),
        "\"w\": appears twice",
    );
    let reserved = vec![plan("__bigmodel_pad_0__", DType::U8, &[1], Codec::None)];
    invalid_argument(StoreWriter::create(dir.path(), reserved, opts), "reserved");
    let overflow = vec![plan("big", DType::F64, &[1 << 62, 4], Codec::None)];
    invalid_argument(
        StoreWriter::create(dir.path(), overflow, opts),
        "\"big\": shape",
    );
    let zero = WriterOptions {
        shard_size: 0,
        ..opts
    };
    invalid_argument(StoreWriter::create(dir.path(), vec![], zero), "shard_size");

    let tensors = vec![
        plan("w", DType::F32, &[2], Codec::None),
        plan("v", DType::U8, &[1], Codec::Zstd),
    ];
    let writer = StoreWriter::create(dir.path(), tensors, opts).unwrap();
    invalid_argument(
        writer.write("nope", &[0; 8]),
        "\"nope\" is not in the write plan",
    );
    invalid_argument(
        writer.write("w", &[0; 7]),
        "\"w\": got 7 bytes, dtype F32 shape [2] needs 8",
    );
    writer.write("w", &[0; 8]).unwrap();
    invalid_argument(writer.write("w", &[0; 8]), "\"w\" is written twice");
    invalid_argument(
        writer.commit(),
        "1 planned tensor(s) were never written: \"v\"",
    );
    assert!(
        dir_names(dir.path()).is_empty(),
        "a failed commit leaves nothing"
    );
}

#[test]
fn an_uncommitted_writer_leaves_the_previous_store_intact() {
    let dir = tempfile::tempdir().unwrap();
    let first = mixed_plan();
    let committed = write_store(dir.path(), &first, WriterOptions::default());
    let files_before = dir_names(dir.path());

    let second = vec![
        plan("other", DType::F32, &[1000], Codec::None),
        plan("z", DType::U8, &[10], Codec::Zstd),
    ];
    let writer = StoreWriter::create(dir.path(), second.clone(), WriterOptions::default()).unwrap();
    writer.write("other", &raw_bytes(&second[0])).unwrap();
    writer.write("z", &raw_bytes(&second[1])).unwrap();
    assert!(
        dir_names(dir.path()).len() > files_before.len(),
        "the writer has temp files"
    );
    assert_eq!(
        Index::read(dir.path()).unwrap(),
        committed,
        "readers still see the old store"
    );
    drop(writer);

    assert_eq!(dir_names(dir.path()), files_before);
    for (tensor, entry) in first.iter().zip(&committed.tensors) {
        assert_eq!(read_back(dir.path(), &committed, entry), raw_bytes(tensor));
    }
}

#[test]
fn a_commit_replaces_the_previous_generation() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("README.txt"), b"user file").unwrap();
    write_store(dir.path(), &mixed_plan(), WriterOptions::default());
    let second = vec![plan("only", DType::I32, &[3], Codec::None)];
    let index = write_store(dir.path(), &second, WriterOptions::default());
    let mut expected: BTreeSet<String> = index.files.iter().map(|f| f.path.clone()).collect();
    expected.extend([INDEX_FILE.to_owned(), "README.txt".to_owned()]);
    assert_eq!(dir_names(dir.path()), expected);
    assert_eq!(Index::read(dir.path()).unwrap().tensors.len(), 1);
}

#[test]
fn leftovers_of_a_killed_writer_are_cleaned_by_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    // What a writer killed before its commit leaves: an unheld lock, temp and renamed files.
    let dead = "00000000deadbeef";
    for name in [
        format!(".tmp-{dead}.lock"),
        format!(".tmp-{dead}-shard-00000.safetensors"),
        format!(".tmp-{dead}-bigmodel.index.json"),
        format!("{dead}-zstd-00000.bin"),
    ] {
        fs::write(dir.path().join(name), b"partial").unwrap();
    }
    let err = Index::read(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Incomplete { .. }), "{err:?}");

    let index = write_store(dir.path(), &mixed_plan(), WriterOptions::default());
    let mut expected: BTreeSet<String> = index.files.iter().map(|f| f.path.clone()).collect();
    expected.insert(INDEX_FILE.to_owned());
    assert_eq!(dir_names(dir.path()), expected);
}

#[test]
fn a_live_writer_keeps_its_files_while_another_commits() {
    let dir = tempfile::tempdir().unwrap();
    let slow_plan = vec![plan("slow", DType::U8, &[100], Codec::None)];
    let slow =
        StoreWriter::create(dir.path(), slow_plan.clone(), WriterOptions::default()).unwrap();
    write_store(dir.path(), &mixed_plan(), WriterOptions::default());
    slow.write("slow", &raw_bytes(&slow_plan[0])).unwrap();
    let index = slow.commit().unwrap();
    assert_eq!(Index::read(dir.path()).unwrap(), index);
    assert_eq!(
        read_back(dir.path(), &index, &index.tensors[0]),
        raw_bytes(&slow_plan[0])
    );
    // The last commit wins and removed the other writer's generation.
    assert_eq!(dir_names(dir.path()).len(), 2);
}

#[test]
fn an_empty_plan_commits_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let index = write_store(
        &dir.path().join("new/nested"),
        &[],
        WriterOptions::default(),
    );
    assert!(index.tensors.is_empty() && index.files.is_empty());
    assert_eq!(Index::read(&dir.path().join("new/nested")).unwrap(), index);
}

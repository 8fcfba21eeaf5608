//! Index parsing, reading and validation: every rule has a case that breaks it, and every
//! error names the file and the tensor.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use bigmodel_store::index::INDEX_FILE;
use bigmodel_store::{Codec, DType, Entry, FileRecord, Index, StoreError};

const DATA_FILE: &str = "data.bin";

/// A store directory with one 256-byte data file and a valid index over it.
fn valid_store() -> (tempfile::TempDir, Index) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join(DATA_FILE), [7u8; 256]).unwrap();
    let file = FileRecord {
        path: DATA_FILE.to_owned(),
        mounted: false,
        size: 256,
        mtime_ns: None,
    };
    let index = Index::new(vec![file], vec![entry("a", 0, 64), entry("b", 64, 32)]);
    (dir, index)
}

/// An uncompressed F32 entry of `length` bytes at `offset` in file 0.
fn entry(name: &str, offset: u64, length: u64) -> Entry {
    Entry {
        name: name.to_owned(),
        dtype: DType::F32,
        shape: vec![length / 4],
        file: 0,
        offset,
        length,
        codec: Codec::None,
        raw_length: length,
        checksum: Some(1),
    }
}

/// Validates `index` in `dir`; asserts the error names `tensor` and mentions `detail`.
fn assert_rejected(dir: &Path, index: &Index, tensor: &str, detail: &str) -> StoreError {
    let err = index
        .validate(dir)
        .expect_err("the index should be rejected");
    let text = err.to_string();
    assert!(text.contains(&format!("{tensor:?}")), "{text}");
    assert!(text.contains(detail), "{text}");
    err
}

fn assert_format(err: &StoreError, file: &Path) {
    match err {
        StoreError::Format { file: named, .. } => assert_eq!(named, file),
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn a_valid_index_passes_and_round_trips_through_write_atomic() {
    let (dir, index) = valid_store();
    index.validate(dir.path()).unwrap();
    index.write_atomic(dir.path(), "0123456789abcdef").unwrap();
    assert_eq!(Index::read(dir.path()).unwrap(), index);
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
}

/// (tensor named in the error, file named in the error, detail, how to break the index).
type BrokenIndex<'a> = (&'a str, &'a Path, &'a str, fn(&mut Index));

#[test]
fn entry_rules_are_enforced() {
    let (dir, base) = valid_store();
    let index_path = dir.path().join(INDEX_FILE);
    let data_path = dir.path().join(DATA_FILE);
    let cases: Vec<BrokenIndex> = vec![
        ("a", &index_path, "listed twice", |i| {
            i.tensors[1].name = "a".into()
        }),
        ("b", &index_path, "needs 32 bytes", |i| {
            i.tensors[1].raw_length = 31
        }),
        ("b", &index_path, "overflows", |i| {
            i.tensors[1].shape = vec![1 << 40, 1 << 40]
        }),
        ("b", &index_path, "differs from raw_length", |i| {
            i.tensors[1].length = 64
        }),
        ("b", &index_path, "out of range", |i| i.tensors[1].file = 1),
        ("b", &data_path, "overflows", |i| {
            i.tensors[1].codec = Codec::Zstd;
            i.tensors[1].offset = u64::MAX - 8;
        }),
        ("b", &data_path, "past the end of the file", |i| {
            i.tensors[1].offset = 256
        }),
        ("b", &data_path, "not a multiple of 64", |i| {
            i.tensors[1].offset = 96
        }),
        ("b", &data_path, "overlap", |i| {
            i.tensors[1].codec = Codec::Zstd;
            i.tensors[1].length = 16;
            i.tensors[1].offset = 0;
        }),
    ];
    for (tensor, file, detail, break_it) in cases {
        let mut index = base.clone();
        break_it(&mut index);
        let err = assert_rejected(dir.path(), &index, tensor, detail);
        assert_format(&err, file);
    }
}

#[test]
fn empty_tensors_overlap_nothing_and_mounted_files_need_no_alignment() {
    let (dir, mut index) = valid_store();
    index.tensors.push(entry("empty", 0, 0));
    index.validate(dir.path()).unwrap();
    let path = dir.path().join(DATA_FILE).canonicalize().unwrap();
    index.files[0].path = path.to_str().unwrap().to_owned();
    index.files[0].mounted = true;
    index.tensors[1].offset = 100;
    index.validate(dir.path()).unwrap();
}

#[test]
fn file_names_must_stay_inside_the_store() {
    let (dir, base) = valid_store();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("x.bin"), [0u8; 256]).unwrap();
    std::os::unix::fs::symlink(outside.path().join("x.bin"), dir.path().join("out.bin")).unwrap();
    std::os::unix::fs::symlink(dir.path().join(DATA_FILE), dir.path().join("in.bin")).unwrap();
    let escaping = [
        "../x.bin",
        "sub/data.bin",
        "/etc/passwd",
        "",
        "..",
        "out.bin",
    ];
    for name in escaping {
        let mut index = base.clone();
        index.files[0].path = name.to_owned();
        let err = assert_rejected(dir.path(), &index, "a", "store directory");
        assert_format(&err, &dir.path().join(INDEX_FILE));
    }
    let mut index = base.clone();
    index.files[0].path = "in.bin".to_owned();
    index.validate(dir.path()).unwrap();
    index.files[0].mounted = true;
    assert_rejected(dir.path(), &index, "a", "not an absolute path");
}

#[test]
fn files_must_exist_with_their_recorded_size_and_mtime() {
    let (dir, base) = valid_store();
    let data_path = dir.path().join(DATA_FILE);
    let mut index = base.clone();
    index.files[0].size = 300;
    let err = assert_rejected(dir.path(), &index, "a", "the file is 256 bytes");
    assert!(matches!(err, StoreError::Corrupt { ref file, .. } if *file == data_path));

    let mut index = base.clone();
    index.files[0].path = "gone.bin".to_owned();
    let err = assert_rejected(dir.path(), &index, "a", "missing");
    assert!(matches!(err, StoreError::Corrupt { .. }));

    fs::create_dir(dir.path().join("subdir")).unwrap();
    let mut index = base.clone();
    index.files[0].path = "subdir".to_owned();
    assert_rejected(dir.path(), &index, "a", "not a regular file");

    let mut index = base.clone();
    index.files[0].path = data_path.to_str().unwrap().to_owned();
    index.files[0].mounted = true;
    index.files[0].mtime_ns = Some(12345);
    let err = assert_rejected(dir.path(), &index, "a", "modified after it was mounted");
    assert!(matches!(err, StoreError::Corrupt { .. }));
}

fn index_json(format: &str, version: &str, dtype: &str, codec: &str) -> String {
    format!(
        r#"{{"format": {format}, "version": {version}, "files": [{{"path": "data.bin", "size": 256}}],
            "tensors": [{{"name": "w", "dtype": "{dtype}", "shape": [2], "file": 0, "offset": 0,
                          "length": 8, "codec": "{codec}", "raw_length": 8, "checksum": null}}]}}"#
    )
}

#[test]
fn parse_errors_name_the_file_and_the_reason() {
    let source = Path::new("/stores/s/bigmodel.index.json");
    let good = index_json("\"bigmodel-store\"", "1", "F32", "none");
    let parsed = Index::parse(good.as_bytes(), source).unwrap();
    assert_eq!(parsed.tensors[0].shape, [2]);
    let cases = [
        (good[..good.len() / 2].to_owned(), "not valid JSON"),
        ("not json".to_owned(), "not valid JSON"),
        ("[]".to_owned(), "not a JSON object"),
        (
            index_json("\"safetensors\"", "1", "F32", "none"),
            "not a bigmodel store index",
        ),
        (
            index_json("\"bigmodel-store\"", "2", "F32", "none"),
            "version 2 is not supported",
        ),
        (
            index_json("\"bigmodel-store\"", "\"1\"", "F32", "none"),
            "is not supported",
        ),
        (
            index_json("\"bigmodel-store\"", "1", "F17", "none"),
            "tensor \"w\": unknown dtype",
        ),
        (
            index_json("\"bigmodel-store\"", "1", "F32", "lz4"),
            "tensor \"w\": unknown variant",
        ),
    ];
    for (text, reason) in cases {
        let err = Index::parse(text.as_bytes(), source).unwrap_err();
        assert_format(&err, source);
        assert!(err.to_string().contains(reason), "{text}: {err}");
    }
}

#[test]
fn read_explains_what_is_missing() {
    let root = tempfile::tempdir().unwrap();
    let missing = root.path().join("nope");
    let err = Index::read(&missing).unwrap_err();
    assert!(matches!(err, StoreError::Io { ref path, ref source }
        if *path == missing && source.kind() == ErrorKind::NotFound));

    let file = root.path().join("model.safetensors");
    fs::write(&file, b"x").unwrap();
    assert_format(&Index::read(&file).unwrap_err(), &file);

    let empty = tempfile::tempdir().unwrap();
    let err = Index::read(empty.path()).unwrap_err();
    assert!(err.to_string().contains("not a bigmodel store"), "{err}");
    assert!(
        matches!(err, StoreError::Io { ref source, .. } if source.kind() == ErrorKind::NotFound)
    );

    fs::create_dir(empty.path().join(INDEX_FILE)).unwrap();
    let err = Index::read(empty.path()).unwrap_err();
    assert_format(&err, &empty.path().join(INDEX_FILE));
}

#[test]
fn read_reports_leftovers_without_an_index_as_incomplete() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path()
            .join(".tmp-0123456789abcdef-shard-00000.safetensors"),
        b"x",
    )
    .unwrap();
    let err = Index::read(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Incomplete { ref path, .. } if path == dir.path()));
    assert!(
        err.to_string()
            .contains(".tmp-0123456789abcdef-shard-00000"),
        "{err}"
    );
}

#[test]
fn read_validates_before_serving() {
    let (dir, mut index) = valid_store();
    index.tensors[1].offset = 1024;
    // write_atomic does not validate: it writes what it is given.
    index.write_atomic(dir.path(), "0123456789abcdef").unwrap();
    let err = Index::read(dir.path()).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
}

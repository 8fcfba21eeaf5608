//! Mounts: indexes over hand-built safetensors files, our own shards, and accelerate
//! offload folders, served in place; and mount indexes committed as stores.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bigmodel_store::mount::{mount_offload_folder, mount_safetensors, write_mount_index};
use bigmodel_store::writer::{StoreWriter, TensorPlan, WriterOptions};
use bigmodel_store::{Codec, DType, Entry, Index, StoreError};

/// A safetensors file written by hand (not by our builder): `(name, dtype, shape, begin,
/// end)` entries over `data`, header not padded, so offsets are deliberately unaligned.
fn write_safetensors(path: &Path, entries: &[(&str, &str, &[u64], u64, u64)], data: &[u8]) {
    let fields: Vec<String> = entries
        .iter()
        .map(|(name, dtype, shape, begin, end)| {
            format!(
                r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{begin},{end}]}}"#
            )
        })
        .collect();
    let json = format!(
        r#"{{"__metadata__":{{"format":"pt"}},{}}}"#,
        fields.join(",")
    );
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json.as_bytes());
    bytes.extend_from_slice(data);
    fs::write(path, bytes).unwrap();
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// A checkpoint with a 3-element F16 tensor, so the F32 after it sits at an odd offset.
fn checkpoint(dir: &Path, file: &str, prefix: &str) -> (PathBuf, Vec<u8>) {
    let path = dir.join(file);
    let bytes = data(6 + 16, prefix.len() as u8);
    let (a, b) = (format!("{prefix}a"), format!("{prefix}b"));
    write_safetensors(
        &path,
        &[(&a, "F16", &[3], 0, 6), (&b, "F32", &[2, 2], 6, 22)],
        &bytes,
    );
    (path, bytes)
}

fn stored_bytes(index: &Index, entry: &Entry) -> Vec<u8> {
    let file = fs::read(&index.files[entry.file].path).unwrap();
    file[entry.offset as usize..(entry.offset + entry.length) as usize].to_vec()
}

#[test]
fn mounts_a_safetensors_file_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = checkpoint(dir.path(), "model.safetensors", "");
    // A relative-looking path with `..` is recorded canonical and absolute.
    let roundabout = dir.path().join("sub/../model.safetensors");
    fs::create_dir(dir.path().join("sub")).unwrap();
    let index = mount_safetensors(&[roundabout]).unwrap();
    let record = &index.files[0];
    assert_eq!(Path::new(&record.path), path.canonicalize().unwrap());
    assert!(record.mounted && record.mtime_ns.is_some());
    assert_eq!(record.size, fs::metadata(&path).unwrap().len());
    let names: Vec<&str> = index.tensors.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    let b = &index.tensors[1];
    assert_eq!(
        (b.dtype, b.shape.as_slice(), b.codec, b.checksum),
        (DType::F32, &[2, 2][..], Codec::None, None)
    );
    let header_len = u64::from_le_bytes(fs::read(&path).unwrap()[..8].try_into().unwrap());
    assert_eq!(b.offset, 8 + header_len + 6);
    assert_eq!(stored_bytes(&index, b), bytes[6..]);
    assert_eq!(stored_bytes(&index, &index.tensors[0]), bytes[..6]);
    index.validate(dir.path()).unwrap();
}

#[test]
fn names_in_two_files_are_an_error_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = checkpoint(dir.path(), "one.safetensors", "x.");
    let (second, _) = checkpoint(dir.path(), "two.safetensors", "x.");
    let err = mount_safetensors(&[first.clone(), second.clone()]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Format { .. }), "{err:?}");
    assert!(
        text.contains("one.safetensors") && text.contains("two.safetensors"),
        "{text}"
    );
    assert!(text.contains("\"x.a\""), "{text}");
    // The same file twice is one mount, not a clash.
    let index = mount_safetensors(&[first.clone(), first]).unwrap();
    assert_eq!((index.files.len(), index.tensors.len()), (1, 2));
}

#[test]
fn a_file_changed_after_the_mount_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = checkpoint(dir.path(), "model.safetensors", "");
    let index = mount_safetensors(std::slice::from_ref(&path)).unwrap();
    let file = fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    let err = index.validate(dir.path()).unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { ref tensor, .. } if tensor == "a"),
        "{err:?}"
    );
}

#[test]
fn our_shards_mount_without_their_padding() {
    let dir = tempfile::tempdir().unwrap();
    let plan = vec![
        TensorPlan {
            name: "w".into(),
            dtype: DType::F16,
            shape: vec![3],
            codec: Codec::None,
        },
        TensorPlan {
            name: "v".into(),
            dtype: DType::I64,
            shape: vec![2],
            codec: Codec::None,
        },
    ];
    let writer = StoreWriter::create(dir.path(), plan, WriterOptions::default()).unwrap();
    writer.write("w", &data(6, 1)).unwrap();
    writer.write("v", &data(16, 2)).unwrap();
    let written = writer.commit().unwrap();
    let shard = dir.path().join(&written.files[0].path);
    let index = mount_safetensors(&[shard]).unwrap();
    let names: Vec<&str> = index.tensors.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["w", "v"]);
    for (mounted, original) in index.tensors.iter().zip(&written.tensors) {
        assert_eq!(
            (mounted.offset, mounted.length),
            (original.offset, original.length)
        );
    }
}

/// An offload folder as accelerate writes it, plus two entries into a safetensors file.
fn offload_folder(dir: &Path, ckpt: &Path) {
    let index = format!(
        r#"{{"lin.weight": {{"dtype": "float32", "shape": [2, 3]}},
            "lin.bias": {{"dtype": "bfloat16", "shape": [4]}},
            "mask": {{"dtype": "bool", "shape": [3]}},
            "step": {{"dtype": "int64", "shape": []}},
            "from_ckpt": {{"safetensors_file": "{0}", "weight_name": "b", "dtype": "float16"}},
            "a": {{"safetensors_file": "{0}"}}}}"#,
        ckpt.display()
    );
    fs::write(dir.join("index.json"), index).unwrap();
    for (name, len) in [
        ("lin.weight", 24),
        ("lin.bias", 8),
        ("mask", 3),
        ("step", 8),
    ] {
        fs::write(dir.join(format!("{name}.dat")), data(len, len as u8)).unwrap();
    }
}

#[test]
fn mounts_an_offload_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, ckpt_bytes) = checkpoint(dir.path(), "model.safetensors", "");
    let folder = dir.path().join("offload");
    fs::create_dir(&folder).unwrap();
    offload_folder(&folder, &ckpt);
    let index = mount_offload_folder(&folder).unwrap();
    index.validate(&folder).unwrap();
    let find = |name: &str| index.tensors.iter().find(|e| e.name == name).unwrap();
    let expected = [
        ("lin.weight", DType::F32, vec![2, 3], data(24, 24)),
        ("lin.bias", DType::BF16, vec![4], data(8, 8)),
        ("mask", DType::Bool, vec![3], data(3, 3)),
        ("step", DType::I64, vec![], data(8, 8)),
        (
            "from_ckpt",
            DType::F32,
            vec![2, 2],
            ckpt_bytes[6..].to_vec(),
        ),
        ("a", DType::F16, vec![3], ckpt_bytes[..6].to_vec()),
    ];
    for (name, dtype, shape, bytes) in expected {
        let entry = find(name);
        assert_eq!((entry.dtype, &entry.shape), (dtype, &shape), "{name}");
        assert_eq!(stored_bytes(&index, entry), bytes, "{name}");
        assert!(Path::new(&index.files[entry.file].path).is_absolute());
    }
    // One record for the safetensors file both entries point into.
    assert_eq!(index.files.len(), 5);
}

#[test]
fn offload_folder_errors_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, _) = checkpoint(dir.path(), "model.safetensors", "");
    let cases = [
        (
            r#"{"w": {"dtype": "float32", "shape": [3]}}"#,
            "the file is 4 bytes",
        ),
        (
            r#"{"w": {"dtype": "complex64", "shape": [1]}}"#,
            "unsupported dtype",
        ),
        (
            r#"{"../w": {"dtype": "float32", "shape": [1]}}"#,
            "cannot be a file name",
        ),
        (r#"{"w": {"dtype": "float32"}}"#, "missing field `shape`"),
        (r#"{"v": {"dtype": "float32", "shape": [1]}}"#, "v.dat"),
        (
            r#"{"w": {"safetensors_file": "CKPT", "weight_name": "zz"}}"#,
            "no tensor \"zz\"",
        ),
        (r#"{"w": 1"#, "not a JSON object"),
    ];
    for (json, reason) in cases {
        let folder = tempfile::tempdir().unwrap();
        fs::write(folder.path().join("w.dat"), [0u8; 4]).unwrap();
        let json = json.replace("CKPT", ckpt.to_str().unwrap());
        fs::write(folder.path().join("index.json"), &json).unwrap();
        let err = mount_offload_folder(folder.path()).unwrap_err();
        assert!(err.to_string().contains(reason), "{json}: {err}");
    }
    let err = mount_offload_folder(&dir.path().join("absent")).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
}

#[test]
fn a_mount_index_commits_as_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt, _) = checkpoint(dir.path(), "model.safetensors", "");
    let store = dir.path().join("store");
    let index = mount_safetensors(&[ckpt]).unwrap();
    write_mount_index(&store, &index).unwrap();
    assert_eq!(Index::read(&store).unwrap(), index);

    let mut not_mounted = index.clone();
    not_mounted.files[0].mounted = false;
    let err = write_mount_index(&store, &not_mounted).unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
}

#[test]
fn a_mount_of_a_store_own_shards_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let plan = vec![TensorPlan {
        name: "w".into(),
        dtype: DType::U8,
        shape: vec![5],
        codec: Codec::None,
    }];
    let writer = StoreWriter::create(dir.path(), plan, WriterOptions::default()).unwrap();
    writer.write("w", &data(5, 9)).unwrap();
    let written = writer.commit().unwrap();
    let shard = dir.path().join(&written.files[0].path);
    let mount = mount_safetensors(std::slice::from_ref(&shard)).unwrap();
    // Replacing the written index by the mount must not delete the mounted shard.
    write_mount_index(dir.path(), &mount).unwrap();
    assert!(shard.exists());
    let index = Index::read(dir.path()).unwrap();
    assert_eq!(stored_bytes(&index, &index.tensors[0]), data(5, 9));
}

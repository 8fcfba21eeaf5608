//! Property tests: no input makes the index or safetensors parsers (or index validation)
//! panic, and whatever they accept satisfies the bounds a reader relies on.

use std::path::Path;

use bigmodel_store::dtype::byte_size;
use bigmodel_store::safetensors::{parse_header, Header};
use bigmodel_store::Index;
use proptest::prelude::*;

/// Numbers that hit the edges: zero, small, around alignment, and near u64::MAX.
fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        0u64..300,
        Just(u64::MAX),
        Just(u64::MAX - 7),
        any::<u64>()
    ]
}

fn dtype_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("F32".to_owned()),
        Just("BOOL".to_owned()),
        Just("U16".to_owned()),
        "[A-Z0-9_]{0,8}"
    ]
}

/// A safetensors header with plausible structure and hostile numbers.
fn header_json() -> impl Strategy<Value = String> {
    let entry = (
        "[a-z_]{0,6}",
        dtype_name(),
        prop::collection::vec(edge_u64(), 0..4),
        edge_u64(),
        edge_u64(),
    );
    prop::collection::vec(entry, 0..5).prop_map(|entries| {
        let fields: Vec<String> = entries
            .iter()
            .map(|(name, dtype, shape, begin, end)| {
                format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{begin},{end}]}}"#)
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    })
}

/// An index document with plausible structure and hostile numbers and names.
fn index_json() -> impl Strategy<Value = String> {
    let file = (
        prop_oneof![
            Just("data.bin"),
            Just("../x"),
            Just("/etc/hostname"),
            Just("")
        ],
        any::<bool>(),
        edge_u64(),
    );
    let entry = (
        dtype_name(),
        prop::collection::vec(edge_u64(), 0..3),
        0usize..3,
        (edge_u64(), edge_u64(), edge_u64()),
        prop_oneof![Just("none"), Just("zstd")],
    );
    (
        prop::collection::vec(file, 0..3),
        prop::collection::vec(entry, 0..4),
    )
        .prop_map(|(files, entries)| {
            let files: Vec<String> = files
                .iter()
                .map(|(path, mounted, size)| {
                    format!(r#"{{"path":"{path}","mounted":{mounted},"size":{size}}}"#)
                })
                .collect();
            let tensors: Vec<String> = entries
                .iter()
                .enumerate()
                .map(|(i, (dtype, shape, file, (offset, length, raw), codec))| {
                    format!(
                        r#"{{"name":"t{}","dtype":"{dtype}","shape":{shape:?},"file":{file},"offset":{offset},"length":{length},"codec":"{codec}","raw_length":{raw}}}"#,
                        i % 3
                    )
                })
                .collect();
            format!(
                r#"{{"format":"bigmodel-store","version":1,"files":[{}],"tensors":[{}]}}"#,
                files.join(","),
                tensors.join(",")
            )
        })
}

/// What an accepted header promises: every tensor inside the file, sized by dtype × shape.
fn assert_in_bounds(header: &Header, file_len: u64) {
    for t in &header.tensors {
        assert!(t.offset >= header.data_start && t.offset + t.length <= file_len);
        assert_eq!(byte_size(t.dtype, &t.shape), Some(t.length));
    }
}

fn with_length(json: &[u8], extra: usize) -> Vec<u8> {
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(json);
    bytes.resize(bytes.len() + extra, 0);
    bytes
}

proptest! {
    #[test]
    fn index_parse_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Index::parse(&bytes, Path::new("fuzz.json"));
    }

    #[test]
    fn index_parse_and_validate_never_panic(json in index_json()) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("data.bin"), [0u8; 256]).unwrap();
        if let Ok(index) = Index::parse(json.as_bytes(), Path::new("fuzz.json")) {
            if index.validate(dir.path()).is_ok() {
                for e in &index.tensors {
                    let size = index.files[e.file].size;
                    prop_assert!(e.offset.checked_add(e.length).is_some_and(|end| end <= size));
                }
            }
        }
    }

    #[test]
    fn header_parse_never_panics_on_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        claimed_len in edge_u64(),
    ) {
        let path = Path::new("fuzz.safetensors");
        if let Ok(header) = parse_header(&bytes, bytes.len() as u64, path) {
            assert_in_bounds(&header, bytes.len() as u64);
        }
        let _ = parse_header(&bytes, claimed_len, path);
    }

    #[test]
    fn header_parse_never_panics_on_json(json in header_json(), extra in 0usize..300) {
        let bytes = with_length(json.as_bytes(), extra);
        if let Ok(header) = parse_header(&bytes, bytes.len() as u64, Path::new("fuzz.safetensors")) {
            assert_in_bounds(&header, bytes.len() as u64);
        }
    }

    #[test]
    fn header_parse_never_panics_on_text(text in "\\PC{0,200}", extra in 0usize..64) {
        let bytes = with_length(text.as_bytes(), extra);
        let _ = parse_header(&bytes, bytes.len() as u64, Path::new("fuzz.safetensors"));
    }
}

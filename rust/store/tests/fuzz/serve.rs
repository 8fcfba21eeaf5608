//! What serving an accepted index promises, checked on every tensor it lists.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use bigmodel_store::codec::checksum;
use bigmodel_store::dtype::byte_size;
use bigmodel_store::{Codec, Index, Store, StoreError, StoreOptions};

use super::Outcome;

/// Errors only a bug produces: a panic the store caught and reported.
pub fn check_no_internal_error(error: &StoreError) -> Result<(), String> {
    let text = error.to_string();
    match text.contains("internal error") {
        true => Err(format!("a read panicked inside the store: {text}")),
        false => Ok(()),
    }
}

/// Serves `index` and reads every tensor. Checks what a reader relies on: the served length
/// is the recorded one; for uncompressed tensors of non-mounted files, the bytes are the
/// file's bytes; and `verify()` lists exactly the tensors whose served bytes do not match
/// their checksum (a tensor that cannot be served may or may not be listed).
pub fn serve_and_check(index: &Index, root: &Path, zero_copy: bool) -> Result<Outcome, String> {
    let options = StoreOptions {
        read_threads: 0,
        zero_copy,
        ..StoreOptions::default()
    };
    let store = match Store::from_index(index.clone(), root.to_owned(), options) {
        Ok(store) => store,
        Err(e) => {
            check_no_internal_error(&e)?;
            return Ok(Outcome::Refused);
        }
    };
    let mut must_fail_verify = Vec::new();
    let mut must_pass_verify = Vec::new();
    for entry in &index.tensors {
        let bytes = match store.get(&entry.name) {
            Ok(bytes) => bytes,
            Err(e) => {
                check_no_internal_error(&e)?;
                continue;
            }
        };
        if bytes.len() as u64 != entry.raw_length {
            return Err(format!("{:?}: served {} bytes", entry.name, bytes.len()));
        }
        if entry.codec == Codec::None {
            let file = index.file_path(root, entry.file);
            let on_disk = fs::read(&file).map_err(|e| e.to_string())?;
            let range = entry.offset as usize..(entry.offset + entry.length) as usize;
            if on_disk[range] != *bytes.as_slice() {
                return Err(format!(
                    "{:?}: served bytes differ from the file",
                    entry.name
                ));
            }
        }
        match entry.checksum {
            Some(sum) if sum == checksum(bytes.as_slice()) => must_pass_verify.push(&entry.name),
            Some(_) => must_fail_verify.push(&entry.name),
            None => {}
        }
    }
    let failing = store.verify().map_err(|e| format!("verify failed: {e}"))?;
    for name in must_fail_verify {
        if !failing.contains(name) {
            return Err(format!(
                "{name:?}: wrong checksum served but verify() passes it"
            ));
        }
    }
    for name in must_pass_verify {
        if failing.contains(name) {
            return Err(format!(
                "{name:?}: right bytes served but verify() fails it"
            ));
        }
    }
    Ok(Outcome::Accepted)
}

/// What `Index::validate` promises, checked independently on an accepted index.
pub fn check_validated(index: &Index) -> Result<(), String> {
    let mut names = HashSet::new();
    for entry in &index.tensors {
        if !names.insert(&entry.name) {
            return Err(format!("{:?} accepted twice", entry.name));
        }
        let record = index
            .files
            .get(entry.file)
            .ok_or("file position out of range")?;
        let end = entry
            .offset
            .checked_add(entry.length)
            .ok_or("offset overflow accepted")?;
        if end > record.size {
            return Err(format!(
                "{:?} accepted past the end of its file",
                entry.name
            ));
        }
        if byte_size(entry.dtype, &entry.shape) != Some(entry.raw_length) {
            return Err(format!("{:?} accepted with a wrong raw length", entry.name));
        }
        if !record.mounted && (record.path.contains('/') || record.path == "..") {
            return Err(format!("{:?} accepted outside the store", record.path));
        }
    }
    Ok(())
}

//! libFuzzer target: the store index (parse, validate against a real store, serve, read).
#![no_main]

#[path = "../harness.rs"]
mod harness;

use std::sync::OnceLock;

use harness::{IndexTarget, Target};
use libfuzzer_sys::fuzz_target;

// Built once: it writes the fixture store the fuzzed indexes are validated against.
static TARGET: OnceLock<IndexTarget> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    if let Err(broken) = TARGET.get_or_init(IndexTarget::new).run(input) {
        panic!("{broken}");
    }
});

//! libFuzzer target: the store index (parse, validate against a real store, serve, read).
#![no_main]

#[path = "../engine.rs"]
mod engine;
#[path = "../targets.rs"]
mod targets;

use std::sync::OnceLock;

use engine::Target;
use libfuzzer_sys::fuzz_target;
use targets::IndexTarget;

// Built once: it writes the fixture store the fuzzed indexes are validated against.
static TARGET: OnceLock<IndexTarget> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    if let Err(broken) = TARGET.get_or_init(IndexTarget::new).run(input) {
        panic!("{broken}");
    }
});

//! libFuzzer target: the safetensors header parser (our shards and mounted checkpoints).
#![no_main]

#[path = "../harness.rs"]
mod harness;

use std::sync::OnceLock;

use harness::{HeaderTarget, Target};
use libfuzzer_sys::fuzz_target;

static TARGET: OnceLock<HeaderTarget> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    if let Err(broken) = TARGET.get_or_init(HeaderTarget::new).run(input) {
        panic!("{broken}");
    }
});

//! libFuzzer target: the safetensors header parser (our shards and mounted checkpoints).
#![no_main]

#[path = "../engine.rs"]
mod engine;
#[path = "../targets.rs"]
mod targets;

use std::sync::OnceLock;

use engine::Target;
use libfuzzer_sys::fuzz_target;
use targets::HeaderTarget;

static TARGET: OnceLock<HeaderTarget> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    if let Err(broken) = TARGET.get_or_init(HeaderTarget::new).run(input) {
        panic!("{broken}");
    }
});

//! Fuzzing with bolero: each target below runs for about a second of random inputs inside
//! `cargo test` (set `BOLERO_RANDOM_TEST_TIME_MS` or `BOLERO_RANDOM_ITERATIONS` for longer
//! runs), and under libFuzzer, coverage-guided, with
//! `cargo bolero test -p bigmodel-store --rustc-bootstrap <target>` (see docs/robustness.md).

mod fuzz;

use fuzz::{built_header_round_trips, fuzz_target, Outcome, Target};

#[test]
fn index() {
    fuzz_target(bolero::check!(), &fuzz::IndexTarget::new());
}

#[test]
fn shard_header() {
    fuzz_target(bolero::check!(), &fuzz::HeaderTarget::new());
}

#[test]
fn mount() {
    fuzz_target(bolero::check!(), &fuzz::MountTarget::new());
}

#[test]
fn offload_index() {
    fuzz_target(bolero::check!(), &fuzz::OffloadTarget::new());
}

#[test]
fn zstd_frame() {
    fuzz_target(bolero::check!(), &fuzz::ZstdTarget::new());
}

#[test]
fn seeds_reach_the_deep_paths() {
    // A seed the parsers refuse would leave validation and reads unfuzzed.
    let targets: [Box<dyn Target>; 5] = [
        Box::new(fuzz::IndexTarget::new()),
        Box::new(fuzz::HeaderTarget::new()),
        Box::new(fuzz::MountTarget::new()),
        Box::new(fuzz::OffloadTarget::new()),
        Box::new(fuzz::ZstdTarget::new()),
    ];
    for target in &targets {
        for seed in target.seeds() {
            assert_eq!(
                target.run(seed),
                Ok(Outcome::Accepted),
                "seed {}",
                seed.escape_ascii()
            );
        }
    }
    built_header_round_trips().unwrap();
}

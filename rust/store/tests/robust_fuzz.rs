//! A bounded run of the stable mutation fuzzer (`fuzz/engine.rs`, `fuzz/targets.rs`) over
//! every target: about a second each, from a fixed seed (set `BIGMODEL_FUZZ_SEED` to explore
//! others). Long runs: see `examples/fuzz_store.rs`.

#[path = "../fuzz/engine.rs"]
mod engine;
#[path = "../fuzz/targets.rs"]
mod targets;

use std::time::Duration;

use engine::{fuzz, printable, quietly, Budget, Target};
use targets::{all_targets, built_header_round_trips};

const PER_TARGET: Budget = Budget {
    executions: 200_000,
    time: Duration::from_millis(1200),
};

fn seed() -> u64 {
    std::env::var("BIGMODEL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed)
}

fn run(target: &dyn Target) {
    let report = fuzz(target, PER_TARGET, seed());
    eprintln!(
        "{}: {} executions in {:.2?}, {} accepted, {} outcomes, corpus {}",
        report.target,
        report.executions,
        report.elapsed,
        report.accepted,
        report.outcomes,
        report.corpus
    );
    if let Some(first) = report.failures.first() {
        panic!(
            "{}: {} failing input(s); first: {}\ninput: {}",
            report.target,
            report.failures.len(),
            first.message,
            printable(&first.input)
        );
    }
    // Enough runs to mean something, and mutation found rejection paths beyond the seeds.
    assert!(
        report.executions >= 500,
        "{} ran only {} times",
        report.target,
        report.executions
    );
    assert!(
        report.outcomes >= 5,
        "{} found only {} outcomes",
        report.target,
        report.outcomes
    );
}

fn target(name: &str) -> Box<dyn Target> {
    all_targets()
        .into_iter()
        .find(|t| t.name() == name)
        .expect("known target")
}

#[test]
fn fuzz_index_parser_validation_and_reads() {
    run(&*target("index"));
}

#[test]
fn fuzz_shard_header_parser() {
    run(&*target("shard-header"));
}

#[test]
fn fuzz_mounted_safetensors_files() {
    run(&*target("mount"));
}

#[test]
fn fuzz_offload_folder_index() {
    run(&*target("offload-index"));
}

#[test]
fn fuzz_zstd_frames() {
    run(&*target("zstd-frame"));
}

#[test]
fn seeds_reach_the_deep_paths() {
    // A seed the parsers refuse would leave validation and reads unfuzzed.
    for target in all_targets() {
        for seed in target.seeds() {
            assert_eq!(
                quietly(|| target.run(&seed)),
                Ok("valid".to_owned()),
                "{}: seed {}",
                target.name(),
                printable(&seed)
            );
        }
    }
    built_header_round_trips().unwrap();
}

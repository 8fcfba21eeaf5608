//! Long runs of the stable mutation fuzzer over the store's parsers (see `fuzz/engine.rs`, `fuzz/targets.rs`).
//!
//! ```text
//! cargo run --release -p bigmodel-store --example fuzz_store -- \
//!     [--target index|shard-header|mount|offload-index|zstd-frame|all] \
//!     [--executions N] [--seconds S] [--seed N] [--crashes DIR] [--write-seeds DIR]
//! ```
//! Prints executions, outcomes and failures per target; failing inputs go to `--crashes`.
//! Exits with status 1 when any input failed. `--write-seeds DIR` only writes each target's
//! seed inputs to `DIR/<target>/` (a starting corpus for the libFuzzer targets in `fuzz/`).

#[path = "../fuzz/engine.rs"]
mod engine;
#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::PathBuf;
use std::time::Duration;

use engine::{fuzz, printable, Budget};
use targets::all_targets;

struct Args {
    target: String,
    budget: Budget,
    seed: u64,
    crashes: Option<PathBuf>,
    write_seeds: Option<PathBuf>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        target: "all".to_owned(),
        budget: Budget {
            executions: 1_000_000,
            time: Duration::from_secs(3600),
        },
        seed: 1,
        crashes: None,
        write_seeds: None,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let mut value = || words.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--target" => args.target = value()?,
            "--executions" => {
                args.budget.executions = value()?.parse().map_err(|e| format!("{e}"))?
            }
            "--seconds" => {
                args.budget.time =
                    Duration::from_secs(value()?.parse().map_err(|e| format!("{e}"))?)
            }
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("{e}"))?,
            "--crashes" => args.crashes = Some(PathBuf::from(value()?)),
            "--write-seeds" => args.write_seeds = Some(PathBuf::from(value()?)),
            _ => {
                return Err(format!(
                    "unknown argument {flag} (see the example's doc comment)"
                ))
            }
        }
    }
    Ok(args)
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2);
    });
    let mut failed = false;
    for target in all_targets() {
        if args.target != "all" && args.target != target.name() {
            continue;
        }
        if let Some(dir) = &args.write_seeds {
            let dir = dir.join(target.name().replace('-', "_"));
            std::fs::create_dir_all(&dir).expect("seed directory");
            for (n, seed) in target.seeds().iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{n}")), seed).expect("seed file");
            }
            continue;
        }
        let report = fuzz(&*target, args.budget, args.seed);
        let rate = report.executions as f64 / report.elapsed.as_secs_f64();
        println!(
            "{:<14} {:>9} executions in {:>6.1?} ({:>6.0}/s), {:>8} accepted, {:>5} outcomes, \
             corpus {:>4}, failures {}",
            report.target,
            report.executions,
            report.elapsed,
            rate,
            report.accepted,
            report.outcomes,
            report.corpus,
            report.failures.len()
        );
        for (n, failure) in report.failures.iter().enumerate().take(20) {
            failed = true;
            println!("  {}: {}", failure.message, printable(&failure.input));
            if let Some(dir) = &args.crashes {
                let _ = std::fs::create_dir_all(dir);
                let _ = std::fs::write(dir.join(format!("{}-{n}", report.target)), &failure.input);
            }
        }
        failed |= !report.failures.is_empty();
    }
    std::process::exit(i32::from(failed));
}

//! The engine of a mutation fuzzer that runs on stable Rust: corpus, mutations, outcome
//! signatures. The targets it runs live in `targets.rs`.
//!
//! Included (through `#[path]`) by `tests/robust_fuzz.rs`, which runs every target for about
//! a second inside `cargo test`, by `examples/fuzz_store.rs`, for long runs, and by the
//! libFuzzer targets in `fuzz_targets/`. The loop is the classic one: take an input from the
//! corpus, apply a few random mutations (bit flips, interesting bytes and numbers,
//! dictionary tokens, deletions, duplications, splices) or ask the target for a
//! structure-aware one, run the target, and keep the input when its outcome is new. The
//! "outcome" is the error message with numbers and quoted names blanked (or "valid"): a cheap
//! stand-in for coverage that still steers the corpus toward every distinct rejection path.

#![allow(dead_code)] // each includer uses its own part

use std::cell::Cell;
use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;
use std::time::{Duration, Instant};

use bigmodel_store::StoreError;

/// Inputs never grow past this (mutations that would are cut back).
const MAX_INPUT: usize = 1 << 16;
/// The corpus stops growing here; mutation continues from what it holds.
const MAX_CORPUS: usize = 4096;

/// splitmix64: fast, and good enough to drive mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One thing to fuzz: its seed inputs, its dictionary, and how to run an input.
pub trait Target {
    fn name(&self) -> &'static str;
    fn seeds(&self) -> Vec<Vec<u8>>;
    /// Byte strings worth inserting (JSON syntax, field names, dtype names, numbers).
    fn tokens(&self) -> Vec<Vec<u8>>;
    /// The outcome's signature, or `Err` describing a broken promise.
    fn run(&self, input: &[u8]) -> Result<String, String>;
    /// A structure-aware input (a valid document with a few fields changed): reaches the
    /// paths behind validation far more often than byte mutations do. None by default.
    fn structured(&self, _rng: &mut Rng) -> Option<Vec<u8>> {
        None
    }
}

/// A failing input and what went wrong.
pub struct Failure {
    pub input: Vec<u8>,
    pub message: String,
}

pub struct Report {
    pub target: &'static str,
    pub executions: u64,
    /// Executions whose input was accepted all the way (parsed, validated, served).
    pub accepted: u64,
    pub failures: Vec<Failure>,
    pub corpus: usize,
    pub outcomes: usize,
    pub elapsed: Duration,
}

/// Stops at whichever comes first.
#[derive(Clone, Copy)]
pub struct Budget {
    pub executions: u64,
    pub time: Duration,
}

/// Runs `target` from its seeds until the budget is spent.
pub fn fuzz(target: &dyn Target, budget: Budget, seed: u64) -> Report {
    let started = Instant::now();
    let mut rng = Rng::new(seed);
    let tokens = target.tokens();
    let mut corpus = target.seeds();
    let mut outcomes = HashSet::new();
    let mut report = Report {
        target: target.name(),
        executions: 0,
        accepted: 0,
        failures: Vec::new(),
        corpus: 0,
        outcomes: 0,
        elapsed: Duration::ZERO,
    };
    for input in corpus.clone() {
        execute(target, input, &mut outcomes, &mut report);
    }
    while report.executions < budget.executions && started.elapsed() < budget.time {
        let structured = match rng.below(2) {
            0 => target.structured(&mut rng),
            _ => None,
        };
        let child = structured.unwrap_or_else(|| {
            let parent = &corpus[rng.below(corpus.len())];
            let other = &corpus[rng.below(corpus.len())];
            mutate(parent, other, &tokens, &mut rng)
        });
        if let Some(new) = execute(target, child, &mut outcomes, &mut report) {
            if corpus.len() < MAX_CORPUS {
                corpus.push(new);
            }
        }
    }
    report.corpus = corpus.len();
    report.outcomes = outcomes.len();
    report.elapsed = started.elapsed();
    report
}

/// Runs one input; returns it back when its outcome was never seen before.
fn execute(
    target: &dyn Target,
    input: Vec<u8>,
    outcomes: &mut HashSet<String>,
    report: &mut Report,
) -> Option<Vec<u8>> {
    report.executions += 1;
    let outcome = quietly(|| target.run(&input));
    match outcome {
        Ok(signature) => {
            report.accepted += u64::from(signature == "valid");
            outcomes.insert(signature).then_some(input)
        }
        Err(message) => {
            report.failures.push(Failure { input, message });
            None
        }
    }
}

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, turning a panic into `Err` without printing it (the default hook would print
/// every caught panic); panics elsewhere in the process still print as usual.
pub fn quietly(f: impl FnOnce() -> Result<String, String>) -> Result<String, String> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                default(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    outcome.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_owned());
        Err(format!("panicked: {message}"))
    })
}

// -- Mutations -----------------------------------------------------------------------------

const INTERESTING_BYTES: &[u8] = b"\x00\x01\x7f\x80\xff\"\\{}[],:-0123456789 .eE";
const INTERESTING_NUMBERS: &[&str] = &[
    "0",
    "1",
    "-1",
    "-0",
    "2",
    "7",
    "63",
    "64",
    "65",
    "128",
    "4095",
    "4096",
    "65536",
    "100000000",
    "100000001",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551552",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "0.5",
    "1e2",
];

/// A child of `parent`: one to four stacked mutations, `other` as a splice partner.
pub fn mutate(parent: &[u8], other: &[u8], tokens: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut data = parent.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(10) {
            0 => flip_bit(&mut data, rng),
            1 => set_interesting_byte(&mut data, rng),
            2 => delete_range(&mut data, rng),
            3 => duplicate_range(&mut data, rng),
            4 => insert_token(&mut data, tokens, rng),
            5 | 6 => replace_number(&mut data, rng),
            7 => data.truncate(rng.below(data.len() + 1)),
            8 => splice(&mut data, other, rng),
            _ => overwrite_length_field(&mut data, rng),
        }
    }
    data.truncate(MAX_INPUT);
    data
}

fn flip_bit(data: &mut [u8], rng: &mut Rng) {
    if !data.is_empty() {
        let at = rng.below(data.len());
        data[at] ^= 1 << rng.below(8);
    }
}

fn set_interesting_byte(data: &mut [u8], rng: &mut Rng) {
    if !data.is_empty() {
        let at = rng.below(data.len());
        data[at] = INTERESTING_BYTES[rng.below(INTERESTING_BYTES.len())];
    }
}

fn delete_range(data: &mut Vec<u8>, rng: &mut Rng) {
    let start = rng.below(data.len() + 1);
    let end = (start + 1 + rng.below(16)).min(data.len());
    data.drain(start..end.max(start));
}

fn duplicate_range(data: &mut Vec<u8>, rng: &mut Rng) {
    let start = rng.below(data.len() + 1);
    let end = (start + 1 + rng.below(64)).min(data.len());
    let copy: Vec<u8> = data[start..end.max(start)].to_vec();
    let at = rng.below(data.len() + 1);
    data.splice(at..at, copy);
}

fn insert_token(data: &mut Vec<u8>, tokens: &[Vec<u8>], rng: &mut Rng) {
    if tokens.is_empty() {
        return;
    }
    let token = &tokens[rng.below(tokens.len())];
    let at = rng.below(data.len() + 1);
    data.splice(at..at, token.iter().copied());
}

/// Replaces the digits of a number found from a random position with another number.
fn replace_number(data: &mut Vec<u8>, rng: &mut Rng) {
    let from = rng.below(data.len() + 1);
    let Some(start) = data[from..]
        .iter()
        .position(u8::is_ascii_digit)
        .map(|p| p + from)
    else {
        return;
    };
    let end = data[start..]
        .iter()
        .position(|b| !(b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+')))
        .map_or(data.len(), |p| p + start);
    let number = INTERESTING_NUMBERS[rng.below(INTERESTING_NUMBERS.len())];
    data.splice(start..end, number.bytes());
}

fn splice(data: &mut Vec<u8>, other: &[u8], rng: &mut Rng) {
    let cut = rng.below(data.len() + 1);
    let from = rng.below(other.len() + 1);
    data.truncate(cut);
    data.extend_from_slice(&other[from..]);
}

/// A safetensors length field (the first 8 bytes) set near the truth or to an extreme.
fn overwrite_length_field(data: &mut [u8], rng: &mut Rng) {
    if data.len() < 8 {
        return;
    }
    let truth = (data.len() - 8) as u64;
    let candidates = [
        0,
        truth,
        truth.wrapping_sub(1),
        truth + 1,
        truth.wrapping_sub(rng.below(64) as u64),
        100_000_001,
        u64::MAX,
        u64::MAX - 7,
        rng.next(),
    ];
    let value = candidates[rng.below(candidates.len())];
    data[..8].copy_from_slice(&value.to_le_bytes());
}

// -- Outcome signatures --------------------------------------------------------------------

/// The shape of an error message: kind, with numbers and quoted strings blanked, so that
/// "offset 64 past 60" and "offset 128 past 120" are one outcome.
pub fn signature(kind: &str, error: &StoreError) -> String {
    let variant = match error {
        StoreError::NotFound { .. } => "not-found",
        StoreError::Corrupt { .. } => "corrupt",
        StoreError::Incomplete { .. } => "incomplete",
        StoreError::Format { .. } => "format",
        StoreError::InvalidArgument(_) => "argument",
        StoreError::Io { .. } => "io",
    };
    let mut shape = String::new();
    let mut in_quotes = false;
    for c in error.to_string().chars().take(160) {
        match c {
            '"' | '`' => in_quotes = !in_quotes,
            _ if in_quotes => {}
            '0'..='9' => {
                if !shape.ends_with('#') {
                    shape.push('#');
                }
            }
            _ => shape.push(c),
        }
    }
    format!("{kind}/{variant}/{shape}")
}

/// `input` as printable text (escapes for everything else), for failure reports.
pub fn printable(input: &[u8]) -> String {
    input.escape_ascii().to_string()
}

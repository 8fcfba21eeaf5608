//! The fuzz targets of the store and the input they share, run by bolero: in `cargo test`
//! as a short random run of each target, and under libFuzzer (coverage-guided) with
//! `cargo bolero test` (see `docs/robustness.md`).
//!
//! An input is a seed chosen among the target's valid documents plus a few edits: byte-level
//! ones (bit flips, interesting bytes and numbers, dictionary tokens, deletions,
//! duplications, splices, a safetensors length field) and a structure-aware one that
//! changes one field of the parsed document so that it may still validate but lies. Valid
//! seeds put every edit one step from the deep paths (validation, serving, reads), which
//! random bytes alone never reach.

mod edits;
mod header;
mod index;
mod offload;
mod serve;
mod zstd;

use std::sync::atomic::{AtomicU64, Ordering};

use bolero::{BorrowedInput, ByteSliceGenerator, DefaultEngine, TestTarget, TypeGenerator};

pub use edits::{Edit, Picks};
pub use header::{built_header_round_trips, HeaderTarget, MountTarget};
pub use index::IndexTarget;
pub use offload::OffloadTarget;
pub use zstd::ZstdTarget;

/// One thing to fuzz: its seeds and dictionary, how to run an input, and the promises it
/// checks on what it accepts.
pub trait Target: std::panic::RefUnwindSafe {
    /// Valid inputs, accepted all the way.
    fn seeds(&self) -> &[Vec<u8>];
    /// Byte strings worth inserting (JSON syntax, field names, dtype names, numbers).
    fn tokens(&self) -> &[Vec<u8>];
    /// `seed` with one field of its document changed as `picks` says (`None`: the target has
    /// no structure to change, or the seed does not parse).
    fn restructure(&self, _seed: &[u8], _picks: &mut Picks) -> Option<Vec<u8>> {
        None
    }
    /// Runs one input: whether it was accepted, or `Err` describing a broken promise.
    fn run(&self, input: &[u8]) -> Result<Outcome, String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Parsed, validated and served (or decoded): every promise was checked.
    Accepted,
    /// Refused with an error, as a bad input should be.
    Refused,
}

/// A fuzz input: a seed of the target and the edits applied to it, in order.
#[derive(Debug, TypeGenerator)]
pub struct Input {
    seed: u8,
    #[generator(bolero::produce::<Vec<Edit>>().with().len(0usize..=4))]
    edits: Vec<Edit>,
}

impl Input {
    /// The bytes this input stands for, for `target`.
    pub fn bytes(&self, target: &dyn Target) -> Vec<u8> {
        let seeds = target.seeds();
        let mut data = seeds[self.seed as usize % seeds.len()].clone();
        for edit in &self.edits {
            data = edit.apply(data, target, seeds);
        }
        data
    }
}

/// Runs `target` under the engine `check` was made for: each input's bytes, a panic on a
/// broken promise. In the test engine (a bounded random run) it then checks that the run
/// reached both sides: inputs accepted all the way and inputs refused.
pub fn fuzz_target(
    check: TestTarget<ByteSliceGenerator, DefaultEngine, BorrowedInput>,
    target: &dyn Target,
) {
    let accepted = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    check.with_type::<Input>().for_each(|input| {
        match target.run(&input.bytes(target)) {
            Ok(Outcome::Accepted) => accepted.fetch_add(1, Ordering::Relaxed),
            Ok(Outcome::Refused) => refused.fetch_add(1, Ordering::Relaxed),
            Err(broken) => panic!("{broken}"),
        };
    });
    let (accepted, refused) = (accepted.into_inner(), refused.into_inner());
    eprintln!("{accepted} inputs accepted, {refused} refused");
    assert!(
        accepted > 0 && refused > 0,
        "the run missed a side: {accepted} accepted, {refused} refused"
    );
}

/// A directory for a target's files: in memory (tmpfs) where the system has one, since
/// stores read their files with direct I/O, which goes to the disk every time (and first
/// writes back what a target just wrote): a memory file system keeps executions fast.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .expect("temporary directory")
}

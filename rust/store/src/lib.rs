//! bigmodel-store: an indexed, memory-mapped tensor store with a byte-budgeted residency
//! cache and background read threads. Pure Rust; the Python binding lives in `rust/py`.
//!
//! - [`dtype`]: element types (safetensors names) and byte sizes.
//! - [`index`]: the versioned JSON index, its validation and atomic commit.
//! - [`safetensors`]: safetensors headers, read (mounts) and written (our shards).
//! - [`codec`]: checksums and zstd frames.
//! - [`writer`]: [`writer::StoreWriter`], plan-based, atomic.
//! - [`mount`]: indexes over files we did not write (safetensors, accelerate offload folders).
//! - [`cache`]: the residency cache (budget, pins, LRU eviction that returns memory).
//! - [`pool`]: background read threads.
//! - [`store`]: [`store::Store`], the reader that ties them together.
//! - [`error`]: [`error::StoreError`].

pub mod codec;
pub mod dtype;
pub mod error;
pub mod index;

pub use dtype::DType;
pub use error::{Result, StoreError};
pub use index::{Codec, Entry, FileRecord, Index};

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
//! - [`error`]: the error type, [`error::StoreError`].

mod buffers;
pub mod cache;
pub mod codec;
pub mod dtype;
pub mod error;
pub mod index;
mod json;
pub mod layout;
mod mapping;
pub mod mount;
pub mod pool;
pub mod safetensors;
pub mod stats;
pub mod store;
pub mod writer;

pub use dtype::DType;
pub use error::{Result, StoreError};
pub use index::{Codec, Entry, FileRecord, Index};
pub use stats::Stats;
pub use store::{Store, StoreOptions, TensorBytes};

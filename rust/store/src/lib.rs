//! bigmodel-store: an indexed, memory-mapped tensor store with a byte-budgeted residency
//! cache and background read threads. Pure Rust; the Python binding lives in `rust/py`.
//!
//! - [`dtype`]: element types (safetensors names) and byte sizes.
//! - [`index`]: the versioned JSON index, its validation and atomic commit.
//! - [`safetensors`]: safetensors headers, read (mounts) and written (our shards).
//! - [`codec`]: checksums and zstd frames.
//! - [`writer`]: [`writer::StoreWriter`], plan-based, atomic.
//! - [`layout`]: names of the files a writer puts in a store directory.
//! - `cleanup`: writer liveness locks and the removal of what dead writers left.
//! - `fs`: file-system helpers (non-blocking opens of regular files, directory sync).
//! - [`mount`]: indexes over files we did not write (safetensors, accelerate offload folders).
//! - `direct`: direct I/O (`O_DIRECT`) reads into owned, page-aligned buffers.
//! - `page_cache`: what the page cache holds of a file, and copies out of it that read nothing.
//! - [`cache`]: the residency cache (budget, pins, LRU eviction that returns memory).
//! - [`pool`]: background read threads.
//! - [`store`]: [`store::Store`], the reader that ties them together.
//! - [`error`]: the error type, [`error::StoreError`].

mod buffers;
pub mod cache;
mod cleanup;
pub mod codec;
mod direct;
pub mod dtype;
pub mod error;
mod fs;
pub mod index;
mod json;
pub mod layout;
mod mapping;
pub mod mount;
mod page_cache;
mod pages;
pub mod pool;
pub mod safetensors;
pub mod stats;
pub mod store;
mod verify;
pub mod writer;

pub use dtype::DType;
pub use error::{Result, StoreError};
pub use index::{Codec, Entry, FileRecord, Index};
pub use stats::Stats;
pub use store::{Store, StoreOptions, TensorBytes};

//! Owned, 64-byte-aligned byte buffers: the memory of every tensor a store does not serve
//! as a view of its file mapping (all of them when it reads owned copies).
//!
//! Large buffers are anonymous mappings of their own rather than `malloc` memory: glibc keeps
//! freed heap chunks of a few MB for reuse, so evicting a tensor would not give its memory
//! back to the system; `munmap` does, at once. Buffers of 2 MiB and more start on a 2 MiB
//! boundary, so a system that backs anonymous memory with transparent huge pages can give
//! them some.
//!
//! They do not *ask* for huge pages (`MADV_HUGEPAGE`): measured on a VM whose balloon
//! reports freed memory to the host (common in clouds), a new huge page is backed by the
//! host on first touch and filling fresh buffers ran ~1.8x slower than with 4 KiB pages
//! (1.5 vs 2.6 GB/s for the first pass over a store), while reads into recycled buffers
//! ran the same either way. The cache recycles buffers instead (see `cache.rs`).
//!
//! Mapped buffers are page-aligned, whole pages, and keep their address for life: direct I/O
//! fills them in place (see `direct.rs`), and they could be page-locked for copies to a GPU.

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;

/// Alignment of every buffer: enough for any dtype and for SIMD loads.
pub(crate) const BUFFER_ALIGN: usize = 64;
/// Below this size a buffer comes from the heap; from it on, from its own mapping.
const MAPPED_MIN: usize = 64 << 10;
/// From this capacity on, the cache recycles evicted buffers: a mapping's pages each cost a
/// fault to bring in, while the heap recycles small buffers by itself.
pub(crate) const RECYCLE_MIN: usize = MAPPED_MIN;
const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;

enum Memory {
    /// `alloc_zeroed` with `Layout(capacity, BUFFER_ALIGN)`; capacity may be 0 (dangling).
    Heap,
    /// `mmap` of exactly `capacity` bytes.
    Mapped,
}

/// A fixed-capacity, zero-initialised, 64-byte-aligned byte buffer.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    memory: Memory,
}

// SAFETY: the buffer exclusively owns its memory; `&AlignedBuf` only hands out shared reads.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: no interior mutability through `&AlignedBuf`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// The capacity a buffer of `len` bytes gets (what it costs in the residency budget);
    /// `None` when no buffer that large can exist.
    pub fn capacity_for(len: usize) -> Option<usize> {
        if len < MAPPED_MIN {
            Some(len)
        } else {
            len.checked_next_multiple_of(PAGE)
                .filter(|capacity| capacity.checked_add(HUGE_PAGE).is_some())
        }
    }

    /// A zero-filled buffer of `len` bytes. Fails (instead of aborting) when memory runs out,
    /// so that a huge tensor is an error the caller sees.
    pub fn new(len: usize) -> io::Result<AlignedBuf> {
        let too_large = || {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate {len} bytes"),
            )
        };
        let capacity = Self::capacity_for(len).ok_or_else(too_large)?;
        let (ptr, memory) = if len < MAPPED_MIN {
            (heap_alloc(capacity)?, Memory::Heap)
        } else {
            (map_anonymous(capacity)?, Memory::Mapped)
        };
        Ok(AlignedBuf {
            ptr,
            len,
            capacity,
            memory,
        })
    }

    /// Reuses this buffer's memory for `len` bytes; `len` must not exceed the capacity.
    /// The bytes keep their previous contents until overwritten.
    pub fn reuse_for(mut self, len: usize) -> AlignedBuf {
        assert!(
            len <= self.capacity,
            "buffer of {} bytes reused for {len}",
            self.capacity
        );
        self.len = len;
        self
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len <= capacity` bytes, allocated and initialised (zeroed or written);
        // `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// All `capacity` bytes, those past `len` included (a read may fill more than the
    /// tensor, then move the tensor down to the start).
    pub fn capacity_mut(&mut self) -> &mut [u8] {
        // SAFETY: `capacity` bytes, allocated and initialised (zeroed, then only written);
        // `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.memory {
            Memory::Heap if self.capacity == 0 => {}
            Memory::Heap => {
                // SAFETY: allocated by `heap_alloc` with exactly this layout.
                unsafe { alloc::dealloc(self.ptr.as_ptr(), heap_layout(self.capacity)) }
            }
            Memory::Mapped => {
                // SAFETY: mapped by `map_anonymous` with exactly this length; nothing else
                // refers to it once the owner is dropped.
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.capacity) };
            }
        }
    }
}

fn heap_layout(capacity: usize) -> Layout {
    // Capacity < MAPPED_MIN, so the layout is always valid.
    Layout::from_size_align(capacity, BUFFER_ALIGN).expect("small layout")
}

fn heap_alloc(capacity: usize) -> io::Result<NonNull<u8>> {
    if capacity == 0 {
        // An aligned, never dereferenced address: zero-sized allocations are not allowed.
        return Ok(NonNull::new(BUFFER_ALIGN as *mut u8).expect("non-null"));
    }
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { alloc::alloc_zeroed(heap_layout(capacity)) };
    NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
}

/// Maps `capacity` (a multiple of the page size, at most `usize::MAX - HUGE_PAGE`) zeroed
/// bytes. Large buffers are placed on a huge-page boundary (map more, unmap the unaligned
/// head and tail).
fn map_anonymous(capacity: usize) -> io::Result<NonNull<u8>> {
    let huge = capacity >= HUGE_PAGE;
    let slack = if huge { HUGE_PAGE } else { 0 };
    let base = mmap_anon(capacity + slack)?;
    if !huge {
        return Ok(base);
    }
    let start = (base.as_ptr() as usize).next_multiple_of(HUGE_PAGE);
    let head = start - base.as_ptr() as usize;
    // SAFETY: head and tail lie inside the mapping just created and are unused.
    unsafe {
        if head > 0 {
            libc::munmap(base.as_ptr().cast(), head);
        }
        if slack - head > 0 {
            libc::munmap((start + capacity) as *mut libc::c_void, slack - head);
        }
    }
    Ok(NonNull::new(start as *mut u8).expect("mapped address is non-null"))
}

fn mmap_anon(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: a fresh private anonymous mapping touches no existing memory.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(NonNull::new(ptr.cast()).expect("mmap never returns null on success"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_zeroed_and_writable() {
        for len in [0, 1, 63, 4096, MAPPED_MIN - 1, MAPPED_MIN, 3 << 20] {
            let mut buf = AlignedBuf::new(len).unwrap();
            assert_eq!(buf.len(), len);
            assert!(buf.capacity() >= len);
            assert_eq!(buf.as_ptr() as usize % BUFFER_ALIGN, 0, "len {len}");
            assert!(buf.as_mut_slice().iter().all(|&b| b == 0));
            buf.as_mut_slice().fill(7);
            assert!(buf.as_mut_slice().iter().all(|&b| b == 7));
        }
    }

    #[test]
    fn huge_buffers_start_on_a_huge_page_boundary() {
        let buf = AlignedBuf::new(5 << 20).unwrap();
        assert_eq!(buf.as_ptr() as usize % HUGE_PAGE, 0);
        assert_eq!(buf.capacity(), 5 << 20);
    }

    #[test]
    fn reuse_keeps_memory_and_changes_length() {
        let buf = AlignedBuf::new(1 << 20).unwrap();
        let ptr = buf.as_ptr();
        let reused = buf.reuse_for(1000);
        assert_eq!(reused.as_ptr(), ptr);
        assert_eq!(reused.len(), 1000);
        assert_eq!(reused.capacity(), 1 << 20);
    }

    #[test]
    fn mapped_buffers_are_whole_pages_at_page_boundaries() {
        for len in [
            MAPPED_MIN,
            MAPPED_MIN + 1,
            MAPPED_MIN + 3 * PAGE + 5,
            3 << 20,
        ] {
            let mut buf = AlignedBuf::new(len).unwrap();
            assert_eq!(buf.as_ptr() as usize % PAGE, 0, "len {len}");
            assert_eq!(buf.capacity(), len.next_multiple_of(PAGE));
            assert_eq!(buf.capacity_mut().len(), buf.capacity());
        }
    }
}

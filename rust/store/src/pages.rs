//! Memory counted by page: how much of the pages that views span is in memory.
//!
//! A view is served straight from its file's mapping, so the memory it holds is whole
//! pages, some of them shared with neighbouring tensors. [`resident_bytes`] asks the kernel
//! (`mincore`) which of them are in memory now.

use crate::mapping::page_size;

/// Bytes of the pages touched by the address ranges `spans` (start, length) that are in
/// memory; a page in several ranges counts once. Every range must lie inside a mapping that
/// stays mapped during the call (the store's file mappings live as long as its runtime).
pub(crate) fn resident_bytes(spans: &[(usize, usize)]) -> u64 {
    let page = page_size();
    let mut pages: Vec<(usize, usize)> = spans
        .iter()
        .filter(|(_, len)| *len > 0)
        .map(|&(start, len)| (start / page * page, (start + len).div_ceil(page) * page))
        .collect();
    pages.sort_unstable();
    let mut total = 0;
    let mut merged: Option<(usize, usize)> = None;
    for (start, end) in pages {
        merged = match merged {
            Some((from, to)) if start <= to => Some((from, to.max(end))),
            Some(done) => {
                total += resident_in(done);
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    total + merged.map_or(0, resident_in)
}

/// Bytes of the page-aligned range `[start, end)` that are in memory.
fn resident_in((start, end): (usize, usize)) -> u64 {
    /// Pages asked about per `mincore` call: bounds the vector for huge ranges.
    const CHUNK_PAGES: usize = 1 << 16;
    let page = page_size();
    let mut flags = vec![0u8; ((end - start) / page).min(CHUNK_PAGES)];
    let mut resident = 0u64;
    let mut at = start;
    while at < end {
        let pages = ((end - at) / page).min(CHUNK_PAGES);
        // SAFETY: `[at, at + pages * page)` lies in a live mapping (see `resident_bytes`);
        // `flags` has room for one byte per page. mincore only reads page tables.
        let rc =
            unsafe { libc::mincore(at as *mut libc::c_void, pages * page, flags.as_mut_ptr()) };
        if rc == 0 {
            let in_memory = flags[..pages].iter().filter(|&&f| f & 1 == 1).count();
            resident += (in_memory * page) as u64;
        }
        at += pages * page;
    }
    resident
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_touched_pages_once() {
        let page = page_size();
        let mut buffer = crate::buffers::AlignedBuf::new(32 * page).unwrap();
        let base = buffer.as_ptr() as usize;
        assert_eq!(
            base % page,
            0,
            "buffers of 64 KiB and more are mappings of their own"
        );
        buffer.as_mut_slice()[..3 * page].fill(1);
        // Two ranges sharing page 1, and one over pages never touched (not in memory).
        let spans = [
            (base + 10, page),
            (base + page, 2 * page),
            (base + 5 * page, page),
        ];
        assert_eq!(resident_bytes(&spans), 3 * page as u64);
    }
}

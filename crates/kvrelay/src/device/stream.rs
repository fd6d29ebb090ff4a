//! Bulk host copies that bypass the cache on the destination side.
//!
//! A plan moves hundreds of MiB in runs of a few KiB. glibc's memcpy switches to
//! non-temporal stores only for single copies larger than the cache, so a run-by-run memcpy
//! pays a read-for-ownership of every destination line and evicts the cache. Streaming
//! stores avoid both, which is what lets a plan keep up with one large memcpy.

/// Below this many bytes in a whole plan, ordinary copies are faster: the destination will
/// still be in cache when it is read.
pub const STREAMING_THRESHOLD: usize = 4 << 20;

/// Copies `len` bytes from `src` to `dst` with non-temporal stores where the target
/// supports them. Call [`stream_fence`] once after the last copy of a batch.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges
/// must not overlap.
pub unsafe fn stream_copy(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            __m128i, _mm_loadu_si128, _mm_prefetch, _mm_stream_si128, _MM_HINT_NTA,
        };
        const LINE: usize = 64;
        // Copy the unaligned head normally so the streamed part starts on a 16-byte
        // boundary, as _mm_stream_si128 requires.
        let head = dst.align_offset(16).min(len);
        // SAFETY: head <= len, and the caller guarantees both ranges for len bytes.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
        let mut done = head;
        while done + LINE <= len {
            // SAFETY: done + 64 <= len keeps all four 16-byte accesses in bounds; dst + done
            // is 16-byte aligned because head aligned it and LINE is a multiple of 16.
            unsafe {
                _mm_prefetch::<_MM_HINT_NTA>(src.wrapping_add(done + PREFETCH_AHEAD) as *const i8);
                let s = src.add(done) as *const __m128i;
                let d = dst.add(done) as *mut __m128i;
                let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
                let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
                _mm_stream_si128(d, a);
                _mm_stream_si128(d.add(1), b);
                _mm_stream_si128(d.add(2), c);
                _mm_stream_si128(d.add(3), e);
            }
            done += LINE;
        }
        // SAFETY: the tail lies within the caller's ranges.
        unsafe { std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), len - done) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // SAFETY: forwarded from the caller.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
    }
}

/// Hints the CPU to start loading the first bytes of a run that will be copied next, so
/// the jump to a scattered block does not stall the copy.
pub fn prefetch_run(src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for offset in (0..len.min(PREFETCH_AHEAD)).step_by(64) {
        // SAFETY: prefetch is a hint that never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_NTA }>(
                src.wrapping_add(offset) as *const i8,
            )
        };
    }
}

/// How far ahead of the copy position the source is prefetched.
const PREFETCH_AHEAD: usize = 1024;

/// Orders all streaming stores before any later store, so the copied bytes are visible to
/// other threads once the copy is reported done.
pub fn stream_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: sfence has no preconditions; SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_at_any_alignment_and_length() {
        let src: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        for dst_shift in 0..17 {
            for len in [0, 1, 15, 16, 63, 64, 65, 200, 777] {
                let mut dst = vec![0u8; 1000];
                // SAFETY: both ranges are in bounds of distinct vectors.
                unsafe { stream_copy(dst.as_mut_ptr().add(dst_shift), src.as_ptr().add(3), len) };
                stream_fence();
                assert_eq!(&dst[dst_shift..dst_shift + len], &src[3..3 + len]);
                assert!(dst[..dst_shift].iter().all(|&b| b == 0));
                assert!(dst[dst_shift + len..].iter().all(|&b| b == 0));
            }
        }
    }
}

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
    // SAFETY: forwarded from the caller.
    unsafe { stream_copy_impl(dst, src, len) }
}

/// The source is prefetched [`PREFETCH_AHEAD`] bytes beyond the copy position even past the
/// end of the copy: the next copy's source usually follows this one.
///
/// # Safety
/// As for [`stream_copy`].
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
unsafe fn stream_copy_impl(dst: *mut u8, src: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_NTA};
        // Copy the unaligned head normally so the streamed part starts on a 16-byte
        // boundary, as _mm_stream_si128 requires.
        let head = dst.align_offset(16).min(len);
        // SAFETY: head <= len, and the caller guarantees both ranges for len bytes.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
        let mut done = head;
        while done + LINE <= len {
            // SAFETY: the bound keeps done + LINE <= len, and dst + done is 16-byte aligned; the prefetch is a hint that never faults, and
            // wrapping_add keeps its address computation defined past the run's end.
            unsafe {
                _mm_prefetch::<_MM_HINT_NTA>(src.wrapping_add(done + PREFETCH_AHEAD) as *const i8);
                stream_line(dst.add(done), src.add(done));
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

/// Bytes copied per loop iteration: one cache line.
#[cfg(target_arch = "x86_64")]
const LINE: usize = 64;

/// Copies one 64-byte line with four 16-byte non-temporal stores.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of 64 bytes, not overlapping, and
/// `dst` must be 16-byte aligned.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn stream_line(dst: *mut u8, src: *const u8) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    // SAFETY: the caller guarantees 64 readable bytes at src and 64 writable, 16-byte
    // aligned bytes at dst, so all four 16-byte accesses are in bounds and aligned.
    unsafe {
        let s = src as *const __m128i;
        let d = dst as *mut __m128i;
        let (a, b) = (_mm_loadu_si128(s), _mm_loadu_si128(s.add(1)));
        let (c, e) = (_mm_loadu_si128(s.add(2)), _mm_loadu_si128(s.add(3)));
        _mm_stream_si128(d, a);
        _mm_stream_si128(d.add(1), b);
        _mm_stream_si128(d.add(2), c);
        _mm_stream_si128(d.add(3), e);
    }
}

/// How far ahead of the copy position the source is prefetched.
pub const PREFETCH_AHEAD: usize = 1024;

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
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        {
            let name = "stream_copy";
            for dst_shift in 0..17 {
                // Around LINE and around PREFETCH_AHEAD, where the prefetching loop ends.
                for len in [
                    0, 1, 15, 16, 63, 64, 65, 200, 777, 1023, 1024, 1025, 1088, 4000,
                ] {
                    let mut dst = vec![0u8; 4100];
                    // SAFETY: both ranges are in bounds of distinct vectors.
                    unsafe {
                        stream_copy(dst.as_mut_ptr().add(dst_shift), src.as_ptr().add(3), len)
                    };
                    stream_fence();
                    let what = format!("{name} shift {dst_shift} len {len}");
                    assert_eq!(&dst[dst_shift..dst_shift + len], &src[3..3 + len], "{what}");
                    assert!(dst[..dst_shift].iter().all(|&b| b == 0), "{what}");
                    assert!(dst[dst_shift + len..].iter().all(|&b| b == 0), "{what}");
                }
            }
        }
    }
}

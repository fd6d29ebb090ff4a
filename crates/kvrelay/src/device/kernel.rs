//! The host copy kernel: moves a plan's tiles between host buffers.
//!
//! A head-major layout's block is a tile of tokens × heads whose units are a few hundred
//! bytes; copied as millions of separate runs, the per-run work costs as much as the memory
//! traffic. The kernel walks each tile in place, writing the destination in address order
//! with wide loads and, for plans larger than the cache, non-temporal stores of whole
//! lines. While it copies one tile it prefetches the next tile's source at the same
//! position, so the jump to a scattered block does not stall. The widest instructions the
//! CPU has are picked at run time.

use super::stream::{PREFETCH_AHEAD, STREAMING_THRESHOLD};
use crate::plan::CopyTile;

/// Tiles up to this size prefetch the next tile's source while they are copied; larger
/// ones (long contiguous runs) prefetch [`PREFETCH_AHEAD`] bytes ahead inside themselves.
const PREFETCH_NEXT_TILE_MAX: usize = 64 << 10;

/// How a tile's units are copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// One memcpy per unit: plans small enough to stay in cache, and targets without a
    /// streaming kernel.
    Plain,
    /// 16-byte loads and non-temporal stores (the x86_64 baseline, SSE2).
    #[cfg(target_arch = "x86_64")]
    Sse2,
    /// 32-byte loads and non-temporal stores.
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The kernel for a plan moving `bytes` on this CPU.
    pub(crate) fn for_plan(bytes: usize) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        if bytes >= STREAMING_THRESHOLD {
            return if std::is_x86_feature_detected!("avx2") {
                Kernel::Avx2
            } else {
                Kernel::Sse2
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (bytes, STREAMING_THRESHOLD);
        Kernel::Plain
    }

    /// Every kernel this CPU can run.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Kernel> {
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut kernels = vec![Kernel::Plain];
        #[cfg(target_arch = "x86_64")]
        {
            kernels.push(Kernel::Sse2);
            if std::is_x86_feature_detected!("avx2") {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels
    }
}

/// Copies every unit of every tile from the `src` buffers to the `dst` buffers (indexed by
/// the tiles' buffer numbers). Call [`super::stream::stream_fence`] after a streaming
/// kernel, before the copy is reported done.
///
/// # Safety
/// Every unit of every tile must lie inside its source and destination buffers (which
/// [`crate::plan::CopyPlan::check_buffers`] on the buffers' lengths proves), sources and
/// destinations must not overlap, no one else may write either while the copy runs, and
/// `kernel` must be one this CPU runs ([`Kernel::for_plan`]).
pub(crate) unsafe fn copy_tiles(
    kernel: Kernel,
    tiles: &[CopyTile],
    src: &[*const u8],
    dst: &[*mut u8],
) {
    match kernel {
        // SAFETY: forwarded from the caller.
        Kernel::Plain => unsafe { walk::<Plain>(tiles, src, dst) },
        // SAFETY: forwarded from the caller; SSE2 is part of the x86_64 baseline.
        #[cfg(target_arch = "x86_64")]
        Kernel::Sse2 => unsafe { walk::<x86::Streamed<x86::Sse2>>(tiles, src, dst) },
        // SAFETY: forwarded from the caller, who picked Avx2 only where the CPU has AVX2.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { x86::walk_avx2(tiles, src, dst) },
    }
}

/// Copies one unit of `len` bytes; `prefetch` is where the bytes at `src` will be read
/// from next, to prefetch line by line (a hint: any address is fine).
trait UnitCopy {
    /// # Safety
    /// `src` readable and `dst` writable for `len` bytes, not overlapping.
    unsafe fn copy(dst: *mut u8, src: *const u8, len: usize, prefetch: *const u8);
}

struct Plain;

impl UnitCopy for Plain {
    #[inline(always)]
    unsafe fn copy(dst: *mut u8, src: *const u8, len: usize, _prefetch: *const u8) {
        // SAFETY: forwarded from the caller.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
    }
}

/// Walks `tiles` with `U`; see [`copy_tiles`] for the contract.
#[inline(always)]
unsafe fn walk<U: UnitCopy>(tiles: &[CopyTile], src: &[*const u8], dst: &[*mut u8]) {
    for (i, tile) in tiles.iter().enumerate() {
        // SAFETY: the caller guarantees the tile's units lie in these buffers, so its first
        // unit's offsets are in bounds.
        let (s, d) = unsafe {
            (
                src[tile.src_buffer as usize].add(tile.src_offset),
                dst[tile.dst_buffer as usize].add(tile.dst_offset),
            )
        };
        let ahead = match tiles.get(i + 1) {
            Some(next) if tile.bytes() <= PREFETCH_NEXT_TILE_MAX => {
                src[next.src_buffer as usize].wrapping_add(next.src_offset)
            }
            _ => s.wrapping_add(PREFETCH_AHEAD),
        };
        // Write the destination in address order: columns outer where they are the
        // destination's wide stride (a scatter into a head-major block).
        let [mut src_outer, mut src_inner] = tile.src_strides;
        let [mut dst_outer, mut dst_inner] = tile.dst_strides;
        let (mut outer, mut inner) = (tile.rows, tile.cols);
        if dst_outer == tile.unit && dst_inner != tile.unit {
            std::mem::swap(&mut src_outer, &mut src_inner);
            std::mem::swap(&mut dst_outer, &mut dst_inner);
            std::mem::swap(&mut outer, &mut inner);
        }
        for o in 0..outer {
            for n in 0..inner {
                let (sx, dx) = (
                    o * src_outer + n * src_inner,
                    o * dst_outer + n * dst_inner,
                );
                // SAFETY: unit (o, n) (or (n, o)) lies in both buffers, per the caller.
                unsafe { U::copy(d.add(dx), s.add(sx), tile.unit, ahead.wrapping_add(sx)) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_prefetch, _MM_HINT_NTA,
    };
    use std::marker::PhantomData;

    use super::{walk, UnitCopy};
    use crate::device::stream::stream_line;
    use crate::plan::CopyTile;

    /// Copies one 64-byte line to a 64-byte aligned destination with non-temporal stores.
    pub(super) trait Line {
        /// # Safety
        /// 64 readable bytes at `src`, 64 writable, 64-byte aligned bytes at `dst`, not
        /// overlapping; the CPU has the instructions the implementation uses.
        unsafe fn line(dst: *mut u8, src: *const u8);
    }

    pub(super) struct Sse2;

    impl Line for Sse2 {
        #[inline(always)]
        unsafe fn line(dst: *mut u8, src: *const u8) {
            // SAFETY: forwarded from the caller; 64-byte alignment implies 16.
            unsafe { stream_line(dst, src) }
        }
    }

    pub(super) struct Avx2;

    impl Line for Avx2 {
        #[inline(always)]
        unsafe fn line(dst: *mut u8, src: *const u8) {
            // SAFETY: the caller guarantees 64 bytes at each side, dst 64-byte aligned (so
            // both 32-byte stores are aligned), and AVX2.
            unsafe {
                let s = src as *const __m256i;
                let d = dst as *mut __m256i;
                let (a, b) = (_mm256_loadu_si256(s), _mm256_loadu_si256(s.add(1)));
                _mm256_stream_si256(d, a);
                _mm256_stream_si256(d.add(1), b);
            }
        }
    }

    /// A unit as an ordinary copy up to the destination's first line boundary, whole lines
    /// by `L` (each prefetching its counterpart at `prefetch`), and an ordinary tail.
    pub(super) struct Streamed<L>(PhantomData<L>);

    impl<L: Line> UnitCopy for Streamed<L> {
        #[inline(always)]
        unsafe fn copy(dst: *mut u8, src: *const u8, len: usize, prefetch: *const u8) {
            const LINE: usize = 64;
            let head = dst.align_offset(LINE).min(len);
            if head > 0 {
                // SAFETY: head <= len, inside the caller's ranges.
                unsafe { std::ptr::copy_nonoverlapping(src, dst, head) };
            }
            let mut done = head;
            while done + LINE <= len {
                // SAFETY: done + LINE <= len keeps the line inside both ranges and dst + done
                // is 64-byte aligned; the prefetch is a hint that never faults, its address
                // computed with wrapping_add.
                unsafe {
                    _mm_prefetch::<_MM_HINT_NTA>(prefetch.wrapping_add(done) as *const i8);
                    L::line(dst.add(done), src.add(done));
                }
                done += LINE;
            }
            if done < len {
                // SAFETY: the tail lies within the caller's ranges.
                unsafe { std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), len - done) };
            }
        }
    }

    /// [`walk`] compiled with AVX2 enabled, so the AVX2 lines inline into it.
    ///
    /// # Safety
    /// As for [`super::copy_tiles`], on a CPU with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn walk_avx2(tiles: &[CopyTile], src: &[*const u8], dst: &[*mut u8]) {
        // SAFETY: forwarded from the caller, who checked for AVX2.
        unsafe { walk::<Streamed<Avx2>>(tiles, src, dst) }
    }
}

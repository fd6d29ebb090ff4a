//! The host copy kernel: moves a plan's tiles between host buffers.
//!
//! A head-major layout's block is a tile of tokens × heads whose units are a few hundred
//! bytes; copied as millions of separate runs, the per-run work costs as much as the memory
//! traffic. The kernel walks each tile in place, reading the source in address order
//! with wide loads and, for plans larger than the cache, non-temporal stores of whole
//! lines. It reads four streams at once, each in its own page: four rows of a tile, or
//! four parts of a long unit, a few hundred bytes of each in turn. While it copies one tile
//! it prefetches the next tile's source at the same position, so the jump to a scattered
//! block does not stall. The widest instructions the CPU has are picked at run time.

use super::stream::{PREFETCH_AHEAD, STREAMING_THRESHOLD};
use crate::plan::CopyTile;

/// Tiles up to this size prefetch the next tile's source while they are copied; larger
/// ones (long contiguous runs) prefetch [`PREFETCH_AHEAD`] bytes ahead inside themselves.
const PREFETCH_NEXT_TILE_MAX: usize = 64 << 10;

/// Source rows of a tile read at once, a unit from each in turn: four streams of reads,
/// each in its own page, keep the memory busier than one (as glibc's memcpy does for large
/// copies). Measured on 2026-12-03 (`bench copy`, 2-core Xeon, AVX2 kernel): HND gather
/// from 0.85–0.89 of one memcpy to 1.06–1.15, scatter from 0.86–0.94 to 1.05–1.18.
const ROWS_AT_ONCE: usize = 4;
/// The rows read at once lie at least this far apart in the source.
const PAGE: usize = 4096;
/// Units from this size on are read as [`ROWS_AT_ONCE`] streams of their own.
const SPLIT_FROM: usize = ROWS_AT_ONCE * PAGE;
/// Bytes of each stream copied in turn within a split unit: as many as a head-major
/// layout's unit, which the row interleaving moves at once.
const PIECE: usize = 256;

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
        // Read the source in address order: columns outer where they are the source's wide
        // stride (a gather from a head-major block). Measured on the bench machine (AMD
        // EPYC, 32 KiB tiles of 256-byte units, next tile prefetched): source order ran at
        // 1.3-1.5x one memcpy, destination order at 0.97-1.05x.
        let [mut src_outer, mut src_inner] = tile.src_strides;
        let [mut dst_outer, mut dst_inner] = tile.dst_strides;
        let (mut outer, mut inner) = (tile.rows, tile.cols);
        if src_outer == tile.unit && src_inner != tile.unit {
            std::mem::swap(&mut src_outer, &mut src_inner);
            std::mem::swap(&mut dst_outer, &mut dst_inner);
            std::mem::swap(&mut outer, &mut inner);
        }
        interleaved(outer, inner, src_outer, |o, n| {
            let (sx, dx) = (o * src_outer + n * src_inner, o * dst_outer + n * dst_inner);
            // SAFETY: unit (o, n) (or (n, o)) lies in both buffers, per the caller.
            unsafe { copy_unit::<U>(d.add(dx), s.add(sx), tile.unit, ahead.wrapping_add(sx)) };
        });
    }
}

/// Visits every (row, column) of a `rows` × `cols` grid whose rows lie `row_stride` bytes
/// apart in the source: [`ROWS_AT_ONCE`] rows at a time, a column of each in turn, the rows
/// chosen a [`PAGE`] or more apart.
#[inline(always)]
fn interleaved(rows: usize, cols: usize, row_stride: usize, mut visit: impl FnMut(usize, usize)) {
    let apart = PAGE.div_ceil(row_stride.max(1));
    let span = ROWS_AT_ONCE * apart;
    for first in (0..rows).step_by(span) {
        for phase in 0..apart {
            let together = (first + phase..rows.min(first + span)).step_by(apart);
            for col in 0..cols {
                together.clone().for_each(|row| visit(row, col));
            }
        }
    }
}

/// Copies one unit with `U`; a unit of [`SPLIT_FROM`] bytes or more as [`ROWS_AT_ONCE`]
/// parts read at once, [`PIECE`] bytes of each in turn, then the rest.
///
/// # Safety
/// As for [`UnitCopy::copy`].
#[inline(always)]
unsafe fn copy_unit<U: UnitCopy>(dst: *mut u8, src: *const u8, len: usize, prefetch: *const u8) {
    if len < SPLIT_FROM {
        // SAFETY: forwarded from the caller.
        return unsafe { U::copy(dst, src, len, prefetch) };
    }
    let part = len / ROWS_AT_ONCE / PIECE * PIECE;
    let piece = |at: usize, len: usize| {
        // SAFETY: at + len <= len of the unit, which the caller guarantees in both ranges.
        unsafe { U::copy(dst.add(at), src.add(at), len, prefetch.wrapping_add(at)) }
    };
    interleaved(ROWS_AT_ONCE, part / PIECE, part, |row, col| {
        piece(row * part + col * PIECE, PIECE)
    });
    let done = ROWS_AT_ONCE * part;
    piece(done, len - done);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_prefetch, _MM_HINT_T0,
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
                    _mm_prefetch::<_MM_HINT_T0>(prefetch.wrapping_add(done) as *const i8);
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

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::device::stream::stream_fence;
    use crate::layout::{KvLayout, LayoutKind};
    use crate::plan::tests::{llama_spec, random_request};
    use crate::plan::{paged_to_chunks, ChunkWindow, CopyPlan};

    /// Buffers of the given sizes starting `shift` bytes past a 64-byte boundary, so the
    /// kernels meet unaligned heads and tails.
    struct Shifted {
        storage: Vec<Vec<u8>>,
        shift: usize,
    }

    impl Shifted {
        fn new(lens: &[usize], shift: usize, fill: impl Fn(usize, usize) -> u8) -> Self {
            let storage = lens
                .iter()
                .enumerate()
                .map(|(b, &len)| {
                    let mut v = vec![0u8; len + shift + 64];
                    let at = v.as_ptr().align_offset(64) + shift;
                    v[at..at + len]
                        .iter_mut()
                        .enumerate()
                        .for_each(|(i, x)| *x = fill(b, i));
                    v
                })
                .collect();
            Shifted { storage, shift }
        }

        fn slices(&self) -> Vec<&[u8]> {
            let at = |v: &Vec<u8>| v.as_ptr().align_offset(64) + self.shift;
            self.storage
                .iter()
                .map(|v| &v[at(v)..v.len() + at(v) - self.shift - 64])
                .collect()
        }

        fn ptrs(&mut self) -> Vec<*mut u8> {
            let shift = self.shift;
            let at = |v: &Vec<u8>| v.as_ptr().align_offset(64) + shift;
            self.storage
                .iter_mut()
                .map(|v| {
                    let start = at(v);
                    v[start..].as_mut_ptr()
                })
                .collect()
        }
    }

    /// The plain run-by-run copy every kernel must match.
    fn run_by_run(plan: &CopyPlan, src: &[&[u8]], dst: &mut [Vec<u8>]) {
        for run in plan.runs() {
            dst[run.dst_buffer as usize][run.dst_offset..][..run.len]
                .copy_from_slice(&src[run.src_buffer as usize][run.src_offset..][..run.len]);
        }
    }

    /// Gathers `plan` with `kernel` from `paged` into fresh chunk buffers shifted by
    /// `shift`, scatters it back into fresh zeroed engine buffers, and checks both against
    /// the run-by-run copy, byte for byte.
    fn check(kernel: Kernel, plan: &CopyPlan, paged: &Shifted, shift: usize, what: &str) {
        let chunk_lens = plan.dst_extents().to_vec();
        let mut chunks = Shifted::new(&chunk_lens, shift, |_, _| 0xee);
        let mut expected: Vec<Vec<u8>> = chunk_lens.iter().map(|&n| vec![0xee; n]).collect();
        run_by_run(plan, &paged.slices(), &mut expected);
        let src: Vec<*const u8> = paged.slices().iter().map(|s| s.as_ptr()).collect();
        // SAFETY: the plan's extents fit these buffers (they are sized from them), the
        // buffers are distinct allocations, and `kernel` comes from Kernel::available.
        unsafe { copy_tiles(kernel, plan.tiles(), &src, &chunks.ptrs()) };
        stream_fence();
        let got: Vec<Vec<u8>> = chunks.slices().iter().map(|s| s.to_vec()).collect();
        assert!(got == expected, "{kernel:?} gather, {what}");

        let scatter = plan.inverse();
        let engine_lens: Vec<usize> = paged.slices().iter().map(|s| s.len()).collect();
        let mut restored = Shifted::new(&engine_lens, paged.shift, |_, _| 0);
        let mut expected: Vec<Vec<u8>> = engine_lens.iter().map(|&n| vec![0; n]).collect();
        run_by_run(&scatter, &chunks.slices(), &mut expected);
        let src: Vec<*const u8> = chunks.slices().iter().map(|s| s.as_ptr()).collect();
        // SAFETY: as above, for the inverse plan.
        unsafe { copy_tiles(kernel, scatter.tiles(), &src, &restored.ptrs()) };
        stream_fence();
        let got: Vec<Vec<u8>> = restored.slices().iter().map(|s| s.to_vec()).collect();
        assert!(got == expected, "{kernel:?} scatter, {what}");
    }

    #[test]
    fn interleaving_visits_every_unit_once_with_rows_a_page_apart() {
        for (rows, cols, stride) in [(1, 1, 256), (7, 3, 4096), (16, 8, 2048), (9, 2, 300)] {
            let mut seen = vec![0; rows * cols];
            let mut order = Vec::new();
            interleaved(rows, cols, stride, |r, c| {
                seen[r * cols + c] += 1;
                order.push((r, c));
            });
            assert!(seen.iter().all(|&n| n == 1), "{rows}x{cols}: {seen:?}");
            // Units visited together come from rows at least a page apart.
            for group in order.chunks(ROWS_AT_ONCE.min(rows)) {
                for pair in group.windows(2) {
                    let gap = pair[1].0.abs_diff(pair[0].0) * stride;
                    assert!(gap >= PAGE || rows * stride <= PAGE, "{order:?}");
                }
            }
        }
    }

    /// Single units around and far past the size from which they are split into streams,
    /// at every alignment class of source and destination.
    #[test]
    fn every_kernel_copies_split_units_whole() {
        for len in [
            SPLIT_FROM - 1,
            SPLIT_FROM,
            SPLIT_FROM + 1,
            SPLIT_FROM + 4 * PIECE - 1,
            5 * SPLIT_FROM + 77,
        ] {
            for (src_shift, dst_shift) in [(0, 0), (16, 0), (0, 33), (5, 61)] {
                let src = Shifted::new(&[len], src_shift, |_, i| (i * 31 + i / 4093) as u8);
                let tile = CopyTile {
                    src_buffer: 0,
                    src_offset: 0,
                    dst_buffer: 0,
                    dst_offset: 0,
                    unit: len,
                    rows: 1,
                    cols: 1,
                    src_strides: [len, len],
                    dst_strides: [len, len],
                };
                for kernel in Kernel::available() {
                    let mut dst = Shifted::new(&[len], dst_shift, |_, _| 0);
                    let from: Vec<*const u8> = src.slices().iter().map(|s| s.as_ptr()).collect();
                    // SAFETY: the one unit is exactly the length of both buffers, which are
                    // distinct allocations; `kernel` comes from Kernel::available.
                    unsafe { copy_tiles(kernel, &[tile], &from, &dst.ptrs()) };
                    stream_fence();
                    assert!(
                        dst.slices()[0] == src.slices()[0],
                        "{kernel:?}, {len} bytes, shifts {src_shift}/{dst_shift}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_run_by_run_copy() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x15);
        for case in 0..300 {
            let (layout, blocks, windows) = random_request(&mut rng);
            let plan = paged_to_chunks(&layout, &blocks, &windows).unwrap();
            let lens = vec![layout.buffer_bytes(); layout.num_buffers()];
            let paged_shift = rng.gen_range(0..64);
            let paged = Shifted::new(&lens, paged_shift, |b, i| (i * 7 + i / 251 + b) as u8);
            let shift = rng.gen_range(0..64);
            for kernel in Kernel::available() {
                let what = format!(
                    "case {case}: {} {:?} {windows:?}",
                    layout.kind(),
                    layout.spec()
                );
                check(kernel, &plan, &paged, shift, &what);
            }
        }
    }

    /// Llama-sized heads (256-byte units in 32 KiB head-major tiles), an odd number of
    /// scattered blocks, a window starting mid-block, and adjacent blocks that merge into
    /// contiguous runs over 64 KiB (which prefetch inside themselves).
    #[test]
    fn every_kernel_matches_on_large_tiles() {
        let spec = llama_spec(2, 23);
        let blocks: Vec<u32> = [4, 5, 6, 7, 8, 9, 0, 17, 3, 22, 11].to_vec();
        let windows = [
            ChunkWindow {
                start: 0,
                tokens: 100,
                skip_leading: 3,
            },
            ChunkWindow {
                start: 100,
                tokens: 75,
                skip_leading: 0,
            },
        ];
        for kind in [
            LayoutKind::FlashAttnNhd,
            LayoutKind::FlashAttnHnd,
            LayoutKind::RblnKvFirst,
        ] {
            let layout = KvLayout::new(spec, kind).unwrap();
            let plan = paged_to_chunks(&layout, &blocks, &windows).unwrap();
            let lens = vec![layout.buffer_bytes(); layout.num_buffers()];
            let paged = Shifted::new(&lens, 0, |b, i| (i * 13 + i / 509 + b) as u8);
            for kernel in Kernel::available() {
                for shift in [0, 16, 33] {
                    check(
                        kernel,
                        &plan,
                        &paged,
                        shift,
                        &format!("{kind} shift {shift}"),
                    );
                }
            }
        }
    }
}

//! One pass that copies a checksum segment and takes its digest.
//!
//! A receiver that pulls a chunk out of the sender's shared staging file copies it into the
//! granted page and must verify what it copied. Copying and then hashing the page reads every
//! byte from memory twice (the copy's streaming stores leave nothing in cache); on a host whose
//! memory reads are the bottleneck that halves the transfer. Here each 64-byte stripe is loaded
//! once, stored with a streaming store and folded into the XXH3-64 accumulators from the same
//! registers, so the digest is of exactly the bytes written, even if the source changes
//! meanwhile.
//!
//! The digest equals [`segment_digest`] of the bytes (XXH3-64, seed 0, the default secret:
//! the published algorithm, whose long-input path is what a 64 KiB segment takes). Inputs the
//! vector path does not take (no AVX2, at most 240 bytes, a length not a multiple of 64, as
//! only a chunk's last segment can be) are copied and then hashed from the destination.

use super::frame::segment_digest;
use crate::device::stream::{stream_copy, stream_fence};

/// Copies `len` bytes from `src` to `dst` and returns [`segment_digest`] of them. The copy
/// is fenced: the bytes are visible to other threads when this returns.
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `len` bytes, and the two ranges
/// must not overlap.
pub(crate) unsafe fn copy_and_digest(dst: *mut u8, src: *const u8, len: usize) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if len > xxh3::MAX_SHORT_INPUT
        && len.is_multiple_of(xxh3::STRIPE)
        && std::arch::is_x86_feature_detected!("avx2")
    {
        // SAFETY: AVX2 is present; the ranges are the caller's, and len is a positive
        // multiple of the stripe as the kernel requires.
        let digest = unsafe { xxh3::copy_and_digest_avx2(dst, src, len) };
        stream_fence();
        return digest;
    }
    // SAFETY: forwarded from the caller.
    unsafe { stream_copy(dst, src, len) };
    stream_fence();
    // SAFETY: dst holds len bytes just written by this thread.
    segment_digest(unsafe { std::slice::from_raw_parts(dst, len) })
}

#[cfg(target_arch = "x86_64")]
mod xxh3 {
    use std::arch::x86_64::*;

    pub const STRIPE: usize = 64;
    /// Inputs up to this long take XXH3's short paths, which this kernel does not implement.
    pub const MAX_SHORT_INPUT: usize = 240;
    /// How far ahead the source is prefetched. The hardware prefetcher alone leaves a
    /// single thread at about 0.6 of memcpy on a host whose memory reads are the limit;
    /// 1-4 KiB ahead brings it to 0.8-0.9 (4 KiB measured best).
    const PREFETCH_AHEAD: usize = 4096;
    /// Secret bytes consumed per stripe.
    const SECRET_STEP: usize = 8;
    /// XXH3's default secret (the specification's `kSecret`).
    const SECRET: [u8; 192] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad,
        0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3,
        0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc,
        0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,
        0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65,
        0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19,
        0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, 0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9,
        0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
        0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb,
        0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb, 0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0,
        0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d,
        0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
        0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
    ];
    /// Stripes between two scrambles of the accumulators.
    const STRIPES_PER_BLOCK: usize = (SECRET.len() - STRIPE) / SECRET_STEP;
    /// Where the secret for the scramble, the last stripe and the merge start.
    const SCRAMBLE_AT: usize = SECRET.len() - STRIPE;
    const LAST_STRIPE_AT: usize = SECRET.len() - STRIPE - 7;
    const MERGE_AT: usize = 11;

    const PRIME32_1: u64 = 0x9E37_79B1;
    const PRIME32_2: u64 = 0x85EB_CA77;
    const PRIME32_3: u64 = 0xC2B2_AE3D;
    const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
    const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;
    const PRIME_MX1: u64 = 0x1656_6791_9E37_79F9;

    /// Folds one 32-byte half stripe into its accumulator vector.
    ///
    /// # Safety
    /// AVX2 must be present; `secret` must be valid for 32 bytes of reads.
    #[inline(always)]
    unsafe fn accumulate(acc: __m256i, data: __m256i, secret: *const u8) -> __m256i {
        // SAFETY: the caller guarantees AVX2 and 32 readable secret bytes.
        unsafe {
            let key = _mm256_loadu_si256(secret.cast());
            let keyed = _mm256_xor_si256(data, key);
            let product = _mm256_mul_epu32(keyed, _mm256_srli_epi64::<32>(keyed));
            let swapped = _mm256_shuffle_epi32::<0b01_00_11_10>(data);
            _mm256_add_epi64(product, _mm256_add_epi64(acc, swapped))
        }
    }

    /// # Safety
    /// AVX2 must be present; `secret` must be valid for 32 bytes of reads.
    #[inline(always)]
    unsafe fn scramble(acc: __m256i, secret: *const u8) -> __m256i {
        // SAFETY: the caller guarantees AVX2 and 32 readable secret bytes.
        unsafe {
            let key = _mm256_loadu_si256(secret.cast());
            let mixed = _mm256_xor_si256(_mm256_xor_si256(acc, _mm256_srli_epi64::<47>(acc)), key);
            let prime = _mm256_set1_epi32(PRIME32_1 as i32);
            let low = _mm256_mul_epu32(mixed, prime);
            let high = _mm256_mul_epu32(_mm256_shuffle_epi32::<0b00_11_00_01>(mixed), prime);
            _mm256_add_epi64(low, _mm256_slli_epi64::<32>(high))
        }
    }

    /// Copies `len` bytes (a multiple of [`STRIPE`], over [`MAX_SHORT_INPUT`]) with streaming
    /// stores and returns their XXH3-64. The stores are not fenced.
    ///
    /// # Safety
    /// AVX2 must be present; `src` valid for reads and `dst` for writes of `len` bytes, not
    /// overlapping; `len` as above.
    #[target_feature(enable = "avx2")]
    pub unsafe fn copy_and_digest_avx2(dst: *mut u8, src: *const u8, len: usize) -> u64 {
        let secret = SECRET.as_ptr();
        let stripes = len / STRIPE;
        let mut acc = [
            _mm256_set_epi64x(
                PRIME64_3 as i64,
                PRIME64_2 as i64,
                PRIME64_1 as i64,
                PRIME32_3 as i64,
            ),
            _mm256_set_epi64x(
                PRIME32_1 as i64,
                PRIME64_5 as i64,
                PRIME32_2 as i64,
                PRIME64_4 as i64,
            ),
        ];
        let aligned = (dst as usize).is_multiple_of(32);
        for stripe in 0..stripes {
            let at = stripe * STRIPE;
            // SAFETY: at + STRIPE <= len bounds both 32-byte halves in src and dst; the
            // aligned store is taken only when dst (and so dst + at) is 32-byte aligned; the
            // secret offsets stay within SECRET (checked by the constants' arithmetic: a
            // block's last stripe reads up to SCRAMBLE_AT - SECRET_STEP + STRIPE bytes in).
            unsafe {
                let (s, d) = (src.add(at), dst.add(at));
                // A hint that never faults, even past the source's end.
                _mm_prefetch::<_MM_HINT_T0>(s.wrapping_add(PREFETCH_AHEAD).cast());
                let lo = _mm256_loadu_si256(s.cast());
                let hi = _mm256_loadu_si256(s.add(32).cast());
                if aligned {
                    _mm256_stream_si256(d.cast(), lo);
                    _mm256_stream_si256(d.add(32).cast(), hi);
                } else {
                    _mm256_storeu_si256(d.cast(), lo);
                    _mm256_storeu_si256(d.add(32).cast(), hi);
                }
                // XXH3 takes the last stripe, which ends the input, with its own secret
                // offset and after the (partial) last block; with a length a multiple of
                // the stripe it is the one just loaded.
                if stripe + 1 == stripes {
                    let key = secret.add(LAST_STRIPE_AT);
                    acc[0] = accumulate(acc[0], lo, key);
                    acc[1] = accumulate(acc[1], hi, key.add(32));
                    break;
                }
                let in_block = stripe % STRIPES_PER_BLOCK;
                let key = secret.add(in_block * SECRET_STEP);
                acc[0] = accumulate(acc[0], lo, key);
                acc[1] = accumulate(acc[1], hi, key.add(32));
                if in_block + 1 == STRIPES_PER_BLOCK {
                    acc[0] = scramble(acc[0], secret.add(SCRAMBLE_AT));
                    acc[1] = scramble(acc[1], secret.add(SCRAMBLE_AT + 32));
                }
            }
        }
        let mut lanes = [0u64; 8];
        // SAFETY: lanes holds 64 bytes, two unaligned 32-byte stores.
        unsafe {
            _mm256_storeu_si256(lanes.as_mut_ptr().cast(), acc[0]);
            _mm256_storeu_si256(lanes.as_mut_ptr().add(4).cast(), acc[1]);
        }
        merge(&lanes, (len as u64).wrapping_mul(PRIME64_1))
    }

    fn secret_word(at: usize) -> u64 {
        let mut word = [0u8; 8];
        word.copy_from_slice(&SECRET[at..at + 8]);
        u64::from_le_bytes(word)
    }

    /// XXH3's final merge of the eight accumulators, then its avalanche.
    fn merge(lanes: &[u64; 8], start: u64) -> u64 {
        let mut h = start;
        for pair in 0..4 {
            let at = MERGE_AT + 16 * pair;
            let a = lanes[2 * pair] ^ secret_word(at);
            let b = lanes[2 * pair + 1] ^ secret_word(at + 8);
            let product = u128::from(a) * u128::from(b);
            h = h.wrapping_add((product as u64) ^ ((product >> 64) as u64));
        }
        h ^= h >> 37;
        h = h.wrapping_mul(PRIME_MX1);
        h ^ (h >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn digest_and_copy_equal_the_plain_hash_and_bytes_at_every_kind_of_length() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let src: Vec<u8> = (0..(200 << 10)).map(|_| rng.gen()).collect();
        // Short inputs, lengths off the stripe, one block, around block edges, a segment.
        for len in [
            0, 1, 64, 240, 241, 256, 320, 1000, 1024, 1088, 4096, 65_472, 65_536, 65_537, 131_072,
        ] {
            for (src_shift, dst_shift) in [(0, 0), (3, 0), (0, 5), (7, 32)] {
                let mut dst = vec![0u8; len + 64];
                let from = &src[src_shift..src_shift + len];
                // SAFETY: both ranges are in bounds of distinct vectors.
                let digest =
                    unsafe { copy_and_digest(dst.as_mut_ptr().add(dst_shift), from.as_ptr(), len) };
                let what = format!("len {len} shifts {src_shift}/{dst_shift}");
                assert_eq!(digest, segment_digest(from), "{what}");
                assert_eq!(&dst[dst_shift..dst_shift + len], from, "{what}");
                assert!(dst[..dst_shift].iter().all(|&b| b == 0), "{what}");
                assert!(dst[dst_shift + len..].iter().all(|&b| b == 0), "{what}");
            }
        }
    }
}

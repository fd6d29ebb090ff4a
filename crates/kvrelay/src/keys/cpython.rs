//! CPython's builtin `hash()` for the three kinds of object LMCache's `builtin` chunk hash
//! feeds it: `int`, `tuple` and (for `NONE_HASH` only) `str`.
//!
//! LMCache's default `pre_caching_hash_algorithm: builtin` computes
//! `hash((prefix, tuple(chunk_tokens), ()))` with Python's `hash`. The facts below are
//! CPython's (64-bit builds, the only ones LMCache runs on), re-implemented here:
//!
//! - `int`: `|x| mod (2^61 - 1)`, negated for negative `x`; `-1` becomes `-2` (CPython
//!   reserves `-1` for errors). The same in every process and version.
//! - `tuple` (CPython ≥ 3.8): an xxHash-style accumulator over the item hashes, with the
//!   length folded in at the end and `-1` replaced by `1546275796`. Also seed-independent.
//! - `str`: SipHash over the string's internal bytes (Latin-1, UCS-2 or UCS-4 little-endian,
//!   by its widest character), keyed from `PYTHONHASHSEED`: SipHash-1-3 since CPython 3.11,
//!   SipHash-2-4 up to 3.10. The empty string hashes to 0.
//!
//! So only `NONE_HASH` depends on the seed and the interpreter: with vLLM importable it is
//! `hash(os.environ["PYTHONHASHSEED"])`, and 0 without vLLM.

use std::fmt;

/// Which CPython computed the `builtin` keys: it decides the `str` hash of `NONE_HASH`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CpythonVersion {
    /// CPython 3.8 to 3.10: `str` hashes with SipHash-2-4.
    Py310,
    /// CPython 3.11 and later: `str` hashes with SipHash-1-3.
    #[default]
    Py311,
}

impl CpythonVersion {
    /// How the CLI and the config spell it.
    pub const fn name(self) -> &'static str {
        match self {
            CpythonVersion::Py310 => "3.10",
            CpythonVersion::Py311 => "3.11",
        }
    }

    /// Parses `3.10` (or any of 3.8, 3.9) and `3.11` (or any later 3.x, or `3.11+`).
    pub fn parse(text: &str) -> Option<Self> {
        let minor = text.trim().strip_prefix("3.")?;
        let minor: u32 = minor.strip_suffix('+').unwrap_or(minor).parse().ok()?;
        match minor {
            // The tuple hash LMCache relies on arrived in 3.8.
            8..=10 => Some(CpythonVersion::Py310),
            11.. => Some(CpythonVersion::Py311),
            _ => None,
        }
    }

    /// SipHash (compression rounds, finalization rounds) of `str` hashing.
    const fn siphash_rounds(self) -> (usize, usize) {
        match self {
            CpythonVersion::Py310 => (2, 4),
            CpythonVersion::Py311 => (1, 3),
        }
    }
}

impl fmt::Display for CpythonVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `sys.hash_info.modulus` on 64-bit CPython: the Mersenne prime 2^61 - 1.
const MODULUS: u64 = (1 << 61) - 1;

/// `hash(x)` for a Python int `x`.
pub(crate) fn int_hash(x: i64) -> i64 {
    let h = (x.unsigned_abs() % MODULUS) as i64;
    let h = if x < 0 { -h } else { h };
    if h == -1 {
        -2
    } else {
        h
    }
}

const XXPRIME_1: u64 = 11_400_714_785_074_694_791;
const XXPRIME_2: u64 = 14_029_467_366_897_019_727;
const XXPRIME_5: u64 = 2_870_177_450_012_600_261;

/// `hash(tuple)` given the hashes of its items, in order.
pub(crate) fn tuple_hash(items: impl ExactSizeIterator<Item = i64>) -> i64 {
    let len = items.len() as u64;
    let mut acc = XXPRIME_5;
    for lane in items {
        acc = acc.wrapping_add((lane as u64).wrapping_mul(XXPRIME_2));
        acc = acc.rotate_left(31);
        acc = acc.wrapping_mul(XXPRIME_1);
    }
    // The length is mangled so that hash(()) keeps its pre-3.8 value.
    acc = acc.wrapping_add(len ^ (XXPRIME_5 ^ 3_527_539));
    if acc == u64::MAX {
        1_546_275_796
    } else {
        acc as i64
    }
}

/// `hash((prefix, tuple(tokens), ()))`: one link of LMCache's `builtin` chain.
pub(crate) fn chunk_hash(prefix: i64, tokens: &[u32]) -> i64 {
    // A token id is below the modulus, so it is its own hash.
    let tokens = tuple_hash(tokens.iter().map(|&t| i64::from(t)));
    let empty = tuple_hash(std::iter::empty());
    tuple_hash([int_hash(prefix), tokens, empty].into_iter())
}

/// The SipHash key CPython derives from `PYTHONHASHSEED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HashSecret {
    k0: u64,
    k1: u64,
}

impl HashSecret {
    /// Seed 0 disables randomization (an all-zero key); any other seed fills the secret
    /// with the bytes of CPython's LCG `x = x * 214013 + 2531011`, byte = `(x >> 16) & 0xff`.
    /// The key is the secret's first 16 bytes, as two little-endian u64.
    pub(crate) fn from_seed(seed: u32) -> Self {
        let mut bytes = [0u8; 16];
        if seed != 0 {
            let mut x = seed;
            for b in &mut bytes {
                x = x.wrapping_mul(214_013).wrapping_add(2_531_011);
                *b = (x >> 16) as u8;
            }
        }
        let (k0, k1) = bytes.split_at(8);
        HashSecret {
            k0: u64::from_le_bytes(k0.try_into().expect("8 bytes")),
            k1: u64::from_le_bytes(k1.try_into().expect("8 bytes")),
        }
    }
}

/// `hash(s)` for a Python str under `secret`.
pub(crate) fn str_hash(s: &str, version: CpythonVersion, secret: HashSecret) -> i64 {
    if s.is_empty() {
        return 0;
    }
    let (c, d) = version.siphash_rounds();
    let h = siphash(c, d, secret.k0, secret.k1, &internal_bytes(s)) as i64;
    if h == -1 {
        -2
    } else {
        h
    }
}

/// A str's bytes as CPython stores them (PEP 393): one, two or four bytes per code point,
/// chosen by the widest one, little-endian.
fn internal_bytes(s: &str) -> Vec<u8> {
    let widest = s.chars().map(u32::from).max().unwrap_or(0);
    let width = match widest {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        _ => 4,
    };
    s.chars()
        .flat_map(|c| u32::from(c).to_le_bytes().into_iter().take(width))
        .collect()
}

/// SipHash-c-d with key `(k0, k1)`, 64-bit output.
fn siphash(c: usize, d: usize, k0: u64, k1: u64, data: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let round = |v: &mut [u64; 4]| {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    };
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        for _ in 0..c {
            round(v);
        }
        v[0] ^= m;
    };
    let mut words = data.chunks_exact(8);
    for word in &mut words {
        compress(
            &mut v,
            u64::from_le_bytes(word.try_into().expect("8 bytes")),
        );
    }
    // The last word: the remaining bytes, with the length's low byte on top.
    let mut last = [0u8; 8];
    let tail = words.remainder();
    last[..tail.len()].copy_from_slice(tail);
    last[7] = data.len() as u8;
    compress(&mut v, u64::from_le_bytes(last));
    v[2] ^= 0xff;
    for _ in 0..d {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SipHash-2-4 is Rust's (deprecated, still stable) `std::hash::SipHasher`, an
    /// independent implementation to check the shared round code against.
    #[test]
    #[allow(deprecated)]
    fn siphash24_matches_std() {
        use std::hash::{Hasher, SipHasher};
        for (k0, k1) in [
            (0, 0),
            (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908),
            (u64::MAX, 7),
        ] {
            for len in 0..=70 {
                let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
                let mut std = SipHasher::new_with_keys(k0, k1);
                std.write(&data);
                assert_eq!(siphash(2, 4, k0, k1, &data), std.finish(), "len {len}");
            }
        }
    }

    /// The first published SipHash-2-4 test vectors (key 00..0f, message 00..len-1).
    #[test]
    fn siphash24_matches_published_vectors() {
        let (k0, k1) = (0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908);
        let expected = [
            0x726f_db47_dd0e_0e31u64,
            0x74f8_39c5_93dc_67fd,
            0x0d6c_8009_d9a9_4f5a,
            0x8567_6696_d7fb_7e2d,
        ];
        for (len, want) in expected.into_iter().enumerate() {
            let data: Vec<u8> = (0..len as u8).collect();
            assert_eq!(siphash(2, 4, k0, k1, &data), want, "len {len}");
        }
    }

    /// Values printed by CPython 3.11's `hash()` under the given PYTHONHASHSEED.
    #[test]
    fn str_hash_matches_cpython_311() {
        let zero = HashSecret::from_seed(0);
        assert_eq!(
            str_hash("0", CpythonVersion::Py311, zero),
            5_313_149_338_359_954_478
        );
        let s42 = HashSecret::from_seed(42);
        let cases = [
            ("42", 866_561_823_186_450_123),
            ("", 0),
            ("é", 5_653_850_369_683_463_245),
            ("€", -9_193_319_877_017_669_544),
            ("😀", 6_601_963_133_753_205_906),
        ];
        for (s, want) in cases {
            assert_eq!(str_hash(s, CpythonVersion::Py311, s42), want, "{s:?}");
        }
    }

    /// `hash()` of ints at the modulus and the i64 limits, `()` and `(1, 2, 3)` in CPython
    /// 3.11 (any seed).
    #[test]
    fn int_and_tuple_hashes_match_cpython() {
        assert_eq!(int_hash(-1), -2);
        assert_eq!(int_hash(MODULUS as i64), 0);
        assert_eq!(int_hash(1 << 61), 1);
        assert_eq!(int_hash(-(1 << 61)), -2);
        assert_eq!(int_hash(i64::MIN), -4);
        assert_eq!(int_hash(i64::MAX), 3);
        assert_eq!(tuple_hash(std::iter::empty()), 5_740_354_900_026_072_187);
        assert_eq!(
            tuple_hash([1i64, 2, 3].into_iter()),
            529_344_067_295_497_451
        );
    }

    #[test]
    fn versions_parse() {
        for (text, want) in [
            ("3.10", Some(CpythonVersion::Py310)),
            ("3.8", Some(CpythonVersion::Py310)),
            ("3.11", Some(CpythonVersion::Py311)),
            ("3.11+", Some(CpythonVersion::Py311)),
            ("3.13", Some(CpythonVersion::Py311)),
            ("3.7", None),
            ("3.1", None),
            ("2.7", None),
            ("311", None),
        ] {
            assert_eq!(CpythonVersion::parse(text), want, "{text}");
        }
    }
}

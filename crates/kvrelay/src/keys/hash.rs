//! Prefix-chained chunk hashes: the `chunk_hash` field of every [`CacheKey`](super::CacheKey).
//!
//! Tokens are cut into chunks of `chunk_size` (the last one may be partial). Chunk `i`'s hash is
//! `H(prefix, chunk_i)` where `prefix` is chunk `i-1`'s hash, or the seed-derived `NONE_HASH` for
//! chunk 0, so a chunk's hash names the whole prefix up to its end.
//!
//! Three algorithms, each fully specified so that any process, machine or version computes
//! the same values (the seed comes from `$PYTHONHASHSEED` only where a caller reads it, see
//! [`default_seed`] and [`ChunkHasher::from_env`]):
//!
//! - **`sha256_cbor`**: LMCache/vLLM's, bit for bit.
//!   `NONE_HASH = u64_be(sha256(cbor(seed_text))[0..8])`, with `seed_text` a CBOR text string;
//!   `H(prefix, chunk) = u64_be(sha256(cbor([prefix, [tokens...], []]))[0..8])` in canonical
//!   CBOR (smallest-width heads). Use this to share a store with LMCache engines.
//! - **`xxh3_128`** (the default, several times faster): kvrelay's own.
//!   `NONE_HASH = fold(xxh3_128(utf8(seed)))`;
//!   `H(prefix, chunk) = fold(xxh3_128(u64_le(prefix) ‖ u32_le(t0) ‖ u32_le(t1) ‖ ...))`,
//!   where xxh3_128 is XXH3-128 with seed 0 and the default secret, and `fold(d)` is the high 64
//!   bits of the 128-bit digest (= the first 8 bytes of its canonical big-endian form, read big
//!   endian, mirroring sha256_cbor's fold).
//! - **`builtin`**: LMCache's default, CPython's `hash((prefix, tuple(tokens), ()))`, bit for
//!   bit (see [`super::cpython`]). Hashes are signed (stored here as their two's-complement
//!   bits) and keys print them as Python does, `-2fdf…` for a negative one.
//!   `NONE_HASH = hash(seed_text)` keyed by the seed, where `seed_text` is `$PYTHONHASHSEED`,
//!   when LMCache ran with vLLM importable; 0 when it did not.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::cpython::{self, CpythonVersion, HashSecret};
use xxhash_rust::xxh3::{xxh3_128, Xxh3Default};

/// LMCache's default chunk size, in tokens.
pub const DEFAULT_CHUNK_SIZE: usize = 256;

/// vLLM 0.33's `NONE_HASH` seed when `$PYTHONHASHSEED` is unset.
pub const DEFAULT_SEED: &str = "vllm-none-hash";

/// How chunk hashes are computed. See the [module docs](self) for the exact byte inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum HashAlgorithm {
    /// LMCache/vLLM `sha256_cbor` (alias `sha256_cbor_64bit`): interoperable with LMCache.
    Sha256Cbor,
    /// XXH3-128 over little-endian integers, folded to 64 bits: kvrelay-only, fast.
    #[default]
    Xxh3_128,
    /// LMCache's default `builtin`: CPython's `hash()`, for the interpreter LMCache ran in.
    Builtin(BuiltinHash),
}

/// The LMCache process whose `builtin` keys to reproduce: they depend on it only through
/// `NONE_HASH`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BuiltinHash {
    /// The CPython that ran LMCache (its `str` hash keys `NONE_HASH`).
    pub cpython: CpythonVersion,
    /// Whether vLLM was importable in LMCache's process: then `NONE_HASH` is
    /// `hash($PYTHONHASHSEED)`, else 0.
    pub with_vllm: bool,
}

impl Default for BuiltinHash {
    /// LMCache inside vLLM on a current CPython.
    fn default() -> Self {
        BuiltinHash {
            cpython: CpythonVersion::Py311,
            with_vllm: true,
        }
    }
}

impl HashAlgorithm {
    pub const ALL: [HashAlgorithm; 3] = [
        HashAlgorithm::Sha256Cbor,
        HashAlgorithm::Xxh3_128,
        HashAlgorithm::Builtin(BuiltinHash {
            cpython: CpythonVersion::Py311,
            with_vllm: true,
        }),
    ];

    /// The canonical name, as LMCache's `pre_caching_hash_algorithm` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256Cbor => "sha256_cbor",
            HashAlgorithm::Xxh3_128 => "xxh3_128",
            HashAlgorithm::Builtin(_) => "builtin",
        }
    }

    /// Whether hashes are Python ints that may be negative (`builtin`), printed with a sign.
    pub const fn signed(self) -> bool {
        matches!(self, HashAlgorithm::Builtin(_))
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HashAlgorithm {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sha256_cbor" | "sha256_cbor_64bit" => Ok(HashAlgorithm::Sha256Cbor),
            "xxh3_128" => Ok(HashAlgorithm::Xxh3_128),
            "builtin" => Ok(HashAlgorithm::Builtin(BuiltinHash::default())),
            "sha256" | "xxhash" | "xxhash_cbor" => Err(HashError::UnsupportedVllmHash(s.into())),
            other => Err(HashError::UnknownAlgorithm(other.into())),
        }
    }
}

/// A hash configuration that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HashError {
    #[error(
        "unknown hash algorithm {0:?}: expected sha256_cbor (alias sha256_cbor_64bit), builtin or xxh3_128"
    )]
    UnknownAlgorithm(String),
    #[error(
        "hash algorithm \"builtin\" with vLLM importable needs a fixed PYTHONHASHSEED: LMCache's \
         NONE_HASH is then hash($PYTHONHASHSEED), and without the variable every LMCache process \
         picks its own, so even LMCache engines do not share keys with each other; export \
         PYTHONHASHSEED=0 (or any fixed integer) for every LMCache and kvrelay engine"
    )]
    BuiltinSeedUnset,
    #[error(
        "PYTHONHASHSEED={0:?} is not a fixed seed: CPython takes \"random\" or an integer in \
         0..=4294967295, and only an integer gives every process the same str hash"
    )]
    BadPythonHashSeed(String),
    #[error(
        "vLLM hash {0:?} is not supported: sha256 hashes Python pickle bytes and the xxhash family \
         gets a random per-process NONE_HASH in vLLM, so neither is reproducible; use sha256_cbor"
    )]
    UnsupportedVllmHash(String),
    #[error("chunk_size must be at least 1 token")]
    ZeroChunkSize,
}

/// The `NONE_HASH` seed vLLM 0.33 uses: `$PYTHONHASHSEED` if set, else `"vllm-none-hash"`.
///
/// Prefill and decode engines must agree on it, so pass it explicitly where you can.
pub fn default_seed() -> String {
    std::env::var("PYTHONHASHSEED").unwrap_or_else(|_| DEFAULT_SEED.to_string())
}

/// Computes prefix-chained chunk hashes for one (algorithm, seed, chunk size).
///
/// Cheap to clone and `Sync`; hashing allocates nothing (except [`ChunkHasher::chunk_hashes`]'s
/// result vector).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkHasher {
    algorithm: HashAlgorithm,
    chunk_size: usize,
    none_hash: u64,
}

impl ChunkHasher {
    /// `seed` is the text `NONE_HASH` is derived from; for `builtin` it is the value of
    /// `PYTHONHASHSEED` (it keys the str hash too), and is not used without vLLM.
    pub fn new(algorithm: HashAlgorithm, seed: &str, chunk_size: usize) -> Result<Self, HashError> {
        if chunk_size == 0 {
            return Err(HashError::ZeroChunkSize);
        }
        let none_hash = match algorithm {
            HashAlgorithm::Sha256Cbor => sha256_cbor_text(seed),
            HashAlgorithm::Xxh3_128 => fold128(xxh3_128(seed.as_bytes())),
            HashAlgorithm::Builtin(BuiltinHash {
                with_vllm: false, ..
            }) => 0,
            HashAlgorithm::Builtin(BuiltinHash {
                cpython,
                with_vllm: true,
            }) => {
                let secret = HashSecret::from_seed(python_hash_seed(seed)?);
                cpython::str_hash(seed, cpython, secret) as u64
            }
        };
        Ok(ChunkHasher {
            algorithm,
            chunk_size,
            none_hash,
        })
    }

    /// A hasher seeded as LMCache's process would be from this environment:
    /// `$PYTHONHASHSEED` for `builtin` (refused when unset where it matters), else
    /// [`default_seed`].
    pub fn from_env(algorithm: HashAlgorithm, chunk_size: usize) -> Result<Self, HashError> {
        let seed = match algorithm {
            HashAlgorithm::Builtin(BuiltinHash {
                with_vllm: true, ..
            }) => std::env::var("PYTHONHASHSEED").map_err(|_| HashError::BuiltinSeedUnset)?,
            _ => default_seed(),
        };
        Self::new(algorithm, &seed, chunk_size)
    }

    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// The prefix of chunk 0, derived from the seed.
    pub fn none_hash(&self) -> u64 {
        self.none_hash
    }

    /// How many chunks `len` tokens make, counting a trailing partial chunk.
    pub fn num_chunks(&self, len: usize) -> usize {
        len.div_ceil(self.chunk_size)
    }

    /// One link of the chain: the hash of `chunk` after a chunk whose hash is `prefix` (use
    /// [`ChunkHasher::none_hash`] for the first chunk). Any length works, including 0.
    pub fn hash_chunk(&self, prefix: u64, chunk: &[u32]) -> u64 {
        match self.algorithm {
            HashAlgorithm::Sha256Cbor => sha256_cbor_chunk(prefix, chunk),
            HashAlgorithm::Xxh3_128 => xxh3_chunk(prefix, chunk),
            // The chain carries Python's signed hashes as their bits.
            HashAlgorithm::Builtin(_) => cpython::chunk_hash(prefix as i64, chunk) as u64,
        }
    }

    /// The hash of every chunk of `tokens`, in order; the last chunk may be partial.
    ///
    /// For LMCache's `save_unfull_chunk = false`, pass only the full chunks:
    /// `&tokens[..tokens.len() / chunk_size * chunk_size]`.
    pub fn chunk_hashes(&self, tokens: &[u32]) -> Vec<u64> {
        let mut hashes = Vec::with_capacity(self.num_chunks(tokens.len()));
        hashes.extend(self.chunks(tokens).map(|(_, hash)| hash));
        hashes
    }

    /// Lazily hashes the chunks of `tokens`, yielding each chunk's token range and hash.
    pub fn chunks<'a>(&'a self, tokens: &'a [u32]) -> ChunkHashes<'a> {
        ChunkHashes {
            hasher: self,
            tokens,
            start: 0,
            prefix: self.none_hash,
        }
    }

    /// Calls `f(index, token_range, hash)` for every chunk of `tokens`, in order, allocating
    /// nothing.
    pub fn for_each_chunk(&self, tokens: &[u32], mut f: impl FnMut(usize, Range<usize>, u64)) {
        for (index, (range, hash)) in self.chunks(tokens).enumerate() {
            f(index, range, hash);
        }
    }
}

/// Iterator over `(token_range, hash)` of each chunk; see [`ChunkHasher::chunks`].
#[derive(Clone, Debug)]
pub struct ChunkHashes<'a> {
    hasher: &'a ChunkHasher,
    tokens: &'a [u32],
    start: usize,
    prefix: u64,
}

impl Iterator for ChunkHashes<'_> {
    type Item = (Range<usize>, u64);

    fn next(&mut self) -> Option<Self::Item> {
        if self.start >= self.tokens.len() {
            return None;
        }
        let start = self.start;
        let end = self.tokens.len().min(start + self.hasher.chunk_size);
        let hash = self
            .hasher
            .hash_chunk(self.prefix, &self.tokens[start..end]);
        self.prefix = hash;
        self.start = end;
        Some((start..end, hash))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.hasher.num_chunks(self.tokens.len() - self.start);
        (left, Some(left))
    }
}

impl ExactSizeIterator for ChunkHashes<'_> {}
impl std::iter::FusedIterator for ChunkHashes<'_> {}

/// CPython's reading of `PYTHONHASHSEED`: a decimal integer in `0..=u32::MAX`. (`"random"`,
/// the other value CPython takes, keys each process differently.)
fn python_hash_seed(text: &str) -> Result<u32, HashError> {
    let bad = || HashError::BadPythonHashSeed(text.to_string());
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

// ---- sha256_cbor ----------------------------------------------------------------------------
//
// The CBOR encoder is hand-written rather than a CBOR crate because it has to stream straight
// into SHA-256 at hundreds of millions of tokens per second: the chunk is encoded into a stack
// buffer, branch-free per token, and hashed in one `update`. Only the three shapes vLLM's
// `cbor2.dumps(obj, canonical=True)` produces here are needed: unsigned ints (major type 0),
// arrays (major type 4) and one text string (major type 3), each with a smallest-width head.
// It is checked against Python's cbor2 by tests/keys_vectors.rs.

const MAJOR_UINT: u8 = 0;
const MAJOR_TEXT: u8 = 3;
const MAJOR_ARRAY: u8 = 4;

/// Tokens encoded per `Sha256::update`: one LMCache chunk in a single call. (Compressing each
/// 64-byte block as soon as it is encoded, to overlap SHA rounds with encoding, measured no
/// faster, and slower without a lag because of store-to-load forwarding stalls.)
const BLOCK_TOKENS: usize = 256;
/// `0x83`, the prefix (≤ 9 bytes) and the token-array head (≤ 9 bytes).
const HEAD_MAX: usize = 1 + 9 + 9;
/// A token takes at most 5 bytes, but each write stores 8, so leave slack (which also holds
/// the final `0x80` of the empty extra-keys array).
const CBOR_BUF: usize = HEAD_MAX + BLOCK_TOKENS * 5 + 8;

/// Writes a canonical CBOR head (major type + smallest-width argument) and returns its length.
fn put_head(out: &mut [u8], major: u8, value: u64) -> usize {
    let major = major << 5;
    if value < 24 {
        out[0] = major | value as u8;
        1
    } else if value <= u8::MAX as u64 {
        out[0] = major | 24;
        out[1] = value as u8;
        2
    } else if value <= u16::MAX as u64 {
        out[0] = major | 25;
        out[1..3].copy_from_slice(&(value as u16).to_be_bytes());
        3
    } else if value <= u32::MAX as u64 {
        out[0] = major | 26;
        out[1..5].copy_from_slice(&(value as u32).to_be_bytes());
        5
    } else {
        out[0] = major | 27;
        out[1..9].copy_from_slice(&value.to_be_bytes());
        9
    }
}

/// Per `leading_zeros(token | 1)` (0..=31; index 32 is unused): the right shift that brings
/// the byte-swapped token's payload to bytes 1.. of the written word, the head byte, and the
/// encoded length, for tokens of at least 24 (smaller ones are handled inline).
const TOKEN_SHIFT: [u8; 33] = token_table(24, 40, 48);
const TOKEN_HEAD: [u8; 33] = token_table(0x1a, 0x19, 0x18);
const TOKEN_LEN: [u8; 33] = token_table(5, 3, 2);

const fn token_table(four_bytes: u8, two_bytes: u8, one_byte: u8) -> [u8; 33] {
    let mut table = [one_byte; 33];
    let mut lz = 0;
    while lz < 33 {
        table[lz] = match lz {
            0..=15 => four_bytes, // >= 2^16
            16..=23 => two_bytes, // 2^8 .. 2^16
            _ => one_byte,        // < 2^8 (below 24 is overridden)
        };
        lz += 1;
    }
    table
}

/// Encodes one token as a canonical CBOR uint at `pos` and returns the new position.
///
/// Branch-free so that token ids of mixed widths (a 128k vocabulary straddles the 2- and 4-byte
/// forms) cost no mispredictions: the width comes from a table indexed by the leading-zero
/// count, it always stores 8 bytes and advances by the real length. This loop is most of
/// sha256_cbor's cost beyond SHA-256 itself, so it is kept to a handful of instructions.
#[inline(always)]
fn put_token(buf: &mut [u8; CBOR_BUF], pos: usize, token: u32) -> usize {
    let lz = (token | 1).leading_zeros() as usize;
    // swap_bytes puts the token's big-endian bytes at the top of the word; shifting them down
    // to byte 1 leaves byte 0 zero for the head.
    let word = ((token as u64).swap_bytes() >> TOKEN_SHIFT[lz]) | TOKEN_HEAD[lz] as u64;
    // Major type 0 below 24: the head byte is the value itself.
    let (word, len) = if token < 24 {
        (token as u64, 1)
    } else {
        (word, TOKEN_LEN[lz] as usize)
    };
    buf[pos..pos + 8].copy_from_slice(&word.to_le_bytes());
    pos + len
}

fn fold_sha256(sha: Sha256) -> u64 {
    let digest = sha.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// `u64_be(sha256(cbor(text))[0..8])`: vLLM's `NONE_HASH` for a string seed.
fn sha256_cbor_text(text: &str) -> u64 {
    let mut head = [0u8; 9];
    let len = put_head(&mut head, MAJOR_TEXT, text.len() as u64);
    let mut sha = Sha256::new();
    sha.update(&head[..len]);
    sha.update(text.as_bytes());
    fold_sha256(sha)
}

/// `u64_be(sha256(cbor([prefix, [tokens...], []]))[0..8])`: the chunk is encoded into a stack
/// buffer (no allocation) and hashed with one `update` per 256 tokens.
fn sha256_cbor_chunk(prefix: u64, chunk: &[u32]) -> u64 {
    let mut buf = [0u8; CBOR_BUF];
    let mut sha = Sha256::new();
    buf[0] = 0x80 | 3; // array of 3
    let mut pos = 1;
    pos += put_head(&mut buf[pos..], MAJOR_UINT, prefix);
    pos += put_head(&mut buf[pos..], MAJOR_ARRAY, chunk.len() as u64);
    let mut blocks = chunk.chunks(BLOCK_TOKENS).peekable();
    while let Some(block) = blocks.next() {
        for &token in block {
            pos = put_token(&mut buf, pos, token);
        }
        if blocks.peek().is_some() {
            sha.update(&buf[..pos]);
            pos = 0;
        }
    }
    buf[pos] = 0x80; // the empty extra-keys array
    pos += 1;
    sha.update(&buf[..pos]);
    fold_sha256(sha)
}

/// Appends the exact CBOR message that sha256_cbor hashes for one chunk,
/// `cbor([prefix, [tokens...], []])`, to `out`. For debugging against `cbor2` and for benches;
/// [`ChunkHasher`] streams the same bytes without building them.
pub fn sha256_cbor_message(prefix: u64, chunk: &[u32], out: &mut Vec<u8>) {
    let mut head = [0u8; 9];
    out.push(0x83);
    let len = put_head(&mut head, MAJOR_UINT, prefix);
    out.extend_from_slice(&head[..len]);
    let len = put_head(&mut head, MAJOR_ARRAY, chunk.len() as u64);
    out.extend_from_slice(&head[..len]);
    out.reserve(chunk.len() * 5 + 1);
    for &token in chunk {
        let len = put_head(&mut head, MAJOR_UINT, token as u64);
        out.extend_from_slice(&head[..len]);
    }
    out.push(0x80);
}

// ---- xxh3_128 ---------------------------------------------------------------------------------

/// The high 64 bits: the first 8 bytes of XXH3-128's canonical (big-endian) digest.
fn fold128(digest: u128) -> u64 {
    (digest >> 64) as u64
}

/// Tokens per xxh3 input buffer: one LMCache chunk goes through the one-shot function.
const XXH3_BLOCK_TOKENS: usize = 256;

/// `fold(xxh3_128(u64_le(prefix) ‖ u32_le(tokens...)))`.
fn xxh3_chunk(prefix: u64, chunk: &[u32]) -> u64 {
    let mut buf = [0u8; 8 + 4 * XXH3_BLOCK_TOKENS];
    buf[..8].copy_from_slice(&prefix.to_le_bytes());
    if chunk.len() <= XXH3_BLOCK_TOKENS {
        // One-shot is faster than streaming for short inputs and gives the same digest.
        let len = put_le_tokens(&mut buf[8..], chunk);
        return fold128(xxh3_128(&buf[..8 + len]));
    }
    let mut xxh = Xxh3Default::new();
    xxh.update(&buf[..8]);
    for block in chunk.chunks(XXH3_BLOCK_TOKENS) {
        let len = put_le_tokens(&mut buf, block);
        xxh.update(&buf[..len]);
    }
    fold128(xxh.digest128())
}

fn put_le_tokens(out: &mut [u8], tokens: &[u32]) -> usize {
    for (bytes, token) in out.chunks_exact_mut(4).zip(tokens) {
        bytes.copy_from_slice(&token.to_le_bytes());
    }
    tokens.len() * 4
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(seed: &str) -> ChunkHasher {
        ChunkHasher::new(HashAlgorithm::Sha256Cbor, seed, 256).unwrap()
    }

    /// Values from the LMCache reference notes, cross-checked with cbor2.
    #[test]
    fn sha256_cbor_matches_lmcache_vllm_hash_seed() {
        let hasher = sha("vllm-none-hash");
        assert_eq!(hasher.none_hash(), 0x9bd96a485ad84efd);
        let mut tokens: Vec<u32> = (1..=256).collect();
        tokens.extend([7, 8, 9]);
        assert_eq!(
            hasher.chunk_hashes(&tokens),
            [0xd32563aadec44566, 0x4f6c3c8690a1033c]
        );
    }

    #[test]
    fn sha256_cbor_matches_lmcache_seed_zero() {
        let hasher = sha("0");
        assert_eq!(hasher.none_hash(), 0x4e1195df020de59e);
        let first: Vec<u32> = (1..=256).collect();
        let chunk0 = hasher.hash_chunk(hasher.none_hash(), &first);
        assert_eq!(chunk0, 0xb44cfe1cb25a9be0);
        assert_eq!(hasher.hash_chunk(chunk0, &[7, 8, 9]), 0x96ed2f52011639a5);
    }

    /// A plain, obviously-correct encoder to pin the branch-free one at every width boundary.
    fn reference_uint(out: &mut Vec<u8>, value: u64) {
        let mut head = [0u8; 9];
        let len = put_head(&mut head, MAJOR_UINT, value);
        out.extend_from_slice(&head[..len]);
    }

    #[test]
    fn branch_free_token_encoding_matches_heads() {
        let edges = [
            0,
            1,
            23,
            24,
            25,
            255,
            256,
            257,
            65535,
            65536,
            65537,
            128_255,
            0x00ff_ffff,
            0x0100_0000,
            u32::MAX - 1,
            u32::MAX,
        ];
        let mut buf = [0u8; CBOR_BUF];
        let mut pos = 0;
        let mut expected = Vec::new();
        for &token in &edges {
            pos = put_token(&mut buf, pos, token);
            reference_uint(&mut expected, token as u64);
        }
        assert_eq!(&buf[..pos], &expected[..]);
    }

    #[test]
    fn heads_use_smallest_width() {
        let cases: [(u64, &[u8]); 6] = [
            (10, &[0x0a]),
            (24, &[0x18, 24]),
            (500, &[0x19, 0x01, 0xf4]),
            (70_000, &[0x1a, 0x00, 0x01, 0x11, 0x70]),
            (1 << 32, &[0x1b, 0, 0, 0, 1, 0, 0, 0, 0]),
            (
                u64::MAX,
                &[0x1b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            ),
        ];
        for (value, bytes) in cases {
            let mut out = [0u8; 9];
            let len = put_head(&mut out, MAJOR_UINT, value);
            assert_eq!(&out[..len], bytes, "{value}");
        }
        let mut out = [0u8; 9];
        assert_eq!(put_head(&mut out, MAJOR_ARRAY, 256), 3);
        assert_eq!(&out[..3], &[0x99, 0x01, 0x00]);
    }

    /// Builds the whole CBOR message with the plain encoder and hashes it in one go.
    fn reference_sha256_cbor(prefix: u64, chunk: &[u32]) -> u64 {
        let mut msg = Vec::new();
        sha256_cbor_message(prefix, chunk, &mut msg);
        u64::from_be_bytes(Sha256::digest(&msg)[..8].try_into().unwrap())
    }

    #[test]
    fn message_bytes_match_the_reference_notes() {
        let mut msg = Vec::new();
        let chunk: Vec<u32> = (1..=256).collect();
        sha256_cbor_message(0x9bd96a485ad84efd, &chunk, &mut msg);
        let start = [
            0x83, 0x1b, 0x9b, 0xd9, 0x6a, 0x48, 0x5a, 0xd8, 0x4e, 0xfd, 0x99, 1, 0, 1, 2,
        ];
        assert_eq!(&msg[..start.len()], &start);
        assert_eq!(msg.last(), Some(&0x80));
    }

    fn reference_xxh3(prefix: u64, chunk: &[u32]) -> u64 {
        let mut msg = prefix.to_le_bytes().to_vec();
        for &t in chunk {
            msg.extend_from_slice(&t.to_le_bytes());
        }
        (xxh3_128(&msg) >> 64) as u64
    }

    /// Chunks longer than one encode block take the multi-update paths.
    #[test]
    fn long_and_empty_chunks_match_one_shot_reference() {
        for len in [0, 1, 255, 256, 257, 511, 512, 513, 1000, 3000] {
            let chunk: Vec<u32> = (0..len as u32)
                .map(|i| i.wrapping_mul(2_654_435_761) >> (i % 32))
                .collect();
            let prefix = 0x0123_4567_89ab_cdef ^ len as u64;
            assert_eq!(
                sha256_cbor_chunk(prefix, &chunk),
                reference_sha256_cbor(prefix, &chunk),
                "sha256_cbor len {len}"
            );
            assert_eq!(
                xxh3_chunk(prefix, &chunk),
                reference_xxh3(prefix, &chunk),
                "xxh3 len {len}"
            );
        }
    }

    /// Message lengths of every residue mod 64, so every SHA-256 block and padding boundary.
    #[test]
    fn every_tail_length_matches_reference() {
        let mut residues = [false; 64];
        for len in 0..200u32 {
            for width in [5u32, 300, 70_000] {
                let chunk: Vec<u32> = (0..len).map(|i| width + i % 7).collect();
                let mut msg = Vec::new();
                sha256_cbor_message(7, &chunk, &mut msg);
                residues[msg.len() % 64] = true;
                assert_eq!(
                    sha256_cbor_chunk(7, &chunk),
                    reference_sha256_cbor(7, &chunk),
                    "len {len} width {width}"
                );
            }
        }
        assert!(residues.iter().all(|&r| r));
    }

    /// Pinned so that a change to the xxh3_128 byte layout cannot go unnoticed; values from
    /// Python's `xxhash.xxh3_128_digest` over the documented input.
    #[test]
    fn xxh3_128_is_pinned() {
        let hasher = ChunkHasher::new(HashAlgorithm::Xxh3_128, "vllm-none-hash", 256).unwrap();
        assert_eq!(hasher.none_hash(), XXH3_NONE_HASH);
        let mut tokens: Vec<u32> = (1..=256).collect();
        tokens.extend([7, 8, 9]);
        assert_eq!(hasher.chunk_hashes(&tokens), XXH3_CHUNKS);
    }
    const XXH3_NONE_HASH: u64 = 0xa4a59d45b01907b2;
    const XXH3_CHUNKS: [u64; 2] = [0x4119280cf29f1734, 0x6dbe24e327196274];

    #[test]
    fn names_parse_and_print() {
        for algorithm in HashAlgorithm::ALL {
            assert_eq!(
                algorithm.to_string().parse::<HashAlgorithm>(),
                Ok(algorithm)
            );
        }
        assert_eq!(
            "sha256_cbor_64bit".parse::<HashAlgorithm>(),
            Ok(HashAlgorithm::Sha256Cbor)
        );
        assert_eq!(HashAlgorithm::default(), HashAlgorithm::Xxh3_128);
        assert_eq!(
            "builtin".parse::<HashAlgorithm>(),
            Ok(HashAlgorithm::Builtin(BuiltinHash::default()))
        );
        assert!(matches!(
            "xxhash".parse::<HashAlgorithm>(),
            Err(HashError::UnsupportedVllmHash(_))
        ));
        assert!(matches!(
            "md5".parse::<HashAlgorithm>(),
            Err(HashError::UnknownAlgorithm(_))
        ));
    }

    /// The check value from LMCache 0.5.6 on CPython 3.11 with vLLM, PYTHONHASHSEED=0.
    #[test]
    fn builtin_none_hash_and_first_chunk_match_cpython() {
        let builtin = HashAlgorithm::Builtin(BuiltinHash::default());
        let hasher = ChunkHasher::new(builtin, "0", 256).unwrap();
        assert_eq!(hasher.none_hash(), 5_313_149_338_359_954_478);
        let tokens: Vec<u32> = (0..256).collect();
        // PYTHONHASHSEED=0 python3 -c 'print(hash((hash("0"), tuple(range(256)), ())))'
        assert_eq!(hasher.chunk_hashes(&tokens), [6_847_123_751_949_154_252]);
        let without = BuiltinHash {
            with_vllm: false,
            ..BuiltinHash::default()
        };
        let hasher = ChunkHasher::new(HashAlgorithm::Builtin(without), "ignored", 256).unwrap();
        assert_eq!(hasher.none_hash(), 0);
    }

    #[test]
    fn builtin_refuses_seeds_cpython_would_randomize() {
        let builtin = HashAlgorithm::Builtin(BuiltinHash::default());
        for bad in [
            "",
            "random",
            "vllm-none-hash",
            "-1",
            " 1",
            "4294967296",
            "1e3",
        ] {
            assert_eq!(
                ChunkHasher::new(builtin, bad, 256),
                Err(HashError::BadPythonHashSeed(bad.into())),
                "{bad:?}"
            );
        }
        assert!(ChunkHasher::new(builtin, "4294967295", 256).is_ok());
        assert!(HashError::BuiltinSeedUnset
            .to_string()
            .contains("PYTHONHASHSEED=0"));
    }

    #[test]
    fn rejects_zero_chunk_size() {
        assert_eq!(
            ChunkHasher::new(HashAlgorithm::Sha256Cbor, "0", 0),
            Err(HashError::ZeroChunkSize)
        );
    }

    #[test]
    fn iterator_ranges_and_callback_agree() {
        let hasher = ChunkHasher::new(HashAlgorithm::Sha256Cbor, "0", 4).unwrap();
        let tokens: Vec<u32> = (0..10).collect();
        let chunks: Vec<_> = hasher.chunks(&tokens).collect();
        assert_eq!(hasher.chunks(&tokens).len(), 3);
        let ranges: Vec<_> = chunks.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(ranges, [0..4, 4..8, 8..10]);
        let mut seen = Vec::new();
        hasher.for_each_chunk(&tokens, |i, r, h| seen.push((i, r, h)));
        for (i, ((r, h), (si, sr, sh))) in chunks.iter().zip(&seen).enumerate() {
            assert_eq!((i, r, h), (*si, sr, sh));
        }
        assert_eq!(
            hasher.chunk_hashes(&tokens),
            chunks.iter().map(|c| c.1).collect::<Vec<_>>()
        );
        assert!(hasher.chunk_hashes(&[]).is_empty());
    }
}

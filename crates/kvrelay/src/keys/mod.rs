//! Chunk keys: how a run of tokens is named in every tier and on the wire.
//!
//! `key` is the LMCache-compatible `CacheKey`; `hash` chunks token ids and computes the
//! prefix-chained chunk hashes; `cpython` is CPython's `hash()` for LMCache's `builtin`;
//! `derivation` names every input that makes two engines' keys differ.

mod cpython;
mod derivation;
mod hash;
mod key;

pub use cpython::CpythonVersion;
pub use derivation::KeyDerivation;
pub use hash::{
    default_seed, sha256_cbor_message, BuiltinHash, ChunkHasher, ChunkHashes, HashAlgorithm,
    HashError, DEFAULT_CHUNK_SIZE, DEFAULT_SEED,
};
pub use key::{CacheKey, KeyError};

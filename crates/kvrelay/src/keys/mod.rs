//! Chunk keys: how a run of tokens is named in every tier and on the wire.
//!
//! `key` is the LMCache-compatible `CacheKey`; `hash` chunks token ids and computes the
//! prefix-chained chunk hashes; `derivation` names every input that makes two engines' keys
//! differ.

mod derivation;
mod hash;
mod key;

pub use derivation::KeyDerivation;

pub use hash::{
    default_seed, sha256_cbor_message, ChunkHasher, ChunkHashes, HashAlgorithm, HashError,
    DEFAULT_CHUNK_SIZE, DEFAULT_SEED,
};
pub use key::{CacheKey, KeyError};

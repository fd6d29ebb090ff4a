//! What decides the keys an engine derives for a run of tokens. Two engines whose
//! [`KeyDerivation`]s differ name the same prompt differently, so KV one sends the other is
//! never found: a PD receiver refuses such a sender at the handshake instead.

use std::fmt::Display;
use std::sync::Arc;

use super::{CacheKey, ChunkHasher, HashAlgorithm, KeyError};
use crate::dtype::KvDtype;

/// Every input of a chunk key except the tokens and the worker id (which differs by rank).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDerivation {
    pub model: Arc<str>,
    pub world_size: u32,
    pub dtype: KvDtype,
    /// Tokens per full chunk.
    pub chunk_size: u32,
    pub hash_algorithm: HashAlgorithm,
    /// The hash chain's start, derived from the hash seed (`$PYTHONHASHSEED` in vLLM).
    pub none_hash: u64,
}

impl KeyDerivation {
    /// The derivation of keys `hasher` computes for `model` at `world_size` and `dtype`.
    pub fn new(
        model: &str,
        world_size: u32,
        dtype: KvDtype,
        hasher: &ChunkHasher,
    ) -> Result<Self, KeyError> {
        let chunk_size = u32::try_from(hasher.chunk_size()).map_err(|_| KeyError::BadField {
            key: model.to_string(),
            field: "chunk_size",
            value: hasher.chunk_size().to_string(),
            reason: "more than 2^32 tokens per chunk".into(),
        })?;
        Ok(KeyDerivation {
            model: CacheKey::model_name(model)?,
            world_size,
            dtype,
            chunk_size,
            hash_algorithm: hasher.algorithm(),
            none_hash: hasher.none_hash(),
        })
    }

    /// The first field in which `sender` (the peer) differs from `self` (the receiver), as
    /// `"field: sender X, receiver Y"`; `None` when both derive the same keys.
    pub fn first_difference(&self, sender: &KeyDerivation) -> Option<String> {
        fn differ(field: &str, sender: impl Display, receiver: impl Display) -> Option<String> {
            let (sender, receiver) = (sender.to_string(), receiver.to_string());
            (sender != receiver).then(|| format!("{field}: sender {sender}, receiver {receiver}"))
        }
        let hex = |h: u64| format!("{h:#018x}");
        differ("model", &sender.model, &self.model)
            .or_else(|| differ("world_size", sender.world_size, self.world_size))
            .or_else(|| differ("kv dtype", sender.dtype, self.dtype))
            .or_else(|| differ("chunk_size", sender.chunk_size, self.chunk_size))
            .or_else(|| differ("hash algorithm", sender.hash_algorithm, self.hash_algorithm))
            .or_else(|| {
                differ(
                    "NONE_HASH (from the hash seed, $PYTHONHASHSEED)",
                    hex(sender.none_hash),
                    hex(self.none_hash),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn derivation(algorithm: HashAlgorithm, seed: &str, chunk_size: usize) -> KeyDerivation {
        let hasher = ChunkHasher::new(algorithm, seed, chunk_size).unwrap();
        KeyDerivation::new("llama", 2, KvDtype::Bf16, &hasher).unwrap()
    }

    #[test]
    fn each_field_that_changes_keys_is_named_with_both_values() {
        let receiver = derivation(HashAlgorithm::Sha256Cbor, "0", 256);
        assert_eq!(receiver.first_difference(&receiver.clone()), None);
        let cases = [
            (
                KeyDerivation {
                    model: Arc::from("qwen"),
                    ..receiver.clone()
                },
                "model: sender qwen, receiver llama",
            ),
            (
                KeyDerivation {
                    world_size: 4,
                    ..receiver.clone()
                },
                "world_size: sender 4, receiver 2",
            ),
            (
                KeyDerivation {
                    dtype: KvDtype::F16,
                    ..receiver.clone()
                },
                "kv dtype: sender half, receiver bfloat16",
            ),
            (
                derivation(HashAlgorithm::Sha256Cbor, "0", 128),
                "chunk_size: sender 128, receiver 256",
            ),
            (
                derivation(HashAlgorithm::Xxh3_128, "0", 256),
                "hash algorithm: sender xxh3_128, receiver sha256_cbor",
            ),
        ];
        for (sender, expected) in cases {
            assert_eq!(
                receiver.first_difference(&sender).as_deref(),
                Some(expected)
            );
        }
        let other_seed = derivation(HashAlgorithm::Sha256Cbor, "1", 256);
        let message = receiver.first_difference(&other_seed).unwrap();
        assert!(message.starts_with("NONE_HASH"), "{message}");
        assert!(
            message.contains(&format!("{:#018x}", other_seed.none_hash))
                && message.contains(&format!("{:#018x}", receiver.none_hash)),
            "{message}"
        );
    }

    #[test]
    fn a_model_name_keys_cannot_hold_is_refused() {
        let hasher = ChunkHasher::new(HashAlgorithm::Xxh3_128, "0", 16).unwrap();
        assert!(KeyDerivation::new("a@b", 1, KvDtype::Bf16, &hasher).is_err());
    }
}

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::dtype::KvDtype;

/// The name of one chunk of KV: LMCache's `CacheEngineKey` without tags.
///
/// Its string form is LMCache's, `model@world_size@worker_id@hexhash@dtype`, so kvrelay and
/// LMCache engines can share one store.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    model: Arc<str>,
    pub world_size: u32,
    pub worker_id: u32,
    pub chunk_hash: u64,
    pub dtype: KvDtype,
}

/// A key that cannot be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("model name {0:?} is empty or contains '@', which separates key fields")]
    BadModelName(String),
    #[error("worker_id {worker_id} is not below world_size {world_size}")]
    WorkerOutOfRange { worker_id: u32, world_size: u32 },
    #[error("key {key:?} has {found} '@'-separated fields; expected 5 (model@world_size@worker_id@hexhash@dtype)")]
    FieldCount { key: String, found: usize },
    #[error("key {key:?}: field {field} = {value:?} is not valid: {reason}")]
    BadField {
        key: String,
        field: &'static str,
        value: String,
        reason: String,
    },
}

impl CacheKey {
    pub fn new(
        model: &str,
        world_size: u32,
        worker_id: u32,
        chunk_hash: u64,
        dtype: KvDtype,
    ) -> Result<Self, KeyError> {
        Self::with_model(
            Self::model_name(model)?,
            world_size,
            worker_id,
            chunk_hash,
            dtype,
        )
    }

    /// Validates a model name once so that many keys can share it.
    pub fn model_name(model: &str) -> Result<Arc<str>, KeyError> {
        if model.is_empty() || model.contains('@') {
            return Err(KeyError::BadModelName(model.to_string()));
        }
        Ok(Arc::from(model))
    }

    /// Builds a key over a model name already checked by [`CacheKey::model_name`].
    pub fn with_model(
        model: Arc<str>,
        world_size: u32,
        worker_id: u32,
        chunk_hash: u64,
        dtype: KvDtype,
    ) -> Result<Self, KeyError> {
        if worker_id >= world_size {
            return Err(KeyError::WorkerOutOfRange {
                worker_id,
                world_size,
            });
        }
        Ok(CacheKey {
            model,
            world_size,
            worker_id,
            chunk_hash,
            dtype,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}@{}@{}@{:x}@{}",
            self.model, self.world_size, self.worker_id, self.chunk_hash, self.dtype
        )
    }
}

impl FromStr for CacheKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fields: Vec<&str> = s.split('@').collect();
        let [model, world_size, worker_id, hash, dtype] = fields[..] else {
            return Err(KeyError::FieldCount {
                key: s.to_string(),
                found: fields.len(),
            });
        };
        let bad = |field: &'static str, value: &str, reason: String| KeyError::BadField {
            key: s.to_string(),
            field,
            value: value.to_string(),
            reason,
        };
        let world_size = world_size
            .parse::<u32>()
            .map_err(|e| bad("world_size", world_size, e.to_string()))?;
        let worker_id = worker_id
            .parse::<u32>()
            .map_err(|e| bad("worker_id", worker_id, e.to_string()))?;
        if hash.starts_with('-') {
            return Err(bad(
                "chunk_hash",
                hash,
                "negative hashes come from LMCache's per-process 'builtin' hash, which kvrelay does not support; use sha256_cbor".into(),
            ));
        }
        let chunk_hash =
            u64::from_str_radix(hash, 16).map_err(|e| bad("chunk_hash", hash, e.to_string()))?;
        let dtype = dtype
            .parse::<KvDtype>()
            .map_err(|e| bad("dtype", dtype, e.to_string()))?;
        CacheKey::new(model, world_size, worker_id, chunk_hash, dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_like_lmcache() {
        let key = CacheKey::new(
            "meta-llama/Llama-3.1-8B-Instruct",
            1,
            0,
            0xd32563aadec44566,
            KvDtype::Bf16,
        )
        .unwrap();
        let text = key.to_string();
        assert_eq!(
            text,
            "meta-llama/Llama-3.1-8B-Instruct@1@0@d32563aadec44566@bfloat16"
        );
        assert_eq!(text.parse::<CacheKey>().unwrap(), key);
    }

    #[test]
    fn rejects_malformed_keys() {
        for bad in [
            "",
            "m@1@0@zz@bfloat16",
            "m@1@0@-1b3c@bfloat16",
            "m@1@2@ab@bfloat16",
            "m@x@0@ab@bfloat16",
            "m@1@0@ab@complex",
            "m@1@0@ab",
            "@1@0@ab@half",
        ] {
            assert!(bad.parse::<CacheKey>().is_err(), "{bad:?} parsed");
        }
    }
}

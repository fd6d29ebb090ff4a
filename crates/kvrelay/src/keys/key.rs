use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::Arc;

use crate::dtype::KvDtype;

/// The name of one chunk of KV: LMCache's `CacheEngineKey` without tags.
///
/// Its string form is LMCache's, `model@world_size@worker_id@hexhash@dtype`, so kvrelay and
/// LMCache engines can share one store. `hexhash` is Python's `f"{hash:x}"`: a `builtin`
/// hash is a signed int and prints as `-2fdf…` when negative (see [`CacheKey::signed`]).
///
/// Keys are equal when their strings are: a signed key whose hash is not negative equals
/// the unsigned key with the same bits.
#[derive(Clone, Debug)]
pub struct CacheKey {
    model: Arc<str>,
    pub world_size: u32,
    pub worker_id: u32,
    /// The hash's bits; a signed hash is stored as its two's complement.
    pub chunk_hash: u64,
    pub dtype: KvDtype,
    signed_hash: bool,
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
            signed_hash: false,
        })
    }

    /// Reads `chunk_hash` as a signed (`builtin`, Python int) hash, or not.
    pub fn signed(mut self, signed: bool) -> Self {
        self.signed_hash = signed;
        self
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whether the hash prints with a minus sign.
    fn negative(&self) -> bool {
        self.signed_hash && (self.chunk_hash as i64) < 0
    }

    fn identity(&self) -> (&str, u32, u32, u64, KvDtype, bool) {
        let (model, ws, id) = (&*self.model, self.world_size, self.worker_id);
        (model, ws, id, self.chunk_hash, self.dtype, self.negative())
    }
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.identity() == other.identity()
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.identity().hash(state);
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}@{}@", self.model, self.world_size, self.worker_id)?;
        if self.negative() {
            write!(f, "-{:x}", (self.chunk_hash as i64).unsigned_abs())?;
        } else {
            write!(f, "{:x}", self.chunk_hash)?;
        }
        write!(f, "@{}", self.dtype)
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
        // A leading '-' is a negative `builtin` hash, in -2^63..0.
        let (negative, digits) = match hash.strip_prefix('-') {
            Some(digits) => (true, digits),
            None => (false, hash),
        };
        // from_str_radix would take a second sign; LMCache never writes one.
        let magnitude = Some(digits)
            .filter(|d| !d.starts_with(['+', '-']))
            .ok_or_else(|| "a sign inside the digits".to_string())
            .and_then(|d| u64::from_str_radix(d, 16).map_err(|e| e.to_string()))
            .map_err(|reason| bad("chunk_hash", hash, reason))?;
        let chunk_hash = if negative {
            if magnitude == 0 || magnitude > 1 << 63 {
                return Err(bad(
                    "chunk_hash",
                    hash,
                    "a negative hash must be a nonzero 64-bit signed value".into(),
                ));
            }
            magnitude.wrapping_neg()
        } else {
            magnitude
        };
        let dtype = dtype
            .parse::<KvDtype>()
            .map_err(|e| bad("dtype", dtype, e.to_string()))?;
        Ok(CacheKey::new(model, world_size, worker_id, chunk_hash, dtype)?.signed(negative))
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
    fn negative_builtin_hashes_print_and_parse_like_python() {
        // f"{-0x2fdf48fc280efdec:x}" and the most negative i64.
        let key = CacheKey::new(
            "m",
            1,
            0,
            (-0x2fdf_48fc_280e_fdec_i64) as u64,
            KvDtype::Bf16,
        )
        .unwrap()
        .signed(true);
        assert_eq!(key.to_string(), "m@1@0@-2fdf48fc280efdec@bfloat16");
        assert_eq!(key.to_string().parse::<CacheKey>().unwrap(), key);
        let min = CacheKey::new("m", 1, 0, i64::MIN as u64, KvDtype::Bf16)
            .unwrap()
            .signed(true);
        assert_eq!(min.to_string(), "m@1@0@-8000000000000000@bfloat16");
        assert_eq!(min.to_string().parse::<CacheKey>().unwrap(), min);
        // A signed key with a non-negative hash is the unsigned key with the same bits.
        let positive = CacheKey::new("m", 1, 0, 0xabc, KvDtype::Bf16).unwrap();
        assert_eq!(positive.clone().signed(true), positive);
        assert_eq!(
            positive.clone().signed(true).to_string(),
            "m@1@0@abc@bfloat16"
        );
        // The same bits read unsigned are another key.
        assert_ne!(key.clone().signed(false), key);
        assert_eq!(
            key.clone().signed(false).to_string(),
            "m@1@0@d020b703d7f10214@bfloat16"
        );
    }

    #[test]
    fn rejects_malformed_keys() {
        for bad in [
            "",
            "m@1@0@zz@bfloat16",
            "m@1@0@--1b3c@bfloat16",
            "m@1@0@-+1b3c@bfloat16",
            "m@1@0@+1b3c@bfloat16",
            "m@1@0@-0@bfloat16",
            "m@1@0@-8000000000000001@bfloat16",
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

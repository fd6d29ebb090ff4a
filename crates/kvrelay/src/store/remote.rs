//! What a remote tier needs besides a client: LMCache's `RemoteMetadata` record, which
//! describes each chunk in a shared store, and the tier's settings.
//!
//! `RemoteMetadata` (LMCache `lmcache/v1/protocol.py`, reference §3.4) is packed with
//! Python's `struct` in native order, which is little-endian on every platform LMCache runs
//! on: int32 `[length, fmt, dtype, s0, s1, s2, s3]`, 28 bytes for the one group a KV chunk
//! has. `shape` is the chunk's logical shape padded to 4-D: `[2, layers, tokens, heads*head]`
//! for `KV_2LTD` and `[1, layers, tokens, latent]` for `KV_MLA_FMT`.

use std::time::Duration;

use crate::dtype::KvDtype;
use crate::layout::{AttentionKind, KvCacheSpec};

/// LMCache `MemoryFormat.KV_2LTD`: `[2, layers, tokens, heads*head_size]`.
pub const FMT_KV_2LTD: i32 = 1;
/// LMCache `MemoryFormat.KV_MLA_FMT`: `[1, layers, tokens, latent]`.
pub const FMT_KV_MLA: i32 = 6;

/// LMCache's `RemoteMetadata` for a one-group chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteMetadata {
    /// Bytes of the chunk's KV value.
    pub length: i32,
    /// `MemoryFormat` code: [`FMT_KV_2LTD`] or [`FMT_KV_MLA`] for kvrelay chunks.
    pub fmt: i32,
    /// LMCache `DTYPE_TO_INT` code; see [`lmcache_dtype_code`].
    pub dtype: i32,
    pub shape: [i32; 4],
}

/// Why bytes are not a `RemoteMetadata` kvrelay can use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    #[error("metadata is {0} bytes; a one-group RemoteMetadata is 28")]
    Length(usize),
    #[error("chunk of {0} bytes or shape does not fit LMCache's int32 metadata fields")]
    TooLarge(usize),
}

impl RemoteMetadata {
    /// Encoded size: seven int32s.
    pub const LEN: usize = 28;

    /// The metadata LMCache writes for a chunk of `num_tokens` tokens of `spec`'s geometry
    /// whose value is `length` bytes.
    pub fn for_chunk(
        spec: &KvCacheSpec,
        num_tokens: u32,
        length: usize,
    ) -> Result<Self, MetadataError> {
        let fmt = match spec.attention {
            AttentionKind::Mha => FMT_KV_2LTD,
            AttentionKind::Mla => FMT_KV_MLA,
        };
        let dims = [
            spec.kv_planes(),
            spec.num_layers,
            num_tokens as usize,
            spec.num_kv_heads * spec.head_size,
        ];
        let too_large = || MetadataError::TooLarge(length);
        let mut shape = [0i32; 4];
        for (out, dim) in shape.iter_mut().zip(dims) {
            *out = i32::try_from(dim).map_err(|_| too_large())?;
        }
        Ok(RemoteMetadata {
            length: i32::try_from(length).map_err(|_| too_large())?,
            fmt,
            dtype: lmcache_dtype_code(spec.dtype),
            shape,
        })
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        let fields = [self.length, self.fmt, self.dtype]
            .into_iter()
            .chain(self.shape);
        for (slot, field) in out.chunks_exact_mut(4).zip(fields) {
            slot.copy_from_slice(&field.to_le_bytes());
        }
        out
    }

    /// Decodes exactly one group. Multi-group records (LMCache's hybrid-attention caches)
    /// are refused: kvrelay chunks have one group.
    pub fn decode(bytes: &[u8]) -> Result<Self, MetadataError> {
        if bytes.len() != Self::LEN {
            return Err(MetadataError::Length(bytes.len()));
        }
        let mut f = [0i32; 7];
        for (field, raw) in f.iter_mut().zip(bytes.chunks_exact(4)) {
            *field = i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        }
        Ok(RemoteMetadata {
            length: f[0],
            fmt: f[1],
            dtype: f[2],
            shape: [f[3], f[4], f[5], f[6]],
        })
    }

    /// Whether this metadata describes `expected`, accepting either of LMCache's two codes
    /// for float16 (`torch.half` and `torch.float16` are one dtype with codes 1 and 2).
    pub fn matches(&self, expected: &RemoteMetadata) -> bool {
        let dtype_ok = self.dtype == expected.dtype
            || (expected.dtype == LMCACHE_FLOAT16 && self.dtype == LMCACHE_HALF);
        dtype_ok
            && self.length == expected.length
            && self.fmt == expected.fmt
            && self.shape == expected.shape
    }
}

const LMCACHE_HALF: i32 = 1;
const LMCACHE_FLOAT16: i32 = 2;

/// LMCache's `DTYPE_TO_INT` code for a KV dtype. `torch.half` and `torch.float16` are the
/// same object, so the dict maps float16 to its later entry, 2. LMCache has no code for
/// int8 (it cannot store int8 KV remotely); kvrelay writes 0 (`None`) for it, which only
/// kvrelay readers accept.
pub const fn lmcache_dtype_code(dtype: KvDtype) -> i32 {
    match dtype {
        KvDtype::F16 => LMCACHE_FLOAT16,
        KvDtype::Bf16 => 3,
        KvDtype::F32 => 4,
        KvDtype::Fp8E4m3 => 7,
        KvDtype::Fp8E5m2 => 8,
        KvDtype::Int8 => 0,
    }
}

/// Settings of a remote tier (LMCache config: `remote_url`, `blocking_timeout_secs`, and the
/// `extra_config` keys listed on each field).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteOptions {
    /// Longest wait to open a connection (`extra_config.remote_connect_timeout_ms`,
    /// default 1000).
    pub connect_timeout: Duration,
    /// Longest wait for one read or write on a connection (`blocking_timeout_secs`,
    /// LMCache's remote timeout, default 10 s).
    pub io_timeout: Duration,
    /// Expiry of stored chunks (`extra_config.remote_ttl_secs`; none by default).
    pub ttl: Option<Duration>,
    /// Largest KV value a put sends (`extra_config.remote_max_value_bytes`; by default only
    /// the server's limit, 512 MiB for Redis).
    pub max_value_bytes: Option<u64>,
    /// Connections kept open at most (`extra_config.remote_pool_size`, default 4).
    pub pool_size: usize,
    /// After a failed connection, operations fail at once for this long instead of each
    /// waiting for a timeout (`extra_config.remote_retry_after_ms`, default 1000).
    pub retry_after: Duration,
    /// Load chunks that have LMCache's two keys but no kvrelay check record (LMCache wrote
    /// them) when their metadata matches exactly, counted as `unchecked`
    /// (`extra_config.remote_accept_unchecked`, default true; false: checksummed chunks only).
    pub accept_unchecked: bool,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(10),
            ttl: None,
            max_value_bytes: None,
            pool_size: 4,
            retry_after: Duration::from_secs(1),
            accept_unchecked: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dtype: KvDtype, attention: AttentionKind) -> KvCacheSpec {
        KvCacheSpec {
            num_layers: 32,
            num_kv_heads: if attention == AttentionKind::Mla {
                1
            } else {
                8
            },
            head_size: if attention == AttentionKind::Mla {
                576
            } else {
                128
            },
            dtype,
            block_size: 16,
            num_blocks: 4,
            attention,
        }
    }

    #[test]
    fn llama_chunk_metadata_packs_as_lmcache_does() {
        // struct.pack("iiiiiii", 33554432, 1, 3, 2, 32, 256, 1024) in Python.
        let s = spec(KvDtype::Bf16, AttentionKind::Mha);
        let m = RemoteMetadata::for_chunk(&s, 256, s.chunk_bytes(256)).unwrap();
        let expected: Vec<u8> = [33_554_432i32, 1, 3, 2, 32, 256, 1024]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(m.encode().as_slice(), expected.as_slice());
        assert_eq!(RemoteMetadata::decode(&m.encode()), Ok(m));
    }

    #[test]
    fn mla_and_partial_chunks() {
        let s = spec(KvDtype::F16, AttentionKind::Mla);
        let m = RemoteMetadata::for_chunk(&s, 17, s.chunk_bytes(17)).unwrap();
        assert_eq!((m.fmt, m.dtype, m.shape), (FMT_KV_MLA, 2, [1, 32, 17, 576]));
        // LMCache's other float16 code is the same dtype.
        let half = RemoteMetadata { dtype: 1, ..m };
        assert!(half.matches(&m));
        assert!(!RemoteMetadata {
            shape: [1, 32, 16, 576],
            ..m
        }
        .matches(&m));
        assert!(!RemoteMetadata { dtype: 3, ..m }.matches(&m));
    }

    #[test]
    fn bad_lengths_and_oversized_chunks_are_errors() {
        assert_eq!(
            RemoteMetadata::decode(&[0; 48]),
            Err(MetadataError::Length(48))
        );
        let s = spec(KvDtype::F32, AttentionKind::Mha);
        assert_eq!(
            RemoteMetadata::for_chunk(&s, 1, 1 << 31),
            Err(MetadataError::TooLarge(1 << 31))
        );
    }

    #[test]
    fn every_dtype_has_a_distinct_code() {
        let mut codes: Vec<i32> = KvDtype::ALL
            .iter()
            .map(|&d| lmcache_dtype_code(d))
            .collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), KvDtype::ALL.len());
    }
}

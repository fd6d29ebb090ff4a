//! Element types a KV cache can hold, with the names LMCache and vLLM give them.

use std::fmt;
use std::str::FromStr;

/// The element type of a KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvDtype {
    F16,
    Bf16,
    F32,
    Fp8E4m3,
    Fp8E5m2,
    Int8,
}

/// A dtype name that kvrelay does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown KV dtype {0:?}: expected one of half, float16, bfloat16, float, float32, fp8_e4m3fn, fp8_e5m2, int8")]
pub struct UnknownDtype(pub String);

impl KvDtype {
    pub const ALL: [KvDtype; 6] = [
        KvDtype::F16,
        KvDtype::Bf16,
        KvDtype::F32,
        KvDtype::Fp8E4m3,
        KvDtype::Fp8E5m2,
        KvDtype::Int8,
    ];

    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            KvDtype::F16 | KvDtype::Bf16 => 2,
            KvDtype::F32 => 4,
            KvDtype::Fp8E4m3 | KvDtype::Fp8E5m2 | KvDtype::Int8 => 1,
        }
    }

    /// The name LMCache prints in a `CacheEngineKey` string (`torch.float16` prints as `half`).
    pub const fn lmcache_name(self) -> &'static str {
        match self {
            KvDtype::F16 => "half",
            KvDtype::Bf16 => "bfloat16",
            KvDtype::F32 => "float",
            KvDtype::Fp8E4m3 => "fp8_e4m3fn",
            KvDtype::Fp8E5m2 => "fp8_e5m2",
            KvDtype::Int8 => "int8",
        }
    }

    /// A stable one-byte code, used in on-disk headers and fingerprints.
    pub const fn code(self) -> u8 {
        match self {
            KvDtype::F16 => 1,
            KvDtype::Bf16 => 2,
            KvDtype::F32 => 3,
            KvDtype::Fp8E4m3 => 4,
            KvDtype::Fp8E5m2 => 5,
            KvDtype::Int8 => 6,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.lmcache_name())
    }
}

impl FromStr for KvDtype {
    type Err = UnknownDtype;

    /// Accepts LMCache's key names and the common aliases (`float16`, `bf16`, `fp16`, `float32`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "half" | "float16" | "fp16" | "f16" => KvDtype::F16,
            "bfloat16" | "bf16" => KvDtype::Bf16,
            "float" | "float32" | "fp32" | "f32" => KvDtype::F32,
            "fp8_e4m3fn" | "fp8_e4m3" | "fp8" => KvDtype::Fp8E4m3,
            "fp8_e5m2" => KvDtype::Fp8E5m2,
            "int8" => KvDtype::Int8,
            other => return Err(UnknownDtype(other.to_string())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for dtype in KvDtype::ALL {
            assert_eq!(dtype.lmcache_name().parse::<KvDtype>(), Ok(dtype));
        }
        assert_eq!("float16".parse::<KvDtype>(), Ok(KvDtype::F16));
        assert!("complex64".parse::<KvDtype>().is_err());
    }
}

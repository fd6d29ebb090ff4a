//! vLLM's `--kv-transfer-config` JSON (`KVTransferConfig`), fields of vLLM 0.11 and 0.33.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;

use serde_json::{Map, Value};

use super::limits::check_document;
use super::lmcache::check_key_name;
use super::value::{ConfigValue, Raw};
use super::{did_you_mean, nearest, ConfigError, LmcacheConfig};

const ORIGIN: &str = "kv-transfer-config";
const EXTRA_ORIGIN: &str = "kv-transfer-config kv_connector_extra_config";

/// Top-level keys of vLLM's `KVTransferConfig` (0.11 and 0.33 together).
const KV_TRANSFER_KEYS: &[&str] = &[
    "kv_connector",
    "engine_id",
    "kv_role",
    "kv_connector_module_path",
    "kv_connector_extra_config",
    "kv_buffer_device",
    "kv_buffer_size",
    "kv_rank",
    "kv_parallel_size",
    "kv_ip",
    "kv_port",
    "kv_load_failure_policy",
    "enable_permute_local_kv",
];

/// `kv_connector_extra_config` keys a kvrelay connector reads, besides `lmcache.<key>`
/// overrides of LMCache config keys.
pub const CONNECTOR_EXTRA_KEYS: &[&str] = &[
    "shared_storage_path",
    "discard_partial_chunks",
    "skip_last_n_tokens",
    "lmcache_rpc_port",
    "lmcache.max_tokens_per_load",
    "use_native",
    "use_layerwise",
];

/// `kv_connector` names and what kvrelay runs for them (`None`: known, not implemented).
const CONNECTORS: &[(&str, Option<ConnectorKind>)] = &[
    ("SharedStorageConnector", Some(ConnectorKind::SharedStorage)),
    // vLLM 0.33's name for SharedStorageConnector.
    ("ExampleConnector", Some(ConnectorKind::SharedStorage)),
    // vllm-rbln's host fallback: an ExampleConnector with a device-aware load.
    ("RBLNHostConnector", Some(ConnectorKind::SharedStorage)),
    ("LMCacheConnectorV1", Some(ConnectorKind::Lmcache)),
    // vllm-rbln's alias, normalized to LMCacheConnectorV1.
    ("LMCacheConnector", Some(ConnectorKind::Lmcache)),
    // The class names used with kv_connector_module_path (LMCache, vllm-rbln strict mode,
    // LMCache-Ascend); all speak LMCache's protocol and config.
    ("LMCacheConnectorV1Dynamic", Some(ConnectorKind::Lmcache)),
    ("RBLNLMCacheConnectorV1", Some(ConnectorKind::Lmcache)),
    (
        "LMCacheAscendConnectorV1Dynamic",
        Some(ConnectorKind::Lmcache),
    ),
    // kvrelay's own vLLM connector class (`kv_connector_module_path: kvrelay.vllm`), which
    // speaks LMCache's protocol and config.
    ("KvrelayConnector", Some(ConnectorKind::Lmcache)),
    // LMCache as a separate server process, reached over ZMQ with CUDA-IPC handles.
    ("LMCacheMPConnector", None),
    ("NixlConnector", None),
    ("P2pNcclConnector", None),
    ("MultiConnector", None),
    ("OffloadingConnector", None),
];

/// vLLM's `kv_role`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvRole {
    Producer,
    Consumer,
    Both,
}

impl KvRole {
    pub const fn as_str(self) -> &'static str {
        match self {
            KvRole::Producer => "kv_producer",
            KvRole::Consumer => "kv_consumer",
            KvRole::Both => "kv_both",
        }
    }

    /// Saves KV (vLLM's `is_kv_producer`).
    pub const fn is_producer(self) -> bool {
        matches!(self, KvRole::Producer | KvRole::Both)
    }

    /// Loads KV (vLLM's `is_kv_consumer`).
    pub const fn is_consumer(self) -> bool {
        matches!(self, KvRole::Consumer | KvRole::Both)
    }
}

impl fmt::Display for KvRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ConfigValue for KvRole {
    fn expected() -> String {
        "\"kv_producer\", \"kv_consumer\" or \"kv_both\"".into()
    }
    fn from_text(s: &str) -> Option<Self> {
        [KvRole::Producer, KvRole::Consumer, KvRole::Both]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// What vLLM does with blocks whose KV failed to load (`kv_load_failure_policy`, 0.33).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvLoadFailurePolicy {
    /// Recompute the missing blocks.
    Recompute,
    /// Fail the request.
    #[default]
    Fail,
}

impl ConfigValue for KvLoadFailurePolicy {
    fn expected() -> String {
        "\"recompute\" or \"fail\"".into()
    }
    fn from_text(s: &str) -> Option<Self> {
        match s {
            "recompute" => Some(KvLoadFailurePolicy::Recompute),
            "fail" => Some(KvLoadFailurePolicy::Fail),
            _ => None,
        }
    }
}

/// The kvrelay connector a `kv_connector` name selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnectorKind {
    /// vLLM's SharedStorageConnector/ExampleConnector file format.
    SharedStorage,
    /// LMCache's chunked store and PD protocol.
    Lmcache,
}

/// The typed `kv_connector_extra_config` (see [`CONNECTOR_EXTRA_KEYS`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ConnectorExtraConfig {
    /// SharedStorage directory (vLLM's default `/tmp`).
    pub shared_storage_path: PathBuf,
    /// Save only whole chunks, even at the end of a prefill (LMCache adapter).
    pub discard_partial_chunks: bool,
    /// Drop this many trailing tokens before a lookup (a PD decoder uses 1).
    pub skip_last_n_tokens: usize,
    /// LMCache lookup-socket suffix; unique per instance on a host. Integers become text.
    pub lmcache_rpc_port: Option<String>,
    /// `lmcache.max_tokens_per_load`: cap on tokens loaded per request (0 = no cap).
    pub max_tokens_per_load: usize,
    /// `lmcache.<key>` entries, as written, for [`LmcacheConfig::apply_extra_config_overrides`].
    pub lmcache_overrides: Map<String, Value>,
}

impl Default for ConnectorExtraConfig {
    fn default() -> Self {
        Self {
            shared_storage_path: PathBuf::from("/tmp"),
            discard_partial_chunks: false,
            skip_last_n_tokens: 0,
            lmcache_rpc_port: None,
            max_tokens_per_load: 0,
            lmcache_overrides: Map::new(),
        }
    }
}

/// vLLM's `KVTransferConfig`.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct KvTransferConfig {
    /// Connector name (a class name when `kv_connector_module_path` is set).
    pub kv_connector: Option<String>,
    /// Engine identity; vLLM generates a uuid4 when absent, see
    /// [`KvTransferConfig::engine_id_or_generate`].
    pub engine_id: Option<String>,
    /// Required when `kv_connector` is set.
    pub kv_role: Option<KvRole>,
    pub kv_connector_module_path: Option<String>,
    pub kv_connector_extra_config: ConnectorExtraConfig,
    /// `None`: the platform's device (0.33); vLLM 0.11 defaults to `cuda`.
    pub kv_buffer_device: Option<String>,
    /// Bytes; vLLM 0.11 only (default 1e9 there), removed in 0.33.
    pub kv_buffer_size: Option<f64>,
    /// vLLM 0.11 only: 0 = prefill, 1 = decode.
    pub kv_rank: Option<i64>,
    /// vLLM 0.11 only.
    pub kv_parallel_size: u32,
    /// vLLM 0.11 only.
    pub kv_ip: String,
    pub kv_port: u16,
    /// 0.33's field and default (`fail`). vLLM 0.11 has no such field and recomputes
    /// blocks that failed to load; set `recompute` to keep that behaviour.
    pub kv_load_failure_policy: KvLoadFailurePolicy,
    /// Permute HND↔NHD on transfer (0.33).
    pub enable_permute_local_kv: bool,
}

impl Default for KvTransferConfig {
    fn default() -> Self {
        Self {
            kv_connector: None,
            engine_id: None,
            kv_role: None,
            kv_connector_module_path: None,
            kv_connector_extra_config: ConnectorExtraConfig::default(),
            kv_buffer_device: None,
            kv_buffer_size: None,
            kv_rank: None,
            kv_parallel_size: 1,
            kv_ip: "127.0.0.1".to_string(),
            kv_port: 14579,
            kv_load_failure_policy: KvLoadFailurePolicy::Fail,
            enable_permute_local_kv: false,
        }
    }
}

/// Converts one JSON value to a key's type, or says which key and type were wrong.
fn convert<T: ConfigValue>(origin: &str, key: &str, value: &Value) -> Result<T, ConfigError> {
    T::from_raw(Raw::Json(value)).ok_or_else(|| ConfigError::BadValue {
        origin: origin.to_string(),
        key: key.to_string(),
        value: value.to_string(),
        expected: T::expected(),
    })
}

impl KvTransferConfig {
    /// Parses the `--kv-transfer-config` argument.
    pub fn from_json_str(json: &str) -> Result<Self, ConfigError> {
        check_document(json, ORIGIN)?;
        let value: Value = serde_json::from_str(json).map_err(|e| ConfigError::Parse {
            origin: ORIGIN.to_string(),
            message: e.to_string(),
        })?;
        Self::from_json_value(&value)
    }

    /// Builds the config from an already-parsed JSON object.
    pub fn from_json_value(value: &Value) -> Result<Self, ConfigError> {
        let Value::Object(map) = value else {
            return Err(ConfigError::Parse {
                origin: ORIGIN.to_string(),
                message: format!("expected a JSON object, found {value}"),
            });
        };
        let mut cfg = Self::default();
        for (key, v) in map {
            let k = key.as_str();
            match k {
                "kv_connector" => cfg.kv_connector = convert(ORIGIN, k, v)?,
                "engine_id" => cfg.engine_id = convert(ORIGIN, k, v)?,
                "kv_role" => cfg.kv_role = convert(ORIGIN, k, v)?,
                "kv_connector_module_path" => cfg.kv_connector_module_path = convert(ORIGIN, k, v)?,
                "kv_connector_extra_config" => {
                    let extra: Option<Map<String, Value>> = convert(ORIGIN, k, v)?;
                    cfg.kv_connector_extra_config =
                        ConnectorExtraConfig::from_map(&extra.unwrap_or_default())?;
                }
                "kv_buffer_device" => cfg.kv_buffer_device = convert(ORIGIN, k, v)?,
                "kv_buffer_size" => cfg.kv_buffer_size = convert(ORIGIN, k, v)?,
                "kv_rank" => cfg.kv_rank = convert(ORIGIN, k, v)?,
                "kv_parallel_size" => cfg.kv_parallel_size = convert(ORIGIN, k, v)?,
                "kv_ip" => cfg.kv_ip = convert(ORIGIN, k, v)?,
                "kv_port" => cfg.kv_port = convert(ORIGIN, k, v)?,
                "kv_load_failure_policy" => cfg.kv_load_failure_policy = convert(ORIGIN, k, v)?,
                "enable_permute_local_kv" => cfg.enable_permute_local_kv = convert(ORIGIN, k, v)?,
                _ => {
                    return Err(ConfigError::UnknownKey {
                        origin: ORIGIN.to_string(),
                        what: "kv-transfer-config key",
                        key: key.clone(),
                        suggestion: nearest(k, KV_TRANSFER_KEYS.iter().copied()),
                    })
                }
            }
        }
        if cfg.kv_connector.is_some() && cfg.kv_role.is_none() {
            // vLLM raises the same ValueError.
            return Err(ConfigError::Invalid {
                reason: "kv_role is required when kv_connector is set: one of kv_producer, kv_consumer, kv_both".into(),
            });
        }
        Ok(cfg)
    }

    /// The kvrelay connector `kv_connector` selects.
    pub fn connector_kind(&self) -> Result<ConnectorKind, ConfigError> {
        let Some(name) = self.kv_connector.as_deref() else {
            return Err(ConfigError::Invalid {
                reason: "no kv_connector is set".into(),
            });
        };
        let implemented = || {
            CONNECTORS
                .iter()
                .filter(|(_, kind)| kind.is_some())
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match CONNECTORS.iter().find(|(n, _)| *n == name) {
            Some((_, Some(kind))) => Ok(*kind),
            Some((_, None)) => Err(ConfigError::UnsupportedValue {
                key: "kv_connector".into(),
                value: format!("{name:?}"),
                reason: format!("kvrelay implements {}", implemented()),
            }),
            None => Err(ConfigError::BadValue {
                origin: ORIGIN.to_string(),
                key: "kv_connector".into(),
                value: format!("{name:?}"),
                expected: format!(
                    "one of {}{}",
                    implemented(),
                    did_you_mean(&nearest(name, CONNECTORS.iter().map(|(n, _)| *n)))
                ),
            }),
        }
    }

    /// Whether this engine saves KV (vLLM's `is_kv_producer`).
    pub fn is_producer(&self) -> bool {
        self.kv_role.is_some_and(KvRole::is_producer)
    }

    /// Whether this engine loads KV (vLLM's `is_kv_consumer`).
    pub fn is_consumer(&self) -> bool {
        self.kv_role.is_some_and(KvRole::is_consumer)
    }

    /// The engine id, generating (and keeping) a random uuid4-style one when absent, as
    /// vLLM's `__post_init__` does.
    pub fn engine_id_or_generate(&mut self) -> &str {
        self.engine_id.get_or_insert_with(random_uuid)
    }

    /// Applies this config's `lmcache.<key>` extra-config overrides to `lmcache`.
    pub fn apply_lmcache_overrides(&self, lmcache: &mut LmcacheConfig) -> Result<(), ConfigError> {
        lmcache.apply_extra_config_overrides(&self.kv_connector_extra_config.lmcache_overrides)
    }
}

impl ConnectorExtraConfig {
    fn from_map(map: &Map<String, Value>) -> Result<Self, ConfigError> {
        let mut extra = Self::default();
        for (key, v) in map {
            let k = key.as_str();
            match k {
                "shared_storage_path" => {
                    extra.shared_storage_path =
                        PathBuf::from(convert::<String>(EXTRA_ORIGIN, k, v)?)
                }
                "discard_partial_chunks" => {
                    extra.discard_partial_chunks = convert(EXTRA_ORIGIN, k, v)?
                }
                "skip_last_n_tokens" => extra.skip_last_n_tokens = convert(EXTRA_ORIGIN, k, v)?,
                "lmcache_rpc_port" => {
                    // LMCache formats it into a socket path, so "producer1" and 5 both work.
                    extra.lmcache_rpc_port = Some(match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) if n.is_u64() => n.to_string(),
                        _ => {
                            return Err(ConfigError::BadValue {
                                origin: EXTRA_ORIGIN.into(),
                                key: key.clone(),
                                value: v.to_string(),
                                expected: format!("a string or {}", u64::expected()),
                            })
                        }
                    })
                }
                "lmcache.max_tokens_per_load" => {
                    extra.max_tokens_per_load = convert(EXTRA_ORIGIN, k, v)?
                }
                // Picks which Python copy of LMCache vLLM imports; meaningless for kvrelay.
                "use_native" => {
                    convert::<bool>(EXTRA_ORIGIN, k, v)?;
                }
                "use_layerwise" => {
                    if convert::<bool>(EXTRA_ORIGIN, k, v)? {
                        return Err(ConfigError::UnsupportedValue {
                            key: key.clone(),
                            value: v.to_string(),
                            reason: "kvrelay stores and loads whole requests, not layer by layer"
                                .into(),
                        });
                    }
                }
                _ => match k.strip_prefix("lmcache.") {
                    // Checked by name here so a typo fails at startup; values are checked
                    // when applied to the LMCache config.
                    Some(lm_key) => match check_key_name(lm_key) {
                        Ok(()) => {
                            extra.lmcache_overrides.insert(key.clone(), v.clone());
                        }
                        Err(suggestion) => {
                            return Err(ConfigError::UnknownKey {
                                origin: EXTRA_ORIGIN.into(),
                                what: "LMCache config key",
                                key: key.clone(),
                                suggestion: suggestion.map(|s| format!("lmcache.{s}")),
                            })
                        }
                    },
                    None => {
                        return Err(ConfigError::UnknownKey {
                            origin: EXTRA_ORIGIN.into(),
                            what: "kv_connector_extra_config key",
                            key: key.clone(),
                            suggestion: nearest(k, CONNECTOR_EXTRA_KEYS.iter().copied()),
                        })
                    }
                },
            }
        }
        Ok(extra)
    }
}

/// A random RFC 4122 version-4 id, like vLLM's `uuid4()`.
///
/// std's `RandomState` is seeded from the OS random source (and differs per instance),
/// which is enough for an identity and avoids a `rand` dependency.
fn random_uuid() -> String {
    let word = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write_u128(now);
        h.write_u32(std::process::id());
        h.write_u64(salt);
        h.finish()
    };
    let mut b = (u128::from(word(0)) << 64) | u128::from(word(1));
    b = (b & !(0xf << 76)) | (0x4 << 76); // version 4
    b = (b & !(0x3 << 62)) | (0x2 << 62); // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        b >> 96,
        (b >> 80) & 0xffff,
        (b >> 64) & 0xffff,
        (b >> 48) & 0xffff,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_listed_top_level_key_is_parsed() {
        for key in KV_TRANSFER_KEYS {
            let err = KvTransferConfig::from_json_value(&json!({ *key: [] }));
            assert!(
                !matches!(err, Err(ConfigError::UnknownKey { .. })),
                "{key} is listed but not parsed"
            );
        }
    }

    #[test]
    fn every_listed_extra_key_is_parsed() {
        for key in CONNECTOR_EXTRA_KEYS {
            let mut m = Map::new();
            m.insert(key.to_string(), json!([]));
            let err = ConnectorExtraConfig::from_map(&m);
            assert!(
                !matches!(err, Err(ConfigError::UnknownKey { .. })),
                "{key} is listed but not parsed"
            );
        }
    }

    #[test]
    fn generated_ids_are_uuid4_shaped_and_distinct() {
        let (a, b) = (random_uuid(), random_uuid());
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }
}

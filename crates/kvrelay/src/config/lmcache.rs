//! LMCache's engine configuration (`lmcache/v1/config.py`, 0.5.6): the YAML file named by
//! `LMCACHE_CONFIG_FILE`, `LMCACHE_<KEY>` env overrides and `lmcache.<key>` overrides from
//! vLLM's `kv_connector_extra_config`.
//!
//! Keys kvrelay implements are fields of [`LmcacheConfig`]. The remaining LMCache keys are
//! accepted only at their LMCache default, so whole LMCache files can be reused; anything
//! else is an error (see [`ConfigError`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::limits::{check_document, read_document};
use super::value::{parse_yaml, ConfigValue, Raw, SecretString};
use super::vllm::CONNECTOR_EXTRA_KEYS;
use super::{nearest, ConfigError};
use crate::keys::{BuiltinHash, CpythonVersion, HashAlgorithm};

/// `pre_caching_hash_algorithm` values kvrelay can compute.
pub const HASH_ALGORITHMS: &[&str] = &["sha256_cbor", "sha256_cbor_64bit", "builtin", "xxh3_128"];

/// `transfer_channel` values: LMCache's (`nixl`, `mock_memory`), LMCache-Ascend's, and
/// kvrelay's own host transports `tcp` (any host) and `shm` (same host).
pub const TRANSFER_CHANNELS: &[&str] = &[
    "nixl",
    "mock_memory",
    "hccl",
    "hcomm_onesided",
    "hixl",
    "tcp",
    "shm",
];

/// Keys kvrelay adds to LMCache's schema (LMCache itself would warn and ignore them).
pub const KVRELAY_KEYS: &[&str] = &[
    "pd_shared_secret",
    "pd_buffer_ttl_sec",
    "pre_caching_hash_cpython",
    "pre_caching_hash_with_vllm",
];

/// Eviction policies kvrelay implements (LMCache also has LFU, FIFO and MRU).
const CACHE_POLICIES: &[&str] = &["LRU"];

/// `LMCACHE_*` variables LMCache reads outside the schema; accepted and not interpreted here.
const ENV_ONLY: &[&str] = &[
    "LMCACHE_CONFIG_FILE",
    "LMCACHE_LOG_LEVEL",
    "LMCACHE_FORCE_SKIP_SAVE",
    "LMCACHE_USE_EXPERIMENTAL",
];

/// Encoder-cache configs are a separate LMCache schema under this env prefix.
const ENCODER_CACHE_ENV_PREFIX: &str = "LMCACHE_EC_";

const ENV_PREFIX: &str = "LMCACHE_";
/// The `extra_config` key of LMCache's MLA rule (keys with world size 1, rank 0 saves).
const SAVE_ONLY_FIRST_RANK: &str = "save_only_first_rank";
const EXTRA_PREFIX: &str = "lmcache.";

/// The role of this engine in PD disaggregation (`pd_role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PdRole {
    /// The prefiller: pushes KV to the decoder.
    Sender,
    /// The decoder: allocates buffer space and receives KV.
    Receiver,
}

impl PdRole {
    pub const fn as_str(self) -> &'static str {
        match self {
            PdRole::Sender => "sender",
            PdRole::Receiver => "receiver",
        }
    }
}

impl fmt::Display for PdRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// LMCache's sync PD backend also has "both"; kvrelay implements the async protocol, which
// accepts only sender and receiver.
impl ConfigValue for PdRole {
    fn expected() -> String {
        "\"sender\" or \"receiver\"".into()
    }
    fn from_text(s: &str) -> Option<Self> {
        match s.trim() {
            "sender" => Some(PdRole::Sender),
            "receiver" => Some(PdRole::Receiver),
            _ => None,
        }
    }
}

/// How a PD sender moves a request's KV (`pd_backend_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PdBackendMode {
    /// LMCache's default: the engine hands the gathered chunks to a sender thread and goes
    /// on; a failed send reaches the proxy as a failure notification.
    Async,
    /// The engine's save step sends the request and waits for the receiver's verdict, so a
    /// failure fails the prefill request itself.
    Sync,
}

impl ConfigValue for PdBackendMode {
    fn expected() -> String {
        "\"async\" or \"sync\"".into()
    }
    fn from_text(s: &str) -> Option<Self> {
        match s.trim() {
            "async" => Some(PdBackendMode::Async),
            "sync" => Some(PdBackendMode::Sync),
            _ => None,
        }
    }
}

impl ConfigValue for CpythonVersion {
    fn expected() -> String {
        "\"3.10\" (LMCache ran on CPython 3.8 to 3.10) or \"3.11\" (3.11 and later), in quotes: YAML reads an unquoted 3.10 as the number 3.1".into()
    }
    fn from_text(s: &str) -> Option<Self> {
        CpythonVersion::parse(s)
    }
}

/// Declares the supported keys once: the struct fields, their defaults, the key list and
/// the setter that converts a raw value to the field's type.
macro_rules! lmcache_schema {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr, )*) => {
        /// The LMCache keys kvrelay implements, with LMCache's names, types and defaults
        /// (except where a field says otherwise). Sizes are GB except `pd_buffer_size`
        /// (bytes), as in LMCache.
        #[derive(Clone, Debug, PartialEq)]
        #[non_exhaustive]
        pub struct LmcacheConfig {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        impl Default for LmcacheConfig {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// The keys of [`LmcacheConfig`], in LMCache's schema order.
        const SUPPORTED: &[&str] = &[$( stringify!($name), )*];

        impl LmcacheConfig {
            /// Converts `raw` into the field named `key`. `Ok(false)`: not a supported key.
            /// `Err(expected)`: the value does not convert; `expected` names the type.
            fn set_field(&mut self, key: &str, raw: Raw<'_>) -> Result<bool, String> {
                match key {
                    $( stringify!($name) => {
                        self.$name = <$ty as ConfigValue>::from_raw(raw)
                            .ok_or_else(<$ty as ConfigValue>::expected)?;
                    } )*
                    _ => return Ok(false),
                }
                Ok(true)
            }
        }
    };
}

lmcache_schema! {
    /// Tokens per chunk: the unit of hashing, storage and transfer.
    chunk_size: usize = 256,
    /// Keep an in-memory (pinned host) tier.
    local_cpu: bool = true,
    /// Size of the in-memory tier, GB.
    max_local_cpu_size: f64 = 5.0,
    /// Disk tier directory, `"file:///path/"` or a plain path; see [`LmcacheConfig::local_disk_path`].
    local_disk: Option<String> = None,
    /// Size of the disk tier, GB. The disk tier needs both this and `local_disk`.
    max_local_disk_size: f64 = 0.0,
    /// Remote tier URL (e.g. `redis://host:port`); one of [`super::REMOTE_SCHEMES`].
    remote_url: Option<String> = None,
    /// Also store KV produced during decode, at chunk boundaries.
    save_decode_cache: bool = false,
    /// Chunk-hash algorithm, one of [`HASH_ALGORITHMS`]. kvrelay defaults to `sha256_cbor`,
    /// which needs no `PYTHONHASHSEED`; LMCache's default is `builtin` (CPython's `hash()`),
    /// which kvrelay reproduces given the next two keys and `PYTHONHASHSEED`.
    pre_caching_hash_algorithm: String = "sha256_cbor".to_string(),
    /// kvrelay extension, for `builtin`: the CPython the LMCache engines run on, `"3.10"`
    /// (3.8 to 3.10) or `"3.11"` (3.11 and later); it decides `NONE_HASH`.
    pre_caching_hash_cpython: CpythonVersion = CpythonVersion::Py311,
    /// kvrelay extension, for `builtin`: whether vLLM is importable in the LMCache engines'
    /// processes (it is when LMCache runs inside vLLM). Then `NONE_HASH` is
    /// `hash($PYTHONHASHSEED)`; without vLLM it is 0.
    pre_caching_hash_with_vllm: bool = true,
    /// Instance id; LMCache generates one when unset.
    lmcache_instance_id: Option<String> = None,
    /// Use PD disaggregation.
    enable_pd: bool = false,
    /// `sender` (prefiller) or `receiver` (decoder); required with `enable_pd`.
    pd_role: Option<PdRole> = None,
    /// PD transfer buffer size, **bytes**.
    pd_buffer_size: Option<u64> = None,
    /// PD transfer buffer device (`cuda`, `cpu`, `npu`, …); the index is the TP rank.
    pd_buffer_device: Option<String> = None,
    /// Peer host: the decoder binds it, the prefiller connects to it.
    pd_peer_host: Option<String> = None,
    /// Handshake ports, one per TP rank (a scalar is a one-element list).
    pd_peer_init_port: Option<Vec<u16>> = None,
    /// Allocation ports, one per TP rank (a scalar is a one-element list).
    pd_peer_alloc_port: Option<Vec<u16>> = None,
    /// Proxy host the sender notifies when a request's KV has arrived.
    pd_proxy_host: Option<String> = None,
    /// Proxy port the sender notifies.
    pd_proxy_port: Option<u16> = None,
    /// Seconds to keep retrying a remote buffer allocation. LMCache's default is infinity;
    /// kvrelay bounds every wait, so its default is 30 s (`inf` can still be set).
    pd_allocation_timeout_sec: f64 = 30.0,
    /// `async` (default): a sender thread moves each request's KV while the engine goes on;
    /// `sync`: the save step waits for the transfer.
    pd_backend_mode: PdBackendMode = PdBackendMode::Async,
    /// If > 0, the PD buffer must hold a prefill of this many tokens (checked at startup).
    pd_max_prefill_len: u64 = 0,
    /// PD transport, one of [`TRANSFER_CHANNELS`].
    transfer_channel: Option<String> = None,
    /// NIXL backends for the `nixl` channel, e.g. `[UCX]`.
    nixl_backends: Option<Vec<String>> = None,
    /// Free-form extra settings.
    extra_config: Option<Map<String, Value>> = None,
    /// Store the trailing partial chunk too. Forced on with `enable_pd`, as in LMCache.
    save_unfull_chunk: bool = false,
    /// Timeout of a blocking remote get, seconds; kvrelay's Redis tier bounds every read
    /// and write with it.
    blocking_timeout_secs: u64 = 10,
    /// kvrelay extension: a shared secret that PD peers prove with HMAC-SHA256 during the
    /// handshake (both sides must set the same value; unset on both = no authentication).
    /// It authenticates peers; it does not encrypt the KV bytes.
    pd_shared_secret: Option<SecretString> = None,
    /// kvrelay extension: seconds a receiver keeps KV that arrived but was never consumed
    /// (e.g. the client went away after prefill) before freeing its pages.
    pd_buffer_ttl_sec: f64 = 300.0,
    /// Eviction policy; kvrelay implements `LRU`.
    cache_policy: String = "LRU".to_string(),
    /// Timeout of a lookup, milliseconds.
    lookup_timeout_ms: u64 = 3000,
    /// Skip a retrieve that would load fewer tokens than this (0 = never skip).
    min_retrieve_tokens: u64 = 0,
    /// Load KV in the background; the engine keeps serving other requests meanwhile.
    enable_async_loading: bool = false,
}

/// An LMCache default, for a key kvrelay does not implement.
#[derive(Clone, Copy, Debug)]
enum LmDefault {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(&'static str),
}

use LmDefault::{Bool, Float, Int, Null, Str};

impl LmDefault {
    fn matches(self, raw: Raw<'_>) -> bool {
        match self {
            Null => matches!(raw, Raw::Json(Value::Null)),
            Bool(b) => bool::from_raw(raw) == Some(b),
            Int(i) => i64::from_raw(raw) == Some(i),
            Float(f) => f64::from_raw(raw) == Some(f),
            Str(s) => String::from_raw(raw).as_deref() == Some(s),
        }
    }
}

impl fmt::Display for LmDefault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Null => f.write_str("null"),
            Bool(b) => write!(f, "{b}"),
            Int(i) => write!(f, "{i}"),
            Float(x) => write!(f, "{x:?}"),
            Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// The other LMCache 0.5.6 schema keys and their defaults (§5.2 of the reference).
const UNSUPPORTED: &[(&str, LmDefault)] = &[
    ("local_cpu_use_hugepages", Bool(false)),
    ("reserve_local_cpu_size", Float(0.0)),
    ("local_disk_path_sharding", Str("by_gpu")),
    ("remote_serde", Str("naive")),
    ("use_layerwise", Bool(false)),
    ("enable_blending", Bool(false)),
    ("blend_recompute_ratios", Null),
    ("blend_thresholds", Null),
    ("blend_check_layers", Null),
    ("blend_min_tokens", Int(256)),
    ("blend_special_str", Str(" # # ")),
    ("retrieve_locations", Null),
    ("store_location", Null),
    ("enable_p2p", Bool(false)),
    ("p2p_host", Null),
    ("p2p_init_ports", Null),
    ("p2p_lookup_ports", Null),
    ("mp_host", Null),
    ("mp_port", Int(5555)),
    ("enable_controller", Bool(false)),
    ("controller_pull_url", Null),
    ("controller_reply_url", Null),
    ("lmcache_worker_ports", Null),
    ("lmcache_worker_ids", Null),
    ("lmcache_worker_heartbeat_delay_time", Int(10)),
    ("lmcache_worker_heartbeat_time", Null),
    ("pd_peer_query_port", Null),
    ("pd_shutdown_timeout_sec", Float(5.0)),
    ("pd_condition_poll_interval_sec", Float(0.005)),
    ("pd_skip_proxy_notification", Bool(false)),
    ("pd_bidirectional", Bool(false)),
    ("nixl_buffer_size", Null),
    ("nixl_buffer_device", Null),
    ("gds_path", Null),
    ("gds_path_sharding", Str("by_gpu")),
    ("gds_buffer_size", Null),
    ("maru_path", Null),
    ("maru_pool_size", Float(4.0)),
    ("use_gds", Bool(true)),
    ("gds_backend", Str("cufile")),
    ("audit_actual_remote_url", Null),
    ("internal_api_server_host", Str("127.0.0.1")),
    ("external_lookup_client", Null),
    ("py_enable_gc", Bool(true)),
    ("numa_mode", Null),
    ("internal_api_server_enabled", Bool(false)),
    ("internal_api_server_port_start", Int(6999)),
    ("priority_limit", Null),
    ("internal_api_server_include_index_list", Null),
    ("internal_api_server_socket_path_prefix", Null),
    ("runtime_plugin_locations", Null),
    ("storage_plugins", Null),
    ("remote_storage_plugins", Null),
    ("hit_miss_ratio", Null),
    ("lookup_server_worker_ids", Null),
    ("enable_scheduler_bypass_lookup", Bool(false)),
    ("script_allowed_imports", Null),
    ("run_script_api_enabled", Bool(false)),
    ("enable_lazy_memory_allocator", Bool(false)),
    ("lazy_memory_initial_ratio", Float(0.2)),
    ("lazy_memory_expand_trigger_ratio", Float(0.5)),
    ("lazy_memory_step_ratio", Float(0.1)),
    ("lazy_memory_safe_size", Float(0.0)),
    ("enable_chunk_statistics", Bool(false)),
    ("chunk_statistics_auto_start_statistics", Bool(false)),
    ("chunk_statistics_auto_exit_timeout_hours", Float(0.0)),
    ("chunk_statistics_auto_exit_target_unique_chunks", Int(0)),
    ("chunk_statistics_strategy", Str("memory_bloom_filter")),
    ("enable_kv_events", Bool(false)),
    ("use_gpu_connector_v3", Bool(false)),
    ("pin_timeout_sec", Int(300)),
    ("pin_check_interval_sec", Int(30)),
    ("remote_config_url", Null),
    ("app_id", Null),
    ("enable_hidden_state_cache", Bool(false)),
    ("max_hidden_state_cpu_size", Float(2.0)),
    ("hidden_state_layers", Null),
    ("hidden_states_retrieve_mode", Str("prefix_strict")),
];

/// Legacy names and their replacements. LMCache 0.5.6 lists most of these in
/// `_CONFIG_ALIASES` but drops them with a warning (only keys in `_DEPRECATED_CONFIGS` are
/// resolved), so an old PD file silently runs without PD there.
const RENAMED: &[(&str, &str)] = &[
    ("enable_xpyd", "enable_pd"),
    ("enable_nixl", "enable_pd"),
    ("nixl_role", "pd_role"),
    ("nixl_peer_host", "pd_peer_host"),
    ("nixl_peer_init_port", "pd_peer_init_port"),
    ("nixl_peer_alloc_port", "pd_peer_alloc_port"),
    ("nixl_proxy_host", "pd_proxy_host"),
    ("nixl_proxy_port", "pd_proxy_port"),
    ("nixl_receiver_host", "pd_peer_host"),
    ("nixl_receiver_port", "pd_peer_init_port"),
    ("nixl_peer_port", "pd_peer_init_port"),
    ("controller_url", "controller_pull_url"),
    ("lmcache_worker_port", "lmcache_worker_ports"),
    ("plugin_locations", "runtime_plugin_locations"),
    ("external_backends", "storage_plugins"),
];

/// Where a value came from; decides how keys are spelled in errors.
#[derive(Clone, Copy)]
enum Origin<'a> {
    Yaml(&'a str),
    Env,
    ExtraConfig,
}

impl Origin<'_> {
    fn describe(&self) -> String {
        match self {
            Origin::Yaml(name) => (*name).to_string(),
            Origin::Env => "environment".to_string(),
            Origin::ExtraConfig => "kv_connector_extra_config".to_string(),
        }
    }

    /// A key as the user wrote it in this source.
    fn spell(&self, key: &str) -> String {
        match self {
            Origin::Yaml(_) => key.to_string(),
            Origin::Env => env_name(key),
            Origin::ExtraConfig => format!("{EXTRA_PREFIX}{key}"),
        }
    }

    fn what(&self) -> &'static str {
        match self {
            Origin::Env => "LMCache environment variable",
            _ => "LMCache config key",
        }
    }
}

fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase())
}

impl LmcacheConfig {
    /// Parses LMCache YAML text over the defaults and validates it. An empty document gives
    /// the defaults.
    pub fn from_yaml_str(yaml: &str) -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        cfg.apply_yaml(yaml, "LMCache YAML")?;
        cfg.finish()?;
        Ok(cfg)
    }

    /// Reads and validates an LMCache YAML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        cfg.apply_file(path.as_ref())?;
        cfg.finish()?;
        Ok(cfg)
    }

    /// Loads as LMCache does: the file named by `LMCACHE_CONFIG_FILE` (or the defaults),
    /// then every `LMCACHE_<KEY>` variable on top, then validation.
    pub fn load_from_env() -> Result<Self, ConfigError> {
        Self::load_with_env(std::env::vars())
    }

    /// [`LmcacheConfig::load_from_env`] over the given variables instead of the process
    /// environment. Variables without the `LMCACHE_` prefix are ignored.
    pub fn load_with_env(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut vars: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        // Sorted so that, with several bad variables, the same one is reported every time.
        vars.sort();
        let mut cfg = Self::default();
        if let Some((_, path)) = vars.iter().find(|(n, _)| n == "LMCACHE_CONFIG_FILE") {
            cfg.apply_file(Path::new(path))?;
        }
        for (name, value) in &vars {
            if ENV_ONLY.contains(&name.as_str()) || name.starts_with(ENCODER_CACHE_ENV_PREFIX) {
                continue;
            }
            let key = name[ENV_PREFIX.len()..].to_ascii_lowercase();
            cfg.apply(Origin::Env, &key, Raw::Text(value))?;
        }
        cfg.finish()?;
        Ok(cfg)
    }

    /// Applies vLLM `kv_connector_extra_config` overrides: each `"lmcache.<key>"` entry sets
    /// `<key>` (LMCache's `_apply_extra_config`), then the result is validated again. Other
    /// entries, and connector knobs such as `lmcache.max_tokens_per_load`, are left alone.
    pub fn apply_extra_config_overrides(
        &mut self,
        extra: &Map<String, Value>,
    ) -> Result<(), ConfigError> {
        for (name, value) in extra {
            let Some(key) = name.strip_prefix(EXTRA_PREFIX) else {
                continue;
            };
            if CONNECTOR_EXTRA_KEYS.contains(&name.as_str()) {
                continue;
            }
            self.apply(Origin::ExtraConfig, key, Raw::Json(value))?;
        }
        self.finish()
    }

    /// The chunk-hash algorithm `pre_caching_hash_algorithm` names, with the
    /// `pre_caching_hash_*` settings for `builtin`.
    pub fn hash_algorithm(&self) -> Result<HashAlgorithm, ConfigError> {
        let algorithm = self
            .pre_caching_hash_algorithm
            .parse::<HashAlgorithm>()
            .map_err(|e| ConfigError::UnsupportedValue {
                key: "pre_caching_hash_algorithm".into(),
                value: format!("{:?}", self.pre_caching_hash_algorithm),
                reason: e.to_string(),
            })?;
        Ok(match algorithm {
            HashAlgorithm::Builtin(_) => HashAlgorithm::Builtin(BuiltinHash {
                cpython: self.pre_caching_hash_cpython,
                with_vllm: self.pre_caching_hash_with_vllm,
            }),
            other => other,
        })
    }

    /// LMCache's `extra_config.save_only_first_rank` for a cache that is (`mla`) or is not
    /// MLA: on by default for MLA, whose KV every TP rank holds whole, and never without it
    /// (LMCache ignores it there too).
    pub fn save_only_first_rank(&self, mla: bool) -> Result<bool, ConfigError> {
        let value = self
            .extra_config
            .as_ref()
            .and_then(|e| e.get(SAVE_ONLY_FIRST_RANK));
        let on = match value {
            None => mla,
            Some(v) => bool::from_raw(Raw::Json(v)).ok_or_else(|| ConfigError::BadValue {
                origin: "LMCache extra_config".into(),
                key: SAVE_ONLY_FIRST_RANK.into(),
                value: v.to_string(),
                expected: bool::expected(),
            })?,
        };
        Ok(on && mla)
    }

    /// The disk tier directory: `local_disk` without its `file://` prefix.
    pub fn local_disk_path(&self) -> Option<PathBuf> {
        self.local_disk
            .as_deref()
            .map(|d| PathBuf::from(d.strip_prefix("file://").unwrap_or(d)))
    }

    /// Checks the settings against each other, as LMCache's `_validate_config` does for the
    /// features kvrelay implements.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| Err(ConfigError::Invalid { reason });
        if self.chunk_size == 0 {
            return invalid("chunk_size must be > 0".into());
        }
        for (key, gb) in [
            ("max_local_cpu_size", self.max_local_cpu_size),
            ("max_local_disk_size", self.max_local_disk_size),
        ] {
            if !(gb.is_finite() && gb >= 0.0) {
                return invalid(format!("{key} = {gb} must be a finite size >= 0 (GB)"));
            }
        }
        if let Some(disk) = &self.local_disk {
            let path = disk.strip_prefix("file://").unwrap_or(disk);
            if path.is_empty() || path.contains("://") {
                return Err(ConfigError::BadValue {
                    origin: "LMCache config".into(),
                    key: "local_disk".into(),
                    value: format!("{disk:?}"),
                    expected: "a directory, as \"file:///path/\" or a plain path".into(),
                });
            }
            if self.max_local_disk_size <= 0.0 {
                return invalid(format!(
                    "local_disk = {disk:?} needs max_local_disk_size > 0 (GB); LMCache would silently run without the disk tier"
                ));
            }
        }
        self.check_choice("cache_policy", &self.cache_policy, CACHE_POLICIES)?;
        self.check_choice(
            "pre_caching_hash_algorithm",
            &self.pre_caching_hash_algorithm,
            HASH_ALGORITHMS,
        )?;
        if let Some(channel) = &self.transfer_channel {
            self.check_choice("transfer_channel", channel, TRANSFER_CHANNELS)?;
        }
        if self.pd_allocation_timeout_sec.is_nan() || self.pd_allocation_timeout_sec <= 0.0 {
            return invalid(format!(
                "pd_allocation_timeout_sec = {} must be > 0",
                self.pd_allocation_timeout_sec
            ));
        }
        if !(self.pd_buffer_ttl_sec.is_finite() && self.pd_buffer_ttl_sec > 0.0) {
            return invalid(format!(
                "pd_buffer_ttl_sec = {} must be a finite number of seconds > 0",
                self.pd_buffer_ttl_sec
            ));
        }
        self.validate_remote()?;
        // Whether the cache is MLA is known only later; the value's type is checked now.
        self.save_only_first_rank(true)?;
        if self.enable_pd {
            self.validate_pd()?;
        }
        Ok(())
    }

    /// `enable_pd` requirements (LMCache's `_validate_config` and
    /// `PDConfig.from_cache_engine_config`).
    fn validate_pd(&self) -> Result<(), ConfigError> {
        let Some(role) = self.pd_role else {
            return missing("pd_role (sender or receiver)", "enable_pd");
        };
        if self.pd_buffer_size.unwrap_or(0) == 0 {
            return missing("pd_buffer_size (bytes, > 0)", "enable_pd");
        }
        if self.pd_buffer_device.is_none() {
            return missing("pd_buffer_device", "enable_pd");
        }
        if self.transfer_channel.is_none() {
            return missing("transfer_channel", "enable_pd");
        }
        match role {
            PdRole::Sender => {
                if self.pd_proxy_host.is_none() || self.pd_proxy_port.is_none() {
                    return missing("pd_proxy_host and pd_proxy_port", "pd_role sender");
                }
            }
            PdRole::Receiver => {
                if self.pd_peer_host.is_none() {
                    return missing("pd_peer_host", "pd_role receiver");
                }
                let init = self.pd_peer_init_port.as_deref().unwrap_or_default();
                let alloc = self.pd_peer_alloc_port.as_deref().unwrap_or_default();
                if init.is_empty() || alloc.is_empty() {
                    return missing(
                        "pd_peer_init_port and pd_peer_alloc_port",
                        "pd_role receiver",
                    );
                }
                // Both lists are indexed by TP rank.
                if init.len() != alloc.len() {
                    return Err(ConfigError::Invalid {
                        reason: format!(
                            "pd_peer_init_port has {} ports but pd_peer_alloc_port has {}; both need one port per TP rank",
                            init.len(),
                            alloc.len()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn check_choice(&self, key: &str, value: &str, allowed: &[&str]) -> Result<(), ConfigError> {
        if allowed.contains(&value) {
            return Ok(());
        }
        Err(ConfigError::BadValue {
            origin: "LMCache config".into(),
            key: key.into(),
            value: format!("{value:?}"),
            expected: format!("one of {}", allowed.join(", ")),
        })
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = read_document(path)?;
        self.apply_yaml(&text, &path.display().to_string())
    }

    fn apply_yaml(&mut self, yaml: &str, name: &str) -> Result<(), ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            origin: name.to_string(),
            message,
        };
        check_document(yaml, name)?;
        let map = match parse_yaml(yaml).map_err(|e| parse_err(e.to_string()))? {
            // An empty file (or one with only comments) is an empty config, as in LMCache.
            Value::Null => return Ok(()),
            Value::Object(map) => map,
            other => {
                return Err(parse_err(format!(
                    "expected a mapping of keys, found {other}"
                )))
            }
        };
        for (key, value) in &map {
            self.apply(Origin::Yaml(name), key, Raw::Json(value))?;
        }
        Ok(())
    }

    /// Routes one key to its field, or to the error that explains why it is refused.
    fn apply(&mut self, origin: Origin<'_>, key: &str, raw: Raw<'_>) -> Result<(), ConfigError> {
        match self.set_field(key, raw) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(expected) => {
                return Err(ConfigError::BadValue {
                    origin: origin.describe(),
                    key: origin.spell(key),
                    value: raw.display(),
                    expected,
                })
            }
        }
        if let Some((_, default)) = UNSUPPORTED.iter().find(|(k, _)| *k == key) {
            if default.matches(raw) {
                tracing::debug!(
                    key,
                    "LMCache key kvrelay does not implement, left at its default"
                );
                return Ok(());
            }
            return Err(ConfigError::UnsupportedKey {
                origin: origin.describe(),
                key: origin.spell(key),
                value: raw.display(),
                default: default.to_string(),
            });
        }
        if let Some((_, new)) = RENAMED.iter().find(|(old, _)| *old == key) {
            return Err(ConfigError::RenamedKey {
                origin: origin.describe(),
                old: origin.spell(key),
                new: origin.spell(new),
            });
        }
        Err(ConfigError::UnknownKey {
            origin: origin.describe(),
            what: origin.what(),
            key: origin.spell(key),
            suggestion: nearest(key, known_keys()).map(|k| origin.spell(&k)),
        })
    }

    /// LMCache's post-load adjustments, then validation.
    fn finish(&mut self) -> Result<(), ConfigError> {
        if self.enable_pd && !self.save_unfull_chunk {
            // PD ships every token of the prompt, so LMCache forces this on.
            tracing::info!("enable_pd forces save_unfull_chunk = true");
            self.save_unfull_chunk = true;
        }
        if self.local_disk.is_none() && self.max_local_disk_size > 0.0 {
            tracing::warn!("max_local_disk_size is set but local_disk is not: no disk tier");
        }
        self.validate()
    }
}

fn missing(what: &str, by: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        reason: format!("{by} requires {what}"),
    })
}

/// Every key LMCache's schema has, supported or not: the candidates for "did you mean".
fn known_keys() -> impl Iterator<Item = &'static str> {
    SUPPORTED
        .iter()
        .copied()
        .chain(UNSUPPORTED.iter().map(|(k, _)| *k))
}

/// Whether `key` is a key of LMCache's schema (supported or not), and if not, the nearest.
pub(crate) fn check_key_name(key: &str) -> Result<(), Option<String>> {
    if known_keys().any(|k| k == key) || RENAMED.iter().any(|(old, _)| *old == key) {
        return Ok(());
    }
    Err(nearest(key, known_keys()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_covers_lmcache_schema_once() {
        // 108 keys in LMCache 0.5.6's `_CONFIG_DEFINITIONS`, plus kvrelay's own.
        let all: Vec<&str> = known_keys().filter(|k| !KVRELAY_KEYS.contains(k)).collect();
        assert_eq!(all.len(), 108);
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len(), "a key is listed twice");
        for key in KVRELAY_KEYS {
            assert!(SUPPORTED.contains(key), "kvrelay key {key} is not a field");
        }
        for (old, new) in RENAMED {
            assert!(!all.contains(old), "{old} is both renamed and a schema key");
            assert!(all.contains(new), "{old} renames to unknown key {new}");
        }
    }

    #[test]
    fn every_unsupported_default_is_accepted() {
        for (key, default) in UNSUPPORTED {
            let value = match default {
                Null => Value::Null,
                Bool(b) => Value::from(*b),
                Int(i) => Value::from(*i),
                Float(f) => Value::from(*f),
                Str(s) => Value::from(*s),
            };
            let mut cfg = LmcacheConfig::default();
            cfg.apply(Origin::Yaml("t"), key, Raw::Json(&value))
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            assert_eq!(cfg, LmcacheConfig::default());
        }
    }

    #[test]
    fn local_disk_path_strips_file_scheme() {
        let mut cfg = LmcacheConfig {
            local_disk: Some("file:///mnt/nvme/".into()),
            ..LmcacheConfig::default()
        };
        assert_eq!(cfg.local_disk_path(), Some(PathBuf::from("/mnt/nvme/")));
        cfg.local_disk = Some("/data/kv".into());
        assert_eq!(cfg.local_disk_path(), Some(PathBuf::from("/data/kv")));
    }
}

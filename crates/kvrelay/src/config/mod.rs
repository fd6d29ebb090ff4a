//! Configuration: LMCache's YAML + `LMCACHE_*` env ([`LmcacheConfig`]) and vLLM's
//! `--kv-transfer-config` JSON ([`KvTransferConfig`]).
//!
//! Both load the way LMCache and vLLM do, so existing files and launch lines work unchanged,
//! but strictly: a key that is misspelled, renamed, or not implemented by kvrelay is an
//! error naming it instead of LMCache's warning-and-ignore.

mod limits;
mod lmcache;
mod remote;
mod value;
mod vllm;

use std::path::PathBuf;

pub use limits::{MAX_DOCUMENT_BYTES, MAX_NESTING_DEPTH};
pub use lmcache::{
    LmcacheConfig, PdBackendMode, PdRole, HASH_ALGORITHMS, KVRELAY_KEYS, TRANSFER_CHANNELS,
};
pub use remote::{REMOTE_EXTRA_KEYS, REMOTE_SCHEMES};
pub use value::SecretString;
pub use vllm::{
    ConnectorExtraConfig, ConnectorKind, KvLoadFailurePolicy, KvRole, KvTransferConfig,
    CONNECTOR_EXTRA_KEYS,
};

/// A configuration that cannot be loaded. Every variant names the key or file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key no schema knows, typically a typo.
    #[error("{origin}: unknown {what} '{key}'{}", did_you_mean(.suggestion))]
    UnknownKey {
        /// Where the key came from: a file, an env var, a JSON document.
        origin: String,
        /// Which schema: "LMCache config key", "kv-transfer-config key", ….
        what: &'static str,
        key: String,
        /// The nearest known key, when one is close enough to be a likely typo.
        suggestion: Option<String>,
    },
    /// An LMCache key that kvrelay does not implement, set to something other than its
    /// LMCache default.
    #[error("{origin}: '{key}' = {value} is an LMCache setting kvrelay does not support; remove it or set it to LMCache's default ({default})")]
    UnsupportedKey {
        origin: String,
        key: String,
        value: String,
        default: String,
    },
    /// A legacy key that LMCache 0.5.6 silently drops; kvrelay asks for the new name.
    #[error("{origin}: '{old}' is a legacy LMCache key that LMCache 0.5.6 silently ignores; rename it to '{new}'")]
    RenamedKey {
        origin: String,
        old: String,
        new: String,
    },
    /// A value of the wrong type or outside the accepted set.
    #[error("{origin}: '{key}' = {value} is not valid: expected {expected}")]
    BadValue {
        origin: String,
        key: String,
        value: String,
        expected: String,
    },
    /// A well-typed value kvrelay deliberately does not accept, with the reason.
    #[error("'{key}' = {value} is not supported by kvrelay: {reason}")]
    UnsupportedValue {
        key: String,
        value: String,
        reason: String,
    },
    /// Keys that are each fine but do not fit together.
    #[error("invalid configuration: {reason}")]
    Invalid { reason: String },
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A document that is not valid YAML/JSON, or not a mapping at the top level.
    #[error("{origin}: cannot parse: {message}")]
    Parse { origin: String, message: String },
    /// A document longer than [`MAX_DOCUMENT_BYTES`], refused before parsing.
    #[error("{origin}: longer than the {limit}-byte limit for a config document")]
    DocumentTooLarge { origin: String, limit: usize },
    /// A document nested deeper than [`MAX_NESTING_DEPTH`] levels, refused before parsing.
    #[error("{origin}: line {line} is nested deeper than the limit of {limit} levels for a config document")]
    NestingTooDeep {
        origin: String,
        limit: usize,
        line: usize,
    },
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_ref()
        .map(|s| format!(" (did you mean '{s}'?)"))
        .unwrap_or_default()
}

/// The candidate closest to `key`, if it is close enough to be a plausible typo.
pub(crate) fn nearest<'a>(
    key: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    // Jaro-Winkler favours shared prefixes, which is how config keys are usually mistyped
    // (`chunck_size`, `max_local_cpu`); 0.8 keeps unrelated names from being suggested.
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(key, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

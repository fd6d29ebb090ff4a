//! The remote tier's settings: `remote_url`, LMCache's `blocking_timeout_secs`, and the
//! `extra_config` keys kvrelay adds for it (LMCache has no TTL or size limit of its own).

use std::time::Duration;

use serde_json::Value;

use super::value::{ConfigValue, Raw};
use super::{nearest, ConfigError, LmcacheConfig};
use crate::store::RemoteOptions;

/// `remote_url` schemes kvrelay's Redis tier serves (the redis crate's, plus LMCache's
/// `redis-cluster://` and its TLS form).
pub const REMOTE_SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "valkey",
    "valkeys",
    "unix",
    "redis+unix",
    "valkey+unix",
    "redis-cluster",
    "rediss-cluster",
];

/// The `extra_config` keys of the remote tier; see [`RemoteOptions`] for their meaning.
pub const REMOTE_EXTRA_KEYS: &[&str] = &[
    "remote_ttl_secs",
    "remote_max_value_bytes",
    "remote_connect_timeout_ms",
    "remote_pool_size",
    "remote_retry_after_ms",
    "remote_accept_unchecked",
];

impl LmcacheConfig {
    /// The remote tier's options from `blocking_timeout_secs` and `extra_config`.
    pub fn remote_options(&self) -> Result<RemoteOptions, ConfigError> {
        let mut opts = RemoteOptions {
            io_timeout: Duration::from_secs(self.blocking_timeout_secs),
            ..RemoteOptions::default()
        };
        let Some(extra) = &self.extra_config else {
            return Ok(opts);
        };
        for (key, value) in extra {
            if !key.starts_with("remote_") {
                continue;
            }
            match key.as_str() {
                "remote_ttl_secs" => {
                    let secs: f64 = positive(key, value, "a number of seconds > 0")?;
                    opts.ttl = Some(
                        Duration::try_from_secs_f64(secs)
                            .map_err(|_| bad(key, value, "a number of seconds > 0"))?,
                    );
                }
                "remote_max_value_bytes" => {
                    opts.max_value_bytes = Some(positive(key, value, "a byte count > 0")?)
                }
                "remote_connect_timeout_ms" => {
                    opts.connect_timeout =
                        Duration::from_millis(positive(key, value, "milliseconds > 0")?)
                }
                "remote_pool_size" => {
                    opts.pool_size = positive(key, value, "a connection count > 0")?
                }
                "remote_retry_after_ms" => {
                    let ms = u64::from_raw(Raw::Json(value))
                        .ok_or_else(|| bad(key, value, "milliseconds >= 0"))?;
                    opts.retry_after = Duration::from_millis(ms);
                }
                "remote_accept_unchecked" => {
                    opts.accept_unchecked = bool::from_raw(Raw::Json(value))
                        .ok_or_else(|| bad(key, value, "a boolean"))?;
                }
                _ => {
                    return Err(ConfigError::UnknownKey {
                        origin: "LMCache extra_config".into(),
                        what: "remote tier key",
                        key: key.clone(),
                        suggestion: nearest(key, REMOTE_EXTRA_KEYS.iter().copied()),
                    })
                }
            }
        }
        Ok(opts)
    }

    /// Checks `remote_url` and the remote tier's options.
    pub(super) fn validate_remote(&self) -> Result<(), ConfigError> {
        self.remote_options()?;
        let Some(url) = &self.remote_url else {
            return Ok(());
        };
        let scheme = url.split_once("://").map(|(s, _)| s);
        if !scheme.is_some_and(|s| REMOTE_SCHEMES.contains(&s)) {
            return Err(ConfigError::UnsupportedValue {
                key: "remote_url".into(),
                value: format!("{url:?}"),
                reason: format!(
                    "kvrelay's remote tier speaks Redis/Valkey; the URL scheme must be one of {}",
                    REMOTE_SCHEMES.join(", ")
                ),
            });
        }
        if self.blocking_timeout_secs == 0 {
            return Err(ConfigError::Invalid {
                reason: "blocking_timeout_secs must be > 0 with remote_url: it bounds every remote read and write".into(),
            });
        }
        Ok(())
    }
}

fn bad(key: &str, value: &Value, expected: &str) -> ConfigError {
    ConfigError::BadValue {
        origin: "LMCache extra_config".into(),
        key: key.into(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// A value of type `T` that is above zero.
fn positive<T: ConfigValue + PartialOrd + Default>(
    key: &str,
    value: &Value,
    expected: &str,
) -> Result<T, ConfigError> {
    T::from_raw(Raw::Json(value))
        .filter(|v| *v > T::default())
        .ok_or_else(|| bad(key, value, expected))
}

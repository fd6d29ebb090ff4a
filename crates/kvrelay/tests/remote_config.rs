//! The remote tier's configuration: `remote_url` schemes, its `extra_config` keys, and what
//! a build without the `redis` feature says about a remote URL.

use std::time::Duration;

use kvrelay::config::{ConfigError, LmcacheConfig};
use kvrelay::store::RemoteOptions;

fn load(yaml: &str) -> Result<LmcacheConfig, ConfigError> {
    LmcacheConfig::from_yaml_str(yaml)
}

#[test]
fn remote_options_come_from_blocking_timeout_and_extra_config() {
    let c = load(
        "remote_url: \"redis-cluster://u:p@10.0.0.1:7000,10.0.0.2:7000\"\nlocal_cpu: false\nblocking_timeout_secs: 3\nextra_config: {remote_ttl_secs: 1.5, remote_max_value_bytes: 4096, remote_connect_timeout_ms: 250, remote_pool_size: 8, remote_retry_after_ms: 0, remote_accept_unchecked: false, use_odirect: true}\n",
    )
    .unwrap();
    assert_eq!(
        c.remote_options().unwrap(),
        RemoteOptions {
            connect_timeout: Duration::from_millis(250),
            io_timeout: Duration::from_secs(3),
            ttl: Some(Duration::from_millis(1500)),
            max_value_bytes: Some(4096),
            pool_size: 8,
            retry_after: Duration::ZERO,
            accept_unchecked: false,
        }
    );
    let defaults = load("remote_url: \"unix:///run/redis.sock\"\n").unwrap();
    assert_eq!(defaults.remote_options().unwrap(), RemoteOptions::default());
}

#[test]
fn bad_remote_settings_are_named() {
    for (yaml, key) in [
        ("extra_config: {remote_ttl_secs: 0}", "remote_ttl_secs"),
        ("extra_config: {remote_ttl_secs: -1}", "remote_ttl_secs"),
        ("extra_config: {remote_pool_size: 0}", "remote_pool_size"),
        (
            "extra_config: {remote_max_value_bytes: big}",
            "remote_max_value_bytes",
        ),
        (
            "extra_config: {remote_accept_unchecked: sometimes}",
            "remote_accept_unchecked",
        ),
    ] {
        let err = load(yaml).unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadValue { key: k, .. } if k == key),
            "{yaml}: {err}"
        );
    }
    let err = load("extra_config: {remote_tll_secs: 5}").unwrap_err();
    assert!(err.to_string().contains("remote_ttl_secs"), "{err}");
    let err = load("extra_config: {remote_accept_uncheked: false}").unwrap_err();
    assert!(
        err.to_string()
            .contains("did you mean 'remote_accept_unchecked'"),
        "{err}"
    );
    for url in ["lm://host:65432", "mooncakestore://x", "localhost:6379"] {
        let err = load(&format!("remote_url: \"{url}\"")).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnsupportedValue { key, .. } if key == "remote_url"),
            "{url}: {err}"
        );
    }
    let err = load("remote_url: \"redis://h:6379\"\nblocking_timeout_secs: 0").unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
}

/// Built without `redis`, a remote URL is an error that says which feature to enable.
#[cfg(not(feature = "redis"))]
mod without_redis {
    use std::sync::Arc;

    use kvrelay::config::{ConfigError, KvTransferConfig};
    use kvrelay::connector::{build_connector, ConnectorError, EngineIdentity};
    use kvrelay::device::HostDevice;
    use kvrelay::layout::{AttentionKind, KvCacheSpec};
    use kvrelay::KvDtype;

    use super::load;

    #[test]
    fn without_the_feature_a_remote_url_says_how_to_get_it() {
        let transfer = KvTransferConfig::from_json_str(
            r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#,
        )
        .unwrap();
        let lmcache = load("remote_url: \"redis://127.0.0.1:6379\"\nlocal_cpu: false\n").unwrap();
        let spec = KvCacheSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_size: 8,
            dtype: KvDtype::F16,
            block_size: 4,
            num_blocks: 8,
            attention: AttentionKind::Mha,
        };
        let identity = EngineIdentity {
            model: "m".into(),
            world_size: 1,
            worker_id: 0,
        };
        let err = build_connector(&transfer, &lmcache, &identity, spec, Arc::new(HostDevice))
            .err()
            .unwrap();
        assert!(
            matches!(&err, ConnectorError::Config(ConfigError::UnsupportedValue { key, reason, .. })
                if key == "remote_url" && reason.contains("--features redis")),
            "{err}"
        );
    }
}

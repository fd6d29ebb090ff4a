//! vLLM `--kv-transfer-config` JSON.

use std::path::Path;
use std::time::{Duration, Instant};

use kvrelay::config::{
    ConfigError, ConnectorKind, KvLoadFailurePolicy, KvRole, KvTransferConfig, LmcacheConfig,
    MAX_NESTING_DEPTH,
};

#[test]
fn lmcache_ascend_seed_json_parses() {
    // From the LMCache-Ascend 1p1d README (seed 004).
    let producer = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_producer", "kv_connector_module_path":"lmcache_ascend.integration.vllm.lmcache_ascend_connector_v1","kv_connector_extra_config": {"discard_partial_chunks": false, "lmcache_rpc_port": "producer1"}}"#,
    )
    .unwrap();
    assert_eq!(producer.kv_role, Some(KvRole::Producer));
    assert!(producer.is_producer() && !producer.is_consumer());
    assert_eq!(producer.connector_kind().unwrap(), ConnectorKind::Lmcache);
    assert_eq!(
        producer.kv_connector_module_path.as_deref(),
        Some("lmcache_ascend.integration.vllm.lmcache_ascend_connector_v1")
    );
    let extra = &producer.kv_connector_extra_config;
    assert_eq!(extra.lmcache_rpc_port.as_deref(), Some("producer1"));
    assert!(!extra.discard_partial_chunks);

    let consumer = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheAscendConnectorV1Dynamic","kv_role":"kv_consumer", "kv_connector_module_path":"lmcache_ascend.integration.vllm.lmcache_ascend_connector_v1","kv_connector_extra_config": {"discard_partial_chunks": false, "lmcache_rpc_port": "consumer1", "skip_last_n_tokens": 1}}"#,
    )
    .unwrap();
    assert!(consumer.is_consumer() && !consumer.is_producer());
    assert_eq!(consumer.kv_connector_extra_config.skip_last_n_tokens, 1);
}

#[test]
fn lmcache_upstream_and_rbln_names_map_to_connectors() {
    for (name, kind) in [
        ("LMCacheConnectorV1", ConnectorKind::Lmcache),
        ("LMCacheConnector", ConnectorKind::Lmcache),
        ("RBLNLMCacheConnectorV1", ConnectorKind::Lmcache),
        ("KvrelayConnector", ConnectorKind::Lmcache),
        ("SharedStorageConnector", ConnectorKind::SharedStorage),
        ("ExampleConnector", ConnectorKind::SharedStorage),
        ("RBLNHostConnector", ConnectorKind::SharedStorage),
    ] {
        let json = format!(r#"{{"kv_connector":"{name}","kv_role":"kv_both"}}"#);
        let cfg = KvTransferConfig::from_json_str(&json).unwrap();
        assert_eq!(cfg.connector_kind().unwrap(), kind, "{name}");
        assert!(cfg.is_producer() && cfg.is_consumer());
    }
}

#[test]
fn shared_storage_defaults_and_path() {
    let cfg = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"SharedStorageConnector","kv_role":"kv_producer"}"#,
    )
    .unwrap();
    assert_eq!(
        cfg.kv_connector_extra_config.shared_storage_path,
        Path::new("/tmp")
    );
    assert_eq!(cfg.kv_port, 14579);
    assert_eq!(cfg.kv_ip, "127.0.0.1");
    assert_eq!(cfg.kv_parallel_size, 1);
    assert_eq!(cfg.kv_load_failure_policy, KvLoadFailurePolicy::Fail);
    assert!(!cfg.enable_permute_local_kv);

    let cfg = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"ExampleConnector","kv_role":"kv_consumer",
            "kv_connector_extra_config":{"shared_storage_path":"/tmp/rbln_disagg_shared_storage"},
            "kv_load_failure_policy":"recompute","enable_permute_local_kv":true,
            "kv_buffer_device":"cpu","engine_id":"e1"}"#,
    )
    .unwrap();
    assert_eq!(
        cfg.kv_connector_extra_config.shared_storage_path,
        Path::new("/tmp/rbln_disagg_shared_storage")
    );
    assert_eq!(cfg.kv_load_failure_policy, KvLoadFailurePolicy::Recompute);
    assert_eq!(cfg.engine_id.as_deref(), Some("e1"));
}

#[test]
fn vllm_011_fields_parse() {
    let cfg = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"SharedStorageConnector","kv_role":"kv_producer","kv_rank":0,
            "kv_parallel_size":2,"kv_ip":"10.0.0.1","kv_port":15000,"kv_buffer_size":1e9,
            "kv_buffer_device":"cuda"}"#,
    )
    .unwrap();
    assert_eq!(cfg.kv_rank, Some(0));
    assert_eq!(cfg.kv_parallel_size, 2);
    assert_eq!(cfg.kv_port, 15000);
    assert_eq!(cfg.kv_buffer_size, Some(1e9));
}

#[test]
fn engine_id_is_generated_once() {
    let mut cfg = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both"}"#,
    )
    .unwrap();
    let id = cfg.engine_id_or_generate().to_string();
    assert_eq!(id.len(), 36);
    assert_eq!(cfg.engine_id_or_generate(), id);
    let mut other = KvTransferConfig::from_json_str(r#"{"engine_id":"shared"}"#).unwrap();
    assert_eq!(other.engine_id_or_generate(), "shared");
}

#[test]
fn kv_role_is_required_with_a_connector() {
    let err =
        KvTransferConfig::from_json_str(r#"{"kv_connector":"LMCacheConnectorV1"}"#).unwrap_err();
    assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("kv_role"));
    let err = KvTransferConfig::from_json_str(r#"{"kv_connector":"X","kv_role":"producer"}"#)
        .unwrap_err();
    assert!(matches!(err, ConfigError::BadValue { .. }), "{err}");
}

#[test]
fn unknown_and_unsupported_connectors_list_the_known_ones() {
    let cfg = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheConectorV1","kv_role":"kv_both"}"#,
    )
    .unwrap();
    let err = cfg.connector_kind().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::BadValue { .. }), "{msg}");
    assert!(
        msg.contains("SharedStorageConnector") && msg.contains("LMCacheConnectorV1"),
        "{msg}"
    );
    assert!(msg.contains("did you mean 'LMCacheConnectorV1'"), "{msg}");

    let cfg = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both"}"#,
    )
    .unwrap();
    assert!(matches!(
        cfg.connector_kind(),
        Err(ConfigError::UnsupportedValue { .. })
    ));
    let none = KvTransferConfig::from_json_str("{}").unwrap();
    assert!(matches!(
        none.connector_kind(),
        Err(ConfigError::Invalid { .. })
    ));
}

#[test]
fn unknown_json_keys_name_the_nearest_known_key() {
    let err =
        KvTransferConfig::from_json_str(r#"{"kv_conector":"X","kv_role":"kv_both"}"#).unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, suggestion: Some(s), .. }
            if key == "kv_conector" && s == "kv_connector"),
        "{err:?}"
    );
    let err = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both","kv_connector_extra_config":{"skip_last_n_token":1}}"#,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("did you mean 'skip_last_n_tokens'"),
        "{err}"
    );
    let err = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_both","kv_connector_extra_config":{"lmcache.chunk_sise":1}}"#,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("did you mean 'lmcache.chunk_size'"),
        "{err}"
    );
}

#[test]
fn bad_json_values_and_documents() {
    for json in [
        r#"{"kv_port":"abc"}"#,
        r#"{"kv_port":70000}"#,
        r#"{"kv_load_failure_policy":"retry"}"#,
        r#"{"kv_connector_extra_config":{"skip_last_n_tokens":-1}}"#,
        r#"{"kv_connector_extra_config":{"lmcache_rpc_port":[1]}}"#,
        r#"{"kv_connector_extra_config":[]}"#,
    ] {
        let err = KvTransferConfig::from_json_str(json).unwrap_err();
        assert!(matches!(err, ConfigError::BadValue { .. }), "{json}: {err}");
    }
    for json in ["[1]", "{", "\"x\""] {
        let err = KvTransferConfig::from_json_str(json).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{json}: {err}");
    }
    let err =
        KvTransferConfig::from_json_str(r#"{"kv_connector_extra_config":{"use_layerwise":true}}"#)
            .unwrap_err();
    assert!(matches!(err, ConfigError::UnsupportedValue { .. }), "{err}");
}

#[test]
fn lmcache_overrides_flow_into_lmcache_config() {
    let cfg = KvTransferConfig::from_json_str(
        r#"{"kv_connector":"LMCacheConnectorV1","kv_role":"kv_producer",
            "kv_connector_extra_config":{"lmcache_rpc_port":5,"lmcache.chunk_size":512,
            "lmcache.save_decode_cache":true,"lmcache.max_tokens_per_load":2048}}"#,
    )
    .unwrap();
    let extra = &cfg.kv_connector_extra_config;
    assert_eq!(extra.lmcache_rpc_port.as_deref(), Some("5"));
    assert_eq!(extra.max_tokens_per_load, 2048);
    let mut lm = LmcacheConfig::default();
    cfg.apply_lmcache_overrides(&mut lm).unwrap();
    assert_eq!(lm.chunk_size, 512);
    assert!(lm.save_decode_cache);
}

#[test]
fn deeply_nested_json_is_refused_naming_the_limit() {
    let n = 100_000;
    for json in [
        format!(r#"{{"kv_connector_extra_config": {}"#, "[".repeat(n)),
        format!(
            r#"{{"kv_connector_extra_config": {{"a": {}1{}}}}}"#,
            "[".repeat(n),
            "]".repeat(n)
        ),
    ] {
        let start = Instant::now();
        let err = KvTransferConfig::from_json_str(&json).unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(&err, ConfigError::NestingTooDeep { limit, .. } if *limit == MAX_NESTING_DEPTH),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains(&format!("limit of {MAX_NESTING_DEPTH} levels")),
            "{err}"
        );
        // A correctness bound, not a benchmark.
        assert!(took < Duration::from_millis(100), "took {took:?}");
    }
    // Strings full of brackets are not nesting.
    let brackets = "[{".repeat(MAX_NESTING_DEPTH);
    let json = format!(
        r#"{{"kv_connector":"ExampleConnector","kv_role":"kv_both","engine_id":"{brackets}"}}"#
    );
    let cfg = KvTransferConfig::from_json_str(&json).unwrap();
    assert_eq!(cfg.engine_id.as_deref(), Some(brackets.as_str()));
}

#[test]
fn json_integers_past_their_type_name_the_key_and_the_range() {
    for (json, key, range) in [
        (
            r#"{"kv_parallel_size": 99999999999999999999}"#,
            "kv_parallel_size",
            "an integer from 0 to 4294967295",
        ),
        (
            r#"{"kv_rank": 99999999999999999999}"#,
            "kv_rank",
            "an integer from -9223372036854775808 to 9223372036854775807",
        ),
        (
            r#"{"kv_port": 65536}"#,
            "kv_port",
            "a port number from 0 to 65535",
        ),
        (
            r#"{"kv_connector_extra_config": {"skip_last_n_tokens": 99999999999999999999}}"#,
            "skip_last_n_tokens",
            "an integer from 0 to 18446744073709551615",
        ),
        (
            r#"{"kv_connector_extra_config": {"lmcache_rpc_port": 99999999999999999999}}"#,
            "lmcache_rpc_port",
            "a string or an integer from 0 to 18446744073709551615",
        ),
    ] {
        let err = KvTransferConfig::from_json_str(json).unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadValue { key: k, .. } if k == key),
            "{json}: {err:?}"
        );
        assert!(err.to_string().contains(range), "{json}: {err}");
    }
}

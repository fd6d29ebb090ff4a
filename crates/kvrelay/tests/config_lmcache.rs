//! LMCache YAML / env / extra-config loading.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvrelay::config::{
    ConfigError, LmcacheConfig, PdBackendMode, PdRole, MAX_DOCUMENT_BYTES, MAX_NESTING_DEPTH,
};
use kvrelay::keys::{BuiltinHash, CpythonVersion, HashAlgorithm};
use serde_json::json;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/configs")
        .join(name)
}

#[test]
fn defaults_match_lmcache_except_documented_ones() {
    let c = LmcacheConfig::default();
    assert_eq!(c.chunk_size, 256);
    assert!(c.local_cpu);
    assert_eq!(c.max_local_cpu_size, 5.0);
    assert_eq!(c.local_disk, None);
    assert_eq!(c.max_local_disk_size, 0.0);
    assert_eq!(c.remote_url, None);
    assert!(!c.save_unfull_chunk && !c.save_decode_cache && !c.enable_pd);
    assert_eq!(c.cache_policy, "LRU");
    assert_eq!(c.min_retrieve_tokens, 0);
    assert_eq!(c.blocking_timeout_secs, 10);
    assert_eq!(c.lookup_timeout_ms, 3000);
    // kvrelay's deliberate departures: a reproducible hash and a bounded allocation wait.
    assert_eq!(c.pre_caching_hash_algorithm, "sha256_cbor");
    assert_eq!(c.pd_allocation_timeout_sec, 30.0);
    c.validate().unwrap();
}

#[test]
fn empty_yaml_gives_defaults() {
    for text in ["", "\n", "# only a comment\n", "{}"] {
        assert_eq!(
            LmcacheConfig::from_yaml_str(text).unwrap(),
            LmcacheConfig::default()
        );
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    assert_eq!(
        LmcacheConfig::from_file(file.path()).unwrap(),
        LmcacheConfig::default()
    );
}

#[test]
fn example_configs_load() {
    let disk = LmcacheConfig::from_file(example("lmcache-shared-disk.yaml")).unwrap();
    assert_eq!(disk.chunk_size, 256);
    assert_eq!(disk.max_local_cpu_size, 2.0);
    assert_eq!(disk.max_local_disk_size, 4.0);
    assert!(disk.save_unfull_chunk);
    assert_eq!(
        disk.local_disk_path(),
        Some(PathBuf::from("/tmp/kvrelay-lmcache-disk/"))
    );

    let cpu = LmcacheConfig::from_file(example("lmcache-cpu-only.yaml")).unwrap();
    assert!(cpu.local_cpu);
    assert_eq!(cpu.local_disk_path(), None);
}

#[test]
fn seed_style_yaml_with_lmcache_defaults_loads() {
    // A whole LMCache file: unsupported keys at their defaults are accepted.
    let c = LmcacheConfig::from_yaml_str(
        r#"
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5.0
local_cpu_use_hugepages: false
local_disk: "/var/cache/kv"
max_local_disk_size: 20
use_layerwise: false
enable_blending: false
remote_serde: naive
retrieve_locations: null
pre_caching_hash_algorithm: "sha256_cbor"
save_unfull_chunk: true
extra_config: {use_odirect: true}
"#,
    )
    .unwrap();
    assert_eq!(c.local_disk_path(), Some(PathBuf::from("/var/cache/kv")));
    assert_eq!(c.max_local_disk_size, 20.0);
    assert_eq!(c.extra_config.unwrap()["use_odirect"], json!(true));
}

#[test]
fn pd_decoder_config_loads_with_scalar_ports() {
    let c = LmcacheConfig::from_yaml_str(
        r#"
local_cpu: False
enable_pd: True
transfer_channel: "nixl"
pd_role: "receiver"
pd_peer_host: "localhost"
pd_peer_init_port: 7300
pd_peer_alloc_port: 7400
pd_buffer_size: 1073741824
pd_buffer_device: "cuda"
nixl_backends: [UCX]
"#,
    )
    .unwrap();
    assert_eq!(c.pd_role, Some(PdRole::Receiver));
    assert_eq!(c.pd_peer_init_port, Some(vec![7300]));
    assert_eq!(c.pd_peer_alloc_port, Some(vec![7400]));
    assert_eq!(c.pd_buffer_size, Some(1 << 30));
    // Forced on by enable_pd, as in LMCache.
    assert!(c.save_unfull_chunk);
}

#[test]
fn pd_requirements_are_checked() {
    let base =
        "enable_pd: true\ntransfer_channel: nixl\npd_buffer_size: 1024\npd_buffer_device: cpu\n";
    let cases = [
        ("", "pd_role"),
        ("pd_role: sender\n", "pd_proxy_host"),
        ("pd_role: receiver\npd_peer_host: h\n", "pd_peer_init_port"),
        (
            "pd_role: receiver\npd_peer_host: h\npd_peer_init_port: [1, 2]\npd_peer_alloc_port: 3\n",
            "one port per TP rank",
        ),
    ];
    for (extra, needle) in cases {
        let err = LmcacheConfig::from_yaml_str(&format!("{base}{extra}")).unwrap_err();
        assert!(matches!(err, ConfigError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
    let err = LmcacheConfig::from_yaml_str(&format!("{base}pd_role: both\n")).unwrap_err();
    assert!(matches!(err, ConfigError::BadValue { .. }), "{err}");
    let sender = format!("{base}pd_role: sender\npd_proxy_host: localhost\npd_proxy_port: 7500\n");
    assert_eq!(
        LmcacheConfig::from_yaml_str(&sender).unwrap().pd_role,
        Some(PdRole::Sender)
    );
    let no_channel = sender.replace("transfer_channel: nixl\n", "");
    assert!(LmcacheConfig::from_yaml_str(&no_channel).is_err());
}

#[test]
fn env_overrides_file_and_parses_like_lmcache() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, b"chunk_size: 128\nlocal_cpu: true\n").unwrap();
    let path = file.path().to_str().unwrap();
    let c = LmcacheConfig::load_with_env(env(&[
        ("LMCACHE_CONFIG_FILE", path),
        ("LMCACHE_CHUNK_SIZE", "512"),
        ("LMCACHE_LOCAL_CPU", "false"),
        ("LMCACHE_SAVE_UNFULL_CHUNK", "True"),
        ("LMCACHE_SAVE_DECODE_CACHE", "1"),
        ("LMCACHE_MAX_LOCAL_CPU_SIZE", "\"2.5\""),
        ("LMCACHE_PD_PEER_INIT_PORT", "7300,7301"),
        ("LMCACHE_PD_PEER_ALLOC_PORT", "[7400]"),
        ("LMCACHE_LOG_LEVEL", "DEBUG"),
        ("LMCACHE_FORCE_SKIP_SAVE", "1"),
        ("LMCACHE_EC_CHUNK_SIZE", "16"),
        ("PATH", "/usr/bin"),
    ]))
    .unwrap();
    assert_eq!(c.chunk_size, 512);
    assert!(!c.local_cpu);
    assert!(c.save_unfull_chunk && c.save_decode_cache);
    assert_eq!(c.max_local_cpu_size, 2.5);
    assert_eq!(c.pd_peer_init_port, Some(vec![7300, 7301]));
    assert_eq!(c.pd_peer_alloc_port, Some(vec![7400]));
}

#[test]
fn env_without_config_file_starts_from_defaults() {
    let c = LmcacheConfig::load_with_env(env(&[("LMCACHE_MIN_RETRIEVE_TOKENS", "64")])).unwrap();
    assert_eq!(c.min_retrieve_tokens, 64);
    assert_eq!(c.chunk_size, 256);
    assert_eq!(
        LmcacheConfig::load_with_env(env(&[])).unwrap(),
        LmcacheConfig::default()
    );
}

#[test]
fn missing_config_file_is_an_io_error() {
    let err = LmcacheConfig::load_with_env(env(&[("LMCACHE_CONFIG_FILE", "/nonexistent/x.yaml")]))
        .unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }), "{err}");
    assert!(err.to_string().contains("/nonexistent/x.yaml"));
}

#[test]
fn unknown_keys_name_the_nearest_known_key() {
    let err = LmcacheConfig::from_yaml_str("chunck_size: 256").unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, suggestion: Some(s), .. }
            if key == "chunck_size" && s == "chunk_size"),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .contains("unknown LMCache config key 'chunck_size' (did you mean 'chunk_size'?)"));

    let err = LmcacheConfig::load_with_env(env(&[("LMCACHE_MAX_LOCAL_CPU", "4")])).unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, suggestion: Some(s), .. }
            if key == "LMCACHE_MAX_LOCAL_CPU" && s == "LMCACHE_MAX_LOCAL_CPU_SIZE"),
        "{err:?}"
    );

    let err = LmcacheConfig::from_yaml_str("zzz: 1").unwrap_err();
    assert!(
        matches!(
            &err,
            ConfigError::UnknownKey {
                suggestion: None,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn pd_backend_mode_is_async_by_default_or_sync() {
    let default = LmcacheConfig::from_yaml_str("chunk_size: 256").unwrap();
    assert_eq!(default.pd_backend_mode, PdBackendMode::Async);
    let sync = LmcacheConfig::from_yaml_str("pd_backend_mode: sync").unwrap();
    assert_eq!(sync.pd_backend_mode, PdBackendMode::Sync);
    let err = LmcacheConfig::from_yaml_str("pd_backend_mode: fast").unwrap_err();
    assert!(err.to_string().contains("\"async\" or \"sync\""), "{err}");
}

#[test]
fn unsupported_keys_error_unless_at_lmcache_default() {
    for yaml in [
        "enable_blending: true",
        "use_layerwise: true",
        "gds_path: /mnt/gds",
        "enable_p2p: true",
        "local_cpu_use_hugepages: yes",
        "pd_skip_proxy_notification: true",
    ] {
        let err = LmcacheConfig::from_yaml_str(yaml).unwrap_err();
        assert!(
            matches!(err, ConfigError::UnsupportedKey { .. }),
            "{yaml}: {err}"
        );
        assert!(
            err.to_string().contains("kvrelay does not support"),
            "{err}"
        );
    }
    for yaml in [
        "use_layerwise: false",
        "enable_blending: false",
        "local_cpu_use_hugepages: False",
        "gds_path: null",
        "mp_port: 5555",
        "use_gds: true",
        "maru_pool_size: 4",
    ] {
        LmcacheConfig::from_yaml_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
    }
    let err = LmcacheConfig::load_with_env(env(&[("LMCACHE_USE_LAYERWISE", "1")])).unwrap_err();
    assert!(err.to_string().contains("LMCACHE_USE_LAYERWISE"), "{err}");
    LmcacheConfig::load_with_env(env(&[("LMCACHE_USE_LAYERWISE", "False")])).unwrap();
}

#[test]
fn legacy_aliases_ask_for_the_new_name() {
    let err = LmcacheConfig::from_yaml_str("nixl_peer_host: localhost").unwrap_err();
    assert!(
        matches!(&err, ConfigError::RenamedKey { old, new, .. }
            if old == "nixl_peer_host" && new == "pd_peer_host"),
        "{err:?}"
    );
    let err = LmcacheConfig::from_yaml_str("enable_xpyd: true").unwrap_err();
    assert!(
        err.to_string().contains("rename it to 'enable_pd'"),
        "{err}"
    );
    let err = LmcacheConfig::load_with_env(env(&[("LMCACHE_NIXL_ROLE", "sender")])).unwrap_err();
    assert!(
        err.to_string().contains("rename it to 'LMCACHE_PD_ROLE'"),
        "{err}"
    );
}

#[test]
fn bad_values_name_key_value_and_type() {
    let err = LmcacheConfig::from_yaml_str("chunk_size: \"abc\"").unwrap_err();
    assert!(
        matches!(&err, ConfigError::BadValue { key, value, .. }
            if key == "chunk_size" && value.contains("abc")),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("expected an integer from 0 to 18446744073709551615"),
        "{err}"
    );
    for yaml in [
        "chunk_size: -1",
        "local_cpu: maybe",
        "pd_peer_init_port: [70000]",
        "max_local_cpu_size: [1]",
        "min_retrieve_tokens: -5",
        "extra_config: 3",
        "cache_policy: null",
    ] {
        let err = LmcacheConfig::from_yaml_str(yaml).unwrap_err();
        assert!(matches!(err, ConfigError::BadValue { .. }), "{yaml}: {err}");
    }
    let err = LmcacheConfig::load_with_env(env(&[("LMCACHE_LOCAL_CPU", "ture")])).unwrap_err();
    assert!(err.to_string().contains("LMCACHE_LOCAL_CPU"), "{err}");
    // Not a mapping, or not YAML at all.
    for text in ["- a\n- b", "chunk_size: [1"] {
        let err = LmcacheConfig::from_yaml_str(text).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }
}

#[test]
fn validation_rules() {
    let invalid = |yaml: &str| LmcacheConfig::from_yaml_str(yaml).unwrap_err();
    assert!(matches!(
        invalid("chunk_size: 0"),
        ConfigError::Invalid { .. }
    ));
    assert!(matches!(
        invalid("local_disk: /d"),
        ConfigError::Invalid { .. }
    ));
    assert!(matches!(
        invalid("local_disk: s3://bucket\nmax_local_disk_size: 1"),
        ConfigError::BadValue { .. }
    ));
    assert!(matches!(
        invalid("cache_policy: LFU"),
        ConfigError::BadValue { .. }
    ));
    assert!(matches!(
        invalid("transfer_channel: rdma"),
        ConfigError::BadValue { .. }
    ));
    assert!(matches!(
        invalid("pre_caching_hash_algorithm: xxhash"),
        ConfigError::BadValue { .. }
    ));
    assert!(matches!(
        invalid("pd_allocation_timeout_sec: 0"),
        ConfigError::Invalid { .. }
    ));

    for algo in ["sha256_cbor", "sha256_cbor_64bit", "xxh3_128", "builtin"] {
        LmcacheConfig::from_yaml_str(&format!("pre_caching_hash_algorithm: {algo}")).unwrap();
    }
    // LMCache's infinite allocation wait can still be asked for explicitly.
    let c = LmcacheConfig::from_yaml_str("pd_allocation_timeout_sec: .inf").unwrap();
    assert!(c.pd_allocation_timeout_sec.is_infinite());
}

#[test]
fn extra_config_overrides_apply_and_are_strict() {
    let mut c = LmcacheConfig::default();
    let extra = json!({
        "lmcache.chunk_size": 512,
        "lmcache.local_disk": "file:///x/",
        "lmcache.max_local_disk_size": "1.5",
        "lmcache.max_tokens_per_load": 1024,
        "discard_partial_chunks": true,
    });
    c.apply_extra_config_overrides(extra.as_object().unwrap())
        .unwrap();
    assert_eq!(c.chunk_size, 512);
    assert_eq!(c.local_disk_path(), Some(PathBuf::from("/x/")));
    assert_eq!(c.max_local_disk_size, 1.5);

    let bad = json!({"lmcache.chunksize": 512});
    let err = c
        .apply_extra_config_overrides(bad.as_object().unwrap())
        .unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { key, suggestion: Some(s), .. }
            if key == "lmcache.chunksize" && s == "lmcache.chunk_size"),
        "{err:?}"
    );
    let bad = json!({"lmcache.enable_blending": true});
    let err = c
        .apply_extra_config_overrides(bad.as_object().unwrap())
        .unwrap_err();
    assert!(matches!(err, ConfigError::UnsupportedKey { .. }), "{err}");
}

/// Runs `load` and checks that it refused the document as nested too deep, naming the
/// limit, within 100 ms: a correctness bound (the parser alone took seconds), not a
/// benchmark.
fn assert_refused_as_too_deep(
    what: &str,
    load: impl FnOnce() -> Result<LmcacheConfig, ConfigError>,
) {
    let start = Instant::now();
    let err = load().unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(&err, ConfigError::NestingTooDeep { limit, .. } if *limit == MAX_NESTING_DEPTH),
        "{what}: {err:?}"
    );
    let named = format!("limit of {MAX_NESTING_DEPTH} levels");
    assert!(err.to_string().contains(&named), "{what}: {err}");
    assert!(took < Duration::from_millis(100), "{what} took {took:?}");
}

#[test]
fn deeply_nested_yaml_is_refused_before_parsing() {
    let n = 100_000;
    let documents = [
        ("unclosed [", format!("chunk_size: {}", "[".repeat(n))),
        (
            "closed [...]",
            format!("chunk_size: {}1{}", "[".repeat(n), "]".repeat(n)),
        ),
        (
            "closed {...}",
            format!("extra_config: {}1{}", "{a: ".repeat(n), "}".repeat(n)),
        ),
        (
            "compact block sequences",
            format!("extra_config:\n{}1", "- ".repeat(n)),
        ),
        (
            "indented block mappings",
            (0..200)
                .map(|d| format!("{}k{d}:\n", "  ".repeat(d)))
                .collect(),
        ),
        // Quotes that a line-by-line guess would take for the start of a string (the
        // first is a quoted key, the second a quote inside a plain scalar).
        (
            "after a quoted key",
            format!("a: b\n\"x: 'y\": {}", "[".repeat(n)),
        ),
        (
            "after a quote in plain text",
            format!("a: b\n  \"\nc: {}", "[".repeat(n)),
        ),
    ];
    for (what, yaml) in &documents {
        assert_refused_as_too_deep(what, || LmcacheConfig::from_yaml_str(yaml));
    }
    // The line named is where the limit is crossed: key k64 opens level 65.
    let err = LmcacheConfig::from_yaml_str(&documents[4].1).unwrap_err();
    assert!(
        matches!(err, ConfigError::NestingTooDeep { line: 65, .. }),
        "{err:?}"
    );

    // LMCACHE_CONFIG_FILE goes through the same check, and the error names the file.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("deep.yaml");
    std::fs::write(&file, &documents[0].1).unwrap();
    let vars = env(&[("LMCACHE_CONFIG_FILE", file.to_str().unwrap())]);
    assert_refused_as_too_deep("file", || LmcacheConfig::load_with_env(vars));
    let err = LmcacheConfig::from_file(&file).unwrap_err();
    assert!(err.to_string().contains("deep.yaml"), "{err}");
}

#[test]
fn nesting_within_the_limit_and_brackets_in_text_are_accepted() {
    let cfg =
        LmcacheConfig::from_yaml_str("extra_config: {a: [[[[1]]]], b: {c: {d: [2]}}}").unwrap();
    let extra = cfg.extra_config.unwrap();
    assert_eq!(extra["a"], json!([[[[1]]]]));
    // Brackets in quoted scalars, comments and block scalars are text, not nesting.
    let brackets = "[".repeat(2 * MAX_NESTING_DEPTH);
    for yaml in [
        format!("lmcache_instance_id: \"{brackets}\"\n"),
        format!("lmcache_instance_id: '{brackets}'\n"),
        format!("# {brackets}\nlmcache_instance_id: x # {brackets}\n"),
        format!("lmcache_instance_id: |\n  {brackets}\n  {brackets}\nchunk_size: 16\n"),
        format!("lmcache_instance_id: a{brackets}\n"),
        format!("lmcache_instance_id: a - {brackets} \"{brackets}\n"),
        format!("lmcache_instance_id: \"\\\"{brackets}\"\n"),
    ] {
        let cfg = LmcacheConfig::from_yaml_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        assert!(
            cfg.lmcache_instance_id.unwrap().contains(&brackets) || yaml.starts_with('#'),
            "{yaml}"
        );
    }
}

#[test]
fn oversized_config_documents_are_refused_without_reading_them_whole() {
    let big = format!("# {}\nchunk_size: 16\n", "x".repeat(MAX_DOCUMENT_BYTES));
    let err = LmcacheConfig::from_yaml_str(&big).unwrap_err();
    assert!(
        matches!(&err, ConfigError::DocumentTooLarge { limit, .. } if *limit == MAX_DOCUMENT_BYTES),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("{MAX_DOCUMENT_BYTES}-byte limit")),
        "{err}"
    );
    // An endless file is read only up to the limit.
    let vars = env(&[("LMCACHE_CONFIG_FILE", "/dev/zero")]);
    let err = LmcacheConfig::load_with_env(vars).unwrap_err();
    assert!(
        matches!(&err, ConfigError::DocumentTooLarge { origin, .. } if origin == "/dev/zero"),
        "{err:?}"
    );
}

#[test]
fn integers_past_their_type_name_the_key_and_the_range() {
    let u64_range = "expected an integer from 0 to 18446744073709551615";
    let err = LmcacheConfig::from_yaml_str("chunk_size: 99999999999999999999").unwrap_err();
    assert!(
        matches!(&err, ConfigError::BadValue { key, .. } if key == "chunk_size"),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(message.contains("'chunk_size'"), "{message}");
    assert!(message.contains(u64_range), "{message}");
    let err = LmcacheConfig::load_with_env(env(&[("LMCACHE_CHUNK_SIZE", "99999999999999999999")]))
        .unwrap_err();
    assert!(
        err.to_string().contains("LMCACHE_CHUNK_SIZE") && err.to_string().contains(u64_range),
        "{err}"
    );
    let mut cfg = LmcacheConfig::default();
    let extra: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r#"{"lmcache.chunk_size": 99999999999999999999}"#).unwrap();
    let err = cfg.apply_extra_config_overrides(&extra).unwrap_err();
    assert!(
        err.to_string().contains("lmcache.chunk_size") && err.to_string().contains(u64_range),
        "{err}"
    );
    for (yaml, range) in [
        ("pd_buffer_size: 18446744073709551616", u64_range),
        ("blocking_timeout_secs: -99999999999999999999", u64_range),
        (
            "pd_proxy_port: 65536",
            "expected a port number from 0 to 65535",
        ),
        (
            "pd_peer_init_port: [7300, 99999999999999999999]",
            "a port number from 0 to 65535",
        ),
    ] {
        let err = LmcacheConfig::from_yaml_str(yaml).unwrap_err();
        let key = yaml.split(':').next().unwrap();
        let message = err.to_string();
        assert!(message.contains(&format!("'{key}'")), "{yaml}: {message}");
        assert!(message.contains(range), "{yaml}: {message}");
    }
}

#[test]
fn builtin_hash_takes_the_cpython_and_vllm_of_the_lmcache_engines() {
    let c = LmcacheConfig::from_yaml_str("pre_caching_hash_algorithm: builtin").unwrap();
    assert_eq!(
        c.hash_algorithm().unwrap(),
        HashAlgorithm::Builtin(BuiltinHash {
            cpython: CpythonVersion::Py311,
            with_vllm: true
        })
    );
    let c = LmcacheConfig::from_yaml_str(
        "pre_caching_hash_algorithm: builtin\npre_caching_hash_cpython: \"3.10\"\npre_caching_hash_with_vllm: false\n",
    )
    .unwrap();
    assert_eq!(
        c.hash_algorithm().unwrap(),
        HashAlgorithm::Builtin(BuiltinHash {
            cpython: CpythonVersion::Py310,
            with_vllm: false
        })
    );
    // The settings leave other algorithms alone.
    let c = LmcacheConfig::from_yaml_str("pre_caching_hash_cpython: \"3.12\"").unwrap();
    assert_eq!(c.hash_algorithm().unwrap(), HashAlgorithm::Sha256Cbor);
    // Unquoted 3.10 is the YAML number 3.1: refused with the reason.
    let err = LmcacheConfig::from_yaml_str("pre_caching_hash_cpython: 3.10").unwrap_err();
    assert!(
        matches!(&err, ConfigError::BadValue { key, .. } if key == "pre_caching_hash_cpython"),
        "{err}"
    );
    assert!(err.to_string().contains("in quotes"), "{err}");
    let err = LmcacheConfig::load_with_env(env(&[("LMCACHE_PRE_CACHING_HASH_CPYTHON", "3.7")]))
        .unwrap_err();
    assert!(matches!(err, ConfigError::BadValue { .. }), "{err}");
    // Env spelling works, and typos get the nearest key.
    let c = LmcacheConfig::load_with_env(env(&[("LMCACHE_PRE_CACHING_HASH_WITH_VLLM", "false")]))
        .unwrap();
    assert!(!c.pre_caching_hash_with_vllm);
    let err = LmcacheConfig::from_yaml_str("pre_caching_hash_with_vlm: false").unwrap_err();
    assert!(
        matches!(&err, ConfigError::UnknownKey { suggestion: Some(s), .. } if s == "pre_caching_hash_with_vllm"),
        "{err}"
    );
}

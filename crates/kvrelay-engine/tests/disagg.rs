//! Disaggregated runs (prefill engine saves KV, a fresh decode engine loads it) must give
//! exactly the tokens and logits of a colocated run, for every layout and both connectors.

use std::path::Path;
use std::sync::Arc;

use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay::device::HostDevice;
use kvrelay::layout::LayoutKind;
use kvrelay_engine::{Engine, EngineConfig, Model, RequestOutput, SamplingParams};

const MODEL: &str = "tiny-random";

fn engine(config: &EngineConfig) -> Engine {
    Engine::new(Model::tiny_random(config.max_model_len), config.clone()).unwrap()
}

fn prompts(lengths: &[usize]) -> Vec<Vec<u32>> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            (0..len)
                .map(|t| ((t * 7 + i * 13 + t / 5) % 256) as u32)
                .collect()
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    SharedStorage,
    Lmcache,
}

fn configs(
    kind: Kind,
    dir: &Path,
    role: &str,
    async_loading: bool,
) -> (KvTransferConfig, LmcacheConfig) {
    let connector = match kind {
        Kind::SharedStorage => "SharedStorageConnector",
        Kind::Lmcache => "LMCacheConnectorV1",
    };
    let transfer = KvTransferConfig::from_json_str(&format!(
        r#"{{"kv_connector": "{connector}", "kv_role": "{role}",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": {{"shared_storage_path": "{}"}}}}"#,
        dir.join("shared").display()
    ))
    .unwrap();
    let lmcache = LmcacheConfig::from_yaml_str(&format!(
        "chunk_size: 32\nlocal_cpu: false\nlocal_disk: \"file://{}\"\nmax_local_disk_size: 1\n\
         save_unfull_chunk: true\npre_caching_hash_algorithm: sha256_cbor\nenable_async_loading: {async_loading}\n",
        dir.join("lmcache").display()
    ))
    .unwrap();
    (transfer, lmcache)
}

fn run(
    config: &EngineConfig,
    kind: Kind,
    dir: &Path,
    role: &str,
    async_loading: bool,
    prompts: &[Vec<u32>],
    max_tokens: usize,
) -> Vec<RequestOutput> {
    let mut e = engine(config);
    let (transfer, lmcache) = configs(kind, dir, role, async_loading);
    e.connect(&transfer, &lmcache, MODEL, Arc::new(HostDevice))
        .unwrap();
    e.generate(prompts, SamplingParams::greedy(max_tokens))
        .unwrap()
}

fn assert_same_tokens(decode: &[RequestOutput], colocated: &[RequestOutput], what: &str) {
    assert_eq!(decode.len(), colocated.len());
    for (d, c) in decode.iter().zip(colocated) {
        assert_eq!(
            d.output_token_ids, c.output_token_ids,
            "{what}: {}",
            d.request_id
        );
        assert_eq!(d.logits_digest, c.logits_digest, "{what}: {}", d.request_id);
    }
}

#[test]
fn batched_prompts_equal_single_prompts() {
    let config = EngineConfig {
        block_size: 16,
        max_num_batched_tokens: 64,
        ..EngineConfig::default()
    };
    let ps = prompts(&[70, 5, 33]);
    let batched = engine(&config)
        .generate(&ps, SamplingParams::greedy(6))
        .unwrap();
    for (p, b) in ps.iter().zip(&batched) {
        let single = engine(&config)
            .generate(std::slice::from_ref(p), SamplingParams::greedy(6))
            .unwrap();
        assert_eq!(single[0].output_token_ids, b.output_token_ids);
        assert_eq!(single[0].logits_digest, b.logits_digest);
        assert_eq!(b.output_token_count, 6);
    }
}

#[test]
fn every_layout_and_connector_decodes_like_a_colocated_run() {
    let lengths = [100, 7, 64, 45];
    let ps = prompts(&lengths);
    for layout in LayoutKind::ALL.into_iter().filter(|l| l.name() != "mla") {
        let config = EngineConfig {
            block_size: 16,
            max_num_batched_tokens: 48,
            layout,
            ..EngineConfig::default()
        };
        let colocated = engine(&config)
            .generate(&ps, SamplingParams::greedy(5))
            .unwrap();
        for kind in [Kind::SharedStorage, Kind::Lmcache] {
            let dir = tempfile::tempdir().unwrap();
            let prefill = run(&config, kind, dir.path(), "kv_producer", false, &ps, 1);
            assert!(prefill.iter().all(|o| o.hit_tokens == 0));
            let decode = run(&config, kind, dir.path(), "kv_consumer", false, &ps, 5);
            let what = format!("{layout:?} {kind:?}");
            assert_same_tokens(&decode, &colocated, &what);
            // The 100-token prompt must have been loaded, not recomputed.
            assert!(decode[0].hit_tokens >= 64, "{what}: {:?}", decode[0]);
            assert_eq!(decode[0].recomputed_tokens, 0, "{what}");
            assert!(decode[0].transfer.loaded_bytes > 0, "{what}");
        }
    }
}

#[test]
fn asynchronous_loads_decode_like_a_colocated_run() {
    let config = EngineConfig {
        block_size: 16,
        max_num_batched_tokens: 48,
        ..EngineConfig::default()
    };
    let ps = prompts(&[100, 7, 64, 45, 200]);
    let colocated = engine(&config)
        .generate(&ps, SamplingParams::greedy(5))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(
        &config,
        Kind::Lmcache,
        dir.path(),
        "kv_producer",
        true,
        &ps,
        1,
    );
    let decode = run(
        &config,
        Kind::Lmcache,
        dir.path(),
        "kv_consumer",
        true,
        &ps,
        5,
    );
    assert_same_tokens(&decode, &colocated, "async");
    assert!(decode[4].hit_tokens >= 192, "{:?}", decode[4]);
}

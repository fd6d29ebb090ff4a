//! Disaggregated runs (prefill engine saves KV, a fresh decode engine loads it) must give
//! exactly the tokens and logits of a colocated run, for every layout and both connectors.

use std::path::Path;

use kvrelay::config::{KvTransferConfig, LmcacheConfig};
use kvrelay::layout::LayoutKind;
use kvrelay_engine::{
    AbortOutcome, Engine, EngineConfig, FinishReason, Model, RequestOutput, SamplingParams,
};

const MODEL: &str = "tiny-random";

fn engine(config: &EngineConfig) -> Engine {
    Engine::new(Model::tiny_random(config.max_model_len), config.clone()).unwrap()
}

/// 16-token blocks and a step budget of `max_num_batched_tokens` (chunked prefill).
fn small(max_num_batched_tokens: usize) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        max_num_batched_tokens,
        ..EngineConfig::default()
    }
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
    configs_with_policy(kind, dir, role, async_loading, "recompute")
}

fn configs_with_policy(
    kind: Kind,
    dir: &Path,
    role: &str,
    async_loading: bool,
    policy: &str,
) -> (KvTransferConfig, LmcacheConfig) {
    let connector = match kind {
        Kind::SharedStorage => "SharedStorageConnector",
        Kind::Lmcache => "LMCacheConnectorV1",
    };
    let transfer = KvTransferConfig::from_json_str(&format!(
        r#"{{"kv_connector": "{connector}", "kv_role": "{role}",
            "kv_load_failure_policy": "{policy}",
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
    e.connect(&transfer, &lmcache, MODEL).unwrap();
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
    let config = small(64);
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
    let config = small(48);
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

/// Flips bytes in the middle of every stored chunk file under `dir` whose name sorts at
/// position `which` (the disk tier names files by key hash, so this is an arbitrary chunk).
fn corrupt_one_chunk(dir: &Path, which: usize) -> std::path::PathBuf {
    let mut files: Vec<_> = walk(dir)
        .into_iter()
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 1024))
        .collect();
    files.sort();
    let victim = files[which % files.len()].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&victim, bytes).unwrap();
    victim
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn a_corrupted_chunk_is_recomputed_and_decode_still_matches() {
    let config = small(48);
    let ps = prompts(&[100, 70]);
    let colocated = engine(&config)
        .generate(&ps, SamplingParams::greedy(5))
        .unwrap();
    for (kind, async_loading) in [
        (Kind::SharedStorage, false),
        (Kind::Lmcache, false),
        (Kind::Lmcache, true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        run(
            &config,
            kind,
            dir.path(),
            "kv_producer",
            async_loading,
            &ps,
            1,
        );
        corrupt_one_chunk(dir.path(), 1);
        let decode = run(
            &config,
            kind,
            dir.path(),
            "kv_consumer",
            async_loading,
            &ps,
            5,
        );
        let what = format!("{kind:?} async={async_loading}");
        assert_same_tokens(&decode, &colocated, &what);
        let recomputed: usize = decode.iter().map(|o| o.recomputed_tokens).sum();
        assert!(recomputed > 0, "{what}: nothing was recomputed: {decode:?}");
    }
}

#[test]
fn the_fail_policy_ends_a_request_whose_load_failed() {
    let config = EngineConfig {
        block_size: 16,
        ..EngineConfig::default()
    };
    let ps = prompts(&[100]);
    let dir = tempfile::tempdir().unwrap();
    run(
        &config,
        Kind::Lmcache,
        dir.path(),
        "kv_producer",
        false,
        &ps,
        1,
    );
    corrupt_one_chunk(dir.path(), 0);
    let mut e = engine(&config);
    let (transfer, lmcache) =
        configs_with_policy(Kind::Lmcache, dir.path(), "kv_consumer", false, "fail");
    e.connect(&transfer, &lmcache, MODEL).unwrap();
    let out = e.generate(&ps, SamplingParams::greedy(5)).unwrap();
    assert!(
        matches!(out[0].finish_reason, kvrelay_engine::FinishReason::Error(_)),
        "{out:?}"
    );
}

#[test]
fn preemption_under_block_pressure_gives_the_same_tokens() {
    let roomy = small(64);
    let tight = EngineConfig {
        num_blocks: Some(12),
        ..roomy.clone()
    };
    let ps = prompts(&[90, 80, 60]);
    let expected = engine(&roomy)
        .generate(&ps, SamplingParams::greedy(20))
        .unwrap();
    let mut e = engine(&tight);
    let got = e.generate(&ps, SamplingParams::greedy(20)).unwrap();
    assert!(e.stats().preemptions > 0, "the cache was not tight enough");
    assert_same_tokens(&got, &expected, "preempted");
}

#[test]
fn bad_requests_are_rejected_with_a_reason() {
    let config = EngineConfig {
        max_model_len: 64,
        block_size: 16,
        ..EngineConfig::default()
    };
    let mut e = engine(&config);
    let greedy = SamplingParams::greedy(4);
    for (prompt, needle) in [
        (vec![], "empty prompt"),
        (vec![1; 64], "does not fit max_model_len"),
        (vec![100_000], "outside the vocabulary"),
    ] {
        let err = e
            .add_request("r", prompt, greedy.clone())
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
    e.add_request("r", vec![1, 2], greedy.clone()).unwrap();
    let err = e.add_request("r", vec![1], greedy).unwrap_err().to_string();
    assert!(err.contains("already in use"), "{err}");
}

#[test]
fn a_written_checkpoint_loads_back_to_the_same_model() {
    use kvrelay_engine::weights::Weights;
    use kvrelay_engine::LlamaConfig;
    let dir = tempfile::tempdir().unwrap();
    for tied in [false, true] {
        let mut llama = LlamaConfig::tiny_random();
        llama.tie_word_embeddings = tied;
        let weights = Weights::random(&llama, 3);
        weights.save(&llama, dir.path()).unwrap();
        let loaded = Model::load(dir.path(), 256).unwrap();
        assert_eq!(loaded.config, llama);
        assert_eq!(loaded.weights(), &weights, "tied = {tied}");
        let config = EngineConfig {
            max_model_len: 256,
            ..EngineConfig::default()
        };
        let ps = prompts(&[40]);
        let a = Engine::new(Model::new(llama.clone(), weights, 256), config.clone())
            .unwrap()
            .generate(&ps, SamplingParams::greedy(4))
            .unwrap();
        let b = Engine::new(loaded, config)
            .unwrap()
            .generate(&ps, SamplingParams::greedy(4))
            .unwrap();
        assert_same_tokens(&a, &b, "reloaded");
    }
}

#[test]
fn a_checkpoint_with_a_wrong_tensor_shape_is_a_clear_error() {
    use kvrelay_engine::weights::Weights;
    use kvrelay_engine::LlamaConfig;
    let dir = tempfile::tempdir().unwrap();
    let llama = LlamaConfig::tiny_random();
    Weights::random(&llama, 1).save(&llama, dir.path()).unwrap();
    let mut wrong = llama.clone();
    wrong.intermediate_size += 1;
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_string(&wrong).unwrap(),
    )
    .unwrap();
    let err = Model::load(dir.path(), 64).err().unwrap().to_string();
    assert!(err.contains("gate_proj") && err.contains("shape"), "{err}");
}

/// A request aborted while its asynchronous load is in flight ends as `Aborted` once the
/// load lands (its blocks are not freed under the loader), and the engine goes on.
#[test]
fn a_request_aborted_during_its_asynchronous_load_ends_once_the_load_lands() {
    let config = small(48);
    let ps = prompts(&[200, 100]);
    let colocated = engine(&config)
        .generate(&ps[1..], SamplingParams::greedy(5))
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
    let mut e = engine(&config);
    let (transfer, lmcache) = configs(Kind::Lmcache, dir.path(), "kv_consumer", true);
    e.connect(&transfer, &lmcache, MODEL).unwrap();
    e.add_request("aborted", ps[0].clone(), SamplingParams::greedy(5))
        .unwrap();
    // The first step only schedules the load.
    assert!(e.step().unwrap().is_empty());
    assert_eq!(e.output_token_ids("aborted"), Some(&[][..]));
    // The load may already have landed (then the request ends now).
    let mut outputs = match e.abort_request("aborted") {
        AbortOutcome::WhenLoaded => Vec::new(),
        AbortOutcome::Finished(output) => vec![*output],
        AbortOutcome::NotFound => panic!("the request is loading"),
    };
    e.add_request("next", ps[1].clone(), SamplingParams::greedy(5))
        .unwrap();
    outputs.extend(e.run_to_completion().unwrap());
    let aborted = outputs.iter().find(|o| o.request_id == "aborted").unwrap();
    assert_eq!(aborted.finish_reason, FinishReason::Aborted);
    assert_eq!(aborted.output_token_count, 0);
    let next = outputs.iter().find(|o| o.request_id == "next").unwrap();
    assert_eq!(next.output_token_ids, colocated[0].output_token_ids);
    assert!(!e.has_unfinished());
}

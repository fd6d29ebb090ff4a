//! The smoke examples as users run them: real processes, prefill then decode, compared
//! token for token with the colocated `generate` example.

mod common;

use std::path::PathBuf;

use common::{
    assert_same_output, colocated, json_of, lmcache_yaml, lmcache_yaml_hashed, run,
    shared_storage_phases, strict_phase, PROMPT, STRICT_BOTH,
};

/// The strict LMCache smoke, both roles, two prompts per batch, over `yaml`.
fn strict_both_batch_of_two(
    yaml: &std::path::Path,
    env: &[(&str, &std::ffi::OsStr)],
) -> std::process::Output {
    let mut args = STRICT_BOTH.to_vec();
    args.extend(["--prefill-batch-size", "2"]);
    args.extend(PROMPT);
    let mut envs = vec![("LMCACHE_CONFIG_FILE", yaml.as_os_str())];
    envs.extend_from_slice(env);
    run("disagg_lmcache_smoke", &args, &envs)
}

#[test]
fn lmcache_smoke_both_roles_hits_and_matches_generate() {
    let dir = tempfile::tempdir().unwrap();
    let out = strict_both_batch_of_two(&lmcache_yaml(dir.path(), true), &[]);
    let summary = json_of(&out);
    // The verdict a newcomer reads, from the colocated run --role both makes by default.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("decode output equals a single-engine run: yes (token ids and logits digest, 2 requests)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("text is noise; compare token ids"),
        "{stderr}"
    );
    let decode = &summary["decode"];
    assert!(summary["lmcache_hit_tokens"]["decode"].as_u64().unwrap() >= 256);
    assert_eq!(summary["prefill"]["num_requests"], 2);
    let prompt_tokens = decode["requests"][0]["prompt_token_count"]
        .as_u64()
        .unwrap();
    assert!((256..1000).contains(&prompt_tokens), "{prompt_tokens}");
    assert_eq!(summary["engine_id"], decode["engine_id"]);
    assert_eq!(summary["engine_id"], summary["prefill"]["engine_id"]);
    // The figures that show the connector's share of time to first token.
    let request = &decode["requests"][0];
    assert!(request["load_bytes"].as_u64().unwrap() > 0);
    assert!(request["load_gbps"].as_f64().unwrap() > 0.0);
    assert_same_output(decode, &colocated("8", "2", "1"), "lmcache");
}

/// LMCache's default hash, `builtin`, as LMCache deployments run it (PYTHONHASHSEED=0): the
/// decode process finds the prefill process's chunks and matches `generate`.
#[test]
fn lmcache_smoke_with_builtin_hash_hits_and_matches_generate() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = lmcache_yaml_hashed(dir.path(), true, "builtin");
    let out = strict_both_batch_of_two(&yaml, &[("PYTHONHASHSEED", "0".as_ref())]);
    let summary = json_of(&out);
    assert!(summary["lmcache_hit_tokens"]["decode"].as_u64().unwrap() >= 256);
    assert_same_output(&summary["decode"], &colocated("8", "2", "1"), "builtin");
}

#[test]
fn decode_that_differs_from_its_reference_run_is_an_error_exit() {
    // A reference run of another prompt: decode cannot equal it.
    let other = tempfile::NamedTempFile::new().unwrap();
    let reference = run(
        "generate",
        &[
            "--max-tokens",
            "8",
            "--prompt",
            "Another prompt entirely.",
            "--prompt-repeat",
            "20",
        ],
        &[],
    );
    std::fs::write(other.path(), json_of(&reference).to_string()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = lmcache_yaml(dir.path(), true);
    let mut args = STRICT_BOTH.to_vec();
    args.extend(PROMPT);
    args.extend(["--verify-against", other.path().to_str().unwrap()]);
    let out = run(
        "disagg_lmcache_smoke",
        &args,
        &[("LMCACHE_CONFIG_FILE", yaml.as_os_str())],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("decode output equals a single-engine run: NO")
            && stderr.contains(
                "decode output differs from a single-engine run: request req-0: output token"
            ),
        "{stderr}"
    );
    // --no-verify leaves the comparison out and succeeds.
    let mut args = STRICT_BOTH.to_vec();
    args.extend(PROMPT);
    args.push("--no-verify");
    let out = run(
        "disagg_lmcache_smoke",
        &args,
        &[("LMCACHE_CONFIG_FILE", yaml.as_os_str())],
    );
    json_of(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not checked (--no-verify)"));
}

#[test]
fn shared_storage_smoke_matches_generate_in_several_layouts() {
    let reference = colocated("6", "1", "1");
    for layout in ["flash_attn_nhd", "flash_infer_hnd", "rbln_kv_first"] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = shared_storage_phases(dir.path());
        args.extend(["--layout", layout]);
        let summary = json_of(&run("disagg_shared_storage_smoke", &args, &[]));
        let decode = &summary["decode"];
        assert_eq!(summary["connector"], "SharedStorageConnector");
        assert!(decode["requests"][0]["hit_tokens"].as_u64().unwrap() >= 256);
        assert_same_output(decode, &reference, layout);
    }
}

#[test]
fn a_process_local_config_cannot_satisfy_require_hit() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = lmcache_yaml(dir.path(), false);
    let out = run(
        "disagg_lmcache_smoke",
        &[
            "--strict-lmcache",
            "--require-lmcache-hit",
            "--lmcache-config-file",
            yaml.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("process-local"), "{stderr}");
}

#[test]
fn require_hit_fails_when_decode_hits_too_little() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = lmcache_yaml(dir.path(), true);
    // One prompt copy is shorter than a chunk, and partial chunks are discarded: no hit.
    let out = run(
        "disagg_lmcache_smoke",
        &[
            "--strict-lmcache",
            "--require-lmcache-hit",
            "--discard-partial-chunks",
            "--prompt-repeat",
            "1",
            "--decode-max-tokens",
            "2",
        ],
        &[("LMCACHE_CONFIG_FILE", yaml.as_os_str())],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("decode hit 0 tokens"), "{stderr}");
}

#[test]
fn a_corrupted_chunk_on_disk_is_recomputed_by_the_decode_process() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = lmcache_yaml(dir.path(), true);
    let env = [("LMCACHE_CONFIG_FILE", yaml.as_os_str())];
    let phase = |role: &str| {
        let args = strict_phase(role);
        json_of(&run("disagg_lmcache_smoke", &args, &env))
    };
    phase("prefill");
    let mut chunks: Vec<PathBuf> = std::fs::read_dir(dir.path().join("disk"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 4096))
        .collect();
    chunks.sort();
    // The first chunk in key order; whichever it is, decode must not load it.
    let victim = chunks.first().expect("prefill saved no chunk files");
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0xff;
    std::fs::write(victim, bytes).unwrap();
    let decode = phase("decode");
    assert!(
        decode["recomputed_tokens"].as_u64().unwrap() > 0,
        "{decode}"
    );
    assert_same_output(&decode, &colocated("6", "1", "1"), "corrupted");
}

#[test]
fn generate_loads_a_written_checkpoint_like_the_embedded_model() {
    use kvrelay_engine::{LlamaConfig, Model};
    let dir = tempfile::tempdir().unwrap();
    // The embedded model's weights, written as a Hugging Face checkpoint.
    let model = Model::tiny_random(16);
    model
        .weights()
        .save(&LlamaConfig::tiny_random(), dir.path())
        .unwrap();
    let args = ["--max-tokens", "4", "--prompt-repeat", "2"];
    let mut from_dir = vec!["--model", dir.path().to_str().unwrap()];
    from_dir.extend(args);
    let loaded = json_of(&run("generate", &from_dir, &[]));
    let embedded = json_of(&run("generate", &args, &[]));
    assert_same_output(&loaded, &embedded, "checkpoint");
}

#[cfg(not(feature = "rbln"))]
#[test]
fn device_rbln_needs_the_rbln_feature() {
    let out = run("generate", &["--device", "rbln", "--max-tokens", "1"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("built without the `rbln` feature"),
        "{stderr}"
    );
}

//! Helpers the example-running tests share: run an example binary as a process, read its
//! JSON, write an LMCache YAML, compare decode output with the colocated `generate`.
// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// An example binary `cargo test` built next to this test's executable.
pub fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let path = deps
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing; build the examples first with the features of this test run (cargo build --examples [--features rbln])",
        path.display()
    );
    path
}

pub fn run(name: &str, args: &[&str], envs: &[(&str, &OsStr)]) -> Output {
    let mut cmd = Command::new(example(name));
    cmd.args(args).env_remove("LMCACHE_CONFIG_FILE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

pub fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "exit {:?}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON document ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// An LMCache YAML under `dir` (256-token chunks, sha256_cbor), with a local-disk tier
/// both processes share when `shared`, else only the process-local CPU tier.
pub fn lmcache_yaml(dir: &Path, shared: bool) -> PathBuf {
    lmcache_yaml_hashed(dir, shared, "sha256_cbor")
}

/// [`lmcache_yaml`] with another `pre_caching_hash_algorithm`.
pub fn lmcache_yaml_hashed(dir: &Path, shared: bool, hash: &str) -> PathBuf {
    let path = dir.join("lmcache.yaml");
    let tier = if shared {
        format!(
            "local_disk: \"file://{}\"\nmax_local_disk_size: 1\n",
            dir.join("disk").display()
        )
    } else {
        String::new()
    };
    std::fs::write(
        &path,
        format!(
            "chunk_size: 256\nlocal_cpu: true\nmax_local_cpu_size: 1\n{tier}\
             pre_caching_hash_algorithm: {hash}\nsave_unfull_chunk: true\n"
        ),
    )
    .unwrap();
    path
}

/// One field of every request of a phase.
pub fn per_request(phase: &Value, field: &str) -> Vec<Value> {
    phase["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[field].clone())
        .collect()
}

pub fn assert_same_output(decode: &Value, reference: &Value, what: &str) {
    for field in ["output_token_ids", "logits_digest"] {
        assert_eq!(
            per_request(decode, field),
            per_request(reference, field),
            "{what}: {field}"
        );
    }
}

/// The seed's strict LMCache smoke: both roles, decode must hit, 8 decode tokens.
pub const STRICT_BOTH: [&str; 8] = [
    "--role",
    "both",
    "--strict-lmcache",
    "--require-lmcache-hit",
    "--min-lmcache-hit-tokens",
    "1",
    "--decode-max-tokens",
    "8",
];

/// Both phases through shared storage (the shared-storage smoke, or the LMCache smoke's
/// host fallback) with files under `dir`: 6 decode tokens on [`PROMPT`].
pub fn shared_storage_phases(dir: &Path) -> Vec<&str> {
    let mut args = vec![
        "--shared-storage-path",
        dir.to_str().unwrap(),
        "--decode-max-tokens",
        "6",
    ];
    args.extend(PROMPT);
    args
}

/// One phase (`role`) of the strict LMCache smoke: 6 decode tokens on [`PROMPT`].
pub fn strict_phase(role: &str) -> Vec<&str> {
    let mut args = vec![
        "--role",
        role,
        "--strict-lmcache",
        "--decode-max-tokens",
        "6",
    ];
    args.extend(PROMPT);
    args
}

/// A prompt of a few hundred tokens (5 copies of the default sentence).
pub const PROMPT: [&str; 4] = ["--prompt-repeat", "5", "--block-size", "64"];

/// `generate` (host KV) on the prompts of a smoke run with --prefill-batch-size `batch`
/// and --prefill-repeat-stride `stride`.
pub fn colocated(max_tokens: &str, batch: &str, stride: &str) -> Value {
    let mut args = vec![
        "--max-tokens",
        max_tokens,
        "--batch-size",
        batch,
        "--repeat-stride",
        stride,
    ];
    args.extend(PROMPT);
    json_of(&run("generate", &args, &[]))
}

/// Each request's `hit_tokens` in a phase's summary.
pub fn hits(phase: &Value) -> Vec<u64> {
    phase["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["hit_tokens"].as_u64().unwrap())
        .collect()
}

/// Every request of the phase loaded at least one 256-token chunk.
pub fn assert_all_hit(phase: &Value, what: &str) {
    let hits = hits(phase);
    assert!(
        !hits.is_empty() && hits.iter().all(|&h| h >= 256),
        "{what}: hit tokens {hits:?}"
    );
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

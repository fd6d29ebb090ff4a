//! The seed's RBLN smoke commands (seeds/000, reference/rbln.md §4) with `--device rbln`:
//! the engine's KV cache lives in device memory of the `rbln-emu` test double, loaded
//! through rbln-sys's ordinary path (`RBLN_RUNTIME_LIB`), and every decode must give the
//! tokens and logits of the colocated `generate` on the host.
//!
//! Build the double first: `cargo build -p rbln-emu` (scripts/test.sh does); it is found
//! next to this test's target directory, or at `RBLN_EMU_LIB`.
#![cfg(feature = "rbln")]

mod common;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Output;

use kvrelay::device::rbln::test_double_for;
use serde_json::Value;

use common::{
    assert_all_hit, assert_same_output, colocated, json_of, lmcache_yaml, run,
    shared_storage_phases, stderr, strict_phase, PROMPT, STRICT_BOTH,
};

fn emulator_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs example `name` with `--device rbln --model tiny-random` and `args`, on the emulator,
/// with `env` on top.
fn rbln(name: &str, args: &[&str], env: &[(&str, &OsStr)]) -> Output {
    let emulator = emulator_path();
    let mut all = vec!["--device", "rbln", "--model", "tiny-random"];
    all.extend(args);
    let mut envs = vec![("RBLN_RUNTIME_LIB", emulator.as_os_str())];
    envs.extend(env);
    run(name, &all, &envs)
}

#[test]
fn shared_storage_smoke_on_rbln_matches_generate() {
    let reference = colocated("6", "1", "1");
    // The default layout with --device rbln (rbln_kv_first), the other RBLN layout, and one
    // that interleaves blocks (several byte ranges per block).
    for layout in [None, Some("rbln_blocks_first"), Some("flash_attn_nhd")] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = shared_storage_phases(dir.path());
        if let Some(layout) = layout {
            args.extend(["--layout", layout]);
        }
        let summary = json_of(&rbln("disagg_shared_storage_smoke", &args, &[]));
        let what = layout.unwrap_or("default layout");
        assert_eq!(summary["connector"], "SharedStorageConnector", "{what}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_some());
        assert_all_hit(&summary["decode"], what);
        assert_same_output(&summary["decode"], &reference, what);
    }
}

#[test]
fn lmcache_smoke_on_rbln_falls_back_to_the_host_connector() {
    let dir = tempfile::tempdir().unwrap();
    // A usable LMCache config: the RBLN routing still takes the host fallback.
    let yaml = lmcache_yaml(dir.path(), true);
    let storage = dir.path().join("host");
    let out = rbln(
        "disagg_lmcache_smoke",
        &shared_storage_phases(&storage),
        &[("LMCACHE_CONFIG_FILE", yaml.as_os_str())],
    );
    let summary = json_of(&out);
    assert_eq!(
        summary["connector"],
        "RBLNHostConnector (host fallback for LMCacheConnectorV1)"
    );
    assert!(
        stderr(&out).contains("RBLNHostConnector"),
        "{}",
        stderr(&out)
    );
    // KV went through files at --shared-storage-path, not through LMCache's tiers.
    assert!(std::fs::read_dir(&storage).unwrap().next().is_some());
    assert!(!dir.path().join("disk").exists());
    assert!(summary.get("lmcache_config_file").is_none(), "{summary}");
    assert_all_hit(&summary["decode"], "host fallback");
    assert_same_output(
        &summary["decode"],
        &colocated("6", "1", "1"),
        "host fallback",
    );
}

/// The strict LMCache smoke, both roles, as the seed runs it (with `extra` flags).
fn strict_both(extra: &[&str], yaml: &Path) -> Value {
    let mut args = STRICT_BOTH.to_vec();
    args.extend(extra);
    args.extend(PROMPT);
    let summary = json_of(&rbln(
        "disagg_lmcache_smoke",
        &args,
        &[("LMCACHE_CONFIG_FILE", yaml.as_os_str())],
    ));
    assert_eq!(summary["connector"], "RBLNLMCacheConnectorV1");
    assert_eq!(summary["prefill"]["connector"], "RBLNLMCacheConnectorV1");
    assert!(summary["lmcache_hit_tokens"]["decode"].as_u64().unwrap() >= 256);
    assert_all_hit(&summary["decode"], "strict");
    summary
}

#[test]
fn strict_lmcache_smoke_on_rbln_hits_and_matches_generate() {
    let dir = tempfile::tempdir().unwrap();
    let summary = strict_both(&[], &lmcache_yaml(dir.path(), true));
    assert_same_output(&summary["decode"], &colocated("8", "1", "1"), "strict");
}

#[test]
fn strict_lmcache_smoke_on_rbln_decodes_every_request_of_a_batch() {
    let dir = tempfile::tempdir().unwrap();
    let summary = strict_both(
        &["--prefill-batch-size", "2"],
        &lmcache_yaml(dir.path(), true),
    );
    assert_eq!(summary["prefill"]["num_requests"], 2);
    assert_eq!(summary["decode"]["num_requests"], 2);
    assert_same_output(&summary["decode"], &colocated("8", "2", "1"), "batch");
}

#[test]
fn prefill_batch_of_different_lengths_on_rbln_then_decode_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = lmcache_yaml(dir.path(), true);
    // Decode loads asynchronously: each request waits for its load, then the engine fetches
    // its blocks from the device when it is promoted.
    let mut text = std::fs::read_to_string(&yaml).unwrap();
    text.push_str("enable_async_loading: true\n");
    std::fs::write(&yaml, text).unwrap();
    let env = [("LMCACHE_CONFIG_FILE", yaml.as_os_str())];
    let phase = |role: &str, extra: &[&str]| {
        let mut args = vec![
            "--role",
            role,
            "--strict-lmcache",
            "--prefill-batch-size",
            "3",
            "--prefill-repeat-stride",
            "2",
            "--max-num-seqs",
            "3",
        ];
        args.extend(extra);
        args.extend(PROMPT);
        json_of(&rbln("disagg_lmcache_smoke", &args, &env))
    };
    // The seed's command.
    let prefill = phase("prefill", &[]);
    assert_eq!(prefill["connector"], "RBLNLMCacheConnectorV1");
    assert_eq!(prefill["num_requests"], 3);
    let lengths: Vec<u64> = prefill["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["prompt_token_count"].as_u64().unwrap())
        .collect();
    assert!(lengths.windows(2).all(|w| w[0] < w[1]), "{lengths:?}");
    assert!(prefill["connector_stats"]["saved_chunks"].as_u64().unwrap() >= 3);
    let decode = phase("decode", &["--decode-max-tokens", "4"]);
    assert_all_hit(&decode, "async decode");
    assert_same_output(&decode, &colocated("4", "3", "2"), "async decode");
}

#[test]
fn a_runtime_copy_error_during_the_decode_load_is_recomputed() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = lmcache_yaml(dir.path(), true);
    let phase = |role: &str, env: &[(&str, &OsStr)]| {
        let args = strict_phase(role);
        let mut envs = vec![("LMCACHE_CONFIG_FILE", yaml.as_os_str())];
        envs.extend(env);
        json_of(&rbln("disagg_lmcache_smoke", &args, &envs))
    };
    phase("prefill", &[]);
    // The decode process's first runtime copy is the connector's load; it fails once.
    let fail_once = [
        ("RBLN_EMU_FAIL_AFTER", OsStr::new("0")),
        ("RBLN_EMU_FAIL_COUNT", OsStr::new("1")),
    ];
    let decode = phase("decode", &fail_once);
    assert!(
        decode["recomputed_tokens"].as_u64().unwrap() > 0,
        "{decode}"
    );
    assert!(
        decode["connector_stats"]["failed_load_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{decode}"
    );
    assert_same_output(&decode, &colocated("6", "1", "1"), "failed load");
}

#[test]
fn rbln_setup_and_copy_errors_exit_with_a_clear_message() {
    let emulator = emulator_path();
    let generate = |env: &[(&str, &OsStr)]| {
        let mut envs = vec![("RBLN_RUNTIME_LIB", emulator.as_os_str())];
        envs.extend(env);
        let out = run(
            "generate",
            &[
                "--device",
                "rbln",
                "--max-tokens",
                "2",
                "--prompt-repeat",
                "1",
            ],
            &envs,
        );
        assert!(!out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let missing = OsString::from("/nonexistent/librbln.so");
    let message = generate(&[("RBLN_RUNTIME_LIB", &missing)]);
    assert!(
        message.contains("cannot open the RBLN runtime library /nonexistent/librbln.so"),
        "{message}"
    );
    let message = generate(&[("RBLN_DEVICES", OsStr::new("3,0"))]);
    assert!(
        message.contains("device 3 does not exist: the runtime has 1"),
        "{message}"
    );
    let message = generate(&[("RBLN_DEVICES", OsStr::new("npu0"))]);
    assert!(message.contains("RBLN_DEVICES=npu0"), "{message}");
    // Every runtime copy fails: the engine's first flush of its KV to the device.
    let message = generate(&[("RBLN_EMU_FAIL_AFTER", OsStr::new("0"))]);
    assert!(
        message.contains("KV cache memory") && message.contains("rbln_memcpy_h2v_async"),
        "{message}"
    );
    // The seed's smoke flows report the same way.
    let out = rbln(
        "disagg_shared_storage_smoke",
        &["--role", "prefill"],
        &[("RBLN_RUNTIME_LIB", &missing)],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--device rbln") && stderr(&out).contains("/nonexistent"),
        "{}",
        stderr(&out)
    );
}

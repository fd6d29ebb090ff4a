//! The seed's smoke flows with `--device ascend` (LMCache-Ascend's 1p1d, seed 004): the
//! engine's KV cache lives in device memory of the `ascend-emu` test double, loaded
//! through ascend-sys's ordinary path (`KVRELAY_ASCENDCL_LIB`), in vllm-ascend's layout
//! (`ascend_separate_kv`, block size 128 by default), and every decode must give the
//! tokens and logits digest of the colocated `generate` on the host.
//!
//! Build the double first: `cargo build -p ascend-emu` (scripts/test.sh does); it is found
//! next to this test's target directory, or at `ASCEND_EMU_LIB`.
#![cfg(feature = "ascend")]

mod common;

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::process::Output;

use kvrelay::device::ascend::test_double_for;

use common::{
    assert_all_hit, assert_same_output, colocated, json_of, lmcache_yaml, run,
    shared_storage_phases, stderr, strict_phase, PROMPT, STRICT_BOTH,
};

fn emulator_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs example `name` with `--device ascend --model tiny-random` and `args` on the
/// emulator reporting CANN `version`, with `env` on top.
fn ascend(name: &str, version: &str, args: &[&str], env: &[(&str, &OsStr)]) -> Output {
    let emulator = emulator_path();
    let mut all = vec!["--device", "ascend", "--model", "tiny-random"];
    all.extend(args);
    let mut envs = vec![
        ("KVRELAY_ASCENDCL_LIB", emulator.as_os_str()),
        ("ASCEND_EMU_CANN_VERSION", OsStr::new(version)),
    ];
    envs.extend(env);
    run(name, &all, &envs)
}

#[test]
fn shared_storage_smoke_on_ascend_matches_generate() {
    let reference = colocated("6", "1", "1");
    for (version, layout) in [("8.5.0", None), ("8.3.0", Some("flash_attn_nhd"))] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = shared_storage_phases(dir.path());
        if let Some(layout) = layout {
            args.extend(["--layout", layout]);
        }
        let summary = json_of(&ascend("disagg_shared_storage_smoke", version, &args, &[]));
        let what = format!("CANN {version} {}", layout.unwrap_or("ascend_separate_kv"));
        assert_eq!(summary["connector"], "SharedStorageConnector", "{what}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_some());
        assert_all_hit(&summary["decode"], &what);
        assert_same_output(&summary["decode"], &reference, &what);
    }
}

#[test]
fn strict_lmcache_smoke_on_ascend_hits_and_matches_generate() {
    let reference = colocated("8", "1", "1");
    // The seed's command on each copy path; block size 128 (the ascend default) and 64.
    for (version, block_size) in [("8.5.0", None), ("8.3.0", None), ("9.1.0", Some("64"))] {
        let dir = tempfile::tempdir().unwrap();
        let yaml = lmcache_yaml(dir.path(), true);
        let mut args = STRICT_BOTH.to_vec();
        args.extend(&PROMPT[..2]);
        if let Some(block_size) = block_size {
            args.extend(["--block-size", block_size]);
        }
        let out = ascend(
            "disagg_lmcache_smoke",
            version,
            &args,
            &[("LMCACHE_CONFIG_FILE", yaml.as_os_str())],
        );
        let summary = json_of(&out);
        let what = format!("CANN {version} block size {}", block_size.unwrap_or("128"));
        assert_eq!(summary["connector"], "LMCacheConnectorV1", "{what}");
        assert!(
            summary["lmcache_hit_tokens"]["decode"].as_u64().unwrap() >= 256,
            "{what}: {summary}"
        );
        assert_all_hit(&summary["decode"], &what);
        assert_same_output(&summary["decode"], &reference, &what);
    }
}

#[test]
fn a_runtime_copy_error_during_the_decode_load_is_recomputed() {
    for version in ["8.5.0", "8.3.0"] {
        let dir = tempfile::tempdir().unwrap();
        let yaml = lmcache_yaml(dir.path(), true);
        let phase = |role: &str, env: &[(&str, &OsStr)]| {
            let args = strict_phase(role);
            let mut envs = vec![("LMCACHE_CONFIG_FILE", yaml.as_os_str())];
            envs.extend(env);
            json_of(&ascend("disagg_lmcache_smoke", version, &args, &envs))
        };
        phase("prefill", &[]);
        // The decode process's first runtime copy is the connector's load; it fails once.
        let fail_once = [
            ("ASCEND_EMU_FAIL_AFTER", OsStr::new("0")),
            ("ASCEND_EMU_FAIL_COUNT", OsStr::new("1")),
        ];
        let decode = phase("decode", &fail_once);
        assert!(
            decode["recomputed_tokens"].as_u64().unwrap() > 0,
            "{version}: {decode}"
        );
        assert!(
            decode["connector_stats"]["failed_load_tokens"]
                .as_u64()
                .unwrap()
                > 0,
            "{version}: {decode}"
        );
        assert_same_output(&decode, &colocated("6", "1", "1"), "failed load");
    }
}

#[test]
fn ascend_setup_errors_exit_with_a_clear_message() {
    let generate = |version: &str, env: &[(&str, &OsStr)]| {
        let out = ascend(
            "generate",
            version,
            &["--max-tokens", "2", "--prompt-repeat", "1"],
            env,
        );
        assert!(!out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let missing = OsString::from("/nonexistent/libascendcl.so");
    let message = generate("8.5.0", &[("KVRELAY_ASCENDCL_LIB", &missing)]);
    assert!(
        message.contains("--device ascend")
            && message.contains("cannot open libascendcl.so at /nonexistent/libascendcl.so"),
        "{message}"
    );
    let message = generate("7.0.0", &[]);
    assert!(
        message.contains("needs CANN 8.0.0 or newer, but this installation is CANN 7.0.0"),
        "{message}"
    );
    let message = generate("8.5.0", &[("ASCEND_RT_VISIBLE_DEVICES", OsStr::new("5"))]);
    assert!(
        message.contains("device 0 does not exist: the runtime sees 0"),
        "{message}"
    );
    // Every runtime copy fails: the engine's first flush of its KV to the device.
    let message = generate("8.5.0", &[("ASCEND_EMU_FAIL_AFTER", OsStr::new("0"))]);
    assert!(
        message.contains("KV cache memory") && message.contains("aclrtMemcpy"),
        "{message}"
    );
}

//! Runs the real `kvrelay keys` binary against the cbor2 vectors and on bad input.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const VECTORS: &str = include_str!("../../kvrelay/tests/data/sha256_cbor_vectors.json");
const BUILTIN: &str = include_str!("../../kvrelay/tests/data/builtin_vectors.json");

fn keys(args: &[&str], stdin: &str) -> Output {
    keys_with_seed(args, stdin, None)
}

/// Runs `kvrelay keys` with `PYTHONHASHSEED` set to `seed`, or unset.
fn keys_with_seed(args: &[&str], stdin: &str, seed: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvrelay"));
    cmd.arg("keys").args(args).env_remove("PYTHONHASHSEED");
    if let Some(seed) = seed {
        cmd.env("PYTHONHASHSEED", seed);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvrelay");
    // The binary may exit before reading stdin (bad flags), so a closed pipe is fine here.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    child.wait_with_output().expect("wait for kvrelay")
}

/// A vector case's expected keys.
fn case_keys(case: &serde_json::Value) -> Vec<&str> {
    case["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("utf-8 output")
}

const MODEL: &[&str] = &["--model", "meta-llama/Llama-3.2-1B", "--dtype", "bfloat16"];

#[test]
fn prints_the_cbor2_vector_keys() {
    let v: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
    let lists = v["token_lists"].as_array().unwrap();
    let cases = v["cases"].as_array().unwrap();
    // Every seed and chunk size, on the 257- and 4097-token lists.
    let mut checked = 0;
    for case in cases
        .iter()
        .filter(|c| [3, 4].contains(&c["tokens"].as_u64().unwrap()))
    {
        let tokens = lists[case["tokens"].as_u64().unwrap() as usize].to_string();
        let chunk = case["chunk_size"].as_u64().unwrap().to_string();
        let seed = case["seed"].as_str().unwrap();
        let mut args = MODEL.to_vec();
        args.extend([
            "--hash",
            "sha256_cbor",
            "--seed",
            seed,
            "--chunk-size",
            &chunk,
        ]);
        args.extend(["--world-size", "1", "--worker-id", "0"]);
        let out = keys(&args, &tokens);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let expected = case_keys(case);
        assert_eq!(text(&out.stdout).lines().collect::<Vec<_>>(), expected);
        checked += 1;
    }
    assert_eq!(checked, 18);
}

#[test]
fn defaults_are_sha256_cbor_chunk_256_and_vllm_seed() {
    let mut tokens: Vec<u32> = (1..=256).collect();
    tokens.extend([7, 8, 9]);
    let out = keys(MODEL, &serde_json::to_string(&tokens).unwrap());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "meta-llama/Llama-3.2-1B@1@0@d32563aadec44566@bfloat16\n\
         meta-llama/Llama-3.2-1B@1@0@4f6c3c8690a1033c@bfloat16\n"
    );
}

#[test]
fn empty_array_prints_nothing() {
    let out = keys(MODEL, " [ ] ");
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_input_fails_with_a_message() {
    let dtype_bf16 = ["--model", "m", "--dtype", "bfloat16"];
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (dtype_bf16.to_vec(), "[1, 2", "not valid JSON"),
        (dtype_bf16.to_vec(), "{\"tokens\": [1]}", "JSON array"),
        (dtype_bf16.to_vec(), "[1, -5]", "-5 at index 1"),
        (dtype_bf16.to_vec(), "[4294967296]", "4294967296 at index 0"),
        (dtype_bf16.to_vec(), "[1.5]", "1.5 at index 0"),
        (dtype_bf16.to_vec(), "[\"7\"]", "index 0"),
        (
            vec!["--model", "m", "--dtype", "complex64"],
            "[1]",
            "complex64",
        ),
        (
            [&dtype_bf16[..], &["--world-size", "2", "--worker-id", "2"]].concat(),
            "[]",
            "worker_id 2",
        ),
        (
            [&dtype_bf16[..], &["--chunk-size", "0"]].concat(),
            "[1]",
            "chunk_size",
        ),
        (
            [&dtype_bf16[..], &["--hash", "builtin"]].concat(),
            "[1]",
            "PYTHONHASHSEED=0",
        ),
        (
            [&dtype_bf16[..], &["--hash", "builtin", "--seed", "random"]].concat(),
            "[1]",
            "not a fixed seed",
        ),
        (
            [&dtype_bf16[..], &["--hash", "builtin", "--cpython", "3.7"]].concat(),
            "[1]",
            "3.10 or 3.11",
        ),
        ([&dtype_bf16[..], &["--hash", "md5"]].concat(), "[1]", "md5"),
        (vec!["--model", "a@b", "--dtype", "half"], "[1]", "'@'"),
    ];
    for (args, stdin, needle) in cases {
        let out = keys(&args, stdin);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {stdin:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} {stdin:?}");
        assert!(stderr.contains(needle), "{args:?} {stdin:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// LMCache's `builtin` keys, as CPython's hash() gives them, from `PYTHONHASHSEED` in the
/// environment as LMCache reads it: CPython 3.11 and 3.10, with and without vLLM, seeds 0
/// and 42, with the trailing partial chunk kept and dropped.
#[test]
fn builtin_keys_match_cpython_vectors() {
    let v: serde_json::Value = serde_json::from_str(BUILTIN).unwrap();
    let lists = v["token_lists"].as_array().unwrap();
    let mut checked = 0;
    for case in v["cases"].as_array().unwrap() {
        let list = case["tokens"].as_u64().unwrap() as usize;
        // Tokens 0..255 (the LMCache check value) and the 1000-token list, at chunk 256.
        if ![0, 5].contains(&list) || case["chunk_size"] != 256 {
            continue;
        }
        let tokens = lists[list].to_string();
        let expected = case_keys(case);
        let mut args = MODEL.to_vec();
        args.extend(["--hash", "builtin", "--cpython"]);
        args.push(case["cpython"].as_str().unwrap());
        if case["with_vllm"] == false {
            args.push("--without-vllm");
        }
        let seed = case["seed"].as_str().unwrap();
        let out = keys_with_seed(&args, &tokens, Some(seed));
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout).lines().collect::<Vec<_>>(), expected);
        // LMCache's config default: the partial chunk (1000 = 3 * 256 + 232) is not saved.
        args.extend(["--save-unfull-chunk", "false"]);
        let out = keys_with_seed(&args, &tokens, Some(seed));
        assert!(out.status.success(), "{}", text(&out.stderr));
        let full = lists[list].as_array().unwrap().len() / 256;
        assert_eq!(
            text(&out.stdout).lines().collect::<Vec<_>>(),
            expected[..full]
        );
        checked += 1;
    }
    assert_eq!(checked, 16);
}

#[test]
fn builtin_without_vllm_needs_no_seed() {
    let v: serde_json::Value = serde_json::from_str(BUILTIN).unwrap();
    let case = v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["with_vllm"] == false && c["tokens"] == 5 && c["chunk_size"] == 256)
        .unwrap();
    let mut args = MODEL.to_vec();
    args.extend(["--hash", "builtin", "--without-vllm"]);
    let out = keys(&args, &v["token_lists"][5].to_string());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(serde_json::json!(lines), case["keys"]);
}

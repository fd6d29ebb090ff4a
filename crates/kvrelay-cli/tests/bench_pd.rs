//! `kvrelay bench pd` on a small prompt: it runs chunked prefill against a decoder engine,
//! checks the decoder's output, and prints its figures as one JSON line.

use std::process::Command;

#[test]
fn bench_pd_prints_its_figures_for_a_chunked_prefill() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["bench", "pd", "--prompt-tokens", "1024"])
        .args(["--max-num-batched-tokens", "256", "--rounds", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["bench"], "pd");
    assert_eq!(line["prefill_steps"], 4, "{line}");
    for figure in [
        "prefill_compute_ms",
        "total_transfer_ms",
        "one_chunk_transfer_ms",
    ] {
        assert!(line[figure].as_f64().unwrap() > 0.0, "{figure}: {line}");
    }
    assert!(line["kv_ready_delay_ms"].is_number(), "{line}");
    assert!(line["goal_met"].is_boolean(), "{line}");
    // The decoder looks up 1,023 tokens: three whole chunks and 255 tokens, each sent
    // layer by layer in the step that computed it.
    assert_eq!(line["layered_chunks"], 4, "{line}");

    let refused = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["bench", "pd", "--rounds", "0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--rounds"));
}

//! `kvrelay bench soak` as CI runs it, shortened: PD traffic through the proxy ends with
//! every answer equal to the engine alone and no page of the decoder's PD buffer in use.
//! (`scripts/test.sh` runs the full 3,000-request soak on a release build.)

use std::process::Command;

use serde_json::Value;

#[test]
fn a_short_soak_through_the_proxy_ends_with_no_pd_page_in_use() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["bench", "soak", "--requests", "40", "--concurrency", "4"])
        .args(["--prompts", "12"])
        .output()
        .expect("run kvrelay bench soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    assert_eq!(line["requests"], 40);
    assert_eq!(line["all_ok_and_equal_to_colocated"], true);
    assert_eq!(line["decoder_pd_buffer_used_pages_at_end"], 0.0);
    assert_eq!(line["decoder_pd_buffer_requests_at_end"], 0.0);
    // The decoder loaded KV from the prefiller instead of computing every prompt.
    assert!(line["decoder_hit_tokens"].as_f64().unwrap() > 0.0, "{line}");
}

//! `kvrelay bench transfer` on a small request: a real PD send per round against the
//! transport's baseline, printed as one JSON line of medians with every round's ratio.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["bench", "transfer"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bench_transfer_prints_medians_and_each_rounds_ratio() {
    for transport in ["tcp", "shm"] {
        let out = bench(&[
            "--transport",
            transport,
            "--size-mib",
            "64",
            "--rounds",
            "3",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap();
        assert_eq!(line["bench"], "transfer");
        assert_eq!(line["transport"], transport);
        assert_eq!(
            line["chunks"], 2,
            "64 MiB of Llama-8B KV is two chunks: {line}"
        );
        let ratios = line["round_ratios"].as_array().unwrap();
        assert_eq!(ratios.len(), 3, "{line}");
        assert!(ratios.iter().all(|r| r.as_f64().unwrap() > 0.0), "{line}");
        for figure in [
            "gbps",
            "baseline",
            "ratio",
            "best_gbps",
            "baseline_best_gbps",
        ] {
            assert!(line[figure].as_f64().unwrap() > 0.0, "{figure}: {line}");
        }
        // A median is never above the best of the same runs.
        assert!(
            line["best_gbps"].as_f64() >= line["gbps"].as_f64(),
            "{line}"
        );
        let configs = line["baseline_configs"].as_array().map_or(0, Vec::len);
        if transport == "tcp" {
            assert_eq!(configs, 16, "{line}");
            assert!(line["baseline_config"].is_string(), "{line}");
        } else {
            assert_eq!(configs, 0, "{line}");
            assert!(
                line["memcpy_private_gbps"].as_f64().unwrap() > 0.0,
                "{line}"
            );
        }
    }
    let refused = bench(&["--rounds", "0"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--rounds"));
}

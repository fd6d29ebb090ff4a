//! `kvrelay bench copy --device ascend` on the `ascend-emu` test double: its lines say they
//! are emulated, and carry the runtime calls per plan of each copy path. Build the double
//! first: `cargo build -p ascend-emu` (scripts/test.sh does).
#![cfg(feature = "ascend")]

use std::process::Command;

use kvrelay::device::ascend::test_double_for;
use serde_json::Value;

fn bench(version: &str) -> Vec<Value> {
    let exe = std::env::current_exe().unwrap();
    let emu = test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args([
            "bench",
            "copy",
            "--device",
            "ascend",
            "--layout",
            "ascend_separate_kv",
        ])
        .args(["--tokens", "256", "--rounds", "1"])
        .env("KVRELAY_ASCENDCL_LIB", emu)
        .env("ASCEND_EMU_CANN_VERSION", version)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn bench_copy_on_the_test_double_is_marked_emulated_and_counts_calls_per_plan() {
    for (version, path) in [("8.5.0", "Batch"), ("8.3.0", "PerRange")] {
        let lines = bench(version);
        let benches: Vec<&str> = lines.iter().map(|l| l["bench"].as_str().unwrap()).collect();
        assert_eq!(benches, ["copy_gather", "copy_scatter"]);
        for line in &lines {
            assert_eq!(line["emulated"], true, "{line}");
            assert_eq!(line["device"], "ascend:0");
            assert_eq!(line["copy_path"], path);
            assert_eq!(line["cann_version"], version);
            let calls = line["runtime_calls_per_plan"].as_f64().unwrap();
            let runs = line["runs"].as_f64().unwrap();
            if path == "Batch" {
                assert_eq!(calls, 2.0, "{line}");
            } else {
                assert!(calls > 2.0 && calls <= runs + 1.0, "{line}");
            }
            assert_eq!(line["synchronizes_per_plan"], 1.0);
        }
    }
}

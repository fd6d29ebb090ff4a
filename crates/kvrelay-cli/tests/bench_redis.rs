//! `kvrelay bench store --tier redis`: with the `redis` feature it starts its own
//! redis-server and prints put and get figures with their SET/GET baselines; without the
//! feature it says how to get one.

use std::process::{Command, Output};

fn bench_redis(extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvrelay"))
        .args(["bench", "store", "--tier", "redis"])
        .args(extra)
        .output()
        .unwrap()
}

#[cfg(feature = "redis")]
#[test]
fn reports_put_and_get_against_the_raw_baseline() {
    let out = bench_redis(&[
        "--bytes",
        "2097152",
        "--chunk-bytes",
        "262144",
        "--rounds",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines.iter().map(|l| l["bench"].as_str().unwrap()).collect();
    assert_eq!(names, ["store_redis_put", "store_redis_get"]);
    for line in &lines {
        assert_eq!(line["bytes"], 2097152);
        for field in ["gbps", "baseline", "ratio"] {
            assert!(line[field].as_f64().unwrap() > 0.0, "{line}");
        }
    }
    // A chunk size that is not whole tokens of the bench's geometry is refused.
    let out = bench_redis(&["--chunk-bytes", "1000"]);
    assert_eq!(out.status.code(), Some(2));
}

#[cfg(not(feature = "redis"))]
#[test]
fn without_the_feature_it_says_how_to_build_one() {
    let out = bench_redis(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--features redis"));
}

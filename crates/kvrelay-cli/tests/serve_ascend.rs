//! `kvrelay serve --device ascend` on the `ascend-emu` test double: each TP rank's KV on
//! its own NPU, answers bit-identical to one host rank's, and a TP size larger than the
//! NPUs the runtime sees refused at start. Build the double first: `cargo build -p
//! ascend-emu` (scripts/test.sh does).
#![cfg(feature = "ascend")]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use kvrelay::device::ascend::test_double_for;
use serde_json::{json, Value};

/// `kvrelay serve` with `args` on the double with `devices` NPUs.
fn serve(args: &[&str], devices: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let emu = test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kvrelay"));
    cmd.args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .env("KVRELAY_ASCENDCL_LIB", emu)
        .env("ASCEND_EMU_CANN_VERSION", "9.1.0")
        .env("ASCEND_EMU_DEVICES", devices)
        .env_remove("ASCEND_RT_VISIBLE_DEVICES")
        .env_remove("ASCEND_HOME_PATH");
    cmd
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(mut cmd: Command) -> Server {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[kvrelay] {line}");
            let _ = tx.send(line);
        }
    });
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server listens");
        if let Some((_, url)) = line.split_once("listening on ") {
            break url.trim().to_string();
        }
    };
    Server { child, url }
}

fn complete(server: &Server) -> Value {
    ureq::post(&format!("{}/v1/completions", server.url))
        .send_json(json!({"prompt": "KV cache on two NPUs", "max_tokens": 16}))
        .unwrap()
        .into_json()
        .unwrap()
}

#[test]
fn two_ranks_on_two_npus_answer_like_one_host_rank_bit_for_bit() {
    let npu = start(serve(
        &["--device", "ascend", "--tensor-parallel-size", "2"],
        "2",
    ));
    let host = start(serve(&[], "2"));
    let (on_npu, on_host) = (complete(&npu), complete(&host));
    let ids = &on_npu["choices"][0]["token_ids"];
    assert_eq!(ids.as_array().map(Vec::len), Some(16), "{on_npu}");
    assert_eq!(ids, &on_host["choices"][0]["token_ids"]);
    assert_eq!(on_npu["logits_digest"], on_host["logits_digest"]);
}

#[test]
fn a_tp_size_larger_than_the_npus_is_refused_at_start() {
    let Output { status, stderr, .. } =
        serve(&["--device", "ascend", "--tensor-parallel-size", "2"], "1")
            .output()
            .unwrap();
    assert!(!status.success());
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(
        stderr.contains("tensor_parallel_size 2 needs one NPU per rank")
            && stderr.contains("device 1 does not exist: the runtime sees 1"),
        "{stderr}"
    );
}

//! Prefill and decode as two processes sharing KV through the SharedStorageConnector, as
//! vllm-rbln's `run_disagg_shared_storage_smoke.py` does; prints a JSON summary.
//!
//! `cargo run --release --example disagg_shared_storage_smoke -- --model tiny-random --shared-storage-path DIR`

use clap::Parser;
use kvrelay_examples::smoke::{main_with, Flow, SharedStorageSmoke};

fn main() -> std::process::ExitCode {
    let args = SharedStorageSmoke::parse();
    main_with(&args.common, Flow::SharedStorage)
}

//! Prefill and decode as two processes sharing KV through the LMCache connector, as
//! vllm-rbln's `run_disagg_lmcache_smoke.py` does; prints a JSON summary with the hit
//! tokens of each phase.
//!
//! `cargo run --release --example disagg_lmcache_smoke -- --role both --strict-lmcache --require-lmcache-hit`

use clap::Parser;
use kvrelay_examples::smoke::{main_with, Flow, LmcacheSmoke};

fn main() -> std::process::ExitCode {
    let args = LmcacheSmoke::parse();
    main_with(&args.common, Flow::Lmcache(&args.lmcache))
}

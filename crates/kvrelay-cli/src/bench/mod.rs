//! `kvrelay bench`: each bench runs kvrelay's path and its physical baseline in the same
//! process, interleaved, and prints one JSON object per line.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Subcommand;

mod copy;
#[cfg(feature = "ascend")]
mod copy_ascend;
#[cfg(feature = "rbln")]
mod copy_rbln;
mod hash;
mod pd;
mod soak;
mod store;
#[cfg(feature = "redis")]
mod store_redis;
mod transfer;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Gather and scatter of a Llama-3-8B-shaped request against one copy of the same bytes
    /// (memcpy on the host device; the runtime's own copy with `--device rbln` or `ascend`).
    Copy(copy::CopyArgs),
    /// sha256_cbor chunk keys of 1M tokens against a plain sha256 of the same CBOR bytes.
    Hash(hash::HashArgs),
    /// Disk-tier put then get of 1 GiB of chunks against a plain file write then read;
    /// `--tier redis`: the Redis tier against plain SET/GET of the same values.
    Store(store::StoreArgs),
    /// A PD request sent over loopback (tcp or shm) against a plain socket stream or a memcpy.
    Transfer(transfer::TransferArgs),
    /// Thousands of short and long completions through `kvrelay proxy` over a PD
    /// prefiller and decoder: every answer must equal the engine alone, and the decoder's
    /// PD buffer must end with no page in use.
    Soak(soak::SoakArgs),
    /// An 8,192-token prompt in chunked prefill on the reference engine, its KV pushed to a
    /// decoder engine as each chunk is computed: prefill compute time and the KV-ready delay
    /// after the last step, against one chunk's and the whole prompt's transfer time.
    Pd(pd::PdArgs),
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode, String> {
    match cmd {
        BenchCommand::Copy(args) => copy::run(args),
        BenchCommand::Hash(args) => hash::run(args),
        BenchCommand::Store(args) => store::run(args),
        BenchCommand::Transfer(args) => transfer::run(args),
        BenchCommand::Soak(args) => soak::run(args),
        BenchCommand::Pd(args) => pd::run(args),
    }?;
    Ok(ExitCode::SUCCESS)
}

/// Llama-3.1-8B at TP1 in bf16: 128 KiB of KV per token, 32 MiB per 256-token chunk. The
/// chunk geometry the store and transfer benches move.
pub const LLAMA_8B_CHUNKS: kvrelay::layout::KvCacheSpec = kvrelay::layout::KvCacheSpec {
    num_layers: 32,
    num_kv_heads: 8,
    head_size: 128,
    dtype: kvrelay::KvDtype::Bf16,
    block_size: 16,
    num_blocks: 1,
    attention: kvrelay::layout::AttentionKind::Mha,
};

/// Runs `f` `rounds` times and returns the fastest duration: the least disturbed by a noisy
/// machine.
pub fn best_of(rounds: usize, mut f: impl FnMut()) -> Duration {
    (0..rounds.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .expect("at least one round")
}

/// One result line. `unit` is the figure's key ("gbps" or "mtok_s"); `ratio` is
/// kvrelay / baseline, so higher is better and 1.0 means as fast as the baseline.
pub fn print_result(bench: &str, unit: &str, value: f64, baseline: f64, extra: serde_json::Value) {
    let mut line = serde_json::json!({
        "bench": bench,
        unit: round3(value),
        "baseline": round3(baseline),
        "ratio": round3(value / baseline),
    });
    if let (Some(line), serde_json::Value::Object(extra)) = (line.as_object_mut(), extra) {
        line.extend(extra);
    }
    println!("{line}");
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Gigabytes (1e9 bytes) per second.
pub fn gbps(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

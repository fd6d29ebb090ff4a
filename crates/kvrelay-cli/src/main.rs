//! The `kvrelay` command: chunk keys, disk-tier maintenance, benchmarks, and the
//! `serve`/`proxy` HTTP servers, and `doctor`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod doctor;
mod http;
mod keys_cmd;
mod proxy;
mod serve;
mod store_cmd;

#[derive(Parser)]
#[command(
    name = "kvrelay",
    version,
    about = "Move LLM KV cache between engines and tiers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print one LMCache key string per chunk of the JSON token-id array read on stdin.
    Keys(keys_cmd::KeysArgs),
    /// Inspect and maintain a disk tier directory.
    #[command(subcommand)]
    Store(store_cmd::StoreCommand),
    /// Measure a hot path against its physical baseline in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Serve the reference engine over an OpenAI-compatible HTTP API (vLLM's flags).
    Serve(serve::ServeArgs),
    /// Disaggregated-prefill proxy: prefill on one server, decode on another.
    Proxy(proxy::ProxyArgs),
    /// What kvrelay finds of the host, RBLN and Ascend stacks (libraries, versions,
    /// devices, usable copy paths and PD channels); exit 1 when --device cannot work.
    Doctor(doctor::DoctorArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Keys(args) => keys_cmd::run(args),
        Command::Store(cmd) => store_cmd::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Serve(args) => serve::run(args),
        Command::Proxy(args) => proxy::run(args),
        Command::Doctor(args) => doctor::run(args),
    };
    match outcome {
        Ok(code) => code,
        Err(message) => {
            eprintln!("kvrelay: {message}");
            ExitCode::from(2)
        }
    }
}

//! The `kvrelay` command: chunk keys, disk-tier maintenance and benchmarks.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod keys_cmd;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Keys(args) => keys_cmd::run(args),
        Command::Store(cmd) => store_cmd::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
    };
    match outcome {
        Ok(code) => code,
        Err(message) => {
            eprintln!("kvrelay: {message}");
            ExitCode::from(2)
        }
    }
}

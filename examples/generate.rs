//! The reference engine alone, without a connector (a colocated run): prints the same
//! per-request JSON as the smoke examples, so a disaggregated run can be compared with it.
//!
//! `cargo run --release --example generate -- --model tiny-random --prompt TEXT --prompt-repeat N --max-tokens N [--batch-size N --repeat-stride N]`

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use kvrelay_engine::SamplingParams;
use kvrelay_examples::engine_args::{phase_json, EngineArgs, PromptArgs};

#[derive(Parser, Debug)]
#[command(about = "Run the reference engine on its own and print per-request JSON")]
struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    prompt: PromptArgs,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Prompts in the batch; prompt i repeats the text prompt_repeat + i * repeat_stride times.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    repeat_stride: usize,
}

fn run(args: &Args) -> Result<(), String> {
    let texts = args.prompt.texts(args.batch_size, args.repeat_stride);
    let (mut engine, tokenizer) = args
        .engine
        .engine(args.engine.max_num_seqs.max(texts.len()))?;
    let prompts = texts
        .iter()
        .map(|t| tokenizer.encode(t))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let outputs = engine
        .generate(&prompts, SamplingParams::greedy(args.max_tokens))
        .map_err(|e| e.to_string())?;
    let phase = phase_json(
        "generate",
        started.elapsed().as_secs_f64(),
        &outputs,
        &tokenizer,
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&phase).map_err(|e| e.to_string())?
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

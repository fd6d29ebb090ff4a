//! `kvrelay keys`: the LMCache key of every chunk of a token-id array, to compare a kvrelay
//! deployment's keys with an LMCache engine's.

use std::io::{self, BufWriter, Read, Write};
use std::process::ExitCode;

use kvrelay::keys::{
    BuiltinHash, CacheKey, ChunkHasher, CpythonVersion, HashAlgorithm, DEFAULT_CHUNK_SIZE,
};
use kvrelay::KvDtype;

#[derive(clap::Args)]
pub struct KeysArgs {
    /// Model name exactly as given to `vllm serve` (it is part of the key).
    #[arg(long)]
    model: String,
    /// Engine world size (tensor x pipeline parallel ranks).
    #[arg(long, default_value_t = 1)]
    world_size: u32,
    /// This worker's rank, below --world-size.
    #[arg(long, default_value_t = 0)]
    worker_id: u32,
    /// KV cache dtype: half, bfloat16, float, fp8_e4m3fn, fp8_e5m2, int8 (or an alias).
    #[arg(long)]
    dtype: String,
    /// Chunk hash: sha256_cbor or builtin (LMCache's, CPython's hash()), or xxh3_128
    /// (kvrelay only).
    #[arg(long, default_value = "sha256_cbor")]
    hash: String,
    /// NONE_HASH seed [default: $PYTHONHASHSEED, else "vllm-none-hash", as vLLM 0.33]. With
    /// --hash builtin it is the PYTHONHASHSEED LMCache ran with, which must then be set.
    #[arg(long)]
    seed: Option<String>,
    /// With --hash builtin: the CPython LMCache ran on, 3.10 (3.8 to 3.10) or 3.11 (and later).
    #[arg(long, default_value = "3.11", value_parser = parse_cpython)]
    cpython: CpythonVersion,
    /// With --hash builtin: LMCache ran without vLLM importable (NONE_HASH = 0).
    #[arg(long)]
    without_vllm: bool,
    /// Tokens per chunk.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    chunk_size: usize,
    /// Print a key for the trailing partial chunk too (LMCache's save_unfull_chunk; its
    /// config default is false, and PD forces it on).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    save_unfull_chunk: bool,
}

fn parse_cpython(text: &str) -> Result<CpythonVersion, String> {
    CpythonVersion::parse(text).ok_or_else(|| {
        format!("{text:?} is not a CPython version kvrelay knows: expected 3.10 or 3.11")
    })
}

pub fn run(args: KeysArgs) -> Result<ExitCode, String> {
    let dtype: KvDtype = args.dtype.parse().map_err(|e| format!("--dtype: {e}"))?;
    let algorithm = match args.hash.parse().map_err(|e| format!("--hash: {e}"))? {
        HashAlgorithm::Builtin(_) => HashAlgorithm::Builtin(BuiltinHash {
            cpython: args.cpython,
            with_vllm: !args.without_vllm,
        }),
        other => other,
    };
    let hasher = match &args.seed {
        Some(seed) => ChunkHasher::new(algorithm, seed, args.chunk_size),
        None => ChunkHasher::from_env(algorithm, args.chunk_size),
    }
    .map_err(|e| e.to_string())?;
    let model = CacheKey::model_name(&args.model).map_err(|e| format!("--model: {e}"))?;
    // Validated once, before reading stdin, so an empty input still reports a bad rank; each
    // chunk then only swaps in its hash.
    let mut key = CacheKey::with_model(model, args.world_size, args.worker_id, 0, dtype)
        .map_err(|e| e.to_string())?
        .signed(algorithm.signed());

    let mut input = String::new();
    io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("reading stdin: {e}"))?;
    let mut tokens = parse_tokens(&input)?;
    if !args.save_unfull_chunk {
        tokens.truncate(tokens.len() / args.chunk_size * args.chunk_size);
    }

    let mut out = BufWriter::new(io::stdout().lock());
    let mut written = Ok(());
    hasher.for_each_chunk(&tokens, |_, _, hash| {
        if written.is_ok() {
            key.chunk_hash = hash;
            written = writeln!(out, "{key}");
        }
    });
    match written.and_then(|()| out.flush()) {
        // A closed pipe (`kvrelay keys ... | head`) is the reader's choice, not an error.
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(format!("writing stdout: {e}")),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// A JSON array of token ids, each a non-negative integer that fits in u32.
fn parse_tokens(input: &str) -> Result<Vec<u32>, String> {
    let value: serde_json::Value = serde_json::from_str(input)
        .map_err(|e| format!("stdin is not valid JSON ({e}); expected an array of token ids"))?;
    let serde_json::Value::Array(items) = value else {
        return Err("stdin must be a JSON array of token ids, e.g. [128000, 791, 4062]".into());
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            item.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    format!(
                        "token id {item} at index {index} is not an integer in 0..={}",
                        u32::MAX
                    )
                })
        })
        .collect()
}

//! `kvrelay bench hash`: chunk keys of a long prompt against the physical floor of sha256_cbor,
//! a plain SHA-256 over the same CBOR bytes already encoded (same messages, same count).

use std::hint::black_box;
use std::time::Duration;

use kvrelay::keys::{sha256_cbor_message, ChunkHasher, HashAlgorithm, DEFAULT_SEED};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::{best_of, print_result};

/// Llama 3's vocabulary: ids straddle the 2-byte and 4-byte CBOR forms, as in real prompts.
const VOCAB: u32 = 128_256;

#[derive(clap::Args)]
pub struct HashArgs {
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 1_000_000)]
    tokens: usize,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    chunk_size: usize,
    /// Interleaved rounds; each figure is the best round.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
}

pub fn run(args: HashArgs) -> Result<(), String> {
    if args.tokens == 0 {
        return Err("--tokens must be at least 1".into());
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x006b_7672_656c_6179);
    let tokens: Vec<u32> = (0..args.tokens).map(|_| rng.gen_range(0..VOCAB)).collect();
    let new = |algorithm| {
        ChunkHasher::new(algorithm, DEFAULT_SEED, args.chunk_size).map_err(|e| e.to_string())
    };
    let sha = new(HashAlgorithm::Sha256Cbor)?;
    let fast = new(HashAlgorithm::Xxh3_128)?;

    // The baseline hashes exactly the messages sha256_cbor hashes, so check that it does.
    let hashes = sha.chunk_hashes(&tokens);
    let prefixes = std::iter::once(sha.none_hash()).chain(hashes.iter().copied());
    let messages: Vec<Vec<u8>> = tokens
        .chunks(args.chunk_size)
        .zip(prefixes)
        .map(|(chunk, prefix)| {
            let mut msg = Vec::new();
            sha256_cbor_message(prefix, chunk, &mut msg);
            msg
        })
        .collect();
    let plain: Vec<u64> = messages.iter().map(|m| fold(&Sha256::digest(m))).collect();
    if plain != hashes {
        return Err("sha256_cbor disagrees with sha256 of its own CBOR bytes".into());
    }
    let cbor_bytes: usize = messages.iter().map(Vec::len).sum();

    let mut out = vec![0u64; hashes.len()];
    let (mut t_base, mut t_sha, mut t_fast) = (Duration::MAX, Duration::MAX, Duration::MAX);
    for _ in 0..args.rounds.max(1) {
        t_base = t_base.min(best_of(1, || {
            for (slot, msg) in out.iter_mut().zip(&messages) {
                *slot = fold(&Sha256::digest(black_box(msg)));
            }
            black_box(&out);
        }));
        t_sha = t_sha.min(best_of(1, || {
            sha.for_each_chunk(black_box(&tokens), |i, _, h| out[i] = h);
            black_box(&out);
        }));
        t_fast = t_fast.min(best_of(1, || {
            fast.for_each_chunk(black_box(&tokens), |i, _, h| out[i] = h);
            black_box(&out);
        }));
    }

    let mtok_s = |t: Duration| tokens.len() as f64 / t.as_secs_f64() / 1e6;
    let baseline = mtok_s(t_base);
    for (algorithm, elapsed) in [
        (HashAlgorithm::Sha256Cbor, t_sha),
        (HashAlgorithm::Xxh3_128, t_fast),
    ] {
        print_result(
            "hash",
            "mtok_s",
            mtok_s(elapsed),
            baseline,
            serde_json::json!({
                "algorithm": algorithm.name(),
                "baseline_what": "sha256 of pre-encoded sha256_cbor messages",
                "tokens": tokens.len(),
                "chunk_size": args.chunk_size,
                "chunks": hashes.len(),
                "cbor_bytes": cbor_bytes,
                "baseline_gbps": super::gbps(cbor_bytes, t_base),
                "rounds": args.rounds.max(1),
            }),
        );
    }
    Ok(())
}

fn fold(digest: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

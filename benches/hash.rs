//! Chunk keys of a 1M-token prompt (Llama 3 vocabulary, chunk 256) with sha256_cbor and the
//! fast default. `kvrelay bench hash` compares the same work against a plain SHA-256.
//!
//! And the PD checksum (xxh3-64 over 64 KiB segment digests) against one plain xxh3-64 of
//! the same bytes, which is what cutting the chunk into segments costs: one 64 KiB segment
//! in cache, as a tcp receiver hashes it just after reading it, and 256 MiB out of cache,
//! as an shm receiver does.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvrelay::keys::{ChunkHasher, HashAlgorithm, DEFAULT_CHUNK_SIZE, DEFAULT_SEED};
use kvrelay::transfer::frame::{checksum, CHECKSUM_SEGMENT};
use rand::{Rng, SeedableRng};

const TOKENS: usize = 1_000_000;
const VOCAB: u32 = 128_256;

fn chunk_keys(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x006b_7672_656c_6179);
    let tokens: Vec<u32> = (0..TOKENS).map(|_| rng.gen_range(0..VOCAB)).collect();
    let mut out = vec![0u64; TOKENS.div_ceil(DEFAULT_CHUNK_SIZE)];

    let mut group = c.benchmark_group("hash");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(TOKENS as u64));
    for algorithm in HashAlgorithm::ALL {
        // builtin's seed is a PYTHONHASHSEED value, which must be an integer.
        let seed = if algorithm.signed() {
            "0"
        } else {
            DEFAULT_SEED
        };
        let hasher = ChunkHasher::new(algorithm, seed, DEFAULT_CHUNK_SIZE).expect("valid hasher");
        group.bench_function(algorithm.name(), |b| {
            b.iter(|| {
                hasher.for_each_chunk(black_box(&tokens), |i, _, hash| out[i] = hash);
                black_box(&out);
            })
        });
    }
    group.finish();
}

fn segment_digests(c: &mut Criterion) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut group = c.benchmark_group("checksum");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, len) in [
        ("segment_in_cache", CHECKSUM_SEGMENT),
        ("out_of_cache", 256 << 20),
    ] {
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(format!("{name}/segmented"), |b| {
            b.iter(|| checksum(black_box(&bytes)))
        });
        group.bench_function(format!("{name}/one_pass"), |b| {
            b.iter(|| twox_hash::XxHash3_64::oneshot(black_box(&bytes)))
        });
    }
    group.finish();
}

criterion_group!(benches, chunk_keys, segment_digests);
criterion_main!(benches);

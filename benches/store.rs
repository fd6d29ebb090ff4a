//! Criterion benches of the store tiers: put and get of 64 MiB in 4 MiB chunks, through the
//! disk tier (a temp dir, no fsync) and the cpu tier.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvrelay::keys::CacheKey;
use kvrelay::store::{ChunkMeta, CpuTier, DiskTier, DiskTierOptions, Tier};
use kvrelay::KvDtype;
use rand::RngCore;

const TOTAL: usize = 64 << 20;
const CHUNK: usize = 4 << 20;
const FINGERPRINT: u64 = 42;
const META: ChunkMeta = ChunkMeta {
    layout_fingerprint: FINGERPRINT,
    num_tokens: 256,
};

fn keys() -> Vec<CacheKey> {
    (0..(TOTAL / CHUNK) as u64)
        .map(|i| CacheKey::new("bench/model", 1, 0, i, KvDtype::Bf16).unwrap())
        .collect()
}

fn put_all(tier: &dyn Tier, keys: &[CacheKey], data: &[u8]) {
    for (key, chunk) in keys.iter().zip(data.chunks_exact(CHUNK)) {
        tier.put(key, META, chunk).unwrap();
    }
}

fn get_all(tier: &dyn Tier, keys: &[CacheKey]) {
    for key in keys {
        let chunk = tier.get(key, FINGERPRINT).unwrap().unwrap();
        std::hint::black_box(chunk);
    }
}

fn bench_tier(c: &mut Criterion, name: &str, tier: &dyn Tier) {
    let keys = keys();
    let mut data = vec![0u8; TOTAL];
    rand::thread_rng().fill_bytes(&mut data);
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .throughput(Throughput::Bytes(TOTAL as u64));
    // Each put starts from an empty tier, as a first save does.
    group.bench_function("put", |b| {
        b.iter_batched(
            || {
                for key in &keys {
                    tier.remove(key).unwrap();
                }
            },
            |()| put_all(tier, &keys, &data),
            BatchSize::PerIteration,
        )
    });
    put_all(tier, &keys, &data);
    group.bench_function("get", |b| b.iter(|| get_all(tier, &keys)));
    group.finish();
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskTier::open(dir.path(), DiskTierOptions::new(2 * TOTAL as u64)).unwrap();
    bench_tier(c, "store_disk", &disk);
    bench_tier(
        c,
        "store_cpu",
        &CpuTier::new(2 * TOTAL as u64, CHUNK).unwrap(),
    );
}

criterion_group!(benches, store);
criterion_main!(benches);

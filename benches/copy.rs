//! Criterion bench of the copy hot path: building a request's plan, and gather and scatter
//! between a paged host KV cache and chunk buffers through the host copy kernel, for a
//! token-major layout (runs of whole blocks) and two head-major ones (tiles of 256-byte
//! units), next to one memcpy of the same bytes.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvrelay::device::{Device, HostDevice, HostKvCache};
use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, ChunkWindow};
use kvrelay::KvDtype;

fn copy(c: &mut Criterion) {
    // Llama-3-8B geometry, 1024 tokens on scattered blocks (kept small for a 2-core box).
    let tokens = 1024;
    let spec = KvCacheSpec {
        num_layers: 32,
        num_kv_heads: 8,
        head_size: 128,
        dtype: KvDtype::Bf16,
        block_size: 16,
        num_blocks: 128,
        attention: AttentionKind::Mha,
    };
    let blocks: Vec<u32> = (0..64u32).map(|i| (i * 37) % 128).collect();
    let windows: Vec<ChunkWindow> = (0..tokens)
        .step_by(256)
        .map(|start| ChunkWindow {
            start,
            tokens: 256,
            skip_leading: 0,
        })
        .collect();
    let device = HostDevice;
    let bytes = spec.chunk_bytes(tokens);
    let mut group = c.benchmark_group("copy");
    group
        .sample_size(10)
        .throughput(Throughput::Bytes(bytes as u64));
    for kind in [
        LayoutKind::FlashAttnNhd,
        LayoutKind::FlashAttnHnd,
        LayoutKind::RblnKvFirst,
    ] {
        let layout = KvLayout::new(spec, kind).unwrap();
        group.bench_function(format!("plan_build/{kind}"), |b| {
            b.iter(|| paged_to_chunks(&layout, &blocks, &windows).unwrap())
        });
        let gather = paged_to_chunks(&layout, &blocks, &windows).unwrap();
        let scatter = gather.inverse();
        let cache = HostKvCache::new(layout).unwrap();
        let memory = cache.engine_memory();
        let mut chunks: Vec<_> = windows
            .iter()
            .map(|w| device.alloc_staging(spec.chunk_bytes(w.tokens)).unwrap())
            .collect();
        group.bench_function(format!("gather/{kind}"), |b| {
            b.iter(|| {
                let mut host: Vec<&mut [u8]> = chunks.iter_mut().map(|c| &mut c[..]).collect();
                let pending = device.start_gather(&gather, &memory, &mut host).unwrap();
                pending.wait().unwrap();
            })
        });
        group.bench_function(format!("scatter/{kind}"), |b| {
            b.iter(|| {
                let host: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
                let pending = device.start_scatter(&scatter, &host, &memory).unwrap();
                pending.wait().unwrap();
            })
        });
    }
    let (src, mut dst) = (vec![1u8; bytes], vec![0u8; bytes]);
    group.bench_function("memcpy_baseline", |b| b.iter(|| dst.copy_from_slice(&src)));
    group.finish();
}

criterion_group!(benches, copy);
criterion_main!(benches);

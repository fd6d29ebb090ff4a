//! `kvrelay bench copy`: gather and scatter of a Llama-3-8B-shaped request through the host
//! device, each against one memcpy of the same number of bytes.

use std::time::{Duration, Instant};

use kvrelay::device::{Device, DeviceError, HostBuffer, HostDevice, HostKvCache};
use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, ChunkWindow};
use kvrelay::KvDtype;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{best_of, gbps, print_result};

#[derive(clap::Args)]
pub struct CopyArgs {
    /// Tokens in the request.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Paged layout of the engine cache (see `kvrelay::layout::LayoutKind` names).
    #[arg(long, default_value = "flash_attn_nhd")]
    layout: String,
    /// Tokens per chunk.
    #[arg(long, default_value_t = 256)]
    chunk_size: usize,
    /// Timed rounds per path; the fastest counts.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

pub fn run(args: CopyArgs) -> Result<(), String> {
    let kind: LayoutKind = args.layout.parse().map_err(|e| format!("{e}"))?;
    if args.tokens == 0 || args.chunk_size == 0 {
        return Err("--tokens and --chunk-size must be at least 1".into());
    }
    let block_size = 16;
    let blocks_needed = args.tokens.div_ceil(block_size);
    // Twice the blocks the request needs, so its blocks are scattered through the cache.
    let spec = KvCacheSpec {
        num_layers: 32,
        num_kv_heads: 8,
        head_size: 128,
        dtype: KvDtype::Bf16,
        block_size,
        num_blocks: blocks_needed * 2,
        attention: AttentionKind::Mha,
    };
    let layout = KvLayout::new(spec, kind).map_err(|e| e.to_string())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut block_ids: Vec<u32> = (0..spec.num_blocks as u32).collect();
    block_ids.shuffle(&mut rng);
    block_ids.truncate(blocks_needed);
    let windows: Vec<ChunkWindow> = (0..args.tokens)
        .step_by(args.chunk_size)
        .map(|start| ChunkWindow {
            start,
            tokens: args.chunk_size.min(args.tokens - start),
            skip_leading: 0,
        })
        .collect();

    let plan_started = Instant::now();
    let gather = paged_to_chunks(&layout, &block_ids, &windows).map_err(|e| e.to_string())?;
    let plan_ms = plan_started.elapsed().as_secs_f64() * 1e3;
    let scatter = gather.inverse();
    let bytes = gather.total_bytes();

    let cache = HostKvCache::new(layout).map_err(|e| e.to_string())?;
    for i in 0..layout.num_buffers() {
        // SAFETY: no copy is running; fill (and so fault in) the whole cache.
        rng.fill(unsafe { cache.buffer_mut(i) });
    }
    let memory = cache.engine_memory();
    let device = HostDevice;
    let mut chunks = windows
        .iter()
        .map(|w| device.alloc_staging(spec.chunk_bytes(w.tokens)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    // The baseline's buffers come from the same allocator as kvrelay's (2 MiB aligned, huge
    // pages where THP allows) and are faulted in before timing, so both sides copy between
    // the same kind of memory. (In 4 KiB-page Vecs the memcpy measured 15-17.5 GB/s,
    // varying from process to process, against a steady ~18.5 GB/s here.)
    let mut baseline_src = HostBuffer::zeroed(bytes).map_err(|e| e.to_string())?;
    let mut baseline_dst = HostBuffer::zeroed(bytes).map_err(|e| e.to_string())?;
    rng.fill(&mut baseline_src[..]);
    baseline_dst.fill(1);
    // Fault in the chunk buffers before timing.
    chunks.iter_mut().for_each(|c| c.fill(1));

    let run_gather = |chunks: &mut [HostBuffer]| -> Result<(), DeviceError> {
        let mut host: Vec<&mut [u8]> = chunks.iter_mut().map(|c| &mut c[..]).collect();
        let pending = device.start_gather(&gather, &memory, &mut host)?;
        pending.wait()
    };
    let run_scatter = |chunks: &[HostBuffer]| -> Result<(), DeviceError> {
        let host: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
        let pending = device.start_scatter(&scatter, &host, &memory)?;
        pending.wait()
    };
    // Interleave kvrelay's path with the baseline so drift on a noisy machine hits both.
    let mut best = [Duration::MAX; 4];
    for _ in 0..args.rounds.max(1) {
        let started = Instant::now();
        run_gather(&mut chunks).map_err(|e| format!("gather failed: {e}"))?;
        best[0] = best[0].min(started.elapsed());
        best[1] = best[1].min(best_of(1, || baseline_dst.copy_from_slice(&baseline_src)));
        let started = Instant::now();
        run_scatter(&chunks).map_err(|e| format!("scatter failed: {e}"))?;
        best[2] = best[2].min(started.elapsed());
        best[3] = best[3].min(best_of(1, || baseline_dst.copy_from_slice(&baseline_src)));
    }
    std::hint::black_box(&baseline_dst);
    for (name, ours, baseline) in [
        ("copy_gather", best[0], best[1]),
        ("copy_scatter", best[2], best[3]),
    ] {
        print_result(
            name,
            "gbps",
            gbps(bytes, ours),
            gbps(bytes, baseline),
            serde_json::json!({
                "baseline_kind": "one memcpy of the same bytes",
                "baseline_buffers": "host buffers as kvrelay's (huge pages), pre-faulted",
                "layout": kind.name(),
                "tokens": args.tokens,
                "bytes": bytes,
                "runs": gather.runs().len(),
                "plan_build_ms": (plan_ms * 1000.0).round() / 1000.0,
                "device": device.name(),
            }),
        );
    }
    Ok(())
}

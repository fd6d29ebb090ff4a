//! `kvrelay bench copy`: gather and scatter of a Llama-3-8B-shaped request through a device,
//! each against the device's physical baseline: for the host device one memcpy of the same
//! number of bytes; for `--device rbln` (feature `rbln`) one runtime copy of the same bytes
//! between one device allocation and one host buffer.

use std::time::{Duration, Instant};

use kvrelay::device::{Device, DeviceError, EngineMemory, HostBuffer, HostDevice, HostKvCache};
use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::plan::{paged_to_chunks, ChunkWindow, CopyPlan};
use kvrelay::KvDtype;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::{gbps, print_result};

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
    /// Timed rounds per path (and plan builds); the fastest counts.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// The copy engine: `host` (memcpy), `rbln` (the RBLN runtime found through
    /// RBLN_RUNTIME_LIB and rbln-sys's search order; needs the `rbln` feature) or `ascend`
    /// (the CANN runtime found through KVRELAY_ASCENDCL_LIB and ascend-sys's search order;
    /// needs the `ascend` feature).
    #[arg(long, default_value = "host")]
    device: String,
    /// With `--device rbln`: `auto` copies plans of many small runs through a device-shaped
    /// host buffer (one runtime call per contiguous device range); `never` makes one runtime
    /// call per run.
    #[cfg(feature = "rbln")]
    #[arg(long, default_value = "auto")]
    rbln_staging: String,
}

/// What every device's bench shares: the request and its plans.
pub(super) struct Setup {
    pub kind: LayoutKind,
    pub spec: KvCacheSpec,
    pub layout: KvLayout,
    pub windows: Vec<ChunkWindow>,
    pub gather: CopyPlan,
    pub scatter: CopyPlan,
    pub plan_ms: f64,
    pub rng: rand::rngs::StdRng,
    pub rounds: usize,
}

impl Setup {
    /// The fields every result line of this bench carries.
    pub fn extra(&self, device: &str) -> serde_json::Value {
        serde_json::json!({
            "layout": self.kind.name(),
            "tokens": self.windows.iter().map(|w| w.tokens).sum::<usize>(),
            "bytes": self.gather.total_bytes(),
            "runs": self.gather.num_runs(),
            "plan_build_ms": (self.plan_ms * 1000.0).round() / 1000.0,
            "device": device,
        })
    }
}

/// One timed step of a bench round.
#[derive(Clone, Copy)]
pub(super) enum Step {
    Gather,
    GatherBaseline,
    Scatter,
    ScatterBaseline,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Gather => "gather",
            Step::GatherBaseline => "gather baseline",
            Step::Scatter => "scatter",
            Step::ScatterBaseline => "scatter baseline",
        }
    }
}

/// Runs `rounds` rounds of (gather, its baseline, scatter, its baseline), interleaved so
/// drift on a noisy machine hits both, and returns the fastest time of each step.
pub(super) fn time_rounds(
    rounds: usize,
    mut step: impl FnMut(Step) -> Result<(), String>,
) -> Result<[Duration; 4], String> {
    let steps = [
        Step::Gather,
        Step::GatherBaseline,
        Step::Scatter,
        Step::ScatterBaseline,
    ];
    let mut best = [Duration::MAX; 4];
    for _ in 0..rounds.max(1) {
        for (i, s) in steps.into_iter().enumerate() {
            let started = Instant::now();
            step(s)?;
            best[i] = best[i].min(started.elapsed());
        }
    }
    Ok(best)
}

/// The request's chunk buffers from `device`'s staging allocator, faulted in before timing.
pub(super) fn chunk_buffers(
    device: &dyn Device,
    spec: &KvCacheSpec,
    windows: &[ChunkWindow],
) -> Result<Vec<HostBuffer>, String> {
    let mut chunks = windows
        .iter()
        .map(|w| device.alloc_staging(spec.chunk_bytes(w.tokens)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    chunks.iter_mut().for_each(|c| c.fill(1));
    Ok(chunks)
}

/// Runs a gather or scatter step through `device`, or returns `None` for a baseline step.
pub(super) fn plan_step(
    device: &dyn Device,
    step: Step,
    (gather, scatter): (&CopyPlan, &CopyPlan),
    memory: &EngineMemory,
    chunks: &mut [HostBuffer],
) -> Option<Result<(), DeviceError>> {
    match step {
        Step::Gather => {
            let mut host: Vec<&mut [u8]> = chunks.iter_mut().map(|c| &mut c[..]).collect();
            Some(
                device
                    .start_gather(gather, memory, &mut host)
                    .and_then(|p| p.wait()),
            )
        }
        Step::Scatter => {
            let host: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
            Some(
                device
                    .start_scatter(scatter, &host, memory)
                    .and_then(|p| p.wait()),
            )
        }
        Step::GatherBaseline | Step::ScatterBaseline => None,
    }
}

/// Prints the gather and scatter lines from [`time_rounds`]' result.
pub(super) fn print_pair(bytes: usize, best: [Duration; 4], extra: serde_json::Value) {
    for (name, ours, baseline) in [
        ("copy_gather", best[0], best[1]),
        ("copy_scatter", best[2], best[3]),
    ] {
        print_result(
            name,
            "gbps",
            gbps(bytes, ours),
            gbps(bytes, baseline),
            extra.clone(),
        );
    }
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

    // The plan is built `rounds` times and the fastest build counts, as for the copies: on
    // a shared machine one build of a millisecond can take ten when the process is
    // descheduled.
    let mut plan_ms = f64::MAX;
    let mut gather = None;
    for _ in 0..args.rounds.max(1) {
        let plan_started = Instant::now();
        let plan = paged_to_chunks(&layout, &block_ids, &windows).map_err(|e| e.to_string())?;
        plan_ms = plan_ms.min(plan_started.elapsed().as_secs_f64() * 1e3);
        gather = Some(plan);
    }
    let gather = gather.ok_or("no plan was built")?;
    let scatter = gather.inverse();
    let setup = Setup {
        kind,
        spec,
        layout,
        windows,
        gather,
        scatter,
        plan_ms,
        rng,
        rounds: args.rounds,
    };
    match args.device.as_str() {
        "host" => run_host(setup),
        #[cfg(feature = "rbln")]
        "rbln" => super::copy_rbln::run(setup, &args.rbln_staging),
        #[cfg(not(feature = "rbln"))]
        "rbln" => Err(
            "--device rbln needs a kvrelay built with the `rbln` feature \
                       (cargo run -p kvrelay-cli --features rbln -- bench copy --device rbln)"
                .into(),
        ),
        #[cfg(feature = "ascend")]
        "ascend" => super::copy_ascend::run(setup),
        #[cfg(not(feature = "ascend"))]
        "ascend" => Err(
            "--device ascend needs a kvrelay built with the `ascend` feature \
                       (cargo run -p kvrelay-cli --features ascend -- bench copy --device ascend)"
                .into(),
        ),
        other => Err(format!(
            "unknown --device {other:?}; known: host, rbln, ascend"
        )),
    }
}

/// The device memory of a vendor device's bench: how to allocate it, copy into and out of
/// it with one synchronous runtime call (the baseline), and register it.
#[cfg(any(feature = "rbln", feature = "ascend"))]
pub(super) struct VendorMemory<B> {
    pub alloc: Box<dyn Fn(usize) -> Result<B, DeviceError>>,
    pub write: fn(&B, &[u8]) -> Result<(), DeviceError>,
    pub read: fn(&B, &mut [u8]) -> Result<(), DeviceError>,
    pub region: fn(&B) -> kvrelay::device::Region,
}

/// Times `setup`'s plans through a vendor `device` against one runtime copy of the same
/// bytes between one device allocation and one host buffer. The engine cache is one
/// allocation per layout buffer, filled with random bytes; `verify` checks its
/// registration. Returns the best times; the caller adds its runtime's figures to `extra`.
#[cfg(any(feature = "rbln", feature = "ascend"))]
pub(super) fn run_vendor<B>(
    device: &dyn Device,
    setup: Setup,
    memory: VendorMemory<B>,
    verify: impl FnOnce(&EngineMemory) -> Result<(), DeviceError>,
) -> Result<[Duration; 4], String> {
    let Setup {
        spec,
        layout,
        windows,
        gather,
        scatter,
        mut rng,
        rounds,
        ..
    } = setup;
    let bytes = gather.total_bytes();
    let failed = |e: DeviceError| e.to_string();
    let mut fill = vec![0u8; layout.buffer_bytes()];
    let buffers = (0..layout.num_buffers())
        .map(|_| {
            let buffer = (memory.alloc)(layout.buffer_bytes())?;
            rng.fill(&mut fill[..]);
            (memory.write)(&buffer, &fill)?;
            Ok(buffer)
        })
        .collect::<Result<Vec<B>, DeviceError>>()
        .map_err(failed)?;
    drop(fill);
    let regions = buffers.iter().map(memory.region).collect();
    // SAFETY: each region is a live device allocation of exactly that length, owned by
    // `buffers`, which lives until the end of this function, after the last copy.
    let engine = unsafe { EngineMemory::from_raw(layout, regions) }.map_err(failed)?;
    verify(&engine).map_err(failed)?;
    let mut chunks = chunk_buffers(device, &spec, &windows)?;
    let baseline_device = (memory.alloc)(bytes).map_err(failed)?;
    let mut baseline_host = HostBuffer::zeroed(bytes).map_err(failed)?;
    baseline_host.fill(1);
    let best = time_rounds(rounds, |step| {
        plan_step(device, step, (&gather, &scatter), &engine, &mut chunks)
            .unwrap_or_else(|| {
                if matches!(step, Step::GatherBaseline) {
                    (memory.read)(&baseline_device, &mut baseline_host)
                } else {
                    (memory.write)(&baseline_device, &baseline_host)
                }
            })
            .map_err(|e| format!("{} failed: {e}", step.name()))
    })?;
    drop(engine);
    drop(buffers);
    Ok(best)
}

fn run_host(setup: Setup) -> Result<(), String> {
    let device = HostDevice;
    let extra = setup.extra(device.name());
    let Setup {
        spec,
        layout,
        windows,
        gather,
        scatter,
        mut rng,
        rounds,
        ..
    } = setup;
    let bytes = gather.total_bytes();

    let cache = HostKvCache::new(layout).map_err(|e| e.to_string())?;
    for i in 0..layout.num_buffers() {
        // SAFETY: no copy is running; fill (and so fault in) the whole cache.
        rng.fill(unsafe { cache.buffer_mut(i) });
    }
    let memory = cache.engine_memory();
    let mut chunks = chunk_buffers(&device, &spec, &windows)?;
    // The baseline's buffers come from the same allocator as kvrelay's (2 MiB aligned, huge
    // pages where THP allows) and are faulted in before timing, so both sides copy between
    // the same kind of memory. (In 4 KiB-page Vecs the memcpy measured 15-17.5 GB/s,
    // varying from process to process, against a steady ~18.5 GB/s here.)
    let mut baseline_src = HostBuffer::zeroed(bytes).map_err(|e| e.to_string())?;
    let mut baseline_dst = HostBuffer::zeroed(bytes).map_err(|e| e.to_string())?;
    rng.fill(&mut baseline_src[..]);
    baseline_dst.fill(1);

    let best = time_rounds(rounds, |step| {
        plan_step(&device, step, (&gather, &scatter), &memory, &mut chunks)
            .unwrap_or_else(|| {
                baseline_dst.copy_from_slice(&baseline_src);
                Ok(())
            })
            .map_err(|e| format!("{} failed: {e}", step.name()))
    })?;
    std::hint::black_box(&baseline_dst);
    let mut extra = extra;
    extra["baseline_kind"] = "one memcpy of the same bytes".into();
    extra["baseline_buffers"] = "host buffers as kvrelay's (huge pages), pre-faulted".into();
    print_pair(bytes, best, extra);
    Ok(())
}

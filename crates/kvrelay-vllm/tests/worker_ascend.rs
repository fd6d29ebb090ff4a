//! The vLLM worker half on an Ascend NPU, against the `ascend-emu` test double (loaded
//! through `KVRELAY_ASCENDCL_LIB`, as `AscendDevice::open` finds a real CANN). Build the
//! double first: `cargo build -p ascend-emu` (scripts/test.sh does). Everything here is
//! emulated: no NPU, no CANN.
//!
//! vllm-ascend registers one `(K, V)` tuple per layer, each `[num_blocks, block_size,
//! heads, head_size]` in NPU memory; the worker half is built over them by
//! `build_worker_half`, the call kvrelay-py's `register_kv_caches` makes.
#![cfg(feature = "ascend")]

use kvrelay::device::ascend::{test_double_for, DeviceBuffer};
use kvrelay::device::{AscendDevice, Region};
use kvrelay_vllm::{
    build_half, build_worker_half, AdapterError, Half, NewStep, RegisteredWorker, SchedulerHalf,
    TensorError, TensorInfo, VllmEngine,
};

const LAYERS: usize = 2;
const BLOCKS: usize = 16;
const BLOCK: usize = 128;
const HEADS: usize = 4;
const HEAD_SIZE: usize = 32;
/// One token of one layer's K (or V): heads × head size bf16 values.
const ROW: usize = HEADS * HEAD_SIZE * 2;

fn engine() -> VllmEngine {
    VllmEngine {
        model: "/models/tiny-llama".into(),
        num_layers: LAYERS,
        num_kv_heads: HEADS,
        head_size: HEAD_SIZE,
        kv_dtype: "bfloat16".into(),
        block_size: BLOCK,
        num_blocks: BLOCKS,
        world_size: 1,
        rank: 0,
        device_type: "npu".into(),
        cpu_attn_isa: None,
    }
}

/// vllm-ascend's KV cache on emulated NPU 0: per layer a K and a V allocation.
struct NpuCache {
    buffers: Vec<DeviceBuffer>,
}

impl NpuCache {
    fn new(device: &AscendDevice, seed: u8) -> Self {
        let buffers = (0..2 * LAYERS)
            .map(|i| {
                let buffer = device.alloc(BLOCKS * BLOCK * ROW).unwrap();
                let bytes: Vec<u8> = (0..buffer.len())
                    .map(|j| (j as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
                    .collect();
                buffer.write(0, &bytes).unwrap();
                buffer
            })
            .collect();
        NpuCache { buffers }
    }

    /// The tensors as the Python shell describes them (`describe_kv_caches`).
    fn tensors(&self) -> Vec<TensorInfo> {
        self.buffers
            .iter()
            .enumerate()
            .map(|(i, buffer)| TensorInfo {
                name: format!("model.layers.{}.self_attn.attn", i / 2),
                part: Some(i % 2),
                device: "npu".into(),
                device_index: Some(0),
                dtype: "bfloat16".into(),
                element_size: 2,
                shape: vec![BLOCKS, BLOCK, HEADS, HEAD_SIZE],
                strides: vec![BLOCK * HEADS * HEAD_SIZE, HEADS * HEAD_SIZE, HEAD_SIZE, 1],
                data_ptr: Region::from(buffer).addr,
                backend: "ASCEND".into(),
            })
            .collect()
    }

    /// Buffer `i`'s bytes for `tokens` tokens over the block table `blocks`.
    fn gather(&self, i: usize, blocks: &[u32], tokens: usize) -> Vec<u8> {
        let mut all = vec![0u8; self.buffers[i].len()];
        self.buffers[i].read(0, &mut all).unwrap();
        (0..tokens)
            .flat_map(|t| {
                let at = (blocks[t / BLOCK] as usize * BLOCK + t % BLOCK) * ROW;
                all[at..at + ROW].to_vec()
            })
            .collect()
    }
}

/// The LMCache config of both engines: a disk tier they share.
fn env(dir: &std::path::Path) -> Vec<(String, String)> {
    let file = dir.join("lmcache.yaml");
    let yaml = format!(
        "chunk_size: 256\nlocal_cpu: false\nlocal_disk: \"file://{}\"\nmax_local_disk_size: 1\n",
        dir.join("disk").display()
    );
    std::fs::write(&file, yaml).unwrap();
    vec![("LMCACHE_CONFIG_FILE".into(), file.display().to_string())]
}

fn transfer(role: &str) -> String {
    format!(r#"{{"kv_connector":"KvrelayConnector","kv_connector_module_path":"kvrelay.vllm","kv_role":"{role}"}}"#)
}

/// Runs one vLLM step of request `id` over `blocks` through both halves: lookup,
/// allocation, metadata, load and save. Returns the tokens loaded.
fn step(
    scheduler: &mut SchedulerHalf,
    worker: &mut RegisteredWorker,
    id: &str,
    prompt: &[u32],
    blocks: &[u32],
) -> usize {
    let (hit, _) = scheduler
        .get_num_new_matched_tokens(id, prompt.to_vec(), None, 0)
        .unwrap()
        .unwrap();
    scheduler
        .update_state_after_alloc(id, blocks.to_vec(), hit)
        .unwrap();
    let new = NewStep {
        id: id.into(),
        block_ids: blocks.to_vec(),
        num_computed_tokens: prompt.len(),
    };
    let metadata = scheduler.build_connector_meta(vec![new], vec![]).unwrap();
    let kv = &mut worker.built.connector.worker;
    kv.bind_connector_metadata(metadata);
    kv.start_load_kv().unwrap();
    kv.wait_for_save().unwrap();
    kv.clear_connector_metadata();
    hit
}

fn halves(dir: &std::path::Path, role: &str, cache: &NpuCache) -> (SchedulerHalf, RegisteredWorker) {
    let scheduler = build_half(&engine(), &transfer(role), env(dir), Half::Scheduler).unwrap();
    // SAFETY: the tensors describe `cache`'s live allocations, which outlive the half (the
    // caller keeps `cache` until the half is dropped) and which nothing else writes.
    let worker =
        unsafe { build_worker_half(&engine(), &transfer(role), env(dir), &cache.tensors(), None) }
            .unwrap();
    (SchedulerHalf::new(scheduler.connector.scheduler), worker)
}

/// One test, so that the library path is set before any thread reads the environment.
#[test]
fn npu_kv_caches_save_and_load_bit_for_bit_and_other_npus_are_refused() {
    let exe = std::env::current_exe().unwrap();
    let emulator = test_double_for(&exe).unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("KVRELAY_ASCENDCL_LIB", emulator);
    let device = AscendDevice::open(0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..600).map(|t| t * 7 + 3).collect();

    // A producer on NPU 0 saves the prompt's two whole chunks (512 tokens).
    let producer_cache = NpuCache::new(&device, 0);
    let (mut scheduler, mut worker) = halves(dir.path(), "kv_producer", &producer_cache);
    assert_eq!(worker.layout.kind().to_string(), "ascend_separate_kv");
    let produced = [3, 7, 1, 9, 12];
    assert_eq!(
        step(&mut scheduler, &mut worker, "p", &prompt, &produced),
        0
    );
    assert_eq!(worker.built.connector.worker.stats().saved_chunks, 2);
    drop(worker);

    // A consumer on fresh allocations, other contents, another block table, loads them.
    let consumer_cache = NpuCache::new(&device, 0x5a);
    let (mut scheduler, mut worker) = halves(dir.path(), "kv_consumer", &consumer_cache);
    let consumed = [10, 2, 5, 0, 14];
    let untouched = consumer_cache.gather(0, &[15], BLOCK);
    assert_eq!(
        step(&mut scheduler, &mut worker, "c", &prompt, &consumed),
        512
    );
    for i in 0..2 * LAYERS {
        assert!(
            producer_cache.gather(i, &produced, 512) == consumer_cache.gather(i, &consumed, 512),
            "buffer {i}: the loaded KV differs from the saved KV"
        );
    }
    assert_eq!(consumer_cache.gather(0, &[15], BLOCK), untouched);
    drop(worker);

    // Tensors on two NPUs: refused, naming both devices.
    let mut two = producer_cache.tensors();
    two[3].device_index = Some(1);
    // SAFETY: refused before any memory is used.
    let error = unsafe {
        build_worker_half(&engine(), &transfer("kv_producer"), env(dir.path()), &two, None)
    }
    .err()
    .unwrap();
    assert!(
        matches!(error, AdapterError::Tensors(TensorError::MixedDevices { .. })),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("device npu:1") && message.contains("device npu:0"),
        "{message}"
    );
}

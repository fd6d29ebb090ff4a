//! The vLLM worker half on an emulated NPU, for each NPU's test binary: a KV cache in the
//! double's device memory described as vLLM's platform plugin hands it to
//! `register_kv_caches`, a prompt saved to a disk tier by one engine and loaded by
//! another on fresh allocations, compared bit for bit, and the refusals. The worker half
//! is built by `build_worker_half`, the call kvrelay-py's `register_kv_caches` makes.
#![allow(dead_code)] // each binary's device uses the part it needs

use kvrelay_vllm::{
    build_half, build_worker_half, AdapterError, Half, NewStep, RegisteredWorker, SchedulerHalf,
    TensorError, TensorInfo, VllmEngine,
};

pub const LAYERS: usize = 2;
pub const BLOCKS: usize = 16;
pub const BLOCK: usize = 128;
pub const HEADS: usize = 4;
pub const HEAD_SIZE: usize = 32;
/// One block of one head-group: block size × heads × head size bf16 values.
const BLOCK_BYTES: usize = BLOCK * HEADS * HEAD_SIZE * 2;

/// A device allocation of the double.
pub trait NpuBuffer {
    fn addr(&self) -> u64;
    fn write(&self, bytes: &[u8]);
    fn read(&self) -> Vec<u8>;
}

/// How an NPU's vLLM plugin hands its KV cache over.
pub struct Platform {
    /// `current_platform.device_type` and `tensor.device.type`.
    pub device: &'static str,
    /// Tensors per layer: vllm-ascend's `(K, V)` tuple, or one.
    pub per_layer: usize,
    /// Each tensor's shape.
    pub shape: Vec<usize>,
    /// How many times a tensor holds `[num_blocks, block]`: 2 when K and V share it.
    pub outer: usize,
    /// The layout kvrelay must recognize.
    pub layout: &'static str,
    pub backend: &'static str,
}

impl Platform {
    fn tensor_bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }

    pub fn engine(&self) -> VllmEngine {
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
            device_type: self.device.into(),
            cpu_attn_isa: None,
        }
    }
}

/// A KV cache on NPU 0 of the double, filled with a pattern that depends on `seed`.
pub struct NpuCache<'a> {
    platform: &'a Platform,
    buffers: Vec<Box<dyn NpuBuffer>>,
}

impl<'a> NpuCache<'a> {
    pub fn new(
        platform: &'a Platform,
        alloc: &dyn Fn(usize) -> Box<dyn NpuBuffer>,
        seed: u8,
    ) -> Self {
        let len = platform.tensor_bytes();
        let buffers = (0..LAYERS * platform.per_layer)
            .map(|i| {
                let buffer = alloc(len);
                let bytes: Vec<u8> = (0..len)
                    .map(|j| (j as u8).wrapping_mul(31) ^ (i as u8) ^ seed)
                    .collect();
                buffer.write(&bytes);
                buffer
            })
            .collect();
        NpuCache { platform, buffers }
    }

    /// The tensors as the Python shell describes them (`describe_kv_caches`).
    pub fn tensors(&self) -> Vec<TensorInfo> {
        let shape = &self.platform.shape;
        let mut strides = vec![1; shape.len()];
        for d in (0..shape.len() - 1).rev() {
            strides[d] = strides[d + 1] * shape[d + 1];
        }
        let per_layer = self.platform.per_layer;
        self.buffers
            .iter()
            .enumerate()
            .map(|(i, buffer)| TensorInfo {
                name: format!("model.layers.{}.self_attn.attn", i / per_layer),
                part: (per_layer > 1).then_some(i % per_layer),
                device: self.platform.device.into(),
                device_index: Some(0),
                dtype: "bfloat16".into(),
                element_size: 2,
                shape: shape.clone(),
                strides: strides.clone(),
                data_ptr: buffer.addr(),
                backend: self.platform.backend.into(),
            })
            .collect()
    }

    /// Buffer `i`'s bytes of the blocks `blocks` (whole blocks, K and V).
    fn gather(&self, i: usize, blocks: &[u32]) -> Vec<u8> {
        let all = self.buffers[i].read();
        (0..self.platform.outer)
            .flat_map(|o| {
                blocks
                    .iter()
                    .map(move |&b| (o * BLOCKS + b as usize) * BLOCK_BYTES)
            })
            .flat_map(|at| all[at..at + BLOCK_BYTES].to_vec())
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
    format!(
        r#"{{"kv_connector":"KvrelayConnector","kv_connector_module_path":"kvrelay.vllm","kv_role":"{role}"}}"#
    )
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

fn worker_half(
    engine: &VllmEngine,
    dir: &std::path::Path,
    role: &str,
    tensors: &[TensorInfo],
) -> Result<RegisteredWorker, AdapterError> {
    // SAFETY: the tensors describe live allocations of the double that the caller keeps
    // until the half is dropped, and that nothing else writes meanwhile (or, in the
    // refusals, tensors refused before their memory is used).
    unsafe { build_worker_half(engine, &transfer(role), env(dir), tensors, None) }
}

fn halves(
    dir: &std::path::Path,
    role: &str,
    cache: &NpuCache,
) -> (SchedulerHalf, RegisteredWorker) {
    let engine = cache.platform.engine();
    let scheduler = build_half(&engine, &transfer(role), env(dir), Half::Scheduler).unwrap();
    let worker = worker_half(&engine, dir, role, &cache.tensors()).unwrap();
    (SchedulerHalf::new(scheduler.connector.scheduler), worker)
}

/// A producer saves a prompt's two whole chunks (512 tokens, 4 blocks) from its NPU
/// cache; a consumer on fresh allocations with other contents and another block table
/// loads them, bit for bit, leaving its other blocks alone. Then the refusals: NPU
/// tensors for an engine vLLM says runs on the CPU, and tensors on two NPUs.
pub fn save_load_and_refusals(platform: &Platform, alloc: &dyn Fn(usize) -> Box<dyn NpuBuffer>) {
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<u32> = (0..600).map(|t| t * 7 + 3).collect();

    let producer = NpuCache::new(platform, alloc, 0);
    let (mut scheduler, mut worker) = halves(dir.path(), "kv_producer", &producer);
    assert_eq!(worker.layout.kind().to_string(), platform.layout);
    let produced = [3, 7, 1, 9, 12];
    assert_eq!(
        step(&mut scheduler, &mut worker, "p", &prompt, &produced),
        0
    );
    assert_eq!(worker.built.connector.worker.stats().saved_chunks, 2);
    drop(worker);

    let consumer = NpuCache::new(platform, alloc, 0x5a);
    let (mut scheduler, mut worker) = halves(dir.path(), "kv_consumer", &consumer);
    let consumed = [10, 2, 5, 0, 14];
    let untouched = consumer.gather(0, &[15]);
    assert_eq!(
        step(&mut scheduler, &mut worker, "c", &prompt, &consumed),
        512
    );
    for i in 0..consumer.buffers.len() {
        assert!(
            producer.gather(i, &produced[..4]) == consumer.gather(i, &consumed[..4]),
            "buffer {i}: the loaded KV differs from the saved KV"
        );
    }
    assert_eq!(consumer.gather(0, &[15]), untouched);
    drop(worker);

    let cpu_engine = VllmEngine {
        device_type: "cpu".into(),
        ..platform.engine()
    };
    let error = worker_half(&cpu_engine, dir.path(), "kv_producer", &producer.tensors())
        .err()
        .unwrap();
    let expected = format!("on '{}', but vLLM's platform is 'cpu'", platform.device);
    assert!(error.to_string().contains(&expected), "{error}");

    let mut two = producer.tensors();
    two[1].device_index = Some(1);
    let error = worker_half(&platform.engine(), dir.path(), "kv_producer", &two)
        .err()
        .unwrap();
    assert!(
        matches!(
            error,
            AdapterError::Tensors(TensorError::MixedDevices { .. })
        ),
        "{error}"
    );
    let message = error.to_string();
    let (one, zero) = (
        format!("device {}:1", platform.device),
        format!("device {}:0", platform.device),
    );
    assert!(
        message.contains(&one) && message.contains(&zero),
        "{message}"
    );
}

//! `kvrelay._native`: the Python bindings of kvrelay's vLLM connector. The Python class
//! `kvrelay.vllm.KvrelayConnector` is a thin shell over the two halves here; everything
//! that decides or moves KV is Rust (crates/kvrelay-vllm over crates/kvrelay), and the GIL
//! is released around every lookup, copy and wait.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use kvrelay::connector::{ConnectorError, ConnectorStats, KvWorker};
use kvrelay::store::TierStack;
use kvrelay_vllm::lookup::LookupServer;
use kvrelay_vllm::{
    build_half, build_worker_half, check_half, metadata, AdapterError, BuiltHalf, CachedStep, Half,
    NewStep, RegisteredWorker, SchedulerHalf, TensorInfo, VllmEngine,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

create_exception!(
    kvrelay._native,
    KvrelayError,
    PyException,
    "A kvrelay connector call failed."
);
create_exception!(
    kvrelay._native,
    KvrelayConfigError,
    KvrelayError,
    "kv_transfer_config or the LMCache config is invalid."
);
create_exception!(
    kvrelay._native,
    KvrelayUnsupportedError,
    KvrelayError,
    "A configuration, device or KV cache layout kvrelay does not support (yet)."
);

/// Typed Python exceptions: bad config, unsupported setup or tensors, anything else.
fn to_py(error: AdapterError) -> PyErr {
    let message = error.to_string();
    match error {
        AdapterError::Config(_) | AdapterError::Connector(ConnectorError::Config(_)) => {
            KvrelayConfigError::new_err(message)
        }
        AdapterError::NotYetSupported(_) | AdapterError::Tensors(_) => {
            KvrelayUnsupportedError::new_err(message)
        }
        _ => KvrelayError::new_err(message),
    }
}

fn connector_error(error: ConnectorError) -> PyErr {
    to_py(AdapterError::Connector(error))
}

/// The engine as the shell reads it from `VllmConfig`: a dict with [`VllmEngine`]'s fields.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct EngineArgs {
    model: String,
    num_layers: usize,
    num_kv_heads: usize,
    head_size: usize,
    kv_dtype: String,
    block_size: usize,
    num_blocks: usize,
    world_size: u32,
    rank: u32,
    device_type: String,
    cpu_attn_isa: Option<String>,
}

impl From<EngineArgs> for VllmEngine {
    fn from(a: EngineArgs) -> Self {
        VllmEngine {
            model: a.model,
            num_layers: a.num_layers,
            num_kv_heads: a.num_kv_heads,
            head_size: a.head_size,
            kv_dtype: a.kv_dtype,
            block_size: a.block_size,
            num_blocks: a.num_blocks,
            world_size: a.world_size,
            rank: a.rank,
            device_type: a.device_type,
            cpu_attn_isa: a.cpu_attn_isa,
        }
    }
}

/// One KV cache tensor as the shell describes it: a dict with [`TensorInfo`]'s fields.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct TensorArgs {
    name: String,
    part: Option<usize>,
    device: String,
    dtype: String,
    element_size: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
    data_ptr: u64,
    backend: String,
    #[pyo3(default)]
    device_index: Option<u32>,
}

impl From<TensorArgs> for TensorInfo {
    fn from(a: TensorArgs) -> Self {
        TensorInfo {
            name: a.name,
            part: a.part,
            device: a.device,
            device_index: a.device_index,
            dtype: a.dtype,
            element_size: a.element_size,
            shape: a.shape,
            strides: a.strides,
            data_ptr: a.data_ptr,
            backend: a.backend,
        }
    }
}

fn environment() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// Builds one half from the process environment, with the GIL released.
fn build(
    py: Python<'_>,
    engine: &VllmEngine,
    kv_transfer_config_json: &str,
    half: Half,
) -> PyResult<BuiltHalf> {
    py.allow_threads(|| build_half(engine, kv_transfer_config_json, environment(), half))
        .map_err(to_py)
}

fn parse_params(json: Option<&str>) -> PyResult<Option<serde_json::Value>> {
    json.map(serde_json::from_str)
        .transpose()
        .map_err(|e| KvrelayError::new_err(format!("kv_transfer_params is not JSON: {e}")))
}

/// Python objects must be `Sync`; the halves are `Send` only. Every method takes
/// `&mut self`, so [`Mutex::get_mut`] reaches the value without ever locking (and so the
/// mutex cannot be poisoned).
fn exclusive<T>(mutex: &mut Mutex<T>) -> &mut T {
    mutex.get_mut().unwrap_or_else(PoisonError::into_inner)
}

/// vLLM's scheduler-role connector (EngineCore process).
#[pyclass(module = "kvrelay._native")]
struct SchedulerConnector {
    half: Mutex<SchedulerHalf>,
}

#[pymethods]
impl SchedulerConnector {
    #[new]
    fn new(py: Python<'_>, engine: EngineArgs, kv_transfer_config_json: &str) -> PyResult<Self> {
        let engine = VllmEngine::from(engine);
        let built = build(py, &engine, kv_transfer_config_json, Half::Scheduler)?;
        Ok(SchedulerConnector {
            half: Mutex::new(SchedulerHalf::new(built.connector.scheduler)),
        })
    }

    /// `(tokens to load, load asynchronously)`; `(None, False)` asks vLLM to retry later.
    #[pyo3(signature = (request_id, prompt_token_ids, kv_transfer_params_json, num_computed_tokens))]
    fn get_num_new_matched_tokens(
        &mut self,
        py: Python<'_>,
        request_id: &str,
        prompt_token_ids: Vec<u32>,
        kv_transfer_params_json: Option<&str>,
        num_computed_tokens: usize,
    ) -> PyResult<(Option<usize>, bool)> {
        let params = parse_params(kv_transfer_params_json)?;
        let half = exclusive(&mut self.half);
        let matched = py
            .allow_threads(|| {
                half.get_num_new_matched_tokens(
                    request_id,
                    prompt_token_ids,
                    params,
                    num_computed_tokens,
                )
            })
            .map_err(to_py)?;
        Ok(matched.map_or((None, false), |(n, load_async)| (Some(n), load_async)))
    }

    fn update_state_after_alloc(
        &mut self,
        request_id: &str,
        block_ids: Vec<u32>,
        num_external_tokens: usize,
    ) -> PyResult<()> {
        exclusive(&mut self.half)
            .update_state_after_alloc(request_id, block_ids, num_external_tokens)
            .map_err(to_py)
    }

    /// This step's metadata as bytes. `new`: `(request_id, block_ids, num_computed_tokens)`;
    /// `cached`: `(request_id, new_block_ids, resumed, num_computed_tokens)`; token counts
    /// include the tokens scheduled in this step.
    fn build_connector_meta<'py>(
        &mut self,
        py: Python<'py>,
        new: Vec<(String, Vec<u32>, usize)>,
        cached: Vec<(String, Vec<u32>, bool, usize)>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let new = new
            .into_iter()
            .map(|(id, block_ids, num_computed_tokens)| NewStep {
                id,
                block_ids,
                num_computed_tokens,
            })
            .collect();
        let cached = cached
            .into_iter()
            .map(
                |(id, new_block_ids, resumed, num_computed_tokens)| CachedStep {
                    id,
                    new_block_ids,
                    resumed,
                    num_computed_tokens,
                },
            )
            .collect();
        let half = exclusive(&mut self.half);
        let encoded = py
            .allow_threads(|| {
                // Only requests with KV to move are listed: none, nothing to encode.
                half.build_connector_meta(new, cached)
                    .map(|m| (!m.requests.is_empty()).then(|| metadata::encode(&m)))
            })
            .map_err(to_py)?;
        Ok(encoded.map(|e| PyBytes::new(py, &e)))
    }

    /// `(keep the blocks, kv_transfer_params as JSON or None)`.
    fn request_finished(&mut self, request_id: &str) -> (bool, Option<String>) {
        let (delay_free, params) = exclusive(&mut self.half).request_finished(request_id);
        (delay_free, params.map(|p| p.to_string()))
    }
}

/// vLLM's worker-role connector (Worker process). Its config is checked when it is made;
/// the half itself is built by `register_kv_caches`, on the device the tensors are on.
#[pyclass(module = "kvrelay._native")]
struct WorkerConnector {
    engine: VllmEngine,
    kv_transfer_config_json: String,
    registered: Mutex<Option<Registered>>,
    /// The totals `interval_stats` last reported.
    reported: ConnectorStats,
}

/// The worker half, built over the registered KV cache.
struct Registered {
    worker: KvWorker,
    /// The tiers the worker writes through; kept for their statistics.
    tiers: Arc<TierStack>,
    /// The lookup channel serving process-local tiers (a PD buffer, a CPU tier alone) to
    /// the scheduler half; closed when the connector goes.
    _lookup_server: Option<LookupServer>,
}

impl WorkerConnector {
    fn registered(&mut self) -> PyResult<&mut Registered> {
        exclusive(&mut self.registered)
            .as_mut()
            .ok_or_else(|| KvrelayError::new_err("vLLM has not called register_kv_caches yet"))
    }

    fn worker(&mut self) -> PyResult<&mut KvWorker> {
        self.registered().map(|r| &mut r.worker)
    }
}

#[pymethods]
impl WorkerConnector {
    #[new]
    fn new(py: Python<'_>, engine: EngineArgs, kv_transfer_config_json: &str) -> PyResult<Self> {
        let engine = VllmEngine::from(engine);
        py.allow_threads(|| check_half(&engine, kv_transfer_config_json, environment()))
            .map_err(to_py)?;
        Ok(WorkerConnector {
            engine,
            kv_transfer_config_json: kv_transfer_config_json.to_string(),
            registered: Mutex::new(None),
            reported: ConnectorStats::default(),
        })
    }

    /// Registers vLLM's KV cache tensors (described as dicts of plain values), building
    /// the worker half on their device, and returns the layout kvrelay moves them with.
    /// The caller keeps the tensors alive for as long as this connector lives.
    #[pyo3(signature = (tensors, isa))]
    fn register_kv_caches(
        &mut self,
        py: Python<'_>,
        tensors: Vec<TensorArgs>,
        isa: Option<&str>,
    ) -> PyResult<String> {
        if exclusive(&mut self.registered).is_some() {
            return Err(KvrelayError::new_err(
                "register_kv_caches was called twice; vLLM registers its KV cache once",
            ));
        }
        let tensors: Vec<TensorInfo> = tensors.into_iter().map(TensorInfo::from).collect();
        let (engine, json) = (&self.engine, self.kv_transfer_config_json.as_str());
        // SAFETY: the tensors are vLLM's KV cache, described by the Python shell from the
        // live tensors (data_ptr, shape, strides, dtype, device). vLLM allocates them once
        // and never frees them while the connector lives, and the Python shell holds a
        // reference to them besides. vLLM does not touch a request's blocks while its
        // load or save runs: saves and synchronous loads complete inside wait_for_save /
        // start_load_kv, and a request loading in the background stays in
        // WAITING_FOR_REMOTE_KVS, its blocks neither computed nor freed (even if aborted),
        // until get_finished reports the load.
        let RegisteredWorker { built, layout } = py
            .allow_threads(|| unsafe {
                build_worker_half(engine, json, environment(), &tensors, isa)
            })
            .map_err(to_py)?;
        *exclusive(&mut self.registered) = Some(Registered {
            worker: built.connector.worker,
            tiers: built.connector.tiers,
            _lookup_server: built.lookup_server,
        });
        Ok(format!(
            "{} over {} buffers of {} bytes (chunk fingerprint {:#018x})",
            layout.kind(),
            layout.num_buffers(),
            layout.buffer_bytes(),
            layout.chunk_fingerprint()
        ))
    }

    fn bind_connector_metadata(&mut self, encoded: &[u8]) -> PyResult<()> {
        let metadata = metadata::decode(encoded).map_err(|e| to_py(e.into()))?;
        self.worker()?.bind_connector_metadata(metadata);
        Ok(())
    }

    fn clear_connector_metadata(&mut self) -> PyResult<()> {
        self.worker()?.clear_connector_metadata();
        Ok(())
    }

    /// Loads this step's chunks into the paged cache; returns when they have landed, or,
    /// for asynchronous loads, once queued. Returns whether loads run in the background,
    /// whose ends `get_finished` reports.
    fn start_load_kv(&mut self, py: Python<'_>) -> PyResult<bool> {
        let worker = self.worker()?;
        py.allow_threads(|| worker.start_load_kv())
            .map_err(connector_error)?;
        Ok(worker.loads_in_background())
    }

    /// After layer `layer`'s attention wrote its KV: a PD prefiller sends that layer of a
    /// reserved request's chunks now (see `KvWorker::save_kv_layer`).
    fn save_kv_layer(&mut self, py: Python<'_>, layer: usize) -> PyResult<()> {
        let worker = self.worker()?;
        py.allow_threads(|| worker.save_kv_layer(layer));
        Ok(())
    }

    /// Saves this step's chunks into every tier before vLLM may reuse the blocks.
    fn wait_for_save(&mut self, py: Python<'_>) -> PyResult<()> {
        let worker = self.worker()?;
        py.allow_threads(|| worker.wait_for_save())
            .map_err(connector_error)
    }

    /// `(finished sending, finished receiving)` request ids.
    fn get_finished(
        &mut self,
        py: Python<'_>,
        finished_req_ids: HashSet<String>,
    ) -> PyResult<(HashSet<String>, HashSet<String>)> {
        let worker = self.worker()?;
        Ok(py.allow_threads(|| worker.get_finished(&finished_req_ids)))
    }

    fn get_block_ids_with_load_errors(&mut self) -> PyResult<HashSet<u32>> {
        Ok(self.worker()?.get_block_ids_with_load_errors())
    }

    /// The worker's totals since it started, as a dict of numbers (and
    /// `background_loader`: whether an asynchronous load has run).
    fn stats<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let Registered { worker, tiers, .. } = self.registered()?;
        let totals = worker.stats().clone();
        // Whether an asynchronous load ever ran (the loader starts on the first).
        let background_loader = worker.loads_in_background();
        let stack = tiers.stats();
        let stats = figures(py, &totals, &ConnectorStats::default())?;
        stats.set_item("tier_hits", stack.hits)?;
        stats.set_item("tier_misses", stack.misses)?;
        stats.set_item("background_loader", background_loader)?;
        if let Some(sends) = worker.pd_reserved_sends() {
            stats.set_item("pd_reserved_sends", sends)?;
        }
        if let Some(chunks) = worker.pd_layered_chunks() {
            stats.set_item("pd_layered_chunks", chunks)?;
        }
        // What the worker's tiers hold now (a PD decoder: its PD buffer's pages in use).
        let held: u64 = tiers.tiers().iter().map(|t| t.stats().bytes).sum();
        stats.set_item("tier_bytes", held)?;
        Ok(stats)
    }

    /// What changed since the last call (vLLM's `get_kv_connector_stats`, asked once a
    /// step): `None` when nothing moved (or nothing is registered yet), so an idle step
    /// costs one comparison.
    fn interval_stats<'py>(&mut self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(registered) = exclusive(&mut self.registered).as_ref() else {
            return Ok(None);
        };
        let totals = registered.worker.stats();
        if *totals == self.reported {
            return Ok(None);
        }
        let totals = totals.clone();
        let interval = figures(py, &totals, &self.reported)?;
        self.reported = totals;
        Ok(Some(interval))
    }
}

/// `now - before` for each of the worker's figures, by name (times in seconds).
fn figures<'py>(
    py: Python<'py>,
    now: &ConnectorStats,
    before: &ConnectorStats,
) -> PyResult<Bound<'py, PyDict>> {
    let counts = |s: &ConnectorStats| {
        [
            ("loaded_tokens", s.loaded_tokens),
            ("loaded_bytes", s.loaded_bytes),
            ("device_loaded_bytes", s.device_loaded_bytes),
            ("failed_load_tokens", s.failed_load_tokens),
            ("saved_chunks", s.saved_chunks),
            ("saved_bytes", s.saved_bytes),
            ("skipped_saves", s.skipped_saves),
            ("failed_sends", s.failed_sends),
            ("pd_skipped_chunks", s.pd_skipped_chunks),
        ]
    };
    let times = |s: &ConnectorStats| [("load_seconds", s.load_time), ("save_seconds", s.save_time)];
    let dict = PyDict::new(py);
    for ((name, value), (_, earlier)) in counts(now).into_iter().zip(counts(before)) {
        dict.set_item(name, value.saturating_sub(earlier))?;
    }
    for ((name, value), (_, earlier)) in times(now).into_iter().zip(times(before)) {
        dict.set_item(name, value.saturating_sub(earlier).as_secs_f64())?;
    }
    Ok(dict)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<SchedulerConnector>()?;
    m.add_class::<WorkerConnector>()?;
    m.add("KvrelayError", py.get_type::<KvrelayError>())?;
    m.add("KvrelayConfigError", py.get_type::<KvrelayConfigError>())?;
    m.add(
        "KvrelayUnsupportedError",
        py.get_type::<KvrelayUnsupportedError>(),
    )?;
    // The NPUs whose KV caches this build moves (vendor runtimes load when one registers).
    let devices: Vec<&str> = [
        ("npu", cfg!(feature = "ascend")),
        ("rbln", cfg!(feature = "rbln")),
    ]
    .into_iter()
    .filter_map(|(device, built)| built.then_some(device))
    .collect();
    m.add("NPU_DEVICES", devices)?;
    Ok(())
}

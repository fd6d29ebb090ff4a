//! The worker half shared by both connectors: loads chunks into the paged cache before the
//! forward and saves them after it.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{ChunkTransfer, ConnectorError, ConnectorMetadata, RequestTransfer};
use crate::device::{Device, DevicePage, EngineMemory, HostBuffer};
use crate::layout::KvCacheSpec;
use crate::plan::{paged_to_chunk_layers, paged_to_chunks, ChunkWindow};
use crate::store::{Chunk, ChunkMeta, TierStack};
use crate::transfer::{PdSink, PdTarget};

/// Transfer figures a user can read (the smoke examples print them), for the whole worker
/// and for each request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectorStats {
    /// Tokens written into the paged cache from chunks.
    pub loaded_tokens: usize,
    pub loaded_bytes: usize,
    /// Of `loaded_bytes`, those copied device to device from the PD buffer's pages on the
    /// engine's NPU (the rest came from host memory).
    pub device_loaded_bytes: usize,
    pub load_time: Duration,
    /// Tokens whose load failed (missing, corrupt or rejected chunks); the engine recomputes them.
    pub failed_load_tokens: usize,
    pub saved_chunks: usize,
    pub saved_bytes: usize,
    pub save_time: Duration,
    /// Chunks not saved because a tier already held them.
    pub skipped_saves: usize,
    /// PD requests whose chunks could not be sent to the decoder (it will recompute), with
    /// `pd_backend_mode: sync`; an `async` sender reports failures to the proxy instead.
    pub failed_sends: usize,
    /// PD chunks gathered but not sent because the decoder's lookup never asks for them,
    /// with `pd_backend_mode: sync` (an `async` sink counts them in
    /// [`KvWorker::pd_skipped_chunks`]).
    pub pd_skipped_chunks: usize,
}

impl ConnectorStats {
    /// Adds `other`'s figures to these (one request's transfers over several TP ranks).
    pub fn add(&mut self, other: &ConnectorStats) {
        self.loaded_tokens += other.loaded_tokens;
        self.loaded_bytes += other.loaded_bytes;
        self.device_loaded_bytes += other.device_loaded_bytes;
        self.load_time += other.load_time;
        self.failed_load_tokens += other.failed_load_tokens;
        self.saved_chunks += other.saved_chunks;
        self.saved_bytes += other.saved_bytes;
        self.save_time += other.save_time;
        self.skipped_saves += other.skipped_saves;
        self.failed_sends += other.failed_sends;
        self.pd_skipped_chunks += other.pd_skipped_chunks;
    }
}

/// What a load needs, shared with the background loader.
#[derive(Clone)]
struct LoadContext {
    device: Arc<dyn Device>,
    tiers: Arc<TierStack>,
    spec: KvCacheSpec,
    memory: EngineMemory,
}

/// The result of loading one request's chunks.
struct LoadOutcome {
    request_id: String,
    stats: ConnectorStats,
    /// Blocks whose KV did not arrive; the engine recomputes from the first of them.
    failed_blocks: Vec<u32>,
}

/// A background thread running asynchronous loads one request at a time.
struct Loader {
    jobs: Option<SyncSender<(LoadContext, RequestTransfer)>>,
    done: Receiver<LoadOutcome>,
    thread: Option<JoinHandle<()>>,
}

/// Asynchronous loads queued beyond this make `start_load_kv` wait for room.
const MAX_QUEUED_LOADS: usize = 1024;

impl Loader {
    fn start() -> Result<Self, ConnectorError> {
        let (jobs, queue) = sync_channel::<(LoadContext, RequestTransfer)>(MAX_QUEUED_LOADS);
        let (results, done) = channel();
        let thread = std::thread::Builder::new()
            .name("kvrelay-loader".into())
            .spawn(move || {
                for (context, request) in queue {
                    if results.send(context.load(&request)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| ConnectorError::Loader(e.to_string()))?;
        Ok(Loader {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the loads already queued, which write
        // into engine memory the thread keeps alive.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The worker half (vLLM's `KVConnectorRole.WORKER`).
pub struct KvWorker {
    device: Arc<dyn Device>,
    tiers: Arc<TierStack>,
    spec: KvCacheSpec,
    memory: Option<EngineMemory>,
    metadata: Option<ConnectorMetadata>,
    load_errors: HashSet<u32>,
    stats: ConnectorStats,
    per_request: HashMap<String, ConnectorStats>,
    loader: Option<Loader>,
    /// Where a PD prefiller's saves go instead of the tiers.
    pd_sink: Option<PdSink>,
    /// Per request saved layer by layer in this step: the layers sent so far, from the
    /// first (see [`KvWorker::save_kv_layer`]).
    layers_sent: HashMap<String, usize>,
}

impl KvWorker {
    /// A worker for caches of geometry `spec`, moving bytes with `device` into `tiers`.
    pub fn new(device: Arc<dyn Device>, tiers: Arc<TierStack>, spec: KvCacheSpec) -> Self {
        KvWorker {
            device,
            tiers,
            spec,
            memory: None,
            metadata: None,
            load_errors: HashSet::new(),
            stats: ConnectorStats::default(),
            per_request: HashMap::new(),
            loader: None,
            pd_sink: None,
            layers_sent: HashMap::new(),
        }
    }

    /// Sends saves to a decoder's PD buffer instead of the tiers (LMCache `pd_role: sender`).
    pub fn with_pd_sink(mut self, sink: PdSink) -> Self {
        self.pd_sink = Some(sink);
        self
    }

    /// Registers the engine's paged KV memory once, before the first forward.
    pub fn register_kv_caches(&mut self, memory: EngineMemory) -> Result<(), ConnectorError> {
        let registered = memory.layout().spec();
        if registered.chunk_fingerprint() != self.spec.chunk_fingerprint() {
            return Err(ConnectorError::GeometryMismatch(format!(
                "registered {registered:?}, expected {:?}",
                self.spec
            )));
        }
        self.memory = Some(memory);
        Ok(())
    }

    /// Takes this step's metadata. A PD prefiller reserves the decoder's pages here for a
    /// request whose chunked prefill starts in this step, before the forward, so even its
    /// first chunk can go over layer by layer (vLLM runs `start_load_kv` after the layers
    /// on steps without synchronous loads).
    pub fn bind_connector_metadata(&mut self, metadata: ConnectorMetadata) {
        self.metadata = Some(metadata);
        self.layers_sent.clear();
        if self.pd_sink.is_some() {
            // reserve_pd logs its own failures; it errs only before registration, where no
            // chunk can be saved either.
            let _ = self.for_each_request(|r| !r.pd_plan.is_empty(), Self::reserve_pd);
        }
    }

    pub fn clear_connector_metadata(&mut self) {
        self.metadata = None;
    }

    fn memory(&self) -> Result<&EngineMemory, ConnectorError> {
        self.memory.as_ref().ok_or(ConnectorError::NotRegistered)
    }

    fn record(&mut self, request_id: &str, stats: &ConnectorStats) {
        self.stats.add(stats);
        self.per_request
            .entry(request_id.to_string())
            .or_default()
            .add(stats);
    }

    /// Loads every chunk this step asks for into the paged cache, before the forward.
    /// Synchronous loads complete here (as LMCache's do), so `wait_for_layer_load` has
    /// nothing left to wait for; asynchronous ones are handed to the loader thread and
    /// reported by `get_finished`. A chunk that is missing or unusable ends its request's
    /// load: the blocks from there on are reported by `get_block_ids_with_load_errors`.
    pub fn start_load_kv(&mut self) -> Result<(), ConnectorError> {
        self.for_each_request(|r| !r.loads.is_empty(), Self::start_load)
    }

    /// Holds the decoder's pages for every chunk of `request` from its first step on, so
    /// each chunk goes over in the step that computed it. A failed reserve is logged: the
    /// request's chunks then go over at the prompt's end.
    fn reserve_pd(&mut self, request: &RequestTransfer) -> Result<(), ConnectorError> {
        let fingerprint = self.memory()?.layout().chunk_fingerprint();
        let Some(sink) = self.pd_sink.as_mut() else {
            return Ok(());
        };
        let chunks = request
            .pd_plan
            .iter()
            .map(|c| {
                (
                    c.key.clone(),
                    chunk_meta(fingerprint, c),
                    c.window.start + c.window.tokens,
                )
            })
            .collect();
        let reserved = PdTarget::from_kv_transfer_params(request.kv_transfer_params.as_ref())
            .and_then(|t| {
                sink.reserve(request.pd_request_id(), chunks, t, request.decoder_tokens())
            });
        if let Err(error) = reserved {
            tracing::warn!(request = %request.request_id, %error, "reserving the decoder's pages failed; sending at the prompt's end");
        }
        Ok(())
    }

    /// Runs `work` on each selected request of the bound metadata, stopping at an error.
    fn for_each_request(
        &mut self,
        select: fn(&RequestTransfer) -> bool,
        mut work: impl FnMut(&mut Self, &RequestTransfer) -> Result<(), ConnectorError>,
    ) -> Result<(), ConnectorError> {
        let Some(metadata) = self.metadata.take() else {
            return Ok(());
        };
        let result = metadata
            .requests
            .iter()
            .filter(|r| select(r))
            .try_for_each(|r| work(self, r));
        self.metadata = Some(metadata);
        result
    }

    fn start_load(&mut self, request: &RequestTransfer) -> Result<(), ConnectorError> {
        let context = LoadContext {
            device: Arc::clone(&self.device),
            tiers: Arc::clone(&self.tiers),
            spec: self.spec,
            memory: self.memory()?.clone(),
        };
        if !request.load_async {
            let outcome = context.load(request);
            self.finish_load(outcome);
            return Ok(());
        }
        if self.loader.is_none() {
            self.loader = Some(Loader::start()?);
        }
        let jobs = self
            .loader
            .as_ref()
            .and_then(|l| l.jobs.as_ref())
            .expect("a started loader has a queue");
        jobs.send((context, request.clone()))
            .map_err(|_| ConnectorError::Loader("the loader thread has stopped".into()))?;
        Ok(())
    }

    fn finish_load(&mut self, outcome: LoadOutcome) {
        self.record(&outcome.request_id, &outcome.stats);
        self.load_errors.extend(outcome.failed_blocks);
    }

    /// Whether asynchronous loads were started, whose ends only `get_finished` reports.
    pub fn loads_in_background(&self) -> bool {
        self.loader.is_some()
    }

    /// Blocks until `layer`'s KV is in the paged cache. Loads finish in `start_load_kv`.
    pub fn wait_for_layer_load(&mut self, _layer: usize) {}

    /// Called after each layer's attention, in layer order, once the layer's KV is in the
    /// paged cache. A PD prefiller sends that layer of each reserved request's chunks now
    /// (over a channel that moves pieces: tcp, shm); after the last layer it seals them,
    /// and at the prompt's end commits, so the decoder can have the whole KV before the
    /// step's own tail (final norm, logits, sampling) is done. `wait_for_save` sends what
    /// was not sent here (all of it for an engine that never calls this hook). Other saves
    /// run in `wait_for_save`.
    pub fn save_kv_layer(&mut self, layer: usize) {
        if self.pd_sink.is_none() {
            return;
        }
        let sent = self.for_each_request(
            |r| !r.saves.is_empty(),
            |worker, request| {
                let sink = worker.pd_sink.as_ref().expect("checked above");
                let from = worker
                    .layers_sent
                    .get(&request.request_id)
                    .copied()
                    .unwrap_or(0);
                if from != layer || !sink.takes_layers(request.pd_request_id()) {
                    return Ok(());
                }
                let started = Instant::now();
                worker.send_layers(request, layer..layer + 1)?;
                if layer + 1 == worker.spec.num_layers {
                    worker.seal_layers(request)?;
                }
                let stats = ConnectorStats {
                    save_time: started.elapsed(),
                    ..ConnectorStats::default()
                };
                worker.record(&request.request_id, &stats);
                Ok(())
            },
        );
        if let Err(error) = sent {
            tracing::warn!(layer, %error, "gathering a layer of PD KV failed; it goes with the forward's end");
        }
    }

    /// Gathers layers `layers` of `request`'s chunks saved in this step and hands them to
    /// the PD sink; counts them sent.
    fn send_layers(
        &mut self,
        request: &RequestTransfer,
        layers: Range<usize>,
    ) -> Result<(), ConnectorError> {
        let saves: Vec<&ChunkTransfer> = request.saves.iter().collect();
        let pieces = self.gather(request, &saves, layers.clone())?;
        let keys = saves.iter().map(|s| (s.key.clone(), s.window.tokens));
        let sink = self
            .pd_sink
            .as_mut()
            .expect("only a PD prefiller sends layers");
        sink.add_layers(
            request.pd_request_id(),
            layers.clone(),
            keys.zip(pieces)
                .map(|((key, tokens), piece)| (key, tokens, piece))
                .collect(),
        );
        self.layers_sent
            .insert(request.request_id.clone(), layers.end);
        Ok(())
    }

    /// Seals `request`'s chunks saved in this step once every layer of them went to the PD
    /// sink, and at the prompt's end commits the request.
    fn seal_layers(&mut self, request: &RequestTransfer) -> Result<(), ConnectorError> {
        let fingerprint = self.memory()?.layout().chunk_fingerprint();
        let sink = self
            .pd_sink
            .as_mut()
            .expect("only a PD prefiller sends layers");
        for save in &request.saves {
            let (meta, window_end) = (
                chunk_meta(fingerprint, save),
                save.window.start + save.window.tokens,
            );
            sink.seal_layers(request.pd_request_id(), save.key.clone(), meta, window_end);
        }
        if request.flush_saves {
            let stats = self.flush_pd(request);
            self.record(&request.request_id, &stats);
        }
        Ok(())
    }

    /// Sends (`sync`) or queues (`async`) what a PD prefiller holds for `request` at its
    /// prompt's end; returns the send's figures.
    fn flush_pd(&mut self, request: &RequestTransfer) -> ConnectorStats {
        let mut stats = ConnectorStats::default();
        let Some(sink) = self.pd_sink.as_mut() else {
            return stats;
        };
        let target = PdTarget::from_kv_transfer_params(request.kv_transfer_params.as_ref());
        let sent =
            target.and_then(|t| sink.flush(request.pd_request_id(), t, request.decoder_tokens()));
        match sent {
            Ok(sent) => stats.pd_skipped_chunks = sent.map_or(0, |s| s.skipped_chunks),
            Err(error) => {
                tracing::warn!(request = %request.request_id, %error, "sending KV to the decoder failed; it will recompute");
                stats.failed_sends += 1;
            }
        }
        stats
    }

    /// Saves this step's chunks into every tier before the paged cache can be reused.
    pub fn wait_for_save(&mut self) -> Result<(), ConnectorError> {
        self.for_each_request(|r| !r.saves.is_empty() || r.flush_saves, Self::save_request)
    }

    fn save_request(&mut self, request: &RequestTransfer) -> Result<(), ConnectorError> {
        let started = Instant::now();
        // A PD prefiller sends every chunk: the decoder's buffer holds only what it is sent.
        let saves: Vec<&ChunkTransfer> = request
            .saves
            .iter()
            .filter(|s| {
                self.pd_sink.is_some() || self.tiers.prefix_hits(std::slice::from_ref(&s.key)) == 0
            })
            .collect();
        let mut stats = ConnectorStats {
            skipped_saves: request.saves.len() - saves.len(),
            ..ConnectorStats::default()
        };
        let fingerprint = self.memory()?.layout().chunk_fingerprint();
        let meta = |c: &ChunkTransfer| chunk_meta(fingerprint, c);
        let num_layers = self.spec.num_layers;
        let layers_sent = self
            .layers_sent
            .get(&request.request_id)
            .copied()
            .unwrap_or(0);
        let whole: &[&ChunkTransfer] = if layers_sent > 0 {
            // Saved layer by layer: the layers the forward's hooks did not send go now, then
            // the seal (and commit) the last layer's hook would have made.
            if layers_sent < num_layers {
                self.send_layers(request, layers_sent..num_layers)?;
                self.seal_layers(request)?;
            }
            for save in &saves {
                stats.saved_chunks += 1;
                stats.saved_bytes += self.spec.chunk_bytes(save.window.tokens);
            }
            &[]
        } else {
            &saves
        };
        let staged = self.gather(request, whole, 0..num_layers)?;
        for (save, buffer) in whole.iter().zip(staged) {
            let meta = meta(save);
            stats.saved_chunks += 1;
            stats.saved_bytes += buffer.len();
            match self.pd_sink.as_mut() {
                Some(sink) => sink.add(
                    request.pd_request_id(),
                    save.key.clone(),
                    meta,
                    buffer,
                    save.window.start + save.window.tokens,
                ),
                None => self.tiers.put(&save.key, meta, &buffer)?,
            }
        }
        if request.flush_saves && layers_sent == 0 {
            stats.add(&self.flush_pd(request));
        }
        stats.save_time = started.elapsed();
        self.record(&request.request_id, &stats);
        Ok(())
    }

    /// Copies layers `layers` of the chunks of `saves` out of the paged cache into staging
    /// buffers (for all layers, the chunks themselves).
    fn gather(
        &self,
        request: &RequestTransfer,
        saves: &[&ChunkTransfer],
        layers: Range<usize>,
    ) -> Result<Vec<HostBuffer>, ConnectorError> {
        if saves.is_empty() {
            return Ok(Vec::new());
        }
        let windows: Vec<ChunkWindow> = saves.iter().map(|s| s.window).collect();
        let memory = self.memory()?;
        let plan = paged_to_chunk_layers(
            memory.layout(),
            &request.block_ids,
            &windows,
            layers.clone(),
        )?;
        // A PD prefiller gathers into the staging buffers of chunks it has already sent.
        let alloc = |len| self.device.alloc_staging(len);
        let mut staging = windows
            .iter()
            .map(|w| {
                let len = self.spec.chunk_layers_bytes(w.tokens, layers.clone());
                match &self.pd_sink {
                    Some(sink) => sink.staging_buffer(len, alloc),
                    None => alloc(len),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut host: Vec<&mut [u8]> = staging.iter_mut().map(|b| &mut b[..]).collect();
            self.device.start_gather(&plan, memory, &mut host)?.wait()?;
        }
        Ok(staging)
    }

    /// Requests whose asynchronous sends and receives finished. Saves finish inside the
    /// step, so the sent set is always empty; the received set names the asynchronous
    /// loads that landed (their failed blocks are in `get_block_ids_with_load_errors` by
    /// the same call, as vLLM requires).
    pub fn get_finished(
        &mut self,
        _finished_req_ids: &HashSet<String>,
    ) -> (HashSet<String>, HashSet<String>) {
        let mut received = HashSet::new();
        let outcomes: Vec<LoadOutcome> = self
            .loader
            .as_ref()
            .map(|l| l.done.try_iter().collect())
            .unwrap_or_default();
        for outcome in outcomes {
            received.insert(outcome.request_id.clone());
            self.finish_load(outcome);
        }
        (HashSet::new(), received)
    }

    /// Block ids whose load failed since the last call; the engine recomputes them.
    pub fn get_block_ids_with_load_errors(&mut self) -> HashSet<u32> {
        std::mem::take(&mut self.load_errors)
    }

    /// Totals over every request.
    pub fn stats(&self) -> &ConnectorStats {
        &self.stats
    }

    /// A PD prefiller's chunks left out of sends so far because the decoder would never
    /// look them up, in either `pd_backend_mode`; `None` when this worker sends no PD KV.
    pub fn pd_skipped_chunks(&self) -> Option<u64> {
        self.pd_sink.as_ref().map(PdSink::skipped_chunks)
    }

    /// A PD prefiller's requests whose KV went to the decoder while their prompt was
    /// computed (chunked prefill: pages reserved at the first step, each chunk sent in the
    /// step that computed it); `None` when this worker sends no PD KV.
    pub fn pd_reserved_sends(&self) -> Option<u64> {
        self.pd_sink.as_ref().map(PdSink::reserved_sends)
    }

    /// A PD prefiller's chunks that went to the decoder layer by layer, each layer as soon
    /// as the forward computed it; `None` when this worker sends no PD KV.
    pub fn pd_layered_chunks(&self) -> Option<u64> {
        self.pd_sink.as_ref().map(PdSink::layered_chunks)
    }

    /// One request's transfers so far; the engine takes them when the request finishes.
    pub fn take_request_stats(&mut self, request_id: &str) -> ConnectorStats {
        if let Some(sink) = self.pd_sink.as_mut() {
            sink.forget(request_id);
        }
        self.per_request.remove(request_id).unwrap_or_default()
    }
}

/// What a chunk saved from the paged cache of layout fingerprint `fingerprint` says of itself.
fn chunk_meta(fingerprint: u64, chunk: &ChunkTransfer) -> ChunkMeta {
    ChunkMeta {
        layout_fingerprint: fingerprint,
        num_tokens: chunk.window.tokens as u32,
    }
}

impl LoadContext {
    /// Loads `request`'s chunks, in token order, up to the first one that is missing or
    /// unusable; everything from there on is reported as failed.
    fn load(&self, request: &RequestTransfer) -> LoadOutcome {
        let started = Instant::now();
        let fingerprint = self.memory.layout().chunk_fingerprint();
        let mut chunks: Vec<Chunk> = Vec::with_capacity(request.loads.len());
        for load in &request.loads {
            let expected = self.spec.chunk_bytes(load.window.tokens);
            match self
                .tiers
                .get_for_request(&load.key, fingerprint, request.pd_request_id())
            {
                Some(chunk)
                    if chunk.data.len() == expected
                        && chunk.meta.num_tokens as usize == load.window.tokens =>
                {
                    chunks.push(chunk)
                }
                Some(chunk) => {
                    tracing::warn!(key = %load.key, len = chunk.data.len(), expected, "chunk has the wrong size; recomputing");
                    break;
                }
                None => break,
            }
        }
        let mut stats = ConnectorStats::default();
        let loaded = match self.scatter(request, &chunks) {
            Ok(Scattered { bytes, from_device }) => {
                stats.loaded_bytes = bytes;
                if from_device {
                    stats.device_loaded_bytes = bytes;
                }
                chunks.len()
            }
            Err(error) => {
                tracing::warn!(request = %request.request_id, %error, "loading KV failed; recomputing");
                0
            }
        };
        let tokens = |loads: &[ChunkTransfer]| -> usize {
            loads
                .iter()
                .map(|l| l.window.tokens - l.window.skip_leading)
                .sum()
        };
        stats.loaded_tokens = tokens(&request.loads[..loaded]);
        let failed = &request.loads[loaded..];
        let mut failed_blocks = Vec::new();
        if let (Some(first), Some(last)) = (failed.first(), failed.last()) {
            stats.failed_load_tokens = tokens(failed);
            let from = first.window.start + first.window.skip_leading;
            let to = last.window.start + last.window.tokens;
            let block_size = self.spec.block_size;
            let blocks = request
                .block_ids
                .get(from / block_size..to.div_ceil(block_size).min(request.block_ids.len()))
                .unwrap_or_default();
            failed_blocks.extend_from_slice(blocks);
        }
        stats.load_time = started.elapsed();
        LoadOutcome {
            request_id: request.request_id.clone(),
            stats,
            failed_blocks,
        }
    }

    /// Writes the chunks into the request's blocks: device to device when every chunk is
    /// also in a device page the engine's device can copy from, otherwise from their host
    /// bytes.
    fn scatter(
        &self,
        request: &RequestTransfer,
        chunks: &[Chunk],
    ) -> Result<Scattered, ConnectorError> {
        if chunks.is_empty() {
            return Ok(Scattered {
                bytes: 0,
                from_device: false,
            });
        }
        let windows: Vec<ChunkWindow> = request.loads[..chunks.len()]
            .iter()
            .map(|l| l.window)
            .collect();
        let plan = paged_to_chunks(self.memory.layout(), &request.block_ids, &windows)?.inverse();
        let bytes = plan.total_bytes();
        let pages: Option<Vec<DevicePage>> = chunks.iter().map(|c| c.device.clone()).collect();
        if let Some(pages) = pages {
            if let Some(copy) =
                self.device
                    .start_scatter_from_device(&plan, &pages, &self.memory)?
            {
                copy.wait()?;
                return Ok(Scattered {
                    bytes,
                    from_device: true,
                });
            }
        }
        let host: Vec<&[u8]> = chunks.iter().map(|c| &c.data[..]).collect();
        self.device
            .start_scatter(&plan, &host, &self.memory)?
            .wait()?;
        Ok(Scattered {
            bytes,
            from_device: false,
        })
    }
}

/// What a load's scatter moved.
struct Scattered {
    bytes: usize,
    /// Device to device from the PD pages.
    from_device: bool,
}

//! The worker half shared by both connectors: loads chunks into the paged cache before the
//! forward and saves them after it.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{ChunkTransfer, ConnectorError, ConnectorMetadata, RequestTransfer};
use crate::device::{Device, EngineMemory};
use crate::layout::KvCacheSpec;
use crate::plan::{paged_to_chunks, ChunkWindow};
use crate::store::{ChunkMeta, TierStack};

/// Running totals a user can read (and the smoke examples print).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConnectorStats {
    /// Tokens written into the paged cache from chunks.
    pub loaded_tokens: usize,
    pub loaded_bytes: usize,
    pub load_time: Duration,
    /// Tokens whose load failed (missing, corrupt or rejected chunks); the engine recomputes them.
    pub failed_load_tokens: usize,
    pub saved_chunks: usize,
    pub saved_bytes: usize,
    pub save_time: Duration,
    /// Chunks not saved because a tier already held them.
    pub skipped_saves: usize,
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
        }
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

    pub fn bind_connector_metadata(&mut self, metadata: ConnectorMetadata) {
        self.metadata = Some(metadata);
    }

    pub fn clear_connector_metadata(&mut self) {
        self.metadata = None;
    }

    fn memory(&self) -> Result<&EngineMemory, ConnectorError> {
        self.memory.as_ref().ok_or(ConnectorError::NotRegistered)
    }

    /// Loads every chunk this step asks for into the paged cache, before the forward.
    /// Loads complete here (synchronously, as LMCache's), so `wait_for_layer_load` has
    /// nothing left to wait for. A chunk that is missing or unusable ends its request's
    /// load: the blocks from there on are reported by `get_block_ids_with_load_errors`.
    pub fn start_load_kv(&mut self) -> Result<(), ConnectorError> {
        self.for_each_request(|r| !r.loads.is_empty(), Self::load_request)
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

    fn load_request(&mut self, request: &RequestTransfer) -> Result<(), ConnectorError> {
        let started = Instant::now();
        let fingerprint = self.spec.chunk_fingerprint();
        let mut chunks: Vec<Bytes> = Vec::with_capacity(request.loads.len());
        for load in &request.loads {
            let expected = self.spec.chunk_bytes(load.window.tokens);
            match self.tiers.get(&load.key, fingerprint) {
                Some(chunk)
                    if chunk.data.len() == expected
                        && chunk.meta.num_tokens as usize == load.window.tokens =>
                {
                    chunks.push(chunk.data)
                }
                Some(chunk) => {
                    tracing::warn!(key = %load.key, len = chunk.data.len(), expected, "chunk has the wrong size; recomputing");
                    break;
                }
                None => break,
            }
        }
        let windows: Vec<ChunkWindow> = request.loads[..chunks.len()]
            .iter()
            .map(|l| l.window)
            .collect();
        let mut loaded = chunks.len();
        if !windows.is_empty() {
            let memory = self.memory()?;
            let plan = paged_to_chunks(memory.layout(), &request.block_ids, &windows)?.inverse();
            let host: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
            let copied = self
                .device
                .start_scatter(&plan, &host, memory)
                .and_then(|pending| pending.wait());
            if let Err(error) = copied {
                tracing::warn!(request = %request.request_id, %error, "loading KV failed; recomputing");
                loaded = 0;
            } else {
                self.stats.loaded_bytes += plan.total_bytes();
            }
        }
        let tokens = |loads: &[ChunkTransfer]| -> usize {
            loads
                .iter()
                .map(|l| l.window.tokens - l.window.skip_leading)
                .sum()
        };
        self.stats.loaded_tokens += tokens(&request.loads[..loaded]);
        let failed = &request.loads[loaded..];
        if let Some(first) = failed.first() {
            self.stats.failed_load_tokens += tokens(failed);
            let last = failed
                .last()
                .map_or(0, |l| l.window.start + l.window.tokens);
            let from = first.window.start + first.window.skip_leading;
            let block_size = self.spec.block_size;
            self.load_errors.extend(
                request.block_ids[from / block_size..last.div_ceil(block_size)]
                    .iter()
                    .copied(),
            );
        }
        self.stats.load_time += started.elapsed();
        Ok(())
    }

    /// Blocks until `layer`'s KV is in the paged cache. Loads finish in `start_load_kv`.
    pub fn wait_for_layer_load(&mut self, _layer: usize) {}

    /// Called after each layer's attention. Saves run for all layers in `wait_for_save`,
    /// once the whole forward has written its KV.
    pub fn save_kv_layer(&mut self, _layer: usize) {}

    /// Saves this step's chunks into every tier before the paged cache can be reused.
    pub fn wait_for_save(&mut self) -> Result<(), ConnectorError> {
        self.for_each_request(|r| !r.saves.is_empty(), Self::save_request)
    }

    fn save_request(&mut self, request: &RequestTransfer) -> Result<(), ConnectorError> {
        let started = Instant::now();
        let saves: Vec<&ChunkTransfer> = request
            .saves
            .iter()
            .filter(|s| self.tiers.prefix_hits(std::slice::from_ref(&s.key)) == 0)
            .collect();
        self.stats.skipped_saves += request.saves.len() - saves.len();
        if saves.is_empty() {
            return Ok(());
        }
        let windows: Vec<ChunkWindow> = saves.iter().map(|s| s.window).collect();
        let memory = self.memory()?;
        let plan = paged_to_chunks(memory.layout(), &request.block_ids, &windows)?;
        let mut staging = windows
            .iter()
            .map(|w| self.device.alloc_staging(self.spec.chunk_bytes(w.tokens)))
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut host: Vec<&mut [u8]> = staging.iter_mut().map(|b| &mut b[..]).collect();
            let pending = self.device.start_gather(&plan, memory, &mut host)?;
            pending.wait()?;
        }
        let fingerprint = self.spec.chunk_fingerprint();
        for (save, buffer) in saves.iter().zip(&staging) {
            let meta = ChunkMeta {
                layout_fingerprint: fingerprint,
                num_tokens: save.window.tokens as u32,
            };
            self.tiers.put(&save.key, meta, buffer)?;
            self.stats.saved_chunks += 1;
            self.stats.saved_bytes += buffer.len();
        }
        self.stats.save_time += started.elapsed();
        Ok(())
    }

    /// Requests whose asynchronous sends and receives finished. kvrelay's tier connectors
    /// finish every transfer inside the step, so there are none.
    pub fn get_finished(
        &mut self,
        _finished_req_ids: &HashSet<String>,
    ) -> (HashSet<String>, HashSet<String>) {
        (HashSet::new(), HashSet::new())
    }

    /// Block ids whose load failed since the last call; the engine recomputes them.
    pub fn get_block_ids_with_load_errors(&mut self) -> HashSet<u32> {
        std::mem::take(&mut self.load_errors)
    }

    pub fn stats(&self) -> &ConnectorStats {
        &self.stats
    }
}

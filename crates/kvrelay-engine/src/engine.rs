//! The engine loop: a vLLM-shaped scheduler (waiting and running queues, chunked prefill,
//! a block pool, preemption by recomputation) that calls a kvrelay connector's hooks in
//! vLLM's order (reference/lmcache_vllm.md §1.1).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use kvrelay::config::{KvLoadFailurePolicy, KvTransferConfig, LmcacheConfig};
use kvrelay::connector::{
    build_connector, Connector, ConnectorStats, EngineIdentity, RequestView, ScheduledRequest,
};
use kvrelay::layout::{AttentionKind, KvCacheSpec, KvLayout, LayoutKind};
use kvrelay::KvDtype;
use serde::Serialize;
use xxhash_rust::xxh3::Xxh3;

use crate::backing::KvPlacement;
use crate::model::{LayerHooks, Model, SeqInput};
use crate::ops::argmax;
use crate::ranks::{self, Countdown, Rank};
use crate::EngineError;

/// How the engine batches and where its KV lives.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    /// Token budget of one step (chunked prefill splits longer prompts).
    pub max_num_batched_tokens: usize,
    pub max_model_len: usize,
    pub block_size: usize,
    /// KV blocks; by default enough for `max_num_seqs` requests of `max_model_len`.
    pub num_blocks: Option<usize>,
    pub layout: LayoutKind,
    pub kv_dtype: KvDtype,
    /// How long the engine waits without progress (only asynchronous loads pending) before
    /// giving up with [`EngineError::Stalled`].
    pub stall_timeout: Duration,
    /// Where the authoritative KV cache lives (the engine computes in a host copy); on
    /// Ascend, rank 0's NPU, rank i using the next ids (see `KvPlacement::for_rank`).
    pub kv_placement: KvPlacement,
    /// Tensor-parallel ranks: each holds `num_kv_heads / tensor_parallel_size` KV heads in
    /// its own cache, with its own connector worker.
    pub tensor_parallel_size: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: 512,
            max_model_len: 4096,
            block_size: 16,
            num_blocks: None,
            layout: LayoutKind::FlashAttnNhd,
            kv_dtype: KvDtype::Bf16,
            stall_timeout: Duration::from_secs(120),
            kv_placement: KvPlacement::Host,
            tensor_parallel_size: 1,
        }
    }
}

impl EngineConfig {
    fn num_blocks(&self) -> usize {
        self.num_blocks
            .unwrap_or(self.max_num_seqs * self.max_model_len.div_ceil(self.block_size))
    }
}

/// Greedy sampling limits of one request, and (as vLLM carries them in its sampling
/// params) the request's `kv_transfer_params` for the connector.
#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub kv_transfer_params: Option<serde_json::Value>,
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        SamplingParams {
            max_tokens,
            ignore_eos: false,
            kv_transfer_params: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token.
    Stop,
    /// `max_tokens` or the model length.
    Length,
    /// The request failed (a KV load failed under the "fail" policy).
    Error(String),
    /// [`Engine::abort_request`] ended it before it finished on its own.
    Aborted,
}

/// What [`Engine::abort_request`] did.
#[derive(Debug)]
pub enum AbortOutcome {
    /// The request ended now, through the same path as a finished one.
    Finished(Box<RequestOutput>),
    /// Its asynchronous KV load is still writing its blocks: it ends (as
    /// [`FinishReason::Aborted`], among [`Engine::step`]'s outputs) once the load lands.
    WhenLoaded,
    /// No unfinished request has this id.
    NotFound,
}

/// What a finished request produced, and what its KV transfers cost.
#[derive(Clone, Debug, Serialize)]
pub struct RequestOutput {
    pub request_id: String,
    pub prompt_token_count: usize,
    pub output_token_count: usize,
    pub output_token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// xxh3-64 over the logits of every sampled position, in order: equal digests mean the
    /// model computed bit-identical logits.
    pub logits_digest: String,
    /// Prompt tokens whose KV the connector loaded instead of the engine computing it.
    pub hit_tokens: usize,
    /// Tokens whose KV load failed and that the engine recomputed.
    pub recomputed_tokens: usize,
    /// This request's connector transfers.
    #[serde(skip)]
    pub transfer: ConnectorStats,
    /// From arrival to the first sampled token.
    pub time_to_first_token_sec: f64,
    pub elapsed_sec: f64,
    pub kv_transfer_params: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    /// Blocks allocated, KV loading asynchronously (vLLM's `WAITING_FOR_REMOTE_KVS`).
    WaitingForRemoteKv,
    Running,
}

struct Request {
    id: String,
    tokens: Vec<u32>,
    num_prompt_tokens: usize,
    num_computed: usize,
    blocks: Vec<u32>,
    params: SamplingParams,
    state: State,
    arrived: Instant,
    first_token: Option<Instant>,
    digest: Xxh3,
    hit_tokens: usize,
    recomputed_tokens: usize,
    /// Tokens loaded by an asynchronous load in flight.
    pending_external: usize,
}

impl Request {
    fn view(&self) -> RequestView<'_> {
        RequestView {
            id: &self.id,
            tokens: &self.tokens,
            num_prompt_tokens: self.num_prompt_tokens,
            kv_transfer_params: self.params.kv_transfer_params.as_ref(),
        }
    }

    fn output_len(&self) -> usize {
        self.tokens.len() - self.num_prompt_tokens
    }
}

/// Running totals of the engine.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct EngineStats {
    pub steps: usize,
    pub computed_tokens: usize,
    pub preemptions: usize,
}

pub struct Engine {
    model: Model,
    config: EngineConfig,
    /// The tensor-parallel ranks, each with its share of the KV heads.
    ranks: Vec<Rank>,
    free_blocks: VecDeque<u32>,
    requests: HashMap<String, Request>,
    waiting: VecDeque<String>,
    running: Vec<String>,
    /// Blocks a load wrote in the cache that the working copy has not fetched yet.
    to_fetch: Vec<u32>,
    failure_policy: KvLoadFailurePolicy,
    /// Requests whose asynchronous load every rank's worker reported finished.
    finished_recving: HashSet<String>,
    /// Ranks' reports of finished loads and sends, until every rank made its own.
    recv_countdown: Countdown,
    send_countdown: Countdown,
    /// Requests whose blocks stay allocated until the worker reports their send finished.
    sending: HashMap<String, Vec<u32>>,
    /// Requests finished since the last step, for the worker's `get_finished`.
    just_finished: HashSet<String>,
    /// Aborted requests whose asynchronous load must land before their blocks are freed.
    aborted_while_loading: HashSet<String>,
    eos: Vec<u32>,
    stats: EngineStats,
}

/// The connector hooks inside the forward pass, for every rank's worker.
struct WorkerHooks<'a> {
    workers: Vec<&'a mut kvrelay::connector::KvWorker>,
    /// Whether the caches hold each layer's KV when its hook runs (else the workers save
    /// it all after the forward, from the flushed caches).
    layers_current: bool,
}

impl LayerHooks for WorkerHooks<'_> {
    fn wait_for_layer_load(&mut self, layer: usize) {
        self.workers
            .iter_mut()
            .for_each(|w| w.wait_for_layer_load(layer));
    }
    fn save_kv_layer(&mut self, layer: usize) {
        if self.layers_current {
            self.workers.iter_mut().for_each(|w| w.save_kv_layer(layer));
        }
    }
}

impl Engine {
    /// An engine over `model`; KV memory is allocated in `config.layout`.
    pub fn new(model: Model, config: EngineConfig) -> Result<Self, EngineError> {
        if config.max_num_seqs == 0 || config.max_num_batched_tokens == 0 {
            return Err(EngineError::Config(
                "max_num_seqs and max_num_batched_tokens must be at least 1".into(),
            ));
        }
        if config.max_model_len > model.max_positions() {
            return Err(EngineError::Config(format!(
                "max_model_len {} exceeds the {} positions the model was built for",
                config.max_model_len,
                model.max_positions()
            )));
        }
        let tp = config.tensor_parallel_size;
        let num_kv_heads = model.config.num_kv_heads();
        if tp == 0 || !num_kv_heads.is_multiple_of(tp) {
            return Err(EngineError::Config(format!(
                "tensor_parallel_size {tp} does not divide the model's {num_kv_heads} KV heads: each rank must hold the same number of whole heads"
            )));
        }
        let spec = KvCacheSpec {
            num_layers: model.config.num_hidden_layers,
            num_kv_heads: num_kv_heads / tp,
            head_size: model.config.head_dim(),
            dtype: config.kv_dtype,
            block_size: config.block_size,
            num_blocks: config.num_blocks(),
            attention: AttentionKind::Mha,
        };
        let layout = KvLayout::new(spec, config.layout)
            .map_err(|e| EngineError::Config(format!("KV layout: {e}")))?;
        let ranks = (0..tp as u32)
            .map(|rank| Rank::new(layout, &config.kv_placement.for_rank(rank, tp as u32)?))
            .collect::<Result<Vec<_>, _>>()?;
        let eos = model
            .config
            .eos_token_id
            .as_ref()
            .map(|ids| ids.to_vec())
            .unwrap_or_default();
        Ok(Engine {
            free_blocks: (0..spec.num_blocks as u32).collect(),
            model,
            config,
            ranks,
            requests: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            to_fetch: Vec::new(),
            failure_policy: KvLoadFailurePolicy::Recompute,
            finished_recving: HashSet::new(),
            recv_countdown: Countdown::default(),
            send_countdown: Countdown::default(),
            sending: HashMap::new(),
            just_finished: HashSet::new(),
            aborted_while_loading: HashSet::new(),
            eos,
            stats: EngineStats::default(),
        })
    }

    /// The geometry connectors must be built for: one rank's share of the KV heads.
    pub fn kv_spec(&self) -> KvCacheSpec {
        *self.ranks[0].kv.layout().spec()
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Builds the connector `transfer` names (with `lmcache` for LMCache's keys) for each
    /// rank's KV geometry, moving bytes with the device its cache lives on, and attaches
    /// it: its worker registers the rank's KV memory (vLLM's `register_kv_caches` at init).
    /// Keys name the world size and the rank, as LMCache's do. Load failures follow
    /// `transfer.kv_load_failure_policy`.
    pub fn connect(
        &mut self,
        transfer: &KvTransferConfig,
        lmcache: &LmcacheConfig,
        model_name: &str,
    ) -> Result<(), EngineError> {
        let world_size = self.ranks.len() as u32;
        let mut connectors = Vec::with_capacity(self.ranks.len());
        for (worker_id, rank) in (0..).zip(&self.ranks) {
            let identity = EngineIdentity {
                model: model_name.to_string(),
                world_size,
                worker_id,
            };
            let mut connector = build_connector(
                transfer,
                lmcache,
                &identity,
                *rank.kv.layout().spec(),
                rank.backing.device(),
            )?;
            connector
                .worker
                .register_kv_caches(rank.backing.engine_memory(&rank.kv))?;
            connectors.push(connector);
        }
        for (rank, connector) in self.ranks.iter_mut().zip(connectors) {
            rank.connector = Some(connector);
        }
        self.failure_policy = transfer.kv_load_failure_policy;
        Ok(())
    }

    /// Rank 0's connector.
    pub fn connector(&self) -> Option<&Connector> {
        self.ranks[0].connector.as_ref()
    }

    /// Every rank's connector, in rank order (none before [`Engine::connect`]).
    pub fn connectors(&self) -> impl Iterator<Item = &Connector> {
        self.ranks.iter().filter_map(|r| r.connector.as_ref())
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    /// Queues a request. Fails when it can never be served.
    pub fn add_request(
        &mut self,
        id: impl Into<String>,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        let id = id.into();
        if self.requests.contains_key(&id) {
            return Err(EngineError::BadRequest(format!(
                "request id {id} is already in use"
            )));
        }
        if let Err(refusal) = self.check_request(&id, &prompt, &params) {
            // The request ends here: a PD decoder may already hold KV sent for it.
            let view = RequestView {
                id: &id,
                tokens: &prompt,
                num_prompt_tokens: prompt.len(),
                kv_transfer_params: params.kv_transfer_params.as_ref(),
            };
            ranks::request_finished(&mut self.ranks, &view, &[]);
            return Err(refusal);
        }
        self.requests.insert(
            id.clone(),
            Request {
                id: id.clone(),
                num_prompt_tokens: prompt.len(),
                tokens: prompt,
                num_computed: 0,
                blocks: Vec::new(),
                params,
                state: State::Waiting,
                arrived: Instant::now(),
                first_token: None,
                digest: Xxh3::new(),
                hit_tokens: 0,
                recomputed_tokens: 0,
                pending_external: 0,
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Why a new request (whose id is free) can never be served, if it cannot.
    fn check_request(
        &self,
        id: &str,
        prompt: &[u32],
        params: &SamplingParams,
    ) -> Result<(), EngineError> {
        let bad = |reason: String| Err(EngineError::BadRequest(reason));
        if prompt.is_empty() {
            return bad(format!("request {id} has an empty prompt"));
        }
        if params.max_tokens == 0 {
            return bad(format!("request {id}: max_tokens must be at least 1"));
        }
        if let Some(t) = prompt
            .iter()
            .find(|&&t| t as usize >= self.model.config.vocab_size)
        {
            return bad(format!(
                "request {id}: token id {t} is outside the vocabulary of {}",
                self.model.config.vocab_size
            ));
        }
        if prompt.len() >= self.config.max_model_len {
            return bad(format!(
                "request {id}: prompt of {} tokens does not fit max_model_len {}",
                prompt.len(),
                self.config.max_model_len
            ));
        }
        let needed = (prompt.len() + params.max_tokens)
            .min(self.config.max_model_len)
            .div_ceil(self.config.block_size);
        if needed > self.kv_spec().num_blocks {
            return bad(format!(
                "request {id} needs {needed} KV blocks; the cache has {}",
                self.kv_spec().num_blocks
            ));
        }
        Ok(())
    }

    /// The tokens sampled so far for the unfinished request `id` (none once it finished:
    /// its [`RequestOutput`] has them all). Tokens are only ever appended, so a server
    /// streams the suffix it has not sent yet after each step.
    pub fn output_token_ids(&self, id: &str) -> Option<&[u32]> {
        self.requests
            .get(id)
            .map(|r| &r.tokens[r.num_prompt_tokens..])
    }

    /// Ends the unfinished request `id` as [`FinishReason::Aborted`]: the connector's
    /// `request_finished` runs and its blocks are freed as for a finished request, so an
    /// abandoned request stops costing engine time and KV memory.
    pub fn abort_request(&mut self, id: &str) -> AbortOutcome {
        match self.requests.get(id).map(|r| r.state) {
            None => AbortOutcome::NotFound,
            // The loader may still write these blocks: freeing them now would hand them to
            // another request under its feet.
            Some(State::WaitingForRemoteKv) if !self.finished_recving.contains(id) => {
                self.aborted_while_loading.insert(id.to_string());
                AbortOutcome::WhenLoaded
            }
            Some(_) => AbortOutcome::Finished(Box::new(self.finish(id, FinishReason::Aborted))),
        }
    }

    /// Finishes the aborted requests whose asynchronous load landed.
    fn finish_landed_aborts(&mut self) -> Vec<RequestOutput> {
        let landed: Vec<String> = self
            .aborted_while_loading
            .iter()
            .filter(|id| self.finished_recving.contains(*id))
            .cloned()
            .collect();
        landed
            .into_iter()
            .map(|id| self.finish(&id, FinishReason::Aborted))
            .collect()
    }

    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty() || !self.sending.is_empty()
    }

    /// Runs steps until every request finished; returns outputs in finishing order.
    pub fn run_to_completion(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        let mut outputs = Vec::new();
        let mut last_progress = Instant::now();
        while self.has_unfinished() {
            let before = self.progress_marker();
            outputs.extend(self.step()?);
            if before != self.progress_marker() {
                last_progress = Instant::now();
                continue;
            }
            if last_progress.elapsed() > self.config.stall_timeout {
                return Err(EngineError::Stalled(format!(
                    "no progress for {:?}; still waiting on {:?}",
                    self.config.stall_timeout,
                    self.requests.keys().collect::<Vec<_>>()
                )));
            }
            // Only asynchronous transfers are left to finish: poll, don't spin.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(outputs)
    }

    /// Changes whenever a step computes, finishes or frees something.
    fn progress_marker(&self) -> (usize, usize, usize, usize) {
        (
            self.stats.computed_tokens,
            self.requests.len(),
            self.sending.len(),
            self.finished_recving.len(),
        )
    }

    fn allocate(&mut self, id: &str, tokens: usize) -> bool {
        let request = &self.requests[id];
        let needed = tokens.div_ceil(self.config.block_size);
        let missing = needed.saturating_sub(request.blocks.len());
        if missing > self.free_blocks.len() {
            return false;
        }
        let new: Vec<u32> = self.free_blocks.drain(..missing).collect();
        self.requests
            .get_mut(id)
            .expect("allocate on a live request")
            .blocks
            .extend(new);
        true
    }

    fn free(&mut self, blocks: Vec<u32>) {
        self.free_blocks.extend(blocks);
    }

    /// Sends a running request back to the waiting queue; it will be recomputed.
    fn preempt(&mut self, id: &str) {
        self.running.retain(|r| r != id);
        let request = self.requests.get_mut(id).expect("preempt a live request");
        let blocks = std::mem::take(&mut request.blocks);
        request.num_computed = 0;
        request.state = State::Waiting;
        self.free(blocks);
        self.waiting.push_front(id.to_string());
        self.stats.preemptions += 1;
    }

    /// Decides this step's work: (request, tokens to compute) in batch order.
    fn schedule(&mut self) -> Result<Vec<(String, usize)>, EngineError> {
        let mut budget = self.config.max_num_batched_tokens;
        let mut scheduled: Vec<(String, usize)> = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i].clone();
            let request = &self.requests[&id];
            let new = (request.tokens.len() - request.num_computed).min(budget);
            if !self.allocate(&id, request.num_computed + new) {
                // Free blocks by recomputing the newest running request later.
                let victim = self.running.last().expect("running is not empty").clone();
                self.preempt(&victim);
                if victim == id {
                    break;
                }
                continue;
            }
            budget -= new;
            scheduled.push((id, new));
            i += 1;
        }
        // New and resumed requests, in arrival order; skipped ones keep their place.
        let mut skipped = VecDeque::new();
        while let Some(id) = self.waiting.pop_front() {
            if budget == 0 || self.running.len() >= self.config.max_num_seqs {
                skipped.push_back(id);
                continue;
            }
            if self.requests[&id].state == State::WaitingForRemoteKv {
                if !self.finished_recving.remove(&id) {
                    skipped.push_back(id);
                    continue;
                }
                let request = self.requests.get_mut(&id).expect("waiting request");
                // The load landed: its tokens are computed, except a full hit's last one,
                // whose logits the engine still needs.
                let loaded = request.pending_external.min(request.num_computed_limit());
                request.num_computed = request.num_computed.min(loaded);
                request.hit_tokens = request.num_computed;
                request.state = State::Waiting;
                let loaded_blocks = request.num_computed.div_ceil(self.config.block_size);
                self.to_fetch
                    .extend_from_slice(&request.blocks[..loaded_blocks]);
            }
            let request = &self.requests[&id];
            let mut external = 0;
            let mut load_async = false;
            if request.num_computed == 0 {
                match ranks::matched_tokens(&mut self.ranks, &request.view())? {
                    None => {
                        skipped.push_back(id);
                        continue;
                    }
                    Some((tokens, is_async)) => {
                        external = tokens;
                        load_async = is_async && tokens > 0;
                    }
                }
            }
            let computed = request.num_computed + external;
            let new = if load_async {
                0
            } else {
                (request.tokens.len() - computed).min(budget)
            };
            if !self.allocate(&id, computed + new) {
                skipped.push_back(id);
                break;
            }
            let request = self.requests.get_mut(&id).expect("waiting request");
            ranks::update_state_after_alloc(
                &mut self.ranks,
                &request.view(),
                &request.blocks,
                external,
            );
            if load_async {
                request.state = State::WaitingForRemoteKv;
                request.pending_external = external;
                // Until the load lands, what will be computed is the loaded prefix.
                request.num_computed = external;
                scheduled.push((id.clone(), 0));
                skipped.push_back(id);
                continue;
            }
            request.num_computed = computed;
            request.hit_tokens = request.hit_tokens.max(external);
            // This step's start_load_kv writes them.
            let loaded_blocks = external.div_ceil(self.config.block_size);
            self.to_fetch
                .extend_from_slice(&request.blocks[..loaded_blocks]);
            request.state = State::Running;
            budget -= new;
            self.running.push(id.clone());
            scheduled.push((id, new));
        }
        skipped.extend(self.waiting.drain(..));
        self.waiting = skipped;
        Ok(scheduled)
    }

    /// One engine step: schedule, run the connector and the forward pass, sample, finish.
    /// Returns the requests that finished in this step.
    pub fn step(&mut self) -> Result<Vec<RequestOutput>, EngineError> {
        self.stats.steps += 1;
        let scheduled = self.schedule()?;
        let views: Vec<ScheduledRequest<'_>> = scheduled
            .iter()
            .map(|(id, new)| {
                let r = &self.requests[id];
                ScheduledRequest {
                    request: r.view(),
                    block_ids: &r.blocks,
                    num_computed_tokens: r.num_computed + new,
                }
            })
            .collect();
        let metadata = ranks::build_connector_meta(&mut self.ranks, &views)?;
        drop(views);
        let computing: Vec<&(String, usize)> = scheduled.iter().filter(|(_, n)| *n > 0).collect();
        let inputs: Vec<SeqInput<'_>> = computing
            .iter()
            .map(|(id, new)| {
                let r = &self.requests[id];
                SeqInput {
                    tokens: &r.tokens[r.num_computed..r.num_computed + new],
                    start: r.num_computed,
                    block_table: &r.blocks,
                    logits: r.num_computed + new == r.tokens.len(),
                }
            })
            .collect();
        let block_size = self.config.block_size;
        let written: Vec<u32> = inputs
            .iter()
            .flat_map(|s| {
                let end = s.start + s.tokens.len();
                s.block_table[s.start / block_size..end.div_ceil(block_size)].iter()
            })
            .copied()
            .collect();
        let to_fetch = std::mem::take(&mut self.to_fetch);
        let finished_ids = std::mem::take(&mut self.just_finished);
        let world = self.ranks.len();
        let mut kvs = Vec::with_capacity(world);
        let mut backings = Vec::with_capacity(world);
        let mut workers = Vec::with_capacity(world);
        for rank in &mut self.ranks {
            kvs.push(&rank.kv);
            backings.push(&rank.backing);
            workers.extend(rank.connector.as_mut().map(|c| &mut c.worker));
        }
        // vLLM's KV connector context around execute_model, on every rank.
        let (logits, invalid_blocks) = {
            for (worker, metadata) in workers.iter_mut().zip(metadata) {
                worker.bind_connector_metadata(metadata);
                worker.start_load_kv()?;
            }
            for (backing, kv) in backings.iter().zip(&kvs) {
                backing.fetch(kv, &to_fetch)?;
            }
            let layers_current = backings.iter().all(|b| b.current_during_forward());
            let mut hooks = WorkerHooks {
                workers,
                layers_current,
            };
            let logits = if inputs.is_empty() {
                Vec::new()
            } else {
                self.model.forward(&inputs, &kvs, &mut hooks)
            };
            // The connector saves from the cache: it must hold this step's KV first.
            let flushed = backings
                .iter()
                .zip(&kvs)
                .try_for_each(|(backing, kv)| backing.flush(kv, &written));
            let mut invalid = HashSet::new();
            let mut saved = Ok(());
            for worker in hooks.workers {
                let rank_saved = if inputs.is_empty() || flushed.is_err() {
                    Ok(())
                } else {
                    worker.wait_for_save()
                };
                let (sent, received) = worker.get_finished(&finished_ids);
                invalid.extend(worker.get_block_ids_with_load_errors());
                worker.clear_connector_metadata();
                saved = saved.and(rank_saved);
                for id in self.send_countdown.arrive(sent, world) {
                    if let Some(blocks) = self.sending.remove(&id) {
                        self.free_blocks.extend(blocks);
                    }
                }
                self.finished_recving
                    .extend(self.recv_countdown.arrive(received, world));
            }
            saved?;
            flushed?;
            (logits, invalid)
        };
        let computed_now: Vec<(String, usize)> =
            computing.iter().map(|(id, n)| (id.clone(), *n)).collect();
        drop(inputs);
        let mut finished = self.finish_landed_aborts();
        for ((id, new), logits) in computed_now.into_iter().zip(logits) {
            self.stats.computed_tokens += new;
            if self.apply_load_failures(&id, &invalid_blocks, &mut finished) {
                continue;
            }
            let request = self.requests.get_mut(&id).expect("scheduled request");
            request.num_computed += new;
            let Some(logits) = logits else { continue };
            for v in &logits {
                request.digest.update(&v.to_le_bytes());
            }
            let token = argmax(&logits) as u32;
            request.tokens.push(token);
            request.first_token.get_or_insert_with(Instant::now);
            let reason = if !request.params.ignore_eos && self.eos.contains(&token) {
                Some(FinishReason::Stop)
            } else if request.output_len() >= request.params.max_tokens
                || request.tokens.len() >= self.config.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                finished.push(self.finish(&id, reason));
            }
        }
        // Asynchronous loads that failed: their requests resume from the first bad block.
        let waiting_ids: Vec<String> = self
            .requests
            .values()
            .filter(|r| r.state == State::WaitingForRemoteKv)
            .map(|r| r.id.clone())
            .collect();
        for id in waiting_ids {
            self.apply_load_failures(&id, &invalid_blocks, &mut finished);
        }
        Ok(finished)
    }

    /// Handles blocks of `id` whose KV failed to load: under "recompute" the request
    /// resumes from the first bad block and this step's token is discarded; under "fail"
    /// the request ends with an error. Returns true when the step's result must be dropped.
    fn apply_load_failures(
        &mut self,
        id: &str,
        invalid: &HashSet<u32>,
        finished: &mut Vec<RequestOutput>,
    ) -> bool {
        if invalid.is_empty() {
            return false;
        }
        let block_size = self.config.block_size;
        let request = self.requests.get_mut(id).expect("live request");
        let Some(first_bad) = request.blocks.iter().position(|b| invalid.contains(b)) else {
            return false;
        };
        let good_tokens = first_bad * block_size;
        let lost = request.num_computed.saturating_sub(good_tokens);
        if self.failure_policy == KvLoadFailurePolicy::Fail {
            let reason = FinishReason::Error(format!(
                "loading KV for tokens {good_tokens}.. failed (kv_load_failure_policy = fail)"
            ));
            finished.push(self.finish(id, reason));
            return true;
        }
        request.recomputed_tokens += lost;
        request.hit_tokens = request.hit_tokens.min(good_tokens);
        request.num_computed = request.num_computed.min(good_tokens);
        request.pending_external = request.pending_external.min(good_tokens);
        true
    }

    fn finish(&mut self, id: &str, reason: FinishReason) -> RequestOutput {
        let request = self.requests.remove(id).expect("finish a live request");
        self.aborted_while_loading.remove(id);
        self.finished_recving.remove(id);
        self.running.retain(|r| r != id);
        self.waiting.retain(|r| r != id);
        self.just_finished.insert(id.to_string());
        let (delay_free, kv_transfer_params, transfer) =
            ranks::request_finished(&mut self.ranks, &request.view(), &request.blocks);
        let now = Instant::now();
        let output = RequestOutput {
            request_id: request.id.clone(),
            prompt_token_count: request.num_prompt_tokens,
            output_token_count: request.output_len(),
            output_token_ids: request.tokens[request.num_prompt_tokens..].to_vec(),
            finish_reason: reason,
            logits_digest: format!("{:016x}", request.digest.digest()),
            hit_tokens: request.hit_tokens,
            recomputed_tokens: request.recomputed_tokens,
            transfer,
            time_to_first_token_sec: request
                .first_token
                .map_or(0.0, |t| (t - request.arrived).as_secs_f64()),
            elapsed_sec: (now - request.arrived).as_secs_f64(),
            kv_transfer_params,
        };
        if delay_free {
            self.sending.insert(request.id, request.blocks);
        } else {
            self.free(request.blocks);
        }
        output
    }

    /// Runs `prompts` to completion and returns their outputs in prompt order.
    pub fn generate(
        &mut self,
        prompts: &[Vec<u32>],
        params: SamplingParams,
    ) -> Result<Vec<RequestOutput>, EngineError> {
        let ids: Vec<String> = (0..prompts.len()).map(|i| format!("req-{i}")).collect();
        for (id, prompt) in ids.iter().zip(prompts) {
            self.add_request(id.clone(), prompt.clone(), params.clone())?;
        }
        let mut outputs = self.run_to_completion()?;
        outputs.sort_by_key(|o| ids.iter().position(|id| *id == o.request_id));
        Ok(outputs)
    }
}

impl Request {
    /// At most every token but the last is loaded: the last one's logits are computed.
    fn num_computed_limit(&self) -> usize {
        self.tokens.len() - 1
    }
}

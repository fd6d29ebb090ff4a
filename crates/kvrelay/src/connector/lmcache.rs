//! LMCache's scheduler policy: chunk keys over the tier list (reference/lmcache_vllm.md §3.7).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{
    pd_request_id, saves, wants_first_token, windows_from, ChunkTransfer, ConnectorError,
    ConnectorMetadata, KeyPrefix, RequestView, ScheduledRequest, SchedulerConnector,
};
use crate::config::KvRole;
use crate::keys::ChunkHasher;
use crate::store::TierStack;

/// The knobs of LMCache's vLLM adapter that change what is loaded and saved.
#[derive(Clone, Debug)]
pub struct LmcachePolicy {
    pub role: KvRole,
    /// Drop a trailing partial chunk instead of saving it.
    pub discard_partial_chunks: bool,
    /// Leave the last n tokens out of lookups (a PD decoder uses 1).
    pub skip_last_n_tokens: usize,
    /// Also save KV produced during decode, at chunk boundaries.
    pub save_decode_cache: bool,
    /// Below this many loadable tokens, load nothing.
    pub min_retrieve_tokens: usize,
    /// Load in the background while the engine runs other requests (`enable_async_loading`;
    /// kvrelay reports the load through `get_finished`, as vLLM's asynchronous connectors do).
    pub async_loading: bool,
    /// A PD prefiller: saves go to the decoder's PD buffer, a request at a time.
    pub pd_sender: bool,
}

/// A load decided by `get_num_new_matched_tokens`, confirmed by `update_state_after_alloc`.
#[derive(Debug)]
struct PendingLoad {
    from: usize,
    to: usize,
}

/// LMCache's scheduler half.
pub struct LmcacheScheduler {
    policy: LmcachePolicy,
    hasher: ChunkHasher,
    prefix: KeyPrefix,
    tiers: Arc<TierStack>,
    /// Hit tokens found by the last lookup of each request.
    lookups: HashMap<String, usize>,
    loads: HashMap<String, PendingLoad>,
    /// Tokens of each request already saved (or known to be stored).
    saved_upto: HashMap<String, usize>,
    /// PD requests whose chunks were sent.
    flushed: HashSet<String>,
    /// PD prefills whose whole chunk list went to the worker (see `RequestTransfer::pd_plan`).
    planned: HashSet<String>,
    /// Requests whose lookup stopped short and said why (once per request).
    explained: HashSet<String>,
}

impl LmcacheScheduler {
    pub fn new(
        policy: LmcachePolicy,
        hasher: ChunkHasher,
        prefix: KeyPrefix,
        tiers: Arc<TierStack>,
    ) -> Self {
        LmcacheScheduler {
            policy,
            hasher,
            prefix,
            tiers,
            lookups: HashMap::new(),
            loads: HashMap::new(),
            saved_upto: HashMap::new(),
            flushed: HashSet::new(),
            planned: HashSet::new(),
            explained: HashSet::new(),
        }
    }

    /// Logs, once per request, the chunk a lookup stopped at and why no tier has it.
    fn explain_stop(&mut self, request_id: &str, chunks: &[ChunkTransfer], hit_chunks: usize) {
        let Some(stop) = chunks.get(hit_chunks) else {
            return;
        };
        if !self.explained.insert(request_id.to_string()) {
            return;
        }
        let (key, start) = (&stop.key, stop.window.start);
        let of = chunks.len();
        match self.tiers.why_absent(key) {
            Some(why) => {
                tracing::info!(request_id, %key, "lookup stopped at chunk {hit_chunks} of {of} (token {start}): {why}")
            }
            None => {
                tracing::debug!(request_id, %key, "lookup stopped at chunk {hit_chunks} of {of} (token {start}): not stored in any tier")
            }
        }
    }

    /// Keys and windows of the chunks of `tokens[..len]` that end after `from`.
    fn chunks(
        &self,
        tokens: &[u32],
        from: usize,
        len: usize,
    ) -> Result<Vec<ChunkTransfer>, ConnectorError> {
        let hashes = self.hasher.chunk_hashes(&tokens[..len]);
        let chunk_size = self.hasher.chunk_size();
        windows_from(from, len, chunk_size)
            .into_iter()
            .map(|window| {
                Ok(ChunkTransfer {
                    key: self.prefix.key(hashes[window.start / chunk_size])?,
                    window,
                })
            })
            .collect()
    }

    /// Tokens to save for a request in this step: whole chunks while prefill goes on, and
    /// the partial tail too once the prompt is complete (unless discarded).
    fn save_end(&self, s: &ScheduledRequest<'_>) -> usize {
        let chunk = self.hasher.chunk_size();
        let prompt = s.request.num_prompt_tokens;
        let computed = s.num_computed_tokens.min(s.request.tokens.len());
        let aligned = computed / chunk * chunk;
        if computed < prompt || self.policy.save_decode_cache {
            return if computed >= prompt && !self.policy.discard_partial_chunks {
                computed
            } else {
                aligned
            };
        }
        self.prompt_save_end(s)
    }

    /// Where the saves of a request's whole prompt end.
    fn prompt_save_end(&self, s: &ScheduledRequest<'_>) -> usize {
        let prompt = s.request.num_prompt_tokens.min(s.request.tokens.len());
        if self.policy.discard_partial_chunks {
            prompt / self.hasher.chunk_size() * self.hasher.chunk_size()
        } else {
            prompt
        }
    }
}

impl SchedulerConnector for LmcacheScheduler {
    fn get_num_new_matched_tokens(
        &mut self,
        request: &RequestView<'_>,
        num_computed_tokens: usize,
    ) -> Result<Option<(usize, bool)>, ConnectorError> {
        let tokens = request.tokens;
        let lookup_len = tokens.len().saturating_sub(self.policy.skip_last_n_tokens);
        let chunks = self.chunks(tokens, 0, lookup_len)?;
        let keys: Vec<_> = chunks.iter().map(|c| c.key.clone()).collect();
        let hit_chunks = self.tiers.prefix_hits(&keys);
        self.explain_stop(request.id, &chunks, hit_chunks);
        let hit = chunks[..hit_chunks]
            .last()
            .map_or(0, |c| c.window.start + c.window.tokens);
        self.lookups.insert(request.id.to_string(), hit);
        let mut need = hit.saturating_sub(num_computed_tokens);
        // A full hit still recomputes the last token: the engine needs its logits.
        if hit == tokens.len() && need > 0 {
            need -= 1;
        }
        if need < self.policy.min_retrieve_tokens {
            need = 0;
        }
        Ok(Some((need, self.policy.async_loading && need > 0)))
    }

    fn update_state_after_alloc(
        &mut self,
        request: &RequestView<'_>,
        _block_ids: &[u32],
        num_external_tokens: usize,
    ) {
        // Decide from the token count, not from the blocks (vLLM 0.33's rule).
        if num_external_tokens == 0 {
            self.loads.remove(request.id);
            return;
        }
        let hit = self.lookups.get(request.id).copied().unwrap_or(0);
        let to = hit.min(request.tokens.len());
        let from =
            to.saturating_sub(num_external_tokens + usize::from(hit == request.tokens.len()));
        self.loads
            .insert(request.id.to_string(), PendingLoad { from, to });
    }

    fn build_connector_meta(
        &mut self,
        scheduled: &[ScheduledRequest<'_>],
    ) -> Result<ConnectorMetadata, ConnectorError> {
        let mut meta = ConnectorMetadata::default();
        for s in scheduled {
            let id = s.request.id;
            let loads = match self.loads.remove(id) {
                Some(load) => {
                    // What was loaded is stored already: never save it again.
                    let saved = self.saved_upto.entry(id.to_string()).or_insert(0);
                    *saved =
                        (*saved).max(load.to / self.hasher.chunk_size() * self.hasher.chunk_size());
                    self.chunks(s.request.tokens, load.from, load.to)?
                }
                None => Vec::new(),
            };
            let mut save_chunks = Vec::new();
            if saves(self.policy.role) {
                let end = self.save_end(s);
                let saved = self.saved_upto.get(id).copied().unwrap_or(0);
                if end > saved {
                    let chunk = self.hasher.chunk_size();
                    save_chunks = self.chunks(s.request.tokens, saved / chunk * chunk, end)?;
                    // Saves always gather whole chunks; drop the chunks already complete.
                    save_chunks.retain(|c| c.window.start + c.window.tokens > saved);
                    save_chunks
                        .iter_mut()
                        .for_each(|c| c.window.skip_leading = 0);
                    self.saved_upto.insert(id.to_string(), end);
                }
            }
            let flush = self.policy.pd_sender
                && s.num_computed_tokens >= s.request.num_prompt_tokens
                && self.flushed.insert(id.to_string());
            // The first save of a prompt that takes several steps: every chunk key is known
            // now, so the decoder's pages can be reserved before the prompt is done.
            let pd_plan = if self.policy.pd_sender
                && !flush
                && !save_chunks.is_empty()
                && self.planned.insert(id.to_string())
            {
                self.chunks(s.request.tokens, 0, self.prompt_save_end(s))?
            } else {
                Vec::new()
            };
            meta.push(
                s,
                loads,
                self.policy.async_loading,
                save_chunks,
                flush,
                pd_plan,
            );
        }
        Ok(meta)
    }

    fn request_finished(
        &mut self,
        request: &RequestView<'_>,
        _block_ids: &[u32],
    ) -> (bool, Option<serde_json::Value>) {
        self.lookups.remove(request.id);
        self.loads.remove(request.id);
        self.saved_upto.remove(request.id);
        self.flushed.remove(request.id);
        self.planned.remove(request.id);
        self.explained.remove(request.id);
        // A PD decoder need not have loaded all the KV sent for the request (its lookup
        // or its own cache stopped short): free the rest now rather than at the TTL.
        let (pd_id, scope) = pd_request_id(request);
        self.tiers.release_request(pd_id, scope);
        // LMCache's PD proxy asks the prefiller for the token it sampled, to hand the
        // decoder the prompt plus that token.
        let params = request
            .tokens
            .get(request.num_prompt_tokens)
            .filter(|_| wants_first_token(request.kv_transfer_params))
            .map(|token| serde_json::json!({ "first_tok": token }));
        // Everything is copied out inside wait_for_save: blocks can be freed at once.
        (false, params)
    }
}

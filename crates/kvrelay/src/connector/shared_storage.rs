//! vLLM's SharedStorageConnector (ExampleConnector in 0.33) semantics over kvrelay's disk
//! tier: one entry per request prefix of whole blocks, never the last prompt token
//! (reference/lmcache_vllm.md §1.7).

use std::collections::HashMap;
use std::sync::Arc;

use super::{
    saves, windows_from, ChunkTransfer, ConnectorError, ConnectorMetadata, KeyPrefix, RequestView,
    ScheduledRequest, SchedulerConnector,
};
use crate::config::KvRole;
use crate::keys::{ChunkHasher, HashAlgorithm};
use crate::store::TierStack;

/// vLLM's `align_to_block_size`: whole blocks of `tokens - 1` tokens.
fn align_to_block_size(tokens: usize, block_size: usize) -> usize {
    tokens.saturating_sub(1) / block_size * block_size
}

pub struct SharedStorageScheduler {
    role: KvRole,
    block_size: usize,
    algorithm: HashAlgorithm,
    seed: String,
    prefix: KeyPrefix,
    tiers: Arc<TierStack>,
    /// Loads confirmed by update_state_after_alloc: (already computed, tokens to load).
    loads: HashMap<String, (usize, usize)>,
    saved: std::collections::HashSet<String>,
}

impl SharedStorageScheduler {
    pub fn new(
        role: KvRole,
        block_size: usize,
        algorithm: HashAlgorithm,
        seed: String,
        prefix: KeyPrefix,
        tiers: Arc<TierStack>,
    ) -> Self {
        SharedStorageScheduler {
            role,
            block_size,
            algorithm,
            seed,
            prefix,
            tiers,
            loads: HashMap::new(),
            saved: Default::default(),
        }
    }

    /// The whole prefix `tokens[..len]` as one entry.
    fn entry(
        &self,
        tokens: &[u32],
        len: usize,
        from: usize,
    ) -> Result<ChunkTransfer, ConnectorError> {
        let hasher = ChunkHasher::new(self.algorithm, &self.seed, len)
            .map_err(|e| ConnectorError::Hash(e.to_string()))?;
        let hash = hasher.chunk_hashes(&tokens[..len])[0];
        let window = windows_from(from, len, len)[0];
        Ok(ChunkTransfer {
            key: self.prefix.key(hash)?,
            window,
        })
    }

    /// vLLM looks up the prompt minus one token, aligned down to whole blocks.
    fn lookup_len(&self, request: &RequestView<'_>) -> usize {
        align_to_block_size(request.num_prompt_tokens.saturating_sub(1), self.block_size)
    }
}

impl SchedulerConnector for SharedStorageScheduler {
    fn get_num_new_matched_tokens(
        &mut self,
        request: &RequestView<'_>,
        num_computed_tokens: usize,
    ) -> Result<Option<(usize, bool)>, ConnectorError> {
        let len = self.lookup_len(request);
        if len == 0 || len <= num_computed_tokens {
            return Ok(Some((0, false)));
        }
        let entry = self.entry(request.tokens, len, 0)?;
        let found = self.tiers.prefix_hits(std::slice::from_ref(&entry.key)) == 1;
        Ok(Some((
            if found { len - num_computed_tokens } else { 0 },
            false,
        )))
    }

    fn update_state_after_alloc(
        &mut self,
        request: &RequestView<'_>,
        _block_ids: &[u32],
        num_external_tokens: usize,
    ) {
        if num_external_tokens > 0 {
            let len = self.lookup_len(request);
            self.loads.insert(
                request.id.to_string(),
                (len.saturating_sub(num_external_tokens), len),
            );
        }
    }

    fn build_connector_meta(
        &mut self,
        scheduled: &[ScheduledRequest<'_>],
    ) -> Result<ConnectorMetadata, ConnectorError> {
        let mut meta = ConnectorMetadata::default();
        for s in scheduled {
            let id = s.request.id;
            let loads = match self.loads.remove(id) {
                Some((from, len)) => vec![self.entry(s.request.tokens, len, from)?],
                None => Vec::new(),
            };
            let mut save = Vec::new();
            let prompt = s.request.num_prompt_tokens;
            // Save once, when the whole prompt has been computed: full blocks only, never
            // the last prompt token.
            let len = align_to_block_size(prompt, self.block_size);
            if saves(self.role)
                && s.num_computed_tokens >= prompt
                && len > 0
                && !self.saved.contains(id)
            {
                self.saved.insert(id.to_string());
                save.push(self.entry(s.request.tokens, len, 0)?);
            }
            meta.push(s, loads, false, save, false, Vec::new());
        }
        Ok(meta)
    }

    fn request_finished(
        &mut self,
        request: &RequestView<'_>,
        _block_ids: &[u32],
    ) -> (bool, Option<serde_json::Value>) {
        self.loads.remove(request.id);
        self.saved.remove(request.id);
        (false, None)
    }
}

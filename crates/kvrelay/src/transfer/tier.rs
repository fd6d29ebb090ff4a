//! The PD buffer as the decoder's connector sees it: a tier that holds what prefillers
//! pushed, and the prefiller's side that collects a request's chunks and pushes them.

use std::collections::HashMap;
use std::sync::Arc;

use super::frame::checksum;
use super::{OutgoingChunk, PdConfig, PdPeer, PdReceiver, PdSender, SendStats, TransferError};
use crate::device::HostBuffer;
use crate::keys::CacheKey;
use crate::store::{Chunk, ChunkMeta, StoreError, Tier, TierStats};

/// The decoder's PD buffer in its tier list. A hit consumes the chunk: its page returns to
/// the buffer once the load has copied it out.
pub struct ReceivedKv {
    receiver: Arc<PdReceiver>,
}

impl ReceivedKv {
    pub fn new(receiver: Arc<PdReceiver>) -> Self {
        ReceivedKv { receiver }
    }

    pub fn receiver(&self) -> &Arc<PdReceiver> {
        &self.receiver
    }
}

impl Tier for ReceivedKv {
    fn name(&self) -> &str {
        "pd_buffer"
    }

    fn contains(&self, key: &CacheKey) -> bool {
        self.receiver.contains(key)
    }

    fn get(&self, key: &CacheKey, expected_fingerprint: u64) -> Result<Option<Chunk>, StoreError> {
        match self.receiver.get(key) {
            Some(chunk) if chunk.meta.layout_fingerprint != expected_fingerprint => {
                Err(StoreError::FingerprintMismatch {
                    key: key.to_string(),
                    expected: expected_fingerprint,
                    found: chunk.meta.layout_fingerprint,
                })
            }
            found => Ok(found),
        }
    }

    fn put(&self, _key: &CacheKey, _meta: ChunkMeta, _data: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly {
            tier: "pd_buffer",
            reason: "only a prefiller's PD sender writes the decoder's PD buffer",
        })
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, StoreError> {
        Ok(self.receiver.get(key).is_some())
    }

    fn stats(&self) -> TierStats {
        let occupancy = self.receiver.occupancy();
        TierStats {
            entries: occupancy.used_pages as u64,
            bytes: (occupancy.used_pages * occupancy.page_size) as u64,
            budget: (occupancy.total_pages * occupancy.page_size) as u64,
            ..TierStats::default()
        }
    }
}

/// The prefiller's PD side: gathers a request's chunks as chunked prefill saves them, and
/// sends them all at once when the prompt is done (the receiver admits a request whole).
pub struct PdSink {
    config: PdConfig,
    rank: u32,
    sender: Option<PdSender>,
    pending: HashMap<String, Vec<GatheredChunk>>,
}

/// A chunk waiting to be sent, with the checksum taken when it was gathered.
struct GatheredChunk {
    key: CacheKey,
    meta: ChunkMeta,
    data: HostBuffer,
    checksum: u64,
}

impl PdSink {
    pub fn new(config: PdConfig, rank: u32) -> Self {
        PdSink {
            config,
            rank,
            sender: None,
            pending: HashMap::new(),
        }
    }

    /// Holds one gathered chunk of `request_id` until the request is flushed, and takes its
    /// checksum now: during chunked prefill, so that the flush at the end of the prompt
    /// (on the path to the decoder's first token) only moves bytes.
    pub fn add(&mut self, request_id: &str, key: CacheKey, meta: ChunkMeta, data: HostBuffer) {
        let checksum = checksum(&data);
        self.pending
            .entry(request_id.to_string())
            .or_default()
            .push(GatheredChunk {
                key,
                meta,
                data,
                checksum,
            });
    }

    /// Sends everything held for `request_id` (connecting on first use) and forgets it.
    pub fn flush(&mut self, request_id: &str) -> Result<SendStats, TransferError> {
        let chunks = self.pending.remove(request_id).unwrap_or_default();
        let sender = match self.sender.as_mut() {
            Some(sender) => sender,
            None => {
                let peer = PdPeer::from_config(&self.config, self.rank)?;
                self.sender
                    .insert(PdSender::connect(&self.config, peer, self.rank)?)
            }
        };
        let views: Vec<OutgoingChunk<'_>> = chunks
            .iter()
            .map(|c| OutgoingChunk {
                key: &c.key,
                meta: c.meta,
                data: &c.data,
                checksum: c.checksum,
            })
            .collect();
        sender.send_request(request_id, &views)
    }

    /// Drops what is held for a request that ended before its prompt was saved.
    pub fn forget(&mut self, request_id: &str) {
        self.pending.remove(request_id);
    }
}

//! The PD buffer as the decoder's connector sees it: a tier that holds what prefillers
//! pushed, and the prefiller's side that collects a request's chunks and pushes them.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;

use super::frame::checksum;
use super::{
    OutgoingChunk, PdConfig, PdPeer, PdReceiver, PdSender, PdTarget, SendStats, TransferError,
};
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

/// Connected receivers a sink keeps; past this many, the least recently used link is
/// closed (a proxy round-robins over a handful of decoders, so this is never reached in a
/// sane deployment, but a stream of distinct targets must not pile up sockets).
const MAX_LINKS: usize = 64;

/// The prefiller's PD side: gathers a request's chunks as chunked prefill saves them, and
/// sends them all at once when the prompt is done (the receiver admits a request whole) to
/// the receiver its proxy named, or to the configured peer.
pub struct PdSink {
    config: PdConfig,
    rank: u32,
    /// One handshaken link per receiver, with the flush count of its last use.
    links: HashMap<PdPeer, (PdSender, u64)>,
    flushes: u64,
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
            links: HashMap::new(),
            flushes: 0,
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

    /// Sends everything held for `request_id` to `target`'s receiver of this rank, or to
    /// the configured peer without one (connecting on first use), and forgets it.
    pub fn flush(
        &mut self,
        request_id: &str,
        target: Option<&PdTarget>,
    ) -> Result<SendStats, TransferError> {
        let chunks = self.pending.remove(request_id).unwrap_or_default();
        let peer = match target {
            Some(target) => target.peer(self.rank)?,
            None => PdPeer::from_config(&self.config, self.rank).map_err(|e| {
                TransferError::Config(format!(
                    "request {request_id:?} names no receiver (no disagg_spec) and {e}"
                ))
            })?,
        };
        let sender = self.link(peer)?;
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

    /// The link to `peer`, handshaking on first use.
    fn link(&mut self, peer: PdPeer) -> Result<&mut PdSender, TransferError> {
        self.flushes += 1;
        if !self.links.contains_key(&peer) && self.links.len() >= MAX_LINKS {
            let oldest = self
                .links
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(peer, _)| peer.clone());
            if let Some(oldest) = oldest {
                self.links.remove(&oldest);
            }
        }
        let link = match self.links.entry(peer) {
            Entry::Occupied(link) => link.into_mut(),
            Entry::Vacant(slot) => {
                let sender = PdSender::connect(&self.config, slot.key().clone(), self.rank)?;
                slot.insert((sender, 0))
            }
        };
        link.1 = self.flushes;
        Ok(&mut link.0)
    }

    /// Drops what is held for a request that ended before its prompt was saved.
    pub fn forget(&mut self, request_id: &str) {
        self.pending.remove(request_id);
    }
}

//! The PD buffer as the decoder's connector sees it: a tier that holds what prefillers
//! pushed, and the prefiller's side that collects a request's chunks and pushes them.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::frame::checksum;
use super::sender::notify_proxy;
use super::{
    OutgoingChunk, PdConfig, PdPeer, PdReceiver, PdSender, PdTarget, SendStats, TransferError,
};
use crate::config::PdBackendMode;
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

/// Requests an `async` sink may have queued for its sender thread; one more makes the
/// save step wait, which bounds the staging memory held for sends.
const SEND_QUEUE: usize = 8;

/// The prefiller's PD side: gathers a request's chunks as chunked prefill saves them, and
/// sends them all at once when the prompt is done (the receiver admits a request whole) to
/// the receiver its proxy named, or to the configured peer: from the save step itself
/// (`pd_backend_mode: sync`) or from a sender thread (`async`).
pub struct PdSink {
    pending: HashMap<String, Vec<GatheredChunk>>,
    sending: Sending,
}

enum Sending {
    Inline(Box<Links>),
    Background {
        queue: Option<SyncSender<SendJob>>,
        thread: Option<JoinHandle<()>>,
    },
}

/// One request handed to the sender thread.
struct SendJob {
    request_id: String,
    chunks: Vec<GatheredChunk>,
    target: Option<PdTarget>,
}

/// A chunk waiting to be sent, with the checksum taken when it was gathered.
struct GatheredChunk {
    key: CacheKey,
    meta: ChunkMeta,
    data: HostBuffer,
    checksum: u64,
}

impl PdSink {
    pub fn new(config: PdConfig, rank: u32) -> Result<Self, TransferError> {
        let mode = config.backend_mode;
        let mut links = Links {
            config,
            rank,
            links: HashMap::new(),
            sends: 0,
        };
        let sending = match mode {
            PdBackendMode::Sync => Sending::Inline(Box::new(links)),
            PdBackendMode::Async => {
                let (queue, jobs) = std::sync::mpsc::sync_channel::<SendJob>(SEND_QUEUE);
                let thread = std::thread::Builder::new()
                    .name(format!("kvrelay-pd-send-{rank}"))
                    .spawn(move || {
                        for job in jobs {
                            links.send_or_report(job);
                        }
                    })
                    .map_err(|e| TransferError::io("starting the PD sender thread", e))?;
                Sending::Background {
                    queue: Some(queue),
                    thread: Some(thread),
                }
            }
        };
        Ok(PdSink {
            pending: HashMap::new(),
            sending,
        })
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
    ///
    /// `sync`: returns what the send did, or why it failed. `async`: queues the request
    /// (waiting while [`SEND_QUEUE`] requests are ahead of it) and returns `None`; the
    /// sender thread tells the proxy whether the KV arrived.
    pub fn flush(
        &mut self,
        request_id: &str,
        target: Option<PdTarget>,
    ) -> Result<Option<SendStats>, TransferError> {
        let chunks = self.pending.remove(request_id).unwrap_or_default();
        let job = SendJob {
            request_id: request_id.to_string(),
            chunks,
            target,
        };
        match &mut self.sending {
            Sending::Inline(links) => links.send(&job).map(Some),
            Sending::Background { queue, .. } => queue
                .as_ref()
                .and_then(|q| q.send(job).ok())
                .map(|()| None)
                .ok_or(TransferError::SenderStopped),
        }
    }

    /// Drops what is held for a request that ended before its prompt was saved.
    pub fn forget(&mut self, request_id: &str) {
        self.pending.remove(request_id);
    }
}

impl Drop for PdSink {
    /// Lets the sender thread finish what is queued (each send is bounded by the transfer
    /// timeouts), so KV a prefill produced is not lost when the engine shuts down.
    fn drop(&mut self) {
        if let Sending::Background { queue, thread } = &mut self.sending {
            drop(queue.take());
            if let Some(thread) = thread.take() {
                if thread.join().is_err() {
                    tracing::error!("the PD sender thread panicked");
                }
            }
        }
    }
}

/// A sink's connections: one handshaken link per receiver.
struct Links {
    config: PdConfig,
    rank: u32,
    /// Each link with the send count of its last use.
    links: HashMap<PdPeer, (PdSender, u64)>,
    sends: u64,
}

impl Links {
    fn send(&mut self, job: &SendJob) -> Result<SendStats, TransferError> {
        let peer = match &job.target {
            Some(target) => target.peer(self.rank)?,
            None => PdPeer::from_config(&self.config, self.rank).map_err(|e| {
                TransferError::Config(format!(
                    "request {:?} names no receiver (no disagg_spec) and {e}",
                    job.request_id
                ))
            })?,
        };
        let sender = self.link(peer)?;
        let views: Vec<OutgoingChunk<'_>> = job
            .chunks
            .iter()
            .map(|c| OutgoingChunk {
                key: &c.key,
                meta: c.meta,
                data: &c.data,
                checksum: c.checksum,
            })
            .collect();
        sender.send_request(&job.request_id, &views)
    }

    /// The sender thread's send: a failure is logged and reported to the proxy, which then
    /// fails the request at once instead of waiting for KV that will not come.
    fn send_or_report(&mut self, job: SendJob) {
        let Err(error) = self.send(&job) else {
            return;
        };
        let request = &job.request_id;
        tracing::warn!(request, %error, "sending KV to the decoder failed; the proxy is told");
        let reason = format!("prefiller rank {}: {error}", self.rank);
        if let Err(notify_error) = notify_proxy(&self.config, request, self.rank, Some(&reason)) {
            tracing::warn!(request, %notify_error, "could not tell the proxy that a send failed");
        }
    }

    /// The link to `peer`, handshaking on first use; past [`MAX_LINKS`] links the least
    /// recently used one is closed.
    fn link(&mut self, peer: PdPeer) -> Result<&mut PdSender, TransferError> {
        self.sends += 1;
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
        link.1 = self.sends;
        Ok(&mut link.0)
    }
}

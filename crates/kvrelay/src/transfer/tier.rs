//! The PD buffer as the decoder's connector sees it: a tier that holds what prefillers
//! pushed, and the prefiller's side that collects a request's chunks and pushes them.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::frame::checksum;
use super::sender::notify_proxy;
use super::{
    OutgoingChunk, PdConfig, PdPeer, PdReceiver, PdSender, PdTarget, SendStats, TransferError,
};
use crate::config::PdBackendMode;
use crate::device::{DeviceError, HostBuffer, StagingPool};
use crate::keys::CacheKey;
use crate::store::{Chunk, ChunkMeta, RequestIdScope, StoreError, Tier, TierStats};

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
        checked_fingerprint(key, self.receiver.get(key), expected_fingerprint)
    }

    fn get_for_request(
        &self,
        key: &CacheKey,
        expected_fingerprint: u64,
        request_id: &str,
    ) -> Result<Option<Chunk>, StoreError> {
        let chunk = self.receiver.get_for_request(key, request_id);
        checked_fingerprint(key, chunk, expected_fingerprint)
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

    /// Frees the pages still held for the PD request `request_id`; with a shared id, also
    /// refuses its transfer if it has not arrived yet.
    fn release_request(&self, request_id: &str, scope: RequestIdScope) {
        match scope {
            RequestIdScope::Shared => self.receiver.cancel(request_id),
            RequestIdScope::Local => self.receiver.release(request_id),
        };
    }
}

/// Whether a decoder whose lookup covers the first `lookup_len` tokens of a prompt asks for
/// the chunk whose window ends at token `window_end`. Its lookup cuts chunks at multiples of
/// `chunk_size` and ends with a partial chunk at `lookup_len`; a chunk ending anywhere else
/// is keyed over other tokens, so it would never be found.
fn decoder_looks_up(window_end: usize, lookup_len: usize, chunk_size: usize) -> bool {
    window_end <= lookup_len && (window_end.is_multiple_of(chunk_size) || window_end == lookup_len)
}

/// A taken chunk, unless it was saved with another layout than the one expected.
fn checked_fingerprint(
    key: &CacheKey,
    chunk: Option<Chunk>,
    expected: u64,
) -> Result<Option<Chunk>, StoreError> {
    match chunk {
        Some(chunk) if chunk.meta.layout_fingerprint != expected => {
            Err(StoreError::FingerprintMismatch {
                key: key.to_string(),
                expected,
                found: chunk.meta.layout_fingerprint,
            })
        }
        found => Ok(found),
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
    /// Staging buffers of sent (or forgotten) chunks, for the next gathers.
    staging: Arc<StagingPool<HostBuffer>>,
    /// Chunks left out of sends because the decoder never looks them up, in either mode.
    skipped_chunks: Arc<AtomicU64>,
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
    /// Tokens the decoder will be handed for this request (what its lookup starts from).
    decoder_tokens: usize,
}

impl SendJob {
    /// Hands the job's staging buffers back for the next gathers.
    fn recycle(self, staging: &StagingPool<HostBuffer>) {
        for chunk in self.chunks {
            staging.give_back(chunk.data);
        }
    }
}

/// A chunk waiting to be sent, with the checksum taken when it was gathered.
struct GatheredChunk {
    key: CacheKey,
    meta: ChunkMeta,
    data: HostBuffer,
    checksum: u64,
    /// The token after the chunk's last: what decides whether the decoder looks it up.
    window_end: usize,
}

impl PdSink {
    pub fn new(config: PdConfig, rank: u32) -> Result<Self, TransferError> {
        let mode = config.backend_mode;
        let skipped_chunks = Arc::new(AtomicU64::new(0));
        // As many idle chunk buffers as the decoder's buffer has pages: one request's worth
        // at most (a larger one could never be admitted whole).
        let pages = (config.buffer_size / config.page_size().max(1) as u64).max(1);
        let staging = Arc::new(StagingPool::keeping(pages as usize));
        let recycled = Arc::clone(&staging);
        let mut links = Links {
            config,
            rank,
            links: HashMap::new(),
            sends: 0,
            skipped_chunks: Arc::clone(&skipped_chunks),
        };
        let sending = match mode {
            PdBackendMode::Sync => Sending::Inline(Box::new(links)),
            PdBackendMode::Async => {
                let (queue, jobs) = std::sync::mpsc::sync_channel::<SendJob>(SEND_QUEUE);
                let thread = std::thread::Builder::new()
                    .name(format!("kvrelay-pd-send-{rank}"))
                    .spawn(move || {
                        for job in jobs {
                            links.send_or_report(&job);
                            job.recycle(&recycled);
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
            staging,
            skipped_chunks,
        })
    }

    /// A staging buffer of `len` bytes to gather a chunk into before [`PdSink::add`]: the
    /// buffer of a chunk already sent when one of that length is idle, else a new one from
    /// `alloc` (the device's staging allocator). So a steady stream of requests gathers into
    /// the same, already faulted-in memory instead of allocating per request.
    pub fn staging_buffer(
        &self,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<HostBuffer, DeviceError>,
    ) -> Result<HostBuffer, DeviceError> {
        self.staging.take_exact(len, alloc)
    }

    /// Holds one gathered chunk of `request_id`, whose window of tokens ends at
    /// `window_end`, until the request is flushed, and takes its checksum now: during
    /// chunked prefill, so that the flush at the end of the prompt (on the path to the
    /// decoder's first token) only moves bytes.
    pub fn add(
        &mut self,
        request_id: &str,
        key: CacheKey,
        meta: ChunkMeta,
        data: HostBuffer,
        window_end: usize,
    ) {
        let checksum = checksum(&data);
        self.pending
            .entry(request_id.to_string())
            .or_default()
            .push(GatheredChunk {
                key,
                meta,
                data,
                checksum,
                window_end,
            });
    }

    /// Sends what is held for `request_id` to `target`'s receiver of this rank, or to the
    /// configured peer without one (connecting on first use), and forgets it. Only the
    /// chunks the decoder will look up travel: it is handed `decoder_tokens` tokens and
    /// leaves out the last `skip_last_n_tokens` its `Welcome` announced. With nothing left
    /// to send, the proxy is told the KV is ready at once.
    ///
    /// `sync`: returns what the send did, or why it failed. `async`: queues the request
    /// (waiting while [`SEND_QUEUE`] requests are ahead of it) and returns `None`; the
    /// sender thread tells the proxy whether the KV arrived.
    pub fn flush(
        &mut self,
        request_id: &str,
        target: Option<PdTarget>,
        decoder_tokens: usize,
    ) -> Result<Option<SendStats>, TransferError> {
        let chunks = self.pending.remove(request_id).unwrap_or_default();
        let job = SendJob {
            request_id: request_id.to_string(),
            chunks,
            target,
            decoder_tokens,
        };
        match &mut self.sending {
            Sending::Inline(links) => {
                let sent = links.send(&job);
                job.recycle(&self.staging);
                sent.map(Some)
            }
            Sending::Background { queue, .. } => queue
                .as_ref()
                .and_then(|q| q.send(job).ok())
                .map(|()| None)
                .ok_or(TransferError::SenderStopped),
        }
    }

    /// Drops what is held for a request that ended before its prompt was saved.
    pub fn forget(&mut self, request_id: &str) {
        for chunk in self.pending.remove(request_id).unwrap_or_default() {
            self.staging.give_back(chunk.data);
        }
    }

    /// Chunks gathered but left out of sends so far because the decoder would never look
    /// them up (both modes; a `sync` send also reports its own in [`SendStats`]).
    pub fn skipped_chunks(&self) -> u64 {
        self.skipped_chunks.load(Ordering::Relaxed)
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
    skipped_chunks: Arc<AtomicU64>,
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
        let chunk_size = self.config.chunk_size;
        let sender = self.link(peer)?;
        let lookup_len = job
            .decoder_tokens
            .saturating_sub(sender.receiver_skip_last_n_tokens());
        let views: Vec<OutgoingChunk<'_>> = job
            .chunks
            .iter()
            .filter(|c| decoder_looks_up(c.window_end, lookup_len, chunk_size))
            .map(|c| OutgoingChunk {
                key: &c.key,
                meta: c.meta,
                data: &c.data,
                checksum: c.checksum,
            })
            .collect();
        let skipped = job.chunks.len() - views.len();
        let mut stats = if views.is_empty() {
            // Nothing the decoder would load: no pages to ask for, but the proxy still
            // waits to hear that this rank is done.
            SendStats {
                channel: self.config.channel,
                chunks: 0,
                bytes: 0,
                alloc_wait: Duration::ZERO,
                transfer: Duration::ZERO,
                notified: notify_proxy(&self.config, &job.request_id, self.rank, None)?,
                skipped_chunks: 0,
            }
        } else {
            sender.send_request(&job.request_id, &views)?
        };
        stats.skipped_chunks = skipped;
        self.skipped_chunks
            .fetch_add(skipped as u64, Ordering::Relaxed);
        Ok(stats)
    }

    /// The sender thread's send: a failure is logged and reported to the proxy, which then
    /// fails the request at once instead of waiting for KV that will not come.
    fn send_or_report(&mut self, job: &SendJob) {
        let Err(error) = self.send(job) else {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::windows_from;

    /// The rule the sender applies is exactly the decoder's chunking of its lookup.
    #[test]
    fn the_send_rule_matches_the_chunks_a_decoder_looks_up() {
        for chunk_size in [1, 4, 16] {
            for lookup_len in 0..50 {
                let looked_up: Vec<usize> = windows_from(0, lookup_len, chunk_size)
                    .iter()
                    .map(|w| w.start + w.tokens)
                    .collect();
                for window_end in 1..60 {
                    assert_eq!(
                        decoder_looks_up(window_end, lookup_len, chunk_size),
                        looked_up.contains(&window_end),
                        "chunk_size {chunk_size}, lookup {lookup_len}, end {window_end}"
                    );
                }
            }
        }
    }
}

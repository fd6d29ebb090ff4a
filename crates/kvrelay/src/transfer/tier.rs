//! The PD buffer as the decoder's connector sees it: a tier that holds what prefillers
//! pushed, and the prefiller's side that collects a request's chunks and pushes them.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::frame::{
    checksum, combine_segments, num_segments, segment_digest_of_parts, SegmentTally,
};
use super::sender::notify_proxy;
use super::{
    ChannelKind, ChunkPlan, OutgoingChunk, PdConfig, PdPeer, PdReceiver, PdSender, PdTarget,
    PdTransfer, SendStats, SharedStaging, TransferError,
};
use crate::config::PdBackendMode;
use crate::device::{DeviceError, HostBuffer, StagingPool};
use crate::keys::CacheKey;
use crate::layout::KvCacheSpec;
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

/// Jobs an `async` sink may have queued for its sender thread, in steps' worth: a step
/// hands over at most one job per layer (saved layer by layer) and a seal and a flush per
/// request; one more job makes the save wait, which bounds the staging memory held for
/// sends while leaving the sender several steps of slack.
const SEND_QUEUE_STEPS: usize = 8;

/// The prefiller's PD side, towards the receiver its proxy named or the configured peer,
/// from the save step itself (`pd_backend_mode: sync`) or from a sender thread (`async`).
///
/// A request [`reserve`](PdSink::reserve)d at its first step (chunked prefill: every chunk
/// key is known then) has its decoder pages held from that step on, and each chunk
/// [`add`](PdSink::add)ed goes over at once; [`flush`](PdSink::flush) at the prompt's end
/// only commits. Without a reservation (or when the chunks saved differ from those
/// reserved), the chunks are held and all sent at the flush.
pub struct PdSink {
    pending: HashMap<String, Vec<GatheredChunk>>,
    /// Requests reserved and not yet flushed or forgotten: their chunks go to the sender
    /// as they are added.
    reserved: HashSet<String>,
    /// Whether the channel moves a chunk in pieces (tcp, shm): reserved requests may then
    /// be saved layer by layer.
    takes_pieces: bool,
    /// Whether new staging buffers are shared files the decoder pulls from (shm).
    shared_staging: bool,
    sending: Sending,
    /// Staging buffers of sent (or forgotten) chunks, for the next gathers.
    staging: Arc<StagingPool<HostBuffer>>,
    counters: Arc<SinkCounters>,
}

/// What a sink's sends did, counted where they happen (on the sender thread in `async`).
#[derive(Default)]
struct SinkCounters {
    /// Chunks left out of sends because the decoder never looks them up, in either mode.
    skipped_chunks: AtomicU64,
    /// Requests committed on their reservation: every chunk went over in the step that
    /// computed it, and the prompt's end only committed.
    reserved_sends: AtomicU64,
    /// Chunks sealed after going over layer by layer, each layer as the forward computed it.
    layered_chunks: AtomicU64,
}

enum Sending {
    Inline(Box<Links>),
    Background {
        queue: Option<SyncSender<Job>>,
        thread: Option<JoinHandle<()>>,
    },
}

/// What the save steps hand the sender, in order.
enum Job {
    Reserve(Reservation),
    Put {
        request_id: String,
        chunk: GatheredChunk,
    },
    /// One run of layers of a reserved request's chunks saved in this step.
    Layers {
        request_id: String,
        pieces: Vec<(CacheKey, LayerPiece)>,
    },
    /// A chunk saved layer by layer whose every layer was added.
    Seal {
        request_id: String,
        chunk: SealedChunk,
    },
    Flush(SendJob),
    Forget(String),
}

/// A request's every chunk, declared at its first step.
struct Reservation {
    request_id: String,
    /// Each chunk's key, meta and the token after its last.
    chunks: Vec<(CacheKey, ChunkMeta, usize)>,
    target: Option<PdTarget>,
    decoder_tokens: usize,
}

/// A reserved request on the sender's side.
struct Open {
    /// `None` when the reserve or a put failed: the flush then sends the held chunks.
    transfer: Option<PdTransfer>,
    /// Index in the reserve of each chunk the decoder looks up.
    index: HashMap<CacheKey, usize>,
    /// Chunks added so far (put or not), held for a fallback send and then recycled.
    chunks: Vec<GatheredChunk>,
    /// Chunks saved layer by layer, until their seal.
    layers: HashMap<CacheKey, Layered>,
    put: usize,
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
            chunk.data.recycle(staging);
        }
    }
}

/// A chunk waiting to be sent, with the checksum of its bytes.
struct GatheredChunk {
    key: CacheKey,
    meta: ChunkMeta,
    data: ChunkBytes,
    checksum: u64,
    /// The token after the chunk's last: what decides whether the decoder looks it up.
    window_end: usize,
}

/// A chunk saved layer by layer, at its seal: what [`GatheredChunk`] holds besides bytes.
struct SealedChunk {
    key: CacheKey,
    meta: ChunkMeta,
    window_end: usize,
}

/// A gathered chunk's bytes: whole, or, saved layer by layer, in pieces.
enum ChunkBytes {
    Whole(HostBuffer),
    /// Pieces whose layer runs tile all layers.
    Layers(Vec<LayerPiece>),
}

/// Layers `layers` of one chunk of `tokens` tokens: their slice of each plane, back to
/// back (see [`KvCacheSpec::chunk_layer_ranges`]).
struct LayerPiece {
    layers: Range<usize>,
    tokens: usize,
    data: HostBuffer,
}

/// A chunk being saved layer by layer, until its seal: its pieces so far, and the digest
/// of each checksum segment they completed, taken as each piece comes (so the seal after
/// the last layer only combines digests).
struct Layered {
    tokens: usize,
    pieces: Vec<LayerPiece>,
    segments: SegmentTally,
    digests: Vec<Option<u64>>,
    /// A piece that did not [fit](Layered::fits) came: the chunk is never sealed.
    broken: bool,
}

impl LayerPiece {
    /// Each of the piece's plane slices with its place in the chunk.
    fn in_chunk<'a>(
        &'a self,
        spec: &KvCacheSpec,
    ) -> impl Iterator<Item = (Range<usize>, &'a [u8])> + 'a {
        let mut at = 0;
        spec.chunk_layer_ranges(self.tokens, self.layers.clone())
            .map(move |range| {
                let bytes = &self.data[at..at + range.len()];
                at += range.len();
                (range, bytes)
            })
    }
}

impl Layered {
    fn new(spec: &KvCacheSpec, tokens: usize) -> Self {
        let len = spec.chunk_bytes(tokens);
        Layered {
            tokens,
            pieces: Vec::new(),
            segments: SegmentTally::new(len as u64),
            digests: vec![None; num_segments(len)],
            broken: false,
        }
    }

    /// Whether `piece` belongs in this chunk: its tokens, layers inside the chunk's and
    /// none added before, and the length those take. One that does not is a bug in the
    /// save, and breaks the chunk.
    fn fits(&self, piece: &LayerPiece, spec: &KvCacheSpec) -> bool {
        let layers = &piece.layers;
        piece.tokens == self.tokens
            && !layers.is_empty()
            && layers.end <= spec.num_layers
            && piece.data.len() == spec.chunk_layers_bytes(self.tokens, layers.clone())
            && !self
                .pieces
                .iter()
                .any(|p| p.layers.start < layers.end && layers.start < p.layers.end)
    }

    /// Takes `piece`, which [`fits`](Layered::fits), and hashes each checksum segment it
    /// completes.
    fn add(&mut self, piece: LayerPiece, spec: &KvCacheSpec) {
        let mut whole = Vec::new();
        for (range, _) in piece.in_chunk(spec) {
            let bytes = range.start as u64..range.end as u64;
            self.segments.add(bytes, |index, r| {
                whole.push((index, r.start as usize..r.end as usize))
            });
        }
        self.pieces.push(piece);
        for (index, range) in whole {
            self.digests[index as usize] = Some(self.digest(range, spec));
        }
    }

    /// The digest of checksum segment `range`, all of whose bytes are held, hashed where
    /// the pieces hold them: a segment that spans several pieces is streamed through the
    /// hash part by part, not put together first.
    fn digest(&self, range: Range<usize>, spec: &KvCacheSpec) -> u64 {
        let mut parts: Vec<(usize, &[u8])> = self
            .pieces
            .iter()
            .flat_map(|p| p.in_chunk(spec))
            .filter_map(|(r, bytes)| {
                let (start, end) = (r.start.max(range.start), r.end.min(range.end));
                (start < end).then(|| (start, &bytes[start - r.start..end - r.start]))
            })
            .collect();
        parts.sort_unstable_by_key(|&(start, _)| start);
        segment_digest_of_parts(parts.into_iter().map(|(_, bytes)| bytes))
    }

    /// The chunk's checksum, once every byte came in pieces that fit.
    fn checksum(&self) -> Option<u64> {
        if self.broken || !self.segments.complete() {
            return None;
        }
        let digests: Option<Vec<u64>> = self.digests.iter().copied().collect();
        digests.map(|d| combine_segments(&d))
    }
}

impl ChunkBytes {
    /// The chunk's bytes in one buffer, putting pieces together (only a fallback send of
    /// a chunk saved layer by layer needs this).
    fn whole(
        &mut self,
        spec: &KvCacheSpec,
        tokens: usize,
        staging: &StagingPool<HostBuffer>,
    ) -> Result<&HostBuffer, DeviceError> {
        if let ChunkBytes::Layers(pieces) = self {
            let mut whole = staging.take_exact(spec.chunk_bytes(tokens), HostBuffer::zeroed)?;
            for piece in pieces.iter() {
                for (range, bytes) in piece.in_chunk(spec) {
                    whole[range].copy_from_slice(bytes);
                }
            }
            for piece in std::mem::take(pieces) {
                staging.give_back(piece.data);
            }
            *self = ChunkBytes::Whole(whole);
        }
        match self {
            ChunkBytes::Whole(whole) => Ok(whole),
            ChunkBytes::Layers(_) => unreachable!("pieces were put together above"),
        }
    }

    fn recycle(self, staging: &StagingPool<HostBuffer>) {
        match self {
            ChunkBytes::Whole(data) => staging.give_back(data),
            ChunkBytes::Layers(pieces) => {
                pieces.into_iter().for_each(|p| staging.give_back(p.data))
            }
        }
    }
}

impl PdSink {
    pub fn new(config: PdConfig, rank: u32) -> Result<Self, TransferError> {
        let mode = config.backend_mode;
        let takes_pieces = config.channel.moves_pieces();
        let shared_staging = config.channel == ChannelKind::Shm;
        let counters = Arc::new(SinkCounters::default());
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
            open: HashMap::new(),
            counters: Arc::clone(&counters),
        };
        let sending = match mode {
            PdBackendMode::Sync => Sending::Inline(Box::new(links)),
            PdBackendMode::Async => {
                let queued = SEND_QUEUE_STEPS * (links.config.spec.num_layers + 2);
                let (queue, jobs) = std::sync::mpsc::sync_channel::<Job>(queued);
                let thread = std::thread::Builder::new()
                    .name(format!("kvrelay-pd-send-{rank}"))
                    .spawn(move || {
                        // A failed send is reported to the proxy, which then fails the
                        // request at once instead of waiting for KV that will not come.
                        for job in jobs {
                            if let Some((request, Err(error))) = links.run(job, &recycled) {
                                links.report(&request, &error);
                            }
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
            reserved: HashSet::new(),
            takes_pieces,
            shared_staging,
            sending,
            staging,
            counters,
        })
    }

    /// A staging buffer of `len` bytes to gather a chunk into before [`PdSink::add`]: the
    /// buffer of a chunk already sent when one of that length is idle, else a new one from
    /// `alloc` (the device's staging allocator). So a steady stream of requests gathers into
    /// the same, already faulted-in memory instead of allocating per request. Over shm a
    /// new buffer is a [`SharedStaging`] file, which the decoder pulls from (`alloc` only
    /// when that file cannot be made).
    pub fn staging_buffer(
        &self,
        len: usize,
        alloc: impl FnOnce(usize) -> Result<HostBuffer, DeviceError>,
    ) -> Result<HostBuffer, DeviceError> {
        if !self.shared_staging {
            return self.staging.take_exact(len, alloc);
        }
        self.staging.take_exact(len, |len| {
            match SharedStaging::new(len).map(SharedStaging::into_host_buffer) {
                Ok(buffer) => buffer,
                Err(error) => {
                    tracing::warn!(%error, len, "no shared PD staging file: the sender copies instead");
                    alloc(len)
                }
            }
        })
    }

    /// Reserves the decoder's pages for every chunk of `request_id` at its first step:
    /// `chunks` are each chunk's key, meta and the token after its last, in prompt order;
    /// `target` and `decoder_tokens` as for [`PdSink::flush`]. Only the chunks the decoder
    /// will look up are reserved. A failed reserve is logged, and the request's chunks
    /// are then held and sent at the flush as without one.
    pub fn reserve(
        &mut self,
        request_id: &str,
        chunks: Vec<(CacheKey, ChunkMeta, usize)>,
        target: Option<PdTarget>,
        decoder_tokens: usize,
    ) -> Result<(), TransferError> {
        if !self.reserved.insert(request_id.to_string()) {
            return Ok(());
        }
        self.dispatch(Job::Reserve(Reservation {
            request_id: request_id.to_string(),
            chunks,
            target,
            decoder_tokens,
        }))
        .map(drop)
    }

    /// Hands `request_id`'s `job` to the sender, logging a sender that stopped: the
    /// request's KV then never arrives, and the decoder recomputes it.
    fn hand_over(&mut self, request_id: &str, job: Job) {
        if let Err(error) = self.dispatch(job) {
            tracing::warn!(request = request_id, %error, "the PD sender did not take a job");
        }
    }

    /// Hands the sender (inline or its thread) one job; a flush run inline returns what
    /// its send did.
    fn dispatch(&mut self, job: Job) -> Result<Option<SendStats>, TransferError> {
        match &mut self.sending {
            Sending::Inline(links) => match links.run(job, &self.staging) {
                Some((_, sent)) => sent.map(Some),
                None => Ok(None),
            },
            Sending::Background { queue, .. } => queue
                .as_ref()
                .and_then(|q| q.send(job).ok())
                .map(|()| None)
                .ok_or(TransferError::SenderStopped),
        }
    }

    /// Takes one gathered chunk of `request_id`, whose window of tokens ends at
    /// `window_end`, and its checksum now, during chunked prefill: a reserved request's
    /// chunk goes to the decoder now, another is held until the flush, which then (on the
    /// path to the decoder's first token) only moves bytes.
    pub fn add(
        &mut self,
        request_id: &str,
        key: CacheKey,
        meta: ChunkMeta,
        data: HostBuffer,
        window_end: usize,
    ) {
        let chunk = GatheredChunk {
            checksum: checksum(&data),
            key,
            meta,
            data: ChunkBytes::Whole(data),
            window_end,
        };
        if self.reserved.contains(request_id) {
            let put = Job::Put {
                request_id: request_id.to_string(),
                chunk,
            };
            self.hand_over(request_id, put);
            return;
        }
        self.pending
            .entry(request_id.to_string())
            .or_default()
            .push(chunk);
    }

    /// Whether `request_id`'s chunks may be saved layer by layer ([`PdSink::add_layers`],
    /// [`PdSink::seal_layers`]): it is reserved, and the channel moves chunks in pieces.
    pub fn takes_layers(&self, request_id: &str) -> bool {
        self.takes_pieces && self.reserved.contains(request_id)
    }

    /// Takes layers `layers` of the chunks of `request_id` saved in this step, one piece
    /// per chunk (each plane's slice of those layers, back to back, as
    /// [`paged_to_chunk_layers`](crate::plan::paged_to_chunk_layers) gathers them), as soon
    /// as the forward computed them: they go to the decoder while the next layers compute.
    /// Only for requests that [`take layers`](PdSink::takes_layers).
    /// `pieces` are each chunk's key, tokens and piece.
    pub fn add_layers(
        &mut self,
        request_id: &str,
        layers: Range<usize>,
        pieces: Vec<(CacheKey, usize, HostBuffer)>,
    ) {
        let pieces = pieces
            .into_iter()
            .map(|(key, tokens, data)| {
                let layers = layers.clone();
                (
                    key,
                    LayerPiece {
                        layers,
                        tokens,
                        data,
                    },
                )
            })
            .collect();
        let job = Job::Layers {
            request_id: request_id.to_string(),
            pieces,
        };
        self.hand_over(request_id, job);
    }

    /// Ends the layer-by-layer save of chunk `key` of `request_id` (window ending at
    /// `window_end`), whose every layer was added: the sender seals it with the checksum of
    /// the whole chunk.
    pub fn seal_layers(
        &mut self,
        request_id: &str,
        key: CacheKey,
        meta: ChunkMeta,
        window_end: usize,
    ) {
        let job = Job::Seal {
            request_id: request_id.to_string(),
            chunk: SealedChunk {
                key,
                meta,
                window_end,
            },
        };
        self.hand_over(request_id, job);
    }

    /// Sends what is held for `request_id` to `target`'s receiver of this rank, or to the
    /// configured peer without one (connecting on first use), and forgets it. Only the
    /// chunks the decoder will look up travel: it is handed `decoder_tokens` tokens and
    /// leaves out the last `skip_last_n_tokens` its `Welcome` announced. With nothing left
    /// to send, the proxy is told the KV is ready at once.
    ///
    /// `sync`: returns what the send did, or why it failed. `async`: queues the request
    /// (waiting while [`SEND_QUEUE_STEPS`] steps' jobs are ahead of it) and returns `None`; the
    /// sender thread tells the proxy whether the KV arrived.
    pub fn flush(
        &mut self,
        request_id: &str,
        target: Option<PdTarget>,
        decoder_tokens: usize,
    ) -> Result<Option<SendStats>, TransferError> {
        self.reserved.remove(request_id);
        let chunks = self.pending.remove(request_id).unwrap_or_default();
        self.dispatch(Job::Flush(SendJob {
            request_id: request_id.to_string(),
            chunks,
            target,
            decoder_tokens,
        }))
    }

    /// Drops what is held for a request that ended before its prompt was saved; a
    /// reservation is given up, and the decoder frees its pages.
    pub fn forget(&mut self, request_id: &str) {
        for chunk in self.pending.remove(request_id).unwrap_or_default() {
            chunk.data.recycle(&self.staging);
        }
        if self.reserved.remove(request_id) {
            self.hand_over(request_id, Job::Forget(request_id.to_string()));
        }
    }

    /// Chunks gathered but left out of sends so far because the decoder would never look
    /// them up (both modes; a `sync` send also reports its own in [`SendStats`]).
    pub fn skipped_chunks(&self) -> u64 {
        self.counters.skipped_chunks.load(Ordering::Relaxed)
    }

    /// Requests sent while their prompt was computed: reserved at the first step, each
    /// chunk put in the step that computed it, committed at the prompt's end.
    pub fn reserved_sends(&self) -> u64 {
        self.counters.reserved_sends.load(Ordering::Relaxed)
    }

    /// Chunks that went to their reserved pages layer by layer, each layer as soon as the
    /// forward computed it (see [`PdSink::add_layers`]).
    pub fn layered_chunks(&self) -> u64 {
        self.counters.layered_chunks.load(Ordering::Relaxed)
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
    /// Reserved requests not yet flushed or forgotten.
    open: HashMap<String, Open>,
    counters: Arc<SinkCounters>,
}

impl Links {
    /// Runs one job; a flush answers with its request and what its send did: the commit
    /// of a reservation, or a whole send (no usable reservation).
    fn run(
        &mut self,
        job: Job,
        staging: &StagingPool<HostBuffer>,
    ) -> Option<(String, Result<SendStats, TransferError>)> {
        match job {
            Job::Reserve(r) => {
                let open = self.reserve(&r).unwrap_or_else(|error| {
                    tracing::warn!(request = r.request_id, %error, "reserving the decoder's pages failed; sending at the prompt's end");
                    Open::new(None, HashMap::new())
                });
                self.open.insert(r.request_id, open);
                None
            }
            Job::Put { request_id, chunk } => {
                match self.open.get_mut(&request_id) {
                    Some(open) => open.put(&request_id, chunk),
                    None => chunk.data.recycle(staging),
                }
                None
            }
            Job::Layers { request_id, pieces } => {
                match self.open.get_mut(&request_id) {
                    Some(open) => open.put_layers(&request_id, pieces, &self.config.spec, staging),
                    None => pieces
                        .into_iter()
                        .for_each(|(_, p)| staging.give_back(p.data)),
                }
                None
            }
            Job::Seal { request_id, chunk } => {
                if let Some(open) = self.open.get_mut(&request_id) {
                    if open.seal(&request_id, chunk, staging) {
                        self.counters.layered_chunks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                None
            }
            Job::Forget(request_id) => {
                // Dropping the transfer closes its connection: the decoder frees the pages.
                if let Some(open) = self.open.remove(&request_id) {
                    open.recycle(staging);
                }
                None
            }
            Job::Flush(mut job) => {
                let mut transfer = None;
                if let Some(mut open) = self.open.remove(&job.request_id) {
                    open.chunks.append(&mut job.chunks);
                    job.chunks = std::mem::take(&mut open.chunks);
                    let wanted = self.looked_up(&job).unwrap_or(usize::MAX);
                    // Every chunk the decoder looks up was reserved and put: commit.
                    transfer = open
                        .transfer
                        .take()
                        .filter(|t| open.put == t.num_chunks() && open.put == wanted);
                    open.recycle(staging);
                }
                let sent = match transfer {
                    Some(transfer) => self.commit(&job, transfer),
                    None => self.send(&mut job, staging),
                };
                let request = std::mem::take(&mut job.request_id);
                job.recycle(staging);
                Some((request, sent))
            }
        }
    }

    /// Asks the decoder for the pages of every chunk of `r` it will look up.
    fn reserve(&mut self, r: &Reservation) -> Result<Open, TransferError> {
        let chunk_size = self.config.chunk_size;
        let (sender, lookup_len) =
            self.link_and_lookup(&r.request_id, r.target.as_ref(), r.decoder_tokens)?;
        let wanted: Vec<&(CacheKey, ChunkMeta, usize)> = r
            .chunks
            .iter()
            .filter(|(_, _, end)| decoder_looks_up(*end, lookup_len, chunk_size))
            .collect();
        let plans: Vec<ChunkPlan<'_>> = wanted
            .iter()
            .map(|(key, meta, _)| ChunkPlan { key, meta: *meta })
            .collect();
        let transfer = sender.reserve(&r.request_id, &plans)?;
        let index = wanted
            .iter()
            .enumerate()
            .map(|(i, (key, _, _))| (key.clone(), i))
            .collect();
        Ok(Open::new(Some(transfer), index))
    }

    /// Commits a reserved request whose every chunk went over.
    fn commit(&mut self, job: &SendJob, transfer: PdTransfer) -> Result<SendStats, TransferError> {
        let sender = self.link(self.peer(&job.request_id, job.target.as_ref())?)?;
        let mut stats = transfer.commit(sender)?;
        stats.skipped_chunks = job.chunks.len() - stats.chunks;
        self.counters
            .skipped_chunks
            .fetch_add(stats.skipped_chunks as u64, Ordering::Relaxed);
        self.counters.reserved_sends.fetch_add(1, Ordering::Relaxed);
        Ok(stats)
    }

    /// The receiver `target` names, or the configured one.
    fn peer(&self, request_id: &str, target: Option<&PdTarget>) -> Result<PdPeer, TransferError> {
        match target {
            Some(target) => target.peer(self.rank),
            None => PdPeer::from_config(&self.config, self.rank).map_err(|e| {
                TransferError::Config(format!(
                    "request {request_id:?} names no receiver (no disagg_spec) and {e}"
                ))
            }),
        }
    }

    /// The link to a request's receiver, and how many of the tokens its decoder is handed
    /// its lookup covers (it leaves out the last `skip_last_n_tokens` its `Welcome` named).
    fn link_and_lookup(
        &mut self,
        request_id: &str,
        target: Option<&PdTarget>,
        decoder_tokens: usize,
    ) -> Result<(&mut PdSender, usize), TransferError> {
        let sender = self.link(self.peer(request_id, target)?)?;
        let lookup_len = decoder_tokens.saturating_sub(sender.receiver_skip_last_n_tokens());
        Ok((sender, lookup_len))
    }

    /// How many chunks of `job` its decoder looks up.
    fn looked_up(&mut self, job: &SendJob) -> Result<usize, TransferError> {
        let chunk_size = self.config.chunk_size;
        let (_, lookup_len) =
            self.link_and_lookup(&job.request_id, job.target.as_ref(), job.decoder_tokens)?;
        let wanted = job
            .chunks
            .iter()
            .filter(|c| decoder_looks_up(c.window_end, lookup_len, chunk_size))
            .count();
        Ok(wanted)
    }

    fn send(
        &mut self,
        job: &mut SendJob,
        staging: &StagingPool<HostBuffer>,
    ) -> Result<SendStats, TransferError> {
        let (chunk_size, spec) = (self.config.chunk_size, self.config.spec);
        let (sender, lookup_len) =
            self.link_and_lookup(&job.request_id, job.target.as_ref(), job.decoder_tokens)?;
        let total = job.chunks.len();
        let mut views = Vec::with_capacity(total);
        for chunk in &mut job.chunks {
            if !decoder_looks_up(chunk.window_end, lookup_len, chunk_size) {
                continue;
            }
            let GatheredChunk {
                key,
                meta,
                data,
                checksum,
                ..
            } = chunk;
            let data = data
                .whole(&spec, meta.num_tokens as usize, staging)
                .map_err(|e| {
                    let error = std::io::Error::new(std::io::ErrorKind::OutOfMemory, e.to_string());
                    TransferError::io("putting a chunk saved layer by layer together", error)
                })?;
            views.push(OutgoingChunk {
                key,
                meta: *meta,
                data,
                checksum: *checksum,
            });
        }
        let skipped = total - views.len();
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
        self.counters
            .skipped_chunks
            .fetch_add(skipped as u64, Ordering::Relaxed);
        Ok(stats)
    }

    /// Logs a failed send and tells the proxy, which then fails the request at once
    /// instead of waiting for KV that will not come.
    fn report(&self, request: &str, error: &TransferError) {
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

impl Open {
    fn new(transfer: Option<PdTransfer>, index: HashMap<CacheKey, usize>) -> Self {
        Open {
            transfer,
            index,
            chunks: Vec::new(),
            layers: HashMap::new(),
            put: 0,
        }
    }

    /// Sends `chunk` into its reserved page when it is one the decoder looks up; holds it
    /// either way. A failed put gives up the reservation (the flush then sends whole).
    fn put(&mut self, request_id: &str, chunk: GatheredChunk) {
        if let (Some(transfer), Some(&index)) = (self.transfer.as_mut(), self.index.get(&chunk.key))
        {
            if let ChunkBytes::Whole(data) = &chunk.data {
                let view = OutgoingChunk {
                    key: &chunk.key,
                    meta: chunk.meta,
                    data,
                    checksum: chunk.checksum,
                };
                match transfer.put(index, &view) {
                    Ok(()) => self.put += 1,
                    Err(error) => self.give_up(request_id, &error),
                }
            }
        }
        self.chunks.push(chunk);
    }

    /// Sends each piece of a run of layers into its chunk's reserved page when it is a
    /// chunk the decoder looks up, and holds it until the chunk's seal either way.
    /// A piece that does not fit its chunk is dropped and breaks the chunk.
    fn put_layers(
        &mut self,
        request_id: &str,
        pieces: Vec<(CacheKey, LayerPiece)>,
        spec: &KvCacheSpec,
        staging: &StagingPool<HostBuffer>,
    ) {
        for (key, piece) in pieces {
            let layered = self
                .layers
                .entry(key.clone())
                .or_insert_with(|| Layered::new(spec, piece.tokens));
            if !layered.fits(&piece, spec) {
                tracing::error!(request = request_id, %key, layers = ?piece.layers, "a PD layer piece does not fit its chunk; the chunk is not sent");
                layered.broken = true;
                staging.give_back(piece.data);
                continue;
            }
            let mut failed = None;
            if let (Some(transfer), Some(&index)) = (self.transfer.as_mut(), self.index.get(&key)) {
                failed = piece
                    .in_chunk(spec)
                    .try_for_each(|(range, bytes)| transfer.put_piece(index, range.start, bytes))
                    .err();
            }
            layered.add(piece, spec);
            if let Some(error) = failed {
                self.give_up(request_id, &error);
            }
        }
    }

    /// Seals a chunk saved layer by layer with the checksum of its pieces, and holds them
    /// for a fallback send; returns whether it was sealed in its reserved page. Pieces that
    /// do not make the chunk are a bug in the save: the chunk is dropped (the decoder
    /// recomputes it) and the reservation given up.
    fn seal(
        &mut self,
        request_id: &str,
        chunk: SealedChunk,
        staging: &StagingPool<HostBuffer>,
    ) -> bool {
        let layered = self.layers.remove(&chunk.key);
        let checksum = layered
            .as_ref()
            .filter(|l| l.tokens == chunk.meta.num_tokens as usize)
            .and_then(Layered::checksum);
        let pieces = layered.map(|l| l.pieces).unwrap_or_default();
        let Some(checksum) = checksum else {
            tracing::error!(request = request_id, key = %chunk.key, "the layers saved for a PD chunk do not make the chunk; it is not sent");
            self.transfer = None;
            ChunkBytes::Layers(pieces).recycle(staging);
            return false;
        };
        let mut sealed = false;
        if let (Some(transfer), Some(&index)) = (self.transfer.as_mut(), self.index.get(&chunk.key))
        {
            match transfer.seal(index, checksum) {
                Ok(()) => sealed = true,
                Err(error) => self.give_up(request_id, &error),
            }
        }
        self.put += usize::from(sealed);
        self.chunks.push(GatheredChunk {
            key: chunk.key,
            meta: chunk.meta,
            data: ChunkBytes::Layers(pieces),
            checksum,
            window_end: chunk.window_end,
        });
        sealed
    }

    /// Drops the reservation after a failed put or seal: the flush then sends the held
    /// chunks whole.
    fn give_up(&mut self, request_id: &str, error: &TransferError) {
        tracing::warn!(request = request_id, %error, "sending a PD chunk early failed; sending the request at the prompt's end");
        self.transfer = None;
    }

    /// Hands every held buffer back for the next gathers.
    fn recycle(self, staging: &StagingPool<HostBuffer>) {
        for chunk in self.chunks {
            chunk.data.recycle(staging);
        }
        for piece in self.layers.into_values().flat_map(|l| l.pieces) {
            staging.give_back(piece.data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::windows_from;
    use crate::layout::AttentionKind;
    use crate::KvDtype;

    /// A chunk saved layer by layer, its pieces in any order, has the checksum of the
    /// whole chunk, though its planes' slices straddle checksum segments; pieces that do
    /// not fit are told apart.
    #[test]
    fn layer_pieces_in_any_order_make_the_chunks_checksum() {
        // 3 layers of 2 planes, 200 tokens of 96 bytes: slices of 19,200 bytes.
        let spec = KvCacheSpec {
            num_layers: 3,
            num_kv_heads: 3,
            head_size: 16,
            dtype: KvDtype::Bf16,
            block_size: 16,
            num_blocks: 16,
            attention: AttentionKind::Mha,
        };
        let tokens = 200;
        let chunk: Vec<u8> = (0..spec.chunk_bytes(tokens))
            .map(|i| (i * 31 + (i >> 10)) as u8)
            .collect();
        let piece = |layers: Range<usize>| {
            let bytes: Vec<u8> = spec
                .chunk_layer_ranges(tokens, layers.clone())
                .flat_map(|r| chunk[r].to_vec())
                .collect();
            let mut data = HostBuffer::zeroed(bytes.len()).unwrap();
            data.copy_from_slice(&bytes);
            LayerPiece {
                layers,
                tokens,
                data,
            }
        };
        for order in [[0..1, 1..2, 2..3], [2..3, 0..1, 1..2]] {
            let mut layered = Layered::new(&spec, tokens);
            for (i, layers) in order.iter().enumerate() {
                assert_eq!(layered.checksum(), None, "{order:?}: {i} pieces");
                layered.add(piece(layers.clone()), &spec);
            }
            assert_eq!(layered.checksum(), Some(checksum(&chunk)), "{order:?}");
            let pool = StagingPool::keeping(4);
            let mut bytes = ChunkBytes::Layers(layered.pieces);
            assert!(bytes.whole(&spec, tokens, &pool).unwrap()[..] == chunk[..]);
        }
        let mut layered = Layered::new(&spec, tokens);
        layered.add(piece(0..2), &spec);
        assert!(!layered.fits(&piece(1..3), &spec), "overlapping layers");
        let past_the_end = LayerPiece {
            layers: 3..4,
            tokens,
            data: HostBuffer::zeroed(spec.chunk_layers_bytes(tokens, 3..4)).unwrap(),
        };
        assert!(!layered.fits(&past_the_end, &spec), "past the last layer");
        let other_tokens = LayerPiece {
            tokens: 100,
            ..piece(2..3)
        };
        assert!(!layered.fits(&other_tokens, &spec), "other tokens");
        assert!(layered.fits(&piece(2..3), &spec));
        assert_eq!(layered.checksum(), None, "a layer missing");
    }

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

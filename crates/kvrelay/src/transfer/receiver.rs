//! The decoder side: listens on the init and alloc ports of one TP rank and lands KV in the
//! PD buffer.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::auth::{proof, random, verify_proof, Role};
use super::buffer::{Grant, Occupancy, PdBuffer, ReadyRequest};
use super::channel::{self, ChannelServer, GrantedChunk, Landed, ServerSession};
use super::frame::{
    self, num_segments, read_frame, ChunkDecl, DataHeader, ErrorCode, FrameError, GrantCheck,
    Incoming, Message, MsgType, ReadError, CHECKSUM_SEGMENT, MAX_CONTROL_BODY, MAX_HANDSHAKE_BODY,
    TOKEN_LEN,
};
use super::shm::PulledBytes;
use super::tcp::tune_socket;
use super::verify::{SegmentCopy, Verifier};
use super::{is_loopback_host, PdConfig, PdPeer, TransferError};
use crate::device::stream::{stream_copy, stream_fence};
use crate::keys::CacheKey;
use crate::store::Chunk;

/// tcp: the most bytes of a `Data` payload one `read` takes into its page; each read's
/// bytes go to the [`Verifier`] right away, to be hashed while they are still in cache.
const RECEIVE_READ: usize = 1 << 20;

/// tcp: requests of this many bytes on are hashed on a thread of their own. Starting it
/// costs ~55 µs here, what hashing 2 MiB in cache costs in line; a smaller request is hashed
/// on the connection's thread. (For 1 GiB `kvrelay bench transfer` moved 4.2–4.4 GB/s hashing
/// in line, 3.4–4.7 beside: the same within this VM's noise.)
const VERIFY_BESIDE_FROM: u64 = 4 << 20;

/// One TP rank's PD receiver. Dropping it stops the listeners, closes every connection and
/// frees the buffer (and removes the shm file).
pub struct PdReceiver {
    inner: Arc<Inner>,
    init_addr: SocketAddr,
    alloc_addr: SocketAddr,
    listeners: Vec<JoinHandle<()>>,
}

struct Inner {
    config: PdConfig,
    rank: u32,
    fingerprint: u64,
    buffer: PdBuffer,
    /// The receiving side of `config.channel`; it allocated `buffer`'s memory.
    server: Box<dyn ChannelServer>,
    /// Session tokens issued by the init port and not yet attached, with their issue time
    /// and the channel's receiving end for that sender.
    sessions: Mutex<HashMap<[u8; TOKEN_LEN], PendingSession>>,
    stop: AtomicBool,
    /// Live connections, so shutdown can unblock their threads.
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
}

/// A session issued at handshake: when, and the channel's receiving end for it.
type PendingSession = (Instant, Box<dyn ServerSession>);

#[derive(Clone, Copy)]
enum Port {
    Init,
    Alloc,
}

impl PdReceiver {
    /// Allocates the PD buffer (`pd_buffer_size` rounded down to whole chunk pages; a
    /// shared mapping for `shm`) and listens on `pd_peer_host` at
    /// `pd_peer_init_port[rank]` and `pd_peer_alloc_port[rank]` (port 0 picks a free port;
    /// see [`PdReceiver::init_addr`]).
    pub fn bind(config: &PdConfig, rank: u32) -> Result<Self, TransferError> {
        let page_size = config.page_size();
        let pages = config.buffer_size / page_size as u64;
        if pages == 0 {
            return Err(TransferError::BufferTooSmall {
                buffer_size: config.buffer_size,
                page_size,
            });
        }
        if config.max_prefill_len > 0
            && pages.saturating_mul(config.chunk_size as u64) < config.max_prefill_len
        {
            return Err(TransferError::Config(format!(
                "pd_buffer_size holds {pages} chunks of {} tokens, fewer than pd_max_prefill_len = {}",
                config.chunk_size, config.max_prefill_len
            )));
        }
        let len = usize::try_from(pages * page_size as u64).map_err(|_| {
            TransferError::Config("pd_buffer_size exceeds the address space".into())
        })?;
        let peer = PdPeer::from_config(config, rank)?;
        let mut server = channel::server(config, rank)?;
        let memory = server.memory(len)?;
        let buffer = PdBuffer::new(memory, page_size, config.ttl)?;
        let bind = |port: u16| {
            TcpListener::bind((peer.host.as_str(), port))
                .map_err(|e| TransferError::io(format!("binding PD port {}:{port}", peer.host), e))
        };
        let (init, alloc) = (bind(peer.init_port)?, bind(peer.alloc_port)?);
        let addr = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| TransferError::io("PD listener address", e))
        };
        let (init_addr, alloc_addr) = (addr(&init)?, addr(&alloc)?);
        let inner = Arc::new(Inner {
            config: config.clone(),
            rank,
            fingerprint: config.chunk_fingerprint(),
            buffer,
            server,
            sessions: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        });
        let mut receiver = PdReceiver {
            inner,
            init_addr,
            alloc_addr,
            listeners: Vec::new(),
        };
        for (listener, port, name) in [(init, Port::Init, "init"), (alloc, Port::Alloc, "alloc")] {
            let inner = Arc::clone(&receiver.inner);
            let handle = std::thread::Builder::new()
                .name(format!("kvrelay-pd-{name}-{rank}"))
                .spawn(move || listen(&inner, listener, port))
                .map_err(|e| TransferError::io("spawning a PD listener", e))?;
            // On an early return, Drop stops the listeners spawned so far.
            receiver.listeners.push(handle);
        }
        tracing::info!(rank, %init_addr, %alloc_addr, channel = config.channel.as_str(), pages, page_size, "PD receiver listening");
        if config.shared_secret.is_none() && !is_loopback_host(&peer.host) {
            tracing::warn!(
                rank,
                host = peer.host,
                "the PD receiver listens beyond this machine without pd_shared_secret: any host \
                 that reaches its ports can fill the PD buffer or push KV the decoder will load \
                 as a prompt's; set the same pd_shared_secret on prefillers, decoders and proxy"
            );
        }
        Ok(receiver)
    }

    /// Where senders do the handshake.
    pub fn init_addr(&self) -> SocketAddr {
        self.init_addr
    }

    /// Where senders allocate and send.
    pub fn alloc_addr(&self) -> SocketAddr {
        self.alloc_addr
    }

    /// Takes a received, verified chunk: the decoder loads it like a tier hit. The chunk's
    /// page returns to the buffer when the chunk (and every clone of its bytes) is dropped.
    pub fn get(&self, key: &CacheKey) -> Option<Chunk> {
        self.inner.buffer.take(key, None)
    }

    /// [`PdReceiver::get`] for request `request_id`: its own copy of the chunk when the
    /// prefiller sent it one, else any verified copy (equal keys mean equal bytes).
    pub fn get_for_request(&self, key: &CacheKey, request_id: &str) -> Option<Chunk> {
        self.inner.buffer.take(key, Some(request_id))
    }

    /// Whether a verified chunk with this key is waiting to be consumed.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.inner.buffer.contains(key)
    }

    /// Waits until every chunk of `request_id` has arrived and verified. Fails at once if
    /// the request ended (cancelled, rejected, sender gone, expired), or after `timeout`.
    pub fn wait_ready(
        &self,
        request_id: &str,
        timeout: Duration,
    ) -> Result<ReadyRequest, TransferError> {
        self.inner.buffer.wait_ready(request_id, timeout)
    }

    /// Frees a request's pages (once its sender stops writing them, if still receiving),
    /// and refuses its transfer ([`ErrorCode::Cancelled`]) if it has not arrived yet.
    /// Returns whether the request was in the buffer.
    pub fn cancel(&self, request_id: &str) -> bool {
        self.inner.buffer.cancel(request_id, true)
    }

    /// Frees a request's pages like [`PdReceiver::cancel`], but remembers nothing of an id
    /// not in the buffer: for ids that may name another engine's request. Returns whether
    /// the request was in the buffer.
    pub fn release(&self, request_id: &str) -> bool {
        self.inner.buffer.cancel(request_id, false)
    }

    pub fn occupancy(&self) -> Occupancy {
        self.inner.buffer.occupancy()
    }
}

impl Drop for PdReceiver {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.buffer.close();
        for (_, conn) in self.inner.conns.lock().drain() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        for addr in [self.init_addr, self.alloc_addr] {
            // Wakes the blocking accept so the listener sees the stop flag.
            let _ = TcpStream::connect_timeout(&wake_addr(addr), Duration::from_secs(1));
        }
        for handle in self.listeners.drain(..) {
            let _ = handle.join();
        }
    }
}

fn wake_addr(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    addr
}

fn listen(inner: &Arc<Inner>, listener: TcpListener, port: Port) {
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    for stream in listener.incoming() {
        if inner.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(error) => {
                // E.g. out of file descriptors: back off briefly instead of spinning.
                tracing::warn!(%error, "PD accept failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        workers.retain(|h| !h.is_finished());
        if workers.len() >= inner.config.max_connections {
            let mut stream = stream;
            let busy = TransferError::Refused {
                code: ErrorCode::Busy,
                message: format!("{} connections already open", workers.len()),
            };
            let _ = stream.set_write_timeout(Some(inner.config.handshake_timeout));
            send_error(&mut stream, &busy);
            continue;
        }
        let Some(id) = inner.register(&stream) else {
            continue;
        };
        let worker = Arc::clone(inner);
        let spawned = std::thread::Builder::new()
            .name(format!("kvrelay-pd-conn-{}", inner.rank))
            .spawn(move || {
                let mut stream = stream;
                let result = match port {
                    Port::Init => worker.handshake(&mut stream),
                    Port::Alloc => worker.serve_alloc(&mut stream),
                };
                if let Err(error) = result {
                    tracing::warn!(%error, "PD connection closed");
                    send_error(&mut stream, &error);
                }
                worker.conns.lock().remove(&id);
            });
        match spawned {
            Ok(handle) => workers.push(handle),
            Err(error) => {
                tracing::warn!(%error, "cannot spawn a PD connection thread");
                inner.conns.lock().remove(&id);
            }
        }
    }
    for handle in workers {
        let _ = handle.join();
    }
}

/// Tells the peer why before closing (best effort: the peer may be gone).
fn send_error(stream: &mut TcpStream, error: &TransferError) {
    let frame = Message::Error {
        code: error.code(),
        message: error.to_string(),
    }
    .encode();
    let _ = stream.write_all(&frame);
}

fn read_message(stream: &mut TcpStream, max_body: u32) -> Result<Message, TransferError> {
    match read_frame(stream, max_body) {
        Ok(Incoming::Message(m)) => Ok(m),
        Ok(Incoming::Data(..)) => Err(FrameError::Unexpected(MsgType::Data).into()),
        Err(ReadError::Frame(e)) => Err(e.into()),
        Err(ReadError::Io(e)) => Err(TransferError::io("reading from the PD sender", e)),
    }
}

fn write(stream: &mut TcpStream, message: &Message) -> Result<(), TransferError> {
    stream
        .write_all(&message.encode())
        .map_err(|e| TransferError::io("writing to the PD sender", e))
}

fn refused(code: ErrorCode, message: String) -> TransferError {
    TransferError::Refused { code, message }
}

/// Frees a request's pages unless the request reached `Commit`.
struct AbortGuard<'a> {
    buffer: &'a PdBuffer,
    request_id: &'a str,
    armed: bool,
}

impl Drop for AbortGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.buffer.abort(
                self.request_id,
                "the sender's connection ended before commit",
            );
        }
    }
}

impl Inner {
    /// Records a connection for shutdown; `None` if shutdown already began.
    fn register(&self, stream: &TcpStream) -> Option<u64> {
        let clone = stream.try_clone().ok()?;
        let mut conns = self.conns.lock();
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        conns.insert(id, clone);
        Some(id)
    }

    fn set_timeouts(
        stream: &TcpStream,
        read: Option<Duration>,
        write: Duration,
    ) -> Result<(), TransferError> {
        stream
            .set_read_timeout(read)
            .and_then(|()| stream.set_write_timeout(Some(write)))
            .map_err(|e| TransferError::io("setting socket timeouts", e))
    }

    /// The init port: authenticate a sender and issue a one-time session token.
    fn handshake(&self, stream: &mut TcpStream) -> Result<(), TransferError> {
        let timeout = self.config.handshake_timeout;
        Self::set_timeouts(stream, Some(timeout), timeout)?;
        let Message::Hello {
            rank,
            channel,
            page_size,
            fingerprint,
            keys,
            nonce: sender_nonce,
        } = read_message(stream, MAX_HANDSHAKE_BODY)?
        else {
            return Err(TransferError::Protocol("expected Hello".into()));
        };
        if rank != self.rank {
            return Err(refused(
                ErrorCode::WrongRank,
                format!(
                    "this is receiver rank {}, the sender is rank {rank}",
                    self.rank
                ),
            ));
        }
        if channel != self.config.channel {
            return Err(refused(
                ErrorCode::ChannelMismatch,
                format!(
                    "receiver uses transfer_channel {}, sender {}",
                    self.config.channel.as_str(),
                    channel.as_str()
                ),
            ));
        }
        // Before the geometry: a chunk size or dtype that differs is named as such.
        if let Some(difference) = self.config.keys.first_difference(&keys) {
            return Err(TransferError::KeyMismatch(difference));
        }
        if page_size != self.buffer.page_size() as u64 || fingerprint != self.fingerprint {
            return Err(refused(
                ErrorCode::LayoutMismatch,
                format!(
                    "sender chunks are {page_size} bytes with fingerprint {fingerprint:#018x}; receiver pages are {} bytes for {:#018x}",
                    self.buffer.page_size(),
                    self.fingerprint
                ),
            ));
        }
        let secret = self.config.secret();
        let receiver_nonce = random()?;
        write(
            stream,
            &Message::Challenge {
                nonce: receiver_nonce,
                auth_required: secret.is_some(),
                proof: proof(secret, Role::Receiver, &sender_nonce, &receiver_nonce, rank),
            },
        )?;
        let Message::Auth {
            proof: sender_proof,
        } = read_message(stream, MAX_HANDSHAKE_BODY)?
        else {
            return Err(TransferError::Protocol("expected Auth".into()));
        };
        if let Some(secret) = secret {
            if !verify_proof(
                secret,
                Role::Sender,
                &sender_nonce,
                &receiver_nonce,
                rank,
                &sender_proof,
            ) {
                return Err(TransferError::AuthFailed(
                    "the sender does not hold this receiver's pd_shared_secret".into(),
                ));
            }
        }
        let token = random()?;
        let channel_params = {
            let mut sessions = self.sessions.lock();
            let now = Instant::now();
            sessions.retain(|_, (issued, _)| now.duration_since(*issued) < timeout);
            if sessions.len() >= self.config.max_connections {
                return Err(refused(ErrorCode::Busy, "too many pending sessions".into()));
            }
            let (params, session) = self.server.open()?;
            sessions.insert(token, (now, session));
            params
        };
        write(
            stream,
            &Message::Welcome {
                token,
                page_size: self.buffer.page_size() as u64,
                num_pages: self.buffer.num_pages() as u32,
                channel_params,
                skip_last_n_tokens: u32::try_from(self.config.skip_last_n_tokens)
                    .unwrap_or(u32::MAX),
            },
        )
    }

    /// The alloc port: one attached sender, any number of requests in turn.
    fn serve_alloc(&self, stream: &mut TcpStream) -> Result<(), TransferError> {
        let cfg = &self.config;
        Self::set_timeouts(stream, Some(cfg.handshake_timeout), cfg.io_timeout)?;
        let Message::Attach { token } = read_message(stream, MAX_HANDSHAKE_BODY)? else {
            return Err(TransferError::Protocol("expected Attach".into()));
        };
        let issued = self.sessions.lock().remove(&token);
        let mut session = match issued {
            Some((t, session)) if t.elapsed() < cfg.handshake_timeout => session,
            _ => {
                return Err(refused(
                    ErrorCode::BadSession,
                    "unknown or expired session token; redo the init handshake".into(),
                ))
            }
        };
        session.attach()?;
        tune_socket(stream);
        loop {
            // Idle between requests: no timeout (keepalive notices a vanished peer).
            Self::set_timeouts(stream, None, cfg.io_timeout)?;
            let message = match read_frame(stream, MAX_CONTROL_BODY) {
                Ok(Incoming::Message(m)) => m,
                Ok(Incoming::Data(..)) => return Err(FrameError::Unexpected(MsgType::Data).into()),
                Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Ok(())
                }
                Err(ReadError::Io(e)) => {
                    return Err(TransferError::io("reading from the PD sender", e))
                }
                Err(ReadError::Frame(e)) => return Err(e.into()),
            };
            let Message::AllocRequest { request_id, chunks } = message else {
                return Err(FrameError::Unexpected(message.kind()).into());
            };
            self.serve_request(stream, session.as_mut(), &request_id, &chunks)?;
        }
    }

    /// Checks what the sender declared against this receiver's geometry.
    fn check_chunks(&self, request_id: &str, chunks: &[ChunkDecl]) -> Result<(), TransferError> {
        let bad = |index: usize, reason: String| TransferError::BadChunk {
            request: request_id.to_string(),
            index,
            reason,
        };
        if request_id.is_empty() || chunks.is_empty() {
            return Err(bad(
                0,
                "a request needs an id and at least one chunk".into(),
            ));
        }
        let spec = &self.config.spec;
        for (i, c) in chunks.iter().enumerate() {
            let tokens = c.meta.num_tokens as usize;
            if c.meta.layout_fingerprint != self.fingerprint {
                return Err(bad(
                    i,
                    format!(
                        "layout fingerprint {:#018x} is not the receiver's {:#018x}",
                        c.meta.layout_fingerprint, self.fingerprint
                    ),
                ));
            }
            if tokens == 0 || tokens > self.config.chunk_size {
                return Err(bad(
                    i,
                    format!(
                        "{tokens} tokens; a chunk holds 1..={}",
                        self.config.chunk_size
                    ),
                ));
            }
            if c.len != spec.chunk_bytes(tokens) as u64 {
                return Err(bad(
                    i,
                    format!(
                        "{} bytes; {tokens} tokens are {} bytes",
                        c.len,
                        spec.chunk_bytes(tokens)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One request: admission, data, verification, commit. Request-level refusals are
    /// answered and keep the connection; protocol violations end it (and free the pages).
    fn serve_request(
        &self,
        stream: &mut TcpStream,
        session: &mut dyn ServerSession,
        request_id: &str,
        chunks: &[ChunkDecl],
    ) -> Result<(), TransferError> {
        let cfg = &self.config;
        let admitted = self.check_chunks(request_id, chunks).and_then(|()| {
            self.buffer
                .reserve(request_id, chunks, cfg.allocation_timeout)
        });
        let grant = match admitted {
            Ok(grant) => grant,
            Err(TransferError::ShuttingDown) => return Err(TransferError::ShuttingDown),
            Err(refusal) => {
                tracing::info!(request = request_id, error = %refusal, "PD allocation refused");
                return write(
                    stream,
                    &Message::Error {
                        code: refusal.code(),
                        message: refusal.to_string(),
                    },
                );
            }
        };
        let mut guard = AbortGuard {
            buffer: &self.buffer,
            request_id,
            armed: true,
        };
        let result = self.receive(stream, session, request_id, chunks, &grant, &mut guard);
        if result.is_err() {
            session.abandon();
        }
        result
    }

    /// Counts `landed` (bytes of chunk `chunk`, as offsets in the chunk, that `check`
    /// admitted) as in place, and hands each checksum segment they complete to `verifier`.
    fn verify_landed(
        &self,
        check: &mut GrantCheck,
        verifier: &Verifier<'_>,
        chunk: u32,
        landed: Range<u64>,
    ) {
        check.landed(chunk, landed, |index, segment| {
            // SAFETY: the segment's bytes all landed and are final: `admit` lets each byte of
            // a chunk be written once, and the pages stay granted until `receive`'s scope,
            // which the verifier's thread runs in, has ended.
            unsafe {
                verifier.segment(
                    chunk,
                    index,
                    self.buffer.ptr_at(segment.start as usize),
                    (segment.end - segment.start) as usize,
                )
            };
        });
    }

    /// Copies `source`, bytes `offset..` of chunk `chunk` (`chunk_len` bytes) that `check`
    /// admitted at `at` in the PD buffer, from a sender's staging file into the page, one
    /// checksum segment at a time. Whole segments are hashed in the same pass, half of
    /// them on the verify thread (one core alone does not reach the memory's rate with the
    /// hashing); a piece of a segment is copied here and hashed once its segment is whole.
    #[allow(clippy::too_many_arguments)]
    fn pull(
        &self,
        check: &mut GrantCheck,
        verifier: &Verifier<'_>,
        chunk: u32,
        chunk_len: u64,
        offset: u64,
        at: u64,
        source: PulledBytes,
    ) {
        let segment = CHECKSUM_SEGMENT as u64;
        let src = source.bytes();
        let end = offset + src.len() as u64;
        let mut whole = Vec::with_capacity(src.len() / CHECKSUM_SEGMENT + 1);
        let mut from = offset;
        while from < end {
            let upto = ((from / segment + 1) * segment).min(end);
            let (piece, len) = ((from - offset) as usize, (upto - from) as usize);
            let dst = self.buffer.ptr_at((at + from - offset) as usize);
            if from.is_multiple_of(segment) && (upto - from == segment || upto == chunk_len) {
                // A whole segment's bytes land once: the segment this completes is this one.
                check.landed(chunk, from..upto, |index, _| {
                    // SAFETY: `admit` bounded the range to the chunk's granted page, which
                    // this connection alone writes until commit or abort, and only this
                    // copy writes these bytes (each is admitted once).
                    whole.extend(unsafe { SegmentCopy::new(index, piece, dst, len) });
                });
            } else {
                // SAFETY: as above; `src` is the sender's mapped staging, another mapping.
                unsafe { stream_copy(dst, src[piece..].as_ptr(), len) };
                stream_fence();
                self.verify_landed(check, verifier, chunk, from..upto);
            }
            from = upto;
        }
        // The verify thread starts on its half before this thread copies the other.
        let here = whole.split_off(whole.len() / 2);
        verifier.pull(chunk, source.clone(), whole);
        let digests = here
            .iter()
            .map(|copy| (copy.index, copy.run(src)))
            .collect();
        verifier.digests(chunk, digests);
    }

    /// Posts the grant, takes the chunks' data and seals, and answers the commit.
    fn receive(
        &self,
        stream: &mut TcpStream,
        session: &mut dyn ServerSession,
        request_id: &str,
        chunks: &[ChunkDecl],
        grant: &Grant,
        guard: &mut AbortGuard<'_>,
    ) -> Result<(), TransferError> {
        let cfg = &self.config;
        let page_size = self.buffer.page_size();
        let granted: Vec<GrantedChunk> = grant
            .pages
            .iter()
            .zip(chunks)
            .map(|(&page, c)| GrantedChunk {
                page: self.buffer.page_ptr(page as usize),
                len: c.len as usize,
            })
            .collect();
        session.on_grant(&granted)?;
        write(
            stream,
            &Message::AllocGrant {
                grant: grant.id,
                pages: grant.pages.clone(),
            },
        )?;
        Self::set_timeouts(stream, Some(cfg.io_timeout), cfg.io_timeout)?;
        let landing = self.server.landing();
        let mut check = GrantCheck::new(
            grant.id,
            page_size as u64,
            grant
                .pages
                .iter()
                .copied()
                .zip(chunks.iter().map(|c| c.len))
                .collect(),
        );
        let deadline = Instant::now() + cfg.ttl;
        std::thread::scope(|scope| {
            // tcp and shm: each checksum segment is hashed as soon as its bytes landed,
            // large requests on a thread of their own.
            let verifier = match landing {
                Landed::InFrames | Landed::Announced => {
                    let bytes: u64 = chunks.iter().map(|c| c.len).sum();
                    let beside = bytes >= VERIFY_BESIDE_FROM;
                    let segments = chunks
                        .iter()
                        .map(|c| num_segments(c.len as usize))
                        .collect();
                    Some(Verifier::new(scope, request_id, segments, beside)?)
                }
                #[cfg(feature = "ascend")]
                Landed::InPage => None,
            };
            let mut verified: Vec<Option<bool>> = vec![None; chunks.len()];
            loop {
                if Instant::now() > deadline {
                    return Err(TransferError::Protocol(format!(
                        "request {request_id:?} still incomplete after pd_buffer_ttl_sec"
                    )));
                }
                match read_frame(stream, MAX_CONTROL_BODY) {
                    Ok(Incoming::Data(d, len)) => {
                        let (Some(verifier), Landed::InFrames) = (&verifier, landing) else {
                            return Err(FrameError::Unexpected(MsgType::Data).into());
                        };
                        let admitted = check
                            .admit(&d, u64::from(len))
                            .map_err(TransferError::Protocol)?;
                        let (mut at, end) = (admitted.start as usize, admitted.end as usize);
                        let chunk_start = admitted.start - d.offset;
                        while at < end {
                            // SAFETY: `admit` bounded the range to the declared length of a chunk
                            // inside its granted page and to bytes no earlier segment was
                            // admitted for; the grant gives this connection sole use of that page
                            // until commit or abort. The verifier reads only checksum segments
                            // whose bytes all landed before `at`.
                            let piece = unsafe {
                                std::slice::from_raw_parts_mut(
                                    self.buffer.ptr_at(at),
                                    (end - at).min(RECEIVE_READ),
                                )
                            };
                            let n = match stream.read(piece) {
                                Ok(0) => {
                                    return Err(TransferError::io(
                                        "reading chunk data",
                                        std::io::ErrorKind::UnexpectedEof.into(),
                                    ))
                                }
                                Ok(n) => n,
                                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                                Err(e) => return Err(TransferError::io("reading chunk data", e)),
                            };
                            let landed = at as u64 - chunk_start..(at + n) as u64 - chunk_start;
                            self.verify_landed(&mut check, verifier, d.chunk, landed);
                            at += n;
                        }
                    }
                    Ok(Incoming::Message(Message::Landed {
                        grant: g,
                        chunk,
                        offset,
                        len,
                    })) => {
                        let (Some(verifier), Landed::Announced) = (&verifier, landing) else {
                            return Err(FrameError::Unexpected(MsgType::Landed).into());
                        };
                        let admitted = admit_announced(&mut check, g, chunk, offset, len)?;
                        let landed = offset..offset + (admitted.end - admitted.start);
                        self.verify_landed(&mut check, verifier, chunk, landed);
                    }
                    Ok(Incoming::Message(Message::Pull {
                        grant: g,
                        chunk,
                        offset,
                        len,
                        source,
                        source_offset,
                    })) => {
                        let (Some(verifier), Landed::Announced) = (&verifier, landing) else {
                            return Err(FrameError::Unexpected(MsgType::Pull).into());
                        };
                        let admitted = admit_announced(&mut check, g, chunk, offset, len)?;
                        let pulled = session.source(&source, source_offset, len as usize)?;
                        let chunk_len = chunks[chunk as usize].len;
                        self.pull(
                            &mut check,
                            verifier,
                            chunk,
                            chunk_len,
                            offset,
                            admitted.start,
                            pulled,
                        );
                    }
                    Ok(Incoming::Message(Message::Seal {
                        grant: g,
                        chunk,
                        checksum,
                    })) => {
                        let i = chunk as usize;
                        if g != grant.id || verified.get(i) != Some(&None) {
                            return Err(TransferError::Protocol(format!(
                            "Seal of chunk {chunk} (grant {g}) is not an unsealed chunk of grant {}",
                            grant.id
                        )));
                        }
                        verified[i] = Some(match &verifier {
                            Some(verifier) => {
                                if !check.complete(i) {
                                    return Err(TransferError::Protocol(format!(
                                        "Seal of chunk {chunk} before all its bytes arrived"
                                    )));
                                }
                                // The verdict comes from the verifier at commit.
                                verifier.seal(chunk, checksum);
                                false
                            }
                            None => {
                                session.landed(i)?;
                                // SAFETY: the page is granted to this request and inside the
                                // buffer; chunk lengths were checked to fit a page. Only the
                                // sender's channel writes it, and `landed` said it is done.
                                let bytes = unsafe {
                                    std::slice::from_raw_parts(
                                        granted[i].page.as_ptr(),
                                        granted[i].len,
                                    )
                                };
                                let matched = frame::checksum(bytes) == checksum;
                                if !matched {
                                    tracing::warn!(
                                        request = request_id,
                                        chunk,
                                        "PD chunk checksum mismatch"
                                    );
                                }
                                matched
                            }
                        });
                    }
                    Ok(Incoming::Message(Message::Commit { grant: g })) => {
                        if g != grant.id || verified.contains(&None) {
                            return Err(TransferError::Protocol(format!(
                                "Commit of grant {g} before every chunk of grant {} was sealed",
                                grant.id
                            )));
                        }
                        if let Some(verifier) = verifier {
                            verified = verifier.finish()?;
                        }
                        guard.armed = false;
                        let flags: Vec<bool> = verified.iter().map(|v| *v == Some(true)).collect();
                        let reply = match self.buffer.commit(request_id, &flags) {
                            Ok(rejected) => Message::Committed {
                                grant: g,
                                verified: (chunks.len() as u32).saturating_sub(rejected),
                                rejected,
                            },
                            Err(e) => Message::Error {
                                code: e.code(),
                                message: e.to_string(),
                            },
                        };
                        return write(stream, &reply);
                    }
                    Ok(Incoming::Message(other)) => {
                        return Err(FrameError::Unexpected(other.kind()).into())
                    }
                    Err(ReadError::Frame(e)) => return Err(e.into()),
                    Err(ReadError::Io(e)) => {
                        return Err(TransferError::io("reading from the PD sender", e))
                    }
                }
            }
        })
    }
}

/// Checks an shm sender's `Landed` or `Pull` of `len` bytes at `offset` of chunk `chunk`
/// against the grant, as for a tcp `Data` frame: the PD buffer range the bytes fill.
fn admit_announced(
    check: &mut GrantCheck,
    grant: u32,
    chunk: u32,
    offset: u64,
    len: u32,
) -> Result<Range<u64>, TransferError> {
    let d = DataHeader {
        grant,
        chunk,
        offset,
    };
    check
        .admit(&d, u64::from(len))
        .map_err(TransferError::Protocol)
}

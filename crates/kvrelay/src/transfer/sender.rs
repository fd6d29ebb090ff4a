//! The prefiller side: one connection per receiver rank, requests sent one at a time.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::auth::{notification_mac, proof, random, verify_notification, verify_proof, Role};
use super::channel::{self, Channel, Put};
use super::frame::{
    clip_message, read_frame, ChannelKind, ChunkDecl, ErrorCode, FrameError, Incoming, Message,
    MsgType, ReadError, HEADER_LEN, MAX_CHUNKS, MAX_CONTROL_BODY, MAX_HANDSHAKE_BODY, MAX_KEY,
    MAX_REQUEST_ID,
};
use super::tcp::tune_socket;
use super::{is_loopback_host, PdConfig, PdPeer, TransferError};
use crate::keys::CacheKey;
use crate::store::ChunkMeta;

/// What one [`PdSender::send_request`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendStats {
    pub channel: ChannelKind,
    pub chunks: usize,
    pub bytes: u64,
    /// From sending `AllocRequest` to receiving the grant (admission wait included).
    pub alloc_wait: Duration,
    /// From the grant to the receiver's `Committed` (every chunk verified).
    pub transfer: Duration,
    /// Whether the proxy was notified (a proxy is configured).
    pub notified: bool,
    /// Chunks left out because the decoder's lookup never asks for them (set by
    /// [`PdSink`](super::PdSink); a direct [`PdSender::send_request`] sends every chunk).
    pub skipped_chunks: usize,
}

/// One chunk of a request as the sender hands it over: its bytes in the sender's staging
/// memory, and their [`checksum`](super::frame::checksum), computed once when the chunk was
/// gathered out of the paged cache. The receiver recomputes the checksum over what landed
/// and drops the whole request on a mismatch, so a stale or wrong checksum (or staging that
/// changed after the gather) makes the send fail with
/// [`TransferError::ChunksRejected`]; it never loads wrong KV.
#[derive(Clone, Copy, Debug)]
pub struct OutgoingChunk<'a> {
    pub key: &'a CacheKey,
    pub meta: ChunkMeta,
    pub data: &'a [u8],
    pub checksum: u64,
}

/// A KV-ready notification as the proxy receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvReady {
    pub request_id: String,
    /// The receiver (= sender) TP rank whose KV is ready.
    pub rank: u32,
    /// Set when the KV will never be ready: why the sender gave up. The proxy should fail
    /// the request now instead of waiting out its timeout.
    pub failure: Option<String>,
}

/// Sends requests' KV to receiver rank `rank` (rank i sends to rank i).
pub struct PdSender {
    config: PdConfig,
    peer: PdPeer,
    rank: u32,
    link: Option<Link>,
    /// The receiver's `skip_last_n_tokens`, from its last `Welcome`.
    receiver_skip: usize,
}

struct Link {
    stream: TcpStream,
    channel: Box<dyn Channel>,
    page_size: usize,
    num_pages: usize,
    receiver_skip: usize,
}

impl PdSender {
    /// Does the init handshake with the receiver and attaches to its alloc port.
    pub fn connect(config: &PdConfig, peer: PdPeer, rank: u32) -> Result<Self, TransferError> {
        let link = Link::open(config, &peer, rank)?;
        if config.shared_secret.is_none() {
            let proxy_host = config.proxy.as_ref().map(|(host, _)| host.as_str());
            let remote = std::iter::once(peer.host.as_str())
                .chain(proxy_host)
                .find(|host| !is_loopback_host(host));
            if let Some(host) = remote {
                tracing::warn!(
                    rank,
                    host,
                    "the PD sender talks to another machine without pd_shared_secret: it cannot \
                     tell the real decoder from an impostor that would take the prompt's KV, \
                     and the proxy cannot tell its KV-ready notifications from forged ones; \
                     set the same pd_shared_secret on prefillers, decoders and proxy"
                );
            }
        }
        Ok(PdSender {
            config: config.clone(),
            peer,
            rank,
            receiver_skip: link.receiver_skip,
            link: Some(link),
        })
    }

    /// The receiver's lookup rule: its lookups leave out a prompt's last this many tokens
    /// (`skip_last_n_tokens`, announced in its `Welcome`).
    pub fn receiver_skip_last_n_tokens(&self) -> usize {
        self.receiver_skip
    }

    /// Sends one request whose chunks all exist: [`PdSender::reserve`], a
    /// [`PdTransfer::put`] per chunk, then [`PdTransfer::commit`]. Every chunk is checked
    /// before anything goes on the wire.
    pub fn send_request(
        &mut self,
        request_id: &str,
        chunks: &[OutgoingChunk<'_>],
    ) -> Result<SendStats, TransferError> {
        let plans: Vec<ChunkPlan<'_>> = chunks
            .iter()
            .map(|c| ChunkPlan {
                key: c.key,
                meta: c.meta,
            })
            .collect();
        let alloc = self.alloc_frame(request_id, &plans)?;
        for (i, chunk) in chunks.iter().enumerate() {
            check_len(
                request_id,
                i,
                chunk,
                self.config.spec.chunk_bytes(chunk.meta.num_tokens as usize),
            )?;
        }
        let mut transfer = self.reserve_frame(request_id, alloc)?;
        for (i, chunk) in chunks.iter().enumerate() {
            transfer.put(i, chunk)?;
        }
        transfer.commit(self)
    }

    /// Reserves a page per chunk at the receiver for a request whose chunks are known but
    /// not computed yet (all or nothing, waiting up to `pd_allocation_timeout_sec`). The
    /// chunks then go over one by one with [`PdTransfer::put`] as they are computed, and
    /// [`PdTransfer::commit`] ends the request; the receiver shows the request to its
    /// engine only after the commit, when every chunk is verified.
    ///
    /// Dropping the [`PdTransfer`] without committing closes its connection, and the
    /// receiver frees the reserved pages. A transfer holds its own connection, so several
    /// requests of one sender can be in flight at once; the sender keeps one idle
    /// connection for the next reserve.
    ///
    /// Request-level refusals (too large, allocation timeout, duplicate id, bad chunk)
    /// keep the idle connection; other failures drop it and the next call redoes the
    /// handshake.
    pub fn reserve(
        &mut self,
        request_id: &str,
        chunks: &[ChunkPlan<'_>],
    ) -> Result<PdTransfer, TransferError> {
        let alloc = self.alloc_frame(request_id, chunks)?;
        self.reserve_frame(request_id, alloc)
    }

    /// Asks for the pages of an encoded `AllocRequest` declaring `chunks`.
    fn reserve_frame(
        &mut self,
        request_id: &str,
        (alloc, chunks): (Vec<u8>, Vec<ChunkDecl>),
    ) -> Result<PdTransfer, TransferError> {
        let (mut link, reused) = match self.link.take() {
            Some(link) => (link, true),
            None => (Link::open(&self.config, &self.peer, self.rank)?, false),
        };
        let mut grant = link.request_grant(&self.config, &alloc, chunks.len());
        if reused && grant.as_ref().is_err_and(TransferError::is_connection_lost) {
            // The receiver restarted (or dropped this idle connection) since the link's
            // last request. A connection that died before a grant holds nothing on the
            // other side, so asking once more on a fresh link is safe.
            tracing::info!(
                request = request_id,
                host = self.peer.host,
                "the PD receiver closed the connection; reconnecting once"
            );
            link = Link::open(&self.config, &self.peer, self.rank)?;
            grant = link.request_grant(&self.config, &alloc, chunks.len());
        }
        self.receiver_skip = link.receiver_skip;
        match grant {
            Ok(granted) => {
                link.set_read_timeout(self.config.io_timeout)?;
                Ok(PdTransfer {
                    request_id: request_id.to_string(),
                    link: Some(link),
                    put_bytes: vec![0; chunks.len()],
                    sealed: vec![false; chunks.len()],
                    chunks,
                    granted,
                    bytes: 0,
                })
            }
            Err(e) => {
                if keeps_link(&e) {
                    self.link = Some(link);
                }
                Err(e)
            }
        }
    }

    /// Checks the chunks against the configured geometry and encodes the `AllocRequest`
    /// (each chunk declared with the bytes its token count takes).
    fn alloc_frame(
        &self,
        request_id: &str,
        chunks: &[ChunkPlan<'_>],
    ) -> Result<(Vec<u8>, Vec<ChunkDecl>), TransferError> {
        let bad = |index: usize, reason: String| bad_chunk(request_id, index, reason);
        if request_id.is_empty() || request_id.len() > MAX_REQUEST_ID {
            return Err(bad(
                0,
                format!("request id must be 1..={MAX_REQUEST_ID} bytes"),
            ));
        }
        if chunks.is_empty() || chunks.len() > MAX_CHUNKS as usize {
            return Err(bad(
                0,
                format!("{} chunks; a request has 1..={MAX_CHUNKS}", chunks.len()),
            ));
        }
        let fingerprint = self.config.chunk_fingerprint();
        let mut decls = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let (key, meta) = (chunk.key, &chunk.meta);
            let tokens = meta.num_tokens as usize;
            if meta.layout_fingerprint != fingerprint {
                return Err(bad(
                    i,
                    format!(
                        "layout fingerprint {:#018x} is not this engine's {fingerprint:#018x}",
                        meta.layout_fingerprint
                    ),
                ));
            }
            if tokens == 0 || tokens > self.config.chunk_size {
                return Err(bad(
                    i,
                    format!("{tokens} tokens; expected 1..={}", self.config.chunk_size),
                ));
            }
            let key_len = key.to_string().len();
            if key_len > MAX_KEY {
                return Err(bad(i, format!("key of {key_len} bytes; at most {MAX_KEY}")));
            }
            decls.push(ChunkDecl {
                key: key.clone(),
                meta: *meta,
                len: self.config.spec.chunk_bytes(tokens) as u64,
            });
        }
        let frame = Message::AllocRequest {
            request_id: request_id.to_string(),
            chunks: decls.clone(),
        }
        .encode();
        if frame.len() - HEADER_LEN > MAX_CONTROL_BODY as usize {
            return Err(bad(0, format!("the chunk list encodes to {} bytes, over the {MAX_CONTROL_BODY}-byte frame bound; split the request", frame.len())));
        }
        Ok((frame, decls))
    }
}

/// One chunk of a request as [`PdSender::reserve`] declares it, before its bytes exist.
#[derive(Clone, Copy, Debug)]
pub struct ChunkPlan<'a> {
    pub key: &'a CacheKey,
    pub meta: ChunkMeta,
}

/// A request whose pages the receiver reserved (see [`PdSender::reserve`]): its chunks go
/// over one by one, in any order, each exactly once, whole ([`PdTransfer::put`]) or in
/// pieces sealed at the end ([`PdTransfer::put_piece`], [`PdTransfer::seal`]), then
/// [`PdTransfer::commit`]. Dropping it uncommitted closes its connection, and the receiver
/// frees the pages and loads none of what arrived.
pub struct PdTransfer {
    request_id: String,
    /// `None` once a put failed on the wire: the connection is gone, and with it the
    /// receiver's reservation.
    link: Option<Link>,
    chunks: Vec<ChunkDecl>,
    /// Per chunk: bytes put so far (pieces never overlap; the receiver refuses overlaps).
    put_bytes: Vec<u64>,
    sealed: Vec<bool>,
    granted: Granted,
    bytes: u64,
}

impl PdTransfer {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Chunks declared at reserve.
    pub fn num_chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Whether this transfer's channel moves a chunk in pieces
    /// ([`PdTransfer::put_piece`]; see [`ChannelKind::moves_pieces`]).
    pub fn takes_pieces(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.channel.kind().moves_pieces())
    }

    /// Moves chunk `index` into its reserved page and seals it. The chunk must be the one
    /// declared at that index (key, tokens, layout, and the bytes they take); a mismatch is
    /// [`TransferError::BadChunk`] and moves nothing, leaving the transfer usable. A
    /// failure on the wire ends the transfer (see [`TransferError::TransferBroken`]).
    pub fn put(&mut self, index: usize, chunk: &OutgoingChunk<'_>) -> Result<(), TransferError> {
        let decl = self.open_chunk(index)?;
        if decl.key != *chunk.key || decl.meta != chunk.meta {
            let reason = format!(
                "{} ({} tokens) is not the declared {} ({} tokens)",
                chunk.key, chunk.meta.num_tokens, decl.key, decl.meta.num_tokens
            );
            return Err(bad_chunk(&self.request_id, index, reason));
        }
        check_len(&self.request_id, index, chunk, decl.len as usize)?;
        self.put_piece(index, 0, chunk.data)?;
        self.seal(index, chunk.checksum)
    }

    /// Moves `bytes`, the chunk's bytes from `offset` on, into chunk `index`'s reserved
    /// page, before the rest of the chunk exists (a layer's slice as soon as the layer is
    /// computed). Pieces go in any order, each byte once; [`PdTransfer::seal`] follows the
    /// last. A piece outside the declared length, or for a sealed chunk, is
    /// [`TransferError::BadChunk`] and moves nothing; a channel that does not
    /// [`take pieces`](PdTransfer::takes_pieces) refuses all but a whole chunk.
    pub fn put_piece(
        &mut self,
        index: usize,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), TransferError> {
        let decl_len = self.open_chunk(index)?.len;
        let end = offset as u64 + bytes.len() as u64;
        if bytes.is_empty() || end > decl_len {
            let reason = format!(
                "{} bytes at offset {offset} do not fit its {decl_len} bytes",
                bytes.len()
            );
            return Err(bad_chunk(&self.request_id, index, reason));
        }
        if !self.takes_pieces() && (offset != 0 || end != decl_len) {
            let reason = "this channel moves whole chunks only".to_string();
            return Err(bad_chunk(&self.request_id, index, reason));
        }
        let (grant, page) = (self.granted.grant, self.granted.pages[index]);
        let result = self.link()?.put_piece(grant, index, page, offset, bytes);
        if result.is_err() {
            self.link = None;
        }
        result?;
        self.put_bytes[index] += bytes.len() as u64;
        Ok(())
    }

    /// Seals chunk `index` once all its bytes were put, with the `checksum` of the whole
    /// chunk; the receiver verifies it against what landed.
    pub fn seal(&mut self, index: usize, checksum: u64) -> Result<(), TransferError> {
        let decl_len = self.open_chunk(index)?.len;
        if self.put_bytes[index] != decl_len {
            let reason = format!("{} of its {decl_len} bytes were put", self.put_bytes[index]);
            return Err(bad_chunk(&self.request_id, index, reason));
        }
        let grant = self.granted.grant;
        let result = self.link()?.seal(grant, index, checksum);
        if result.is_err() {
            self.link = None;
        }
        result?;
        self.sealed[index] = true;
        self.bytes += decl_len;
        Ok(())
    }

    /// The declaration of chunk `index`, unless there is none or it is sealed already.
    fn open_chunk(&self, index: usize) -> Result<&ChunkDecl, TransferError> {
        let bad = |reason: String| bad_chunk(&self.request_id, index, reason);
        match (self.chunks.get(index), self.sealed.get(index)) {
            (Some(_), Some(true)) => Err(bad("already sent".into())),
            (Some(decl), _) => Ok(decl),
            (None, _) => Err(bad(format!(
                "the request declared {} chunks",
                self.chunks.len()
            ))),
        }
    }

    /// Ends the request once every chunk was put: waits until the receiver verified them
    /// all, then notifies the proxy. The connection goes back to `sender` for its next
    /// request.
    pub fn commit(mut self, sender: &mut PdSender) -> Result<SendStats, TransferError> {
        if let Some(missing) = self.sealed.iter().position(|s| !s) {
            return Err(bad_chunk(
                &self.request_id,
                missing,
                "never sent; the request is dropped at the receiver".into(),
            ));
        }
        let grant = self.granted.grant;
        let request_id = self.request_id.clone();
        let link = self.link()?;
        let channel = link.channel.kind();
        let config = &sender.config;
        let result = link.send_commit(grant).and_then(|()| {
            // The proxy connection is made while the receiver verifies the last chunks,
            // so the notification leaves as soon as the verdict is in.
            let proxy = connect_proxy(config);
            link.await_committed(grant, &request_id).map(|()| proxy)
        });
        if (result.is_ok() || result.as_ref().is_err_and(keeps_link)) && sender.link.is_none() {
            sender.link = self.link.take();
        }
        let proxy = result??;
        let Granted {
            started,
            alloc_wait,
            ..
        } = self.granted;
        let mut stats = SendStats {
            channel,
            chunks: self.chunks.len(),
            bytes: self.bytes,
            alloc_wait,
            transfer: started.elapsed() - alloc_wait,
            notified: false,
            skipped_chunks: 0,
        };
        if let Some(proxy) = proxy {
            write_notification(proxy, &sender.config, &request_id, sender.rank, None)?;
            stats.notified = true;
        }
        Ok(stats)
    }

    fn link(&mut self) -> Result<&mut Link, TransferError> {
        self.link
            .as_mut()
            .ok_or_else(|| TransferError::TransferBroken(self.request_id.clone()))
    }
}

fn bad_chunk(request_id: &str, index: usize, reason: String) -> TransferError {
    TransferError::BadChunk {
        request: request_id.to_string(),
        index,
        reason,
    }
}

fn check_len(
    request_id: &str,
    index: usize,
    chunk: &OutgoingChunk<'_>,
    expected: usize,
) -> Result<(), TransferError> {
    if chunk.data.len() == expected {
        return Ok(());
    }
    Err(bad_chunk(
        request_id,
        index,
        format!(
            "{} bytes for {} tokens; expected {expected} bytes",
            chunk.data.len(),
            chunk.meta.num_tokens
        ),
    ))
}

/// Whether a request-level failure leaves the connection fit for the next request.
fn keeps_link(e: &TransferError) -> bool {
    match e {
        TransferError::Refused { code, .. } => matches!(
            code,
            ErrorCode::RequestTooLarge
                | ErrorCode::AllocationTimeout
                | ErrorCode::DuplicateRequest
                | ErrorCode::BadChunk
                | ErrorCode::Cancelled
        ),
        e => matches!(e, TransferError::ChunksRejected { .. }),
    }
}

fn connect(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, TransferError> {
    let what = || format!("connecting to {host}:{port}");
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| TransferError::io(what(), e))?;
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream
                    .set_read_timeout(Some(timeout))
                    .and_then(|()| stream.set_write_timeout(Some(timeout)))
                    .map_err(|e| TransferError::io(what(), e))?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(TransferError::io(what(), last))
}

fn read_message(stream: &mut impl Read, max_body: u32) -> Result<Message, TransferError> {
    match read_frame(stream, max_body) {
        Ok(Incoming::Message(Message::Error { code, message })) => {
            Err(TransferError::Refused { code, message })
        }
        Ok(Incoming::Message(m)) => Ok(m),
        Ok(Incoming::Data(..)) => Err(FrameError::Unexpected(MsgType::Data).into()),
        Err(ReadError::Frame(e)) => Err(e.into()),
        Err(ReadError::Io(e)) => Err(TransferError::io("reading from the PD receiver", e)),
    }
}

fn write(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), TransferError> {
    stream
        .write_all(bytes)
        .map_err(|e| TransferError::io("writing to the PD receiver", e))
}

fn unexpected(m: &Message) -> TransferError {
    FrameError::Unexpected(m.kind()).into()
}

/// Pages the receiver reserved for one request.
struct Granted {
    grant: u32,
    pages: Vec<u32>,
    /// When the request was asked for (its transfer time runs from here).
    started: Instant,
    alloc_wait: Duration,
}

impl Link {
    fn open(cfg: &PdConfig, peer: &PdPeer, rank: u32) -> Result<Self, TransferError> {
        channel::preflight(cfg)?;
        let timeout = cfg.handshake_timeout;
        let mut init = connect(&peer.host, peer.init_port, timeout)?;
        let page_size = cfg.page_size();
        let sender_nonce = random()?;
        let hello = Message::Hello {
            rank,
            channel: cfg.channel,
            page_size: page_size as u64,
            fingerprint: cfg.chunk_fingerprint(),
            keys: cfg.keys.clone(),
            nonce: sender_nonce,
        };
        write(&mut init, &hello.encode())?;
        let challenge = read_message(&mut init, MAX_HANDSHAKE_BODY)?;
        let Message::Challenge {
            nonce: receiver_nonce,
            auth_required,
            proof: receiver_proof,
        } = challenge
        else {
            return Err(unexpected(&challenge));
        };
        let secret = cfg.secret();
        let receiver_proven = |s: &[u8]| {
            auth_required
                && verify_proof(
                    s,
                    Role::Receiver,
                    &sender_nonce,
                    &receiver_nonce,
                    rank,
                    &receiver_proof,
                )
        };
        match secret {
            Some(s) if !receiver_proven(s) => {
                return Err(TransferError::AuthFailed(
                    "the receiver does not hold this sender's pd_shared_secret".into(),
                ))
            }
            None if auth_required => {
                return Err(TransferError::AuthFailed(
                    "the receiver requires pd_shared_secret, which this sender does not set".into(),
                ))
            }
            _ => {}
        }
        let auth = Message::Auth {
            proof: proof(secret, Role::Sender, &sender_nonce, &receiver_nonce, rank),
        };
        write(&mut init, &auth.encode())?;
        let welcome = read_message(&mut init, MAX_HANDSHAKE_BODY)?;
        let Message::Welcome {
            token,
            page_size: their_page,
            num_pages,
            channel_params,
            skip_last_n_tokens,
        } = welcome
        else {
            return Err(unexpected(&welcome));
        };
        if their_page != page_size as u64 || num_pages == 0 {
            return Err(TransferError::Protocol(format!(
                "receiver announced {num_pages} pages of {their_page} bytes; expected pages of {page_size}"
            )));
        }
        let num_pages = num_pages as usize;
        drop(init);
        let mut stream = connect(&peer.host, peer.alloc_port, timeout)?;
        tune_socket(&stream);
        stream
            .set_write_timeout(Some(cfg.io_timeout))
            .map_err(|e| TransferError::io("setting socket timeouts", e))?;
        write(&mut stream, &Message::Attach { token }.encode())?;
        let buffer_len = num_pages as u64 * page_size as u64;
        let channel = channel::connect(cfg, &channel_params, &stream, buffer_len)?;
        tracing::debug!(
            rank,
            host = peer.host,
            channel = cfg.channel.as_str(),
            "PD sender attached"
        );
        Ok(Link {
            stream,
            channel,
            page_size,
            num_pages,
            receiver_skip: skip_last_n_tokens as usize,
        })
    }

    /// Sends the `AllocRequest` and waits for its pages, one per chunk.
    fn request_grant(
        &mut self,
        cfg: &PdConfig,
        alloc: &[u8],
        chunks: usize,
    ) -> Result<Granted, TransferError> {
        let started = Instant::now();
        // The receiver may wait up to its allocation timeout before it answers.
        self.set_read_timeout(cfg.allocation_timeout + cfg.io_timeout)?;
        write(&mut self.stream, alloc)?;
        let reply = read_message(&mut self.stream, MAX_CONTROL_BODY)?;
        let Message::AllocGrant { grant, pages } = reply else {
            return Err(unexpected(&reply));
        };
        if pages.len() != chunks || pages.iter().any(|p| *p as usize >= self.num_pages) {
            return Err(TransferError::Protocol(format!(
                "grant of pages {pages:?} does not fit {chunks} chunks in {} pages",
                self.num_pages
            )));
        }
        Ok(Granted {
            grant,
            pages,
            started,
            alloc_wait: started.elapsed(),
        })
    }

    fn set_read_timeout(&self, timeout: Duration) -> Result<(), TransferError> {
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| TransferError::io("setting socket timeouts", e))
    }

    /// Moves `bytes`, chunk `index`'s bytes from `offset` on, into `page`. Nothing is
    /// hashed here: the checksum comes with the seal, so moving bytes is all the sending
    /// thread does.
    fn put_piece(
        &mut self,
        grant: u32,
        index: usize,
        page: u32,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), TransferError> {
        let dst = Put {
            grant,
            chunk: index as u32,
            chunk_offset: offset as u64,
            remote_offset: u64::from(page) * self.page_size as u64 + offset as u64,
        };
        self.channel.put_chunk(dst, bytes)
    }

    /// Waits until chunk `index`'s pieces landed and seals it. The receiver verifies the
    /// chunk while the caller computes or moves the next one; it answers only at `Commit`.
    fn seal(&mut self, grant: u32, index: usize, checksum: u64) -> Result<(), TransferError> {
        self.channel.fence()?;
        let seal = Message::Seal {
            grant,
            chunk: index as u32,
            checksum,
        };
        write(&mut self.stream, &seal.encode())
    }

    /// Commits a grant whose chunks were all sealed; [`Link::await_committed`] then waits
    /// for the receiver's verdict.
    fn send_commit(&mut self, grant: u32) -> Result<(), TransferError> {
        write(&mut self.stream, &Message::Commit { grant }.encode())
    }

    /// The receiver's verdict on a committed grant: every chunk verified, or why not.
    fn await_committed(&mut self, grant: u32, request_id: &str) -> Result<(), TransferError> {
        let reply = read_message(&mut self.stream, MAX_CONTROL_BODY)?;
        let Message::Committed {
            grant: g, rejected, ..
        } = reply
        else {
            return Err(unexpected(&reply));
        };
        if g != grant {
            return Err(TransferError::Protocol(format!(
                "Committed for grant {g}, expected {grant}"
            )));
        }
        if rejected > 0 {
            return Err(TransferError::ChunksRejected {
                request: request_id.to_string(),
                rejected,
            });
        }
        Ok(())
    }
}

/// Tells the configured proxy, if any, that `request_id`'s KV is ready in receiver rank
/// `rank`, or with `failure`, that it never will be. Returns whether a proxy was told.
pub(crate) fn notify_proxy(
    cfg: &PdConfig,
    request_id: &str,
    rank: u32,
    failure: Option<&str>,
) -> Result<bool, TransferError> {
    let Some(stream) = connect_proxy(cfg)? else {
        return Ok(false);
    };
    write_notification(stream, cfg, request_id, rank, failure)?;
    Ok(true)
}

/// A new connection to the configured proxy, for one notification; `None` without a proxy.
fn connect_proxy(cfg: &PdConfig) -> Result<Option<TcpStream>, TransferError> {
    cfg.proxy
        .as_ref()
        .map(|(host, port)| connect(host, *port, cfg.handshake_timeout))
        .transpose()
}

/// Sends one notification (see [`notify_proxy`]) over `stream`, from [`connect_proxy`].
fn write_notification(
    mut stream: TcpStream,
    cfg: &PdConfig,
    request_id: &str,
    rank: u32,
    failure: Option<&str>,
) -> Result<(), TransferError> {
    // Clipped before the MAC, which must cover exactly the text that travels.
    let failure = failure.map(clip_message).unwrap_or_default();
    let message = Message::Notify {
        request_id: request_id.to_string(),
        rank,
        mac: notification_mac(cfg.secret(), request_id, rank, failure),
        failure: failure.to_string(),
    };
    stream.write_all(&message.encode()).map_err(|e| {
        let proxy = stream.peer_addr().map_or("?".into(), |a| a.to_string());
        TransferError::io(format!("notifying the proxy at {proxy}"), e)
    })
}

/// Reads one KV-ready notification, as a proxy does on each accepted connection. With a
/// `secret`, the notification must carry its MAC.
pub fn read_notification(
    stream: &mut impl Read,
    secret: Option<&[u8]>,
) -> Result<KvReady, TransferError> {
    let message = read_message(stream, MAX_HANDSHAKE_BODY)?;
    let Message::Notify {
        request_id,
        rank,
        failure,
        mac,
    } = message
    else {
        return Err(unexpected(&message));
    };
    if let Some(secret) = secret {
        if !verify_notification(secret, &request_id, rank, &failure, &mac) {
            return Err(TransferError::AuthFailed(format!(
                "notification for {request_id:?} does not carry pd_shared_secret's MAC"
            )));
        }
    }
    Ok(KvReady {
        request_id,
        rank,
        failure: (!failure.is_empty()).then_some(failure),
    })
}

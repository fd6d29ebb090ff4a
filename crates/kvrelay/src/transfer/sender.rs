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

    /// Sends one request: reserves a page per chunk at the receiver (all or nothing), moves
    /// the bytes, waits until the receiver verified every chunk, then notifies the proxy.
    ///
    /// Request-level refusals (too large, allocation timeout, duplicate id, bad chunk,
    /// checksum failure) keep the connection; other failures drop it and the next call
    /// redoes the handshake.
    pub fn send_request(
        &mut self,
        request_id: &str,
        chunks: &[OutgoingChunk<'_>],
    ) -> Result<SendStats, TransferError> {
        let alloc = self.alloc_frame(request_id, chunks)?;
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
        let result = grant.and_then(|grant| link.send(&self.config, request_id, grant, chunks));
        let keep = match &result {
            Ok(_) => true,
            Err(TransferError::Refused { code, .. }) => matches!(
                code,
                ErrorCode::RequestTooLarge
                    | ErrorCode::AllocationTimeout
                    | ErrorCode::DuplicateRequest
                    | ErrorCode::BadChunk
                    | ErrorCode::Cancelled
            ),
            Err(e) => matches!(e, TransferError::ChunksRejected { .. }),
        };
        if keep {
            self.link = Some(link);
        }
        let mut stats = result?;
        stats.notified = notify_proxy(&self.config, request_id, self.rank, None)?;
        Ok(stats)
    }

    /// Checks the chunks against the configured geometry and encodes the `AllocRequest`.
    fn alloc_frame(
        &self,
        request_id: &str,
        chunks: &[OutgoingChunk<'_>],
    ) -> Result<Vec<u8>, TransferError> {
        let bad = |index: usize, reason: String| TransferError::BadChunk {
            request: request_id.to_string(),
            index,
            reason,
        };
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
            let (key, meta, data) = (chunk.key, &chunk.meta, chunk.data);
            let tokens = meta.num_tokens as usize;
            let expected = self.config.spec.chunk_bytes(tokens);
            if meta.layout_fingerprint != fingerprint {
                return Err(bad(
                    i,
                    format!(
                        "layout fingerprint {:#018x} is not this engine's {fingerprint:#018x}",
                        meta.layout_fingerprint
                    ),
                ));
            }
            if tokens == 0 || tokens > self.config.chunk_size || data.len() != expected {
                return Err(bad(
                    i,
                    format!(
                        "{} bytes for {tokens} tokens; expected 1..={} tokens and {expected} bytes",
                        data.len(),
                        self.config.chunk_size
                    ),
                ));
            }
            let key_len = key.to_string().len();
            if key_len > MAX_KEY {
                return Err(bad(i, format!("key of {key_len} bytes; at most {MAX_KEY}")));
            }
            decls.push(ChunkDecl {
                key: key.clone(),
                meta: *meta,
                len: data.len() as u64,
            });
        }
        let frame = Message::AllocRequest {
            request_id: request_id.to_string(),
            chunks: decls,
        }
        .encode();
        if frame.len() - HEADER_LEN > MAX_CONTROL_BODY as usize {
            return Err(bad(0, format!("the chunk list encodes to {} bytes, over the {MAX_CONTROL_BODY}-byte frame bound; split the request", frame.len())));
        }
        Ok(frame)
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

    /// Moves the chunks into the granted pages and commits them.
    fn send(
        &mut self,
        cfg: &PdConfig,
        request_id: &str,
        granted: Granted,
        chunks: &[OutgoingChunk<'_>],
    ) -> Result<SendStats, TransferError> {
        let Granted {
            grant,
            pages,
            started,
            alloc_wait,
        } = granted;
        self.set_read_timeout(cfg.io_timeout)?;
        let bytes = chunks.iter().map(|c| c.data.len() as u64).sum();
        // Nothing is hashed here: the checksums came with the chunks, so moving the bytes
        // is all the sending thread does. The receiver verifies chunk i while this loop
        // moves chunk i + 1; it answers only at `Commit`.
        for (i, (chunk, page)) in chunks.iter().zip(&pages).enumerate() {
            let dst = Put {
                grant,
                chunk: i as u32,
                chunk_offset: 0,
                remote_offset: u64::from(*page) * self.page_size as u64,
            };
            self.channel.put_chunk(dst, chunk.data)?;
            self.channel.fence()?;
            let seal = Message::Seal {
                grant,
                chunk: i as u32,
                checksum: chunk.checksum,
            };
            write(&mut self.stream, &seal.encode())?;
        }
        write(&mut self.stream, &Message::Commit { grant }.encode())?;
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
        Ok(SendStats {
            channel: self.channel.kind(),
            chunks: chunks.len(),
            bytes,
            alloc_wait,
            transfer: started.elapsed() - alloc_wait,
            notified: false,
            skipped_chunks: 0,
        })
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
    let Some((host, port)) = &cfg.proxy else {
        return Ok(false);
    };
    let mut stream = connect(host, *port, cfg.handshake_timeout)?;
    // Clipped before the MAC, which must cover exactly the text that travels.
    let failure = failure.map(clip_message).unwrap_or_default();
    let message = Message::Notify {
        request_id: request_id.to_string(),
        rank,
        mac: notification_mac(cfg.secret(), request_id, rank, failure),
        failure: failure.to_string(),
    };
    stream
        .write_all(&message.encode())
        .map_err(|e| TransferError::io(format!("notifying the proxy at {host}:{port}"), e))?;
    Ok(true)
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

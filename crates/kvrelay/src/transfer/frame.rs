//! The PD wire format: every message is one frame.
//!
//! ```text
//! offset size field
//!      0    4 magic "KVRL"
//!      4    1 version (4)
//!      5    1 message type (MsgType)
//!      6    2 flags, must be 0
//!      8    4 body length in bytes (u32), bounded per message type and connection state
//!     12    … body
//! ```
//!
//! All integers are little-endian. Strings are a u16 byte length then UTF-8 bytes, each with
//! its own bound. A `Data` body is a 16-byte [`DataHeader`] followed by the payload, which
//! the receiver reads straight into the granted page after [`GrantCheck::admit`] accepted
//! the header. A chunk's segments may come in any order, interleaved with other chunks of
//! the grant (a prefiller sends each layer's slice as soon as the layer is computed), but
//! never overlap. Decoding never panics and never allocates more than the bounded body.

use std::hash::Hasher;
use std::io::{self, IoSlice, Read, Write};
use std::ops::Range;

use crate::keys::{CacheKey, KeyDerivation};
use crate::store::ChunkMeta;

pub const MAGIC: [u8; 4] = *b"KVRL";
/// 2: `Hello` carries the sender's [`KeyDerivation`], `Welcome` the receiver's lookup rule.
/// 3: `Welcome` carries the channel's opaque, versioned parameters instead of shm fields.
/// 4: a chunk's `Data` may arrive in any order and interleaved with other chunks of its grant.
/// 5: an shm sender announces each put's bytes with `Landed`, so the receiver hashes them as
/// they land instead of whole chunks at `Seal`.
/// 6: an shm sender whose staging is itself a shared file names the bytes with `Pull`, and
/// the receiver copies them into the page, hashing them in the same pass.
pub const VERSION: u8 = 6;
pub const HEADER_LEN: usize = 12;

/// Bound on handshake frames (init port, and the first frame on the alloc port): room for
/// [`MAX_CHANNEL_PARAMS`] and the rest of a `Welcome`.
pub const MAX_HANDSHAKE_BODY: u32 = 8 << 10;
/// Bound on every control frame (an `AllocRequest` of a 1M-token prompt is ~0.5 MiB).
pub const MAX_CONTROL_BODY: u32 = 4 << 20;
/// Bound on one `Data` frame's payload.
pub const MAX_DATA_PAYLOAD: u32 = 16 << 20;
/// Bound on the chunks of one request.
pub const MAX_CHUNKS: u32 = 1 << 16;
pub const MAX_REQUEST_ID: usize = 256;
/// Bound on the staging file path a `Pull` names.
pub const MAX_SOURCE_PATH: usize = 256;
pub const MAX_KEY: usize = 512;
pub const MAX_MESSAGE: usize = 1024;
/// Bound on `Welcome`'s channel parameters (an HCCL root info is 4108 bytes).
pub const MAX_CHANNEL_PARAMS: usize = 6 << 10;
/// Bound on a dtype or hash algorithm name in `Hello`.
pub const MAX_NAME: usize = 64;
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
pub const TOKEN_LEN: usize = 16;

/// The bytes before the payload in a `Data` body.
pub const DATA_HEADER_LEN: usize = 16;

/// A frame that cannot be decoded. Each closes the connection it arrived on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("bad magic {0:02x?}; not a kvrelay PD peer")]
    BadMagic([u8; 4]),
    #[error("protocol version {0} is not supported (this build speaks {VERSION})")]
    BadVersion(u8),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("reserved flags {0:#06x} are set")]
    Flags(u16),
    #[error("{kind:?} body of {len} bytes exceeds the bound of {max} bytes")]
    TooLong { kind: MsgType, len: u32, max: u32 },
    #[error("{kind:?} body is truncated: {field} needs {need} more bytes")]
    Truncated {
        kind: MsgType,
        field: &'static str,
        need: usize,
    },
    #[error("{kind:?} body has {extra} trailing bytes")]
    Trailing { kind: MsgType, extra: usize },
    #[error("{kind:?}: {field} is {len} bytes; at most {max} allowed")]
    FieldTooLong {
        kind: MsgType,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind:?}: {field} is not valid: {reason}")]
    BadField {
        kind: MsgType,
        field: &'static str,
        reason: String,
    },
    #[error("{0:?} frames are not accepted here")]
    Unexpected(MsgType),
}

/// The message types. Direction: S = sender (prefiller), R = receiver (decoder), P = proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgType {
    /// S→R init port: rank, channel, geometry, key derivation, client nonce.
    Hello = 1,
    /// R→S: server nonce and the receiver's proof of the shared secret.
    Challenge = 2,
    /// S→R: the sender's proof of the shared secret.
    Auth = 3,
    /// R→S: session token, buffer geometry, shared-memory name, lookup rule.
    Welcome = 4,
    /// Either way: a refusal with a code; the connection closes after it.
    Error = 5,
    /// S→R alloc port, first frame: the session token from `Welcome`.
    Attach = 6,
    /// S→R: the chunks of one request; R reserves all of their pages or refuses.
    AllocRequest = 7,
    /// R→S: one page per chunk.
    AllocGrant = 8,
    /// S→R (tcp): one segment of one chunk, then its bytes.
    Data = 9,
    /// S→R: a chunk is complete; its xxh3-64.
    Seal = 10,
    /// S→R: every chunk of the grant is sealed.
    Commit = 11,
    /// R→S: how many chunks verified.
    Committed = 12,
    /// S→P: a request's KV is ready in receiver rank `rank`, or (with a failure reason)
    /// will never be.
    Notify = 13,
    /// S→R (shm): bytes of one chunk are in the receiver's page.
    Landed = 14,
    /// S→R (shm): bytes of one chunk are in the sender's shared staging file, for the
    /// receiver to copy into its page.
    Pull = 15,
}

impl MsgType {
    fn from_u8(v: u8) -> Option<Self> {
        use MsgType::*;
        Some(match v {
            1 => Hello,
            2 => Challenge,
            3 => Auth,
            4 => Welcome,
            5 => Error,
            6 => Attach,
            7 => AllocRequest,
            8 => AllocGrant,
            9 => Data,
            10 => Seal,
            11 => Commit,
            12 => Committed,
            13 => Notify,
            14 => Landed,
            15 => Pull,
            _ => return None,
        })
    }
}

/// Why a peer refused; carried by `Error` frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    Protocol,
    AuthFailed,
    LayoutMismatch,
    WrongRank,
    ChannelMismatch,
    BadSession,
    RequestTooLarge,
    AllocationTimeout,
    DuplicateRequest,
    BadChunk,
    Cancelled,
    Busy,
    /// The sender derives chunk keys differently (model, world size, dtype, chunk size,
    /// hash algorithm or seed): nothing it sends would ever be found.
    KeyMismatch,
    /// A code this build does not know (a newer peer).
    Other(u16),
}

impl ErrorCode {
    const TABLE: [(ErrorCode, u16); 13] = [
        (ErrorCode::Protocol, 1),
        (ErrorCode::AuthFailed, 2),
        (ErrorCode::LayoutMismatch, 3),
        (ErrorCode::WrongRank, 4),
        (ErrorCode::ChannelMismatch, 5),
        (ErrorCode::BadSession, 6),
        (ErrorCode::RequestTooLarge, 7),
        (ErrorCode::AllocationTimeout, 8),
        (ErrorCode::DuplicateRequest, 9),
        (ErrorCode::BadChunk, 10),
        (ErrorCode::Cancelled, 11),
        (ErrorCode::Busy, 12),
        (ErrorCode::KeyMismatch, 13),
    ];

    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Other(v) => v,
            code => Self::TABLE
                .iter()
                .find(|(c, _)| *c == code)
                .map_or(0, |(_, v)| *v),
        }
    }

    pub fn from_u16(v: u16) -> Self {
        Self::TABLE
            .iter()
            .find(|(_, n)| *n == v)
            .map_or(ErrorCode::Other(v), |(c, _)| *c)
    }
}

/// The transports a session can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    Tcp,
    Shm,
    /// HCCL two-sided send/receive (feature `ascend`).
    Hccl,
    /// HCCL one-sided `HcclBatchPut` into registered memory (feature `ascend`).
    HcommOnesided,
    /// HIXL client/server batch puts into registered memory (feature `ascend`).
    Hixl,
}

impl ChannelKind {
    /// Whether the channel moves a chunk in pieces put in any order, chunks interleaved:
    /// tcp and shm. The NPU channels stage one chunk at a time, in order, between fences,
    /// so they move whole chunks only.
    pub fn moves_pieces(self) -> bool {
        matches!(self, ChannelKind::Tcp | ChannelKind::Shm)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Tcp => "tcp",
            ChannelKind::Shm => "shm",
            ChannelKind::Hccl => "hccl",
            ChannelKind::HcommOnesided => "hcomm_onesided",
            ChannelKind::Hixl => "hixl",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(ChannelKind::Tcp),
            2 => Some(ChannelKind::Shm),
            3 => Some(ChannelKind::Hccl),
            4 => Some(ChannelKind::HcommOnesided),
            5 => Some(ChannelKind::Hixl),
            _ => None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            ChannelKind::Tcp => 1,
            ChannelKind::Shm => 2,
            ChannelKind::Hccl => 3,
            ChannelKind::HcommOnesided => 4,
            ChannelKind::Hixl => 5,
        }
    }
}

/// What the sender declares about one chunk before any byte moves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkDecl {
    pub key: CacheKey,
    pub meta: ChunkMeta,
    /// Payload bytes; the receiver checks it against `meta.num_tokens` and its page size.
    pub len: u64,
}

/// The fixed part of a `Data` body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    pub grant: u32,
    pub chunk: u32,
    /// Byte offset inside the chunk.
    pub offset: u64,
}

/// Every frame except `Data` (whose payload is streamed, see [`DataHeader`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello {
        rank: u32,
        channel: ChannelKind,
        page_size: u64,
        fingerprint: u64,
        /// How the sender names chunks; the receiver refuses a sender unlike itself.
        keys: KeyDerivation,
        nonce: [u8; NONCE_LEN],
    },
    Challenge {
        nonce: [u8; NONCE_LEN],
        auth_required: bool,
        proof: [u8; MAC_LEN],
    },
    Auth {
        proof: [u8; MAC_LEN],
    },
    Welcome {
        token: [u8; TOKEN_LEN],
        page_size: u64,
        num_pages: u32,
        /// What the sender needs to open the channel (shm: the file to map): opaque here,
        /// versioned and decoded by the channel (see `channel::ChannelParams`).
        channel_params: Vec<u8>,
        /// The decoder's `skip_last_n_tokens`: its lookups leave out a prompt's last n
        /// tokens, so the sender does not send chunks that would never be looked up.
        skip_last_n_tokens: u32,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    Attach {
        token: [u8; TOKEN_LEN],
    },
    AllocRequest {
        request_id: String,
        chunks: Vec<ChunkDecl>,
    },
    AllocGrant {
        grant: u32,
        pages: Vec<u32>,
    },
    Seal {
        grant: u32,
        chunk: u32,
        checksum: u64,
    },
    /// `len` bytes from `offset` of chunk `chunk` were written into the granted page.
    Landed {
        grant: u32,
        chunk: u32,
        offset: u64,
        len: u32,
    },
    /// `len` bytes from `offset` of chunk `chunk` are at `source_offset` in the sender's
    /// staging file `source` (a kvrelay staging file in `/dev/shm`), unchanged until the
    /// grant is committed or abandoned.
    Pull {
        grant: u32,
        chunk: u32,
        offset: u64,
        len: u32,
        source: String,
        source_offset: u64,
    },
    Commit {
        grant: u32,
    },
    Committed {
        grant: u32,
        verified: u32,
        rejected: u32,
    },
    Notify {
        request_id: String,
        rank: u32,
        /// Empty when the KV is ready; otherwise why it never will be.
        failure: String,
        mac: [u8; MAC_LEN],
    },
}

impl Message {
    pub fn kind(&self) -> MsgType {
        match self {
            Message::Hello { .. } => MsgType::Hello,
            Message::Challenge { .. } => MsgType::Challenge,
            Message::Auth { .. } => MsgType::Auth,
            Message::Welcome { .. } => MsgType::Welcome,
            Message::Error { .. } => MsgType::Error,
            Message::Attach { .. } => MsgType::Attach,
            Message::AllocRequest { .. } => MsgType::AllocRequest,
            Message::AllocGrant { .. } => MsgType::AllocGrant,
            Message::Seal { .. } => MsgType::Seal,
            Message::Landed { .. } => MsgType::Landed,
            Message::Pull { .. } => MsgType::Pull,
            Message::Commit { .. } => MsgType::Commit,
            Message::Committed { .. } => MsgType::Committed,
            Message::Notify { .. } => MsgType::Notify,
        }
    }

    /// The whole frame: header and body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(vec![0; HEADER_LEN]);
        match self {
            Message::Hello {
                rank,
                channel,
                page_size,
                fingerprint,
                keys,
                nonce,
            } => {
                w.u32(*rank);
                w.0.push(channel.to_u8());
                w.u64(*page_size);
                w.u64(*fingerprint);
                w.str(&keys.model);
                w.u32(keys.world_size);
                w.str(keys.dtype.lmcache_name());
                w.u32(keys.chunk_size);
                w.str(keys.hash_algorithm.name());
                w.u64(keys.none_hash);
                w.bytes(nonce);
            }
            Message::Challenge {
                nonce,
                auth_required,
                proof,
            } => {
                w.bytes(nonce);
                w.0.push(u8::from(*auth_required));
                w.bytes(proof);
            }
            Message::Auth { proof } => w.bytes(proof),
            Message::Welcome {
                token,
                page_size,
                num_pages,
                channel_params,
                skip_last_n_tokens,
            } => {
                w.bytes(token);
                w.u64(*page_size);
                w.u32(*num_pages);
                w.blob(channel_params);
                w.u32(*skip_last_n_tokens);
            }
            Message::Error { code, message } => {
                w.u16(code.to_u16());
                w.str(clip_message(message));
            }
            Message::Attach { token } => w.bytes(token),
            Message::AllocRequest { request_id, chunks } => {
                w.str(request_id);
                w.u32(chunks.len() as u32);
                for c in chunks {
                    w.str(&c.key.to_string());
                    w.u32(c.meta.num_tokens);
                    w.u64(c.meta.layout_fingerprint);
                    w.u64(c.len);
                }
            }
            Message::AllocGrant { grant, pages } => {
                w.u32(*grant);
                w.u32(pages.len() as u32);
                pages.iter().for_each(|p| w.u32(*p));
            }
            Message::Seal {
                grant,
                chunk,
                checksum,
            } => {
                w.u32(*grant);
                w.u32(*chunk);
                w.u64(*checksum);
            }
            Message::Landed {
                grant,
                chunk,
                offset,
                len,
            } => {
                w.u32(*grant);
                w.u32(*chunk);
                w.u64(*offset);
                w.u32(*len);
            }
            Message::Pull {
                grant,
                chunk,
                offset,
                len,
                source,
                source_offset,
            } => {
                w.u32(*grant);
                w.u32(*chunk);
                w.u64(*offset);
                w.u32(*len);
                w.str(source);
                w.u64(*source_offset);
            }
            Message::Commit { grant } => w.u32(*grant),
            Message::Committed {
                grant,
                verified,
                rejected,
            } => {
                w.u32(*grant);
                w.u32(*verified);
                w.u32(*rejected);
            }
            Message::Notify {
                request_id,
                rank,
                failure,
                mac,
            } => {
                w.str(request_id);
                w.u32(*rank);
                w.str(failure);
                w.bytes(mac);
            }
        }
        let body_len = (w.0.len() - HEADER_LEN) as u32;
        w.0[..HEADER_LEN].copy_from_slice(&header(self.kind(), body_len));
        w.0
    }
}

/// The longest prefix of `text` that fits a message field ([`MAX_MESSAGE`] bytes) and ends
/// on a character boundary, so the frame stays decodable.
pub(crate) fn clip_message(text: &str) -> &str {
    let mut end = text.len().min(MAX_MESSAGE);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Bytes of one checksum segment. A chunk's checksum is made from its segments' digests,
/// so a segment can be hashed as soon as all its bytes are there, in any order: a chunk
/// sent layer by layer is hashed while it arrives, not after its last layer.
pub const CHECKSUM_SEGMENT: usize = 64 << 10;

/// Checksum segments of a chunk of `len` bytes (the last one may be shorter).
pub fn num_segments(len: usize) -> usize {
    len.div_ceil(CHECKSUM_SEGMENT)
}

/// The checksum a `Seal` carries: xxh3-64 of the little-endian xxh3-64 digests of the
/// chunk's [`CHECKSUM_SEGMENT`]-byte segments, in order. A sender computes it once, when it
/// gathers the chunk out of its paged cache (or as its layers are gathered), so sending
/// does not read the bytes twice; the receiver recomputes it over what landed.
pub fn checksum(data: &[u8]) -> u64 {
    let digests: Vec<u64> = data.chunks(CHECKSUM_SEGMENT).map(segment_digest).collect();
    combine_segments(&digests)
}

/// The digest of one checksum segment: twox-hash's xxh3-64, which picks its vector loop at
/// run time and on 64 KiB segments hashes as fast as hand-written AVX2 and AVX-512 loops,
/// in cache and out of it (measured on this project's 2-core Zen 5 VM).
pub fn segment_digest(bytes: &[u8]) -> u64 {
    twox_hash::XxHash3_64::oneshot(bytes)
}

/// The [`segment_digest`] of a segment whose bytes are `parts`, in order, without putting
/// them together (one part is hashed in one pass).
pub fn segment_digest_of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let mut parts = parts.into_iter().peekable();
    let Some(first) = parts.next() else {
        return segment_digest(&[]);
    };
    if parts.peek().is_none() {
        return segment_digest(first);
    }
    let mut hasher = twox_hash::XxHash3_64::new();
    hasher.write(first);
    parts.for_each(|part| hasher.write(part));
    hasher.finish()
}

/// The [`checksum`] of a chunk whose segments' digests are `digests`, in chunk order.
pub fn combine_segments(digests: &[u64]) -> u64 {
    let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
    twox_hash::XxHash3_64::oneshot(&bytes)
}

/// The 12 header bytes of a frame.
pub fn header(kind: MsgType, body_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    h[8..].copy_from_slice(&body_len.to_le_bytes());
    h
}

/// Header and fixed body of a `Data` frame carrying `payload_len` bytes.
pub fn data_prefix(d: &DataHeader, payload_len: u32) -> [u8; HEADER_LEN + DATA_HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN + DATA_HEADER_LEN];
    out[..HEADER_LEN].copy_from_slice(&header(MsgType::Data, DATA_HEADER_LEN as u32 + payload_len));
    out[12..16].copy_from_slice(&d.grant.to_le_bytes());
    out[16..20].copy_from_slice(&d.chunk.to_le_bytes());
    out[20..28].copy_from_slice(&d.offset.to_le_bytes());
    out
}

/// Checks a header and returns the message type and body length. `max_body` bounds every
/// type except `Data`, whose payload is bounded by [`MAX_DATA_PAYLOAD`].
pub fn decode_header(h: &[u8; HEADER_LEN], max_body: u32) -> Result<(MsgType, u32), FrameError> {
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if h[4] != VERSION {
        return Err(FrameError::BadVersion(h[4]));
    }
    let kind = MsgType::from_u8(h[5]).ok_or(FrameError::UnknownType(h[5]))?;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(FrameError::Flags(flags));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let (min, max) = match kind {
        MsgType::Data => (
            DATA_HEADER_LEN as u32,
            DATA_HEADER_LEN as u32 + MAX_DATA_PAYLOAD,
        ),
        _ => (0, max_body),
    };
    if len > max {
        return Err(FrameError::TooLong { kind, len, max });
    }
    if len < min {
        return Err(FrameError::Truncated {
            kind,
            field: "data header",
            need: (min - len) as usize,
        });
    }
    Ok((kind, len))
}

/// The fixed part of a `Data` body.
pub fn decode_data_header(b: &[u8; DATA_HEADER_LEN]) -> DataHeader {
    DataHeader {
        grant: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        chunk: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        offset: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
    }
}

/// Decodes the body of any type but `Data`.
pub fn decode_body(kind: MsgType, body: &[u8]) -> Result<Message, FrameError> {
    let mut r = Reader { kind, buf: body };
    let msg = match kind {
        MsgType::Hello => Message::Hello {
            rank: r.u32("rank")?,
            channel: {
                let v = r.u8("channel")?;
                ChannelKind::from_u8(v).ok_or_else(|| r.bad("channel", format!("{v}")))?
            },
            page_size: r.u64("page_size")?,
            fingerprint: r.u64("fingerprint")?,
            keys: r.key_derivation()?,
            nonce: r.array("nonce")?,
        },
        MsgType::Challenge => Message::Challenge {
            nonce: r.array("nonce")?,
            auth_required: match r.u8("auth_required")? {
                0 => false,
                1 => true,
                v => return Err(r.bad("auth_required", format!("{v} is not 0 or 1"))),
            },
            proof: r.array("proof")?,
        },
        MsgType::Auth => Message::Auth {
            proof: r.array("proof")?,
        },
        MsgType::Welcome => Message::Welcome {
            token: r.array("token")?,
            page_size: r.u64("page_size")?,
            num_pages: r.u32("num_pages")?,
            channel_params: r.blob("channel_params", MAX_CHANNEL_PARAMS)?,
            skip_last_n_tokens: r.u32("skip_last_n_tokens")?,
        },
        MsgType::Error => Message::Error {
            code: ErrorCode::from_u16(r.u16("code")?),
            message: r.str("message", MAX_MESSAGE)?,
        },
        MsgType::Attach => Message::Attach {
            token: r.array("token")?,
        },
        MsgType::AllocRequest => {
            let request_id = r.str("request_id", MAX_REQUEST_ID)?;
            let n = r.count("chunk count", MAX_CHUNKS, 2 + 4 + 8 + 8)?;
            let mut chunks = Vec::with_capacity(n);
            for _ in 0..n {
                let key = r.str("key", MAX_KEY)?;
                let key = key
                    .parse::<CacheKey>()
                    .map_err(|e| r.bad("key", e.to_string()))?;
                let num_tokens = r.u32("num_tokens")?;
                let layout_fingerprint = r.u64("fingerprint")?;
                let len = r.u64("len")?;
                chunks.push(ChunkDecl {
                    key,
                    meta: ChunkMeta {
                        layout_fingerprint,
                        num_tokens,
                    },
                    len,
                });
            }
            Message::AllocRequest { request_id, chunks }
        }
        MsgType::AllocGrant => {
            let grant = r.u32("grant")?;
            let n = r.count("page count", MAX_CHUNKS, 4)?;
            let pages = (0..n).map(|_| r.u32("page")).collect::<Result<_, _>>()?;
            Message::AllocGrant { grant, pages }
        }
        MsgType::Seal => Message::Seal {
            grant: r.u32("grant")?,
            chunk: r.u32("chunk")?,
            checksum: r.u64("checksum")?,
        },
        MsgType::Landed => Message::Landed {
            grant: r.u32("grant")?,
            chunk: r.u32("chunk")?,
            offset: r.u64("offset")?,
            len: r.u32("length")?,
        },
        MsgType::Pull => Message::Pull {
            grant: r.u32("grant")?,
            chunk: r.u32("chunk")?,
            offset: r.u64("offset")?,
            len: r.u32("length")?,
            source: r.str("source", MAX_SOURCE_PATH)?,
            source_offset: r.u64("source_offset")?,
        },
        MsgType::Commit => Message::Commit {
            grant: r.u32("grant")?,
        },
        MsgType::Committed => Message::Committed {
            grant: r.u32("grant")?,
            verified: r.u32("verified")?,
            rejected: r.u32("rejected")?,
        },
        MsgType::Notify => Message::Notify {
            request_id: r.str("request_id", MAX_REQUEST_ID)?,
            rank: r.u32("rank")?,
            failure: r.str("failure", MAX_MESSAGE)?,
            mac: r.array("mac")?,
        },
        MsgType::Data => return Err(FrameError::Unexpected(MsgType::Data)),
    };
    if !r.buf.is_empty() {
        return Err(FrameError::Trailing {
            kind,
            extra: r.buf.len(),
        });
    }
    Ok(msg)
}

/// One decoded frame from a byte slice: what a stream reader yields, for tests and fuzzing.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Message(Message),
    Data(DataHeader, &'a [u8]),
}

/// Decodes exactly one whole frame from `bytes` (no trailing bytes).
pub fn decode(bytes: &[u8], max_body: u32) -> Result<Frame<'_>, FrameError> {
    let Some((h, body)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated {
            kind: MsgType::Error,
            field: "header",
            need: HEADER_LEN - bytes.len(),
        });
    };
    let (kind, len) = decode_header(h, max_body)?;
    let len = len as usize;
    if body.len() < len {
        return Err(FrameError::Truncated {
            kind,
            field: "body",
            need: len - body.len(),
        });
    }
    if body.len() > len {
        return Err(FrameError::Trailing {
            kind,
            extra: body.len() - len,
        });
    }
    if kind == MsgType::Data {
        let (d, payload) =
            body.split_first_chunk::<DATA_HEADER_LEN>()
                .ok_or(FrameError::Truncated {
                    kind,
                    field: "data header",
                    need: DATA_HEADER_LEN,
                })?;
        return Ok(Frame::Data(decode_data_header(d), payload));
    }
    decode_body(kind, body).map(Frame::Message)
}

/// The receiver's view of one grant: where each chunk may land, and which of its checksum
/// segments landed whole. [`GrantCheck::admit`] is the only way a `Data` frame reaches
/// memory.
#[derive(Clone, Debug)]
pub struct GrantCheck {
    pub grant: u32,
    pub page_size: u64,
    /// Per chunk: its page and declared length (<= page_size).
    pub chunks: Vec<(u32, u64)>,
    /// Per chunk: which of its bytes were admitted and landed. Segments may come in any
    /// order but never overlap, so each byte of a page is written once.
    pub received: Vec<Received>,
}

/// Which bytes of one chunk were admitted, and which of its checksum segments landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// Chunk-relative ranges admitted: sorted, disjoint, adjacent ones merged.
    pub admitted: Vec<Range<u64>>,
    pub segments: SegmentTally,
}

/// How many bytes of each [`CHECKSUM_SEGMENT`] of a chunk are there, as its pieces come in
/// any order, each byte once: a segment can be hashed once it is whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentTally {
    len: u64,
    /// Per segment: its bytes there so far.
    present: Vec<u64>,
    /// Segments whose every byte is there.
    whole: usize,
}

impl SegmentTally {
    /// The tally of a chunk of `len` bytes, none there yet.
    pub fn new(len: u64) -> Self {
        SegmentTally {
            len,
            present: vec![0; num_segments(len as usize)],
            whole: 0,
        }
    }

    /// Counts `bytes` (chunk-relative, within the chunk, none counted before) as there, and
    /// calls `whole` with the index and chunk-relative range of each segment they complete.
    pub fn add(&mut self, bytes: Range<u64>, mut whole: impl FnMut(u32, Range<u64>)) {
        let segment = CHECKSUM_SEGMENT as u64;
        let mut at = bytes.start;
        while at < bytes.end.min(self.len) {
            let index = (at / segment) as usize;
            let (start, end) = (
                index as u64 * segment,
                ((index as u64 + 1) * segment).min(self.len),
            );
            let upto = end.min(bytes.end);
            self.present[index] += upto - at;
            if self.present[index] == end - start {
                self.whole += 1;
                whole(index as u32, start..end);
            }
            at = upto;
        }
    }

    /// Whether every segment is whole.
    pub fn complete(&self) -> bool {
        self.whole == self.present.len()
    }
}

impl GrantCheck {
    pub fn new(grant: u32, page_size: u64, chunks: Vec<(u32, u64)>) -> Self {
        let received = chunks
            .iter()
            .map(|&(_, len)| Received {
                admitted: Vec::new(),
                segments: SegmentTally::new(len),
            })
            .collect();
        GrantCheck {
            grant,
            page_size,
            chunks,
            received,
        }
    }

    /// Accepts a data segment of `len` bytes and returns the byte range of the PD buffer it
    /// may be written to: inside the chunk's granted page and its declared length, over no
    /// byte an earlier segment was admitted for. Anything else is refused before a byte is
    /// read.
    ///
    /// The bytes count as admitted from here on: a payload that then fails to arrive fails
    /// the connection, and with it the whole grant, so nothing reads this state again.
    pub fn admit(&mut self, d: &DataHeader, len: u64) -> Result<Range<u64>, String> {
        if len == 0 {
            return Err("empty data segment".into());
        }
        if d.grant != self.grant {
            return Err(format!(
                "data for grant {} on a connection holding grant {}",
                d.grant, self.grant
            ));
        }
        let i = d.chunk as usize;
        let (Some(&(_, chunk_len)), Some(received)) =
            (self.chunks.get(i), self.received.get_mut(i))
        else {
            return Err(format!(
                "chunk {} is outside the grant's {} chunks",
                d.chunk,
                self.chunks.len()
            ));
        };
        let end = d.offset.checked_add(len).filter(|e| *e <= chunk_len);
        let Some(end) = end else {
            return Err(format!(
                "chunk {}: {} bytes at offset {} pass its declared length {}",
                d.chunk, len, d.offset, chunk_len
            ));
        };
        received.admit(d.offset..end).map_err(|overlapped| {
            format!(
                "chunk {}: {} bytes at offset {} overlap its bytes {overlapped:?}, already received",
                d.chunk, len, d.offset
            )
        })?;
        // chunk_len <= page_size was checked when the grant was made, so this stays in the
        // page; page < num_pages bounds it in the buffer.
        Ok(self.in_buffer(i, d.offset..end))
    }

    /// Counts `bytes` (chunk-relative, admitted for chunk `chunk`) as landed and calls
    /// `whole` with the index and PD-buffer range of each checksum segment they complete.
    pub fn landed(
        &mut self,
        chunk: u32,
        bytes: Range<u64>,
        mut whole: impl FnMut(u32, Range<u64>),
    ) {
        let i = chunk as usize;
        let Some(received) = self.received.get_mut(i) else {
            return;
        };
        let base = u64::from(self.chunks[i].0) * self.page_size;
        received
            .segments
            .add(bytes, |index, r| whole(index, base + r.start..base + r.end));
    }

    /// Whether every byte chunk `i` declared landed.
    pub fn complete(&self, i: usize) -> bool {
        self.received.get(i).is_some_and(|r| r.segments.complete())
    }

    fn in_buffer(&self, i: usize, chunk_bytes: Range<u64>) -> Range<u64> {
        let base = u64::from(self.chunks[i].0) * self.page_size;
        base + chunk_bytes.start..base + chunk_bytes.end
    }
}

impl Received {
    /// Records the non-empty `segment`, or returns the admitted range it overlaps.
    fn admit(&mut self, segment: Range<u64>) -> Result<(), Range<u64>> {
        // Sorted and disjoint: only the first range ending after the segment starts can
        // overlap it, and it is where the segment goes.
        let at = self.admitted.partition_point(|r| r.end <= segment.start);
        if let Some(next) = self.admitted.get(at).filter(|r| r.start < segment.end) {
            return Err(next.clone());
        }
        let joins_next = self
            .admitted
            .get(at)
            .is_some_and(|r| r.start == segment.end);
        let joins_previous = at > 0 && self.admitted[at - 1].end == segment.start;
        match (joins_previous, joins_next) {
            (true, true) => {
                let next = self.admitted.remove(at);
                self.admitted[at - 1].end = next.end;
            }
            (true, false) => self.admitted[at - 1].end = segment.end,
            (false, true) => self.admitted[at].start = segment.start,
            (false, false) => self.admitted.insert(at, segment),
        }
        Ok(())
    }
}

/// Reads one frame header and, unless it is `Data`, its body.
pub enum Incoming {
    Message(Message),
    /// The payload (`len` bytes) is still in the stream.
    Data(DataHeader, u32),
}

/// Reads the next frame from `r`. On `Data`, the caller must consume the payload.
pub fn read_frame(r: &mut impl Read, max_body: u32) -> Result<Incoming, ReadError> {
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).map_err(ReadError::Io)?;
    let (kind, len) = decode_header(&h, max_body)?;
    if kind == MsgType::Data {
        let mut d = [0u8; DATA_HEADER_LEN];
        r.read_exact(&mut d).map_err(ReadError::Io)?;
        return Ok(Incoming::Data(
            decode_data_header(&d),
            len - DATA_HEADER_LEN as u32,
        ));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).map_err(ReadError::Io)?;
    Ok(Incoming::Message(decode_body(kind, &body)?))
}

/// A frame read that failed: the stream, or the bytes.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Writes every byte of `bufs`, as one `writev` where the kernel takes it all.
pub fn write_all_vectored(w: &mut impl Write, bufs: &[&[u8]]) -> io::Result<()> {
    let mut skip = 0usize;
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    while skip < total {
        let mut rest = skip;
        let slices: Vec<IoSlice<'_>> = bufs
            .iter()
            .filter_map(|b| {
                if rest >= b.len() {
                    rest -= b.len();
                    None
                } else {
                    let s = IoSlice::new(&b[rest..]);
                    rest = 0;
                    Some(s)
                }
            })
            .collect();
        match w.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => skip += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Writer(Vec<u8>);

impl Writer {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// Callers bound strings below u16::MAX (ids, keys, messages, paths are checked).
    fn str(&mut self, s: &str) {
        self.blob(s.as_bytes());
    }
    /// A u16 length, then the bytes; callers bound them below u16::MAX.
    fn blob(&mut self, b: &[u8]) {
        let len = b.len().min(u16::MAX as usize);
        self.u16(len as u16);
        self.0.extend_from_slice(&b[..len]);
    }
}

struct Reader<'a> {
    kind: MsgType,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(FrameError::Truncated {
                kind: self.kind,
                field,
                need: n - self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, FrameError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn blob(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, FrameError> {
        self.blob_ref(field, max).map(<[u8]>::to_vec)
    }
    fn blob_ref(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], FrameError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(FrameError::FieldTooLong {
                kind: self.kind,
                field,
                len,
                max,
            });
        }
        self.take(field, len)
    }
    fn str(&mut self, field: &'static str, max: usize) -> Result<String, FrameError> {
        let bytes = self.blob_ref(field, max)?;
        std::str::from_utf8(bytes)
            .map(str::to_string)
            .map_err(|e| self.bad(field, e.to_string()))
    }
    /// A count of items of at least `min_item` bytes each: bounded by `max` and by what the
    /// body can still hold, so a lying count cannot make us allocate.
    fn count(
        &mut self,
        field: &'static str,
        max: u32,
        min_item: usize,
    ) -> Result<usize, FrameError> {
        let n = self.u32(field)?;
        if n > max || n as usize > self.buf.len() / min_item {
            return Err(self.bad(
                field,
                format!(
                    "{n} exceeds the bound {max} or the {} bytes left",
                    self.buf.len()
                ),
            ));
        }
        Ok(n as usize)
    }
    /// `Hello`'s key derivation: model, world size, dtype, chunk size, hash algorithm and
    /// NONE_HASH.
    fn key_derivation(&mut self) -> Result<KeyDerivation, FrameError> {
        let model = self.str("model", MAX_KEY)?;
        let model = CacheKey::model_name(&model).map_err(|e| self.bad("model", e.to_string()))?;
        let world_size = self.u32("world_size")?;
        let dtype = self.str("dtype", MAX_NAME)?;
        let dtype = dtype
            .parse()
            .map_err(|e: crate::dtype::UnknownDtype| self.bad("dtype", e.to_string()))?;
        let chunk_size = self.u32("chunk_size")?;
        let hash = self.str("hash_algorithm", MAX_NAME)?;
        let hash_algorithm = hash
            .parse()
            .map_err(|e: crate::keys::HashError| self.bad("hash_algorithm", e.to_string()))?;
        Ok(KeyDerivation {
            model,
            world_size,
            dtype,
            chunk_size,
            hash_algorithm,
            none_hash: self.u64("none_hash")?,
        })
    }
    fn bad(&self, field: &'static str, reason: String) -> FrameError {
        FrameError::BadField {
            kind: self.kind,
            field,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvDtype;

    #[test]
    fn every_message_round_trips() {
        let key = CacheKey::new("m", 2, 1, 0xabc, KvDtype::Bf16).unwrap();
        let msgs = [
            Message::Hello {
                rank: 1,
                channel: ChannelKind::Shm,
                page_size: 1 << 20,
                fingerprint: 7,
                keys: KeyDerivation::new(
                    "m",
                    2,
                    KvDtype::Fp8E4m3,
                    &crate::keys::ChunkHasher::new(
                        crate::keys::HashAlgorithm::Sha256Cbor,
                        "0",
                        256,
                    )
                    .unwrap(),
                )
                .unwrap(),
                nonce: [3; NONCE_LEN],
            },
            Message::Challenge {
                nonce: [1; NONCE_LEN],
                auth_required: true,
                proof: [2; MAC_LEN],
            },
            Message::Auth {
                proof: [9; MAC_LEN],
            },
            Message::Welcome {
                token: [4; TOKEN_LEN],
                page_size: 4096,
                num_pages: 3,
                channel_params: vec![1, 2, 3],
                skip_last_n_tokens: 1,
            },
            Message::Error {
                code: ErrorCode::AllocationTimeout,
                message: "waited".into(),
            },
            Message::Attach {
                token: [5; TOKEN_LEN],
            },
            Message::AllocRequest {
                request_id: "req-1".into(),
                chunks: vec![ChunkDecl {
                    key,
                    meta: ChunkMeta {
                        layout_fingerprint: 11,
                        num_tokens: 256,
                    },
                    len: 4096,
                }],
            },
            Message::AllocGrant {
                grant: 3,
                pages: vec![0, 2],
            },
            Message::Seal {
                grant: 3,
                chunk: 1,
                checksum: 42,
            },
            Message::Landed {
                grant: 3,
                chunk: 1,
                offset: 1 << 33,
                len: 4096,
            },
            Message::Pull {
                grant: 3,
                chunk: 1,
                offset: 1 << 33,
                len: 4096,
                source: "/dev/shm/kvrelay-stage-1-ab".into(),
                source_offset: 1 << 34,
            },
            Message::Commit { grant: 3 },
            Message::Committed {
                grant: 3,
                verified: 2,
                rejected: 0,
            },
            Message::Notify {
                request_id: "req-1".into(),
                rank: 1,
                failure: String::new(),
                mac: [0; MAC_LEN],
            },
            Message::Notify {
                request_id: "req-2".into(),
                rank: 0,
                failure: "the PD buffer is too small".into(),
                mac: [7; MAC_LEN],
            },
        ];
        for m in msgs {
            let bytes = m.encode();
            assert_eq!(decode(&bytes, MAX_CONTROL_BODY), Ok(Frame::Message(m)));
        }
        let d = DataHeader {
            grant: 1,
            chunk: 2,
            offset: 3,
        };
        let mut bytes = data_prefix(&d, 4).to_vec();
        bytes.extend_from_slice(b"abcd");
        assert_eq!(decode(&bytes, 0), Ok(Frame::Data(d, &b"abcd"[..])));
    }

    const SEGMENT: u64 = CHECKSUM_SEGMENT as u64;
    /// Pages of four checksum segments.
    const PAGE: u64 = 4 * SEGMENT;

    /// A grant of two chunks of 2.5 checksum segments, in pages 2 and 0.
    fn two_chunk_grant() -> GrantCheck {
        GrantCheck::new(5, PAGE, vec![(2, 5 * SEGMENT / 2), (0, 5 * SEGMENT / 2)])
    }

    fn data(chunk: u32, offset: u64) -> DataHeader {
        DataHeader {
            grant: 5,
            chunk,
            offset,
        }
    }

    /// Admits and lands `len` bytes of `chunk` at `offset`; returns the whole segments
    /// reported, as (index, PD-buffer range).
    fn land(check: &mut GrantCheck, chunk: u32, offset: u64, len: u64) -> Vec<(u32, Range<u64>)> {
        let range = check.admit(&data(chunk, offset), len).unwrap();
        let base = u64::from(check.chunks[chunk as usize].0) * PAGE;
        assert_eq!(range, base + offset..base + offset + len);
        let mut whole = Vec::new();
        check.landed(chunk, offset..offset + len, |i, r| whole.push((i, r)));
        whole
    }

    #[test]
    fn a_segment_is_whole_once_its_bytes_landed_in_any_order() {
        let mut check = two_chunk_grant();
        let base = 2 * PAGE;
        // The short last segment first, then the first one's second half, which completes
        // nothing, then a piece straddling segments 0 and 1.
        assert_eq!(
            land(&mut check, 0, 2 * SEGMENT, SEGMENT / 2),
            vec![(2, base + 2 * SEGMENT..base + 5 * SEGMENT / 2)]
        );
        assert_eq!(
            land(&mut check, 0, SEGMENT / 2 + 10, SEGMENT / 2 - 10),
            vec![]
        );
        assert_eq!(
            land(&mut check, 0, SEGMENT, SEGMENT),
            vec![(1, base + SEGMENT..base + 2 * SEGMENT)]
        );
        assert!(!check.complete(0));
        assert_eq!(land(&mut check, 0, 0, SEGMENT / 2), vec![]);
        assert_eq!(
            land(&mut check, 0, SEGMENT / 2, 10),
            vec![(0, base..base + SEGMENT)]
        );
        assert!(check.complete(0) && !check.complete(1));
        assert_eq!(check.received[0].admitted, vec![0..5 * SEGMENT / 2]);
    }

    #[test]
    fn chunks_of_a_grant_interleave() {
        let mut check = two_chunk_grant();
        // Each "layer" sends its K slice (first half) and V slice (second half) of both
        // chunks, V first; five layers of a quarter segment each.
        let slice = SEGMENT / 4;
        let mut whole = [0, 0];
        for layer in 0..5 {
            for chunk in [1, 0] {
                for offset in [5 * slice + layer * slice, layer * slice] {
                    whole[chunk as usize] += land(&mut check, chunk, offset, slice).len();
                }
            }
        }
        assert_eq!(whole, [3, 3]);
        assert!(check.complete(0) && check.complete(1));
    }

    #[test]
    fn overlapping_and_out_of_bounds_segments_are_refused_by_name() {
        let mut check = two_chunk_grant();
        check.admit(&data(0, 0), 20).unwrap();
        check.admit(&data(0, 40), 20).unwrap();
        let end = 5 * SEGMENT / 2;
        let before = check.received.clone();
        for (d, len, error) in [
            (data(0, 19), 2, "overlap its bytes 0..20"),
            (data(0, 0), 1, "overlap its bytes 0..20"),
            (data(0, 30), 11, "overlap its bytes 40..60"),
            (data(0, 59), 30, "overlap its bytes 40..60"),
            (data(0, 45), 5, "overlap its bytes 40..60"),
            (data(0, 20), 80, "overlap its bytes 40..60"),
            (
                data(0, end - 10),
                11,
                &format!("pass its declared length {end}"),
            ),
            (
                data(0, u64::MAX),
                1,
                &format!("pass its declared length {end}"),
            ),
            (data(2, 0), 1, "outside the grant's 2 chunks"),
            (data(0, 20), 0, "empty data segment"),
            (
                DataHeader {
                    grant: 6,
                    ..data(0, 20)
                },
                1,
                "grant 6 on a connection holding grant 5",
            ),
        ] {
            let refused = check.admit(&d, len).unwrap_err();
            assert!(refused.contains(error), "{d:?}+{len}: {refused}");
        }
        assert_eq!(check.received, before, "a refusal changes nothing");
        // The gap between them is still free, exactly, and merges the three.
        check.admit(&data(0, 20), 20).unwrap();
        assert_eq!(check.received[0].admitted, vec![0..60]);
        assert!(!check.complete(0));
    }

    #[test]
    fn the_checksum_is_made_of_segment_digests_and_sees_every_byte() {
        let data: Vec<u8> = (0..3 * CHECKSUM_SEGMENT + 7)
            .map(|i| (i * 13 + (i >> 11)) as u8)
            .collect();
        let digests: Vec<u64> = data.chunks(CHECKSUM_SEGMENT).map(segment_digest).collect();
        assert_eq!(digests.len(), num_segments(data.len()));
        assert_eq!(checksum(&data), combine_segments(&digests));
        for at in [0, CHECKSUM_SEGMENT - 1, CHECKSUM_SEGMENT, data.len() - 1] {
            let mut flipped = data.clone();
            flipped[at] ^= 0x40;
            assert_ne!(checksum(&flipped), checksum(&data), "byte {at}");
        }
        // Segments in another order are another chunk.
        let swapped = [digests[1], digests[0], digests[2], digests[3]];
        assert_ne!(combine_segments(&swapped), checksum(&data));
        assert_ne!(checksum(&data[..data.len() - 1]), checksum(&data));
    }

    #[test]
    fn a_segment_hashed_in_parts_has_the_digest_of_its_bytes_together() {
        let segment: Vec<u8> = (0..CHECKSUM_SEGMENT)
            .map(|i| (i * 7 + (i >> 9)) as u8)
            .collect();
        let whole = segment_digest(&segment);
        let cuts: [&[usize]; 5] = [&[], &[1], &[300, 301, 4096], &[2048, 40_000], &[65_535]];
        for cut in cuts {
            let mut parts = Vec::new();
            let mut at = 0;
            for &end in cut.iter().chain([&segment.len()]) {
                parts.push(&segment[at..end]);
                at = end;
            }
            assert_eq!(segment_digest_of_parts(parts), whole, "cut at {cut:?}");
        }
        assert_eq!(segment_digest_of_parts([]), segment_digest(&[]));
        let (a, b) = segment.split_at(1000);
        assert_ne!(segment_digest_of_parts([b, a]), whole, "parts out of order");
    }

    #[test]
    fn error_codes_round_trip_and_unknown_codes_survive() {
        for (code, v) in ErrorCode::TABLE {
            assert_eq!(ErrorCode::from_u16(v), code);
            assert_eq!(code.to_u16(), v);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other(999));
    }
}

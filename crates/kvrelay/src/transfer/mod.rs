//! PD disaggregation transfer: the prefiller ([`PdSender`], LMCache `pd_role: sender`) pushes
//! a request's KV chunks into the decoder's PD buffer ([`PdReceiver`], `pd_role: receiver`),
//! then tells the proxy the KV is ready.
//!
//! # API
//!
//! ```text
//! // both sides
//! let keys = KeyDerivation::new(model, world_size, dtype, &chunk_hasher)?;
//! let cfg = PdConfig::from_lmcache(&lmcache_config, &kv_cache_spec, keys)?;
//! // decoder, one per TP rank: binds pd_peer_host:pd_peer_{init,alloc}_port[rank]
//! let rx = PdReceiver::bind(&cfg, rank)?;
//! rx.wait_ready(request_id, timeout)?;        // the request's chunks all arrived and verified
//! let chunk = rx.get(&key);                   // consumes: the page is freed when `chunk` drops
//! rx.cancel(request_id);   // frees its pages; refuses its transfer if it comes later
//! rx.release(request_id);  // frees its pages only (an id other engines may also use)
//! rx.occupancy();          // pages in use, and TTL reaps so far
//! // prefiller, one per TP rank: rank i talks to receiver rank i
//! let peer = PdPeer::for_rank(host, &init_ports, &alloc_ports, rank)?;  // from disagg_spec
//! let mut tx = PdSender::connect(&cfg, peer, rank)?;                   // handshake once
//! let sum = frame::checksum(&staged);       // once, when the chunk is gathered
//! tx.send_request(request_id, &[OutgoingChunk { key, meta, data: &staged, checksum: sum }])?;
//!                                            // alloc → data → seal → commit → notify
//! // or, in chunked prefill, the same steps spread over the prompt's steps:
//! let mut t = tx.reserve(request_id, &[ChunkPlan { key, meta }])?; // first step: pages
//! t.put(0, &OutgoingChunk { key, meta, data: &staged, checksum: sum })?; // as computed
//! t.commit(&mut tx)?;                        // last step; dropping `t` instead frees them
//! ```
//!
//! # Protocol ([`frame`] has the byte layout)
//!
//! 1. **Init port** (`pd_peer_init_port[rank]`), once per sender: `Hello` (rank, channel,
//!    page size, layout fingerprint, [`KeyDerivation`], nonce) → `Challenge` (nonce, receiver
//!    proof) → `Auth` (sender proof) → `Welcome` (one-time session token, buffer geometry, the
//!    channel's opaque versioned parameters (shm: the file to map), the decoder's
//!    `skip_last_n_tokens`). A sender that derives keys differently
//!    (model, world size, dtype, chunk size, hash algorithm or seed) is refused with
//!    `Error{KeyMismatch}` naming the first differing field and both values. With
//!    `pd_shared_secret` both proofs are HMAC-SHA256 over both nonces and the rank, so each
//!    side knows the other holds the secret; a mismatch is `Error{AuthFailed}`.
//! 2. **Alloc port** (`pd_peer_alloc_port[rank]`), a persistent connection opened with
//!    `Attach{token}`. Per request: `AllocRequest` (request id; per chunk: key, tokens,
//!    fingerprint, length) → `AllocGrant` (one page per chunk, all reserved at once) or
//!    `Error{RequestTooLarge | AllocationTimeout | ...}`. Then per chunk the data (tcp:
//!    `Data` frames on this connection, read straight into the page; shm: written by the
//!    sender into the shared mapping, each put announced by a `Landed` frame), then
//!    `Seal{xxh3-64}`; finally `Commit` → `Committed{verified, rejected}`.
//! 3. **Proxy** (`pd_proxy_host:pd_proxy_port`): `Notify{request id, rank, failure, mac}`
//!    once the receiver verified every chunk (`failure` empty), or when an `async`
//!    sender ([`PdSink`]) gave up on the request (`failure` says why, so the proxy fails
//!    it at once); [`read_notification`] decodes it. The MAC covers the failure text.
//!
//! # Guarantees
//!
//! - Admission is all-or-nothing: a request gets all of its pages or none, waits at most
//!   `pd_allocation_timeout_sec` (then [`ErrorCode::AllocationTimeout`]), and a request
//!   larger than the whole buffer is refused at once ([`ErrorCode::RequestTooLarge`]).
//! - Every `Data` frame is checked against the grant (chunk, offset, length) before a byte
//!   is read into memory, and every `Landed` frame before its bytes are hashed; a
//!   malformed frame closes that connection only.
//! - Every chunk is verified (fingerprint and length at alloc, xxh3-64 at seal). A request
//!   with any bad chunk is dropped whole: it is a miss, never loaded.
//! - A sender sends only the chunks the decoder's lookup will ask for (its prompt, plus
//!   the first token when the proxy asked for `ret_first_tok`, less the decoder's
//!   `skip_last_n_tokens`); the others are counted in [`SendStats::skipped_chunks`].
//! - Pages come back when the consumer drops a chunk, on [`PdReceiver::cancel`] (the
//!   decoder's connector calls it when the request ends, so KV it did not load is freed at
//!   once), when the sender's connection drops before `Commit`, and, as a last resort
//!   counted in [`Occupancy`], after `pd_buffer_ttl_sec` for KV that nobody consumed.
//!   A request cancelled before its transfer arrived is refused at allocation
//!   ([`ErrorCode::Cancelled`]).
//!
//! Trust model of `shm`: the sender maps the whole PD buffer (a 0600 file in `/dev/shm`, so
//! only the same user can), so a hostile same-host peer could write outside its grant; the
//! receiver still verifies every chunk's checksum over what its page holds. Over `tcp` the
//! receiver alone writes its memory.

pub mod frame;

mod auth;
mod buffer;
mod channel;
mod copy_digest;
#[cfg(feature = "ascend")]
mod hccl;
#[cfg(feature = "ascend")]
mod hcomm_onesided;
#[cfg(feature = "ascend")]
mod hixl;
#[cfg(feature = "ascend")]
mod npu;
mod receiver;
mod sender;
mod shm;
mod tcp;
mod tier;
mod verify;

use std::time::Duration;

pub use buffer::{Occupancy, ReadyRequest};
pub use channel::{Channel, Put};
pub use frame::{ChannelKind, ErrorCode, FrameError};
pub use receiver::PdReceiver;
pub use sender::{
    read_notification, ChunkPlan, KvReady, OutgoingChunk, PdSender, PdTransfer, SendStats,
};
pub use shm::SharedStaging;
pub use tcp::set_socket_buffers;
pub use tier::{PdSink, ReceivedKv};

use crate::config::{LmcacheConfig, PdBackendMode, SecretString};
use crate::keys::KeyDerivation;
use crate::layout::KvCacheSpec;

/// A PD transfer that failed or was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed frame from the peer: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("PD configuration: {0}")]
    Config(String),
    /// This CANN installation cannot run the chosen channel (the reason names the version
    /// found and the version needed, or the missing library or symbols).
    #[cfg(feature = "ascend")]
    #[error("transfer_channel {channel} cannot run here: {source}")]
    ChannelUnsupported {
        channel: &'static str,
        #[source]
        source: ascend_sys::Unsupported,
    },
    /// An ACL call of an Ascend channel failed (loading, memory, stream, copy).
    #[cfg(feature = "ascend")]
    #[error("{what}: {source}")]
    Acl {
        what: &'static str,
        #[source]
        source: ascend_sys::AclError,
    },
    /// An HCCL call failed: the peer died or timed out, or the communicator is unusable.
    #[cfg(feature = "ascend")]
    #[error("{what}: {source}")]
    Hccl {
        what: &'static str,
        #[source]
        source: ascend_sys::HcclError,
    },
    /// A HIXL call of the `hixl` channel failed: the server died or timed out.
    #[cfg(feature = "ascend")]
    #[error("{what}: {source}")]
    Hixl {
        what: &'static str,
        #[source]
        source: ascend_sys::HixlError,
    },
    #[error("transfer_channel {0:?} is not available in this build; kvrelay moves PD KV over \"tcp\" or \"shm\" (hccl, hcomm_onesided and hixl come with the ascend feature)")]
    UnsupportedChannel(String),
    #[error("pd_buffer_size = {buffer_size} bytes cannot hold one chunk of {page_size} bytes")]
    BufferTooSmall { buffer_size: u64, page_size: usize },
    #[error("request {request:?} needs {pages} pages but the whole PD buffer has {total}; raise pd_buffer_size")]
    RequestTooLarge {
        request: String,
        pages: usize,
        total: usize,
    },
    #[error(
        "request {request:?}: no {pages} free pages within {waited:?} ({free} of {total} free)"
    )]
    AllocationTimeout {
        request: String,
        pages: usize,
        free: usize,
        total: usize,
        waited: Duration,
    },
    #[error("request {0:?} is already in the PD buffer")]
    DuplicateRequest(String),
    #[error("chunk {index} of request {request:?}: {reason}")]
    BadChunk {
        request: String,
        index: usize,
        reason: String,
    },
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    #[error(
        "the sender derives chunk keys unlike this receiver, so its KV would never be found: {0}"
    )]
    KeyMismatch(String),
    #[error("the peer refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("request {request:?}: {rejected} chunks failed verification at the receiver; nothing of it will be loaded")]
    ChunksRejected { request: String, rejected: u32 },
    #[error("request {0:?}: an earlier put failed on the wire, so its connection and the receiver's reservation are gone; reserve it again")]
    TransferBroken(String),
    #[error("request {request:?} was not ready within {waited:?}")]
    WaitTimeout { request: String, waited: Duration },
    #[error("request {request:?} ended without becoming ready: {reason}")]
    RequestEnded { request: String, reason: String },
    #[error("the PD receiver is shutting down")]
    ShuttingDown,
    #[error("the PD sender thread has stopped")]
    SenderStopped,
}

impl TransferError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        TransferError::Io {
            what: what.into(),
            source,
        }
    }

    /// The peer closed or reset the connection (not a timeout: a slow peer may still be
    /// working on what it was sent).
    fn is_connection_lost(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(self, TransferError::Io { source, .. } if matches!(
            source.kind(),
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
        ))
    }

    /// The code this error travels as in an `Error` frame.
    fn code(&self) -> ErrorCode {
        match self {
            TransferError::RequestTooLarge { .. } => ErrorCode::RequestTooLarge,
            TransferError::AllocationTimeout { .. } => ErrorCode::AllocationTimeout,
            TransferError::DuplicateRequest(_) => ErrorCode::DuplicateRequest,
            TransferError::BadChunk { .. } => ErrorCode::BadChunk,
            TransferError::AuthFailed(_) => ErrorCode::AuthFailed,
            TransferError::RequestEnded { .. } => ErrorCode::Cancelled,
            TransferError::KeyMismatch(_) => ErrorCode::KeyMismatch,
            TransferError::Refused { code, .. } => *code,
            TransferError::ShuttingDown => ErrorCode::Busy,
            _ => ErrorCode::Protocol,
        }
    }
}

/// The receiver a PD proxy chose for one request: the `receiver_host`,
/// `receiver_init_port[]` and `receiver_alloc_port[]` of LMCache's
/// `kv_transfer_params.disagg_spec` (one port of each per decoder TP rank).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PdTarget {
    pub host: String,
    pub init_ports: Vec<u16>,
    pub alloc_ports: Vec<u16>,
}

/// Longest `receiver_host` accepted (a DNS name is at most 253 bytes).
const MAX_HOST: usize = 253;
/// Most TP ranks a `disagg_spec` may list.
const MAX_RANKS: usize = 1024;

impl PdTarget {
    /// Reads the receiver out of a request's `kv_transfer_params`. `Ok(None)` when it names
    /// none (no `disagg_spec`, or one with only a `req_id`): the sender's configured peer is
    /// used. A receiver named only in part, or with bad values, is an error.
    pub fn from_kv_transfer_params(
        params: Option<&serde_json::Value>,
    ) -> Result<Option<Self>, TransferError> {
        let Some(spec) = params.and_then(|p| p.get("disagg_spec")) else {
            return Ok(None);
        };
        let bad = |what: String| TransferError::Config(format!("disagg_spec: {what}"));
        let field = |name: &str| spec.get(name).filter(|v| !v.is_null());
        let (host, init, alloc) = match (
            field("receiver_host"),
            field("receiver_init_port"),
            field("receiver_alloc_port"),
        ) {
            (None, None, None) => return Ok(None),
            (Some(host), Some(init), Some(alloc)) => (host, init, alloc),
            _ => {
                return Err(bad(
                    "receiver_host, receiver_init_port and receiver_alloc_port go together".into(),
                ))
            }
        };
        let host = host
            .as_str()
            .filter(|h| !h.is_empty() && h.len() <= MAX_HOST)
            .ok_or_else(|| {
                bad(format!(
                    "receiver_host must be a host name of 1..={MAX_HOST} bytes"
                ))
            })?;
        let ports = |name: &str, value: &serde_json::Value| -> Result<Vec<u16>, TransferError> {
            // LMCache lists one port per TP rank; a bare number is a list of one.
            let items = match value {
                serde_json::Value::Array(items) => items.as_slice(),
                single => std::slice::from_ref(single),
            };
            if items.is_empty() || items.len() > MAX_RANKS {
                return Err(bad(format!("{name} must list 1..={MAX_RANKS} ports")));
            }
            items
                .iter()
                .map(|p| {
                    p.as_u64()
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|&p| p != 0)
                        .ok_or_else(|| bad(format!("{name}: {p} is not a TCP port")))
                })
                .collect()
        };
        let (init_ports, alloc_ports) = (
            ports("receiver_init_port", init)?,
            ports("receiver_alloc_port", alloc)?,
        );
        if init_ports.len() != alloc_ports.len() {
            return Err(bad(format!(
                "{} init ports but {} alloc ports; each TP rank has one of each",
                init_ports.len(),
                alloc_ports.len()
            )));
        }
        Ok(Some(PdTarget {
            host: host.to_string(),
            init_ports,
            alloc_ports,
        }))
    }

    /// Receiver rank `rank` of this target (rank i sends to rank i).
    pub fn peer(&self, rank: u32) -> Result<PdPeer, TransferError> {
        PdPeer::for_rank(&self.host, &self.init_ports, &self.alloc_ports, rank)
    }
}

/// Where a sender finds receiver rank `rank`: from the proxy's `disagg_spec`
/// ([`PdTarget`]) or the config.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PdPeer {
    pub host: String,
    pub init_port: u16,
    pub alloc_port: u16,
}

impl PdPeer {
    /// Picks rank `rank`'s ports from per-rank lists (rank i sends to rank i).
    pub fn for_rank(
        host: &str,
        init_ports: &[u16],
        alloc_ports: &[u16],
        rank: u32,
    ) -> Result<Self, TransferError> {
        let pick = |ports: &[u16], what: &str| {
            ports.get(rank as usize).copied().ok_or_else(|| {
                TransferError::Config(format!(
                    "{what} lists {} ports; rank {rank} has none (one port per TP rank)",
                    ports.len()
                ))
            })
        };
        Ok(PdPeer {
            host: host.to_string(),
            init_port: pick(init_ports, "pd_peer_init_port")?,
            alloc_port: pick(alloc_ports, "pd_peer_alloc_port")?,
        })
    }

    /// The peer named by `pd_peer_host` and the port lists of `cfg`.
    pub fn from_config(cfg: &PdConfig, rank: u32) -> Result<Self, TransferError> {
        let host = cfg
            .peer_host
            .as_deref()
            .ok_or_else(|| TransferError::Config("pd_peer_host is not set".into()))?;
        Self::for_rank(host, &cfg.init_ports, &cfg.alloc_ports, rank)
    }
}

/// Everything the transfer layer takes from the LMCache config and the KV geometry.
/// Fields are public so an embedding engine (and tests) can adjust them.
#[derive(Clone, Debug)]
pub struct PdConfig {
    pub channel: ChannelKind,
    /// `pd_buffer_size`, bytes; rounded down to whole pages.
    pub buffer_size: u64,
    /// Geometry of a chunk: `spec.chunk_bytes(tokens)` is a chunk's length.
    pub spec: KvCacheSpec,
    /// The engine's cache moves as opaque blocks packed this way (vLLM CPU); `None` for
    /// token-addressable layouts. Decides [`PdConfig::chunk_fingerprint`].
    pub block_packing: Option<crate::layout::BlockPacking>,
    /// `chunk_size`, tokens per full chunk.
    pub chunk_size: usize,
    /// How this engine names chunks; a receiver refuses senders that differ.
    pub keys: KeyDerivation,
    /// A receiver's lookup rule (`skip_last_n_tokens` of the decoder's connector), announced
    /// to senders so they leave out the chunks it never looks up.
    pub skip_last_n_tokens: usize,
    /// `pd_max_prefill_len`: if > 0 the buffer must hold a prefill this long.
    pub max_prefill_len: u64,
    pub peer_host: Option<String>,
    pub init_ports: Vec<u16>,
    pub alloc_ports: Vec<u16>,
    /// `pd_proxy_host:pd_proxy_port`; no notification when unset.
    pub proxy: Option<(String, u16)>,
    pub shared_secret: Option<SecretString>,
    /// `pd_allocation_timeout_sec`: how long admission waits for free pages.
    pub allocation_timeout: Duration,
    /// `pd_buffer_ttl_sec`: how long unconsumed KV (and a grant in progress) may live.
    pub ttl: Duration,
    /// Bound on each handshake step and on connecting.
    pub handshake_timeout: Duration,
    /// Bound on each read or write once a request is under way.
    pub io_timeout: Duration,
    /// Bound on concurrent connections per listening port.
    pub max_connections: usize,
    /// The NPU (logical id) an Ascend channel of this process uses: its TP rank's device.
    pub device: u32,
    /// `pd_backend_mode`: whether a sender's save step waits for the transfer.
    pub backend_mode: PdBackendMode,
}

/// Whether `host` names this machine only (`localhost` or a loopback address): no other
/// machine can reach it, so running without `pd_shared_secret` exposes nothing there.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Waits longer than this are treated as this (LMCache allows `inf`; kvrelay bounds all).
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).map_or(MAX_WAIT, |d| d.min(MAX_WAIT))
}

/// `pd_buffer_device`: where the receiver's PD buffer lives, which the channel decides:
/// NPU pages for the Ascend channels (`npu`, LMCache-Ascend's default), host memory for
/// `tcp` and `shm` (`cpu`). Unset means the channel's own; the other one is refused.
fn check_buffer_device(channel: ChannelKind, device: Option<&str>) -> Result<(), TransferError> {
    let npu_pages = matches!(
        channel,
        ChannelKind::Hccl | ChannelKind::HcommOnesided | ChannelKind::Hixl
    );
    let own = if npu_pages { "npu" } else { "cpu" };
    let asked = device.unwrap_or(own);
    let why = match asked {
        _ if asked == own => return Ok(()),
        "cpu" => "the Ascend channels land KV in registered NPU pages; a host PD buffer is not built for them (use npu)",
        "npu" => "this channel keeps the PD buffer in host memory (npu needs hccl, hcomm_onesided or hixl)",
        _ => "kvrelay's PD buffers live in cpu or npu memory",
    };
    Err(TransferError::Config(format!(
        "pd_buffer_device {asked:?} with transfer_channel {}: {why}",
        channel.as_str()
    )))
}

impl PdConfig {
    /// The layout fingerprint every chunk sent or received must carry: `spec`'s, or with
    /// `block_packing` the opaque-block layout's
    /// ([`crate::layout::KvLayout::chunk_fingerprint`] of the engine's cache).
    pub fn chunk_fingerprint(&self) -> u64 {
        match self.block_packing {
            Some(packing) => crate::layout::opaque_blocks_fingerprint(&self.spec, packing),
            None => self.spec.chunk_fingerprint(),
        }
    }

    /// Reads the `pd_*` keys, `transfer_channel` and `chunk_size` of a validated config;
    /// `keys` is how this engine derives chunk keys (its chunk size and dtype must be the
    /// config's and `spec`'s). `skip_last_n_tokens` starts at 0 (a sender's value is unused).
    pub fn from_lmcache(
        cfg: &LmcacheConfig,
        spec: &KvCacheSpec,
        keys: KeyDerivation,
    ) -> Result<Self, TransferError> {
        spec.validate()
            .map_err(|e| TransferError::Config(e.to_string()))?;
        let channel = match cfg.transfer_channel.as_deref() {
            Some("tcp") => ChannelKind::Tcp,
            Some("shm") => ChannelKind::Shm,
            #[cfg(feature = "ascend")]
            Some("hccl") => ChannelKind::Hccl,
            #[cfg(feature = "ascend")]
            Some("hcomm_onesided") => ChannelKind::HcommOnesided,
            #[cfg(feature = "ascend")]
            Some("hixl") => ChannelKind::Hixl,
            Some(other) => return Err(TransferError::UnsupportedChannel(other.to_string())),
            None => return Err(TransferError::Config("transfer_channel is not set".into())),
        };
        check_buffer_device(channel, cfg.pd_buffer_device.as_deref())?;
        let buffer_size = cfg
            .pd_buffer_size
            .ok_or_else(|| TransferError::Config("pd_buffer_size is not set".into()))?;
        if cfg.chunk_size == 0 {
            return Err(TransferError::Config("chunk_size must be > 0".into()));
        }
        if keys.chunk_size as usize != cfg.chunk_size || keys.dtype != spec.dtype {
            return Err(TransferError::Config(format!(
                "keys are derived for chunk_size {} and dtype {}, but the config has chunk_size {} and the KV cache dtype {}",
                keys.chunk_size, keys.dtype, cfg.chunk_size, spec.dtype
            )));
        }
        let proxy = cfg.pd_proxy_host.clone().zip(cfg.pd_proxy_port);
        Ok(PdConfig {
            channel,
            buffer_size,
            spec: *spec,
            block_packing: None,
            chunk_size: cfg.chunk_size,
            keys,
            skip_last_n_tokens: 0,
            max_prefill_len: cfg.pd_max_prefill_len,
            peer_host: cfg.pd_peer_host.clone(),
            init_ports: cfg.pd_peer_init_port.clone().unwrap_or_default(),
            alloc_ports: cfg.pd_peer_alloc_port.clone().unwrap_or_default(),
            proxy,
            shared_secret: cfg.pd_shared_secret.clone(),
            allocation_timeout: seconds(cfg.pd_allocation_timeout_sec),
            ttl: seconds(cfg.pd_buffer_ttl_sec),
            handshake_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            max_connections: 64,
            device: 0,
            backend_mode: cfg.pd_backend_mode,
        })
    }

    /// Bytes of one full chunk: the page size of the PD buffer.
    pub fn page_size(&self) -> usize {
        self.spec.chunk_bytes(self.chunk_size)
    }

    fn secret(&self) -> Option<&[u8]> {
        self.shared_secret.as_ref().map(SecretString::expose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target(params: serde_json::Value) -> Result<Option<PdTarget>, TransferError> {
        PdTarget::from_kv_transfer_params(Some(&params))
    }

    #[test]
    fn a_disagg_spec_names_the_receiver_or_nothing() {
        assert_eq!(PdTarget::from_kv_transfer_params(None).unwrap(), None);
        assert_eq!(target(json!({"ret_first_tok": true})).unwrap(), None);
        assert_eq!(
            target(json!({"disagg_spec": {"req_id": "r"}})).unwrap(),
            None
        );
        let full = target(json!({"disagg_spec": {"req_id": "r", "receiver_host": "d1",
            "receiver_init_port": [7300, 7301], "receiver_alloc_port": [7400, 7401]}}))
        .unwrap()
        .unwrap();
        assert_eq!(
            full.peer(1).unwrap(),
            PdPeer {
                host: "d1".into(),
                init_port: 7301,
                alloc_port: 7401,
            }
        );
        assert!(full.peer(2).is_err());
        // A bare port is a list of one.
        let single = target(json!({"disagg_spec": {"receiver_host": "d",
            "receiver_init_port": 7300, "receiver_alloc_port": 7400}}))
        .unwrap()
        .unwrap();
        assert_eq!(single.init_ports, vec![7300]);
    }

    #[test]
    fn only_loopback_hosts_count_as_local() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.3.2.1",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "0.0.0.0",
            "::",
            "10.0.0.7",
            "decoder-1",
            "localhost.example.com",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn a_malformed_disagg_spec_is_an_error() {
        for (spec, needle) in [
            (json!({"receiver_host": "d"}), "go together"),
            (
                json!({"receiver_host": "", "receiver_init_port": [1], "receiver_alloc_port": [2]}),
                "receiver_host",
            ),
            (
                json!({"receiver_host": "d", "receiver_init_port": [70000], "receiver_alloc_port": [2]}),
                "not a TCP port",
            ),
            (
                json!({"receiver_host": "d", "receiver_init_port": ["x"], "receiver_alloc_port": [2]}),
                "not a TCP port",
            ),
            (
                json!({"receiver_host": "d", "receiver_init_port": [], "receiver_alloc_port": []}),
                "1..=",
            ),
            (
                json!({"receiver_host": "d", "receiver_init_port": [1, 2], "receiver_alloc_port": [3]}),
                "2 init ports but 1",
            ),
        ] {
            let err = target(json!({ "disagg_spec": spec }))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }
}

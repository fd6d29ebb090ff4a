//! The [`Channel`] trait: how a sender moves chunk bytes into the pages a receiver granted,
//! and its receiver-side counterpart [`ChannelServer`]: the PD buffer's memory, the
//! parameters `Welcome` carries to the sender, and the work a grant or a seal needs.
//!
//! Adding a transport is one file with both halves and one arm in [`server`] and
//! [`connect`]; the receiver's and sender's protocol code does not change.
//!
//! The control conversation (handshake, alloc, seal, commit) always runs over the alloc-port
//! TCP connection; a channel only moves payload bytes, addressed by a [`Put`]: the byte
//! offset in the receiver's PD buffer (`page * page_size + offset in chunk`), already
//! checked by the sender against the grant and the buffer size. After the puts of a chunk
//! the sender calls [`Channel::fence`], then sends `Seal`, which is the notification that
//! the bytes are in place.
//!
//! How each transport maps onto it:
//!
//! - **tcp** (two-sided, in band): `put` writes a `Data` frame (header + payload, in
//!   writes of 1 MiB from the sender's staging buffer) on the control connection; the receiver
//!   checks the header against the grant and `read`s the payload straight into the page.
//!   `fence` has nothing to do: the stream is ordered.
//! - **shm** (one-sided, same host): the receiver's PD buffer is a shared mapping the sender
//!   mapped at handshake; `put` is a streaming copy to `base + remote_offset`, a release
//!   fence, and a `Landed` frame naming the bytes on the control connection, so the
//!   receiver hashes them while the sender copies the next put; `fence` has nothing left
//!   to do.
//! - **HCCL one-sided (`HcclBatchPut`, hcomm_onesided, built)**: `Welcome` carries a
//!   2-rank rank table, a comm name and the registered PD buffer's device address; `put`
//!   stages the piece in registered device memory and appends an `HcclOneSideOpDesc{local
//!   = staging, remote = remote_base + remote_offset, count = len, UINT8}`; `fence` issues
//!   the batch with `HcclBatchPut(comm, remote_rank, descs, n, stream)` and synchronizes
//!   the stream; `Seal` then notifies (see `hcomm_onesided.rs`).
//! - **HCCL two-sided (`HcclSend`/`HcclRecv`, hccl, built)**: `put` stages the piece in
//!   device memory; `fence` is one `HcclSend(staging, chunk len, UINT8, peer, comm,
//!   stream)` and a stream synchronize. The receiver, before sending `AllocGrant`, posts
//!   one `HcclRecv` per granted chunk into its page in chunk order (sends and receives pair
//!   in order), and synchronizes its stream at the grant's first `Seal` (see `hccl.rs`).
//! - **HIXL (hixl, built)**: like one-sided, over the HIXL C API: `Welcome` carries the
//!   receiver's HIXL server address and PD buffer address; `put` stages the piece and
//!   appends a `HixlOneSideOpDesc{remote = remote_base + remote_offset, local = staging,
//!   len}`; `fence` runs `HixlCSClientBatchPutSync` (or `HixlCSClientBatchPutAsync` +
//!   `HixlCSClientQueryCompleteStatus` until a deadline) (see `hixl.rs`).
//!
//! Channels never hash: the `Seal`'s checksum is computed once when the chunk is gathered
//! (for device-memory staging that can be a device-computed one), and the receiver
//! verifies what landed.

use std::net::TcpStream;
use std::ptr::NonNull;

use super::buffer::PageMemory;
use super::frame::{ChannelKind, MAX_DATA_PAYLOAD};
use super::shm::{PulledBytes, ShmChannel, ShmServer};
use super::tcp::{TcpChannel, TcpServer};
use super::{PdConfig, TransferError};

/// The most bytes one [`Channel::put`] moves: a tcp `Data` frame's payload bound. Chunks
/// are moved in puts this large so that per-put costs (a frame header, a system call, a
/// descriptor) vanish against the copy.
pub const MAX_PUT: usize = MAX_DATA_PAYLOAD as usize;

/// Where one piece of a chunk goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Put {
    pub grant: u32,
    pub chunk: u32,
    /// Offset of the piece inside its chunk.
    pub chunk_offset: u64,
    /// Offset of the piece in the receiver's PD buffer.
    pub remote_offset: u64,
}

/// A sender-side data mover for one session (see the module documentation). A channel
/// that moves bytes in band keeps its own handle on the control connection.
pub trait Channel: Send {
    fn kind(&self) -> ChannelKind;

    /// Starts moving `src` (at most [`MAX_PUT`] bytes) to the receiver's memory at `dst`.
    /// The bytes are in place once [`Channel::fence`] returns; `src` must not change before
    /// then.
    fn put(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError>;

    /// Moves `src`, a chunk's bytes from `dst` on (the whole chunk from its offset 0, or a
    /// piece of it), in puts of at most [`MAX_PUT`] bytes.
    fn put_chunk(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError> {
        for (k, piece) in src.chunks(MAX_PUT).enumerate() {
            let offset = (k * MAX_PUT) as u64;
            let at = Put {
                chunk_offset: dst.chunk_offset + offset,
                remote_offset: dst.remote_offset + offset,
                ..dst
            };
            self.put(at, piece)?;
        }
        Ok(())
    }

    /// Waits until every put so far has landed in the receiver's memory.
    fn fence(&mut self) -> Result<(), TransferError>;
}

/// How the receiver learns what landed in a page, which decides where its checksum comes
/// from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Landed {
    /// The bytes arrive in `Data` frames on the control connection (tcp): the receiver
    /// reads them into the page and its verify thread hashes each read's bytes right after
    /// (see `verify.rs`).
    InFrames,
    /// The channel writes the page itself and says so in `Landed` frames (shm): the
    /// receiver's verify thread hashes each announced range's bytes, as for `InFrames`.
    Announced,
    /// The channel writes the page itself (HCCL, HIXL): once [`ServerSession::landed`]
    /// returns, the receiver hashes the page.
    #[cfg(feature = "ascend")]
    InPage,
}

/// One granted chunk as a receiving channel sees it: where its page starts in the PD
/// buffer's memory and how many bytes the sender declared.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GrantedChunk {
    pub page: NonNull<u8>,
    pub len: usize,
}

/// The receiver side of a transport, one per [`PdReceiver`](super::PdReceiver).
pub(crate) trait ChannelServer: Send + Sync {
    fn landing(&self) -> Landed;

    /// Allocates the PD buffer's memory, once, at bind: memory this channel can write
    /// into (shm: a shared mapping). It lives as long as the receiver.
    fn memory(&mut self, len: usize) -> Result<Box<dyn PageMemory>, TransferError>;

    /// Starts one sender's session at its handshake: the parameters `Welcome` carries (see
    /// [`ChannelParams`]) and the receiving end its alloc connection will use.
    fn open(&self) -> Result<(Vec<u8>, Box<dyn ServerSession>), TransferError>;
}

/// The receiving end of one sender's session (see [`ChannelServer::open`]).
pub(crate) trait ServerSession: Send {
    /// The sender attached on the alloc port (a two-sided channel joins its peer here).
    fn attach(&mut self) -> Result<(), TransferError> {
        Ok(())
    }

    /// Pages were granted to a request, chunk `i` into `chunks[i]`; called before the
    /// grant is sent (a two-sided channel posts its receives here, in chunk order).
    fn on_grant(&mut self, _chunks: &[GrantedChunk]) -> Result<(), TransferError> {
        Ok(())
    }

    /// The sender sealed chunk `chunk` of the current grant: returns once its bytes are
    /// in the page (for [`Landed::InPage`]) or fails if they never will be.
    fn landed(&mut self, _chunk: usize) -> Result<(), TransferError> {
        Ok(())
    }

    /// `len` bytes at `offset` of the staging file `path` a sender named in a `Pull` (shm
    /// only: other channels refuse it).
    fn source(
        &mut self,
        path: &str,
        _offset: u64,
        _len: usize,
    ) -> Result<PulledBytes, TransferError> {
        Err(TransferError::Protocol(format!(
            "this channel does not pull from sender staging ({path:?})"
        )))
    }

    /// The current request failed after its grant: stop every pending write into its
    /// pages, which are freed right after this returns.
    fn abandon(&mut self) {}
}

/// The session of a channel that needs no per-session work (tcp, shm).
pub(crate) struct Passive;

impl ServerSession for Passive {}

/// The receiver side of `config.channel` for TP rank `rank`.
pub(crate) fn server(
    config: &PdConfig,
    rank: u32,
) -> Result<Box<dyn ChannelServer>, TransferError> {
    Ok(match config.channel {
        ChannelKind::Tcp => Box::new(TcpServer),
        ChannelKind::Shm => Box::new(ShmServer::new(rank)),
        #[cfg(feature = "ascend")]
        ChannelKind::Hccl => Box::new(super::hccl::HcclServer::new(config)?),
        #[cfg(feature = "ascend")]
        ChannelKind::HcommOnesided => Box::new(super::hcomm_onesided::OneSidedServer::new(config)?),
        #[cfg(feature = "ascend")]
        ChannelKind::Hixl => Box::new(super::hixl::HixlServerSide::new(config)?),
        #[cfg(not(feature = "ascend"))]
        kind @ (ChannelKind::Hccl | ChannelKind::HcommOnesided | ChannelKind::Hixl) => {
            return Err(TransferError::UnsupportedChannel(kind.as_str().into()))
        }
    })
}

/// Checks, before a sender's handshake, that this process can run `config.channel`.
pub(crate) fn preflight(config: &PdConfig) -> Result<(), TransferError> {
    match config.channel {
        #[cfg(feature = "ascend")]
        ChannelKind::Hccl => super::npu::check(super::hccl::NEED).map(drop),
        #[cfg(feature = "ascend")]
        ChannelKind::HcommOnesided => super::npu::check(super::hcomm_onesided::NEED).map(drop),
        #[cfg(feature = "ascend")]
        ChannelKind::Hixl => super::npu::check(super::hixl::NEED).map(drop),
        _ => Ok(()),
    }
}

/// The sender side of `config.channel`, opened from the receiver's `Welcome` parameters once the
/// sender attached on `control`, for a PD buffer of `buffer_len` bytes.
pub(crate) fn connect(
    config: &PdConfig,
    params: &[u8],
    control: &TcpStream,
    buffer_len: u64,
) -> Result<Box<dyn Channel>, TransferError> {
    let kind = config.channel;
    Ok(match kind {
        ChannelKind::Tcp => {
            ChannelParams::read(kind, params)?.end()?;
            Box::new(TcpChannel::new(control)?)
        }
        ChannelKind::Shm => Box::new(ShmChannel::from_params(params, buffer_len, control)?),
        #[cfg(feature = "ascend")]
        ChannelKind::Hccl => Box::new(super::hccl::HcclChannel::connect(config, params)?),
        #[cfg(feature = "ascend")]
        ChannelKind::HcommOnesided => Box::new(super::hcomm_onesided::OneSidedChannel::connect(
            config, params,
        )?),
        #[cfg(feature = "ascend")]
        ChannelKind::Hixl => Box::new(super::hixl::HixlChannel::connect(config, params)?),
        #[cfg(not(feature = "ascend"))]
        kind @ (ChannelKind::Hccl | ChannelKind::HcommOnesided | ChannelKind::Hixl) => {
            return Err(TransferError::UnsupportedChannel(kind.as_str().into()))
        }
    })
}

/// `Welcome`'s channel parameters: one version byte per channel ([`ChannelParams::VERSION`]),
/// then fields in the frame encoding (little-endian integers, u16-length byte strings).
/// A sender refuses parameters of another version by name instead of misreading them.
pub(crate) struct ChannelParams<'a> {
    kind: ChannelKind,
    buf: &'a [u8],
}

impl<'a> ChannelParams<'a> {
    pub const VERSION: u8 = 1;

    /// Encodes the version byte and then whatever `fields` appends.
    pub fn write(fields: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = vec![Self::VERSION];
        fields(&mut out);
        out
    }

    pub fn put_u64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// Callers bound `b` below u16::MAX (the whole blob is bounded by `MAX_CHANNEL_PARAMS`).
    pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(b);
    }

    pub fn read(kind: ChannelKind, buf: &'a [u8]) -> Result<Self, TransferError> {
        match buf.split_first() {
            Some((&Self::VERSION, rest)) => Ok(ChannelParams { kind, buf: rest }),
            Some((v, _)) => Err(Self::bad_in(
                kind,
                format!("version {v}, this sender reads {}", Self::VERSION),
            )),
            None => Err(Self::bad_in(kind, "empty".into())),
        }
    }

    fn bad_in(kind: ChannelKind, reason: String) -> TransferError {
        TransferError::Protocol(format!(
            "{} channel parameters in Welcome: {reason}",
            kind.as_str()
        ))
    }

    fn take(&mut self, field: &str, n: usize) -> Result<&'a [u8], TransferError> {
        if self.buf.len() < n {
            return Err(Self::bad_in(self.kind, format!("{field} truncated")));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u64(&mut self, field: &str) -> Result<u64, TransferError> {
        let mut v = [0u8; 8];
        v.copy_from_slice(self.take(field, 8)?);
        Ok(u64::from_le_bytes(v))
    }

    pub fn bytes(&mut self, field: &str) -> Result<&'a [u8], TransferError> {
        let len = self.take(field, 2)?;
        let len = u16::from_le_bytes([len[0], len[1]]) as usize;
        self.take(field, len)
    }

    /// Checks that nothing follows the fields read.
    pub fn end(self) -> Result<(), TransferError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Self::bad_in(
                self.kind,
                format!("{} trailing bytes", self.buf.len()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_and_other_versions_are_refused_by_name() {
        let blob = ChannelParams::write(|out| {
            ChannelParams::put_bytes(out, b"/dev/shm/x");
            ChannelParams::put_u64(out, 4096);
        });
        let mut p = ChannelParams::read(ChannelKind::Shm, &blob).unwrap();
        assert_eq!(p.bytes("path").unwrap(), b"/dev/shm/x");
        assert_eq!(p.u64("length").unwrap(), 4096);
        p.end().unwrap();

        let mut newer = blob.clone();
        newer[0] = ChannelParams::VERSION + 1;
        let err = ChannelParams::read(ChannelKind::Shm, &newer).err().unwrap();
        assert!(
            err.to_string()
                .contains("shm channel parameters in Welcome: version 2, this sender reads 1"),
            "{err}"
        );

        let mut p = ChannelParams::read(ChannelKind::Shm, &blob[..blob.len() - 1]).unwrap();
        p.bytes("path").unwrap();
        assert!(p.u64("length").is_err());
        let p = ChannelParams::read(ChannelKind::Tcp, &blob).unwrap();
        assert!(p.end().err().unwrap().to_string().contains("trailing"));
    }
}

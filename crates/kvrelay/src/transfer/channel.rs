//! The [`Channel`] trait: how a sender moves chunk bytes into the pages a receiver granted.
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
//! - **tcp** (two-sided, in band): `put` writes a `Data` frame (header + payload, one
//!   `writev` from the sender's staging buffer) on the control connection; the receiver
//!   checks the header against the grant and `read`s the payload straight into the page.
//!   `fence` has nothing to do: the stream is ordered.
//! - **shm** (one-sided, same host): the receiver's PD buffer is a shared mapping the sender
//!   mapped at handshake; `put` is a memcpy to `base + remote_offset`, `fence` a release
//!   fence before the `Seal` frame.
//! - **HCCL one-sided (`HcclBatchPut`, hcomm_onesided)**: the handshake exchanges the
//!   registered buffer's base address (as `PeerBufferInfo` does); `put` appends an
//!   `HcclOneSideOpDesc{local = src, remote = remote_base + remote_offset, count = len,
//!   UINT8}`; `fence` issues the batch with `HcclBatchPut(comm, remote_rank, descs, n,
//!   stream)`, adds the op fence and synchronizes the stream; `Seal` then notifies.
//! - **HCCL two-sided (`HcclSend`/`HcclRecv`, hccl)**: `put` is `HcclSend(src, len,
//!   UINT8, peer, comm, stream)`; the receiver, on sending `AllocGrant`, posts one
//!   `HcclRecv` per granted chunk into its page in chunk order (sends and receives pair in
//!   order), and waits for its stream when the `Seal` arrives; `fence` synchronizes the
//!   send stream.
//! - **HIXL**: like one-sided: `put` appends a `TransferOpDesc{local_addr, remote_addr =
//!   remote_base + remote_offset, len}`; `fence` runs `TransferSync(remote_engine, WRITE,
//!   descs, timeout)` (or `TransferAsync` + `GetTransferStatus` until `COMPLETED`).
//!
//! Device-memory sources (NPU staging) cannot be hashed on the host; those channels will
//! carry a device-computed checksum in `Seal` instead.

use std::net::TcpStream;

use super::frame::{ChannelKind, ChunkHasher};
use super::TransferError;

/// Bytes per put: large enough that per-frame costs vanish, small enough that the sender
/// (before the put) and the tcp receiver (after its `read`) hash each segment while it is in
/// their cache.
pub const SEGMENT: usize = 256 << 10;

/// Where one segment of a chunk goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Put {
    pub grant: u32,
    pub chunk: u32,
    /// Offset of the segment inside its chunk.
    pub chunk_offset: u64,
    /// Offset of the segment in the receiver's PD buffer.
    pub remote_offset: u64,
}

/// A sender-side data mover for one session (see the module documentation).
pub trait Channel: Send {
    fn kind(&self) -> ChannelKind;

    /// Starts moving `src` to the receiver's memory at `dst`. The bytes are in place once
    /// [`Channel::fence`] returns; `src` must not change before then.
    fn put(&mut self, control: &mut TcpStream, dst: Put, src: &[u8]) -> Result<(), TransferError>;

    /// Moves a whole chunk, starting at `dst` (offset 0 of the chunk), in [`SEGMENT`]-byte
    /// puts, and returns its checksum ([`super::frame::checksum`]) for the `Seal`. Each
    /// segment is hashed right before it is put, so the put finds it in this core's cache
    /// and the source is read from memory once. (Hashing after the put, so that the put
    /// reads cold memory, measured worse for tcp: the kernel's copy of cold user pages
    /// cost more than the AVX2 hash's cold read and the hot copy together.)
    fn put_chunk(
        &mut self,
        control: &mut TcpStream,
        dst: Put,
        src: &[u8],
    ) -> Result<u64, TransferError> {
        let mut hasher = ChunkHasher::new();
        for (k, segment) in src.chunks(SEGMENT).enumerate() {
            let offset = (k * SEGMENT) as u64;
            let at = Put {
                chunk_offset: dst.chunk_offset + offset,
                remote_offset: dst.remote_offset + offset,
                ..dst
            };
            hasher.update(segment);
            self.put(control, at, segment)?;
        }
        Ok(hasher.digest())
    }

    /// Waits until every put so far has landed in the receiver's memory.
    fn fence(&mut self, control: &mut TcpStream) -> Result<(), TransferError>;
}

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
//! Channels never hash: the `Seal`'s checksum is computed once when the chunk is gathered
//! (for device-memory staging that can be a device-computed one), and the receiver
//! verifies what landed.

use std::net::TcpStream;

use super::frame::{ChannelKind, MAX_DATA_PAYLOAD};
use super::TransferError;

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

/// A sender-side data mover for one session (see the module documentation).
pub trait Channel: Send {
    fn kind(&self) -> ChannelKind;

    /// Starts moving `src` (at most [`MAX_PUT`] bytes) to the receiver's memory at `dst`.
    /// The bytes are in place once [`Channel::fence`] returns; `src` must not change before
    /// then.
    fn put(&mut self, control: &mut TcpStream, dst: Put, src: &[u8]) -> Result<(), TransferError>;

    /// Moves a whole chunk, starting at `dst` (offset 0 of the chunk), in puts of at most
    /// [`MAX_PUT`] bytes.
    fn put_chunk(
        &mut self,
        control: &mut TcpStream,
        dst: Put,
        src: &[u8],
    ) -> Result<(), TransferError> {
        for (k, piece) in src.chunks(MAX_PUT).enumerate() {
            let offset = (k * MAX_PUT) as u64;
            let at = Put {
                chunk_offset: dst.chunk_offset + offset,
                remote_offset: dst.remote_offset + offset,
                ..dst
            };
            self.put(control, at, piece)?;
        }
        Ok(())
    }

    /// Waits until every put so far has landed in the receiver's memory.
    fn fence(&mut self, control: &mut TcpStream) -> Result<(), TransferError>;
}

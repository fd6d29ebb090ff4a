//! What the Ascend PD channels (`hccl`, `hcomm_onesided`) share: the checked runtime, the
//! receiver's PD buffer on the NPU with its host copy, a grant's pages and the copy that
//! lets the receiver hash what landed, and the sender's device staging page.
//!
//! **Verification.** A channel lands a chunk in its device page; at `Seal` the receiver
//! copies that page device-to-host into the host copy and hashes it there (xxh3 on the
//! CPU): one extra D2H copy per chunk, a cost of the chunk's bytes over the D2H bandwidth
//! plus the hash. The PD buffer hands out the host copy together with the device page
//! ([`crate::device::DevicePage`]), so a decoder whose KV is on the same NPU loads from the
//! page device to device, and any other consumer uses the host copy.

use std::ptr::NonNull;
use std::sync::Arc;

use ascend_sys::{Acl, Capabilities, CommConfigV8, DeviceBuffer, Feature, Hccl, HcclError, Stream};

use super::buffer::{HostPages, PageMemory};
use super::channel::{GrantedChunk, Put};
use super::{PdConfig, TransferError};

/// The receiver's rank in every session's communicator; the sender is the other one.
pub(super) const RECEIVER_RANK: u32 = 0;
pub(super) const SENDER_RANK: u32 = 1;

pub(super) fn acl_error(what: &'static str) -> impl FnOnce(ascend_sys::AclError) -> TransferError {
    move |source| TransferError::Acl { what, source }
}

pub(super) fn hccl_error(what: &'static str) -> impl FnOnce(HcclError) -> TransferError {
    move |source| TransferError::Hccl { what, source }
}

/// Which Ascend channel, for its capability check and messages.
#[derive(Clone, Copy)]
pub(super) struct Need {
    pub channel: &'static str,
    pub feature: fn(&Capabilities) -> &Feature,
}

/// The ACL runtime, if this CANN can run the channel; otherwise why not (naming the
/// version found and needed). A sender checks before its handshake, so a receiver never
/// waits for a peer that cannot join.
pub(super) fn check(need: Need) -> Result<Arc<Acl>, TransferError> {
    let acl = Acl::global()
        .map_err(|e| TransferError::Config(format!("transfer_channel {}: {e}", need.channel)))?;
    (need.feature)(&Capabilities::probe(&acl))
        .require()
        .map_err(|source| TransferError::ChannelUnsupported {
            channel: need.channel,
            source,
        })?;
    Ok(acl)
}

/// The ACL runtime and HCCL, after checking that this CANN can run the channel; the
/// calling thread is bound to `device`.
pub(super) struct Runtime {
    pub acl: Arc<Acl>,
    pub hccl: Arc<Hccl>,
    device: u32,
    /// The communicator's execution timeout and the one-sided prepare timeout: the PD
    /// io timeout, in whole seconds.
    pub timeout_s: i32,
}

impl Runtime {
    pub fn open(config: &PdConfig, need: Need) -> Result<Self, TransferError> {
        let acl = check(need)?;
        let hccl = Hccl::load().map_err(|e| {
            TransferError::Config(format!("transfer_channel {}: {e}", need.channel))
        })?;
        let runtime = Runtime {
            acl,
            hccl,
            device: config.device,
            timeout_s: i32::try_from(config.io_timeout.as_secs().max(1)).unwrap_or(i32::MAX),
        };
        runtime.bind()?;
        Ok(runtime)
    }

    pub fn device(&self) -> u32 {
        self.device
    }

    /// Binds the calling thread to the device (ACL calls need it; connection threads
    /// change).
    pub fn bind(&self) -> Result<(), TransferError> {
        self.acl
            .set_device(self.device)
            .map_err(acl_error("binding the PD channel's thread to its NPU"))
    }

    pub fn config(&self) -> CommConfigV8 {
        let mut config = CommConfigV8::new();
        config.0.hcclExecTimeOut = self.timeout_s;
        config
    }

    pub fn stream(&self) -> Result<Stream, TransferError> {
        Stream::new(&self.acl).map_err(acl_error("creating the PD channel's stream"))
    }
}

/// The PD buffer's memory on an NPU receiver: the host copy the PD buffer manages, page for
/// page, and the device memory the pages land in, which it keeps alive as long as the PD
/// buffer (and any chunk taken from it) lives.
struct NpuHostCopy {
    host: HostPages,
    device: Arc<DeviceBuffer>,
    ordinal: u32,
}

impl PageMemory for NpuHostCopy {
    fn base(&self) -> NonNull<u8> {
        self.host.base()
    }
    fn len(&self) -> usize {
        self.host.len()
    }
    fn device(&self) -> Option<(u32, u64)> {
        Some((self.ordinal, self.device.addr()))
    }
}

/// The receiver's PD buffer in device memory, once [`NpuPages::allocate`] made it; the PD
/// buffer itself is its host copy, at `host_base`, page for page.
#[derive(Default)]
pub(super) struct NpuPages {
    device: Option<Arc<DeviceBuffer>>,
    host_base: usize,
}

impl NpuPages {
    /// Allocates the device buffer (once, for the receiver's lifetime) and its host copy,
    /// which it returns as the PD buffer's memory.
    pub fn allocate(
        &mut self,
        runtime: &Runtime,
        len: usize,
    ) -> Result<(Arc<DeviceBuffer>, Box<dyn PageMemory>), TransferError> {
        runtime.bind()?;
        let device = Arc::new(
            DeviceBuffer::new(&runtime.acl, len)
                .map_err(acl_error("allocating the PD buffer on the NPU"))?,
        );
        let host = HostPages::new(len)?;
        self.host_base = host.base().as_ptr() as usize;
        self.device = Some(Arc::clone(&device));
        let memory = NpuHostCopy {
            host,
            device: Arc::clone(&device),
            ordinal: runtime.device(),
        };
        Ok((device, Box::new(memory)))
    }

    /// A session's view of the pages.
    pub fn grant(&self, channel: &str) -> Result<Grant, TransferError> {
        let device = self.device.clone().ok_or_else(|| {
            TransferError::Config(format!("{channel} PD buffer not allocated yet"))
        })?;
        Ok(Grant {
            device,
            host_base: self.host_base,
            chunks: Vec::new(),
        })
    }
}

/// The chunks of a session's current grant, as (offset in the PD buffer, length).
pub(super) struct Grant {
    device: Arc<DeviceBuffer>,
    host_base: usize,
    chunks: Vec<(usize, usize)>,
}

impl Grant {
    pub fn set(&mut self, chunks: &[GrantedChunk]) {
        self.chunks = chunks
            .iter()
            .map(|c| (c.page.as_ptr() as usize - self.host_base, c.len))
            .collect();
    }

    /// The PD buffer's device address.
    pub fn base(&self) -> u64 {
        self.device.addr()
    }

    pub fn clear(&mut self) {
        self.chunks.clear();
    }

    /// Device addresses and lengths of the granted pages, in chunk order.
    pub fn pages(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.chunks
            .iter()
            .map(|&(offset, len)| (self.device.addr() + offset as u64, len))
    }

    /// Copies chunk `chunk`'s landed page to its host copy, for the receiver's checksum.
    pub fn land(&self, chunk: usize) -> Result<(), TransferError> {
        let &(offset, len) = self.chunks.get(chunk).ok_or_else(|| {
            TransferError::Protocol(format!("Seal of chunk {chunk} outside the grant"))
        })?;
        // SAFETY: the host copy is the PD buffer's memory; this page is granted to the
        // request being served, which nothing else reads until it is committed.
        let host =
            unsafe { std::slice::from_raw_parts_mut((self.host_base + offset) as *mut u8, len) };
        self.device.read(offset, host).map_err(acl_error(
            "copying a landed page to the host for its checksum",
        ))
    }
}

/// The sender's device staging page (one chunk), filled in order by puts.
pub(super) struct Staging {
    pub buffer: Arc<DeviceBuffer>,
    /// Bytes of the current chunk staged so far.
    pub filled: usize,
}

impl Staging {
    pub fn new(runtime: &Runtime, config: &PdConfig) -> Result<Self, TransferError> {
        let buffer = DeviceBuffer::new(&runtime.acl, config.page_size())
            .map_err(acl_error("allocating the PD channel's device staging"))?;
        Ok(Staging {
            buffer: Arc::new(buffer),
            filled: 0,
        })
    }

    /// Copies `src` to the staging page at `dst.chunk_offset`, which must follow what was
    /// staged so far; returns the device address it went to.
    pub fn put(
        &mut self,
        runtime: &Runtime,
        channel: &str,
        dst: Put,
        src: &[u8],
    ) -> Result<u64, TransferError> {
        if dst.chunk_offset != self.filled as u64 {
            return Err(TransferError::Protocol(format!(
                "{channel} puts a chunk in order: piece at {} after {} bytes",
                dst.chunk_offset, self.filled
            )));
        }
        runtime.bind()?;
        self.buffer
            .write(self.filled, src)
            .map_err(acl_error("staging a chunk on the NPU"))?;
        let at = self.buffer.addr() + self.filled as u64;
        self.filled += src.len();
        Ok(at)
    }
}

/// A one-sided sender's chunk in flight: its staging page and one `(local, remote, len)`
/// copy per put since the last fence, remote addresses in the receiver's PD buffer.
pub(super) struct PutBatch {
    pub staging: Staging,
    copies: Vec<(u64, u64, usize)>,
    remote_base: u64,
}

impl PutBatch {
    pub fn new(staging: Staging, remote_base: u64) -> Self {
        PutBatch {
            staging,
            copies: Vec::new(),
            remote_base,
        }
    }

    /// Stages `src` and records its copy.
    pub fn put(
        &mut self,
        runtime: &Runtime,
        channel: &str,
        dst: Put,
        src: &[u8],
    ) -> Result<(), TransferError> {
        let local = self.staging.put(runtime, channel, dst, src)?;
        self.copies
            .push((local, self.remote_base + dst.remote_offset, src.len()));
        Ok(())
    }

    /// The copies to issue at a fence (the staging page is reused after it).
    pub fn take(&mut self) -> Vec<(u64, u64, usize)> {
        self.staging.filled = 0;
        std::mem::take(&mut self.copies)
    }
}

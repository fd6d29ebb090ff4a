//! The `hccl` channel (feature `ascend`): two-sided `HcclSend`/`HcclRecv` on a 2-rank
//! communicator per session, bootstrapped from a root info the receiver makes.
//!
//! - **Receiver (rank 0, the root).** At bind it allocates the PD buffer in device memory,
//!   once for its lifetime, plus a host copy of the same size that the PD buffer hands out
//!   (see "Verification"). At each handshake it makes a root info (`HcclGetRootInfo`),
//!   which `Welcome` carries; when the sender attaches it joins the communicator (both
//!   sides block until both joined, bounded by `HCCL_CONNECT_TIMEOUT`). On a grant it posts
//!   one `HcclRecv` per chunk into the chunk's device page, in chunk order, on the
//!   session's stream. At the first `Seal` of a grant it synchronizes that stream (every
//!   receive of the grant has landed then; later seals find them done).
//! - **Sender (rank 1).** It joins with the root info after attaching; `put` copies the
//!   piece from host staging into a device staging page (one chunk), `fence` issues one
//!   `HcclSend` of the whole chunk, which pairs with the receiver's `HcclRecv` for it, and
//!   synchronizes the stream.
//! - **Verification.** After the stream synchronize, the receiver copies each landed page
//!   device-to-host into the host copy and hashes that (xxh3 on the CPU): the checksum is
//!   computed on the host side of one extra D2H copy per chunk, a cost of the chunk's bytes
//!   over the D2H bandwidth plus the hash.
//! - **Failures.** Every wait is bounded: the communicator's execution timeout is
//!   `pd_*` io timeout (`hcclExecTimeOut`). A receive or send that fails (peer died, timed
//!   out) fails the request on that side; the receiver destroys the session's communicator
//!   (which ends its pending receives) before the request's pages are freed.
//!
//! Refused at bind and at connect, naming the version found and needed, when
//! [`Capabilities`] says this CANN cannot do it.

use std::ffi::c_void;
use std::sync::Arc;

use ascend_sys::{
    Acl, Capabilities, Comm, CommConfigV8, DeviceBuffer, Hccl, HcclError, RootInfo, Stream,
};

use super::buffer::{HostPages, PageMemory};
use super::channel::{
    Channel, ChannelParams, ChannelServer, GrantedChunk, Landed, Put, ServerSession,
};
use super::frame::ChannelKind;
use super::{PdConfig, TransferError};

/// The receiver's rank in every session's communicator (it makes the root info).
const RECEIVER_RANK: u32 = 0;
const SENDER_RANK: u32 = 1;

fn acl_error(what: &'static str) -> impl FnOnce(ascend_sys::AclError) -> TransferError {
    move |source| TransferError::Acl { what, source }
}

fn hccl_error(what: &'static str) -> impl FnOnce(HcclError) -> TransferError {
    move |source| TransferError::Hccl { what, source }
}

/// The ACL runtime and HCCL, after checking that this CANN can run the channel; the
/// calling thread is bound to `device`.
struct Runtime {
    acl: Arc<Acl>,
    hccl: Arc<Hccl>,
    device: u32,
    exec_timeout_s: i32,
}

/// The ACL runtime, if this CANN can run the channel; otherwise why not (naming the
/// version found and needed). A sender checks before its handshake, so a receiver never
/// waits for a peer that cannot join.
pub(crate) fn check() -> Result<Arc<Acl>, TransferError> {
    let acl =
        Acl::global().map_err(|e| TransferError::Config(format!("transfer_channel hccl: {e}")))?;
    Capabilities::probe(&acl).hccl.require().map_err(|source| {
        TransferError::ChannelUnsupported {
            channel: "hccl",
            source,
        }
    })?;
    Ok(acl)
}

impl Runtime {
    fn open(config: &PdConfig) -> Result<Self, TransferError> {
        let acl = check()?;
        let hccl = Hccl::load()
            .map_err(|e| TransferError::Config(format!("transfer_channel hccl: {e}")))?;
        let runtime = Runtime {
            acl,
            hccl,
            device: config.device,
            exec_timeout_s: i32::try_from(config.io_timeout.as_secs().max(1)).unwrap_or(i32::MAX),
        };
        runtime.bind()?;
        Ok(runtime)
    }

    /// Binds the calling thread to the device (ACL calls need it; connection threads
    /// change).
    fn bind(&self) -> Result<(), TransferError> {
        self.acl
            .set_device(self.device)
            .map_err(acl_error("binding the PD channel's thread to its NPU"))
    }

    fn config(&self) -> CommConfigV8 {
        let mut config = CommConfigV8::new();
        config.0.hcclExecTimeOut = self.exec_timeout_s;
        config
    }

    fn stream(&self) -> Result<Stream, TransferError> {
        Stream::new(&self.acl).map_err(acl_error("creating the hccl channel's stream"))
    }
}

/// The receiving side (see the module documentation).
pub(crate) struct HcclServer {
    runtime: Arc<Runtime>,
    /// The PD buffer in device memory, once [`ChannelServer::memory`] allocated it; the
    /// PD buffer itself is its host copy, at `host_base`, page for page.
    device: Option<Arc<DeviceBuffer>>,
    host_base: usize,
}

impl HcclServer {
    pub(crate) fn new(config: &PdConfig) -> Result<Self, TransferError> {
        Ok(HcclServer {
            runtime: Arc::new(Runtime::open(config)?),
            device: None,
            host_base: 0,
        })
    }
}

impl ChannelServer for HcclServer {
    fn landing(&self) -> Landed {
        Landed::InPage
    }

    fn memory(&mut self, len: usize) -> Result<Box<dyn PageMemory>, TransferError> {
        self.runtime.bind()?;
        let device = Arc::new(
            DeviceBuffer::new(&self.runtime.acl, len)
                .map_err(acl_error("allocating the PD buffer on the NPU"))?,
        );
        let host = HostPages::new(len)?;
        self.host_base = host.base().as_ptr() as usize;
        self.device = Some(device);
        Ok(Box::new(host))
    }

    fn open(&self) -> Result<(Vec<u8>, Box<dyn ServerSession>), TransferError> {
        let device = self
            .device
            .clone()
            .ok_or_else(|| TransferError::Config("hccl PD buffer not allocated yet".into()))?;
        self.runtime.bind()?;
        let root = self
            .runtime
            .hccl
            .root_info()
            .map_err(hccl_error("making the session's HCCL root info"))?;
        let params = ChannelParams::write(|out| ChannelParams::put_bytes(out, &root));
        let session = HcclSession {
            runtime: Arc::clone(&self.runtime),
            device,
            host_base: self.host_base,
            root,
            link: None,
            granted: Vec::new(),
            synchronized: false,
        };
        Ok((params, Box::new(session)))
    }
}

/// A joined communicator and the stream its operations run on. The communicator is
/// declared first, so it is dropped first: that ends pending work before the stream goes.
struct Link {
    comm: Comm,
    stream: Stream,
}

/// One sender's session on the receiver.
struct HcclSession {
    runtime: Arc<Runtime>,
    device: Arc<DeviceBuffer>,
    host_base: usize,
    root: RootInfo,
    link: Option<Link>,
    /// The chunks of the current grant: (offset in the PD buffer, length).
    granted: Vec<(usize, usize)>,
    /// Whether the current grant's receives were waited for.
    synchronized: bool,
}

impl HcclSession {
    fn link(&self) -> Result<&Link, TransferError> {
        self.link
            .as_ref()
            .ok_or_else(|| TransferError::Protocol("hccl session used before attach".into()))
    }
}

impl ServerSession for HcclSession {
    fn attach(&mut self) -> Result<(), TransferError> {
        let rt = &self.runtime;
        rt.bind()?;
        let stream = rt.stream()?;
        let comm = rt
            .hccl
            .join(2, &self.root, RECEIVER_RANK, &rt.config())
            .map_err(hccl_error("joining the sender's HCCL communicator"))?;
        self.link = Some(Link { stream, comm });
        Ok(())
    }

    fn on_grant(&mut self, chunks: &[GrantedChunk]) -> Result<(), TransferError> {
        self.runtime.bind()?;
        self.granted = chunks
            .iter()
            .map(|c| (c.page.as_ptr() as usize - self.host_base, c.len))
            .collect();
        self.synchronized = false;
        let link = self.link()?;
        for &(offset, len) in &self.granted {
            let page = (self.device.addr() + offset as u64) as *mut c_void;
            // SAFETY: the page lies inside the device buffer (the grant is inside the PD
            // buffer, which mirrors it), is granted to this request alone, and stays
            // allocated for the receiver's lifetime; the stream is live. If the request
            // fails, `abandon` destroys the communicator before the page is freed.
            unsafe { link.comm.recv(page, len, SENDER_RANK, link.stream.raw()) }
                .map_err(hccl_error("posting HcclRecv into a granted page"))?;
        }
        Ok(())
    }

    fn landed(&mut self, chunk: usize) -> Result<(), TransferError> {
        self.runtime.bind()?;
        if !self.synchronized {
            self.link()?
                .stream
                .synchronize()
                .map_err(acl_error("waiting for the chunks' HcclRecv"))?;
            self.synchronized = true;
        }
        let &(offset, len) = self.granted.get(chunk).ok_or_else(|| {
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

    fn abandon(&mut self) {
        // Dropping the communicator ends its pending receives: after this nothing writes
        // into the request's pages.
        self.link = None;
        self.granted.clear();
    }
}

/// The sending side: a device staging page and the session's communicator.
pub(crate) struct HcclChannel {
    runtime: Runtime,
    staging: DeviceBuffer,
    /// Bytes of the current chunk staged so far.
    filled: usize,
    link: Link,
}

impl HcclChannel {
    /// Joins the communicator the receiver's root info names.
    pub(crate) fn connect(config: &PdConfig, params: &[u8]) -> Result<Self, TransferError> {
        let mut p = ChannelParams::read(ChannelKind::Hccl, params)?;
        let root: RootInfo = p.bytes("root info")?.try_into().map_err(|_| {
            TransferError::Protocol("hccl root info in Welcome is not 4108 bytes".into())
        })?;
        p.end()?;
        let runtime = Runtime::open(config)?;
        let staging = DeviceBuffer::new(&runtime.acl, config.page_size())
            .map_err(acl_error("allocating the hccl channel's device staging"))?;
        let stream = runtime.stream()?;
        let comm = runtime
            .hccl
            .join(2, &root, SENDER_RANK, &runtime.config())
            .map_err(hccl_error("joining the receiver's HCCL communicator"))?;
        Ok(HcclChannel {
            runtime,
            staging,
            filled: 0,
            link: Link { stream, comm },
        })
    }
}

impl Channel for HcclChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Hccl
    }

    fn put(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError> {
        if dst.chunk_offset != self.filled as u64 {
            return Err(TransferError::Protocol(format!(
                "hccl puts a chunk in order: piece at {} after {} bytes",
                dst.chunk_offset, self.filled
            )));
        }
        self.runtime.bind()?;
        self.staging
            .write(self.filled, src)
            .map_err(acl_error("staging a chunk on the NPU"))?;
        self.filled += src.len();
        Ok(())
    }

    fn fence(&mut self) -> Result<(), TransferError> {
        if self.filled == 0 {
            return Ok(());
        }
        self.runtime.bind()?;
        let len = std::mem::take(&mut self.filled);
        let link = &self.link;
        // SAFETY: the staging buffer holds `len` staged bytes and is not written again
        // before the stream synchronize below; the stream is live.
        unsafe {
            link.comm.send(
                self.staging.addr() as *const c_void,
                len,
                RECEIVER_RANK,
                link.stream.raw(),
            )
        }
        .map_err(hccl_error("HcclSend of a chunk"))?;
        link.stream
            .synchronize()
            .map_err(acl_error("waiting for HcclSend"))
    }
}

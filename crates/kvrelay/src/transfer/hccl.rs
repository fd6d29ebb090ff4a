//! The `hccl` channel (feature `ascend`): two-sided `HcclSend`/`HcclRecv` on a 2-rank
//! communicator per session, bootstrapped from a root info the receiver makes.
//!
//! - **Receiver (rank 0, the root).** At bind it allocates the PD buffer in device memory,
//!   once for its lifetime, plus a host copy of the same size that the PD buffer hands out
//!   (see [`super::npu`], "Verification"). At each handshake it makes a root info
//!   (`HcclGetRootInfo`), which `Welcome` carries; when the sender attaches it joins the
//!   communicator (both sides block until both joined, bounded by `HCCL_CONNECT_TIMEOUT`).
//!   On a grant it posts one `HcclRecv` per chunk into the chunk's device page, in chunk
//!   order, on the session's stream. At the first `Seal` of a grant it synchronizes that
//!   stream (every receive of the grant has landed then; later seals find them done).
//! - **Sender (rank 1).** It joins with the root info after attaching; `put` copies the
//!   piece from host staging into a device staging page (one chunk), `fence` issues one
//!   `HcclSend` of the whole chunk, which pairs with the receiver's `HcclRecv` for it, and
//!   synchronizes the stream.
//! - **Failures.** Every wait is bounded: the communicator's execution timeout is
//!   `pd_*` io timeout (`hcclExecTimeOut`). A receive or send that fails (peer died, timed
//!   out) fails the request on that side; the receiver destroys the session's communicator
//!   (which ends its pending receives) before the request's pages are freed.
//!
//! Refused at bind and at connect, naming the version found and needed, when
//! [`ascend_sys::Capabilities`] says this CANN cannot do it.

use std::ffi::c_void;
use std::sync::Arc;

use ascend_sys::{Comm, RootInfo, Stream};

use super::buffer::PageMemory;
use super::channel::{
    Channel, ChannelParams, ChannelServer, GrantedChunk, Landed, Put, ServerSession,
};
use super::frame::ChannelKind;
use super::npu::{
    acl_error, hccl_error, Grant, Need, NpuPages, Runtime, Staging, RECEIVER_RANK, SENDER_RANK,
};
use super::{PdConfig, TransferError};

pub(super) const NEED: Need = Need {
    channel: "hccl",
    feature: |caps| &caps.hccl,
};

/// The receiving side (see the module documentation).
pub(crate) struct HcclServer {
    runtime: Arc<Runtime>,
    pages: NpuPages,
}

impl HcclServer {
    pub(crate) fn new(config: &PdConfig) -> Result<Self, TransferError> {
        Ok(HcclServer {
            runtime: Arc::new(Runtime::open(config, NEED)?),
            pages: NpuPages::default(),
        })
    }
}

impl ChannelServer for HcclServer {
    fn landing(&self) -> Landed {
        Landed::InPage
    }

    fn memory(&mut self, len: usize) -> Result<Box<dyn PageMemory>, TransferError> {
        Ok(self.pages.allocate(&self.runtime, len)?.1)
    }

    fn open(&self) -> Result<(Vec<u8>, Box<dyn ServerSession>), TransferError> {
        let grant = self.pages.grant("hccl")?;
        self.runtime.bind()?;
        let root = self
            .runtime
            .hccl
            .root_info()
            .map_err(hccl_error("making the session's HCCL root info"))?;
        let params = ChannelParams::write(|out| ChannelParams::put_bytes(out, &root));
        let session = HcclSession {
            runtime: Arc::clone(&self.runtime),
            grant,
            root,
            link: None,
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
    grant: Grant,
    root: RootInfo,
    link: Option<Link>,
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
        self.grant.set(chunks);
        self.synchronized = false;
        let link = self.link()?;
        for (page, len) in self.grant.pages() {
            // SAFETY: the page lies inside the device buffer (the grant is inside the PD
            // buffer, which mirrors it), is granted to this request alone, and stays
            // allocated for the receiver's lifetime; the stream is live. If the request
            // fails, `abandon` destroys the communicator before the page is freed.
            unsafe {
                link.comm
                    .recv(page as *mut c_void, len, SENDER_RANK, link.stream.raw())
            }
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
        self.grant.land(chunk)
    }

    fn abandon(&mut self) {
        // Dropping the communicator ends its pending receives: after this nothing writes
        // into the request's pages.
        self.link = None;
        self.grant.clear();
    }
}

/// The sending side: a device staging page and the session's communicator.
pub(crate) struct HcclChannel {
    runtime: Runtime,
    staging: Staging,
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
        let runtime = Runtime::open(config, NEED)?;
        let staging = Staging::new(&runtime, config)?;
        let stream = runtime.stream()?;
        let comm = runtime
            .hccl
            .join(2, &root, SENDER_RANK, &runtime.config())
            .map_err(hccl_error("joining the receiver's HCCL communicator"))?;
        Ok(HcclChannel {
            runtime,
            staging,
            link: Link { stream, comm },
        })
    }
}

impl Channel for HcclChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Hccl
    }

    fn put(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError> {
        self.staging.put(&self.runtime, "hccl", dst, src).map(drop)
    }

    fn fence(&mut self) -> Result<(), TransferError> {
        let len = std::mem::take(&mut self.staging.filled);
        if len == 0 {
            return Ok(());
        }
        self.runtime.bind()?;
        let link = &self.link;
        // SAFETY: the staging buffer holds `len` staged bytes and is not written again
        // before the stream synchronize below; the stream is live.
        unsafe {
            link.comm.send(
                self.staging.buffer.addr() as *const c_void,
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

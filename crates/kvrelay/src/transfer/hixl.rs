//! The `hixl` channel (feature `ascend`): HIXL's client/server C API (CANN 9.1), a server
//! on the receiver with its NPU PD buffer registered and a client per sender session that
//! puts into it.
//!
//! - **Receiver.** At bind it allocates the PD buffer in device memory with its host copy
//!   (see [`super::npu`]), creates one HIXL server on its `pd_peer_host` and a free port,
//!   registers the device buffer (for the receiver's lifetime) and listens. `Welcome`
//!   carries the server's address and the PD buffer's device address. It posts nothing
//!   per grant; at each `Seal` the sender's puts have landed and it copies the page to the
//!   host for the checksum.
//! - **Sender.** It registers a device staging page (one chunk), creates a client for the
//!   server and connects (bounded by the handshake timeout). `put` stages the piece and
//!   appends a descriptor (`remote` = PD buffer address + the put's offset, `local` = its
//!   staging address); `fence` is one `HixlCSClientBatchPutSync` (when this CANN has it),
//!   else `HixlCSClientBatchPutAsync` polled with `HixlCSClientQueryCompleteStatus` until the
//!   PD io timeout.
//! - **Failures.** A put into a server that died or stalled fails the sender's fence
//!   within the io timeout; a sender that dies fails the request on the receiver's control
//!   connection. The HIXL C API has no per-client disconnect on the server side, so a
//!   failed request's pages are freed while a live sender could, in principle, still put
//!   into them: the sender gives up at its timeout and never puts into a grant after a
//!   failed fence.
//!
//! Refused at bind and at connect below CANN 9.1 (see [`ascend_sys::Capabilities`]).

use std::sync::Arc;

use ascend_sys::{Capabilities, Hixl, HixlClient, HixlError, HixlServer};

use super::buffer::PageMemory;
use super::channel::{
    Channel, ChannelParams, ChannelServer, GrantedChunk, Landed, Put, ServerSession,
};
use super::frame::ChannelKind;
use super::npu::{Grant, Need, NpuPages, PutBatch, Runtime, Staging};
use super::{PdConfig, TransferError};

pub(super) const NEED: Need = Need {
    channel: "hixl",
    feature: |caps| &caps.hixl,
};

fn hixl_error(what: &'static str) -> impl FnOnce(HixlError) -> TransferError {
    move |source| TransferError::Hixl { what, source }
}

fn open(config: &PdConfig) -> Result<(Runtime, Arc<Hixl>), TransferError> {
    let runtime = Runtime::open(config, NEED)?;
    let hixl =
        Hixl::load().map_err(|e| TransferError::Config(format!("transfer_channel hixl: {e}")))?;
    Ok((runtime, hixl))
}

/// The receiving side (see the module documentation).
pub(crate) struct HixlServerSide {
    runtime: Arc<Runtime>,
    hixl: Arc<Hixl>,
    host: String,
    pages: NpuPages,
    /// The server and the port it listens on, once the PD buffer is registered.
    server: Option<(HixlServer, u16)>,
}

impl HixlServerSide {
    pub(crate) fn new(config: &PdConfig) -> Result<Self, TransferError> {
        let (runtime, hixl) = open(config)?;
        Ok(HixlServerSide {
            runtime: Arc::new(runtime),
            hixl,
            host: config
                .peer_host
                .clone()
                .unwrap_or_else(|| "127.0.0.1".into()),
            pages: NpuPages::default(),
            server: None,
        })
    }
}

impl ChannelServer for HixlServerSide {
    fn landing(&self) -> Landed {
        Landed::InPage
    }

    fn memory(&mut self, len: usize) -> Result<Box<dyn PageMemory>, TransferError> {
        let (device, host) = self.pages.allocate(&self.runtime, len)?;
        // A free port for the server (LMCache-Ascend picks one the same way).
        let port = std::net::TcpListener::bind((self.host.as_str(), 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| {
                TransferError::Config(format!("hixl: no free port on {}: {e}", self.host))
            })?
            .port();
        let mut server = self
            .hixl
            .server(&self.host, port)
            .map_err(hixl_error("creating the HIXL server"))?;
        server
            .register("kvrelay-pd-buffer", device)
            .map_err(hixl_error("registering the PD buffer with the HIXL server"))?;
        server
            .listen(64)
            .map_err(hixl_error("starting the HIXL server"))?;
        self.server = Some((server, port));
        Ok(host)
    }

    fn open(&self) -> Result<(Vec<u8>, Box<dyn ServerSession>), TransferError> {
        let grant = self.pages.grant("hixl")?;
        let port = self
            .server
            .as_ref()
            .map(|(_, port)| *port)
            .ok_or_else(|| TransferError::Config("hixl server not listening yet".into()))?;
        let base = grant.base();
        let params = ChannelParams::write(|out| {
            ChannelParams::put_bytes(out, self.host.as_bytes());
            ChannelParams::put_u64(out, u64::from(port));
            ChannelParams::put_u64(out, base);
        });
        let session = HixlSession {
            runtime: Arc::clone(&self.runtime),
            grant,
        };
        Ok((params, Box::new(session)))
    }
}

/// One sender's session on the receiver: the pages its puts land in.
struct HixlSession {
    runtime: Arc<Runtime>,
    grant: Grant,
}

impl ServerSession for HixlSession {
    fn on_grant(&mut self, chunks: &[GrantedChunk]) -> Result<(), TransferError> {
        self.grant.set(chunks);
        Ok(())
    }

    fn landed(&mut self, chunk: usize) -> Result<(), TransferError> {
        self.runtime.bind()?;
        self.grant.land(chunk)
    }

    fn abandon(&mut self) {
        self.grant.clear();
    }
}

/// The sending side: a registered device staging page, the descriptors of the chunk
/// being put, and the client connected to the receiver's server.
pub(crate) struct HixlChannel {
    runtime: Runtime,
    batch: PutBatch,
    client: HixlClient,
    /// Whether this CANN has `HixlCSClientBatchPutSync`.
    sync: bool,
    timeout: std::time::Duration,
}

impl HixlChannel {
    /// Connects to the HIXL server the receiver's parameters name.
    pub(crate) fn connect(config: &PdConfig, params: &[u8]) -> Result<Self, TransferError> {
        let mut p = ChannelParams::read(ChannelKind::Hixl, params)?;
        let host = String::from_utf8(p.bytes("server host")?.to_vec()).map_err(|_| {
            TransferError::Protocol("hixl server host in Welcome is not UTF-8".into())
        })?;
        let port = u16::try_from(p.u64("server port")?).map_err(|_| {
            TransferError::Protocol("hixl server port in Welcome is not a port".into())
        })?;
        let remote_base = p.u64("PD buffer address")?;
        p.end()?;
        let (runtime, hixl) = open(config)?;
        let sync = Capabilities::probe(&runtime.acl).hixl_sync.status.is_ok();
        let staging = Staging::new(&runtime, config)?;
        let mut client = hixl
            .client(&host, port)
            .map_err(hixl_error("creating the HIXL client"))?;
        client
            .register("kvrelay-staging", Arc::clone(&staging.buffer))
            .map_err(hixl_error("registering the HIXL staging page"))?;
        client
            .connect(config.handshake_timeout)
            .map_err(hixl_error("connecting to the receiver's HIXL server"))?;
        Ok(HixlChannel {
            runtime,
            batch: PutBatch::new(staging, remote_base),
            client,
            sync,
            timeout: config.io_timeout,
        })
    }
}

impl Channel for HixlChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::Hixl
    }

    fn put(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError> {
        self.batch.put(&self.runtime, "hixl", dst, src)
    }

    fn fence(&mut self) -> Result<(), TransferError> {
        let copies = self.batch.take();
        if copies.is_empty() {
            return Ok(());
        }
        self.runtime.bind()?;
        // SAFETY: every local range is in the registered staging page, unchanged until the
        // put returns; every remote range is inside the receiver's registered PD buffer
        // (the sender checked the put against the grant and the buffer size).
        unsafe { self.client.put(&copies, self.timeout, self.sync) }
            .map_err(hixl_error("HIXL batch put of a chunk"))
    }
}

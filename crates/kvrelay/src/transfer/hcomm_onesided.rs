//! The `hcomm_onesided` channel (feature `ascend`): HCCL's one-sided `HcclBatchPut` from
//! the sender's registered staging straight into the receiver's registered PD buffer.
//!
//! - **Receiver (rank 0).** At bind it allocates the PD buffer in device memory with its
//!   host copy (see [`super::npu`]) and registers the device buffer once for its lifetime
//!   (`HcclRegisterGlobalMem`). At each handshake it builds a 2-rank rank table (v1.0: this
//!   host, rank 0 and rank 1) and a comm name unique to the session; `Welcome` carries both
//!   and the PD buffer's device address. When the sender attaches it joins
//!   (`HcclCommInitClusterInfoMemConfig`), binds the PD buffer (`HcclCommBindMem`) and
//!   prepares (`HcclCommPrepare(FULLMESH)`, a rendezvous both ranks are in at once). It
//!   posts nothing per grant: at each `Seal` the sender's puts have landed (the sender
//!   fenced before sealing), and it copies the page to the host for the checksum.
//! - **Sender (rank 1).** It registers a device staging page (one chunk), joins with the
//!   rank table as rank 1, binds and prepares. `put` copies the piece into the staging page
//!   and appends one descriptor (`local` = its staging address, `remote` = PD buffer
//!   address + the put's offset); `fence` issues them as one `HcclBatchPut` on its stream
//!   and synchronizes the stream.
//! - **Failures.** Every wait is bounded: the prepare timeout and the communicator's
//!   execution timeout are the PD io timeout. A put into a receiver that died or stalled
//!   fails the sender's fence; a sender that dies fails the request on the receiver's
//!   control connection. The receiver destroys the session's communicator on a failed
//!   request before its pages are freed, so the sender's later puts fail instead of landing.
//!
//! The rank table's rank 1 entry repeats the receiver's host and device: the handshake
//! does not carry the sender's device, which real hardware needs (the emulator does not
//! read it). Refused at bind and at connect below CANN 8.5 (see [`ascend_sys::Capabilities`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ascend_sys::{OneSided, OneSidedComm, Registered, Stream};

use super::buffer::PageMemory;
use super::channel::{
    Channel, ChannelParams, ChannelServer, GrantedChunk, Landed, Put, ServerSession,
};
use super::frame::ChannelKind;
use super::npu::{
    acl_error, hccl_error, Grant, Need, NpuPages, PutBatch, Runtime, Staging, RECEIVER_RANK,
    SENDER_RANK,
};
use super::{PdConfig, TransferError};

pub(super) const NEED: Need = Need {
    channel: "hcomm_onesided",
    feature: |caps| &caps.hcomm_onesided,
};

/// The runtime and the one-sided calls of the library this CANN keeps them in.
fn open(config: &PdConfig) -> Result<(Runtime, Arc<OneSided>), TransferError> {
    let runtime = Runtime::open(config, NEED)?;
    let version = runtime
        .acl
        .version("runtime")
        .map_err(|e| TransferError::Config(format!("transfer_channel hcomm_onesided: {e}")))?
        .version;
    let api = OneSided::load(Arc::clone(&runtime.hccl), version)
        .map_err(|e| TransferError::Config(format!("transfer_channel hcomm_onesided: {e}")))?;
    Ok((runtime, api))
}

/// Joins the session's communicator as `rank`, binds `mem` and prepares (bounded by the
/// runtime's timeout).
fn join(
    runtime: &Runtime,
    api: &Arc<OneSided>,
    table: &str,
    name: &str,
    rank: u32,
    mem: &Registered,
) -> Result<OneSidedComm, TransferError> {
    let mut config = runtime.config().with_name(name).ok_or_else(|| {
        TransferError::Protocol(format!("hcomm_onesided comm name {name:?} does not fit"))
    })?;
    let comm = api
        .join(table, rank, &mut config)
        .map_err(hccl_error("joining the one-sided communicator"))?;
    comm.bind(mem)
        .map_err(hccl_error("binding registered memory to the communicator"))?;
    comm.prepare(runtime.timeout_s)
        .map_err(hccl_error("preparing the one-sided communicator"))?;
    Ok(comm)
}

/// The 2-rank rank table (v1.0) of a session on this host.
fn rank_table(device: u32) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let rank =
        |r: u32| serde_json::json!({"device_id": device.to_string(), "rank_id": r.to_string()});
    serde_json::json!({
        "version": "1.0",
        "server_count": "1",
        "server_list": [{"server_id": host, "device": [rank(RECEIVER_RANK), rank(SENDER_RANK)]}],
        "status": "completed",
    })
    .to_string()
}

/// The receiving side (see the module documentation).
pub(crate) struct OneSidedServer {
    runtime: Arc<Runtime>,
    api: Arc<OneSided>,
    pages: NpuPages,
    registered: Option<Arc<Registered>>,
}

impl OneSidedServer {
    pub(crate) fn new(config: &PdConfig) -> Result<Self, TransferError> {
        let (runtime, api) = open(config)?;
        Ok(OneSidedServer {
            runtime: Arc::new(runtime),
            api,
            pages: NpuPages::default(),
            registered: None,
        })
    }
}

impl ChannelServer for OneSidedServer {
    fn landing(&self) -> Landed {
        Landed::InPage
    }

    fn memory(&mut self, len: usize) -> Result<Box<dyn PageMemory>, TransferError> {
        let (device, host) = self.pages.allocate(&self.runtime, len)?;
        let registered = self
            .api
            .register(device)
            .map_err(hccl_error("registering the PD buffer for one-sided access"))?;
        self.registered = Some(Arc::new(registered));
        Ok(host)
    }

    fn open(&self) -> Result<(Vec<u8>, Box<dyn ServerSession>), TransferError> {
        let grant = self.pages.grant("hcomm_onesided")?;
        let registered = self.registered.clone().ok_or_else(|| {
            TransferError::Config("hcomm_onesided PD buffer not registered yet".into())
        })?;
        let table = rank_table(self.runtime.device());
        // HCCL refuses a comm name already used in a process, and one process can hold
        // several receivers (one per TP rank) and senders: number sessions process-wide.
        static SESSIONS: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "kvrelay-{}-{}",
            std::process::id(),
            SESSIONS.fetch_add(1, Ordering::Relaxed)
        );
        let base = registered.buffer().addr();
        let params = ChannelParams::write(|out| {
            ChannelParams::put_bytes(out, table.as_bytes());
            ChannelParams::put_bytes(out, name.as_bytes());
            ChannelParams::put_u64(out, base);
        });
        let session = OneSidedSession {
            runtime: Arc::clone(&self.runtime),
            api: Arc::clone(&self.api),
            registered,
            grant,
            table,
            name,
            comm: None,
        };
        Ok((params, Box::new(session)))
    }
}

/// One sender's session on the receiver.
struct OneSidedSession {
    runtime: Arc<Runtime>,
    api: Arc<OneSided>,
    registered: Arc<Registered>,
    grant: Grant,
    table: String,
    name: String,
    comm: Option<OneSidedComm>,
}

impl ServerSession for OneSidedSession {
    fn attach(&mut self) -> Result<(), TransferError> {
        self.runtime.bind()?;
        let comm = join(
            &self.runtime,
            &self.api,
            &self.table,
            &self.name,
            RECEIVER_RANK,
            &self.registered,
        )?;
        self.comm = Some(comm);
        Ok(())
    }

    fn on_grant(&mut self, chunks: &[GrantedChunk]) -> Result<(), TransferError> {
        self.grant.set(chunks);
        Ok(())
    }

    fn landed(&mut self, chunk: usize) -> Result<(), TransferError> {
        self.runtime.bind()?;
        self.grant.land(chunk)
    }

    fn abandon(&mut self) {
        // Destroying the communicator makes the sender's later puts fail instead of
        // landing in pages that are about to be freed.
        self.comm = None;
        self.grant.clear();
    }
}

/// The sending side: a registered device staging page, the descriptors of the chunk
/// being put, and the session's communicator.
pub(crate) struct OneSidedChannel {
    runtime: Runtime,
    batch: PutBatch,
    comm: OneSidedComm,
    stream: Stream,
    /// Keeps the staging page registered while the communicator may use it.
    _registered: Registered,
}

impl OneSidedChannel {
    /// Joins the communicator the receiver's rank table and comm name describe.
    pub(crate) fn connect(config: &PdConfig, params: &[u8]) -> Result<Self, TransferError> {
        let mut p = ChannelParams::read(ChannelKind::HcommOnesided, params)?;
        let text = |b: &[u8], what: &str| {
            String::from_utf8(b.to_vec()).map_err(|_| {
                TransferError::Protocol(format!("hcomm_onesided {what} in Welcome is not UTF-8"))
            })
        };
        let table = text(p.bytes("rank table")?, "rank table")?;
        let name = text(p.bytes("comm name")?, "comm name")?;
        let remote_base = p.u64("PD buffer address")?;
        p.end()?;
        let (runtime, api) = open(config)?;
        let staging = Staging::new(&runtime, config)?;
        let registered = api
            .register(Arc::clone(&staging.buffer))
            .map_err(hccl_error("registering the one-sided staging page"))?;
        let stream = runtime.stream()?;
        let comm = join(&runtime, &api, &table, &name, SENDER_RANK, &registered)?;
        Ok(OneSidedChannel {
            runtime,
            batch: PutBatch::new(staging, remote_base),
            comm,
            stream,
            _registered: registered,
        })
    }
}

impl Channel for OneSidedChannel {
    fn kind(&self) -> ChannelKind {
        ChannelKind::HcommOnesided
    }

    fn put(&mut self, dst: Put, src: &[u8]) -> Result<(), TransferError> {
        self.batch.put(&self.runtime, "hcomm_onesided", dst, src)
    }

    fn fence(&mut self) -> Result<(), TransferError> {
        let copies = self.batch.take();
        if copies.is_empty() {
            return Ok(());
        }
        self.runtime.bind()?;
        // SAFETY: every local range is in the registered, bound staging page and is not
        // written again before the stream synchronize below; every remote range is inside
        // the receiver's registered PD buffer (the sender checked the put against the
        // grant and the buffer size); the stream is live.
        unsafe {
            self.comm
                .batch_put(RECEIVER_RANK, &copies, self.stream.raw())
        }
        .map_err(hccl_error("HcclBatchPut of a chunk"))?;
        self.stream
            .synchronize()
            .map_err(acl_error("waiting for HcclBatchPut"))
    }
}

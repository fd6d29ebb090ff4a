//! HCCL's one-sided calls (`hccl_one_sided_services.h`, CANN 8.5): process-wide memory
//! registration, a communicator from an in-memory rank table, `HcclBatchPut` into the
//! peer's registered memory. What the `hcomm_onesided` PD channel binds.

use std::ffi::{c_void, CString};
use std::sync::Arc;

use vendor_dl::Slot;

use crate::acl::RawStream;
use crate::error::LoadError;
use crate::hccl::{resolve_in, Comm, CommConfigV8, Hccl, HcclError, HCOMM_SPLIT};
use crate::library::Loaded;
use crate::memory::DeviceBuffer;
use crate::search::Lib;
use crate::sys;
use crate::version::CannVersion;

/// `HCCL_E_PARA`: what HCCL answers a malformed argument with.
const HCCL_E_PARA: sys::HcclResult = 1;

vendor_dl::lazy_symbols! {
    /// The one-sided symbols the `hcomm_onesided` channel calls.
    HCCL_ONE_SIDED for OneSided, error HcclError;
    init_cluster_info_fn: HcclCommInitClusterInfoMemConfig_fn =
        HCCL_SYM_COMM_INIT_CLUSTER_INFO_MEM_CONFIG, "HcclCommInitClusterInfoMemConfig";
    register_global_mem_fn: HcclRegisterGlobalMem_fn =
        HCCL_SYM_REGISTER_GLOBAL_MEM, "HcclRegisterGlobalMem";
    bind_mem_fn: HcclCommBindMem_fn = HCCL_SYM_COMM_BIND_MEM, "HcclCommBindMem";
    prepare_fn: HcclCommPrepare_fn = HCCL_SYM_COMM_PREPARE, "HcclCommPrepare";
    batch_put_fn: HcclBatchPut_fn = HCCL_SYM_BATCH_PUT, "HcclBatchPut";
}

/// The one-sided calls: from `libhcomm.so` on CANN 8.5 and later, `libhccl.so` before;
/// status texts and communicator destruction through [`Hccl`].
pub struct OneSided {
    hccl: Arc<Hccl>,
    loaded: Loaded,
    symbols: Symbols,
}

impl std::fmt::Debug for OneSided {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OneSided({})", self.loaded.origin.path)
    }
}

impl OneSided {
    /// Opens the library that holds the one-sided calls at CANN `version`.
    pub fn load(hccl: Arc<Hccl>, version: CannVersion) -> Result<Arc<OneSided>, LoadError> {
        let lib = if version >= HCOMM_SPLIT {
            Lib::Hcomm
        } else {
            Lib::Hccl
        };
        Loaded::load(lib).map(|loaded| {
            Arc::new(OneSided {
                hccl,
                loaded,
                symbols: Symbols::default(),
            })
        })
    }

    fn resolve<T: vendor_dl::FnPtr>(
        &self,
        slot: &Slot<T>,
        name: &'static [u8],
        call: &'static str,
    ) -> Result<T::Raw, HcclError> {
        resolve_in::<T>(&self.loaded, slot, name, call)
    }

    /// `HcclRegisterGlobalMem` of the whole of `buffer`, as device memory. The
    /// registration is kept for the process's lifetime (never deregistered: CANN's advice
    /// for buffers a process keeps), which is why it holds the buffer.
    pub fn register(&self, buffer: Arc<DeviceBuffer>) -> Result<Registered, HcclError> {
        let f = self.register_global_mem_fn()?;
        let mem = sys::CommMem {
            type_: sys::COMM_MEM_TYPE_DEVICE,
            addr: buffer.addr() as *mut c_void,
            size: buffer.len() as u64,
        };
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: `mem` names device memory `buffer` owns, which `Registered` keeps alive;
        // `handle` is a writable slot.
        self.hccl
            .check("HcclRegisterGlobalMem", unsafe { f(&mem, &mut handle) })?;
        Ok(Registered { buffer, handle })
    }

    /// `HcclCommInitClusterInfoMemConfig`: joins the communicator `rank_table` (rank table
    /// JSON text) describes, as `rank`; `config` must carry a comm name unique in this
    /// process.
    pub fn join(
        self: &Arc<Self>,
        rank_table: &str,
        rank: u32,
        config: &mut CommConfigV8,
    ) -> Result<OneSidedComm, HcclError> {
        let f = self.init_cluster_info_fn()?;
        let call = "HcclCommInitClusterInfoMemConfig";
        let text = CString::new(rank_table).map_err(|_| HcclError::Status {
            call,
            code: HCCL_E_PARA,
            message: "the rank table contains a NUL byte".into(),
        })?;
        let mut comm: sys::HcclComm = std::ptr::null_mut();
        // SAFETY: `text` is NUL-terminated and `config` valid for the call; `comm` is a
        // writable slot.
        self.hccl.check(call, unsafe {
            f(text.as_ptr(), rank, &mut config.0, &mut comm)
        })?;
        Ok(OneSidedComm {
            comm: Comm::from_raw(Arc::clone(&self.hccl), comm),
            api: Arc::clone(self),
        })
    }
}

/// A device buffer registered for one-sided access, for as long as the process lives.
pub struct Registered {
    buffer: Arc<DeviceBuffer>,
    handle: *mut c_void,
}

// SAFETY: the handle is an opaque process-wide registration id, usable from any thread.
unsafe impl Send for Registered {}
// SAFETY: as above; nothing mutates through it.
unsafe impl Sync for Registered {}

impl Registered {
    /// The registered buffer.
    pub fn buffer(&self) -> &Arc<DeviceBuffer> {
        &self.buffer
    }
}

/// A one-sided communicator, destroyed when dropped.
pub struct OneSidedComm {
    comm: Comm,
    api: Arc<OneSided>,
}

impl OneSidedComm {
    /// `HcclCommBindMem`: makes a registration usable on this communicator (before
    /// [`OneSidedComm::prepare`]).
    pub fn bind(&self, mem: &Registered) -> Result<(), HcclError> {
        let f = self.api.bind_mem_fn()?;
        // SAFETY: a live communicator and a live registration.
        self.api
            .hccl
            .check("HcclCommBindMem", unsafe { f(self.comm.raw(), mem.handle) })
    }

    /// `HcclCommPrepare(FULLMESH, timeout_s)`: the blocking rendezvous that connects the
    /// ranks and exchanges their bound memory; both ranks must be in it at once.
    pub fn prepare(&self, timeout_s: i32) -> Result<(), HcclError> {
        let f = self.api.prepare_fn()?;
        let config = sys::HcclPrepareConfig {
            topoType: sys::HCCL_TOPO_FULLMESH,
            rsvd0: 0,
            rsvd1: 0,
            rsvd2: 0,
        };
        // SAFETY: a live communicator; `config` is valid for the call.
        self.api.hccl.check("HcclCommPrepare", unsafe {
            f(self.comm.raw(), &config, timeout_s)
        })
    }

    /// `HcclBatchPut` of `(local, remote, len)` byte copies to `peer`, issued on `stream`;
    /// they have landed once the stream is synchronized.
    ///
    /// # Safety
    /// Every `local` range lies in memory bound to this communicator and stays unchanged
    /// until `stream` is synchronized; every `remote` range lies in memory the peer bound;
    /// `stream` is live.
    pub unsafe fn batch_put(
        &self,
        peer: u32,
        copies: &[(u64, u64, usize)],
        stream: RawStream,
    ) -> Result<(), HcclError> {
        let f = self.api.batch_put_fn()?;
        let mut descs: Vec<sys::HcclOneSideOpDesc> = copies
            .iter()
            .map(|&(local, remote, len)| sys::HcclOneSideOpDesc {
                localAddr: local as *mut c_void,
                remoteAddr: remote as *mut c_void,
                count: len as u64,
                dataType: sys::HCCL_DATA_TYPE_UINT8,
            })
            .collect();
        // SAFETY: `descs` is valid for the call; the ranges are the caller's promise.
        let code = unsafe {
            f(
                self.comm.raw(),
                peer,
                descs.as_mut_ptr(),
                descs.len() as u32,
                stream.0,
            )
        };
        self.api.hccl.check("HcclBatchPut", code)
    }
}

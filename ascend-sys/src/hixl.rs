//! HIXL's client/server C API (`cs/hixl_cs.h`, the CANN 9.1 layout): a server on the
//! receiver with its memory registered, a client on the sender that connects and puts
//! into it. What the `hixl` PD channel binds.
//!
//! The endpoint descriptors are passed zeroed (no protocol or address filled in): their
//! contents are not in the public sources this crate follows, and the emulator does not
//! read them; real hardware may need them.

use std::ffi::{c_void, CString};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vendor_dl::{FnPtr, Slot};

use crate::error::{AclError, LoadError};
use crate::library::Loaded;
use crate::memory::DeviceBuffer;
use crate::search::Lib;
use crate::sys;

vendor_dl::lazy_symbols! {
    /// The HIXL calls the `hixl` channel makes.
    HIXL_CS for Hixl, error HixlError;
    server_create_fn: HixlCSServerCreate_fn = HIXL_SYM_SERVER_CREATE, "HixlCSServerCreate";
    server_reg_mem_fn: HixlCSServerRegMem_fn = HIXL_SYM_SERVER_REG_MEM, "HixlCSServerRegMem";
    server_listen_fn: HixlCSServerListen_fn = HIXL_SYM_SERVER_LISTEN, "HixlCSServerListen";
    server_destroy_fn: HixlCSServerDestroy_fn = HIXL_SYM_SERVER_DESTROY, "HixlCSServerDestroy";
    client_create_fn: HixlCSClientCreate_fn = HIXL_SYM_CLIENT_CREATE, "HixlCSClientCreate";
    client_connect_fn: HixlCSClientConnect_fn = HIXL_SYM_CLIENT_CONNECT, "HixlCSClientConnect";
    client_reg_mem_fn: HixlCSClientRegMem_fn = HIXL_SYM_CLIENT_REG_MEM, "HixlCSClientRegMem";
    client_put_sync_fn: HixlCSClientBatchPutSync_fn =
        HIXL_SYM_CLIENT_BATCH_PUT_SYNC, "HixlCSClientBatchPutSync";
    client_put_async_fn: HixlCSClientBatchPutAsync_fn =
        HIXL_SYM_CLIENT_BATCH_PUT_ASYNC, "HixlCSClientBatchPutAsync";
    client_query_fn: HixlCSClientQueryCompleteStatus_fn =
        HIXL_SYM_CLIENT_QUERY_COMPLETE_STATUS, "HixlCSClientQueryCompleteStatus";
    client_destroy_fn: HixlCSClientDestroy_fn = HIXL_SYM_CLIENT_DESTROY, "HixlCSClientDestroy";
}

/// A HIXL call that failed or could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HixlError {
    /// The call returned a status other than `HIXL_SUCCESS`.
    #[error("{call} returned HixlStatus {code}")]
    Status {
        /// The HIXL function.
        call: &'static str,
        /// The `HixlStatus` it returned.
        code: sys::HixlStatus,
    },
    /// A batch put did not complete within its deadline, or reported a failure.
    #[error("{call}: the batch put {outcome}")]
    Incomplete {
        /// The HIXL function polled.
        call: &'static str,
        /// What became of the put.
        outcome: String,
    },
    /// The library does not export the symbol this call needs.
    #[error(transparent)]
    Unavailable(AclError),
}

/// `libcann_hixl.so`'s client/server calls.
pub struct Hixl {
    loaded: Loaded,
    symbols: Symbols,
}

impl std::fmt::Debug for Hixl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hixl({})", self.loaded.origin.path)
    }
}

fn check(call: &'static str, code: sys::HixlStatus) -> Result<(), HixlError> {
    match code {
        0 => Ok(()),
        code => Err(HixlError::Status { call, code }),
    }
}

fn zeroed_endpoint() -> sys::EndpointDesc {
    sys::EndpointDesc {
        protocol: 0,
        commAddr: sys::CommAddr {
            type_: 0,
            raws: [0; 36],
        },
        loc: sys::EndpointLoc {
            locType: 0,
            raws: [0; 60],
        },
        raws: [0; 52],
    }
}

fn config() -> sys::HixlConfig {
    sys::HixlConfig {
        global_resource_config: std::ptr::null(),
        reserved: [0; 120],
    }
}

fn device_mem(buffer: &DeviceBuffer) -> sys::CommMem {
    sys::CommMem {
        type_: sys::COMM_MEM_TYPE_DEVICE,
        addr: buffer.addr() as *mut c_void,
        size: buffer.len() as u64,
    }
}

fn c_text(call: &'static str, text: &str) -> Result<CString, HixlError> {
    CString::new(text).map_err(|_| HixlError::Status {
        call,
        code: sys::HIXL_PARAM_INVALID,
    })
}

impl Hixl {
    /// Finds and opens `libcann_hixl.so` through its search order.
    pub fn load() -> Result<Arc<Hixl>, LoadError> {
        Loaded::load(Lib::Hixl).map(|loaded| {
            Arc::new(Hixl {
                loaded,
                symbols: Symbols::default(),
            })
        })
    }

    fn resolve<T: FnPtr>(
        &self,
        slot: &Slot<T>,
        name: &'static [u8],
        call: &'static str,
    ) -> Result<T::Raw, HixlError> {
        self.loaded
            .resolve::<T>(slot, name, call)
            .map_err(HixlError::Unavailable)
    }

    /// `HixlCSServerCreate` for `ip:port` (not listening yet).
    pub fn server(self: &Arc<Self>, ip: &str, port: u16) -> Result<HixlServer, HixlError> {
        let f = self.server_create_fn()?;
        let ip = c_text("HixlCSServerCreate", ip)?;
        let endpoint = Box::new(zeroed_endpoint());
        let desc = sys::HixlServerDesc {
            endpoint_list: &*endpoint,
            server_ip: ip.as_ptr(),
            server_port: u32::from(port),
            endpoint_list_num: 1,
            reserved: [0; 104],
        };
        let mut raw: sys::HixlServerHandle = std::ptr::null_mut();
        // SAFETY: `desc` and what it points to live for the call; `raw` is a writable slot.
        check("HixlCSServerCreate", unsafe {
            f(&desc, &config(), &mut raw)
        })?;
        Ok(HixlServer {
            hixl: Arc::clone(self),
            raw,
            registered: Vec::new(),
            _described: (ip, vec![*endpoint]),
        })
    }

    /// `HixlCSClientCreate` for the server at `ip:port` (not connected yet).
    pub fn client(self: &Arc<Self>, ip: &str, port: u16) -> Result<HixlClient, HixlError> {
        let f = self.client_create_fn()?;
        let ip = c_text("HixlCSClientCreate", ip)?;
        let (local, remote) = (Box::new(zeroed_endpoint()), Box::new(zeroed_endpoint()));
        let desc = sys::HixlClientDesc {
            local_endpoint: &*local,
            remote_endpoint: &*remote,
            server_ip: ip.as_ptr(),
            server_port: u32::from(port),
            tc: 0,
            sl: 0,
            reserved: [0; 98],
        };
        let mut raw: sys::HixlClientHandle = std::ptr::null_mut();
        // SAFETY: `desc` and what it points to live for the call; `raw` is a writable slot.
        check("HixlCSClientCreate", unsafe {
            f(&desc, &config(), &mut raw)
        })?;
        Ok(HixlClient {
            hixl: Arc::clone(self),
            raw,
            registered: Vec::new(),
            _described: (ip, vec![*local, *remote]),
        })
    }
}

/// A HIXL server, destroyed when dropped; it keeps the buffers it registered alive.
pub struct HixlServer {
    hixl: Arc<Hixl>,
    raw: sys::HixlServerHandle,
    registered: Vec<Arc<DeviceBuffer>>,
    /// What the descriptor pointed to, in case the library keeps the pointers.
    _described: (CString, Vec<sys::EndpointDesc>),
}

// SAFETY: the handle is owned here and HIXL's server calls may come from any thread.
unsafe impl Send for HixlServer {}
// SAFETY: as above; `&self` methods only pass the handle to HIXL.
unsafe impl Sync for HixlServer {}

impl HixlServer {
    /// `HixlCSServerRegMem` of the whole of `buffer` under `tag` (before listening).
    pub fn register(&mut self, tag: &str, buffer: Arc<DeviceBuffer>) -> Result<(), HixlError> {
        let f = self.hixl.server_reg_mem_fn()?;
        let tag = c_text("HixlCSServerRegMem", tag)?;
        let mut handle: sys::HixlMemHandle = std::ptr::null_mut();
        // SAFETY: a live server; `mem` names device memory kept alive as long as the server.
        check("HixlCSServerRegMem", unsafe {
            f(self.raw, tag.as_ptr(), &device_mem(&buffer), &mut handle)
        })?;
        self.registered.push(buffer);
        Ok(())
    }

    /// `HixlCSServerListen`.
    pub fn listen(&self, backlog: u32) -> Result<(), HixlError> {
        let f = self.hixl.server_listen_fn()?;
        // SAFETY: a live server.
        check("HixlCSServerListen", unsafe { f(self.raw, backlog) })
    }
}

impl Drop for HixlServer {
    fn drop(&mut self) {
        let result = self.hixl.server_destroy_fn().and_then(|f| {
            // SAFETY: created by HixlCSServerCreate, destroyed once.
            check("HixlCSServerDestroy", unsafe { f(self.raw) })
        });
        if let Err(error) = result {
            tracing::error!(%error, "destroying a HIXL server failed");
        }
    }
}

/// A HIXL client, destroyed when dropped; it keeps the buffers it registered alive.
pub struct HixlClient {
    hixl: Arc<Hixl>,
    raw: sys::HixlClientHandle,
    registered: Vec<Arc<DeviceBuffer>>,
    /// What the descriptor pointed to, in case the library keeps the pointers.
    _described: (CString, Vec<sys::EndpointDesc>),
}

// SAFETY: the handle is owned here; the channel uses it from one thread at a time.
unsafe impl Send for HixlClient {}

impl HixlClient {
    /// `HixlCSClientRegMem` of the whole of `buffer` under `tag` (before connecting).
    pub fn register(&mut self, tag: &str, buffer: Arc<DeviceBuffer>) -> Result<(), HixlError> {
        let f = self.hixl.client_reg_mem_fn()?;
        let tag = c_text("HixlCSClientRegMem", tag)?;
        let mut handle: sys::HixlMemHandle = std::ptr::null_mut();
        // SAFETY: a live client; `mem` names device memory kept alive as long as the client.
        check("HixlCSClientRegMem", unsafe {
            f(self.raw, tag.as_ptr(), &device_mem(&buffer), &mut handle)
        })?;
        self.registered.push(buffer);
        Ok(())
    }

    /// `HixlCSClientConnect`, waiting at most `timeout`.
    pub fn connect(&self, timeout: Duration) -> Result<(), HixlError> {
        let f = self.hixl.client_connect_fn()?;
        // SAFETY: a live client.
        check("HixlCSClientConnect", unsafe {
            f(self.raw, millis(timeout))
        })
    }

    /// Puts `(local, remote, len)` byte copies and waits until they landed, at most
    /// `timeout`: one `HixlCSClientBatchPutSync` when `sync` (CANN 9.1), else
    /// `HixlCSClientBatchPutAsync` and `HixlCSClientQueryCompleteStatus` until the
    /// deadline.
    ///
    /// # Safety
    /// Every `local` range lies in memory this client registered, every `remote` range in
    /// memory the server registered; neither changes until this returns.
    pub unsafe fn put(
        &self,
        copies: &[(u64, u64, usize)],
        timeout: Duration,
        sync: bool,
    ) -> Result<(), HixlError> {
        let descs: Vec<sys::HixlOneSideOpDesc> = copies
            .iter()
            .map(|&(local, remote, len)| sys::HixlOneSideOpDesc {
                remote_buf: remote as *mut c_void,
                local_buf: local as *mut c_void,
                len: len as u64,
            })
            .collect();
        let n = descs.len() as u32;
        if sync {
            let f = self.hixl.client_put_sync_fn()?;
            // SAFETY: `descs` is valid for the call; the ranges are the caller's promise.
            return check("HixlCSClientBatchPutSync", unsafe {
                f(self.raw, n, descs.as_ptr(), millis(timeout))
            });
        }
        let deadline = Instant::now() + timeout;
        let put = self.hixl.client_put_async_fn()?;
        let query = self.hixl.client_query_fn()?;
        let mut complete: sys::HixlCompleteHandle = std::ptr::null_mut();
        // SAFETY: as above; `complete` is a writable slot.
        check("HixlCSClientBatchPutAsync", unsafe {
            put(self.raw, n, descs.as_ptr(), &mut complete)
        })?;
        let call = "HixlCSClientQueryCompleteStatus";
        loop {
            let mut status = sys::HIXL_COMPLETE_STATUS_WAITING as sys::HixlCompleteStatus;
            // SAFETY: a live client and the handle its put returned; `status` is writable.
            check(call, unsafe { query(self.raw, complete, &mut status) })?;
            // The status is a C enum (int); its values are the u32 constants.
            let outcome = match status as u32 {
                sys::HIXL_COMPLETE_STATUS_COMPLETED => return Ok(()),
                sys::HIXL_COMPLETE_STATUS_WAITING if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                sys::HIXL_COMPLETE_STATUS_WAITING => format!("did not complete within {timeout:?}"),
                sys::HIXL_COMPLETE_STATUS_TIMEOUT => "timed out".to_string(),
                other => format!("failed (status {other})"),
            };
            return Err(HixlError::Incomplete { call, outcome });
        }
    }
}

fn millis(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)
}

impl Drop for HixlClient {
    fn drop(&mut self) {
        let result = self.hixl.client_destroy_fn().and_then(|f| {
            // SAFETY: created by HixlCSClientCreate, destroyed once.
            check("HixlCSClientDestroy", unsafe { f(self.raw) })
        });
        if let Err(error) = result {
            tracing::error!(%error, "destroying a HIXL client failed");
        }
    }
}

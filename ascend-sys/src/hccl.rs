//! HCCL, HCCL one-sided and HIXL: what they need (libraries, symbols, versions) for the
//! capability probe, and the versioned communicator config. Their calls are bound by the
//! PD channels that use them.

use std::ffi::{c_void, CStr};
use std::sync::Arc;

use vendor_dl::{symbol_name, FnPtr, Slot};

use crate::acl::RawStream;
use crate::error::{AclError, LoadError};
use crate::library::{Loaded, Origin};
use crate::search::Lib;
use crate::sys;
use crate::version::CannVersion;

vendor_dl::lazy_symbols! {
    /// The HCCL symbols the two-sided `hccl` channel calls.
    HCCL_TWO_SIDED for Hccl, error HcclError;
    get_root_info_fn: HcclGetRootInfo_fn = HCCL_SYM_GET_ROOT_INFO, "HcclGetRootInfo";
    init_root_info_config_fn: HcclCommInitRootInfoConfig_fn =
        HCCL_SYM_COMM_INIT_ROOT_INFO_CONFIG, "HcclCommInitRootInfoConfig";
    destroy_fn: HcclCommDestroy_fn = HCCL_SYM_COMM_DESTROY, "HcclCommDestroy";
    error_string_fn: HcclGetErrorString_fn = HCCL_SYM_GET_ERROR_STRING, "HcclGetErrorString";
    send_fn: HcclSend_fn = HCCL_SYM_SEND, "HcclSend";
    recv_fn: HcclRecv_fn = HCCL_SYM_RECV, "HcclRecv";
}

/// An HCCL call that failed or could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HcclError {
    /// The call returned a status other than `HCCL_SUCCESS`.
    #[error("{call} returned HcclResult {code}: {message}")]
    Status {
        /// The HCCL function.
        call: &'static str,
        /// The `HcclResult` it returned.
        code: sys::HcclResult,
        /// `HcclGetErrorString`'s text for the code (empty when unavailable).
        message: String,
    },
    /// The library does not export the symbol this call needs
    /// ([`AclError::MissingSymbol`], which names the call, symbol and library).
    #[error(transparent)]
    Unavailable(AclError),
}

/// HCCL's two-sided calls (`libhccl.so`; the communicator calls come from `libhcomm.so`
/// on CANN 8.5+, which `libhccl.so` depends on, so its handle resolves them too).
pub struct Hccl {
    loaded: Loaded,
    symbols: Symbols,
}

impl std::fmt::Debug for Hccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hccl")
            .field("origin", &self.loaded.origin)
            .finish()
    }
}

/// The 4108-byte root info rank 0 hands every other rank out of band.
pub type RootInfo = [u8; sys::ASCEND_SYS_HCCL_ROOT_INFO_BYTES as usize];

impl Hccl {
    /// Finds and opens `libhccl.so` through its search order.
    pub fn load() -> Result<Arc<Hccl>, LoadError> {
        Loaded::load(Lib::Hccl).map(|loaded| {
            Arc::new(Hccl {
                loaded,
                symbols: Symbols::default(),
            })
        })
    }

    /// Where the library was found.
    pub fn origin(&self) -> &Origin {
        &self.loaded.origin
    }

    fn resolve<T: FnPtr>(
        &self,
        slot: &Slot<T>,
        name: &'static [u8],
        call: &'static str,
    ) -> Result<T::Raw, HcclError> {
        resolve_in::<T>(&self.loaded, slot, name, call)
    }

    pub(crate) fn check(&self, call: &'static str, code: sys::HcclResult) -> Result<(), HcclError> {
        if code == sys::HCCL_SUCCESS as sys::HcclResult {
            return Ok(());
        }
        let message = self
            .error_string_fn()
            .ok()
            // SAFETY: takes a code; returns null or a static NUL-terminated string.
            .map(|f| unsafe { f(code) })
            .filter(|text| !text.is_null())
            // SAFETY: checked non-null; copied out at once.
            .map(|text| {
                unsafe { CStr::from_ptr(text) }
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        Err(HcclError::Status {
            call,
            code,
            message,
        })
    }

    /// `HcclGetRootInfo`: rank 0's bootstrap address for a new communicator.
    pub fn root_info(&self) -> Result<RootInfo, HcclError> {
        let f = self.get_root_info_fn()?;
        let mut info = sys::HcclRootInfo {
            internal: [0; sys::ASCEND_SYS_HCCL_ROOT_INFO_BYTES as usize],
        };
        // SAFETY: `info` is a writable HcclRootInfo for the duration of the call.
        self.check("HcclGetRootInfo", unsafe { f(&mut info) })?;
        Ok(info.internal.map(|b| b as u8))
    }

    /// `HcclCommInitRootInfoConfig`: joins the `ranks`-rank communicator `root` names as
    /// `rank`; blocks until every rank joined or HCCL's connect timeout passed.
    pub fn join(
        self: &Arc<Self>,
        ranks: u32,
        root: &RootInfo,
        rank: u32,
        config: &CommConfigV8,
    ) -> Result<Comm, HcclError> {
        let f = self.init_root_info_config_fn()?;
        let info = sys::HcclRootInfo {
            internal: root.map(|b| b as std::ffi::c_char),
        };
        let mut comm: sys::HcclComm = std::ptr::null_mut();
        // SAFETY: `info` and `config` are valid for the call; `comm` is a writable slot.
        self.check("HcclCommInitRootInfoConfig", unsafe {
            f(ranks, &info, rank, &config.0, &mut comm)
        })?;
        Ok(Comm::from_raw(Arc::clone(self), comm))
    }
}

/// Resolves an HCCL-family symbol in `loaded`, failing as [`HcclError::Unavailable`].
pub(crate) fn resolve_in<T: FnPtr>(
    loaded: &Loaded,
    slot: &Slot<T>,
    name: &'static [u8],
    call: &'static str,
) -> Result<T::Raw, HcclError> {
    loaded
        .resolve::<T>(slot, name, call)
        .map_err(HcclError::Unavailable)
}

/// A communicator, destroyed when dropped (which also ends its pending sends and
/// receives).
pub struct Comm {
    hccl: Arc<Hccl>,
    raw: sys::HcclComm,
}

// SAFETY: an HcclComm handle may be used from any thread bound to its device; Comm owns it.
unsafe impl Send for Comm {}

impl Comm {
    /// Takes ownership of a communicator `hccl` made.
    pub(crate) fn from_raw(hccl: Arc<Hccl>, raw: sys::HcclComm) -> Comm {
        Comm { hccl, raw }
    }

    pub(crate) fn raw(&self) -> sys::HcclComm {
        self.raw
    }

    /// `HcclSend` of `len` bytes at device address `buf` to `peer`, issued on `stream`.
    ///
    /// # Safety
    /// `buf` is device memory readable for `len` bytes that stays valid and unchanged
    /// until `stream` is synchronized; `stream` is live.
    pub unsafe fn send(
        &self,
        buf: *const c_void,
        len: usize,
        peer: u32,
        stream: RawStream,
    ) -> Result<(), HcclError> {
        let f = self.hccl.send_fn()?;
        // SAFETY: forwarded from the caller; UINT8 makes the count a byte count.
        let code = unsafe {
            f(
                buf.cast_mut(),
                len as u64,
                sys::HCCL_DATA_TYPE_UINT8,
                peer,
                self.raw,
                stream.0,
            )
        };
        self.hccl.check("HcclSend", code)
    }

    /// `HcclRecv` of `len` bytes from `peer` into device address `buf`, issued on `stream`.
    ///
    /// # Safety
    /// `buf` is device memory writable for `len` bytes, used by nothing else until
    /// `stream` is synchronized or this communicator is dropped; `stream` is live.
    pub unsafe fn recv(
        &self,
        buf: *mut c_void,
        len: usize,
        peer: u32,
        stream: RawStream,
    ) -> Result<(), HcclError> {
        let f = self.hccl.recv_fn()?;
        // SAFETY: forwarded from the caller.
        let code = unsafe {
            f(
                buf,
                len as u64,
                sys::HCCL_DATA_TYPE_UINT8,
                peer,
                self.raw,
                stream.0,
            )
        };
        self.hccl.check("HcclRecv", code)
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        let result = self.hccl.destroy_fn().and_then(|f| {
            // SAFETY: the handle came from an HCCL communicator init and is destroyed once.
            self.hccl.check("HcclCommDestroy", unsafe { f(self.raw) })
        });
        if let Err(error) = result {
            tracing::error!(%error, "destroying an HCCL communicator failed");
        }
    }
}

/// Symbols the two-sided `hccl` channel calls (comm setup in libhcomm.so from 8.5, found
/// through libhccl.so's dependencies; ops in libhccl.so).
pub const TWO_SIDED_SYMBOLS: [&str; 6] = [
    symbol_name(sys::HCCL_SYM_GET_ROOT_INFO),
    symbol_name(sys::HCCL_SYM_COMM_INIT_ROOT_INFO_CONFIG),
    symbol_name(sys::HCCL_SYM_COMM_DESTROY),
    symbol_name(sys::HCCL_SYM_GET_ERROR_STRING),
    symbol_name(sys::HCCL_SYM_SEND),
    symbol_name(sys::HCCL_SYM_RECV),
];

/// Symbols the `hcomm_onesided` channel calls (libhcomm.so from 8.5, libhccl.so before).
pub const ONE_SIDED_SYMBOLS: [&str; 5] = [
    symbol_name(sys::HCCL_SYM_COMM_INIT_CLUSTER_INFO_MEM_CONFIG),
    symbol_name(sys::HCCL_SYM_REGISTER_GLOBAL_MEM),
    symbol_name(sys::HCCL_SYM_COMM_BIND_MEM),
    symbol_name(sys::HCCL_SYM_COMM_PREPARE),
    symbol_name(sys::HCCL_SYM_BATCH_PUT),
];

/// Symbols of HIXL's C client/server API the `hixl` channel needs (libcann_hixl.so).
pub const HIXL_SYMBOLS: [&str; 9] = [
    symbol_name(sys::HIXL_SYM_SERVER_CREATE),
    symbol_name(sys::HIXL_SYM_SERVER_REG_MEM),
    symbol_name(sys::HIXL_SYM_SERVER_LISTEN),
    symbol_name(sys::HIXL_SYM_SERVER_DESTROY),
    symbol_name(sys::HIXL_SYM_CLIENT_CREATE),
    symbol_name(sys::HIXL_SYM_CLIENT_CONNECT),
    symbol_name(sys::HIXL_SYM_CLIENT_REG_MEM),
    symbol_name(sys::HIXL_SYM_CLIENT_BATCH_PUT_ASYNC),
    symbol_name(sys::HIXL_SYM_CLIENT_QUERY_COMPLETE_STATUS),
];

/// HIXL's synchronous batch calls (CANN 9.1).
pub const HIXL_SYNC_SYMBOLS: [&str; 1] = [symbol_name(sys::HIXL_SYM_CLIENT_BATCH_PUT_SYNC)];

/// The HCCL channels pass the version-8 communicator config (CANN 8.5's layout); older
/// libraries were never checked against it, so `hccl` and `hcomm_onesided` need 8.5.
pub const HCCL_TWO_SIDED_MIN: CannVersion = CannVersion::release(8, 5, 0);

/// CANN 8.5 moved communicators and one-sided calls into libhcomm.so.
pub const HCOMM_SPLIT: CannVersion = CannVersion::release(8, 5, 0);
/// HIXL's C client/server API exists from 9.0 ...
pub const HIXL_C_API: CannVersion = CannVersion::release(9, 0, 0);
/// ... but 9.0's structs differ from 9.1's, which are the ones declared here; and the
/// `*Sync` calls come with 9.1.
pub const HIXL_C_API_LAYOUT: CannVersion = CannVersion::release(9, 1, 0);

/// The communicator config, version 8 (CANN 8.5; newer libraries read older versions by
/// the header's size and version fields).
#[repr(transparent)]
pub struct CommConfigV8(pub sys::HcclCommConfigV8);

impl CommConfigV8 {
    /// What the vendor's header-inline `HcclCommConfigInit` writes for version 8: the
    /// header, then every field "not set" so the library applies its defaults.
    pub fn new() -> Self {
        let mut header = [0u8; 24];
        header[..8].copy_from_slice(&(size_of::<sys::HcclCommConfigV8>() as u64).to_ne_bytes());
        header[8..12].copy_from_slice(&sys::ASCEND_SYS_HCCL_COMM_CONFIG_MAGIC.to_ne_bytes());
        header[12..16].copy_from_slice(&sys::ASCEND_SYS_HCCL_COMM_CONFIG_V8.to_ne_bytes());
        CommConfigV8(sys::HcclCommConfigV8 {
            header: header.map(|b| b as std::ffi::c_char),
            hcclBufferSize: sys::ASCEND_SYS_HCCL_NOT_SET,
            hcclDeterministic: sys::ASCEND_SYS_HCCL_NOT_SET,
            hcclCommName: [0; 128],
            hcclUdi: [0; 128],
            hcclOpExpansionMode: 0,
            hcclRdmaTrafficClass: sys::ASCEND_SYS_HCCL_NOT_SET,
            hcclRdmaServiceLevel: sys::ASCEND_SYS_HCCL_NOT_SET,
            hcclWorldRankID: 0,
            hcclJobID: 0,
            aclGraphZeroCopyEnable: 0,
            hcclExecTimeOut: -1,
            hcclAlgo: [0; 1600],
            hcclRetryEnable: [0; 50],
            hcclRetryParams: [0; 128],
        })
    }

    /// Sets the communicator's name (the one-sided setup needs a unique one per process);
    /// `None` when it does not fit the 128-byte field with its NUL or contains a NUL.
    pub fn with_name(mut self, name: &str) -> Option<Self> {
        let bytes = name.as_bytes();
        if bytes.len() >= self.0.hcclCommName.len() || bytes.contains(&0) {
            return None;
        }
        for (dst, &b) in self.0.hcclCommName.iter_mut().zip(bytes) {
            *dst = b as std::ffi::c_char;
        }
        Some(self)
    }
}

impl Default for CommConfigV8 {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_v8_header_says_its_size_magic_and_version() {
        let config = CommConfigV8::new().with_name("kvrelay-pd-0").unwrap();
        // SAFETY: reading the plain-data struct's bytes.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(
                (&config.0 as *const sys::HcclCommConfigV8).cast(),
                size_of::<sys::HcclCommConfigV8>(),
            )
        };
        assert_eq!(bytes.len(), 2104);
        assert_eq!(u64::from_ne_bytes(bytes[0..8].try_into().unwrap()), 2104);
        assert_eq!(
            u32::from_ne_bytes(bytes[8..12].try_into().unwrap()),
            0xf0f0_f0f0
        );
        assert_eq!(u32::from_ne_bytes(bytes[12..16].try_into().unwrap()), 8);
        assert_eq!(&bytes[16..24], &[0; 8]);
        assert_eq!(
            u32::from_ne_bytes(bytes[24..28].try_into().unwrap()),
            u32::MAX
        );
        assert_eq!(&bytes[32..44], b"kvrelay-pd-0");
        assert_eq!(bytes[44], 0);
        assert_eq!(i32::from_ne_bytes(bytes[316..320].try_into().unwrap()), -1);
        assert!(CommConfigV8::new().with_name(&"x".repeat(128)).is_none());
        assert!(CommConfigV8::new().with_name("a\0b").is_none());
    }
}

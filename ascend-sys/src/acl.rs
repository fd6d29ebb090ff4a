//! The ACL runtime (`libascendcl.so`): each symbol resolved on its first call, and the
//! checked calls (the `result` layer) that turn status codes into [`AclError`]s carrying
//! `aclGetRecentErrMsg`'s text.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use vendor_dl::{FnPtr, Slot};

use crate::error::{AclError, AclStatus, LoadError};
use crate::library::{Loaded, Origin};
use crate::search::Lib;
use crate::sys;
use crate::version::{read_version_files, version_files, CannVersion, FoundVersion, VersionSource};

vendor_dl::lazy_symbols! {
    /// Every ACL symbol ascend-sys calls, in the order of `wrapper.h`.
    ACL_SYMBOLS for Acl, error AclError;
    init_fn: aclInit_fn = ACL_SYM_INIT, "aclInit";
    recent_err_msg_fn: aclGetRecentErrMsg_fn = ACL_SYM_GET_RECENT_ERR_MSG, "aclGetRecentErrMsg";
    device_count_fn: aclrtGetDeviceCount_fn = ACL_SYM_GET_DEVICE_COUNT, "aclrtGetDeviceCount";
    set_device_fn: aclrtSetDevice_fn = ACL_SYM_SET_DEVICE, "aclrtSetDevice";
    soc_name_fn: aclrtGetSocName_fn = ACL_SYM_GET_SOC_NAME, "aclrtGetSocName";
    create_stream_fn: aclrtCreateStream_fn = ACL_SYM_CREATE_STREAM, "aclrtCreateStream";
    destroy_stream_fn: aclrtDestroyStream_fn = ACL_SYM_DESTROY_STREAM, "aclrtDestroyStream";
    synchronize_stream_fn: aclrtSynchronizeStream_fn =
        ACL_SYM_SYNCHRONIZE_STREAM, "aclrtSynchronizeStream";
    malloc_fn: aclrtMalloc_fn = ACL_SYM_MALLOC, "aclrtMalloc";
    free_fn: aclrtFree_fn = ACL_SYM_FREE, "aclrtFree";
    malloc_host_fn: aclrtMallocHost_fn = ACL_SYM_MALLOC_HOST, "aclrtMallocHost";
    free_host_fn: aclrtFreeHost_fn = ACL_SYM_FREE_HOST, "aclrtFreeHost";
    memcpy_fn: aclrtMemcpy_fn = ACL_SYM_MEMCPY, "aclrtMemcpy";
    memcpy_async_fn: aclrtMemcpyAsync_fn = ACL_SYM_MEMCPY_ASYNC, "aclrtMemcpyAsync";
    memcpy_batch_async_fn: aclrtMemcpyBatchAsync_fn =
        ACL_SYM_MEMCPY_BATCH_ASYNC, "aclrtMemcpyBatchAsync";
    version_str_fn: aclsysGetVersionStr_fn = ACL_SYM_GET_VERSION_STR, "aclsysGetVersionStr";
    version_num_fn: aclsysGetVersionNum_fn = ACL_SYM_GET_VERSION_NUM, "aclsysGetVersionNum";
}

/// The name of the marker symbol the `ascend-emu` test double exports, so reports and
/// figures measured on it can say they are emulated. No real CANN library exports it.
pub const TEST_DOUBLE_MARKER: &str = "ascend_emu_test_double";

/// The package names `aclsysGetVersionStr` knows and kvrelay reads.
pub const VERSION_PACKAGES: [&str; 3] = ["runtime", "hccl", "driver"];

/// `aclInit`'s answer when the process already initialized ACL (torch_npu did, or we did).
const ACL_ERROR_REPEAT_INITIALIZE: sys::aclError = 100002;

/// The opened ACL runtime. Symbols resolve on first use; a missing one is an
/// [`AclError::MissingSymbol`] from the call that needs it.
pub struct Acl {
    loaded: Loaded,
    test_double: bool,
    initialized: OnceLock<Result<(), AclError>>,
    symbols: Symbols,
}

impl std::fmt::Debug for Acl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acl")
            .field("origin", &self.loaded.origin)
            .field("test_double", &self.test_double)
            .finish()
    }
}

/// Direction of a copy, as `aclrtMemcpyKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyKind {
    /// `ACL_MEMCPY_HOST_TO_DEVICE`.
    HostToDevice,
    /// `ACL_MEMCPY_DEVICE_TO_HOST`.
    DeviceToHost,
    /// `ACL_MEMCPY_DEVICE_TO_DEVICE`.
    DeviceToDevice,
}

impl CopyKind {
    fn raw(self) -> sys::aclrtMemcpyKind {
        match self {
            CopyKind::HostToDevice => sys::ACL_MEMCPY_HOST_TO_DEVICE,
            CopyKind::DeviceToHost => sys::ACL_MEMCPY_DEVICE_TO_HOST,
            CopyKind::DeviceToDevice => sys::ACL_MEMCPY_DEVICE_TO_DEVICE,
        }
    }
}

/// A raw stream handle (`aclrtStream`); [`crate::Stream`] owns one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawStream(pub(crate) *mut c_void);

impl Acl {
    /// Finds and opens `libascendcl.so` through the documented search order.
    pub fn load() -> Result<Acl, LoadError> {
        Loaded::load(Lib::AscendCl).map(Self::accept)
    }

    /// The process-wide runtime, loaded once by [`Acl::load`] on first use. A failure is
    /// cached too: the environment that decides the search is read once.
    pub fn global() -> Result<Arc<Acl>, LoadError> {
        static GLOBAL: OnceLock<Result<Arc<Acl>, LoadError>> = OnceLock::new();
        GLOBAL.get_or_init(|| Self::load().map(Arc::new)).clone()
    }

    /// Opens the library at `path` (a file path, or a bare name for the system search).
    pub fn open(path: impl AsRef<Path>) -> Result<Acl, LoadError> {
        Loaded::open(Lib::AscendCl, path).map(Self::accept)
    }

    fn accept(loaded: Loaded) -> Acl {
        Acl {
            test_double: loaded.has(TEST_DOUBLE_MARKER),
            loaded,
            initialized: OnceLock::new(),
            symbols: Symbols::default(),
        }
    }

    /// Where the library was found.
    pub fn origin(&self) -> &Origin {
        &self.loaded.origin
    }

    /// True for the `ascend-emu` test double: figures measured on it are emulated.
    pub fn is_test_double(&self) -> bool {
        self.test_double
    }

    /// How many ACL, HCCL and HIXL calls the `ascend-emu` test double has answered in this
    /// process (its own counter); `None` on a real runtime.
    pub fn test_double_calls(&self) -> Option<u64> {
        if !self.test_double {
            return None;
        }
        // SAFETY: the test double exports `ascend_emu_calls` as `uint64_t (*)(void)`.
        let f = unsafe {
            self.loaded
                .lib
                .get::<unsafe extern "C" fn() -> u64>(b"ascend_emu_calls\0")
        }
        .ok()?;
        // SAFETY: takes nothing and reads a counter; the library stays loaded with `self`.
        Some(unsafe { f() })
    }

    /// On the ascend-emu test double, the copy calls of `kind` it accepted so far (sync,
    /// async or batch, each call once); `None` on any other library.
    pub fn test_double_copy_calls(&self, kind: CopyKind) -> Option<u64> {
        if !self.test_double {
            return None;
        }
        // SAFETY: the test double exports `ascend_emu_copy_calls` as
        // `uint64_t (*)(int32_t)`.
        let f = unsafe {
            self.loaded
                .lib
                .get::<unsafe extern "C" fn(sys::aclrtMemcpyKind) -> u64>(
                    b"ascend_emu_copy_calls\0",
                )
        }
        .ok()?;
        // SAFETY: takes a kind by value and reads a counter; the library stays loaded with
        // `self`.
        Some(unsafe { f(kind.raw()) })
    }

    /// Whether the library exports `symbol` (probe only).
    pub fn has(&self, symbol: &str) -> bool {
        self.loaded.has(symbol)
    }

    /// The bound ACL symbols this library does not export.
    pub fn missing_symbols(&self) -> Vec<&'static str> {
        let names: Vec<&'static str> = ACL_SYMBOLS.iter().map(|s| s.name).collect();
        self.loaded.missing(&names)
    }

    fn resolve<T: FnPtr>(
        &self,
        slot: &Slot<T>,
        name: &'static [u8],
        call: &'static str,
    ) -> Result<T::Raw, AclError> {
        self.loaded.resolve::<T>(slot, name, call)
    }

    /// `Ok` for success; otherwise the error, with `aclGetRecentErrMsg`'s text.
    fn check(&self, call: &'static str, status: sys::aclError) -> Result<(), AclError> {
        if status == sys::ACL_SUCCESS {
            return Ok(());
        }
        Err(AclError::Status {
            call,
            status: AclStatus(status),
            message: self.recent_error_message().unwrap_or_default(),
        })
    }

    // ---- checked calls (the `result` layer) ------------------------------------------

    /// `aclInit(NULL)` once per process; a process that already initialized ACL (e.g.
    /// torch_npu) is fine. Every other call here needs it first.
    pub fn init(&self) -> Result<(), AclError> {
        self.initialized
            .get_or_init(|| {
                let f = self.init_fn()?;
                // SAFETY: a null config path means "no configuration file".
                let status = unsafe { f(std::ptr::null()) };
                if status == ACL_ERROR_REPEAT_INITIALIZE {
                    return Ok(());
                }
                self.check("aclInit", status)
            })
            .clone()
    }

    /// The calling thread's most recent error text, if the library has the call and any.
    pub fn recent_error_message(&self) -> Option<String> {
        let f = self.recent_err_msg_fn().ok()?;
        // SAFETY: takes nothing; returns null or a NUL-terminated string the runtime owns
        // until the thread's next call.
        let text = unsafe { f() };
        // SAFETY: checked non-null; copied out at once.
        (!text.is_null()).then(|| {
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        })
    }

    /// Devices visible to this process (after `ASCEND_RT_VISIBLE_DEVICES`).
    pub fn device_count(&self) -> Result<u32, AclError> {
        self.init()?;
        let f = self.device_count_fn()?;
        let mut count = 0u32;
        // SAFETY: `count` is a writable u32 for the duration of the call.
        self.check("aclrtGetDeviceCount", unsafe { f(&mut count) })?;
        Ok(count)
    }

    /// Binds the calling thread to `device` (a logical id); copies must be issued from
    /// threads bound to their device.
    pub fn set_device(&self, device: u32) -> Result<(), AclError> {
        self.init()?;
        let f = self.set_device_fn()?;
        let id = i32::try_from(device).map_err(|_| AclError::InvalidValue {
            call: "aclrtSetDevice",
            what: "device id",
            value: device.to_string(),
        })?;
        // SAFETY: takes a device id; an unknown one is an error status.
        self.check("aclrtSetDevice", unsafe { f(id) })
    }

    /// The chip's name (e.g. "Ascend910B1").
    pub fn soc_name(&self) -> Result<String, AclError> {
        let f = self.soc_name_fn()?;
        // SAFETY: takes nothing; returns null or a static NUL-terminated string.
        let name = unsafe { f() };
        if name.is_null() {
            return Err(AclError::InvalidValue {
                call: "aclrtGetSocName",
                what: "name",
                value: "NULL".into(),
            });
        }
        // SAFETY: checked non-null.
        Ok(unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned())
    }

    /// Creates a stream on the calling thread's device.
    pub(crate) fn create_stream(&self) -> Result<RawStream, AclError> {
        let f = self.create_stream_fn()?;
        let mut stream = std::ptr::null_mut();
        // SAFETY: `stream` is a writable handle slot during the call.
        self.check("aclrtCreateStream", unsafe { f(&mut stream) })?;
        Ok(RawStream(stream))
    }

    /// # Safety
    /// `stream` came from [`Acl::create_stream`], is destroyed once, and has no pending work.
    pub(crate) unsafe fn destroy_stream(&self, stream: RawStream) -> Result<(), AclError> {
        let f = self.destroy_stream_fn()?;
        // SAFETY: forwarded from the caller.
        self.check("aclrtDestroyStream", unsafe { f(stream.0) })
    }

    /// Waits until everything issued on `stream` has completed.
    pub fn synchronize_stream(&self, stream: RawStream) -> Result<(), AclError> {
        let f = self.synchronize_stream_fn()?;
        // SAFETY: a live stream handle (RawStream is only handed out by Stream, which
        // keeps it alive); an unknown one is an error status.
        self.check("aclrtSynchronizeStream", unsafe { f(stream.0) })
    }

    /// Allocates `len` bytes of device memory (huge pages first) on the thread's device.
    pub(crate) fn malloc(&self, len: usize) -> Result<*mut c_void, AclError> {
        let f = self.malloc_fn()?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is a writable pointer slot during the call.
        self.check("aclrtMalloc", unsafe {
            f(&mut ptr, len, sys::ACL_MEM_MALLOC_HUGE_FIRST)
        })?;
        Ok(ptr)
    }

    /// # Safety
    /// `ptr` came from [`Acl::malloc`], is freed once, and no copy that uses it is pending.
    pub(crate) unsafe fn free(&self, ptr: *mut c_void) -> Result<(), AclError> {
        let f = self.free_fn()?;
        // SAFETY: forwarded from the caller.
        self.check("aclrtFree", unsafe { f(ptr) })
    }

    /// Allocates `len` bytes of page-locked host memory.
    pub(crate) fn malloc_host(&self, len: usize) -> Result<*mut c_void, AclError> {
        let f = self.malloc_host_fn()?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is a writable pointer slot during the call.
        self.check("aclrtMallocHost", unsafe { f(&mut ptr, len) })?;
        Ok(ptr)
    }

    /// # Safety
    /// `ptr` came from [`Acl::malloc_host`], is freed once, and no copy uses it.
    pub(crate) unsafe fn free_host(&self, ptr: *mut c_void) -> Result<(), AclError> {
        let f = self.free_host_fn()?;
        // SAFETY: forwarded from the caller.
        self.check("aclrtFreeHost", unsafe { f(ptr) })
    }

    /// Synchronous copy of `len` bytes.
    ///
    /// # Safety
    /// `src` is readable and `dst` writable for `len` bytes, on the sides `kind` says, and
    /// `dst` is not otherwise used during the copy.
    pub unsafe fn memcpy(
        &self,
        dst: *mut c_void,
        src: *const c_void,
        len: usize,
        kind: CopyKind,
    ) -> Result<(), AclError> {
        let f = self.memcpy_fn()?;
        // SAFETY: forwarded from the caller; destMax is the copy's own length.
        self.check("aclrtMemcpy", unsafe { f(dst, len, src, len, kind.raw()) })
    }

    /// Issues a copy on `stream`; it has landed after [`Acl::synchronize_stream`].
    ///
    /// # Safety
    /// As [`Acl::memcpy`], host memory is pinned ([`crate::PinnedHost`]), and both ranges
    /// stay valid and untouched until the stream is synchronized.
    pub unsafe fn memcpy_async(
        &self,
        dst: *mut c_void,
        src: *const c_void,
        len: usize,
        kind: CopyKind,
        stream: RawStream,
    ) -> Result<(), AclError> {
        let f = self.memcpy_async_fn()?;
        // SAFETY: forwarded from the caller.
        self.check("aclrtMemcpyAsync", unsafe {
            f(dst, len, src, len, kind.raw(), stream.0)
        })
    }

    /// Issues one batch of copies, all host-to-device or all device-to-host between the
    /// host and `device`, on `stream`. On failure the error names the failing copy when
    /// the runtime says which.
    ///
    /// # Safety
    /// For each `i`, as [`Acl::memcpy_async`] for `(dsts[i], srcs[i], sizes[i])`.
    pub unsafe fn memcpy_batch_async(
        &self,
        dsts: &mut [*mut c_void],
        srcs: &mut [*mut c_void],
        sizes: &mut [usize],
        kind: CopyKind,
        device: u32,
        stream: RawStream,
    ) -> Result<(), AclError> {
        let call = "aclrtMemcpyBatchAsync";
        let f = self.memcpy_batch_async_fn()?;
        let n = sizes.len();
        if dsts.len() != n || srcs.len() != n || kind == CopyKind::DeviceToDevice {
            return Err(AclError::InvalidValue {
                call,
                what: "batch (lengths differ, or device-to-device)",
                value: format!(
                    "{} dsts, {} srcs, {n} sizes, {kind:?}",
                    dsts.len(),
                    srcs.len()
                ),
            });
        }
        let host = sys::aclrtMemLocation {
            id: 0,
            type_: sys::ACL_MEM_LOCATION_TYPE_HOST,
        };
        let dev = sys::aclrtMemLocation {
            id: device,
            type_: sys::ACL_MEM_LOCATION_TYPE_DEVICE,
        };
        let (dst_loc, src_loc) = match kind {
            CopyKind::HostToDevice => (dev, host),
            _ => (host, dev),
        };
        // One attribute for the whole batch, as vllm-ascend passes it.
        let mut attr = sys::aclrtMemcpyBatchAttr {
            dstLoc: dst_loc,
            srcLoc: src_loc,
            rsv: [0; 16],
        };
        let mut attr_index = 0usize;
        let mut dest_maxs = sizes.to_vec();
        let mut fail_index = usize::MAX;
        // SAFETY: every array has `n` entries (checked above) and lives through the call;
        // the copies' ranges are valid per the caller; attr/index/failIndex are writable.
        let status = unsafe {
            f(
                dsts.as_mut_ptr(),
                dest_maxs.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                n,
                &mut attr,
                &mut attr_index,
                1,
                &mut fail_index,
                stream.0,
            )
        };
        self.check(call, status).map_err(|e| match e {
            AclError::Status {
                call,
                status,
                message,
            } if fail_index < n => AclError::Status {
                call,
                status,
                message: format!("copy {fail_index} of {n} failed; {message}"),
            },
            other => other,
        })
    }

    /// One package's version ("runtime", "hccl", "driver"): from `aclsysGetVersionStr`,
    /// else `aclsysGetVersionNum`, else the install tree's version files. The error says
    /// why none of them gave one.
    pub fn version(&self, pkg: &str) -> Result<FoundVersion, String> {
        let mut why = Vec::new();
        match self.version_str(pkg) {
            Ok(text) => match CannVersion::parse(&text) {
                Some(version) => {
                    return Ok(FoundVersion {
                        version,
                        text,
                        source: VersionSource::VersionStr,
                    })
                }
                None => why.push(format!("aclsysGetVersionStr gave {text:?}")),
            },
            Err(e) => why.push(e.to_string()),
        }
        match self.version_num(pkg) {
            Ok(num) => match CannVersion::from_num(num) {
                Some(version) => {
                    return Ok(FoundVersion {
                        version,
                        text: num.to_string(),
                        source: VersionSource::VersionNum,
                    })
                }
                None => why.push(format!("aclsysGetVersionNum gave {num}")),
            },
            Err(e) => why.push(e.to_string()),
        }
        let files: Vec<PathBuf> = self
            .install_roots()
            .iter()
            .flat_map(|root| version_files(root, pkg))
            .collect();
        if let Some(found) = read_version_files(&files) {
            return Ok(found);
        }
        let shown: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        why.push(format!("no readable version in {}", shown.join(", ")));
        Err(why.join("; "))
    }

    /// Install roots whose version files describe this library: `$ASCEND_HOME_PATH`, then
    /// the tree the library was loaded from.
    pub fn install_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = std::env::var_os("ASCEND_HOME_PATH")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .into_iter()
            .collect();
        for root in self.loaded.origin.install_roots() {
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        roots
    }

    fn version_str(&self, pkg: &str) -> Result<String, AclError> {
        let call = "aclsysGetVersionStr";
        let f = self.version_str_fn()?;
        let name = package_name(call, pkg)?;
        let mut out = [0 as c_char; sys::ASCEND_SYS_VERSION_STR_LEN as usize];
        // SAFETY: `name` is NUL-terminated (the runtime does not write it despite the
        // non-const prototype); `out` has the documented 128 bytes.
        self.check(call, unsafe {
            f(name.as_ptr().cast_mut(), out.as_mut_ptr())
        })?;
        // A runtime that filled all 128 bytes left no NUL: read only up to the end.
        let bytes: Vec<u8> = out
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    fn version_num(&self, pkg: &str) -> Result<i32, AclError> {
        let call = "aclsysGetVersionNum";
        let f = self.version_num_fn()?;
        let name = package_name(call, pkg)?;
        let mut num = 0i32;
        // SAFETY: as in version_str; `num` is writable during the call.
        self.check(call, unsafe { f(name.as_ptr().cast_mut(), &mut num) })?;
        Ok(num)
    }
}

fn package_name(call: &'static str, pkg: &str) -> Result<CString, AclError> {
    CString::new(pkg).map_err(|_| AclError::InvalidValue {
        call,
        what: "package name",
        value: pkg.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::Candidate;

    #[test]
    fn a_missing_library_is_a_typed_error_naming_it_and_where_it_looked() {
        let err = Acl::open("/nonexistent/libascendcl.so").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot open libascendcl.so at /nonexistent/libascendcl.so: \
             /nonexistent/libascendcl.so: cannot open shared object file: No such file or directory"
        );
        let candidates = vec![
            Candidate::AlreadyLoaded("libascendcl-not-loaded.so"),
            Candidate::Install {
                path: "/nonexistent/lib64/libascendcl.so".into(),
                from: "ASCEND_HOME_PATH",
            },
            Candidate::System("libascendcl-not-installed.so"),
        ];
        let err = Loaded::load_from(Lib::AscendCl, candidates).unwrap_err();
        let LoadError::NotFound {
            library,
            var,
            tried,
        } = &err
        else {
            panic!("expected NotFound, got {err:?}");
        };
        assert_eq!((*library, *var), ("libascendcl.so", "KVRELAY_ASCENDCL_LIB"));
        assert_eq!(tried.len(), 3);
        assert_eq!(tried[0].reason, "not loaded");
        assert_eq!(tried[1].reason, "no such file");
        let text = err.to_string();
        assert!(text.contains("set KVRELAY_ASCENDCL_LIB"), "{text}");
        assert!(
            text.contains("/nonexistent/lib64/libascendcl.so (ASCEND_HOME_PATH): no such file"),
            "{text}"
        );
    }

    /// libc stands in for a runtime that lacks symbols: it opens, and each call reports
    /// the symbol it needs, the same way every time.
    #[test]
    fn a_missing_symbol_is_an_error_at_the_call_not_at_load() {
        let acl = Acl::open("libc.so.6").unwrap();
        assert!(acl.origin().path.contains("libc"), "{:?}", acl.origin());
        assert!(!acl.is_test_double());
        assert_eq!(acl.missing_symbols().len(), ACL_SYMBOLS.len());
        let err = acl.device_count().unwrap_err();
        let AclError::MissingSymbol {
            call,
            symbol,
            library,
            ..
        } = &err
        else {
            panic!("expected MissingSymbol, got {err:?}");
        };
        assert_eq!((*call, *symbol), ("aclInit", "aclInit"));
        assert!(library.contains("libc"), "{library}");
        assert_eq!(acl.device_count().unwrap_err(), err);
        assert!(acl.recent_error_message().is_none());
        // Without the version calls the version comes from files, and the error says
        // which calls and files were tried.
        let why = acl.version("runtime").unwrap_err();
        assert!(
            why.contains("symbol aclsysGetVersionStr is missing"),
            "{why}"
        );
        assert!(why.contains("share/info/runtime/version.info"), "{why}");
    }

    #[test]
    fn status_codes_name_themselves() {
        assert_eq!(
            AclStatus(sys::ACL_ERROR_RT_COPY_DATA).to_string(),
            "ACL_ERROR_RT_COPY_DATA (507052)"
        );
        assert_eq!(AclStatus(-3).to_string(), "aclError -3");
    }
}

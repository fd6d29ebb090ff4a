//! # ascend-emu — a TEST DOUBLE of CANN's ACL runtime, not the runtime
//!
//! A `cdylib` that exports the ACL symbols `ascend-sys` binds, with their real names and C
//! ABI, and emulates them on host memory, so kvrelay's Ascend path can be tested and
//! benchmarked without Ascend hardware or CANN. It is never linked into kvrelay: tests
//! load it through ascend-sys's ordinary loading path (`KVRELAY_ASCENDCL_LIB=<target
//! dir>/<profile>/libascend_emu.so`, or a fake install tree from
//! `ascend_sys::test_double::fake_home` under `ASCEND_HOME_PATH`). Its SONAME is
//! `libascendcl.so`, as the real library's is.
//!
//! What it emulates:
//! - `aclInit` once per process (a second call answers `ACL_ERROR_REPEAT_INITIALIZE`);
//!   every device call before it fails with `ACL_ERROR_UNINITIALIZE`.
//! - devices: `aclrtGetDeviceCount` and `aclrtSetDevice`, which binds the calling thread;
//!   allocations, streams and async copies from a thread not bound to the device fail.
//!   `ASCEND_RT_VISIBLE_DEVICES` picks and renumbers physical devices, as CANN does.
//! - device memory: `aclrtMalloc` hands out addresses in a range no host pointer uses
//!   (dereferencing one faults), 2 MiB aligned, with unmapped 2 MiB gaps between
//!   allocations. Each allocation is backed by its own memfd mapped `MAP_SHARED`, so a
//!   later version can map the same bytes into a second process (HCCL, one-sided and HIXL
//!   emulation moving bytes between two processes).
//! - pinned host memory: `aclrtMallocHost` / `aclrtFreeHost`. Async copies whose host side
//!   is not inside pinned memory fail (the real runtime then behaves unpredictably).
//! - copies: every device range must lie inside one live allocation of the right device
//!   and `destMax` must cover the count, or the call fails without copying a byte.
//!   `aclrtMemcpy` copies at once; `aclrtMemcpyAsync` and `aclrtMemcpyBatchAsync` queue on
//!   their stream and land only at `aclrtSynchronizeStream`, so a caller that reads before
//!   synchronizing sees stale bytes, as on the device. Device-to-device copies need both
//!   ranges on the stream's device (no peer access is emulated). The batch call refuses
//!   mixed or device-to-device directions, as the runtime documents, and reports the
//!   failing copy in `failIndex`.
//! - `aclGetRecentErrMsg`: the calling thread's last error text.
//! - versions: `aclsysGetVersionStr` / `aclsysGetVersionNum` read
//!   `$ASCEND_HOME_PATH/share/info/<pkg>/version.info` as the runtime does.
//!
//! Knobs (environment variables, read once at the first call):
//! - `ASCEND_EMU_CANN_VERSION`: the version reported for `runtime` and `hccl`, overriding
//!   the version files. Below 8.5, `aclrtMemcpyBatchAsync` answers
//!   `ACL_ERROR_API_NOT_SUPPORT`, as a pre-8.5 runtime without it cannot do batches.
//! - `ASCEND_EMU_DRIVER_VERSION` (default 25.5.0): the `driver` version.
//! - `ASCEND_EMU_DEVICES` (default 1): physical devices.
//! - `ASCEND_EMU_FAIL_AFTER=N`: copy calls (sync, async or batch) after the first N fail
//!   with `ACL_ERROR_RT_COPY_DATA` without copying; `ASCEND_EMU_FAIL_COUNT=M` makes only
//!   M of them fail (a transient error).
//! - `ASCEND_EMU_FAIL_SYNC_AFTER=N`: stream synchronizes after the first N fail with
//!   `ACL_ERROR_RT_COPY_DATA` and drop the copies they were to land (nothing is written).
//! - `ASCEND_EMU_FAIL_D2D_AFTER=N`: device-to-device copy calls after the first N fail with
//!   `ACL_ERROR_RT_COPY_DATA` without copying (other directions are unaffected).
//!
//! `ascend_emu_copy_calls(kind)` answers how many copy calls (sync, async or batch) of
//! `aclrtMemcpyKind` `kind` were accepted, so tests can tell which way KV moved.
//!
//! HCCL two-sided (`HcclGetRootInfo`, `HcclCommInitRootInfoConfig`, `HcclSend`,
//! `HcclRecv`, `HcclCommDestroy`, `HcclGetErrorString`) is emulated in [`hccl`], with its
//! own knobs; point `KVRELAY_HCCL_LIB` at this library too (the device memory the calls
//! move is this library's). HCCL one-sided (`HcclRegisterGlobalMem`,
//! `HcclCommInitClusterInfoMemConfig`, `HcclCommBindMem`, `HcclCommPrepare`,
//! `HcclBatchPut`) is emulated in [`onesided`]: the peer's registered device memory is
//! mapped into the putting process (`KVRELAY_HCOMM_LIB` points here too); HIXL's client/
//! server C API (9.1) in [`hixl`], over the same mapping (`KVRELAY_HIXL_LIB`).
//!
//! Every export catches panics and returns `ACL_ERROR_INTERNAL_ERROR`; none unwinds into C.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ascend_sys::sys::{self, aclError, aclrtMemcpyBatchAttr, aclrtMemcpyKind, aclrtStream};
use ascend_sys::CannVersion;

mod hccl;
mod hixl;
mod onesided;

/// Marks this library as the test double (`ascend_sys::TEST_DOUBLE_MARKER`).
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static ascend_emu_test_double: u8 = 1;

/// ACL, HCCL and HIXL calls this library answered (every export counts once).
static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_call() {
    CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// `uint64_t ascend_emu_calls(void)`: the calls answered so far
/// (`ascend_sys::Acl::test_double_calls`), for benches that report calls per request.
#[no_mangle]
pub extern "C" fn ascend_emu_calls() -> u64 {
    CALLS.load(std::sync::atomic::Ordering::Relaxed)
}

/// `uint64_t ascend_emu_copy_calls(int32_t kind)`: the copy calls (sync, async or batch)
/// of `aclrtMemcpyKind` `kind` accepted so far; 0 for a kind that does not exist
/// (`ascend_sys::Acl::test_double_copy_calls`).
#[no_mangle]
pub extern "C" fn ascend_emu_copy_calls(kind: aclrtMemcpyKind) -> u64 {
    usize::try_from(kind)
        .ok()
        .and_then(|k| state().copies_by_kind.get(k).copied())
        .unwrap_or(0)
}

const SUCCESS: aclError = sys::ACL_SUCCESS;
const UNINITIALIZE: aclError = 100001;
const REPEAT_INITIALIZE: aclError = 100002;
const INVALID_FILE: aclError = 100003;
const INVALID_PARAM: aclError = sys::ACL_ERROR_INVALID_PARAM;
const API_NOT_SUPPORT: aclError = sys::ACL_ERROR_API_NOT_SUPPORT;
const BAD_ALLOC: aclError = sys::ACL_ERROR_BAD_ALLOC;
const INTERNAL: aclError = sys::ACL_ERROR_INTERNAL_ERROR;
const INVALID_DEVICE: aclError = sys::ACL_ERROR_RT_INVALID_DEVICEID;
const CONTEXT_NULL: aclError = 107002;
const COPY_DATA: aclError = sys::ACL_ERROR_RT_COPY_DATA;

/// The first emulated device address: far outside the x86_64 user address space, so a
/// device address used as a host pointer faults and a host pointer used as a device
/// address is unknown.
const DEVICE_BASE: u64 = 0x4000_0000_0000_0000;
/// Device allocations are 2 MiB aligned and 2 MiB apart, so an overrun is never another
/// allocation's bytes.
const DEVICE_ALIGN: u64 = 2 << 20;

/// The first version with `aclrtMemcpyBatchAsync`.
const BATCH_COPY: CannVersion = CannVersion::release(8, 5, 0);

struct Config {
    cann_version: Option<String>,
    driver_version: String,
    /// Physical ids of the visible devices, by logical id.
    visible: Vec<u32>,
    fail_after: Option<u64>,
    fail_count: Option<u64>,
    fail_sync_after: Option<u64>,
    fail_d2d_after: Option<u64>,
}

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let text = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let number = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let physical = number("ASCEND_EMU_DEVICES").unwrap_or(1) as u32;
        let visible = match text("ASCEND_RT_VISIBLE_DEVICES") {
            Some(list) => list
                .split(',')
                .filter_map(|id| id.trim().parse::<u32>().ok())
                .filter(|&id| id < physical)
                .collect(),
            None => (0..physical).collect(),
        };
        Config {
            cann_version: text("ASCEND_EMU_CANN_VERSION"),
            driver_version: text("ASCEND_EMU_DRIVER_VERSION").unwrap_or_else(|| "25.5.0".into()),
            visible,
            fail_after: number("ASCEND_EMU_FAIL_AFTER"),
            fail_count: number("ASCEND_EMU_FAIL_COUNT"),
            fail_sync_after: number("ASCEND_EMU_FAIL_SYNC_AFTER"),
            fail_d2d_after: number("ASCEND_EMU_FAIL_D2D_AFTER"),
        }
    })
}

/// One device allocation: a memfd mapped shared into this process.
struct DeviceAlloc {
    len: usize,
    device: u32,
    host: *mut u8,
    map_len: usize,
    fd: libc::c_int,
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        // SAFETY: mapped and opened in `device_alloc`, released once here.
        unsafe {
            libc::munmap(self.host.cast(), self.map_len);
            libc::close(self.fd);
        }
    }
}

/// One copy as the caller asked for it.
struct Request {
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: aclrtMemcpyKind,
}

/// One queued copy, with host addresses resolved when it was issued.
#[derive(Clone, Copy)]
struct Copy {
    dst: *mut u8,
    src: *const u8,
    len: usize,
}

struct StreamState {
    device: u32,
    pending: Vec<Copy>,
    /// HCCL sends and receives issued on the stream, each with its execution timeout.
    hccl: Vec<(Arc<hccl::Completion>, Duration)>,
}

struct State {
    initialized: bool,
    device_allocs: BTreeMap<u64, DeviceAlloc>,
    next_device_addr: u64,
    /// Pinned host allocations: start address → (length, mapping length).
    pinned: BTreeMap<usize, (usize, usize)>,
    streams: BTreeMap<usize, StreamState>,
    next_stream: usize,
    copies: u64,
    /// Accepted copy calls by `aclrtMemcpyKind` (H2H, H2D, D2H, D2D).
    copies_by_kind: [u64; 4],
    syncs: u64,
}

// SAFETY: the raw pointers are owned mappings (or queued copies' addresses, valid by the
// API contract until the synchronize), only touched under the state mutex.
unsafe impl Send for State {}

fn state() -> MutexGuard<'static, State> {
    static STATE: Mutex<State> = Mutex::new(State {
        initialized: false,
        device_allocs: BTreeMap::new(),
        next_device_addr: DEVICE_BASE,
        pinned: BTreeMap::new(),
        streams: BTreeMap::new(),
        next_stream: 1,
        copies: 0,
        copies_by_kind: [0; 4],
        syncs: 0,
    });
    // A panic while holding the lock is caught at the export; the state stays usable.
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    /// The logical device `aclrtSetDevice` bound this thread to.
    static CURRENT_DEVICE: Cell<Option<u32>> = const { Cell::new(None) };
    /// The thread's last error text, for `aclGetRecentErrMsg`.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// An error status with its text for `aclGetRecentErrMsg`.
struct Failure(aclError, String);

type Outcome = Result<(), Failure>;

fn fail<T>(code: aclError, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(code, message.into()))
}

/// Runs an export body: records the error text of a failure, turns a panic into
/// `ACL_ERROR_INTERNAL_ERROR`.
fn export(body: impl FnOnce() -> Outcome) -> aclError {
    count_call();
    let outcome = catch_unwind(AssertUnwindSafe(body))
        .unwrap_or_else(|_| fail(INTERNAL, "ascend-emu: internal panic"));
    match outcome {
        Ok(()) => SUCCESS,
        Err(Failure(code, message)) => {
            record_error(&message);
            code
        }
    }
}

/// Keeps `message` as the calling thread's last error text.
fn record_error(message: &str) {
    let text = CString::new(format!("ascend-emu test double: {message}")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
}

fn initialized() -> Result<MutexGuard<'static, State>, Failure> {
    let state = state();
    if !state.initialized {
        return fail(UNINITIALIZE, "aclInit has not been called");
    }
    Ok(state)
}

/// The calling thread's device.
fn current_device() -> Result<u32, Failure> {
    CURRENT_DEVICE.get().ok_or_else(|| {
        Failure(
            CONTEXT_NULL,
            "this thread has not called aclrtSetDevice".into(),
        )
    })
}

impl State {
    /// The allocation device range `addr..addr + len` lies in, with its device address.
    fn device_alloc(&self, addr: u64, len: usize) -> Result<(u64, &DeviceAlloc), Failure> {
        let bad = || {
            Failure(
                INVALID_PARAM,
                format!(
                    "{len} bytes at device address {addr:#x} are not inside one device allocation"
                ),
            )
        };
        let (&base, alloc) = self
            .device_allocs
            .range(..=addr)
            .next_back()
            .ok_or_else(bad)?;
        match ((addr - base) as usize).checked_add(len) {
            Some(end) if end <= alloc.len => Ok((base, alloc)),
            _ => Err(bad()),
        }
    }

    /// The host address of device range `addr..addr + len`, if it lies in one allocation.
    fn device_range(&self, addr: u64, len: usize) -> Result<(*mut u8, u32), Failure> {
        let (base, alloc) = self.device_alloc(addr, len)?;
        Ok((
            alloc.host.wrapping_add((addr - base) as usize),
            alloc.device,
        ))
    }

    /// Whether host range `addr..addr + len` lies in one pinned allocation.
    fn is_pinned(&self, addr: usize, len: usize) -> bool {
        self.pinned
            .range(..=addr)
            .next_back()
            .is_some_and(|(&base, &(size, _))| addr - base + len <= size)
    }

    /// Counts one copy call of `kind`; an error when failure injection says it must fail.
    fn admit_copy(&mut self, kind: aclrtMemcpyKind) -> Outcome {
        self.copies += 1;
        let n = self.copies;
        let config = config();
        if let Some(after) = config.fail_after {
            if n > after && !matches!(config.fail_count, Some(m) if n > after + m) {
                return fail(
                    COPY_DATA,
                    format!("injected failure of copy call {n} (ASCEND_EMU_FAIL_AFTER={after})"),
                );
            }
        }
        let slot = &mut self.copies_by_kind[kind as usize];
        if let (sys::ACL_MEMCPY_DEVICE_TO_DEVICE, Some(after)) = (kind, config.fail_d2d_after) {
            if *slot >= after {
                return fail(
                    COPY_DATA,
                    format!("injected failure of a device-to-device copy (ASCEND_EMU_FAIL_D2D_AFTER={after})"),
                );
            }
        }
        *slot += 1;
        Ok(())
    }

    /// Resolves one copy of `kind` for stream `device`, checking every side; `pinned` asks
    /// that host sides be pinned memory (async copies).
    fn resolve(&self, copy: Request, device: Option<u32>, pinned: bool) -> Result<Copy, Failure> {
        let Request {
            dst,
            dest_max,
            src,
            count,
            kind,
        } = copy;
        if dest_max < count {
            return fail(
                INVALID_PARAM,
                format!("count {count} exceeds destMax {dest_max}"),
            );
        }
        let host = |ptr: usize, side: &str| -> Result<(), Failure> {
            if ptr == 0 {
                return fail(INVALID_PARAM, format!("null {side} pointer"));
            }
            if pinned && !self.is_pinned(ptr, count) {
                return fail(INVALID_PARAM, format!("the {side} of an async copy ({count} bytes at {ptr:#x}) is not pinned host memory from aclrtMallocHost"));
            }
            Ok(())
        };
        let on = |found: u32| -> Outcome {
            match device {
                Some(d) if d != found => fail(
                    INVALID_PARAM,
                    format!("device memory of device {found} used on a stream of device {d}"),
                ),
                _ => Ok(()),
            }
        };
        let (dst, src) = match kind {
            sys::ACL_MEMCPY_HOST_TO_DEVICE => {
                host(src as usize, "source")?;
                let (d, dev) = self.device_range(dst as u64, count)?;
                on(dev)?;
                (d, src.cast::<u8>())
            }
            sys::ACL_MEMCPY_DEVICE_TO_HOST => {
                host(dst as usize, "destination")?;
                let (s, dev) = self.device_range(src as u64, count)?;
                on(dev)?;
                (dst.cast::<u8>(), s.cast_const())
            }
            sys::ACL_MEMCPY_DEVICE_TO_DEVICE => {
                let (d, a) = self.device_range(dst as u64, count)?;
                let (s, b) = self.device_range(src as u64, count)?;
                on(a)?;
                on(b)?;
                (d, s.cast_const())
            }
            other => {
                return fail(
                    INVALID_PARAM,
                    format!("unsupported aclrtMemcpyKind {other}"),
                )
            }
        };
        Ok(Copy {
            dst,
            src,
            len: count,
        })
    }
}

/// A fresh read-write mapping of `len` bytes (`fd` -1 for anonymous memory).
fn map(len: usize, flags: libc::c_int, fd: libc::c_int) -> Result<*mut c_void, Failure> {
    // SAFETY: a new mapping chosen by the kernel aliases nothing the caller holds (a shared
    // one aliases only its own memory file); the result is checked.
    let mapped = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return fail(
            BAD_ALLOC,
            format!("mmap {len} bytes: {}", std::io::Error::last_os_error()),
        );
    }
    Ok(mapped)
}

fn perform(copy: Copy) {
    // SAFETY: both sides were checked when the copy was issued: device sides lie in live
    // mappings (freeing them while a copy is pending breaks the API contract, as on the
    // device), host sides are the caller's, valid by the same contract. `copy` allows
    // overlap like the device's DMA does.
    unsafe { std::ptr::copy(copy.src, copy.dst, copy.len) }
}

/// The version the emulated runtime reports for `pkg`.
fn package_version(pkg: &str) -> Result<String, Failure> {
    let config = config();
    if pkg == "driver" {
        return Ok(config.driver_version.clone());
    }
    if let Some(version) = &config.cann_version {
        return Ok(version.clone());
    }
    let home = std::env::var_os("ASCEND_HOME_PATH")
        .ok_or_else(|| Failure(INVALID_FILE, "ASCEND_HOME_PATH is not set".into()))?;
    let path = std::path::Path::new(&home)
        .join("share/info")
        .join(pkg)
        .join("version.info");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Failure(INVALID_FILE, format!("{}: {e}", path.display())))?;
    ascend_sys::version::parse_info_file(&text)
        .map(str::to_string)
        .ok_or_else(|| {
            Failure(
                INVALID_FILE,
                format!("{} has no version line", path.display()),
            )
        })
}

fn emulated_cann() -> Result<CannVersion, Failure> {
    let text = package_version("runtime")?;
    CannVersion::parse(&text)
        .ok_or_else(|| Failure(INVALID_FILE, format!("unparsable CANN version {text:?}")))
}

fn package(pkg: *const c_char) -> Result<String, Failure> {
    if pkg.is_null() {
        return fail(INVALID_PARAM, "null package name");
    }
    // SAFETY: the caller passes a NUL-terminated package name.
    Ok(unsafe { CStr::from_ptr(pkg) }
        .to_string_lossy()
        .into_owned())
}

// ---- exports ---------------------------------------------------------------------------

/// `aclError aclInit(const char *configPath)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclInit(_config_path: *const c_char) -> aclError {
    export(|| {
        let mut state = state();
        if state.initialized {
            return fail(REPEAT_INITIALIZE, "aclInit was already called");
        }
        state.initialized = true;
        Ok(())
    })
}

/// `const char *aclGetRecentErrMsg(void)`: valid until this thread's next failing call.
#[no_mangle]
pub extern "C" fn aclGetRecentErrMsg() -> *const c_char {
    LAST_ERROR.with(|last| {
        let last = last.borrow();
        if last.is_empty() {
            std::ptr::null()
        } else {
            last.as_ptr()
        }
    })
}

/// `aclError aclrtGetDeviceCount(uint32_t *count)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtGetDeviceCount(count: *mut u32) -> aclError {
    export(|| {
        drop(initialized()?);
        if count.is_null() {
            return fail(INVALID_PARAM, "null count");
        }
        // SAFETY: checked non-null; the caller passes a writable u32.
        unsafe { *count = config().visible.len() as u32 };
        Ok(())
    })
}

/// `aclError aclrtSetDevice(int32_t deviceId)`
#[no_mangle]
pub extern "C" fn aclrtSetDevice(device: i32) -> aclError {
    export(|| {
        drop(initialized()?);
        let visible = &config().visible;
        match u32::try_from(device) {
            Ok(id) if (id as usize) < visible.len() => {
                CURRENT_DEVICE.set(Some(id));
                Ok(())
            }
            _ => fail(
                INVALID_DEVICE,
                format!("device {device} does not exist: {} visible", visible.len()),
            ),
        }
    })
}

/// `const char *aclrtGetSocName(void)`
#[no_mangle]
pub extern "C" fn aclrtGetSocName() -> *const c_char {
    c"ascend-emu (test double)".as_ptr()
}

/// `aclError aclrtCreateStream(aclrtStream *stream)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtCreateStream(stream: *mut aclrtStream) -> aclError {
    export(|| {
        let mut state = initialized()?;
        let device = current_device()?;
        if stream.is_null() {
            return fail(INVALID_PARAM, "null stream slot");
        }
        let id = state.next_stream;
        state.next_stream += 1;
        state.streams.insert(
            id,
            StreamState {
                device,
                pending: Vec::new(),
                hccl: Vec::new(),
            },
        );
        // SAFETY: checked non-null; the handle is an opaque number, never dereferenced.
        unsafe { *stream = id as aclrtStream };
        Ok(())
    })
}

/// `aclError aclrtDestroyStream(aclrtStream stream)`: drops work not yet synchronized.
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtDestroyStream(stream: aclrtStream) -> aclError {
    export(|| {
        let mut state = initialized()?;
        match state.streams.remove(&(stream as usize)) {
            Some(_) => Ok(()),
            None => fail(INVALID_PARAM, format!("unknown stream {stream:?}")),
        }
    })
}

/// `aclError aclrtSynchronizeStream(aclrtStream stream)`: lands the queued copies.
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtSynchronizeStream(stream: aclrtStream) -> aclError {
    export(|| {
        let mut state = initialized()?;
        state.syncs += 1;
        let n = state.syncs;
        let entry = state
            .streams
            .get_mut(&(stream as usize))
            .ok_or_else(|| Failure(INVALID_PARAM, format!("unknown stream {stream:?}")))?;
        let pending = std::mem::take(&mut entry.pending);
        let hccl = std::mem::take(&mut entry.hccl);
        if let Some(after) = config().fail_sync_after {
            if n > after {
                return fail(COPY_DATA, format!("injected failure of synchronize {n} (ASCEND_EMU_FAIL_SYNC_AFTER={after}); {} queued copies dropped", pending.len()));
            }
        }
        pending.into_iter().for_each(perform);
        // HCCL operations complete on their communicator's workers: wait without the lock.
        drop(state);
        for (done, timeout) in hccl {
            done.wait(timeout)
                .map_err(|why| Failure(sys::ACL_ERROR_RT_INTERNAL_ERROR, why))?;
        }
        Ok(())
    })
}

/// `aclError aclrtMalloc(void **devPtr, size_t size, aclrtMemMallocPolicy policy)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtMalloc(ptr: *mut *mut c_void, size: usize, _policy: i32) -> aclError {
    export(|| {
        let mut state = initialized()?;
        let device = current_device()?;
        if ptr.is_null() || size == 0 {
            return fail(INVALID_PARAM, "null pointer slot or zero size");
        }
        let map_len = size.next_multiple_of(4096);
        // SAFETY: a fresh anonymous memory file; the name is NUL-terminated.
        let fd = unsafe { libc::memfd_create(c"ascend-emu-device".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return fail(
                BAD_ALLOC,
                format!("memfd_create: {}", std::io::Error::last_os_error()),
            );
        }
        // SAFETY: `fd` is ours; sizing it cannot affect anything else.
        if unsafe { libc::ftruncate(fd, map_len as libc::off_t) } != 0 {
            // SAFETY: `fd` is ours and not yet recorded anywhere.
            unsafe { libc::close(fd) };
            return fail(BAD_ALLOC, format!("ftruncate {map_len}"));
        }
        let host = map(map_len, libc::MAP_SHARED, fd).inspect_err(|_| {
            // SAFETY: `fd` is ours and not yet recorded anywhere.
            unsafe { libc::close(fd) };
        })?;
        let addr = state.next_device_addr;
        state.next_device_addr = (addr + size as u64).next_multiple_of(DEVICE_ALIGN) + DEVICE_ALIGN;
        state.device_allocs.insert(
            addr,
            DeviceAlloc {
                len: size,
                device,
                host: host.cast(),
                map_len,
                fd,
            },
        );
        // SAFETY: checked non-null; the caller passes a writable pointer slot.
        unsafe { *ptr = addr as *mut c_void };
        Ok(())
    })
}

/// `aclError aclrtFree(void *devPtr)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtFree(ptr: *mut c_void) -> aclError {
    export(|| {
        let mut state = initialized()?;
        match state.device_allocs.remove(&(ptr as u64)) {
            Some(_) => Ok(()),
            None => fail(INVALID_PARAM, format!("{ptr:?} is not a device allocation")),
        }
    })
}

/// `aclError aclrtMallocHost(void **hostPtr, size_t size)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtMallocHost(ptr: *mut *mut c_void, size: usize) -> aclError {
    export(|| {
        let mut state = initialized()?;
        if ptr.is_null() || size == 0 {
            return fail(INVALID_PARAM, "null pointer slot or zero size");
        }
        let map_len = size.next_multiple_of(4096);
        let host = map(map_len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)?;
        state.pinned.insert(host as usize, (size, map_len));
        // SAFETY: checked non-null; the caller passes a writable pointer slot.
        unsafe { *ptr = host };
        Ok(())
    })
}

/// `aclError aclrtFreeHost(void *hostPtr)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtFreeHost(ptr: *mut c_void) -> aclError {
    export(|| {
        let mut state = initialized()?;
        let (_, map_len) = state
            .pinned
            .remove(&(ptr as usize))
            .ok_or_else(|| Failure(INVALID_PARAM, format!("{ptr:?} is not pinned host memory")))?;
        // SAFETY: mapped with this length in aclrtMallocHost and unmapped once here.
        unsafe { libc::munmap(ptr, map_len) };
        Ok(())
    })
}

/// `aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count, kind)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtMemcpy(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: aclrtMemcpyKind,
) -> aclError {
    export(|| {
        let mut state = initialized()?;
        let copy = state.resolve(
            Request {
                dst,
                dest_max,
                src,
                count,
                kind,
            },
            None,
            false,
        )?;
        state.admit_copy(kind)?;
        perform(copy);
        Ok(())
    })
}

/// The stream's device, checked against the calling thread's.
fn stream_device(state: &State, stream: aclrtStream) -> Result<u32, Failure> {
    let device = state
        .streams
        .get(&(stream as usize))
        .ok_or_else(|| Failure(INVALID_PARAM, format!("unknown stream {stream:?}")))?
        .device;
    match current_device()? {
        d if d == device => Ok(device),
        d => fail(
            CONTEXT_NULL,
            format!("stream of device {device} used from a thread bound to device {d}"),
        ),
    }
}

/// `aclError aclrtMemcpyAsync(dst, destMax, src, count, kind, stream)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclrtMemcpyAsync(
    dst: *mut c_void,
    dest_max: usize,
    src: *const c_void,
    count: usize,
    kind: aclrtMemcpyKind,
    stream: aclrtStream,
) -> aclError {
    export(|| {
        let mut state = initialized()?;
        let device = stream_device(&state, stream)?;
        let copy = state.resolve(
            Request {
                dst,
                dest_max,
                src,
                count,
                kind,
            },
            Some(device),
            true,
        )?;
        state.admit_copy(kind)?;
        if let Some(s) = state.streams.get_mut(&(stream as usize)) {
            s.pending.push(copy);
        }
        Ok(())
    })
}

/// `aclError aclrtMemcpyBatchAsync(dsts, destMaxs, srcs, sizes, numBatches, attrs,
/// attrsIndexes, numAttrs, failIndex, stream)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn aclrtMemcpyBatchAsync(
    dsts: *mut *mut c_void,
    dest_maxs: *mut usize,
    srcs: *mut *mut c_void,
    sizes: *mut usize,
    num_batches: usize,
    attrs: *mut aclrtMemcpyBatchAttr,
    attrs_indexes: *mut usize,
    num_attrs: usize,
    fail_index: *mut usize,
    stream: aclrtStream,
) -> aclError {
    let mut failed_at = usize::MAX;
    let status = export(|| {
        let version = emulated_cann()?;
        if version < BATCH_COPY {
            return fail(
                API_NOT_SUPPORT,
                format!("aclrtMemcpyBatchAsync is not in CANN {version} (emulated)"),
            );
        }
        let mut state = initialized()?;
        let device = stream_device(&state, stream)?;
        if [
            dsts.cast::<u8>(),
            dest_maxs.cast(),
            srcs.cast(),
            sizes.cast(),
            attrs.cast(),
            attrs_indexes.cast(),
        ]
        .iter()
        .any(|p| p.is_null())
            || num_batches == 0
            || num_attrs == 0
            || num_attrs > num_batches
        {
            return fail(
                INVALID_PARAM,
                "null array, empty batch, or numAttrs outside 1..=numBatches",
            );
        }
        // SAFETY: the caller passes arrays of numBatches (or numAttrs) entries.
        let (dsts, dest_maxs, srcs, sizes, attrs, indexes) = unsafe {
            (
                std::slice::from_raw_parts(dsts, num_batches),
                std::slice::from_raw_parts(dest_maxs, num_batches),
                std::slice::from_raw_parts(srcs, num_batches),
                std::slice::from_raw_parts(sizes, num_batches),
                std::slice::from_raw_parts(attrs, num_attrs),
                std::slice::from_raw_parts(attrs_indexes, num_attrs),
            )
        };
        if indexes[0] != 0
            || indexes.windows(2).any(|w| w[0] >= w[1])
            || indexes.iter().any(|&i| i >= num_batches)
        {
            return fail(
                INVALID_PARAM,
                "attrsIndexes must start at 0 and increase below numBatches",
            );
        }
        let kind_of = |attr: &aclrtMemcpyBatchAttr| match (attr.srcLoc.type_, attr.dstLoc.type_) {
            (sys::ACL_MEM_LOCATION_TYPE_HOST, sys::ACL_MEM_LOCATION_TYPE_DEVICE) => {
                Some(sys::ACL_MEMCPY_HOST_TO_DEVICE)
            }
            (sys::ACL_MEM_LOCATION_TYPE_DEVICE, sys::ACL_MEM_LOCATION_TYPE_HOST) => {
                Some(sys::ACL_MEMCPY_DEVICE_TO_HOST)
            }
            _ => None,
        };
        let kinds: Vec<Option<aclrtMemcpyKind>> = attrs.iter().map(kind_of).collect();
        if kinds.iter().any(|k| k.is_none() || *k != kinds[0]) {
            return fail(
                INVALID_PARAM,
                "a batch copies host to device or device to host, one direction per call",
            );
        }
        let mut copies = Vec::with_capacity(num_batches);
        for i in 0..num_batches {
            // The attribute in force for copy i is the last one whose index is <= i.
            let attr = indexes.iter().rposition(|&start| start <= i).unwrap_or(0);
            let kind = kinds[attr].unwrap_or(sys::ACL_MEMCPY_HOST_TO_DEVICE);
            let request = Request {
                dst: dsts[i],
                dest_max: dest_maxs[i],
                src: srcs[i],
                count: sizes[i],
                kind,
            };
            match state.resolve(request, Some(device), true) {
                Ok(copy) => copies.push(copy),
                Err(Failure(code, message)) => {
                    failed_at = i;
                    return fail(code, format!("copy {i}: {message}"));
                }
            }
        }
        state.admit_copy(kinds[0].unwrap_or(sys::ACL_MEMCPY_HOST_TO_DEVICE))?;
        if let Some(s) = state.streams.get_mut(&(stream as usize)) {
            s.pending.extend(copies);
        }
        Ok(())
    });
    if !fail_index.is_null() {
        // SAFETY: checked non-null; the caller passes a writable size_t.
        unsafe { *fail_index = failed_at };
    }
    status
}

/// `aclError aclsysGetVersionStr(char *pkgName, char *versionStr)`: 128-byte output.
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclsysGetVersionStr(pkg: *mut c_char, out: *mut c_char) -> aclError {
    export(|| {
        let version = package_version(&package(pkg)?)?;
        if out.is_null() || version.len() >= sys::ASCEND_SYS_VERSION_STR_LEN as usize {
            return fail(INVALID_PARAM, "null output or version too long");
        }
        // SAFETY: `out` has 128 bytes (the documented size); the text and its NUL fit.
        unsafe {
            std::ptr::copy_nonoverlapping(version.as_ptr(), out.cast::<u8>(), version.len());
            *out.add(version.len()) = 0;
        }
        Ok(())
    })
}

/// `aclError aclsysGetVersionNum(char *pkgName, int32_t *versionNum)`
///
/// # Safety
/// Pointer arguments are null (an error) or valid as the ACL prototype says.
#[no_mangle]
pub unsafe extern "C" fn aclsysGetVersionNum(pkg: *mut c_char, num: *mut i32) -> aclError {
    export(|| {
        let text = package_version(&package(pkg)?)?;
        let version = CannVersion::parse(&text)
            .ok_or_else(|| Failure(INVALID_FILE, format!("unparsable version {text:?}")))?;
        if num.is_null() {
            return fail(INVALID_PARAM, "null output");
        }
        // SAFETY: checked non-null; the caller passes a writable i32.
        unsafe { *num = version.num() };
        Ok(())
    })
}

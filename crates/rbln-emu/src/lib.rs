//! # rbln-emu — a TEST DOUBLE of the RBLN runtime, not the runtime
//!
//! A `cdylib` that exports the same symbols as `librbln.so` (the same mangled names and C
//! ABI signatures that `rbln-sys` binds) and emulates them on host memory, so kvrelay's
//! RBLN path can be tested and benchmarked without RBLN hardware. It is never linked into
//! kvrelay: tests load it through rbln-sys's ordinary loading path with
//! `RBLN_RUNTIME_LIB=<target dir>/<profile>/librbln_emu.so`. Its SONAME is `librbln.so`, as
//! the real library's is, so the "already loaded" search step finds it too.
//!
//! What it emulates:
//! - device memory: `rbln_malloc_eager` / `rbln_malloc_lazy` hand out virtual addresses in
//!   a range no host pointer uses (so a host pointer passed as a vaddr fails), backed by
//!   host memory, with unmapped gaps between allocations; `rbln_free`.
//! - copies: every vaddr range must lie inside one live allocation, or the call returns
//!   `RBLNRetCode_INVALID` without copying a byte. v2v copies must stay on one device.
//! - async copies: queued with a non-zero handle and performed only by
//!   `rbln_device_synchronize` of their device, so a caller that reads before
//!   synchronizing sees stale bytes, as on the device. Copies touching lazy (not yet
//!   materialized) memory complete synchronously and return handle 0, as the runtime does.
//! - `rbln_get_device_count`, `rbln_get_torch_device_id_from_vaddr`, `rbln_abi_current`,
//!   `rbln_abi_min_supported`.
//!
//! Controlled by environment variables, read once at the first call:
//! - `RBLN_EMU_ABI_VERSION` (default 6): what `rbln_abi_current` returns.
//! - `RBLN_EMU_ABI_MIN` (default: the current ABI): what `rbln_abi_min_supported` returns.
//! - `RBLN_EMU_DEVICES` (default 1): the device count.
//! - `RBLN_EMU_FAIL_AFTER=N`: copy calls (sync or async) after the first N return
//!   `RBLNRetCode_FAILURE` without copying.
//! - `RBLN_EMU_FAIL_COUNT=M` (with `RBLN_EMU_FAIL_AFTER`; default: no end): only M copy
//!   calls fail, those after the first N; later ones succeed again (a transient error).
//!
//! Every export catches panics and returns `RBLNRetCode_FAILURE`; none unwinds into C.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, OnceLock};

use rbln_sys::sys::{self, RBLNRetCode};

const SUCCESS: RBLNRetCode = sys::RBLNRetCode_SUCCESS;
const FAILURE: RBLNRetCode = sys::RBLNRetCode_FAILURE;
const INVALID: RBLNRetCode = sys::RBLNRetCode_INVALID;

/// Marks this library as the test double (`rbln_sys::TEST_DOUBLE_MARKER`).
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static rbln_emu_test_double: u8 = 1;

/// The first emulated device address: far outside the x86_64 user address space, so a
/// device address used as a host pointer faults and a host pointer used as a device
/// address is unknown.
const VADDR_BASE: u64 = 0x4000_0000_0000_0000;
/// Device allocations are aligned like the runtime's DMA path wants.
const ALIGN: usize = 4096;
/// Unmapped device addresses between allocations, so an overrun is never another
/// allocation's bytes.
const GUARD: u64 = 1 << 20;

struct Config {
    abi_current: u32,
    abi_min: u32,
    devices: u32,
    fail_after: Option<u64>,
    fail_count: Option<u64>,
}

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse().ok());
        let abi_current = var("RBLN_EMU_ABI_VERSION").unwrap_or(sys::RBLN_SYS_BUILT_ABI);
        Config {
            abi_current,
            abi_min: var("RBLN_EMU_ABI_MIN").unwrap_or(abi_current),
            devices: var("RBLN_EMU_DEVICES").unwrap_or(1),
            fail_after: var("RBLN_EMU_FAIL_AFTER").map(u64::from),
            fail_count: var("RBLN_EMU_FAIL_COUNT").map(u64::from),
        }
    })
}

/// Host memory standing in for one device allocation.
struct Alloc {
    ptr: *mut u8,
    len: usize,
    layout: Layout,
    device: u32,
    /// False for lazy allocations: async copies fall back to synchronous ones.
    materialized: bool,
}

impl Drop for Alloc {
    fn drop(&mut self) {
        // SAFETY: allocated with exactly this layout in `malloc`, freed once here.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    H2V,
    V2H,
    V2V,
}

/// A queued async copy. Host addresses are the caller's; the runtime contract makes them
/// valid until the device is synchronized.
struct Pending {
    device: u32,
    direction: Direction,
    src: u64,
    dst: u64,
    len: u64,
}

struct State {
    allocs: BTreeMap<u64, Alloc>,
    next_vaddr: u64,
    next_handle: u64,
    pending: Vec<Pending>,
    copies: u64,
}

// SAFETY: the raw pointers in `allocs` are owned host allocations, only touched under the
// state mutex.
unsafe impl Send for State {}

fn state() -> MutexGuard<'static, State> {
    static STATE: Mutex<State> = Mutex::new(State {
        allocs: BTreeMap::new(),
        next_vaddr: VADDR_BASE,
        next_handle: 1,
        pending: Vec::new(),
        copies: 0,
    });
    // A panic while holding the lock is caught at the export; the state stays usable.
    STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs an export body, turning a panic into `RBLNRetCode_FAILURE`.
fn guard(body: impl FnOnce() -> RBLNRetCode) -> RBLNRetCode {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(FAILURE)
}

impl State {
    /// The host address of `vaddr..vaddr + len` if it lies inside one live allocation.
    fn resolve(&self, vaddr: u64, len: u64) -> Result<(*mut u8, &Alloc), RBLNRetCode> {
        let (&base, alloc) = self.allocs.range(..=vaddr).next_back().ok_or(INVALID)?;
        let offset = vaddr - base;
        let end = offset.checked_add(len).ok_or(INVALID)?;
        if end > alloc.len as u64 {
            return Err(INVALID);
        }
        // offset < alloc.len here (or len == 0 and offset <= len), so this stays in (or
        // one past) the allocation.
        Ok((alloc.ptr.wrapping_add(offset as usize), alloc))
    }

    /// Counts one copy call; false when failure injection says it must fail.
    fn admit_copy(&mut self) -> bool {
        self.copies += 1;
        let config = config();
        let copies = self.copies;
        let failing = |after: u64| {
            copies > after && !matches!(config.fail_count, Some(m) if copies > after + m)
        };
        !config.fail_after.is_some_and(failing)
    }

    /// Checks a copy's device ranges: its device, and whether it can run asynchronously.
    fn check(
        &self,
        direction: Direction,
        src: u64,
        dst: u64,
        len: u64,
    ) -> Result<(u32, bool), RBLNRetCode> {
        let (device, materialized) = match direction {
            Direction::H2V => {
                let (_, a) = self.resolve(dst, len)?;
                (a.device, a.materialized)
            }
            Direction::V2H => {
                let (_, a) = self.resolve(src, len)?;
                (a.device, a.materialized)
            }
            Direction::V2V => {
                let (_, a) = self.resolve(src, len)?;
                let (_, b) = self.resolve(dst, len)?;
                if a.device != b.device {
                    return Err(INVALID);
                }
                (a.device, a.materialized && b.materialized)
            }
        };
        Ok((device, materialized))
    }

    /// Performs a checked copy now.
    ///
    /// # Safety
    /// Host addresses must be valid for `len` bytes (the runtime's contract).
    unsafe fn perform(&self, direction: Direction, src: u64, dst: u64, len: u64) -> RBLNRetCode {
        let (from, to) = match direction {
            Direction::H2V => match self.resolve(dst, len) {
                Ok((to, _)) => (src as *const u8, to),
                Err(code) => return code,
            },
            Direction::V2H => match self.resolve(src, len) {
                Ok((from, _)) => (from as *const u8, dst as *mut u8),
                Err(code) => return code,
            },
            Direction::V2V => match (self.resolve(src, len), self.resolve(dst, len)) {
                (Ok((from, _)), Ok((to, _))) => (from as *const u8, to),
                (Err(code), _) | (_, Err(code)) => return code,
            },
        };
        // SAFETY: device ranges were resolved inside live allocations; host ranges are
        // valid per the caller. `copy` tolerates overlap (v2v within one allocation).
        unsafe { std::ptr::copy(from, to, len as usize) };
        SUCCESS
    }

    /// A synchronous copy call.
    ///
    /// # Safety
    /// As [`State::perform`].
    unsafe fn copy_sync(
        &mut self,
        direction: Direction,
        src: u64,
        dst: u64,
        len: u64,
    ) -> RBLNRetCode {
        if let Err(code) = self.check(direction, src, dst, len) {
            return code;
        }
        if !self.admit_copy() {
            return FAILURE;
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.perform(direction, src, dst, len) }
    }

    /// An async copy call: queued until synchronize, or done now (handle 0) on lazy memory.
    ///
    /// # Safety
    /// As [`State::perform`], until the device is synchronized; `handle` is writable.
    unsafe fn copy_async(
        &mut self,
        direction: Direction,
        src: u64,
        dst: u64,
        len: u64,
        handle: *mut u64,
    ) -> RBLNRetCode {
        if handle.is_null() {
            return INVALID;
        }
        let (device, materialized) = match self.check(direction, src, dst, len) {
            Ok(checked) => checked,
            Err(code) => return code,
        };
        if !self.admit_copy() {
            return FAILURE;
        }
        let id = if materialized {
            self.pending.push(Pending {
                device,
                direction,
                src,
                dst,
                len,
            });
            self.next_handle += 1;
            self.next_handle - 1
        } else {
            // SAFETY: forwarded from the caller.
            let code = unsafe { self.perform(direction, src, dst, len) };
            if code != SUCCESS {
                return code;
            }
            0
        };
        // SAFETY: checked non-null; the caller passes a writable u64.
        unsafe { *handle = id };
        SUCCESS
    }

    fn malloc(
        &mut self,
        device: u32,
        size: u64,
        materialized: bool,
        vaddr: *mut u64,
    ) -> RBLNRetCode {
        if vaddr.is_null() || device >= config().devices {
            return INVALID;
        }
        let Ok(len) = usize::try_from(size) else {
            return FAILURE;
        };
        let Ok(layout) = Layout::from_size_align(len.max(1), ALIGN) else {
            return FAILURE;
        };
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return FAILURE;
        }
        let at = self.next_vaddr;
        let span = (layout.size() as u64).next_multiple_of(ALIGN as u64) + GUARD;
        self.next_vaddr = at.saturating_add(span);
        self.allocs.insert(
            at,
            Alloc {
                ptr,
                len,
                layout,
                device,
                materialized,
            },
        );
        // SAFETY: checked non-null; the caller passes a writable u64 (the C++ reference).
        unsafe { *vaddr = at };
        SUCCESS
    }
}

#[export_name = "rbln_abi_current"]
pub extern "C" fn abi_current() -> u32 {
    catch_unwind(|| config().abi_current).unwrap_or(0)
}

#[export_name = "rbln_abi_min_supported"]
pub extern "C" fn abi_min_supported() -> u32 {
    catch_unwind(|| config().abi_min).unwrap_or(u32::MAX)
}

/// # Safety
/// `count` is null (an error) or writable.
#[export_name = "rbln_get_device_count"]
pub unsafe extern "C" fn get_device_count(count: *mut i32) -> RBLNRetCode {
    guard(|| {
        if count.is_null() {
            return INVALID;
        }
        // SAFETY: checked non-null; the caller passes a writable int.
        unsafe { *count = config().devices as i32 };
        SUCCESS
    })
}

/// # Safety
/// `vaddr` is null (an error) or writable.
#[export_name = "_ZN4rbln17rbln_malloc_eagerEjmRm"]
pub unsafe extern "C" fn malloc_eager(device: u32, size: u64, vaddr: *mut u64) -> RBLNRetCode {
    guard(|| state().malloc(device, size, true, vaddr))
}

/// # Safety
/// `vaddr` is null (an error) or writable.
#[export_name = "_ZN4rbln16rbln_malloc_lazyEjmRm"]
pub unsafe extern "C" fn malloc_lazy(device: u32, size: u64, vaddr: *mut u64) -> RBLNRetCode {
    guard(|| state().malloc(device, size, false, vaddr))
}

/// Refuses (`RBLNRetCode_FAILURE`) while async copies of the allocation are pending.
#[export_name = "_ZN4rbln9rbln_freeEm"]
pub extern "C" fn free(vaddr: u64) -> RBLNRetCode {
    guard(|| {
        let mut state = state();
        let Some(alloc) = state.allocs.get(&vaddr) else {
            return INVALID;
        };
        // A queued copy lies wholly inside one allocation (its end may equal ours).
        let range = vaddr..=vaddr + alloc.len as u64;
        let busy = state.pending.iter().any(|p| {
            let touches = |a: u64| range.contains(&a);
            match p.direction {
                Direction::H2V => touches(p.dst),
                Direction::V2H => touches(p.src),
                Direction::V2V => touches(p.src) || touches(p.dst),
            }
        });
        if busy {
            return FAILURE;
        }
        state.allocs.remove(&vaddr);
        SUCCESS
    })
}

/// # Safety
/// `src_host` is readable for `size` bytes.
#[export_name = "_ZN4rbln15rbln_memcpy_h2vEmmm"]
pub unsafe extern "C" fn memcpy_h2v(src_host: u64, dst_vaddr: u64, size: u64) -> RBLNRetCode {
    // SAFETY: forwarded from the caller.
    guard(|| unsafe { state().copy_sync(Direction::H2V, src_host, dst_vaddr, size) })
}

/// # Safety
/// `dst_host` is writable for `size` bytes.
#[export_name = "_ZN4rbln15rbln_memcpy_v2hEmmm"]
pub unsafe extern "C" fn memcpy_v2h(src_vaddr: u64, dst_host: u64, size: u64) -> RBLNRetCode {
    // SAFETY: forwarded from the caller.
    guard(|| unsafe { state().copy_sync(Direction::V2H, src_vaddr, dst_host, size) })
}

#[export_name = "_ZN4rbln15rbln_memcpy_v2vEmmm"]
pub extern "C" fn memcpy_v2v(src_vaddr: u64, dst_vaddr: u64, size: u64) -> RBLNRetCode {
    // SAFETY: both ranges are device ranges, resolved and bounds-checked by the state.
    guard(|| unsafe { state().copy_sync(Direction::V2V, src_vaddr, dst_vaddr, size) })
}

/// # Safety
/// `src_host` stays readable for `size` bytes until the device is synchronized; `handle`
/// is null (an error) or writable.
#[export_name = "_ZN4rbln21rbln_memcpy_h2v_asyncEmmmPm"]
pub unsafe extern "C" fn memcpy_h2v_async(
    src_host: u64,
    dst_vaddr: u64,
    size: u64,
    handle: *mut u64,
) -> RBLNRetCode {
    // SAFETY: forwarded from the caller.
    guard(|| unsafe { state().copy_async(Direction::H2V, src_host, dst_vaddr, size, handle) })
}

/// # Safety
/// `dst_host` stays writable for `size` bytes until the device is synchronized; `handle`
/// is null (an error) or writable.
#[export_name = "_ZN4rbln21rbln_memcpy_v2h_asyncEmmmPm"]
pub unsafe extern "C" fn memcpy_v2h_async(
    src_vaddr: u64,
    dst_host: u64,
    size: u64,
    handle: *mut u64,
) -> RBLNRetCode {
    // SAFETY: forwarded from the caller.
    guard(|| unsafe { state().copy_async(Direction::V2H, src_vaddr, dst_host, size, handle) })
}

/// # Safety
/// `handle` is null (an error) or writable.
#[export_name = "_ZN4rbln21rbln_memcpy_v2v_asyncEmmmPm"]
pub unsafe extern "C" fn memcpy_v2v_async(
    src_vaddr: u64,
    dst_vaddr: u64,
    size: u64,
    handle: *mut u64,
) -> RBLNRetCode {
    // SAFETY: device ranges are checked by the state; `handle` per the caller.
    guard(|| unsafe { state().copy_async(Direction::V2V, src_vaddr, dst_vaddr, size, handle) })
}

/// Performs the device's queued copies in order. A copy whose memory was freed meanwhile
/// is skipped and reported as `RBLNRetCode_FAILURE` after the others have landed.
#[export_name = "_ZN4rbln23rbln_device_synchronizeEj"]
pub extern "C" fn device_synchronize(device: u32) -> RBLNRetCode {
    guard(|| {
        if device >= config().devices {
            return INVALID;
        }
        let mut state = state();
        let (mine, others): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut state.pending)
            .into_iter()
            .partition(|p| p.device == device);
        state.pending = others;
        let mut result = SUCCESS;
        for p in mine {
            // SAFETY: the host side was promised valid until this synchronize by the
            // caller of the async copy; device sides are re-resolved by `perform`.
            if unsafe { state.perform(p.direction, p.src, p.dst, p.len) } != SUCCESS {
                result = FAILURE;
            }
        }
        result
    })
}

/// # Safety
/// `device` is null (an error) or writable.
#[export_name = "_ZN4rbln35rbln_get_torch_device_id_from_vaddrEmRj"]
pub unsafe extern "C" fn get_torch_device_id_from_vaddr(
    vaddr: u64,
    device: *mut u32,
) -> RBLNRetCode {
    guard(|| {
        if device.is_null() {
            return INVALID;
        }
        match state().resolve(vaddr, 0) {
            Ok((_, alloc)) => {
                // SAFETY: checked non-null; the caller passes a writable u32.
                unsafe { *device = alloc.device };
                SUCCESS
            }
            Err(code) => code,
        }
    })
}

/// Each export has exactly the type rbln-sys declares for its symbol.
const _: () = {
    let _: sys::rbln_abi_current_fn = Some(abi_current);
    let _: sys::rbln_abi_min_supported_fn = Some(abi_min_supported);
    let _: sys::rbln_get_device_count_fn = Some(get_device_count);
    let _: sys::rbln_malloc_eager_fn = Some(malloc_eager);
    let _: sys::rbln_malloc_lazy_fn = Some(malloc_lazy);
    let _: sys::rbln_free_fn = Some(free);
    let _: sys::rbln_memcpy_h2v_fn = Some(memcpy_h2v);
    let _: sys::rbln_memcpy_v2h_fn = Some(memcpy_v2h);
    let _: sys::rbln_memcpy_v2v_fn = Some(memcpy_v2v);
    let _: sys::rbln_memcpy_h2v_async_fn = Some(memcpy_h2v_async);
    let _: sys::rbln_memcpy_v2h_async_fn = Some(memcpy_v2h_async);
    let _: sys::rbln_memcpy_v2v_async_fn = Some(memcpy_v2v_async);
    let _: sys::rbln_device_synchronize_fn = Some(device_synchronize);
    let _: sys::rbln_get_torch_device_id_from_vaddr_fn = Some(get_torch_device_id_from_vaddr);
};

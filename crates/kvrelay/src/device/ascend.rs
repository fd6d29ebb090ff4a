//! The Ascend NPU device (feature `ascend`): engine KV in NPU memory, copied with CANN's
//! ACL runtime (`libascendcl.so`, loaded at run time through `ascend-sys`).
//!
//! Engine regions are device addresses: the `data_ptr()` of vllm-ascend's KV tensors, per
//! layer a separate K and a separate V tensor `[num_blocks, block_size, kv_heads,
//! head_size]` (layout `ascend_separate_kv`), each 2 MiB aligned when KV transfer is on.
//!
//! Async copies need pinned host memory (`aclrtMallocHost`); the caller's chunk buffers
//! are ordinary memory. So every plan goes through a pinned staging buffer: its runs are
//! merged into contiguous device ranges (a whole block of one layer for full blocks), the
//! device side moves as **one `aclrtMemcpyBatchAsync`** where CANN has it (≥ 8.5, see
//! [`ascend_sys::caps::BATCH_COPY`]) or one `aclrtMemcpyAsync` per range otherwise, then
//! **one `aclrtSynchronizeStream`**; the host side is memcpy between the staging buffer and
//! the caller's buffers (after the synchronize for a gather, before the copies for a
//! scatter). A plan thus makes 2 runtime calls with batch copies and at most
//! `runs + 1` without. [`AscendDevice::calls`] counts them.
//!
//! A scatter from device pages (a PD buffer on the same NPU,
//! [`Device::start_scatter_from_device`]) needs no staging: one `aclrtMemcpyAsync` with
//! `ACL_MEMCPY_DEVICE_TO_DEVICE` per run (runs continuing each other on both sides merged)
//! and one synchronize, on every CANN: `aclrtMemcpyBatchAsync` copies host to device or
//! device to host only. Pages on another device are left to the host path (copying
//! between NPUs needs peer access, which kvrelay does not enable).
//!
//! Each thread that issues copies is bound to the device with `aclrtSetDevice` first (once
//! per thread). `ASCEND_RT_VISIBLE_DEVICES` is applied by the runtime: device ids here are
//! the logical ids it leaves. A failed copy or synchronize is [`DeviceError::Runtime`]
//! with `aclGetRecentErrMsg`'s text, and a gather whose synchronize failed leaves the
//! caller's buffers untouched.
//!
//! Nothing here has run on Ascend hardware; the tests and benches use the `ascend-emu`
//! test double.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The whole -sys crate, for tools that report on the installation (`kvrelay doctor`).
pub use ascend_sys;
pub use ascend_sys::test_double::{fake_home, test_double_for};

pub use ascend_sys::{
    Acl, AclError, Capabilities, CopyCapabilities, CopyKind, DeviceBuffer, LoadError, PinnedHost,
    Stream, Unsupported,
};
use parking_lot::Mutex;

use super::staged::{check_regions, DeviceRange, StagedPlan, StagingPool};
use super::{
    check_device_scatter, check_gather, check_scatter, Device, DeviceError, DevicePage,
    EngineMemory, PendingCopy, Region,
};
use crate::plan::{CopyPlan, CopyRun};

/// Runtime calls an [`AscendDevice`] made, cumulative since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AclCalls {
    /// Plans started.
    pub plans: u64,
    /// `aclrtMemcpyAsync` calls (one per merged device range, without batch copies).
    pub copies: u64,
    /// `aclrtMemcpyBatchAsync` calls (one per plan, with batch copies).
    pub batches: u64,
    /// `aclrtSynchronizeStream` calls.
    pub synchronizes: u64,
    /// `aclrtSetDevice` calls (once per thread that issues copies; not per plan).
    pub set_devices: u64,
}

impl AclCalls {
    /// The per-plan runtime calls: copies, batches and synchronizes.
    pub fn total(&self) -> u64 {
        self.copies + self.batches + self.synchronizes
    }

    /// The calls made between `earlier` and `self`.
    pub fn since(&self, earlier: &AclCalls) -> AclCalls {
        AclCalls {
            plans: self.plans - earlier.plans,
            copies: self.copies - earlier.copies,
            batches: self.batches - earlier.batches,
            synchronizes: self.synchronizes - earlier.synchronizes,
            set_devices: self.set_devices - earlier.set_devices,
        }
    }
}

#[derive(Default)]
struct Counters {
    plans: AtomicU64,
    copies: AtomicU64,
    batches: AtomicU64,
    synchronizes: AtomicU64,
    set_devices: AtomicU64,
}

/// How a plan's device ranges are issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyPath {
    /// One `aclrtMemcpyBatchAsync` for the whole plan.
    Batch,
    /// One `aclrtMemcpyAsync` per merged device range.
    PerRange,
}

thread_local! {
    /// The [`AscendDevice`] (its instance number) this thread last bound with
    /// `aclrtSetDevice`. ACL binds a thread to one device at a time.
    static BOUND: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Instance numbers: unlike addresses, never reused by a later device.
static INSTANCES: AtomicU64 = AtomicU64::new(0);

/// A whole device allocation as an engine region (its device address).
impl From<&DeviceBuffer> for Region {
    fn from(memory: &DeviceBuffer) -> Self {
        Region {
            addr: memory.addr(),
            len: memory.len(),
        }
    }
}

/// One Ascend NPU (a logical device id) of a loaded ACL runtime.
pub struct AscendDevice {
    acl: Arc<Acl>,
    device: u32,
    instance: u64,
    name: String,
    capabilities: CopyCapabilities,
    path: CopyPath,
    counters: Counters,
    staging: StagingPool<PinnedHost>,
    streams: Mutex<Vec<Stream>>,
}

impl std::fmt::Debug for AscendDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AscendDevice")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("acl", &self.acl)
            .finish()
    }
}

impl AscendDevice {
    /// Logical device `device` of the process-wide runtime, found through ascend-sys's
    /// search order (`KVRELAY_ASCENDCL_LIB`, an already loaded `libascendcl.so`,
    /// `$ASCEND_HOME_PATH/lib64`, the default install roots, the system library path).
    pub fn open(device: u32) -> Result<Self, DeviceError> {
        let acl = Acl::global().map_err(|e| DeviceError::Runtime {
            device: format!("ascend:{device}"),
            call: "dlopen libascendcl.so",
            message: e.to_string(),
        })?;
        Self::new(acl, device)
    }

    /// Logical device `device` of `acl`: the runtime's version must be supported and the
    /// device must exist. The copy path follows the runtime's capabilities.
    pub fn new(acl: Arc<Acl>, device: u32) -> Result<Self, DeviceError> {
        let name = format!("ascend:{device}");
        let runtime_error = |e: AclError| DeviceError::Runtime {
            device: name.clone(),
            call: e.call(),
            message: e.to_string(),
        };
        acl.init().map_err(runtime_error)?;
        let capabilities = CopyCapabilities::probe(&acl);
        match capabilities.runtime.require() {
            Ok(_) => {}
            // A real install whose version files are unreadable still copies; only the
            // version-gated batch path is off then.
            Err(Unsupported::VersionUnknown { why, .. }) => {
                tracing::warn!(%why, "CANN version unknown; using per-range copies");
            }
            Err(unsupported) => {
                return Err(DeviceError::Runtime {
                    device: name,
                    call: "aclsysGetVersionStr",
                    message: unsupported.to_string(),
                })
            }
        }
        let count = acl.device_count().map_err(runtime_error)?;
        if device >= count {
            return Err(DeviceError::Runtime {
                device: name,
                call: "aclrtGetDeviceCount",
                message: format!(
                    "device {device} does not exist: the runtime sees {count} (after ASCEND_RT_VISIBLE_DEVICES)"
                ),
            });
        }
        let path = if capabilities.batch_copy.usable() {
            CopyPath::Batch
        } else {
            CopyPath::PerRange
        };
        Ok(AscendDevice {
            acl,
            device,
            instance: INSTANCES.fetch_add(1, Ordering::Relaxed),
            name,
            capabilities,
            path,
            counters: Counters::default(),
            staging: StagingPool::new(),
            streams: Mutex::new(Vec::new()),
        })
    }

    pub fn acl(&self) -> &Arc<Acl> {
        &self.acl
    }

    /// The logical device id.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// What the runtime reported when the device was opened.
    pub fn capabilities(&self) -> &CopyCapabilities {
        &self.capabilities
    }

    /// How plans' device copies are issued.
    pub fn copy_path(&self) -> CopyPath {
        self.path
    }

    /// Runtime calls made so far.
    pub fn calls(&self) -> AclCalls {
        let c = &self.counters;
        AclCalls {
            plans: c.plans.load(Ordering::Relaxed),
            copies: c.copies.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            synchronizes: c.synchronizes.load(Ordering::Relaxed),
            set_devices: c.set_devices.load(Ordering::Relaxed),
        }
    }

    /// Device memory of `len` bytes on this device (for engines that let kvrelay allocate
    /// their KV cache, and for tests).
    pub fn alloc(&self, len: usize) -> Result<DeviceBuffer, DeviceError> {
        self.bind()?;
        DeviceBuffer::new(&self.acl, len).map_err(|e| self.error(e))
    }

    fn error(&self, e: AclError) -> DeviceError {
        DeviceError::Runtime {
            device: self.name.clone(),
            call: e.call(),
            message: e.to_string(),
        }
    }

    /// Binds the calling thread to this device, once per thread.
    fn bind(&self) -> Result<(), DeviceError> {
        let me = self.instance;
        if BOUND.get() == Some(me) {
            return Ok(());
        }
        self.counters.set_devices.fetch_add(1, Ordering::Relaxed);
        self.acl
            .set_device(self.device)
            .map_err(|e| self.error(e))?;
        BOUND.set(Some(me));
        Ok(())
    }

    fn take_stream(&self) -> Result<Stream, DeviceError> {
        if let Some(stream) = self.streams.lock().pop() {
            return Ok(stream);
        }
        Stream::new(&self.acl).map_err(|e| self.error(e))
    }

    fn synchronize(&self, stream: &Stream) -> Result<(), DeviceError> {
        self.bind()?;
        self.counters.synchronizes.fetch_add(1, Ordering::Relaxed);
        stream.synchronize().map_err(|e| self.error(e))
    }

    /// Issues `copies` (dst, src, len) of `kind` on `stream`: one batch, or one copy each.
    /// Device-to-device copies always go one by one: `aclrtMemcpyBatchAsync` copies host to
    /// device or device to host only (vllm-ascend falls back the same way). A failure
    /// drains what was already issued (it may use the caller's buffers) before it is
    /// returned.
    ///
    /// # Safety
    /// Every copy's ranges are valid for `kind` on this device (engine ranges inside the
    /// regions the caller checked, host ranges inside pinned staging, device pages held by
    /// the caller), and stay so until `stream` is synchronized.
    unsafe fn issue(
        &self,
        stream: &Stream,
        kind: CopyKind,
        copies: Vec<(*mut c_void, *mut c_void, usize)>,
    ) -> Result<(), DeviceError> {
        let path = match kind {
            CopyKind::DeviceToDevice => CopyPath::PerRange,
            _ => self.path,
        };
        let issued = match path {
            CopyPath::Batch => {
                self.counters.batches.fetch_add(1, Ordering::Relaxed);
                let mut dsts = Vec::with_capacity(copies.len());
                let mut srcs = Vec::with_capacity(copies.len());
                let mut sizes = Vec::with_capacity(copies.len());
                for (dst, src, len) in copies {
                    dsts.push(dst);
                    srcs.push(src);
                    sizes.push(len);
                }
                // SAFETY: each (dst, src, len) is valid per this function's contract, until
                // the stream is synchronized.
                unsafe {
                    self.acl.memcpy_batch_async(
                        &mut dsts,
                        &mut srcs,
                        &mut sizes,
                        kind,
                        self.device,
                        stream.raw(),
                    )
                }
            }
            CopyPath::PerRange => copies.into_iter().try_for_each(|(dst, src, len)| {
                self.counters.copies.fetch_add(1, Ordering::Relaxed);
                // SAFETY: as for the batch above, one copy at a time.
                unsafe { self.acl.memcpy_async(dst, src, len, kind, stream.raw()) }
            }),
        };
        issued.map_err(|e| {
            let failed = self.error(e);
            match self.synchronize(stream) {
                Ok(()) => failed,
                Err(drain) => DeviceError::Runtime {
                    device: self.name.clone(),
                    call: "aclrtSynchronizeStream",
                    message: format!(
                        "draining after a failed copy issue ({failed}) also failed: {drain}"
                    ),
                },
            }
        })
    }

    /// Stages `plan` (device side from `device_side`), takes a pinned buffer and a stream.
    fn prepare(
        &self,
        plan: &CopyPlan,
        device_side: impl Fn(&CopyRun) -> (u32, usize),
    ) -> Result<(StagedPlan, PinnedHost, Stream), DeviceError> {
        self.bind()?;
        self.counters.plans.fetch_add(1, Ordering::Relaxed);
        let staged = StagedPlan::new(plan.runs(), device_side);
        let staging = self.staging.take(staged.bytes, |len| {
            PinnedHost::new(&self.acl, len).map_err(|e| self.error(e))
        })?;
        let stream = self.take_stream()?;
        Ok((staged, staging, stream))
    }

    /// Returns a plan's staging buffer and stream for reuse.
    fn finish(&self, staging: PinnedHost, stream: Stream) {
        self.staging.give_back(staging);
        self.streams.lock().push(stream);
    }
}

/// The device address of a range in the engine regions.
fn device_addr(regions: &[Region], range: &DeviceRange) -> *mut c_void {
    (regions[range.buffer as usize].addr + range.offset as u64) as *mut c_void
}

impl Device for AscendDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn ordinal(&self) -> u32 {
        self.device
    }

    fn start_gather<'a>(
        &'a self,
        plan: &'a CopyPlan,
        engine: &'a EngineMemory,
        host: &'a mut [&mut [u8]],
    ) -> Result<PendingCopy<'a>, DeviceError> {
        let regions = check_regions(engine)?;
        check_gather(plan, regions, host)?;
        if plan.runs().is_empty() {
            self.counters.plans.fetch_add(1, Ordering::Relaxed);
            return Ok(PendingCopy::done());
        }
        let (staged, mut staging, stream) = self.prepare(plan, |r| (r.src_buffer, r.src_offset))?;
        let base = staging.as_mut_ptr();
        let copies = staged.ranges.iter().map(|range| {
            let dst = base.wrapping_add(range.staging).cast::<c_void>();
            (dst, device_addr(regions, range), range.len)
        });
        // SAFETY: each range is the union of runs check_gather proved inside an engine
        // region (valid per EngineMemory's contract) and a range of the pinned staging
        // buffer StagedPlan sized; both are kept until the synchronize in wait.
        let issued = unsafe { self.issue(&stream, CopyKind::DeviceToHost, copies.collect()) };
        if let Err(e) = issued {
            self.finish(staging, stream);
            return Err(e);
        }
        Ok(PendingCopy::new(move || {
            let landed = self.synchronize(&stream);
            // After a failed synchronize the staging bytes are not trustworthy: the
            // caller's buffers stay untouched.
            if landed.is_ok() {
                staged.unpack(plan.runs(), &staging, host);
            }
            self.finish(staging, stream);
            landed
        }))
    }

    fn start_scatter<'a>(
        &'a self,
        plan: &'a CopyPlan,
        host: &'a [&[u8]],
        engine: &'a EngineMemory,
    ) -> Result<PendingCopy<'a>, DeviceError> {
        let regions = check_regions(engine)?;
        check_scatter(plan, host, regions)?;
        if plan.runs().is_empty() {
            self.counters.plans.fetch_add(1, Ordering::Relaxed);
            return Ok(PendingCopy::done());
        }
        let (staged, mut staging, stream) = self.prepare(plan, |r| (r.dst_buffer, r.dst_offset))?;
        staged.pack(plan.runs(), host, &mut staging);
        let base = staging.as_mut_ptr();
        let copies = staged.ranges.iter().map(|range| {
            let src = base.wrapping_add(range.staging).cast::<c_void>();
            (device_addr(regions, range), src, range.len)
        });
        // SAFETY: as in start_gather, with check_scatter's proof.
        let issued = unsafe { self.issue(&stream, CopyKind::HostToDevice, copies.collect()) };
        if let Err(e) = issued {
            self.finish(staging, stream);
            return Err(e);
        }
        Ok(PendingCopy::new(move || {
            let landed = self.synchronize(&stream);
            self.finish(staging, stream);
            landed
        }))
    }

    /// One `aclrtMemcpyAsync` (`ACL_MEMCPY_DEVICE_TO_DEVICE`) per run, runs that continue
    /// each other on both sides merged, then one synchronize; no staging. Pages on another
    /// device than this one are refused (`Ok(None)`, a debug log): copying between NPUs
    /// needs peer access, which kvrelay does not enable.
    fn start_scatter_from_device<'a>(
        &'a self,
        plan: &'a CopyPlan,
        pages: &'a [DevicePage],
        engine: &'a EngineMemory,
    ) -> Result<Option<PendingCopy<'a>>, DeviceError> {
        if let Some(page) = pages.iter().find(|p| p.ordinal() != self.device) {
            tracing::debug!(
                device = %self.name,
                page_device = page.ordinal(),
                "PD pages on another NPU than the engine's KV; loading from their host copies"
            );
            return Ok(None);
        }
        let regions = check_regions(engine)?;
        check_device_scatter(plan, pages, regions)?;
        self.bind()?;
        self.counters.plans.fetch_add(1, Ordering::Relaxed);
        if plan.runs().is_empty() {
            return Ok(Some(PendingCopy::done()));
        }
        let stream = self.take_stream()?;
        let copies = merged_device_copies(plan.runs(), pages, regions);
        // SAFETY: check_device_scatter proved every run inside its page (held by `pages`,
        // which the caller keeps until wait) and its engine region (valid per
        // EngineMemory's contract); both stay until the synchronize in wait.
        let issued = unsafe { self.issue(&stream, CopyKind::DeviceToDevice, copies) };
        if let Err(e) = issued {
            self.streams.lock().push(stream);
            return Err(e);
        }
        Ok(Some(PendingCopy::new(move || {
            let landed = self.synchronize(&stream);
            self.streams.lock().push(stream);
            landed
        })))
    }
}

/// A scatter's runs from device pages as (dst, src, len) device copies, in plan order, a run
/// merged into the previous copy when it continues it on both sides.
fn merged_device_copies(
    runs: &[CopyRun],
    pages: &[DevicePage],
    regions: &[Region],
) -> Vec<(*mut c_void, *mut c_void, usize)> {
    let mut copies: Vec<(u64, u64, usize)> = Vec::new();
    for run in runs {
        let dst = regions[run.dst_buffer as usize].addr + run.dst_offset as u64;
        let src = pages[run.src_buffer as usize].addr() + run.src_offset as u64;
        match copies.last_mut() {
            Some((d, s, len)) if *d + *len as u64 == dst && *s + *len as u64 == src => {
                *len += run.len;
            }
            _ => copies.push((dst, src, run.len)),
        }
    }
    copies
        .into_iter()
        .map(|(dst, src, len)| (dst as *mut c_void, src as *mut c_void, len))
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn run(src_buffer: u32, src_offset: usize, dst_buffer: u32, dst_offset: usize) -> CopyRun {
        CopyRun {
            src_buffer,
            src_offset,
            dst_buffer,
            dst_offset,
            len: 64,
        }
    }

    #[test]
    fn device_copies_merge_only_runs_that_continue_on_both_sides() {
        let page = |addr| DevicePage::new(0, addr, 4096, Bytes::new());
        let pages = [page(0x10_0000), page(0x20_0000)];
        let regions = [
            Region {
                addr: 0x80_0000,
                len: 4096,
            },
            Region {
                addr: 0x90_0000,
                len: 4096,
            },
        ];
        let runs = [
            run(0, 0, 0, 128),
            // Continues on both sides: merged.
            run(0, 64, 0, 192),
            // Continues the destination only (another page).
            run(1, 0, 0, 256),
            // Continues the source only (another region).
            run(1, 64, 1, 0),
        ];
        let copies: Vec<(u64, u64, usize)> = merged_device_copies(&runs, &pages, &regions)
            .into_iter()
            .map(|(dst, src, len)| (dst as u64, src as u64, len))
            .collect();
        assert_eq!(
            copies,
            [
                (0x80_0080, 0x10_0000, 128),
                (0x80_0100, 0x20_0000, 64),
                (0x90_0000, 0x20_0040, 64),
            ]
        );
    }
}

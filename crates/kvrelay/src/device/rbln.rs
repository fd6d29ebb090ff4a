//! The RBLN device (feature `rbln`): engine KV memory in RBLN device memory, copied with
//! the RBLN runtime (`librbln.so`, loaded at run time through `rbln-sys`).
//!
//! Engine regions are device virtual addresses: the `data_ptr()` of torch-rbln KV tensors
//! (device-tensor mode, vLLM-RBLN 0.12's default). A plan is started as one batch of
//! `rbln_memcpy_{v2h,h2v}_async` calls (the runtime's batched `*_multi` calls take a
//! `std::vector` and are not C-callable), and [`PendingCopy::wait`] is one
//! `rbln_device_synchronize`. [`RblnDevice::calls`] counts those calls for benches.
//!
//! Each runtime call is a DMA descriptor that costs about 17 µs on the device (Rebellions'
//! LMCache notes), and the RBLN layouts keep heads apart inside a block, so a plan to
//! LMCache's token-major chunks has one run per (token, head): thousands of runs of a few
//! hundred bytes. [`Staging::Auto`] therefore copies such plans through a device-shaped host
//! buffer instead: one async copy per contiguous device range (a whole block of one layer
//! for full blocks), and the (token, head) reordering as host memcpy after the synchronize
//! (gather) or before the copies (scatter). Plans whose runs are already large go direct,
//! one async copy per run. Either way a plan makes at most `runs + 1` runtime calls.
//!
//! Staging buffers are 4 KiB aligned (2 MiB from 2 MiB up), which the runtime's DMA path
//! needs. They are not registered (pinned) with the runtime: its host registration call
//! has no published C signature.
//!
//! Nothing here has run on RBLN hardware; the tests and benches use the `rbln-emu` test
//! double.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use rbln_sys::search::test_double_for;
pub use rbln_sys::{
    AbiCheck, AllocKind, CopyHandle, DeviceMemory, LoadError, RblnError, Runtime, BUILT_ABI,
};

use super::staged::{bad_region, check_regions, region_end, StagedPlan, StagingPool};
use super::{
    check_gather, check_scatter, Device, DeviceError, EngineMemory, HostBuffer, PendingCopy, Region,
};
use crate::plan::{CopyPlan, CopyRun};

/// Runtime calls an [`RblnDevice`] made, cumulative since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeCalls {
    /// Plans started.
    pub plans: u64,
    /// Async copy calls (one per run).
    pub copies: u64,
    /// Of those, copies the runtime completed synchronously (handle 0: device memory not
    /// yet materialized).
    pub synchronous_copies: u64,
    /// `rbln_device_synchronize` calls.
    pub synchronizes: u64,
    /// Plans copied through a device-shaped host staging buffer ([`Staging::Auto`]).
    pub staged_plans: u64,
}

impl RuntimeCalls {
    /// Every runtime call counted: copies plus synchronizes.
    pub fn total(&self) -> u64 {
        self.copies + self.synchronizes
    }

    /// The calls made between `earlier` and `self`.
    pub fn since(&self, earlier: &RuntimeCalls) -> RuntimeCalls {
        RuntimeCalls {
            plans: self.plans - earlier.plans,
            copies: self.copies - earlier.copies,
            synchronous_copies: self.synchronous_copies - earlier.synchronous_copies,
            synchronizes: self.synchronizes - earlier.synchronizes,
            staged_plans: self.staged_plans - earlier.staged_plans,
        }
    }
}

#[derive(Default)]
struct Counters {
    plans: AtomicU64,
    copies: AtomicU64,
    synchronous_copies: AtomicU64,
    synchronizes: AtomicU64,
    staged_plans: AtomicU64,
}

/// Whether plans with many small runs are copied through a device-shaped host buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Staging {
    /// Stage when merging the plan's runs into contiguous device ranges saves more
    /// runtime calls than the extra host copy costs (see [`CALL_COST_BYTES`]).
    #[default]
    Auto,
    /// Always one async copy per run, straight between device and the caller's buffers.
    Never,
}

/// What one runtime call costs, in bytes of host memcpy: about 17 µs per host-DMA
/// descriptor (Rebellions' LMCache design notes) at ~15 GB/s of host copying. Staging pays
/// when `(runs - device ranges) * CALL_COST_BYTES` exceeds the plan's bytes.
pub const CALL_COST_BYTES: usize = 256 << 10;

/// A whole device allocation as an engine region (its device virtual address).
impl From<&DeviceMemory> for Region {
    fn from(memory: &DeviceMemory) -> Self {
        Region {
            addr: memory.vaddr(),
            len: memory.len(),
        }
    }
}

/// One RBLN device (a torch-rbln device number) of a loaded runtime.
pub struct RblnDevice {
    runtime: Arc<Runtime>,
    device: u32,
    name: String,
    counters: Counters,
    staging: Staging,
    pool: StagingPool<HostBuffer>,
}

impl std::fmt::Debug for RblnDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RblnDevice")
            .field("name", &self.name)
            .field("runtime", &self.runtime)
            .finish()
    }
}

impl RblnDevice {
    /// Device `device` of the process-wide runtime, found through rbln-sys's search order
    /// (`RBLN_RUNTIME_LIB`, an already loaded `librbln.so`, the rebel package, the system
    /// library path).
    pub fn open(device: u32) -> Result<Self, DeviceError> {
        let runtime = Runtime::global().map_err(|e| DeviceError::Runtime {
            device: format!("rbln:{device}"),
            call: "dlopen librbln.so",
            message: e.to_string(),
        })?;
        Self::new(runtime, device)
    }

    /// Device `device` of `runtime`, checked against the runtime's device count.
    pub fn new(runtime: Arc<Runtime>, device: u32) -> Result<Self, DeviceError> {
        let rbln = RblnDevice {
            runtime,
            device,
            name: format!("rbln:{device}"),
            counters: Counters::default(),
            staging: Staging::default(),
            pool: StagingPool::new(),
        };
        let count = rbln.runtime.device_count().map_err(|e| rbln.error(e))?;
        if device >= count {
            return Err(DeviceError::Runtime {
                device: rbln.name,
                call: "rbln_get_device_count",
                message: format!("device {device} does not exist: the runtime has {count}"),
            });
        }
        Ok(rbln)
    }

    /// Sets when plans are staged (default [`Staging::Auto`]).
    pub fn with_staging(mut self, staging: Staging) -> Self {
        self.staging = staging;
        self
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The torch-rbln device number.
    pub fn device(&self) -> u32 {
        self.device
    }

    /// Runtime calls made so far.
    pub fn calls(&self) -> RuntimeCalls {
        let c = &self.counters;
        RuntimeCalls {
            plans: c.plans.load(Ordering::Relaxed),
            copies: c.copies.load(Ordering::Relaxed),
            synchronous_copies: c.synchronous_copies.load(Ordering::Relaxed),
            synchronizes: c.synchronizes.load(Ordering::Relaxed),
            staged_plans: c.staged_plans.load(Ordering::Relaxed),
        }
    }

    /// Asks the runtime whether every region of `engine` is device memory of this device,
    /// first and last byte. Call once when an engine registers its KV cache (two runtime
    /// calls per region); plans do not repeat it.
    pub fn verify_engine_memory(&self, engine: &EngineMemory) -> Result<(), DeviceError> {
        for (i, region) in engine.regions().iter().enumerate() {
            let last = region_end(region).map(|end| end.saturating_sub(1).max(region.addr));
            let last = last.ok_or_else(|| bad_region(engine, i, region))?;
            for vaddr in [region.addr, last] {
                let owner = self.runtime.device_of(vaddr).map_err(|e| self.error(e))?;
                if owner != self.device {
                    return Err(DeviceError::Runtime {
                        device: self.name.clone(),
                        call: "rbln::rbln_get_torch_device_id_from_vaddr",
                        message: format!(
                            "engine region {i} ({vaddr:#x}) belongs to rbln:{owner}, not {}",
                            self.name
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn error(&self, e: RblnError) -> DeviceError {
        DeviceError::Runtime {
            device: self.name.clone(),
            call: e.call(),
            message: e.to_string(),
        }
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        self.counters.synchronizes.fetch_add(1, Ordering::Relaxed);
        self.runtime
            .device_synchronize(self.device)
            .map_err(|e| self.error(e))
    }

    /// Starts one async copy per item. On the first failing call it stops, drains the
    /// copies already started (they use the caller's buffers, whose borrows end when this
    /// returns), and returns that failure.
    fn start_copies<T>(
        &self,
        items: &[T],
        mut start: impl FnMut(&T) -> Result<CopyHandle, RblnError>,
    ) -> Result<(), DeviceError> {
        for item in items {
            self.counters.copies.fetch_add(1, Ordering::Relaxed);
            match start(item) {
                Ok(handle) if handle.completed_synchronously() => {
                    self.counters
                        .synchronous_copies
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    let failed = self.error(e);
                    return Err(match (failed, self.synchronize()) {
                        (failed, Ok(())) => failed,
                        (
                            DeviceError::Runtime {
                                device,
                                call,
                                message,
                            },
                            Err(drain),
                        ) => DeviceError::Runtime {
                            device,
                            call,
                            message: format!(
                                "{message}; draining the copies already started also failed: {drain}"
                            ),
                        },
                        (failed, Err(_)) => failed,
                    });
                }
            }
        }
        Ok(())
    }

    /// The staged form of `plan` when [`Staging`] allows it and it saves more runtime calls
    /// than the host copy costs. `device_side` gives a run's device buffer and offset.
    fn stage(
        &self,
        plan: &CopyPlan,
        device_side: impl Fn(&CopyRun) -> (u32, usize),
    ) -> Option<StagedPlan> {
        let runs = plan.runs();
        // Runs that average a call's worth of bytes cannot gain: merging saves fewer calls
        // than total_bytes / CALL_COST_BYTES.
        if self.staging == Staging::Never
            || runs.is_empty()
            || plan.total_bytes() / runs.len() >= CALL_COST_BYTES
        {
            return None;
        }
        let staged = StagedPlan::new(runs, device_side);
        let saved = runs.len() - staged.ranges.len();
        (saved.saturating_mul(CALL_COST_BYTES) > plan.total_bytes()).then_some(staged)
    }
}

impl Device for RblnDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn start_gather<'a>(
        &'a self,
        plan: &'a CopyPlan,
        engine: &'a EngineMemory,
        host: &'a mut [&mut [u8]],
    ) -> Result<PendingCopy<'a>, DeviceError> {
        let regions = check_regions(engine)?;
        check_gather(plan, regions, host)?;
        self.counters.plans.fetch_add(1, Ordering::Relaxed);
        if plan.runs().is_empty() {
            return Ok(PendingCopy::done());
        }
        if let Some(staged) = self.stage(plan, |r| (r.src_buffer, r.src_offset)) {
            self.counters.staged_plans.fetch_add(1, Ordering::Relaxed);
            let mut staging = self.pool.take(staged.bytes, HostBuffer::zeroed)?;
            let base = staging.as_mut_ptr();
            let started = self.start_copies(&staged.ranges, |range| {
                let src = regions[range.buffer as usize].addr + range.offset as u64;
                // SAFETY: the device range is the union of runs check_gather/check_scatter proved inside
                // the region (engine memory, valid per EngineMemory's contract); the host
                // range lies in `staging` (StagedPlan sized it), which no one else uses
                // and which the PendingCopy below keeps until after the synchronize.
                unsafe {
                    self.runtime
                        .memcpy_v2h_async(src, base.wrapping_add(range.staging), range.len)
                }
            });
            if let Err(e) = started {
                self.pool.give_back(staging);
                return Err(e);
            }
            return Ok(PendingCopy::new(move || {
                let landed = self.synchronize();
                // After a failed synchronize the staging bytes are not trustworthy: the
                // caller's buffers stay untouched.
                if landed.is_ok() {
                    staged.unpack(plan.runs(), &staging, host);
                }
                self.pool.give_back(staging);
                landed
            }));
        }
        let host: Vec<*mut u8> = host.iter_mut().map(|b| b.as_mut_ptr()).collect();
        self.start_copies(plan.runs(), |run| {
            let src = regions[run.src_buffer as usize].addr + run.src_offset as u64;
            let dst = host[run.dst_buffer as usize].wrapping_add(run.dst_offset);
            // SAFETY: check_gather/check_scatter proved both ranges lie inside their buffers: the host
            // chunk buffer is exclusively borrowed for 'a, which the returned PendingCopy
            // holds until the synchronize that lands the copy; the device range is engine
            // memory, valid per EngineMemory's contract.
            unsafe { self.runtime.memcpy_v2h_async(src, dst, run.len) }
        })?;
        Ok(PendingCopy::new(move || self.synchronize()))
    }

    fn start_scatter<'a>(
        &'a self,
        plan: &'a CopyPlan,
        host: &'a [&[u8]],
        engine: &'a EngineMemory,
    ) -> Result<PendingCopy<'a>, DeviceError> {
        let regions = check_regions(engine)?;
        check_scatter(plan, host, regions)?;
        self.counters.plans.fetch_add(1, Ordering::Relaxed);
        if plan.runs().is_empty() {
            return Ok(PendingCopy::done());
        }
        if let Some(staged) = self.stage(plan, |r| (r.dst_buffer, r.dst_offset)) {
            self.counters.staged_plans.fetch_add(1, Ordering::Relaxed);
            let mut staging = self.pool.take(staged.bytes, HostBuffer::zeroed)?;
            staged.pack(plan.runs(), host, &mut staging);
            let base = staging.as_ptr();
            let started = self.start_copies(&staged.ranges, |range| {
                let dst = regions[range.buffer as usize].addr + range.offset as u64;
                // SAFETY: the device range is the union of runs check_gather/check_scatter proved inside
                // the region, engine memory no one else writes during the copy (per
                // EngineMemory's contract); the host range lies in `staging`, which the
                // PendingCopy below keeps unchanged until after the synchronize.
                unsafe {
                    self.runtime
                        .memcpy_h2v_async(base.wrapping_add(range.staging), dst, range.len)
                }
            });
            if let Err(e) = started {
                self.pool.give_back(staging);
                return Err(e);
            }
            return Ok(PendingCopy::new(move || {
                let landed = self.synchronize();
                self.pool.give_back(staging);
                landed
            }));
        }
        self.start_copies(plan.runs(), |run| {
            let src = host[run.src_buffer as usize][run.src_offset..].as_ptr();
            let dst = regions[run.dst_buffer as usize].addr + run.dst_offset as u64;
            // SAFETY: check_gather/check_scatter proved both ranges lie inside their buffers: the host
            // chunk buffer is borrowed for 'a, which the returned PendingCopy holds until
            // the synchronize that lands the copy; the device range is engine memory that
            // no one else writes during the copy, per EngineMemory's contract.
            unsafe { self.runtime.memcpy_h2v_async(src, dst, run.len) }
        })?;
        Ok(PendingCopy::new(move || self.synchronize()))
    }
}

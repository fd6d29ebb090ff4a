//! The RBLN device (feature `rbln`): engine KV memory in RBLN device memory, copied with
//! the RBLN runtime (`librbln.so`, loaded at run time through `rbln-sys`).
//!
//! Engine regions are device virtual addresses: the `data_ptr()` of torch-rbln KV tensors
//! (device-tensor mode, vLLM-RBLN 0.12's default). A plan's coalesced runs are started as
//! one `rbln_memcpy_{v2h,h2v}_async` call each (the runtime's batched `*_multi` calls take
//! a `std::vector` and are not C-callable), and [`PendingCopy::wait`] is one
//! `rbln_device_synchronize`. [`RblnDevice::calls`] counts those calls for benches.
//!
//! Staging buffers are 4 KiB aligned (2 MiB from 2 MiB up), which the runtime's DMA path
//! needs. They are not registered (pinned) with the runtime: its host registration call
//! has no published C signature.
//!
//! Nothing here has run on RBLN hardware; the tests and benches use the `rbln-emu` test
//! double.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use rbln_sys::{AbiCheck, AllocKind, CopyHandle, DeviceMemory, LoadError, RblnError, Runtime};

use super::{check_plan, Device, DeviceError, EngineMemory, HostBuffer, PendingCopy, Region};
use crate::plan::{CopyPlan, CopyRun, Endpoint};

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
        }
    }
}

#[derive(Default)]
struct Counters {
    plans: AtomicU64,
    copies: AtomicU64,
    synchronous_copies: AtomicU64,
    synchronizes: AtomicU64,
}

/// One RBLN device (a torch-rbln device number) of a loaded runtime.
pub struct RblnDevice {
    runtime: Arc<Runtime>,
    device: u32,
    name: String,
    counters: Counters,
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

    /// Starts one async copy per run, then returns the wait (one synchronize). On the first
    /// failing call it stops, drains what was started, and returns that failure.
    fn submit<'a>(
        &'a self,
        plan: &CopyPlan,
        mut start: impl FnMut(&CopyRun) -> Result<CopyHandle, RblnError>,
    ) -> Result<PendingCopy<'a>, DeviceError> {
        self.counters.plans.fetch_add(1, Ordering::Relaxed);
        if plan.runs().is_empty() {
            return Ok(PendingCopy::done());
        }
        for run in plan.runs() {
            self.counters.copies.fetch_add(1, Ordering::Relaxed);
            match start(run) {
                Ok(handle) if handle.completed_synchronously() => {
                    self.counters
                        .synchronous_copies
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    let failed = self.error(e);
                    // The copies already started use the caller's buffers: they must land
                    // before those borrows end.
                    return Err(match (failed, self.synchronize()) {
                        (failed, Ok(())) => failed,
                        (DeviceError::Runtime { device, call, message }, Err(drain)) => {
                            DeviceError::Runtime {
                                device,
                                call,
                                message: format!("{message}; draining the copies already started also failed: {drain}"),
                            }
                        }
                        (failed, Err(_)) => failed,
                    });
                }
            }
        }
        Ok(PendingCopy::new(move || self.synchronize()))
    }
}

/// One past the region's last device address, if that is addressable.
fn region_end(region: &Region) -> Option<u64> {
    region.addr.checked_add(region.len as u64)
}

fn bad_region(engine: &EngineMemory, index: usize, region: &Region) -> DeviceError {
    let layout = engine.layout();
    DeviceError::BadRegions {
        layout: layout.kind().to_string(),
        expected: layout.num_buffers(),
        bytes: layout.buffer_bytes(),
        found: engine.regions().len(),
        detail: format!(
            " (region {index}: {} bytes at {:#x} overflow the address space)",
            region.len, region.addr
        ),
    }
}

/// Checks that every region's device range is addressable, so `addr + offset` below
/// cannot overflow for offsets `check_plan` accepted.
fn check_regions(engine: &EngineMemory) -> Result<&[Region], DeviceError> {
    let regions = engine.regions();
    match regions.iter().position(|r| region_end(r).is_none()) {
        Some(i) => Err(bad_region(engine, i, &regions[i])),
        None => Ok(regions),
    }
}

impl Device for RblnDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn alloc_staging(&self, len: usize) -> Result<HostBuffer, DeviceError> {
        HostBuffer::zeroed(len)
    }

    fn start_gather<'a>(
        &'a self,
        plan: &'a CopyPlan,
        engine: &'a EngineMemory,
        host: &'a mut [&mut [u8]],
    ) -> Result<PendingCopy<'a>, DeviceError> {
        let regions = check_regions(engine)?;
        check_plan(
            plan,
            Endpoint::Paged,
            Endpoint::Chunks,
            regions.iter().map(|r| r.len),
            host.iter().map(|b| b.len()),
        )?;
        let host: Vec<*mut u8> = host.iter_mut().map(|b| b.as_mut_ptr()).collect();
        self.submit(plan, |run| {
            let src = regions[run.src_buffer as usize].addr + run.src_offset as u64;
            let dst = host[run.dst_buffer as usize].wrapping_add(run.dst_offset);
            // SAFETY: check_plan proved both ranges lie inside their buffers: the host
            // chunk buffer is exclusively borrowed for 'a, which the returned PendingCopy
            // holds until the synchronize that lands the copy; the device range is engine
            // memory, valid per EngineMemory's contract.
            unsafe { self.runtime.memcpy_v2h_async(src, dst, run.len) }
        })
    }

    fn start_scatter<'a>(
        &'a self,
        plan: &'a CopyPlan,
        host: &'a [&[u8]],
        engine: &'a EngineMemory,
    ) -> Result<PendingCopy<'a>, DeviceError> {
        let regions = check_regions(engine)?;
        check_plan(
            plan,
            Endpoint::Chunks,
            Endpoint::Paged,
            host.iter().map(|b| b.len()),
            regions.iter().map(|r| r.len),
        )?;
        self.submit(plan, |run| {
            let src = host[run.src_buffer as usize][run.src_offset..].as_ptr();
            let dst = regions[run.dst_buffer as usize].addr + run.dst_offset as u64;
            // SAFETY: check_plan proved both ranges lie inside their buffers: the host
            // chunk buffer is borrowed for 'a, which the returned PendingCopy holds until
            // the synchronize that lands the copy; the device range is engine memory that
            // no one else writes during the copy, per EngineMemory's contract.
            unsafe { self.runtime.memcpy_h2v_async(src, dst, run.len) }
        })
    }
}

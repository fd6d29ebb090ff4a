//! Copy engines: the [`Device`] trait moves the runs of a [`CopyPlan`] between engine KV
//! memory and host buffers.
//!
//! The shape follows what vendor runtimes offer (RBLN `rbln_memcpy_{v2h,h2v}_async` plus one
//! `rbln_device_synchronize`; Ascend `aclrtMemcpyAsync` on a stream plus one stream
//! synchronize): a plan is started as one batch of copies and completed by one wait. The
//! host implementation copies with memcpy and is always available.

#[cfg(feature = "ascend")]
pub mod ascend;
mod host;
mod kernel;
mod pool;
#[cfg(feature = "rbln")]
pub mod rbln;
#[cfg(any(feature = "rbln", feature = "ascend"))]
mod staged;
pub(crate) mod stream;

use std::sync::Arc;

use bytes::Bytes;

#[cfg(feature = "ascend")]
pub use ascend::{AclCalls, AscendDevice};
pub use host::{HostBuffer, HostDevice, HostKvCache};
pub(crate) use pool::StagingPool;
#[cfg(feature = "rbln")]
pub use rbln::{RblnDevice, RuntimeCalls};

use crate::layout::KvLayout;
use crate::plan::{CopyPlan, Endpoint, PlanError};

/// A device copy that failed or could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("plan copies {from:?} to {to:?}, which this call does not do")]
    WrongDirection { from: Endpoint, to: Endpoint },
    #[error("engine memory for layout {layout} needs {expected} regions of at least {bytes} bytes; got {found} regions{detail}")]
    BadRegions {
        layout: String,
        expected: usize,
        bytes: usize,
        found: usize,
        detail: String,
    },
    #[error("cannot allocate {len} bytes of host memory aligned to {align}")]
    OutOfHostMemory { len: usize, align: usize },
    #[error("{device} runtime error in {call}: {message}")]
    Runtime {
        device: String,
        call: &'static str,
        message: String,
    },
}

/// One registered buffer of engine KV memory: a device virtual address (or, for the host
/// device, a host pointer) and its length in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub addr: u64,
    pub len: usize,
}

/// The engine's KV memory as registered with a connector: a layout and one region per
/// layout buffer.
#[derive(Clone)]
pub struct EngineMemory {
    layout: KvLayout,
    regions: Vec<Region>,
    /// Keeps memory kvrelay allocated itself alive while any registration uses it.
    _owner: Option<Arc<HostKvCache>>,
}

impl std::fmt::Debug for EngineMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineMemory")
            .field("layout", &self.layout)
            .field("regions", &self.regions)
            .finish()
    }
}

impl EngineMemory {
    /// Registers engine memory described by raw addresses, as an engine hands over its KV
    /// tensors (`data_ptr()` of each layer).
    ///
    /// # Safety
    /// Every region must be memory of the device it is used with, valid for reads and writes
    /// of `len` bytes for as long as this value or a clone of it lives, and the engine must
    /// not touch the blocks of a request while a copy of that request runs (vLLM's connector
    /// contract guarantees this).
    pub unsafe fn from_raw(layout: KvLayout, regions: Vec<Region>) -> Result<Self, DeviceError> {
        let bad = |detail: String| DeviceError::BadRegions {
            layout: layout.kind().to_string(),
            expected: layout.num_buffers(),
            bytes: layout.buffer_bytes(),
            found: regions.len(),
            detail,
        };
        if regions.len() != layout.num_buffers() {
            return Err(bad(String::new()));
        }
        if let Some((i, r)) = regions
            .iter()
            .enumerate()
            .find(|(_, r)| r.len < layout.buffer_bytes() || r.addr == 0)
        {
            return Err(bad(format!(
                " (region {i} is {} bytes at {:#x})",
                r.len, r.addr
            )));
        }
        Ok(EngineMemory {
            layout,
            regions,
            _owner: None,
        })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }
}

/// Where a chunk's bytes also live in device memory: a page of a PD buffer on an NPU, by
/// device ordinal and device address. The page stays held (not reused for other KV) while
/// this value lives, through the same owner as the chunk's host bytes: one lifetime for
/// both.
#[derive(Clone)]
pub struct DevicePage {
    ordinal: u32,
    addr: u64,
    len: usize,
    /// The chunk's bytes, whose owner holds the page.
    _held: Bytes,
}

impl std::fmt::Debug for DevicePage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePage")
            .field("ordinal", &self.ordinal)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .finish()
    }
}

impl DevicePage {
    /// `len` bytes at device address `addr` of device `ordinal`, valid while `held` (the
    /// chunk's bytes) or a clone of it lives.
    pub(crate) fn new(ordinal: u32, addr: u64, len: usize, held: Bytes) -> Self {
        DevicePage {
            ordinal,
            addr,
            len,
            _held: held,
        }
    }

    /// The device (logical id) the page is on.
    pub fn ordinal(&self) -> u32 {
        self.ordinal
    }

    /// The page's device address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The chunk's bytes in the page.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A started copy. [`PendingCopy::wait`] completes it; dropping it waits too, because the
/// buffers it borrows must not be reused while a device may still write them.
#[must_use = "a started copy must be waited for"]
pub struct PendingCopy<'a> {
    wait: Option<Box<dyn FnOnce() -> Result<(), DeviceError> + Send + 'a>>,
}

impl<'a> PendingCopy<'a> {
    /// A copy that already finished when it was started.
    pub fn done() -> Self {
        PendingCopy { wait: None }
    }

    /// A copy that finishes when `wait` returns.
    pub fn new(wait: impl FnOnce() -> Result<(), DeviceError> + Send + 'a) -> Self {
        PendingCopy {
            wait: Some(Box::new(wait)),
        }
    }

    /// Blocks until every copy of the plan has landed.
    pub fn wait(mut self) -> Result<(), DeviceError> {
        self.wait.take().map_or(Ok(()), |wait| wait())
    }
}

impl Drop for PendingCopy<'_> {
    fn drop(&mut self) {
        if let Some(wait) = self.wait.take() {
            if let Err(error) = wait() {
                tracing::error!(%error, "copy dropped without wait() failed");
            }
        }
    }
}

/// A copy engine between engine KV memory and host memory.
///
/// Implementations check every run against the registered regions and the host buffers
/// before the first byte moves, start the whole plan as one batch, and complete it with one
/// synchronize in [`PendingCopy::wait`].
pub trait Device: Send + Sync {
    /// A short name for logs and figures ("host", "rbln:0", ...).
    fn name(&self) -> &str;

    /// The device's id within its runtime (an NPU's logical id): what a PD channel of the
    /// same process opens its communicator on. Host memory is 0.
    fn ordinal(&self) -> u32 {
        0
    }

    /// Host memory the device copies to and from fastest. The default is aligned host
    /// memory (huge pages for large buffers); a device whose runtime can pin or register
    /// memory overrides it.
    fn alloc_staging(&self, len: usize) -> Result<HostBuffer, DeviceError> {
        HostBuffer::zeroed(len)
    }

    /// Starts a gather plan ([`Endpoint::Paged`] to [`Endpoint::Chunks`]): engine memory to
    /// host buffers.
    fn start_gather<'a>(
        &'a self,
        plan: &'a CopyPlan,
        engine: &'a EngineMemory,
        host: &'a mut [&mut [u8]],
    ) -> Result<PendingCopy<'a>, DeviceError>;

    /// Starts a scatter plan ([`Endpoint::Chunks`] to [`Endpoint::Paged`]): host buffers
    /// into engine memory.
    fn start_scatter<'a>(
        &'a self,
        plan: &'a CopyPlan,
        host: &'a [&[u8]],
        engine: &'a EngineMemory,
    ) -> Result<PendingCopy<'a>, DeviceError>;

    /// Starts a scatter plan whose sources are device pages (a chunk's [`DevicePage`], one
    /// per plan source buffer) into engine memory, device to device. `Ok(None)` when this
    /// device cannot read those pages (the default: no device-to-device path; or pages on
    /// another device): the caller then scatters the chunks' host bytes with
    /// [`Device::start_scatter`]. Every run is checked against the pages and the engine
    /// regions before a byte moves.
    fn start_scatter_from_device<'a>(
        &'a self,
        _plan: &'a CopyPlan,
        _pages: &'a [DevicePage],
        _engine: &'a EngineMemory,
    ) -> Result<Option<PendingCopy<'a>>, DeviceError> {
        Ok(None)
    }
}

/// Checks that `plan` runs from `source` to `dest`, and that its buffers fit.
fn check_plan(
    plan: &CopyPlan,
    source: Endpoint,
    dest: Endpoint,
    src_lens: impl ExactSizeIterator<Item = usize>,
    dst_lens: impl ExactSizeIterator<Item = usize>,
) -> Result<(), DeviceError> {
    if plan.source() != source || plan.dest() != dest {
        return Err(DeviceError::WrongDirection {
            from: plan.source(),
            to: plan.dest(),
        });
    }
    Ok(plan.check_buffers(src_lens, dst_lens)?)
}

/// The checks every device runs before a gather: direction, then every run inside the
/// engine regions and the host buffers.
pub fn check_gather(
    plan: &CopyPlan,
    regions: &[Region],
    host: &[&mut [u8]],
) -> Result<(), DeviceError> {
    check_plan(
        plan,
        Endpoint::Paged,
        Endpoint::Chunks,
        regions.iter().map(|r| r.len),
        host.iter().map(|b| b.len()),
    )
}

/// The checks every device runs before a scatter from device pages (see [`check_gather`]).
pub fn check_device_scatter(
    plan: &CopyPlan,
    pages: &[DevicePage],
    regions: &[Region],
) -> Result<(), DeviceError> {
    check_scatter_sources(plan, pages.iter().map(DevicePage::len), regions)
}

/// The checks every device runs before a scatter (see [`check_gather`]).
pub fn check_scatter(
    plan: &CopyPlan,
    host: &[&[u8]],
    regions: &[Region],
) -> Result<(), DeviceError> {
    check_scatter_sources(plan, host.iter().map(|b| b.len()), regions)
}

/// A scatter's checks, given the lengths of its source buffers.
fn check_scatter_sources(
    plan: &CopyPlan,
    src_lens: impl ExactSizeIterator<Item = usize>,
    regions: &[Region],
) -> Result<(), DeviceError> {
    check_plan(
        plan,
        Endpoint::Chunks,
        Endpoint::Paged,
        src_lens,
        regions.iter().map(|r| r.len),
    )
}

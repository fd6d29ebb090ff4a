//! Where the engine's authoritative KV cache lives.
//!
//! The engine computes on the host, always in its [`PagedKv`] working copy. With
//! [`KvPlacement::Host`] that copy is the cache the connector reads and writes. With a
//! device placement the cache is device memory, registered with the connector, and the
//! engine keeps its copy in step around the connector hooks: blocks a load wrote are
//! fetched into the host copy before the forward reads them, and blocks the forward wrote
//! are flushed to the device before `wait_for_save` gathers them.

use std::sync::Arc;

use kvrelay::device::{Device, EngineMemory, HostDevice};
use kvrelay::layout::KvLayout;

use crate::kv::PagedKv;
use crate::EngineError;

/// Where the engine's KV cache lives.
#[derive(Clone, Debug, Default)]
pub enum KvPlacement {
    /// Host memory: the engine's working copy is the cache.
    #[default]
    Host,
    /// RBLN device memory, one allocation per layout buffer, on this device.
    #[cfg(feature = "rbln")]
    Rbln(Arc<kvrelay::device::RblnDevice>),
    /// Ascend NPU memory, one allocation per layout buffer (vllm-ascend's separate K and V
    /// tensors per layer with `ascend_separate_kv`), on this device.
    #[cfg(feature = "ascend")]
    Ascend(Arc<kvrelay::device::AscendDevice>),
}

impl KvPlacement {
    /// Where tensor-parallel rank `rank` of `world` keeps its cache. On Ascend each rank
    /// has its own NPU, as vllm-ascend gives it: rank i uses the placement's device id + i
    /// of the same runtime, and a world larger than the devices the runtime sees is
    /// refused. The host and RBLN placements are shared by every rank.
    #[cfg_attr(not(feature = "ascend"), allow(unused_variables))]
    pub(crate) fn for_rank(&self, rank: u32, world: u32) -> Result<KvPlacement, EngineError> {
        match self {
            #[cfg(feature = "ascend")]
            KvPlacement::Ascend(first) if rank > 0 => {
                let id = first.device() + rank;
                let device = kvrelay::device::AscendDevice::new(Arc::clone(first.acl()), id)
                    .map_err(|e| {
                        EngineError::Config(format!(
                            "tensor_parallel_size {world} needs one NPU per rank (ids {}..={}): {e}",
                            first.device(),
                            first.device() + world - 1
                        ))
                    })?;
                Ok(KvPlacement::Ascend(Arc::new(device)))
            }
            _ => Ok(self.clone()),
        }
    }

    /// The cache for `layout` at this placement.
    #[cfg_attr(
        not(any(feature = "rbln", feature = "ascend")),
        allow(unused_variables)
    )]
    pub(crate) fn backing(&self, layout: &KvLayout) -> Result<Box<dyn KvBacking>, EngineError> {
        match self {
            KvPlacement::Host => Ok(Box::new(HostBacking)),
            #[cfg(feature = "rbln")]
            KvPlacement::Rbln(device) => Ok(Box::new(rbln::RblnBacking::new(
                Arc::clone(device),
                *layout,
            )?)),
            #[cfg(feature = "ascend")]
            KvPlacement::Ascend(device) => Ok(Box::new(ascend::AscendBacking::new(
                Arc::clone(device),
                *layout,
            )?)),
        }
    }
}

/// The cache behind the engine's host working copy.
pub(crate) trait KvBacking: Send {
    /// The registration a connector takes: the authoritative cache.
    fn engine_memory(&self, host: &PagedKv) -> EngineMemory;

    /// The device that moves bytes of [`KvBacking::engine_memory`].
    fn device(&self) -> Arc<dyn Device>;

    /// Copies `blocks` from the cache into the host copy (after a load wrote them).
    fn fetch(&self, host: &PagedKv, blocks: &[u32]) -> Result<(), EngineError>;

    /// Copies `blocks` from the host copy into the cache (after the forward wrote them).
    fn flush(&self, host: &PagedKv, blocks: &[u32]) -> Result<(), EngineError>;

    /// Whether the cache holds a layer's KV as soon as the forward computed it (the host
    /// copy is the cache), so a connector may save it layer by layer; otherwise it holds it
    /// only after the forward's [`KvBacking::flush`].
    fn current_during_forward(&self) -> bool {
        false
    }
}

/// Host placement: the working copy is the cache, so there is nothing to keep in step.
struct HostBacking;

impl KvBacking for HostBacking {
    fn engine_memory(&self, host: &PagedKv) -> EngineMemory {
        host.engine_memory()
    }

    fn device(&self) -> Arc<dyn Device> {
        Arc::new(HostDevice)
    }

    fn fetch(&self, _host: &PagedKv, _blocks: &[u32]) -> Result<(), EngineError> {
        Ok(())
    }

    fn flush(&self, _host: &PagedKv, _blocks: &[u32]) -> Result<(), EngineError> {
        Ok(())
    }

    fn current_during_forward(&self) -> bool {
        true
    }
}

#[cfg(feature = "rbln")]
mod rbln {
    use std::sync::Arc;

    use kvrelay::device::rbln::{AllocKind, DeviceMemory, RblnError};
    use kvrelay::device::{Device, DeviceError, EngineMemory, RblnDevice, Region};
    use kvrelay::layout::KvLayout;

    use super::KvBacking;
    use crate::kv::PagedKv;
    use crate::EngineError;

    #[derive(Clone, Copy)]
    enum Direction {
        ToHost,
        ToDevice,
    }

    /// The KV cache in RBLN device memory. Block copies are one
    /// `rbln_memcpy_{v2h,h2v}_async` per contiguous byte range and one
    /// `rbln_device_synchronize`.
    pub(super) struct RblnBacking {
        device: Arc<RblnDevice>,
        // Declared before `buffers`: the registration's raw addresses must not outlive them.
        memory: EngineMemory,
        buffers: Vec<DeviceMemory>,
    }

    impl RblnBacking {
        pub(super) fn new(device: Arc<RblnDevice>, layout: KvLayout) -> Result<Self, EngineError> {
            let buffers = (0..layout.num_buffers())
                .map(|_| {
                    DeviceMemory::new(
                        device.runtime(),
                        device.device(),
                        layout.buffer_bytes(),
                        AllocKind::Eager,
                    )
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| runtime_error(&device, e))?;
            let regions = buffers.iter().map(Region::from).collect();
            // SAFETY: each region is a live device allocation of exactly its length on
            // `device`, freed only when this backing drops, after `memory` (field order) and
            // after the engine's connector (the engine's field order). The engine touches a
            // block's device bytes only in fetch/flush, for blocks of requests it schedules,
            // which the connector does not copy at the same time.
            let memory = unsafe { EngineMemory::from_raw(layout, regions) }?;
            device.verify_engine_memory(&memory)?;
            Ok(RblnBacking {
                device,
                memory,
                buffers,
            })
        }

        /// Copies the bytes of `blocks` between device and host copy: every range is started
        /// asynchronously, then one synchronize waits for all of them.
        fn copy(
            &self,
            host: &PagedKv,
            blocks: &[u32],
            direction: Direction,
        ) -> Result<(), EngineError> {
            if blocks.is_empty() {
                return Ok(());
            }
            let runtime = self.device.runtime();
            for (buffer, offset, len) in host.block_ranges(blocks) {
                let vaddr = self.buffers[buffer].vaddr() + offset as u64;
                let local = host.buffer_ptr(buffer).wrapping_add(offset);
                // SAFETY: `block_ranges` lies inside buffer `buffer` of the layout, which the
                // host copy and the device allocation both hold in full. The engine calls
                // this between forwards, so nothing else reads or writes the host range, and
                // the connector copies no block of a request the engine schedules; both
                // ranges stay untouched until the synchronize below (also on error).
                let started = unsafe {
                    match direction {
                        Direction::ToHost => runtime.memcpy_v2h_async(vaddr, local, len),
                        Direction::ToDevice => runtime.memcpy_h2v_async(local, vaddr, len),
                    }
                };
                if let Err(e) = started {
                    // Copies already started use the host copy: drain them first.
                    let _ = runtime.device_synchronize(self.device.device());
                    return Err(runtime_error(&self.device, e));
                }
            }
            runtime
                .device_synchronize(self.device.device())
                .map_err(|e| runtime_error(&self.device, e))
        }
    }

    fn runtime_error(device: &RblnDevice, e: RblnError) -> EngineError {
        EngineError::KvMemory(DeviceError::Runtime {
            device: device.name().to_string(),
            call: e.call(),
            message: e.to_string(),
        })
    }

    impl KvBacking for RblnBacking {
        fn engine_memory(&self, _host: &PagedKv) -> EngineMemory {
            self.memory.clone()
        }

        fn device(&self) -> Arc<dyn Device> {
            self.device.clone()
        }

        fn fetch(&self, host: &PagedKv, blocks: &[u32]) -> Result<(), EngineError> {
            self.copy(host, blocks, Direction::ToHost)
        }

        fn flush(&self, host: &PagedKv, blocks: &[u32]) -> Result<(), EngineError> {
            self.copy(host, blocks, Direction::ToDevice)
        }
    }
}

#[cfg(feature = "ascend")]
mod ascend {
    use std::sync::Arc;

    use kvrelay::device::ascend::DeviceBuffer;
    use kvrelay::device::{AscendDevice, Device, DeviceError, EngineMemory, Region};
    use kvrelay::layout::KvLayout;

    use super::KvBacking;
    use crate::kv::PagedKv;
    use crate::EngineError;

    /// The KV cache in Ascend device memory. The engine's host copy is ordinary memory,
    /// which async copies cannot use (they need pinned memory), so blocks move with one
    /// synchronous `aclrtMemcpy` per contiguous byte range; only the connector's copies,
    /// which are the ones measured, take the batched path.
    pub(super) struct AscendBacking {
        device: Arc<AscendDevice>,
        // Declared before `buffers`: the registration's raw addresses must not outlive them.
        memory: EngineMemory,
        buffers: Vec<DeviceBuffer>,
    }

    impl AscendBacking {
        pub(super) fn new(
            device: Arc<AscendDevice>,
            layout: KvLayout,
        ) -> Result<Self, EngineError> {
            let buffers = (0..layout.num_buffers())
                .map(|_| device.alloc(layout.buffer_bytes()))
                .collect::<Result<Vec<_>, _>>()?;
            let regions = buffers.iter().map(Region::from).collect();
            // SAFETY: each region is a live device allocation of exactly its length on
            // `device`, freed only when this backing drops, after `memory` (field order) and
            // after the engine's connector (the engine's field order). The engine touches a
            // block's device bytes only in fetch/flush, for blocks of requests it schedules,
            // which the connector does not copy at the same time.
            let memory = unsafe { EngineMemory::from_raw(layout, regions) }?;
            Ok(AscendBacking {
                device,
                memory,
                buffers,
            })
        }

        fn error(&self, e: kvrelay::device::ascend::AclError) -> EngineError {
            EngineError::KvMemory(DeviceError::Runtime {
                device: self.device.name().to_string(),
                call: e.call(),
                message: e.to_string(),
            })
        }
    }

    impl KvBacking for AscendBacking {
        fn engine_memory(&self, _host: &PagedKv) -> EngineMemory {
            self.memory.clone()
        }

        fn device(&self) -> Arc<dyn Device> {
            self.device.clone()
        }

        fn fetch(&self, host: &PagedKv, blocks: &[u32]) -> Result<(), EngineError> {
            for (buffer, offset, len) in host.block_ranges(blocks) {
                // SAFETY: `block_ranges` lies inside buffer `buffer` of the layout, which the
                // host copy holds in full; the engine calls this between forwards, so nothing
                // else reads or writes the range while this exclusive slice lives.
                let local = unsafe {
                    std::slice::from_raw_parts_mut(
                        host.buffer_ptr(buffer).wrapping_add(offset),
                        len,
                    )
                };
                self.buffers[buffer]
                    .read(offset, local)
                    .map_err(|e| self.error(e))?;
            }
            Ok(())
        }

        fn flush(&self, host: &PagedKv, blocks: &[u32]) -> Result<(), EngineError> {
            for (buffer, offset, len) in host.block_ranges(blocks) {
                // SAFETY: as in fetch; the slice is only read.
                let local = unsafe {
                    std::slice::from_raw_parts(host.buffer_ptr(buffer).wrapping_add(offset), len)
                };
                self.buffers[buffer]
                    .write(offset, local)
                    .map_err(|e| self.error(e))?;
            }
            Ok(())
        }
    }
}

//! The host device: engine KV memory in ordinary process memory, copied with memcpy.

use std::alloc::Layout as AllocLayout;
use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use super::kernel::{copy_tiles, Kernel};
use super::stream::stream_fence;
use super::{check_gather, check_scatter, Device, DeviceError, EngineMemory, PendingCopy, Region};
use crate::layout::KvLayout;
use crate::plan::CopyPlan;

/// Zeroed host memory with a fixed alignment: 4 KiB, or 2 MiB for buffers of 2 MiB and
/// more, which is what DMA engines and huge pages want.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    /// Size and alignment of what `ptr` points at: a heap allocation for small buffers, a
    /// private anonymous mapping (size rounded up to 2 MiB) for huge ones.
    alloc: AllocLayout,
    /// What keeps memory this buffer did not allocate itself alive (a shared staging
    /// file's mapping); `alloc` only records its alignment then.
    owner: Option<Box<dyn Any + Send + Sync>>,
}

// SAFETY: HostBuffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    const SMALL_ALIGN: usize = 4096;
    const HUGE_ALIGN: usize = 2 << 20;

    pub fn zeroed(len: usize) -> Result<Self, DeviceError> {
        if len >= Self::HUGE_ALIGN {
            return Self::mapped(len);
        }
        let oom = DeviceError::OutOfHostMemory {
            len,
            align: Self::SMALL_ALIGN,
        };
        // A zero-sized allocation is undefined; allocate one byte and expose none.
        let alloc =
            AllocLayout::from_size_align(len.max(1), Self::SMALL_ALIGN).map_err(|_| oom.clone())?;
        // SAFETY: `alloc` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(alloc) };
        let ptr = NonNull::new(ptr).ok_or(oom)?;
        Ok(HostBuffer {
            ptr,
            len,
            alloc,
            owner: None,
        })
    }

    /// A buffer over `len` bytes at `ptr`, memory that `owner` keeps mapped (a shared
    /// staging file); dropping the buffer drops `owner`.
    ///
    /// # Safety
    /// `ptr` must be 4 KiB aligned, valid for reads and writes of `len` initialized bytes,
    /// reached through nothing but this buffer, and stay so until `owner` drops; moving
    /// `owner` must not move that memory.
    pub(crate) unsafe fn from_owned_mapping(
        ptr: NonNull<u8>,
        len: usize,
        owner: Box<dyn Any + Send + Sync>,
    ) -> Result<Self, DeviceError> {
        let alloc = AllocLayout::from_size_align(len.max(1), Self::SMALL_ALIGN).map_err(|_| {
            DeviceError::OutOfHostMemory {
                len,
                align: Self::SMALL_ALIGN,
            }
        })?;
        Ok(HostBuffer {
            ptr,
            len,
            alloc,
            owner: Some(owner),
        })
    }

    /// A 2 MiB aligned anonymous mapping advised for huge pages before any page is touched.
    /// (The allocator's `alloc_zeroed` at this alignment memsets the memory first, which
    /// faults it in as 4 KiB pages that the advice then no longer changes.)
    fn mapped(len: usize) -> Result<Self, DeviceError> {
        let oom = DeviceError::OutOfHostMemory {
            len,
            align: Self::HUGE_ALIGN,
        };
        let size = len
            .checked_next_multiple_of(Self::HUGE_ALIGN)
            .ok_or(oom.clone())?;
        let alloc =
            AllocLayout::from_size_align(size, Self::HUGE_ALIGN).map_err(|_| oom.clone())?;
        // Over-map by one alignment so an aligned range of `size` bytes lies inside.
        let map_len = size.checked_add(Self::HUGE_ALIGN).ok_or(oom.clone())?;
        // SAFETY: a fresh private anonymous mapping aliases nothing; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(oom);
        }
        let base = base.cast::<u8>();
        let head = base.align_offset(Self::HUGE_ALIGN);
        let tail = map_len - head - size;
        // head <= HUGE_ALIGN, so head + size <= map_len: both pointers stay in the mapping.
        let start = base.wrapping_add(head);
        let end = start.wrapping_add(size);
        // SAFETY: [base, start) and [end, base + map_len) are parts of the mapping just
        // created that no pointer refers to; mmap returns page-aligned memory and head,
        // size are multiples of the page size, so both ranges are page aligned.
        unsafe {
            if head > 0 {
                libc::munmap(base.cast(), head);
            }
            if tail > 0 {
                libc::munmap(end.cast(), tail);
            }
        }
        // Huge pages spare the TLB misses of plans that hop between scattered blocks.
        // Advice only: failure (e.g. THP disabled) leaves ordinary pages.
        // SAFETY: the range is exactly the mapping we own, 2 MiB aligned, not yet touched.
        unsafe { libc::madvise(start.cast(), size, libc::MADV_HUGEPAGE) };
        let ptr = NonNull::new(start).ok_or(oom)?;
        // Anonymous mappings read as zeros, so the buffer is zeroed without touching it.
        Ok(HostBuffer {
            ptr,
            len,
            alloc,
            owner: None,
        })
    }

    pub fn alignment(&self) -> usize {
        self.alloc.align()
    }
}

impl std::ops::Deref for HostBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live, initialized (zeroed) allocation of at least len bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for HostBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if self.owner.is_some() {
            // The owner, dropped with this buffer's fields, releases the memory.
        } else if self.alloc.align() == Self::HUGE_ALIGN {
            // SAFETY: `mapped` left exactly alloc.size() bytes mapped at ptr; unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.alloc.size()) };
        } else {
            // SAFETY: allocated in `zeroed` with exactly this layout, freed once.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.alloc) }
        }
    }
}

/// A paged KV cache in host memory: what a CPU engine (and every test) registers.
pub struct HostKvCache {
    layout: KvLayout,
    buffers: Vec<HostBuffer>,
}

impl HostKvCache {
    pub fn new(layout: KvLayout) -> Result<Arc<Self>, DeviceError> {
        let buffers = (0..layout.num_buffers())
            .map(|_| HostBuffer::zeroed(layout.buffer_bytes()))
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(HostKvCache { layout, buffers }))
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The registration a connector takes; it keeps this cache alive.
    pub fn engine_memory(self: &Arc<Self>) -> EngineMemory {
        let regions = self
            .buffers
            .iter()
            .map(|b| Region {
                addr: b.as_ptr() as u64,
                len: b.len(),
            })
            .collect();
        EngineMemory {
            layout: self.layout,
            regions,
            _owner: Some(Arc::clone(self)),
        }
    }

    /// Read access to buffer `index`.
    ///
    /// # Safety
    /// No copy may write this buffer while the slice lives (the engine's side of the
    /// connector contract: it does not read blocks whose load is in flight).
    pub unsafe fn buffer(&self, index: usize) -> &[u8] {
        let b = &self.buffers[index];
        // SAFETY: the allocation lives as long as self; the caller rules out writers.
        unsafe { std::slice::from_raw_parts(b.as_ptr(), b.len()) }
    }

    /// Write access to buffer `index`, as an engine writes KV during a forward pass.
    ///
    /// # Safety
    /// No other reference to this buffer, and no copy touching it, may exist while the
    /// slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn buffer_mut(&self, index: usize) -> &mut [u8] {
        let b = &self.buffers[index];
        // SAFETY: the allocation lives as long as self; the caller guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(b.as_ptr() as *mut u8, b.len()) }
    }
}

/// Copies `plan`'s tiles from the buffers at `src` to those at `dst` with the kernel for
/// its size, then fences the streaming stores so the bytes are visible once it returns.
///
/// # Safety
/// As for [`copy_tiles`] (except the kernel, which this picks).
unsafe fn copy_plan(plan: &CopyPlan, src: &[*const u8], dst: &[*mut u8]) {
    // SAFETY: forwarded from the caller; Kernel::for_plan picks a kernel this CPU runs.
    unsafe { copy_tiles(Kernel::for_plan(plan.total_bytes()), plan.tiles(), src, dst) };
    stream_fence();
}

/// Copies plans with the host copy kernel. Copies complete before `start_*` returns.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostDevice;

impl Device for HostDevice {
    fn name(&self) -> &str {
        "host"
    }

    fn start_gather<'a>(
        &'a self,
        plan: &'a CopyPlan,
        engine: &'a EngineMemory,
        host: &'a mut [&mut [u8]],
    ) -> Result<PendingCopy<'a>, DeviceError> {
        let regions = engine.regions();
        check_gather(plan, regions, host)?;
        let src: Vec<*const u8> = regions.iter().map(|r| r.addr as *const u8).collect();
        let dst: Vec<*mut u8> = host.iter_mut().map(|b| b.as_mut_ptr()).collect();
        // SAFETY: check_gather proved every tile's units inside the regions, which
        // EngineMemory's contract makes valid host memory not written during the copy, and
        // inside the host buffers, distinct &mut slices that cannot overlap the regions.
        unsafe { copy_plan(plan, &src, &dst) };
        Ok(PendingCopy::done())
    }

    fn start_scatter<'a>(
        &'a self,
        plan: &'a CopyPlan,
        host: &'a [&[u8]],
        engine: &'a EngineMemory,
    ) -> Result<PendingCopy<'a>, DeviceError> {
        let regions = engine.regions();
        check_scatter(plan, host, regions)?;
        let src: Vec<*const u8> = host.iter().map(|b| b.as_ptr()).collect();
        let dst: Vec<*mut u8> = regions.iter().map(|r| r.addr as *mut u8).collect();
        // SAFETY: check_scatter proved every tile's units inside the host buffers and the
        // regions, which EngineMemory's contract makes valid, unaliased host memory during
        // the copy; the host buffers are shared slices of other memory.
        unsafe { copy_plan(plan, &src, &dst) };
        Ok(PendingCopy::done())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::KvDtype;
    use crate::layout::{AttentionKind, KvCacheSpec, LayoutKind};
    use crate::plan::tests::llama_spec;
    use crate::plan::{paged_to_chunks, ChunkWindow};

    fn cache() -> Arc<HostKvCache> {
        let spec = KvCacheSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_size: 4,
            dtype: KvDtype::Bf16,
            block_size: 4,
            num_blocks: 8,
            attention: AttentionKind::Mha,
        };
        HostKvCache::new(KvLayout::new(spec, LayoutKind::FlashAttnHnd).unwrap()).unwrap()
    }

    #[test]
    fn gather_then_scatter_into_another_cache_round_trips() {
        let (a, b) = (cache(), cache());
        for i in 0..a.layout().num_buffers() {
            // SAFETY: no copy is running.
            let buf = unsafe { a.buffer_mut(i) };
            buf.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = (j * 7 + i) as u8);
        }
        let windows = [ChunkWindow {
            start: 0,
            tokens: 6,
            skip_leading: 0,
        }];
        let plan = paged_to_chunks(a.layout(), &[5, 2], &windows).unwrap();
        let device = HostDevice;
        let mut chunk = device
            .alloc_staging(a.layout().spec().chunk_bytes(6))
            .unwrap();
        assert_eq!(chunk.alignment(), 4096);
        let (mem_a, mem_b) = (a.engine_memory(), b.engine_memory());
        {
            let mut host = [&mut chunk[..]];
            device
                .start_gather(&plan, &mem_a, &mut host)
                .unwrap()
                .wait()
                .unwrap();
        }
        let scatter = plan.inverse();
        device
            .start_scatter(&scatter, &[&chunk[..]], &mem_b)
            .unwrap()
            .wait()
            .unwrap();
        for run in plan.runs() {
            let (i, o, n) = (run.src_buffer as usize, run.src_offset, run.len);
            // SAFETY: no copy is running.
            let (x, y) = unsafe { (&a.buffer(i)[o..o + n], &b.buffer(i)[o..o + n]) };
            assert_eq!(x, y);
        }
        // The wrong direction and undersized buffers are refused before any byte moves.
        assert!(matches!(
            device.start_scatter(&plan, &[&chunk[..]], &mem_b),
            Err(DeviceError::WrongDirection { .. })
        ));
        let tiny = [0u8; 16];
        assert!(matches!(
            device.start_scatter(&scatter, &[&tiny[..]], &mem_b),
            Err(DeviceError::Plan(_))
        ));
    }

    #[test]
    fn huge_buffers_are_zeroed_aligned_and_writable() {
        for len in [2 << 20, (2 << 20) + 1, (6 << 20) - 4096] {
            let mut buf = HostBuffer::zeroed(len).unwrap();
            assert_eq!(buf.len(), len);
            assert_eq!(buf.alignment(), 2 << 20);
            assert_eq!(buf.as_ptr() as usize % (2 << 20), 0);
            assert!(buf.iter().step_by(4096).all(|&b| b == 0));
            assert_eq!(buf[len - 1], 0);
            buf.fill(0xa5);
            assert!(buf.iter().all(|&b| b == 0xa5));
        }
        assert_eq!(HostBuffer::zeroed(0).unwrap().len(), 0);
    }

    #[test]
    fn streaming_gather_and_scatter_round_trip() {
        // 64 blocks of 64 KiB per layer buffer: large enough to take the streaming path.
        let spec = llama_spec(2, 64);
        for kind in [LayoutKind::FlashAttnNhd, LayoutKind::FlashAttnHnd] {
            let layout = KvLayout::new(spec, kind).unwrap();
            let (a, b) = (
                HostKvCache::new(layout).unwrap(),
                HostKvCache::new(layout).unwrap(),
            );
            for i in 0..layout.num_buffers() {
                // SAFETY: no copy is running.
                let buf = unsafe { a.buffer_mut(i) };
                buf.iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = (j * 7 + j / 251 + i) as u8);
            }
            let blocks: Vec<u32> = (0..32).map(|i| (i * 37 + 5) % 64).collect();
            let windows = [ChunkWindow {
                start: 0,
                tokens: 32 * 16,
                skip_leading: 0,
            }];
            let plan = paged_to_chunks(&layout, &blocks, &windows).unwrap();
            assert_ne!(Kernel::for_plan(plan.total_bytes()), Kernel::Plain);
            let device = HostDevice;
            let mut chunk = device.alloc_staging(spec.chunk_bytes(32 * 16)).unwrap();
            let (mem_a, mem_b) = (a.engine_memory(), b.engine_memory());
            device
                .start_gather(&plan, &mem_a, &mut [&mut chunk[..]])
                .unwrap()
                .wait()
                .unwrap();
            device
                .start_scatter(&plan.inverse(), &[&chunk[..]], &mem_b)
                .unwrap()
                .wait()
                .unwrap();
            for run in plan.runs() {
                let (i, o, n) = (run.src_buffer as usize, run.src_offset, run.len);
                // SAFETY: no copy is running.
                let (x, y) = unsafe { (&a.buffer(i)[o..o + n], &b.buffer(i)[o..o + n]) };
                assert_eq!(x, y);
                assert_eq!(&chunk[run.dst_offset..][..n], x);
            }
        }
    }

    #[test]
    fn raw_registration_checks_regions() {
        let layout = *cache().layout();
        // SAFETY: rejected before any use.
        let short =
            unsafe { EngineMemory::from_raw(layout, vec![Region { addr: 4096, len: 1 }; 2]) };
        assert!(matches!(short, Err(DeviceError::BadRegions { .. })));
        // SAFETY: rejected before any use.
        let missing = unsafe { EngineMemory::from_raw(layout, vec![]) };
        assert!(matches!(missing, Err(DeviceError::BadRegions { .. })));
    }
}

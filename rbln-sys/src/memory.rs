//! The safe layer: device memory that frees itself, with bounds-checked synchronous copies.

use std::sync::Arc;

use crate::error::RblnError;
use crate::runtime::{AllocKind, Runtime};

/// An allocation of device memory, freed when dropped.
pub struct DeviceMemory {
    runtime: Arc<Runtime>,
    device: u32,
    vaddr: u64,
    len: usize,
}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMemory")
            .field("device", &self.device)
            .field("vaddr", &format_args!("{:#x}", self.vaddr))
            .field("len", &self.len)
            .finish()
    }
}

impl DeviceMemory {
    /// Allocates `len` bytes on `device`.
    pub fn new(
        runtime: &Arc<Runtime>,
        device: u32,
        len: usize,
        kind: AllocKind,
    ) -> Result<Self, RblnError> {
        let vaddr = runtime.malloc(device, len as u64, kind)?;
        Ok(DeviceMemory {
            runtime: Arc::clone(runtime),
            device,
            vaddr,
            len,
        })
    }

    pub fn device(&self) -> u32 {
        self.device
    }

    /// The device virtual address of the first byte.
    pub fn vaddr(&self) -> u64 {
        self.vaddr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, call: &'static str, offset: usize, len: usize) -> Result<u64, RblnError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.vaddr + offset as u64),
            _ => Err(RblnError::OutOfBounds {
                call,
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies `src` to `offset` and waits until it has landed.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), RblnError> {
        let dst = self.check("rbln::rbln_memcpy_h2v", offset, src.len())?;
        // SAFETY: `src` is a live slice; the range was checked to lie inside this
        // allocation, which lives as long as `self`. The copy is synchronous.
        unsafe { self.runtime.memcpy_h2v(src.as_ptr(), dst, src.len()) }
    }

    /// Copies the bytes at `offset` into `dst` and waits until they have landed.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), RblnError> {
        let src = self.check("rbln::rbln_memcpy_v2h", offset, dst.len())?;
        // SAFETY: `dst` is exclusively borrowed; the range was checked to lie inside this
        // allocation. The copy is synchronous, so nothing outlives the borrow.
        unsafe { self.runtime.memcpy_v2h(src, dst.as_mut_ptr(), dst.len()) }
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        // Pending async copies of this memory must land before it is freed.
        let _ = self.runtime.device_synchronize(self.device);
        // SAFETY: `vaddr` came from malloc on this runtime and is freed only here.
        // Errors cannot be reported from drop; the runtime keeps the memory then.
        let _ = unsafe { self.runtime.free(self.vaddr) };
    }
}

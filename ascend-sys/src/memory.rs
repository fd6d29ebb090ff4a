//! The safe layer: device memory, pinned host memory and streams that release themselves.

use std::ffi::c_void;
use std::sync::Arc;

use crate::acl::{Acl, CopyKind, RawStream};
use crate::error::AclError;

/// Logs a release that failed in `drop`, where it cannot be returned.
fn log_release(what: &str, result: Result<(), AclError>) {
    if let Err(error) = result {
        tracing::error!(%error, "releasing {what} failed");
    }
}

/// Device memory from `aclrtMalloc`, freed when dropped.
pub struct DeviceBuffer {
    acl: Arc<Acl>,
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: the buffer is an address in device memory that this value owns exclusively;
// ACL calls on it are thread-safe once the calling thread is bound to the device.
unsafe impl Send for DeviceBuffer {}
// SAFETY: `&DeviceBuffer` only hands out its address and does synchronous copies.
unsafe impl Sync for DeviceBuffer {}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl DeviceBuffer {
    /// Allocates `len` bytes on the calling thread's device (see [`Acl::set_device`]).
    pub fn new(acl: &Arc<Acl>, len: usize) -> Result<Self, AclError> {
        let ptr = acl.malloc(len)?;
        Ok(DeviceBuffer {
            acl: Arc::clone(acl),
            ptr,
            len,
        })
    }

    /// The device address of the first byte.
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, call: &'static str, offset: usize, len: usize) -> Result<*mut c_void, AclError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.ptr.wrapping_byte_add(offset)),
            _ => Err(AclError::InvalidValue {
                call,
                what: "range for the device buffer",
                value: format!("{len} bytes at offset {offset} of {}", self.len),
            }),
        }
    }

    /// Copies `src` to `offset` synchronously.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), AclError> {
        let dst = self.at("aclrtMemcpy", offset, src.len())?;
        // SAFETY: `src` is a live slice; the range was checked to lie in this allocation,
        // which lives as long as `self`. The copy is synchronous.
        unsafe {
            self.acl
                .memcpy(dst, src.as_ptr().cast(), src.len(), CopyKind::HostToDevice)
        }
    }

    /// Copies the bytes at `offset` into `dst` synchronously.
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), AclError> {
        let src = self.at("aclrtMemcpy", offset, dst.len())?;
        // SAFETY: `dst` is exclusively borrowed; the range was checked to lie in this
        // allocation. The copy is synchronous.
        unsafe {
            self.acl.memcpy(
                dst.as_mut_ptr().cast(),
                src,
                dst.len(),
                CopyKind::DeviceToHost,
            )
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from malloc on this runtime and is freed only here; its
        // users (PendingCopy in kvrelay) synchronize before they let go of it.
        log_release("device memory", unsafe { self.acl.free(self.ptr) });
    }
}

/// Page-locked host memory from `aclrtMallocHost`, freed when dropped. Async copies need
/// their host side to be pinned like this.
pub struct PinnedHost {
    acl: Arc<Acl>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for PinnedHost {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for PinnedHost {}

impl PinnedHost {
    /// `len` zeroed bytes of pinned host memory.
    pub fn new(acl: &Arc<Acl>, len: usize) -> Result<Self, AclError> {
        // A zero-sized request may return null; allocate one byte and expose none.
        let ptr = acl.malloc_host(len.max(1))?.cast::<u8>();
        if ptr.is_null() {
            return Err(AclError::InvalidValue {
                call: "aclrtMallocHost",
                what: "pointer",
                value: "NULL".into(),
            });
        }
        // SAFETY: the runtime returned `len.max(1)` writable bytes at `ptr`.
        unsafe { ptr.write_bytes(0, len) };
        Ok(PinnedHost {
            acl: Arc::clone(acl),
            ptr,
            len,
        })
    }
}

impl std::ops::Deref for PinnedHost {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: a live, initialized (zeroed) allocation of at least `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for PinnedHost {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from malloc_host on this runtime and is freed only here.
        log_release("pinned host memory", unsafe {
            self.acl.free_host(self.ptr.cast())
        });
    }
}

/// A stream (`aclrtStream`), destroyed when dropped.
pub struct Stream {
    acl: Arc<Acl>,
    raw: RawStream,
}

// SAFETY: a stream handle may be used from any thread bound to its device; the holder
// synchronizes before dropping it.
unsafe impl Send for Stream {}
// SAFETY: ACL serializes work issued to one stream.
unsafe impl Sync for Stream {}

impl Stream {
    /// A new stream on the calling thread's device.
    pub fn new(acl: &Arc<Acl>) -> Result<Self, AclError> {
        Ok(Stream {
            acl: Arc::clone(acl),
            raw: acl.create_stream()?,
        })
    }

    /// The handle, for calls that take a stream.
    pub fn raw(&self) -> RawStream {
        self.raw
    }

    /// Waits for everything issued on the stream.
    pub fn synchronize(&self) -> Result<(), AclError> {
        self.acl.synchronize_stream(self.raw)
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Pending copies use their buffers until they land: drain before destroying.
        log_release("a stream (synchronize)", self.synchronize());
        // SAFETY: created by this Stream and destroyed only here, after the drain.
        log_release("a stream", unsafe { self.acl.destroy_stream(self.raw) });
    }
}

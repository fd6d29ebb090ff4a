//! The CPU tier's memory: one region the size of the tier's budget, mapped once, faulted in
//! once, and carved into equal slots handed out from a free list (LMCache allocates its
//! local CPU buffer the same way at start). Chunks, and the disk reads that fill them, land
//! in memory that is already resident, so no page is faulted in or zeroed on the load path.
//!
//! A slot is filled through the only reference to it, a [`SlotMut`], then frozen into a
//! shared, immutable [`FilledSlot`]. Every `Bytes` of a slot owns an `Arc` of it, and the
//! slot's index returns to the free list when the last one drops, so a slot is never reused
//! while anything can still read it.

use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;

use super::StoreError;
use crate::device::HostBuffer;

/// Slots start on page boundaries, so reads into them are page aligned.
const SLOT_ALIGN: usize = 4096;

pub(crate) struct Arena {
    /// Owns the mapping; read and written only through `base`.
    _memory: HostBuffer,
    base: NonNull<u8>,
    /// Distance between slot starts: the slot size rounded up to [`SLOT_ALIGN`].
    stride: usize,
    slot_bytes: usize,
    faulted_in: OnceLock<()>,
    state: Mutex<State>,
}

// SAFETY: the arena hands out each slot's bytes to one writer (`SlotMut`) or, once frozen, to
// readers only; the free list and owner table are behind a mutex.
unsafe impl Send for Arena {}
// SAFETY: as above.
unsafe impl Sync for Arena {}

struct State {
    free: Vec<u32>,
    /// The frozen slot at each index, so bytes of the arena handed back (a promotion) can be
    /// taken over without a copy.
    owners: Vec<Weak<FilledSlot>>,
}

impl Arena {
    /// An arena of as many `slot_bytes` slots as fit in `budget` bytes. Maps the memory but
    /// touches none of it; the first [`Arena::take`] starts faulting it in.
    pub(crate) fn new(budget: u64, slot_bytes: usize) -> Result<Arc<Self>, StoreError> {
        let stride = slot_bytes.max(1).next_multiple_of(SLOT_ALIGN);
        let slots = usize::try_from(budget / stride as u64).unwrap_or(usize::MAX);
        let slots = u32::try_from(slots).unwrap_or(u32::MAX);
        if slot_bytes == 0 || slots == 0 {
            return Err(StoreError::TooLarge {
                size: stride as u64,
                budget,
            });
        }
        let len = slots as usize * stride;
        let mut memory = HostBuffer::zeroed(len).map_err(|e| StoreError::ArenaAlloc {
            bytes: len as u64,
            reason: e.to_string(),
        })?;
        let base = NonNull::new(memory.as_mut_ptr()).expect("a live allocation is not null");
        Ok(Arc::new(Arena {
            _memory: memory,
            base,
            stride,
            slot_bytes,
            faulted_in: OnceLock::new(),
            state: Mutex::new(State {
                // Popped from the end: slot 0 first.
                free: (0..slots).rev().collect(),
                owners: (0..slots).map(|_| Weak::new()).collect(),
            }),
        }))
    }

    pub(crate) fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    fn len(&self) -> usize {
        self.state.lock().owners.len() * self.stride
    }

    /// Starts faulting every page in (huge pages where the kernel grants them) on a
    /// background thread, once, so later uses find resident memory. Runs on first use: a
    /// process that builds the tier but never stores in it (vLLM's scheduler half) never
    /// pays for it. Nothing waits for it: a slot used before the thread reaches its pages
    /// faults them as any fresh memory would (seconds per GiB here, so a first request
    /// must not stall behind all of it).
    pub(crate) fn fault_in(self: &Arc<Self>) {
        self.faulted_in.get_or_init(|| {
            let arena = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name("kvrelay-cpu-arena".into())
                .spawn(move || arena.populate());
            if let Err(error) = spawned {
                tracing::warn!(%error, "could not start faulting the CPU tier arena in; its pages fault on first use");
            }
        });
    }

    fn populate(&self) {
        let start = Instant::now();
        let len = self.len();
        // SAFETY: base..base + len is the mapping this arena owns, alive while `self` is.
        // MADV_POPULATE_WRITE faults pages in as a write would without changing a byte, so
        // it is safe while slots are being filled; it fails without effect on kernels older
        // than 5.14, where pages then fault on first use.
        let populated =
            unsafe { libc::madvise(self.base.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) }
                == 0;
        tracing::info!(
            bytes = len,
            ms = start.elapsed().as_secs_f64() * 1e3,
            populated,
            "CPU tier arena faulted in"
        );
    }

    /// A free slot holding `len` bytes (at most the slot size), or `None` when every slot
    /// is taken.
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> Option<SlotMut> {
        assert!(
            len <= self.slot_bytes,
            "a slot holds {} bytes",
            self.slot_bytes
        );
        self.fault_in();
        let index = self.state.lock().free.pop()?;
        Some(SlotMut {
            slot: SlotIndex {
                arena: Arc::clone(self),
                index,
            },
            len,
        })
    }

    /// The frozen slot that `data` lies in and its range there, if `data` is bytes of this
    /// arena; a tier that holds them can keep a reference instead of a copy.
    pub(crate) fn adopt(&self, data: &[u8]) -> Option<(Arc<FilledSlot>, Range<usize>)> {
        let offset = (data.as_ptr() as usize).checked_sub(self.base.as_ptr() as usize)?;
        if data.is_empty() || offset >= self.len() {
            return None;
        }
        let index = offset / self.stride;
        let start = offset % self.stride;
        let end = start + data.len();
        if end > self.slot_bytes {
            return None;
        }
        let slot = self.state.lock().owners[index].upgrade()?;
        Some((slot, start..end))
    }

    fn slot_ptr(&self, index: u32) -> *mut u8 {
        // index < slots, so the offset stays inside the mapping.
        self.base
            .as_ptr()
            .wrapping_add(index as usize * self.stride)
    }
}

/// A slot's index, given back to the free list on drop.
struct SlotIndex {
    arena: Arc<Arena>,
    index: u32,
}

impl Drop for SlotIndex {
    fn drop(&mut self) {
        self.arena.state.lock().free.push(self.index);
    }
}

/// A slot being filled: the only reference to its bytes.
pub(crate) struct SlotMut {
    slot: SlotIndex,
    len: usize,
}

impl SlotMut {
    /// Makes the bytes immutable and shareable.
    pub(crate) fn freeze(self) -> Arc<FilledSlot> {
        let filled = Arc::new(FilledSlot {
            slot: self.slot,
            len: self.len,
            held_by_tier: AtomicBool::new(false),
        });
        let arena = &filled.slot.arena;
        arena.state.lock().owners[filled.slot.index as usize] = Arc::downgrade(&filled);
        filled
    }
}

impl std::ops::Deref for SlotMut {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the slot's first len bytes (len <= slot_bytes <= stride) lie in the
        // arena's mapping, which `slot` keeps alive; the free list handed this index to
        // this SlotMut alone.
        unsafe { std::slice::from_raw_parts(self.slot.arena.slot_ptr(self.slot.index), self.len) }
    }
}

impl std::ops::DerefMut for SlotMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self makes this the only reference.
        unsafe {
            std::slice::from_raw_parts_mut(self.slot.arena.slot_ptr(self.slot.index), self.len)
        }
    }
}

/// A filled, immutable slot. It stays taken until the last `Arc` of it drops.
pub(crate) struct FilledSlot {
    slot: SlotIndex,
    len: usize,
    /// Whether a tier entry already holds this slot, so a second entry copies instead of
    /// sharing it (an entry's slot counts as in use exactly when something besides the
    /// entry holds it).
    held_by_tier: AtomicBool,
}

impl FilledSlot {
    /// `range` of the slot as `Bytes` that keep the slot taken while they live.
    pub(crate) fn bytes(self: &Arc<Self>, range: Range<usize>) -> Bytes {
        Bytes::from_owner(SlotView {
            slot: Arc::clone(self),
            range,
        })
    }

    /// Claims the slot for one tier entry; false if an entry holds it already.
    pub(crate) fn claim(&self) -> bool {
        !self.held_by_tier.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn release(&self) {
        self.held_by_tier.store(false, Ordering::Release);
    }
}

impl AsRef<[u8]> for FilledSlot {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as in SlotMut::deref; frozen slots are never written again.
        unsafe { std::slice::from_raw_parts(self.slot.arena.slot_ptr(self.slot.index), self.len) }
    }
}

struct SlotView {
    slot: Arc<FilledSlot>,
    range: Range<usize>,
}

impl AsRef<[u8]> for SlotView {
    fn as_ref(&self) -> &[u8] {
        let bytes: &[u8] = (*self.slot).as_ref();
        &bytes[self.range.clone()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_only_once_every_reader_is_gone() {
        let arena = Arena::new(3 * 4096 + 100, 4000).unwrap();
        assert_eq!(arena.len(), 3 * 4096);
        let mut a = arena.take(10).unwrap();
        a.copy_from_slice(&[7; 10]);
        let a = a.freeze();
        let bytes = a.bytes(2..6);
        assert_eq!(&bytes[..], &[7; 4]);
        let (adopted, range) = arena.adopt(&bytes).unwrap();
        assert!(Arc::ptr_eq(&adopted, &a));
        assert_eq!(range, 2..6);
        assert!(arena.adopt(&[1u8; 4][..]).is_none(), "foreign bytes");
        let _b = arena.take(4000).unwrap();
        let _c = arena.take(1).unwrap();
        assert!(arena.take(1).is_none(), "three slots");
        drop((a, adopted));
        assert!(
            arena.take(1).is_none(),
            "a reader still holds the first slot"
        );
        drop(bytes);
        let again = arena.take(1).unwrap();
        assert_eq!(again.slot.index, 0);
    }

    #[test]
    fn a_budget_below_one_slot_is_a_typed_error() {
        assert!(matches!(
            Arena::new(4095, 4096),
            Err(StoreError::TooLarge {
                size: 4096,
                budget: 4095
            })
        ));
        assert!(Arena::new(1 << 20, 0).is_err());
    }
}

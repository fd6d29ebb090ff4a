//! The host-memory tier: chunks in slots of an arena the size of the budget (see
//! [`super::arena`]), with LRU eviction that never evicts an entry a reader still holds.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::arena::{Arena, FilledSlot, SlotMut};
use super::lru::LruIndex;
use super::{Chunk, ChunkMeta, StoreError, Tier, TierStats};
use crate::keys::CacheKey;

struct Entry {
    meta: ChunkMeta,
    /// The slot holding the bytes: a copy (`put`), or the slot a lower tier read them into
    /// (`put_shared`). Readers' `Bytes` hold clones, so the entry is in use exactly when the
    /// count is above one.
    slot: Arc<FilledSlot>,
    range: Range<usize>,
}

impl Entry {
    fn in_use(&self) -> bool {
        Arc::strong_count(&self.slot) > 1
    }

    fn len(&self) -> u64 {
        self.range.len() as u64
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.slot.release();
    }
}

struct Inner {
    index: LruIndex<CacheKey, Entry>,
    bytes: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
    rejected: u64,
}

/// Chunks in host memory under a byte budget (LMCache's `LocalCPUBackend` with its default
/// LRU policy and its local CPU buffer allocated once).
///
/// The budget is one arena of equal slots, each sized for a whole chunk, so memory never
/// exceeds the budget: bytes a reader keeps after a later put replaced them stay in their
/// slot, which returns to the free list when the reader drops them.
pub struct CpuTier {
    budget: u64,
    arena: Arc<Arena>,
    inner: Mutex<Inner>,
}

impl CpuTier {
    /// A tier of `budget_bytes`, in slots of `slot_bytes` (the largest chunk it will hold,
    /// plus the header of a chunk file if a disk tier below reads into its slots, see
    /// [`super::DiskTier::reading_into`]). Maps the memory now and faults it in on first
    /// use. A budget smaller than one slot is an error.
    pub fn new(budget_bytes: u64, slot_bytes: usize) -> Result<Self, StoreError> {
        Ok(CpuTier {
            budget: budget_bytes,
            arena: Arena::new(budget_bytes, slot_bytes)?,
            inner: Mutex::new(Inner {
                index: LruIndex::new(),
                bytes: 0,
                hits: 0,
                misses: 0,
                evictions: 0,
                rejected: 0,
            }),
        })
    }

    /// A free slot for `len` bytes, evicting least recently used entries no reader holds.
    pub(crate) fn reserve(&self, len: usize) -> Result<SlotMut, StoreError> {
        let slot = self.arena.slot_bytes();
        if len > slot {
            return Err(StoreError::LargerThanSlot {
                size: len as u64,
                slot: slot as u64,
            });
        }
        let mut inner = self.inner.lock();
        loop {
            if let Some(slot) = self.arena.take(len) {
                return Ok(slot);
            }
            let victim = inner
                .index
                .iter_lru()
                .find(|(_, e)| !e.in_use())
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                return Err(StoreError::BudgetExhausted {
                    needed: len as u64,
                    budget: self.budget,
                    in_use: inner.bytes,
                });
            };
            // Under the lock no new reader can appear, so the victim's slot, which only
            // the entry held, is free once the entry drops here.
            if let Some(e) = inner.index.remove(&victim) {
                inner.bytes -= e.len();
                inner.evictions += 1;
            }
        }
    }
}

impl Tier for CpuTier {
    fn name(&self) -> &str {
        "cpu"
    }

    fn contains(&self, key: &CacheKey) -> bool {
        self.inner.lock().index.contains(key)
    }

    fn get(&self, key: &CacheKey, expected_fingerprint: u64) -> Result<Option<Chunk>, StoreError> {
        let mut inner = self.inner.lock();
        let Some(entry) = inner.index.touch(key) else {
            inner.misses += 1;
            return Ok(None);
        };
        if entry.meta.layout_fingerprint != expected_fingerprint {
            let found = entry.meta.layout_fingerprint;
            inner.rejected += 1;
            return Err(StoreError::FingerprintMismatch {
                key: key.to_string(),
                expected: expected_fingerprint,
                found,
            });
        }
        let chunk = Chunk {
            meta: entry.meta,
            data: entry.slot.bytes(entry.range.clone()),
            device: None,
        };
        inner.hits += 1;
        Ok(Some(chunk))
    }

    fn put(&self, key: &CacheKey, meta: ChunkMeta, data: &[u8]) -> Result<(), StoreError> {
        let mut slot = self.reserve(data.len())?;
        // Copy without the lock: other threads keep working meanwhile.
        slot.copy_from_slice(data);
        let slot = slot.freeze();
        // A slot just taken is held by no entry yet.
        slot.claim();
        self.insert(key, meta, slot, 0..data.len());
        Ok(())
    }

    /// Bytes a lower tier read into one of this tier's slots ([`super::DiskTier::reading_into`])
    /// are kept by reference: a promotion then costs no copy on the load path. Other bytes
    /// are copied into a slot.
    fn put_shared(&self, key: &CacheKey, meta: ChunkMeta, data: &Bytes) -> Result<(), StoreError> {
        match self.arena.adopt(data) {
            Some((slot, range)) if slot.claim() => {
                self.insert(key, meta, slot, range);
                Ok(())
            }
            _ => self.put(key, meta, data),
        }
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock();
        let removed = inner.index.remove(key);
        if let Some(e) = &removed {
            inner.bytes -= e.len();
        }
        Ok(removed.is_some())
    }

    fn stats(&self) -> TierStats {
        let inner = self.inner.lock();
        TierStats {
            entries: inner.index.len() as u64,
            bytes: inner.bytes,
            budget: self.budget,
            hits: inner.hits,
            misses: inner.misses,
            evictions: inner.evictions,
            corrupt: 0,
            rejected: inner.rejected,
            unavailable: 0,
            unchecked: 0,
        }
    }
}

impl CpuTier {
    /// Stores `slot[range]` under `key`; the caller has claimed the slot for this entry.
    fn insert(&self, key: &CacheKey, meta: ChunkMeta, slot: Arc<FilledSlot>, range: Range<usize>) {
        let entry = Entry { meta, slot, range };
        let mut inner = self.inner.lock();
        inner.bytes += entry.len();
        let old = inner.index.insert(key.clone(), entry);
        if let Some(old) = &old {
            inner.bytes -= old.len();
        }
        drop(inner);
        // The replaced entry's slot, unless a reader holds it, returns to the free list here.
        drop(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvDtype;

    fn key(i: u64) -> CacheKey {
        CacheKey::new("m", 1, 0, i, KvDtype::Bf16).unwrap()
    }

    const META: ChunkMeta = ChunkMeta {
        layout_fingerprint: 7,
        num_tokens: 256,
    };

    /// Slots of one page, so `n` of them make a budget of `n` pages.
    const SLOT: usize = 4096;

    fn tier(slots: u64) -> CpuTier {
        CpuTier::new(slots * SLOT as u64, SLOT).unwrap()
    }

    fn keys_in(tier: &CpuTier, n: u64) -> Vec<u64> {
        (0..n).filter(|&i| tier.contains(&key(i))).collect()
    }

    #[test]
    fn bytes_read_into_a_slot_are_kept_by_reference_other_bytes_are_copied() {
        let tier = tier(2);
        // What a disk tier reading into this tier does: fill a reserved slot, share it.
        let mut slot = tier.reserve(300).unwrap();
        slot.fill(5);
        let read = slot.freeze().bytes(100..300);
        tier.put_shared(&key(0), META, &read).unwrap();
        let held = tier.get(&key(0), 7).unwrap().unwrap();
        assert_eq!(held.data.as_ptr(), read.as_ptr());
        assert_eq!(&held.data[..], &[5; 200][..]);
        assert_eq!(tier.stats().bytes, 200);
        // The same bytes under a second key are copied: one slot backs one entry.
        tier.put_shared(&key(1), META, &read).unwrap();
        let copy = tier.get(&key(1), 7).unwrap().unwrap();
        assert_ne!(copy.data.as_ptr(), read.as_ptr());
        assert_eq!(copy.data, read);
        let foreign = Bytes::from(vec![6u8; 200]);
        // Both slots are held by readers: nothing can be evicted.
        assert!(matches!(
            tier.put_shared(&key(2), META, &foreign),
            Err(StoreError::BudgetExhausted { .. })
        ));
        drop((held, read));
        tier.put_shared(&key(2), META, &foreign).unwrap();
        assert_eq!(keys_in(&tier, 3), vec![1, 2]);
        assert_eq!(
            &tier.get(&key(2), 7).unwrap().unwrap().data[..],
            &foreign[..]
        );
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let tier = tier(3);
        for i in 0..3 {
            tier.put(&key(i), META, &[i as u8; 100]).unwrap();
        }
        // Use 0 so that 1 becomes the oldest.
        drop(tier.get(&key(0), 7).unwrap().unwrap());
        tier.put(&key(3), META, &[3; 100]).unwrap();
        assert_eq!(keys_in(&tier, 4), [0, 2, 3]);
        tier.put(&key(4), META, &[4; 150]).unwrap();
        assert_eq!(keys_in(&tier, 5), [0, 3, 4]);
        let stats = tier.stats();
        assert_eq!((stats.entries, stats.bytes, stats.evictions), (3, 350, 2));
        assert!(stats.bytes <= stats.budget);
        for i in [0, 3, 4] {
            let chunk = tier.get(&key(i), 7).unwrap().unwrap();
            assert!(chunk.data.iter().all(|&b| b == i as u8));
        }
    }

    #[test]
    fn never_evicts_a_chunk_in_use() {
        let tier = tier(2);
        tier.put(&key(0), META, &[0; 100]).unwrap();
        tier.put(&key(1), META, &[1; 100]).unwrap();
        let held = tier.get(&key(0), 7).unwrap().unwrap();
        drop(tier.get(&key(1), 7).unwrap().unwrap());
        // 1 is now the most recent, but 0 is held: 1 must go.
        tier.put(&key(2), META, &[2; 100]).unwrap();
        assert_eq!(keys_in(&tier, 3), [0, 2]);
        assert_eq!(&held.data[..], &[0; 100][..]);

        let held2 = tier.get(&key(2), 7).unwrap().unwrap();
        let err = tier.put(&key(3), META, &[3; 100]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::BudgetExhausted {
                    needed: 100,
                    budget: 8192,
                    in_use: 200
                }
            ),
            "{err:?}"
        );
        assert_eq!(keys_in(&tier, 4), [0, 2]);
        // Once a reader lets go, its entry can be evicted again.
        drop(held);
        tier.put(&key(3), META, &[3; 100]).unwrap();
        assert_eq!(keys_in(&tier, 4), [2, 3]);
        assert_eq!(&held2.data[..], &[2; 100][..]);
    }

    #[test]
    fn a_replaced_chunk_keeps_its_slot_until_its_reader_lets_go() {
        let tier = tier(2);
        tier.put(&key(0), META, &[1; 100]).unwrap();
        let old = tier.get(&key(0), 7).unwrap().unwrap();
        tier.put(&key(0), META, &[2; 100]).unwrap();
        // The reader's bytes are unchanged, and their slot still counts against the arena.
        assert_eq!(&old.data[..], &[1; 100][..]);
        let held = tier.get(&key(0), 7).unwrap().unwrap();
        assert!(matches!(
            tier.put(&key(1), META, &[3; 100]),
            Err(StoreError::BudgetExhausted { .. })
        ));
        drop(old);
        tier.put(&key(1), META, &[3; 100]).unwrap();
        assert_eq!(&held.data[..], &[2; 100][..]);
    }

    #[test]
    fn rejects_a_chunk_larger_than_a_slot_and_a_budget_below_one_slot() {
        let tier = tier(4);
        let err = tier.put(&key(0), META, &[0; SLOT + 1]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::LargerThanSlot {
                    size: 4097,
                    slot: 4096
                }
            ),
            "{err:?}"
        );
        assert_eq!(tier.stats().entries, 0);
        tier.put(&key(0), META, &[0; SLOT]).unwrap();
        assert!(matches!(
            CpuTier::new(SLOT as u64 - 1, SLOT),
            Err(StoreError::TooLarge { .. })
        ));
    }

    #[test]
    fn replacing_a_key_keeps_the_accounting_exact() {
        let tier = tier(1);
        tier.put(&key(0), META, &[0; 80]).unwrap();
        tier.put(&key(0), META, &[9; 60]).unwrap();
        assert_eq!(tier.stats().bytes, 60);
        assert_eq!(
            &tier.get(&key(0), 7).unwrap().unwrap().data[..],
            &[9; 60][..]
        );
        assert!(tier.remove(&key(0)).unwrap());
        assert!(!tier.remove(&key(0)).unwrap());
        assert_eq!(tier.stats().bytes, 0);
        // The removed entry's slot is free again.
        tier.put(&key(1), META, &[1; 60]).unwrap();
    }

    #[test]
    fn fingerprint_mismatch_is_a_typed_error() {
        let tier = tier(1);
        tier.put(&key(0), META, &[0; 10]).unwrap();
        let err = tier.get(&key(0), 8).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::FingerprintMismatch {
                    expected: 8,
                    found: 7,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(tier.get(&key(1), 7).unwrap().is_none());
        let stats = tier.stats();
        assert_eq!((stats.rejected, stats.misses, stats.hits), (1, 1, 0));
    }
}

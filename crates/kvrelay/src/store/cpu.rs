//! The host-memory tier: a byte budget with LRU eviction that never evicts an entry a reader
//! still holds.

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::lru::LruIndex;
use super::{Chunk, ChunkMeta, StoreError, Tier, TierStats};
use crate::keys::CacheKey;

struct Entry {
    meta: ChunkMeta,
    /// Its own copy (`put`), or the bytes a lower tier's hit returned (`put_shared`).
    data: Bytes,
}

/// What a `Chunk` handed out by `get` owns. While it lives, the entry's `Arc` count is above
/// one, which is how eviction knows the entry is in use.
struct Lease(Arc<Entry>);

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        &self.0.data
    }
}

struct Inner {
    index: LruIndex<CacheKey, Arc<Entry>>,
    bytes: u64,
    hits: u64,
    misses: u64,
    evictions: u64,
    rejected: u64,
}

/// Chunks in host memory under a byte budget (LMCache's `LocalCPUBackend` with its default
/// LRU policy).
///
/// Memory is only over budget when a reader keeps a chunk that a later put replaced: the
/// old bytes live until that reader drops them.
pub struct CpuTier {
    budget: u64,
    inner: Mutex<Inner>,
}

impl CpuTier {
    pub fn new(budget_bytes: u64) -> Self {
        CpuTier {
            budget: budget_bytes,
            inner: Mutex::new(Inner {
                index: LruIndex::new(),
                bytes: 0,
                hits: 0,
                misses: 0,
                evictions: 0,
                rejected: 0,
            }),
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
        let Some(entry) = inner.index.touch(key).cloned() else {
            inner.misses += 1;
            return Ok(None);
        };
        if entry.meta.layout_fingerprint != expected_fingerprint {
            inner.rejected += 1;
            return Err(StoreError::FingerprintMismatch {
                key: key.to_string(),
                expected: expected_fingerprint,
                found: entry.meta.layout_fingerprint,
            });
        }
        inner.hits += 1;
        drop(inner);
        Ok(Some(Chunk {
            meta: entry.meta,
            data: Bytes::from_owner(Lease(entry)),
            device: None,
        }))
    }

    fn put(&self, key: &CacheKey, meta: ChunkMeta, data: &[u8]) -> Result<(), StoreError> {
        self.check_size(data.len())?;
        // Copy before taking the lock: other threads keep working meanwhile.
        self.insert(key, meta, Bytes::copy_from_slice(data))
    }

    /// Keeps a reference to `data` instead of a copy: a promotion from the disk tier then
    /// costs no copy on the load path. `data` is immutable, so the entry cannot change
    /// under a reader, and its buffer lives until the entry is gone and no reader holds it.
    fn put_shared(&self, key: &CacheKey, meta: ChunkMeta, data: &Bytes) -> Result<(), StoreError> {
        self.check_size(data.len())?;
        self.insert(key, meta, data.clone())
    }

    fn remove(&self, key: &CacheKey) -> Result<bool, StoreError> {
        let mut inner = self.inner.lock();
        let removed = inner.index.remove(key);
        if let Some(e) = &removed {
            inner.bytes -= e.data.len() as u64;
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
    fn check_size(&self, len: usize) -> Result<(), StoreError> {
        let size = len as u64;
        if size > self.budget {
            return Err(StoreError::TooLarge {
                size,
                budget: self.budget,
            });
        }
        Ok(())
    }

    /// Stores `data` under `key`, evicting least recently used entries no reader holds.
    fn insert(&self, key: &CacheKey, meta: ChunkMeta, data: Bytes) -> Result<(), StoreError> {
        let size = data.len() as u64;
        let entry = Arc::new(Entry { meta, data });
        // Dropped after the lock is released, so freeing memory does not block other threads.
        let mut dropped: Vec<Arc<Entry>> = Vec::new();
        let mut inner = self.inner.lock();
        if let Some(old) = inner.index.remove(key) {
            inner.bytes -= old.data.len() as u64;
            dropped.push(old);
        }
        let over = (inner.bytes + size).saturating_sub(self.budget);
        if over > 0 {
            let mut victims = Vec::new();
            let (mut freed, mut in_use) = (0u64, 0u64);
            for (k, e) in inner.index.iter_lru() {
                if freed >= over {
                    break;
                }
                let len = e.data.len() as u64;
                // Under the lock no new lease can appear, so a count of one stays one.
                if Arc::strong_count(e) == 1 {
                    victims.push(k.clone());
                    freed += len;
                } else {
                    in_use += len;
                }
            }
            if freed < over {
                return Err(StoreError::BudgetExhausted {
                    needed: size,
                    budget: self.budget,
                    in_use,
                });
            }
            for k in victims {
                if let Some(e) = inner.index.remove(&k) {
                    inner.bytes -= e.data.len() as u64;
                    inner.evictions += 1;
                    dropped.push(e);
                }
            }
        }
        inner.bytes += size;
        inner.index.insert(key.clone(), entry);
        Ok(())
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

    fn keys_in(tier: &CpuTier, n: u64) -> Vec<u64> {
        (0..n).filter(|&i| tier.contains(&key(i))).collect()
    }

    #[test]
    fn put_shared_keeps_a_reference_not_a_copy_under_the_same_budget() {
        let tier = CpuTier::new(300);
        let shared = Bytes::from(vec![5u8; 200]);
        tier.put_shared(&key(0), META, &shared).unwrap();
        let held = tier.get(&key(0), 7).unwrap().unwrap();
        assert_eq!(held.data.as_ptr(), shared.as_ptr());
        assert_eq!(&held.data[..], &[5; 200][..]);
        assert_eq!(tier.stats().bytes, 200);
        // The held entry is not evicted, so a second one over budget is refused.
        let second = Bytes::from(vec![6u8; 200]);
        assert!(matches!(
            tier.put_shared(&key(1), META, &second),
            Err(StoreError::BudgetExhausted { .. })
        ));
        assert!(matches!(
            tier.put_shared(&key(2), META, &Bytes::from(vec![0u8; 301])),
            Err(StoreError::TooLarge { .. })
        ));
        drop(held);
        tier.put_shared(&key(1), META, &second).unwrap();
        assert_eq!(keys_in(&tier, 3), vec![1]);
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let tier = CpuTier::new(300);
        for i in 0..3 {
            tier.put(&key(i), META, &[i as u8; 100]).unwrap();
        }
        // Use 0 so that 1 becomes the oldest.
        drop(tier.get(&key(0), 7).unwrap().unwrap());
        tier.put(&key(3), META, &[3; 100]).unwrap();
        assert_eq!(keys_in(&tier, 4), [0, 2, 3]);
        tier.put(&key(4), META, &[4; 150]).unwrap();
        assert_eq!(keys_in(&tier, 5), [3, 4]);
        let stats = tier.stats();
        assert_eq!((stats.entries, stats.bytes, stats.evictions), (2, 250, 3));
        assert!(stats.bytes <= stats.budget);
    }

    #[test]
    fn never_evicts_a_chunk_in_use() {
        let tier = CpuTier::new(200);
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
                    budget: 200,
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
    fn rejects_a_chunk_larger_than_the_budget() {
        let tier = CpuTier::new(64);
        let err = tier.put(&key(0), META, &[0; 65]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::TooLarge {
                    size: 65,
                    budget: 64
                }
            ),
            "{err:?}"
        );
        assert_eq!(tier.stats().entries, 0);
    }

    #[test]
    fn replacing_a_key_keeps_the_accounting_exact() {
        let tier = CpuTier::new(100);
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
    }

    #[test]
    fn fingerprint_mismatch_is_a_typed_error() {
        let tier = CpuTier::new(100);
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

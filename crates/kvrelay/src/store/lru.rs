//! The recency index both local tiers use: a hash map for lookup plus an ordered map keyed
//! by a monotonically increasing tick, so the least recently used entry is the first one.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

pub(crate) struct LruIndex<K, V> {
    map: HashMap<K, (V, u64)>,
    order: BTreeMap<u64, K>,
    next_tick: u64,
}

impl<K: Hash + Eq + Clone, V> LruIndex<K, V> {
    pub(crate) fn new() -> Self {
        LruIndex {
            map: HashMap::new(),
            order: BTreeMap::new(),
            next_tick: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    /// Inserts as the most recently used entry; returns the value it replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        let tick = self.tick();
        self.order.insert(tick, key.clone());
        let old = self.map.insert(key, (value, tick));
        old.map(|(value, old_tick)| {
            self.order.remove(&old_tick);
            value
        })
    }

    /// Marks the entry most recently used and returns it.
    pub(crate) fn touch(&mut self, key: &K) -> Option<&V> {
        let tick = self.tick();
        let (_, slot_tick) = self.map.get_mut(key)?;
        let old_tick = std::mem::replace(slot_tick, tick);
        if let Some(k) = self.order.remove(&old_tick) {
            self.order.insert(tick, k);
        }
        self.map.get(key).map(|(value, _)| value)
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let (value, tick) = self.map.remove(key)?;
        self.order.remove(&tick);
        Some(value)
    }

    /// Entries from least to most recently used.
    pub(crate) fn iter_lru(&self) -> impl Iterator<Item = (&K, &V)> {
        self.order
            .values()
            .filter_map(|key| self.map.get(key).map(|(value, _)| (key, value)))
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_last_use() {
        let mut lru = LruIndex::new();
        for k in 0..4 {
            assert!(lru.insert(k, k * 10).is_none());
        }
        assert_eq!(lru.touch(&1), Some(&10));
        assert_eq!(lru.insert(2, 21), Some(20));
        assert_eq!(lru.remove(&0), Some(0));
        let order: Vec<i32> = lru.iter_lru().map(|(k, _)| *k).collect();
        assert_eq!(order, [3, 1, 2]);
        assert_eq!(lru.len(), 3);
        assert!(lru.touch(&9).is_none());
    }
}

//! A small bounded least-recently-used map for the dispatcher's warm aggregate instances.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// How many of the oldest entries an insertion looks at, beyond the ones it evicts, to find
/// entries that may be evicted.
pub(crate) const EVICTION_SCAN: usize = 16;

/// Most entries one insertion evicts: after a burst over capacity, each insertion shrinks the
/// map by up to this many, so no insertion does unbounded work.
pub(crate) const MAX_EVICTIONS: usize = 64;

/// A map that holds at most `capacity` entries and evicts the least recently used one.
/// `get` is O(1); an insertion is O(log n), plus the bounded work of evicting.
#[derive(Debug)]
pub(crate) struct LruCache<K, V> {
    capacity: usize,
    tick: u64,
    entries: HashMap<K, (V, u64)>,
    by_use: BTreeMap<u64, K>,
}

impl<K: Eq + Hash + Clone, V: Clone> LruCache<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), tick: 0, entries: HashMap::new(), by_use: BTreeMap::new() }
    }

    /// Returns the value for `key`, marking it most recently used. O(1): only the entry's
    /// own tick changes; its place in the use order is corrected when an eviction reaches it.
    pub(crate) fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let (value, last_use) = self.entries.get_mut(key)?;
        *last_use = self.tick;
        Some(value.clone())
    }

    /// Returns the value for `key`, inserting `make()` first if absent. When full, evicts least
    /// recently used entries for which `evictable` holds until the map is below its capacity
    /// again (at most [`MAX_EVICTIONS`] per call), looking at no more than [`EVICTION_SCAN`]
    /// entries beyond those it needs to remove. If too few may go (they are in use), the map
    /// exceeds its capacity for now, and later insertions shrink it back.
    pub(crate) fn get_or_insert_with(
        &mut self,
        key: &K,
        make: impl FnOnce() -> V,
        evictable: impl Fn(&V) -> bool,
    ) -> V {
        if let Some(value) = self.get(key) {
            return value;
        }
        if self.entries.len() >= self.capacity {
            self.evict((self.entries.len() + 1 - self.capacity).min(MAX_EVICTIONS), evictable);
        }
        self.tick += 1;
        let value = make();
        self.entries.insert(key.clone(), (value.clone(), self.tick));
        self.by_use.insert(self.tick, key.clone());
        value
    }

    /// Evicts up to `excess` of the least recently used entries for which `evictable` holds,
    /// looking at no more than `excess` + [`EVICTION_SCAN`] records of the use order. A
    /// record older than its entry's last use (the entry was read since) is moved to that use
    /// and counts as looked at.
    fn evict(&mut self, excess: usize, evictable: impl Fn(&V) -> bool) {
        let mut evicted = 0;
        let mut from = 0;
        for _ in 0..excess + EVICTION_SCAN {
            if evicted == excess {
                return;
            }
            let Some((tick, key)) = self.by_use.range(from..).next().map(|(tick, key)| (*tick, key.clone())) else {
                return;
            };
            from = tick + 1;
            let Some((value, last_use)) = self.entries.get(&key) else {
                self.by_use.remove(&tick);
                continue;
            };
            if *last_use != tick {
                let last_use = *last_use;
                self.by_use.remove(&tick);
                self.by_use.insert(last_use, key);
            } else if evictable(value) {
                self.by_use.remove(&tick);
                self.entries.remove(&key);
                evicted += 1;
            }
        }
    }

    /// Keeps only the entries for which `keep` holds.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.entries.retain(|_, (value, _)| keep(value));
        let entries = &self.entries;
        self.by_use.retain(|_, key| entries.contains_key(key));
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let any = |_: &i32| true;
        let mut cache = LruCache::new(2);
        cache.get_or_insert_with(&"a", || 1, any);
        cache.get_or_insert_with(&"b", || 2, any);
        assert_eq!(cache.get(&"a"), Some(1)); // b is now the oldest
        cache.get_or_insert_with(&"c", || 3, any);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&"b"), None);
        assert_eq!(cache.get(&"a"), Some(1));
        assert_eq!(cache.get_or_insert_with(&"c", || 99, any), 3);
    }

    #[test]
    fn entries_in_use_are_not_evicted() {
        let mut cache = LruCache::new(2);
        let in_use = |value: &i32| *value != 1;
        cache.get_or_insert_with(&"a", || 1, in_use); // oldest, but in use
        cache.get_or_insert_with(&"b", || 2, in_use);
        cache.get_or_insert_with(&"c", || 3, in_use);
        assert_eq!(cache.get(&"a"), Some(1));
        assert_eq!(cache.get(&"b"), None, "the oldest entry not in use went instead");
        cache.get_or_insert_with(&"d", || 1, |_| false);
        assert_eq!(cache.len(), 3, "nothing may go: the map exceeds its capacity for now");
    }

    #[test]
    fn shrinks_back_to_capacity_after_a_burst() {
        // A burst of 100 instances in use at once, with room for 4.
        let mut cache = LruCache::new(4);
        for key in 0..100 {
            cache.get_or_insert_with(&key, || key, |_| false);
        }
        assert_eq!(cache.len(), 100);
        // The burst is over: everything may go. The next insertions shrink the map.
        cache.get_or_insert_with(&1000, || 1000, |_| true);
        assert_eq!(cache.len(), 100 - MAX_EVICTIONS + 1, "one insertion evicts a bounded number");
        cache.get_or_insert_with(&1001, || 1001, |_| true);
        assert_eq!(cache.len(), 4, "back to capacity, not 100");
        assert_eq!(cache.get(&1000), Some(1000));
        assert_eq!(cache.get(&99), Some(99), "the most recently used survive");
        assert_eq!(cache.get(&0), None);
    }

    #[test]
    fn retain_drops_entries_and_their_order() {
        let mut cache = LruCache::new(3);
        for key in 0..3 {
            cache.get_or_insert_with(&key, || key, |_| true);
        }
        cache.retain(|value| *value == 1);
        assert_eq!(cache.len(), 1);
        cache.get_or_insert_with(&7, || 7, |_| true);
        cache.get_or_insert_with(&8, || 8, |_| true);
        cache.get_or_insert_with(&9, || 9, |_| true);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(&1), None, "the oldest went first");
    }
}

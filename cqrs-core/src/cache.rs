//! A small bounded least-recently-used map for the dispatcher's warm aggregate instances.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// How many of the oldest entries an insertion looks at to find one that may be evicted.
pub(crate) const EVICTION_SCAN: usize = 16;

/// A map that holds at most `capacity` entries and evicts the least recently used one.
/// `get` and `insert` are O(log n).
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

    /// Returns the value for `key`, marking it most recently used.
    pub(crate) fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let (value, last_use) = self.entries.get_mut(key)?;
        self.by_use.remove(last_use);
        *last_use = tick;
        self.by_use.insert(tick, key.clone());
        Some(value.clone())
    }

    /// Returns the value for `key`, inserting `make()` first if absent. When full, evicts the
    /// least recently used entry for which `evictable` holds, looking at no more than
    /// [`EVICTION_SCAN`] of the oldest; if none may go, the map briefly exceeds its capacity.
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
            let victim = self
                .by_use
                .iter()
                .take(EVICTION_SCAN)
                .find(|(_, candidate)| self.entries.get(*candidate).is_some_and(|(value, _)| evictable(value)))
                .map(|(tick, candidate)| (*tick, candidate.clone()));
            if let Some((tick, victim)) = victim {
                self.by_use.remove(&tick);
                self.entries.remove(&victim);
            }
        }
        self.tick += 1;
        let value = make();
        self.entries.insert(key.clone(), (value.clone(), self.tick));
        self.by_use.insert(self.tick, key.clone());
        value
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
}

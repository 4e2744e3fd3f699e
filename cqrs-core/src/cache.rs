//! A small bounded least-recently-used map for the dispatcher's warm aggregate instances.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

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

    /// Returns the value for `key`, inserting `make()` first if absent (evicting if full).
    pub(crate) fn get_or_insert_with(&mut self, key: &K, make: impl FnOnce() -> V) -> V {
        if let Some(value) = self.get(key) {
            return value;
        }
        if self.entries.len() >= self.capacity {
            if let Some((_, oldest)) = self.by_use.pop_first() {
                self.entries.remove(&oldest);
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
        let mut cache = LruCache::new(2);
        cache.get_or_insert_with(&"a", || 1);
        cache.get_or_insert_with(&"b", || 2);
        assert_eq!(cache.get(&"a"), Some(1)); // b is now the oldest
        cache.get_or_insert_with(&"c", || 3);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&"b"), None);
        assert_eq!(cache.get(&"a"), Some(1));
        assert_eq!(cache.get_or_insert_with(&"c", || 99), 3);
    }
}

//! A small least-recently-used cache of shared values (blocks, chunks),
//! bounded by the total cost of what it holds (a count, or bytes).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

pub(crate) struct Lru<K, V> {
    capacity: usize,
    held: usize,
    values: HashMap<K, (Arc<V>, usize)>,
    /// Keys from least to most recently used; a key may be listed more
    /// than once (only its last listing counts), bounded by compaction.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Copy, V> Lru<K, V> {
    /// A cache holding values of at most `capacity` in total cost.
    pub(crate) fn new(capacity: usize) -> Self {
        Lru {
            capacity: capacity.max(1),
            held: 0,
            values: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &K) -> Option<Arc<V>> {
        let value = self.values.get(key)?.0.clone();
        self.touch(*key);
        Some(value)
    }

    pub(crate) fn contains(&self, key: &K) -> bool {
        self.values.contains_key(key)
    }

    /// Keeps `value`, of `cost`, evicting the least recently used values
    /// until the total fits (the newest value always stays).
    pub(crate) fn put(&mut self, key: K, value: Arc<V>, cost: usize) {
        if let Some((_, old)) = self.values.insert(key, (value, cost)) {
            self.held -= old;
        }
        self.held += cost;
        self.touch(key);
        while self.held > self.capacity && self.values.len() > 1 {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            // Only the key's last listing evicts it.
            if oldest != key
                && !self.order.contains(&oldest)
                && let Some((_, cost)) = self.values.remove(&oldest)
            {
                self.held -= cost;
            }
        }
    }

    fn touch(&mut self, key: K) {
        if self.order.back() != Some(&key) {
            self.order.push_back(key);
        }
        if self.order.len() > 4 * self.values.len() + 16 {
            let mut seen = HashSet::new();
            let mut kept: Vec<K> = self
                .order
                .iter()
                .rev()
                .filter(|k| self.values.contains_key(k) && seen.insert(**k))
                .copied()
                .collect();
            kept.reverse();
            self.order = kept.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_value_goes_first() {
        let mut cache: Lru<u32, u32> = Lru::new(2);
        cache.put(1, Arc::new(10), 1);
        cache.put(2, Arc::new(20), 1);
        assert_eq!(cache.get(&1).as_deref(), Some(&10));
        cache.put(3, Arc::new(30), 1);
        assert!(cache.get(&2).is_none(), "2 was used least recently");
        assert_eq!(cache.get(&1).as_deref(), Some(&10));
        assert_eq!(cache.get(&3).as_deref(), Some(&30));
        for round in 0..100 {
            cache.get(&1);
            cache.put(4 + round, Arc::new(0), 1);
        }
        assert!(cache.values.len() <= 2 && cache.order.len() <= 24);
        assert!(cache.get(&1).is_some());
    }

    #[test]
    fn costs_bound_what_is_held() {
        let mut cache: Lru<u32, u32> = Lru::new(100);
        for key in 0..50 {
            cache.put(key, Arc::new(key), 30);
            assert!(cache.held <= 100 || cache.values.len() == 1);
        }
        assert_eq!(cache.values.len(), 3);
        // One value costlier than the whole cache is still kept, alone.
        cache.put(99, Arc::new(0), 500);
        assert!(cache.contains(&99) && cache.values.len() == 1);
    }
}

//! A small least-recently-used cache of shared values (blocks, chunks),
//! bounded by count.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

pub(crate) struct Lru<K, V> {
    capacity: usize,
    values: HashMap<K, Arc<V>>,
    /// Keys from least to most recently used; a key may be listed more
    /// than once (only its last listing counts), bounded by `capacity * 4`.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Copy, V> Lru<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Lru {
            capacity: capacity.max(1),
            values: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &K) -> Option<Arc<V>> {
        let value = self.values.get(key)?.clone();
        self.touch(*key);
        Some(value)
    }

    pub(crate) fn put(&mut self, key: K, value: Arc<V>) {
        self.values.insert(key, value);
        self.touch(key);
        while self.values.len() > self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            // Only the key's last listing evicts it.
            if !self.order.contains(&oldest) {
                self.values.remove(&oldest);
            }
        }
    }

    fn touch(&mut self, key: K) {
        if self.order.back() != Some(&key) {
            self.order.push_back(key);
        }
        if self.order.len() > self.capacity * 4 {
            let mut seen = std::collections::HashSet::new();
            let mut kept: Vec<K> = self
                .order
                .iter()
                .rev()
                .filter(|k| seen.insert(**k))
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
        cache.put(1, Arc::new(10));
        cache.put(2, Arc::new(20));
        assert_eq!(cache.get(&1).as_deref(), Some(&10));
        cache.put(3, Arc::new(30));
        assert!(cache.get(&2).is_none(), "2 was used least recently");
        assert_eq!(cache.get(&1).as_deref(), Some(&10));
        assert_eq!(cache.get(&3).as_deref(), Some(&30));
        for round in 0..100 {
            cache.get(&1);
            cache.put(4 + round, Arc::new(0));
        }
        assert!(cache.values.len() <= 2 && cache.order.len() <= 8);
        assert!(cache.get(&1).is_some());
    }
}

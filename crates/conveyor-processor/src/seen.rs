//! A bounded memory of recently processed ids: the processor's half of dedupe (contract 3).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// The last `limit` ids processed; the oldest is forgotten first.
pub struct SeenIds {
    set: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
    limit: usize,
}

impl SeenIds {
    pub fn new(limit: usize) -> Self {
        SeenIds {
            set: HashSet::with_capacity(limit.min(1 << 16)),
            order: VecDeque::with_capacity(limit.min(1 << 16)),
            limit,
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    /// Remembers `id`, sharing the event's own copy of it.
    pub fn insert(&mut self, id: &Arc<str>) {
        if self.limit == 0 || self.set.contains(id) {
            return;
        }
        if self.order.len() == self.limit
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        self.set.insert(Arc::clone(id));
        self.order.push_back(Arc::clone(id));
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgets_the_oldest_beyond_its_limit() {
        let mut seen = SeenIds::new(2);
        let [a, b, c]: [Arc<str>; 3] = ["a".into(), "b".into(), "c".into()];
        seen.insert(&a);
        seen.insert(&b);
        seen.insert(&a);
        assert!(seen.contains("a") && seen.contains("b"));
        seen.insert(&c);
        assert!(!seen.contains("a"), "the oldest is forgotten");
        assert!(seen.contains("b") && seen.contains("c"));
        assert_eq!(seen.len(), 2);
    }
}

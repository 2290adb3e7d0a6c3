//! A bounded window of recent dedupe keys: "was this event's dedupe key seen recently?". The
//! queue backends whose broker cannot answer it (memory, Kafka) ask it on publish; a sink that
//! sends an event in several requests asks it so that a retried batch skips what was delivered.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};

use crate::Event;

/// Remembers the last `limit` dedupe keys as 128-bit fingerprints: no allocation per key, and
/// a false "duplicate" (two different keys with one fingerprint inside the window) has odds
/// around 2^-100 per publish.
pub struct DedupeWindow {
    seen: HashSet<u128, BuildHasherDefault<FingerprintHasher>>,
    order: VecDeque<u128>,
    limit: usize,
    /// Two independently keyed hashers: together, one 128-bit fingerprint.
    hashers: (RandomState, RandomState),
}

impl DedupeWindow {
    pub fn new(limit: usize) -> Self {
        DedupeWindow {
            seen: HashSet::with_capacity_and_hasher(limit.min(1 << 20), Default::default()),
            order: VecDeque::with_capacity(limit.min(1 << 20)),
            limit,
            hashers: (RandomState::new(), RandomState::new()),
        }
    }

    fn fingerprint(&self, event: &Event) -> u128 {
        let hash = |state: &RandomState| {
            let mut hasher = state.build_hasher();
            event.hash_dedupe_key(&mut hasher);
            hasher.finish()
        };
        (u128::from(hash(&self.hashers.0)) << 64) | u128::from(hash(&self.hashers.1))
    }

    /// Records the event's dedupe key; false if it was already inside the window.
    pub fn insert(&mut self, event: &Event) -> bool {
        if self.limit == 0 {
            return true;
        }
        let key = self.fingerprint(event);
        if !self.seen.insert(key) {
            return false;
        }
        if self.order.len() == self.limit
            && let Some(oldest) = self.order.pop_front()
        {
            self.seen.remove(&oldest);
        }
        self.order.push_back(key);
        true
    }

    /// Whether the event's dedupe key is inside the window (without recording it).
    pub fn contains(&self, event: &Event) -> bool {
        self.limit > 0 && self.seen.contains(&self.fingerprint(event))
    }

    /// Takes the event's key out again: its publish failed, so a retry must not be called a
    /// duplicate. (Its slot in the eviction order stays; at worst the window is a little
    /// shorter for a while.)
    pub fn forget(&mut self, event: &Event) {
        if self.limit > 0 {
            let key = self.fingerprint(event);
            self.seen.remove(&key);
        }
    }
}

/// For sets and maps keyed by fingerprints: they are already uniformly distributed (keyed
/// SipHash output), so hashing them again would only cost time; the low 64 bits are used as
/// they are.
#[derive(Default)]
pub struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u128(&mut self, value: u128) {
        self.0 = value as u64;
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ContentType, REPLAY_HEADER};

    fn event(id: &str) -> Event {
        Event {
            id: id.into(),
            source: "test".into(),
            timestamp_ms: 1,
            payload: bytes::Bytes::from_static(b"{}"),
            content_type: ContentType::Json,
            metadata: Default::default(),
            attempt: 0,
            headers: Default::default(),
        }
    }

    #[test]
    fn a_key_inside_the_window_is_a_duplicate_and_forgotten_beyond_it() {
        let mut window = DedupeWindow::new(2);
        assert!(window.insert(&event("a")));
        assert!(window.contains(&event("a")) && !window.contains(&event("b")));
        assert!(!window.insert(&event("a")), "same id again");
        assert!(window.insert(&event("b")));
        assert!(window.insert(&event("c")), "evicts a");
        assert!(window.insert(&event("a")), "a was forgotten");
    }

    #[test]
    fn a_replay_is_a_different_key_and_a_failed_publish_can_be_retried() {
        let mut window = DedupeWindow::new(10);
        assert!(window.insert(&event("a")));
        let mut replay = event("a");
        replay
            .headers
            .insert(REPLAY_HEADER.to_owned(), "1700000000000-0".to_owned());
        assert!(window.insert(&replay), "a replay is not the original");
        assert!(!window.insert(&replay), "but the same replay twice is");
        window.forget(&replay);
        assert!(
            window.insert(&replay),
            "after a failed publish, a retry is not a duplicate"
        );
    }

    #[test]
    fn off_means_nothing_is_a_duplicate() {
        let mut window = DedupeWindow::new(0);
        assert!(window.insert(&event("a")));
        assert!(window.insert(&event("a")));
    }
}

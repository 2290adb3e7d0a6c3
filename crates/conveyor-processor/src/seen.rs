//! The processor's half of dedupe (contract 3): which ids a worker has in hand right now, and
//! which were written recently.
//!
//! One map answers both, so a delivery costs three lookups (claim, finish, and evicting the
//! oldest written id) under one lock, not a lookup per question in two sets. The map is keyed by
//! a keyed 64-bit hash of the id, computed once per claim and once per finish: probing compares
//! integers, and eviction needs no hashing at all. The id itself is kept to tell two ids with
//! one hash apart (odds around 2^-64 per pair): the later one then waits as if busy, until the
//! earlier one is forgotten, so a collision delays an event but never drops or doubles it.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, RandomState};

use conveyor_queue::dedupe::FingerprintHasher;
use std::sync::Arc;

/// What a worker may do with a delivery, by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nobody has it: this worker processes it.
    Claimed,
    /// Written recently: a duplicate, to be acked without writing it again.
    Written,
    /// Another worker has it in hand (a broker redelivered it while the first copy was still at
    /// work): to be asked for again later.
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Working,
    Written,
}

struct Known {
    id: Arc<str>,
    state: State,
}

/// Ids in hand, plus the last `limit` ids written; the oldest written is forgotten first.
pub struct SeenIds {
    ids: HashMap<u64, Known, BuildHasherDefault<FingerprintHasher>>,
    /// Hashes of the written ids, oldest first.
    written: VecDeque<u64>,
    limit: usize,
    /// Keyed per process, so clients cannot choose ids that collide.
    hasher: RandomState,
}

impl SeenIds {
    pub fn new(limit: usize) -> Self {
        SeenIds {
            ids: HashMap::with_capacity_and_hasher(limit.min(1 << 16), Default::default()),
            written: VecDeque::with_capacity(limit.min(1 << 16)),
            limit,
            hasher: RandomState::new(),
        }
    }

    fn key(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// Claims `id` for the calling worker, unless it is written or in another worker's hand.
    pub fn claim(&mut self, id: &Arc<str>) -> Claim {
        match self.ids.entry(self.key(id)) {
            Entry::Occupied(known) => match known.get() {
                Known { id: other, .. } if **other != **id => Claim::Busy,
                Known {
                    state: State::Working,
                    ..
                } => Claim::Busy,
                Known {
                    state: State::Written,
                    ..
                } => Claim::Written,
            },
            Entry::Vacant(free) => {
                free.insert(Known {
                    id: Arc::clone(id),
                    state: State::Working,
                });
                Claim::Claimed
            }
        }
    }

    /// Ends a claim: a written id is remembered (inside the window), an unwritten one released
    /// so its redelivery is processed.
    pub fn finish(&mut self, id: &Arc<str>, written: bool) {
        let key = self.key(id);
        let Entry::Occupied(mut known) = self.ids.entry(key) else {
            return;
        };
        // Not this worker's claim (another id with the same hash, or already written).
        if *known.get().id != **id || known.get().state != State::Working {
            return;
        }
        if !written || self.limit == 0 {
            known.remove();
            return;
        }
        known.get_mut().state = State::Written;
        self.push_written(key);
    }

    /// Remembers `id` as written (the sink already holds it), sharing the caller's copy.
    pub fn remember(&mut self, id: &Arc<str>) {
        if self.limit == 0 {
            return;
        }
        let key = self.key(id);
        if let Entry::Vacant(free) = self.ids.entry(key) {
            free.insert(Known {
                id: Arc::clone(id),
                state: State::Written,
            });
            self.push_written(key);
        }
    }

    fn push_written(&mut self, key: u64) {
        if self.written.len() == self.limit
            && let Some(oldest) = self.written.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.written.push_back(key);
    }

    pub fn is_written(&self, id: &str) -> bool {
        self.ids
            .get(&self.key(id))
            .is_some_and(|known| *known.id == *id && known.state == State::Written)
    }

    /// How many written ids are remembered.
    pub fn len(&self) -> usize {
        self.written.len()
    }

    pub fn is_empty(&self) -> bool {
        self.written.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<const N: usize>(names: [&str; N]) -> [Arc<str>; N] {
        names.map(Arc::from)
    }

    #[test]
    fn forgets_the_oldest_written_beyond_its_limit() {
        let mut seen = SeenIds::new(2);
        let [a, b, c] = ids(["a", "b", "c"]);
        seen.remember(&a);
        seen.remember(&b);
        seen.remember(&a);
        assert!(seen.is_written("a") && seen.is_written("b"));
        seen.remember(&c);
        assert!(!seen.is_written("a"), "the oldest is forgotten");
        assert!(seen.is_written("b") && seen.is_written("c"));
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn a_claimed_id_is_busy_until_finished_then_written_or_free_again() {
        let mut seen = SeenIds::new(10);
        let [a, b] = ids(["a", "b"]);
        assert_eq!(seen.claim(&a), Claim::Claimed);
        assert_eq!(seen.claim(&a), Claim::Busy, "a second copy waits");
        seen.finish(&a, true);
        assert_eq!(seen.claim(&a), Claim::Written, "then it is a duplicate");

        assert_eq!(seen.claim(&b), Claim::Claimed);
        seen.finish(&b, false);
        assert_eq!(
            seen.claim(&b),
            Claim::Claimed,
            "a failed event is processed again"
        );
    }

    #[test]
    fn without_a_window_claims_still_keep_copies_apart() {
        let mut seen = SeenIds::new(0);
        let [a] = ids(["a"]);
        assert_eq!(seen.claim(&a), Claim::Claimed);
        assert_eq!(seen.claim(&a), Claim::Busy);
        seen.finish(&a, true);
        assert_eq!(seen.claim(&a), Claim::Claimed, "nothing is remembered");
        assert!(seen.is_empty());
    }
}

//! The in-memory queue: the embedded default for `conveyor run`, and the queue a split-mode
//! processor holds when `QUEUE_TYPE=memory`.
//!
//! Delivery semantics: at-least-once within the life of the process. Everything it holds is
//! lost when the process dies, so it reports `durable: false` and a processor drains it fully
//! on shutdown. Bounded by `capacity`, which counts every event held: waiting, waiting out a
//! retry delay, and in flight. A delivery whose handle is dropped unsettled (its worker or
//! consumer went away) goes back to the front of the queue.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::Event;
use conveyor_core::stats::QueueStats;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::dedupe::DedupeWindow;
use crate::{
    Consumer, Delivery, Health, PublishError, Published, Publisher, Queue, QueueError, Settlement,
    SlotSettler,
};

#[derive(Debug, Clone)]
pub struct MemoryQueueConfig {
    /// Most events held at once (the seed's `QUEUE_SIZE`).
    pub capacity: usize,
    /// How many recent dedupe keys are remembered; 0 turns publish-side dedupe off.
    pub dedupe_window: usize,
}

impl Default for MemoryQueueConfig {
    fn default() -> Self {
        MemoryQueueConfig {
            capacity: 1000,
            dedupe_window: 100_000,
        }
    }
}

/// A bounded in-process queue. Cheap to clone: clones share the queue.
#[derive(Clone)]
pub struct MemoryQueue {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Woken when events become ready.
    ready: Notify,
    capacity: usize,
}

struct Entry {
    event: Event,
    deliveries: u32,
}

struct Delayed {
    due: Instant,
    sequence: u64,
    entry: Entry,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.sequence) == (other.due, other.sequence)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.sequence).cmp(&(other.due, other.sequence))
    }
}

struct State {
    ready: VecDeque<Entry>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    in_flight: Slots,
    closed: bool,
    dedupe: DedupeWindow,
    sequence: u64,
    stats: QueueStats,
}

impl State {
    fn held(&self) -> usize {
        self.ready.len() + self.delayed.len() + self.in_flight.len()
    }

    /// Moves delayed entries whose time has come to the ready queue.
    fn promote_due(&mut self, now: Instant) {
        while let Some(Reverse(next)) = self.delayed.peek() {
            if next.due > now {
                break;
            }
            if let Some(Reverse(delayed)) = self.delayed.pop() {
                self.ready.push_back(delayed.entry);
            }
        }
    }
}

/// The deliveries out with consumers, each in a numbered slot until it is settled. A
/// delivery's handle is its slot number plus the slot's generation, so a settled slot can be
/// reused without a late or repeated settlement touching its new occupant. Freed slots are
/// reused: after warm-up, handing out and settling deliveries allocates nothing.
#[derive(Default)]
struct Slots {
    slots: Vec<Slot>,
    /// Indexes of the empty slots.
    free: Vec<u32>,
}

struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

impl Slots {
    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn insert(&mut self, entry: Entry) -> u64 {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.entry = Some(entry);
        (u64::from(slot.generation) << 32) | u64::from(index)
    }

    /// The entry in `token`'s slot, if it is still the one the token was issued for.
    fn remove(&mut self, token: u64) -> Option<Entry> {
        let index = (token & u64::from(u32::MAX)) as usize;
        let slot = self.slots.get_mut(index)?;
        if u64::from(slot.generation) != token >> 32 {
            return None;
        }
        let entry = slot.entry.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index as u32);
        Some(entry)
    }
}

impl MemoryQueue {
    pub fn new(config: MemoryQueueConfig) -> Self {
        let capacity = config.capacity.max(1);
        MemoryQueue {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    ready: VecDeque::with_capacity(capacity.min(1 << 16)),
                    delayed: BinaryHeap::new(),
                    in_flight: Slots::default(),
                    closed: false,
                    dedupe: DedupeWindow::new(config.dedupe_window),
                    sequence: 0,
                    stats: QueueStats {
                        backend: "memory".into(),
                        durable: false,
                        capacity: capacity as u64,
                        ..QueueStats::default()
                    },
                }),
                ready: Notify::new(),
                capacity,
            }),
        }
    }

    /// Publishes without waiting: the memory queue confirms synchronously.
    pub fn try_publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        let mut results = Vec::with_capacity(events.len());
        let mut stored = false;
        {
            let mut state = self.shared.lock();
            for event in events {
                results.push(if state.closed {
                    Err(PublishError::Closed)
                } else if state.held() >= self.shared.capacity {
                    Err(PublishError::Full)
                } else if !state.dedupe.insert(&event) {
                    state.stats.duplicates += 1;
                    Ok(Published::Duplicate)
                } else {
                    state.ready.push_back(Entry {
                        event,
                        deliveries: 0,
                    });
                    state.stats.published += 1;
                    stored = true;
                    Ok(Published::Stored)
                });
            }
        }
        if stored {
            self.shared.ready.notify_waiters();
        }
        results
    }

    /// Takes up to `max` ready deliveries without waiting.
    pub fn try_fetch(&self, max: usize) -> Vec<Delivery> {
        self.try_take(max).0
    }

    /// Takes up to `max` ready events without waiting, and when the next delayed one is due.
    fn try_take(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let mut state = self.shared.lock();
        state.promote_due(Instant::now());
        let take = max.min(state.ready.len());
        let mut deliveries = Vec::with_capacity(take);
        for _ in 0..take {
            let Some(mut entry) = state.ready.pop_front() else {
                break;
            };
            entry.deliveries += 1;
            if entry.deliveries > 1 {
                state.stats.redelivered += 1;
            }
            let mut event = entry.event.clone();
            event.attempt = entry.deliveries;
            let slot = state.in_flight.insert(entry);
            let settler: Arc<dyn SlotSettler> = self.shared.clone();
            deliveries.push(Delivery::in_slot(event, settler, slot));
        }
        let next_due = state.delayed.peek().map(|Reverse(d)| d.due);
        (deliveries, next_due)
    }

    fn snapshot(&self) -> QueueStats {
        let state = self.shared.lock();
        QueueStats {
            size: (state.ready.len() + state.delayed.len()) as u64,
            in_flight: state.in_flight.len() as u64,
            ..state.stats.clone()
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters more than stopping the queue would, so a poisoned lock is used as is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl Publisher for MemoryQueue {
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        self.try_publish(events)
    }

    async fn health(&self) -> Health {
        if self.shared.lock().closed {
            Health::Unhealthy("closed for publishing (shutting down)".into())
        } else {
            Health::Healthy
        }
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn subscribe(&self) -> Result<Box<dyn Consumer>, QueueError> {
        Ok(Box::new(MemoryConsumer {
            queue: self.clone(),
        }))
    }

    async fn stats(&self) -> QueueStats {
        self.snapshot()
    }

    fn durable(&self) -> bool {
        false
    }

    async fn close(&self) {
        self.shared.lock().closed = true;
    }
}

struct MemoryConsumer {
    queue: MemoryQueue,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            // Register for wake-ups before looking, so a publish between the look and the
            // wait is not missed.
            let notified = self.queue.shared.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (deliveries, next_due) = self.queue.try_take(max.max(1));
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake = next_due.map_or(deadline, |due| due.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

impl SlotSettler for Shared {
    fn settle_slots(&self, settlements: &[(u64, Option<Settlement>)]) {
        let mut wake = false;
        let mut state = self.lock();
        let mut now = None;
        for &(slot, settlement) in settlements {
            let Some(entry) = state.in_flight.remove(slot) else {
                continue;
            };
            match settlement {
                Some(Settlement::Ack) => state.stats.acked += 1,
                Some(Settlement::Term) => state.stats.terminated += 1,
                Some(Settlement::Nack { delay }) => {
                    state.stats.nacked += 1;
                    wake = true;
                    if delay.is_zero() {
                        state.ready.push_back(entry);
                    } else {
                        // Fetchers sleeping until their deadline must learn of the earlier
                        // due time, hence the wake-up for delayed entries too.
                        state.sequence += 1;
                        let sequence = state.sequence;
                        let due = *now.get_or_insert_with(Instant::now) + delay;
                        state.delayed.push(Reverse(Delayed {
                            due,
                            sequence,
                            entry,
                        }));
                    }
                }
                // Dropped unsettled: its holder went away, so it goes first in line again.
                None => {
                    wake = true;
                    state.ready.push_front(entry);
                }
            }
        }
        drop(state);
        if wake {
            self.ready.notify_waiters();
        }
    }
}

#[cfg(test)]
mod conformance_tests {
    use super::*;

    crate::conformance_suite!(|capacity| async move {
        Box::new(MemoryQueue::new(MemoryQueueConfig {
            capacity,
            dedupe_window: 10_000,
        })) as Box<dyn crate::Queue>
    });
}

#[cfg(test)]
mod slot_tests {
    use super::*;
    use crate::conformance::event;

    #[test]
    fn a_freed_slot_is_reused_and_an_old_token_for_it_is_ignored() {
        let mut slots = Slots::default();
        let first = slots.insert(Entry {
            event: event("a"),
            deliveries: 1,
        });
        assert!(slots.remove(first).is_some());
        let second = slots.insert(Entry {
            event: event("b"),
            deliveries: 1,
        });
        assert_eq!(first as u32, second as u32, "same slot, reused");
        assert!(slots.remove(first).is_none(), "the old token is stale");
        assert_eq!(slots.len(), 1, "the new occupant is untouched");
        assert_eq!(
            slots.remove(second).map(|entry| entry.event.id),
            Some("b".into())
        );
        assert_eq!(slots.len(), 0);
    }

    #[tokio::test]
    async fn a_batch_settled_together_is_acked_or_redelivered_as_one() {
        let queue = MemoryQueue::new(MemoryQueueConfig {
            capacity: 1000,
            dedupe_window: 0,
        });
        queue.try_publish((0..150).map(|i| event(&format!("e{i}"))).collect());
        let handles = queue
            .try_fetch(150)
            .into_iter()
            .map(|delivery| delivery.into_parts().1);
        // 150 slots: more than one chunk of SETTLE_CHUNK.
        let errors = crate::Handle::settle_all(handles, Settlement::Ack).await;
        assert!(errors.is_empty());
        let stats = queue.snapshot();
        assert_eq!((stats.acked, stats.in_flight, stats.size), (150, 0, 0));

        queue.try_publish(vec![event("again")]);
        let handles = queue.try_fetch(1).into_iter().map(|d| d.into_parts().1);
        let retry = Settlement::Nack {
            delay: Duration::ZERO,
        };
        crate::Handle::settle_all(handles, retry).await;
        let redelivered = queue.try_fetch(1);
        assert_eq!(redelivered.len(), 1, "a nacked batch is delivered again");
        assert_eq!(redelivered[0].event.attempt, 2);
    }
}

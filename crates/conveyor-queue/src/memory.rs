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
    Consumer, Delivery, DeliveryHandle, Health, PublishError, Published, Publisher, Queue,
    QueueError, Settlement,
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
    in_flight: usize,
    closed: bool,
    dedupe: DedupeWindow,
    sequence: u64,
    stats: QueueStats,
}

impl State {
    fn held(&self) -> usize {
        self.ready.len() + self.delayed.len() + self.in_flight
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

impl MemoryQueue {
    pub fn new(config: MemoryQueueConfig) -> Self {
        let capacity = config.capacity.max(1);
        MemoryQueue {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    ready: VecDeque::with_capacity(capacity.min(1 << 16)),
                    delayed: BinaryHeap::new(),
                    in_flight: 0,
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
            state.in_flight += 1;
            deliveries.push(Delivery::new(
                event,
                Box::new(MemoryDelivery {
                    shared: Arc::clone(&self.shared),
                    entry: Some(entry),
                }),
            ));
        }
        let next_due = state.delayed.peek().map(|Reverse(d)| d.due);
        (deliveries, next_due)
    }

    fn snapshot(&self) -> QueueStats {
        let state = self.shared.lock();
        QueueStats {
            size: (state.ready.len() + state.delayed.len()) as u64,
            in_flight: state.in_flight as u64,
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

struct MemoryDelivery {
    shared: Arc<Shared>,
    /// `None` once settled.
    entry: Option<Entry>,
}

impl MemoryDelivery {
    fn finish(&mut self, settlement: Option<Settlement>) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        let mut state = self.shared.lock();
        state.in_flight -= 1;
        match settlement {
            Some(Settlement::Ack) => state.stats.acked += 1,
            Some(Settlement::Term) => state.stats.terminated += 1,
            Some(Settlement::Nack { delay }) => {
                state.stats.nacked += 1;
                if delay.is_zero() {
                    state.ready.push_back(entry);
                } else {
                    state.sequence += 1;
                    let sequence = state.sequence;
                    state.delayed.push(Reverse(Delayed {
                        due: Instant::now() + delay,
                        sequence,
                        entry,
                    }));
                    // Fetchers sleeping until their deadline must learn of the earlier due time.
                    drop(state);
                    self.shared.ready.notify_waiters();
                    return;
                }
            }
            // Dropped unsettled: its holder went away, so it goes first in line again.
            None => state.ready.push_front(entry),
        }
        drop(state);
        if !matches!(settlement, Some(Settlement::Ack | Settlement::Term)) {
            self.shared.ready.notify_waiters();
        }
    }
}

#[async_trait]
impl DeliveryHandle for MemoryDelivery {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        self.finish(Some(settlement));
        Ok(())
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        self.finish(None);
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

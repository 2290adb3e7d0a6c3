//! A worker's consumer: takes ready events from the member's buffer, and settles them (ack and
//! term move the partition's watermark, a nack waits out its delay and comes again).

use std::cmp::Reverse;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use conveyor_queue::{Consumer, Delivery, DeliveryHandle, QueueError, Settlement};
use tokio::time::Instant;

use crate::inner::Inner;
use crate::member::{Delayed, Held, Member};
use crate::sync::lock;

/// One worker's view of the member: takes from the shared buffer.
pub(crate) struct KafkaConsumer {
    pub(crate) member: Arc<Member>,
    pub(crate) queue: Arc<Inner>,
}

impl KafkaConsumer {
    fn take_ready(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let mut state = lock(&self.member.shared.state);
        state.promote_due(Instant::now());
        let mut deliveries = Vec::with_capacity(max.min(state.ready.len()));
        while deliveries.len() < max {
            let Some(mut held) = state.ready.pop_front() else {
                break;
            };
            if !state.is_current(&held) {
                continue;
            }
            held.deliveries += 1;
            if held.deliveries > 1 {
                self.queue
                    .counters
                    .redelivered
                    .fetch_add(1, Ordering::Relaxed);
            }
            let mut event = held.event.clone();
            event.attempt = held.deliveries;
            deliveries.push(Delivery::new(
                event,
                Box::new(KafkaDelivery {
                    member: Arc::clone(&self.member),
                    queue: Arc::clone(&self.queue),
                    held: Some(held),
                }),
            ));
        }
        let next_due = state.delayed.peek().map(|Reverse(d)| d.due);
        (deliveries, next_due)
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.member.shared.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (deliveries, next_due) = self.take_ready(max);
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = next_due.map_or(deadline, |due| due.min(deadline));
            let _ = tokio::time::timeout_at(until, notified).await;
        }
    }
}

struct KafkaDelivery {
    member: Arc<Member>,
    queue: Arc<Inner>,
    held: Option<Held>,
}

impl KafkaDelivery {
    fn finish(&mut self, settlement: Option<Settlement>) {
        let Some(held) = self.held.take() else {
            return;
        };
        let counters = &self.queue.counters;
        let member = &self.member;
        {
            let mut state = lock(&member.shared.state);
            if !state.is_current(&held) {
                counters.stale.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match settlement {
                Some(Settlement::Ack) | Some(Settlement::Term) => {
                    if let Some(owned) = state.owned.get_mut(&held.partition) {
                        owned.watermark.finished(held.offset);
                    }
                    let counter = if settlement == Some(Settlement::Ack) {
                        &counters.acked
                    } else {
                        &counters.terminated
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Some(Settlement::Nack { delay }) => {
                    counters.nacked.fetch_add(1, Ordering::Relaxed);
                    state.delayed.push(Reverse(Delayed {
                        due: Instant::now() + delay,
                        held,
                    }));
                }
                // Dropped unsettled: its worker went away; deliver it again first.
                None => state.ready.push_front(held),
            }
        }
        member.shared.ready.notify_waiters();
        member.shared.room.notify_one();
    }
}

#[async_trait]
impl DeliveryHandle for KafkaDelivery {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        self.finish(Some(settlement));
        Ok(())
    }
}

impl Drop for KafkaDelivery {
    fn drop(&mut self) {
        self.finish(None);
    }
}

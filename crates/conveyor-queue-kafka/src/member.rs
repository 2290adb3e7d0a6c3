//! This process's member of the consumer group: what it holds (events ready, events waiting
//! out a retry delay, the watermark of each partition it owns), the rebalance callbacks, and
//! receiving, committing, rejoining and leaving. Joining, and watching the group for stalls,
//! read the queue's broker view: they are in `group.rs`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_core::Event;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::client::{Detached, REQUEST_TIMEOUT, log_librdkafka};
use crate::codec::decode;
use crate::sync::lock;
use crate::watermark::Watermark;

/// This process's member of the consumer group: one librdkafka consumer whose messages every
/// worker's `KafkaConsumer` takes from a shared buffer.
pub(crate) struct Member {
    pub(crate) consumer: Detached<StreamConsumer<GroupContext>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) topic: String,
    pub(crate) group: String,
    pub(crate) max_held: usize,
    pub(crate) stop: watch::Sender<bool>,
    /// Why the group is stalled ([`crate::stall`]), while it is.
    pub(crate) stalled: Mutex<Option<String>>,
}

/// What the member's tasks, its rebalance callbacks and its deliveries share.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// Woken when events become ready.
    pub(crate) ready: Notify,
    /// Woken when held events finish: the receiver may take more.
    pub(crate) room: Notify,
}

#[derive(Default)]
pub(crate) struct State {
    /// The partitions assigned to this member now.
    pub(crate) owned: HashMap<i32, Owned>,
    pub(crate) ready: VecDeque<Held>,
    pub(crate) delayed: BinaryHeap<Reverse<Delayed>>,
    /// Numbers each assignment of a partition, so a delivery from an earlier one is known.
    generations: u64,
    /// Partitions rebalances took from this member since it joined.
    pub(crate) revoked: u64,
}

pub(crate) struct Owned {
    generation: u64,
    pub(crate) watermark: Watermark,
}

/// An event this member holds: delivered, ready, or waiting out a retry delay.
pub(crate) struct Held {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    generation: u64,
    pub(crate) event: Event,
    /// Deliveries so far.
    pub(crate) deliveries: u32,
}

pub(crate) struct Delayed {
    pub(crate) due: Instant,
    pub(crate) held: Held,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
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
        self.due.cmp(&other.due)
    }
}

impl State {
    pub(crate) fn is_current(&self, held: &Held) -> bool {
        self.owned
            .get(&held.partition)
            .is_some_and(|o| o.generation == held.generation)
    }

    fn held(&self) -> usize {
        self.owned.values().map(|o| o.watermark.held()).sum()
    }

    pub(crate) fn promote_due(&mut self, now: Instant) {
        while self.delayed.peek().is_some_and(|Reverse(d)| d.due <= now) {
            if let Some(Reverse(delayed)) = self.delayed.pop() {
                self.ready.push_back(delayed.held);
            }
        }
    }

    /// Positions to commit now: those that moved since the last commit.
    fn commits(&mut self, topic: &str) -> Option<TopicPartitionList> {
        let mut list = TopicPartitionList::new();
        for (partition, owned) in &mut self.owned {
            if let Some(position) = owned.watermark.take_commit() {
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(position));
            }
        }
        (list.count() > 0).then_some(list)
    }
}

/// Per-partition figures of what this member holds, for `stats`.
#[derive(Default, Clone, Copy)]
pub(crate) struct LocalPosition {
    pub(crate) position: Option<i64>,
    pub(crate) held: u64,
    pub(crate) finished_above: u64,
    pub(crate) received_up_to: Option<i64>,
}

/// Receives rebalances: commits what is done in revoked partitions and forgets their work.
pub(crate) struct GroupContext {
    pub(crate) shared: Arc<Shared>,
    pub(crate) topic: String,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let mut commits = TopicPartitionList::new();
        let mut handed_out = 0usize;
        let dropped;
        {
            let mut state = lock(&self.shared.state);
            for element in revoked.elements_for_topic(&self.topic) {
                let partition = element.partition();
                state.revoked += 1;
                if let Some(owned) = state.owned.remove(&partition) {
                    if let Some(position) = owned.watermark.position() {
                        let _ = commits.add_partition_offset(
                            &self.topic,
                            partition,
                            Offset::Offset(position),
                        );
                    }
                    handed_out += owned.watermark.held();
                }
            }
            let before = state.ready.len() + state.delayed.len();
            let owned = std::mem::take(&mut state.owned);
            state.ready.retain(|h| {
                owned
                    .get(&h.partition)
                    .is_some_and(|o| o.generation == h.generation)
            });
            state.delayed.retain(|Reverse(d)| {
                owned
                    .get(&d.held.partition)
                    .is_some_and(|o| o.generation == d.held.generation)
            });
            state.owned = owned;
            dropped = before - state.ready.len() - state.delayed.len();
        }
        if commits.count() > 0
            && !consumer.assignment_lost()
            && let Err(error) = consumer.commit(&commits, CommitMode::Sync)
        {
            tracing::warn!(%error, "commit on revoke failed; the new owner redelivers from the last commit");
        }
        tracing::info!(
            partitions = revoked.count(),
            held = handed_out,
            buffered_dropped = dropped,
            "partitions revoked: what was done is committed, the rest goes to their new owner"
        );
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let mut state = lock(&self.shared.state);
                for element in assigned.elements_for_topic(&self.topic) {
                    state.generations += 1;
                    let generation = state.generations;
                    state.owned.insert(
                        element.partition(),
                        Owned {
                            generation,
                            watermark: Watermark::default(),
                        },
                    );
                }
                tracing::info!(partitions = assigned.count(), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(error) = result {
            tracing::warn!(%error, "offset commit failed; it is retried with the next progress");
        }
    }
}

impl Member {
    /// Moves messages from librdkafka into the shared buffer. While this member holds
    /// `max_held` events it stops taking more: librdkafka's prefetch queue is bounded
    /// (`queued.max.messages.kbytes`) and fills up, then fetching stops by itself. (Not
    /// pause/resume: resuming refetches from inside a record batch, which some brokers answer
    /// with the next batch, skipping records; and librdkafka's `max.poll.interval.ms` still
    /// removes a member whose workers are stuck for good.)
    pub(crate) async fn receive(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            while lock(&self.shared.state).held() >= self.max_held {
                tokio::select! {
                    _ = tokio::time::timeout(Duration::from_millis(100), self.shared.room.notified()) => {}
                    _ = stop.changed() => return,
                }
            }
            let message = tokio::select! {
                message = self.consumer.recv() => message,
                _ = stop.changed() => return,
            };
            match message {
                Ok(message) => self.take(&message),
                Err(error) => {
                    tracing::warn!(%error, "Kafka receive failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn take(&self, message: &BorrowedMessage<'_>) {
        let event = decode(message);
        {
            let mut state = lock(&self.shared.state);
            let Some(owned) = state.owned.get_mut(&message.partition()) else {
                // A message of a partition revoked in the meantime: its new owner gets it.
                return;
            };
            owned.watermark.received(message.offset());
            let generation = owned.generation;
            state.ready.push_back(Held {
                partition: message.partition(),
                offset: message.offset(),
                generation,
                event,
                deliveries: 0,
            });
        }
        self.shared.ready.notify_waiters();
    }

    pub(crate) async fn commit_periodically(
        self: Arc<Self>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let commits = lock(&self.shared.state).commits(&self.topic);
            if let Some(commits) = commits
                && let Err(error) = self.consumer.commit(&commits, CommitMode::Async)
            {
                tracing::warn!(%error, "offset commit failed; retried with the next progress");
            }
        }
    }

    /// Leaves the group and joins it again: librdkafka drops its member id on leaving, so the
    /// coordinator sees a new member and rebalances. What was done is committed on the revoke.
    pub(crate) fn rejoin(&self) -> Result<(), String> {
        // Who the coordinator thinks is in the group: with a coordinator that keeps dead
        // members, the operator sees them named here.
        match self
            .consumer
            .fetch_group_list(Some(&self.group), REQUEST_TIMEOUT)
        {
            Ok(list) => {
                for group in list.groups() {
                    let members: Vec<String> = group
                        .members()
                        .iter()
                        .map(|m| format!("{} ({} at {})", m.id(), m.client_id(), m.client_host()))
                        .collect();
                    tracing::warn!(
                        group = group.name(),
                        state = group.state(),
                        members = members.len(),
                        "the coordinator lists these members: {}",
                        members.join(", ")
                    );
                }
            }
            Err(error) => tracing::debug!(%error, "cannot describe the group"),
        }
        self.consumer.unsubscribe();
        self.consumer
            .subscribe(&[&self.topic])
            .map_err(|e| format!("cannot subscribe to topic '{}' again: {e}", self.topic))
    }

    pub(crate) fn stalled(&self) -> Option<String> {
        lock(&self.stalled).clone()
    }

    pub(crate) fn revoked(&self) -> u64 {
        lock(&self.shared.state).revoked
    }

    pub(crate) fn positions(&self) -> HashMap<i32, LocalPosition> {
        let state = lock(&self.shared.state);
        state
            .owned
            .iter()
            .map(|(partition, owned)| {
                (
                    *partition,
                    LocalPosition {
                        position: owned.watermark.position(),
                        held: owned.watermark.held() as u64,
                        finished_above: owned.watermark.finished_above_position(),
                        received_up_to: owned.watermark.received_up_to(),
                    },
                )
            })
            .collect()
    }

    /// Commits the watermark of every partition and leaves the group. Blocking.
    pub(crate) fn leave(self: Arc<Self>) {
        let _ = self.stop.send(true);
        let mut commits = TopicPartitionList::new();
        {
            let state = lock(&self.shared.state);
            for (partition, owned) in &state.owned {
                if let Some(position) = owned.watermark.position() {
                    let _ = commits.add_partition_offset(
                        &self.topic,
                        *partition,
                        Offset::Offset(position),
                    );
                }
            }
        }
        if commits.count() > 0
            && let Err(error) = self.consumer.commit(&commits, CommitMode::Sync)
        {
            tracing::warn!(%error, "final offset commit failed; the group redelivers from the last commit");
        }
        self.consumer.unsubscribe();
        // Let the tasks see the stop and let go, so the consumer closes here, on this thread,
        // and not inside a task on the runtime.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while Arc::strong_count(&self) > 1 && std::time::Instant::now() < deadline {
            #[expect(
                clippy::disallowed_methods,
                reason = "leaving the group runs on a thread of its own, never on the runtime"
            )]
            std::thread::sleep(Duration::from_millis(10));
        }
        // Close here, so the group hears this member leave (and reassigns its partitions at
        // once instead of after the session timeout); the caller bounds how long it waits.
        if let Ok(member) = Arc::try_unwrap(self) {
            drop(member.consumer.into_inner());
        }
    }
}

//! What a queue's clones, its background tasks, its group member and its deliveries share:
//! the clients, the counters, and the last view of the broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use conveyor_queue::dedupe::DedupeWindow;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::FutureProducer;
use tokio::sync::Semaphore;

use crate::client::{Detached, Logged};
use crate::config::KafkaConfig;
use crate::member::Member;

pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: Detached<FutureProducer<Logged>>,
    /// Outside the group (it never subscribes): metadata, watermarks, the group's commits.
    pub(crate) observer: Detached<BaseConsumer<Logged>>,
    pub(crate) closed: AtomicBool,
    pub(crate) dedupe: Mutex<DedupeWindow>,
    pub(crate) in_flight: Arc<Semaphore>,
    pub(crate) counters: Counters,
    /// The last broker view (refreshed in the background and on every `stats`).
    pub(crate) view: Mutex<BrokerView>,
    /// Events sent, and their count when `view` was measured: the lag estimate's two halves.
    pub(crate) sent: AtomicU64,
    pub(crate) sent_at_view: AtomicU64,
    /// One past the highest offset each partition's delivery reports named: a floor for the
    /// high watermark (some Kafka-protocol brokers answer ListOffsets loosely; tansu does).
    pub(crate) produced_up_to: Mutex<HashMap<i32, i64>>,
    /// This process's group member, started by the first `subscribe`.
    pub(crate) member: tokio::sync::Mutex<Option<Arc<Member>>>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) duplicates: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) nacked: AtomicU64,
    pub(crate) terminated: AtomicU64,
    pub(crate) redelivered: AtomicU64,
    /// Settlements that arrived after their partition was revoked (the new owner redelivers).
    pub(crate) stale: AtomicU64,
    /// Times the group was found stalled and this member rejoined it ([`crate::stall`]).
    pub(crate) stalls: AtomicU64,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct BrokerView {
    /// `None` while the broker answers; the reason otherwise.
    pub(crate) unhealthy: Option<String>,
    pub(crate) partitions: Vec<PartitionOffsets>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct PartitionOffsets {
    pub(crate) partition: i32,
    pub(crate) low: i64,
    pub(crate) high: i64,
    /// The group's committed offset, when it has one.
    pub(crate) committed: Option<i64>,
}

impl PartitionOffsets {
    /// Where the group resumes in this partition (an uncommitted group starts at the oldest).
    pub(crate) fn resume_at(&self) -> i64 {
        self.committed
            .unwrap_or(self.low)
            .clamp(self.low, self.high)
    }
}

//! [`KafkaQueue`]: connecting, and its [`Queue`] side: subscribing through one consumer-group
//! member per process whose commits follow the processed watermark, stats, close and
//! shutdown. Publishing with delivery reports is in `producer.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::stats::{GroupMemberStats, PartitionStats, QueueStats};
use conveyor_queue::dedupe::DedupeWindow;
use conveyor_queue::{Consumer, Queue, QueueError};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::{FutureProducer, Producer as _};
use tokio::sync::Semaphore;

use crate::admin::ensure_topic;
use crate::client::{Detached, Logged, consumer_config, producer_config};
use crate::config::KafkaConfig;
use crate::consumer::KafkaConsumer;
use crate::inner::{BrokerView, Counters, Inner};
use crate::lag::{refresh, watch_broker};
use crate::member::Member;
use crate::sync::lock;

/// A Kafka-backed queue. Cheap to clone: clones share the clients.
#[derive(Clone)]
pub struct KafkaQueue {
    pub(crate) inner: Arc<Inner>,
}

impl KafkaQueue {
    /// Connects, creates the topic when it is missing, and starts watching the group's lag.
    pub async fn connect(config: KafkaConfig) -> Result<KafkaQueue, String> {
        let producer = FutureProducer::from_config_and_context(&producer_config(&config), Logged)
            .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
        let mut observer_config = consumer_config(&config);
        observer_config.set("client.id", "conveyor-observer");
        let observer = BaseConsumer::from_config_and_context(&observer_config, Logged)
            .map_err(|e| format!("cannot create the Kafka metadata client: {e}"))?;
        let queue = KafkaQueue {
            inner: Arc::new(Inner {
                dedupe: Mutex::new(DedupeWindow::new(config.dedupe_window)),
                in_flight: Arc::new(Semaphore::new(config.max_in_flight_publishes.max(1))),
                config,
                producer: Detached::new(producer),
                observer: Detached::new(observer),
                closed: AtomicBool::new(false),
                counters: Counters::default(),
                view: Mutex::new(BrokerView::default()),
                sent: AtomicU64::new(0),
                sent_at_view: AtomicU64::new(0),
                produced_up_to: Mutex::new(HashMap::new()),
                member: tokio::sync::Mutex::new(None),
            }),
        };
        let topic = queue.inner.config.topic.clone();
        let partitions = queue.inner.config.partitions;
        ensure_topic(&queue.inner, &topic, partitions, Duration::from_secs(30)).await?;
        refresh(&queue.inner).await;
        if let Some(reason) = lock(&queue.inner.view).unhealthy.clone() {
            return Err(reason);
        }
        tokio::spawn(watch_broker(Arc::downgrade(&queue.inner)));
        Ok(queue)
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The group's lag as last measured, plus what this process sent since.
    pub(crate) fn estimated_lag(&self) -> u64 {
        let view = lock(&self.inner.view);
        let measured: u64 = view
            .partitions
            .iter()
            .map(|p| (p.high - p.resume_at()).max(0) as u64)
            .sum();
        let sent_since = self
            .inner
            .sent
            .load(Ordering::Relaxed)
            .saturating_sub(self.inner.sent_at_view.load(Ordering::Relaxed));
        measured + sent_since
    }

    pub(crate) fn unhealthy(&self) -> Option<String> {
        lock(&self.inner.view).unhealthy.clone()
    }
}

#[async_trait]
impl Queue for KafkaQueue {
    async fn subscribe(&self) -> Result<Box<dyn Consumer>, QueueError> {
        let mut member = self.inner.member.lock().await;
        let member = match member.as_ref() {
            Some(existing) => Arc::clone(existing),
            None => {
                let started = Member::join(&self.inner).map_err(QueueError::Unavailable)?;
                *member = Some(Arc::clone(&started));
                started
            }
        };
        Ok(Box::new(KafkaConsumer {
            member,
            queue: Arc::clone(&self.inner),
        }))
    }

    async fn stats(&self) -> QueueStats {
        // The broker view is at most one refresh interval old (`watch_broker`): a status
        // scrape does not cost the broker a round of metadata and offset requests.
        let view = lock(&self.inner.view).clone();
        let member = self.inner.member.lock().await.clone();
        let local = member.as_ref().map(|m| m.positions()).unwrap_or_default();
        let mut partitions = Vec::with_capacity(view.partitions.len());
        let (mut unfinished, mut held) = (0u64, 0u64);
        for offsets in &view.partitions {
            let mine = local.get(&offsets.partition);
            let committed = mine
                .and_then(|m| m.position)
                .unwrap_or_else(|| offsets.resume_at());
            // What this member received is in the partition too.
            let high = offsets
                .high
                .max(mine.and_then(|m| m.received_up_to).unwrap_or(0));
            let lag = (high - committed).max(0) as u64;
            let in_flight = mine.map_or(0, |m| m.held);
            unfinished += lag.saturating_sub(mine.map_or(0, |m| m.finished_above));
            held += in_flight;
            partitions.push(PartitionStats {
                partition: offsets.partition,
                high_watermark: high,
                committed,
                lag,
                in_flight,
            });
        }
        let counters = &self.inner.counters;
        QueueStats {
            backend: "kafka".into(),
            durable: true,
            size: unfinished.saturating_sub(held),
            in_flight: held,
            capacity: self.inner.config.capacity,
            published: partitions
                .iter()
                .map(|p| p.high_watermark.max(0) as u64)
                .sum(),
            duplicates: counters.duplicates.load(Ordering::Relaxed),
            acked: counters.acked.load(Ordering::Relaxed),
            nacked: counters.nacked.load(Ordering::Relaxed),
            terminated: counters.terminated.load(Ordering::Relaxed),
            redelivered: counters.redelivered.load(Ordering::Relaxed),
            partitions,
            group: member.map(|m| {
                let mut assigned: Vec<i32> = local.keys().copied().collect();
                assigned.sort_unstable();
                GroupMemberStats {
                    assigned,
                    stalled: m.stalled().is_some(),
                    stalls: counters.stalls.load(Ordering::Relaxed),
                    revoked: m.revoked(),
                    stale_settlements: counters.stale.load(Ordering::Relaxed),
                }
            }),
            ..QueueStats::default()
        }
    }

    fn durable(&self) -> bool {
        true
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    async fn shutdown(&self) {
        let member = self.inner.member.lock().await.take();
        let inner = Arc::clone(&self.inner);
        let timeout = self.inner.config.close_timeout;
        // librdkafka can block while it commits and leaves the group (or flushes to a broker
        // that is gone): do it on a thread of its own, and stop waiting after `close_timeout`.
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            if let Some(member) = member {
                member.leave();
            }
            if let Err(error) = inner.producer.flush(timeout) {
                tracing::warn!(%error, "Kafka producer flush on shutdown");
            }
            let _ = done.send(());
        });
        if tokio::time::timeout(timeout + Duration::from_secs(1), finished)
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "Kafka client did not close in time; exiting without waiting for it"
            );
        }
    }
}

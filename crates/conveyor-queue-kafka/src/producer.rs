//! Publishing: capacity and dedupe decided for a batch at once, its records sent many at a
//! time, each answered by its delivery report.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use conveyor_core::Event;
use conveyor_queue::{Health, PublishError, Published, Publisher};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use tokio::time::Instant;

use crate::codec::encode;
use crate::config::PartitionKey;
use crate::queue::KafkaQueue;
use crate::sync::lock;

/// The record key for an event, per the configured partition key.
fn record_key(key: PartitionKey, event: &Event) -> Option<&[u8]> {
    match key {
        PartitionKey::Source => Some(event.source.as_bytes()),
        PartitionKey::Id => Some(event.id.as_bytes()),
        PartitionKey::None => None,
    }
}

/// One record for [`KafkaQueue::produce`].
pub struct Record {
    pub value: Vec<u8>,
    /// Picks the partition; records with the same key stay in order.
    pub key: Option<Vec<u8>>,
    pub headers: OwnedHeaders,
}

/// Why a record was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceError {
    pub kind: ProduceErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceErrorKind {
    /// librdkafka's queue is full: try again soon.
    Full,
    /// No delivery report in time, the broker unreachable or refusing for now.
    Unavailable,
    /// The broker can never store this record as it is (too large, invalid).
    Refused,
}

fn produce_error(error: &KafkaError) -> ProduceError {
    let (kind, message) = match error {
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
            (ProduceErrorKind::Full, error.to_string())
        }
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) => (
            ProduceErrorKind::Unavailable,
            "no delivery report from Kafka in time".into(),
        ),
        KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidMessageSize,
        ) => (ProduceErrorKind::Refused, error.to_string()),
        other => (ProduceErrorKind::Unavailable, other.to_string()),
    };
    ProduceError { kind, message }
}

impl KafkaQueue {
    /// Sends `records` to the topic, many at a time (at most `max_in_flight_publishes` across
    /// the process, each round taking its permits at once), and waits for every delivery
    /// report, all under one `publish_timeout`: the partition and offset of each stored
    /// record, or why not. The queue's publish and the Kafka sink both send through here.
    pub async fn produce(&self, records: Vec<Record>) -> Vec<Result<(i32, i64), ProduceError>> {
        let config = &self.inner.config;
        let count = records.len();
        let mut outcomes = Vec::with_capacity(count);
        // librdkafka may hold a record past `message.timeout.ms` while the broker is gone;
        // the answer must not wait longer than the configured timeout.
        let deadline = Instant::now() + config.publish_timeout;
        let most = config.max_in_flight_publishes.max(1);
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let round: Vec<Record> = records.by_ref().take(most).collect();
            // One permit per record in flight, taken for the round at once.
            let Ok(_permits) = Arc::clone(&self.inner.in_flight)
                .acquire_many_owned(round.len() as u32)
                .await
            else {
                outcomes.extend(round.iter().map(|_| {
                    Err(ProduceError {
                        kind: ProduceErrorKind::Unavailable,
                        message: "the Kafka producer is closed".into(),
                    })
                }));
                continue;
            };
            let mut reports = Vec::with_capacity(round.len());
            for record in round {
                // librdkafka copies the value and key; they are needed only for the call.
                let mut future = FutureRecord::<[u8], [u8]>::to(&config.topic)
                    .payload(&record.value)
                    .headers(record.headers);
                if let Some(key) = &record.key {
                    future = future.key(key);
                }
                reports.push(self.inner.producer.send_result(future).map_err(|(e, _)| e));
            }
            self.inner.sent.fetch_add(
                reports.iter().filter(|r| r.is_ok()).count() as u64,
                Ordering::Relaxed,
            );
            // Every record of the round is on its way; now wait for the delivery reports, each
            // under the one deadline, so that a report that came is kept even when another
            // one of the round did not come in time (it must not be produced again).
            let timed_out = || ProduceError {
                kind: ProduceErrorKind::Unavailable,
                message: format!(
                    "no delivery report from Kafka within {:?}",
                    config.publish_timeout
                ),
            };
            let reported = reports.into_iter().map(|report| async move {
                let report = report.map_err(|error| produce_error(&error))?;
                match tokio::time::timeout_at(deadline, report).await {
                    Ok(Ok(Ok(delivered))) => Ok((delivered.partition, delivered.offset)),
                    Ok(Ok(Err((error, _)))) => Err(produce_error(&error)),
                    Ok(Err(_canceled)) => Err(ProduceError {
                        kind: ProduceErrorKind::Unavailable,
                        message: "the Kafka producer went away".into(),
                    }),
                    Err(_) => Err(timed_out()),
                }
            });
            outcomes.extend(futures_util::future::join_all(reported).await);
            if Instant::now() >= deadline {
                // Out of time: what is left is not sent at all (a record sent now could be
                // stored after we answered that it was not).
                outcomes.extend(records.by_ref().map(|_| Err(timed_out())));
            }
        }
        outcomes
    }
}

#[async_trait]
impl Publisher for KafkaQueue {
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        let count = events.len();
        if self.inner.closed.load(Ordering::Acquire) {
            return vec![Err(PublishError::Closed); count];
        }
        if let Some(reason) = self.unhealthy() {
            return vec![Err(PublishError::Unavailable(reason)); count];
        }
        let config = &self.inner.config;
        let mut results: Vec<Option<Result<Published, PublishError>>> = vec![None; count];
        // Capacity and dedupe decided for the whole batch under one look at each.
        let mut to_send = Vec::with_capacity(count);
        {
            let mut lag = self.estimated_lag();
            let mut dedupe = lock(&self.inner.dedupe);
            for (index, event) in events.into_iter().enumerate() {
                if config.capacity > 0 && lag >= config.capacity {
                    results[index] = Some(Err(PublishError::Full));
                } else if !dedupe.insert(&event) {
                    self.inner
                        .counters
                        .duplicates
                        .fetch_add(1, Ordering::Relaxed);
                    results[index] = Some(Ok(Published::Duplicate));
                } else {
                    lag += 1;
                    to_send.push((index, event));
                }
            }
        }
        let records = to_send
            .iter()
            .map(|(_, event)| {
                let (value, headers) = encode(event);
                Record {
                    value,
                    key: record_key(config.partition_key, event).map(<[u8]>::to_vec),
                    headers,
                }
            })
            .collect();
        let mut produced: HashMap<i32, i64> = HashMap::new();
        let mut failed = Vec::new();
        for ((index, event), outcome) in to_send.into_iter().zip(self.produce(records).await) {
            results[index] = Some(match outcome {
                Ok((partition, offset)) => {
                    let next = produced.entry(partition).or_default();
                    *next = (*next).max(offset + 1);
                    Ok(Published::Stored)
                }
                Err(error) => {
                    failed.push(event);
                    Err(match error.kind {
                        ProduceErrorKind::Full => PublishError::Full,
                        _ => PublishError::Unavailable(error.message),
                    })
                }
            });
        }
        // A failed publish must not make the client's retry look like a duplicate.
        if !failed.is_empty() {
            let mut dedupe = lock(&self.inner.dedupe);
            for event in &failed {
                dedupe.forget(event);
            }
        }
        if !produced.is_empty() {
            let mut up_to = lock(&self.inner.produced_up_to);
            for (partition, next) in produced {
                let known = up_to.entry(partition).or_default();
                *known = (*known).max(next);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(PublishError::Closed)))
            .collect()
    }

    async fn health(&self) -> Health {
        if self.inner.closed.load(Ordering::Acquire) {
            return Health::Unhealthy("closed for publishing (shutting down)".into());
        }
        if let Some(reason) = self.unhealthy() {
            return Health::Unhealthy(reason);
        }
        // A stalled group is this processor's problem to report (its `/ready`); publishing
        // still works, which is why `publish` looks at the broker view only.
        let member = self.inner.member.lock().await.clone();
        match member.and_then(|m| m.stalled()) {
            Some(reason) => Health::Unhealthy(reason),
            None => Health::Healthy,
        }
    }
}

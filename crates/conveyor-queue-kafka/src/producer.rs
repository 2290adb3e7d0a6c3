//! Publishing: capacity and dedupe decided for a batch at once, its records sent many at a
//! time, each answered by its delivery report.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use conveyor_core::Event;
use conveyor_queue::{Health, PublishError, Published, Publisher};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
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

fn publish_error(error: &KafkaError) -> PublishError {
    match error {
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => PublishError::Full,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) => {
            PublishError::Unavailable("no delivery report from Kafka in time".into())
        }
        other => PublishError::Unavailable(other.to_string()),
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
        let mut produced: HashMap<i32, i64> = HashMap::new();
        let mut failed = Vec::new();
        // librdkafka may hold a record past `message.timeout.ms` while the broker is gone;
        // the client's answer must not wait longer than the configured timeout.
        let deadline = Instant::now() + config.publish_timeout;
        let most = config.max_in_flight_publishes.max(1);
        let mut to_send = to_send.into_iter().peekable();
        while to_send.peek().is_some() {
            let chunk: Vec<(usize, Event)> = to_send.by_ref().take(most).collect();
            // One permit per record in flight, taken for the chunk at once.
            let Ok(_permits) = Arc::clone(&self.inner.in_flight)
                .acquire_many_owned(chunk.len() as u32)
                .await
            else {
                for (index, event) in chunk {
                    failed.push(event);
                    results[index] = Some(Err(PublishError::Closed));
                }
                continue;
            };
            let mut waiting = Vec::with_capacity(chunk.len());
            let mut reports = Vec::with_capacity(chunk.len());
            for (index, event) in chunk {
                let (payload, headers) = encode(&event);
                let mut record = FutureRecord::<[u8], [u8]>::to(&config.topic)
                    .payload(&payload)
                    .headers(headers);
                if let Some(key) = record_key(config.partition_key, &event) {
                    record = record.key(key);
                }
                match self.inner.producer.send_result(record) {
                    Ok(report) => {
                        waiting.push((index, event));
                        reports.push(report);
                    }
                    Err((error, _)) => {
                        results[index] = Some(Err(publish_error(&error)));
                        failed.push(event);
                    }
                }
            }
            self.inner
                .sent
                .fetch_add(reports.len() as u64, Ordering::Relaxed);
            // Every record of the chunk is on its way; now wait for the delivery reports, all
            // under one deadline.
            let mut reported = Vec::with_capacity(reports.len());
            let _ = tokio::time::timeout_at(deadline, async {
                for report in reports {
                    reported.push(report.await);
                }
            })
            .await;
            let mut reported = reported.into_iter();
            for (index, event) in waiting {
                let outcome = match reported.next() {
                    Some(Ok(Ok(delivered))) => {
                        let next = produced.entry(delivered.partition).or_default();
                        *next = (*next).max(delivered.offset + 1);
                        Ok(Published::Stored)
                    }
                    Some(Ok(Err((error, _)))) => Err(publish_error(&error)),
                    Some(Err(_canceled)) => Err(PublishError::Unavailable(
                        "the Kafka producer went away".into(),
                    )),
                    None => Err(PublishError::Unavailable(format!(
                        "no delivery report from Kafka within {:?}",
                        config.publish_timeout
                    ))),
                };
                if outcome.is_err() {
                    failed.push(event);
                }
                results[index] = Some(outcome);
            }
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

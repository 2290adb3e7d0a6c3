//! The Kafka sink: processed events produced to a topic (another team's, or the next
//! conveyor's queue) through the Kafka backend's producer ([`KafkaQueue::produce`]: the
//! idempotent producer with `acks=all`, many records in flight under a bound, every delivery
//! report awaited under one timeout) before the source event is acked.
//!
//! # Delivery
//!
//! - Each record's key is a configured part of the event (its source by default, its id, a
//!   field named by a jq path such as `.data.customer.id` or `.metadata.tenant`, or none), so
//!   records with the same key stay in order in one partition. A field missing from an event
//!   (or null, or data that is not JSON) makes a record without a key.
//! - Answers: a delivery report naming an offset is written. No report within `timeout_ms`,
//!   the broker unreachable (the backend's view of it), librdkafka's queue full: retryable,
//!   until the broker takes them. A record the broker can never store (larger than its
//!   `message.max.bytes`, invalid): that event to the DLQ with librdkafka's words. When part
//!   of a batch must be sent again, what was stored is not produced again
//!   ([`conveyor_sink::answers`]).
//! - **Duplicates.** The producer is idempotent, so librdkafka's own retries never store a
//!   record twice, and a batch retried inside one processor resends only what was not stored.
//!   Kafka has no broker-side dedupe across producers, though: a processor that crashes after
//!   a record is stored and before its source event is acked leaves the event to be
//!   redelivered. A processor that starts reads back the ids of the topic's last records
//!   (`readback`; the pool seeds its seen-id window with them, as from a file sink's tail), so
//!   a redelivery to it is skipped; one that goes to another processor already running (or
//!   older than the window) makes a second record. Every record carries the event id in its
//!   `conveyor-id` header for consumers to dedupe by; the NATS and PostgreSQL sinks are the
//!   ones that cannot hold a duplicate.
//! - The connection is made at the first write (again after a failed attempt), so a processor
//!   starts while the broker is down; the topic is created then when missing (`partitions`,
//!   `replication_factor`).

use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::Event;
use conveyor_queue::{Health, Publisher as _};
use conveyor_queue_kafka::{KafkaQueue, ProduceErrorKind, Record, encode};
use conveyor_sink::answers::Answers;
use conveyor_sink::field::{EventFields, as_text};
use conveyor_sink::record::write_record;
use conveyor_sink::{Sink, SinkError};
use rdkafka::message::{Header, OwnedHeaders};
use tokio::sync::OnceCell;

mod readback;
mod settings;

pub use settings::{Encoding, KafkaSinkSettings, Key};

/// How long the first write waits for the broker and the topic before it is retried later.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// The header carrying the event id on every record.
pub const ID_HEADER: &str = "conveyor-id";

pub struct KafkaSink {
    settings: KafkaSinkSettings,
    described: String,
    /// The backend's producer for the topic, made at the first write that finds the broker.
    producer: OnceCell<KafkaQueue>,
    answers: Answers,
}

impl KafkaSink {
    pub fn new(settings: KafkaSinkSettings) -> Self {
        KafkaSink {
            described: settings.describe(),
            settings,
            producer: OnceCell::new(),
            answers: Answers::default(),
        }
    }

    async fn producer(&self) -> Result<&KafkaQueue, String> {
        self.producer
            .get_or_try_init(|| async {
                let config = self.settings.producer_config();
                match tokio::time::timeout(CONNECT_WITHIN, KafkaQueue::connect(config)).await {
                    Ok(connected) => connected,
                    Err(_) => Err(format!(
                        "Kafka at {} did not answer with topic '{}' within {CONNECT_WITHIN:?}",
                        self.settings.brokers, self.settings.topic
                    )),
                }
            })
            .await
    }

    fn record(&self, event: &Event, processed_at_ms: u64) -> Record {
        let key = self.key(event);
        match self.settings.encoding {
            Encoding::Event => {
                let (value, headers) = encode(event);
                Record {
                    value,
                    key,
                    headers: headers.insert(Header {
                        key: ID_HEADER,
                        value: Some(event.id.as_bytes()),
                    }),
                }
            }
            Encoding::Record => {
                let mut value = Vec::with_capacity(event.payload.len() + 160);
                write_record(&mut value, event, processed_at_ms);
                value.pop(); // the record line's newline: a record is one document
                let headers = OwnedHeaders::new_with_capacity(3)
                    .insert(Header {
                        key: ID_HEADER,
                        value: Some(event.id.as_bytes()),
                    })
                    .insert(Header {
                        key: "conveyor-source",
                        value: Some(event.source.as_bytes()),
                    })
                    .insert(Header {
                        key: "content-type",
                        value: Some("application/json"),
                    });
                Record {
                    value,
                    key,
                    headers,
                }
            }
        }
    }

    fn key(&self, event: &Event) -> Option<Vec<u8>> {
        match &self.settings.key {
            Key::Id => Some(event.id.as_bytes().to_vec()),
            Key::Source => Some(event.source.as_bytes().to_vec()),
            Key::None => None,
            Key::Field(path) => EventFields::new(event)
                .get(path)
                .as_ref()
                .and_then(as_text)
                .map(String::into_bytes),
        }
    }
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let (pending, mut round) = self.answers.sort(events);
        if !pending.is_empty() {
            let retryable = |message| SinkError::retryable(&self.described, message);
            let producer = self.producer().await.map_err(retryable)?;
            // The backend watches the broker; while it is away, fail fast instead of waiting
            // out every record's timeout.
            if let Health::Unhealthy(reason) = producer.health().await {
                return Err(retryable(reason));
            }
            let records = pending
                .iter()
                .map(|&at| self.record(&events[at], processed_at_ms))
                .collect();
            for (&at, outcome) in pending.iter().zip(producer.produce(records).await) {
                match outcome {
                    Ok(_) => round.delivered([at]),
                    Err(error) if error.kind == ProduceErrorKind::Refused => {
                        round.refused(at, error.message)
                    }
                    Err(error) => round.retry(1, error.message, None),
                }
            }
        }
        self.answers.settle(&self.described, events, round)
    }

    fn describe(&self) -> String {
        self.described.clone()
    }

    async fn recent_ids(&self, limit: usize) -> Result<Vec<String>, SinkError> {
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || readback::recent_ids(&settings, limit))
            .await
            .map_err(|e| format!("the read-back task failed: {e}"))
            .and_then(|read| read)
            .map_err(|message| SinkError::retryable(&self.described, message))
    }

    /// A first write may connect (up to 10 s) and then wait out the delivery timeout.
    fn write_timeout(&self) -> Duration {
        (self.settings.timeout * 2 + CONNECT_WITHIN).max(conveyor_sink::DEFAULT_WRITE_TIMEOUT)
    }
}

#[cfg(test)]
mod tests;

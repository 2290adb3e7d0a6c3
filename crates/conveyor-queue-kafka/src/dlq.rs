//! Dead letters in a Kafka topic, so they survive restarts and every processor sees the same
//! list.
//!
//! The topic is a log, so taking a letter out (replay) appends a tombstone: a record with the
//! letter's key and no value. The live letters are the topic read from the start with each
//! tombstone removing its key (on a topic with `cleanup.policy=compact` the broker also
//! reclaims their space). Bounded: at `dlq_capacity` live letters a push is refused, and the
//! pool keeps the event in the work queue instead of dropping it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use conveyor_proto::v1;
use conveyor_queue::dlq::{DeadLetter, DeadLetterQueue, ids_not_taken};
use prost::Message as _;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

use crate::admin::ensure_topic;
use crate::client::{Logged, blocking, client_config};
use crate::inner::Inner;
use crate::queue::KafkaQueue;

/// How long a counted size is reused before the topic is read again.
const SIZE_TTL: Duration = Duration::from_secs(2);
/// Longest time one read of the whole DLQ topic may take.
const SCAN_TIMEOUT: Duration = Duration::from_secs(15);

pub struct KafkaDeadLetters {
    inner: Arc<Inner>,
    topic: String,
    capacity: u64,
    size: Mutex<Option<(Instant, u64)>>,
}

impl KafkaDeadLetters {
    /// Creates or finds the DLQ topic (one partition: letters keep their order).
    pub async fn open(queue: &KafkaQueue) -> Result<Self, String> {
        let inner = Arc::clone(queue.inner());
        let topic = inner.config.dlq_topic.clone();
        ensure_topic(&inner, &topic, 1, Duration::from_secs(30)).await?;
        Ok(KafkaDeadLetters {
            capacity: inner.config.dlq_capacity,
            inner,
            topic,
            size: Mutex::new(None),
        })
    }

    /// The live letters with their keys, oldest first.
    async fn scan(&self) -> Result<Vec<(String, DeadLetter)>, String> {
        let inner = Arc::clone(&self.inner);
        let topic = self.topic.clone();
        let letters = blocking(move || read_topic(&inner, &topic)).await?;
        *self.size.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), letters.len() as u64));
        Ok(letters)
    }

    async fn send(&self, key: &str, value: Option<Vec<u8>>) -> Result<(), String> {
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic).key(key);
        if let Some(value) = value.as_deref() {
            record = record.payload(value);
        }
        match self
            .inner
            .producer
            .send(record, Duration::from_secs(5))
            .await
        {
            Ok(_) => Ok(()),
            Err((error, _)) => Err(error.to_string()),
        }
    }

    fn adjust_size(&self, delta: i64) {
        let mut size = self.size.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, count)) = size.as_mut() {
            *count = count.saturating_add_signed(delta);
        }
    }
}

/// Reads the DLQ topic from its start to its current end and folds tombstones in.
fn read_topic(inner: &Inner, topic: &str) -> Result<Vec<(String, DeadLetter)>, String> {
    let mut config = client_config(&inner.config);
    config
        .set("group.id", format!("{}-dlq-reader", inner.config.group))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true");
    let reader: BaseConsumer<Logged> = BaseConsumer::from_config_and_context(&config, Logged)
        .map_err(|e| format!("cannot create a DLQ reader: {e}"))?;
    let (low, high) = reader
        .fetch_watermarks(topic, 0, Duration::from_secs(5))
        .map_err(|e| format!("DLQ topic '{topic}': {e}"))?;
    let mut letters: Vec<Option<(String, DeadLetter)>> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    if high <= low {
        return Ok(Vec::new());
    }
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(low))
        .map_err(|e| e.to_string())?;
    reader.assign(&assignment).map_err(|e| e.to_string())?;
    let deadline = std::time::Instant::now() + SCAN_TIMEOUT;
    loop {
        if std::time::Instant::now() > deadline {
            return Err(format!("reading DLQ topic '{topic}' timed out"));
        }
        let Some(message) = reader.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = match message {
            Ok(message) => message,
            // The end, even when the last offsets were compacted away.
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => break,
            Err(error) => return Err(format!("reading DLQ topic '{topic}': {error}")),
        };
        let key = String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
        match message.payload() {
            // A tombstone: the letter was taken out.
            None => {
                if let Some(index) = by_key.remove(&key) {
                    letters[index] = None;
                }
            }
            Some(payload) => {
                if let Ok(letter) = v1::DeadLetter::decode(payload) {
                    by_key.insert(key.clone(), letters.len());
                    letters.push(Some((key, from_wire(letter))));
                }
            }
        }
        if message.offset() + 1 >= high {
            break;
        }
    }
    Ok(letters.into_iter().flatten().collect())
}

fn from_wire(letter: v1::DeadLetter) -> DeadLetter {
    DeadLetter {
        event: conveyor_proto::event_from_wire(letter.event.unwrap_or_default()),
        error: letter.error,
        attempts: letter.attempts,
        failed_at_ms: letter.failed_at_ms,
    }
}

fn to_wire(letter: &DeadLetter) -> Vec<u8> {
    v1::DeadLetter {
        event: Some(conveyor_proto::event_to_wire(letter.event.clone())),
        error: letter.error.clone(),
        attempts: letter.attempts,
        failed_at_ms: letter.failed_at_ms,
    }
    .encode_to_vec()
}

/// One key per event and failure, so a retried push replaces rather than adds.
fn letter_key(letter: &DeadLetter) -> String {
    format!("{}@{}", letter.event.dedupe_key(), letter.failed_at_ms)
}

#[async_trait]
impl DeadLetterQueue for KafkaDeadLetters {
    async fn push(&self, letter: DeadLetter) -> Result<(), DeadLetter> {
        if self.size().await >= self.capacity {
            tracing::warn!(id = %letter.event.id, capacity = self.capacity, "DLQ full");
            return Err(letter);
        }
        match self
            .send(&letter_key(&letter), Some(to_wire(&letter)))
            .await
        {
            Ok(()) => {
                self.adjust_size(1);
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, id = %letter.event.id, "DLQ topic refused the event");
                Err(letter)
            }
        }
    }

    async fn list(&self, limit: usize) -> (u64, Vec<DeadLetter>) {
        match self.scan().await {
            Ok(letters) => (
                letters.len() as u64,
                letters.into_iter().take(limit).map(|(_, l)| l).collect(),
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot read the DLQ topic");
                (0, Vec::new())
            }
        }
    }

    async fn take(&self, ids: Option<&[String]>) -> (Vec<DeadLetter>, Vec<String>) {
        let letters = match self.scan().await {
            Ok(letters) => letters,
            Err(error) => {
                tracing::warn!(%error, "cannot read the DLQ topic");
                return (Vec::new(), ids.map(<[String]>::to_vec).unwrap_or_default());
            }
        };
        let mut taken = Vec::new();
        for (key, letter) in letters {
            let wanted = ids.is_none_or(|ids| ids.iter().any(|id| **id == *letter.event.id));
            if wanted && self.send(&key, None).await.is_ok() {
                self.adjust_size(-1);
                taken.push(letter);
            }
        }
        let not_found = ids_not_taken(ids, &taken);
        (taken, not_found)
    }

    async fn size(&self) -> u64 {
        let cached = *self.size.lock().unwrap_or_else(|p| p.into_inner());
        match cached {
            Some((at, size)) if at.elapsed() < SIZE_TTL => size,
            _ => match self.scan().await {
                Ok(letters) => letters.len() as u64,
                Err(error) => {
                    tracing::warn!(%error, "cannot count the DLQ topic");
                    cached.map_or(0, |(_, size)| size)
                }
            },
        }
    }
}

//! Reading back the ids of the topic's last records, so a processor that starts again after a
//! crash skips the redelivered events it already produced (the pool seeds its seen-id window
//! with them, as it does from a file sink's tail).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Headers as _, Message as _};

use crate::{ID_HEADER, KafkaSinkSettings};

/// Longest the whole read-back may take: a processor's start waits for it.
const READ_WITHIN: Duration = Duration::from_secs(10);

/// The `conveyor-id` of about the last `limit` records of the topic (split evenly over its
/// partitions), each partition's oldest first. Blocking: call it off the async threads.
pub(crate) fn recent_ids(
    settings: &KafkaSinkSettings,
    limit: usize,
) -> Result<Vec<String>, String> {
    let deadline = Instant::now() + READ_WITHIN;
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", "conveyor-sink-readback")
        // Assigned partitions only: the group is never joined and nothing is committed.
        .set(
            "group.id",
            format!("conveyor-sink-readback-{}", settings.topic),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    for (key, value) in &settings.options {
        // The producer's security settings apply here too; its producer-only ones are
        // ignored by librdkafka with a warning.
        if ["security.", "sasl.", "ssl."]
            .iter()
            .any(|p| key.starts_with(p))
        {
            config.set(key, value);
        }
    }
    let consumer: BaseConsumer = config
        .create()
        .map_err(|e| format!("cannot create the read-back consumer: {e}"))?;
    let left = || deadline.saturating_duration_since(Instant::now());
    let metadata = consumer
        .fetch_metadata(Some(&settings.topic), left())
        .map_err(|e| format!("topic '{}' metadata: {e}", settings.topic))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == settings.topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Ok(Vec::new());
    }
    let per_partition = (limit / partitions.len()).max(1);
    let mut assignment = TopicPartitionList::new();
    // Partitions not yet read to their end. Reading starts `per_partition` records before the
    // high watermark and goes on to the end the fetches report, keeping the last
    // `per_partition` ids: a broker that answers ListOffsets loosely (tansu reports 1) costs a
    // longer read, never a missed id.
    let mut reading: Vec<i32> = Vec::new();
    for &partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&settings.topic, partition, left())
            .map_err(|e| format!("topic '{}' partition {partition}: {e}", settings.topic))?;
        let from = (high - per_partition as i64).max(low);
        assignment
            .add_partition_offset(&settings.topic, partition, Offset::Offset(from))
            .map_err(|e| e.to_string())?;
        reading.push(partition);
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut ids: HashMap<i32, VecDeque<String>> = HashMap::new();
    while !reading.is_empty() {
        if left().is_zero() {
            return Err(format!(
                "reading back topic '{}' took longer than {READ_WITHIN:?}",
                settings.topic
            ));
        }
        let Some(polled) = consumer.poll(left().min(Duration::from_millis(500))) else {
            continue;
        };
        match polled {
            Ok(message) => {
                let partition = message.partition();
                if let Some(id) = message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == ID_HEADER)
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .map(str::to_owned)
                }) {
                    let kept = ids.entry(partition).or_default();
                    if kept.len() == per_partition {
                        kept.pop_front();
                    }
                    kept.push_back(id);
                }
            }
            Err(rdkafka::error::KafkaError::PartitionEOF(partition)) => {
                reading.retain(|&p| p != partition);
            }
            Err(error) => return Err(format!("reading back topic '{}': {error}", settings.topic)),
        }
    }
    Ok(partitions
        .iter()
        .flat_map(|p| ids.remove(p).unwrap_or_default())
        .collect())
}

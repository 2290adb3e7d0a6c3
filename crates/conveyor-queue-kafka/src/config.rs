use std::time::Duration;

/// Which part of an event picks its partition. Events with the same key stay in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PartitionKey {
    /// The event's source: each source's events stay in order (the default).
    Source,
    /// The event's id: spreads evenly, no order between events.
    Id,
    /// No key: librdkafka's sticky partitioner spreads batches, no order between events.
    None,
}

/// Where the topic lives and how producing and consuming behave.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated (the seed's `KAFKA_BROKERS`).
    pub brokers: String,
    /// The events topic (the seed's `KAFKA_TOPIC`).
    pub topic: String,
    /// The consumer group every processor joins (the seed's `KAFKA_CONSUMER_GROUP`).
    pub group: String,
    /// Partitions of the events topic when conveyor creates it.
    pub partitions: i32,
    /// Replication factor of the topics conveyor creates.
    pub replication_factor: i32,
    pub partition_key: PartitionKey,
    /// Most events the group may lag behind before publishes are refused with "full"
    /// (the seed's `QUEUE_SIZE`); 0: no bound.
    pub capacity: u64,
    /// How many recent dedupe keys a publisher remembers, to store a re-published event once.
    pub dedupe_window: usize,
    /// Most publishes awaiting their delivery report at once, per process.
    pub max_in_flight_publishes: usize,
    /// How long a publish may wait for its delivery report before the client gets 503
    /// (librdkafka's `message.timeout.ms`).
    pub publish_timeout: Duration,
    /// Most events a processor holds at once (delivered, buffered, waiting to retry); beyond
    /// it, fetching from the broker pauses.
    pub max_held: usize,
    /// How often the processed watermark is committed (and always on revoke and shutdown).
    pub commit_interval: Duration,
    /// How long the group waits for a silent member before giving its partitions to others.
    pub session_timeout: Duration,
    /// How long shutting down may take inside librdkafka (final commit, leaving the group)
    /// before conveyor stops waiting for it.
    pub close_timeout: Duration,
    /// Extra librdkafka settings for the producer, applied last (`key=value`).
    pub producer_overrides: Vec<(String, String)>,
    /// Extra librdkafka settings for the consumer, applied last (`key=value`).
    pub consumer_overrides: Vec<(String, String)>,
    pub dlq_topic: String,
    pub dlq_capacity: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            topic: "conveyor-events".into(),
            group: "conveyor-processor".into(),
            partitions: 6,
            replication_factor: 1,
            partition_key: PartitionKey::Source,
            capacity: 1_000_000,
            dedupe_window: 100_000,
            max_in_flight_publishes: 8192,
            publish_timeout: Duration::from_secs(10),
            max_held: 4096,
            commit_interval: Duration::from_millis(200),
            session_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(5),
            producer_overrides: Vec::new(),
            consumer_overrides: Vec::new(),
            dlq_topic: "conveyor-dlq".into(),
            dlq_capacity: 100_000,
        }
    }
}

/// Parses `key=value,key=value` (librdkafka settings passed through).
pub fn parse_overrides(spec: &str) -> Result<Vec<(String, String)>, String> {
    spec.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.trim().to_owned()))
            }
            _ => Err(format!("'{pair}': expected key=value")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_and_name_the_bad_pair() {
        assert_eq!(
            parse_overrides("linger.ms=5, compression.type=lz4").expect("parses"),
            vec![
                ("linger.ms".to_owned(), "5".to_owned()),
                ("compression.type".to_owned(), "lz4".to_owned())
            ]
        );
        assert_eq!(parse_overrides("").expect("parses"), vec![]);
        let error = parse_overrides("linger.ms=5,oops").expect_err("refused");
        assert!(error.contains("'oops'"), "{error}");
    }
}

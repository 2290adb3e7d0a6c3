//! The backend's command-line settings: flags, their environment variables (the seed's
//! `KAFKA_*` names) and how they become a [`KafkaConfig`]. The binary flattens [`KafkaArgs`]
//! into the roles that open a queue and calls [`KafkaArgs::open`]; it copies no field.

use std::time::Duration;

use clap::Args;
use conveyor_queue::{OpenError, QueueSettings};

use crate::{KafkaConfig, KafkaDeadLetters, KafkaQueue, PartitionKey, check_settings};

/// Kafka settings (used with `QUEUE_TYPE=kafka`).
#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Bootstrap servers, comma-separated host:port.
    #[arg(
        long,
        env = "KAFKA_BROKERS",
        value_name = "KAFKA_BROKERS",
        default_value = "localhost:9092"
    )]
    pub kafka_brokers: String,

    /// Topic holding the events (created with KAFKA_PARTITIONS when missing).
    #[arg(
        long,
        env = "KAFKA_TOPIC",
        value_name = "KAFKA_TOPIC",
        default_value = "conveyor-events"
    )]
    pub kafka_topic: String,

    /// Consumer group every processor joins.
    #[arg(
        long,
        env = "KAFKA_CONSUMER_GROUP",
        value_name = "KAFKA_CONSUMER_GROUP",
        default_value = "conveyor-processor"
    )]
    pub kafka_consumer_group: String,

    /// Partitions of the topics conveyor creates (the most processors that share the work).
    #[arg(long, env = "KAFKA_PARTITIONS", value_name = "KAFKA_PARTITIONS", default_value_t = 6,
          value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub kafka_partitions: i32,

    /// Replication factor of the topics conveyor creates.
    #[arg(long, env = "KAFKA_REPLICATION_FACTOR", value_name = "KAFKA_REPLICATION_FACTOR", default_value_t = 1,
          value_parser = clap::value_parser!(i32).range(1..=16))]
    pub kafka_replication_factor: i32,

    /// What picks an event's partition: source (each source stays in order), id (even
    /// spread) or none.
    #[arg(
        long,
        env = "KAFKA_PARTITION_KEY",
        value_name = "KAFKA_PARTITION_KEY",
        value_enum,
        default_value = "source"
    )]
    pub kafka_partition_key: PartitionKey,

    /// Extra librdkafka producer settings, `key=value,key=value` (applied last).
    #[arg(long, env = "KAFKA_PRODUCER_CONFIG", value_name = "KAFKA_PRODUCER_CONFIG",
          default_value = "", value_parser = crate::parse_overrides)]
    pub kafka_producer_config: Overrides,

    /// Extra librdkafka consumer settings, `key=value,key=value` (applied last).
    #[arg(long, env = "KAFKA_CONSUMER_CONFIG", value_name = "KAFKA_CONSUMER_CONFIG",
          default_value = "", value_parser = crate::parse_overrides)]
    pub kafka_consumer_config: Overrides,

    /// Topic holding dead letters.
    #[arg(
        long,
        env = "KAFKA_DLQ_TOPIC",
        value_name = "KAFKA_DLQ_TOPIC",
        default_value = "conveyor-dlq"
    )]
    pub kafka_dlq_topic: String,

    /// Milliseconds the group waits for a silent processor before giving its partitions to
    /// the others.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT_MS", value_name = "KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    pub kafka_session_timeout_ms: u64,

    /// Milliseconds between commits of the processed watermark.
    #[arg(long, env = "KAFKA_COMMIT_INTERVAL_MS", value_name = "KAFKA_COMMIT_INTERVAL_MS", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub kafka_commit_interval_ms: u64,

    /// Publishes awaiting their delivery report at once, per process.
    #[arg(long, env = "KAFKA_MAX_IN_FLIGHT", value_name = "KAFKA_MAX_IN_FLIGHT", default_value_t = 8192,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub kafka_max_in_flight: u64,
}

/// librdkafka settings passed through, `(key, value)` in order.
pub type Overrides = Vec<(String, String)>;

impl KafkaArgs {
    /// The backend's config, with what the role sets for every backend.
    pub fn config(&self, shared: &QueueSettings) -> KafkaConfig {
        KafkaConfig {
            brokers: self.kafka_brokers.clone(),
            topic: self.kafka_topic.clone(),
            group: self.kafka_consumer_group.clone(),
            partitions: self.kafka_partitions,
            replication_factor: self.kafka_replication_factor,
            partition_key: self.kafka_partition_key,
            capacity: shared.capacity,
            dedupe_window: shared.dedupe_window,
            max_in_flight_publishes: usize::try_from(self.kafka_max_in_flight)
                .unwrap_or(usize::MAX),
            commit_interval: Duration::from_millis(self.kafka_commit_interval_ms),
            session_timeout: Duration::from_millis(self.kafka_session_timeout_ms),
            producer_overrides: self.kafka_producer_config.clone(),
            consumer_overrides: self.kafka_consumer_config.clone(),
            dlq_topic: self.kafka_dlq_topic.clone(),
            dlq_capacity: shared.dlq_capacity.max(1),
            ..KafkaConfig::default()
        }
    }

    /// Checks the librdkafka settings, connects, and creates the topic (and with a DLQ
    /// capacity the dead-letter topic) when missing.
    pub async fn open(
        &self,
        shared: &QueueSettings,
    ) -> Result<(KafkaQueue, Option<KafkaDeadLetters>), OpenError> {
        let config = self.config(shared);
        check_settings(&config).map_err(|e| {
            OpenError::Config(format!(
                "KAFKA_PRODUCER_CONFIG / KAFKA_CONSUMER_CONFIG (--kafka-producer-config / --kafka-consumer-config): {e}"
            ))
        })?;
        let queue = KafkaQueue::connect(config.clone()).await.map_err(|e| {
            OpenError::Unreachable(format!("KAFKA_BROKERS {}: {e}", config.brokers))
        })?;
        let dlq = if shared.dlq_capacity > 0 {
            Some(
                KafkaDeadLetters::open(&queue)
                    .await
                    .map_err(OpenError::Unreachable)?,
            )
        } else {
            None
        };
        Ok((queue, dlq))
    }
}

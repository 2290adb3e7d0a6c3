//! The backend's command-line settings: flags, their environment variables (the seed's
//! `NATS_URL` and conveyor's `CONVEYOR_NATS_*`) and how they become a [`NatsConfig`]. The
//! binary flattens [`NatsArgs`] into the roles that open a queue and calls [`NatsArgs::open`];
//! it copies no field.

use std::time::Duration;

use clap::{Args, ValueEnum};
use conveyor_queue::{OpenError, QueueSettings};

use crate::{NatsConfig, NatsDeadLetters, NatsQueue};

/// NATS JetStream settings (used with `QUEUE_TYPE=nats`).
#[derive(Debug, Clone, Args)]
pub struct NatsArgs {
    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "NATS_URL",
        value_name = "NATS_URL",
        default_value = "nats://localhost:4222"
    )]
    pub nats_url: String,

    /// JetStream stream holding the events.
    #[arg(
        long,
        env = "CONVEYOR_NATS_STREAM",
        value_name = "CONVEYOR_NATS_STREAM",
        default_value = "CONVEYOR"
    )]
    pub nats_stream: String,

    /// Subject events are published on.
    #[arg(
        long,
        env = "CONVEYOR_NATS_SUBJECT",
        value_name = "CONVEYOR_NATS_SUBJECT",
        default_value = "conveyor.events"
    )]
    pub nats_subject: String,

    /// Durable pull consumer shared by every processor.
    #[arg(
        long,
        env = "CONVEYOR_NATS_CONSUMER",
        value_name = "CONVEYOR_NATS_CONSUMER",
        default_value = "conveyor-processor"
    )]
    pub nats_consumer: String,

    /// Stream replicas (1, 3 or 5 on a cluster).
    #[arg(long, env = "CONVEYOR_NATS_REPLICAS", value_name = "CONVEYOR_NATS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=5))]
    pub nats_replicas: u64,

    /// Stream storage: file (survives broker restarts) or memory.
    #[arg(
        long,
        env = "CONVEYOR_NATS_STORAGE",
        value_name = "CONVEYOR_NATS_STORAGE",
        value_enum,
        default_value = "file"
    )]
    pub nats_storage: NatsStorage,

    /// Seconds a delivery may stay unacked before the broker redelivers it (AckWait).
    #[arg(long, env = "CONVEYOR_NATS_ACK_WAIT_SECS", value_name = "CONVEYOR_NATS_ACK_WAIT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub nats_ack_wait_secs: u64,

    /// Deliveries after which the broker gives up (MaxDeliver); 0 leaves it to the processor,
    /// which dead-letters after CONVEYOR_MAX_ATTEMPTS.
    #[arg(
        long,
        env = "CONVEYOR_NATS_MAX_DELIVER",
        value_name = "CONVEYOR_NATS_MAX_DELIVER",
        default_value_t = 0
    )]
    pub nats_max_deliver: u32,

    /// Publishes awaiting their PubAck at once, per process.
    #[arg(long, env = "CONVEYOR_NATS_MAX_IN_FLIGHT", value_name = "CONVEYOR_NATS_MAX_IN_FLIGHT", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub nats_max_in_flight: u64,

    /// Seconds inside which a re-published event id is discarded by the broker.
    #[arg(long, env = "CONVEYOR_NATS_DUPLICATE_WINDOW_SECS", value_name = "CONVEYOR_NATS_DUPLICATE_WINDOW_SECS",
          default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub nats_duplicate_window_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NatsStorage {
    File,
    Memory,
}

impl NatsArgs {
    /// The backend's config, with what the role sets for every backend.
    pub fn config(&self, shared: &QueueSettings) -> NatsConfig {
        NatsConfig {
            url: self.nats_url.clone(),
            stream: self.nats_stream.clone(),
            subject: self.nats_subject.clone(),
            consumer: self.nats_consumer.clone(),
            replicas: usize::try_from(self.nats_replicas).unwrap_or(usize::MAX),
            file_storage: self.nats_storage == NatsStorage::File,
            ack_wait: Duration::from_secs(self.nats_ack_wait_secs),
            max_deliver: (self.nats_max_deliver > 0).then_some(i64::from(self.nats_max_deliver)),
            capacity: i64::try_from(shared.capacity).unwrap_or(i64::MAX),
            duplicate_window: Duration::from_secs(self.nats_duplicate_window_secs),
            max_in_flight_publishes: usize::try_from(self.nats_max_in_flight).unwrap_or(usize::MAX),
            dlq_capacity: i64::try_from(shared.dlq_capacity).unwrap_or(i64::MAX),
            ..NatsConfig::default()
        }
    }

    /// Connects and sets up the stream and the durable consumer, and with a DLQ capacity the
    /// dead-letter stream.
    pub async fn open(
        &self,
        shared: &QueueSettings,
    ) -> Result<(NatsQueue, Option<NatsDeadLetters>), OpenError> {
        let config = self.config(shared);
        // A bad entry in the server list is configuration, not an outage.
        config
            .servers()
            .map_err(|e| OpenError::Config(format!("NATS_URL (--nats-url): {e}")))?;
        let queue = NatsQueue::connect(config.clone())
            .await
            .map_err(|e| OpenError::Unreachable(format!("NATS_URL: {e}")))?;
        let dlq = if shared.dlq_capacity > 0 {
            Some(
                NatsDeadLetters::open(queue.jetstream().clone(), &config)
                    .await
                    .map_err(OpenError::Unreachable)?,
            )
        } else {
            None
        };
        Ok((queue, dlq))
    }
}

use std::time::Duration;

/// Where the stream lives and how it behaves.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (the seed's `NATS_URL`).
    pub url: String,
    pub stream: String,
    pub subject: String,
    /// The durable consumer every processor shares.
    pub consumer: String,
    pub replicas: usize,
    /// File (durable) or memory storage.
    pub file_storage: bool,
    /// How long a delivery may stay unacked before the broker redelivers it.
    pub ack_wait: Duration,
    /// Deliveries after which the broker stops redelivering; `None` leaves it to the processor
    /// (which dead-letters at its `max_attempts`).
    pub max_deliver: Option<i64>,
    /// The stream's `max_msgs`: the queue's capacity.
    pub capacity: i64,
    /// Publishes with the same `Nats-Msg-Id` inside this window are stored once.
    pub duplicate_window: Duration,
    /// Most publishes awaiting their PubAck at once.
    pub max_in_flight_publishes: usize,
    /// How long a publish waits for its PubAck before the client gets 503.
    pub publish_timeout: Duration,
    /// Messages a consumer pulls per request.
    pub fetch_batch: usize,
    pub dlq_stream: String,
    pub dlq_subject: String,
    pub dlq_capacity: i64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://localhost:4222".into(),
            stream: "CONVEYOR".into(),
            subject: "conveyor.events".into(),
            consumer: "conveyor-processor".into(),
            replicas: 1,
            file_storage: true,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            capacity: 1_000_000,
            duplicate_window: Duration::from_secs(120),
            max_in_flight_publishes: 4096,
            publish_timeout: Duration::from_secs(5),
            fetch_batch: 256,
            dlq_stream: "CONVEYOR_DLQ".into(),
            dlq_subject: "conveyor.dlq".into(),
            dlq_capacity: 100_000,
        }
    }
}

impl NatsConfig {
    /// JetStream storage for the streams conveyor creates.
    pub(crate) fn storage_type(&self) -> async_nats::jetstream::stream::StorageType {
        if self.file_storage {
            async_nats::jetstream::stream::StorageType::File
        } else {
            async_nats::jetstream::stream::StorageType::Memory
        }
    }
}

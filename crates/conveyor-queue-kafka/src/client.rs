//! What every librdkafka client of this crate is made with: the configurations (shared,
//! producer, group member), the context that forwards a client's logs, [`Detached`] closing,
//! and running a blocking call off the async threads.

use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;

use crate::config::KafkaConfig;

/// Longest interval between a group member's heartbeats (shorter when a third of the session
/// timeout is).
const HEARTBEAT_MAX: Duration = Duration::from_millis(500);
/// Longest wait for one metadata, watermark or committed-offsets request.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Owns a librdkafka client and, when dropped, destroys it on a thread of its own: destroying
/// a client can block (a consumer waits for its group coordinator, which may be gone), and
/// nobody dropping a queue should wait on that. A process that exits meanwhile does not wait.
pub(crate) struct Detached<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Detached<T> {
    pub(crate) fn new(client: T) -> Self {
        Detached(Some(client))
    }

    /// Takes the client out, to be destroyed by the caller, here.
    pub(crate) fn into_inner(mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T: Send + 'static> std::ops::Deref for Detached<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0
            .as_ref()
            .expect("a client is present until it is dropped")
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            let spawned = std::thread::Builder::new()
                .name("kafka-close".into())
                .spawn(move || drop(client));
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start a thread to close a Kafka client; leaking it");
            }
        }
    }
}

/// Forwards librdkafka's logs and errors to `tracing`.
#[derive(Clone, Default)]
pub(crate) struct Logged;

impl ClientContext for Logged {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for Logged {}

pub(crate) fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
    }
}

pub(crate) fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "conveyor")
        .set_log_level(RDKafkaLogLevel::Warning);
    client
}

pub(crate) fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        // Exactly one copy per send, in order per partition, even across broker retries.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            config.publish_timeout.as_millis().to_string(),
        )
        .set("linger.ms", "1")
        .set(
            "queue.buffering.max.messages",
            (config.max_in_flight_publishes.max(1) * 2).to_string(),
        );
    for (key, value) in &config.producer_overrides {
        client.set(key, value);
    }
    client
}

pub(crate) fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("group.id", &config.group)
        // Offsets move only when conveyor commits the processed watermark.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        // A member hears of a rebalance only in a heartbeat's answer: when another member
        // leaves (a processor stopping), the partitions move after at most one interval. Kafka's
        // 3 s default would make every rolling restart wait that long; conveyor has one member
        // per process, so a heartbeat every 500 ms costs the coordinator little.
        .set(
            "heartbeat.interval.ms",
            (config.session_timeout.as_millis() / 3)
                .clamp(100, HEARTBEAT_MAX.as_millis())
                .to_string(),
        )
        // Bounds what librdkafka prefetches per partition, on top of `max_held`.
        .set("queued.max.messages.kbytes", "16384");
    for (key, value) in &config.consumer_overrides {
        client.set(key, value);
    }
    client
}

/// Checks the passed-through librdkafka settings without connecting: an unknown key or a bad
/// value is named, and which of the two lists it came from.
pub fn check_settings(config: &KafkaConfig) -> Result<(), String> {
    producer_config(config)
        .create_native_config()
        .map_err(|e| format!("producer settings: {e}"))?;
    consumer_config(config)
        .create_native_config()
        .map_err(|e| format!("consumer settings: {e}"))?;
    Ok(())
}

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("kafka request task failed: {e}"))?
}

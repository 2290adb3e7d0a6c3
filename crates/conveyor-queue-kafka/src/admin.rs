//! The topics: created when missing (roles race for it at start-up), verified by their
//! partitions.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::RDKafkaErrorCode;
use tokio::time::Instant;

use crate::client::{Logged, REQUEST_TIMEOUT, blocking, client_config};
use crate::inner::Inner;

/// Creates `topic` unless it exists, then waits until it shows its partitions.
///
/// Every role calls this at start-up, and in Kubernetes or compose they all start at once
/// against a fresh broker: they race to create the topic. "Already exists" means another role
/// won; any other refusal (a broker still starting, a creation still in progress) is retried
/// until `within`. Then the topic is verified, not assumed: metadata must show `partitions`
/// partitions (a topic just created can show fewer for a moment). A topic someone made with
/// another partition count is accepted, with a warning, once its count holds steady.
pub(crate) async fn ensure_topic(
    inner: &Arc<Inner>,
    topic: &str,
    partitions: i32,
    within: Duration,
) -> Result<(), String> {
    let wanted = usize::try_from(partitions).unwrap_or(0).max(1);
    let deadline = Instant::now() + within;
    // The partition count last seen and since when, to tell "still appearing" from "different".
    let mut seen: Option<(usize, Instant)> = None;
    let mut last_error = String::new();
    loop {
        match topic_partitions(inner, topic).await {
            Ok(found) if found.len() >= wanted => {
                if found.len() > wanted {
                    tracing::info!(
                        topic,
                        partitions = found.len(),
                        wanted,
                        "topic exists with more partitions; using it as it is"
                    );
                }
                return Ok(());
            }
            Ok(found) if found.is_empty() => match create_topic(inner, topic, partitions).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(topic, %error, "cannot create the topic yet; retrying");
                    last_error = error;
                }
            },
            Ok(found) => {
                // Fewer partitions than wanted: still appearing (just created, here or by a
                // racing role), or made by someone with fewer.
                let now = Instant::now();
                match seen {
                    Some((count, since)) if count == found.len() => {
                        if now.duration_since(since) >= Duration::from_secs(2) {
                            tracing::warn!(
                                topic,
                                partitions = found.len(),
                                wanted,
                                "topic has fewer partitions than KAFKA_PARTITIONS; using it as it is"
                            );
                            return Ok(());
                        }
                    }
                    _ => seen = Some((found.len(), now)),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot reach Kafka yet; retrying");
                last_error = format!("cannot reach Kafka at {}: {error}", inner.config.brokers);
            }
        }
        if Instant::now() >= deadline {
            return Err(if last_error.is_empty() {
                format!(
                    "topic '{topic}' did not appear with its partitions on {} within {within:?}",
                    inner.config.brokers
                )
            } else {
                last_error
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn create_topic(inner: &Arc<Inner>, topic: &str, partitions: i32) -> Result<(), String> {
    let admin: AdminClient<Logged> =
        AdminClient::from_config_and_context(&client_config(&inner.config), Logged)
            .map_err(|e| format!("cannot create the Kafka admin client: {e}"))?;
    let new_topic = NewTopic::new(
        topic,
        partitions,
        TopicReplication::Fixed(inner.config.replication_factor),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .map_err(|e| format!("cannot create topic '{topic}': {e}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("cannot create topic '{name}': {code}")),
        }
    }
    tracing::info!(topic, partitions, "created topic");
    Ok(())
}

/// The topic's partition ids; empty when the topic does not exist.
pub(crate) async fn topic_partitions(inner: &Arc<Inner>, topic: &str) -> Result<Vec<i32>, String> {
    let inner = Arc::clone(inner);
    let topic = topic.to_owned();
    blocking(move || {
        let metadata = inner
            .observer
            .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
            .map_err(|e| e.to_string())?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect())
    })
    .await
}

//! Split mode with the memory queue: the queue lives in the processor, so ingest "publishes" by
//! handing events to the processor's `POST /enqueue`, which answers only once its queue holds
//! them. Confirm semantics are therefore the memory queue's.

use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::{ApiError, ErrorCode, Event};
use conveyor_proto::v1;
use conveyor_queue::{Health, PublishError, Published, Publisher};
use prost::Message;

/// Publishes to a processor's `/enqueue` endpoint over a pooled HTTP connection.
pub struct EnqueueForwarder {
    client: reqwest::Client,
    enqueue_url: String,
    ready_url: String,
}

impl EnqueueForwarder {
    /// `processor_url` is the processor's base URL, e.g. `http://127.0.0.1:8082`.
    pub fn new(processor_url: &str) -> Self {
        let base = processor_url.trim_end_matches('/');
        EnqueueForwarder {
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(64)
                .build()
                .unwrap_or_default(),
            enqueue_url: format!("{base}/enqueue"),
            ready_url: format!("{base}/ready"),
        }
    }

    async fn send(
        &self,
        events: Vec<Event>,
    ) -> Result<Vec<Result<Published, PublishError>>, PublishError> {
        let count = events.len();
        let batch = v1::EventBatch {
            events: events
                .into_iter()
                .map(conveyor_proto::event_to_wire)
                .collect(),
        };
        let response = self
            .client
            .post(&self.enqueue_url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(batch.encode_to_vec())
            .send()
            .await
            .map_err(|e| PublishError::Unavailable(format!("processor unreachable: {e}")))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| PublishError::Unavailable(format!("processor answer cut off: {e}")))?;
        if !status.is_success() {
            return Err(match status.as_u16() {
                429 => PublishError::Full,
                503 => PublishError::Unavailable("the processor is not taking events".into()),
                _ => PublishError::Unavailable(format!(
                    "processor answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )),
            });
        }
        let answer = v1::IngestBatchResponse::decode(body)
            .map_err(|e| PublishError::Unavailable(format!("processor answer unreadable: {e}")))?;
        if answer.results.len() != count {
            return Err(PublishError::Unavailable(format!(
                "processor answered {} results for {count} events",
                answer.results.len()
            )));
        }
        Ok(answer
            .results
            .into_iter()
            .map(|result| match result.error {
                None => Ok(Published::Stored),
                Some(detail) => Err(match ApiError::from(detail) {
                    ApiError {
                        code: ErrorCode::QueueFull,
                        ..
                    } => PublishError::Full,
                    ApiError {
                        code: ErrorCode::ShuttingDown,
                        ..
                    } => PublishError::Closed,
                    other => PublishError::Unavailable(other.message),
                }),
            })
            .collect())
    }
}

#[async_trait]
impl Publisher for EnqueueForwarder {
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        let count = events.len();
        match self.send(events).await {
            Ok(results) => results,
            Err(error) => vec![Err(error); count],
        }
    }

    async fn health(&self) -> Health {
        match self.client.get(&self.ready_url).send().await {
            Ok(response) if response.status().is_success() => Health::Healthy,
            Ok(response) => {
                Health::Unhealthy(format!("processor not ready ({})", response.status()))
            }
            Err(e) => Health::Unhealthy(format!("processor unreachable: {e}")),
        }
    }
}

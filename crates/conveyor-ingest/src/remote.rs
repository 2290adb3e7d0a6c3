//! A split-mode gateway's intake: ingest services reached over gRPC.
//!
//! Each endpoint is one HTTP/2 channel, reused by every request (tonic multiplexes). Requests go
//! round-robin over the endpoints; a request that finds an endpoint unreachable is tried on the
//! next one, so one ingest going down costs no events.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use conveyor_api::api_error_from_grpc;
use conveyor_core::stats::IngestStats;
use conveyor_core::{ApiError, ErrorCode, EventDraft};
use conveyor_proto::v1::ingest_service_client::IngestServiceClient;
use conveyor_proto::v1::{IngestBatchRequest, IngestRequest};
use conveyor_queue::Health;
use tonic::transport::{Channel, Endpoint};

use crate::{IngestCounters, Intake};

pub struct RemoteIntake {
    endpoints: Vec<(String, IngestServiceClient<Channel>)>,
    /// What this gateway refused itself: no ingest saw these events, so none counts them.
    refusals: IngestCounters,
    next: AtomicUsize,
    /// For readiness: asks each ingest's `/ready`.
    probe: reqwest::Client,
}

impl RemoteIntake {
    /// Channels to each URL. Connection is lazy: an ingest that is not up yet is reached when
    /// it is.
    pub fn new(urls: &[String], max_message_bytes: usize) -> Result<Self, String> {
        if urls.is_empty() {
            return Err("at least one ingest URL is needed".into());
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            let endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| format!("'{url}' is not a valid URL: {e}"))?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(30))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20));
            let client = IngestServiceClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(max_message_bytes.max(4 * 1024 * 1024))
                .max_encoding_message_size(max_message_bytes);
            endpoints.push((url.clone(), client));
        }
        Ok(RemoteIntake {
            endpoints,
            refusals: IngestCounters::default(),
            next: AtomicUsize::new(0),
            probe: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        })
    }

    pub fn urls(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(|(url, _)| url.as_str())
    }
}

fn to_request(draft: EventDraft) -> IngestRequest {
    IngestRequest {
        id: draft.id.unwrap_or_default(),
        source: draft.source,
        payload: draft.payload,
        content_type: draft.content_type.as_mime().to_owned(),
        metadata: draft.metadata,
        timestamp_ms: draft.timestamp_ms.unwrap_or(0),
        headers: draft.headers,
    }
}

impl RemoteIntake {
    /// One batch to one ingest, failing over while endpoints are unreachable. `Err` when no
    /// ingest took the call (or its fate is unknown): then no ingest counted these events.
    async fn call(
        &self,
        drafts: Vec<EventDraft>,
    ) -> Result<Vec<Result<String, ApiError>>, ApiError> {
        let count = drafts.len();
        let request = IngestBatchRequest {
            events: drafts.into_iter().map(to_request).collect(),
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last_error = ApiError::unavailable("no ingest endpoint answered");
        for offset in 0..self.endpoints.len() {
            let (url, client) = &self.endpoints[(start + offset) % self.endpoints.len()];
            match client.clone().ingest_batch(request.clone()).await {
                Ok(answer) => {
                    let results = answer.into_inner().results;
                    if results.len() != count {
                        // Which of them the ingest stored is unknown: retryable (ARCHITECTURE.md,
                        // "unknown fate → 503").
                        return Err(ApiError::unavailable(format!(
                            "ingest {url} answered {} results for {count} events",
                            results.len()
                        )));
                    }
                    return Ok(results
                        .into_iter()
                        .map(|result| match result.error {
                            None => Ok(result.message_id),
                            Some(detail) => Err(detail.into()),
                        })
                        .collect());
                }
                // Only "could not reach it" moves on to the next endpoint: any other answer
                // means the ingest saw the request, and retrying elsewhere could duplicate work.
                Err(status) if status.code() == tonic::Code::Unavailable => {
                    tracing::warn!(ingest = %url, error = %status.message(), "ingest endpoint unavailable");
                    last_error = ApiError::unavailable(format!(
                        "ingest {url} is unavailable: {}",
                        status.message()
                    ));
                }
                Err(status) => {
                    tracing::warn!(ingest = %url, code = ?status.code(), error = %status.message(), "ingest call failed");
                    return Err(api_error_from_grpc(&status));
                }
            }
        }
        Err(last_error)
    }
}

#[async_trait]
impl Intake for RemoteIntake {
    async fn submit(&self, drafts: Vec<EventDraft>) -> Vec<Result<String, ApiError>> {
        let count = drafts.len();
        match self.call(drafts).await {
            Ok(results) => results,
            Err(error) => {
                self.refusals.refused(error.code, count);
                vec![Err(error); count]
            }
        }
    }

    fn count_refused(&self, code: ErrorCode, events: usize) {
        self.refusals.refused(code, events);
    }

    fn own_refusals(&self) -> IngestStats {
        self.refusals.snapshot()
    }

    /// Healthy while at least one ingest answers its `/ready`: requests fail over to it. With
    /// none, the gateway's own `/ready` turns 503 so a load balancer stops sending it work.
    async fn health(&self) -> Health {
        let answers = futures_util::future::join_all(self.urls().map(|url| {
            let request = self.probe.get(format!("{url}/ready")).send();
            async move { (url, request.await) }
        }))
        .await;
        let mut problems = Vec::new();
        for (url, answer) in answers {
            match answer {
                Ok(response) if response.status().is_success() => return Health::Healthy,
                Ok(response) => problems.push(format!("{url} not ready ({})", response.status())),
                Err(error) => problems.push(format!("{url} unreachable: {error}")),
            }
        }
        Health::Unhealthy(format!("no ingest is ready: {}", problems.join("; ")))
    }
}

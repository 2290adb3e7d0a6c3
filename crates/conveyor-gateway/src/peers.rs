//! The instances a gateway reports on: local (same process) or remote (over HTTP).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::stats::{DEFAULT_DLQ_LIST_LIMIT, DeadLetterList, ReplayRequest};
use conveyor_core::stats::{IngestStats, ProcessorStats, ReplayReport};
use conveyor_ingest::{Ingest, Intake};
use conveyor_processor::WorkerPool;
use conveyor_queue::Health;
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// What one instance says about itself.
#[derive(Debug, Clone)]
pub struct Report<T> {
    pub healthy: bool,
    /// Why it is not healthy, or why it could not be asked.
    pub error: Option<String>,
    /// `None` when the instance could not be reached.
    pub stats: Option<T>,
}

#[async_trait]
pub trait IngestPeer: Send + Sync {
    /// `local` for the in-process instance, else its URL.
    fn name(&self) -> String;
    async fn report(&self) -> Report<IngestStats>;
}

#[async_trait]
pub trait ProcessorPeer: Send + Sync {
    fn name(&self) -> String;
    async fn report(&self) -> Report<ProcessorStats>;
    async fn dead_letters(&self, limit: usize) -> Result<DeadLetterList, String>;
    async fn replay(&self, ids: Option<&[String]>) -> Result<ReplayReport, String>;
    /// The sinks' health for `/ready`'s detail, for a processor in this process (one in
    /// another process shows it on its own `/ready`).
    fn ready_detail(&self) -> Option<serde_json::Value> {
        None
    }
}

fn health_report<T>(health: Health, stats: T) -> Report<T> {
    match health {
        Health::Healthy => Report {
            healthy: true,
            error: None,
            stats: Some(stats),
        },
        Health::Unhealthy(reason) => Report {
            healthy: false,
            error: Some(reason),
            stats: Some(stats),
        },
    }
}

pub struct LocalIngest(pub Arc<Ingest>);

#[async_trait]
impl IngestPeer for LocalIngest {
    fn name(&self) -> String {
        "local".into()
    }

    async fn report(&self) -> Report<IngestStats> {
        health_report(self.0.health().await, self.0.stats())
    }
}

pub struct LocalProcessor(pub Arc<WorkerPool>);

#[async_trait]
impl ProcessorPeer for LocalProcessor {
    fn name(&self) -> String {
        "local".into()
    }

    async fn report(&self) -> Report<ProcessorStats> {
        health_report(self.0.health().await, self.0.stats().await)
    }

    async fn dead_letters(&self, limit: usize) -> Result<DeadLetterList, String> {
        let (size, letters) = self.0.dead_letters().list(limit).await;
        Ok(DeadLetterList {
            size,
            events: letters.iter().map(|l| l.view()).collect(),
        })
    }

    async fn replay(&self, ids: Option<&[String]>) -> Result<ReplayReport, String> {
        Ok(self.0.replay(ids).await)
    }

    fn ready_detail(&self) -> Option<serde_json::Value> {
        Some(self.0.routing().ready_detail())
    }
}

/// An instance in another process, asked over its HTTP API.
pub struct Remote {
    url: String,
    client: reqwest::Client,
}

impl Remote {
    pub fn new(url: &str) -> Self {
        Remote {
            url: url.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(1))
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        read_json(response).await
    }

    async fn report<T: DeserializeOwned>(&self) -> Report<T> {
        #[derive(Deserialize)]
        struct Answer<T> {
            healthy: bool,
            #[serde(default)]
            error: Option<String>,
            stats: T,
        }
        match self.get::<Answer<T>>("/stats").await {
            Ok(answer) => Report {
                healthy: answer.healthy,
                error: answer.error,
                stats: Some(answer.stats),
            },
            Err(error) => Report {
                healthy: false,
                error: Some(error),
                stats: None,
            },
        }
    }
}

async fn read_json<T: DeserializeOwned>(response: reqwest::Response) -> Result<T, String> {
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("answer cut off: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("unreadable answer: {e}"))
}

pub struct RemoteIngest(pub Remote);

#[async_trait]
impl IngestPeer for RemoteIngest {
    fn name(&self) -> String {
        self.0.url.clone()
    }

    async fn report(&self) -> Report<IngestStats> {
        self.0.report().await
    }
}

pub struct RemoteProcessor(pub Remote);

#[async_trait]
impl ProcessorPeer for RemoteProcessor {
    fn name(&self) -> String {
        self.0.url.clone()
    }

    async fn report(&self) -> Report<ProcessorStats> {
        self.0.report().await
    }

    async fn dead_letters(&self, limit: usize) -> Result<DeadLetterList, String> {
        let limit = if limit == 0 {
            DEFAULT_DLQ_LIST_LIMIT
        } else {
            limit
        };
        self.0.get(&format!("/dlq?limit={limit}")).await
    }

    async fn replay(&self, ids: Option<&[String]>) -> Result<ReplayReport, String> {
        let request = ReplayRequest {
            ids: ids.map(<[String]>::to_vec),
        };
        let response = self
            .0
            .client
            .post(format!("{}/dlq/replay", self.0.url))
            .json(&request)
            .send()
            .await
            .map_err(|e| format!("unreachable: {e}"))?;
        read_json(response).await
    }
}

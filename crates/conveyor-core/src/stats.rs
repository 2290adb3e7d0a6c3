//! Statistics snapshots each service reports on `/stats`, and the gateway sums into `totals`.
//!
//! These are plain serde types so that a gateway can read them from any instance over HTTP.

use serde::{Deserialize, Serialize};

/// What the queue reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Backend name: `memory`, `nats`, `kafka`, `composite`.
    pub backend: String,
    /// Whether events survive the process that holds them (a broker) or not (memory).
    pub durable: bool,
    /// Events waiting to be delivered (ready plus waiting out a retry delay).
    pub size: u64,
    /// Events delivered and not yet acked, nacked or terminated.
    pub in_flight: u64,
    /// Most events the queue holds at once (0 when the broker decides).
    pub capacity: u64,
    pub published: u64,
    /// Publishes discarded because their id was seen inside the dedupe window.
    pub duplicates: u64,
    pub acked: u64,
    pub nacked: u64,
    pub terminated: u64,
    /// Deliveries beyond the first.
    pub redelivered: u64,
    /// Kafka: each partition's offsets and consumer-group lag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionStats>,
    /// Composite: how each backend took the publishes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendStats>,
    /// NATS: the stream's replication state as JetStream reported it just now; absent when
    /// the stream info could not be read (no leader answered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<StreamCluster>,
    /// Kafka: this process's consumer-group member, once it joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupMemberStats>,
}

/// A replicated stream's RAFT group as JetStream reports it (`StreamInfo.cluster`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCluster {
    /// The cluster's name (absent on a single server).
    #[serde(default)]
    pub name: Option<String>,
    /// The server name of the stream's leader; `None` while it has none.
    #[serde(default)]
    pub leader: Option<String>,
    /// The other members of the group (the leader is not listed).
    #[serde(default)]
    pub replicas: Vec<ReplicaStats>,
}

/// One follower of a replicated stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStats {
    pub name: String,
    /// Up to date with the leader.
    pub current: bool,
    /// Considered offline by the group.
    pub offline: bool,
    /// Milliseconds since the leader last heard from it.
    pub active_ms: u64,
    /// Operations it is behind the leader.
    pub lag: u64,
}

/// A Kafka consumer-group member as it sees itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMemberStats {
    /// Partitions of the events topic assigned to this member now.
    pub assigned: Vec<i32>,
    /// The member holds fewer partitions than the topic has, and the others have lag that
    /// nobody consumed for twice the session timeout: the group left partitions unconsumed.
    pub stalled: bool,
    /// Stalls detected since start; each is followed by a rejoin with a fresh member.
    pub stalls: u64,
    /// Partitions rebalances took from this member since it joined the group.
    #[serde(default)]
    pub revoked: u64,
    /// Settlements that came after their partition had been revoked (since start): the new
    /// owner delivers those events again, and the seen-id window skips what was written.
    #[serde(default)]
    pub stale_settlements: u64,
}

/// One Kafka partition as the consumer group sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStats {
    pub partition: i32,
    /// The next offset the broker will assign (high watermark).
    pub high_watermark: i64,
    /// Where the group resumes: every offset below it is processed.
    pub committed: i64,
    /// Events in the partition not yet committed by the group (`high_watermark - committed`).
    pub lag: u64,
    /// Events of this partition held by this process (delivered, buffered or waiting to retry).
    pub in_flight: u64,
}

/// One backend of a composite queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStats {
    pub name: String,
    /// The backend processors consume from.
    pub primary: bool,
    pub healthy: bool,
    /// Events this backend confirmed.
    pub published: u64,
    /// Events this backend refused or failed to confirm.
    pub failed: u64,
    /// Events the primary holds and this backend does not (or, for the primary, the other way
    /// round): how far the copies have drifted apart.
    pub divergence: u64,
}

/// What an ingest instance reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestStats {
    /// Events the queue confirmed (the client got 202 / OK for them).
    pub accepted: u64,
    /// Events refused for bad input.
    pub rejected_invalid: u64,
    /// Events refused because the queue was full.
    pub rejected_full: u64,
    /// Events refused because the queue was unreachable or shutting down.
    pub rejected_unavailable: u64,
}

/// The seed's `pool` object, extended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    /// Events written to the sink and acked.
    pub processed: u64,
    /// Events a pipeline dropped (a filter, an empty transform): acked, not written.
    #[serde(default)]
    pub dropped: u64,
    /// Attempts that failed in a stage or the sink (the seed's `errors`).
    pub errors: u64,
    /// Failed attempts handed back to the queue for a later retry.
    pub retried: u64,
    /// Events moved to the dead-letter queue after their last attempt.
    pub dead_lettered: u64,
    /// Deliveries skipped because their id was already processed.
    pub duplicates: u64,
    /// Deliveries handed back for later because another worker had the same id in hand (a
    /// broker's redelivery of an event still in progress).
    #[serde(default)]
    pub deferred: u64,
    pub workers: u64,
    /// Workers busy with a batch right now.
    pub active: u64,
}

/// What a processor instance reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessorStats {
    pub queue: QueueStats,
    pub pool: PoolStats,
    /// Events held in the dead-letter queue now.
    pub dlq_size: u64,
    pub sink: String,
    /// Each pipeline's events (from the config file, or `default` for `--stage`), and
    /// `(unmatched)` for events no pipeline took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pipelines: Vec<PipelineStats>,
    /// Each named sink: what it wrote, and whether it is taking writes now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<SinkStats>,
    /// The config file the pipelines come from, when there is one, and how its reloads went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigState>,
}

/// One pipeline's events since start: taken in, and what became of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStats {
    pub name: String,
    #[serde(rename = "in")]
    pub events_in: u64,
    pub routed: u64,
    pub dropped: u64,
    pub failed: u64,
}

/// One named sink since start, and its health now. A sink is healthy while its last write
/// reached it and was answered (written, or refused for good); it is unhealthy while writes
/// fail in a way worth retrying (down, timing out, 5xx), and its events wait in the queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkStats {
    pub name: String,
    /// What it writes to, without secrets (e.g. `postgres://db:5432/app?table=events`).
    pub target: String,
    pub healthy: bool,
    /// Events confirmed written.
    pub written: u64,
    /// Events whose write failed and will be retried.
    pub retried: u64,
    /// Events the sink refused for good (sent to the DLQ).
    pub rejected: u64,
    /// Writes under way now.
    pub in_flight: u64,
    /// Since when (ms since the epoch) writes have been failing, while unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since_ms: Option<u64>,
    /// The last error the sink gave (kept after it recovered, for the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A config file in use: where it is, when it was loaded, and its reloads (SIGHUP).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    pub path: String,
    /// When the config in force was loaded, milliseconds since the Unix epoch.
    pub loaded_at: u64,
    /// Reloads that replaced the config.
    pub reloads_applied: u64,
    /// Reloads refused because the file did not load; the old config kept running.
    pub reloads_refused: u64,
    /// Why the last refused reload was refused (cleared by the next applied one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refusal: Option<String>,
}

/// The gateway's `totals`: sums over every instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub accepted: u64,
    pub processed: u64,
    /// Events a pipeline dropped (acked, not written).
    #[serde(default)]
    pub dropped: u64,
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub duplicates: u64,
    pub rejected: u64,
    /// Events in the queue or in flight right now.
    pub pending: u64,
}

/// One dead-lettered event as the DLQ API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterView {
    pub id: String,
    pub source: String,
    pub timestamp: u64,
    /// The payload as JSON (see `body::write_data`); `null` for non-UTF-8 bytes.
    pub data: serde_json::Value,
    pub metadata: std::collections::BTreeMap<String, String>,
    pub attempts: u32,
    pub error: String,
    pub failed_at: u64,
}

/// The answer to a DLQ replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// Events re-published to the queue and removed from the DLQ.
    pub replayed: u64,
    /// Events the queue refused; they stay in the DLQ.
    pub failed: u64,
    /// Requested ids not found in the DLQ.
    pub not_found: Vec<String>,
}

/// The query of `GET /dlq` and `GET /api/v1/dlq`.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub limit: Option<usize>,
}

/// How many dead letters a listing shows when the query names no limit.
pub const DEFAULT_DLQ_LIST_LIMIT: usize = 100;

/// The DLQ listing, as `GET /dlq` and the gateway's `GET /api/v1/dlq` answer it.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetterList {
    pub size: u64,
    pub events: Vec<DeadLetterView>,
}

/// The body of `POST /dlq/replay`; no body or no `ids` replays everything.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ReplayRequest {
    pub ids: Option<Vec<String>>,
}

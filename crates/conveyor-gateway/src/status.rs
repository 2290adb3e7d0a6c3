//! `GET /api/v1/status`: every instance asked at once, summed into `totals`.

use std::sync::Arc;

use conveyor_core::stats::{IngestStats, PoolStats, ProcessorStats, QueueStats, Totals};
use futures_util::future::join_all;
use serde::Serialize;

use crate::peers::{IngestPeer, ProcessorPeer, Report};

#[derive(Debug, Serialize)]
pub struct Instance {
    pub role: &'static str,
    pub url: String,
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub stats: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct RoleSummary<T> {
    pub healthy: bool,
    pub stats: T,
}

#[derive(Debug, Serialize)]
pub struct GatewaySummary {
    pub healthy: bool,
    pub ready: bool,
}

/// The whole system as the gateway sees it.
#[derive(Debug, Serialize)]
pub struct SystemStatus {
    /// `ok` when every instance and every sink is healthy, else `degraded`.
    pub status: &'static str,
    pub gateway: GatewaySummary,
    pub ingest: RoleSummary<IngestStats>,
    pub processor: RoleSummary<ProcessorStats>,
    pub instances: Vec<Instance>,
    pub totals: Totals,
}

/// `front` is what the gateway refused itself, which no ingest instance reports (see
/// `Intake::own_refusals`); it joins the ingest sums so `totals.rejected` holds every refusal.
pub async fn collect(
    ingests: &[Arc<dyn IngestPeer>],
    processors: &[Arc<dyn ProcessorPeer>],
    front: IngestStats,
    ready: bool,
) -> SystemStatus {
    let (ingest_reports, processor_reports) = tokio::join!(
        join_all(
            ingests
                .iter()
                .map(|p| async move { (p.name(), p.report().await) })
        ),
        join_all(
            processors
                .iter()
                .map(|p| async move { (p.name(), p.report().await) })
        ),
    );
    let mut instances = Vec::new();
    let ingest = RoleSummary {
        healthy: all_healthy(&ingest_reports),
        stats: sum_ingest(&ingest_reports, front),
    };
    let processor = RoleSummary {
        healthy: all_healthy(&processor_reports),
        stats: sum_processors(&processor_reports),
    };
    push_instances(&mut instances, "ingest", ingest_reports);
    push_instances(&mut instances, "processor", processor_reports);
    let totals = totals(&ingest.stats, &processor.stats);
    // A sink that cannot take writes is a degraded system even though every process is up:
    // its events are piling up in the queue.
    let sinks_healthy = processor.stats.sinks.iter().all(|s| s.healthy);
    let healthy = ingest.healthy && processor.healthy && sinks_healthy;
    SystemStatus {
        status: if healthy && ready { "ok" } else { "degraded" },
        gateway: GatewaySummary {
            healthy: true,
            ready,
        },
        ingest,
        processor,
        instances,
        totals,
    }
}

fn all_healthy<T>(reports: &[(String, Report<T>)]) -> bool {
    reports.iter().all(|(_, r)| r.healthy)
}

fn push_instances<T: Serialize>(
    instances: &mut Vec<Instance>,
    role: &'static str,
    reports: Vec<(String, Report<T>)>,
) {
    for (url, report) in reports {
        instances.push(Instance {
            role,
            url,
            healthy: report.healthy,
            error: report.error,
            stats: report
                .stats
                .and_then(|s| serde_json::to_value(s).ok())
                .unwrap_or(serde_json::Value::Null),
        });
    }
}

fn sum_ingest(reports: &[(String, Report<IngestStats>)], front: IngestStats) -> IngestStats {
    let mut sum = front;
    for stats in reports.iter().filter_map(|(_, r)| r.stats.as_ref()) {
        sum.accepted += stats.accepted;
        sum.rejected_invalid += stats.rejected_invalid;
        sum.rejected_full += stats.rejected_full;
        sum.rejected_unavailable += stats.rejected_unavailable;
    }
    sum
}

fn sum_processors(reports: &[(String, Report<ProcessorStats>)]) -> ProcessorStats {
    let all: Vec<&ProcessorStats> = reports
        .iter()
        .filter_map(|(_, r)| r.stats.as_ref())
        .collect();
    let mut pool = PoolStats::default();
    for stats in &all {
        let p = &stats.pool;
        pool.processed += p.processed;
        pool.dropped += p.dropped;
        pool.errors += p.errors;
        pool.retried += p.retried;
        pool.dead_lettered += p.dead_lettered;
        pool.duplicates += p.duplicates;
        pool.deferred += p.deferred;
        pool.workers += p.workers;
        pool.active += p.active;
    }
    ProcessorStats {
        queue: sum_queues(all.iter().map(|s| &s.queue)),
        pool,
        dlq_size: all.iter().map(|s| s.dlq_size).sum(),
        sink: all.first().map(|s| s.sink.clone()).unwrap_or_default(),
        pipelines: sum_pipelines(&all),
        sinks: sum_sinks(&all),
        config: all.iter().find_map(|s| s.config.clone()),
    }
}

/// Each pipeline's figures summed over the processors, by name, in first-seen order.
fn sum_pipelines(all: &[&ProcessorStats]) -> Vec<conveyor_core::stats::PipelineStats> {
    let mut sum: Vec<conveyor_core::stats::PipelineStats> = Vec::new();
    for pipeline in all.iter().flat_map(|s| &s.pipelines) {
        match sum.iter_mut().find(|p| p.name == pipeline.name) {
            Some(into) => {
                into.events_in += pipeline.events_in;
                into.routed += pipeline.routed;
                into.dropped += pipeline.dropped;
                into.failed += pipeline.failed;
            }
            None => sum.push(pipeline.clone()),
        }
    }
    sum
}

/// Each sink's figures summed over the processors, by name, in first-seen order: healthy
/// only while it is healthy at every processor, failing since the earliest of them.
fn sum_sinks(all: &[&ProcessorStats]) -> Vec<conveyor_core::stats::SinkStats> {
    let mut sum: Vec<conveyor_core::stats::SinkStats> = Vec::new();
    for sink in all.iter().flat_map(|s| &s.sinks) {
        match sum.iter_mut().find(|s| s.name == sink.name) {
            Some(into) => {
                into.healthy &= sink.healthy;
                into.written += sink.written;
                into.retried += sink.retried;
                into.rejected += sink.rejected;
                into.in_flight += sink.in_flight;
                into.failing_since_ms = match (into.failing_since_ms, sink.failing_since_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if sink.last_error.is_some() {
                    into.last_error.clone_from(&sink.last_error);
                }
            }
            None => sum.push(sink.clone()),
        }
    }
    sum
}

/// Memory queues are one per processor, so they add up. Processors on a broker all see the
/// same stream, so adding would count it once per processor: take the largest view instead.
fn sum_queues<'a>(queues: impl Iterator<Item = &'a QueueStats>) -> QueueStats {
    let mut sum = QueueStats::default();
    for (i, q) in queues.enumerate() {
        if i == 0 {
            sum = q.clone();
        } else if q.durable {
            sum.size = sum.size.max(q.size);
            sum.in_flight += q.in_flight;
            sum.capacity = sum.capacity.max(q.capacity);
            sum.published = sum.published.max(q.published);
            sum.duplicates = sum.duplicates.max(q.duplicates);
            sum.acked += q.acked;
            sum.nacked += q.nacked;
            sum.terminated += q.terminated;
            sum.redelivered += q.redelivered;
            merge_partitions(&mut sum.partitions, &q.partitions);
        } else {
            sum.size += q.size;
            sum.in_flight += q.in_flight;
            sum.capacity += q.capacity;
            sum.published += q.published;
            sum.duplicates += q.duplicates;
            sum.acked += q.acked;
            sum.nacked += q.nacked;
            sum.terminated += q.terminated;
            sum.redelivered += q.redelivered;
        }
    }
    sum
}

/// Kafka partitions as several group members see them: each knows its own partitions best
/// (the furthest commit), and holds its own in-flight events.
fn merge_partitions(
    into: &mut Vec<conveyor_core::stats::PartitionStats>,
    from: &[conveyor_core::stats::PartitionStats],
) {
    for partition in from {
        match into.iter_mut().find(|p| p.partition == partition.partition) {
            Some(existing) => {
                existing.high_watermark = existing.high_watermark.max(partition.high_watermark);
                existing.committed = existing.committed.max(partition.committed);
                existing.lag = (existing.high_watermark - existing.committed).max(0) as u64;
                existing.in_flight += partition.in_flight;
            }
            None => into.push(partition.clone()),
        }
    }
    into.sort_by_key(|p| p.partition);
}

fn totals(ingest: &IngestStats, processor: &ProcessorStats) -> Totals {
    Totals {
        accepted: ingest.accepted,
        processed: processor.pool.processed,
        dropped: processor.pool.dropped,
        failed: processor.pool.errors,
        retried: processor.pool.retried,
        dead_lettered: processor.pool.dead_lettered,
        duplicates: processor.pool.duplicates + processor.queue.duplicates,
        rejected: ingest.rejected_invalid + ingest.rejected_full + ingest.rejected_unavailable,
        pending: processor.queue.size + processor.queue.in_flight,
    }
}

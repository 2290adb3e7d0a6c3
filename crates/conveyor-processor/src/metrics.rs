//! The worker pool's own families: batch sizes, stage and sink timings, end-to-end latency
//! (with the trace of a recent event per bucket as exemplar), sink errors, busy time. Recorded
//! into relaxed atomics as the pool works (per-event values per batch, through
//! [`LocalHistogram`](conveyor_api::histogram::LocalHistogram)); [`register`]ed with
//! `/metrics` when a [`Processor`](crate::Processor) is made.
//!
//! The `pipeline`, `stage` and `sink` labels are names from the config file (or `default` and
//! `N-kind` for the `--stage`/`--sink` quick form), checked to be short identifiers when the
//! file is loaded, so the label values are bounded by what the operator wrote.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use conveyor_core::now_ms;
use conveyor_core::stats::SinkStats;
use conveyor_sink::SinkError;

use conveyor_api::exposition::{self, Exposition};
use conveyor_api::histogram::{BATCH_EVENTS, Histogram, Snapshot};

/// Deliveries per batch a worker fetched.
pub static FETCH_BATCH_EVENTS: Histogram = Histogram::new(BATCH_EVENTS, 1.0);
/// From the event's timestamp (acceptance) until the sink confirmed its write.
pub static END_TO_END: Histogram = Histogram::seconds();
/// Sink write calls that failed.
pub static SINK_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Time workers spent on batches (fetched, not yet settled), in microseconds.
pub static WORKER_BUSY_MICROS: AtomicU64 = AtomicU64::new(0);

/// Bucket bounds for one stage on one event, in microseconds: 1 µs to 1 s.
const STAGE_MICROS: &[u64] = &[
    1, 5, 10, 25, 50, 100, 250, 500, 1_000, 5_000, 10_000, 50_000, 100_000, 1_000_000,
];

/// One stage of one pipeline: how long it took per event, and what it did with them.
pub struct StageSeries {
    pub duration: Histogram,
    pub passed: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
}

/// One pipeline: the events it took in, and what became of them.
#[derive(Default)]
pub struct PipelineSeries {
    pub events: AtomicU64,
    pub routed: AtomicU64,
    pub dropped: AtomicU64,
    pub failed: AtomicU64,
}

/// One named sink: what became of the events written to it, its writes' timings and sizes,
/// and its health.
pub struct SinkSeries {
    /// Events it confirmed.
    pub written: AtomicU64,
    /// Events whose write failed in a way worth retrying (they went back to the queue).
    pub retried: AtomicU64,
    /// Events it refused for good (they went to the DLQ).
    pub rejected: AtomicU64,
    /// Writes under way now.
    pub in_flight: AtomicU64,
    /// One write call (a batch), until the sink answered.
    pub duration: Histogram,
    /// Events per write call.
    pub batch_events: Histogram,
    pub health: SinkHealth,
}

impl Default for SinkSeries {
    fn default() -> Self {
        SinkSeries {
            written: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            duration: Histogram::seconds(),
            batch_events: Histogram::new(BATCH_EVENTS, 1.0),
            health: SinkHealth::default(),
        }
    }
}

impl SinkSeries {
    /// The figures `/stats` shows for the sink `name` writing to `target`.
    pub fn stats(&self, name: &str, target: String) -> SinkStats {
        let load = |n: &AtomicU64| n.load(Ordering::Relaxed);
        let health = self.health.now();
        SinkStats {
            name: name.to_owned(),
            target,
            healthy: health.failing_since_ms.is_none(),
            written: load(&self.written),
            retried: load(&self.retried),
            rejected: load(&self.rejected),
            in_flight: load(&self.in_flight),
            failing_since_ms: health.failing_since_ms,
            last_error: health.last_error,
        }
    }
}

/// Whether a sink takes writes: unhealthy from its first retryable failure until a write is
/// answered again. The transitions are logged once each, not every failed write.
#[derive(Default)]
pub struct SinkHealth {
    state: Mutex<HealthState>,
}

#[derive(Default, Clone)]
pub struct HealthState {
    pub failing_since_ms: Option<u64>,
    pub last_error: Option<String>,
    pub failed_writes: u64,
}

impl SinkHealth {
    fn state(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A write reached the sink and was answered (written, or refused for good).
    pub fn answered(&self, sink: &str) {
        let mut state = self.state();
        if let Some(since) = state.failing_since_ms.take() {
            tracing::info!(
                sink,
                failed_writes = state.failed_writes,
                down_for_ms = now_ms().saturating_sub(since),
                "sink is taking writes again"
            );
            state.failed_writes = 0;
        }
    }

    /// A write failed in a way worth retrying; its `events` go back to the queue.
    pub fn failed(&self, sink: &str, error: &SinkError, events: u64) {
        let mut state = self.state();
        state.failed_writes += 1;
        state.last_error = Some(error.to_string());
        if state.failing_since_ms.is_none() {
            state.failing_since_ms = Some(now_ms());
            tracing::warn!(sink, %error, events, "sink write failed; its events wait in the queue and are retried until written");
        } else {
            tracing::debug!(sink, %error, events, "sink write failed again");
        }
    }

    pub fn now(&self) -> HealthState {
        self.state().clone()
    }
}

/// The `pipeline` label of events no pipeline matched (config names cannot contain
/// parentheses, so it cannot clash with one).
pub const UNMATCHED: &str = "(unmatched)";

type Registry<K, T> = RwLock<Vec<(K, &'static T)>>;

static STAGES: Registry<(String, String), StageSeries> = RwLock::new(Vec::new());
static PIPELINES: Registry<String, PipelineSeries> = RwLock::new(Vec::new());
static SINKS: Registry<String, SinkSeries> = RwLock::new(Vec::new());

/// The series of `key` in `registry`, made the first time it is asked for. Looked up when a
/// config is loaded, not per event; a series lives as long as the process, so the label
/// values are bounded by the names the config files this process loaded gave.
fn series<K: PartialEq + Clone, T>(
    registry: &Registry<K, T>,
    key: &K,
    make: impl FnOnce() -> T,
) -> &'static T {
    let find = |list: &[(K, &'static T)]| list.iter().find(|(k, _)| k == key).map(|(_, s)| *s);
    if let Some(found) = find(&registry.read().unwrap_or_else(|p| p.into_inner())) {
        return found;
    }
    let mut list = registry.write().unwrap_or_else(|p| p.into_inner());
    if let Some(found) = find(&list) {
        return found;
    }
    let made: &'static T = Box::leak(Box::new(make()));
    list.push((key.clone(), made));
    made
}

pub fn stage_series(pipeline: &str, stage: &str) -> &'static StageSeries {
    series(&STAGES, &(pipeline.to_owned(), stage.to_owned()), || {
        StageSeries {
            duration: Histogram::new(STAGE_MICROS, 1e6),
            passed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    })
}

pub fn pipeline_series(pipeline: &str) -> &'static PipelineSeries {
    series(&PIPELINES, &pipeline.to_owned(), PipelineSeries::default)
}

pub fn sink_series(sink: &str) -> &'static SinkSeries {
    series(&SINKS, &sink.to_owned(), SinkSeries::default)
}

fn snapshot<K: Clone + Ord, T>(registry: &Registry<K, T>) -> Vec<(K, &'static T)> {
    let mut list = registry.read().unwrap_or_else(|p| p.into_inner()).clone();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    list
}

/// This process runs a worker pool: its families join `/metrics`.
pub fn register() {
    REGISTERED.store(true, Ordering::Relaxed);
    exposition::register("processor", render);
}

/// Whether a worker pool was made in this process.
static REGISTERED: AtomicBool = AtomicBool::new(false);

/// The end-to-end latency histogram, when this process runs a worker pool (for the live
/// dashboard).
pub fn end_to_end_here() -> Option<Snapshot> {
    REGISTERED
        .load(Ordering::Relaxed)
        .then(|| END_TO_END.snapshot())
}

fn stage_labels(pipeline: &str, stage: &str) -> Vec<(&'static str, String)> {
    vec![
        ("pipeline", pipeline.to_owned()),
        ("stage", stage.to_owned()),
    ]
}

fn render(out: &mut Exposition) {
    let plain = |h: &Histogram| vec![(Vec::new(), h.value())];
    out.histograms(
        "conveyor_fetch_batch_events",
        "Deliveries per batch a worker fetched from the queue.",
        plain(&FETCH_BATCH_EVENTS),
    );
    let stages = snapshot(&STAGES);
    out.histograms(
        "conveyor_stage_duration_seconds",
        "Time one pipeline stage took on one event.",
        stages
            .iter()
            .map(|((pipeline, stage), s)| (stage_labels(pipeline, stage), s.duration.value()))
            .collect(),
    );
    out.counters(
        "conveyor_stage_events_total",
        "Events a pipeline stage passed on, dropped or failed.",
        stages
            .iter()
            .flat_map(|((pipeline, stage), s)| {
                [
                    ("passed", &s.passed),
                    ("dropped", &s.dropped),
                    ("failed", &s.failed),
                ]
                .map(|(result, n)| {
                    let mut labels = stage_labels(pipeline, stage);
                    labels.push(("result", result.to_owned()));
                    (labels, n.load(Ordering::Relaxed))
                })
            })
            .collect(),
    );
    out.counters(
        "conveyor_pipeline_events_total",
        "Events a pipeline took in (result=in) and what became of them: routed to sinks, dropped or failed.",
        snapshot(&PIPELINES)
            .iter()
            .flat_map(|(pipeline, s)| {
                [
                    ("in", &s.events),
                    ("routed", &s.routed),
                    ("dropped", &s.dropped),
                    ("failed", &s.failed),
                ]
                .map(|(result, n)| {
                    (
                        vec![("pipeline", pipeline.clone()), ("result", result.to_owned())],
                        n.load(Ordering::Relaxed),
                    )
                })
            })
            .collect(),
    );
    let sinks = snapshot(&SINKS);
    let by_sink = |sink: &String| vec![("sink", sink.clone())];
    out.counters(
        "conveyor_sink_events_total",
        "Events routed to a named sink: written (confirmed), retried (the write failed; back to the queue) or rejected (refused for good; to the DLQ).",
        sinks
            .iter()
            .flat_map(|(sink, s)| {
                [
                    ("written", &s.written),
                    ("retried", &s.retried),
                    ("rejected", &s.rejected),
                ]
                .map(|(result, n)| {
                    (
                        vec![("sink", sink.clone()), ("result", result.to_owned())],
                        n.load(Ordering::Relaxed),
                    )
                })
            })
            .collect(),
    );
    out.gauges(
        "conveyor_sink_healthy",
        "1 while the sink takes writes, 0 while its writes fail and its events wait in the queue.",
        sinks
            .iter()
            .map(|(sink, s)| {
                (
                    by_sink(sink),
                    i64::from(s.health.now().failing_since_ms.is_none()),
                )
            })
            .collect(),
    );
    out.gauges(
        "conveyor_sink_in_flight_writes",
        "Sink writes under way now.",
        sinks
            .iter()
            .map(|(sink, s)| {
                let n = s.in_flight.load(Ordering::Relaxed);
                (by_sink(sink), i64::try_from(n).unwrap_or(i64::MAX))
            })
            .collect(),
    );
    out.histograms(
        "conveyor_sink_write_duration_seconds",
        "Time one sink write (a batch) took until the sink answered.",
        sinks
            .iter()
            .map(|(sink, s)| (by_sink(sink), s.duration.value()))
            .collect(),
    );
    out.histograms(
        "conveyor_sink_batch_events",
        "Events per sink write.",
        sinks
            .iter()
            .map(|(sink, s)| (by_sink(sink), s.batch_events.value()))
            .collect(),
    );
    out.histograms(
        "conveyor_end_to_end_latency_seconds",
        "From the event's acceptance timestamp until the sink confirmed its write.",
        plain(&END_TO_END),
    );
    out.counter(
        "conveyor_sink_errors_total",
        "Sink writes that failed, for any reason and at any sink.",
        SINK_ERRORS.load(Ordering::Relaxed),
    );
    out.counter_f64(
        "conveyor_worker_busy_seconds_total",
        "Time workers spent on batches; its rate over the pool size is the utilisation.",
        WORKER_BUSY_MICROS.load(Ordering::Relaxed) as f64 / 1e6,
    );
}

#[cfg(test)]
mod tests {
    use conveyor_api::exposition::Format;

    use super::*;

    /// The families keep their names and types; the per-pipeline ones are labelled by the
    /// config's names.
    #[test]
    fn the_pool_families_keep_their_names_types_and_labels() {
        stage_series("default", "1-json").duration.record(3);
        assert!(std::ptr::eq(
            stage_series("default", "1-json"),
            stage_series("default", "1-json")
        ));
        pipeline_series("default");
        sink_series("default");
        let mut out = Exposition::new();
        render(&mut out);
        let text = out.encode(Format::Prometheus);
        let types: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .collect();
        assert_eq!(
            types,
            [
                "conveyor_fetch_batch_events histogram",
                "conveyor_stage_duration_seconds histogram",
                "conveyor_stage_events_total counter",
                "conveyor_pipeline_events_total counter",
                "conveyor_sink_events_total counter",
                "conveyor_sink_healthy gauge",
                "conveyor_sink_in_flight_writes gauge",
                "conveyor_sink_write_duration_seconds histogram",
                "conveyor_sink_batch_events histogram",
                "conveyor_end_to_end_latency_seconds histogram",
                "conveyor_sink_errors_total counter",
                "conveyor_worker_busy_seconds_total counter",
            ]
        );
        assert!(
            text.contains(
                "conveyor_stage_duration_seconds_count{pipeline=\"default\",stage=\"1-json\"} 1\n"
            ),
            "{text}"
        );
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('{'))
        {
            let labels = &line[line.find('{').unwrap_or_default()..];
            assert!(
                ["{le=", "{pipeline=", "{sink="]
                    .iter()
                    .any(|l| labels.starts_with(l)),
                "only pipeline, stage, sink, result and le labels: {line}"
            );
        }
    }
}

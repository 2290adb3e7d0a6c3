//! The worker pool's own families: batch sizes, stage and sink timings, end-to-end latency
//! (with the trace of a recent event per bucket as exemplar), sink errors, busy time. Recorded
//! into relaxed atomics as the pool works (per-event values per batch, through
//! [`LocalHistogram`](conveyor_api::histogram::LocalHistogram)); [`register`]ed with
//! `/metrics` when a [`Processor`](crate::Processor) is made.
//!
//! The `stage` label of `conveyor_stage_duration_seconds` is [`Stage::kind`](crate::pipeline::Stage::kind):
//! a `&'static str` from code, so the label values are bounded by the stage kinds compiled in.

use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use conveyor_api::exposition::{self, Exposition};
use conveyor_api::histogram::{BATCH_EVENTS, Histogram, Snapshot};

/// Deliveries per batch a worker fetched.
pub static FETCH_BATCH_EVENTS: Histogram = Histogram::new(BATCH_EVENTS, 1.0);
/// One sink write call (a batch), until the sink confirmed it.
pub static SINK_WRITE_DURATION: Histogram = Histogram::seconds();
/// Events per sink write call.
pub static SINK_BATCH_EVENTS: Histogram = Histogram::new(BATCH_EVENTS, 1.0);
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

/// One duration histogram per stage kind, made the first time a pipeline has that kind.
static STAGE_DURATION: RwLock<Vec<(&'static str, &'static Histogram)>> = RwLock::new(Vec::new());

/// The duration histogram of stages of `kind`. Looked up when a pipeline is built, not per
/// event; a kind's histogram lives as long as the process (kinds are few and fixed in code).
pub fn stage_histogram(kind: &'static str) -> &'static Histogram {
    let find = |list: &[(&'static str, &'static Histogram)]| {
        list.iter().find(|(k, _)| *k == kind).map(|(_, h)| *h)
    };
    if let Some(h) = find(&STAGE_DURATION.read().unwrap_or_else(|p| p.into_inner())) {
        return h;
    }
    let mut list = STAGE_DURATION.write().unwrap_or_else(|p| p.into_inner());
    if let Some(h) = find(&list) {
        return h;
    }
    let h: &'static Histogram = Box::leak(Box::new(Histogram::new(STAGE_MICROS, 1e6)));
    list.push((kind, h));
    h
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

fn render(out: &mut Exposition) {
    let plain = |h: &Histogram| vec![(Vec::new(), h.value())];
    out.histograms(
        "conveyor_fetch_batch_events",
        "Deliveries per batch a worker fetched from the queue.",
        plain(&FETCH_BATCH_EVENTS),
    );
    let mut stages = STAGE_DURATION
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    stages.sort_by_key(|(kind, _)| *kind);
    out.histograms(
        "conveyor_stage_duration_seconds",
        "Time one pipeline stage took on one event, by stage kind.",
        stages
            .iter()
            .map(|(kind, h)| (vec![("stage", (*kind).to_owned())], h.value()))
            .collect(),
    );
    out.histograms(
        "conveyor_sink_write_duration_seconds",
        "Time one sink write (a batch) took until the sink confirmed it.",
        plain(&SINK_WRITE_DURATION),
    );
    out.histograms(
        "conveyor_sink_batch_events",
        "Events per sink write.",
        plain(&SINK_BATCH_EVENTS),
    );
    out.histograms(
        "conveyor_end_to_end_latency_seconds",
        "From the event's acceptance timestamp until the sink confirmed its write.",
        plain(&END_TO_END),
    );
    out.counter(
        "conveyor_sink_errors_total",
        "Sink writes that failed (their events are retried).",
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

    /// The families as the hand-written renderer wrote them before prometheus-client, with
    /// the `stage` label from the stage kinds in use.
    #[test]
    fn the_pool_families_keep_their_names_types_and_labels() {
        stage_histogram("json").record(3);
        assert!(std::ptr::eq(
            stage_histogram("json"),
            stage_histogram("json")
        ));
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
                "conveyor_sink_write_duration_seconds histogram",
                "conveyor_sink_batch_events histogram",
                "conveyor_end_to_end_latency_seconds histogram",
                "conveyor_sink_errors_total counter",
                "conveyor_worker_busy_seconds_total counter",
            ]
        );
        assert!(
            text.contains("conveyor_stage_duration_seconds_count{stage=\"json\"} 1\n"),
            "{text}"
        );
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && l.contains('{'))
        {
            let labels = &line[line.find('{').unwrap_or_default()..];
            assert!(
                labels.starts_with("{le=") || labels.starts_with("{stage="),
                "only stage and le labels: {line}"
            );
        }
    }
}

//! What a process records as it works, beyond the counters its `/stats` already holds: latency
//! and size histograms, error answers by code, events by door. Process-wide statics, so the
//! ingest, the pool and the edges record without being handed a registry, and each process
//! (one role, or all of them under `conveyor run`) exposes what it itself did.
//!
//! Families that belong to a role are rendered only in a process that runs that role
//! ([`mark_ingest`], [`mark_processor`]), so a split-mode gateway does not show empty sink
//! histograms.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use conveyor_core::ErrorCode;

use crate::exposition::Exposition;
use crate::histogram::{BATCH_EVENTS, Histogram, PAYLOAD_BYTES};

/// Time from handing a batch to the queue until it confirmed (or refused) every event.
pub static PUBLISH_DURATION: Histogram = Histogram::seconds();
/// Events per publish call.
pub static PUBLISH_BATCH_EVENTS: Histogram = Histogram::new(BATCH_EVENTS, 1.0);
/// Payload size of each valid event taken in.
pub static PAYLOAD_SIZE: Histogram = Histogram::new(PAYLOAD_BYTES, 1.0);

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

/// Stage kinds, the `stage` label of [`stage_histogram`]; `other` for stages built in code.
pub const STAGE_KINDS: [&str; 6] = ["json", "require", "set-metadata", "fail-if", "cpu", "other"];
static STAGE_DURATION: [Histogram; STAGE_KINDS.len()] =
    [const { Histogram::new(STAGE_MICROS, 1e6) }; STAGE_KINDS.len()];

/// The duration histogram of one stage kind (`other` for an unknown name).
pub fn stage_histogram(kind: &str) -> &'static Histogram {
    let slot = STAGE_KINDS
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(STAGE_KINDS.len() - 1);
    &STAGE_DURATION[slot]
}

/// Where events came in: the `door` label of `conveyor_events_received_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    HttpSingle,
    HttpBatch,
    GrpcUnary,
    GrpcStream,
    GrpcBatch,
    GrpcPublish,
    /// The processor's `POST /enqueue` (split mode, memory queue).
    Enqueue,
}

const DOORS: [(Door, &str); 7] = [
    (Door::HttpSingle, "http_single"),
    (Door::HttpBatch, "http_batch"),
    (Door::GrpcUnary, "grpc_unary"),
    (Door::GrpcStream, "grpc_stream"),
    (Door::GrpcBatch, "grpc_batch"),
    (Door::GrpcPublish, "grpc_publish"),
    (Door::Enqueue, "enqueue"),
];
static RECEIVED: [AtomicU64; DOORS.len()] = [const { AtomicU64::new(0) }; DOORS.len()];

/// Counts `events` that arrived through `door` (well-formed or not, before validation).
pub fn received(door: Door, events: usize) {
    RECEIVED[door as usize].fetch_add(events as u64, Ordering::Relaxed);
}

static ERROR_ANSWERS: [AtomicU64; ErrorCode::ALL.len()] =
    [const { AtomicU64::new(0) }; ErrorCode::ALL.len()];

/// Counts one request answered with `code` (HTTP error response or gRPC error status).
pub fn error_answer(code: ErrorCode) {
    if let Some(slot) = ErrorCode::ALL.iter().position(|c| *c == code) {
        ERROR_ANSWERS[slot].fetch_add(1, Ordering::Relaxed);
    }
}

static INGEST_HERE: AtomicBool = AtomicBool::new(false);
static PROCESSOR_HERE: AtomicBool = AtomicBool::new(false);

/// This process validates and publishes events: render the ingest families.
pub fn mark_ingest() {
    INGEST_HERE.store(true, Ordering::Relaxed);
}

/// This process runs a worker pool: render the processor families.
pub fn mark_processor() {
    PROCESSOR_HERE.store(true, Ordering::Relaxed);
}

/// The end-to-end latency histogram, when this process runs a worker pool.
pub fn end_to_end_here() -> Option<crate::histogram::Snapshot> {
    PROCESSOR_HERE
        .load(Ordering::Relaxed)
        .then(|| END_TO_END.snapshot())
}

/// The ingest role's recorded families (nothing unless this process runs an ingest).
pub fn render_ingest(out: &mut Exposition) {
    if !INGEST_HERE.load(Ordering::Relaxed) {
        return;
    }
    for (name, help, histogram) in [
        (
            "conveyor_publish_duration_seconds",
            "Time from handing a batch to the queue until it confirmed every event in it.",
            &PUBLISH_DURATION,
        ),
        (
            "conveyor_publish_batch_events",
            "Events per publish call to the queue.",
            &PUBLISH_BATCH_EVENTS,
        ),
        (
            "conveyor_event_payload_bytes",
            "Payload size of each valid event taken in.",
            &PAYLOAD_SIZE,
        ),
    ] {
        out.histograms(name, help, vec![(Vec::new(), histogram.value())]);
    }
}

/// The processor role's recorded families (nothing unless this process runs a worker pool).
pub fn render_processor(out: &mut Exposition) {
    if !PROCESSOR_HERE.load(Ordering::Relaxed) {
        return;
    }
    let plain = |h: &Histogram| vec![(Vec::new(), h.value())];
    out.histograms(
        "conveyor_fetch_batch_events",
        "Deliveries per batch a worker fetched from the queue.",
        plain(&FETCH_BATCH_EVENTS),
    );
    out.histograms(
        "conveyor_stage_duration_seconds",
        "Time one pipeline stage took on one event, by stage kind.",
        STAGE_KINDS
            .iter()
            .zip(&STAGE_DURATION)
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

/// Families every process has: events by door, error answers by code, the span exporter's
/// counters.
pub fn render_edges(out: &mut Exposition) {
    out.counters(
        "conveyor_events_received_total",
        "Events that arrived at this process, by door (before validation).",
        DOORS
            .iter()
            .zip(&RECEIVED)
            .map(|((_, door), n)| {
                (
                    vec![("door", (*door).to_owned())],
                    n.load(Ordering::Relaxed),
                )
            })
            .collect(),
    );
    out.counters(
        "conveyor_error_answers_total",
        "Requests answered with an error, by error code (HTTP and gRPC).",
        ErrorCode::ALL
            .iter()
            .zip(&ERROR_ANSWERS)
            .map(|(code, n)| {
                (
                    vec![("code", code.as_str().to_owned())],
                    n.load(Ordering::Relaxed),
                )
            })
            .collect(),
    );
    for (name, help, counter) in [
        (
            "conveyor_trace_spans_exported_total",
            "Trace spans the OTLP collector accepted.",
            &crate::trace::SPANS_EXPORTED,
        ),
        (
            "conveyor_trace_spans_dropped_total",
            "Trace spans dropped because the export buffer was full.",
            &crate::trace::SPANS_DROPPED,
        ),
        (
            "conveyor_trace_spans_export_failed_total",
            "Trace spans lost because an OTLP export request failed.",
            &crate::trace::SPANS_EXPORT_FAILED,
        ),
    ] {
        out.counter(name, help, counter.load(Ordering::Relaxed));
    }
}

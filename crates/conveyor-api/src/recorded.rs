//! What every edge records as it works, beyond the counters its `/stats` already holds: error
//! answers by code, events by door, the span exporter's counters. Process-wide statics, so the
//! doors record without being handed a registry.
//!
//! A role's own families (the ingest's publish histograms, the pool's latency and sink
//! histograms) live in that role's crate (`metrics.rs`), which registers them
//! ([`crate::exposition::register`]) when it starts working in this process.

use std::sync::atomic::{AtomicU64, Ordering};

use conveyor_core::ErrorCode;

use crate::exposition::Exposition;

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

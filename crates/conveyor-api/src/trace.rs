//! Span recording for the OTLP export: off (and free) unless [`install`] was called.
//!
//! Finished spans go into one bounded, process-wide buffer; the exporter (the binary's
//! `otlp` module) takes them out in batches. A full buffer drops the span and counts it: the
//! hot path never waits for the exporter. Spans are recorded per request (door), per
//! trace parent per publish batch (ingest) and per event (processor), and only while enabled.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use conveyor_core::{Event, TRACEPARENT, TraceContext};

/// A finished span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: &'static str,
    pub start_ns: u64,
    pub end_ns: u64,
    /// `Some(message)` for a span that failed.
    pub error: Option<String>,
    /// Integer attributes (e.g. `conveyor.events`).
    pub attributes: Vec<(&'static str, i64)>,
    /// String attributes (e.g. `conveyor.event_id`).
    pub string_attributes: Vec<(&'static str, String)>,
}

struct Recorder {
    spans: Mutex<Vec<SpanRecord>>,
    capacity: usize,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

/// Spans dropped because the buffer was full.
pub static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans the collector accepted.
pub static SPANS_EXPORTED: AtomicU64 = AtomicU64::new(0);
/// Spans lost because an export request failed.
pub static SPANS_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);

/// Turns recording on, with room for `capacity` finished spans between two exports.
pub fn install(capacity: usize) {
    let _ = RECORDER.set(Recorder {
        spans: Mutex::new(Vec::with_capacity(capacity.min(4096))),
        capacity,
    });
}

/// Whether spans are recorded (an OTLP endpoint is configured).
#[inline]
pub fn enabled() -> bool {
    RECORDER.get().is_some()
}

/// Records finished spans; drops (and counts) what does not fit.
pub fn record(spans: impl IntoIterator<Item = SpanRecord>) {
    let Some(recorder) = RECORDER.get() else {
        return;
    };
    // Built before taking the lock, which is then held only to move them in.
    let mut spans: Vec<SpanRecord> = spans.into_iter().collect();
    if spans.is_empty() {
        return;
    }
    let mut buffer = recorder.spans.lock().unwrap_or_else(|p| p.into_inner());
    let room = recorder.capacity.saturating_sub(buffer.len());
    let dropped = spans.len().saturating_sub(room) as u64;
    spans.truncate(room);
    buffer.append(&mut spans);
    drop(buffer);
    if dropped > 0 {
        SPANS_DROPPED.fetch_add(dropped, Ordering::Relaxed);
    }
}

/// Takes every span recorded so far (the exporter's side).
pub fn take() -> Vec<SpanRecord> {
    match RECORDER.get() {
        Some(recorder) => {
            std::mem::take(&mut *recorder.spans.lock().unwrap_or_else(|p| p.into_inner()))
        }
        None => Vec::new(),
    }
}

/// The exporter's counters (zero while no OTLP endpoint is configured).
pub fn render(out: &mut String) {
    for (name, help, counter) in [
        (
            "conveyor_trace_spans_exported_total",
            "Trace spans the OTLP collector accepted.",
            &SPANS_EXPORTED,
        ),
        (
            "conveyor_trace_spans_dropped_total",
            "Trace spans dropped because the export buffer was full.",
            &SPANS_DROPPED,
        ),
        (
            "conveyor_trace_spans_export_failed_total",
            "Trace spans lost because an OTLP export request failed.",
            &SPANS_EXPORT_FAILED,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            counter.load(Ordering::Relaxed)
        );
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A span that has started: its own context (what children name as parent) and its parent.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    pub context: TraceContext,
    pub parent_span_id: Option<[u8; 8]>,
    pub start_ns: u64,
}

impl Started {
    /// A span child of `parent`, or the root of a new trace.
    pub fn child_of(parent: Option<&TraceContext>) -> Started {
        let (context, parent_span_id) = match parent {
            Some(parent) => (parent.child(), Some(parent.span_id)),
            None => (TraceContext::new_root(), None),
        };
        Started {
            context,
            parent_span_id,
            start_ns: now_ns(),
        }
    }

    /// The finished span, ended now.
    pub fn finish(&self, name: &'static str, error: Option<String>) -> SpanRecord {
        SpanRecord {
            trace_id: self.context.trace_id,
            span_id: self.context.span_id,
            parent_span_id: self.parent_span_id,
            name,
            start_ns: self.start_ns,
            end_ns: now_ns(),
            error,
            attributes: Vec::new(),
            string_attributes: Vec::new(),
        }
    }
}

/// What a door does with a request's `traceparent`: with recording on, a span for the request
/// (child of the caller's context, or a new trace) whose context the events carry on; with it
/// off, the caller's valid context passed on unchanged (nothing recorded, nothing created).
#[derive(Debug, Default)]
pub struct DoorTrace {
    /// The `traceparent` to put on every event of the request.
    pub header: Option<String>,
    span: Option<Started>,
}

impl DoorTrace {
    pub fn begin(incoming: Option<&str>) -> DoorTrace {
        let parent = incoming.and_then(TraceContext::parse);
        if enabled() {
            let span = Started::child_of(parent.as_ref());
            DoorTrace {
                header: Some(span.context.header()),
                span: Some(span),
            }
        } else {
            DoorTrace {
                header: parent.map(|p| p.header()),
                span: None,
            }
        }
    }

    /// Records the door's span (when recording), with how many events it carried.
    pub fn finish(self, name: &'static str, events: usize, error: Option<String>) {
        if let Some(span) = self.span {
            let mut finished = span.finish(name, error);
            finished
                .attributes
                .push(("conveyor.events", i64::try_from(events).unwrap_or(i64::MAX)));
            record([finished]);
        }
    }
}

/// The trace context an event carries, if any.
pub fn event_context(event: &Event) -> Option<TraceContext> {
    event
        .headers
        .get(TRACEPARENT)
        .and_then(|value| TraceContext::parse(value))
}

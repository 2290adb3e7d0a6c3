//! Span recording for the OTLP export: off (and free) unless [`install`] was called.
//!
//! Finished spans go into one bounded, process-wide buffer; the exporter (the binary's
//! `otlp` module, on the OpenTelemetry SDK's OTLP exporter) takes them out in batches. A full
//! buffer drops the span and counts it: the hot path never waits for the exporter. Spans are
//! recorded per request (door), per trace parent per publish batch (ingest) and per event
//! (processor), and only while enabled.
//!
//! Sampling is decided once, where a trace enters conveyor ([`enter`]: a door, or ingest for
//! an event without a context), by the installed [`EntrySampler`] (the SDK's sampler from
//! `OTEL_TRACES_SAMPLER`, parent-based by default, so an incoming `sampled=0` is honoured).
//! The decision travels in the context's `sampled` flag; the hops after it record a span only
//! for a sampled parent, which costs no sampler call per event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use conveyor_core::trace::valid_tracestate;
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
    /// The caller's `tracestate` (door spans only).
    pub trace_state: Option<String>,
}

/// Whether a trace entering conveyor is recorded: called with the incoming parent context
/// (if any) and the trace id the entry span would have.
pub type EntrySampler = Box<dyn Fn(Option<&TraceContext>, &[u8; 16]) -> bool + Send + Sync>;

struct Recorder {
    spans: Mutex<Vec<SpanRecord>>,
    capacity: usize,
    sampler: EntrySampler,
}

static RECORDER: OnceLock<Recorder> = OnceLock::new();

/// Spans dropped because the buffer was full.
pub static SPANS_DROPPED: AtomicU64 = AtomicU64::new(0);
/// Spans the collector accepted.
pub static SPANS_EXPORTED: AtomicU64 = AtomicU64::new(0);
/// Spans lost because an export request failed.
pub static SPANS_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);

/// Turns recording on, with room for `capacity` finished spans between two exports, and
/// `sampler` deciding at the entry of each trace.
pub fn install(capacity: usize, sampler: EntrySampler) {
    let _ = RECORDER.set(Recorder {
        spans: Mutex::new(Vec::with_capacity(capacity.min(4096))),
        capacity,
        sampler,
    });
}

/// What [`enter`] decided for a trace entering conveyor.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    /// Recording is off: nothing decided, nothing created.
    Off,
    /// Sampled: a span to record, whose (sampled) context the work carries on.
    Recorded(Started),
    /// Not sampled: the context to carry on (flag `sampled` clear), so the next hops record
    /// nothing either; the caller's span stays the parent.
    Unsampled(TraceContext),
}

/// The sampling decision for a trace entering conveyor with `parent` (a caller's context) or
/// without one (a new trace).
pub fn enter(parent: Option<&TraceContext>) -> Entry {
    let Some(recorder) = RECORDER.get() else {
        return Entry::Off;
    };
    let context = match parent {
        Some(parent) => parent.child(),
        None => TraceContext::new_root(),
    };
    if (recorder.sampler)(parent, &context.trace_id) {
        Entry::Recorded(Started {
            context: context.with_sampled(true),
            parent_span_id: parent.map(|p| p.span_id),
            start_ns: now_ns(),
        })
    } else {
        Entry::Unsampled(parent.copied().unwrap_or(context).with_sampled(false))
    }
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
            trace_state: None,
        }
    }
}

/// What a door does with a request's `traceparent` and `tracestate`: with recording on, the
/// sampler's decision ([`enter`]): a span for the request (child of the caller's context, or
/// a new trace) whose context the events carry on, or an unsampled context and no span; with
/// it off, the caller's valid context passed on unchanged (nothing recorded, nothing created).
/// A valid `tracestate` goes on with a valid `traceparent`, unchanged.
#[derive(Debug, Default)]
pub struct DoorTrace {
    /// The `traceparent` to put on every event of the request.
    pub header: Option<String>,
    /// The `tracestate` to put next to it.
    pub state: Option<String>,
    span: Option<Started>,
}

impl DoorTrace {
    pub fn begin(traceparent: Option<&str>, tracestate: Option<&str>) -> DoorTrace {
        let parent = traceparent.and_then(TraceContext::parse);
        let state = parent
            .and(tracestate.and_then(valid_tracestate))
            .map(str::to_owned);
        let (header, span) = match enter(parent.as_ref()) {
            Entry::Off => (parent.map(|p| p.header()), None),
            Entry::Recorded(span) => (Some(span.context.header()), Some(span)),
            Entry::Unsampled(context) => (Some(context.header()), None),
        };
        DoorTrace {
            state: state.filter(|_| header.is_some()),
            header,
            span,
        }
    }

    /// Puts the request's context on an event's headers (`overwrite`: replacing what the
    /// event carries; otherwise only where it carries no `traceparent`).
    pub fn apply<M>(&self, headers: &mut M, overwrite: bool)
    where
        M: HeaderMap,
    {
        let Some(header) = &self.header else {
            return;
        };
        if !overwrite && headers.has(TRACEPARENT) {
            return;
        }
        headers.put(TRACEPARENT, header.clone());
        if let Some(state) = &self.state {
            headers.put(conveyor_core::TRACESTATE, state.clone());
        }
    }

    /// Records the door's span (when recording), with how many events it carried.
    pub fn finish(self, name: &'static str, events: usize, error: Option<String>) {
        if let Some(span) = self.span {
            let mut finished = span.finish(name, error);
            finished
                .attributes
                .push(("conveyor.events", i64::try_from(events).unwrap_or(i64::MAX)));
            finished.trace_state = self.state;
            record([finished]);
        }
    }
}

/// The header maps a door puts a context on (an event draft's, a gRPC request's).
pub trait HeaderMap {
    fn has(&self, key: &str) -> bool;
    fn put(&mut self, key: &str, value: String);
}

impl HeaderMap for std::collections::BTreeMap<String, String> {
    fn has(&self, key: &str) -> bool {
        self.contains_key(key)
    }
    fn put(&mut self, key: &str, value: String) {
        self.insert(key.to_owned(), value);
    }
}

impl HeaderMap for std::collections::HashMap<String, String> {
    fn has(&self, key: &str) -> bool {
        self.contains_key(key)
    }
    fn put(&mut self, key: &str, value: String) {
        self.insert(key.to_owned(), value);
    }
}

/// The trace context an event carries, if any.
pub fn event_context(event: &Event) -> Option<TraceContext> {
    event
        .headers
        .get(TRACEPARENT)
        .and_then(|value| TraceContext::parse(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const SAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const UNSAMPLED: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";

    fn door(traceparent: &str, tracestate: Option<&str>) -> (DoorTrace, BTreeMap<String, String>) {
        let trace = DoorTrace::begin(Some(traceparent), tracestate);
        let mut headers = BTreeMap::new();
        trace.apply(&mut headers, true);
        (trace, headers)
    }

    /// One test, because recording is switched on once per process.
    #[test]
    fn doors_pass_the_context_on_and_honour_the_sampled_flag() {
        // Off: the caller's context and tracestate unchanged, nothing recorded.
        let (trace, headers) = door(SAMPLED, Some("rojo=1"));
        assert!(trace.span.is_none());
        assert_eq!(headers[TRACEPARENT], SAMPLED);
        assert_eq!(headers[conveyor_core::TRACESTATE], "rojo=1");

        // On, with a parent-based sampler (a root is sampled).
        install(
            16,
            Box::new(|parent: Option<&TraceContext>, _: &[u8; 16]| {
                parent.is_none_or(|p| p.sampled())
            }),
        );
        let (trace, headers) = door(SAMPLED, Some("rojo=1"));
        let span = trace.span.expect("a door span for a sampled caller");
        assert_eq!(
            span.parent_span_id,
            Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7])
        );
        assert_eq!(headers[TRACEPARENT], span.context.header());
        assert!(span.context.sampled());
        trace.finish("ingest", 1, None);
        let recorded = take();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].trace_state.as_deref(), Some("rojo=1"));

        // An unsampled caller: no span, its context (flag 00) passed on, so no hop records.
        let (trace, headers) = door(UNSAMPLED, None);
        assert!(trace.span.is_none());
        assert_eq!(headers[TRACEPARENT], UNSAMPLED);
        trace.finish("ingest", 1, None);
        assert!(take().is_empty());

        // A malformed tracestate is dropped; the context still goes on.
        let (_, headers) = door(SAMPLED, Some("not a member"));
        assert!(!headers.contains_key(conveyor_core::TRACESTATE));
    }
}

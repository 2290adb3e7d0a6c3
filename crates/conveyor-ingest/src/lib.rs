//! Event intake.
//!
//! [`Intake`] is "take these drafts and tell me, per event, whether the queue holds it". Two
//! implementations: [`Ingest`] validates, gives ids and timestamps and publishes to a
//! [`conveyor_queue::Publisher`]; [`RemoteIntake`] forwards to ingest services over gRPC (what a
//! split-mode gateway uses). The HTTP handlers ([`http`]) and the gRPC service ([`grpc`]) are
//! written once over `Intake`, so the gateway and ingest doors answer identically.
//!
//! [`EnqueueForwarder`] is the publisher a split-mode ingest uses with the memory queue: it
//! hands events to the processor that holds the queue (`POST /enqueue`).

pub mod coalesce;
pub mod forward;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod remote;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use conveyor_api::{ReadyProbe, trace};
use conveyor_core::stats::IngestStats;
use conveyor_core::{
    ApiError, BatchContext, ErrorCode, Event, EventDraft, Limits, TRACEPARENT, validate_in,
};
use conveyor_pipeline::DoorSchemas;
use conveyor_queue::{Health, PublishError, Publisher};

pub use coalesce::{CoalescingIntake, CoalescingPublisher};
pub use forward::EnqueueForwarder;
pub use remote::RemoteIntake;

/// Takes drafts and answers, per draft and in order, the accepted id or why it was refused.
/// `Ok` means the queue confirmed the event (contract 1).
#[async_trait]
pub trait Intake: Send + Sync + 'static {
    async fn submit(&self, drafts: Vec<EventDraft>) -> Vec<Result<String, ApiError>>;

    /// Whether events can be accepted now (the queue is reachable).
    async fn health(&self) -> Health;

    /// Counts `events` a door refused with `code` before submitting them (an unreadable body
    /// or batch line, a wrong content type, a body too large, shutting down), so that
    /// `totals.rejected` holds every refusal and not only the ones [`Ingest`] decided. A body
    /// refused whole, whose events were never counted, counts as one.
    fn count_refused(&self, code: ErrorCode, events: usize);

    /// The refusals counted here that no ingest instance reports in its own stats: a remote
    /// intake's (the split-mode gateway's door refusals, and calls to ingest that failed).
    /// The gateway adds them to the ingests' sums.
    fn own_refusals(&self) -> IngestStats {
        IngestStats::default()
    }
}

/// `/ready`'s probe for a service whose work is `intake`'s: ready while it can accept events.
pub fn ready_probe(intake: Arc<dyn Intake>) -> ReadyProbe {
    Arc::new(move || {
        let intake = Arc::clone(&intake);
        Box::pin(async move { intake.health().await.into_result().map(|()| None) })
    })
}

/// Validates drafts (the event rules, then the door's JSON Schemas) and publishes them,
/// counting the outcome.
pub struct Ingest {
    publisher: Arc<dyn Publisher>,
    limits: Limits,
    /// The schemas events are checked against before they are accepted; swapped on reload.
    door: std::sync::RwLock<Arc<DoorSchemas>>,
    counters: IngestCounters,
}

/// Accepted and refused events, refusals by reason.
#[derive(Default)]
pub(crate) struct IngestCounters {
    accepted: AtomicU64,
    rejected_invalid: AtomicU64,
    rejected_full: AtomicU64,
    rejected_unavailable: AtomicU64,
}

impl IngestCounters {
    pub(crate) fn refused(&self, code: ErrorCode, events: usize) {
        let counter = if code == ErrorCode::QueueFull {
            &self.rejected_full
        } else if code.is_retryable() {
            &self.rejected_unavailable
        } else {
            &self.rejected_invalid
        };
        counter.fetch_add(events as u64, Ordering::Relaxed);
    }

    pub(crate) fn count(&self, results: &[Result<String, ApiError>]) {
        for result in results {
            match result {
                Ok(_) => {
                    self.accepted.fetch_add(1, Ordering::Relaxed);
                }
                Err(error) => self.refused(error.code, 1),
            }
        }
    }

    pub(crate) fn snapshot(&self) -> IngestStats {
        IngestStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            rejected_invalid: self.rejected_invalid.load(Ordering::Relaxed),
            rejected_full: self.rejected_full.load(Ordering::Relaxed),
            rejected_unavailable: self.rejected_unavailable.load(Ordering::Relaxed),
        }
    }
}

impl Ingest {
    pub fn new(publisher: Arc<dyn Publisher>, limits: Limits) -> Self {
        metrics::register();
        Ingest {
            publisher,
            limits,
            door: Default::default(),
            counters: IngestCounters::default(),
        }
    }

    /// Sets the schemas checked at the door (from the config file; again on reload). Requests
    /// in progress finish with the schemas they started with.
    pub fn set_door(&self, door: DoorSchemas) {
        *self.door.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(door);
    }

    fn door(&self) -> Arc<DoorSchemas> {
        Arc::clone(&self.door.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn stats(&self) -> IngestStats {
        self.counters.snapshot()
    }
}

#[async_trait]
impl Intake for Ingest {
    async fn submit(&self, drafts: Vec<EventDraft>) -> Vec<Result<String, ApiError>> {
        let mut results: Vec<Result<String, ApiError>> = Vec::with_capacity(drafts.len());
        let mut valid = Vec::with_capacity(drafts.len());
        // Positions in `results` that wait for the queue's answer, in publish order.
        let mut pending = Vec::with_capacity(drafts.len());
        let mut payload_sizes = metrics::PAYLOAD_SIZE.local();
        let mut batch = BatchContext::default();
        let door = self.door();
        for draft in drafts {
            let checked = validate_in(draft, &self.limits, &mut batch).and_then(|event| match door
                .check(&event.source, &event.payload, event.content_type)
            {
                Ok(()) => Ok(event),
                Err(violation) => Err(ApiError {
                    code: ErrorCode::SchemaViolation,
                    message: violation.message,
                    field: Some(violation.field),
                }),
            });
            match checked {
                Ok(event) => {
                    payload_sizes.record(event.payload.len() as u64);
                    pending.push(results.len());
                    results.push(Ok(event.id.to_string()));
                    valid.push(event);
                }
                Err(error) => results.push(Err(error)),
            }
        }
        drop(payload_sizes);
        if !valid.is_empty() {
            metrics::PUBLISH_BATCH_EVENTS.record(valid.len() as u64);
            let mut spans = trace::enabled().then(|| PublishSpans::start(&mut valid));
            let started = std::time::Instant::now();
            let confirms = self.publisher.publish(valid).await;
            metrics::PUBLISH_DURATION.record_duration(started.elapsed());
            for (index, (slot, confirm)) in pending.into_iter().zip(confirms).enumerate() {
                if let Err(error) = confirm {
                    if let Some(spans) = spans.as_mut() {
                        spans.failed(index, &error);
                    }
                    results[slot] = Err(publish_error(error));
                }
            }
            if let Some(spans) = spans {
                spans.finish();
            }
        }
        self.counters.count(&results);
        results
    }

    async fn health(&self) -> Health {
        self.publisher.health().await
    }

    fn count_refused(&self, code: ErrorCode, events: usize) {
        self.counters.refused(code, events);
    }
}

fn publish_error(error: PublishError) -> ApiError {
    error.into()
}

/// The `publish` spans of one publish batch (only while spans are recorded): one per distinct
/// sampled parent context among the batch's events (a request's events share one), each
/// event's `traceparent` rewritten to its span, so the processor's span is that span's child.
/// An event whose parent is not sampled keeps its context and gets no span. An event that
/// arrives without a context (a gRPC client's) enters here: the sampler decides whether it
/// starts a recorded trace of its own or carries an unsampled one.
struct PublishSpans {
    spans: Vec<(trace::Started, usize, Option<String>)>,
    /// Per event of the batch, its index in `spans` (none for an unsampled event).
    of_event: Vec<Option<usize>>,
}

impl PublishSpans {
    fn start(events: &mut [Event]) -> PublishSpans {
        let mut spans: Vec<(trace::Started, usize, Option<String>)> = Vec::new();
        let mut by_parent: HashMap<([u8; 16], [u8; 8]), usize> = HashMap::new();
        let mut of_event = Vec::with_capacity(events.len());
        for event in events.iter_mut() {
            let index = match trace::event_context(event) {
                Some(parent) if parent.sampled() => Some(
                    *by_parent
                        .entry((parent.trace_id, parent.span_id))
                        .or_insert_with(|| {
                            spans.push((trace::Started::child_of(Some(&parent)), 0, None));
                            spans.len() - 1
                        }),
                ),
                Some(_) => None,
                None => match trace::enter(None) {
                    trace::Entry::Recorded(span) => {
                        spans.push((span, 0, None));
                        Some(spans.len() - 1)
                    }
                    trace::Entry::Unsampled(context) => {
                        event
                            .headers
                            .insert(TRACEPARENT.to_owned(), context.header());
                        None
                    }
                    trace::Entry::Off => None,
                },
            };
            of_event.push(index);
            if let Some(index) = index {
                spans[index].1 += 1;
                event
                    .headers
                    .insert(TRACEPARENT.to_owned(), spans[index].0.context.header());
            }
        }
        PublishSpans { spans, of_event }
    }

    fn failed(&mut self, event: usize, error: &PublishError) {
        if let Some(&Some(index)) = self.of_event.get(event) {
            self.spans[index].2.get_or_insert_with(|| error.to_string());
        }
    }

    fn finish(self) {
        trace::record(self.spans.into_iter().map(|(span, events, error)| {
            let mut record = span.finish("publish", error);
            record
                .attributes
                .push(("conveyor.events", i64::try_from(events).unwrap_or(i64::MAX)));
            record
        }));
    }
}

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
pub mod remote;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use conveyor_api::recorded;
use conveyor_core::stats::IngestStats;
use conveyor_core::{ApiError, ErrorCode, EventDraft, Limits, validate};
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
}

/// Validates drafts and publishes them, counting the outcome.
pub struct Ingest {
    publisher: Arc<dyn Publisher>,
    limits: Limits,
    counters: IngestCounters,
}

#[derive(Default)]
struct IngestCounters {
    accepted: AtomicU64,
    rejected_invalid: AtomicU64,
    rejected_full: AtomicU64,
    rejected_unavailable: AtomicU64,
}

impl Ingest {
    pub fn new(publisher: Arc<dyn Publisher>, limits: Limits) -> Self {
        conveyor_api::recorded::mark_ingest();
        Ingest {
            publisher,
            limits,
            counters: IngestCounters::default(),
        }
    }

    pub fn stats(&self) -> IngestStats {
        let c = &self.counters;
        IngestStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            rejected_invalid: c.rejected_invalid.load(Ordering::Relaxed),
            rejected_full: c.rejected_full.load(Ordering::Relaxed),
            rejected_unavailable: c.rejected_unavailable.load(Ordering::Relaxed),
        }
    }

    fn count(&self, results: &[Result<String, ApiError>]) {
        let c = &self.counters;
        for result in results {
            let counter = match result {
                Ok(_) => &c.accepted,
                Err(e) if e.code == ErrorCode::QueueFull => &c.rejected_full,
                Err(e) if e.code.is_retryable() => &c.rejected_unavailable,
                Err(_) => &c.rejected_invalid,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[async_trait]
impl Intake for Ingest {
    async fn submit(&self, drafts: Vec<EventDraft>) -> Vec<Result<String, ApiError>> {
        let mut results: Vec<Result<String, ApiError>> = Vec::with_capacity(drafts.len());
        let mut valid = Vec::with_capacity(drafts.len());
        // Positions in `results` that wait for the queue's answer, in publish order.
        let mut pending = Vec::with_capacity(drafts.len());
        let mut payload_sizes = recorded::PAYLOAD_SIZE.local();
        for draft in drafts {
            match validate(draft, &self.limits) {
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
            recorded::PUBLISH_BATCH_EVENTS.record(valid.len() as u64);
            let started = std::time::Instant::now();
            let confirms = self.publisher.publish(valid).await;
            recorded::PUBLISH_DURATION.record_duration(started.elapsed());
            for (slot, confirm) in pending.into_iter().zip(confirms) {
                if let Err(error) = confirm {
                    results[slot] = Err(publish_error(error));
                }
            }
        }
        self.count(&results);
        results
    }

    async fn health(&self) -> Health {
        self.publisher.health().await
    }
}

fn publish_error(error: PublishError) -> ApiError {
    error.into()
}

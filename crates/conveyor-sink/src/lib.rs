//! The sink contract: where processed events are written, and what a write's answer means to
//! the worker pool that acks the queue (contract 2, "processed means written").
//!
//! # Delivery semantics
//!
//! - A worker hands a sink one batch per [`Sink::write`] call (the events one worker fetched
//!   and routed there) and waits for the answer, at most [`Sink::write_timeout`]; several
//!   workers write at once, so a sink sees at most as many batches in flight as the pool has
//!   workers. That is the bound: a sink that does not answer holds its workers, the queue
//!   backs up, and ingest answers 429 at the queue's bound. Nothing is dropped.
//! - `Ok(())` means every event of the batch is written: in the file, committed in the
//!   database, confirmed by the server. Only then is the delivery acked.
//! - An error says what became of the batch, as its [`ErrorKind`]:
//!   - [`ErrorKind::Retryable`]: nothing is known to be written, and trying again may work
//!     (a timeout, a lost connection, a 5xx or 429, a database restarting). The events go back
//!     to the queue with a growing, jittered delay, or after the server's `retry_after` when it
//!     gave one, and are retried for as long as it takes: a sink being down is not the
//!     events' fault, so it never sends them to the DLQ.
//!   - [`ErrorKind::Permanent`]: no event of the batch can ever be written as it is (a 4xx, a
//!     table that does not exist). The events go to the DLQ at once, with the sink's text.
//!   - [`ErrorKind::Rejected`]: the events named (by index into the batch) can never be
//!     written (a constraint violation, a value of the wrong type); every other event of the
//!     batch **is** written. The named ones go to the DLQ at once; the rest are acked.
//! - A write may be retried after it partly or wholly succeeded (an answer lost with a
//!   connection, a timeout after the commit, a crash before the ack): at-least-once. A sink
//!   that can make a second write of the same event a no-op (a primary key on the event id, a
//!   deterministic object name, broker dedupe by message id) says so in
//!   [`Sink::idempotent`], and then a redelivery never makes a second copy. For the others,
//!   the pool's seen-id window (seeded from [`Sink::recent_ids`] when the sink can read back)
//!   is what keeps duplicates out.
//!
//! The record every sink writes has the same fields: `id`, `source`, `timestamp`, `data` (the
//! payload as JSON; text as a JSON string; see [`record`]), `metadata`, `processed_at`,
//! `attempt`.

use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::Event;

pub mod answers;
pub mod field;
mod file;
mod local;
pub mod record;
pub mod settings;

pub use file::{FileSettings, FileSink};
pub use local::{BlackholeSink, StdoutSink};

/// How long a write may take, unless the sink says otherwise.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a write failed, in the sink's own words, and what that means for its events.
#[derive(Debug, Clone, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct SinkError {
    /// The sink's description (see [`Sink::describe`]).
    pub sink: String,
    pub message: String,
    pub kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// Nothing is known to be written; trying again may work, no sooner than `retry_after`
    /// when the server said when.
    Retryable { retry_after: Option<Duration> },
    /// No event of the batch can ever be written as it is.
    Permanent,
    /// These events (index into the batch, and why) can never be written; all others are.
    Rejected(Vec<(usize, String)>),
}

impl SinkError {
    pub fn retryable(sink: impl Into<String>, message: impl Into<String>) -> Self {
        SinkError {
            sink: sink.into(),
            message: message.into(),
            kind: ErrorKind::Retryable { retry_after: None },
        }
    }

    pub fn permanent(sink: impl Into<String>, message: impl Into<String>) -> Self {
        SinkError {
            sink: sink.into(),
            message: message.into(),
            kind: ErrorKind::Permanent,
        }
    }

    /// Some events rejected for good, the rest written; `message` sums it up.
    pub fn rejected(
        sink: impl Into<String>,
        message: impl Into<String>,
        rejected: Vec<(usize, String)>,
    ) -> Self {
        SinkError {
            sink: sink.into(),
            message: message.into(),
            kind: ErrorKind::Rejected(rejected),
        }
    }

    /// A retryable error the server said to retry no sooner than `after`.
    pub fn retry_after(mut self, after: Duration) -> Self {
        if let ErrorKind::Retryable { retry_after } = &mut self.kind {
            *retry_after = Some(after);
        }
        self
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Retryable { .. })
    }
}

#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Writes every event of the batch; see the crate docs for what each answer means.
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError>;

    /// A short description without secrets, e.g. `file:./data/out.ndjson` or
    /// `postgres://127.0.0.1:5432/app?table=events`.
    fn describe(&self) -> String;

    /// How long one write may take before the pool gives up on it (a retryable failure; the
    /// write may still land, so it is retried like any other).
    fn write_timeout(&self) -> Duration {
        DEFAULT_WRITE_TIMEOUT
    }

    /// Whether writing an event a second time leaves one copy (see the crate docs).
    fn idempotent(&self) -> bool {
        false
    }

    /// Ids of the last `limit` events this sink holds, oldest first, for a sink that can read
    /// back what it wrote. A processor seeds its seen-id window with them on start, so events
    /// written just before a crash, and redelivered because their ack was lost with the
    /// process, are not written twice.
    async fn recent_ids(&self, _limit: usize) -> Result<Vec<String>, SinkError> {
        Ok(Vec::new())
    }
}

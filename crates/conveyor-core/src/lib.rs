//! The event model and the rules every door applies to it.
//!
//! This crate knows nothing of HTTP, gRPC or brokers: it defines what an [`Event`] is, how a
//! client's [`EventDraft`] becomes one ([`validate`]), the one error vocabulary
//! ([`ErrorCode`], [`ApiError`]) that the edges map to status codes, and the statistics
//! snapshots every service reports.

pub mod body;
pub mod dedupe;
pub mod display;
pub mod error;
pub mod event;
pub mod retry;
pub mod stats;
pub mod trace;
pub mod validate;

pub use error::{ApiError, ErrorCode};
pub use event::{ContentType, Event, EventDraft, Metadata, REPLAY_HEADER, now_ms};
pub use trace::{TRACEPARENT, TRACESTATE, TraceContext};
pub use validate::{BatchContext, Limits, validate, validate_in};

//! The processor: consumes the queue with a pool of workers, runs each event through the
//! pipelines ([`conveyor_pipeline`], held with their sinks in a [`routing::Routing`]), writes
//! what they route to the named sinks ([`conveyor_sink`]), and settles the delivery only then.
//!
//! Contract 2, "processed means written": a delivery is acked after every sink it was routed to
//! confirmed the write (or a pipeline dropped it: counted, acked, never retried). A retryable
//! stage failure makes the delivery go back to the queue with a growing delay; after
//! `max_attempts` the event moves to the DLQ with its last error and is terminated in the
//! queue. A sink that cannot take writes now (down, timing out) makes its events go back to
//! the queue until it can: they are never dead-lettered for it. A permanent failure (a schema
//! violation, a jq error, a row the database refuses) goes to the DLQ at once, naming its
//! pipeline and stage, or its sink. Nothing is dropped silently: if the DLQ is full, the event stays in the queue.
//!
//! A bounded window of processed ids ([`seen::SeenIds`]) keeps a redelivered event that was
//! already written from being written twice.

pub mod http;
pub mod metrics;
pub mod pool;
pub mod routing;
pub mod seen;

pub use pool::{WorkerPool, WorkerPoolConfig};

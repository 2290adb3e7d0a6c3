//! The processor: consumes the queue with a pool of workers, runs each event through the
//! [`pipeline`], writes the result to a [`sink`], and settles the delivery only then.
//!
//! Contract 2, "processed means written": a delivery is acked after the sink confirmed the
//! write. A failing stage or sink makes the delivery go back to the queue with a growing delay;
//! after `max_attempts` the event moves to the [`dlq`] with its last error and is terminated in
//! the queue. Nothing is dropped silently: if the DLQ is full, the event stays in the queue.
//!
//! A bounded window of processed ids ([`seen::SeenIds`]) keeps a redelivered event that was
//! already written from being written twice.

pub mod http;
pub mod metrics;
pub mod pipeline;
pub mod pool;
pub mod seen;
pub mod sink;

pub use pool::{WorkerPool, WorkerPoolConfig};

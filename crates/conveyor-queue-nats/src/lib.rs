//! The NATS JetStream queue backend (`QUEUE_TYPE=nats`).
//!
//! # Delivery semantics
//! - **Publish** goes to one stream (WorkQueue retention: a message leaves the stream when
//!   acked) with the event's dedupe key as `Nats-Msg-Id`, so the broker discards a re-publish
//!   inside its duplicate window. [`Publisher::publish`](conveyor_queue::Publisher::publish)
//!   resolves on the PubAck: the event is then stored by the broker (on disk with file storage,
//!   on every replica the stream asks for). Many publishes are in flight at once, bounded.
//!   The stream's `max_msgs` is the queue's capacity; beyond it the broker refuses the publish
//!   (discard-new) and the client gets 429.
//! - **Consume** is one durable pull consumer shared by every processor, so N processors split
//!   the work. A delivery is acked only after the sink confirmed; nacked with a delay on failure
//!   (`-NAK` with delay); terminated (`+TERM`) once dead-lettered. A delivery that is neither
//!   acked nor nacked within AckWait (the processor died) is redelivered by the broker; the
//!   delivery count is the event's `attempt`.
//! - **Dead letters** go to a second stream ([`NatsDeadLetters`]), so they survive restarts and
//!   every processor sees the same list.
//! - Events travel as the protobuf `conveyor.v1.Event` (header `Conveyor-Encoding: proto`).
//!   A message published to the subject by a plain NATS client (no such header) is taken as a
//!   raw event: its payload as bytes, id from `Nats-Msg-Id` (else the stream sequence), source
//!   from the `Conveyor-Source` header (else the subject).
//!
//! - **Set-up** (the streams and the durable consumer) converges when several roles create them
//!   at once, and checks what it finds (`setup`). `url` may list several servers (a cluster).
//! - **Health** needs more than a connection: the stream must have a leader and a quorum of
//!   current replicas; `stats` carries the stream's cluster state (`cluster`).
//!
//! What is not promised here: durability under power loss is the broker's own (JetStream file
//! storage syncs to disk on its own schedule; use replicas for more).

mod args;
mod cluster;
mod config;
mod dlq;
mod pull;
mod queue;
mod setup;

pub use args::{NatsArgs, NatsStorage};
pub use config::{NatsConfig, parse_servers};
pub use dlq::NatsDeadLetters;
pub use queue::{NatsQueue, connect, encode, without_credentials};
pub use setup::ensure_stream;

#[cfg(test)]
mod tests;

//! The Kafka queue backend (`QUEUE_TYPE=kafka`), on librdkafka (bundled).
//!
//! # Delivery semantics
//! - **Publish** is an idempotent producer with `acks=all`:
//!   [`Publisher::publish`](conveyor_queue::Publisher::publish) resolves on the delivery report,
//!   so a 202 means every in-sync replica has the record. Many records are in flight at once,
//!   bounded. The record key picks the partition: the event's source by default, so each
//!   source's events stay in order. Kafka has no per-id dedupe, so each publisher remembers the
//!   last `dedupe_window` event ids and stores a re-published one once (a client retry through
//!   another ingest instance is caught later, by the processor's seen-id window).
//! - **Bounded**: `capacity` bounds the consumer group's lag. A publisher measures the lag every
//!   500 ms (and adds what it sent since); at the bound it refuses with "full" (429).
//! - **Consume**: each processor process is one member of the consumer group; its workers share
//!   the member's messages. Offsets are committed only up to the *contiguous processed
//!   watermark* of each partition ([`watermark`]): never past an event that is not yet acked or
//!   dead-lettered. Commits happen every `commit_interval`, on revoke and on shutdown. A failed
//!   event is retried by the member after its backoff (Kafka cannot redeliver one record), and
//!   its offset holds the watermark back until it is acked or dead-lettered. When a rebalance
//!   revokes partitions, what was finished is committed and the rest of their work is dropped:
//!   the new owner resumes from the commit. After a crash, events finished above the last commit
//!   come again; the processor's seen-id window (seeded from its sink) skips them.
//! - **Group health**: a member that finds partitions it does not own with lag and no commit
//!   for twice the session timeout (a coordinator that keeps a dead member assigned) reports
//!   the group stalled in its stats and health, and rejoins with a fresh member id.
//!   On shutdown the member commits and leaves the group, so the others take over within about
//!   one heartbeat (at most 500 ms).
//! - **Dead letters** go to a DLQ topic ([`KafkaDeadLetters`]) before the offset moves past
//!   them; `/api/v1/dlq` lists and replays them.
//! - Events travel as the protobuf `conveyor.v1.Event` (header `conveyor-encoding: proto`). A
//!   record a plain Kafka producer wrote (no such header) is taken as a raw event: its value as
//!   bytes, id `kafka-TOPIC-PARTITION-OFFSET`, source from its key (else the topic).
//!
//! Not promised: the attempt count of a retried event survives only while its processor lives
//! (after a crash, the redelivery counts from 1 again); ordering within a partition holds for
//! first deliveries, while a retried event is processed after the ones behind it.

mod admin;
mod args;
mod client;
mod codec;
mod config;
mod consumer;
mod dlq;
mod group;
mod inner;
mod lag;
mod member;
mod mock;
mod producer;
mod queue;
pub(crate) mod stall;
mod sync;
pub mod watermark;

pub use args::{KafkaArgs, Overrides};
pub use client::check_settings;
pub use codec::encode;
pub use config::{KafkaConfig, PartitionKey, parse_overrides};
pub use dlq::KafkaDeadLetters;
pub use mock::MockKafka;
pub use producer::{ProduceError, ProduceErrorKind, Record};
pub use queue::KafkaQueue;

#[cfg(test)]
mod tests;

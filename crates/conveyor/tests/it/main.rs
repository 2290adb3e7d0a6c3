//! End-to-end tests of the `conveyor` binary: each test starts its own processes on random
//! ports with their own temp dirs, and checks what a user sees (docs/INTERFACE.md).

mod delivery;
mod harness;
mod ledger;

mod all_in_one;
mod backpressure;
mod bad_input;
mod config;
mod dlq;
mod file_sink;
mod grpc_ecosystem;
mod kafka;
mod kafka_sink;
mod load;
mod nats;
mod nats_cluster;
mod nats_race;
mod nats_sink;
mod observability;
mod pipelines;
mod postgres;
mod s3_sink;
mod shutdown;
mod split;
mod tracing;
mod webhook;

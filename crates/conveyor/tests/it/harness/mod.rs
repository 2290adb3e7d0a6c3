//! Starting `conveyor` processes, talking to them, and checking what reached the sink.
//!
//! - `process.rs`: [`Spawn`] and [`Conveyor`]: starting, signalling and stopping processes,
//!   split mode's three, and what they print.
//! - `client.rs`: requests and their JSON answers, `/api/v1/status` and the DLQ, [`eventually`],
//!   the shapes of error and accepted answers, and raw chunked HTTP.
//! - `expected.rs`: [`Expected`] (what must come out of the sink) and the checks of the sink.
//! - `traffic.rs`: generated events and sending them over every door; `assert_still_serving`.
//!
//! Each file imports only the ones listed above it; the tests import from here.

mod client;
mod expected;
mod process;
mod traffic;

pub use client::{accepted_id, assert_error, eventually, raw_chunked_post, read_json, total};
pub use expected::{Expected, assert_all_delivered, assert_sink_exact, id_counts, read_sink_file};
pub use process::{
    Conveyor, NatsSplit, Spawn, Split, conveyor_command, spawn_run, spawn_split, spawn_split_with,
};
pub use traffic::{ingest_one, sample_event, send_mixed_traffic};

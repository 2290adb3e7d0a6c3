//! The gateway: the door clients use.
//!
//! It serves the ingest API (HTTP and gRPC, through an [`Intake`]), and the operator's view of
//! the whole system: `GET /api/v1/status` sums every ingest and processor instance into
//! `totals`, and `/api/v1/dlq` reaches every processor's dead-letter queue. Instances are
//! [`peers`]: in-process ones for `conveyor run`, HTTP ones in split mode, behind one trait each
//! so the handlers do not care which.

pub mod dashboard;
pub mod peers;
mod routes;
pub mod status;

pub use peers::{IngestPeer, ProcessorPeer};
pub use routes::{Gateway, router};

use conveyor_ingest::Intake;

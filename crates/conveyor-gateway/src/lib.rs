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
pub use routes::router;

use std::sync::Arc;

use conveyor_api::Readiness;
use conveyor_api::metrics::HttpMetrics;
use conveyor_ingest::Intake;
use conveyor_ingest::http::HttpLimits;

/// Everything the gateway's routes need.
#[derive(Clone)]
pub struct Gateway {
    pub intake: Arc<dyn Intake>,
    pub ingests: Vec<Arc<dyn IngestPeer>>,
    pub processors: Vec<Arc<dyn ProcessorPeer>>,
    pub readiness: Readiness,
    pub limits: HttpLimits,
    pub metrics: HttpMetrics,
}

impl Gateway {
    /// The whole system's status (`/api/v1/status`, the dashboard and the system metrics).
    pub async fn status(&self) -> status::SystemStatus {
        status::collect(
            &self.ingests,
            &self.processors,
            self.intake.own_refusals(),
            self.readiness.is_ready(),
        )
        .await
    }
}

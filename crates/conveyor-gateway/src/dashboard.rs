//! The live dashboard: one hand-written page (`/`, `/dashboard`) that polls
//! `GET /api/v1/dashboard` every second and draws throughput, latency percentiles, queue depth
//! and lag, worker use, the DLQ and each instance's health. No third-party files; the page is
//! compiled into the binary.

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use conveyor_api::histogram::Snapshot;
use serde::Serialize;

use crate::Gateway;
use crate::status::SystemStatus;

const PAGE: &str = include_str!("dashboard/index.html");

/// The routes whose durations are the "request" latency: what ingest clients wait for.
const INGEST_ROUTES: &[&str] = &[
    "/api/v1/ingest",
    "/api/v1/ingest/batch",
    "/conveyor.v1.IngestService/Ingest",
    "/conveyor.v1.IngestService/IngestBatch",
];

/// What the page polls: the system status plus latency histograms (cumulative; the page takes
/// the difference between two polls to show percentiles over the last seconds).
#[derive(Serialize)]
pub struct DashboardData {
    /// Milliseconds since the Unix epoch when this was taken.
    pub now_ms: u64,
    pub status: SystemStatus,
    /// Ingest requests as the gateway answered them.
    pub request_latency: Snapshot,
    /// Acceptance to sink write; only where the pool runs in the gateway's process (`run`).
    pub end_to_end_latency: Option<Snapshot>,
}

pub fn routes(gateway: Gateway) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/dashboard", get(page))
        .route("/api/v1/dashboard", get(data))
        // Browsers ask for one; an empty answer keeps a 404 out of the page's console.
        .route(
            "/favicon.ico",
            get(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .with_state(gateway)
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

async fn data(State(gateway): State<Gateway>) -> axum::Json<DashboardData> {
    let status = gateway.status().await;
    axum::Json(DashboardData {
        now_ms: conveyor_core::now_ms(),
        status,
        request_latency: gateway.metrics.durations(INGEST_ROUTES),
        end_to_end_latency: conveyor_processor::metrics::end_to_end_here(),
    })
}

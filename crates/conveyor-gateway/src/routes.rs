use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use conveyor_api::body::read_replay_request;
use conveyor_api::exposition::Exposition;
use conveyor_api::metrics;
use conveyor_api::{HttpError, service_router};
use conveyor_core::ApiError;
use conveyor_core::stats::ReplayReport;
use conveyor_core::stats::{DEFAULT_DLQ_LIST_LIMIT, DeadLetterList, ListQuery};
use conveyor_ingest::grpc::IngestGrpc;
use conveyor_ingest::http as ingest_http;
use futures_util::future::join_all;

use crate::{Gateway, status};

/// The gateway's HTTP and gRPC routes, on one port.
pub fn router(gateway: Gateway) -> Router {
    let grpc = IngestGrpc::new(
        Arc::clone(&gateway.intake),
        gateway.readiness.clone(),
        gateway.limits.max_batch_events,
    )
    .into_router(gateway.limits.max_body_bytes);
    let api = Router::new()
        .route("/api/v1/status", get(system_status))
        .route("/api/v1/dlq", get(list_dead_letters))
        .route("/api/v1/dlq/replay", post(replay))
        .with_state(gateway.clone());
    let routes = Router::new()
        .merge(ingest_http::routes(
            Arc::clone(&gateway.intake),
            gateway.readiness.clone(),
            gateway.limits.clone(),
            "/api/v1/ingest",
            "/api/v1/ingest/batch",
        ))
        .merge(api)
        .merge(crate::dashboard::routes(gateway.clone()))
        .merge(grpc);
    let scrape = gateway.clone();
    service_router(
        routes,
        gateway.readiness.clone(),
        Some(ready_probe(&gateway)),
        gateway.metrics.clone(),
        move || render_metrics(scrape.clone()),
    )
}

/// Ready while ingest can accept events; the detail shows the sinks of a processor in this
/// process (`conveyor run`).
fn ready_probe(gateway: &Gateway) -> conveyor_api::ReadyProbe {
    let intake = conveyor_ingest::ready_probe(Arc::clone(&gateway.intake));
    let processors = gateway.processors.clone();
    Arc::new(move || {
        let intake = Arc::clone(&intake);
        let detail = processors.iter().find_map(|p| p.ready_detail());
        Box::pin(async move { intake().await.map(|own| own.or(detail)) })
    })
}

async fn system_status(State(gateway): State<Gateway>) -> axum::Json<status::SystemStatus> {
    axum::Json(gateway.status().await)
}

/// The system-wide figures, from the same aggregation as `/api/v1/status`.
async fn render_metrics(gateway: Gateway) -> Exposition {
    let status = gateway.status().await;
    let mut out = Exposition::new();
    metrics::render_ingest(&mut out, &status.ingest.stats);
    metrics::render_processor(&mut out, &status.processor.stats);
    metrics::render_health(&mut out, status.status == "ok");
    metrics::render_instances(
        &mut out,
        status
            .instances
            .iter()
            .map(|i| (i.role, i.url.as_str(), i.healthy)),
    );
    out
}

/// Every processor's dead letters, up to `limit` in all.
async fn list_dead_letters(
    State(gateway): State<Gateway>,
    Query(query): Query<ListQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(DEFAULT_DLQ_LIST_LIMIT);
    let lists = join_all(gateway.processors.iter().map(|p| p.dead_letters(limit))).await;
    let mut merged = DeadLetterList {
        size: 0,
        events: Vec::new(),
    };
    for (processor, list) in gateway.processors.iter().zip(lists) {
        match list {
            Ok(list) => {
                merged.size += list.size;
                merged.events.extend(list.events);
            }
            Err(error) => {
                return HttpError(ApiError::unavailable(format!(
                    "processor {} could not list its DLQ: {error}",
                    processor.name()
                )))
                .into_response();
            }
        }
    }
    merged.events.truncate(limit);
    axum::Json(merged).into_response()
}

/// Replays on every processor; an id is "not found" only if no processor had it.
async fn replay(State(gateway): State<Gateway>, headers: HeaderMap, body: Body) -> Response {
    let request = match read_replay_request(&headers, body, gateway.limits.max_body_bytes).await {
        Ok(request) => request,
        Err(error) => return HttpError(error).into_response(),
    };
    let ids = request.ids.as_deref();
    let reports = join_all(gateway.processors.iter().map(|p| p.replay(ids))).await;
    let mut merged = ReplayReport::default();
    let mut not_found_everywhere: Option<Vec<String>> = None;
    for (processor, report) in gateway.processors.iter().zip(reports) {
        match report {
            Ok(report) => {
                merged.replayed += report.replayed;
                merged.failed += report.failed;
                not_found_everywhere = Some(match not_found_everywhere {
                    None => report.not_found,
                    Some(so_far) => so_far
                        .into_iter()
                        .filter(|id| report.not_found.contains(id))
                        .collect(),
                });
            }
            Err(error) => {
                tracing::warn!(processor = %processor.name(), %error, "DLQ replay failed on a processor");
                return HttpError(ApiError::unavailable(format!(
                    "processor {} could not replay: {error} ({} events were replayed elsewhere)",
                    processor.name(),
                    merged.replayed
                )))
                .into_response();
            }
        }
    }
    merged.not_found = not_found_everywhere.unwrap_or_default();
    axum::Json(merged).into_response()
}

//! The HTTP ingest API, shared by the gateway (`/api/v1/ingest`) and ingest (`/ingest`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use conveyor_api::body::{BodyFormat, content_format, read_limited};
use conveyor_api::recorded::{self, Door};
use conveyor_api::trace::DoorTrace;
use conveyor_api::{HttpError, Readiness, http_status};
use conveyor_core::{ApiError, EventDraft, TRACEPARENT, TRACESTATE, body};
use serde::Serialize;

use crate::Intake;

/// Limits of the HTTP ingest API.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most events in one batch request.
    pub max_batch_events: usize,
}

#[derive(Clone)]
struct IntakeState {
    intake: Arc<dyn Intake>,
    readiness: Readiness,
    limits: HttpLimits,
}

/// `POST {single}` (one event) and `POST {batch}` (JSON array or NDJSON) over `intake`.
pub fn routes(
    intake: Arc<dyn Intake>,
    readiness: Readiness,
    limits: HttpLimits,
    single: &str,
    batch: &str,
) -> Router {
    Router::new()
        .route(single, post(ingest_one))
        .route(batch, post(ingest_batch))
        .with_state(IntakeState {
            intake,
            readiness,
            limits,
        })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Accepted<'a> {
    message_id: &'a str,
    status: &'static str,
}

async fn ingest_one(State(state): State<IntakeState>, headers: HeaderMap, body: Body) -> Response {
    match ingest_one_inner(&state, &headers, body).await {
        Ok(id) => accepted_response(&id),
        Err(error) => HttpError(error).into_response(),
    }
}

/// The seed's answer to one accepted event: `202 {"messageId":"…","status":"accepted"}`.
pub fn accepted_response(id: &str) -> Response {
    (
        StatusCode::ACCEPTED,
        axum::Json(Accepted {
            message_id: id,
            status: "accepted",
        }),
    )
        .into_response()
}

async fn ingest_one_inner(
    state: &IntakeState,
    headers: &HeaderMap,
    body: Body,
) -> Result<String, ApiError> {
    recorded::received(Door::HttpSingle, 1);
    let draft = read_one(state, headers, body).await.inspect_err(|error| {
        state.intake.count_refused(error.code, 1);
    })?;
    submit_one(state, headers, draft).await
}

/// The event of a single-event request, or why the door refuses it before intake sees it.
async fn read_one(
    state: &IntakeState,
    headers: &HeaderMap,
    body: Body,
) -> Result<EventDraft, ApiError> {
    state.readiness.check()?;
    content_format(headers, &[BodyFormat::Json])?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::field(
                "Idempotency-Key",
                "the Idempotency-Key header must be ASCII",
            )
        })?),
    };
    let bytes = read_limited(body, headers, state.limits.max_body_bytes).await?;
    body::parse_event(&bytes, idempotency_key)
}

async fn submit_one(
    state: &IntakeState,
    headers: &HeaderMap,
    mut draft: EventDraft,
) -> Result<String, ApiError> {
    let trace = door_trace(headers);
    trace.apply(&mut draft.headers, true);
    let result = state
        .intake
        .submit(vec![draft])
        .await
        .pop()
        .unwrap_or_else(|| Err(ApiError::internal("intake returned no result")));
    trace.finish(
        "ingest",
        1,
        result.as_ref().err().map(|error| error.message.clone()),
    );
    result
}

/// The request's trace context, for the door's span and its events (see [`DoorTrace`]).
fn door_trace(headers: &HeaderMap) -> DoorTrace {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    DoorTrace::begin(header(TRACEPARENT), header(TRACESTATE))
}

/// One line of a batch answer: the accepted id, or the error for that element.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ItemResult {
    index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ApiError>,
}

#[derive(Serialize)]
struct BatchAnswer {
    accepted: usize,
    rejected: usize,
    results: Vec<ItemResult>,
}

async fn ingest_batch(
    State(state): State<IntakeState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match ingest_batch_inner(&state, &headers, body).await {
        Ok(results) => batch_response(results),
        Err(error) => {
            // Refused whole, before its lines were counted: it counts as one.
            state.intake.count_refused(error.code, 1);
            HttpError(error).into_response()
        }
    }
}

async fn ingest_batch_inner(
    state: &IntakeState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<Result<String, ApiError>>, ApiError> {
    state.readiness.check()?;
    let format = content_format(headers, &[BodyFormat::Json, BodyFormat::Ndjson])?;
    let bytes = read_limited(body, headers, state.limits.max_body_bytes).await?;
    let parsed = body::parse_batch(
        &bytes,
        format == BodyFormat::Ndjson,
        state.limits.max_batch_events,
    )?;
    recorded::received(Door::HttpBatch, parsed.len());
    let trace = door_trace(headers);
    let count = parsed.len();
    let mut parsed = parsed;
    if trace.header.is_some() {
        for draft in parsed.iter_mut().flatten() {
            trace.apply(&mut draft.headers, true);
        }
    }
    let results = submit_parsed(state.intake.as_ref(), parsed).await;
    let refused = results.iter().filter(|result| result.is_err()).count();
    trace.finish(
        "ingest_batch",
        count,
        (refused > 0).then(|| format!("{refused} of {count} events refused")),
    );
    Ok(results)
}

/// Submits the well-formed elements and merges their answers with the parse errors, in order.
pub async fn submit_parsed(
    intake: &dyn Intake,
    parsed: Vec<Result<EventDraft, ApiError>>,
) -> Vec<Result<String, ApiError>> {
    let mut results = Vec::with_capacity(parsed.len());
    let mut drafts = Vec::with_capacity(parsed.len());
    let mut slots = Vec::with_capacity(parsed.len());
    for item in parsed {
        match item {
            Ok(draft) => {
                slots.push(results.len());
                results.push(Ok(String::new()));
                drafts.push(draft);
            }
            Err(error) => {
                intake.count_refused(error.code, 1);
                results.push(Err(error));
            }
        }
    }
    if !drafts.is_empty() {
        for (slot, answer) in slots.into_iter().zip(intake.submit(drafts).await) {
            results[slot] = answer;
        }
    }
    results
}

/// The answer to a batch: per-element results; 202 when all were accepted, 207 when some were,
/// else the first error's status (with `Retry-After` when retrying can help).
pub fn batch_response(results: Vec<Result<String, ApiError>>) -> Response {
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    let rejected = results.len() - accepted;
    let first_error = results
        .iter()
        .find_map(|r| r.as_ref().err().map(|e| e.code));
    let status = match (accepted, first_error) {
        (_, None) => StatusCode::ACCEPTED,
        (0, Some(code)) => http_status(code),
        (_, Some(_)) => StatusCode::MULTI_STATUS,
    };
    let retry_after = results
        .iter()
        .any(|r| r.as_ref().is_err_and(|e| e.code.is_retryable()));
    let answer = BatchAnswer {
        accepted,
        rejected,
        results: results
            .into_iter()
            .enumerate()
            .map(|(index, result)| match result {
                Ok(id) => ItemResult {
                    index,
                    message_id: Some(id),
                    error: None,
                },
                Err(error) => ItemResult {
                    index,
                    message_id: None,
                    error: Some(error),
                },
            })
            .collect(),
    };
    let mut response = (status, axum::Json(answer)).into_response();
    if retry_after {
        response.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            conveyor_api::RETRY_AFTER_SECS.into(),
        );
    }
    response
}

/// `GET /stats` of an ingest instance: `{"healthy":…,"error":…,"stats":{…}}`.
pub fn stats_route(ingest: Arc<crate::Ingest>) -> Router {
    Router::new().route(
        "/stats",
        axum::routing::get(move || {
            let ingest = Arc::clone(&ingest);
            async move {
                let (healthy, error) = match ingest.health().await {
                    conveyor_queue::Health::Healthy => (true, None),
                    conveyor_queue::Health::Unhealthy(reason) => (false, Some(reason)),
                };
                axum::Json(serde_json::json!({
                    "healthy": healthy,
                    "error": error,
                    "stats": ingest.stats(),
                }))
            }
        }),
    )
}

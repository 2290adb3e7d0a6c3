//! The processor's HTTP API: `POST /enqueue` (split mode with the memory queue: ingest hands
//! events to the queue held here), `GET /stats`, `GET /dlq`, `POST /dlq/replay`.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use conveyor_api::body::{BodyFormat, content_format, read_limited, read_replay_request};
use conveyor_api::recorded::{self, Door};
use conveyor_api::{HttpError, Readiness};
use conveyor_core::stats::{DEFAULT_DLQ_LIST_LIMIT, DeadLetterList, ListQuery};
use conveyor_core::{
    ApiError, BatchContext, ErrorCode, EventDraft, Limits, body, validate, validate_in,
};
use conveyor_proto::v1;
use conveyor_queue::{Health, PublishError};
use prost::Message;

use crate::WorkerPool;

#[derive(Clone)]
struct ProcessorState {
    processor: Arc<WorkerPool>,
    readiness: Readiness,
    limits: Arc<Limits>,
    max_body_bytes: usize,
}

/// Routes of a split-mode processor.
pub fn routes(
    processor: Arc<WorkerPool>,
    readiness: Readiness,
    limits: Limits,
    max_body_bytes: usize,
) -> Router {
    Router::new()
        .route("/enqueue", post(enqueue))
        .route("/stats", get(stats))
        .route("/dlq", get(list_dead_letters))
        .route("/dlq/replay", post(replay))
        .with_state(ProcessorState {
            processor,
            readiness,
            limits: Arc::new(limits),
            max_body_bytes,
        })
}

async fn enqueue(State(state): State<ProcessorState>, headers: HeaderMap, body: Body) -> Response {
    match enqueue_inner(&state, &headers, body).await {
        Ok(response) => response,
        Err(error) => HttpError(error).into_response(),
    }
}

async fn enqueue_inner(
    state: &ProcessorState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    state.readiness.check()?;
    let format = content_format(headers, &[BodyFormat::Protobuf, BodyFormat::Json])?;
    let bytes = read_limited(body, headers, state.max_body_bytes).await?;
    if format == BodyFormat::Json {
        recorded::received(Door::Enqueue, 1);
        // The seed's single-event body.
        let draft = body::parse_event(&bytes, None)?;
        let event = validate(draft, &state.limits)?;
        let id = event.id.to_string();
        let mut confirms = state.processor.queue().publish(vec![event]).await;
        return match confirms.pop() {
            Some(Ok(_)) => Ok((
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({"messageId": id, "status": "accepted"})),
            )
                .into_response()),
            Some(Err(error)) => Err(error.into()),
            None => Err(ApiError::internal("the queue returned no confirm")),
        };
    }
    let batch = v1::EventBatch::decode(bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body is not a protobuf EventBatch: {e}"),
        )
    })?;
    recorded::received(Door::Enqueue, batch.events.len());
    // Ingest validated these already; checking again keeps a bad caller from putting events
    // into the queue that a sink could not write.
    let mut results: Vec<v1::EventResult> = Vec::with_capacity(batch.events.len());
    let mut valid = Vec::with_capacity(batch.events.len());
    let mut slots = Vec::with_capacity(batch.events.len());
    let mut shared = BatchContext::default();
    for (index, wire) in batch.events.into_iter().enumerate() {
        let event = conveyor_proto::event_from_wire(wire);
        let draft = EventDraft {
            id: Some(event.id.to_string()),
            source: event.source.to_string(),
            timestamp_ms: Some(event.timestamp_ms),
            payload: event.payload,
            content_type: event.content_type,
            metadata: std::sync::Arc::unwrap_or_clone(event.metadata),
            headers: event.headers,
            payload_checked: false,
        };
        let mut result = v1::EventResult {
            index: index as u32,
            ..Default::default()
        };
        match validate_in(draft, &state.limits, &mut shared) {
            Ok(event) => {
                result.message_id = event.id.to_string();
                slots.push(index);
                valid.push(event);
            }
            Err(error) => result.error = Some(conveyor_proto::error_detail(&error)),
        }
        results.push(result);
    }
    if !valid.is_empty() {
        let confirms = state.processor.queue().publish(valid).await;
        for (slot, confirm) in slots.into_iter().zip(confirms) {
            if let Err(error) = confirm {
                let error: ApiError = PublishError::into(error);
                results[slot].message_id.clear();
                results[slot].error = Some(conveyor_proto::error_detail(&error));
            }
        }
    }
    let answer = v1::IngestBatchResponse { results }.encode_to_vec();
    Ok(([(header::CONTENT_TYPE, "application/x-protobuf")], answer).into_response())
}

async fn stats(State(state): State<ProcessorState>) -> Response {
    let stats = state.processor.stats().await;
    let (healthy, error) = match state.processor.health().await {
        Health::Healthy => (true, None),
        Health::Unhealthy(reason) => (false, Some(reason)),
    };
    axum::Json(serde_json::json!({"healthy": healthy, "error": error, "stats": stats}))
        .into_response()
}

async fn list_dead_letters(
    State(state): State<ProcessorState>,
    Query(query): Query<ListQuery>,
) -> axum::Json<DeadLetterList> {
    let limit = query.limit.unwrap_or(DEFAULT_DLQ_LIST_LIMIT);
    let (size, letters) = state.processor.dead_letters().list(limit).await;
    axum::Json(DeadLetterList {
        size,
        events: letters.iter().map(|l| l.view()).collect(),
    })
}

async fn replay(State(state): State<ProcessorState>, headers: HeaderMap, body: Body) -> Response {
    let request = match read_replay_request(&headers, body, state.max_body_bytes).await {
        Ok(request) => request,
        Err(error) => return HttpError(error).into_response(),
    };
    axum::Json(state.processor.replay(request.ids.as_deref()).await).into_response()
}

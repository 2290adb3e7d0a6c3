use conveyor_core::{ApiError, ContentType, ErrorCode, Event, EventDraft};

use crate::v1;

/// A gRPC ingest request as a draft for validation.
pub fn draft_from_request(request: v1::IngestRequest) -> EventDraft {
    EventDraft {
        id: (!request.id.is_empty()).then_some(request.id),
        source: request.source,
        timestamp_ms: (request.timestamp_ms != 0).then_some(request.timestamp_ms),
        payload: request.payload,
        content_type: ContentType::from_mime(&request.content_type),
        metadata: request.metadata,
        headers: request.headers,
        payload_checked: false,
    }
}

pub fn event_to_wire(event: Event) -> v1::Event {
    v1::Event {
        id: event.id.to_string(),
        source: event.source.to_string(),
        timestamp_ms: event.timestamp_ms,
        payload: event.payload,
        content_type: event.content_type.as_mime().to_owned(),
        metadata: std::sync::Arc::unwrap_or_clone(event.metadata),
        attempt: event.attempt,
        headers: event.headers,
    }
}

pub fn event_from_wire(event: v1::Event) -> Event {
    Event {
        id: event.id.into(),
        source: event.source.into(),
        timestamp_ms: event.timestamp_ms,
        payload: event.payload,
        content_type: ContentType::from_mime(&event.content_type),
        metadata: event.metadata.into(),
        attempt: event.attempt,
        headers: event.headers,
    }
}

pub fn error_detail(error: &ApiError) -> v1::ErrorDetail {
    v1::ErrorDetail {
        code: error.code.as_str().to_owned(),
        message: error.message.clone(),
        field: error.field.clone().unwrap_or_default(),
    }
}

impl From<v1::ErrorDetail> for ApiError {
    fn from(detail: v1::ErrorDetail) -> Self {
        ApiError {
            code: ErrorCode::parse(&detail.code).unwrap_or(ErrorCode::Internal),
            message: detail.message,
            field: (!detail.field.is_empty()).then_some(detail.field),
        }
    }
}

//! One error vocabulary for every door. Each [`ErrorCode`] maps once to an HTTP status here and
//! to a gRPC code in `conveyor-api`, so a client sees the same problem named the same way on
//! every protocol.

use serde::{Deserialize, Serialize};

/// What went wrong, in a form a client can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not syntactically valid JSON / NDJSON / protobuf.
    InvalidJson,
    /// A field is missing, of the wrong type, or out of its allowed range.
    InvalidField,
    /// The event's data does not conform to the JSON Schema configured for its source.
    SchemaViolation,
    /// The request's `Content-Type` is not one this endpoint reads.
    UnsupportedMediaType,
    /// The request body is larger than the configured limit.
    PayloadTooLarge,
    /// A batch holds more events than the configured limit.
    BatchTooLarge,
    /// A JSON body or payload nests arrays and objects deeper than the configured limit.
    NestingTooDeep,
    /// The queue is full; retry after the indicated delay.
    QueueFull,
    /// A dependency (queue, ingest, processor) cannot be reached; retry later.
    Unavailable,
    /// The service is shutting down and takes no new work; retry elsewhere or later.
    ShuttingDown,
    /// The requested thing does not exist.
    NotFound,
    /// A bug or an unexpected failure; the message says what.
    Internal,
}

impl ErrorCode {
    /// Every code, for tables indexed by code (metrics) and for tests that sweep them.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidField,
        ErrorCode::SchemaViolation,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::PayloadTooLarge,
        ErrorCode::BatchTooLarge,
        ErrorCode::NestingTooDeep,
        ErrorCode::QueueFull,
        ErrorCode::Unavailable,
        ErrorCode::ShuttingDown,
        ErrorCode::NotFound,
        ErrorCode::Internal,
    ];

    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidJson | ErrorCode::NestingTooDeep => 400,
            ErrorCode::InvalidField | ErrorCode::SchemaViolation => 422,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::PayloadTooLarge | ErrorCode::BatchTooLarge => 413,
            ErrorCode::QueueFull => 429,
            ErrorCode::Unavailable | ErrorCode::ShuttingDown => 503,
            ErrorCode::NotFound => 404,
            ErrorCode::Internal => 500,
        }
    }

    /// Whether the same request may succeed if sent again later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::QueueFull | ErrorCode::Unavailable | ErrorCode::ShuttingDown
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::SchemaViolation => "schema_violation",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::BatchTooLarge => "batch_too_large",
            ErrorCode::NestingTooDeep => "nesting_too_deep",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
        }
    }

    pub fn parse(code: &str) -> Option<ErrorCode> {
        Some(match code {
            "invalid_json" => ErrorCode::InvalidJson,
            "invalid_field" => ErrorCode::InvalidField,
            "schema_violation" => ErrorCode::SchemaViolation,
            "unsupported_media_type" => ErrorCode::UnsupportedMediaType,
            "payload_too_large" => ErrorCode::PayloadTooLarge,
            "batch_too_large" => ErrorCode::BatchTooLarge,
            "nesting_too_deep" => ErrorCode::NestingTooDeep,
            "queue_full" => ErrorCode::QueueFull,
            "unavailable" => ErrorCode::Unavailable,
            "shutting_down" => ErrorCode::ShuttingDown,
            "not_found" => ErrorCode::NotFound,
            "internal" => ErrorCode::Internal,
            _ => return None,
        })
    }
}

/// An error as a client sees it: a code, a sentence naming the problem, and the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            code: ErrorCode::InvalidField,
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    pub fn queue_full() -> Self {
        ApiError::new(ErrorCode::QueueFull, "the queue is full; retry later")
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Unavailable, message)
    }

    pub fn shutting_down() -> Self {
        ApiError::new(
            ErrorCode::ShuttingDown,
            "the service is shutting down and accepts no new events",
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Internal, message)
    }
}

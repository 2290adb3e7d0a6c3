//! Request bodies: content type checked before reading, size bounded while reading.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use conveyor_core::stats::ReplayRequest;
use conveyor_core::{ApiError, ErrorCode};

/// The body formats conveyor reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    Json,
    Ndjson,
    Protobuf,
}

impl BodyFormat {
    fn mime(self) -> &'static str {
        match self {
            BodyFormat::Json => "application/json",
            BodyFormat::Ndjson => "application/x-ndjson",
            BodyFormat::Protobuf => "application/x-protobuf",
        }
    }
}

/// Which of `accepted` the request's `Content-Type` names; 415 naming the accepted types if none.
pub fn content_format(
    headers: &HeaderMap,
    accepted: &[BodyFormat],
) -> Result<BodyFormat, ApiError> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = given
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let found = accepted.iter().copied().find(|format| match format {
        BodyFormat::Json => essence == "application/json",
        BodyFormat::Ndjson => essence == "application/x-ndjson" || essence == "application/jsonl",
        BodyFormat::Protobuf => {
            essence == "application/x-protobuf" || essence == "application/protobuf"
        }
    });
    found.ok_or_else(|| {
        let names: Vec<&str> = accepted.iter().map(|f| f.mime()).collect();
        ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!(
                "Content-Type '{given}' is not accepted here; use {}",
                names.join(" or ")
            ),
        )
    })
}

/// Reads the body, refusing with 413 as soon as it passes `limit` bytes (a too-large
/// `Content-Length` is refused before reading anything).
pub async fn read_limited(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        // `to_bytes` stops at the limit with a length-limit error; anything else is the
        // connection failing mid-body.
        let is_limit = std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if is_limit {
            too_large()
        } else {
            ApiError::new(
                ErrorCode::InvalidJson,
                format!("the request body could not be read: {error}"),
            )
        }
    })
}

/// Reads the optional body of a DLQ replay request (`{"ids": [...]}`; empty: replay all), for
/// the processor's `/dlq/replay` and the gateway's `/api/v1/dlq/replay` alike.
pub async fn read_replay_request(
    headers: &HeaderMap,
    body: Body,
    max_body_bytes: usize,
) -> Result<ReplayRequest, ApiError> {
    let bytes = read_limited(body, headers, max_body_bytes).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(ReplayRequest::default());
    }
    content_format(headers, &[BodyFormat::Json])?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::field("ids", format!("expected {{\"ids\": [\"id\", ...]}}: {e}")))
}

//! The JSON shapes clients send and sinks write.
//!
//! The seed's request body `{"source":..,"data":..,"metadata":{..}}` is read as is, plus the
//! optional `id` and `timestamp`. A JSON `data` value is kept as JSON text, byte for byte,
//! without being parsed into a tree; a JSON string `data` value becomes UTF-8 text. Batches are
//! a JSON array of such objects or NDJSON (one per line), and a bad element fails only itself.

use std::borrow::Cow;
use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ApiError, ErrorCode};
use crate::event::{ContentType, EventDraft};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBody<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    source: Option<&'a RawValue>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<&'a RawValue>,
}

/// Reads one event object. `idempotency_key` (the `Idempotency-Key` header) is the id when the
/// body has none; when both are given they must agree.
pub fn parse_event(body: &[u8], idempotency_key: Option<&str>) -> Result<EventDraft, ApiError> {
    let raw: RawBody = serde_json::from_slice(body).map_err(json_error)?;
    draft_from_raw(raw, idempotency_key)
}

/// Reads a batch body: a JSON array of event objects, or NDJSON when `ndjson` is set.
///
/// The outer `Err` is for a body that cannot be split into elements at all (an array that is
/// not valid JSON) or that holds more than `max_events`; each element then succeeds or fails
/// on its own.
pub fn parse_batch(
    body: &[u8],
    ndjson: bool,
    max_events: usize,
) -> Result<Vec<Result<EventDraft, ApiError>>, ApiError> {
    let too_many = || {
        ApiError::new(
            ErrorCode::BatchTooLarge,
            format!("the batch holds more than {max_events} events"),
        )
    };
    if ndjson {
        // memchr finds the newlines a word at a time: a byte-by-byte split showed up in profiles.
        let mut lines: Vec<&[u8]> = Vec::new();
        let mut start = 0;
        for end in memchr::memchr_iter(b'\n', body).chain(std::iter::once(body.len())) {
            let line = &body[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.iter().all(u8::is_ascii_whitespace) {
                lines.push(line);
            }
            start = end + 1;
        }
        if lines.len() > max_events {
            return Err(too_many());
        }
        if lines.is_empty() {
            return Err(ApiError::field("body", "the batch is empty"));
        }
        return Ok(lines
            .into_iter()
            .map(|line| parse_event(line, None))
            .collect());
    }
    let elements: Vec<&RawValue> =
        serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ApiError::field("body", "a batch body must be a JSON array of event objects")
            }
            _ => json_error(e),
        })?;
    if elements.len() > max_events {
        return Err(too_many());
    }
    if elements.is_empty() {
        return Err(ApiError::field("body", "the batch is empty"));
    }
    Ok(elements
        .into_iter()
        .map(|element| parse_event(element.get().as_bytes(), None))
        .collect())
}

fn json_error(e: serde_json::Error) -> ApiError {
    match e.classify() {
        serde_json::error::Category::Data => ApiError::new(ErrorCode::InvalidField, e.to_string()),
        _ => ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body is not valid JSON: {e}"),
        ),
    }
}

fn draft_from_raw(raw: RawBody, idempotency_key: Option<&str>) -> Result<EventDraft, ApiError> {
    let id = match (raw.id, idempotency_key) {
        (Some(id), key) => {
            let id: String = serde_json::from_str(id.get())
                .map_err(|_| ApiError::field("id", "id must be a string"))?;
            if let Some(key) = key
                && key != id
            {
                return Err(ApiError::field(
                    "id",
                    "the body's id and the Idempotency-Key header differ",
                ));
            }
            Some(id)
        }
        (None, Some(key)) => Some(key.to_owned()),
        (None, None) => None,
    };
    let source: Cow<str> = match raw.source {
        Some(source) => serde_json::from_str(source.get())
            .map_err(|_| ApiError::field("source", "source must be a string"))?,
        None => return Err(ApiError::field("source", "source is required")),
    };
    let data = raw
        .data
        .ok_or_else(|| ApiError::field("data", "data is required"))?;
    let (payload, content_type) = match data.get().as_bytes().first() {
        Some(b'"') => {
            let text: String = serde_json::from_str(data.get())
                .map_err(|_| ApiError::field("data", "data is not a valid JSON string"))?;
            (Bytes::from(text), ContentType::Text)
        }
        _ if data.get() == "null" => {
            return Err(ApiError::field("data", "data must not be null"));
        }
        _ => (
            Bytes::copy_from_slice(data.get().as_bytes()),
            ContentType::Json,
        ),
    };
    let metadata: BTreeMap<String, String> = match raw.metadata {
        None => BTreeMap::new(),
        Some(m) if m.get() == "null" => BTreeMap::new(),
        Some(m) => serde_json::from_str(m.get()).map_err(|_| {
            ApiError::field("metadata", "metadata must be an object of string values")
        })?,
    };
    let timestamp_ms = match raw.timestamp {
        None => None,
        Some(t) => Some(serde_json::from_str::<u64>(t.get()).map_err(|_| {
            ApiError::field(
                "timestamp",
                "timestamp must be a non-negative integer (milliseconds since the Unix epoch)",
            )
        })?),
    };
    Ok(EventDraft {
        id,
        source: source.into_owned(),
        timestamp_ms,
        payload,
        content_type,
        metadata,
        headers: BTreeMap::new(),
        // `data` was parsed as JSON (or decoded as a JSON string) right above.
        payload_checked: true,
    })
}

/// Writes a payload as the JSON value a reader expects under `data`: JSON stays JSON, text
/// becomes a string, and opaque bytes become a string when they are UTF-8. Returns `false`
/// (writing nothing) for non-UTF-8 bytes, which the caller writes as `data_base64`.
pub fn write_data(out: &mut Vec<u8>, payload: &[u8], content_type: ContentType) -> bool {
    if content_type == ContentType::Json && serde_json::from_slice::<&RawValue>(payload).is_ok() {
        out.extend_from_slice(payload);
        return true;
    }
    match std::str::from_utf8(payload) {
        Ok(text) => {
            write_json_string(out, text);
            true
        }
        Err(_) => false,
    }
}

/// Appends `text` as a JSON string literal.
pub fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_seed_body_and_keeps_json_data_as_json() {
        let draft = parse_event(
            br#"{"source":"sensor-01","data":{"t": 23.5},"metadata":{"location":"warehouse-A"}}"#,
            None,
        )
        .expect("valid");
        assert_eq!(draft.source, "sensor-01");
        assert_eq!(&draft.payload[..], br#"{"t": 23.5}"#);
        assert_eq!(draft.content_type, ContentType::Json);
        assert_eq!(draft.metadata["location"], "warehouse-A");
    }

    #[test]
    fn a_string_data_value_becomes_text() {
        let draft =
            parse_event(br#"{"source":"s","data":"temperature:23.5"}"#, None).expect("valid");
        assert_eq!(&draft.payload[..], b"temperature:23.5");
        assert_eq!(draft.content_type, ContentType::Text);
    }

    #[test]
    fn malformed_json_is_invalid_json_and_a_wrong_field_is_named() {
        assert_eq!(
            parse_event(b"{\"source\":", None).expect_err("eof").code,
            ErrorCode::InvalidJson
        );
        let err = parse_event(br#"{"source":5,"data":1}"#, None).expect_err("type");
        assert_eq!(err.field.as_deref(), Some("source"));
        let err = parse_event(br#"{"source":"s"}"#, None).expect_err("missing");
        assert_eq!(err.field.as_deref(), Some("data"));
        let err = parse_event(br#"{"sorce":"s","data":1}"#, None).expect_err("unknown");
        assert!(err.message.contains("sorce"), "{}", err.message);
    }

    #[test]
    fn idempotency_key_is_the_id_unless_the_body_disagrees() {
        let d = parse_event(br#"{"source":"s","data":1}"#, Some("k1")).expect("valid");
        assert_eq!(d.id.as_deref(), Some("k1"));
        let err =
            parse_event(br#"{"id":"a","source":"s","data":1}"#, Some("b")).expect_err("differ");
        assert_eq!(err.field.as_deref(), Some("id"));
    }

    #[test]
    fn a_bad_ndjson_line_fails_only_itself() {
        let body = b"{\"source\":\"a\",\"data\":1}\n{oops\n\n{\"source\":\"b\",\"data\":2}\n";
        let results = parse_batch(body, true, 10).expect("splits");
        assert_eq!(results.len(), 3);
        assert!(results[0].is_ok());
        assert_eq!(
            results[1].as_ref().expect_err("bad").code,
            ErrorCode::InvalidJson
        );
        assert!(results[2].is_ok());
    }

    #[test]
    fn batch_limit_is_enforced() {
        let body = br#"[{"source":"a","data":1},{"source":"b","data":2}]"#;
        assert_eq!(
            parse_batch(body, false, 1).expect_err("too many").code,
            ErrorCode::BatchTooLarge
        );
        assert_eq!(parse_batch(body, false, 2).expect("fits").len(), 2);
        assert_eq!(
            parse_batch(b"{}", false, 2).expect_err("not array").code,
            ErrorCode::InvalidField
        );
    }
}

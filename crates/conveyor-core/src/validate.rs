//! Turning a client's draft into an event: the one place intake rules live, applied by the
//! gateway (to answer early) and by ingest (which is a public door too).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{ApiError, ErrorCode};
use crate::event::{ContentType, Event, EventDraft, Metadata, now_ms};

/// Size limits for the parts of an event. Request bodies are bounded separately, by the HTTP
/// layer; these bound what a single event may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_id_len: usize,
    pub max_source_len: usize,
    pub max_metadata_entries: usize,
    pub max_metadata_key_len: usize,
    pub max_metadata_value_len: usize,
    pub max_payload_bytes: usize,
    /// Deepest nesting of arrays and objects in a JSON payload. Common readers refuse deeper
    /// documents (serde_json and Python's `json` stop near 128 levels), so accepting one would
    /// store an event that nobody downstream can read.
    pub max_json_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_id_len: 256,
            max_source_len: 256,
            max_metadata_entries: 64,
            max_metadata_key_len: 128,
            max_metadata_value_len: 4096,
            max_payload_bytes: 1024 * 1024,
            max_json_depth: 128,
        }
    }
}

/// What the events of one request can share: one copy of a source they repeat, one empty
/// metadata map, one clock reading. Saves an allocation or two per event of a batch; events
/// stay independent values (sharing is by reference count).
#[derive(Default)]
pub struct BatchContext {
    source: Option<Arc<str>>,
    empty_metadata: Option<Metadata>,
    now_ms: Option<u64>,
}

impl BatchContext {
    fn source(&mut self, source: String) -> Arc<str> {
        match &self.source {
            Some(last) if **last == *source => Arc::clone(last),
            _ => {
                let shared: Arc<str> = source.into();
                self.source = Some(Arc::clone(&shared));
                shared
            }
        }
    }

    fn metadata(&mut self, metadata: BTreeMap<String, String>) -> Metadata {
        if metadata.is_empty() {
            Arc::clone(self.empty_metadata.get_or_insert_with(Metadata::default))
        } else {
            metadata.into()
        }
    }

    fn now_ms(&mut self) -> u64 {
        *self.now_ms.get_or_insert_with(now_ms)
    }
}

/// Checks a draft and gives it an id (the client's, or a new UUIDv7) and a timestamp.
pub fn validate(draft: EventDraft, limits: &Limits) -> Result<Event, ApiError> {
    validate_in(draft, limits, &mut BatchContext::default())
}

/// [`validate`] for one event of a batch (see [`BatchContext`]).
pub fn validate_in(
    draft: EventDraft,
    limits: &Limits,
    batch: &mut BatchContext,
) -> Result<Event, ApiError> {
    let id: Arc<str> = match draft.id {
        Some(id) => {
            check_id(&id, limits)?;
            id.into()
        }
        None => uuid::Uuid::now_v7()
            .hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .into(),
    };
    if draft.source.trim().is_empty() {
        return Err(ApiError::field(
            "source",
            "source is required and must not be empty",
        ));
    }
    if draft.source.len() > limits.max_source_len {
        return Err(ApiError::field(
            "source",
            format!("source is longer than {} bytes", limits.max_source_len),
        ));
    }
    if draft.source.chars().any(char::is_control) {
        return Err(ApiError::field(
            "source",
            "source must not contain control characters",
        ));
    }
    if draft.payload.len() > limits.max_payload_bytes {
        return Err(ApiError::field(
            "data",
            format!("data is larger than {} bytes", limits.max_payload_bytes),
        ));
    }
    match draft.content_type {
        ContentType::Json => {
            if !draft.payload_checked
                && serde_json::from_slice::<&serde_json::value::RawValue>(&draft.payload).is_err()
            {
                return Err(ApiError::field(
                    "payload",
                    "payload is declared application/json but is not valid JSON",
                ));
            }
            if json_nests_deeper_than(&draft.payload, limits.max_json_depth) {
                return Err(ApiError {
                    code: ErrorCode::NestingTooDeep,
                    message: format!(
                        "data nests arrays and objects more than {} levels deep \
                         (CONVEYOR_MAX_JSON_DEPTH)",
                        limits.max_json_depth
                    ),
                    field: Some("data".into()),
                });
            }
        }
        _ if draft.payload_checked => {}
        ContentType::Text => {
            if std::str::from_utf8(&draft.payload).is_err() {
                return Err(ApiError::field(
                    "payload",
                    "payload is declared text but is not valid UTF-8",
                ));
            }
        }
        ContentType::Binary => {}
    }
    if draft.metadata.len() > limits.max_metadata_entries {
        return Err(ApiError::field(
            "metadata",
            format!(
                "metadata has more than {} entries",
                limits.max_metadata_entries
            ),
        ));
    }
    for (key, value) in &draft.metadata {
        if key.is_empty() || key.len() > limits.max_metadata_key_len {
            return Err(ApiError::field(
                "metadata",
                format!(
                    "metadata keys must be 1 to {} bytes long",
                    limits.max_metadata_key_len
                ),
            ));
        }
        if value.len() > limits.max_metadata_value_len {
            return Err(ApiError::field(
                "metadata",
                format!(
                    "metadata value for '{key}' is longer than {} bytes",
                    limits.max_metadata_value_len
                ),
            ));
        }
    }
    Ok(Event {
        id,
        source: batch.source(draft.source),
        timestamp_ms: match draft.timestamp_ms {
            Some(client) => client,
            None => batch.now_ms(),
        },
        payload: draft.payload,
        content_type: draft.content_type,
        metadata: batch.metadata(draft.metadata),
        attempt: 0,
        headers: draft.headers,
    })
}

/// Whether valid JSON `json` nests arrays and objects deeper than `limit`. A byte scan with a
/// counter (no recursion, no tree, so no stack to overflow whatever the input), skipping string
/// contents so brackets inside strings do not count; it stops as soon as the limit is passed.
pub fn json_nests_deeper_than(json: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut at = 0;
    while let Some(&byte) = json.get(at) {
        match byte {
            b'"' => {
                // Jump from escape to escape to the closing quote.
                at += 1;
                loop {
                    let Some(rest) = json.get(at..) else {
                        return false;
                    };
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(k) if rest[k] == b'\\' => at += k + 2,
                        Some(k) => {
                            at += k + 1;
                            break;
                        }
                        None => return false,
                    }
                }
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    false
}

/// Ids are dedupe keys and appear in URLs, logs and broker headers: printable ASCII only.
fn check_id(id: &str, limits: &Limits) -> Result<(), ApiError> {
    if id.is_empty() {
        return Err(ApiError::field("id", "id must not be empty"));
    }
    if id.len() > limits.max_id_len {
        return Err(ApiError::field(
            "id",
            format!("id is longer than {} bytes", limits.max_id_len),
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::field(
            "id",
            "id must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn events_of_one_batch_share_a_repeated_source_and_keep_their_own_values() {
        let mut batch = BatchContext::default();
        let draft = |source: &str| EventDraft {
            source: source.into(),
            payload: bytes::Bytes::from_static(b"1"),
            content_type: ContentType::Binary,
            ..EventDraft::default()
        };
        let limits = Limits::default();
        let a = validate_in(draft("s1"), &limits, &mut batch).expect("valid");
        let b = validate_in(draft("s1"), &limits, &mut batch).expect("valid");
        let c = validate_in(draft("s2"), &limits, &mut batch).expect("valid");
        assert!(
            Arc::ptr_eq(&a.source, &b.source),
            "one copy of a repeated source"
        );
        assert_eq!((&*a.source, &*c.source), ("s1", "s2"));
        assert!(Arc::ptr_eq(&a.metadata, &b.metadata) && a.metadata.is_empty());
        assert_ne!(a.id, b.id, "each event still gets its own id");
    }

    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn nesting_is_measured_without_counting_brackets_inside_strings() {
        assert!(!json_nests_deeper_than(nested(128).as_bytes(), 128));
        assert!(json_nests_deeper_than(nested(129).as_bytes(), 128));
        assert!(!json_nests_deeper_than(br#"{"a":"[[[[{{{{","b":[1]}"#, 2));
        assert!(!json_nests_deeper_than(br#"{"a":"\"[[[[","b":"\\"}"#, 1));
        assert!(json_nests_deeper_than(br#"{"a":"\\","b":[[1]]}"#, 2));
        assert!(!json_nests_deeper_than(b"\"unterminated [[[", 0));
        // A million levels: no recursion, so no stack overflow.
        assert!(json_nests_deeper_than(nested(1_000_000).as_bytes(), 128));
    }

    #[test]
    fn a_payload_nested_past_the_limit_is_refused_with_its_own_code() {
        for checked in [false, true] {
            let mut d = draft("s");
            d.payload = bytes::Bytes::from(format!("{{\"x\":{}}}", nested(128)));
            d.payload_checked = checked;
            let err = validate(d, &Limits::default()).expect_err("129 levels");
            assert_eq!(err.code, ErrorCode::NestingTooDeep, "{err:?}");
            assert_eq!(err.field.as_deref(), Some("data"));

            let mut d = draft("s");
            d.payload = bytes::Bytes::from(nested(128));
            d.payload_checked = checked;
            validate(d, &Limits::default()).expect("128 levels are allowed");
        }
    }

    fn draft(source: &str) -> EventDraft {
        EventDraft {
            source: source.into(),
            payload: bytes::Bytes::from_static(b"{\"t\":1}"),
            content_type: ContentType::Json,
            ..Default::default()
        }
    }

    #[test]
    fn assigns_a_uuid_v7_and_a_timestamp_when_the_client_gave_none() {
        let event = validate(draft("sensor-01"), &Limits::default()).expect("valid");
        let id = uuid::Uuid::parse_str(&event.id).expect("a uuid");
        assert_eq!(id.get_version_num(), 7);
        assert!(event.timestamp_ms > 1_700_000_000_000);
    }

    #[test]
    fn keeps_the_client_id() {
        let mut d = draft("s");
        d.id = Some("order-42".into());
        assert_eq!(
            &*validate(d, &Limits::default()).expect("valid").id,
            "order-42"
        );
    }

    #[test]
    fn names_the_field_at_fault() {
        let err = validate(draft(" "), &Limits::default()).expect_err("empty source");
        assert_eq!(err.code, ErrorCode::InvalidField);
        assert_eq!(err.field.as_deref(), Some("source"));

        let mut d = draft("s");
        d.id = Some("has space".into());
        assert_eq!(
            validate(d, &Limits::default())
                .expect_err("bad id")
                .field
                .as_deref(),
            Some("id")
        );

        let mut d = draft("s");
        d.payload = bytes::Bytes::from_static(b"{not json");
        assert_eq!(
            validate(d, &Limits::default())
                .expect_err("bad json")
                .field
                .as_deref(),
            Some("payload")
        );
    }
}

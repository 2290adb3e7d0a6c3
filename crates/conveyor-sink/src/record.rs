//! The record format of the sinks that write JSON (file, stdout, and the `data` of the
//! others), one NDJSON line per event:
//! `{"id","source","timestamp","data","metadata","processed_at","attempt"}`; `data` is the
//! event's data as JSON (see [`conveyor_core::body::write_data`]), or `data_base64` for
//! payloads that are not UTF-8.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use conveyor_core::Event;
use conveyor_core::body::{write_data, write_json_string};

/// Appends `event` as one NDJSON record line to `out`.
pub fn write_record(out: &mut Vec<u8>, event: &Event, processed_at_ms: u64) {
    out.extend_from_slice(b"{\"id\":");
    write_json_string(out, &event.id);
    out.extend_from_slice(b",\"source\":");
    write_json_string(out, &event.source);
    out.extend_from_slice(b",\"timestamp\":");
    out.extend_from_slice(event.timestamp_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"data\":");
    let mark = out.len();
    if !write_data(out, &event.payload, event.content_type) {
        out.truncate(mark - b"\"data\":".len());
        out.extend_from_slice(b"\"data_base64\":\"");
        out.extend_from_slice(BASE64.encode(&event.payload).as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"metadata\":");
    write_metadata(out, event);
    out.extend_from_slice(b",\"processed_at\":");
    out.extend_from_slice(processed_at_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"attempt\":");
    out.extend_from_slice(event.attempt.to_string().as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Appends the event's metadata as a JSON object of strings.
pub fn write_metadata(out: &mut Vec<u8>, event: &Event) {
    out.push(b'{');
    for (i, (key, value)) in event.metadata.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(out, key);
        out.push(b':');
        write_json_string(out, value);
    }
    out.push(b'}');
}

/// Appends the event's data as one JSON value: the data itself (JSON, or text as a JSON
/// string), or, for a payload that is not UTF-8, `{"data_base64": "..."}`, so a column that
/// holds JSON can hold every event.
pub fn write_data_value(out: &mut Vec<u8>, event: &Event) {
    if !write_data(out, &event.payload, event.content_type) {
        out.extend_from_slice(b"{\"data_base64\":\"");
        out.extend_from_slice(BASE64.encode(&event.payload).as_bytes());
        out.extend_from_slice(b"\"}");
    }
}

/// The ids of NDJSON record lines, in order (a line that is not a record is skipped): what a
/// sink that reads back what it wrote seeds the seen-id window with.
pub fn ids_of_lines(lines: &[&[u8]]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    lines
        .iter()
        .filter_map(|line| serde_json::from_slice::<IdOnly>(line).ok().map(|r| r.id))
        .collect()
}

pub fn render(events: &[Event], processed_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len() * 256);
    for event in events {
        write_record(&mut out, event, processed_at_ms);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use conveyor_core::ContentType;
    use std::collections::BTreeMap;

    /// An event with characters that need escaping in its id and metadata.
    pub(crate) fn event(payload: &'static [u8], content_type: ContentType) -> Event {
        Event {
            id: "id-\"1\"".into(),
            source: "s".into(),
            timestamp_ms: 5,
            payload: bytes::Bytes::from_static(payload),
            content_type,
            metadata: BTreeMap::from([("k".to_owned(), "v\n".to_owned())]).into(),
            attempt: 2,
            headers: BTreeMap::new(),
        }
    }

    fn record(event: &Event) -> serde_json::Value {
        let mut out = Vec::new();
        write_record(&mut out, event, 9);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).expect("a record is one JSON object")
    }

    #[test]
    fn records_are_valid_json_with_data_kept_as_json() {
        let r = record(&event(br#"{"t": [1, 2]}"#, ContentType::Json));
        assert_eq!(r["id"], "id-\"1\"");
        assert_eq!(r["data"], serde_json::json!({"t": [1, 2]}));
        assert_eq!(r["metadata"]["k"], "v\n");
        assert_eq!(
            (
                r["timestamp"].as_u64(),
                r["processed_at"].as_u64(),
                r["attempt"].as_u64()
            ),
            (Some(5), Some(9), Some(2))
        );
        assert_eq!(
            record(&event(b"temp:23", ContentType::Text))["data"],
            "temp:23"
        );
    }

    #[test]
    fn non_utf8_bytes_become_base64() {
        let r = record(&event(&[0xff, 0x00, 0x61], ContentType::Binary));
        assert_eq!(r["data_base64"], "/wBh");
        assert!(r.get("data").is_none());
    }
}

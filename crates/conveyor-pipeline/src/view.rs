//! The event as a jq program sees it, and back.
//!
//! A program sees `{id, source, timestamp, data, metadata, attempt}`: `data` is the payload as
//! JSON (a JSON payload parsed, a text payload as a string, opaque bytes as a byte string),
//! `metadata` an object of strings. A program may change `data` and `metadata`; changing `id`,
//! `source`, `timestamp` or `attempt` is refused (the id is the dedupe key, and the others are
//! facts about how the event arrived).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use conveyor_core::{ContentType, Event};
use jaq_json::{Map, Val};

use crate::jq::{parse_json, write_json};

const FIELDS: [&str; 6] = ["id", "source", "timestamp", "data", "metadata", "attempt"];

/// A field name: static bytes, so making one per lookup costs no allocation.
fn key(name: &'static str) -> Val {
    Val::utf8_str(Bytes::from_static(name.as_bytes()))
}

fn string(text: &str) -> Val {
    Val::utf8_str(Bytes::copy_from_slice(text.as_bytes()))
}

/// The event's payload as a jq value.
pub fn data_value(event: &Event) -> Result<Val, String> {
    match event.content_type {
        ContentType::Json => parse_json(&event.payload).map_err(|e| format!("data is {e}")),
        ContentType::Text => Ok(Val::utf8_str(event.payload.clone())),
        ContentType::Binary => Ok(Val::byte_str(event.payload.clone())),
    }
}

/// The event as a jq value.
pub fn to_value(event: &Event) -> Result<Val, String> {
    let mut object = Map::default();
    object.insert(key("id"), string(&event.id));
    object.insert(key("source"), string(&event.source));
    object.insert(
        key("timestamp"),
        Val::from(usize::try_from(event.timestamp_ms).unwrap_or(usize::MAX)),
    );
    object.insert(key("data"), data_value(event)?);
    let metadata: Map = event
        .metadata
        .iter()
        .map(|(k, v)| (string(k), string(v)))
        .collect();
    object.insert(key("metadata"), Val::obj(metadata));
    object.insert(key("attempt"), Val::from(event.attempt as usize));
    Ok(Val::obj(object))
}

/// The event a program's output describes: `event` with the output's `data` and `metadata`.
/// `id` becomes `id` (or the derived id of a split output).
pub fn from_value(event: &Event, value: Val, id: Arc<str>) -> Result<Event, String> {
    let Val::Obj(object) = value else {
        return Err(format!(
            "the program's output is {}, not an event object",
            describe(&value)
        ));
    };
    if let Some(unknown) = object.keys().find(|k| !FIELDS.iter().any(|f| is_key(k, f))) {
        return Err(format!(
            "the program's output has a field {} that events do not have (fields: {})",
            text_of(unknown),
            FIELDS.join(", ")
        ));
    }
    for field in ["id", "source", "timestamp", "attempt"] {
        match object.get(&key(field)) {
            Some(now) if is_unchanged(event, field, now) => {}
            Some(_) => {
                return Err(format!(
                    "the program changed `{field}`; only `data` and `metadata` may change"
                ));
            }
            None => {
                return Err(format!(
                    "the program's output has no `{field}`: a transform returns the whole event (`.data.x = 1`, not `.data | .x = 1`)"
                ));
            }
        }
    }
    let (payload, content_type) = match object.get(&key("data")) {
        None | Some(Val::Null) => (Bytes::from_static(b"null"), ContentType::Json),
        Some(Val::BStr(bytes)) => ((**bytes).clone(), ContentType::Binary),
        Some(Val::TStr(text)) if event.content_type == ContentType::Text => {
            ((**text).clone(), ContentType::Text)
        }
        Some(data) => {
            let mut out = Vec::with_capacity(event.payload.len() + 16);
            write_json(&mut out, data);
            // jaq can hold values JSON cannot (NaN, byte strings inside objects): refuse them
            // here rather than hand a sink a line it cannot read.
            if serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_err() {
                return Err(format!(
                    "the program's data is not representable as JSON: {}",
                    String::from_utf8_lossy(&out)
                        .chars()
                        .take(80)
                        .collect::<String>()
                ));
            }
            (Bytes::from(out), ContentType::Json)
        }
    };
    let metadata = match object.get(&key("metadata")) {
        None | Some(Val::Null) => Default::default(),
        Some(Val::Obj(entries)) => {
            let mut metadata = BTreeMap::new();
            for (k, v) in entries.iter() {
                let Val::TStr(k) = k else {
                    return Err("metadata keys must be strings".into());
                };
                let value = match v {
                    Val::TStr(text) => String::from_utf8_lossy(text).into_owned(),
                    other => {
                        let mut out = Vec::new();
                        write_json(&mut out, other);
                        String::from_utf8_lossy(&out).into_owned()
                    }
                };
                metadata.insert(String::from_utf8_lossy(k).into_owned(), value);
            }
            Arc::new(metadata)
        }
        Some(other) => {
            return Err(format!(
                "metadata must be an object, not {}",
                describe(other)
            ));
        }
    };
    Ok(Event {
        id,
        source: Arc::clone(&event.source),
        timestamp_ms: event.timestamp_ms,
        payload,
        content_type,
        metadata,
        attempt: event.attempt,
        headers: event.headers.clone(),
    })
}

/// Whether `now`, a program's output for one of the fields it may not change, is what it was
/// given (compared without making the given value again).
fn is_unchanged(event: &Event, field: &str, now: &Val) -> bool {
    let text = |given: &str| matches!(now, Val::TStr(bytes) if &***bytes == given.as_bytes());
    match field {
        "id" => text(&event.id),
        "source" => text(&event.source),
        "timestamp" => *now == Val::from(usize::try_from(event.timestamp_ms).unwrap_or(usize::MAX)),
        _ => *now == Val::from(event.attempt as usize),
    }
}

fn is_key(value: &Val, name: &str) -> bool {
    matches!(value, Val::TStr(text) if &***text == name.as_bytes())
}

fn text_of(value: &Val) -> String {
    let mut out = Vec::new();
    write_json(&mut out, value);
    String::from_utf8_lossy(&out).into_owned()
}

fn describe(value: &Val) -> &'static str {
    match value {
        Val::Null => "null",
        Val::Bool(_) => "a boolean",
        Val::Num(_) => "a number",
        Val::TStr(_) | Val::BStr(_) => "a string",
        Val::Arr(_) => "an array",
        Val::Obj(_) => "an object",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::jq::{Budget, Program};

    pub(crate) fn event(source: &str, data: &str) -> Event {
        Event {
            id: "e1".into(),
            source: source.into(),
            timestamp_ms: 1_700_000_000_000,
            payload: Bytes::from(data.to_owned()),
            content_type: ContentType::Json,
            metadata: Arc::new(BTreeMap::from([("k".to_owned(), "v".to_owned())])),
            attempt: 1,
            headers: BTreeMap::new(),
        }
    }

    fn apply(code: &str, event: &Event) -> Result<Event, String> {
        let program = Program::compile(code).map_err(|e| e.to_string())?;
        let mut outputs = program.run(to_value(event)?, &Budget::default())?;
        from_value(event, outputs.remove(0), Arc::clone(&event.id))
    }

    #[test]
    fn a_program_sees_the_event_and_may_change_data_and_metadata() {
        let input = event("sensor-1", r#"{"f":212}"#);
        let out = apply(
            r#".data.c = (.data.f - 32) * 5 / 9 | del(.data.f) | .metadata.unit = "C" | .metadata.n = 3"#,
            &input,
        )
        .expect("applies");
        assert_eq!(&out.payload[..], br#"{"c":100.0}"#);
        assert_eq!(out.metadata["unit"], "C");
        assert_eq!(
            out.metadata["n"], "3",
            "non-string metadata is kept as JSON text"
        );
        assert_eq!(out.metadata["k"], "v");
        assert_eq!(out.id, input.id);
        let seen = apply(r#".data = {id, source, timestamp, attempt}"#, &input).expect("applies");
        assert_eq!(
            std::str::from_utf8(&seen.payload).expect("utf-8"),
            r#"{"id":"e1","source":"sensor-1","timestamp":1700000000000,"attempt":1}"#
        );
    }

    #[test]
    fn a_program_may_not_change_the_id_or_add_fields() {
        let input = event("s", "{}");
        let error = apply(r#".id = "other""#, &input).expect_err("id is fixed");
        assert!(error.contains("changed `id`"), "{error}");
        let error = apply(r#".source = "x""#, &input).expect_err("source is fixed");
        assert!(error.contains("changed `source`"), "{error}");
        let error = apply(r#".extra = 1"#, &input).expect_err("no such field");
        assert!(error.contains("\"extra\""), "{error}");
        let error = apply(".data", &input).expect_err("not an event");
        assert!(error.contains("has no `id`"), "{error}");
        let error = apply(".data | 1", &input).expect_err("not an event");
        assert!(error.contains("not an event object"), "{error}");
        let error = apply(".data.x = nan", &input).expect_err("NaN is not JSON");
        assert!(error.contains("not representable"), "{error}");
    }
}

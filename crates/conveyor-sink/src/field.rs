//! One field of an event, named by a jq path: `.data.customer.id`, `.metadata.region`,
//! `.source`, `.data.items[0]`, `.data."odd key"`. It is the part of jq that names a place
//! (what jq's `path(…)` describes), so a sink setting (a Kafka key, a PostgreSQL column) can
//! pick a value out of each event without running a program per event.
//!
//! The event is the one jq programs see in a pipeline: `id`, `source`, `timestamp` (ms since
//! the epoch), `attempt`, `data` (the payload as JSON; a text payload as a JSON string) and
//! `metadata` (an object of strings). The leading `.` may be left out (`data.customer.id`).

use conveyor_core::Event;
use conveyor_core::body::write_data;
use serde_json::Value;

/// A parsed path; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    text: String,
    root: Root,
    steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Root {
    Id,
    Source,
    Timestamp,
    Attempt,
    Data,
    Metadata,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

const ROOTS: &str = ".id, .source, .timestamp, .attempt, .data… or .metadata…";

impl FieldPath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let problem = |why: &str| {
            format!(
                "'{text}' is not a field path ({why}; e.g. .data.customer.id or .metadata.region)"
            )
        };
        let rest = text.strip_prefix('.').unwrap_or(text);
        let root_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let root = match &rest[..root_len] {
            "id" => Root::Id,
            "source" => Root::Source,
            "timestamp" => Root::Timestamp,
            "attempt" => Root::Attempt,
            "data" => Root::Data,
            "metadata" => Root::Metadata,
            _ => return Err(problem(&format!("it starts with one of {ROOTS}"))),
        };
        let mut steps = Vec::new();
        let mut rest = &rest[root_len..];
        while !rest.is_empty() {
            if rest.starts_with("[\"") {
                let (key, tail) = quoted(&rest[1..]).ok_or_else(|| problem("an unclosed quote"))?;
                rest = tail
                    .strip_prefix(']')
                    .ok_or_else(|| problem("a missing ]"))?;
                steps.push(Step::Key(key));
            } else if let Some(after) = rest.strip_prefix('[') {
                let (index, tail) = after
                    .split_once(']')
                    .ok_or_else(|| problem("a missing ]"))?;
                let index = index
                    .parse::<usize>()
                    .map_err(|_| problem(&format!("[{index}] is not an index from 0 up")))?;
                steps.push(Step::Index(index));
                rest = tail;
            } else if rest.starts_with(".\"") {
                let (key, tail) = quoted(&rest[1..]).ok_or_else(|| problem("an unclosed quote"))?;
                steps.push(Step::Key(key));
                rest = tail;
            } else if let Some(after) = rest.strip_prefix('.') {
                let len = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                if len == 0 {
                    return Err(problem("an empty step; quote odd keys: .\"odd key\""));
                }
                steps.push(Step::Key(after[..len].to_owned()));
                rest = &after[len..];
            } else {
                return Err(problem(&format!("unexpected '{rest}'")));
            }
        }
        let scalar = matches!(
            root,
            Root::Id | Root::Source | Root::Timestamp | Root::Attempt
        );
        if scalar && !steps.is_empty() {
            return Err(problem(&format!(
                ".{} has no fields",
                &text.trim_start_matches('.')[..root_len]
            )));
        }
        if root == Root::Metadata && steps.len() > 1 {
            return Err(problem(
                "a metadata entry is a string: .metadata.NAME is as deep as it goes",
            ));
        }
        Ok(FieldPath {
            // One spelling, so `data.x` and `.data.x` are the same path.
            text: format!(".{}", text.strip_prefix('.').unwrap_or(text)),
            root,
            steps,
        })
    }

    /// Whether the path reads the event's data (which is parsed for it).
    pub fn reads_data(&self) -> bool {
        self.root == Root::Data
    }
}

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A JSON string's contents and what follows its closing quote; `text` starts at the opening
/// quote.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut escaped = false;
    for (at, c) in text.char_indices().skip(1) {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => {
                let key = serde_json::from_str(&text[..=at]).ok()?;
                return Some((key, &text[at + 1..]));
            }
            _ => escaped = false,
        }
    }
    None
}

/// An event's fields, its data parsed once for every path that reads it.
pub struct EventFields<'a> {
    event: &'a Event,
    data: std::cell::OnceCell<Option<Value>>,
}

impl<'a> EventFields<'a> {
    pub fn new(event: &'a Event) -> Self {
        EventFields {
            event,
            data: std::cell::OnceCell::new(),
        }
    }

    /// The value at `path`; None when the event has no such field (or its data is not JSON
    /// or text).
    pub fn get(&self, path: &FieldPath) -> Option<Value> {
        let event = self.event;
        let root = match path.root {
            Root::Id => return Some(Value::String(event.id.to_string())),
            Root::Source => return Some(Value::String(event.source.to_string())),
            Root::Timestamp => return Some(Value::from(event.timestamp_ms)),
            Root::Attempt => return Some(Value::from(event.attempt)),
            Root::Metadata => {
                return match path.steps.first() {
                    None => Some(Value::Object(
                        event
                            .metadata
                            .iter()
                            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                            .collect(),
                    )),
                    Some(Step::Key(name)) => event.metadata.get(name).cloned().map(Value::String),
                    Some(Step::Index(_)) => None,
                };
            }
            Root::Data => self.data.get_or_init(|| {
                let mut json = Vec::with_capacity(event.payload.len() + 2);
                write_data(&mut json, &event.payload, event.content_type)
                    .then(|| serde_json::from_slice(&json).ok())
                    .flatten()
            }),
        };
        let mut value = root.as_ref()?;
        for step in &path.steps {
            value = match step {
                Step::Key(key) => value.get(key)?,
                Step::Index(index) => value.get(index)?,
            };
        }
        Some(value.clone())
    }
}

/// A value as text: a string as it is, `null` as nothing, anything else as its JSON.
pub fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(text) => Some(text.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_core::ContentType;
    use std::collections::BTreeMap;

    fn event(payload: &'static str, content_type: ContentType) -> Event {
        Event {
            id: "e-1".into(),
            source: "shop".into(),
            timestamp_ms: 1_700_000_000_000,
            payload: bytes::Bytes::from_static(payload.as_bytes()),
            content_type,
            metadata: BTreeMap::from([("region".to_owned(), "eu".to_owned())]).into(),
            attempt: 2,
            headers: BTreeMap::new(),
        }
    }

    fn get(path: &str, event: &Event) -> Option<Value> {
        EventFields::new(event).get(&FieldPath::parse(path).expect(path))
    }

    #[test]
    fn paths_pick_fields_of_the_event_as_jq_sees_it() {
        let e = event(
            r#"{"customer": {"id": 42, "tags": ["a", "b"]}, "odd key": true}"#,
            ContentType::Json,
        );
        assert_eq!(get(".data.customer.id", &e), Some(Value::from(42)));
        assert_eq!(get("data.customer.id", &e), Some(Value::from(42)));
        assert_eq!(get(".data.customer.tags[1]", &e), Some(Value::from("b")));
        assert_eq!(get(r#".data."odd key""#, &e), Some(Value::Bool(true)));
        assert_eq!(get(r#".data["odd key"]"#, &e), Some(Value::Bool(true)));
        assert_eq!(get(".data.customer.missing", &e), None);
        assert_eq!(get(".data.customer.tags[9]", &e), None);
        assert_eq!(get(".metadata.region", &e), Some(Value::from("eu")));
        assert_eq!(get(".metadata.nope", &e), None);
        assert_eq!(get(".id", &e), Some(Value::from("e-1")));
        assert_eq!(get(".source", &e), Some(Value::from("shop")));
        assert_eq!(
            get(".timestamp", &e),
            Some(Value::from(1_700_000_000_000u64))
        );
        assert_eq!(get(".attempt", &e), Some(Value::from(2)));
        assert_eq!(
            get(".data", &event("temp:23", ContentType::Text)),
            Some(Value::from("temp:23"))
        );
        assert_eq!(get(".data.x", &event("{not json", ContentType::Json)), None);
        assert_eq!(as_text(&Value::from("x")), Some("x".into()));
        assert_eq!(as_text(&Value::from(4.5)), Some("4.5".into()));
        assert_eq!(as_text(&Value::Null), None);
    }

    #[test]
    fn a_path_that_names_no_place_is_refused_by_name() {
        let refusal = |path: &str| FieldPath::parse(path).expect_err(path);
        assert!(
            refusal(".body.x").contains("it starts with one of"),
            "{}",
            refusal(".body.x")
        );
        assert!(refusal(".data..x").contains("an empty step"));
        assert!(refusal(".data[x]").contains("[x] is not an index"));
        assert!(refusal(".data[1").contains("a missing ]"));
        assert!(refusal(r#".data."open"#).contains("an unclosed quote"));
        assert!(refusal(".id.x").contains(".id has no fields"));
        assert!(refusal(".metadata.a.b").contains("as deep as it goes"));
        assert!(refusal(".data | length").contains("unexpected"));
    }
}

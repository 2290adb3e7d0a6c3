//! JSON Schema (drafts 2020-12 and 7, and the others the `jsonschema` crate knows), as a
//! pipeline stage and at the door.
//!
//! A schema describes an event's `data`. The draft is the schema's own `$schema`, 2020-12 when
//! it names none. References to other files or URLs are not fetched: a schema is one file.

use std::path::Path;
use std::sync::Arc;

use conveyor_core::{ContentType, Event};

/// A compiled schema. Cheap to clone.
#[derive(Clone)]
pub struct Schema {
    validator: Arc<jsonschema::Validator>,
    /// Where it came from (a file path), for messages.
    origin: Arc<str>,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Schema({})", self.origin)
    }
}

/// Why an event's data does not conform: the failing place in the event (a JSON pointer from
/// the event's root, so `/data/...`), the schema keyword, and the validator's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub keyword: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "schema violation at {} ({}): {}",
            self.field, self.keyword, self.message
        )
    }
}

impl Schema {
    /// Reads and compiles the schema in the file at `path`.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read(path)
            .map_err(|e| format!("cannot read schema '{}': {e}", path.display()))?;
        let value: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| format!("schema '{}' is not JSON: {e}", path.display()))?;
        Self::compile(&value, &path.display().to_string())
    }

    /// Compiles a schema given as JSON; `origin` names it in messages.
    pub fn compile(value: &serde_json::Value, origin: &str) -> Result<Self, String> {
        let validator = jsonschema::validator_for(value)
            .map_err(|e| format!("schema '{origin}' is not a valid JSON Schema: {e}"))?;
        Ok(Schema {
            validator: Arc::new(validator),
            origin: origin.into(),
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Checks `data` (an event's data) against the schema; the first violation found.
    pub fn check(&self, data: &serde_json::Value) -> Result<(), Violation> {
        self.validator.validate(data).map_err(|error| {
            let path = error.instance_path().to_string();
            Violation {
                field: format!("/data{path}"),
                keyword: error.kind().keyword().to_owned(),
                message: error.to_string(),
            }
        })
    }

    /// Checks an event's payload: its data must be JSON and conform.
    pub fn check_event(&self, event: &Event) -> Result<(), Violation> {
        self.check_payload(&event.payload, event.content_type)
    }

    /// Checks a payload as it would be an event's data.
    pub fn check_payload(
        &self,
        payload: &[u8],
        content_type: ContentType,
    ) -> Result<(), Violation> {
        let data = match content_type {
            ContentType::Json => serde_json::from_slice(payload).map_err(|e| Violation {
                field: "/data".into(),
                keyword: "type".into(),
                message: format!("data is not JSON: {e}"),
            })?,
            ContentType::Text => {
                serde_json::Value::String(String::from_utf8_lossy(payload).into_owned())
            }
            ContentType::Binary => {
                return Err(Violation {
                    field: "/data".into(),
                    keyword: "type".into(),
                    message: "data is opaque bytes, which a schema cannot check".into(),
                });
            }
        };
        self.check(&data)
    }
}

/// `*` matches any run of characters, `?` any one; everything else matches itself.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // The classic two-pointer match with one backtrack point (the last `*`).
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The schemas ingest checks events against before accepting them: each rule names the
/// sources it covers (a glob) and a schema; an event is checked against every rule whose glob
/// matches its source.
#[derive(Debug, Clone, Default)]
pub struct DoorSchemas {
    rules: Vec<(String, Schema)>,
}

impl DoorSchemas {
    pub fn new(rules: Vec<(String, Schema)>) -> Self {
        DoorSchemas { rules }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Checks an event about to be accepted: `Err` is the first violation, to answer with.
    pub fn check(
        &self,
        source: &str,
        payload: &[u8],
        content_type: ContentType,
    ) -> Result<(), Violation> {
        for (glob, schema) in &self.rules {
            if glob_matches(glob, source) {
                schema.check_payload(payload, content_type)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reading() -> Schema {
        Schema::compile(
            &json!({
                "type": "object",
                "required": ["fahrenheit"],
                "properties": {"fahrenheit": {"type": "number", "minimum": -200}}
            }),
            "reading",
        )
        .expect("valid schema")
    }

    #[test]
    fn a_violation_names_the_field_and_keyword() {
        let schema = reading();
        assert_eq!(schema.check(&json!({"fahrenheit": 70})), Ok(()));
        let violation = schema
            .check(&json!({"fahrenheit": "hot"}))
            .expect_err("a string is not a number");
        assert_eq!(violation.field, "/data/fahrenheit");
        assert_eq!(violation.keyword, "type");
        let violation = schema.check(&json!({})).expect_err("missing");
        assert_eq!(violation.field, "/data");
        assert_eq!(violation.keyword, "required");
        assert!(violation.message.contains("fahrenheit"), "{violation}");
    }

    #[test]
    fn draft_7_is_read_from_the_schema_itself() {
        let schema = Schema::compile(
            &json!({"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "string"}]}),
            "d7",
        )
        .expect("draft 7 tuple items");
        assert!(schema.check(&json!(["a", 1])).is_ok());
        assert!(schema.check(&json!([1])).is_err());
    }

    #[test]
    fn a_bad_schema_is_refused_naming_it() {
        let error = Schema::compile(&json!({"type": "nonsense"}), "bad.json").expect_err("bad");
        assert!(error.contains("bad.json"), "{error}");
    }

    #[test]
    fn globs_match_sources() {
        assert!(glob_matches("sensor-*", "sensor-01"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("a?c", "abc"));
        assert!(glob_matches("*-x-*", "a-x-b"));
        assert!(!glob_matches("sensor-*", "pump-01"));
        assert!(!glob_matches("a?c", "ac"));
    }

    #[test]
    fn the_door_checks_only_matching_sources() {
        let door = DoorSchemas::new(vec![("sensor-*".into(), reading())]);
        assert!(door.check("pump", b"{}", ContentType::Json).is_ok());
        let violation = door
            .check("sensor-1", br#"{"fahrenheit":"x"}"#, ContentType::Json)
            .expect_err("checked");
        assert_eq!(violation.field, "/data/fahrenheit");
        assert!(
            door.check("sensor-1", b"oops", ContentType::Binary)
                .is_err()
        );
    }
}

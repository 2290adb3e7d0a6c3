//! The events sent: the seed body `{"source":..,"data":..,"metadata":..}` with a `data` of the
//! requested size. Every event is the same (the target gives each its own id).

use std::collections::BTreeMap;

/// Metadata every generated event carries, so its records can be told apart in a sink.
pub const METADATA_KEY: &str = "generator";
pub const METADATA_VALUE: &str = "conveyor-load";

/// A JSON value exactly `bytes` long: `{"pad":"xxx…"}`, or digits when `bytes` is under 10.
pub fn data_json(bytes: usize) -> String {
    const WRAPPER: usize = r#"{"pad":""}"#.len();
    if bytes < WRAPPER {
        return "1".repeat(bytes.max(1));
    }
    format!(r#"{{"pad":"{}"}}"#, "x".repeat(bytes - WRAPPER))
}

/// One event's JSON body with a `data` of `payload_bytes` bytes.
pub fn event_json(source: &str, payload_bytes: usize) -> String {
    let source = serde_json::to_string(source).expect("a string serialises");
    format!(
        r#"{{"source":{source},"data":{},"metadata":{{"{METADATA_KEY}":"{METADATA_VALUE}"}}}}"#,
        data_json(payload_bytes)
    )
}

pub fn metadata() -> BTreeMap<String, String> {
    BTreeMap::from([(METADATA_KEY.to_owned(), METADATA_VALUE.to_owned())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_has_the_requested_size_and_the_body_parses_as_an_event() {
        for n in [1, 5, 9, 10, 11, 128, 4096] {
            let data = data_json(n);
            assert_eq!(data.len(), n, "{data}");
            serde_json::from_str::<serde_json::Value>(&data).expect("data is JSON");
            let body = event_json("load \"gen\"", n);
            let draft = conveyor_core::body::parse_event(body.as_bytes(), None)
                .unwrap_or_else(|e| panic!("conveyor refuses {body}: {e}"));
            assert_eq!(draft.source, "load \"gen\"");
            assert_eq!(draft.payload.len(), n);
            assert_eq!(draft.metadata, metadata());
        }
    }
}

//! What the sink benchmarks share: their knobs and their events.

use std::collections::BTreeMap;

use conveyor_core::{ContentType, Event};

/// A whole-number knob from the environment (`BENCH_EVENTS=…`), or `default`.
pub fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` small sensor readings with ids `{tag}-0…`, a metadata entry each: what the sink
/// benchmarks write (fresh tags per run, since the sinks skip ids they have seen).
pub fn sensor_events(tag: &str, n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            id: format!("{tag}-{i}").into(),
            source: "sensor-1".into(),
            timestamp_ms: 1_764_000_000_000 + i as u64,
            payload: bytes::Bytes::from(format!(
                r#"{{"celsius":{},"room":"a-{}"}}"#,
                i % 40,
                i % 7
            )),
            content_type: ContentType::Json,
            metadata: BTreeMap::from([("region".to_owned(), "eu".to_owned())]).into(),
            attempt: 1,
            headers: BTreeMap::new(),
        })
        .collect()
}

//! One event (~200 bytes) through each kind of pipeline stage: a typical `transform` (four
//! field edits), a `filter`, a `validate` against a 10-property schema, and the three with a
//! route condition as one pipeline, with allocations per event; and `.` as a transform, the
//! cost of the event's round trip through jq's values alone.
//!
//! Run: `cargo bench -p conveyor-pipeline --bench stages`

use std::alloc::System;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use conveyor_core::{ContentType, Event};
use conveyor_pipeline::{Config, Outcome, Pipelines};
use criterion::{Criterion, Throughput, criterion_group};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SCHEMA: &str = r#"{"type":"object","required":["fahrenheit","site"],"properties":{
  "fahrenheit":{"type":"number"},"site":{"type":"string"},"seq":{"type":"integer"},
  "ok":{"type":"boolean"},"unit":{"type":"string"},"zone":{"type":"string"},
  "floor":{"type":"integer","minimum":0},"rack":{"type":"string"},"probe":{"type":"string"},
  "battery":{"type":"number","maximum":100}}}"#;

fn event() -> Event {
    let data = r#"{"fahrenheit":71.3,"site":"warehouse-a","seq":1234,"ok":true,"unit":"F","zone":"north","floor":2,"rack":"r-17","probe":"p-3","battery":88.5}"#;
    Event {
        id: "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
        source: "sensor-01".into(),
        timestamp_ms: 1_764_612_345_678,
        payload: Bytes::from_static(data.as_bytes()),
        content_type: ContentType::Json,
        metadata: Arc::new(BTreeMap::from([("location".to_owned(), "dock".to_owned())])),
        attempt: 1,
        headers: BTreeMap::new(),
    }
}

/// The pipelines of a config with one pipeline of `stages` (and `route`).
fn pipelines(dir: &Path, stages: &str, route: &str) -> Pipelines {
    std::fs::write(dir.join("reading.json"), SCHEMA).expect("schema");
    let path = dir.join("bench.toml");
    std::fs::write(
        &path,
        format!("[[pipelines]]\nname = \"p\"\nstages = [ {stages} ]\nroute = [ {route} ]\n"),
    )
    .expect("config");
    Config::load(&path)
        .unwrap_or_else(|problems| panic!("{problems}"))
        .pipelines
}

const TRANSFORM: &str = r#"{ transform = '.data.celsius = ((.data.fahrenheit - 32) * 5 / 9) | del(.data.fahrenheit) | .data.unit = "C" | .metadata.checked = "yes"' }"#;
const FILTER: &str = r#"{ filter = '.data.fahrenheit > -76 and .data.ok' }"#;
const VALIDATE: &str = r#"{ validate = "reading.json" }"#;

fn cases(dir: &Path) -> Vec<(&'static str, Pipelines)> {
    let all = format!("{VALIDATE}, {TRANSFORM}, {{ filter = '.data.celsius > -60' }}");
    vec![
        // The cost of the event's round trip through jq's values alone.
        (
            "identity_transform",
            pipelines(dir, "{ transform = '.' }", "{ to = [\"default\"] }"),
        ),
        (
            "transform",
            pipelines(dir, TRANSFORM, "{ to = [\"default\"] }"),
        ),
        ("filter", pipelines(dir, FILTER, "{ to = [\"default\"] }")),
        (
            "validate",
            pipelines(dir, VALIDATE, "{ to = [\"default\"] }"),
        ),
        (
            "validate_transform_filter_route",
            pipelines(
                dir,
                &all,
                "{ when = '.data.celsius > 40', to = [\"default\"] }, { to = [\"default\"] }",
            ),
        ),
    ]
}

fn run(pipelines: &Pipelines, event: &Event) {
    match pipelines.run(black_box(event.clone()), &mut ()) {
        Outcome::Routed(out) => {
            black_box(out);
        }
        other => panic!("the bench event passes: {other:?}"),
    }
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let event = event();
    let mut group = c.benchmark_group("stages");
    group.throughput(Throughput::Elements(1));
    for (name, pipelines) in cases(dir.path()) {
        let region = Region::new(GLOBAL);
        for _ in 0..1000 {
            run(&pipelines, &event);
        }
        println!(
            "{name}: {:.1} allocations per event",
            region.change().allocations as f64 / 1000.0
        );
        group.bench_function(name, |b| b.iter(|| run(&pipelines, &event)));
    }
    group.finish();
}

criterion_group!(stages, benches);

fn main() {
    stages();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

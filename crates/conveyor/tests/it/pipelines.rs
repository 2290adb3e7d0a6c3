//! Pipelines from a config file, end to end against the binary: door schemas, jq transforms,
//! filters, splits, routes and fan-out to named file sinks, permanent failures in the DLQ,
//! runaway programs, reload on SIGHUP, and `conveyor validate` / `conveyor test`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use conveyor_proto::v1::{IngestBatchRequest, IngestRequest};
use serde_json::{Value, json};

use crate::harness::{
    Conveyor, Spawn, assert_error, conveyor_command, eventually, id_counts, read_json,
    read_sink_file, total,
};

const READING_SCHEMA: &str = r#"{
  "type": "object",
  "required": ["fahrenheit"],
  "properties": { "fahrenheit": { "type": "number" } }
}"#;

const SITE_SCHEMA: &str = r#"{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "type": "object",
  "required": ["site"],
  "properties": { "site": { "type": "string" } }
}"#;

/// The config of the big test: two pipelines, a door schema, two named file sinks (and the
/// flag's `default` for everything else).
fn sensor_config(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("reading.json"), READING_SCHEMA).expect("write schema");
    std::fs::write(dir.join("site.json"), SITE_SCHEMA).expect("write schema");
    let config = format!(
        r#"
[sinks.warehouse]
type = "file"
path = "{warehouse}"

[sinks.alerts]
type = "file"
path = "{alerts}"

[[schemas]]
source = "sensor-*"
schema = "reading.json"

[[pipelines]]
name = "sensors"
match = '.source | startswith("sensor-")'
stages = [
  {{ validate = "site.json" }},
  {{ transform = '.data.celsius = ((.data.fahrenheit - 32) * 5 / 9) | del(.data.fahrenheit) | .metadata.unit = "C"' }},
  {{ filter = '.data.celsius > -60', name = "not-frozen" }},
]
route = [
  {{ when = '.data.celsius > 40', to = ["alerts", "warehouse"] }},
  {{ to = ["warehouse"] }},
]

[[pipelines]]
name = "batches"
match = '.source == "batch"'
stages = [
  {{ transform = '.data.items[] as $i | .data = $i', split = true }},
  {{ filter = '.data > 1' }},
]
route = [ {{ to = ["warehouse"] }} ]
"#,
        warehouse = dir.join("warehouse.ndjson").display(),
        alerts = dir.join("alerts.ndjson").display(),
    );
    let path = dir.join("conveyor.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// One generated event, by kind (`i % 10`), and what must become of it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Written to the warehouse with celsius computed.
    Warehouse(f64),
    /// Written to alerts and to the warehouse (fan-out).
    Alert(f64),
    Dropped,
    /// In the DLQ, failed at the sensors pipeline's validate stage.
    DeadLettered,
    /// Refused at the door with 422 / a line error.
    Refused,
    /// Split into `<id>/1` and `<id>/2` (item 1 filtered out) in the warehouse.
    Split,
    /// No pipeline matches: the default sink, unchanged.
    Default,
}

fn generated(i: usize) -> (Value, Fate) {
    let id = format!("pipe-{i}");
    let f = |fahrenheit: f64| (fahrenheit - 32.0) * 5.0 / 9.0;
    match i % 10 {
        0..=3 => {
            let fahrenheit = 50.0 + (i % 30) as f64;
            (
                json!({"id": id, "source": "sensor-1", "data": {"fahrenheit": fahrenheit, "site": "a"}}),
                Fate::Warehouse(f(fahrenheit)),
            )
        }
        4 => (
            json!({"id": id, "source": "sensor-2", "data": {"fahrenheit": 120, "site": "b"}}),
            Fate::Alert(f(120.0)),
        ),
        5 => (
            json!({"id": id, "source": "sensor-3", "data": {"fahrenheit": -100, "site": "c"}}),
            Fate::Dropped,
        ),
        6 => (
            json!({"id": id, "source": "sensor-4", "data": {"fahrenheit": 70}}),
            Fate::DeadLettered,
        ),
        7 => (
            json!({"id": id, "source": "sensor-5", "data": {"fahrenheit": "hot", "site": "d"}}),
            Fate::Refused,
        ),
        8 => (
            json!({"id": id, "source": "batch", "data": {"items": [1, 2, 3]}}),
            Fate::Split,
        ),
        _ => (
            json!({"id": id, "source": "pump", "data": {"rpm": i}}),
            Fate::Default,
        ),
    }
}

fn grpc_request(event: &Value) -> IngestRequest {
    IngestRequest {
        id: event["id"].as_str().expect("id").to_owned(),
        source: event["source"].as_str().expect("source").to_owned(),
        payload: serde_json::to_vec(&event["data"]).expect("data").into(),
        content_type: "application/json".to_owned(),
        ..Default::default()
    }
}

/// Sink records by id, asserting none is there twice.
fn by_id(path: &Path) -> HashMap<String, Value> {
    let records = read_sink_file(path);
    let counts = id_counts(&records);
    if let Some((id, n)) = counts.iter().find(|(_, n)| **n > 1) {
        panic!("{id} is {n} times in {}", path.display());
    }
    records
        .into_iter()
        .map(|r| (r["id"].as_str().expect("record id").to_owned(), r))
        .collect()
}

fn assert_celsius(record: &Value, celsius: f64) {
    let got = record["data"]["celsius"]
        .as_f64()
        .unwrap_or_else(|| panic!("no celsius: {record}"));
    assert!(
        (got - celsius).abs() < 1e-9,
        "celsius {got}, expected {celsius}: {record}"
    );
    assert!(
        record["data"].get("fahrenheit").is_none(),
        "fahrenheit removed: {record}"
    );
    assert_eq!(record["metadata"]["unit"], "C", "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_routed_transformed_dropped_or_dead_lettered_exactly_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = sensor_config(dir.path());
    let conveyor = Spawn::new("run")
        .args(["--config", config.to_str().expect("utf-8 path")])
        .start()
        .await;

    // The door: one non-conforming event alone is a 422 naming the field.
    let (code, body) = read_json(
        conveyor
            .http()
            .post(conveyor.url("/api/v1/ingest"))
            .json(&json!({"source": "sensor-9", "data": {"fahrenheit": "warm"}}))
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert_error(
        "door",
        code,
        &body,
        422,
        "schema_violation",
        Some("/data/fahrenheit"),
    );

    let total_events = 10_000;
    let mut fates = HashMap::new();
    let events: Vec<(Value, Fate)> = (0..total_events).map(generated).collect();
    for (event, fate) in &events {
        fates.insert(event["id"].as_str().expect("id").to_owned(), *fate);
    }
    // 6,000 over HTTP NDJSON in batches of 500, 4,000 over gRPC in batches of 500.
    let (http_part, grpc_part) = events.split_at(6_000);
    for chunk in http_part.chunks(500) {
        let body: String = chunk.iter().map(|(e, _)| format!("{e}\n")).collect();
        let (code, answer) = read_json(
            conveyor
                .http()
                .post(conveyor.url("/api/v1/ingest/batch"))
                .header("content-type", "application/x-ndjson")
                .body(body)
                .send()
                .await
                .expect("POST batch"),
        )
        .await;
        assert_eq!(code, 207, "some lines are refused at the door: {answer}");
        for result in answer["results"].as_array().expect("results") {
            let index = result["index"].as_u64().expect("index") as usize;
            let fate = chunk[index].1;
            if fate == Fate::Refused {
                assert_eq!(result["error"]["code"], "schema_violation", "{result}");
                assert_eq!(result["error"]["field"], "/data/fahrenheit", "{result}");
            } else {
                assert!(result["messageId"].is_string(), "{result}");
            }
        }
    }
    let mut client = conveyor.grpc().await;
    for chunk in grpc_part.chunks(500) {
        let answer = client
            .ingest_batch(IngestBatchRequest {
                events: chunk.iter().map(|(e, _)| grpc_request(e)).collect(),
            })
            .await
            .expect("a gRPC batch is answered per event")
            .into_inner();
        for (result, (_, fate)) in answer.results.iter().zip(chunk) {
            match (&result.error, fate) {
                (Some(error), Fate::Refused) => {
                    assert_eq!(error.code, "schema_violation", "{error:?}");
                    assert_eq!(error.field, "/data/fahrenheit", "{error:?}");
                }
                (None, Fate::Refused) => panic!("a door violation was accepted over gRPC"),
                (Some(error), _) => panic!("refused over gRPC: {error:?}"),
                (None, _) => {}
            }
        }
    }

    let count = |want: fn(&Fate) -> bool| fates.values().filter(|f| want(f)).count() as u64;
    let accepted = count(|f| *f != Fate::Refused);
    let status = eventually(
        "every accepted event to be settled",
        Duration::from_secs(120),
        async || {
            let status = conveyor.status().await;
            let settled = total(&status, "processed")
                + total(&status, "dropped")
                + total(&status, "dead_lettered");
            if total(&status, "accepted") == accepted && settled == accepted {
                Ok(status)
            } else {
                Err(format!("totals are {}", status["totals"]))
            }
        },
    )
    .await;
    assert_eq!(
        total(&status, "dropped"),
        count(|f| *f == Fate::Dropped),
        "{status}"
    );
    assert_eq!(
        total(&status, "dead_lettered"),
        count(|f| *f == Fate::DeadLettered),
        "{status}"
    );
    assert_eq!(
        total(&status, "retried"),
        0,
        "permanent failures are not retried: {status}"
    );
    // 1 for the lone 422, plus the refused lines.
    assert_eq!(
        total(&status, "rejected"),
        count(|f| *f == Fate::Refused) + 1,
        "{status}"
    );

    let warehouse = by_id(&dir.path().join("warehouse.ndjson"));
    let alerts = by_id(&dir.path().join("alerts.ndjson"));
    let default = by_id(conveyor.sink_path());
    let (size, letters) = conveyor.dlq().await;
    let mut dead = HashMap::new();
    for letter in letters {
        let id = letter["id"].as_str().expect("id").to_owned();
        assert!(
            dead.insert(id.clone(), letter).is_none(),
            "{id} twice in the DLQ"
        );
    }
    assert_eq!(size, count(|f| *f == Fate::DeadLettered));

    let mut expected_warehouse = 0;
    for (id, fate) in &fates {
        let in_warehouse = warehouse.get(id);
        match fate {
            Fate::Warehouse(celsius) => {
                assert_celsius(
                    in_warehouse.unwrap_or_else(|| panic!("{id} not in warehouse")),
                    *celsius,
                );
                assert!(!alerts.contains_key(id), "{id} is not an alert");
                expected_warehouse += 1;
            }
            Fate::Alert(celsius) => {
                assert_celsius(
                    alerts
                        .get(id)
                        .unwrap_or_else(|| panic!("{id} not in alerts")),
                    *celsius,
                );
                assert_celsius(
                    in_warehouse.unwrap_or_else(|| panic!("{id} not fanned out to warehouse")),
                    *celsius,
                );
                expected_warehouse += 1;
            }
            Fate::Split => {
                assert!(in_warehouse.is_none(), "the parent {id} is not written");
                for (n, value) in [(1, 2), (2, 3)] {
                    let child = warehouse
                        .get(&format!("{id}/{n}"))
                        .unwrap_or_else(|| panic!("{id}/{n} not in warehouse"));
                    assert_eq!(child["data"], value, "{child}");
                }
                assert!(
                    !warehouse.contains_key(&format!("{id}/0")),
                    "item 1 is filtered out"
                );
                expected_warehouse += 2;
            }
            Fate::Default => {
                let record = default
                    .get(id)
                    .unwrap_or_else(|| panic!("{id} not in the default sink"));
                assert!(record["data"]["rpm"].is_number(), "unchanged: {record}");
            }
            Fate::DeadLettered => {
                let letter = dead
                    .get(id)
                    .unwrap_or_else(|| panic!("{id} not in the DLQ"));
                let error = letter["error"].as_str().expect("error text");
                assert!(
                    error.contains("pipeline sensors stage 1-validate") && error.contains("site"),
                    "{letter}"
                );
                assert_eq!(letter["attempts"], 1, "no retries: {letter}");
                assert!(in_warehouse.is_none());
            }
            Fate::Dropped | Fate::Refused => {
                assert!(
                    in_warehouse.is_none() && !alerts.contains_key(id) && !default.contains_key(id)
                );
            }
        }
    }
    assert_eq!(
        warehouse.len(),
        expected_warehouse,
        "nothing else in the warehouse"
    );
    assert_eq!(alerts.len() as u64, count(|f| matches!(f, Fate::Alert(_))));
    assert_eq!(default.len() as u64, count(|f| *f == Fate::Default));

    // The per-pipeline metrics saw the same.
    let (_, metrics) = conveyor.get_raw("/metrics").await;
    for line in [
        format!(
            "conveyor_pipeline_events_total{{pipeline=\"sensors\",result=\"dropped\"}} {}",
            count(|f| *f == Fate::Dropped)
        ),
        format!(
            "conveyor_stage_events_total{{pipeline=\"sensors\",stage=\"1-validate\",result=\"failed\"}} {}",
            count(|f| *f == Fate::DeadLettered)
        ),
        format!(
            "conveyor_sink_events_total{{sink=\"alerts\",result=\"written\"}} {}",
            count(|f| matches!(f, Fate::Alert(_)))
        ),
    ] {
        assert!(metrics.contains(&line), "{line} not in /metrics");
    }
}

/// Runs `conveyor <args>` to its exit: status code, stdout and stderr.
async fn run_tool(args: &[&str]) -> (i32, String, String) {
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        conveyor_command().args(args).output(),
    )
    .await
    .expect("the command exits")
    .expect("run conveyor");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_jq_syntax_error_stops_start_up_naming_the_place() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[pipelines]]\nname = \"p\"\nstages = [\n  { transform = '.data | | .x' },\n]\n",
    )
    .expect("write");
    let (status, stderr) = Spawn::new("run")
        .args(["--config", path.to_str().expect("utf-8")])
        .run_to_exit(Duration::from_secs(30))
        .await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    let place = format!("{}:4:26:", path.display());
    assert!(stderr.contains(&place), "names {place}: {stderr}");
    assert!(
        stderr.contains("pipeline p stage 1 (transform)"),
        "{stderr}"
    );
}

#[tokio::test]
async fn validate_and_test_answer_with_exit_codes_and_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = sensor_config(dir.path());
    let mut text = std::fs::read_to_string(&config).expect("read");
    text.push_str(
        r#"
[[tests]]
name = "hot readings alert"
input = { source = "sensor-1", data = { fahrenheit = 212, site = "x" } }
expect = { data = { celsius = 100, site = "x" }, to = ["alerts", "warehouse"] }

[[tests]]
name = "frozen readings are dropped"
input = { source = "sensor-1", data = { fahrenheit = -100, site = "x" } }
expect = { drop = true }
"#,
    );
    std::fs::write(&config, &text).expect("write");
    let config_arg = config.to_str().expect("utf-8");
    let (code, stdout, stderr) = run_tool(&["validate", "--config", config_arg]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("pipeline sensors"), "{stdout}");
    assert!(stdout.contains("door schemas: 1"), "{stdout}");

    let (code, stdout, stderr) = run_tool(&["test", "--config", config_arg]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ok    hot readings alert"), "{stdout}");
    assert!(stdout.contains("2 passed, 0 failed"), "{stdout}");

    // A wrong expectation fails the run, naming the difference.
    std::fs::write(&config, text.replace("celsius = 100,", "celsius = 99,")).expect("write");
    let (code, stdout, _) = run_tool(&["test", "--config", config_arg]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("FAIL  hot readings alert: output 1: data"),
        "{stdout}"
    );

    // Problems: each named with its place, exit 64.
    std::fs::write(
        &config,
        "[sinks.s]\ntype = \"file\"\npaht = \"x\"\n\n[[pipelines]]\nname = \"p\"\nmatch = '.a |'\nroute = [ { to = [\"s\", \"nowhere\"] } ]\n",
    )
    .expect("write");
    let (code, stdout, stderr) = run_tool(&["validate", "--config", config_arg]).await;
    assert_eq!(code, 64, "{stdout}{stderr}");
    for expected in [":7:", "no sink named 'nowhere'"] {
        assert!(stderr.contains(expected), "{expected}: {stderr}");
    }
}

fn write_version_config(path: &Path, version: &str) {
    std::fs::write(
        path,
        format!(
            "[[pipelines]]\nname = \"v\"\nstages = [ {{ transform = '.metadata.version = \"{version}\"' }} ]\n"
        ),
    )
    .expect("write config");
}

fn sighup(conveyor: &Conveyor) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &conveyor.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
}

async fn send_and_read_version(conveyor: &Conveyor, id: &str) -> String {
    let (code, body) = conveyor
        .post_json(
            "/api/v1/ingest",
            &json!({"id": id, "source": "s", "data": {}}),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    eventually(
        &format!("{id} in the sink"),
        Duration::from_secs(30),
        async || {
            read_sink_file(conveyor.sink_path())
                .into_iter()
                .find(|r| r["id"] == id)
                .map(|r| {
                    r["metadata"]["version"]
                        .as_str()
                        .unwrap_or("none")
                        .to_owned()
                })
                .ok_or_else(|| "not yet".to_owned())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_old_pipeline_and_a_good_one_changes_new_events() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("conveyor.toml");
    write_version_config(&path, "1");
    let conveyor = Spawn::new("run")
        .args(["--config", path.to_str().expect("utf-8")])
        .start()
        .await;
    assert_eq!(send_and_read_version(&conveyor, "r-1").await, "1");

    std::fs::write(
        &path,
        "[[pipelines]]\nname = \"v\"\nstages = [ { transform = '.metadata |' } ]\n",
    )
    .expect("write bad config");
    sighup(&conveyor);
    let status = eventually(
        "the refusal in the status",
        Duration::from_secs(20),
        async || {
            let status = conveyor.status().await;
            let config = &status["processor"]["stats"]["config"];
            if config["reloads_refused"] == 1 {
                Ok(status)
            } else {
                Err(format!("{status}"))
            }
        },
    )
    .await;
    let refusal = status["processor"]["stats"]["config"]["last_refusal"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_refusal: {status}"));
    assert!(refusal.contains("conveyor.toml:3:"), "{refusal}");
    assert_eq!(
        send_and_read_version(&conveyor, "r-2").await,
        "1",
        "the old pipeline runs"
    );
    let (_, metrics) = conveyor.get_raw("/metrics").await;
    assert!(
        metrics.contains("conveyor_config_reloads_total{result=\"refused\"} 1"),
        "{metrics}"
    );

    write_version_config(&path, "2");
    sighup(&conveyor);
    eventually("the reload to apply", Duration::from_secs(20), async || {
        let status = conveyor.status().await;
        if status["processor"]["stats"]["config"]["reloads_applied"] == 1 {
            Ok(())
        } else {
            Err(format!("{status}"))
        }
    })
    .await;
    assert_eq!(send_and_read_version(&conveyor, "r-3").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_program_is_stopped_and_dead_lettered_while_others_flow() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("conveyor.toml");
    std::fs::write(
        &path,
        r#"
[defaults]
# The step budget stops it; the time budget (checked by the crate's own tests) is set far
# enough out that a loaded machine cannot reach it first.
budget = { steps = 100000, time_ms = 30000 }

[[pipelines]]
name = "loops"
match = '.source == "loop"'
stages = [ { transform = '.data.all = [repeat(1)]' } ]
"#,
    )
    .expect("write");
    let conveyor = Spawn::new("run")
        .args(["--config", path.to_str().expect("utf-8")])
        .start()
        .await;
    for (id, source) in [("loop-1", "loop"), ("fine-1", "fine")] {
        let (code, body) = conveyor
            .post_json(
                "/api/v1/ingest",
                &json!({"id": id, "source": source, "data": {}}),
            )
            .await;
        assert_eq!(code, 202, "{body}");
    }
    eventually(
        "the loop in the DLQ and the other written",
        Duration::from_secs(30),
        async || {
            let (size, letters) = conveyor.dlq().await;
            let written = read_sink_file(conveyor.sink_path());
            if size == 1 && written.iter().any(|r| r["id"] == "fine-1") {
                let error = letters[0]["error"].as_str().unwrap_or_default().to_owned();
                assert!(error.contains("100000 generator steps"), "{error}");
                assert_eq!(letters[0]["attempts"], 1, "not retried");
                Ok(())
            } else {
                Err(format!("DLQ {size}, sink {}", written.len()))
            }
        },
    )
    .await;
}

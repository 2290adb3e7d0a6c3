//! Trace context and OTLP export: one trace id from the door to the sink, in split mode and in
//! `conveyor run`, recorded by an in-process OTLP/HTTP collector that decodes the protobuf with
//! the upstream OTLP types (`collector`); the exporter's https, headers, retry and sampling
//! (`export`).

mod collector;
mod export;

use std::time::Duration;

use serde_json::json;

use crate::harness::{Conveyor, Spawn, Split, accepted_id, eventually, spawn_split_with};
use collector::{Collector, Span};

/// Waits until the trace holds a door span, a publish span and a process span for every one
/// of `events`, each the child of the one before, and returns the door span.
pub(crate) async fn assert_chain(
    collector: &Collector,
    trace_id: &str,
    services: [&str; 3],
    door: &str,
    events: &[String],
) -> Span {
    eventually(
        &format!("trace {trace_id}: {door} → publish → process for {events:?}"),
        Duration::from_secs(20),
        async || {
            let spans = collector.trace(trace_id);
            let find = |service: &str, name: &str, parent: Option<&str>| {
                spans
                    .iter()
                    .filter(|s| s.service == service && s.name == name)
                    .filter(|s| parent.is_none() || s.parent.as_deref() == parent)
                    .cloned()
                    .collect::<Vec<_>>()
            };
            let doors = find(services[0], door, None);
            let [door_span] = doors.as_slice() else {
                return Err(format!(
                    "{} {door} spans of {}: {spans:?}",
                    doors.len(),
                    services[0]
                ));
            };
            let publishes = find(services[1], "publish", Some(&door_span.span_id));
            let [publish] = publishes.as_slice() else {
                return Err(format!(
                    "{} publish spans of {} under the door span: {spans:?}",
                    publishes.len(),
                    services[1]
                ));
            };
            let processes = find(services[2], "process", Some(&publish.span_id));
            for id in events {
                if !processes.iter().any(|s| s.event_id.as_deref() == Some(id)) {
                    return Err(format!(
                        "no process span of {} for {id} under the publish span: {spans:?}",
                        services[2]
                    ));
                }
            }
            if processes.len() != events.len() {
                return Err(format!("{} process spans: {spans:?}", processes.len()));
            }
            Ok(door_span.clone())
        },
    )
    .await
}

pub(crate) const PARENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
pub(crate) const PARENT_SPAN: &str = "00f067aa0ba902b7";

pub(crate) async fn post_event(target: &Conveyor, traceparent: Option<&str>, id: &str) -> String {
    let mut request = target
        .http()
        .post(target.url("/api/v1/ingest"))
        .json(&json!({"id": id, "source": "trace-test", "data": {"n": 1}}));
    if let Some(value) = traceparent {
        request = request.header("traceparent", value);
    }
    let response = request.send().await.expect("POST /api/v1/ingest");
    let (code, body) = crate::harness::read_json(response).await;
    assert_eq!(code, 202, "POST /api/v1/ingest: {body}");
    accepted_id("POST /api/v1/ingest", &body, Some(id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_carries_one_trace_from_gateway_through_ingest_to_the_processor() {
    split_mode_trace(|spawn| spawn).await;
}

/// The same over NATS: the trace context travels in the broker message's encoded event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_over_nats_carries_one_trace_through_the_broker() {
    let server = conveyor_testkit::NatsServer::start();
    let url = server.url();
    split_mode_trace(|spawn| spawn.env("QUEUE_TYPE", "nats").env("NATS_URL", &url)).await;
}

/// The same over Kafka (a tansu broker): the context travels in the record's encoded event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_over_kafka_carries_one_trace_through_the_broker() {
    let broker = conveyor_testkit::KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    split_mode_trace(|spawn| {
        spawn
            .env("QUEUE_TYPE", "kafka")
            .env("KAFKA_BROKERS", &bootstrap)
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env("KAFKA_PARTITIONS", "3")
    })
    .await;
}

/// Split mode with every role exporting to a collector; `queue` configures ingest's and the
/// processor's queue.
async fn split_mode_trace(queue: impl Fn(Spawn) -> Spawn) {
    let collector = Collector::start().await;
    let otlp = ["--otlp-endpoint", collector.url.as_str()];
    // Ingest gets the collector through the environment, the others through the flag.
    let Split {
        processor,
        ingest: _ingest,
        gateway,
    } = spawn_split_with(|role, spawn| match role {
        "processor" => queue(spawn).args(otlp),
        "ingest" => queue(spawn).env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url),
        _ => spawn.args(otlp),
    })
    .await;
    let services = ["conveyor-gateway", "conveyor-ingest", "conveyor-processor"];

    // The caller's trace: the gateway's span is the child of the caller's span.
    let traceparent = format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01");
    let id = post_event(&gateway, Some(&traceparent), "traced-split-1").await;
    let door = assert_chain(&collector, PARENT_TRACE, services, "ingest", &[id]).await;
    assert_eq!(door.parent.as_deref(), Some(PARENT_SPAN));

    // No traceparent: the gateway starts a trace, and every service records into it.
    let id = post_event(&gateway, None, "traced-split-2").await;
    let trace_id = collector.trace_of_event(&id).await;
    assert_ne!(trace_id, PARENT_TRACE);
    let door = assert_chain(&collector, &trace_id, services, "ingest", &[id]).await;
    assert_eq!(door.parent, None, "the gateway's span is the trace's root");

    // The sink record is unchanged: no trace fields in it.
    let records = processor.wait_sink_len(2, Duration::from_secs(10)).await;
    assert!(
        records
            .iter()
            .all(|r| r.get("headers").is_none() && r.get("traceparent").is_none()),
        "{records:?}"
    );

    let (_, metrics) = gateway.get_raw("/metrics").await;
    assert!(
        metrics.contains("conveyor_trace_spans_exported_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conveyor_run_carries_one_trace_from_the_door_to_the_sink() {
    let collector = Collector::start().await;
    let run = Spawn::new("run")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url)
        .start()
        .await;
    let services = ["conveyor-run"; 3];

    let traceparent = format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01");
    let id = post_event(&run, Some(&traceparent), "traced-run-1").await;
    let door = assert_chain(&collector, PARENT_TRACE, services, "ingest", &[id]).await;
    assert_eq!(door.parent.as_deref(), Some(PARENT_SPAN));

    let id = post_event(&run, None, "traced-run-2").await;
    let trace_id = collector.trace_of_event(&id).await;
    let door = assert_chain(&collector, &trace_id, services, "ingest", &[id]).await;
    assert_eq!(door.parent, None);

    // A batch: one door span, one publish span, a process span per event.
    let response = run
        .http()
        .post(run.url("/api/v1/ingest/batch"))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .json(&json!([
            {"id": "traced-batch-1", "source": "trace-test", "data": 1},
            {"id": "traced-batch-2", "source": "trace-test", "data": 2},
        ]))
        .send()
        .await
        .expect("POST /api/v1/ingest/batch");
    assert_eq!(response.status().as_u16(), 202);
    let door = assert_chain(
        &collector,
        "0af7651916cd43dd8448eb211c80319c",
        services,
        "ingest_batch",
        &["traced-batch-1".into(), "traced-batch-2".into()],
    )
    .await;
    assert_eq!(door.parent.as_deref(), Some("b7ad6b7169203331"));

    // gRPC: the call's `traceparent` metadata.
    let mut request = tonic::Request::new(conveyor_proto::v1::IngestRequest {
        id: "traced-grpc-1".into(),
        source: "trace-test".into(),
        payload: b"{\"n\":1}".to_vec().into(),
        content_type: "application/json".into(),
        ..Default::default()
    });
    request.metadata_mut().insert(
        "traceparent",
        "00-11111111111111111111111111111111-2222222222222222-01"
            .parse()
            .expect("ASCII metadata"),
    );
    run.grpc().await.ingest(request).await.expect("gRPC Ingest");
    let door = assert_chain(
        &collector,
        "11111111111111111111111111111111",
        services,
        "ingest",
        &["traced-grpc-1".into()],
    )
    .await;
    assert_eq!(door.parent.as_deref(), Some("2222222222222222"));
}

#[tokio::test]
async fn a_bad_otlp_endpoint_is_a_configuration_error() {
    let (status, stderr) = Spawn::new("run")
        .args(["--otlp-endpoint", "not a url"])
        .run_to_exit(Duration::from_secs(20))
        .await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{stderr}");
}

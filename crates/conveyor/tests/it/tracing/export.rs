//! The exporter's side of item 2: an https collector, `OTEL_EXPORTER_OTLP_HEADERS` and the
//! resource variables, a retry after a 503, the sampler honouring an incoming `sampled=00`
//! (and `OTEL_TRACES_SAMPLER`), and the streaming gRPC calls' `traceparent` metadata.

use std::time::Duration;

use conveyor_proto::v1::IngestRequest;

use super::collector::{Collector, Options, Span};
use super::{PARENT_SPAN, PARENT_TRACE, assert_chain, post_event};
use crate::harness::{Conveyor, Spawn};

const RUN: [&str; 3] = ["conveyor-run"; 3];

/// `conveyor run` exporting to `collector`, with `env` set too.
async fn run_exporting_to(collector: &Collector, env: &[(&str, &str)]) -> Conveyor {
    env.iter()
        .fold(
            Spawn::new("run").env("OTEL_EXPORTER_OTLP_ENDPOINT", &collector.url),
            |spawn, (key, value)| spawn.env(key, value),
        )
        .start()
        .await
}

/// The caller's sampled context.
fn sampled() -> String {
    format!("00-{PARENT_TRACE}-{PARENT_SPAN}-01")
}

/// Sends one event with the caller's sampled context, waits for its whole chain (door →
/// publish → process, all `conveyor-run`'s) and returns the door span.
async fn send_traced(run: &Conveyor, collector: &Collector, id: &str) -> Span {
    let id = post_event(run, Some(&sampled()), id).await;
    let door = assert_chain(collector, PARENT_TRACE, RUN, "ingest", &[id]).await;
    assert_eq!(door.parent.as_deref(), Some(PARENT_SPAN));
    door
}

/// Every span the collector holds once `run`'s sink holds `events` records and the exporter
/// has had three more rounds.
async fn spans_once_quiet(run: &Conveyor, collector: &Collector, events: usize) -> Vec<Span> {
    run.wait_sink_len(events, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    collector.all()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_over_tls() {
    let collector = Collector::start_with(Options {
        tls: true,
        ..Options::default()
    })
    .await;
    let ca = collector.ca.clone().expect("the test CA");
    assert!(collector.url.starts_with("https://"), "{}", collector.url);
    let ca = ca.to_str().expect("a UTF-8 path");
    let run = run_exporting_to(&collector, &[("OTEL_EXPORTER_OTLP_CERTIFICATE", ca)]).await;
    send_traced(&run, &collector, "traced-tls-1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_headers_and_resource_variables_arrive_with_the_spans() {
    let collector = Collector::start().await;
    let run = run_exporting_to(
        &collector,
        &[
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme,api-key=s3cret"),
            ("OTEL_SERVICE_NAME", "conveyor-under-test"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
        ],
    )
    .await;
    let traceparent = sampled();
    // A tracestate travels with the context and is on the door's span.
    let response = run
        .http()
        .post(run.url("/api/v1/ingest"))
        .header("traceparent", &traceparent)
        .header("tracestate", "rojo=00f067aa0ba902b7")
        .json(&serde_json::json!({"id": "traced-headers-1", "source": "trace-test", "data": 1}))
        .send()
        .await
        .expect("POST /api/v1/ingest");
    assert_eq!(response.status().as_u16(), 202);
    let door = assert_chain(
        &collector,
        PARENT_TRACE,
        ["conveyor-under-test"; 3],
        "ingest",
        &["traced-headers-1".into()],
    )
    .await;
    assert_eq!(door.trace_state, "rojo=00f067aa0ba902b7");
    let instance = door.instance.clone().expect("a service.instance.id");
    assert!(!instance.is_empty());
    assert!(
        collector
            .trace(PARENT_TRACE)
            .iter()
            .all(|s| s.instance.as_deref() == Some(instance.as_str())),
        "one instance id per process"
    );
    let requests = collector.requests();
    assert!(!requests.is_empty());
    for headers in requests {
        assert_eq!(
            headers.get("x-tenant").map(|v| v.as_bytes()),
            Some(&b"acme"[..]),
            "{headers:?}"
        );
        assert_eq!(
            headers.get("api-key").map(|v| v.as_bytes()),
            Some(&b"s3cret"[..]),
            "{headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_answered_503_is_retried_and_its_spans_arrive() {
    let collector = Collector::start_with(Options {
        fail_first: 1,
        ..Options::default()
    })
    .await;
    let run = run_exporting_to(&collector, &[]).await;
    send_traced(&run, &collector, "traced-retry-1").await;
    assert!(
        collector.requests().len() >= 2,
        "the first request was answered 503, so a second one carried the spans"
    );
    let (_, metrics) = run.get_raw("/metrics").await;
    assert!(
        metrics.contains("conveyor_trace_spans_export_failed_total 0"),
        "no span was lost: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_traceparent_exports_no_spans() {
    let collector = Collector::start().await;
    let run = run_exporting_to(&collector, &[]).await;
    let unsampled = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    post_event(&run, Some(unsampled), "unsampled-1").await;
    // A sampled event after it: once its spans are in, the unsampled one's would be too.
    send_traced(&run, &collector, "sampled-1").await;
    let all = spans_once_quiet(&run, &collector, 2).await;
    assert!(
        all.iter()
            .all(|s| s.trace_id != "5bf92f3577b34da6a3ce929d0e0e4736"
                && s.event_id.as_deref() != Some("unsampled-1")),
        "spans of an unsampled trace: {all:?}"
    );

    // OTEL_TRACES_SAMPLER: parentbased_always_off records a trace only for a sampled caller.
    let collector = Collector::start().await;
    let run = run_exporting_to(
        &collector,
        &[("OTEL_TRACES_SAMPLER", "parentbased_always_off")],
    )
    .await;
    post_event(&run, None, "root-unsampled-1").await;
    send_traced(&run, &collector, "sampled-2").await;
    let all = spans_once_quiet(&run, &collector, 2).await;
    assert!(
        all.iter().all(|s| s.trace_id == PARENT_TRACE),
        "a new trace was recorded under parentbased_always_off: {all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_grpc_calls_take_the_traceparent_of_their_metadata() {
    let collector = Collector::start().await;
    let run = run_exporting_to(&collector, &[]).await;
    // One event: a door span per chunk of the stream, and this stream is one chunk.
    let events: Vec<IngestRequest> = (1..=1)
        .map(|n| IngestRequest {
            id: format!("traced-stream-{n}"),
            source: "trace-test".into(),
            payload: b"{\"n\":1}".to_vec().into(),
            content_type: "application/json".into(),
            ..Default::default()
        })
        .collect();
    let mut request = tonic::Request::new(tokio_stream::iter(events));
    request.metadata_mut().insert(
        "traceparent",
        "00-33333333333333333333333333333333-4444444444444444-01"
            .parse()
            .expect("ASCII metadata"),
    );
    let summary = run
        .grpc()
        .await
        .ingest_stream(request)
        .await
        .expect("gRPC IngestStream")
        .into_inner();
    assert_eq!(summary.accepted, 1, "{summary:?}");
    let door = assert_chain(
        &collector,
        "33333333333333333333333333333333",
        RUN,
        "ingest_stream",
        &["traced-stream-1".into()],
    )
    .await;
    assert_eq!(door.parent.as_deref(), Some("4444444444444444"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_grpc_collector_with_otel_exporter_otlp_protocol_grpc() {
    let collector = Collector::start_grpc(false).await;
    let run = run_exporting_to(
        &collector,
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme"),
        ],
    )
    .await;
    send_traced(&run, &collector, "traced-grpc-export-1").await;
    for headers in collector.requests() {
        assert_eq!(
            headers.get("x-tenant").map(|v| v.as_bytes()),
            Some(&b"acme"[..]),
            "{headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_a_grpc_collector_over_tls_gzipped() {
    let collector = Collector::start_grpc(true).await;
    assert!(collector.url.starts_with("https://"), "{}", collector.url);
    let ca = collector.ca.clone().expect("the test CA");
    let ca = ca.to_str().expect("a UTF-8 path");
    let run = run_exporting_to(
        &collector,
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ],
    )
    .await;
    send_traced(&run, &collector, "traced-grpc-tls-1").await;
    let requests = collector.requests();
    assert!(
        requests
            .iter()
            .all(|h| h.get("grpc-encoding").map(|v| v.as_bytes()) == Some(&b"gzip"[..])),
        "every export request gzipped: {requests:?}"
    );
}

/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` alone turns export on and is the URL spans are posted
/// to, as it is (the spec's signal-specific endpoint: nothing appended). Were `/v1/traces`
/// appended again, the collector would answer 404 and no span would arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_traces_specific_endpoint_is_used_as_it_is() {
    let collector = Collector::start().await;
    let run = Spawn::new("run")
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            &format!("{}/v1/traces", collector.url),
        )
        .start()
        .await;
    send_traced(&run, &collector, "traced-signal-endpoint-1").await;
}

//! `/metrics` in both exposition formats: Prometheus text by default, OpenMetrics (with
//! exemplars and `# EOF`) for a scraper that asks for it, the same families in both.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Conveyor, accepted_id, read_json, spawn_run, spawn_split};

use super::scrape::{Scrape, promtool_check_metrics, scrape};

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

async fn post_traced(target: &Conveyor, id: &str) {
    let response = target
        .http()
        .post(target.url("/api/v1/ingest"))
        .header("traceparent", format!("00-{TRACE}-b7ad6b7169203331-01"))
        .json(&json!({"id": id, "source": "exemplar-test", "data": {"n": 1}}))
        .send()
        .await
        .expect("POST /api/v1/ingest");
    let (code, body) = read_json(response).await;
    assert_eq!(code, 202, "POST /api/v1/ingest: {body}");
    accepted_id("POST /api/v1/ingest", &body, Some(id));
}

/// `GET /metrics` with `Accept: application/openmetrics-text`: its content type and text.
async fn scrape_openmetrics(service: &Conveyor) -> String {
    let response = service
        .http()
        .get(service.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    response.text().await.expect("read /metrics")
}

/// The family names of an OpenMetrics text, counters under their `_total` sample name.
fn openmetrics_families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| match rest.split_once(' ') {
            Some((name, "counter")) => format!("{name}_total"),
            Some((name, _)) => name.to_owned(),
            None => panic!("TYPE line without a type: {rest}"),
        })
        .collect()
}

/// OpenMetrics has what Prometheus text has, ends with `# EOF`, and its exemplars have the
/// standard shape; the Prometheus text passes promtool and has no exemplar.
fn assert_formats_agree(service: &str, prometheus: &Scrape, open: &str) {
    promtool_check_metrics(service, &prometheus.text);
    assert!(
        !prometheus.text.contains("trace_id") && !prometheus.text.contains("# EOF"),
        "{service}: exemplars or EOF in Prometheus text"
    );
    assert!(open.ends_with("# EOF\n"), "{service}: no # EOF at the end");
    let names: BTreeSet<String> = prometheus.types.keys().cloned().collect();
    assert_eq!(
        names,
        openmetrics_families(open),
        "{service}: families differ"
    );
    for line in open.lines().filter(|l| l.contains(" # {")) {
        let (sample, exemplar) = line.split_once(" # ").expect("exemplar");
        assert!(
            sample.contains("_bucket{"),
            "{service}: exemplar off a bucket: {line}"
        );
        let fields: Vec<&str> = exemplar.split(' ').collect();
        assert!(
            fields.len() == 3
                && fields[0].starts_with("{trace_id=\"")
                && fields[0].len() == "{trace_id=\"\"}".len() + 32
                && fields[1].parse::<f64>().is_ok()
                && fields[2].parse::<f64>().is_ok(),
            "{service}: exemplar {line}"
        );
    }
}

/// The bucket lines of `family` that carry `TRACE` as exemplar.
fn traced_buckets<'a>(open: &'a str, family: &str) -> Vec<&'a str> {
    let prefix = format!("{family}_bucket{{");
    open.lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&format!("{{trace_id=\"{TRACE}\"}}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_mode_openmetrics_shows_the_traced_requests_exemplars() {
    let conveyor = spawn_run(&[]).await;
    post_traced(&conveyor, "exemplar-1").await;
    conveyor
        .wait_until_processed(1, Duration::from_secs(20))
        .await;
    let open = scrape_openmetrics(&conveyor).await;
    let request = traced_buckets(&open, "http_request_duration_seconds");
    assert!(
        request
            .iter()
            .any(|l| l.contains("route=\"/api/v1/ingest\"") && l.contains("method=\"POST\"")),
        "no exemplar with the request's trace on its duration:\n{open}"
    );
    assert_eq!(
        traced_buckets(&open, "conveyor_end_to_end_latency_seconds").len(),
        1,
        "one exemplar with the event's trace on the end-to-end latency:\n{open}"
    );
    assert_formats_agree("run", &scrape(&conveyor).await, &open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_exemplars_follow_the_event_to_the_processor() {
    let split = spawn_split(&[]).await;
    post_traced(&split.gateway, "exemplar-split-1").await;
    split
        .gateway
        .wait_until_processed(1, Duration::from_secs(20))
        .await;
    let processor = scrape_openmetrics(&split.processor).await;
    assert_eq!(
        traced_buckets(&processor, "conveyor_end_to_end_latency_seconds").len(),
        1,
        "processor: the event's trace on the end-to-end latency:\n{processor}"
    );
    let gateway = scrape_openmetrics(&split.gateway).await;
    assert!(
        !traced_buckets(&gateway, "http_request_duration_seconds").is_empty(),
        "gateway: the request's trace on its duration:\n{gateway}"
    );
    for (name, service) in [
        ("gateway", &split.gateway),
        ("ingest", &split.ingest),
        ("processor", &split.processor),
    ] {
        let open = scrape_openmetrics(service).await;
        assert_formats_agree(name, &scrape(service).await, &open);
    }
}

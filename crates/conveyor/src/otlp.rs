//! OTLP/HTTP JSON export of the spans `conveyor_api::trace` records, when an endpoint is
//! configured (`--otlp-endpoint` / `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! One task per process takes the finished spans every [`EXPORT_INTERVAL`] and POSTs them,
//! at most [`MAX_EXPORT_BATCH`] per request, to `{endpoint}/v1/traces` as the standard JSON
//! mapping of `ExportTraceServiceRequest` (hex ids, `service.name` = `conveyor-<role>`). A
//! request that fails loses its spans (counted); the hot path never waits for a collector.

use std::sync::atomic::Ordering;
use std::time::Duration;

use conveyor_api::trace::{self, SpanRecord};
use conveyor_core::trace::hex;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How often finished spans are sent.
const EXPORT_INTERVAL: Duration = Duration::from_millis(500);
/// Most spans in one request.
const MAX_EXPORT_BATCH: usize = 2048;
/// Finished spans held between two exports; more are dropped (and counted).
pub const BUFFER_SPANS: usize = 65_536;
/// Longest an export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The running exporter; [`Exporter::shutdown`] sends what is left.
pub struct Exporter {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// `{endpoint}/v1/traces`, as the OTLP exporter spec builds it from the base endpoint.
pub fn traces_url(endpoint: &str) -> Result<reqwest::Url, String> {
    let base = endpoint.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(&format!("{base}/v1/traces")).map_err(|e| e.to_string())?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(format!("unsupported scheme {other:?} (http or https)")),
    }
}

impl Exporter {
    /// Turns span recording on and starts sending to `url` as `conveyor-<role>`.
    pub fn start(url: reqwest::Url, role: &str) -> Exporter {
        trace::install(BUFFER_SPANS);
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .unwrap_or_default();
        let service = format!("conveyor-{role}");
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(EXPORT_INTERVAL) => {}
                    _ = stopped.changed() => break,
                }
                export(&client, &url, &service).await;
            }
            export(&client, &url, &service).await;
        });
        Exporter { stop, task }
    }

    /// Sends the spans still held (bounded by the export timeout).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(EXPORT_TIMEOUT * 2, self.task).await;
    }
}

async fn export(client: &reqwest::Client, url: &reqwest::Url, service: &str) {
    let spans = trace::take();
    for chunk in spans.chunks(MAX_EXPORT_BATCH) {
        let body = request_body(service, chunk);
        let sent = client
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await;
        let count = chunk.len() as u64;
        match sent {
            Ok(response) if response.status().is_success() => {
                trace::SPANS_EXPORTED.fetch_add(count, Ordering::Relaxed);
            }
            Ok(response) => {
                trace::SPANS_EXPORT_FAILED.fetch_add(count, Ordering::Relaxed);
                tracing::warn!(status = %response.status(), spans = count, %url, "OTLP export refused");
            }
            Err(error) => {
                trace::SPANS_EXPORT_FAILED.fetch_add(count, Ordering::Relaxed);
                tracing::warn!(%error, spans = count, %url, "OTLP export failed");
            }
        }
    }
}

/// An `ExportTraceServiceRequest` in OTLP's JSON mapping.
pub fn request_body(service: &str, spans: &[SpanRecord]) -> Value {
    json!({
        "resourceSpans": [{
            "resource": {
                "attributes": [
                    {"key": "service.name", "value": {"stringValue": service}},
                ],
            },
            "scopeSpans": [{
                "scope": {"name": "conveyor", "version": env!("CARGO_PKG_VERSION")},
                "spans": spans.iter().map(span_json).collect::<Vec<_>>(),
            }],
        }],
    })
}

/// OTLP `SpanKind`: the doors serve requests, ingest produces to the queue, the processor
/// consumes from it.
fn kind(name: &str) -> u8 {
    match name {
        "ingest" | "ingest_batch" => 2, // SERVER
        "publish" => 4,                 // PRODUCER
        "process" => 5,                 // CONSUMER
        _ => 1,                         // INTERNAL
    }
}

fn span_json(span: &SpanRecord) -> Value {
    let mut attributes: Vec<Value> = span
        .attributes
        .iter()
        .map(|(key, value)| json!({"key": key, "value": {"intValue": value.to_string()}}))
        .collect();
    attributes.extend(
        span.string_attributes
            .iter()
            .map(|(key, value)| json!({"key": key, "value": {"stringValue": value}})),
    );
    let status = match &span.error {
        Some(message) => json!({"code": 2, "message": message}),
        None => json!({"code": 1}),
    };
    let mut out = json!({
        "traceId": hex(&span.trace_id),
        "spanId": hex(&span.span_id),
        "name": span.name,
        "kind": kind(span.name),
        "startTimeUnixNano": span.start_ns.to_string(),
        "endTimeUnixNano": span.end_ns.max(span.start_ns).to_string(),
        "attributes": attributes,
        "status": status,
    });
    if let Some(parent) = span.parent_span_id {
        out["parentSpanId"] = Value::String(hex(&parent));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_is_the_endpoint_plus_v1_traces() {
        for (endpoint, url) in [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://collector:4318/", "http://collector:4318/v1/traces"),
            ("https://x.example/otlp", "https://x.example/otlp/v1/traces"),
        ] {
            assert_eq!(
                traces_url(endpoint).expect("a valid endpoint").as_str(),
                url
            );
        }
        assert!(traces_url("not a url").is_err());
        assert!(traces_url("ftp://x:1").is_err());
    }

    #[test]
    fn spans_are_rendered_in_the_otlp_json_mapping() {
        let span = SpanRecord {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
            parent_span_id: Some([0x02; 8]),
            name: "publish",
            start_ns: 10,
            end_ns: 20,
            error: None,
            attributes: vec![("conveyor.events", 3)],
            string_attributes: vec![("conveyor.event_id", "e-1".into())],
        };
        let body = request_body("conveyor-ingest", &[span]);
        let resource = &body["resourceSpans"][0];
        assert_eq!(
            resource["resource"]["attributes"][0]["value"]["stringValue"],
            "conveyor-ingest"
        );
        let span = &resource["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "abababababababababababababababab");
        assert_eq!(span["spanId"], "0101010101010101");
        assert_eq!(span["parentSpanId"], "0202020202020202");
        assert_eq!(span["kind"], 4);
        assert_eq!(span["startTimeUnixNano"], "10");
        assert_eq!(span["attributes"][0]["value"]["intValue"], "3");
        assert_eq!(span["attributes"][1]["value"]["stringValue"], "e-1");
        assert_eq!(span["status"]["code"], 1);
    }
}

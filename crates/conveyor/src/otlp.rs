//! OTLP export of the spans `conveyor_api::trace` records, on the OpenTelemetry SDK's OTLP
//! exporter (`opentelemetry-otlp`), when an endpoint is configured (`--otlp-endpoint` /
//! `OTEL_EXPORTER_OTLP_ENDPOINT`).
//!
//! One task per process takes the finished spans every [`EXPORT_INTERVAL`] and hands them, at
//! most [`MAX_EXPORT_BATCH`] per request, to the exporter as the SDK's `SpanData`. The
//! exporter speaks `OTEL_EXPORTER_OTLP_PROTOCOL`: `http/protobuf` (the default; POST to
//! `{endpoint}/v1/traces` through [`RetryingClient`], rustls for `https`, gzip with
//! `OTEL_EXPORTER_OTLP_COMPRESSION=gzip`) or `grpc` (tonic; rustls for `https`, gzip). It reads
//! `OTEL_EXPORTER_OTLP_HEADERS` itself. The resource is the SDK's (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`), with `service.name` = `conveyor-<role>` and a fresh
//! `service.instance.id` unless those set them. The sampler deciding where a trace enters
//! is the SDK's (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`; parent-based by default).
//! A request that fails after its retries loses its spans (counted); the hot path never
//! waits for a collector.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use conveyor_api::trace::{self, SpanRecord};
use conveyor_core::TraceContext;
use opentelemetry::trace::{
    SamplingDecision, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::otlp_http::RetryingClient;

/// How often finished spans are sent.
const EXPORT_INTERVAL: Duration = Duration::from_millis(500);
/// Most spans in one request.
const MAX_EXPORT_BATCH: usize = 2048;
/// Finished spans held between two exports; more are dropped (and counted).
pub const BUFFER_SPANS: usize = 65_536;
/// Longest one export attempt may take, unless `OTEL_EXPORTER_OTLP_TIMEOUT` (ms) says.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the last export may hold up shutdown.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// Export attempts over gRPC (the HTTP client retries per request, see [`RetryingClient`]).
const GRPC_ATTEMPTS: u32 = 3;

/// The wire protocol, from `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    HttpProtobuf,
    Grpc,
}

/// What the exporter sends to and how, checked at start-up (a bad value is a configuration
/// error, exit 64).
#[derive(Debug, Clone)]
pub struct Target {
    pub wire: Wire,
    /// The URL spans go to: `{endpoint}/v1/traces` over HTTP, the endpoint itself over gRPC.
    pub url: reqwest::Url,
}

/// `{endpoint}/v1/traces`, as the OTLP exporter spec builds it from the base endpoint.
pub fn traces_url(endpoint: &str) -> Result<reqwest::Url, String> {
    let base = endpoint.trim().trim_end_matches('/');
    http_url(&format!("{base}/v1/traces")).map_err(|e| format!("{endpoint:?} → {e}"))
}

/// The wire a protocol name selects.
pub fn wire(protocol: Option<&str>) -> Result<Wire, String> {
    match protocol.map(str::trim).filter(|p| !p.is_empty()) {
        None | Some("http/protobuf") => Ok(Wire::HttpProtobuf),
        Some("grpc") => Ok(Wire::Grpc),
        Some(other) => Err(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL {other:?}: http/protobuf or grpc (http/json is not built in)"
        )),
    }
}

/// Where spans go, if anywhere: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the spec's
/// signal-specific URL, used as it is) or else the base `endpoint` of `--otlp-endpoint` /
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended over HTTP), under the protocol the
/// environment names. `None`: no endpoint, no export. The error names the variable.
pub fn target(endpoint: Option<&str>) -> Result<Option<Target>, String> {
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    let wire = wire(protocol.as_deref())?;
    let (url, named) = if let Some(traces) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        (http_url(&traces), "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    } else if let Some(endpoint) = endpoint {
        let url = match wire {
            Wire::HttpProtobuf => traces_url(endpoint),
            Wire::Grpc => http_url(endpoint),
        };
        (url, "OTEL_EXPORTER_OTLP_ENDPOINT (--otlp-endpoint)")
    } else {
        return Ok(None);
    };
    let url = url.map_err(|e| format!("{named}: {e}"))?;
    Ok(Some(Target { wire, url }))
}

/// An http(s) URL taken as it is.
fn http_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(format!(
            "{text:?}: unsupported scheme {other:?} (http or https)"
        )),
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The running exporter; [`Exporter::shutdown`] sends what is left.
pub struct Exporter {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Exporter {
    /// Turns span recording on and starts sending to `target` as `conveyor-<role>`.
    pub fn start(target: &Target, role: &str) -> Result<Exporter, String> {
        let mut exporter = build_exporter(target)?;
        exporter.set_resource(&resource(role));
        trace::install(BUFFER_SPANS, entry_sampler());
        let scope = InstrumentationScope::builder("conveyor")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let retries = if target.wire == Wire::Grpc {
            GRPC_ATTEMPTS
        } else {
            1
        };
        let url = target.url.to_string();
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(EXPORT_INTERVAL) => {}
                    _ = stopped.changed() => break,
                }
                export(&exporter, &scope, retries, &url).await;
            }
            export(&exporter, &scope, retries, &url).await;
            let _ = exporter.shutdown();
        });
        Ok(Exporter { stop, task })
    }

    /// Sends the spans still held (bounded by the export timeout and its retries).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(SHUTDOWN_WAIT, self.task).await;
    }
}

/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT` in milliseconds, or
/// [`EXPORT_TIMEOUT`].
fn export_timeout() -> Result<Duration, String> {
    match env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT").or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT")) {
        None => Ok(EXPORT_TIMEOUT),
        Some(ms) => match ms.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => Err(format!(
                "OTEL_EXPORTER_OTLP_TIMEOUT {ms:?}: a positive number of milliseconds"
            )),
        },
    }
}

fn build_exporter(target: &Target) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let timeout = export_timeout()?;
    let built = match target.wire {
        Wire::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(RetryingClient::new(http_client(timeout)?))
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(target.url.as_str())
            .with_timeout(timeout)
            .build(),
        Wire::Grpc => {
            let builder = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_protocol(Protocol::Grpc)
                .with_endpoint(target.url.as_str())
                .with_timeout(timeout);
            if target.url.scheme() == "https" {
                let mut tls = ClientTlsConfig::new().with_native_roots();
                if let Some(pem) = ca_pem()? {
                    tls = tls.ca_certificate(Certificate::from_pem(pem));
                }
                builder.with_tls_config(tls).build()
            } else {
                builder.build()
            }
        }
    };
    built.map_err(|e| e.to_string())
}

/// reqwest with rustls and the system's roots, plus the CA certificates of
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` (a PEM file) when set.
fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().timeout(timeout);
    if let Some(pem) = ca_pem()? {
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE: {e}"))?;
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// The PEM file `OTEL_EXPORTER_OTLP_CERTIFICATE` names (CA certificates to trust), if set.
fn ca_pem() -> Result<Option<Vec<u8>>, String> {
    let Some(path) = env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
        .or_else(|| env("OTEL_EXPORTER_OTLP_CERTIFICATE"))
    else {
        return Ok(None);
    };
    let pem = std::fs::read(&path)
        .map_err(|e| format!("OTEL_EXPORTER_OTLP_CERTIFICATE {path:?}: {e}"))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "OTEL_EXPORTER_OTLP_CERTIFICATE {path:?}: no PEM certificate in it"
        ));
    }
    Ok(Some(pem))
}

/// The SDK's resource (its detectors read `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`),
/// with conveyor's defaults for what those leave unset.
pub fn resource(role: &str) -> Resource {
    let attributes = env("OTEL_RESOURCE_ATTRIBUTES").unwrap_or_default();
    let names = |key: &str| {
        attributes
            .split(',')
            .any(|pair| pair.split('=').next().map(str::trim) == Some(key))
    };
    let mut builder = Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() && !names("service.name") {
        builder = builder.with_service_name(format!("conveyor-{role}"));
    }
    if !names("service.instance.id") {
        builder = builder.with_attribute(KeyValue::new(
            "service.instance.id",
            uuid::Uuid::now_v7().to_string(),
        ));
    }
    builder.build()
}

/// The SDK's sampler from the environment (`OTEL_TRACES_SAMPLER` / `_ARG`), asked where a
/// trace enters conveyor, with the caller's context as the remote parent.
fn entry_sampler() -> trace::EntrySampler {
    let sampler = opentelemetry_sdk::trace::Config::default().sampler;
    Box::new(move |parent: Option<&TraceContext>, trace_id: &[u8; 16]| {
        let parent = parent.map(|p| {
            Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.span_id),
                TraceFlags::new(p.flags),
                true,
                TraceState::NONE,
            ))
        });
        let result = sampler.should_sample(
            parent.as_ref(),
            TraceId::from_bytes(*trace_id),
            "ingest",
            &SpanKind::Server,
            &[],
            &[],
        );
        result.decision == SamplingDecision::RecordAndSample
    })
}

async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    scope: &InstrumentationScope,
    attempts: u32,
    url: &str,
) {
    let spans = trace::take();
    for chunk in spans.chunks(MAX_EXPORT_BATCH) {
        let count = chunk.len() as u64;
        let mut batch: Vec<SpanData> = chunk.iter().map(|span| span_data(span, scope)).collect();
        let mut attempt = 1;
        let result = loop {
            // A copy only while another attempt may follow.
            let spans = if attempt < attempts {
                batch.clone()
            } else {
                std::mem::take(&mut batch)
            };
            let result = exporter.export(spans).await;
            if result.is_ok() || attempt >= attempts {
                break result;
            }
            tokio::time::sleep(crate::otlp_http::backoff(attempt)).await;
            attempt += 1;
        };
        match result {
            Ok(()) => {
                trace::SPANS_EXPORTED.fetch_add(count, Ordering::Relaxed);
            }
            Err(error) => {
                trace::SPANS_EXPORT_FAILED.fetch_add(count, Ordering::Relaxed);
                tracing::warn!(%error, spans = count, %url, "OTLP export failed");
            }
        }
    }
}

/// OTLP `SpanKind`: the doors serve requests, ingest produces to the queue, the processor
/// consumes from it.
fn kind(name: &str) -> SpanKind {
    match name {
        "ingest" | "ingest_batch" | "ingest_stream" | "publish_stream" => SpanKind::Server,
        "publish" => SpanKind::Producer,
        "process" => SpanKind::Consumer,
        _ => SpanKind::Internal,
    }
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// A recorded span as the SDK's exportable span.
pub fn span_data(span: &SpanRecord, scope: &InstrumentationScope) -> SpanData {
    let mut attributes: Vec<KeyValue> = span
        .attributes
        .iter()
        .map(|&(key, value)| KeyValue::new(key, value))
        .collect();
    attributes.extend(
        span.string_attributes
            .iter()
            .map(|(key, value)| KeyValue::new(*key, value.clone())),
    );
    let trace_state = span
        .trace_state
        .as_deref()
        .and_then(|state| state.parse::<TraceState>().ok())
        .unwrap_or_default();
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(span.trace_id),
            SpanId::from_bytes(span.span_id),
            TraceFlags::SAMPLED,
            false,
            trace_state,
        ),
        parent_span_id: span
            .parent_span_id
            .map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: false,
        span_kind: kind(span.name),
        name: Cow::Borrowed(span.name),
        start_time: time(span.start_ns),
        end_time: time(span.end_ns.max(span.start_ns)),
        attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: match &span.error {
            Some(message) => Status::error(message.clone()),
            None => Status::Ok,
        },
        instrumentation_scope: scope.clone(),
    }
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
    fn the_protocol_names_the_wire() {
        assert_eq!(wire(None), Ok(Wire::HttpProtobuf));
        assert_eq!(wire(Some("http/protobuf")), Ok(Wire::HttpProtobuf));
        assert_eq!(wire(Some("grpc")), Ok(Wire::Grpc));
        assert!(wire(Some("http/json")).is_err());
    }

    #[test]
    fn spans_become_sdk_span_data() {
        let span = SpanRecord {
            trace_id: [0xab; 16],
            span_id: [0x01; 8],
            parent_span_id: Some([0x02; 8]),
            name: "publish",
            start_ns: 10,
            end_ns: 20,
            error: Some("refused".into()),
            attributes: vec![("conveyor.events", 3)],
            string_attributes: vec![("conveyor.event_id", "e-1".into())],
            trace_state: Some("rojo=00f067aa0ba902b7".into()),
        };
        let scope = InstrumentationScope::builder("conveyor").build();
        let data = span_data(&span, &scope);
        assert_eq!(
            data.span_context.trace_id().to_string(),
            "abababababababababababababababab"
        );
        assert_eq!(data.parent_span_id.to_string(), "0202020202020202");
        assert_eq!(data.span_kind, SpanKind::Producer);
        assert_eq!(data.end_time, UNIX_EPOCH + Duration::from_nanos(20));
        assert_eq!(data.attributes[0], KeyValue::new("conveyor.events", 3));
        assert_eq!(
            data.attributes[1],
            KeyValue::new("conveyor.event_id", "e-1")
        );
        assert_eq!(data.status, Status::error("refused"));
        assert_eq!(
            data.span_context.trace_state().header(),
            "rojo=00f067aa0ba902b7"
        );
    }
}

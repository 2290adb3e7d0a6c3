//! The families of every service's `/metrics`, pushed into an [`Exposition`] at scrape time
//! (which `prometheus-client` encodes as Prometheus text or OpenMetrics).
//!
//! HTTP request metrics are recorded by [`HttpMetrics::layer`] with bounded labels (the matched
//! route pattern, never the raw path; the status code). Service statistics are rendered at
//! scrape time from the same counters `/stats` reports, so the two can never disagree.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

use conveyor_core::stats::{PoolStats, QueueStats};

use crate::exposition::Exposition;
use crate::histogram::Histogram;

/// Request durations, in microseconds: 100 µs to 30 s (see [`crate::histogram`]).
const REQUEST_MICROS: &[u64] = crate::histogram::DURATION_MICROS;

/// HTTP methods with their own slot; anything else counts as `other`.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other",
];

/// Status codes 100..=599 have a counter each.
const STATUSES: usize = 500;

struct MethodMetrics {
    by_status: [AtomicU64; STATUSES],
    duration: Histogram,
}

/// One route pattern; a method's counters are made the first time it is seen.
#[derive(Default)]
struct RouteMetrics {
    methods: [OnceLock<Box<MethodMetrics>>; METHODS.len()],
}

/// Per-route request counts and durations, and the requests in progress.
///
/// Recording is lock-free once a route has been seen: a read lock on the route table (shared by
/// every request, never held across an await), then relaxed atomic adds.
#[derive(Clone, Default)]
pub struct HttpMetrics {
    routes: Arc<RwLock<HashMap<String, Arc<RouteMetrics>>>>,
    in_flight: Arc<AtomicI64>,
}

/// Decrements the in-flight gauge when the request finishes or is dropped.
struct InFlight(Arc<AtomicI64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl HttpMetrics {
    /// Middleware recording every request: `axum::middleware::from_fn_with_state(metrics, HttpMetrics::layer)`.
    pub async fn layer(
        axum::extract::State(metrics): axum::extract::State<HttpMetrics>,
        request: Request,
        next: Next,
    ) -> Response {
        let route = metrics.route(
            request
                .extensions()
                .get::<MatchedPath>()
                .map_or("unmatched", |p| p.as_str()),
        );
        // The caller's trace, for the duration's exemplar.
        let trace_id = request
            .headers()
            .get(conveyor_core::TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(conveyor_core::TraceContext::parse)
            .map(|c| c.trace_id);
        let method = METHODS
            .iter()
            .position(|m| *m == request.method().as_str())
            .unwrap_or(METHODS.len() - 1);
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(Arc::clone(&metrics.in_flight));
        let started = Instant::now();
        let response = next.run(request).await;
        let entry = route.methods[method].get_or_init(|| {
            Box::new(MethodMetrics {
                by_status: [const { AtomicU64::new(0) }; STATUSES],
                duration: Histogram::new(REQUEST_MICROS, 1e6),
            })
        });
        let status = usize::from(response.status().as_u16()).clamp(100, 599) - 100;
        entry.by_status[status].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        entry.duration.record_traced(micros, trace_id);
        response
    }

    fn route(&self, pattern: &str) -> Arc<RouteMetrics> {
        if let Some(route) = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(pattern)
        {
            return Arc::clone(route);
        }
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        Arc::clone(routes.entry(pattern.to_owned()).or_default())
    }

    /// The request durations of the routes in `patterns`, every method, merged.
    pub fn durations(&self, patterns: &[&str]) -> crate::histogram::Snapshot {
        let mut merged = Histogram::new(REQUEST_MICROS, 1e6).snapshot();
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        for pattern in patterns {
            if let Some(route) = routes.get(*pattern) {
                for method in route.methods.iter().filter_map(OnceLock::get) {
                    method.duration.add_to(&mut merged);
                }
            }
        }
        merged
    }

    /// Adds `http_requests_total`, `http_request_duration_seconds` and
    /// `http_requests_in_flight`.
    pub fn render(&self, out: &mut Exposition) {
        let routes: Vec<(String, Arc<RouteMetrics>)> = {
            let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
            let mut list: Vec<_> = routes
                .iter()
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect();
            list.sort_by(|a, b| a.0.cmp(&b.0));
            list
        };
        let seen = || {
            routes.iter().flat_map(|(route, metrics)| {
                METHODS
                    .iter()
                    .zip(&metrics.methods)
                    .filter_map(move |(method, m)| Some((route, *method, m.get()?)))
            })
        };
        let mut requests = Vec::new();
        for (route, method, metrics) in seen() {
            for (status, count) in metrics.by_status.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let labels = vec![
                        ("route", route.clone()),
                        ("method", method.to_owned()),
                        ("status", (status + 100).to_string()),
                    ];
                    requests.push((labels, count));
                }
            }
        }
        out.counters(
            "http_requests_total",
            "HTTP requests answered, by route, method and status.",
            requests,
        );
        out.histograms(
            "http_request_duration_seconds",
            "Time to answer an HTTP request.",
            seen()
                .map(|(route, method, metrics)| {
                    let labels = vec![("route", route.clone()), ("method", method.to_owned())];
                    (labels, metrics.duration.value())
                })
                .collect(),
        );
        out.gauge(
            "http_requests_in_flight",
            "HTTP requests being answered now.",
            self.in_flight.load(Ordering::Relaxed).max(0),
        );
    }
}

/// Adds the ingest metrics from an [`IngestStats`](conveyor_core::stats::IngestStats) (the
/// ingest's own histograms are `conveyor_ingest::metrics`).
pub fn render_ingest(out: &mut Exposition, stats: &conveyor_core::stats::IngestStats) {
    out.counter(
        "conveyor_events_accepted_total",
        "Events the queue confirmed (answered 202 / OK).",
        stats.accepted,
    );
    out.counters(
        "conveyor_events_rejected_total",
        "Events refused, by reason.",
        [
            ("invalid", stats.rejected_invalid),
            ("queue_full", stats.rejected_full),
            ("unavailable", stats.rejected_unavailable),
        ]
        .into_iter()
        .map(|(reason, n)| (vec![("reason", reason.to_owned())], n))
        .collect(),
    );
}

/// One unlabelled family read off a stats snapshot.
struct Family<T> {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&T) -> u64,
}

/// The queue's figures, one row per [`QueueStats`] field: a field added there is one row here.
const QUEUE_FAMILIES: &[Family<QueueStats>] = &[
    Family {
        name: "queue_size",
        kind: "gauge",
        help: "Events waiting in the queue (ready or waiting out a retry delay).",
        value: |q| q.size,
    },
    Family {
        name: "conveyor_queue_capacity",
        kind: "gauge",
        help: "Most events the queue holds at once (0: set by the broker).",
        value: |q| q.capacity,
    },
    Family {
        name: "conveyor_queue_in_flight",
        kind: "gauge",
        help: "Events delivered to a worker and not yet settled.",
        value: |q| q.in_flight,
    },
    Family {
        name: "conveyor_queue_consumer_lag",
        kind: "gauge",
        help: "Events published and not yet settled by a consumer: waiting plus in flight.",
        value: |q| q.size + q.in_flight,
    },
    Family {
        name: "conveyor_queue_published_total",
        kind: "counter",
        help: "Events the queue stored (for a broker: the stream's last sequence).",
        value: |q| q.published,
    },
    Family {
        name: "conveyor_queue_acked_total",
        kind: "counter",
        help: "Deliveries acked (processed).",
        value: |q| q.acked,
    },
    Family {
        name: "conveyor_queue_nacked_total",
        kind: "counter",
        help: "Deliveries handed back for a later retry.",
        value: |q| q.nacked,
    },
    Family {
        name: "conveyor_queue_terminated_total",
        kind: "counter",
        help: "Deliveries terminated (moved to the dead-letter queue).",
        value: |q| q.terminated,
    },
    Family {
        name: "conveyor_queue_redelivered_total",
        kind: "counter",
        help: "Deliveries beyond the first.",
        value: |q| q.redelivered,
    },
    Family {
        name: "conveyor_queue_duplicates_total",
        kind: "counter",
        help: "Publishes discarded as duplicates by the queue's dedupe window.",
        value: |q| q.duplicates,
    },
];

/// The worker pool's figures.
const POOL_FAMILIES: &[Family<PoolStats>] = &[
    Family {
        name: "worker_pool_active",
        kind: "gauge",
        help: "Workers busy with a batch.",
        value: |p| p.active,
    },
    Family {
        name: "conveyor_worker_pool_size",
        kind: "gauge",
        help: "Workers in the pool.",
        value: |p| p.workers,
    },
    Family {
        name: "messages_processed_total",
        kind: "counter",
        help: "Events written to the sink and acked.",
        value: |p| p.processed,
    },
    Family {
        name: "conveyor_processing_errors_total",
        kind: "counter",
        help: "Attempts that failed in a stage or the sink.",
        value: |p| p.errors,
    },
    Family {
        name: "conveyor_retries_total",
        kind: "counter",
        help: "Failed attempts sent back to the queue for a retry.",
        value: |p| p.retried,
    },
    Family {
        name: "conveyor_dead_lettered_total",
        kind: "counter",
        help: "Events moved to the dead-letter queue.",
        value: |p| p.dead_lettered,
    },
    Family {
        name: "conveyor_duplicates_skipped_total",
        kind: "counter",
        help: "Deliveries skipped because the id was already processed.",
        value: |p| p.duplicates,
    },
    Family {
        name: "conveyor_deliveries_deferred_total",
        kind: "counter",
        help: "Deliveries handed back for later because another worker had the same id in hand.",
        value: |p| p.deferred,
    },
];

fn render_families<T>(out: &mut Exposition, families: &[Family<T>], stats: &T) {
    for f in families {
        let value = (f.value)(stats);
        if f.kind == "counter" {
            out.counter(f.name, f.help, value);
        } else {
            out.gauge(f.name, f.help, i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
}

/// Adds the processor and queue metrics from a
/// [`ProcessorStats`](conveyor_core::stats::ProcessorStats), including the seed's
/// `queue_size`, `worker_pool_active` and `messages_processed_total` (the pool's own
/// histograms are `conveyor_processor::metrics`).
pub fn render_processor(out: &mut Exposition, stats: &conveyor_core::stats::ProcessorStats) {
    let q = &stats.queue;
    let backend = if q.backend.is_empty() {
        "none"
    } else {
        &q.backend
    };
    out.gauges(
        "conveyor_queue_info",
        "The queue backend in use (value 1).",
        vec![(
            vec![
                ("backend", backend.to_owned()),
                ("durable", q.durable.to_string()),
            ],
            1,
        )],
    );
    render_families(out, QUEUE_FAMILIES, q);
    crate::queue_metrics::render_queue_detail(out, q);
    render_families(out, POOL_FAMILIES, &stats.pool);
    out.gauge(
        "conveyor_dlq_size",
        "Events in the dead-letter queue.",
        i64::try_from(stats.dlq_size).unwrap_or(i64::MAX),
    );
}

/// Adds the seed's `system_health_status` (1 healthy, 0 not).
pub fn render_health(out: &mut Exposition, healthy: bool) {
    out.gauge(
        "system_health_status",
        "1 when this service and what it depends on are healthy, else 0.",
        i64::from(healthy),
    );
}

/// Adds `conveyor_instance_healthy{role,instance}`: the gateway's view of each instance it
/// reports on (`instance` is the configured URL, so the label set is bounded by configuration).
pub fn render_instances<'a>(
    out: &mut Exposition,
    instances: impl IntoIterator<Item = (&'a str, &'a str, bool)>,
) {
    out.gauges(
        "conveyor_instance_healthy",
        "1 when the instance answered its stats and reported healthy, else 0.",
        instances
            .into_iter()
            .map(|(role, url, healthy)| {
                (
                    vec![("role", role.to_owned()), ("instance", url.to_owned())],
                    i64::from(healthy),
                )
            })
            .collect(),
    );
}

/// Families every service has: build info, readiness, events by door, error answers, and the
/// process's resource use (`process`, read beforehand off the async runtime).
pub fn render_common(
    out: &mut Exposition,
    ready: bool,
    process: Option<&crate::process::ProcessStats>,
) {
    out.gauges(
        "conveyor_build_info",
        "The conveyor version (value 1).",
        vec![(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1)],
    );
    out.gauge(
        "conveyor_ready",
        "1 while the service takes new work (0 once shutdown began).",
        i64::from(ready),
    );
    crate::recorded::render_edges(out);
    if let Some(process) = process {
        crate::process::render(out, process);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use conveyor_core::stats::{
        BackendStats, GroupMemberStats, IngestStats, PartitionStats, ProcessorStats, QueueStats,
    };

    use super::*;
    use crate::exposition::Format;

    /// Every family this crate renders with its type and label names, as the hand-written
    /// renderer wrote them before the move to prometheus-client: one that disappears or changes
    /// fails here. (The ingest's and the pool's own families are checked in their crates'
    /// `metrics.rs`, against the same list from before.)
    const FAMILIES: &[(&str, &str, &[&str])] = &[
        (
            "http_requests_total",
            "counter",
            &["route", "method", "status"],
        ),
        (
            "http_request_duration_seconds",
            "histogram",
            &["route", "method"],
        ),
        ("http_requests_in_flight", "gauge", &[]),
        ("conveyor_build_info", "gauge", &["version"]),
        ("conveyor_ready", "gauge", &[]),
        ("conveyor_events_received_total", "counter", &["door"]),
        ("conveyor_error_answers_total", "counter", &["code"]),
        ("conveyor_trace_spans_exported_total", "counter", &[]),
        ("conveyor_trace_spans_dropped_total", "counter", &[]),
        ("conveyor_trace_spans_export_failed_total", "counter", &[]),
        ("process_cpu_seconds_total", "counter", &[]),
        ("process_resident_memory_bytes", "gauge", &[]),
        ("process_virtual_memory_bytes", "gauge", &[]),
        ("process_threads", "gauge", &[]),
        ("process_start_time_seconds", "gauge", &[]),
        ("process_open_fds", "gauge", &[]),
        ("process_max_fds", "gauge", &[]),
        ("conveyor_events_accepted_total", "counter", &[]),
        ("conveyor_events_rejected_total", "counter", &["reason"]),
        ("conveyor_queue_info", "gauge", &["backend", "durable"]),
        ("queue_size", "gauge", &[]),
        ("conveyor_queue_capacity", "gauge", &[]),
        ("conveyor_queue_in_flight", "gauge", &[]),
        ("conveyor_queue_consumer_lag", "gauge", &[]),
        ("conveyor_queue_published_total", "counter", &[]),
        ("conveyor_queue_acked_total", "counter", &[]),
        ("conveyor_queue_nacked_total", "counter", &[]),
        ("conveyor_queue_terminated_total", "counter", &[]),
        ("conveyor_queue_redelivered_total", "counter", &[]),
        ("conveyor_queue_duplicates_total", "counter", &[]),
        ("conveyor_kafka_consumer_lag", "gauge", &["partition"]),
        (
            "conveyor_kafka_partition_in_flight",
            "gauge",
            &["partition"],
        ),
        ("conveyor_kafka_high_watermark", "gauge", &["partition"]),
        ("conveyor_kafka_group_stalls_total", "counter", &[]),
        ("conveyor_kafka_group_stalled", "gauge", &[]),
        ("conveyor_kafka_assigned_partitions", "gauge", &[]),
        (
            "conveyor_composite_publishes_total",
            "counter",
            &["backend", "role"],
        ),
        (
            "conveyor_composite_failures_total",
            "counter",
            &["backend", "role"],
        ),
        (
            "conveyor_composite_divergence",
            "gauge",
            &["backend", "role"],
        ),
        (
            "conveyor_composite_backend_healthy",
            "gauge",
            &["backend", "role"],
        ),
        ("worker_pool_active", "gauge", &[]),
        ("conveyor_worker_pool_size", "gauge", &[]),
        ("messages_processed_total", "counter", &[]),
        ("conveyor_processing_errors_total", "counter", &[]),
        ("conveyor_retries_total", "counter", &[]),
        ("conveyor_dead_lettered_total", "counter", &[]),
        ("conveyor_duplicates_skipped_total", "counter", &[]),
        ("conveyor_deliveries_deferred_total", "counter", &[]),
        ("conveyor_dlq_size", "gauge", &[]),
        ("system_health_status", "gauge", &[]),
        ("conveyor_instance_healthy", "gauge", &["role", "instance"]),
    ];

    /// Everything a `run` process with a Kafka-primary composite queue could show.
    fn everything() -> Exposition {
        let http = HttpMetrics::default();
        let route = http.route("/api/v1/ingest");
        let entry = route.methods[1].get_or_init(|| {
            Box::new(MethodMetrics {
                by_status: [const { AtomicU64::new(0) }; STATUSES],
                duration: Histogram::new(REQUEST_MICROS, 1e6),
            })
        });
        entry.by_status[102].fetch_add(1, Ordering::Relaxed);
        entry.duration.record_traced(300, Some([9; 16]));
        let stats = ProcessorStats {
            queue: QueueStats {
                backend: "composite".into(),
                partitions: vec![PartitionStats::default()],
                backends: vec![BackendStats {
                    name: "kafka".into(),
                    primary: true,
                    ..BackendStats::default()
                }],
                group: Some(GroupMemberStats::default()),
                ..QueueStats::default()
            },
            ..ProcessorStats::default()
        };
        let mut out = Exposition::new();
        http.render(&mut out);
        render_common(&mut out, true, crate::process::read().as_ref());
        render_ingest(&mut out, &IngestStats::default());
        render_processor(&mut out, &stats);
        render_health(&mut out, true);
        render_instances(&mut out, [("ingest", "local", true)]);
        out
    }

    /// `(family, type, label names)` of an encoded scrape; counters under their `_total` name.
    pub(crate) fn families(text: &str) -> BTreeSet<(String, String, Vec<String>)> {
        let mut types = std::collections::BTreeMap::new();
        let mut labels: std::collections::BTreeMap<String, BTreeSet<Vec<String>>> =
            std::collections::BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                let name = match (kind, name.ends_with("_total")) {
                    ("counter", false) => format!("{name}_total"),
                    _ => name.to_owned(),
                };
                types.insert(name, kind.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                let series = line.split(' ').next().expect("sample");
                let (name, rest) = series.split_once('{').unwrap_or((series, ""));
                let family = types
                    .keys()
                    .filter(|f| name.starts_with(f.as_str()))
                    .max_by_key(|f| f.len())
                    .unwrap_or_else(|| panic!("sample {line:?} outside a family"))
                    .clone();
                let names = rest
                    .trim_end_matches('}')
                    .split(',')
                    .filter_map(|pair| Some(pair.split_once('=')?.0.to_owned()))
                    .filter(|key| key != "le")
                    .collect();
                labels.entry(family).or_default().insert(names);
            }
        }
        types
            .into_iter()
            .map(|(name, kind)| {
                let mut sets = labels.remove(&name).unwrap_or_default().into_iter();
                let first = sets.next().unwrap_or_default();
                assert!(sets.next().is_none(), "{name}: one label set per family");
                (name, kind, first)
            })
            .collect()
    }

    #[test]
    fn every_family_keeps_its_name_type_and_labels_in_both_formats() {
        let mut before: BTreeSet<(String, String, Vec<String>)> = FAMILIES
            .iter()
            .map(|(name, kind, labels)| {
                let mut labels: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
                labels.sort();
                ((*name).to_owned(), (*kind).to_owned(), labels)
            })
            .collect();
        before = before.into_iter().collect();
        for format in [Format::Prometheus, Format::OpenMetrics] {
            let text = everything().encode(format);
            let after: BTreeSet<_> = families(&text)
                .into_iter()
                .map(|(name, kind, mut labels)| {
                    labels.sort();
                    (name, kind, labels)
                })
                .collect();
            assert_eq!(before, after, "{format:?}:\n{text}");
        }
    }

    #[test]
    fn the_request_duration_carries_the_callers_trace_in_openmetrics_only() {
        let hex = "09".repeat(16);
        let open = everything().encode(Format::OpenMetrics);
        assert!(
            open.lines()
                .any(|l| l.starts_with("http_request_duration_seconds_bucket{")
                    && l.contains(&format!("# {{trace_id=\"{hex}\"}} 0.0003 "))),
            "{open}"
        );
        assert!(!everything().encode(Format::Prometheus).contains(&hex));
    }
}

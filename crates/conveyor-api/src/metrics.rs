//! Prometheus text exposition (format 0.0.4) for every service's `/metrics`.
//!
//! HTTP request metrics are recorded by [`HttpMetrics::layer`] with bounded labels (the matched
//! route pattern, never the raw path; the status code). Service statistics are rendered at
//! scrape time from the same counters `/stats` reports, so the two can never disagree.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

use conveyor_core::stats::{PoolStats, QueueStats};

use crate::histogram::Histogram;

use crate::text::{escape, render_value};

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
        entry.duration.record_duration(started.elapsed());
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

    /// Appends `http_requests_total`, `http_request_duration_seconds` and
    /// `http_requests_in_flight`.
    pub fn render(&self, out: &mut String) {
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
        out.push_str(
            "# HELP http_requests_total HTTP requests answered, by route, method and status.\n",
        );
        out.push_str("# TYPE http_requests_total counter\n");
        for (route, method, metrics) in seen() {
            for (status, count) in metrics.by_status.iter().enumerate() {
                let count = count.load(Ordering::Relaxed);
                if count > 0 {
                    let _ = writeln!(
                        out,
                        "http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{}\"}} {count}",
                        escape(route),
                        status + 100
                    );
                }
            }
        }
        out.push_str("# HELP http_request_duration_seconds Time to answer an HTTP request.\n");
        out.push_str("# TYPE http_request_duration_seconds histogram\n");
        for (route, method, metrics) in seen() {
            let labels = format!("route=\"{}\",method=\"{method}\"", escape(route));
            metrics
                .duration
                .render_samples(out, "http_request_duration_seconds", &labels);
        }
        let _ = writeln!(
            out,
            "# HELP http_requests_in_flight HTTP requests being answered now.\n# TYPE http_requests_in_flight gauge\nhttp_requests_in_flight {}",
            self.in_flight.load(Ordering::Relaxed).max(0)
        );
    }
}

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Appends the ingest metrics from an [`IngestStats`](conveyor_core::stats::IngestStats), and
/// the ingest histograms when this process runs an ingest.
pub fn render_ingest(out: &mut String, stats: &conveyor_core::stats::IngestStats) {
    render_value(
        out,
        "conveyor_events_accepted_total",
        "counter",
        "Events the queue confirmed (answered 202 / OK).",
        stats.accepted,
    );
    let _ = writeln!(
        out,
        "# HELP conveyor_events_rejected_total Events refused, by reason.\n# TYPE conveyor_events_rejected_total counter\n\
         conveyor_events_rejected_total{{reason=\"invalid\"}} {}\n\
         conveyor_events_rejected_total{{reason=\"queue_full\"}} {}\n\
         conveyor_events_rejected_total{{reason=\"unavailable\"}} {}",
        stats.rejected_invalid, stats.rejected_full, stats.rejected_unavailable
    );
    crate::recorded::render_ingest(out);
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

fn render_families<T>(out: &mut String, families: &[Family<T>], stats: &T) {
    for f in families {
        render_value(out, f.name, f.kind, f.help, (f.value)(stats));
    }
}

/// Appends the processor and queue metrics from a
/// [`ProcessorStats`](conveyor_core::stats::ProcessorStats), including the seed's
/// `queue_size`, `worker_pool_active` and `messages_processed_total`, and the processor
/// histograms when this process runs a worker pool.
pub fn render_processor(out: &mut String, stats: &conveyor_core::stats::ProcessorStats) {
    let q = &stats.queue;
    let backend = if q.backend.is_empty() {
        "none"
    } else {
        &q.backend
    };
    let _ = writeln!(
        out,
        "# HELP conveyor_queue_info The queue backend in use (value 1).\n# TYPE conveyor_queue_info gauge\n\
         conveyor_queue_info{{backend=\"{}\",durable=\"{}\"}} 1",
        escape(backend),
        q.durable
    );
    render_families(out, QUEUE_FAMILIES, q);
    crate::queue_metrics::render_queue_detail(out, q);
    render_families(out, POOL_FAMILIES, &stats.pool);
    render_value(
        out,
        "conveyor_dlq_size",
        "gauge",
        "Events in the dead-letter queue.",
        stats.dlq_size,
    );
    crate::recorded::render_processor(out);
}

/// Appends the seed's `system_health_status` (1 healthy, 0 not).
pub fn render_health(out: &mut String, healthy: bool) {
    render_value(
        out,
        "system_health_status",
        "gauge",
        "1 when this service and what it depends on are healthy, else 0.",
        u64::from(healthy),
    );
}

/// Appends `conveyor_instance_healthy{role,instance}`: the gateway's view of each instance it
/// reports on (`instance` is the configured URL, so the label set is bounded by configuration).
pub fn render_instances<'a>(
    out: &mut String,
    instances: impl IntoIterator<Item = (&'a str, &'a str, bool)>,
) {
    out.push_str(
        "# HELP conveyor_instance_healthy 1 when the instance answered its stats and reported healthy, else 0.\n\
         # TYPE conveyor_instance_healthy gauge\n",
    );
    for (role, url, healthy) in instances {
        let _ = writeln!(
            out,
            "conveyor_instance_healthy{{role=\"{}\",instance=\"{}\"}} {}",
            escape(role),
            escape(url),
            u64::from(healthy)
        );
    }
}

/// Families every service has: build info, readiness, events by door, error answers, process.
pub fn render_common(out: &mut String, ready: bool) {
    let _ = writeln!(
        out,
        "# HELP conveyor_build_info The conveyor version (value 1).\n# TYPE conveyor_build_info gauge\n\
         conveyor_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    render_value(
        out,
        "conveyor_ready",
        "gauge",
        "1 while the service takes new work (0 once shutdown began).",
        u64::from(ready),
    );
    crate::recorded::render_edges(out);
    crate::process::render(out);
}

//! Prometheus text exposition (format 0.0.4) for every service's `/metrics`.
//!
//! HTTP request metrics are recorded by [`HttpMetrics::layer`] with bounded labels (the matched
//! route pattern, never the raw path; the status code). Service statistics are rendered at
//! scrape time from the same counters `/stats` reports, so the two can never disagree.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;

/// Upper bounds of the request-duration histogram buckets, in seconds.
const DURATION_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds (atomics hold integers).
    sum_micros: AtomicU64,
}

#[derive(Default)]
struct RouteMetrics {
    /// Requests by status code.
    by_status: Mutex<HashMap<u16, u64>>,
    duration: Histogram,
}

/// (route pattern, method)
type RouteKey = (String, String);

/// Per-route request counts and durations.
#[derive(Clone, Default)]
pub struct HttpMetrics {
    routes: Arc<Mutex<HashMap<RouteKey, Arc<RouteMetrics>>>>,
}

impl HttpMetrics {
    /// Middleware recording every request: `axum::middleware::from_fn_with_state(metrics, HttpMetrics::layer)`.
    pub async fn layer(
        axum::extract::State(metrics): axum::extract::State<HttpMetrics>,
        request: Request,
        next: Next,
    ) -> Response {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", |p| p.as_str())
            .to_owned();
        let method = request.method().as_str().to_owned();
        let started = Instant::now();
        let response = next.run(request).await;
        metrics.record(route, method, response.status().as_u16(), started);
        response
    }

    fn record(&self, route: String, method: String, status: u16, started: Instant) {
        let elapsed = started.elapsed();
        let entry = {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(routes.entry((route, method)).or_default())
        };
        *entry
            .by_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(status)
            .or_default() += 1;
        let seconds = elapsed.as_secs_f64();
        let h = &entry.duration;
        if let Some(i) = DURATION_BUCKETS.iter().position(|&le| seconds <= le) {
            h.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends `http_requests_total` and `http_request_duration_seconds`.
    pub fn render(&self, out: &mut String) {
        let routes: Vec<(RouteKey, Arc<RouteMetrics>)> = {
            let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            let mut list: Vec<_> = routes
                .iter()
                .map(|(k, v)| (k.clone(), Arc::clone(v)))
                .collect();
            list.sort_by(|a, b| a.0.cmp(&b.0));
            list
        };
        out.push_str(
            "# HELP http_requests_total HTTP requests answered, by route, method and status.\n",
        );
        out.push_str("# TYPE http_requests_total counter\n");
        for ((route, method), metrics) in &routes {
            let by_status = metrics.by_status.lock().unwrap_or_else(|p| p.into_inner());
            let mut statuses: Vec<_> = by_status.iter().collect();
            statuses.sort();
            for (status, count) in statuses {
                let _ = writeln!(
                    out,
                    "http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {count}",
                    escape(route)
                );
            }
        }
        out.push_str("# HELP http_request_duration_seconds Time to answer an HTTP request.\n");
        out.push_str("# TYPE http_request_duration_seconds histogram\n");
        for ((route, method), metrics) in &routes {
            let labels = format!("route=\"{}\",method=\"{method}\"", escape(route));
            let h = &metrics.duration;
            let mut cumulative = 0;
            for (i, le) in DURATION_BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {count}"
            );
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "http_request_duration_seconds_sum{{{labels}}} {sum}");
            let _ = writeln!(
                out,
                "http_request_duration_seconds_count{{{labels}}} {count}"
            );
        }
    }
}

/// Appends one metric family with a single unlabelled sample.
pub fn render_value(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Appends the ingest metrics from an [`IngestStats`](conveyor_core::stats::IngestStats).
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
}

/// Appends the processor and queue metrics from a
/// [`ProcessorStats`](conveyor_core::stats::ProcessorStats), including the seed's
/// `queue_size`, `worker_pool_active` and `messages_processed_total`.
pub fn render_processor(out: &mut String, stats: &conveyor_core::stats::ProcessorStats) {
    let q = &stats.queue;
    let p = &stats.pool;
    render_value(
        out,
        "queue_size",
        "gauge",
        "Events waiting in the queue (ready or waiting out a retry delay).",
        q.size,
    );
    render_value(
        out,
        "conveyor_queue_capacity",
        "gauge",
        "Most events the queue holds at once (0: set by the broker).",
        q.capacity,
    );
    render_value(
        out,
        "conveyor_queue_in_flight",
        "gauge",
        "Events delivered to a worker and not yet settled.",
        q.in_flight,
    );
    render_value(
        out,
        "conveyor_queue_redelivered_total",
        "counter",
        "Deliveries beyond the first.",
        q.redelivered,
    );
    render_value(
        out,
        "conveyor_queue_duplicates_total",
        "counter",
        "Publishes discarded as duplicates by the queue's dedupe window.",
        q.duplicates,
    );
    render_value(
        out,
        "worker_pool_active",
        "gauge",
        "Workers busy with a batch.",
        p.active,
    );
    render_value(
        out,
        "conveyor_worker_pool_size",
        "gauge",
        "Workers in the pool.",
        p.workers,
    );
    render_value(
        out,
        "messages_processed_total",
        "counter",
        "Events written to the sink and acked.",
        p.processed,
    );
    render_value(
        out,
        "conveyor_processing_errors_total",
        "counter",
        "Attempts that failed in a stage or the sink.",
        p.errors,
    );
    render_value(
        out,
        "conveyor_retries_total",
        "counter",
        "Failed attempts sent back to the queue for a retry.",
        p.retried,
    );
    render_value(
        out,
        "conveyor_dead_lettered_total",
        "counter",
        "Events moved to the dead-letter queue.",
        p.dead_lettered,
    );
    render_value(
        out,
        "conveyor_duplicates_skipped_total",
        "counter",
        "Deliveries skipped because the id was already processed.",
        p.duplicates,
    );
    render_value(
        out,
        "conveyor_dlq_size",
        "gauge",
        "Events in the dead-letter queue.",
        stats.dlq_size,
    );
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

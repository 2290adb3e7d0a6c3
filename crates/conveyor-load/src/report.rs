//! The report of one run: the JSON written by `--report`, and the summary table printed at
//! the end.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::args::{Mode, Plan};
use crate::recorder::{Counts, Timeline};
use conveyor_core::display::thousands;

/// The configuration a run used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportConfig {
    pub target: String,
    pub mode: Mode,
    /// `closed` (N connections, each waits for its answer) or `open` (fixed rate).
    pub model: String,
    pub connections: usize,
    /// Target events per second (open loop).
    pub rate: Option<f64>,
    pub events: Option<u64>,
    pub duration_secs: Option<f64>,
    /// Events per request (batch size in batch mode, else 1).
    pub events_per_request: u64,
    pub grpc_window: Option<usize>,
    pub payload_bytes: usize,
    pub settle_timeout_secs: f64,
}

impl ReportConfig {
    pub fn from_plan(plan: &Plan) -> ReportConfig {
        ReportConfig {
            target: plan.target.clone(),
            mode: plan.mode,
            model: if plan.rate.is_some() {
                "open"
            } else {
                "closed"
            }
            .to_owned(),
            connections: plan.connections,
            rate: plan.rate,
            events: plan.events,
            duration_secs: plan.duration.map(|d| d.as_secs_f64()),
            events_per_request: plan.per_request,
            grpc_window: (plan.mode == Mode::Grpc).then_some(plan.grpc_window),
            payload_bytes: plan.payload_bytes,
            settle_timeout_secs: plan.settle_timeout.as_secs_f64(),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Answered requests measured.
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What `/api/v1/status` said about processing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Processed {
    /// The target answered `/api/v1/status` with `totals`.
    pub status_endpoint: bool,
    /// Every accepted event was seen processed (or dead-lettered) before the settle timeout.
    pub settled: bool,
    /// Events processed during the run (the status' `totals.processed` minus its value
    /// before the run).
    pub processed: u64,
    /// Events dead-lettered during the run.
    pub dead_lettered: u64,
    /// From the first send until the last accepted event was seen processed.
    pub secs: Option<f64>,
    /// `processed / secs`.
    pub per_sec: Option<f64>,
    /// Why processing is not reported, or what went wrong while waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One second of the run (by answer time).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SecondReport {
    pub second: u64,
    pub requests: u64,
    pub accepted: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// Everything one run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub config: ReportConfig,
    /// Wall-clock start, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// From the first send until the last answer.
    pub elapsed_secs: f64,
    pub counts: Counts,
    /// Accepted events per second over `elapsed_secs`.
    pub accepted_per_sec: f64,
    /// Requests (answered, any status) per second over `elapsed_secs`.
    pub requests_per_sec: f64,
    /// Latency of answered requests (grpc: of each event's ack), in microseconds; measured from
    /// the intended send time in open loop.
    pub latency_us: Latency,
    /// Whether latency was corrected for coordinated omission (open loop).
    pub latency_from_intended_send: bool,
    pub processed: Processed,
    pub timeline: Vec<SecondReport>,
}

/// `n` per second over `secs` (0 when no time passed).
pub fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

pub fn timeline_report(timeline: &Timeline) -> Vec<SecondReport> {
    timeline
        .seconds
        .iter()
        .enumerate()
        .map(|(i, s)| SecondReport {
            second: i as u64,
            requests: s.requests,
            accepted: s.accepted,
            errors: s.errors,
            p50_us: if s.latency.is_empty() {
                0
            } else {
                s.latency.value_at_quantile(0.5)
            },
            p99_us: if s.latency.is_empty() {
                0
            } else {
                s.latency.value_at_quantile(0.99)
            },
        })
        .collect()
}

/// A rate with thousands separators and no decimals.
pub fn rate(per_sec: f64) -> String {
    thousands(per_sec.round().max(0.0) as u64)
}

/// Microseconds as a readable duration: `850 µs`, `1.25 ms`, `2.50 s`.
pub fn duration_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1e3)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

impl Report {
    /// The table printed at the end of a run.
    pub fn summary(&self) -> String {
        let c = &self.counts;
        let cfg = &self.config;
        let mut rows: Vec<(&str, String)> = Vec::new();
        let load = match cfg.rate {
            Some(r) => format!(
                "open loop at {} events/s over up to {} connections",
                rate(r),
                cfg.connections
            ),
            None => format!(
                "closed loop, {} connection{}",
                cfg.connections,
                if cfg.connections == 1 { "" } else { "s" }
            ),
        };
        let mode = match cfg.mode {
            Mode::Http => "http (one event per request)".to_owned(),
            Mode::Batch => format!(
                "batch (NDJSON, {} events per request)",
                cfg.events_per_request
            ),
            Mode::Grpc => format!(
                "grpc (Publish streams, window {})",
                cfg.grpc_window.unwrap_or(0)
            ),
        };
        rows.push(("target", cfg.target.clone()));
        rows.push(("mode", mode));
        rows.push(("load", load));
        rows.push(("elapsed", format!("{:.2} s", self.elapsed_secs)));
        rows.push((
            "requests",
            format!(
                "{} ({} per s)",
                thousands(c.requests),
                rate(self.requests_per_sec)
            ),
        ));
        rows.push((
            "answers",
            format!(
                "2xx {} · 429 {} · 503 {} · other {} · transport errors {}",
                thousands(c.status_2xx),
                thousands(c.status_429),
                thousands(c.status_503),
                thousands(c.status_other),
                thousands(c.transport_errors)
            ),
        ));
        rows.push((
            "events",
            format!(
                "{} sent · {} accepted · {} rejected · {} failed",
                thousands(c.events_sent),
                thousands(c.events_accepted),
                thousands(c.events_rejected),
                thousands(c.events_failed)
            ),
        ));
        rows.push((
            "accepted",
            format!("{} events/s", rate(self.accepted_per_sec)),
        ));
        let p = &self.processed;
        let processed = if !p.status_endpoint {
            format!(
                "not measured: {}",
                p.note.as_deref().unwrap_or("no status endpoint")
            )
        } else {
            let mut text = match p.per_sec {
                Some(per_sec) => format!(
                    "{} events/s ({} processed{} in {:.2} s from the first send)",
                    rate(per_sec),
                    thousands(p.processed),
                    if p.dead_lettered > 0 {
                        format!(", {} dead-lettered", thousands(p.dead_lettered))
                    } else {
                        String::new()
                    },
                    p.secs.unwrap_or(0.0)
                ),
                None => format!("{} processed", thousands(p.processed)),
            };
            if !p.settled {
                text.push_str(" — NOT all accepted events were processed");
            }
            if let Some(note) = &p.note {
                let _ = write!(text, " ({note})");
            }
            text
        };
        rows.push(("processed", processed));
        let l = &self.latency_us;
        rows.push((
            "latency",
            if l.count == 0 {
                "no answers".to_owned()
            } else {
                format!(
                    "p50 {} · p90 {} · p99 {} · p99.9 {} · max {}",
                    duration_us(l.p50),
                    duration_us(l.p90),
                    duration_us(l.p99),
                    duration_us(l.p999),
                    duration_us(l.max)
                )
            },
        ));
        rows.push((
            "measured",
            format!(
                "{} per {} answer, from the {} send time",
                thousands(l.count),
                if cfg.mode == Mode::Grpc {
                    "event"
                } else {
                    "request"
                },
                if self.latency_from_intended_send {
                    "intended (coordinated-omission corrected)"
                } else {
                    "actual"
                }
            ),
        ));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::from("\nconveyor load\n");
        for (key, value) in rows {
            let _ = writeln!(out, "  {key:<width$}  {value}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::latency_histogram;

    #[test]
    fn percentiles_come_from_the_histogram() {
        let mut h = latency_histogram();
        for us in 1..=10_000u64 {
            h.record(us).expect("in range");
        }
        let l = Latency::from_histogram(&h);
        assert_eq!(l.count, 10_000);
        assert_eq!(l.min, 1);
        // 3 significant digits: within 0.1 %.
        let near = |got: u64, want: u64| got.abs_diff(want) * 1000 <= want;
        assert!(near(l.p50, 5_000), "p50 {}", l.p50);
        assert!(near(l.p90, 9_000), "p90 {}", l.p90);
        assert!(near(l.p99, 9_900), "p99 {}", l.p99);
        assert!(near(l.p999, 9_990), "p99.9 {}", l.p999);
        assert!(near(l.max, 10_000), "max {}", l.max);
        assert!((l.mean - 5_000.5).abs() < 10.0, "mean {}", l.mean);
        assert_eq!(
            Latency::from_histogram(&latency_histogram()),
            Latency::default()
        );
    }

    #[test]
    fn rates_and_numbers_read_well() {
        assert_eq!(per_sec(1_000, 0.5), 2_000.0);
        assert_eq!(per_sec(1_000, 0.0), 0.0);
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(rate(1234.6), "1,235");
        assert_eq!(duration_us(850), "850 µs");
        assert_eq!(duration_us(1_250), "1.25 ms");
        assert_eq!(duration_us(2_500_000), "2.50 s");
    }
}

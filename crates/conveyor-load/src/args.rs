//! The flags of `conveyor load` (each with its `CONVEYOR_LOAD_*` variable) and the plan they
//! make once checked.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::LoadError;

/// How events are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One event per `POST /api/v1/ingest`.
    Http,
    /// NDJSON batches of `--batch-size` events per `POST /api/v1/ingest/batch`.
    Batch,
    /// gRPC `Publish` (bidirectional stream), one stream per connection, events pipelined.
    Grpc,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Batch => "batch",
            Mode::Grpc => "grpc",
        }
    }
}

/// How progress is shown on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressStyle {
    /// A live bar when stderr is a terminal, otherwise a plain line every 5 seconds.
    Auto,
    /// Always the live bar.
    Bar,
    /// Always plain lines.
    Plain,
    /// Nothing.
    None,
}

/// `conveyor load`: sends events to a conveyor and measures what it accepted and processed.
#[derive(Debug, Clone, Parser)]
#[command(
    about = "Sends events to a conveyor (HTTP single, HTTP NDJSON batch or gRPC stream) and \
             measures latency, accepted and processed events per second."
)]
pub struct LoadArgs {
    /// Base URL of the target (a gateway or `conveyor run`), http:// only.
    #[arg(
        long,
        env = "CONVEYOR_LOAD_TARGET",
        value_name = "URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub target: String,

    /// http: one event per request; batch: NDJSON batches; grpc: Publish streams.
    #[arg(
        long,
        env = "CONVEYOR_LOAD_MODE",
        value_name = "MODE",
        value_enum,
        default_value = "http"
    )]
    pub mode: Mode,

    /// Events to send in all. Without it (and without --duration) the run lasts 10 seconds.
    #[arg(long, env = "CONVEYOR_LOAD_EVENTS", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub events: Option<u64>,

    /// Seconds to send for (with --events too: whichever ends first).
    #[arg(long, env = "CONVEYOR_LOAD_DURATION", value_name = "SECS", value_parser = parse_positive_secs)]
    pub duration: Option<f64>,

    /// Concurrent connections (closed loop: each sends its next request when the previous one
    /// was answered). Default: 64 for http, 4 for batch and grpc.
    #[arg(long, env = "CONVEYOR_LOAD_CONNECTIONS", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub connections: Option<u64>,

    /// Open loop: send this many events per second on a fixed schedule (batch mode: rate /
    /// batch size requests per second); latency is measured from each request's intended send
    /// time, so a stalled target is not hidden (coordinated omission).
    #[arg(long, env = "CONVEYOR_LOAD_RATE", value_name = "EVENTS_PER_SEC", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Events per batch request (batch mode).
    #[arg(long, env = "CONVEYOR_LOAD_BATCH_SIZE", value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_size: u64,

    /// Events in flight per gRPC stream, unanswered (grpc mode).
    #[arg(long, env = "CONVEYOR_LOAD_GRPC_WINDOW", value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub grpc_window: u64,

    /// Size in bytes of each event's JSON `data`.
    #[arg(long, env = "CONVEYOR_LOAD_PAYLOAD_BYTES", value_name = "BYTES", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub payload_bytes: u64,

    /// The events' `source`.
    #[arg(
        long,
        env = "CONVEYOR_LOAD_SOURCE",
        value_name = "NAME",
        default_value = "conveyor-load"
    )]
    pub source: String,

    /// Longest wait for one answer, in seconds; a request not answered by then is a transport
    /// error.
    #[arg(long, env = "CONVEYOR_LOAD_REQUEST_TIMEOUT", value_name = "SECS", default_value_t = 30.0,
          value_parser = parse_positive_secs)]
    pub request_timeout: f64,

    /// After sending, how long to wait for the target's `/api/v1/status` to show every accepted
    /// event processed; 0 skips the wait (and reports accepted events only).
    #[arg(long, env = "CONVEYOR_LOAD_SETTLE_TIMEOUT", value_name = "SECS", default_value_t = 60.0,
          value_parser = parse_secs)]
    pub settle_timeout: f64,

    /// Write the JSON report here.
    #[arg(long, env = "CONVEYOR_LOAD_REPORT", value_name = "FILE.json")]
    pub report: Option<PathBuf>,

    /// Write a latency-over-time chart (SVG: p50/p99 and throughput per second) here.
    #[arg(long, env = "CONVEYOR_LOAD_CHART", value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,

    /// Progress on stderr: auto (a bar on a terminal, a line every 5 s otherwise), bar, plain,
    /// none.
    #[arg(
        long,
        env = "CONVEYOR_LOAD_PROGRESS",
        value_name = "STYLE",
        value_enum,
        default_value = "auto"
    )]
    pub progress: ProgressStyle,
}

fn parse_secs(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=31_536_000.0).contains(&secs) {
        return Err(format!(
            "'{text}' is not a number of seconds (0 to one year)"
        ));
    }
    Ok(secs)
}

fn parse_positive_secs(text: &str) -> Result<f64, String> {
    let secs = parse_secs(text)?;
    if secs <= 0.0 {
        return Err(format!("'{text}' must be more than 0 seconds"));
    }
    Ok(secs)
}

fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of events per second"))?;
    if !rate.is_finite() || rate <= 0.0 || rate > 1e9 {
        return Err(format!(
            "'{text}' must be more than 0 and at most 1e9 events per second"
        ));
    }
    Ok(rate)
}

/// Runs last this long when neither `--events` nor `--duration` is given.
pub const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// The checked configuration of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Base URL without a trailing slash.
    pub target: String,
    pub mode: Mode,
    pub events: Option<u64>,
    pub duration: Option<Duration>,
    pub connections: usize,
    pub rate: Option<f64>,
    /// Events per request: `batch_size` in batch mode, 1 otherwise.
    pub per_request: u64,
    pub grpc_window: usize,
    pub payload_bytes: usize,
    pub source: String,
    pub request_timeout: Duration,
    pub settle_timeout: Duration,
}

impl Plan {
    pub fn from_args(args: &LoadArgs) -> Result<Plan, LoadError> {
        let target = args.target.trim().trim_end_matches('/').to_owned();
        let Some(rest) = target.strip_prefix("http://") else {
            return Err(LoadError::Config(format!(
                "CONVEYOR_LOAD_TARGET (--target): '{}' must start with http://",
                args.target
            )));
        };
        let authority = rest.split('/').next().unwrap_or("");
        if authority.is_empty() {
            return Err(LoadError::Config(format!(
                "CONVEYOR_LOAD_TARGET (--target): '{}' has no host",
                args.target
            )));
        }
        if rest.contains('/') {
            return Err(LoadError::Config(format!(
                "CONVEYOR_LOAD_TARGET (--target): '{}' must be a base URL (http://host:port) \
                 without a path",
                args.target
            )));
        }
        let duration = match (args.events, args.duration) {
            (None, None) => Some(DEFAULT_DURATION),
            (_, secs) => secs.map(Duration::from_secs_f64),
        };
        let connections = args.connections.unwrap_or(match args.mode {
            Mode::Http => 64,
            Mode::Batch | Mode::Grpc => 4,
        });
        Ok(Plan {
            target,
            mode: args.mode,
            events: args.events,
            duration,
            connections: usize::try_from(connections).unwrap_or(usize::MAX),
            rate: args.rate,
            per_request: match args.mode {
                Mode::Batch => args.batch_size,
                Mode::Http | Mode::Grpc => 1,
            },
            grpc_window: usize::try_from(args.grpc_window).unwrap_or(usize::MAX),
            payload_bytes: usize::try_from(args.payload_bytes).unwrap_or(usize::MAX),
            source: args.source.clone(),
            request_timeout: Duration::from_secs_f64(args.request_timeout),
            settle_timeout: Duration::from_secs_f64(args.settle_timeout),
        })
    }

    /// Requests to send in all, when `--events` bounds the run.
    pub fn total_requests(&self) -> Option<u64> {
        self.events.map(|n| n.div_ceil(self.per_request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> LoadArgs {
        let mut all = vec!["conveyor-load"];
        all.extend_from_slice(args);
        LoadArgs::try_parse_from(all).expect("valid flags")
    }

    #[test]
    fn defaults_depend_on_the_mode() {
        let plan = Plan::from_args(&parse(&[])).expect("default plan");
        assert_eq!(plan.connections, 64);
        assert_eq!(plan.per_request, 1);
        assert_eq!(plan.duration, Some(DEFAULT_DURATION));
        let plan =
            Plan::from_args(&parse(&["--mode", "batch", "--events", "2500"])).expect("batch plan");
        assert_eq!(plan.connections, 4);
        assert_eq!(plan.per_request, 1000);
        assert_eq!(plan.duration, None);
        assert_eq!(plan.total_requests(), Some(3));
    }

    #[test]
    fn bad_targets_and_numbers_are_refused() {
        for target in ["https://x:1", "x:1", "http://", "http://x:1/api"] {
            let err = Plan::from_args(&parse(&["--target", target]))
                .expect_err("bad target must be refused");
            assert!(matches!(err, LoadError::Config(_)), "{target}: {err}");
        }
        assert_eq!(
            Plan::from_args(&parse(&["--target", "http://127.0.0.1:9/"]))
                .expect("trailing slash is fine")
                .target,
            "http://127.0.0.1:9"
        );
        for bad in [
            &["--rate", "0"][..],
            &["--rate", "-5"],
            &["--duration", "0"],
            &["--events", "0"],
            &["--batch-size", "0"],
        ] {
            let mut all = vec!["conveyor-load"];
            all.extend_from_slice(bad);
            assert!(LoadArgs::try_parse_from(all).is_err(), "{bad:?} accepted");
        }
    }
}

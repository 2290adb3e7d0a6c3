//! `conveyor load`: a load generator for any conveyor, and (in `src/bin`) `conveyor-ceiling`,
//! the bare server that parses the same bodies and answers at once, to compare with.
//!
//! A run sends the same event over and over in one of three modes ([`Mode`]): one event per
//! `POST /api/v1/ingest`, NDJSON batches to `/api/v1/ingest/batch`, or gRPC `Publish` streams.
//! Closed loop: `--connections` workers, each sending its next request once the previous one
//! was answered. Open loop (`--rate`): requests are due on a fixed schedule and latency is
//! measured from when each was due ([`schedule`] explains the coordinated-omission
//! correction). Latency goes into HDR histograms (total and per second); answers are counted
//! by status. At the end the target's `/api/v1/status` is read until every accepted event shows
//! as processed, so the result is processed events per second, not just accepted requests.

pub mod args;
pub mod body;
pub mod chart;
pub mod grpc;
pub mod http;
pub mod progress;
pub mod recorder;
pub mod report;
pub mod schedule;
pub mod settle;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinSet;

pub use args::{LoadArgs, Mode, Plan, ProgressStyle};
pub use report::Report;

use crate::grpc::GrpcDriver;
use crate::http::HttpDriver;
use crate::recorder::{Live, Recorder, Timeline};
use crate::report::{Latency, Processed, ReportConfig, per_sec, timeline_report};
use crate::schedule::{Schedule, Work};

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad flags (exit code 64 in the binary).
    #[error("{0}")]
    Config(String),
    /// The run happened but the target accepted nothing.
    #[error("the target accepted no events ({0})")]
    NothingAccepted(String),
    /// Something else failed (writing the report, building a client).
    #[error("{0}")]
    Runtime(String),
}

/// Runs the load, prints the summary on stdout, writes `--report` and `--chart`, and fails if
/// the target accepted nothing.
pub async fn run(args: LoadArgs) -> Result<Report, LoadError> {
    let report = execute(&args).await?;
    print!("{}", report.summary());
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| LoadError::Runtime(format!("cannot encode the report: {e}")))?;
        std::fs::write(path, json).map_err(|e| {
            LoadError::Runtime(format!("cannot write the report {}: {e}", path.display()))
        })?;
        println!("  {:<9}  {}", "report", path.display());
    }
    if let Some(path) = &args.chart {
        std::fs::write(path, chart::render(&report)).map_err(|e| {
            LoadError::Runtime(format!("cannot write the chart {}: {e}", path.display()))
        })?;
        println!("  {:<9}  {}", "chart", path.display());
    }
    if report.counts.events_accepted == 0 {
        let c = &report.counts;
        return Err(LoadError::NothingAccepted(format!(
            "{} requests: {} transport errors, {} answered 429, {} answered 503, {} other",
            c.requests, c.transport_errors, c.status_429, c.status_503, c.status_other
        )));
    }
    Ok(report)
}

/// Runs the load and measures it; prints nothing on stdout (progress goes to stderr).
pub async fn execute(args: &LoadArgs) -> Result<Report, LoadError> {
    let plan = Plan::from_args(args)?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(plan.connections)
        .timeout(plan.request_timeout)
        .tcp_nodelay(true)
        .http1_only()
        .build()
        .map_err(|e| LoadError::Runtime(format!("cannot build the HTTP client: {e}")))?;
    let grpc = match plan.mode {
        Mode::Grpc => Some(Arc::new(GrpcDriver::new(&plan).map_err(LoadError::Config)?)),
        Mode::Http | Mode::Batch => None,
    };
    let status_client = reqwest::Client::builder()
        .http1_only()
        .build()
        .map_err(|e| LoadError::Runtime(format!("cannot build the HTTP client: {e}")))?;
    let baseline = settle::read_totals(&status_client, &plan.target).await;
    if let Err(why) = &baseline {
        eprintln!("conveyor load: {why}; reporting accepted events only");
    }

    let started_at_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let start = Instant::now();
    let schedule = plan
        .rate
        .map(|rate| Schedule::new(start, rate / plan.per_request as f64));
    let work = Arc::new(Work::new(
        plan.events,
        plan.per_request,
        plan.duration.map(|d| start + d),
        schedule,
    ));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let live = Arc::new(Live::default());
    let (done_tx, done_rx) = watch::channel(false);
    let progress = tokio::spawn(progress::show(
        args.progress,
        Arc::clone(&live),
        progress::Goal {
            events: plan.events,
            duration: plan.duration,
        },
        start,
        done_rx,
    ));
    let interrupt = {
        let work = Arc::clone(&work);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nconveyor load: interrupted; finishing requests in flight");
                work.stop();
            }
        })
    };

    let mut workers = JoinSet::new();
    let http = Arc::new(HttpDriver::new(&plan, client).map_err(LoadError::Config)?);
    for _ in 0..plan.connections {
        let recorder = Recorder::new(start, Arc::clone(&timeline), Arc::clone(&live));
        let work = Arc::clone(&work);
        match &grpc {
            Some(driver) => workers.spawn(Arc::clone(driver).worker(work, recorder)),
            None => workers.spawn(Arc::clone(&http).worker(work, recorder)),
        };
    }
    let mut recorders = Vec::with_capacity(plan.connections);
    while let Some(joined) = workers.join_next().await {
        let mut recorder =
            joined.map_err(|e| LoadError::Runtime(format!("a load worker failed: {e}")))?;
        recorder.finish();
        recorders.push(recorder);
    }
    let _ = done_tx.send(true);
    let _ = progress.await;
    let totals = recorder::merge(&recorders);
    let last_done = totals.last_done.unwrap_or(start);
    let elapsed = last_done.saturating_duration_since(start).as_secs_f64();
    let accepted = totals.counts.events_accepted;

    let processed = match baseline {
        Err(why) => Processed {
            status_endpoint: false,
            note: Some(why),
            ..Processed::default()
        },
        Ok(_) if accepted == 0 => Processed {
            status_endpoint: true,
            settled: true,
            note: Some("nothing was accepted".to_owned()),
            ..Processed::default()
        },
        Ok(_) if plan.settle_timeout.is_zero() || work.is_stopped() => Processed {
            status_endpoint: true,
            note: Some("not waited for (--settle-timeout 0 or interrupted)".to_owned()),
            ..Processed::default()
        },
        Ok(baseline) => {
            let settled = settle::wait_processed(
                &status_client,
                &plan.target,
                baseline,
                accepted,
                plan.settle_timeout,
            )
            .await;
            processed_report(&baseline, &settled, accepted, start, plan.settle_timeout)
        }
    };
    interrupt.abort();

    let timeline = timeline_report(&timeline.lock().expect("timeline lock"));
    Ok(Report {
        config: ReportConfig::from_plan(&plan),
        started_at_ms,
        elapsed_secs: elapsed,
        counts: totals.counts,
        accepted_per_sec: per_sec(accepted, elapsed),
        requests_per_sec: per_sec(totals.counts.requests, elapsed),
        latency_us: Latency::from_histogram(&totals.latency),
        latency_from_intended_send: plan.rate.is_some(),
        processed,
        timeline,
    })
}

/// The processing figures from the totals before the run and the end of the wait.
pub fn processed_report(
    baseline: &settle::Totals,
    settled: &settle::Settled,
    accepted: u64,
    start: Instant,
    timeout: Duration,
) -> Processed {
    let processed = settled.totals.processed.saturating_sub(baseline.processed);
    let dead_lettered = settled
        .totals
        .dead_lettered
        .saturating_sub(baseline.dead_lettered);
    let secs = settled
        .done_at
        .map(|at| at.saturating_duration_since(start).as_secs_f64());
    let note = match (&settled.done_at, &settled.error) {
        (Some(_), _) => None,
        (None, Some(error)) => Some(error.clone()),
        (None, None) => Some(format!(
            "{} of {accepted} accepted events processed after waiting {:.0} s",
            processed + dead_lettered,
            timeout.as_secs_f64()
        )),
    };
    Processed {
        status_endpoint: true,
        settled: settled.done_at.is_some(),
        processed,
        dead_lettered,
        secs,
        per_sec: secs.map(|s| per_sec(processed, s)),
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::Outcome;
    use crate::schedule::latency_start;

    /// One connection, a target answering in 1 ms except one request that stalls 1 s; 100
    /// requests per second for 10 s. Returns the latency histogram.
    fn simulate_stall(open_loop: bool) -> hdrhistogram::Histogram<u64> {
        let start = Instant::now();
        let rate = 100.0;
        let schedule = open_loop.then(|| Schedule::new(start, rate));
        let work = Work::new(Some(1000), 1, None, schedule);
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        let mut recorder = Recorder::new(start, timeline, Arc::new(Live::default()));
        let mut free_at = start;
        while let Some(claim) = work.claim_at(start) {
            // Closed loop sends the next one as soon as the connection is free (with a 10 ms
            // think time, to offer the same 100/s when nothing stalls).
            let due = claim
                .intended
                .unwrap_or(free_at + Duration::from_millis(if claim.index == 0 { 0 } else { 9 }));
            let sent = due.max(free_at);
            let service = if claim.index == 500 {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(1)
            };
            let done = sent + service;
            free_at = done;
            recorder.record(
                latency_start(claim.intended, sent),
                done,
                Outcome::Status(202),
                1,
                1,
            );
        }
        recorder.latency
    }

    #[test]
    fn open_loop_latency_shows_the_stall_to_every_request_that_waited_for_it() {
        let corrected = simulate_stall(true);
        assert_eq!(corrected.len(), 1000);
        // The 1 s stall delayed the ~100 requests due during it: they waited up to ~1 s.
        let p50 = corrected.value_at_quantile(0.50);
        let p99 = corrected.value_at_quantile(0.99);
        assert!(
            p99 >= 800_000,
            "p99 {p99} µs: the requests due during the stall must show it"
        );
        assert!(p50 < 5_000, "p50 {p50} µs: most requests were on time");
        let over_100ms = corrected
            .iter_recorded()
            .filter(|v| v.value_iterated_to() >= 100_000)
            .map(|v| v.count_at_value())
            .sum::<u64>();
        assert!(
            (90..=110).contains(&over_100ms),
            "{over_100ms} requests over 100 ms"
        );

        // The same stall measured closed loop hides it: one slow request in a thousand.
        let naive = simulate_stall(false);
        let p99 = naive.value_at_quantile(0.99);
        assert!(p99 < 2_000, "closed-loop p99 {p99} µs");
        assert!(naive.max() >= 1_000_000, "the stalled request itself");
    }

    #[test]
    fn processed_rate_runs_from_the_first_send_to_the_last_processed_event() {
        let start = Instant::now();
        let baseline = settle::Totals {
            accepted: 50,
            processed: 40,
            dead_lettered: 10,
        };
        let settled = settle::Settled {
            totals: settle::Totals {
                accepted: 1050,
                processed: 1030,
                dead_lettered: 20,
            },
            done_at: Some(start + Duration::from_secs(2)),
            error: None,
        };
        let p = processed_report(&baseline, &settled, 1000, start, Duration::from_secs(60));
        assert!(p.settled);
        assert_eq!((p.processed, p.dead_lettered), (990, 10));
        assert_eq!(p.secs, Some(2.0));
        assert_eq!(p.per_sec, Some(495.0));
        assert_eq!(p.note, None);

        let unsettled = settle::Settled {
            done_at: None,
            ..settled
        };
        let p = processed_report(&baseline, &unsettled, 2000, start, Duration::from_secs(60));
        assert!(!p.settled);
        assert_eq!(p.per_sec, None);
        assert!(
            p.note
                .as_deref()
                .is_some_and(|n| n.contains("1000 of 2000")),
            "{:?}",
            p.note
        );
    }
}

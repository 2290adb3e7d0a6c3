//! `conveyor load` against `conveyor-ceiling` (this crate's bare server), on random ports: every
//! HTTP mode, closed and open loop, the report and chart files, and a target that is down.

use std::process::Stdio;
use std::time::Duration;

use clap::Parser;
use conveyor_load::{LoadArgs, LoadError, Mode, Report};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `conveyor-ceiling`, killed on drop.
struct Ceiling {
    _child: Child,
    url: String,
}

async fn start_ceiling() -> Ceiling {
    let mut child = Command::new(env!("CARGO_BIN_EXE_conveyor-ceiling"))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start conveyor-ceiling");
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("conveyor-ceiling prints its listening line within 30 s")
        .expect("read conveyor-ceiling's stdout")
        .expect("conveyor-ceiling printed a line before exiting");
    let url = line
        .strip_prefix("conveyor-ceiling listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .trim()
        .to_owned();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    // Keep draining stdout so the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ceiling { _child: child, url }
}

fn args(target: &str, extra: &[&str]) -> LoadArgs {
    let mut all = vec![
        "conveyor-load",
        "--target",
        target,
        "--progress",
        "none",
        "--settle-timeout",
        "20",
    ];
    all.extend_from_slice(extra);
    LoadArgs::try_parse_from(all).expect("valid load flags")
}

/// What every successful run must satisfy: `n` events sent, accepted and processed; the
/// latency and the timeline account for every answer.
fn assert_all_accepted_and_processed(report: &Report, n: u64) {
    let c = &report.counts;
    assert_eq!(c.events_sent, n, "{c:?}");
    assert_eq!(c.events_accepted, n, "{c:?}");
    assert_eq!(c.events_rejected + c.events_failed, 0, "{c:?}");
    assert_eq!(c.status_2xx, c.requests, "{c:?}");
    assert_eq!(report.latency_us.count, c.requests);
    assert!(report.latency_us.p50 > 0 && report.latency_us.p50 <= report.latency_us.p99);
    assert!(report.latency_us.p99 <= report.latency_us.max);
    assert!(report.accepted_per_sec > 0.0);
    let timeline_accepted: u64 = report.timeline.iter().map(|s| s.accepted).sum();
    let timeline_requests: u64 = report.timeline.iter().map(|s| s.requests).sum();
    assert_eq!(timeline_accepted, n);
    assert_eq!(timeline_requests, c.requests);
    let p = &report.processed;
    assert!(p.status_endpoint, "{p:?}");
    assert!(p.settled, "{p:?}");
    assert_eq!(p.processed, n, "{p:?}");
    assert!(p.per_sec.is_some_and(|r| r > 0.0), "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_mode_closed_loop() {
    let ceiling = start_ceiling().await;
    let report = conveyor_load::execute(&args(
        &ceiling.url,
        &["--mode", "http", "--events", "3000", "--connections", "16"],
    ))
    .await
    .expect("load run");
    assert_eq!(report.config.mode, Mode::Http);
    assert_eq!(report.counts.requests, 3000);
    assert!(!report.latency_from_intended_send);
    assert_all_accepted_and_processed(&report, 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_mode_with_a_short_last_batch() {
    let ceiling = start_ceiling().await;
    let report = conveyor_load::execute(&args(
        &ceiling.url,
        &[
            "--mode",
            "batch",
            "--events",
            "5000",
            "--batch-size",
            "700",
            "--connections",
            "3",
        ],
    ))
    .await
    .expect("load run");
    // 7 full batches of 700 and one of 100.
    assert_eq!(report.counts.requests, 8);
    assert_all_accepted_and_processed(&report, 5000);

    // The ceiling's status counts across runs; the second run measures only its own events.
    let again = conveyor_load::execute(&args(
        &ceiling.url,
        &["--mode", "batch", "--events", "2000", "--batch-size", "500"],
    ))
    .await
    .expect("second load run");
    assert_all_accepted_and_processed(&again, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_the_rate_and_measures_from_the_intended_time() {
    let ceiling = start_ceiling().await;
    let report = conveyor_load::execute(&args(
        &ceiling.url,
        &[
            "--mode",
            "http",
            "--events",
            "1000",
            "--rate",
            "2000",
            "--connections",
            "8",
        ],
    ))
    .await
    .expect("load run");
    assert!(report.latency_from_intended_send);
    assert_eq!(report.config.model, "open");
    // The last request is due at 999 / 2000 s: the run cannot be faster than the schedule.
    assert!(
        report.elapsed_secs >= 0.49,
        "1000 events at 2000/s took {} s",
        report.elapsed_secs
    );
    assert!(
        report.accepted_per_sec <= 2_100.0,
        "{} events/s",
        report.accepted_per_sec
    );
    assert_all_accepted_and_processed(&report, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bounded_batch_run_writes_the_report_and_the_chart() {
    let ceiling = start_ceiling().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let report_path = dir.path().join("report.json");
    let chart_path = dir.path().join("chart.svg");
    let report_arg = report_path.display().to_string();
    let chart_arg = chart_path.display().to_string();
    let returned = conveyor_load::run(args(
        &ceiling.url,
        &[
            "--mode",
            "batch",
            "--batch-size",
            "100",
            "--duration",
            "1.5",
            "--connections",
            "2",
            "--report",
            &report_arg,
            "--chart",
            &chart_arg,
        ],
    ))
    .await
    .expect("load run");
    let written: Report =
        serde_json::from_slice(&std::fs::read(&report_path).expect("the report file was written"))
            .expect("the report file is a Report");
    // (Floats may differ in their last digit after a JSON round trip.)
    assert_eq!(written.counts, returned.counts);
    assert_eq!(written.timeline, returned.timeline);
    assert_eq!(written.latency_us.p99, returned.latency_us.p99);
    assert_eq!(written.config, returned.config);
    let n = written.counts.events_accepted;
    assert!(n >= 100, "{n} events accepted in 1.5 s");
    assert_eq!(n % 100, 0, "whole batches only without --events");
    assert_all_accepted_and_processed(&written, n);
    assert!(
        (1.4..5.0).contains(&written.elapsed_secs),
        "a 1.5 s run took {} s",
        written.elapsed_secs
    );
    assert!(
        written.timeline.len() >= 2,
        "one entry per second: {:?}",
        written.timeline
    );
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report")).expect("JSON");
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(json["latency_us"][key].is_u64(), "latency_us.{key}: {json}");
    }
    for key in [
        "status_2xx",
        "status_429",
        "status_503",
        "status_other",
        "transport_errors",
    ] {
        assert!(json["counts"][key].is_u64(), "counts.{key}: {json}");
    }
    assert_eq!(json["config"]["mode"], "batch");
    let svg = std::fs::read_to_string(&chart_path).expect("the chart file was written");
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains(r#"class="p50""#) && svg.contains(r#"class="p99""#));
    assert!(svg.contains(r#"class="throughput""#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_fails_the_run() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("local addr").port()
    };
    let target = format!("http://127.0.0.1:{port}");
    let report = conveyor_load::execute(&args(&target, &["--events", "20", "--connections", "2"]))
        .await
        .expect("the run itself completes");
    assert_eq!(report.counts.events_accepted, 0);
    assert_eq!(report.counts.transport_errors, 20);
    assert!(!report.processed.status_endpoint);
    assert!(report.processed.note.is_some());
    let failure = conveyor_load::run(args(&target, &["--events", "5", "--connections", "1"]))
        .await
        .expect_err("nothing accepted must fail");
    assert!(
        matches!(failure, LoadError::NothingAccepted(_)),
        "{failure}"
    );
}

//! `conveyor load` against `conveyor run`: every mode, and the report's processed count checked
//! against the target's own totals.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{conveyor_command, spawn_run, total};

/// Runs `conveyor load --target <url> <extra>` with a JSON report; returns the report.
async fn load(target: &str, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let report = dir.path().join("report.json");
    let mut cmd = conveyor_command();
    cmd.arg("load")
        .args(["--target", target, "--progress", "plain"])
        .args(["--settle-timeout", "60", "--report"])
        .arg(&report)
        .args(extra)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("conveyor load finishes within 120 s")
        .expect("run conveyor load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "conveyor load {extra:?} failed: {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("processed") && stdout.contains("p99"),
        "the summary table: {stdout}"
    );
    let text = std::fs::read(&report).expect("the report file was written");
    serde_json::from_slice(&text).expect("the report is JSON")
}

fn assert_report(report: &Value, n: u64) {
    let counts = &report["counts"];
    assert_eq!(counts["events_sent"], n, "{counts}");
    assert_eq!(counts["events_accepted"], n, "{counts}");
    assert_eq!(counts["transport_errors"], 0, "{counts}");
    let processed = &report["processed"];
    assert_eq!(processed["status_endpoint"], true, "{processed}");
    assert_eq!(processed["settled"], true, "{processed}");
    assert_eq!(
        processed["processed"], n,
        "processed == accepted: {processed}"
    );
    assert!(
        processed["per_sec"].as_f64().is_some_and(|r| r > 0.0),
        "{processed}"
    );
    assert!(report["latency_us"]["p99"].as_u64().is_some_and(|p| p > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_in_every_mode_is_accepted_and_processed() {
    let run = spawn_run(&[]).await;
    let url = run.base_url().to_owned();
    let mut expected = 0;
    for (mode, n, extra) in [
        ("http", 2_000u64, &["--connections", "16"][..]),
        (
            "batch",
            5_000,
            &["--batch-size", "500", "--connections", "2"],
        ),
        (
            "grpc",
            3_000,
            &["--connections", "2", "--grpc-window", "256"],
        ),
    ] {
        let events = n.to_string();
        let mut args = vec!["--mode", mode, "--events", &events];
        args.extend_from_slice(extra);
        let report = load(&url, &args).await;
        assert_eq!(report["config"]["mode"], mode);
        assert_report(&report, n);
        expected += n;
        let status = run.status().await;
        assert_eq!(total(&status, "accepted"), expected, "{}", status["totals"]);
        assert_eq!(
            total(&status, "processed"),
            expected,
            "{}",
            status["totals"]
        );
    }
    // Open loop: 1,000 events at 2,000/s cannot take less than half a second.
    let report = load(
        &url,
        &["--mode", "http", "--events", "1000", "--rate", "2000"],
    )
    .await;
    assert_report(&report, 1000);
    assert_eq!(report["latency_from_intended_send"], true);
    assert!(
        report["elapsed_secs"].as_f64().is_some_and(|s| s >= 0.49),
        "{}",
        report["elapsed_secs"]
    );
    let records = run
        .wait_sink_len(expected as usize + 1000, Duration::from_secs(30))
        .await;
    assert_eq!(
        records.len() as u64,
        expected + 1000,
        "one sink record per event"
    );
}

//! SIGTERM under load: intake stops with 503 `shutting_down`, everything accepted is
//! processed, and the process exits 0 (docs/INTERFACE.md "Shutdown"; ARCHITECTURE.md "Shutdown").

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::harness::{
    Conveyor, eventually, id_counts, ingest_one, read_json, sample_event, spawn_run, spawn_split,
    total,
};
use crate::ledger::Ledger;

/// One worker with a CPU-heavy stage: a backlog builds up under load, so SIGTERM finds
/// accepted events still queued that must be drained before exit.
const SLOW_PIPELINE: &[&str] = &[
    "--drain-timeout-secs",
    "20",
    "--workers",
    "1",
    "--stage",
    "cpu:2000",
];

/// 16 HTTP senders posting events with client ids to `front` until it refuses with 503 or
/// goes away.
struct Load {
    senders: Vec<JoinHandle<()>>,
    ledger: Ledger,
    accepted: Arc<AtomicUsize>,
    /// Senders that stopped on a 503.
    refused: Arc<AtomicUsize>,
}

impl Load {
    /// `codes_503`: the error codes a 503 may carry. With `check_ready`, a sender that got a
    /// 503 also checks that `front`'s `/ready` (if it still answers) is 503.
    fn start(front: &Conveyor, codes_503: &'static [&'static str], check_ready: bool) -> Load {
        let accepted = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let ledger = Ledger::new();
        let mut senders = Vec::new();
        for task in 0..16 {
            let http = front.http().clone();
            let ingest_url = front.url("/api/v1/ingest");
            let ready_url = check_ready.then(|| front.url("/ready"));
            let (counter, refused, ledger) = (accepted.clone(), refused.clone(), ledger.clone());
            senders.push(tokio::spawn(async move {
                for n in 0..100_000 {
                    let sample = sample_event("load", &format!("sd{task}"), n, true);
                    let id = sample.id.clone().expect("has id");
                    ledger.sent([id.as_str()]);
                    let Ok(resp) = http.post(&ingest_url).json(&sample.body).send().await else {
                        break; // the server went away
                    };
                    let code = resp.status().as_u16();
                    let Ok(text) = resp.text().await else { break };
                    match code {
                        202 => {
                            ledger.promised(&id, "http_single");
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        503 => {
                            let body: serde_json::Value = serde_json::from_str(&text)
                                .unwrap_or_else(|e| panic!("503 body is not JSON ({e}): {text:?}"));
                            let code = body["error"]["code"].as_str().unwrap_or_default();
                            assert!(
                                codes_503.contains(&code),
                                "503 during shutdown should be one of {codes_503:?}: {body}"
                            );
                            if let Some(ready_url) = &ready_url
                                && let Ok(ready) = http.get(ready_url).send().await
                            {
                                assert_eq!(
                                    ready.status().as_u16(),
                                    503,
                                    "/ready after intake said shutting_down"
                                );
                            }
                            refused.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        other => panic!("unexpected {other} before/while shutting down: {text}"),
                    }
                }
            }));
        }
        Load {
            senders,
            ledger,
            accepted,
            refused,
        }
    }

    async fn wait_accepted(&self, n: usize) {
        eventually(
            &format!("{n} events accepted before SIGTERM"),
            Duration::from_secs(30),
            async || {
                let accepted = self.accepted.load(Ordering::Relaxed);
                if accepted >= n {
                    Ok(())
                } else {
                    Err(format!("{accepted} accepted"))
                }
            },
        )
        .await;
    }

    /// Waits for every sender to stop; returns the ledger and how many stopped on a 503.
    async fn finish(self) -> (Ledger, usize) {
        for sender in self.senders {
            tokio::time::timeout(Duration::from_secs(30), sender)
                .await
                .expect("senders stop once intake refuses or the server is gone")
                .expect("a sender panicked");
        }
        (self.ledger, self.refused.load(Ordering::Relaxed))
    }
}

/// Asserts `front` shows a backlog (accepted events not yet processed), so that the SIGTERM
/// that follows finds work to drain.
async fn assert_backlog(front: &Conveyor) -> u64 {
    let status = front.status().await;
    let backlog = total(&status, "pending");
    assert!(backlog > 0, "a backlog at SIGTERM: {}", status["totals"]);
    backlog
}

/// SIGTERMs `process` (a backlog of `backlog` events waiting), expects exit 0 within the drain
/// timeout (plus margin), then checks that the clients were refused with 503 after the
/// SIGTERM (the door keeps its listener open while the backlog drains) and the ledger against
/// the sink.
async fn sigterm_and_check(process: &mut Conveyor, backlog: u64, load: Load) {
    process.sigterm();
    let exit = process.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status after SIGTERM: {exit}\n{}",
        process.stderr_tail()
    );
    let (ledger, refused) = load.finish().await;
    assert!(
        refused > 0,
        "no client was refused with 503 after SIGTERM (backlog {backlog})"
    );
    eprintln!("backlog at SIGTERM: {backlog}; senders refused with 503: {refused}");
    let verdict = ledger.check(&[process.sink_path()]);
    assert!(verdict.is_clean(), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_everything_accepted_and_exits_0() {
    let mut conveyor = spawn_run(SLOW_PIPELINE).await;
    let load = Load::start(&conveyor, &["shutting_down"], true);
    load.wait_accepted(2_000).await;
    let backlog = assert_backlog(&conveyor).await;
    sigterm_and_check(&mut conveyor, backlog, load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_processor_sigterm_under_load_drains_its_queue_and_exits_0() {
    let mut split = spawn_split(SLOW_PIPELINE).await;
    // Through the gateway, a processor that is going away is `shutting_down` or `unavailable`.
    let load = Load::start(&split.gateway, &["shutting_down", "unavailable"], false);
    load.wait_accepted(2_000).await;
    let backlog = assert_backlog(&split.gateway).await;
    sigterm_and_check(&mut split.processor, backlog, load).await;

    // The gateway stays up and reports the processor gone.
    eventually(
        "the gateway to report the stopped processor",
        Duration::from_secs(15),
        async || {
            let status = split.gateway.status().await;
            let processor_ok = status["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|i| i["role"] == "processor" && i["healthy"] == true);
            if status["status"] == "degraded" && !processor_ok {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        },
    )
    .await;
    let (code, body) = read_json(
        split
            .gateway
            .http()
            .post(split.gateway.url("/api/v1/ingest"))
            .json(&sample_event("after", "sd", 0, true).body)
            .send()
            .await
            .expect("the gateway still answers"),
    )
    .await;
    assert_eq!(code, 503, "ingest with the processor gone: {body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_process_exits_0_on_sigterm_and_keeps_what_it_processed() {
    let mut conveyor = spawn_run(&[]).await;
    let sample = sample_event("idle", "sd", 1, true);
    ingest_one(&conveyor, &sample).await;
    conveyor.sigterm();
    let exit = conveyor.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status after SIGTERM: {exit}\n{}",
        conveyor.stderr_tail()
    );
    let counts = id_counts(&conveyor.read_sink());
    assert_eq!(
        counts.get(sample.id.as_deref().expect("has id")),
        Some(&1),
        "sink after shutdown: {counts:?}"
    );
}

/// A drain that cannot finish in time is cut at `--drain-timeout-secs`: the process exits soon
/// after the timeout instead of hanging, and says on stderr how much it left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_drain_timeout_bounds_the_exit_and_names_what_was_left() {
    let mut conveyor = spawn_run(&[
        "--drain-timeout-secs",
        "1",
        "--workers",
        "1",
        "--batch-size",
        "1",
        "--stage",
        "cpu:200000",
    ])
    .await;
    for i in 0..200 {
        ingest_one(&conveyor, &sample_event("left", "drain", i, true)).await;
    }
    let backlog = assert_backlog(&conveyor).await;
    let started = std::time::Instant::now();
    conveyor.sigterm();
    let exit = conveyor.wait_exit(Duration::from_secs(20)).await;
    let took = started.elapsed();
    eprintln!("exit {exit:?} {took:?} after SIGTERM with {backlog} events pending");
    assert!(
        took < Duration::from_secs(8),
        "the drain timeout (1 s) bounds the exit: took {took:?}"
    );
    let stderr = conveyor.stderr_tail();
    assert!(
        stderr.contains("drain timeout reached before the queue was empty")
            && stderr.contains("left_in_queue"),
        "the log names what was left:\n{stderr}"
    );
}

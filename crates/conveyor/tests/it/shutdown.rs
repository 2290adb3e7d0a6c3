//! SIGTERM under load: intake stops with 503 `shutting_down`, everything accepted is
//! processed, and the process exits 0 (INTERFACE.md "Shutdown", DESIGN.md contract 7).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::harness::{
    Conveyor, eventually, id_counts, read_json, sample_event, spawn_run, spawn_split,
};

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

/// What one sender saw.
#[derive(Default)]
struct Sent {
    /// Every id it tried to send (an event whose answer was lost may still be accepted).
    attempted: Vec<String>,
    /// Ids answered 202.
    accepted: Vec<String>,
}

/// 16 HTTP senders posting events with client ids to `front` until it refuses with 503 or
/// goes away.
struct Load {
    senders: Vec<JoinHandle<Sent>>,
    accepted: Arc<AtomicUsize>,
}

impl Load {
    /// `codes_503`: the error codes a 503 may carry. With `check_ready`, a sender that got a
    /// 503 also checks that `front`'s `/ready` (if it still answers) is 503.
    fn start(front: &Conveyor, codes_503: &'static [&'static str], check_ready: bool) -> Load {
        let accepted = Arc::new(AtomicUsize::new(0));
        let mut senders = Vec::new();
        for task in 0..16 {
            let http = front.http().clone();
            let ingest_url = front.url("/api/v1/ingest");
            let ready_url = check_ready.then(|| front.url("/ready"));
            let counter = accepted.clone();
            senders.push(tokio::spawn(async move {
                let mut sent = Sent::default();
                for n in 0..100_000 {
                    let sample = sample_event("load", &format!("sd{task}"), n, true);
                    let id = sample.id.clone().expect("has id");
                    sent.attempted.push(id.clone());
                    let Ok(resp) = http.post(&ingest_url).json(&sample.body).send().await else {
                        break; // the server went away
                    };
                    let code = resp.status().as_u16();
                    let Ok(text) = resp.text().await else { break };
                    match code {
                        202 => {
                            sent.accepted.push(id);
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
                            break;
                        }
                        other => panic!("unexpected {other} before/while shutting down: {text}"),
                    }
                }
                sent
            }));
        }
        Load { senders, accepted }
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

    /// Waits for every sender to stop; returns every id tried and every id accepted.
    async fn finish(self) -> (HashSet<String>, Vec<String>) {
        let mut attempted = HashSet::new();
        let mut accepted = Vec::new();
        for sender in self.senders {
            let sent = tokio::time::timeout(Duration::from_secs(30), sender)
                .await
                .expect("senders stop once intake refuses or the server is gone")
                .expect("a sender panicked");
            attempted.extend(sent.attempted);
            accepted.extend(sent.accepted);
        }
        (attempted, accepted)
    }
}

/// SIGTERMs `process`, expects exit 0 within the drain timeout (plus margin), then checks its
/// sink: every accepted id exactly once, nothing that was never sent.
async fn sigterm_and_check(process: &mut Conveyor, load: Load) {
    process.sigterm();
    let exit = process.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(
        exit.code(),
        Some(0),
        "exit status after SIGTERM: {exit}\n{}",
        process.stderr_tail()
    );
    let (attempted, accepted) = load.finish().await;
    let counts = id_counts(&process.read_sink());
    let lost: Vec<&String> = accepted
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let doubled: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unknown: Vec<&String> = counts
        .keys()
        .filter(|id| !attempted.contains(*id))
        .collect();
    assert!(
        lost.is_empty() && doubled.is_empty() && unknown.is_empty(),
        "{} accepted: {} lost (e.g. {:?}), {} written more than once (e.g. {:?}), {} never sent (e.g. {:?})",
        accepted.len(),
        lost.len(),
        lost.iter().take(5).collect::<Vec<_>>(),
        doubled.len(),
        doubled.iter().take(5).collect::<Vec<_>>(),
        unknown.len(),
        unknown.iter().take(5).collect::<Vec<_>>(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_everything_accepted_and_exits_0() {
    let mut conveyor = spawn_run(SLOW_PIPELINE).await;
    let load = Load::start(&conveyor, &["shutting_down"], true);
    load.wait_accepted(2_000).await;
    sigterm_and_check(&mut conveyor, load).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_processor_sigterm_under_load_drains_its_queue_and_exits_0() {
    let mut split = spawn_split(SLOW_PIPELINE).await;
    // Through the gateway, a processor that is going away is `shutting_down` or `unavailable`.
    let load = Load::start(&split.gateway, &["shutting_down", "unavailable"], false);
    load.wait_accepted(2_000).await;
    sigterm_and_check(&mut split.processor, load).await;

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
    let (code, body) = read_json(
        conveyor
            .http()
            .post(conveyor.url("/api/v1/ingest"))
            .json(&sample.body)
            .send()
            .await
            .expect("POST /api/v1/ingest"),
    )
    .await;
    assert_eq!(code, 202, "{body}");
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

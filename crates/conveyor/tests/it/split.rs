//! Split mode: gateway → ingest → processor as three processes, the same traffic mix and the
//! same guarantees as `conveyor run`.

use std::time::Duration;

use conveyor_testkit::free_port;

use crate::delivery::{QUIET, SingleSenders};
use crate::harness::{
    Conveyor, Spawn, assert_all_delivered, eventually, send_mixed_traffic, spawn_split,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_delivers_every_accepted_event_exactly_once() {
    let split = spawn_split(&[]).await;
    let gateway = &split.gateway;

    // The gateway sees both instances, healthy, at the URLs it was given.
    eventually(
        "GET /api/v1/status to list healthy ingest and processor instances",
        Duration::from_secs(15),
        async || {
            let status = gateway.status().await;
            let instances = status["instances"].as_array().cloned().unwrap_or_default();
            for (role, url) in [
                ("ingest", split.ingest.base_url()),
                ("processor", split.processor.base_url()),
            ] {
                let found = instances.iter().find(|i| i["role"] == role);
                match found {
                    Some(i) if i["healthy"] == true => {
                        let listed = i["url"].as_str().unwrap_or("").trim_end_matches('/');
                        if listed != url {
                            return Err(format!("{role} listed at {listed:?}, started at {url}"));
                        }
                    }
                    _ => return Err(format!("no healthy {role} instance in {status}")),
                }
            }
            if status["status"] != "ok" {
                return Err(format!("status is not \"ok\": {status}"));
            }
            Ok(())
        },
    )
    .await;

    let ledger = send_mixed_traffic(gateway, "split").await;
    assert!(ledger.len() >= 10_000, "sent {} events", ledger.len());
    assert_all_delivered(gateway, &split.processor, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_is_not_ready_while_no_ingest_is_reachable() {
    let mut split = spawn_split(&[]).await;
    let (ready, body) = split.gateway.get_json("/ready").await;
    assert_eq!(ready, 200, "ready with its ingest up: {body}");

    split.ingest.sigkill();
    let _ = split.ingest.wait_exit(Duration::from_secs(10)).await;
    let body = eventually(
        "the gateway's /ready to turn 503 with its only ingest gone",
        Duration::from_secs(15),
        async || {
            let (code, body) = split.gateway.get_json("/ready").await;
            if code == 503 {
                Ok(body)
            } else {
                Err(format!("{code}: {body}"))
            }
        },
    )
    .await;
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ingest")),
        "the reason names the missing ingest: {body}"
    );
    // Liveness is another matter: the gateway process itself is fine.
    let (live, _) = split.gateway.get_json("/health").await;
    assert_eq!(live, 200);
}

/// An ingest SIGKILLed while 8 clients send through the gateway, then restarted on its port:
/// calls that were on the wire when it died end with a broken connection, whose fate the
/// gateway cannot know. Every answer is 202 or a retryable 503 with `Retry-After` (never a
/// 500: a client that follows the docs retries a 503 and not a 500), intake resumes once the
/// ingest is back, and the ledger finds every 202 in the sink exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_dying_mid_request_costs_503s_never_500s() {
    let ingest_port = free_port();
    let ingest_at = |processor: &Conveyor| {
        Spawn::new("ingest")
            .without_listen_flags()
            .args(["--host", "127.0.0.1", "--port", &ingest_port.to_string()])
            .args(["--processor-url", processor.base_url()])
    };
    let processor = Spawn::new("processor").start().await;
    let mut ingest = ingest_at(&processor).start().await;
    let gateway = Spawn::gateway_for(&ingest, &[&processor]).start().await;

    let senders = SingleSenders::start(&gateway, "dying", 8);
    tokio::time::sleep(Duration::from_millis(700)).await;
    ingest.sigkill();
    let _ = ingest.wait_exit(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ingest = ingest_at(&processor).start().await;
    let promised_at_restart = senders.answers().ledger.len();
    eventually(
        "intake to accept again after the ingest came back",
        Duration::from_secs(20),
        async || {
            let now = senders.answers().ledger.len();
            if now > promised_at_restart + 100 {
                Ok(())
            } else {
                Err(format!(
                    "{} promised since the restart",
                    now - promised_at_restart
                ))
            }
        },
    )
    .await;
    let answers = senders.finish().await;
    eprintln!(
        "while the ingest died: {} accepted, 503s by code {:?}",
        answers.accepted_at.len(),
        answers.refusal_codes
    );
    assert!(
        answers.wrong.is_empty(),
        "answers other than 202/503 (a 500 is a bug): {:?}",
        &answers.wrong[..answers.wrong.len().min(5)]
    );
    assert_eq!(
        answers.refusal_codes.keys().collect::<Vec<_>>(),
        ["unavailable"],
        "the ingest's death was seen by clients, as 503 unavailable only"
    );
    assert_eq!(
        answers.without_retry_after, 0,
        "every 503 carries Retry-After"
    );
    answers
        .ledger
        .assert_exactly_once(&[processor.sink_path()], Duration::from_secs(60), QUIET)
        .await;
}

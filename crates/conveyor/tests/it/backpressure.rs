//! A full queue says so (429 + Retry-After, RESOURCE_EXHAUSTED) instead of growing, recovers
//! when it drains, and loses nothing it accepted.
//!
//! The queue is held full deterministically: every event sent while blasting carries
//! `hold=yes`, which `fail-if:hold=yes` fails; its retry waits 3 s, and the memory queue counts
//! an event waiting out a retry against its capacity. After the second attempt the event is
//! dead-lettered, so every event that got 202 must end in the DLQ, exactly.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::harness::{
    Expected, assert_sink_exact, eventually, ingest_one, read_json, sample_event, spawn_run, total,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_refuses_with_429_and_recovers_without_loss() {
    let conveyor = Arc::new(
        spawn_run(&[
            "--queue-size",
            "50",
            "--stage",
            "fail-if:hold=yes",
            "--max-attempts",
            "2",
            "--retry-backoff-ms",
            "3000",
            "--retry-backoff-max-ms",
            "3000",
        ])
        .await,
    );
    let stop = Arc::new(AtomicBool::new(false));
    let saw_429 = Arc::new(AtomicBool::new(false));
    let saw_exhausted = Arc::new(AtomicBool::new(false));

    let mut senders = Vec::new();
    for task in 0..16 {
        let (conveyor, stop, saw_429) = (conveyor.clone(), stop.clone(), saw_429.clone());
        senders.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let sample = sample_event("hold", &format!("bp{task}"), n, true)
                    .with_metadata("hold", "yes");
                n += 1;
                let resp = conveyor
                    .http()
                    .post(conveyor.url("/api/v1/ingest"))
                    .json(&sample.body)
                    .send()
                    .await
                    .expect("POST /api/v1/ingest");
                let retry_after = resp.headers().get("retry-after").cloned();
                let (code, body) = read_json(resp).await;
                match code {
                    202 => accepted.push(sample.id.expect("has id")),
                    429 => {
                        assert_eq!(body["error"]["code"], "queue_full", "429 body: {body}");
                        let retry_after = retry_after
                            .unwrap_or_else(|| panic!("429 without Retry-After: {body}"));
                        let seconds: u64 = retry_after
                            .to_str()
                            .ok()
                            .and_then(|s| s.trim().parse().ok())
                            .unwrap_or_else(|| {
                                panic!("Retry-After is not a number of seconds: {retry_after:?}")
                            });
                        assert!(seconds >= 1, "Retry-After: {seconds}");
                        saw_429.store(true, Ordering::Relaxed);
                        // Refused: go easy on the 2 cores while the queue stays full.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    other => panic!("unexpected {other} while blasting: {body}"),
                }
            }
            accepted
        }));
    }
    {
        let (conveyor, stop, saw_exhausted) =
            (conveyor.clone(), stop.clone(), saw_exhausted.clone());
        senders.push(tokio::spawn(async move {
            let mut client = conveyor.grpc().await;
            let mut accepted = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let sample = sample_event("hold", "bp-grpc", n, true).with_metadata("hold", "yes");
                n += 1;
                match client.ingest(sample.grpc()).await {
                    Ok(_) => accepted.push(sample.id.expect("has id")),
                    Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                        saw_exhausted.store(true, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(status) => panic!("unexpected gRPC error while blasting: {status:?}"),
                }
            }
            accepted
        }));
    }

    eventually(
        "both a 429 queue_full and a gRPC RESOURCE_EXHAUSTED",
        Duration::from_secs(30),
        async || {
            let (http, grpc) = (
                saw_429.load(Ordering::Relaxed),
                saw_exhausted.load(Ordering::Relaxed),
            );
            if http && grpc {
                Ok(())
            } else {
                Err(format!("429 seen: {http}, RESOURCE_EXHAUSTED seen: {grpc}"))
            }
        },
    )
    .await;

    // While the senders keep it full, a batch is refused per event with queue_full (429 when
    // none fit; 207 if a slot freed up for some, which then count as accepted).
    let batch: Vec<_> = (0..3)
        .map(|i| sample_event("hold-batch", "bp", i, true).with_metadata("hold", "yes"))
        .collect();
    let bodies: Vec<&serde_json::Value> = batch.iter().map(|s| &s.body).collect();
    let (code, body) = conveyor
        .post_json("/api/v1/ingest/batch", &serde_json::json!(bodies))
        .await;
    assert!(
        code == 429 || code == 207,
        "batch into a full queue: {code} {body}"
    );
    let mut batch_accepted = Vec::new();
    for i in 0..batch.len() {
        let result = &body["results"][i];
        match result["messageId"].as_str() {
            Some(id) if code == 207 => batch_accepted.push(id.to_owned()),
            _ => assert_eq!(
                result["error"]["code"], "queue_full",
                "batch result {i}: {body}"
            ),
        }
        assert_eq!(result["index"], i, "batch result order: {body}");
    }

    stop.store(true, Ordering::Relaxed);
    let mut held: HashSet<String> = batch_accepted.into_iter().collect();
    for sender in senders {
        for id in sender.await.expect("a sender panicked") {
            assert!(held.insert(id.clone()), "{id} accepted twice");
        }
    }
    assert!(
        held.len() >= 50,
        "the queue of 50 was filled, but only {} were accepted",
        held.len()
    );

    // Every held event fails twice and is dead-lettered; then the queue is empty.
    let status = conveyor
        .wait_until_processed(held.len() as u64, Duration::from_secs(60))
        .await;
    assert_eq!(
        total(&status, "dead_lettered"),
        held.len() as u64,
        "totals {}",
        status["totals"]
    );
    let status = conveyor.wait_idle(Duration::from_secs(10)).await;
    assert_eq!(
        total(&status, "accepted"),
        held.len() as u64,
        "totals {}",
        status["totals"]
    );
    let (size, events) = conveyor.dlq().await;
    let in_dlq: HashSet<String> = events
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(size as usize, held.len(), "DLQ size");
    assert_eq!(
        in_dlq, held,
        "the DLQ holds exactly the accepted held events"
    );

    // Drained: new events are accepted again, over HTTP and gRPC, and reach the sink.
    let mut good = Expected::new();
    for i in 0..20 {
        let sample = sample_event("after", "bp", i, i % 2 == 0);
        let id = ingest_one(&conveyor, &sample).await;
        good.insert(id, sample.sent);
    }
    let sample = sample_event("after-grpc", "bp", 0, true);
    let response = conveyor
        .grpc()
        .await
        .ingest(sample.grpc())
        .await
        .expect("gRPC Ingest is accepted after the queue drained")
        .into_inner();
    good.insert(response.message_id, sample.sent);
    let records = conveyor
        .wait_sink_len(good.len(), Duration::from_secs(20))
        .await;
    conveyor.wait_idle(Duration::from_secs(10)).await;
    assert_sink_exact(&records, &good);
    assert_sink_exact(&conveyor.read_sink(), &good);
}

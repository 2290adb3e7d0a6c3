//! Failing events are retried, then dead-lettered with their error; replay sends them through
//! the pipeline again.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{
    Conveyor, Expected, assert_sink_exact, eventually, ingest_one, sample_event, spawn_run, total,
};

/// The DLQ's events by id, asserting each id is there once.
async fn dlq_by_id(conveyor: &Conveyor) -> (u64, Vec<(String, Value)>) {
    let (size, events) = conveyor.dlq().await;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for event in events {
        let id = event["id"]
            .as_str()
            .unwrap_or_else(|| panic!("DLQ event without id: {event}"))
            .to_owned();
        assert!(seen.insert(id.clone()), "{id} is twice in the DLQ");
        out.push((id, event));
    }
    (size, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_retried_dead_lettered_and_replayable() {
    let conveyor = spawn_run(&[
        "--stage",
        "fail-if:poison=yes",
        "--max-attempts",
        "3",
        "--retry-backoff-ms",
        "20",
    ])
    .await;

    let mut good = Expected::new();
    let mut poison = Expected::new();
    for i in 0..55 {
        if i % 11 == 5 {
            let sample = sample_event("poison", "dlq", i, true).with_metadata("poison", "yes");
            let id = ingest_one(&conveyor, &sample).await;
            poison.insert(id, sample.sent);
        } else {
            let sample = sample_event("good", "dlq", i, i % 2 == 0).with_metadata("poison", "no");
            let id = ingest_one(&conveyor, &sample).await;
            good.insert(id, sample.sent);
        }
    }
    assert_eq!((good.len(), poison.len()), (50, 5));

    let status = conveyor
        .wait_until_processed(55, Duration::from_secs(30))
        .await;
    let records = conveyor.wait_sink_len(50, Duration::from_secs(10)).await;
    assert_sink_exact(&records, &good);
    assert_eq!(
        total(&status, "processed"),
        50,
        "totals: {}",
        status["totals"]
    );
    assert_eq!(
        total(&status, "dead_lettered"),
        5,
        "totals: {}",
        status["totals"]
    );
    assert!(
        total(&status, "retried") >= 10,
        "5 events × 2 retries each: totals {}",
        status["totals"]
    );

    let (size, events) = dlq_by_id(&conveyor).await;
    assert_eq!(size, 5, "DLQ size: {events:?}");
    let ids: HashSet<&String> = events.iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids,
        poison.keys().collect(),
        "the DLQ holds exactly the poison events"
    );
    for (id, event) in &events {
        let sent = &poison[id];
        assert_eq!(event["attempts"], 3, "{id}: attempts: {event}");
        assert!(
            event["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{id}: the DLQ entry names its error: {event}"
        );
        assert_eq!(
            event["source"].as_str(),
            Some(sent.source.as_str()),
            "{event}"
        );
        assert_eq!(event["data"], sent.data, "{id}: data as sent: {event}");
        assert_eq!(
            event["metadata"],
            json!(sent.metadata),
            "{id}: metadata as sent: {event}"
        );
        assert!(
            event["failed_at"].as_u64().is_some(),
            "{id}: failed_at: {event}"
        );
    }

    // Replay one: the stage still fails, so it goes round the retries and back to the DLQ.
    let replayed_id = poison.keys().min().expect("five poison ids").clone();
    let (code, report) = conveyor
        .post_json("/api/v1/dlq/replay", &json!({"ids": [replayed_id]}))
        .await;
    assert_eq!(code, 200, "POST /api/v1/dlq/replay: {report}");
    assert_eq!(report["replayed"], 1, "{report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert_eq!(report["not_found"], json!([]), "{report}");

    eventually(
        "the replayed event to be dead-lettered again",
        Duration::from_secs(20),
        async || {
            let status = conveyor.status().await;
            if total(&status, "dead_lettered") != 6 {
                return Err(format!("totals {}", status["totals"]));
            }
            let (size, events) = dlq_by_id(&conveyor).await;
            let back = events.iter().find(|(id, _)| *id == replayed_id);
            match back {
                Some((_, event)) if size == 5 && event["attempts"] == 3 => Ok(()),
                _ => Err(format!("DLQ size {size}, replayed entry {back:?}")),
            }
        },
    )
    .await;

    let (code, report) = conveyor
        .post_json("/api/v1/dlq/replay", &json!({"ids": ["no-such-event"]}))
        .await;
    assert_eq!(code, 200, "replay of an unknown id: {report}");
    assert_eq!(report["replayed"], 0, "{report}");
    assert_eq!(report["not_found"], json!(["no-such-event"]), "{report}");

    // Poison never reached the sink, and nothing was written twice.
    conveyor.wait_idle(Duration::from_secs(10)).await;
    assert_sink_exact(&conveyor.read_sink(), &good);
}

/// A full DLQ never drops: with room for one letter, the second poison event stays in the
/// queue (retried at the longest backoff, never written), the good events flow past it, and
/// once the DLQ has room again (the first letter replayed and then stored once more, or
/// another made room) nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_dlq_keeps_the_event_in_the_queue() {
    let conveyor = spawn_run(&[
        "--stage",
        "fail-if:poison=yes",
        "--max-attempts",
        "2",
        "--retry-backoff-ms",
        "20",
        "--retry-backoff-max-ms",
        "200",
        "--dlq-capacity",
        "1",
    ])
    .await;
    let mut good = Expected::new();
    for (i, tag) in ["first", "second"].iter().enumerate() {
        let sample = sample_event(tag, "full", i, true).with_metadata("poison", "yes");
        ingest_one(&conveyor, &sample).await;
    }
    for i in 0..50 {
        let sample = sample_event("good", "full", i, true);
        let id = ingest_one(&conveyor, &sample).await;
        good.insert(id, sample.sent);
    }
    let status = eventually(
        "one letter in the DLQ, the other poison event still queued",
        Duration::from_secs(30),
        async || {
            let status = conveyor.status().await;
            let (size, _) = conveyor.dlq().await;
            if size == 1 && total(&status, "processed") == 50 && total(&status, "pending") == 1 {
                Ok(status)
            } else {
                Err(format!("DLQ {size}; totals {}", status["totals"]))
            }
        },
    )
    .await;
    // It stays there: retried, never written, never dropped.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = conveyor.status().await;
    assert_eq!(total(&later, "pending"), 1, "{}", later["totals"]);
    assert!(
        total(&later, "failed") > total(&status, "failed"),
        "the queued poison event keeps being retried: {} then {}",
        status["totals"],
        later["totals"]
    );
    assert_eq!(total(&later, "dead_lettered"), 1, "{}", later["totals"]);
    assert_sink_exact(&conveyor.read_sink(), &good);
}

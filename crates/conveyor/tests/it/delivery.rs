//! Counting delivery over sinks: send numbered events, then find the accepted ids that were
//! lost and the ids written more than once. Shared by the broker crash tests.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Conveyor, eventually, read_json, read_sink_file};

pub fn event_body(tag: &str, i: usize) -> Value {
    json!({"id": format!("{tag}-{i}"), "source": "crash-test", "data": {"i": i, "tag": tag}})
}

/// Sends events `from..to` as NDJSON batches of `per_batch`, `tasks` requests at a time.
/// Returns the ids the gateway accepted (202/207 per line).
pub async fn send_batches(
    gateway: &Conveyor,
    tag: &'static str,
    count: usize,
    per_batch: usize,
    tasks: usize,
) -> HashSet<String> {
    send_batches_to(
        gateway.http().clone(),
        gateway.url("/api/v1/ingest/batch"),
        tag,
        count,
        per_batch,
        tasks,
    )
    .await
}

pub async fn send_batches_to(
    http: reqwest::Client,
    url: String,
    tag: &'static str,
    count: usize,
    per_batch: usize,
    tasks: usize,
) -> HashSet<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let next = Arc::clone(&next);
        let http = http.clone();
        let url = url.clone();
        let tag = tag.to_owned();
        handles.push(tokio::spawn(async move {
            let mut accepted = HashSet::new();
            loop {
                let from = next.fetch_add(per_batch, Ordering::Relaxed);
                if from >= count {
                    break accepted;
                }
                let to = (from + per_batch).min(count);
                let body: String = (from..to)
                    .map(|i| format!("{}\n", event_body(&tag, i)))
                    .collect();
                let response = http
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("POST batch {from}..{to}: {e}"));
                let (code, answer) = read_json(response).await;
                assert!(
                    code == 202 || code == 207,
                    "batch {from}..{to} answered {code}: {answer}"
                );
                for result in answer["results"].as_array().expect("results") {
                    if let Some(id) = result["messageId"].as_str() {
                        accepted.insert(id.to_owned());
                    }
                }
            }
        }));
    }
    let mut all = HashSet::new();
    for handle in handles {
        all.extend(handle.await.expect("sender task"));
    }
    all
}

/// How often each id occurs across the sink files.
pub fn sink_counts(sinks: &[&Path]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for sink in sinks {
        for record in read_sink_file(sink) {
            let id = record["id"]
                .as_str()
                .expect("a sink record has an id")
                .to_owned();
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}

/// Waits until every accepted id is in the sinks, then asserts: none lost, none written twice,
/// nothing that was never sent.
pub async fn assert_exactly_once(
    sinks: &[&Path],
    accepted: &HashSet<String>,
    sent_prefix: &str,
    timeout: Duration,
) {
    let counts = eventually(
        "every accepted event to reach the sink",
        timeout,
        async || {
            let counts = sink_counts(sinks);
            let missing = accepted
                .iter()
                .filter(|id| !counts.contains_key(*id))
                .count();
            if missing == 0 {
                Ok(counts)
            } else {
                Err(format!("{missing} of {} still missing", accepted.len()))
            }
        },
    )
    .await;
    let duplicates: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<&String> = counts
        .keys()
        .filter(|id| !id.starts_with(sent_prefix))
        .collect();
    assert!(
        duplicates.is_empty(),
        "{} ids written more than once, e.g. {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(5)]
    );
    assert!(
        unexpected.is_empty(),
        "ids nobody sent: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
}

/// Stage and retry flags that make events with metadata `poison=yes` fail every attempt and go
/// to the DLQ after 3.
pub const POISON_ARGS: [&str; 6] = [
    "--stage",
    "fail-if:poison=yes",
    "--max-attempts",
    "3",
    "--retry-backoff-ms",
    "50",
];

/// Sends one poison event among 2,000 good ones to a conveyor started with [`POISON_ARGS`]:
/// every good one is written once, the poison one reaches the DLQ after 3 attempts with its
/// error, and is never written. Returns the DLQ listing.
pub async fn poison_goes_to_the_dlq_while_traffic_flows(conveyor: &Conveyor) -> Value {
    let poison =
        json!({"id": "poison-1", "source": "crash-test", "data": 1, "metadata": {"poison": "yes"}});
    let (code, body) = conveyor.post_json("/api/v1/ingest", &poison).await;
    assert_eq!(code, 202, "{body}");
    let accepted = send_batches(conveyor, "flow", 2_000, 100, 2).await;
    let sink = conveyor.sink_path().to_owned();
    assert_exactly_once(&[&sink], &accepted, "flow-", Duration::from_secs(60)).await;
    let letters = eventually(
        "the poison event in the DLQ",
        Duration::from_secs(30),
        async || {
            let (_, dlq) = conveyor.get_json("/api/v1/dlq").await;
            if dlq["size"] == 1 {
                Ok(dlq)
            } else {
                Err(dlq.to_string())
            }
        },
    )
    .await;
    let letter = &letters["events"][0];
    assert_eq!(letter["id"], "poison-1");
    assert_eq!(letter["attempts"], 3, "{letter}");
    assert!(
        letter["error"]
            .as_str()
            .is_some_and(|e| e.contains("fail-if")),
        "{letter}"
    );
    assert!(
        !sink_counts(&[&sink]).contains_key("poison-1"),
        "the poison event was never written"
    );
    letters
}

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

//! What must come out of the sink, and the checks that it did: the sink's records, the events
//! accepted by id, and exactness (every accepted event once, as sent, nothing else).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::client::{eventually, total};
use super::process::Conveyor;

impl Conveyor {
    /// Every complete line of the file sink, parsed. A line that is not JSON fails the test.
    pub fn read_sink(&self) -> Vec<Value> {
        read_sink_file(self.sink_path())
    }

    /// Polls the sink until it holds at least `n` records.
    pub async fn wait_sink_len(&self, n: usize, timeout: Duration) -> Vec<Value> {
        eventually(
            &format!("the sink to hold {n} records"),
            timeout,
            async || {
                let records = self.read_sink();
                if records.len() >= n {
                    Ok(records)
                } else {
                    Err(format!("it holds {}", records.len()))
                }
            },
        )
        .await
    }

    /// Polls the sink until every id in `ids` is in it.
    pub async fn wait_sink_ids<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a String>,
        timeout: Duration,
    ) -> Vec<Value> {
        let wanted: HashSet<&String> = ids.into_iter().collect();
        eventually(
            &format!("the sink to hold {} given ids", wanted.len()),
            timeout,
            async || {
                let records = self.read_sink();
                let have: HashSet<&str> = records.iter().filter_map(|r| r["id"].as_str()).collect();
                let missing: Vec<&&String> = wanted
                    .iter()
                    .filter(|id| !have.contains(id.as_str()))
                    .collect();
                if missing.is_empty() {
                    Ok(records)
                } else {
                    Err(format!("{} missing, e.g. {:?}", missing.len(), missing[0]))
                }
            },
        )
        .await
    }
}

/// Every complete line of a file sink, parsed; a missing file is an empty sink. A complete line
/// that is not JSON fails the test (a torn last line, still being written, is left out).
pub fn read_sink_file(path: &Path) -> Vec<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read the sink {}: {e}", path.display()),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("sink line is not JSON ({e}): {line}"))
        })
        .collect()
}

/// What was sent for one event, to compare with its sink record.
#[derive(Debug, Clone)]
pub struct Sent {
    pub source: String,
    /// The `data` value the sink must write back.
    pub data: Value,
    pub metadata: BTreeMap<String, String>,
    pub timestamp: Option<u64>,
}

/// What must come out of the sink: accepted events by id, each as it was sent.
pub type Expected = HashMap<String, Sent>;

/// How often each id occurs in `records`.
pub fn id_counts(records: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in records {
        let id = r["id"]
            .as_str()
            .unwrap_or_else(|| panic!("sink record without a string id: {r}"));
        *counts.entry(id.to_owned()).or_insert(0) += 1;
    }
    counts
}

/// What is wrong with one sink record of an event that was sent as `sent`.
fn record_problem(record: &Value, sent: &Sent) -> Option<String> {
    let mut wrong = Vec::new();
    if record["source"].as_str() != Some(sent.source.as_str()) {
        wrong.push(format!(
            "source {} (sent {:?})",
            record["source"], sent.source
        ));
    }
    if record["data"] != sent.data {
        wrong.push(format!("data {} (sent {})", record["data"], sent.data));
    }
    let metadata = match &record["metadata"] {
        Value::Null => Some(BTreeMap::new()),
        m => serde_json::from_value::<BTreeMap<String, String>>(m.clone()).ok(),
    };
    if metadata.as_ref() != Some(&sent.metadata) {
        wrong.push(format!(
            "metadata {} (sent {:?})",
            record["metadata"], sent.metadata
        ));
    }
    match (record["timestamp"].as_u64(), sent.timestamp) {
        (None, _) => wrong.push(format!("timestamp {} is not a number", record["timestamp"])),
        (Some(got), Some(want)) if got != want => {
            wrong.push(format!("timestamp {got} (sent {want})"));
        }
        _ => {}
    }
    if record["processed_at"].as_u64().is_none() {
        wrong.push(format!(
            "processed_at {} is not a number",
            record["processed_at"]
        ));
    }
    if record["attempt"].as_u64() != Some(1) {
        wrong.push(format!(
            "attempt {} (expected 1: no stage fails)",
            record["attempt"]
        ));
    }
    (!wrong.is_empty()).then(|| wrong.join("; "))
}

/// Asserts the sink holds every event of `expected` exactly once, nothing else, and each as
/// it was sent (source, data, metadata, timestamp; attempt 1).
pub fn assert_sink_exact(records: &[Value], expected: &Expected) {
    let counts = id_counts(records);
    let missing: Vec<&String> = expected
        .keys()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<&String> = counts
        .keys()
        .filter(|id| !expected.contains_key(*id))
        .collect();
    let mut mismatched = Vec::new();
    for r in records {
        if let Some(sent) = r["id"].as_str().and_then(|id| expected.get(id))
            && let Some(problem) = record_problem(r, sent)
        {
            mismatched.push(format!("{}: {problem}", r["id"]));
        }
    }
    assert!(
        missing.is_empty()
            && duplicated.is_empty()
            && unexpected.is_empty()
            && mismatched.is_empty(),
        "sink holds {} records for {} accepted events: {} missing (e.g. {:?}), {} duplicated \
         (e.g. {:?}), {} unexpected (e.g. {:?}), {} not as sent (e.g. {:?})",
        records.len(),
        expected.len(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        duplicated.len(),
        duplicated.iter().take(5).collect::<Vec<_>>(),
        unexpected.len(),
        unexpected.iter().take(5).collect::<Vec<_>>(),
        mismatched.len(),
        mismatched.iter().take(5).collect::<Vec<_>>(),
    );
}

/// Waits until everything in `ledger` has been processed (status read from `front`, records
/// from `sink`'s file), then asserts the sink and the totals are exact.
pub async fn assert_all_delivered(front: &Conveyor, sink: &Conveyor, ledger: &Expected) -> Value {
    let n = ledger.len() as u64;
    front
        .wait_until_processed(n, Duration::from_secs(120))
        .await;
    let records = sink
        .wait_sink_len(ledger.len(), Duration::from_secs(10))
        .await;
    assert_sink_exact(&records, ledger);
    let status = front.status().await;
    assert_eq!(
        total(&status, "accepted"),
        n,
        "totals.accepted: {}",
        status["totals"]
    );
    assert_eq!(
        total(&status, "processed"),
        n,
        "totals.processed: {}",
        status["totals"]
    );
    assert_eq!(
        total(&status, "failed"),
        0,
        "totals.failed: {}",
        status["totals"]
    );
    assert_eq!(
        total(&status, "dead_lettered"),
        0,
        "totals.dead_lettered: {}",
        status["totals"]
    );
    status
}

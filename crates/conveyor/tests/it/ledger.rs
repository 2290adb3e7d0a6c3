//! An independent ledger for crash tests: the client side writes down every id it sent and
//! every id it was promised (a 202, a 207 line, a gRPC OK) with the door and the time; once
//! the system is idle the sinks are read back, and the check reports the three numbers a
//! Jepsen-style checker reports, each with samples:
//! - **lost**: promised, and in no sink;
//! - **duplicated**: in the sinks more than once;
//! - **unexpected**: in a sink, and never sent by anyone.
//!
//! An id that was sent but not promised (its answer was a 503, or the connection broke) may
//! or may not be in a sink: its fate was unknown to the client, and either outcome is correct.
//! An id the client sent again after such an answer (as a client told `Retry-After` does) may
//! be in the sinks once per send: each send may have landed, and only the retry was answered.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::read_sink_file;

/// One promise a client was given.
#[derive(Debug, Clone)]
pub struct Promise {
    pub door: &'static str,
    /// Since the ledger was made.
    pub at: Duration,
}

#[derive(Default)]
struct Entries {
    /// How many times each id was sent.
    sent: HashMap<String, usize>,
    promised: HashMap<String, Promise>,
}

/// What clients sent and were promised. Cheap to clone: clones share the entries, so many
/// sender tasks can write into one ledger.
#[derive(Clone)]
pub struct Ledger {
    started: Instant,
    entries: Arc<Mutex<Entries>>,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            started: Instant::now(),
            entries: Arc::default(),
        }
    }
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client is about to send `ids` (from now on, finding them in a sink is no surprise).
    pub fn sent<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut entries = self.entries();
        for id in ids {
            *entries.sent.entry(id.to_owned()).or_default() += 1;
        }
    }

    /// The client was told `id` is accepted, through `door`.
    pub fn promised(&self, id: &str, door: &'static str) {
        let at = self.started.elapsed();
        let mut entries = self.entries();
        entries.sent.entry(id.to_owned()).or_insert(1);
        entries
            .promised
            .entry(id.to_owned())
            .or_insert(Promise { door, at });
    }

    /// Takes in everything `other` holds (another phase of the same test).
    pub fn absorb(&self, other: &Ledger) {
        let theirs = other.entries();
        let (sent, promised) = (theirs.sent.clone(), theirs.promised.clone());
        drop(theirs);
        let mut entries = self.entries();
        for (id, times) in sent {
            *entries.sent.entry(id).or_default() += times;
        }
        for (id, promise) in promised {
            entries.promised.entry(id).or_insert(promise);
        }
    }

    /// How many distinct ids were promised.
    pub fn len(&self) -> usize {
        self.entries().promised.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Promises per door, for the report.
    fn doors(&self) -> BTreeMap<&'static str, usize> {
        let mut doors = BTreeMap::new();
        for promise in self.entries().promised.values() {
            *doors.entry(promise.door).or_default() += 1;
        }
        doors
    }

    /// Compares the ledger with what `sinks` hold now.
    pub fn check(&self, sinks: &[&Path]) -> Verdict {
        self.check_counts(&sink_counts(sinks))
    }

    /// Compares the ledger with how often each id was found where the events went.
    pub fn check_counts(&self, counts: &HashMap<String, usize>) -> Verdict {
        let entries = self.entries();
        let mut lost: Vec<(String, Promise)> = entries
            .promised
            .iter()
            .filter(|(id, _)| !counts.contains_key(*id))
            .map(|(id, promise)| (id.clone(), promise.clone()))
            .collect();
        lost.sort_by_key(|(_, promise)| promise.at);
        let mut duplicated: Vec<(String, usize)> = counts
            .iter()
            .filter(|(id, n)| **n > entries.sent.get(*id).copied().unwrap_or(1))
            .map(|(id, n)| (id.clone(), *n))
            .collect();
        duplicated.sort();
        let mut unexpected: Vec<String> = counts
            .keys()
            .filter(|id| !entries.sent.contains_key(*id))
            .cloned()
            .collect();
        unexpected.sort();
        Verdict {
            promised: entries.promised.len(),
            sent: entries.sent.len(),
            records: counts.values().sum(),
            lost,
            duplicated,
            unexpected,
        }
    }

    /// Waits until every promised id is in `sinks` (up to `timeout`), then until the sinks
    /// have stopped changing for `quiet` (longer than any redelivery delay in play, e.g. the
    /// broker's AckWait, so a late duplicate is counted), then checks.
    pub async fn settle(&self, sinks: &[&Path], timeout: Duration, quiet: Duration) -> Verdict {
        let deadline = Instant::now() + timeout;
        loop {
            let verdict = self.check(sinks);
            if verdict.lost.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut records = self.check(sinks).records;
        let mut unchanged_since = Instant::now();
        while unchanged_since.elapsed() < quiet && Instant::now() < deadline + quiet {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.check(sinks).records;
            if now != records {
                records = now;
                unchanged_since = Instant::now();
            }
        }
        let verdict = self.check(sinks);
        eprintln!("ledger: {verdict} (promised by door: {:?})", self.doors());
        verdict
    }

    /// [`settle`](Self::settle), then asserts nothing was lost, duplicated or unexpected.
    pub async fn assert_exactly_once(&self, sinks: &[&Path], timeout: Duration, quiet: Duration) {
        let verdict = self.settle(sinks, timeout, quiet).await;
        assert!(verdict.is_clean(), "{verdict}");
    }
}

/// What a ledger check found.
#[derive(Debug)]
pub struct Verdict {
    pub promised: usize,
    pub sent: usize,
    pub records: usize,
    /// Promised and in no sink, oldest promise first.
    pub lost: Vec<(String, Promise)>,
    pub duplicated: Vec<(String, usize)>,
    pub unexpected: Vec<String>,
}

impl Verdict {
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.unexpected.is_empty()
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} promised of {} sent, {} sink records: {} lost, {} duplicated, {} unexpected",
            self.promised,
            self.sent,
            self.records,
            self.lost.len(),
            self.duplicated.len(),
            self.unexpected.len()
        )?;
        if !self.lost.is_empty() {
            write!(f, "; lost e.g. {:?}", &self.lost[..self.lost.len().min(5)])?;
        }
        if !self.duplicated.is_empty() {
            let sample = &self.duplicated[..self.duplicated.len().min(5)];
            write!(f, "; duplicated e.g. {sample:?}")?;
        }
        if !self.unexpected.is_empty() {
            let sample = &self.unexpected[..self.unexpected.len().min(5)];
            write!(f, "; unexpected e.g. {sample:?}")?;
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(dir: &Path, ids: &[&str]) -> std::path::PathBuf {
        let path = dir.join("out.ndjson");
        let lines: String = ids
            .iter()
            .map(|id| format!("{{\"id\":\"{id}\",\"source\":\"s\",\"data\":1}}\n"))
            .collect();
        std::fs::write(&path, lines).expect("write sink");
        path
    }

    /// The checker itself can fail: each of the three kinds of fault is reported.
    #[test]
    fn the_ledger_reports_lost_duplicated_and_unexpected_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::new();
        assert!(ledger.is_empty());
        ledger.sent(["a", "b", "c", "unknown-fate"]);
        ledger.promised("a", "http_batch");
        ledger.promised("b", "grpc");
        ledger.promised("c", "http_single");
        let path = sink(dir.path(), &["a", "b", "b", "unknown-fate", "stranger"]);
        let verdict = ledger.check(&[&path]);
        assert_eq!(
            verdict
                .lost
                .iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(verdict.duplicated, [("b".to_owned(), 2)]);
        assert_eq!(verdict.unexpected, ["stranger"]);
        assert!(!verdict.is_clean());

        let path = sink(dir.path(), &["a", "b", "c"]);
        assert!(
            ledger.check(&[&path]).is_clean(),
            "an unknown-fate id may be absent"
        );

        // Sent twice (a retry after an unknown-fate answer): each send may have landed once.
        ledger.sent(["unknown-fate"]);
        let path = sink(dir.path(), &["a", "b", "c", "unknown-fate", "unknown-fate"]);
        assert!(
            ledger.check(&[&path]).is_clean(),
            "{}",
            ledger.check(&[&path])
        );
        let path = sink(dir.path(), &["a", "b", "c", "c", "unknown-fate"]);
        assert_eq!(ledger.check(&[&path]).duplicated, [("c".to_owned(), 2)]);
        let path = sink(
            dir.path(),
            &[
                "a",
                "b",
                "c",
                "unknown-fate",
                "unknown-fate",
                "unknown-fate",
            ],
        );
        assert_eq!(
            ledger.check(&[&path]).duplicated,
            [("unknown-fate".to_owned(), 3)]
        );
    }
}

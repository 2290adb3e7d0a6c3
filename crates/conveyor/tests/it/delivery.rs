//! Counting delivery over sinks: send numbered events, writing every promise into a
//! [`Ledger`], then check it against the sinks. Shared by the broker crash tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Conveyor, eventually, read_json};
pub use crate::ledger::{Ledger, sink_counts};

/// How long the sinks must stay unchanged before a crash test counts duplicates: longer than
/// the tests' broker AckWait (2 s), so a redelivery after it is seen.
pub const QUIET: Duration = Duration::from_secs(3);

pub fn event_body(tag: &str, i: usize) -> Value {
    json!({"id": format!("{tag}-{i}"), "source": "crash-test", "data": {"i": i, "tag": tag}})
}

/// Sends events `0..count` as NDJSON batches of `per_batch`, `tasks` requests at a time.
/// Returns the ledger of what was sent and what the gateway accepted (202/207 per line).
pub async fn send_batches(
    gateway: &Conveyor,
    tag: &'static str,
    count: usize,
    per_batch: usize,
    tasks: usize,
) -> Ledger {
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

/// How long a sender keeps retrying a batch answered 503 before it counts as a failure: long
/// enough for a broker that a crash test made slow to answer again.
const UNAVAILABLE_RETRY_FOR: Duration = Duration::from_secs(60);

/// [`send_batches`] to any URL. A batch answered 503 is sent again after its `Retry-After`
/// (each send goes into the ledger, so a first send that landed after all is no duplicate).
pub async fn send_batches_to(
    http: reqwest::Client,
    url: String,
    tag: &'static str,
    count: usize,
    per_batch: usize,
    tasks: usize,
) -> Ledger {
    let ledger = Ledger::new();
    let next = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let next = Arc::clone(&next);
        let http = http.clone();
        let url = url.clone();
        let tag = tag.to_owned();
        let ledger = ledger.clone();
        handles.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(per_batch, Ordering::Relaxed);
                if from >= count {
                    break;
                }
                let to = (from + per_batch).min(count);
                let ids: Vec<String> = (from..to).map(|i| format!("{tag}-{i}")).collect();
                let body: String = (from..to)
                    .map(|i| format!("{}\n", event_body(&tag, i)))
                    .collect();
                // A 503 says "not taken, try again after Retry-After" (the queue is out of
                // reach or gave no answer in time): a client does, with the same ids.
                let retry_until = Instant::now() + UNAVAILABLE_RETRY_FOR;
                let answer = loop {
                    ledger.sent(ids.iter().map(String::as_str));
                    let response = http
                        .post(&url)
                        .header("content-type", "application/x-ndjson")
                        .body(body.clone())
                        .send()
                        .await
                        .unwrap_or_else(|e| panic!("POST batch {from}..{to}: {e}"));
                    let retry_after = response.headers().get("retry-after").cloned();
                    let (code, answer) = read_json(response).await;
                    if code == 503 && Instant::now() < retry_until {
                        let secs: u64 = retry_after
                            .and_then(|v| v.to_str().ok()?.parse().ok())
                            .unwrap_or_else(|| {
                                panic!("a 503 for batch {from}..{to} without Retry-After: {answer}")
                            });
                        eprintln!("batch {from}..{to} answered 503, again in {secs} s: {answer}");
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                        continue;
                    }
                    assert!(
                        code == 202 || code == 207,
                        "batch {from}..{to} answered {code}: {answer}"
                    );
                    break answer;
                };
                for result in answer["results"].as_array().expect("results") {
                    if let Some(id) = result["messageId"].as_str() {
                        ledger.promised(id, "http_batch");
                    }
                }
            }
        }));
    }
    for handle in handles {
        handle.await.expect("sender task");
    }
    ledger
}

/// Waits until every promised id is in the sinks and the sinks are quiet, then asserts: none
/// lost, none written twice, nothing that was never sent.
pub async fn assert_exactly_once(sinks: &[&Path], ledger: &Ledger, timeout: Duration) {
    ledger.assert_exactly_once(sinks, timeout, QUIET).await;
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
    assert_exactly_once(&[&sink], &accepted, Duration::from_secs(60)).await;
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

/// What a set of [`SingleSenders`] saw.
#[derive(Default)]
pub struct Answers {
    /// Every id sent, and every id answered 202.
    pub ledger: Ledger,
    /// When each 202 came, since the senders started.
    pub accepted_at: Vec<Duration>,
    /// When each 503/429 came.
    pub refused_at: Vec<Duration>,
    /// The error codes of the 503/429 answers.
    pub refusal_codes: BTreeMap<String, usize>,
    /// 503/429 answers without `Retry-After`.
    pub without_retry_after: usize,
    /// Any answer other than 202/503/429, with its body.
    pub wrong: Vec<String>,
}

/// Clients that each post one event per request to `/api/v1/ingest` and, as README tells
/// clients, retry the same event (same id) after a 503 or 429 until it is accepted; every
/// send and every 202 goes into the ledger. They run until [`finish`](Self::finish).
pub struct SingleSenders {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Answers>>,
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SingleSenders {
    pub fn start(front: &Conveyor, tag: &'static str, clients: usize) -> SingleSenders {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Answers::default()));
        let started = Instant::now();
        let tasks = (0..clients)
            .map(|client| {
                let (stop, answers) = (Arc::clone(&stop), Arc::clone(&answers));
                let http = front.http().clone();
                let url = front.url("/api/v1/ingest");
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let body = event_body(tag, client * 1_000_000 + i);
                        let id = body["id"].as_str().expect("id").to_owned();
                        answers.lock().expect("answers").ledger.sent([id.as_str()]);
                        let response = http
                            .post(&url)
                            .json(&body)
                            .send()
                            .await
                            .expect("the front door stays up");
                        let retry_after = response.headers().contains_key("retry-after");
                        let (code, answer) = read_json(response).await;
                        let at = started.elapsed();
                        {
                            let mut seen = answers.lock().expect("answers");
                            match code {
                                202 => {
                                    let id = answer["messageId"].as_str().expect("messageId");
                                    seen.ledger.promised(id, "http_single");
                                    seen.accepted_at.push(at);
                                    i += 1;
                                }
                                503 | 429 => {
                                    seen.refused_at.push(at);
                                    let code = answer["error"]["code"].as_str().unwrap_or("none");
                                    *seen.refusal_codes.entry(code.to_owned()).or_default() += 1;
                                    if !retry_after {
                                        seen.without_retry_after += 1;
                                    }
                                }
                                _ => seen.wrong.push(format!("{code}: {answer}")),
                            }
                        }
                        if code != 202 {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        SingleSenders {
            stop,
            answers,
            started,
            tasks,
        }
    }

    /// What the senders saw so far.
    pub fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.answers.lock().expect("answers")
    }

    /// Time since the senders started (the clock of `accepted_at` / `refused_at`).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the senders (each finishes its request in flight) and returns what they saw.
    pub async fn finish(self) -> Answers {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("a sender task panicked");
        }
        Arc::try_unwrap(self.answers)
            .ok()
            .expect("no sender left")
            .into_inner()
            .expect("answers")
    }

    /// [`finish`](Self::finish) for a crash test: every answer was a 202 or a 503, and more
    /// than 100 events were accepted (else the kills landed on an idle system); the ledger of
    /// what was accepted.
    pub async fn finish_accepted(self) -> Ledger {
        let answers = self.finish().await;
        assert!(answers.wrong.is_empty(), "answers: {:?}", answers.wrong);
        assert!(
            answers.ledger.len() > 100,
            "only {} events were accepted while the processor was being killed",
            answers.ledger.len()
        );
        answers.ledger
    }
}

//! HTTP modes: one event per `POST /api/v1/ingest`, or NDJSON batches to
//! `POST /api/v1/ingest/batch`. Bodies are built once and shared; every worker sends its next
//! request when the previous one was answered (and, in open loop, when it is due).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;

use crate::args::{Mode, Plan};
use crate::body;
use crate::recorder::{Outcome, Recorder};
use crate::schedule::{Work, latency_start, pace};

/// Pause after a request got no answer, so a dead target is not hammered in a tight loop.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Sends one mode's requests over a shared connection pool.
#[derive(Debug)]
pub struct HttpDriver {
    client: reqwest::Client,
    /// Parsed once: `post(&str)` would parse it again for every request.
    url: reqwest::Url,
    content_type: &'static str,
    batch: bool,
    /// The single event body, or the largest batch body.
    body: Bytes,
    /// Length of one NDJSON line (batch mode), newline included.
    line_len: usize,
}

impl HttpDriver {
    pub fn new(plan: &Plan, client: reqwest::Client) -> Result<HttpDriver, String> {
        let path = match plan.mode {
            Mode::Batch => "/api/v1/ingest/batch",
            Mode::Http | Mode::Grpc => "/api/v1/ingest",
        };
        let url = reqwest::Url::parse(&format!("{}{path}", plan.target))
            .map_err(|e| format!("'{}' is not a valid URL: {e}", plan.target))?;
        let event = body::event_json(&plan.source, plan.payload_bytes);
        Ok(match plan.mode {
            Mode::Batch => {
                let line_len = event.len() + 1;
                let lines = usize::try_from(plan.per_request).unwrap_or(usize::MAX);
                let mut text = Vec::with_capacity(line_len.saturating_mul(lines));
                for _ in 0..lines {
                    text.extend_from_slice(event.as_bytes());
                    text.push(b'\n');
                }
                HttpDriver {
                    client,
                    url,
                    content_type: "application/x-ndjson",
                    batch: true,
                    body: Bytes::from(text),
                    line_len,
                }
            }
            Mode::Http | Mode::Grpc => HttpDriver {
                client,
                url,
                content_type: "application/json",
                batch: false,
                line_len: event.len(),
                body: Bytes::from(event),
            },
        })
    }

    /// The body of a request carrying `events` events (every line is the same, so a shorter
    /// batch is a prefix of the full one).
    fn body(&self, events: u64) -> Bytes {
        if self.batch {
            let len = usize::try_from(events)
                .unwrap_or(usize::MAX)
                .saturating_mul(self.line_len)
                .min(self.body.len());
            self.body.slice(..len)
        } else {
            self.body.clone()
        }
    }

    /// One connection's loop: claims requests until the run is over.
    pub async fn worker(self: Arc<Self>, work: Arc<Work>, mut recorder: Recorder) -> Recorder {
        while let Some(claim) = work.claim() {
            pace(claim.intended).await;
            let sent = Instant::now();
            let answer = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, self.content_type)
                .body(self.body(claim.events))
                .send()
                .await;
            let (outcome, accepted) = match answer {
                Ok(response) => {
                    let status = response.status().as_u16();
                    match response.bytes().await {
                        Ok(text) => (
                            Outcome::Status(status),
                            accepted_events(self.batch, status, &text, claim.events),
                        ),
                        Err(_) => (Outcome::Transport, 0),
                    }
                }
                Err(_) => (Outcome::Transport, 0),
            };
            let done = Instant::now();
            recorder.record(
                latency_start(claim.intended, sent),
                done,
                outcome,
                claim.events,
                accepted,
            );
            if outcome == Outcome::Transport {
                tokio::time::sleep(ERROR_BACKOFF).await;
            }
        }
        recorder
    }
}

#[derive(Deserialize)]
struct BatchAnswer {
    accepted: u64,
}

/// Events an answer says were accepted: a single event is accepted on any 2xx; a batch answer
/// names its `accepted` count (a 202 whose body cannot be read counts as all accepted).
pub fn accepted_events(batch: bool, status: u16, body: &[u8], events: u64) -> u64 {
    if !(200..300).contains(&status) {
        return 0;
    }
    if !batch {
        return 1;
    }
    match serde_json::from_slice::<BatchAnswer>(body) {
        Ok(answer) => answer.accepted.min(events),
        Err(_) if status == 202 => events,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_counts_follow_the_answer() {
        assert_eq!(accepted_events(false, 202, b"{}", 1), 1);
        assert_eq!(accepted_events(false, 429, b"{}", 1), 0);
        let partial = br#"{"accepted":3,"rejected":2,"results":[]}"#;
        assert_eq!(accepted_events(true, 207, partial, 5), 3);
        assert_eq!(accepted_events(true, 202, b"not json", 5), 5);
        assert_eq!(accepted_events(true, 200, b"not json", 5), 0);
        assert_eq!(accepted_events(true, 503, partial, 5), 0);
    }
}

//! The HTTP webhook sink: processed events sent to a receiver's URL, one event per request (the
//! default) or many as a JSON array or NDJSON, each request carrying an `Idempotency-Key` (the
//! event's id, or a batch id derived from the ids it holds) and, when a secret is configured,
//! a Standard Webhooks signature (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
//!
//! # Answers
//!
//! - **2xx**: written. When another request of the same batch failed, so that the batch comes
//!   back, its events are remembered for a while (a window of recent ids) and only what was not
//!   confirmed is sent again: a receiver that fails one request in ten must not make a batch of
//!   a hundred retry forever. (A first delivery, `attempt` 1, is never looked up.)
//! - **408, 429, 5xx**, a timeout, a refused or lost connection: retryable; the events go back
//!   to the queue and are sent again until confirmed. A `Retry-After` (seconds or an HTTP date,
//!   at most [`MAX_RETRY_AFTER`]) is honoured by the whole sink: no request goes to the receiver
//!   before it has passed, and the events are redelivered no sooner.
//! - **any other status** (a 4xx, a redirect: redirects are not followed): permanent for the
//!   events of that request, which go to the DLQ with the status and the start of the
//!   receiver's answer; the rest of the batch is written. When other events of the batch must
//!   be sent again, the refusal is remembered and reported when the batch comes back, without
//!   asking the receiver again.
//!
//! A request may reach the receiver and its answer be lost (a timeout, a crash before the
//! ack): at-least-once. The receiver dedupes by `Idempotency-Key` (`webhook-id`).

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::Event;
use conveyor_core::display::error_chain;
use conveyor_sink::answers::Answers;
use conveyor_sink::record::write_record;
use conveyor_sink::{Sink, SinkError};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};
use tokio::sync::Semaphore;

mod settings;
mod sign;

pub use settings::{Encoding, HttpSettings, WebhookSecret};
pub use sign::signature;

/// The longest `Retry-After` honoured: a receiver asking for more is retried after this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// How much of a refusing receiver's answer goes into the error (and so the DLQ).
const ANSWER_START: usize = 256;

pub struct HttpSink {
    settings: HttpSettings,
    described: String,
    client: reqwest::Client,
    /// Requests in flight, across all writes.
    in_flight: Semaphore,
    /// No request before this: the receiver's `Retry-After`.
    paused_until: Mutex<Option<Instant>>,
    /// What the receiver answered lately, for events whose batch comes back.
    answers: Answers,
}

/// One request of a write: its body, its idempotency key, the events it carries (by index).
struct Request {
    key: String,
    body: Bytes,
    events: Vec<usize>,
}

/// What became of one request.
enum Answer {
    Delivered,
    Retry {
        message: String,
        retry_after: Option<Duration>,
    },
    Refused(String),
}

impl HttpSink {
    /// The sink, with its HTTP client (and the CA file read, when one is configured).
    pub fn new(settings: HttpSettings) -> Result<Self, String> {
        let mut client = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.timeout)
            .pool_max_idle_per_host(settings.concurrency)
            .user_agent(concat!("conveyor/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("ca_file '{}': {e}", path.display()))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                format!("ca_file '{}' is not PEM certificates: {e}", path.display())
            })?;
            if certificates.is_empty() {
                return Err(format!("ca_file '{}' holds no certificate", path.display()));
            }
            for certificate in certificates {
                client = client.add_root_certificate(certificate);
            }
        }
        let client = client
            .build()
            .map_err(|e| format!("cannot make the HTTP client: {}", error_chain(&e)))?;
        Ok(HttpSink {
            described: settings.describe(),
            in_flight: Semaphore::new(settings.concurrency),
            client,
            settings,
            paused_until: Mutex::new(None),
            answers: Answers::default(),
        })
    }

    /// How long the receiver asked us to wait, if that is not over yet.
    fn paused(&self) -> Option<Duration> {
        let until = (*self.paused_until.lock().unwrap_or_else(|p| p.into_inner()))?;
        until.checked_duration_since(Instant::now())
    }

    fn pause(&self, after: Duration) {
        let until = Instant::now() + after;
        let mut paused = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if paused.is_none_or(|at| at < until) {
            *paused = Some(until);
        }
    }

    /// The requests that carry `pending` (indices into `events`).
    fn requests(&self, events: &[Event], pending: &[usize], processed_at_ms: u64) -> Vec<Request> {
        if self.settings.encoding == Encoding::Event {
            return pending
                .iter()
                .map(|&at| {
                    let mut body = Vec::with_capacity(256 + events[at].payload.len());
                    write_record(&mut body, &events[at], processed_at_ms);
                    body.pop(); // the line's newline
                    Request {
                        key: events[at].id.to_string(),
                        body: Bytes::from(body),
                        events: vec![at],
                    }
                })
                .collect();
        }
        let array = self.settings.encoding == Encoding::Array;
        // Records are written straight into the body; one that makes it too big moves on to
        // the next request.
        let start = |body: &mut Vec<u8>| {
            if array {
                body.push(b'[');
            }
        };
        let mut requests = Vec::new();
        let mut body = Vec::with_capacity(self.settings.max_bytes.min(1 << 20));
        start(&mut body);
        let mut carried = Vec::new();
        for &at in pending {
            if carried.len() == self.settings.max_events {
                requests.push(self.batch_request(events, &mut body, &mut carried, array));
                start(&mut body);
            }
            let mark = body.len();
            if array && !carried.is_empty() {
                body.push(b',');
            }
            write_record(&mut body, &events[at], processed_at_ms);
            if array {
                body.pop();
            }
            // `]` still to come for an array.
            if body.len() + usize::from(array) > self.settings.max_bytes && !carried.is_empty() {
                let record = body.split_off(mark);
                requests.push(self.batch_request(events, &mut body, &mut carried, array));
                start(&mut body);
                // Without the comma that led it.
                let record = if array { &record[1..] } else { &record[..] };
                body.extend_from_slice(record);
            }
            carried.push(at);
        }
        if !carried.is_empty() {
            requests.push(self.batch_request(events, &mut body, &mut carried, array));
        }
        requests
    }

    /// A request of the records in `body` (an array not yet closed), leaving both empty.
    fn batch_request(
        &self,
        events: &[Event],
        body: &mut Vec<u8>,
        carried: &mut Vec<usize>,
        array: bool,
    ) -> Request {
        let capacity = body.capacity();
        let mut bytes = std::mem::replace(body, Vec::with_capacity(capacity));
        if array {
            bytes.push(b']');
        }
        let carried = std::mem::take(carried);
        Request {
            key: batch_key(carried.iter().map(|&at| &*events[at].id)),
            body: Bytes::from(bytes),
            events: carried,
        }
    }

    async fn send(&self, request: &Request) -> Answer {
        let Ok(_permit) = self.in_flight.acquire().await else {
            return Answer::Retry {
                message: "the sink is closed".into(),
                retry_after: None,
            };
        };
        if let Some(wait) = self.paused() {
            return paused(wait);
        }
        let mut builder = self
            .client
            .request(self.settings.method.clone(), self.settings.url.clone())
            .timeout(self.settings.timeout)
            .header(CONTENT_TYPE, self.settings.encoding.content_type())
            .header("idempotency-key", &request.key);
        if let Some(secret) = &self.settings.secret {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            builder = builder
                .header("webhook-id", &request.key)
                .header("webhook-timestamp", timestamp)
                .header(
                    "webhook-signature",
                    signature(secret, &request.key, timestamp, &request.body),
                );
        }
        for (name, value) in &self.settings.headers {
            builder = builder.header(name, value);
        }
        let response = match builder.body(request.body.clone()).send().await {
            Ok(response) => response,
            Err(error) => {
                let message = if error.is_timeout() {
                    format!("no answer within {:?} (timeout_ms)", self.settings.timeout)
                } else {
                    error_chain(&error)
                };
                return Answer::Retry {
                    message,
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            // Read to the end, so the connection can be used again.
            let _ = response.bytes().await;
            return Answer::Delivered;
        }
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let retryable = is_retryable(status);
        // Paused before anything else, so no other request goes out meanwhile.
        if let Some(after) = retry_after.filter(|_| retryable) {
            self.pause(after);
        }
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .map(str::to_owned);
        let mut message = format!("HTTP {status}");
        if let Some(location) = location.filter(|_| status.is_redirection()) {
            message.push_str(&format!(" to {location} (redirects are not followed)"));
        }
        let start = answer_start(response).await;
        if !start.is_empty() {
            message.push_str(": ");
            message.push_str(&start);
        }
        if retryable {
            Answer::Retry {
                message,
                retry_after,
            }
        } else {
            Answer::Refused(message)
        }
    }
}

fn paused(wait: Duration) -> Answer {
    Answer::Retry {
        message: pause_message(wait),
        retry_after: Some(wait),
    }
}

fn pause_message(wait: Duration) -> String {
    format!(
        "the receiver asked for a pause (Retry-After); {} ms left",
        wait.as_millis()
    )
}

/// 408, 429 and every 5xx may pass next time; any other failure will not.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// The `Retry-After` of an answer, seconds or an HTTP date, at most [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let after = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(after.min(MAX_RETRY_AFTER))
}

/// The first [`ANSWER_START`] characters of the answer's body, on one line.
async fn answer_start(mut response: reqwest::Response) -> String {
    let mut start = Vec::new();
    while start.len() < ANSWER_START {
        match response.chunk().await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&start);
    let mut line: String = text
        .chars()
        .take(ANSWER_START)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > ANSWER_START {
        line.push('…');
    }
    line.trim().to_owned()
}

/// A batch's idempotency key: the same events in the same order always make the same key.
fn batch_key<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut count = 0usize;
    for id in ids {
        digest.update(id.as_bytes());
        digest.update(b"\n");
        count += 1;
    }
    let hash = digest.finish();
    let hex: String = hash.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("batch_{hex}_{count}")
}

#[async_trait]
impl Sink for HttpSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let (pending, mut round) = self.answers.sort(events);
        if !pending.is_empty() {
            if let Some(wait) = self.paused() {
                return Err(
                    SinkError::retryable(self.describe(), pause_message(wait)).retry_after(wait)
                );
            }
            let requests = self.requests(events, &pending, processed_at_ms);
            let answers =
                futures_util::future::join_all(requests.iter().map(|r| self.send(r))).await;
            for (request, answer) in requests.iter().zip(answers) {
                match answer {
                    Answer::Delivered => round.delivered(request.events.iter().copied()),
                    Answer::Retry {
                        message,
                        retry_after,
                    } => round.retry(request.events.len(), message, retry_after),
                    Answer::Refused(message) => {
                        for &at in &request.events {
                            round.refused(at, message.clone());
                        }
                    }
                }
            }
        }
        self.answers.settle(&self.described, events, round)
    }

    fn describe(&self) -> String {
        self.described.clone()
    }

    /// A write may take several rounds of requests: three request timeouts, at least 30 s.
    fn write_timeout(&self) -> Duration {
        (self.settings.timeout * 3).max(conveyor_sink::DEFAULT_WRITE_TIMEOUT)
    }
}

#[cfg(test)]
mod tests;

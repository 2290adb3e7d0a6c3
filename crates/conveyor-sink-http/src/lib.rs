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

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::Event;
use conveyor_core::dedupe::DedupeWindow;
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

/// How many confirmed events the sink remembers, to skip them when their batch comes back.
const DELIVERED_WINDOW: usize = 100_000;

/// How many refusals the sink remembers while their batch is retried for other events.
const REFUSED_WINDOW: usize = 10_000;

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
    answered: Mutex<Answered>,
}

/// Events the receiver confirmed, and events it refused whose batch had to be sent again for
/// others' sake: a retried batch skips the first and reports the second without asking again.
struct Answered {
    confirmed: DedupeWindow,
    /// By dedupe key, the refusal's text; the oldest is forgotten first.
    refused: HashMap<String, String>,
    refused_order: VecDeque<String>,
}

impl Answered {
    fn refuse(&mut self, key: String, message: String) {
        if self.refused_order.len() == REFUSED_WINDOW
            && let Some(oldest) = self.refused_order.pop_front()
        {
            self.refused.remove(&oldest);
        }
        if self.refused.insert(key.clone(), message).is_none() {
            self.refused_order.push_back(key);
        }
    }
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
            answered: Mutex::new(Answered {
                confirmed: DedupeWindow::new(DELIVERED_WINDOW),
                refused: HashMap::new(),
                refused_order: VecDeque::new(),
            }),
        })
    }

    fn answered(&self) -> std::sync::MutexGuard<'_, Answered> {
        self.answered.lock().unwrap_or_else(|p| p.into_inner())
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

/// An error with its causes (reqwest's own text names only the URL).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[async_trait]
impl Sink for HttpSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let mut pending = Vec::with_capacity(events.len());
        let mut refused = Vec::new();
        {
            let answered = self.answered();
            for (at, event) in events.iter().enumerate() {
                // The windows hold only events of writes that failed, so a first delivery
                // cannot be there: the common case asks nothing.
                if event.attempt <= 1 {
                    pending.push(at);
                    continue;
                }
                if answered.confirmed.contains(event) {
                    continue;
                }
                let known = (!answered.refused.is_empty())
                    .then(|| answered.refused.get(&event.dedupe_key()))
                    .flatten();
                match known {
                    Some(message) => refused.push((at, message.clone())),
                    None => pending.push(at),
                }
            }
        }
        if pending.is_empty() && refused.is_empty() {
            return Ok(());
        }
        if let Some(wait) = self.paused().filter(|_| !pending.is_empty()) {
            return Err(
                SinkError::retryable(self.describe(), pause_message(wait)).retry_after(wait)
            );
        }
        let requests = self.requests(events, &pending, processed_at_ms);
        let answers = futures_util::future::join_all(requests.iter().map(|r| self.send(r))).await;
        let mut retry: Option<(String, Option<Duration>, usize)> = None;
        let mut delivered = Vec::new();
        for (request, answer) in requests.iter().zip(answers) {
            match answer {
                Answer::Delivered => delivered.extend_from_slice(&request.events),
                Answer::Retry {
                    message,
                    retry_after,
                } => {
                    let slot = retry.get_or_insert((message, None, 0));
                    slot.1 = slot.1.max(retry_after);
                    slot.2 += request.events.len();
                }
                Answer::Refused(message) => {
                    refused.extend(request.events.iter().map(|&at| (at, message.clone())));
                }
            }
        }
        let mut answered = self.answered();
        if let Some((message, retry_after, count)) = retry {
            // The batch comes back for the others: what was confirmed is not sent again, and
            // its refusals are final and wait here.
            for &at in &delivered {
                answered.confirmed.insert(&events[at]);
            }
            for (at, message) in &refused {
                answered.refuse(events[*at].dedupe_key(), message.clone());
            }
            drop(answered);
            let error = SinkError::retryable(
                self.describe(),
                format!(
                    "{message} ({count} of {} events to send again)",
                    events.len()
                ),
            );
            return Err(match retry_after {
                Some(after) => error.retry_after(after),
                None => error,
            });
        }
        // Reported now, so forgotten: a replay of the letter is sent afresh.
        if !answered.refused.is_empty() {
            for (at, _) in &refused {
                answered.refused.remove(&events[*at].dedupe_key());
            }
        }
        drop(answered);
        if !refused.is_empty() {
            refused.sort_unstable_by_key(|(at, _)| *at);
            return Err(SinkError::rejected(
                self.describe(),
                format!("{} of {} events refused", refused.len(), events.len()),
                refused,
            ));
        }
        Ok(())
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

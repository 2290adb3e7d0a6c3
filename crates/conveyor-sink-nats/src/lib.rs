//! The NATS JetStream sink: processed events published to a subject (another team's stream,
//! or the next conveyor's queue), each one confirmed by its PubAck before the source event is
//! acked.
//!
//! # Delivery
//!
//! - Every message carries `Nats-Msg-Id` = the event id, so the stream stores a re-publish of
//!   the same event inside its duplicate window once: a redelivery after a crash, or a batch
//!   retried after a lost PubAck, leaves one message. The sink is idempotent for as long as
//!   the window lasts (two minutes unless the stream says otherwise); a redelivery later than
//!   that (a processor that wrote, then stayed dead past the window before its ack was lost)
//!   can store a second copy.
//! - A write publishes the batch's events without waiting, then awaits their PubAcks
//!   together, at most `max_in_flight` across all workers (taken all at once per round, so
//!   two writes can never each hold half and wait for the other).
//! - Answers: a PubAck (stored, or a duplicate the stream discarded) is written. No PubAck
//!   within `timeout_ms`, no stream answering (no responders), a lost connection, a full stream
//!   (discard-new limits): retryable; the sink retries until the stream takes them. A message
//!   larger than the server's `max_payload` or the stream's `max_msg_size`: refused for good,
//!   to the DLQ with the server's words. When part of a batch must be sent again, what was
//!   confirmed is not published again ([`conveyor_sink::answers`]).
//! - The connection is made at the first write (and made again after a failed attempt), so a
//!   processor starts while the target is down; it then checks that a stream captures the
//!   subject, creating the named `stream` (file storage, limits retention, no limits) when it
//!   is missing, and again when a publish finds it gone (deleted since). Until then every write is retryable with the reason, which the sink's health
//!   shows.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{GetStreamByNameErrorKind, PublishError, PublishErrorKind};
use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::Event;
use conveyor_core::display::error_chain;
use conveyor_queue_nats::{connect, encode, ensure_stream, parse_servers};
use conveyor_sink::answers::{Answers, Round};
use conveyor_sink::record::write_record;
use conveyor_sink::{Sink, SinkError};
use tokio::sync::{OnceCell, Semaphore};

mod settings;

pub use settings::{Encoding, NatsSinkSettings};

/// The header naming a record's source, as the NATS queue reads a plain publisher's message.
const SOURCE_HEADER: &str = "Conveyor-Source";

pub struct NatsSink {
    settings: NatsSinkSettings,
    described: String,
    /// Made at the first write that finds the server; see the crate docs.
    connection: OnceCell<Context>,
    /// A publish found no stream (deleted since): the next write looks for it again, and
    /// creates the named one.
    stream_gone: AtomicBool,
    /// Publishes awaiting their PubAck, across all writes.
    in_flight: Arc<Semaphore>,
    answers: Answers,
}

/// What became of one publish.
enum Outcome {
    Confirmed,
    Retry(String),
    Refused(String),
}

impl NatsSink {
    pub fn new(settings: NatsSinkSettings) -> Self {
        NatsSink {
            described: settings.describe(),
            in_flight: Arc::new(Semaphore::new(settings.max_in_flight)),
            settings,
            connection: OnceCell::new(),
            stream_gone: AtomicBool::new(false),
            answers: Answers::default(),
        }
    }

    async fn context(&self) -> Result<&Context, String> {
        self.connection.get_or_try_init(|| self.open()).await
    }

    /// Connects (one try) and makes sure a stream captures the subject.
    async fn open(&self) -> Result<Context, String> {
        let servers = parse_servers(&self.settings.url)?;
        let client = connect(&servers, Duration::ZERO).await?;
        let mut js = jetstream::new(client);
        js.set_timeout(self.settings.timeout);
        self.find_stream(&js).await?;
        Ok(js)
    }

    /// Finds the stream that captures the subject, or creates the named one.
    async fn find_stream(&self, js: &Context) -> Result<(), String> {
        let subject = &self.settings.subject;
        match (
            js.stream_by_subject(subject.as_str()).await,
            &self.settings.stream,
        ) {
            (Ok(found), Some(wanted)) if found != *wanted => {
                return Err(format!(
                    "subject '{subject}' is captured by stream '{found}', not by '{wanted}'"
                ));
            }
            (Ok(_), _) => {}
            (Err(error), Some(name)) if error.kind() == GetStreamByNameErrorKind::NotFound => {
                if !self.settings.create_stream {
                    return Err(format!(
                        "no stream '{name}' captures subject '{subject}' (create_stream = false)"
                    ));
                }
                ensure_stream(js, self.stream_config(name), "sink").await?;
                tracing::info!(stream = %name, %subject, "NATS sink: stream ready");
            }
            (Err(error), None) if error.kind() == GetStreamByNameErrorKind::NotFound => {
                return Err(format!(
                    "no JetStream stream captures subject '{subject}'; create one, or name it \
                     with `stream` and the sink creates it"
                ));
            }
            (Err(error), _) => {
                return Err(format!(
                    "cannot ask which stream captures subject '{subject}': {error}"
                ));
            }
        }
        Ok(())
    }

    fn stream_config(&self, name: &str) -> jetstream::stream::Config {
        jetstream::stream::Config {
            name: name.to_owned(),
            subjects: vec![self.settings.subject.clone()],
            storage: jetstream::stream::StorageType::File,
            duplicate_window: self.settings.duplicate_window,
            ..Default::default()
        }
    }

    fn message(&self, event: &Event, processed_at_ms: u64) -> (HeaderMap, Bytes) {
        match self.settings.encoding {
            Encoding::Event => encode(event.clone()),
            Encoding::Record => {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", event.id.as_ref());
                headers.insert("Content-Type", "application/json");
                headers.insert(SOURCE_HEADER, event.source.as_ref());
                let mut record = Vec::with_capacity(event.payload.len() + 160);
                write_record(&mut record, event, processed_at_ms);
                record.pop(); // the record line's newline: a message is one document
                (headers, Bytes::from(record))
            }
        }
    }

    /// Publishes `chunk` (indices into `events`) and awaits the PubAcks together.
    async fn publish(
        &self,
        js: &Context,
        events: &[Event],
        chunk: &[usize],
        processed_at_ms: u64,
    ) -> Vec<Outcome> {
        // All of the round's permits at once: a write never holds some while waiting for more.
        let _permits = match self.in_flight.acquire_many(chunk.len() as u32).await {
            Ok(permits) => permits,
            Err(_) => {
                return chunk
                    .iter()
                    .map(|_| Outcome::Retry("closed".into()))
                    .collect();
            }
        };
        let mut sent = Vec::with_capacity(chunk.len());
        for &at in chunk {
            let (headers, payload) = self.message(&events[at], processed_at_ms);
            let size = payload.len();
            sent.push(
                js.publish_with_headers(self.settings.subject.clone(), headers, payload)
                    .await
                    .map_err(|error| (error, size)),
            );
        }
        let acks = sent.into_iter().map(|sent| async move {
            match sent {
                Ok(ack) => match ack.await {
                    Ok(_) => Outcome::Confirmed,
                    Err(error) => self.outcome(&error, 0),
                },
                Err((error, size)) => self.outcome(&error, size),
            }
        });
        futures_util::future::join_all(acks).await
    }

    /// What a failed publish means for its event.
    fn outcome(&self, error: &PublishError, size: usize) -> Outcome {
        let subject = &self.settings.subject;
        let text = error_chain(error);
        match error.kind() {
            PublishErrorKind::MaxPayloadExceeded => Outcome::Refused(format!(
                "a message of {size} bytes is larger than the server's max_payload: {text}"
            )),
            PublishErrorKind::StreamNotFound => {
                self.stream_gone.store(true, Ordering::Relaxed);
                Outcome::Retry(format!(
                    "no stream captures subject '{subject}' (no responders)"
                ))
            }
            PublishErrorKind::TimedOut => Outcome::Retry(format!(
                "no PubAck within {:?} on subject '{subject}'",
                self.settings.timeout
            )),
            _ if text.contains("message size exceeds maximum") => Outcome::Refused(text),
            _ => Outcome::Retry(text),
        }
    }
}

#[async_trait]
impl Sink for NatsSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let (pending, mut round) = self.answers.sort(events);
        if !pending.is_empty() {
            let js = self
                .context()
                .await
                .map_err(|message| SinkError::retryable(&self.described, message))?;
            // While the client reconnects, fail at once instead of waiting out every PubAck.
            if js.client().connection_state() != async_nats::connection::State::Connected {
                return Err(SinkError::retryable(
                    &self.described,
                    "not connected to NATS (reconnecting)",
                ));
            }
            if self.stream_gone.swap(false, Ordering::Relaxed)
                && let Err(message) = self.find_stream(js).await
            {
                self.stream_gone.store(true, Ordering::Relaxed);
                return Err(SinkError::retryable(&self.described, message));
            }
            for chunk in pending.chunks(self.settings.max_in_flight) {
                let outcomes = self.publish(js, events, chunk, processed_at_ms).await;
                settle_chunk(&mut round, chunk, outcomes);
            }
        }
        self.answers.settle(&self.described, events, round)
    }

    fn describe(&self) -> String {
        self.described.clone()
    }

    /// A write may take a round of PubAcks per `max_in_flight` events: three timeouts, at
    /// least 30 s.
    fn write_timeout(&self) -> Duration {
        (self.settings.timeout * 3).max(conveyor_sink::DEFAULT_WRITE_TIMEOUT)
    }

    fn idempotent(&self) -> bool {
        true
    }
}

fn settle_chunk(round: &mut Round, chunk: &[usize], outcomes: Vec<Outcome>) {
    for (&at, outcome) in chunk.iter().zip(outcomes) {
        match outcome {
            Outcome::Confirmed => round.delivered([at]),
            Outcome::Retry(message) => round.retry(1, message, None),
            Outcome::Refused(message) => round.refused(at, message),
        }
    }
}

#[cfg(test)]
mod tests;

//! Creating or finding the streams and the durable consumer at start-up.
//!
//! Every role runs this, and in Kubernetes or compose they all start at once: two roles can
//! both see "stream not found" and both create it. The server then answers the loser with
//! "subjects overlap with an existing stream" (10065), "stream name already in use" (10058) or
//! "consumer already exists", and a fresh cluster answers "temporarily unavailable" while it
//! elects its meta leader. Those answers mean "look again in a moment": each step is retried
//! with a short, jittered backoff until it converges, and whatever stream or consumer is found
//! in the end is checked against the settings conveyor needs (a stream someone else created
//! with other semantics is refused, not used).

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, FromConsumer, PullConsumer, pull};
use async_nats::jetstream::context::{
    ConsumerInfoErrorKind, CreateStreamErrorKind, GetStreamErrorKind,
};
use async_nats::jetstream::stream::{self, ConsumerErrorKind, Stream};
use async_nats::jetstream::{Context, ErrorCode};
use tokio::time::Instant;

/// How long start-up keeps retrying answers that mean "someone else is creating it" or "the
/// cluster is not ready yet" before it gives up with the last one.
pub(crate) const SETUP_WITHIN: Duration = Duration::from_secs(30);
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(800);

/// Whether a JetStream API error is worth asking again: a concurrent creator, or a cluster that
/// is still electing or missing a peer. Anything else (a bad setting) fails at once.
fn transient(code: ErrorCode, text: &str) -> bool {
    const RACING: [ErrorCode; 5] = [
        ErrorCode::STREAM_SUBJECT_OVERLAP,
        ErrorCode::STREAM_NAME_EXIST,
        ErrorCode::CONSUMER_NAME_EXIST,
        // "consumer already exists": a durable created by a concurrent role between our
        // lookup and our create (no constant in the client for it).
        ErrorCode(10148),
        ErrorCode::CONSUMER_CREATE,
    ];
    const SETTLING: [ErrorCode; 9] = [
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_INCOMPLETE,
        ErrorCode::CLUSTER_NO_PEERS,
        ErrorCode::CLUSTER_NOT_ACTIVE,
        ErrorCode::CLUSTER_NOT_ASSIGNED,
        ErrorCode::CLUSTER_NOT_LEADER,
        ErrorCode::RAFT_GENERAL,
        ErrorCode::STREAM_ASSIGNMENT,
        // A fresh cluster that has not yet heard of enough peers for the replicas asked.
        ErrorCode::INSUFFICIENT_RESOURCES,
    ];
    let text = text.to_ascii_lowercase();
    RACING.contains(&code)
        || SETTLING.contains(&code)
        || [
            "already in use",
            "already exists",
            "overlap",
            "temporarily unavailable",
        ]
        .iter()
        .any(|answer| text.contains(answer))
}

/// The outcome of one attempt at a set-up step.
enum Attempt<T> {
    Done(T),
    /// Worth another try; the text is what the server said.
    Again(String),
    Failed(String),
}

/// Retries with a doubling, jittered delay until `SETUP_WITHIN` has passed.
struct Backoff {
    what: String,
    deadline: Instant,
    delay: Duration,
    attempts: u32,
}

impl Backoff {
    fn new(what: String) -> Self {
        Backoff {
            what,
            deadline: Instant::now() + SETUP_WITHIN,
            delay: FIRST_BACKOFF,
            attempts: 0,
        }
    }

    /// Waits before the next attempt; `Err` once the deadline passed.
    async fn wait(&mut self, last: String) -> Result<(), String> {
        self.attempts += 1;
        if Instant::now() + self.delay > self.deadline {
            return Err(format!(
                "{}: still failing after {} attempts over {SETUP_WITHIN:?}: {last}",
                self.what, self.attempts
            ));
        }
        tracing::info!(what = %self.what, attempt = self.attempts, answer = %last,
            "JetStream set-up not settled yet (another role creating it, or the cluster electing); retrying");
        // Roles that collided once must not collide again in lockstep: up to +100% jitter.
        tokio::time::sleep(conveyor_core::retry::with_jitter(self.delay, 1.0)).await;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
        Ok(())
    }
}

/// Finds the stream `wanted.name`, or creates it with `wanted`; then checks that what exists
/// has the settings conveyor depends on. `role` names the stream in errors ("work-queue",
/// "dead-letter", "sink").
pub async fn ensure_stream(
    js: &Context,
    wanted: stream::Config,
    role: &str,
) -> Result<Stream, String> {
    let mut backoff = Backoff::new(format!("{role} stream '{}'", wanted.name));
    loop {
        let attempt = match js.get_stream(&wanted.name).await {
            Ok(stream) => Attempt::Done(stream),
            Err(error) => match error.kind() {
                GetStreamErrorKind::JetStream(e)
                    if e.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    match js.create_stream(wanted.clone()).await {
                        Ok(stream) => Attempt::Done(stream),
                        Err(error) => match error.kind() {
                            CreateStreamErrorKind::JetStream(e) => {
                                if transient(e.error_code(), &e.to_string()) {
                                    Attempt::Again(error.to_string())
                                } else {
                                    Attempt::Failed(error.to_string())
                                }
                            }
                            // No answer in time, or no JetStream answering yet (a server
                            // restarting): ask again.
                            CreateStreamErrorKind::TimedOut
                            | CreateStreamErrorKind::JetStreamUnavailable
                            | CreateStreamErrorKind::Response => Attempt::Again(error.to_string()),
                            _ => Attempt::Failed(error.to_string()),
                        },
                    }
                }
                GetStreamErrorKind::JetStream(e) if !transient(e.error_code(), &e.to_string()) => {
                    Attempt::Failed(error.to_string())
                }
                _ => Attempt::Again(error.to_string()),
            },
        };
        match attempt {
            Attempt::Done(stream) => {
                check_stream(&stream.cached_info().config, &wanted, role)?;
                return Ok(stream);
            }
            Attempt::Failed(error) => {
                return Err(format!(
                    "cannot create or find {role} stream '{}': {error}",
                    wanted.name
                ));
            }
            Attempt::Again(error) => backoff.wait(error).await?,
        }
    }
}

/// Refuses a stream whose semantics differ from what conveyor needs; warns about settings that
/// differ but only change limits (another role, or an operator, sized it differently).
fn check_stream(
    existing: &stream::Config,
    wanted: &stream::Config,
    role: &str,
) -> Result<(), String> {
    let mut wrong = Vec::new();
    if existing.retention != wanted.retention {
        wrong.push(format!(
            "retention {:?} (needs {:?})",
            existing.retention, wanted.retention
        ));
    }
    for subject in &wanted.subjects {
        if !existing.subjects.contains(subject) {
            wrong.push(format!(
                "subjects {:?} (needs '{subject}')",
                existing.subjects
            ));
        }
    }
    // Discard-old on a full work queue would delete accepted events to make room.
    if existing.discard != wanted.discard {
        wrong.push(format!(
            "discard {:?} (needs {:?})",
            existing.discard, wanted.discard
        ));
    }
    if existing.storage != wanted.storage {
        wrong.push(format!(
            "storage {:?} (CONVEYOR_NATS_STORAGE asks for {:?})",
            existing.storage, wanted.storage
        ));
    }
    if !wrong.is_empty() {
        return Err(format!(
            "{role} stream '{}' exists with other settings: {}; delete it or change conveyor's settings to match",
            existing.name,
            wrong.join(", ")
        ));
    }
    if existing.num_replicas.max(1) != wanted.num_replicas.max(1)
        || existing.max_messages != wanted.max_messages
        // A zero window asks for the server's default (two minutes), which is what it shows.
        || (!wanted.duplicate_window.is_zero()
            && existing.duplicate_window != wanted.duplicate_window)
    {
        tracing::warn!(
            stream = %existing.name,
            replicas = existing.num_replicas, wanted_replicas = wanted.num_replicas,
            max_messages = existing.max_messages, wanted_max_messages = wanted.max_messages,
            duplicate_window = ?existing.duplicate_window,
            wanted_duplicate_window = ?wanted.duplicate_window,
            "the stream exists with other limits; using it as it is"
        );
    }
    Ok(())
}

/// Finds the durable consumer `wanted.durable_name` on `stream`, or creates it; then checks
/// that it acknowledges explicitly and sees the whole stream.
pub(crate) async fn ensure_consumer(
    js: &Context,
    stream: &Stream,
    wanted: pull::Config,
) -> Result<PullConsumer, String> {
    let name = wanted.durable_name.clone().unwrap_or_default();
    let mut backoff = Backoff::new(format!("consumer '{name}'"));
    loop {
        let attempt = match stream.consumer_info(&name).await {
            Ok(info) => match pull::Config::try_from_consumer_config(info.config.clone()) {
                Ok(config) => {
                    check_consumer(&info.config, &wanted)?;
                    Attempt::Done(consumer::Consumer::new(config, info, js.clone()))
                }
                Err(error) => Attempt::Failed(format!("not a pull consumer: {error}")),
            },
            Err(error) => match error.kind() {
                ConsumerInfoErrorKind::NotFound => {
                    match stream.create_consumer(wanted.clone()).await {
                        Ok(consumer) => Attempt::Done(consumer),
                        Err(error) => match error.kind() {
                            ConsumerErrorKind::JetStream(e) => {
                                if transient(e.error_code(), &e.to_string()) {
                                    Attempt::Again(error.to_string())
                                } else {
                                    Attempt::Failed(error.to_string())
                                }
                            }
                            ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => {
                                Attempt::Again(error.to_string())
                            }
                            _ => Attempt::Failed(error.to_string()),
                        },
                    }
                }
                ConsumerInfoErrorKind::JetStream(e)
                    if !transient(e.error_code(), &e.to_string()) =>
                {
                    Attempt::Failed(error.to_string())
                }
                ConsumerInfoErrorKind::InvalidName => Attempt::Failed(error.to_string()),
                _ => Attempt::Again(error.to_string()),
            },
        };
        match attempt {
            Attempt::Done(consumer) => return Ok(consumer),
            Attempt::Failed(error) => {
                return Err(format!("cannot create or find consumer '{name}': {error}"));
            }
            Attempt::Again(error) => backoff.wait(error).await?,
        }
    }
}

fn check_consumer(existing: &consumer::Config, wanted: &pull::Config) -> Result<(), String> {
    let name = existing.durable_name.as_deref().unwrap_or("?");
    if existing.ack_policy != AckPolicy::Explicit {
        return Err(format!(
            "consumer '{name}' exists with ack policy {:?}; conveyor needs explicit acks (ack after the sink wrote)",
            existing.ack_policy
        ));
    }
    if !existing.filter_subject.is_empty() {
        return Err(format!(
            "consumer '{name}' exists filtered to '{}'; conveyor's consumer must see the whole stream",
            existing.filter_subject
        ));
    }
    if existing.ack_wait != wanted.ack_wait || existing.max_deliver != wanted.max_deliver {
        tracing::warn!(
            consumer = %name,
            ack_wait = ?existing.ack_wait, wanted_ack_wait = ?wanted.ack_wait,
            max_deliver = existing.max_deliver, wanted_max_deliver = wanted.max_deliver,
            "the consumer exists with other settings; using it as it is"
        );
    }
    Ok(())
}

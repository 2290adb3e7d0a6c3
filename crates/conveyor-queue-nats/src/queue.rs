//! The stream, the shared durable consumer, publishing with PubAck and consuming with acks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::stats::QueueStats;
use conveyor_core::{ContentType, Event};
use conveyor_proto::v1;
use conveyor_queue::{
    Consumer, Delivery, DeliveryHandle, Health, PublishError, Published, Publisher, Queue,
    QueueError, Settlement,
};
use prost::Message;
use tokio::sync::Semaphore;

use crate::pull::Puller;
use crate::{NatsConfig, cluster, setup};

/// Header marking a message as a protobuf `conveyor.v1.Event`.
pub(crate) const ENCODING_HEADER: &str = "Conveyor-Encoding";
/// Header naming the source of a raw (non-conveyor) message.
const SOURCE_HEADER: &str = "Conveyor-Source";

/// A JetStream-backed queue. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct NatsQueue {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    js: Context,
    config: NatsConfig,
    in_flight: Arc<Semaphore>,
    closed: AtomicBool,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    duplicates: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    terminated: AtomicU64,
}

/// Connects to the server(s), retrying for up to `connect_within` (zero: one try). With
/// several servers (a cluster's seeds) the client tries each, and later reconnects to any of
/// them or to the cluster members the servers announce. Credentials in the first server's URL
/// (`nats://user:password@host`, or `nats://token@host`) are sent on connect; they never
/// appear in a log line or an error.
pub async fn connect(
    servers: &[async_nats::ServerAddr],
    connect_within: Duration,
) -> Result<Client, String> {
    let named = || {
        servers
            .iter()
            .map(without_credentials)
            .collect::<Vec<_>>()
            .join(",")
    };
    let deadline = tokio::time::Instant::now() + connect_within;
    loop {
        let mut options = async_nats::ConnectOptions::new()
            .name("conveyor")
            .connection_timeout(Duration::from_secs(2))
            // After start-up the client reconnects for ever; publishes fail fast meanwhile.
            .max_reconnects(None);
        if let Some(first) = servers.first()
            && let Some(user) = first.username()
        {
            let user = crate::config::decode_credential(user);
            options = match first.password() {
                Some(password) => {
                    options.user_and_password(user, crate::config::decode_credential(password))
                }
                None => options.token(user),
            };
        }
        match options.connect(servers.to_vec()).await {
            Ok(client) => return Ok(client),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(servers = %named(), %error, "cannot reach NATS yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => return Err(format!("cannot connect to NATS at {}: {error}", named())),
        }
    }
}

/// A server as it may be shown: `nats://host:port`, without user, password or token.
pub fn without_credentials(server: &async_nats::ServerAddr) -> String {
    let scheme = server
        .as_url_str()
        .split_once("://")
        .map_or("nats", |(scheme, _)| scheme);
    format!("{scheme}://{}:{}", server.host(), server.port())
}

impl NatsQueue {
    /// Connects, and creates the stream and the durable consumer or checks the existing ones.
    /// Several roles may do this at the same moment against a fresh server; see `setup`.
    pub async fn connect(config: NatsConfig) -> Result<NatsQueue, String> {
        let servers = config.servers()?;
        let client = connect(&servers, Duration::from_secs(30)).await?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(config.publish_timeout);
        let stream = setup::ensure_stream(&js, stream_config(&config), "work-queue").await?;
        setup::ensure_consumer(&js, &stream, consumer_config(&config)).await?;
        Ok(NatsQueue {
            inner: Arc::new(Inner {
                in_flight: Arc::new(Semaphore::new(config.max_in_flight_publishes.max(1))),
                client,
                js,
                config,
                closed: AtomicBool::new(false),
                counters: Counters::default(),
            }),
        })
    }

    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn jetstream(&self) -> &Context {
        &self.inner.js
    }

    pub fn config(&self) -> &NatsConfig {
        &self.inner.config
    }

    /// The stream's info, asked of its leader; `Err` names why there is none within
    /// `INFO_WITHIN` (while the stream has no leader nobody answers).
    async fn stream_info(&self) -> Result<jetstream::stream::Info, String> {
        let name = &self.inner.config.stream;
        match tokio::time::timeout(cluster::INFO_WITHIN, self.inner.js.get_stream(name)).await {
            Ok(Ok(stream)) => Ok(stream.cached_info().clone()),
            Ok(Err(error)) => Err(format!("stream '{name}' info: {error}")),
            Err(_) => Err(format!(
                "stream '{name}' info unanswered within {:?}: the stream has no leader, or JetStream is unavailable",
                cluster::INFO_WITHIN
            )),
        }
    }

    fn connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn consumer(&self) -> Result<PullConsumer, QueueError> {
        let config = &self.inner.config;
        let stream = self
            .inner
            .js
            .get_stream(&config.stream)
            .await
            .map_err(|e| QueueError::Unavailable(format!("stream '{}': {e}", config.stream)))?;
        setup::ensure_consumer(&self.inner.js, &stream, consumer_config(config))
            .await
            .map_err(QueueError::Unavailable)
    }
}

fn stream_config(config: &NatsConfig) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: config.stream.clone(),
        subjects: vec![config.subject.clone()],
        retention: RetentionPolicy::WorkQueue,
        max_messages: config.capacity,
        discard: DiscardPolicy::New,
        storage: config.storage_type(),
        num_replicas: config.replicas,
        duplicate_window: config.duplicate_window,
        ..Default::default()
    }
}

fn consumer_config(config: &NatsConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(config.consumer.clone()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        max_deliver: config.max_deliver.unwrap_or(-1),
        // Bounds what all processors together hold unacked.
        max_ack_pending: (config.fetch_batch * 64).max(1024) as i64,
        ..Default::default()
    }
}

/// The message the queue stores for an event (headers and payload). The NATS sink's `event`
/// encoding sends the same, so that another conveyor can take the subject as its queue.
pub fn encode(event: Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.dedupe_key().as_str());
    headers.insert(ENCODING_HEADER, "proto");
    let payload = conveyor_proto::event_to_wire(event).encode_to_vec();
    (headers, Bytes::from(payload))
}

/// Reads a message as an event: ours (protobuf) or a plain NATS publisher's (raw payload).
pub(crate) fn decode(message: &async_nats::Message, stream_sequence: u64) -> Event {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    if header(ENCODING_HEADER).as_deref() == Some("proto")
        && let Ok(wire) = v1::Event::decode(message.payload.clone())
    {
        return conveyor_proto::event_from_wire(wire);
    }
    Event {
        id: header("Nats-Msg-Id")
            .unwrap_or_else(|| format!("nats-{stream_sequence}"))
            .into(),
        source: header(SOURCE_HEADER)
            .unwrap_or_else(|| message.subject.to_string())
            .into(),
        timestamp_ms: conveyor_core::now_ms(),
        payload: message.payload.clone(),
        content_type: if serde_json_free_is_json(&message.payload) {
            ContentType::Json
        } else {
            ContentType::Binary
        },
        metadata: Default::default(),
        attempt: 0,
        headers: Default::default(),
    }
}

/// A cheap guess used only for raw messages: JSON documents start with `{` or `[`.
fn serde_json_free_is_json(payload: &[u8]) -> bool {
    matches!(
        payload.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{') | Some(b'[')
    )
}

fn publish_error(error: &async_nats::jetstream::context::PublishError) -> PublishError {
    let text = error.to_string();
    if text.contains("maximum messages")
        || text.contains("maximum bytes")
        || text.contains("resource limits")
    {
        return PublishError::Full;
    }
    match error.kind() {
        PublishErrorKind::MaxAckPending => PublishError::Full,
        _ => PublishError::Unavailable(text),
    }
}

#[async_trait]
impl Publisher for NatsQueue {
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        let count = events.len();
        if self.inner.closed.load(Ordering::Acquire) {
            return vec![Err(PublishError::Closed); count];
        }
        if !self.connected() {
            return vec![Err(PublishError::Unavailable("not connected to NATS".into())); count];
        }
        // Send a round of publishes, then wait for their PubAcks together: one round trip per
        // round instead of one per event. A round takes all its in-flight permits at once, so
        // no publish holds part of the bound while waiting for the rest (several batches, or
        // one larger than the bound, would otherwise wait for each other for ever).
        let most = self.inner.config.max_in_flight_publishes.max(1);
        let mut results = Vec::with_capacity(count);
        let mut events = events.into_iter().peekable();
        while events.peek().is_some() {
            let round: Vec<Event> = events.by_ref().take(most).collect();
            let Ok(_permits) = self.inner.in_flight.acquire_many(round.len() as u32).await else {
                results.extend(round.iter().map(|_| Err(PublishError::Closed)));
                continue;
            };
            let mut pending = Vec::with_capacity(round.len());
            for event in round {
                let (headers, payload) = encode(event);
                let sent = self
                    .inner
                    .js
                    .publish_with_headers(self.inner.config.subject.clone(), headers, payload)
                    .await;
                pending.push(sent.map_err(|error| publish_error(&error)));
            }
            let acks = pending.into_iter().map(|sent| async move {
                match sent?.await {
                    Ok(ack) if ack.duplicate => Ok(Published::Duplicate),
                    Ok(_) => Ok(Published::Stored),
                    Err(error) => Err(publish_error(&error)),
                }
            });
            results.extend(futures_util::future::join_all(acks).await);
        }
        let duplicates = results
            .iter()
            .filter(|r| matches!(r, Ok(Published::Duplicate)))
            .count();
        self.inner
            .counters
            .duplicates
            .fetch_add(duplicates as u64, Ordering::Relaxed);
        results
    }

    async fn health(&self) -> Health {
        if self.inner.closed.load(Ordering::Acquire) {
            return Health::Unhealthy("closed for publishing (shutting down)".into());
        }
        if !self.connected() {
            return Health::Unhealthy(format!(
                "not connected to NATS at {}",
                self.inner.config.shown_url()
            ));
        }
        // Connected is not enough on a cluster: the stream needs a leader and a quorum to
        // confirm a publish.
        match self.stream_info().await {
            Err(reason) => Health::Unhealthy(reason),
            Ok(info) => match cluster::problem(&self.inner.config.stream, info.cluster.as_ref()) {
                Some(reason) => Health::Unhealthy(reason),
                None => Health::Healthy,
            },
        }
    }
}

#[async_trait]
impl Queue for NatsQueue {
    async fn subscribe(&self) -> Result<Box<dyn Consumer>, QueueError> {
        // Makes sure the durable consumer exists (it may have been deleted under us).
        self.consumer().await?;
        let config = &self.inner.config;
        let puller = Puller::start(
            self.inner.client.clone(),
            self.inner.js.clone(),
            &config.stream,
            &config.consumer,
            config.fetch_batch,
        )
        .await
        .map_err(QueueError::Unavailable)?;
        Ok(Box::new(NatsConsumer {
            queue: self.clone(),
            puller,
        }))
    }

    async fn stats(&self) -> QueueStats {
        let counters = &self.inner.counters;
        let mut stats = QueueStats {
            backend: "nats".into(),
            durable: true,
            capacity: self.inner.config.capacity.max(0) as u64,
            duplicates: counters.duplicates.load(Ordering::Relaxed),
            acked: counters.acked.load(Ordering::Relaxed),
            nacked: counters.nacked.load(Ordering::Relaxed),
            terminated: counters.terminated.load(Ordering::Relaxed),
            ..QueueStats::default()
        };
        let config = &self.inner.config;
        // Each request bounded: while the stream has no leader nobody answers, and a status
        // page must still answer (without the figures only the leader knows).
        if let Ok(Ok(stream)) = tokio::time::timeout(
            cluster::INFO_WITHIN,
            self.inner.js.get_stream(&config.stream),
        )
        .await
        {
            let info = stream.cached_info();
            stats.published = info.state.last_sequence;
            stats.cluster = info.cluster.as_ref().map(cluster::stream_cluster);
            if let Ok(Ok(info)) =
                tokio::time::timeout(cluster::INFO_WITHIN, stream.consumer_info(&config.consumer))
                    .await
            {
                stats.size = info.num_pending;
                stats.in_flight = info.num_ack_pending as u64;
                stats.redelivered = info.num_redelivered as u64;
            }
        }
        stats
    }

    fn durable(&self) -> bool {
        true
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        Some(self.inner.config.ack_wait / 3)
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }
}

struct NatsConsumer {
    queue: NatsQueue,
    puller: Puller,
}

impl NatsConsumer {
    fn delivery(&self, message: jetstream::Message) -> Delivery {
        let (sequence, delivered) = message
            .info()
            .map(|info| (info.stream_sequence, info.delivered))
            .unwrap_or((0, 1));
        let mut event = decode(&message, sequence);
        event.attempt = u32::try_from(delivered).unwrap_or(u32::MAX).max(1);
        Delivery::new(
            event,
            Box::new(NatsDelivery {
                message,
                queue: self.queue.clone(),
            }),
        )
    }
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let first = match self.puller.next(wait).await {
            Ok(None) => return Ok(Vec::new()),
            Ok(Some(message)) => message,
            Err(error) => return Err(QueueError::Unavailable(format!("pulling failed: {error}"))),
        };
        let mut deliveries = Vec::with_capacity(max.min(self.queue.inner.config.fetch_batch));
        deliveries.push(self.delivery(first));
        // Take whatever else has already arrived, without waiting.
        while deliveries.len() < max {
            match self.puller.ready() {
                Some(message) => deliveries.push(self.delivery(message)),
                None => break,
            }
        }
        Ok(deliveries)
    }

    /// The puller keeps up to a batch requested ahead of `fetch`; a stopping processor would
    /// otherwise hold those for AckWait before the server gives them to anyone else. So: stop
    /// the puller (it returns everything the server sent it), then `-NAK` each without delay;
    /// the server delivers them to another consumer at once.
    async fn release(self: Box<Self>) {
        let NatsConsumer { queue, puller } = *self;
        let held = puller.stop().await;
        let count = held.len();
        let naks = held
            .iter()
            .map(|message| message.ack_with(AckKind::Nak(None)));
        let failed = futures_util::future::join_all(naks)
            .await
            .into_iter()
            .filter(Result::is_err)
            .count();
        // Settling publishes without waiting for the server; flush so the NAKs are on the
        // wire before the process goes on to exit.
        let flushed = queue.inner.client.flush().await;
        let released = (count - failed) as u64;
        queue
            .inner
            .counters
            .nacked
            .fetch_add(released, Ordering::Relaxed);
        if failed > 0 || flushed.is_err() {
            tracing::warn!(
                released,
                failed,
                "could not give back every prefetched message; the server redelivers the rest after AckWait"
            );
        } else if count > 0 {
            tracing::debug!(released, "gave back the prefetched messages (-NAK)");
        }
    }
}

struct NatsDelivery {
    message: jetstream::Message,
    queue: NatsQueue,
}

#[async_trait]
impl DeliveryHandle for NatsDelivery {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        let counters = &self.queue.inner.counters;
        let (kind, counter) = match settlement {
            Settlement::Ack => (AckKind::Ack, &counters.acked),
            Settlement::Nack { delay } => (AckKind::Nak(Some(delay)), &counters.nacked),
            Settlement::Term => (AckKind::Term, &counters.terminated),
        };
        self.message
            .ack_with(kind)
            .await
            .map_err(|e| QueueError::Unavailable(format!("settling failed: {e}")))?;
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn keep_alive(&self) -> Result<(), QueueError> {
        self.message
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| QueueError::Unavailable(format!("in-progress ack failed: {e}")))
    }
}

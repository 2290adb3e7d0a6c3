//! Publishing with delivery reports, and consuming through one consumer-group member per
//! process whose commits follow the processed watermark.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::stats::{GroupMemberStats, PartitionStats, QueueStats};
use conveyor_core::{ContentType, Event};
use conveyor_proto::v1;
use conveyor_queue::dedupe::DedupeWindow;
use conveyor_queue::{
    Consumer, Delivery, DeliveryHandle, Health, PublishError, Published, Publisher, Queue,
    QueueError, Settlement,
};
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use crate::config::{KafkaConfig, PartitionKey};
use crate::stall::{Observed, StallWatch, Stuck, Verdict};
use crate::watermark::Watermark;

/// Header marking a record as a protobuf `conveyor.v1.Event`.
pub(crate) const ENCODING_HEADER: &str = "conveyor-encoding";
/// How often a publisher measures the group's lag (its capacity bound) and the broker's health.
const REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// Longest interval between a group member's heartbeats (shorter when a third of the session
/// timeout is).
const HEARTBEAT_MAX: Duration = Duration::from_millis(500);
/// Longest wait for one metadata, watermark or committed-offsets request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A Kafka-backed queue. Cheap to clone: clones share the clients.
#[derive(Clone)]
pub struct KafkaQueue {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: Detached<FutureProducer<Logged>>,
    /// Outside the group (it never subscribes): metadata, watermarks, the group's commits.
    observer: Detached<BaseConsumer<Logged>>,
    closed: AtomicBool,
    dedupe: Mutex<DedupeWindow>,
    in_flight: Arc<Semaphore>,
    counters: Counters,
    /// The last broker view (refreshed in the background and on every `stats`).
    view: Mutex<BrokerView>,
    /// Events sent, and their count when `view` was measured: the lag estimate's two halves.
    sent: AtomicU64,
    sent_at_view: AtomicU64,
    /// One past the highest offset each partition's delivery reports named: a floor for the
    /// high watermark (some Kafka-protocol brokers answer ListOffsets loosely; tansu does).
    produced_up_to: Mutex<HashMap<i32, i64>>,
    /// This process's group member, started by the first `subscribe`.
    member: tokio::sync::Mutex<Option<Arc<Member>>>,
}

#[derive(Default)]
struct Counters {
    duplicates: AtomicU64,
    acked: AtomicU64,
    nacked: AtomicU64,
    terminated: AtomicU64,
    redelivered: AtomicU64,
    /// Settlements that arrived after their partition was revoked (the new owner redelivers).
    stale: AtomicU64,
    /// Times the group was found stalled and this member rejoined it ([`crate::stall`]).
    stalls: AtomicU64,
}

#[derive(Debug, Clone, Default)]
struct BrokerView {
    /// `None` while the broker answers; the reason otherwise.
    unhealthy: Option<String>,
    partitions: Vec<PartitionOffsets>,
}

#[derive(Debug, Clone, Copy)]
struct PartitionOffsets {
    partition: i32,
    low: i64,
    high: i64,
    /// The group's committed offset, when it has one.
    committed: Option<i64>,
}

impl PartitionOffsets {
    /// Where the group resumes in this partition (an uncommitted group starts at the oldest).
    fn resume_at(&self) -> i64 {
        self.committed
            .unwrap_or(self.low)
            .clamp(self.low, self.high)
    }
}

/// Owns a librdkafka client and, when dropped, destroys it on a thread of its own: destroying
/// a client can block (a consumer waits for its group coordinator, which may be gone), and
/// nobody dropping a queue should wait on that. A process that exits meanwhile does not wait.
pub(crate) struct Detached<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> Detached<T> {
    pub(crate) fn new(client: T) -> Self {
        Detached(Some(client))
    }

    /// Takes the client out, to be destroyed by the caller, here.
    fn into_inner(mut self) -> Option<T> {
        self.0.take()
    }
}

impl<T: Send + 'static> std::ops::Deref for Detached<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.0
            .as_ref()
            .expect("a client is present until it is dropped")
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            let spawned = std::thread::Builder::new()
                .name("kafka-close".into())
                .spawn(move || drop(client));
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start a thread to close a Kafka client; leaking it");
            }
        }
    }
}

/// Forwards librdkafka's logs and errors to `tracing`.
#[derive(Clone, Default)]
pub(crate) struct Logged;

impl ClientContext for Logged {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for Logged {}

fn log_librdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(facility, "librdkafka: {message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(facility, "librdkafka: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(facility, "librdkafka: {message}"),
    }
}

pub(crate) fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "conveyor")
        .set_log_level(RDKafkaLogLevel::Warning);
    client
}

fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        // Exactly one copy per send, in order per partition, even across broker retries.
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set(
            "message.timeout.ms",
            config.publish_timeout.as_millis().to_string(),
        )
        .set("linger.ms", "1")
        .set(
            "queue.buffering.max.messages",
            (config.max_in_flight_publishes.max(1) * 2).to_string(),
        );
    for (key, value) in &config.producer_overrides {
        client.set(key, value);
    }
    client
}

fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = client_config(config);
    client
        .set("group.id", &config.group)
        // Offsets move only when conveyor commits the processed watermark.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        )
        // A member hears of a rebalance only in a heartbeat's answer: when another member
        // leaves (a processor stopping), the partitions move after at most one interval. Kafka's
        // 3 s default would make every rolling restart wait that long; conveyor has one member
        // per process, so a heartbeat every 500 ms costs the coordinator little.
        .set(
            "heartbeat.interval.ms",
            (config.session_timeout.as_millis() / 3)
                .clamp(100, HEARTBEAT_MAX.as_millis())
                .to_string(),
        )
        // Bounds what librdkafka prefetches per partition, on top of `max_held`.
        .set("queued.max.messages.kbytes", "16384");
    for (key, value) in &config.consumer_overrides {
        client.set(key, value);
    }
    client
}

/// Checks the passed-through librdkafka settings without connecting: an unknown key or a bad
/// value is named, and which of the two lists it came from.
pub fn check_settings(config: &KafkaConfig) -> Result<(), String> {
    producer_config(config)
        .create_native_config()
        .map_err(|e| format!("producer settings: {e}"))?;
    consumer_config(config)
        .create_native_config()
        .map_err(|e| format!("consumer settings: {e}"))?;
    Ok(())
}

impl KafkaQueue {
    /// Connects, creates the topic when it is missing, and starts watching the group's lag.
    pub async fn connect(config: KafkaConfig) -> Result<KafkaQueue, String> {
        let producer = FutureProducer::from_config_and_context(&producer_config(&config), Logged)
            .map_err(|e| format!("cannot create the Kafka producer: {e}"))?;
        let mut observer_config = consumer_config(&config);
        observer_config.set("client.id", "conveyor-observer");
        let observer = BaseConsumer::from_config_and_context(&observer_config, Logged)
            .map_err(|e| format!("cannot create the Kafka metadata client: {e}"))?;
        let queue = KafkaQueue {
            inner: Arc::new(Inner {
                dedupe: Mutex::new(DedupeWindow::new(config.dedupe_window)),
                in_flight: Arc::new(Semaphore::new(config.max_in_flight_publishes.max(1))),
                config,
                producer: Detached::new(producer),
                observer: Detached::new(observer),
                closed: AtomicBool::new(false),
                counters: Counters::default(),
                view: Mutex::new(BrokerView::default()),
                sent: AtomicU64::new(0),
                sent_at_view: AtomicU64::new(0),
                produced_up_to: Mutex::new(HashMap::new()),
                member: tokio::sync::Mutex::new(None),
            }),
        };
        let topic = queue.inner.config.topic.clone();
        let partitions = queue.inner.config.partitions;
        ensure_topic(&queue.inner, &topic, partitions, Duration::from_secs(30)).await?;
        refresh(&queue.inner).await;
        if let Some(reason) = lock(&queue.inner.view).unhealthy.clone() {
            return Err(reason);
        }
        tokio::spawn(watch_broker(Arc::downgrade(&queue.inner)));
        Ok(queue)
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// The group's lag as last measured, plus what this process sent since.
    fn estimated_lag(&self) -> u64 {
        let view = lock(&self.inner.view);
        let measured: u64 = view
            .partitions
            .iter()
            .map(|p| (p.high - p.resume_at()).max(0) as u64)
            .sum();
        let sent_since = self
            .inner
            .sent
            .load(Ordering::Relaxed)
            .saturating_sub(self.inner.sent_at_view.load(Ordering::Relaxed));
        measured + sent_since
    }

    fn unhealthy(&self) -> Option<String> {
        lock(&self.inner.view).unhealthy.clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded state stays consistent between statements; a panic elsewhere must not
    // stop the queue.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Creates `topic` unless it exists, then waits until it shows its partitions.
///
/// Every role calls this at start-up, and in Kubernetes or compose they all start at once
/// against a fresh broker: they race to create the topic. "Already exists" means another role
/// won; any other refusal (a broker still starting, a creation still in progress) is retried
/// until `within`. Then the topic is verified, not assumed: metadata must show `partitions`
/// partitions (a topic just created can show fewer for a moment). A topic someone made with
/// another partition count is accepted, with a warning, once its count holds steady.
pub(crate) async fn ensure_topic(
    inner: &Arc<Inner>,
    topic: &str,
    partitions: i32,
    within: Duration,
) -> Result<(), String> {
    let wanted = usize::try_from(partitions).unwrap_or(0).max(1);
    let deadline = Instant::now() + within;
    // The partition count last seen and since when, to tell "still appearing" from "different".
    let mut seen: Option<(usize, Instant)> = None;
    let mut last_error = String::new();
    loop {
        match topic_partitions(inner, topic).await {
            Ok(found) if found.len() >= wanted => {
                if found.len() > wanted {
                    tracing::info!(
                        topic,
                        partitions = found.len(),
                        wanted,
                        "topic exists with more partitions; using it as it is"
                    );
                }
                return Ok(());
            }
            Ok(found) if found.is_empty() => match create_topic(inner, topic, partitions).await {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(topic, %error, "cannot create the topic yet; retrying");
                    last_error = error;
                }
            },
            Ok(found) => {
                // Fewer partitions than wanted: still appearing (just created, here or by a
                // racing role), or made by someone with fewer.
                let now = Instant::now();
                match seen {
                    Some((count, since)) if count == found.len() => {
                        if now.duration_since(since) >= Duration::from_secs(2) {
                            tracing::warn!(
                                topic,
                                partitions = found.len(),
                                wanted,
                                "topic has fewer partitions than KAFKA_PARTITIONS; using it as it is"
                            );
                            return Ok(());
                        }
                    }
                    _ => seen = Some((found.len(), now)),
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot reach Kafka yet; retrying");
                last_error = format!("cannot reach Kafka at {}: {error}", inner.config.brokers);
            }
        }
        if Instant::now() >= deadline {
            return Err(if last_error.is_empty() {
                format!(
                    "topic '{topic}' did not appear with its partitions on {} within {within:?}",
                    inner.config.brokers
                )
            } else {
                last_error
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn create_topic(inner: &Arc<Inner>, topic: &str, partitions: i32) -> Result<(), String> {
    let admin: AdminClient<Logged> =
        AdminClient::from_config_and_context(&client_config(&inner.config), Logged)
            .map_err(|e| format!("cannot create the Kafka admin client: {e}"))?;
    let new_topic = NewTopic::new(
        topic,
        partitions,
        TopicReplication::Fixed(inner.config.replication_factor),
    );
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&new_topic], &options)
        .await
        .map_err(|e| format!("cannot create topic '{topic}': {e}"))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("cannot create topic '{name}': {code}")),
        }
    }
    tracing::info!(topic, partitions, "created topic");
    Ok(())
}

/// The topic's partition ids; empty when the topic does not exist.
pub(crate) async fn topic_partitions(inner: &Arc<Inner>, topic: &str) -> Result<Vec<i32>, String> {
    let inner = Arc::clone(inner);
    let topic = topic.to_owned();
    blocking(move || {
        let metadata = inner
            .observer
            .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
            .map_err(|e| e.to_string())?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect())
    })
    .await
}

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| format!("kafka request task failed: {e}"))?
}

async fn refresh(inner: &Arc<Inner>) {
    let sent_before = inner.sent.load(Ordering::Relaxed);
    let measured = {
        let inner = Arc::clone(inner);
        blocking(move || measure(&inner)).await
    };
    let mut view = lock(&inner.view);
    match measured {
        Ok(partitions) => {
            if view.unhealthy.take().is_some() {
                tracing::info!(brokers = %inner.config.brokers, "Kafka reachable again");
            }
            view.partitions = partitions;
            inner.sent_at_view.store(sent_before, Ordering::Relaxed);
        }
        Err(error) => {
            if view.unhealthy.is_none() {
                tracing::warn!(brokers = %inner.config.brokers, %error, "Kafka unreachable");
            }
            view.unhealthy = Some(format!(
                "Kafka at {} unreachable: {error}",
                inner.config.brokers
            ));
        }
    }
}

fn measure(inner: &Inner) -> Result<Vec<PartitionOffsets>, String> {
    let topic = &inner.config.topic;
    let metadata = inner
        .observer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(|e| e.to_string())?;
    let ids: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut list = TopicPartitionList::with_capacity(ids.len());
    for id in &ids {
        list.add_partition(topic, *id);
    }
    let committed = inner
        .observer
        .committed_offsets(list, REQUEST_TIMEOUT)
        .map_err(|e| e.to_string())?;
    ids.into_iter()
        .map(|partition| {
            let (low, high) = inner
                .observer
                .fetch_watermarks(topic, partition, REQUEST_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let committed =
                committed
                    .find_partition(topic, partition)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
            let produced = lock(&inner.produced_up_to)
                .get(&partition)
                .copied()
                .unwrap_or(0);
            Ok(PartitionOffsets {
                partition,
                low,
                high: high.max(produced).max(committed.unwrap_or(0)),
                committed,
            })
        })
        .collect()
}

/// Keeps the broker view fresh while the queue lives.
async fn watch_broker(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(REFRESH_INTERVAL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        refresh(&inner).await;
    }
}

/// The record key for an event, per the configured partition key.
fn record_key(key: PartitionKey, event: &Event) -> Option<&[u8]> {
    match key {
        PartitionKey::Source => Some(event.source.as_bytes()),
        PartitionKey::Id => Some(event.id.as_bytes()),
        PartitionKey::None => None,
    }
}

fn publish_error(error: &KafkaError) -> PublishError {
    match error {
        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => PublishError::Full,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut) => {
            PublishError::Unavailable("no delivery report from Kafka in time".into())
        }
        other => PublishError::Unavailable(other.to_string()),
    }
}

#[async_trait]
impl Publisher for KafkaQueue {
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        let count = events.len();
        if self.inner.closed.load(Ordering::Acquire) {
            return vec![Err(PublishError::Closed); count];
        }
        if let Some(reason) = self.unhealthy() {
            return vec![Err(PublishError::Unavailable(reason)); count];
        }
        let config = &self.inner.config;
        let mut results: Vec<Option<Result<Published, PublishError>>> = vec![None; count];
        // Capacity and dedupe decided for the whole batch under one look at each.
        let mut to_send = Vec::with_capacity(count);
        {
            let mut lag = self.estimated_lag();
            let mut dedupe = lock(&self.inner.dedupe);
            for (index, event) in events.into_iter().enumerate() {
                if config.capacity > 0 && lag >= config.capacity {
                    results[index] = Some(Err(PublishError::Full));
                } else if !dedupe.insert(&event) {
                    self.inner
                        .counters
                        .duplicates
                        .fetch_add(1, Ordering::Relaxed);
                    results[index] = Some(Ok(Published::Duplicate));
                } else {
                    lag += 1;
                    to_send.push((index, event));
                }
            }
        }
        let mut produced: HashMap<i32, i64> = HashMap::new();
        let mut failed = Vec::new();
        // librdkafka may hold a record past `message.timeout.ms` while the broker is gone;
        // the client's answer must not wait longer than the configured timeout.
        let deadline = Instant::now() + config.publish_timeout;
        let most = config.max_in_flight_publishes.max(1);
        let mut to_send = to_send.into_iter().peekable();
        while to_send.peek().is_some() {
            let chunk: Vec<(usize, Event)> = to_send.by_ref().take(most).collect();
            // One permit per record in flight, taken for the chunk at once.
            let Ok(_permits) = Arc::clone(&self.inner.in_flight)
                .acquire_many_owned(chunk.len() as u32)
                .await
            else {
                for (index, event) in chunk {
                    failed.push(event);
                    results[index] = Some(Err(PublishError::Closed));
                }
                continue;
            };
            let mut waiting = Vec::with_capacity(chunk.len());
            let mut reports = Vec::with_capacity(chunk.len());
            for (index, event) in chunk {
                let payload = conveyor_proto::event_to_wire(event.clone()).encode_to_vec();
                let headers = OwnedHeaders::new().insert(Header {
                    key: ENCODING_HEADER,
                    value: Some("proto"),
                });
                let mut record = FutureRecord::<[u8], [u8]>::to(&config.topic)
                    .payload(&payload)
                    .headers(headers);
                if let Some(key) = record_key(config.partition_key, &event) {
                    record = record.key(key);
                }
                match self.inner.producer.send_result(record) {
                    Ok(report) => {
                        waiting.push((index, event));
                        reports.push(report);
                    }
                    Err((error, _)) => {
                        results[index] = Some(Err(publish_error(&error)));
                        failed.push(event);
                    }
                }
            }
            self.inner
                .sent
                .fetch_add(reports.len() as u64, Ordering::Relaxed);
            // Every record of the chunk is on its way; now wait for the delivery reports, all
            // under one deadline.
            let mut reported = Vec::with_capacity(reports.len());
            let _ = tokio::time::timeout_at(deadline, async {
                for report in reports {
                    reported.push(report.await);
                }
            })
            .await;
            let mut reported = reported.into_iter();
            for (index, event) in waiting {
                let outcome = match reported.next() {
                    Some(Ok(Ok(delivered))) => {
                        let next = produced.entry(delivered.partition).or_default();
                        *next = (*next).max(delivered.offset + 1);
                        Ok(Published::Stored)
                    }
                    Some(Ok(Err((error, _)))) => Err(publish_error(&error)),
                    Some(Err(_canceled)) => Err(PublishError::Unavailable(
                        "the Kafka producer went away".into(),
                    )),
                    None => Err(PublishError::Unavailable(format!(
                        "no delivery report from Kafka within {:?}",
                        config.publish_timeout
                    ))),
                };
                if outcome.is_err() {
                    failed.push(event);
                }
                results[index] = Some(outcome);
            }
        }
        // A failed publish must not make the client's retry look like a duplicate.
        if !failed.is_empty() {
            let mut dedupe = lock(&self.inner.dedupe);
            for event in &failed {
                dedupe.forget(event);
            }
        }
        if !produced.is_empty() {
            let mut up_to = lock(&self.inner.produced_up_to);
            for (partition, next) in produced {
                let known = up_to.entry(partition).or_default();
                *known = (*known).max(next);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(PublishError::Closed)))
            .collect()
    }

    async fn health(&self) -> Health {
        if self.inner.closed.load(Ordering::Acquire) {
            return Health::Unhealthy("closed for publishing (shutting down)".into());
        }
        if let Some(reason) = self.unhealthy() {
            return Health::Unhealthy(reason);
        }
        // A stalled group is this processor's problem to report (its `/ready`); publishing
        // still works, which is why `publish` looks at the broker view only.
        let member = self.inner.member.lock().await.clone();
        match member.and_then(|m| m.stalled()) {
            Some(reason) => Health::Unhealthy(reason),
            None => Health::Healthy,
        }
    }
}

#[async_trait]
impl Queue for KafkaQueue {
    async fn subscribe(&self) -> Result<Box<dyn Consumer>, QueueError> {
        let mut member = self.inner.member.lock().await;
        let member = match member.as_ref() {
            Some(existing) => Arc::clone(existing),
            None => {
                let started = Member::join(&self.inner).map_err(QueueError::Unavailable)?;
                *member = Some(Arc::clone(&started));
                started
            }
        };
        Ok(Box::new(KafkaConsumer {
            member,
            queue: Arc::clone(&self.inner),
        }))
    }

    async fn stats(&self) -> QueueStats {
        // The broker view is at most one refresh interval old (`watch_broker`): a status
        // scrape does not cost the broker a round of metadata and offset requests.
        let view = lock(&self.inner.view).clone();
        let member = self.inner.member.lock().await.clone();
        let local = member.as_ref().map(|m| m.positions()).unwrap_or_default();
        let mut partitions = Vec::with_capacity(view.partitions.len());
        let (mut unfinished, mut held) = (0u64, 0u64);
        for offsets in &view.partitions {
            let mine = local.get(&offsets.partition);
            let committed = mine
                .and_then(|m| m.position)
                .unwrap_or_else(|| offsets.resume_at());
            // What this member received is in the partition too.
            let high = offsets
                .high
                .max(mine.and_then(|m| m.received_up_to).unwrap_or(0));
            let lag = (high - committed).max(0) as u64;
            let in_flight = mine.map_or(0, |m| m.held);
            unfinished += lag.saturating_sub(mine.map_or(0, |m| m.finished_above));
            held += in_flight;
            partitions.push(PartitionStats {
                partition: offsets.partition,
                high_watermark: high,
                committed,
                lag,
                in_flight,
            });
        }
        let counters = &self.inner.counters;
        QueueStats {
            backend: "kafka".into(),
            durable: true,
            size: unfinished.saturating_sub(held),
            in_flight: held,
            capacity: self.inner.config.capacity,
            published: partitions
                .iter()
                .map(|p| p.high_watermark.max(0) as u64)
                .sum(),
            duplicates: counters.duplicates.load(Ordering::Relaxed),
            acked: counters.acked.load(Ordering::Relaxed),
            nacked: counters.nacked.load(Ordering::Relaxed),
            terminated: counters.terminated.load(Ordering::Relaxed),
            redelivered: counters.redelivered.load(Ordering::Relaxed),
            partitions,
            group: member.map(|m| {
                let mut assigned: Vec<i32> = local.keys().copied().collect();
                assigned.sort_unstable();
                GroupMemberStats {
                    assigned,
                    stalled: m.stalled().is_some(),
                    stalls: counters.stalls.load(Ordering::Relaxed),
                }
            }),
            ..QueueStats::default()
        }
    }

    fn durable(&self) -> bool {
        true
    }

    async fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
    }

    async fn shutdown(&self) {
        let member = self.inner.member.lock().await.take();
        let inner = Arc::clone(&self.inner);
        let timeout = self.inner.config.close_timeout;
        // librdkafka can block while it commits and leaves the group (or flushes to a broker
        // that is gone): do it on a thread of its own, and stop waiting after `close_timeout`.
        let (done, finished) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            if let Some(member) = member {
                member.leave();
            }
            if let Err(error) = inner.producer.flush(timeout) {
                tracing::warn!(%error, "Kafka producer flush on shutdown");
            }
            let _ = done.send(());
        });
        if tokio::time::timeout(timeout + Duration::from_secs(1), finished)
            .await
            .is_err()
        {
            tracing::warn!(
                ?timeout,
                "Kafka client did not close in time; exiting without waiting for it"
            );
        }
    }
}

/// This process's member of the consumer group: one librdkafka consumer whose messages every
/// worker's [`KafkaConsumer`] takes from a shared buffer.
struct Member {
    consumer: Detached<StreamConsumer<GroupContext>>,
    shared: Arc<Shared>,
    topic: String,
    group: String,
    max_held: usize,
    stop: watch::Sender<bool>,
    /// Why the group is stalled ([`crate::stall`]), while it is.
    stalled: Mutex<Option<String>>,
}

/// What the member's tasks, its rebalance callbacks and its deliveries share.
struct Shared {
    state: Mutex<State>,
    /// Woken when events become ready.
    ready: Notify,
    /// Woken when held events finish: the receiver may take more.
    room: Notify,
}

#[derive(Default)]
struct State {
    /// The partitions assigned to this member now.
    owned: HashMap<i32, Owned>,
    ready: VecDeque<Held>,
    delayed: BinaryHeap<Reverse<Delayed>>,
    /// Numbers each assignment of a partition, so a delivery from an earlier one is known.
    generations: u64,
}

struct Owned {
    generation: u64,
    watermark: Watermark,
}

/// An event this member holds: delivered, ready, or waiting out a retry delay.
struct Held {
    partition: i32,
    offset: i64,
    generation: u64,
    event: Event,
    /// Deliveries so far.
    deliveries: u32,
}

struct Delayed {
    due: Instant,
    held: Held,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.due.cmp(&other.due)
    }
}

impl State {
    fn is_current(&self, held: &Held) -> bool {
        self.owned
            .get(&held.partition)
            .is_some_and(|o| o.generation == held.generation)
    }

    fn held(&self) -> usize {
        self.owned.values().map(|o| o.watermark.held()).sum()
    }

    fn promote_due(&mut self, now: Instant) {
        while self.delayed.peek().is_some_and(|Reverse(d)| d.due <= now) {
            if let Some(Reverse(delayed)) = self.delayed.pop() {
                self.ready.push_back(delayed.held);
            }
        }
    }

    /// Positions to commit now: those that moved since the last commit.
    fn commits(&mut self, topic: &str) -> Option<TopicPartitionList> {
        let mut list = TopicPartitionList::new();
        for (partition, owned) in &mut self.owned {
            if let Some(position) = owned.watermark.take_commit() {
                let _ = list.add_partition_offset(topic, *partition, Offset::Offset(position));
            }
        }
        (list.count() > 0).then_some(list)
    }
}

/// Per-partition figures of what this member holds, for `stats`.
#[derive(Default, Clone, Copy)]
struct LocalPosition {
    position: Option<i64>,
    held: u64,
    finished_above: u64,
    received_up_to: Option<i64>,
}

/// Receives rebalances: commits what is done in revoked partitions and forgets their work.
struct GroupContext {
    shared: Arc<Shared>,
    topic: String,
}

impl ClientContext for GroupContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        log_librdkafka(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let mut commits = TopicPartitionList::new();
        let mut handed_out = 0usize;
        let dropped;
        {
            let mut state = lock(&self.shared.state);
            for element in revoked.elements_for_topic(&self.topic) {
                let partition = element.partition();
                if let Some(owned) = state.owned.remove(&partition) {
                    if let Some(position) = owned.watermark.position() {
                        let _ = commits.add_partition_offset(
                            &self.topic,
                            partition,
                            Offset::Offset(position),
                        );
                    }
                    handed_out += owned.watermark.held();
                }
            }
            let before = state.ready.len() + state.delayed.len();
            let owned = std::mem::take(&mut state.owned);
            state.ready.retain(|h| {
                owned
                    .get(&h.partition)
                    .is_some_and(|o| o.generation == h.generation)
            });
            state.delayed.retain(|Reverse(d)| {
                owned
                    .get(&d.held.partition)
                    .is_some_and(|o| o.generation == d.held.generation)
            });
            state.owned = owned;
            dropped = before - state.ready.len() - state.delayed.len();
        }
        if commits.count() > 0
            && !consumer.assignment_lost()
            && let Err(error) = consumer.commit(&commits, CommitMode::Sync)
        {
            tracing::warn!(%error, "commit on revoke failed; the new owner redelivers from the last commit");
        }
        tracing::info!(
            partitions = revoked.count(),
            held = handed_out,
            buffered_dropped = dropped,
            "partitions revoked: what was done is committed, the rest goes to their new owner"
        );
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                let mut state = lock(&self.shared.state);
                for element in assigned.elements_for_topic(&self.topic) {
                    state.generations += 1;
                    let generation = state.generations;
                    state.owned.insert(
                        element.partition(),
                        Owned {
                            generation,
                            watermark: Watermark::default(),
                        },
                    );
                }
                tracing::info!(partitions = assigned.count(), "partitions assigned");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(error) = result {
            tracing::warn!(%error, "offset commit failed; it is retried with the next progress");
        }
    }
}

impl Member {
    fn join(inner: &Arc<Inner>) -> Result<Arc<Member>, String> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            ready: Notify::new(),
            room: Notify::new(),
        });
        let topic = inner.config.topic.clone();
        let context = GroupContext {
            shared: Arc::clone(&shared),
            topic: topic.clone(),
        };
        let consumer: StreamConsumer<GroupContext> =
            StreamConsumer::from_config_and_context(&consumer_config(&inner.config), context)
                .map_err(|e| format!("cannot create the Kafka consumer: {e}"))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| format!("cannot subscribe to topic '{topic}': {e}"))?;
        let (stop, stopped) = watch::channel(false);
        let member = Arc::new(Member {
            consumer: Detached::new(consumer),
            shared,
            topic,
            group: inner.config.group.clone(),
            max_held: inner.config.max_held.max(1),
            stop,
            stalled: Mutex::new(None),
        });
        tokio::spawn(Arc::clone(&member).receive(stopped.clone()));
        tokio::spawn(Arc::clone(&member).watch_group(
            Arc::downgrade(inner),
            StallWatch::new(inner.config.session_timeout * 2),
            stopped.clone(),
        ));
        tokio::spawn(
            Arc::clone(&member).commit_periodically(inner.config.commit_interval, stopped),
        );
        Ok(member)
    }

    /// Moves messages from librdkafka into the shared buffer. While this member holds
    /// `max_held` events it stops taking more: librdkafka's prefetch queue is bounded
    /// (`queued.max.messages.kbytes`) and fills up, then fetching stops by itself. (Not
    /// pause/resume: resuming refetches from inside a record batch, which some brokers answer
    /// with the next batch, skipping records; and librdkafka's `max.poll.interval.ms` still
    /// removes a member whose workers are stuck for good.)
    async fn receive(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            while lock(&self.shared.state).held() >= self.max_held {
                tokio::select! {
                    _ = tokio::time::timeout(Duration::from_millis(100), self.shared.room.notified()) => {}
                    _ = stop.changed() => return,
                }
            }
            let message = tokio::select! {
                message = self.consumer.recv() => message,
                _ = stop.changed() => return,
            };
            match message {
                Ok(message) => self.take(&message),
                Err(error) => {
                    tracing::warn!(%error, "Kafka receive failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn take(&self, message: &BorrowedMessage<'_>) {
        let event = decode(message);
        {
            let mut state = lock(&self.shared.state);
            let Some(owned) = state.owned.get_mut(&message.partition()) else {
                // A message of a partition revoked in the meantime: its new owner gets it.
                return;
            };
            owned.watermark.received(message.offset());
            let generation = owned.generation;
            state.ready.push_back(Held {
                partition: message.partition(),
                offset: message.offset(),
                generation,
                event,
                deliveries: 0,
            });
        }
        self.shared.ready.notify_waiters();
    }

    async fn commit_periodically(
        self: Arc<Self>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let commits = lock(&self.shared.state).commits(&self.topic);
            if let Some(commits) = commits
                && let Err(error) = self.consumer.commit(&commits, CommitMode::Async)
            {
                tracing::warn!(%error, "offset commit failed; retried with the next progress");
            }
        }
    }

    /// Watches for partitions the group leaves unconsumed ([`crate::stall`]): says so (log,
    /// counter, stats, health) and rejoins the group with a fresh member id, which makes the
    /// coordinator compute the assignment again from the members it knows are alive.
    async fn watch_group(
        self: Arc<Self>,
        queue: Weak<Inner>,
        mut watch: StallWatch,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(REFRESH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let Some(inner) = queue.upgrade() else {
                return;
            };
            let observed: Vec<Observed> = {
                let view = lock(&inner.view);
                if view.unhealthy.is_some() {
                    // Nobody's commits move while the broker is away: not the group's fault.
                    continue;
                }
                view.partitions
                    .iter()
                    .map(|p| Observed {
                        partition: p.partition,
                        resume_at: p.resume_at(),
                        lag: (p.high - p.resume_at()).max(0) as u64,
                    })
                    .collect()
            };
            let owned: HashSet<i32> = lock(&self.shared.state).owned.keys().copied().collect();
            match watch.observe(Instant::now(), &observed, &owned) {
                Verdict::Fine => {
                    if lock(&self.stalled).take().is_some() {
                        tracing::info!(
                            "consumer group no longer stalled: the partitions are consumed again"
                        );
                    }
                }
                Verdict::Stalled(stuck) => {
                    *lock(&self.stalled) = Some(stall_reason(&stuck, watch.window()));
                }
                Verdict::Rejoin(stuck) => {
                    let reason = stall_reason(&stuck, watch.window());
                    inner.counters.stalls.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        owned = owned.len(),
                        partitions = observed.len(),
                        "{reason}; rejoining the group"
                    );
                    *lock(&self.stalled) = Some(reason);
                    drop(inner);
                    let member = Arc::clone(&self);
                    let rejoined = blocking(move || member.rejoin()).await;
                    if let Err(error) = rejoined {
                        tracing::warn!(%error, "rejoining the consumer group failed; retried after the next window");
                    }
                }
            }
        }
    }

    /// Leaves the group and joins it again: librdkafka drops its member id on leaving, so the
    /// coordinator sees a new member and rebalances. What was done is committed on the revoke.
    fn rejoin(&self) -> Result<(), String> {
        // Who the coordinator thinks is in the group: with a coordinator that keeps dead
        // members, the operator sees them named here.
        match self
            .consumer
            .fetch_group_list(Some(&self.group), REQUEST_TIMEOUT)
        {
            Ok(list) => {
                for group in list.groups() {
                    let members: Vec<String> = group
                        .members()
                        .iter()
                        .map(|m| format!("{} ({} at {})", m.id(), m.client_id(), m.client_host()))
                        .collect();
                    tracing::warn!(
                        group = group.name(),
                        state = group.state(),
                        members = members.len(),
                        "the coordinator lists these members: {}",
                        members.join(", ")
                    );
                }
            }
            Err(error) => tracing::debug!(%error, "cannot describe the group"),
        }
        self.consumer.unsubscribe();
        self.consumer
            .subscribe(&[&self.topic])
            .map_err(|e| format!("cannot subscribe to topic '{}' again: {e}", self.topic))
    }

    fn stalled(&self) -> Option<String> {
        lock(&self.stalled).clone()
    }

    fn positions(&self) -> HashMap<i32, LocalPosition> {
        let state = lock(&self.shared.state);
        state
            .owned
            .iter()
            .map(|(partition, owned)| {
                (
                    *partition,
                    LocalPosition {
                        position: owned.watermark.position(),
                        held: owned.watermark.held() as u64,
                        finished_above: owned.watermark.finished_above_position(),
                        received_up_to: owned.watermark.received_up_to(),
                    },
                )
            })
            .collect()
    }

    /// Commits the watermark of every partition and leaves the group. Blocking.
    fn leave(self: Arc<Self>) {
        let _ = self.stop.send(true);
        let mut commits = TopicPartitionList::new();
        {
            let state = lock(&self.shared.state);
            for (partition, owned) in &state.owned {
                if let Some(position) = owned.watermark.position() {
                    let _ = commits.add_partition_offset(
                        &self.topic,
                        *partition,
                        Offset::Offset(position),
                    );
                }
            }
        }
        if commits.count() > 0
            && let Err(error) = self.consumer.commit(&commits, CommitMode::Sync)
        {
            tracing::warn!(%error, "final offset commit failed; the group redelivers from the last commit");
        }
        self.consumer.unsubscribe();
        // Let the tasks see the stop and let go, so the consumer closes here, on this thread,
        // and not inside a task on the runtime.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while Arc::strong_count(&self) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Close here, so the group hears this member leave (and reassigns its partitions at
        // once instead of after the session timeout); the caller bounds how long it waits.
        if let Ok(member) = Arc::try_unwrap(self) {
            drop(member.consumer.into_inner());
        }
    }
}

/// One worker's view of the member: takes from the shared buffer.
struct KafkaConsumer {
    member: Arc<Member>,
    queue: Arc<Inner>,
}

impl KafkaConsumer {
    fn take_ready(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let mut state = lock(&self.member.shared.state);
        state.promote_due(Instant::now());
        let mut deliveries = Vec::with_capacity(max.min(state.ready.len()));
        while deliveries.len() < max {
            let Some(mut held) = state.ready.pop_front() else {
                break;
            };
            if !state.is_current(&held) {
                continue;
            }
            held.deliveries += 1;
            if held.deliveries > 1 {
                self.queue
                    .counters
                    .redelivered
                    .fetch_add(1, Ordering::Relaxed);
            }
            let mut event = held.event.clone();
            event.attempt = held.deliveries;
            deliveries.push(Delivery::new(
                event,
                Box::new(KafkaDelivery {
                    member: Arc::clone(&self.member),
                    queue: Arc::clone(&self.queue),
                    held: Some(held),
                }),
            ));
        }
        let next_due = state.delayed.peek().map(|Reverse(d)| d.due);
        (deliveries, next_due)
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError> {
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.member.shared.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (deliveries, next_due) = self.take_ready(max);
            if !deliveries.is_empty() {
                return Ok(deliveries);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = next_due.map_or(deadline, |due| due.min(deadline));
            let _ = tokio::time::timeout_at(until, notified).await;
        }
    }
}

struct KafkaDelivery {
    member: Arc<Member>,
    queue: Arc<Inner>,
    held: Option<Held>,
}

impl KafkaDelivery {
    fn finish(&mut self, settlement: Option<Settlement>) {
        let Some(held) = self.held.take() else {
            return;
        };
        let counters = &self.queue.counters;
        let member = &self.member;
        {
            let mut state = lock(&member.shared.state);
            if !state.is_current(&held) {
                counters.stale.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match settlement {
                Some(Settlement::Ack) | Some(Settlement::Term) => {
                    if let Some(owned) = state.owned.get_mut(&held.partition) {
                        owned.watermark.finished(held.offset);
                    }
                    let counter = if settlement == Some(Settlement::Ack) {
                        &counters.acked
                    } else {
                        &counters.terminated
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Some(Settlement::Nack { delay }) => {
                    counters.nacked.fetch_add(1, Ordering::Relaxed);
                    state.delayed.push(Reverse(Delayed {
                        due: Instant::now() + delay,
                        held,
                    }));
                }
                // Dropped unsettled: its worker went away; deliver it again first.
                None => state.ready.push_front(held),
            }
        }
        member.shared.ready.notify_waiters();
        member.shared.room.notify_one();
    }
}

#[async_trait]
impl DeliveryHandle for KafkaDelivery {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), QueueError> {
        self.finish(Some(settlement));
        Ok(())
    }
}

impl Drop for KafkaDelivery {
    fn drop(&mut self) {
        self.finish(None);
    }
}

/// Names the stuck partitions, their lag and the window, for the log, `/ready` and `/stats`.
fn stall_reason(stuck: &[Stuck], window: Duration) -> String {
    let partitions: Vec<String> = stuck
        .iter()
        .map(|s| format!("{} (lag {})", s.partition, s.lag))
        .collect();
    format!(
        "consumer group stalled: partitions {} have lag and no member committed on them for {}s \
         (twice the session timeout)",
        partitions.join(", "),
        window.as_secs()
    )
}

/// Reads a record as an event: ours (protobuf) or a plain Kafka producer's (raw payload).
fn decode(message: &BorrowedMessage<'_>) -> Event {
    let ours = message.headers().is_some_and(|headers| {
        headers
            .iter()
            .any(|h| h.key == ENCODING_HEADER && h.value == Some(b"proto".as_slice()))
    });
    let payload = message.payload().unwrap_or_default();
    if ours && let Ok(wire) = v1::Event::decode(payload) {
        return conveyor_proto::event_from_wire(wire);
    }
    let payload = Bytes::copy_from_slice(payload);
    Event {
        id: format!(
            "kafka-{}-{}-{}",
            message.topic(),
            message.partition(),
            message.offset()
        )
        .into(),
        source: message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or(message.topic())
            .into(),
        timestamp_ms: conveyor_core::now_ms(),
        content_type: if matches!(
            payload.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{') | Some(b'[')
        ) {
            ContentType::Json
        } else {
            ContentType::Binary
        },
        payload,
        metadata: Default::default(),
        attempt: 0,
        headers: Default::default(),
    }
}

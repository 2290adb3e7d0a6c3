//! The queue conformance suite: the contract in `lib.rs`, as tests, written once for every
//! backend.
//!
//! A backend's test module instantiates it with [`conformance_suite!`](crate::conformance_suite),
//! passing a factory that builds a fresh, empty queue of the given capacity (a new stream or
//! topic for a broker). Each case is its own `#[tokio::test]`, so a failure names the broken
//! promise.
//!
//! Backends with a redelivery timer (NATS AckWait, Kafka session) must configure it short in the
//! factory: the restart case waits at most [`REDELIVERY_TIMEOUT`].

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use conveyor_core::{ContentType, Event};

use crate::{Consumer, Delivery, PublishError, Published, Queue};

/// How long a case waits for an event it expects.
pub const REDELIVERY_TIMEOUT: Duration = Duration::from_secs(15);

/// A queue that keeps something alive as long as it lives: the broker fixture a factory
/// started for one test, so the broker is stopped when the test ends, pass or fail.
pub struct Guarded {
    pub queue: Box<dyn Queue>,
    pub guard: Box<dyn std::any::Any + Send + Sync>,
}

#[async_trait::async_trait]
impl crate::Publisher for Guarded {
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        self.queue.publish(events).await
    }

    async fn health(&self) -> crate::Health {
        self.queue.health().await
    }
}

#[async_trait::async_trait]
impl Queue for Guarded {
    async fn subscribe(&self) -> Result<Box<dyn Consumer>, crate::QueueError> {
        self.queue.subscribe().await
    }

    async fn stats(&self) -> conveyor_core::stats::QueueStats {
        self.queue.stats().await
    }

    fn durable(&self) -> bool {
        self.queue.durable()
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        self.queue.keep_alive_interval()
    }

    async fn close(&self) {
        self.queue.close().await
    }

    async fn shutdown(&self) {
        self.queue.shutdown().await
    }
}

/// A test event with the given id.
pub fn event(id: &str) -> Event {
    Event {
        id: id.into(),
        source: "conformance".into(),
        timestamp_ms: 1,
        payload: Bytes::from(format!("{{\"id\":\"{id}\"}}")),
        content_type: ContentType::Json,
        metadata: BTreeMap::from([("case".to_owned(), "conformance".to_owned())]).into(),
        attempt: 0,
        headers: BTreeMap::new(),
    }
}

fn events(prefix: &str, n: usize) -> Vec<Event> {
    (0..n).map(|i| event(&format!("{prefix}-{i}"))).collect()
}

async fn publish_all(queue: &dyn Queue, events: Vec<Event>) {
    for (i, result) in queue.publish(events).await.into_iter().enumerate() {
        assert_eq!(result, Ok(Published::Stored), "publish #{i} was not stored");
    }
}

/// Fetches until `n` deliveries arrived or `timeout` passed.
pub async fn fetch_n(consumer: &mut dyn Consumer, n: usize, timeout: Duration) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let batch = consumer
            .fetch(n - got.len(), left.min(Duration::from_millis(500)))
            .await
            .expect("fetch");
        got.extend(batch);
    }
    got
}

/// Asserts that nothing is delivered within `quiet`.
async fn assert_quiet(consumer: &mut dyn Consumer, quiet: Duration, why: &str) {
    let extra = consumer.fetch(10, quiet).await.expect("fetch");
    assert!(
        extra.is_empty(),
        "{why}: got {:?}",
        extra
            .iter()
            .map(|d| format!("{} (attempt {})", d.event.id, d.event.attempt))
            .collect::<Vec<_>>()
    );
}

fn sorted_ids(deliveries: &[Delivery]) -> Vec<String> {
    let mut ids: Vec<String> = deliveries.iter().map(|d| d.event.id.to_string()).collect();
    ids.sort();
    ids
}

pub async fn send_receive<F, Fut>(factory: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn Queue>>,
{
    let queue = factory(1000).await;
    let sent = events("sr", 200);
    let mut expected: Vec<String> = sent.iter().map(|e| e.id.to_string()).collect();
    expected.sort();
    publish_all(queue.as_ref(), sent.clone()).await;
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let got = fetch_n(consumer.as_mut(), 200, REDELIVERY_TIMEOUT).await;
    assert_eq!(
        sorted_ids(&got),
        expected,
        "every published event is delivered once"
    );
    for delivery in &got {
        let original = sent
            .iter()
            .find(|e| e.id == delivery.event.id)
            .expect("known id");
        assert_eq!(delivery.event.attempt, 1, "first delivery has attempt 1");
        assert_eq!(delivery.event.payload, original.payload, "payload intact");
        assert_eq!(
            delivery.event.metadata, original.metadata,
            "metadata intact"
        );
        assert_eq!(delivery.event.source, original.source);
    }
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
    assert_quiet(
        consumer.as_mut(),
        Duration::from_millis(500),
        "acked events came back",
    )
    .await;
}

pub async fn nack_then_redelivery<F, Fut>(factory: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn Queue>>,
{
    let queue = factory(100).await;
    publish_all(queue.as_ref(), vec![event("nack-1")]).await;
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let first = fetch_n(consumer.as_mut(), 1, REDELIVERY_TIMEOUT).await;
    assert_eq!(sorted_ids(&first), ["nack-1"]);
    let delay = Duration::from_millis(700);
    let nacked_at = tokio::time::Instant::now();
    first
        .into_iter()
        .next()
        .expect("one")
        .nack(delay)
        .await
        .expect("nack");
    assert_quiet(
        consumer.as_mut(),
        Duration::from_millis(200),
        "redelivered before its delay",
    )
    .await;
    let again = fetch_n(consumer.as_mut(), 1, REDELIVERY_TIMEOUT).await;
    assert_eq!(
        sorted_ids(&again),
        ["nack-1"],
        "a nacked event is delivered again"
    );
    assert!(nacked_at.elapsed() >= delay, "the delay was respected");
    assert_eq!(again[0].event.attempt, 2, "the attempt count grew");
    again
        .into_iter()
        .next()
        .expect("one")
        .ack()
        .await
        .expect("ack");
    assert_quiet(
        consumer.as_mut(),
        Duration::from_millis(500),
        "acked event came back",
    )
    .await;
}

pub async fn unacked_redelivered_after_consumer_restart<F, Fut>(factory: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn Queue>>,
{
    let queue = factory(100).await;
    publish_all(queue.as_ref(), events("restart", 10)).await;
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let mut got = fetch_n(consumer.as_mut(), 10, REDELIVERY_TIMEOUT).await;
    assert_eq!(got.len(), 10);
    got.sort_by(|a, b| a.event.id.cmp(&b.event.id));
    let unacked = got.split_off(5);
    let expected = sorted_ids(&unacked);
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
    // The consumer "crashes": its unsettled deliveries and the consumer itself are gone.
    drop(unacked);
    drop(consumer);
    let mut consumer = queue.subscribe().await.expect("resubscribe");
    let again = fetch_n(consumer.as_mut(), 5, REDELIVERY_TIMEOUT).await;
    assert_eq!(
        sorted_ids(&again),
        expected,
        "exactly the unacked events come back"
    );
    assert!(
        again.iter().all(|d| d.event.attempt >= 2),
        "marked as redeliveries"
    );
    for delivery in again {
        delivery.ack().await.expect("ack");
    }
    assert_quiet(
        consumer.as_mut(),
        Duration::from_millis(500),
        "acked events came back",
    )
    .await;
}

pub async fn term_is_final<F, Fut>(factory: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn Queue>>,
{
    let queue = factory(100).await;
    publish_all(queue.as_ref(), vec![event("term-1")]).await;
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let got = fetch_n(consumer.as_mut(), 1, REDELIVERY_TIMEOUT).await;
    got.into_iter()
        .next()
        .expect("one")
        .term()
        .await
        .expect("term");
    assert_quiet(
        consumer.as_mut(),
        Duration::from_secs(1),
        "a terminated event came back",
    )
    .await;
}

pub async fn saturation_then_recovery<F, Fut>(factory: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn Queue>>,
{
    let queue = factory(10).await;
    publish_all(queue.as_ref(), events("sat", 10)).await;
    let refused = queue.publish(vec![event("sat-over")]).await;
    assert_eq!(
        refused,
        vec![Err(PublishError::Full)],
        "a full queue refuses, it does not grow"
    );
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let got = fetch_n(consumer.as_mut(), 10, REDELIVERY_TIMEOUT).await;
    assert_eq!(
        got.len(),
        10,
        "the refused publish did not displace stored events"
    );
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
    // Room again: publishing recovers without intervention.
    let deadline = tokio::time::Instant::now() + REDELIVERY_TIMEOUT;
    loop {
        match queue.publish(vec![event("sat-after")]).await.remove(0) {
            Ok(Published::Stored) => break,
            Err(PublishError::Full) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("publish after draining: {other:?}"),
        }
    }
    let got = fetch_n(consumer.as_mut(), 1, REDELIVERY_TIMEOUT).await;
    assert_eq!(sorted_ids(&got), ["sat-after"]);
}

pub async fn duplicate_publish_is_stored_once<F, Fut>(factory: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn Queue>>,
{
    let queue = factory(100).await;
    publish_all(queue.as_ref(), vec![event("dup-1")]).await;
    let again = queue.publish(vec![event("dup-1")]).await;
    assert_eq!(again, vec![Ok(Published::Duplicate)]);
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let got = fetch_n(consumer.as_mut(), 1, REDELIVERY_TIMEOUT).await;
    assert_eq!(sorted_ids(&got), ["dup-1"]);
    got.into_iter()
        .next()
        .expect("one")
        .ack()
        .await
        .expect("ack");
    assert_quiet(
        consumer.as_mut(),
        Duration::from_millis(500),
        "a duplicate was delivered",
    )
    .await;
}

pub async fn stats_are_accurate<F, Fut>(factory: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn Queue>>,
{
    let queue = factory(100).await;
    publish_all(queue.as_ref(), events("stats", 20)).await;
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let mut got = fetch_n(consumer.as_mut(), 8, REDELIVERY_TIMEOUT).await;
    assert_eq!(got.len(), 8);
    let to_nack = got.split_off(6);
    for delivery in got {
        delivery.ack().await.expect("ack");
    }
    for delivery in to_nack {
        delivery.nack(Duration::from_secs(60)).await.expect("nack");
    }
    // Brokers report asynchronously: allow the numbers a moment to settle.
    let deadline = tokio::time::Instant::now() + REDELIVERY_TIMEOUT;
    let stats = loop {
        let stats = queue.stats().await;
        if (stats.acked, stats.size + stats.in_flight) == (6, 14)
            || tokio::time::Instant::now() > deadline
        {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stats.published, 20, "published: {stats:?}");
    assert_eq!(stats.acked, 6, "acked: {stats:?}");
    assert_eq!(stats.nacked, 2, "nacked: {stats:?}");
    assert_eq!(stats.size + stats.in_flight, 14, "held: {stats:?}");
}

pub async fn close_refuses_publishes_but_drains<F, Fut>(factory: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Box<dyn Queue>>,
{
    let queue = factory(100).await;
    publish_all(queue.as_ref(), events("close", 3)).await;
    queue.close().await;
    assert_eq!(
        queue.publish(vec![event("close-late")]).await,
        vec![Err(PublishError::Closed)]
    );
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let got = fetch_n(consumer.as_mut(), 3, REDELIVERY_TIMEOUT).await;
    assert_eq!(
        sorted_ids(&got),
        ["close-0", "close-1", "close-2"],
        "held events still drain"
    );
}

/// Instantiates every conformance case as a `#[tokio::test]` for the backend built by
/// `$factory: Fn(usize /* capacity */) -> impl Future<Output = Box<dyn Queue>>`.
#[macro_export]
macro_rules! conformance_suite {
    ($factory:expr) => {
        $crate::conformance_suite!(@cases $factory;
            send_receive,
            nack_then_redelivery,
            unacked_redelivered_after_consumer_restart,
            term_is_final,
            saturation_then_recovery,
            duplicate_publish_is_stored_once,
            stats_are_accurate,
            close_refuses_publishes_but_drains
        );
    };
    (@cases $factory:expr; $($case:ident),*) => {
        $(
            #[tokio::test]
            async fn $case() {
                $crate::conformance::$case($factory).await;
            }
        )*
    };
}

//! The queue conformance suite, and NATS-specific behaviour, against a real `nats-server`
//! started per test.

use std::time::Duration;

use conveyor_queue::conformance::Guarded;
use conveyor_queue::{Publisher, Queue};
use conveyor_testkit::NatsServer;

use crate::{NatsConfig, NatsQueue};

/// A config for a test: short AckWait so "unacked comes back" is observable quickly.
pub(crate) fn test_config(server: &NatsServer, capacity: usize) -> NatsConfig {
    NatsConfig {
        url: server.url(),
        ack_wait: Duration::from_secs(2),
        capacity: capacity as i64,
        file_storage: false,
        ..NatsConfig::default()
    }
}

async fn queue_on_own_server(capacity: usize) -> Box<dyn Queue> {
    let server = NatsServer::start();
    let queue = NatsQueue::connect(test_config(&server, capacity))
        .await
        .expect("connect to the test server");
    Box::new(Guarded {
        queue: Box::new(queue),
        guard: Box::new(server),
    })
}

conveyor_queue::conformance_suite!(queue_on_own_server);

#[tokio::test]
async fn publish_while_the_broker_is_down_fails_fast_and_recovers() {
    let mut server = NatsServer::start();
    // File storage: the stream must survive the broker's crash.
    let config = NatsConfig {
        file_storage: true,
        ..test_config(&server, 100)
    };
    let queue = NatsQueue::connect(config).await.expect("connect");
    server.kill();
    // The client notices the broken connection within its ping interval at worst; publishes
    // must then fail with Unavailable, quickly, not hang.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let started = tokio::time::Instant::now();
        let result = queue
            .publish(vec![conveyor_queue::conformance::event("down-1")])
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "publish hung while the broker was down"
        );
        if matches!(result[0], Err(conveyor_queue::PublishError::Unavailable(_))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishes kept succeeding: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let result = queue
            .publish(vec![conveyor_queue::conformance::event("up-again")])
            .await;
        if result[0].is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {result:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn keep_alive_holds_a_slow_delivery_past_ack_wait() {
    let server = NatsServer::start();
    let queue = NatsQueue::connect(test_config(&server, 100))
        .await
        .expect("connect");
    assert_eq!(
        queue.keep_alive_interval(),
        Some(Duration::from_secs(2) / 3)
    );
    queue
        .publish(vec![conveyor_queue::conformance::event("slow-1")])
        .await;
    let mut first = queue.subscribe().await.expect("subscribe");
    let held =
        conveyor_queue::conformance::fetch_n(first.as_mut(), 1, Duration::from_secs(5)).await;
    assert_eq!(held.len(), 1);
    // A second consumer that would get the event if the broker redelivered it.
    let mut other = queue.subscribe().await.expect("subscribe");
    let (_event, handle) = held.into_iter().next().expect("one").into_parts();
    // Work "takes" 3 x AckWait; in-progress acks keep it from being redelivered meanwhile.
    for _ in 0..9 {
        handle.keep_alive().await.expect("keep alive");
        let stolen = other
            .fetch(1, Duration::from_millis(666))
            .await
            .expect("fetch");
        assert!(stolen.is_empty(), "redelivered while still being worked on");
    }
    handle
        .settle(conveyor_queue::Settlement::Ack)
        .await
        .expect("ack");
}

/// Issue #17, defect 4: the messages a consumer has prefetched but not handed out go to the
/// next consumer as soon as it is released, not after AckWait (30 s here, as in production).
#[tokio::test]
async fn a_released_consumer_gives_its_prefetched_messages_back_at_once() {
    let server = NatsServer::start();
    let config = NatsConfig {
        ack_wait: Duration::from_secs(30),
        fetch_batch: 64,
        ..test_config(&server, 1_000)
    };
    let queue = NatsQueue::connect(config).await.expect("connect");
    let events: Vec<_> = (0..200)
        .map(|i| conveyor_queue::conformance::event(&format!("held-{i:03}")))
        .collect();
    let stored = queue.publish(events).await;
    assert!(stored.iter().all(Result::is_ok), "publish: {stored:?}");
    let mut first = queue.subscribe().await.expect("subscribe");
    let taken =
        conveyor_queue::conformance::fetch_n(first.as_mut(), 1, Duration::from_secs(5)).await;
    assert_eq!(taken.len(), 1);
    // The pull request outstanding for `first` brought the rest of its batch, unstarted.
    let prefetched = eventually_in_flight(&queue, 64).await;
    taken
        .into_iter()
        .next()
        .expect("one")
        .ack()
        .await
        .expect("ack");
    first.release().await;
    let released = tokio::time::Instant::now();
    let mut next = queue.subscribe().await.expect("subscribe");
    let rest =
        conveyor_queue::conformance::fetch_n(next.as_mut(), 199, Duration::from_secs(5)).await;
    let mut ids: Vec<String> = rest.iter().map(|d| d.event.id.to_string()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        199,
        "the next consumer got {} of the 199 unprocessed events within 5 s of the release \
         ({prefetched} were held by the released consumer; AckWait is 30 s)",
        ids.len()
    );
    eprintln!(
        "{prefetched} held, all 199 at the next consumer {:?} after the release",
        released.elapsed()
    );
}

/// Waits until the server counts at least `at_least` deliveries unacknowledged.
async fn eventually_in_flight(queue: &NatsQueue, at_least: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let in_flight = queue.stats().await.in_flight;
        if in_flight >= at_least || tokio::time::Instant::now() > deadline {
            return in_flight;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Several publishes whose batches together ask for more than the in-flight bound, and one
/// batch larger than the bound alone: none may hold part of the bound while waiting for the
/// rest (each would wait for the others, or for itself, for ever).
#[tokio::test]
async fn concurrent_batches_larger_together_than_the_in_flight_bound_all_complete() {
    let server = NatsServer::start();
    let config = NatsConfig {
        max_in_flight_publishes: 100,
        ..test_config(&server, 10_000)
    };
    let queue = NatsQueue::connect(config).await.expect("connect");
    let batches = (0..8).map(|b| {
        let queue = queue.clone();
        async move {
            let size = if b == 0 { 250 } else { 90 };
            let events = (0..size)
                .map(|i| conveyor_queue::conformance::event(&format!("b{b}-{i}")))
                .collect();
            queue.publish(events).await
        }
    });
    let results = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(batches),
    )
    .await
    .expect("the publishes deadlocked on the in-flight bound");
    let stored = results.iter().flatten().filter(|r| r.is_ok()).count();
    assert_eq!(stored, 250 + 7 * 90);
}

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

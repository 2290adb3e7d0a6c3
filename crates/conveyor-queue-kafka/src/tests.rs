//! The queue conformance suite against librdkafka's in-process MockCluster and against a real
//! Kafka-protocol broker (tansu), plus Kafka-specific behaviour: rebalances, the DLQ topic,
//! dual-write through a composite queue.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use conveyor_queue::composite::{CompositeQueue, Strategy};
use conveyor_queue::conformance::{Guarded, event, fetch_n};
use conveyor_queue::dlq::{DeadLetter, DeadLetterQueue};
use conveyor_queue::{MemoryQueue, MemoryQueueConfig, Publisher, Queue};
use conveyor_testkit::KafkaBroker;

use crate::{KafkaConfig, KafkaDeadLetters, KafkaQueue, MockKafka};

static TOPICS: AtomicUsize = AtomicUsize::new(0);

/// A config with its own topic, group and DLQ topic; short timers so rebalances and
/// redeliveries are observable quickly.
fn test_config(brokers: String, capacity: usize) -> KafkaConfig {
    let n = TOPICS.fetch_add(1, Ordering::Relaxed);
    let unique = format!("{}-{n}", std::process::id());
    KafkaConfig {
        brokers,
        topic: format!("events-{unique}"),
        group: format!("group-{unique}"),
        dlq_topic: format!("dlq-{unique}"),
        partitions: 3,
        capacity: capacity as u64,
        commit_interval: Duration::from_millis(50),
        session_timeout: Duration::from_secs(6),
        ..KafkaConfig::default()
    }
}

async fn on_mock(capacity: usize) -> (KafkaQueue, MockKafka) {
    let probe = test_config(String::new(), capacity);
    let mock = MockKafka::start(&[(&probe.topic, 3), (&probe.dlq_topic, 1)]);
    let config = KafkaConfig {
        brokers: mock.bootstrap().to_owned(),
        ..probe
    };
    let queue = KafkaQueue::connect(config)
        .await
        .expect("connect to the mock");
    (queue, mock)
}

async fn queue_on_mock(capacity: usize) -> Box<dyn Queue> {
    let (queue, mock) = on_mock(capacity).await;
    Box::new(Guarded {
        queue: Box::new(queue),
        guard: Box::new(mock),
    })
}

mod mock_cluster {
    conveyor_queue::conformance_suite!(super::queue_on_mock);
}

async fn queue_on_tansu(capacity: usize) -> Box<dyn Queue> {
    let broker = KafkaBroker::start();
    let queue = KafkaQueue::connect(test_config(broker.bootstrap(), capacity))
        .await
        .expect("connect to tansu");
    Box::new(Guarded {
        queue: Box::new(queue),
        guard: Box::new(broker),
    })
}

mod tansu {
    conveyor_queue::conformance_suite!(super::queue_on_tansu);
}

/// Composite with Kafka as the primary and a roomy memory queue as the copy.
async fn composite_on_mock(capacity: usize) -> Box<dyn Queue> {
    let (queue, mock) = on_mock(capacity).await;
    let copy = MemoryQueue::new(MemoryQueueConfig {
        capacity: 1_000_000,
        ..MemoryQueueConfig::default()
    });
    Box::new(Guarded {
        queue: Box::new(CompositeQueue::new(
            vec![
                ("kafka".into(), Arc::new(queue) as Arc<dyn Queue>),
                ("memory".into(), Arc::new(copy) as Arc<dyn Queue>),
            ],
            Strategy::FailFast,
        )),
        guard: Box::new(mock),
    })
}

mod composite {
    conveyor_queue::conformance_suite!(super::composite_on_mock);
}

/// Two members of one group (two processors): a rebalance hands partitions over, what the
/// first member finished stays committed, and what it held comes to the new owner. Nothing
/// is lost.
#[tokio::test]
async fn a_rebalance_loses_nothing() {
    let (first, _mock) = on_mock(10_000).await;
    let sent: Vec<_> = (0..300).map(|i| event(&format!("rb-{i}"))).collect();
    for result in first.publish(sent).await {
        assert!(result.is_ok(), "{result:?}");
    }
    let mut one = first.subscribe().await.expect("subscribe");
    // The first member works through half, and holds some unacked when the second arrives.
    let mut done = BTreeSet::new();
    let batch = fetch_n(one.as_mut(), 150, Duration::from_secs(20)).await;
    assert_eq!(batch.len(), 150);
    let mut batch = batch.into_iter();
    for delivery in batch.by_ref().take(100) {
        done.insert(delivery.event.id.to_string());
        delivery.ack().await.expect("ack");
    }
    let held: Vec<_> = batch.collect();
    let second = KafkaQueue::connect(first.config().clone())
        .await
        .expect("second member");
    let mut two = second.subscribe().await.expect("subscribe");
    // Both members work until every event was acked by someone. The first member finishes
    // what it held only once the rebalance has taken partitions from it (the worst schedule):
    // the acks of those partitions' deliveries are stale, and the new owner delivers the
    // events again.
    let started = tokio::time::Instant::now();
    let mut held = Some(held);
    let held_count = held.as_ref().map_or(0, Vec::len);
    while done.len() < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {} of 300 events were processed",
            done.len()
        );
        let revoked = first.stats().await.group.map_or(0, |g| g.revoked);
        if revoked > 0
            && let Some(held) = held.take()
        {
            for delivery in held {
                done.insert(delivery.event.id.to_string());
                delivery.ack().await.expect("ack of a held delivery");
            }
        }
        for consumer in [&mut one, &mut two] {
            for delivery in consumer
                .fetch(100, Duration::from_millis(200))
                .await
                .expect("fetch")
            {
                done.insert(delivery.event.id.to_string());
                delivery.ack().await.expect("ack");
            }
        }
    }
    assert_eq!(done.len(), 300, "every event processed at least once");
    // The path this test is named for ran: partitions moved, and acks of the moved ones came
    // too late to count.
    let group = first
        .stats()
        .await
        .group
        .expect("a member reports its group");
    assert!(
        group.revoked > 0,
        "no rebalance took a partition: {group:?}"
    );
    assert!(
        held.is_none() && group.stale_settlements > 0,
        "none of the {held_count} held deliveries was settled after its partition moved: {group:?}"
    );
    // And the group's commits come to cover every event: the stale acks did not move an offset,
    // their redeliveries did.
    let started = tokio::time::Instant::now();
    loop {
        for consumer in [&mut one, &mut two] {
            for delivery in consumer
                .fetch(100, Duration::from_millis(100))
                .await
                .expect("fetch")
            {
                delivery.ack().await.expect("ack");
            }
        }
        let lag: u64 = first.stats().await.partitions.iter().map(|p| p.lag).sum();
        if lag == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the group still lags by {lag}"
        );
    }
    second.shutdown().await;
    first.shutdown().await;
}

#[tokio::test]
async fn dead_letters_survive_in_a_topic_and_replay_takes_them_out() {
    let (queue, _mock) = on_mock(1000).await;
    let dlq = KafkaDeadLetters::open(&queue).await.expect("DLQ topic");
    let letter = |id: &str| DeadLetter {
        event: event(id),
        error: "stage failed".into(),
        attempts: 3,
        failed_at_ms: 1,
    };
    for id in ["dl-1", "dl-2", "dl-3"] {
        dlq.push(letter(id)).await.expect("pushed");
    }
    let (size, letters) = dlq.list(10).await;
    assert_eq!(size, 3);
    assert_eq!(
        letters
            .iter()
            .map(|l| l.event.id.to_string())
            .collect::<Vec<_>>(),
        ["dl-1", "dl-2", "dl-3"]
    );
    assert_eq!(letters[0].error, "stage failed");
    // Another reader (a second processor) sees the same letters.
    let other = KafkaDeadLetters::open(&queue).await.expect("DLQ topic");
    assert_eq!(other.list(10).await.0, 3);

    let (taken, missing) = dlq
        .take(Some(&["dl-2".to_owned(), "nope".to_owned()]))
        .await;
    assert_eq!(taken.len(), 1);
    assert_eq!(missing, ["nope"]);
    let (size, letters) = other.list(10).await;
    assert_eq!(size, 2, "a replayed letter is gone for every reader");
    assert!(letters.iter().all(|l| &*l.event.id != "dl-2"));
}

#[tokio::test]
async fn the_dead_letter_topic_is_bounded() {
    let (queue, _mock) = on_mock(1000).await;
    let config = KafkaConfig {
        dlq_capacity: 2,
        ..queue.config().clone()
    };
    let queue = KafkaQueue::connect(config).await.expect("connect");
    let dlq = KafkaDeadLetters::open(&queue).await.expect("DLQ topic");
    let letter = |id: &str| DeadLetter {
        event: event(id),
        error: "boom".into(),
        attempts: 1,
        failed_at_ms: 1,
    };
    dlq.push(letter("b-1")).await.expect("room");
    dlq.push(letter("b-2")).await.expect("room");
    assert!(dlq.push(letter("b-3")).await.is_err(), "a full DLQ refuses");
}

#[tokio::test]
async fn a_broker_that_is_gone_makes_publishes_fail_fast_not_hang() {
    let mut broker = KafkaBroker::start();
    let queue = KafkaQueue::connect(KafkaConfig {
        publish_timeout: Duration::from_secs(3),
        ..test_config(broker.bootstrap(), 1000)
    })
    .await
    .expect("connect");
    assert!(queue.publish(vec![event("before")]).await[0].is_ok());
    broker.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let started = tokio::time::Instant::now();
        let result = queue.publish(vec![event("down")]).await;
        // At worst a publish waits out its delivery timeout; once the broker check noticed
        // (within seconds), publishes fail at once.
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "publish hung while the broker was down"
        );
        if matches!(result[0], Err(conveyor_queue::PublishError::Unavailable(_))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishes kept succeeding"
        );
    }
    // The broker check notices within a few seconds; from then on publishes fail at once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while queue.health().await == conveyor_queue::Health::Healthy {
        assert!(tokio::time::Instant::now() < deadline, "still healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = tokio::time::Instant::now();
    let result = queue.publish(vec![event("down-again")]).await;
    assert!(matches!(
        result[0],
        Err(conveyor_queue::PublishError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "failed fast"
    );
    // Shutting down with the broker gone is bounded too.
    let started = tokio::time::Instant::now();
    queue.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown hung");
}

/// A member that joined the group and owns partitions but never consumes them (it is alive:
/// it heartbeats and serves its rebalances): their lag stands still. The other member must
/// find the group stalled, not before twice the session timeout, report it in its health and
/// stats, count it and rejoin; and once the partitions are consumed again, clear it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_nobody_consumes_is_reported_as_a_stall_and_the_member_rejoins() {
    let probe = test_config(String::new(), 10_000);
    let mock = MockKafka::start(&[(&probe.topic, 3), (&probe.dlq_topic, 1)]);
    let config = KafkaConfig {
        brokers: mock.bootstrap().to_owned(),
        partition_key: crate::PartitionKey::Id,
        ..probe
    };
    let window = config.session_timeout * 2;
    let queue = KafkaQueue::connect(config.clone()).await.expect("connect");
    let sent: Vec<_> = (0..300).map(|i| event(&format!("stall-{i}"))).collect();
    for result in queue.publish(sent).await {
        assert!(result.is_ok(), "{result:?}");
    }
    // The idle member: a second process's member whose workers never take anything. Its
    // receiver keeps polling (it may hold everything), so it stays in the group and serves
    // rebalances, and it never commits.
    let idle = KafkaQueue::connect(KafkaConfig {
        max_held: 1_000_000,
        ..config.clone()
    })
    .await
    .expect("connect the idle member");
    let _idle_consumer = idle.subscribe().await.expect("subscribe");
    // Bounds generous enough for a machine busy compiling (it failed at 20/30 s there): they
    // bound how long to wait, the window assertion below is what measures.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while idle
        .stats()
        .await
        .group
        .is_none_or(|g| g.assigned.len() != 3)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle member never got the partitions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let joined = tokio::time::Instant::now();
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let mut consumed = BTreeSet::new();
    let stats = loop {
        ack_what_arrives(consumer.as_mut(), &mut consumed).await;
        let stats = queue.stats().await;
        let group = stats.group.clone().expect("a member reports its group");
        if group.stalls >= 1 {
            break stats;
        }
        assert!(
            joined.elapsed() < Duration::from_secs(60),
            "no stall found while the idle member held partitions: {group:?}"
        );
    };
    assert!(
        joined.elapsed() >= window,
        "a stall is declared only after twice the session timeout, not after {:?}",
        joined.elapsed()
    );
    let group = stats.group.expect("group");
    assert!(group.stalled, "{group:?}");
    assert!(group.assigned.len() < 3, "{group:?}");
    match queue.health().await {
        conveyor_queue::Health::Unhealthy(reason) => {
            assert!(reason.contains("consumer group stalled"), "{reason}")
        }
        healthy => panic!("a stalled member is not healthy: {healthy:?}"),
    }
    // The idle member goes away (leaves the group): this one takes over, consumes everything,
    // and the stall clears.
    idle.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        ack_what_arrives(consumer.as_mut(), &mut consumed).await;
        let stats = queue.stats().await;
        let lag: u64 = stats.partitions.iter().map(|p| p.lag).sum();
        let group = stats.group.expect("group");
        // All three conditions at once: in the middle of the takeover the lag can read 0 for
        // a partition this member has not been assigned yet.
        if lag == 0
            && group.assigned == [0, 1, 2]
            && !group.stalled
            && queue.health().await == conveyor_queue::Health::Healthy
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still lag {lag} / {group:?} after the idle member left"
        );
    }
    assert_eq!(
        consumed.len(),
        300,
        "every event consumed once the group moved on"
    );
    queue.shutdown().await;
}

/// Roles starting at once against a broker that lacks the topics (issue #17, defect 3): each
/// one creates or finds them, none fails, and the topics have the partitions asked for.
/// Twenty rounds of five, each on a broker just started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_roles_starting_together_all_create_or_find_the_topics() {
    for round in 0..20 {
        let broker = KafkaBroker::start();
        let config = test_config(broker.bootstrap(), 1000);
        let starts: Vec<_> = (0..5)
            .map(|_| {
                let config = config.clone();
                tokio::spawn(async move {
                    let queue = KafkaQueue::connect(config).await?;
                    KafkaDeadLetters::open(&queue).await?;
                    Ok::<_, String>(queue)
                })
            })
            .collect();
        let mut queues = Vec::new();
        for (role, start) in starts.into_iter().enumerate() {
            match start.await.expect("start task") {
                Ok(queue) => queues.push(queue),
                Err(error) => panic!("round {round}, role {role} failed to start: {error}"),
            }
        }
        let inner = queues[0].inner();
        let events = crate::admin::topic_partitions(inner, &config.topic)
            .await
            .expect("metadata");
        assert_eq!(events.len(), 3, "round {round}: {events:?}");
        let dlq = crate::admin::topic_partitions(inner, &config.dlq_topic)
            .await
            .expect("metadata");
        assert_eq!(dlq.len(), 1, "round {round}: {dlq:?}");
        for queue in queues {
            queue.shutdown().await;
        }
    }
}

/// One fetch (up to 100, waiting up to 100 ms): every delivery acked, its id noted.
async fn ack_what_arrives(
    consumer: &mut dyn conveyor_queue::Consumer,
    consumed: &mut BTreeSet<String>,
) {
    for delivery in consumer
        .fetch(100, Duration::from_millis(100))
        .await
        .expect("fetch")
    {
        consumed.insert(delivery.event.id.to_string());
        delivery.ack().await.expect("ack");
    }
}

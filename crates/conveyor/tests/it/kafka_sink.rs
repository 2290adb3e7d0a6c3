//! The Kafka sink end to end (issue #13): the real binary producing processed events to a
//! topic on a real Kafka-protocol broker (tansu), read back with the Kafka backend's consumer.

use std::collections::HashMap;
use std::time::Duration;

use conveyor_queue::Queue as _;
use conveyor_queue_kafka::{KafkaConfig, KafkaQueue};
use conveyor_testkit::{KafkaBroker, NatsServer};

use crate::delivery::{SingleSenders, send_batches};
use crate::harness::{NatsSplit, Spawn};
use crate::ledger::{Ledger, Verdict};

/// Reads `topic` from its start (a group of its own) until every id `ledger` promised has
/// come or `within` has passed; how often each id came, by the record's `conveyor-id`.
async fn settled(broker: &KafkaBroker, topic: &str, ledger: &Ledger, within: Duration) -> Verdict {
    let reader = KafkaQueue::connect(KafkaConfig {
        brokers: broker.bootstrap(),
        topic: topic.into(),
        group: format!("reader-{topic}"),
        capacity: 0,
        ..KafkaConfig::default()
    })
    .await
    .expect("a reader on the target topic");
    let mut consumer = reader.subscribe().await.expect("subscribe");
    let mut counts: HashMap<String, usize> = HashMap::new();
    let deadline = std::time::Instant::now() + within;
    loop {
        for delivery in consumer
            .fetch(1000, Duration::from_millis(500))
            .await
            .expect("fetch")
        {
            // Read raw (another producer's record): the value is the JSON record.
            let record: serde_json::Value =
                serde_json::from_slice(&delivery.event.payload).expect("a JSON record");
            let id = record["id"].as_str().unwrap_or("(no id)").to_owned();
            *counts.entry(id).or_default() += 1;
            delivery.ack().await.expect("ack");
        }
        let verdict = ledger.check_counts(&counts);
        if verdict.lost.is_empty() || std::time::Instant::now() >= deadline {
            eprintln!("topic {topic}: {verdict}");
            return verdict;
        }
    }
}

/// `conveyor run` with the quick form: every event in the topic exactly once, keyed as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conveyor_run_produces_every_event_to_the_topic_once() {
    let broker = KafkaBroker::start();
    let sink = format!("kafka://{}/team-orders?key=id", broker.bootstrap());
    let conveyor = Spawn::new("run").sink_spec(&sink).start().await;
    let accepted = send_batches(&conveyor, "kafkasink", 5_000, 500, 2).await;
    assert_eq!(accepted.len(), 5_000);
    let verdict = settled(&broker, "team-orders", &accepted, Duration::from_secs(60)).await;
    assert!(verdict.is_clean(), "{verdict}");
    let (_, status) = conveyor.get_json("/api/v1/status").await;
    let sink = &status["processor"]["stats"]["sinks"][0];
    assert_eq!(sink["written"], 5_000, "{status}");
    assert_eq!(
        sink["target"],
        format!("kafka://{}/team-orders", broker.bootstrap()),
        "{status}"
    );
}

/// Split mode on NATS, the sink on Kafka, the processor SIGKILLed three times mid-stream:
/// every accepted event is in the topic exactly once. Kafka has no dedupe across producers,
/// so what keeps out the events stored just before a kill and redelivered is the processor's
/// seen-id window, seeded at its start from the ids of the topic's last records. (Without the
/// read-back, two runs in three here left 2 duplicates.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_in_the_topic_once_through_processor_kills() {
    let queue = NatsServer::start();
    let broker = KafkaBroker::start();
    let sink = format!("kafka://{}/after-kills", broker.bootstrap());
    let mut split = NatsSplit::start(&queue.url(), &sink).await;
    let senders = SingleSenders::start(&split.gateway, "kafkakill", 2);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        split.kill_processor().await;
        split.start_processor().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = senders.finish_accepted().await;
    let verdict = settled(&broker, "after-kills", &accepted, Duration::from_secs(120)).await;
    assert!(verdict.is_clean(), "{verdict}");
}

//! Against a real Kafka-protocol broker (tansu, `conveyor_testkit::KafkaBroker`); the topic is
//! read back with the Kafka backend's own consumer.

use std::collections::BTreeMap;

use bytes::Bytes;
use conveyor_core::ContentType;
use conveyor_queue::Queue as _;
use conveyor_queue_kafka::KafkaConfig;
use conveyor_sink::ErrorKind;
use conveyor_testkit::KafkaBroker;

use super::*;

fn event(i: usize, payload: String) -> Event {
    Event {
        id: format!("e{i}").into(),
        source: "shop".into(),
        timestamp_ms: 7,
        payload: Bytes::from(payload),
        content_type: ContentType::Json,
        metadata: BTreeMap::from([("tenant".to_owned(), format!("t{}", i % 2))]).into(),
        attempt: 1,
        headers: BTreeMap::new(),
    }
}

fn orders(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            event(
                i,
                format!(r#"{{"customer":{{"id":"c{}"}},"n":{i}}}"#, i % 5),
            )
        })
        .collect()
}

fn sink(broker: &KafkaBroker, topic: &str, query: &str) -> KafkaSink {
    let spec = format!("kafka://{}/{topic}?{query}", broker.bootstrap());
    KafkaSink::new(KafkaSinkSettings::from_url(&spec).expect("settings"))
}

/// Every record of `topic`, as the Kafka backend's consumer reads them (a group of its own,
/// from the start), until `n` have come.
async fn read_topic(broker: &KafkaBroker, topic: &str, n: usize) -> Vec<Event> {
    let queue = KafkaQueue::connect(KafkaConfig {
        brokers: broker.bootstrap(),
        topic: topic.into(),
        group: format!("reader-{topic}"),
        capacity: 0,
        ..KafkaConfig::default()
    })
    .await
    .expect("a reader");
    let mut consumer = queue.subscribe().await.expect("subscribe");
    let mut events = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while events.len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {n} records arrived",
            events.len()
        );
        for delivery in consumer
            .fetch(500, Duration::from_secs(1))
            .await
            .expect("fetch")
        {
            events.push(delivery.event.clone());
            delivery.ack().await.expect("ack");
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_json_keyed_by_the_configured_field() {
    let broker = KafkaBroker::start();
    let sink = sink(&broker, "orders-out", "key=data.customer.id&partitions=3");
    sink.write(&orders(200), 99).await.expect("written");

    let records = read_topic(&broker, "orders-out", 200).await;
    assert_eq!(records.len(), 200, "one record per event");
    let mut ids = Vec::new();
    for record in &records {
        // A record another producer wrote is read raw: its value as data, its key as source.
        let value: serde_json::Value = serde_json::from_slice(&record.payload).expect("JSON");
        let customer = value["data"]["customer"]["id"].as_str().expect("customer");
        assert_eq!(record.source.as_ref(), customer, "the key is the field");
        assert_eq!(value["processed_at"], 99);
        assert_eq!(
            value["metadata"]["tenant"].as_str().map(|t| &t[..1]),
            Some("t")
        );
        ids.push(value["id"].as_str().expect("id").to_owned());
    }
    ids.sort();
    let mut expected: Vec<String> = (0..200).map(|i| format!("e{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected);
    assert!(!sink.idempotent(), "Kafka keeps a re-produced record");
    // A processor starting again reads back the ids of the topic's last records.
    let mut recent = sink.recent_ids(1_000).await.expect("read back");
    recent.sort();
    assert_eq!(recent, expected);
    assert_eq!(sink.recent_ids(30).await.expect("read back").len(), 30);
    assert_eq!(
        sink.describe(),
        format!("kafka://{}/orders-out", broker.bootstrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_encoding_is_read_by_another_conveyor_as_its_queue() {
    let broker = KafkaBroker::start();
    let sink = sink(&broker, "next-events", "encoding=event&key=metadata.tenant");
    sink.write(&orders(10), 1).await.expect("written");
    let mut ids: Vec<String> = read_topic(&broker, "next-events", 10)
        .await
        .iter()
        .map(|e| {
            assert_eq!(e.source.as_ref(), "shop");
            e.id.to_string()
        })
        .collect();
    ids.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_too_large_is_refused_and_the_rest_written() {
    let broker = KafkaBroker::start();
    let mut table = serde_json::Map::new();
    table.insert("type".into(), "kafka".into());
    table.insert("brokers".into(), broker.bootstrap().into());
    table.insert("topic".into(), "small".into());
    table.insert(
        "options".into(),
        serde_json::json!({"message.max.bytes": "10000"}),
    );
    let sink = KafkaSink::new(KafkaSinkSettings::from_settings(&table).expect("settings"));
    let mut batch = orders(3);
    batch[1] = event(1, format!("\"{}\"", "x".repeat(20_000)));
    let error = sink.write(&batch, 1).await.expect_err("one too large");
    let ErrorKind::Rejected(refused) = &error.kind else {
        panic!("{error}");
    };
    assert_eq!(refused.len(), 1, "{error}");
    assert_eq!(refused[0].0, 1);
    assert!(refused[0].1.contains("too large"), "{}", refused[0].1);
    assert_eq!(read_topic(&broker, "small", 2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_down_is_retryable_with_the_reason() {
    let mut broker = KafkaBroker::start();
    broker.kill();
    let sink = sink(&broker, "later", "");
    let error = sink.write(&orders(1), 1).await.expect_err("down");
    assert!(error.is_retryable(), "{error}");
    assert!(error.message.contains(&broker.bootstrap()), "{error}");
}

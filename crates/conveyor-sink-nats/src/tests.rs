use std::collections::BTreeMap;

use conveyor_core::ContentType;
use conveyor_queue::Queue as _;
use conveyor_queue_nats::{NatsConfig, NatsQueue};
use conveyor_sink::ErrorKind;
use conveyor_testkit::NatsServer;

use super::*;

fn event(id: &str, payload: Vec<u8>) -> Event {
    Event {
        id: id.into(),
        source: "sensor-1".into(),
        timestamp_ms: 7,
        payload: Bytes::from(payload),
        content_type: ContentType::Json,
        metadata: BTreeMap::from([("team".to_owned(), "data".to_owned())]).into(),
        attempt: 1,
        headers: BTreeMap::new(),
    }
}

fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| event(&format!("e{i}"), format!("{{\"n\":{i}}}").into_bytes()))
        .collect()
}

fn sink(server: &NatsServer, query: &str) -> NatsSink {
    NatsSink::new(
        NatsSinkSettings::from_url(&format!("{}?{query}", server.url())).expect("settings"),
    )
}

#[tokio::test]
async fn records_land_on_the_subject_once_each_even_when_written_twice() {
    let server = NatsServer::start();
    let sink = sink(&server, "subject=out.events&stream=OUT");
    let mut batch = events(300);
    sink.write(&batch, 99).await.expect("written");
    // The same events again, as after a crash before the ack: the stream keeps one of each.
    for event in &mut batch {
        event.attempt = 2;
    }
    sink.write(&batch, 100).await.expect("written again");

    let stored = server.stream_messages("OUT").await;
    assert_eq!(stored.len(), 300, "one message per event");
    let first = &stored[0];
    assert_eq!(first.msg_id.as_deref(), Some("e0"));
    assert_eq!(
        first.headers.get("Conveyor-Source").map(|v| v.as_str()),
        Some("sensor-1")
    );
    let record: serde_json::Value = serde_json::from_slice(&first.payload).expect("JSON");
    assert_eq!(record["id"], "e0");
    assert_eq!(record["data"], serde_json::json!({"n": 0}));
    assert_eq!(record["metadata"]["team"], "data");
    assert_eq!(record["processed_at"], 99);
    assert!(sink.idempotent());
    assert_eq!(
        sink.describe(),
        format!("nats://127.0.0.1:{}?subject=out.events", server.port())
    );
}

#[tokio::test]
async fn the_event_encoding_is_read_by_another_conveyor_as_its_queue() {
    let server = NatsServer::start();
    let config = NatsConfig {
        url: server.url(),
        stream: "NEXT".into(),
        subject: "next.events".into(),
        consumer: "next-processor".into(),
        ..NatsConfig::default()
    };
    let queue = NatsQueue::connect(config).await.expect("the next queue");
    let sink = sink(&server, "subject=next.events&stream=NEXT&encoding=event");
    let batch = events(5);
    sink.write(&batch, 1).await.expect("written");

    let mut consumer = queue.subscribe().await.expect("consumer");
    let mut ids = Vec::new();
    while ids.len() < 5 {
        let deliveries = consumer
            .fetch(10, Duration::from_secs(5))
            .await
            .expect("fetch");
        assert!(!deliveries.is_empty(), "only {ids:?} arrived");
        for delivery in deliveries {
            assert_eq!(delivery.event.source.as_ref(), "sensor-1");
            assert_eq!(
                delivery.event.metadata.get("team").map(String::as_str),
                Some("data")
            );
            ids.push(delivery.event.id.to_string());
            delivery.ack().await.expect("ack");
        }
    }
    assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4"]);
}

#[tokio::test]
async fn a_target_that_is_down_or_has_no_stream_is_retryable_with_the_reason() {
    let mut server = NatsServer::start();
    server.kill();
    let sink = sink(&server, "subject=later.events");
    let error = sink.write(&events(1), 1).await.expect_err("down");
    assert!(error.is_retryable(), "{error}");
    assert!(
        error
            .message
            .contains("cannot connect to NATS at nats://127.0.0.1:"),
        "{error}"
    );

    // Up, but no stream captures the subject and none is named: the sink waits for one.
    server.restart();
    let error = sink.write(&events(1), 1).await.expect_err("no stream");
    assert!(error.is_retryable(), "{error}");
    assert!(
        error
            .message
            .contains("no JetStream stream captures subject 'later.events'"),
        "{error}"
    );

    // Someone creates it: the next write goes through.
    let js = jetstream::new(async_nats::connect(server.url()).await.expect("client"));
    js.create_stream(jetstream::stream::Config {
        name: "LATER".into(),
        subjects: vec!["later.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    sink.write(&events(2), 1).await.expect("written");
    assert_eq!(server.stream_messages("LATER").await.len(), 2);

    // The broker dies after the sink connected: retryable while the client reconnects, then
    // through, as the pool would retry it.
    server.restart();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Err(error) = sink.write(&events(3), 1).await {
        assert!(error.is_retryable(), "{error}");
        assert!(
            std::time::Instant::now() < deadline,
            "still failing: {error}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(server.stream_messages("LATER").await.len(), 3);
}

#[tokio::test]
async fn a_message_the_stream_cannot_hold_is_refused_and_the_rest_written() {
    let server = NatsServer::start();
    let js = jetstream::new(async_nats::connect(server.url()).await.expect("client"));
    js.create_stream(jetstream::stream::Config {
        name: "SMALL".into(),
        subjects: vec!["small.events".into()],
        max_message_size: 2_000,
        ..Default::default()
    })
    .await
    .expect("stream");
    let sink = sink(&server, "subject=small.events&stream=SMALL");
    let mut batch = events(3);
    batch[1] = event("big", format!("\"{}\"", "x".repeat(5_000)).into_bytes());
    let error = sink.write(&batch, 1).await.expect_err("one too big");
    let ErrorKind::Rejected(refused) = &error.kind else {
        panic!("{error}");
    };
    assert_eq!(refused.len(), 1, "{error}");
    assert_eq!(refused[0].0, 1);
    assert!(
        refused[0].1.contains("message size exceeds maximum"),
        "{}",
        refused[0].1
    );
    let stored: Vec<_> = server
        .stream_messages("SMALL")
        .await
        .into_iter()
        .filter_map(|m| m.msg_id)
        .collect();
    assert_eq!(stored, ["e0", "e2"]);
}

#[tokio::test]
async fn a_named_stream_deleted_under_the_sink_is_created_again() {
    let server = NatsServer::start();
    let sink = sink(&server, "subject=kept.events&stream=KEPT");
    sink.write(&events(2), 1).await.expect("written");
    let js = jetstream::new(async_nats::connect(server.url()).await.expect("client"));
    js.delete_stream("KEPT").await.expect("deleted");
    // The publish finds no stream: retryable; the next write makes it again.
    let error = sink.write(&events(3), 1).await.expect_err("no stream");
    assert!(error.is_retryable(), "{error}");
    assert!(
        error
            .message
            .contains("no stream captures subject 'kept.events'"),
        "{error}"
    );
    sink.write(&events(3), 1)
        .await
        .expect("written into the new stream");
    assert_eq!(server.stream_messages("KEPT").await.len(), 3);
}

#[tokio::test]
async fn a_subject_captured_by_another_stream_than_the_named_one_is_named() {
    let server = NatsServer::start();
    let js = jetstream::new(async_nats::connect(server.url()).await.expect("client"));
    js.create_stream(jetstream::stream::Config {
        name: "THEIRS".into(),
        subjects: vec!["shared.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    let sink = sink(&server, "subject=shared.events&stream=MINE");
    let error = sink.write(&events(1), 1).await.expect_err("wrong stream");
    assert!(error.is_retryable(), "{error}");
    assert!(
        error
            .message
            .contains("subject 'shared.events' is captured by stream 'THEIRS', not by 'MINE'"),
        "{error}"
    );
}

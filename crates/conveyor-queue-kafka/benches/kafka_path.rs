//! The Kafka publish path, conveyor's against a raw rdkafka producer, on one private tansu
//! broker started by this bench, in the same run (these machines are noisy: only the ratio is
//! comparable across runs).
//!
//! - **raw rdkafka**: a `FutureProducer` with the same settings conveyor uses (idempotent,
//!   `acks=all`, `linger.ms=1`), driven the same way: `TASKS` tasks each building a batch of
//!   `BATCH` events, sending them, then awaiting their delivery reports, each record carrying
//!   the same key, header and encoded bytes conveyor sends.
//! - **conveyor KafkaQueue**: `Publisher::publish` in batches of `BATCH` from `TASKS` concurrent
//!   tasks, as ingest calls it for HTTP batches and gRPC streams (encode, dedupe window, lag
//!   bound, delivery-report wait included).
//!
//! Run: `cargo bench -p conveyor-queue-kafka --bench kafka_path` (`EVENTS=N` to change the
//! count; `BENCH_KAFKA_BROKERS=host:port` to use a running broker instead of starting one;
//! `DEDUPE_WINDOW=N` to change conveyor's publish-side dedupe window, 0 to turn it off).

use std::sync::Arc;
use std::time::Duration;

use conveyor_queue::Publisher;
use conveyor_queue_kafka::{KafkaConfig, KafkaQueue};
use conveyor_testkit::{KafkaBroker, publish_rate};
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// The allocator the `conveyor` binary ships with, for both sides.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WINDOW: usize = 8192;
const BATCH: usize = 256;
const TASKS: usize = 16;
/// Rounds per run, each side once per round (odd, so the median is one round's ratio).
const ROUNDS: usize = 5;

fn event(i: usize) -> conveyor_core::Event {
    let mut event = conveyor_queue::conformance::event(&format!("bench-{i}"));
    event.payload = bytes::Bytes::from(format!(
        "{{\"sensor\":\"s-{}\",\"temperature\":23.5,\"seq\":{i}}}",
        i % 100
    ));
    event
}

fn topic(side: &str, round: usize) -> String {
    format!("bench-{side}-{round}-{}", std::process::id())
}

async fn raw_publish(brokers: &str, events: usize, round: usize) -> f64 {
    // The topic is created by conveyor's own code path, so both sides write to the same shape.
    let setup = KafkaQueue::connect(KafkaConfig {
        brokers: brokers.to_owned(),
        topic: topic("raw", round),
        ..KafkaConfig::default()
    })
    .await
    .expect("create the raw side's topic");
    drop(setup);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("queue.buffering.max.messages", (WINDOW * 2).to_string())
        .create()
        .expect("producer");
    // Warm up (metadata, producer id) outside the clock, as conveyor's side does below.
    let warm_up = producer
        .send_result(
            FutureRecord::to(&topic("raw", round))
                .key("warm-up")
                .payload("warm-up"),
        )
        .map_err(|(e, _)| e)
        .expect("enqueue");
    warm_up.await.expect("report").expect("delivered");
    let producer = Arc::new(producer);
    let topic = Arc::new(topic("raw", round));
    // The same shape of work as conveyor's side: each batch built first (as ingest has it),
    // sent, then its delivery reports awaited, so the difference is conveyor's layer.
    publish_rate(events, TASKS, BATCH, move |range| {
        let (producer, topic) = (Arc::clone(&producer), Arc::clone(&topic));
        async move {
            let batch: Vec<_> = range.map(event).collect();
            let mut reports = Vec::with_capacity(batch.len());
            for event in batch {
                let payload = conveyor_proto::event_to_wire(event.clone()).encode_to_vec();
                let headers = OwnedHeaders::new().insert(Header {
                    key: "conveyor-encoding",
                    value: Some("proto"),
                });
                let record = FutureRecord::to(topic.as_str())
                    .key(event.source.as_bytes())
                    .payload(&payload)
                    .headers(headers);
                reports.push(
                    producer
                        .send_result(record)
                        .map_err(|(e, _)| e)
                        .expect("enqueue"),
                );
            }
            for report in reports {
                report.await.expect("report").expect("delivered");
            }
        }
    })
    .await
}

async fn conveyor_publish(brokers: &str, events: usize, round: usize) -> f64 {
    let queue = KafkaQueue::connect(KafkaConfig {
        brokers: brokers.to_owned(),
        topic: topic("conveyor", round),
        capacity: (events * 2) as u64,
        max_in_flight_publishes: WINDOW,
        dedupe_window: std::env::var("DEDUPE_WINDOW")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(KafkaConfig::default().dedupe_window),
        ..KafkaConfig::default()
    })
    .await
    .expect("connect");
    for result in queue.publish(vec![event(events)]).await {
        result.expect("warm-up publish");
    }
    let queue = Arc::new(queue);
    publish_rate(events, TASKS, BATCH, move |range| {
        let queue = Arc::clone(&queue);
        async move {
            for result in queue.publish(range.map(event).collect()).await {
                result.expect("conveyor publish");
            }
        }
    })
    .await
}

fn main() {
    let events: usize = std::env::var("EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let shared = std::env::var("BENCH_KAFKA_BROKERS").ok();
    let own = shared.is_none().then(KafkaBroker::start);
    let brokers = shared
        .clone()
        .or_else(|| own.as_ref().map(KafkaBroker::bootstrap))
        .expect("a broker");
    let mut best = (0f64, 0f64);
    let mut ratios = Vec::new();
    // Rounds on topics of their own. The best of each side goes in the table, and next to it
    // the median of the per-round ratios: the raw side's throughput moves with the machine more
    // than conveyor's does, and one lucky round should not decide the comparison either way.
    for round in 1..=ROUNDS {
        // Alternate which side goes first: the broker's state grows with every run.
        let (raw, ours) = if round % 2 == 1 {
            let raw = runtime.block_on(raw_publish(&brokers, events, round));
            (
                raw,
                runtime.block_on(conveyor_publish(&brokers, events, round)),
            )
        } else {
            let ours = runtime.block_on(conveyor_publish(&brokers, events, round));
            (runtime.block_on(raw_publish(&brokers, events, round)), ours)
        };
        println!(
            "round {round}: raw {raw:>10.0} ev/s   conveyor {ours:>10.0} ev/s   {:>4.0}%",
            100.0 * ours / raw
        );
        best = (best.0.max(raw), best.1.max(ours));
        ratios.push(ours / raw);
        #[expect(
            clippy::disallowed_methods,
            reason = "between rounds, outside the runtime: lets the broker settle"
        )]
        std::thread::sleep(Duration::from_millis(200));
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    println!();
    println!(
        "| path (Kafka protocol on tansu, in-memory storage, {events} events) | events/s (best of {ROUNDS}) | vs raw (best) | vs raw (median of rounds) |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| raw rdkafka FutureProducer, idempotent acks=all ({TASKS} tasks x batches of {BATCH}) | {:.0} | 100% | 100% |",
        best.0
    );
    println!(
        "| conveyor KafkaQueue::publish ({TASKS} tasks x batches of {BATCH}) | {:.0} | {:.0}% | {:.0}% |",
        best.1,
        100.0 * best.1 / best.0,
        100.0 * median
    );
}

//! The NATS publish path, conveyor's against the raw client, on one private `nats-server`
//! started by this bench, in the same run (these machines are noisy: only the ratio is
//! comparable across runs).
//!
//! - **raw async-nats**: a windowed JetStream publish loop, up to `WINDOW` PubAcks in flight,
//!   each message carrying a `Nats-Msg-Id` and the same encoded bytes conveyor sends.
//! - **conveyor NatsQueue**: `Publisher::publish` in batches of `BATCH` from `TASKS` concurrent
//!   tasks, as ingest calls it for HTTP batches and gRPC streams (encode, header, PubAck wait,
//!   duplicate accounting included).
//!
//! Run: `cargo bench -p conveyor-queue-nats --bench nats_path` (`EVENTS=N` to change the count;
//! `BENCH_NATS_URL=nats://…` to use a running server instead of starting one, as
//! `make bench-e2e` does so both sides share the broker of its end-to-end run).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use conveyor_queue::Publisher;
use conveyor_queue_nats::{NatsConfig, NatsQueue};
use conveyor_testkit::{NatsServer, publish_rate};

const WINDOW: usize = 4096;
const BATCH: usize = 256;
const TASKS: usize = 16;

fn event(i: usize) -> conveyor_core::Event {
    let mut event = conveyor_queue::conformance::event(&format!("bench-{i}"));
    event.payload = bytes::Bytes::from(format!(
        "{{\"sensor\":\"s-{}\",\"temperature\":23.5,\"seq\":{i}}}",
        i % 100
    ));
    event
}

async fn raw_publish(url: &str, events: usize, round: usize) -> f64 {
    let client = async_nats::connect(url).await.expect("connect");
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: format!("RAW_{round}_{}", std::process::id()),
        subjects: vec![format!("raw.{round}.{}", std::process::id())],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .expect("stream");
    let started = Instant::now();
    let mut window = VecDeque::with_capacity(WINDOW);
    for i in 0..events {
        let (headers, payload) = conveyor_queue_nats::encode(event(i));
        let ack = js
            .publish_with_headers(
                format!("raw.{round}.{}", std::process::id()),
                headers,
                payload,
            )
            .await
            .expect("publish");
        window.push_back(ack);
        if window.len() == WINDOW
            && let Some(oldest) = window.pop_front()
        {
            oldest.await.expect("puback");
        }
    }
    for ack in window {
        ack.await.expect("puback");
    }
    events as f64 / started.elapsed().as_secs_f64()
}

async fn conveyor_publish(url: &str, events: usize, round: usize) -> f64 {
    let queue = NatsQueue::connect(NatsConfig {
        url: url.to_owned(),
        stream: format!("CONVEYOR_BENCH_{round}_{}", std::process::id()),
        subject: format!("conveyor.bench.{round}.{}", std::process::id()),
        consumer: format!("bench-{round}"),
        dlq_stream: format!("CONVEYOR_BENCH_DLQ_{round}_{}", std::process::id()),
        capacity: (events * 2) as i64,
        max_in_flight_publishes: WINDOW,
        ..NatsConfig::default()
    })
    .await
    .expect("connect");
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
        .unwrap_or(200_000);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut best = (0f64, 0f64);
    // Two rounds, alternating, each on a fresh server (or streams of their own on the given
    // one); keep the best of each side.
    let shared = std::env::var("BENCH_NATS_URL").ok();
    for round in 1..=2 {
        let own = shared.is_none().then(NatsServer::start);
        let url = shared
            .clone()
            .or_else(|| own.as_ref().map(NatsServer::url))
            .expect("a server");
        let raw = runtime.block_on(raw_publish(&url, events, round));
        let ours = runtime.block_on(conveyor_publish(&url, events, round));
        println!("round {round}: raw {raw:>10.0} ev/s   conveyor {ours:>10.0} ev/s");
        best = (best.0.max(raw), best.1.max(ours));
    }
    println!();
    println!("| path (NATS JetStream, file storage, {events} events) | events/s | vs raw |");
    println!("|---|---:|---:|");
    println!(
        "| raw async-nats, windowed publish ({WINDOW} in flight) | {:.0} | 100% |",
        best.0
    );
    println!(
        "| conveyor NatsQueue::publish ({TASKS} tasks x batches of {BATCH}) | {:.0} | {:.0}% |",
        best.1,
        100.0 * best.1 / best.0
    );
}

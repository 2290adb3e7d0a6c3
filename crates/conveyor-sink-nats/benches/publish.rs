//! The NATS sink against a raw async-nats loop, in the same run, on the same private
//! nats-server and the same stream (file storage): the same records, the same headers
//! (`Nats-Msg-Id`), the same number of batches in flight, each batch published and then its
//! PubAcks awaited together. Prints events/s for both and the sink's share of the raw loop.
//!
//! `cargo bench -p conveyor-sink-nats --bench publish` (or `make bench`).
//! Knobs: `BENCH_EVENTS` (50000), `BENCH_BATCH` (256: events per write), `BENCH_WORKERS` (4:
//! writes at once), `BENCH_NATS_URL` (a server of one's own instead of a private one:
//! `make bench-e2e` points it at the server its NATS sink row publishes to).

use std::future::IntoFuture as _;
use std::sync::Arc;

use async_nats::HeaderMap;
use conveyor_core::Event;
use conveyor_sink::Sink;
use conveyor_sink::record::write_record;
use conveyor_sink_nats::{NatsSink, NatsSinkSettings};
use conveyor_testkit::bench::{knob, sensor_events};
use conveyor_testkit::{NatsServer, publish_rate};

/// What a hand-written client does: renders each record, publishes the batch, awaits its
/// PubAcks together.
async fn raw(url: &str, events: Arc<Vec<Event>>, batch: usize, workers: usize) -> f64 {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("connect"));
    publish_rate(events.len(), workers, batch, move |range| {
        let (js, events) = (js.clone(), Arc::clone(&events));
        async move {
            let mut acks = Vec::with_capacity(range.len());
            for event in &events[range] {
                let mut record = Vec::with_capacity(256);
                write_record(&mut record, event, 1);
                record.pop();
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", event.id.as_ref());
                headers.insert("Content-Type", "application/json");
                headers.insert("Conveyor-Source", event.source.as_ref());
                acks.push(
                    js.publish_with_headers("bench.events", headers, record.into())
                        .await
                        .expect("raw publish")
                        .into_future(),
                );
            }
            for ack in futures_util::future::join_all(acks).await {
                ack.expect("raw PubAck");
            }
        }
    })
    .await
}

async fn sink(sink: Arc<NatsSink>, events: Arc<Vec<Event>>, batch: usize, workers: usize) -> f64 {
    publish_rate(events.len(), workers, batch, move |range| {
        let (sink, events) = (Arc::clone(&sink), Arc::clone(&events));
        async move {
            sink.write(&events[range], 1).await.expect("sink write");
        }
    })
    .await
}

fn main() {
    let total = knob("BENCH_EVENTS", 50_000);
    let batch = knob("BENCH_BATCH", 256);
    let workers = knob("BENCH_WORKERS", 4);
    // Kept alive for the run when no server is given.
    let (_private, url) = match std::env::var("BENCH_NATS_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = NatsServer::start();
            let url = server.url();
            (Some(server), url)
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let settings = NatsSinkSettings::from_url(&format!(
            "{url}?subject=bench.events&stream=BENCH"
        ))
        .expect("settings");
        let nats_sink = Arc::new(NatsSink::new(settings));
        // The first write makes the stream; both loops then publish into it.
        nats_sink
            .write(&sensor_events("warm", 1), 1)
            .await
            .expect("the stream");
        println!(
            "{total} events, writes of {batch} from {workers} workers, one nats-server (file storage); best of two, alternated"
        );
        println!("| raw async-nats loop | NatsSink::write | share |");
        println!("|---:|---:|---:|");
        let (mut best_raw, mut best_sink) = (0f64, 0f64);
        for round in 0..2 {
            // Fresh ids per run: the stream drops a Msg-Id it has seen.
            let fresh = |who: &str| Arc::new(sensor_events(&format!("{who}{round}"), total));
            best_raw = best_raw.max(raw(&url, fresh("raw"), batch, workers).await);
            best_sink = best_sink
                .max(sink(Arc::clone(&nats_sink), fresh("sink"), batch, workers).await);
        }
        println!(
            "| {best_raw:.0} events/s | {best_sink:.0} events/s | {:.0}% |",
            100.0 * best_sink / best_raw
        );
    });
}

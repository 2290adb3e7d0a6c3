//! The HTTP sink against a raw reqwest loop, in the same run, against the same local receiver
//! (a bare axum server answering 200): the same events, the same number of requests in flight.
//! Prints events/s for both and the sink's share of the raw loop, one event per request and as
//! NDJSON batches.
//!
//! `cargo bench -p conveyor-sink-http --bench send` (or `make bench`).
//! Knobs: `BENCH_EVENTS` (50000), `BENCH_BATCH` (256: events per write, and per NDJSON request),
//! `BENCH_CONCURRENCY` (16: requests in flight), `BENCH_WORKERS` (4: writes at once),
//! `BENCH_HTTP_URL` (a receiver of one's own instead: `make bench-e2e` points it at
//! `conveyor-ceiling`'s `/receive`, the receiver its HTTP sink row writes to).

use std::sync::Arc;

use conveyor_core::Event;
use conveyor_sink::Sink;
use conveyor_sink::record::write_record;
use conveyor_sink_http::{HttpSettings, HttpSink};
use conveyor_testkit::bench::{knob, sensor_events};
use conveyor_testkit::publish_rate;

/// A bare receiver: reads the body, answers 200.
async fn receiver() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let app = axum::Router::new().fallback(|_body: axum::body::Bytes| async { "" });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{address}/events")
}

/// What a hand-written client does: renders each body and POSTs it, `concurrency` at a time,
/// with an `Idempotency-Key`.
async fn raw(url: &str, events: Arc<Vec<Event>>, per_request: usize, concurrency: usize) -> f64 {
    let client = reqwest::Client::new();
    let url = url.to_owned();
    publish_rate(events.len(), concurrency, per_request, move |range| {
        let (client, url, events) = (client.clone(), url.clone(), Arc::clone(&events));
        async move {
            let mut body = Vec::with_capacity(256 * range.len());
            for event in &events[range.clone()] {
                write_record(&mut body, event, 1);
            }
            if range.len() == 1 {
                body.pop();
            }
            let answer = client
                .post(&url)
                .header("content-type", "application/json")
                .header("idempotency-key", &*events[range.start].id)
                .body(body)
                .send()
                .await
                .expect("raw post");
            assert!(answer.status().is_success());
            let _ = answer.bytes().await;
        }
    })
    .await
}

async fn sink(
    url: &str,
    events: Arc<Vec<Event>>,
    encoding: &str,
    batch: usize,
    concurrency: usize,
    workers: usize,
) -> f64 {
    let settings = HttpSettings::from_settings(
        serde_json::json!({
            "url": url, "encoding": encoding, "max_events": batch, "concurrency": concurrency,
        })
        .as_object()
        .expect("a table"),
    )
    .expect("settings");
    let sink = Arc::new(HttpSink::new(settings).expect("sink"));
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
    let concurrency = knob("BENCH_CONCURRENCY", 16);
    let workers = knob("BENCH_WORKERS", 4);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let url = match std::env::var("BENCH_HTTP_URL") {
            Ok(url) => url,
            Err(_) => receiver().await,
        };
        println!(
            "{total} events, writes of {batch} from {workers} workers, {concurrency} requests in flight; best of two, alternated"
        );
        println!("| body | raw reqwest loop | HttpSink::write | share |");
        println!("|---|---:|---:|---:|");
        for (label, encoding, per_request) in [
            ("one event per request", "event", 1),
            ("NDJSON, one request per write", "ndjson", batch),
        ] {
            let (mut best_raw, mut best_sink) = (0f64, 0f64);
            for round in 0..2 {
                // Fresh ids per run: the sink skips what it already delivered.
                let fresh = |who: &str| Arc::new(sensor_events(&format!("{who}{round}{encoding}"), total));
                // As many requests in flight as the sink has: `concurrency` single-event
                // requests, or one NDJSON request per worker.
                let in_flight = if per_request == 1 { concurrency } else { workers };
                best_raw = best_raw.max(raw(&url, fresh("raw"), per_request, in_flight).await);
                best_sink = best_sink.max(
                    sink(&url, fresh("sink"), encoding, batch, concurrency, workers).await,
                );
            }
            println!(
                "| {label} | {best_raw:.0} events/s | {best_sink:.0} events/s | {:.0}% |",
                100.0 * best_sink / best_raw
            );
        }
    });
}

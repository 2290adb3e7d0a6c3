//! The PostgreSQL sink against a raw tokio-postgres loop, in the same run, on the same server:
//! the same rows, the same batch size, the same number of connections writing at once, each
//! into a fresh table. Prints events/s for both and the sink's share of the raw loop.
//!
//! `CONVEYOR_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!   cargo bench -p conveyor-sink-postgres --bench insert` (or `make bench`).
//! Knobs: `BENCH_EVENTS` (100000), `BENCH_BATCH` (256), `BENCH_CONNECTIONS` (4).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use conveyor_core::Event;
use conveyor_sink::Sink;
use conveyor_sink_postgres::{PostgresSettings, PostgresSink};
use conveyor_testkit::TestDatabase;
use conveyor_testkit::bench::{knob, sensor_events};

/// `connections` tasks, each taking the next batch of `events` and handing it to `write`;
/// events per second.
async fn drive<F, Fut>(events: Arc<Vec<Event>>, batch: usize, connections: usize, write: F) -> f64
where
    F: Fn(usize, Vec<Event>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|worker| {
            let (events, next, write) = (Arc::clone(&events), Arc::clone(&next), write.clone());
            tokio::spawn(async move {
                loop {
                    let from = next.fetch_add(batch, Ordering::Relaxed);
                    if from >= events.len() {
                        break;
                    }
                    let to = (from + batch).min(events.len());
                    write(worker, events[from..to].to_vec()).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// The raw loop: what a hand-written tokio-postgres client does with the same statement.
async fn raw(db: &TestDatabase, events: Arc<Vec<Event>>, batch: usize, connections: usize) -> f64 {
    db.query(
        "CREATE TABLE raw (id text PRIMARY KEY, source text NOT NULL, \
         \"timestamp\" timestamptz NOT NULL, data jsonb, metadata jsonb NOT NULL DEFAULT '{}', \
         processed_at timestamptz NOT NULL)",
    );
    let mut clients = Vec::new();
    for _ in 0..connections {
        let (client, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(connection);
        clients.push(client);
    }
    let clients = Arc::new(clients);
    drive(events, batch, connections, move |worker, batch| {
        let clients = Arc::clone(&clients);
        async move {
            let ids: Vec<&str> = batch.iter().map(|e| &*e.id).collect();
            let sources: Vec<&str> = batch.iter().map(|e| &*e.source).collect();
            let ts: Vec<SystemTime> = batch
                .iter()
                .map(|e| UNIX_EPOCH + Duration::from_millis(e.timestamp_ms))
                .collect();
            let data: Vec<String> = batch
                .iter()
                .map(|e| String::from_utf8_lossy(&e.payload).into_owned())
                .collect();
            let metadata: Vec<&str> = batch.iter().map(|_| r#"{"region":"eu"}"#).collect();
            clients[worker]
                .execute(
                    "INSERT INTO raw (id, source, \"timestamp\", data, metadata, processed_at) \
                     SELECT id, source, ts, data::jsonb, metadata::jsonb, now() \
                     FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]) \
                     AS b(id, source, ts, data, metadata) ON CONFLICT (id) DO NOTHING",
                    &[&ids, &sources, &ts, &data, &metadata],
                )
                .await
                .expect("raw insert");
        }
    })
    .await
}

async fn sink(db: &TestDatabase, events: Arc<Vec<Event>>, batch: usize, connections: usize) -> f64 {
    let settings = PostgresSettings::from_url(&format!(
        "{}?table=sink&connections={connections}",
        db.url()
    ))
    .expect("settings");
    let sink = PostgresSink::new(settings);
    // The table is created by the first write; not part of the timing.
    sink.write(&events[..1], 1).await.expect("create");
    drive(events, batch, connections, move |_, batch| {
        let sink = Arc::clone(&sink);
        async move { sink.write(&batch, 1).await.expect("sink write") }
    })
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (n, batch, connections) = (
        knob("BENCH_EVENTS", 100_000),
        knob("BENCH_BATCH", 256),
        knob("BENCH_CONNECTIONS", 4),
    );
    let db = TestDatabase::create();
    println!("PostgreSQL insert, {n} events, batches of {batch}, {connections} connections");
    println!("{:<28} {:>12} {:>8}", "writer", "events/s", "share");
    // Alternated, twice each, so a drift of the machine hits both; the best of each.
    let (mut raw_rates, mut sink_rates) = (Vec::new(), Vec::new());
    for round in 0..2 {
        let raw_events = Arc::new(sensor_events(&format!("raw{round}"), n));
        raw_rates.push(raw(&db, raw_events, batch, connections).await);
        db.query("DROP TABLE raw");
        let sink_events = Arc::new(sensor_events(&format!("sink{round}"), n));
        sink_rates.push(sink(&db, sink_events, batch, connections).await);
        db.query("DROP TABLE sink");
    }
    let best = |rates: &[f64]| rates.iter().copied().fold(0.0, f64::max);
    let (raw_rate, sink_rate) = (best(&raw_rates), best(&sink_rates));
    println!(
        "{:<28} {:>12.0} {:>7.0}%",
        "raw tokio-postgres loop", raw_rate, 100.0
    );
    println!(
        "{:<28} {:>12.0} {:>7.0}%",
        "conveyor PostgresSink",
        sink_rate,
        100.0 * sink_rate / raw_rate
    );
}

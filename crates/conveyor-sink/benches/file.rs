//! What `durable = true` costs the file sink: the same events written by the same workers
//! into a fresh file, with and without an `fdatasync` per batch, in the same run, on the file
//! system of the current directory (`BENCH_DIR` to choose another). Prints events/s and
//! batches/s for both, and the rotating + gzip case.
//!
//! `cargo bench -p conveyor-sink --bench file` (or `make bench`).
//! Knobs: `BENCH_EVENTS` (100000), `BENCH_BATCH` (256), `BENCH_WORKERS` (4).

use std::sync::Arc;

use conveyor_sink::{FileSettings, FileSink, Sink};
use conveyor_testkit::bench::{knob, sensor_events};
use conveyor_testkit::publish_rate;

fn main() {
    let total = knob("BENCH_EVENTS", 100_000);
    let batch = knob("BENCH_BATCH", 256);
    let workers = knob("BENCH_WORKERS", 4);
    let base = std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into());
    let dir = tempfile::tempdir_in(&base).expect("a temp dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let events = Arc::new(sensor_events("bench", total));
    println!(
        "{total} events, writes of {batch} from {workers} workers, into {}",
        dir.path().display()
    );
    println!("| file sink | events/s | batches/s |");
    println!("|---|---:|---:|");
    let cases: [(&str, serde_json::Value); 3] = [
        ("plain", serde_json::json!({})),
        ("durable = true", serde_json::json!({"durable": true})),
        (
            "rotate_bytes = 8 MiB, gzip = true",
            serde_json::json!({"rotate_bytes": 8 << 20, "gzip": true}),
        ),
    ];
    for (n, (label, extra)) in cases.into_iter().enumerate() {
        let mut table = extra.as_object().cloned().unwrap_or_default();
        let path = dir.path().join(format!("case{n}/out.ndjson"));
        table.insert("path".into(), path.to_str().expect("utf-8").into());
        let sink = Arc::new(
            FileSink::with(FileSettings::from_settings(&table).expect("settings")).expect("open"),
        );
        let events = Arc::clone(&events);
        let rate = runtime.block_on(publish_rate(total, workers, batch, move |range| {
            let (sink, events) = (Arc::clone(&sink), Arc::clone(&events));
            async move {
                sink.write(&events[range], 1).await.expect("write");
            }
        }));
        println!("| {label} | {rate:.0} | {:.0} |", rate / batch as f64);
    }
}

//! Request decoding: one seed-shaped JSON event (parse + validate), and an NDJSON batch of
//! 1,000 events, with allocations per event.
//!
//! Run: `cargo bench -p conveyor-core --bench decode`

use std::alloc::System;
use std::hint::black_box;

use conveyor_core::{BatchContext, Limits, body, validate, validate_in};
use criterion::{Criterion, Throughput, criterion_group};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SINGLE: &[u8] = br#"{"source":"sensor-01","data":{"temperature":23.5,"unit":"C","ok":true},"metadata":{"location":"warehouse-A"}}"#;

fn ndjson(lines: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..lines {
        out.extend_from_slice(
            format!("{{\"id\":\"e-{i}\",\"source\":\"sensor-{}\",\"data\":{{\"temperature\":23.5,\"seq\":{i}}},\"metadata\":{{\"location\":\"warehouse-A\"}}}}\n", i % 10).as_bytes(),
        );
    }
    out
}

fn decode_single(limits: &Limits) {
    let draft = body::parse_event(black_box(SINGLE), None).expect("valid");
    black_box(validate(draft, limits).expect("valid"));
}

/// As ingest does it: one [`BatchContext`] per request.
fn decode_batch(bytes: &[u8], limits: &Limits) {
    let mut shared = BatchContext::default();
    for draft in body::parse_batch(black_box(bytes), true, 10_000).expect("splits") {
        black_box(validate_in(draft.expect("valid"), limits, &mut shared).expect("valid"));
    }
}

fn report_allocations() {
    let limits = Limits::default();
    let region = Region::new(GLOBAL);
    for _ in 0..1000 {
        decode_single(&limits);
    }
    println!(
        "JSON single event (parse + validate, id generated): {:.1} allocations per event",
        region.change().allocations as f64 / 1000.0
    );
    let batch = ndjson(1000);
    let region = Region::new(GLOBAL);
    decode_batch(&batch, &limits);
    println!(
        "NDJSON batch of 1000 (parse + validate, client ids): {:.1} allocations per event",
        region.change().allocations as f64 / 1000.0
    );
}

fn benches(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("json_single_event", |b| b.iter(|| decode_single(&limits)));
    let batch = ndjson(1000);
    group.throughput(Throughput::Elements(1000));
    group.bench_function("ndjson_batch_1000", |b| {
        b.iter(|| decode_batch(&batch, &limits))
    });
    group.finish();
}

criterion_group!(decode, benches);

fn main() {
    report_allocations();
    decode();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

//! Protobuf: an event to and from the wire (what travels to the processor's `/enqueue` and
//! through NATS), singly and as a batch of 256.
//!
//! Run: `cargo bench -p conveyor-proto --bench protobuf`

use std::alloc::System;
use std::collections::BTreeMap;
use std::hint::black_box;

use bytes::Bytes;
use conveyor_core::{ContentType, Event};
use conveyor_proto::v1;
use criterion::{Criterion, Throughput, criterion_group};
use prost::Message;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn event(i: usize) -> Event {
    Event {
        id: format!("0193f1a2-7c4e-7d3a-9b1e-{i:012}").into(),
        source: "sensor-01".into(),
        timestamp_ms: 1_795_000_000_000,
        payload: Bytes::from_static(br#"{"temperature":23.5,"unit":"C","ok":true}"#),
        content_type: ContentType::Json,
        metadata: BTreeMap::from([("location".to_owned(), "warehouse-A".to_owned())]).into(),
        attempt: 1,
        headers: BTreeMap::new(),
    }
}

fn roundtrip(event: Event) -> Event {
    let bytes = Bytes::from(conveyor_proto::event_to_wire(event).encode_to_vec());
    conveyor_proto::event_from_wire(v1::Event::decode(black_box(bytes)).expect("decodes"))
}

fn report_allocations() {
    let events: Vec<Event> = (0..1000).map(event).collect();
    let region = Region::new(GLOBAL);
    for e in events {
        black_box(roundtrip(e));
    }
    println!(
        "protobuf event encode + decode: {:.1} allocations per event",
        region.change().allocations as f64 / 1000.0
    );
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("protobuf");
    group.throughput(Throughput::Elements(1));
    group.bench_function("event_encode", |b| {
        b.iter_batched(
            || event(7),
            |e| black_box(conveyor_proto::event_to_wire(e).encode_to_vec()),
            criterion::BatchSize::SmallInput,
        )
    });
    let wire = Bytes::from(conveyor_proto::event_to_wire(event(7)).encode_to_vec());
    group.bench_function("event_decode", |b| {
        b.iter(|| {
            black_box(conveyor_proto::event_from_wire(
                v1::Event::decode(wire.clone()).expect("decodes"),
            ))
        })
    });
    let batch = Bytes::from(
        v1::EventBatch {
            events: (0..256)
                .map(|i| conveyor_proto::event_to_wire(event(i)))
                .collect(),
        }
        .encode_to_vec(),
    );
    group.throughput(Throughput::Elements(256));
    group.bench_function("event_batch_256_decode", |b| {
        b.iter(|| black_box(v1::EventBatch::decode(batch.clone()).expect("decodes")))
    });
    group.finish();
}

criterion_group!(protobuf, benches);

fn main() {
    report_allocations();
    protobuf();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

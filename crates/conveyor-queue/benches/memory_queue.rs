//! Memory queue: one event's publish + fetch + ack, singly and in batches, with allocations per
//! event counted by an instrumented global allocator.
//!
//! Run: `cargo bench -p conveyor-queue --bench memory_queue`

use std::alloc::System;
use std::hint::black_box;

use conveyor_queue::conformance::event;
use conveyor_queue::{MemoryQueue, MemoryQueueConfig, Settlement};
use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use futures_util::FutureExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn queue(dedupe_window: usize) -> MemoryQueue {
    MemoryQueue::new(MemoryQueueConfig {
        capacity: 1 << 20,
        dedupe_window,
    })
}

/// Publishes `batch` events, fetches them and acks each: one cycle.
fn cycle(queue: &MemoryQueue, events: Vec<conveyor_core::Event>) {
    let batch = events.len();
    for result in queue.try_publish(events) {
        black_box(result.expect("stored"));
    }
    for delivery in queue.try_fetch(batch) {
        let (_event, handle) = delivery.into_parts();
        handle
            .settle(Settlement::Ack)
            .now_or_never()
            .expect("memory settles at once")
            .expect("ack");
    }
}

fn report_allocations() {
    for (name, dedupe, batch) in [
        ("single, dedupe on", 100_000, 1),
        ("batch 256, dedupe on", 100_000, 256),
        ("batch 256, dedupe off", 0, 256),
    ] {
        let q = queue(dedupe);
        let rounds = 2_000;
        // Warm up (first allocations of the ring and the window are not per-event costs).
        for r in 0..rounds {
            cycle(
                &q,
                (0..batch).map(|i| event(&format!("w{r}-{i}"))).collect(),
            );
        }
        let mut allocations = 0;
        for r in 0..rounds {
            let events: Vec<_> = (0..batch).map(|i| event(&format!("m{r}-{i}"))).collect();
            let region = Region::new(GLOBAL);
            cycle(&q, events);
            allocations += region.change().allocations;
        }
        println!(
            "memory queue {name}: {:.2} allocations per event (publish + fetch + ack)",
            allocations as f64 / (rounds * batch) as f64
        );
    }
}

fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_queue");
    for (name, dedupe, batch) in [
        ("single", 100_000usize, 1usize),
        ("batch_256", 100_000, 256),
        ("batch_256_no_dedupe", 0, 256),
    ] {
        let q = queue(dedupe);
        let mut n = 0u64;
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("publish_fetch_ack/{name}"), |b| {
            b.iter_batched(
                || {
                    n += 1;
                    (0..batch)
                        .map(|i| event(&format!("{n}-{i}")))
                        .collect::<Vec<_>>()
                },
                |events| cycle(&q, events),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(memory_queue, benches);

fn main() {
    report_allocations();
    memory_queue();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

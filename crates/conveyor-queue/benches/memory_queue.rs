//! Memory queue: one event's publish + fetch + ack, singly and in batches (acks settled
//! together, as the worker pool settles a batch), with allocations per
//! event counted by an instrumented global allocator.
//!
//! Run: `cargo bench -p conveyor-queue --bench memory_queue`

use std::alloc::System;
use std::hint::black_box;

use conveyor_core::Event;
use conveyor_queue::{Handle, MemoryQueue, MemoryQueueConfig, Settlement};
use criterion::{BatchSize, Criterion, Throughput, criterion_group};
use futures_util::FutureExt;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A test event as intake hands it over, with its payload already shared: `Bytes` built from a
/// `Vec` allocates its reference count on the first clone, wherever that happens, and that
/// allocation belongs to building the event, not to queueing it.
fn event(id: &str) -> Event {
    let event = conveyor_queue::conformance::event(id);
    drop(event.payload.clone());
    event
}

fn queue(dedupe_window: usize) -> MemoryQueue {
    MemoryQueue::new(MemoryQueueConfig {
        capacity: 1 << 20,
        dedupe_window,
    })
}

/// Publishes `batch` events, fetches them and acks them together: one cycle. Returns the
/// delivered events, as a consumer would keep them, so that freeing the test events' own
/// memory is not counted as the queue's work.
fn cycle(queue: &MemoryQueue, events: Vec<Event>) -> Vec<Event> {
    let batch = events.len();
    for result in queue.try_publish(events) {
        black_box(result.expect("stored"));
    }
    let mut delivered = Vec::with_capacity(batch);
    let handles = queue.try_fetch(batch).into_iter().map(|delivery| {
        let (event, handle) = delivery.into_parts();
        delivered.push(event);
        handle
    });
    let errors = Handle::settle_all(handles, Settlement::Ack)
        .now_or_never()
        .expect("memory settles at once");
    assert!(errors.is_empty(), "acks: {errors:?}");
    delivered
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
            let delivered = cycle(&q, events);
            allocations += region.change().allocations;
            drop(delivered);
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
                        .collect::<Vec<Event>>()
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

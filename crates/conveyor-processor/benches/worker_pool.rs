//! Worker pool dispatch: events already in the memory queue, through the pool (fetch, seen-id
//! check, empty pipeline, blackhole sink, seen-id insert, ack). Measures the pool's own cost
//! per event, and allocations per event.
//!
//! Run: `cargo bench -p conveyor-processor --bench worker_pool`

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor_processor::dlq::MemoryDeadLetters;
use conveyor_processor::pipeline::Pipeline;
use conveyor_processor::sink::BlackholeSink;
use conveyor_processor::{Processor, ProcessorConfig};
use conveyor_queue::conformance::event;
use conveyor_queue::{MemoryQueue, MemoryQueueConfig};
use criterion::{Criterion, Throughput, criterion_group};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const EVENTS: usize = 20_000;

/// Starts a pool of `workers` on a fresh queue, feeds it `events` and waits until all are
/// processed; returns the time from the first publish to the last ack.
async fn run_pool(workers: usize, events: Vec<conveyor_core::Event>) -> Duration {
    let count = events.len() as u64;
    let queue = MemoryQueue::new(MemoryQueueConfig {
        capacity: events.len() + 1,
        dedupe_window: 100_000,
    });
    let processor = Processor::new(
        Arc::new(queue.clone()),
        Pipeline::default(),
        Arc::new(BlackholeSink),
        Arc::new(MemoryDeadLetters::new(16)),
        ProcessorConfig {
            workers,
            ..ProcessorConfig::default()
        },
    );
    let mut pool = processor.start();
    let started = Instant::now();
    queue.try_publish(events);
    // Poll sparingly: the check itself allocates (a stats snapshot) and must not be counted
    // as the pool's cost.
    while processor.stats().await.pool.processed < count {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let elapsed = started.elapsed();
    processor.drain(&mut pool, Duration::from_secs(5)).await;
    elapsed
}

fn batch(tag: u64) -> Vec<conveyor_core::Event> {
    (0..EVENTS).map(|i| event(&format!("{tag}-{i}"))).collect()
}

fn report_allocations(runtime: &tokio::runtime::Runtime) {
    runtime.block_on(run_pool(4, batch(0)));
    let events = batch(1);
    let region = Region::new(GLOBAL);
    runtime.block_on(run_pool(4, events));
    let change = region.change();
    println!(
        "worker pool (4 workers): {:.2} allocations per event (fetch, dispatch, sink call, ack; queue setup included)",
        change.allocations as f64 / EVENTS as f64
    );
}

fn benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    report_allocations(&runtime);
    let mut group = c.benchmark_group("worker_pool");
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.sample_size(20);
    for workers in [1usize, 4] {
        let mut tag = 10u64;
        group.bench_function(format!("dispatch_{EVENTS}_events/{workers}_workers"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    tag += 1;
                    total += runtime.block_on(run_pool(workers, batch(tag)));
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(worker_pool, benches);

fn main() {
    worker_pool();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

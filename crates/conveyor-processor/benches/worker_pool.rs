//! Worker pool dispatch: events published to the memory queue of a running pool, through the
//! pool (fetch, claim by id, empty pipeline, blackhole sink, record the id as written, ack the
//! batch). Measures the pool's cost per event in the steady state, publish included, and
//! allocations per event.
//!
//! Run: `cargo bench -p conveyor-processor --bench worker_pool`

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor_pipeline::{DEFAULT_SINK, Pipelines};
use conveyor_processor::routing::Routing;
use conveyor_processor::{WorkerPool, WorkerPoolConfig};
use conveyor_queue::conformance::event;
use conveyor_queue::dlq::MemoryDeadLetters;
use conveyor_queue::{MemoryQueue, MemoryQueueConfig};
use conveyor_sink::BlackholeSink;
use criterion::{Criterion, Throughput, criterion_group};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const EVENTS: usize = 20_000;

/// A running pool of `workers` on a memory queue, kept across iterations so that what is
/// measured is the steady state (the seen-id window full and evicting, every buffer grown), not
/// a fresh process's first page faults.
struct Running {
    queue: MemoryQueue,
    processor: Arc<WorkerPool>,
    pool: tokio::task::JoinSet<()>,
    published: u64,
}

impl Running {
    fn start(workers: usize) -> Self {
        let queue = MemoryQueue::new(MemoryQueueConfig {
            capacity: 1 << 20,
            dedupe_window: 0,
        });
        let processor = WorkerPool::new(
            Arc::new(queue.clone()),
            Routing::single(
                Pipelines::passthrough(Arc::from(vec![Arc::<str>::from(DEFAULT_SINK)])),
                Arc::new(BlackholeSink),
            )
            .expect("one sink"),
            Arc::new(MemoryDeadLetters::new(16)),
            WorkerPoolConfig {
                workers,
                ..WorkerPoolConfig::default()
            },
        );
        let pool = processor.start();
        Running {
            queue,
            processor,
            pool,
            published: 0,
        }
    }

    /// Publishes `events` (in one call, so the workers take them from a full queue) and waits
    /// until the pool has processed them all; returns the time from the publish to the last
    /// ack. The bench keeps a copy of every event, so freeing the test events' memory is not
    /// counted as the pool's work.
    async fn round(&mut self, events: Vec<conveyor_core::Event>) -> Duration {
        self.published += events.len() as u64;
        let kept = events.clone();
        let started = Instant::now();
        self.queue.try_publish(events);
        while self.processor.processed() < self.published {
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        let elapsed = started.elapsed();
        drop(kept);
        elapsed
    }

    async fn stop(mut self) {
        self.processor
            .drain(&mut self.pool, Duration::from_secs(5))
            .await;
    }
}

fn batch(tag: u64) -> Vec<conveyor_core::Event> {
    (0..EVENTS)
        .map(|i| {
            let event = event(&format!("{tag}-{i}"));
            // Shared now, as intake's events are by the time a worker sees them (`Bytes` from a
            // `Vec` allocates its reference count on the first clone).
            drop(event.payload.clone());
            event
        })
        .collect()
}

/// Enough rounds to fill the default seen-id window (100,000), so eviction is in the cost.
const WARM_UP_ROUNDS: u64 = 6;

fn warm(runtime: &tokio::runtime::Runtime, running: &mut Running, tag: &mut u64) {
    for _ in 0..WARM_UP_ROUNDS {
        *tag += 1;
        runtime.block_on(running.round(batch(*tag)));
    }
}

fn report_allocations(runtime: &tokio::runtime::Runtime) {
    let mut running = runtime.block_on(async { Running::start(4) });
    let mut tag = 0;
    warm(runtime, &mut running, &mut tag);
    let events = batch(u64::MAX);
    let region = Region::new(GLOBAL);
    runtime.block_on(running.round(events));
    let change = region.change();
    runtime.block_on(running.stop());
    println!(
        "worker pool (4 workers): {:.2} allocations per event (publish, fetch, dispatch, sink call, ack)",
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
        let mut running = runtime.block_on(async { Running::start(workers) });
        let mut tag = 1_000_000 * workers as u64;
        warm(&runtime, &mut running, &mut tag);
        group.bench_function(format!("dispatch_{EVENTS}_events/{workers}_workers"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    tag += 1;
                    total += runtime.block_on(running.round(batch(tag)));
                }
                total
            })
        });
        runtime.block_on(running.stop());
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

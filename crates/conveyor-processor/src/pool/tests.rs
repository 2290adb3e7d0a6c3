//! The worker pool's unit tests, on the memory queue.

use super::*;
use conveyor_queue::dlq::MemoryDeadLetters;
use conveyor_queue::{MemoryQueue, MemoryQueueConfig};
use conveyor_sink::FileSink;

#[test]
fn backoff_doubles_and_is_capped() {
    let config = WorkerPoolConfig {
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(350),
        ..WorkerPoolConfig::default()
    };
    assert_eq!(config.backoff(1), Duration::from_millis(100));
    assert_eq!(config.backoff(2), Duration::from_millis(200));
    assert_eq!(config.backoff(3), Duration::from_millis(350));
    assert_eq!(config.backoff(60), Duration::from_millis(350));
}

/// The `--stage` quick form: these shorthands, then a file sink at `path`.
fn routing(stages: &[&str], path: &std::path::Path) -> Routing {
    let stages: Vec<String> = stages.iter().map(|s| (*s).to_owned()).collect();
    Routing::single(
        conveyor_pipeline::Pipelines::from_shorthands(&stages).expect("stages"),
        Arc::new(FileSink::open(path).expect("sink")),
    )
    .expect("routing")
}

fn event(id: &str, poison: bool) -> Event {
    let mut event = conveyor_queue::conformance::event(id);
    if poison {
        std::sync::Arc::make_mut(&mut event.metadata).insert("poison".into(), "yes".into());
    }
    event
}

#[tokio::test]
async fn writes_good_events_once_and_dead_letters_poison_after_max_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.ndjson");
    let queue = MemoryQueue::new(MemoryQueueConfig::default());
    let processor = WorkerPool::new(
        Arc::new(queue.clone()),
        routing(&["fail-if:poison=yes"], &path),
        Arc::new(MemoryDeadLetters::new(10)),
        WorkerPoolConfig {
            workers: 2,
            max_attempts: 3,
            backoff_initial: Duration::from_millis(5),
            ..WorkerPoolConfig::default()
        },
    );
    let mut events: Vec<Event> = (0..100).map(|i| event(&format!("ok-{i}"), false)).collect();
    events.push(event("bad", true));
    queue.try_publish(events);
    let mut workers = processor.start();
    assert!(
        processor.drain(&mut workers, Duration::from_secs(10)).await,
        "drains"
    );

    let text = std::fs::read_to_string(&path).expect("sink file");
    assert_eq!(text.lines().count(), 100, "every good event written once");
    let stats = processor.stats().await;
    assert_eq!(stats.pool.processed, 100);
    assert_eq!(stats.pool.dead_lettered, 1);
    assert_eq!(
        stats.pool.retried, 2,
        "two retries before the third, last attempt"
    );
    let (size, letters) = processor.dead_letters().list(10).await;
    assert_eq!(size, 1);
    assert_eq!(letters[0].attempts, 3);
    assert!(letters[0].error.contains("fail-if"));
    assert_eq!((stats.queue.size, stats.queue.in_flight), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_delivery_of_an_event_in_progress_waits_and_is_not_written_twice() {
    // A broker that redelivers an event while a worker still has it (its ack deadline
    // passed) hands the copy to another worker. Here: the same id twice in a queue that
    // does not dedupe, a slow stage, and two workers taking one event each.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.ndjson");
    let queue = MemoryQueue::new(MemoryQueueConfig {
        dedupe_window: 0,
        ..MemoryQueueConfig::default()
    });
    let processor = WorkerPool::new(
        Arc::new(queue.clone()),
        routing(&["cpu:20000"], &path),
        Arc::new(MemoryDeadLetters::new(10)),
        WorkerPoolConfig {
            workers: 2,
            batch_size: 1,
            backoff_initial: Duration::from_millis(5),
            ..WorkerPoolConfig::default()
        },
    );
    queue.try_publish(vec![event("twice", false), event("twice", false)]);
    let mut workers = processor.start();
    assert!(
        processor.drain(&mut workers, Duration::from_secs(20)).await,
        "drains"
    );
    let text = std::fs::read_to_string(&path).expect("sink file");
    assert_eq!(text.lines().count(), 1, "written once: {text}");
    let stats = processor.stats().await;
    assert_eq!((stats.pool.processed, stats.pool.duplicates), (1, 1));
    // The path this test is named for ran: the copy came while the first was in hand.
    assert!(
        stats.pool.deferred >= 1,
        "the second delivery never found the first in progress: {:?}",
        stats.pool
    );
}

/// A file sink whose first `failures` writes fail (a sink that is down for a while).
struct FlakySink {
    inner: FileSink,
    failures: std::sync::atomic::AtomicU32,
}

#[async_trait::async_trait]
impl conveyor_sink::Sink for FlakySink {
    async fn write(
        &self,
        events: &[Event],
        processed_at_ms: u64,
    ) -> Result<(), conveyor_sink::SinkError> {
        let left = self.failures.load(Ordering::Relaxed);
        if left > 0 {
            self.failures.store(left - 1, Ordering::Relaxed);
            return Err(conveyor_sink::SinkError::retryable(
                "flaky",
                "down for a while",
            ));
        }
        self.inner.write(events, processed_at_ms).await
    }

    fn describe(&self) -> String {
        "flaky".into()
    }
}

#[tokio::test]
async fn fan_out_retries_only_the_sink_that_failed_and_writes_each_sink_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (steady_path, flaky_path) = (dir.path().join("steady"), dir.path().join("flaky"));
    let config = conveyor_pipeline::Config::parse(
        std::path::Path::new("fan-out.toml"),
        r#"
[defaults]
route = ["steady"]

[sinks.steady]
type = "blackhole"

[sinks.flaky]
type = "blackhole"

[[pipelines]]
name = "both"
route = [ { to = ["steady", "flaky"] } ]
"#,
    )
    .expect("config");
    let routing = Routing::new(
        config.pipelines,
        vec![
            (
                "steady".to_owned(),
                Arc::new(FileSink::open(&steady_path).expect("sink"))
                    as Arc<dyn conveyor_sink::Sink>,
            ),
            (
                "flaky".to_owned(),
                Arc::new(FlakySink {
                    inner: FileSink::open(&flaky_path).expect("sink"),
                    failures: 3.into(),
                }),
            ),
        ],
    )
    .expect("routing");
    let queue = MemoryQueue::new(MemoryQueueConfig::default());
    let processor = WorkerPool::new(
        Arc::new(queue.clone()),
        routing,
        Arc::new(MemoryDeadLetters::new(10)),
        WorkerPoolConfig {
            workers: 2,
            batch_size: 16,
            max_attempts: 10,
            backoff_initial: Duration::from_millis(5),
            ..WorkerPoolConfig::default()
        },
    );
    queue.try_publish((0..100).map(|i| event(&format!("f-{i}"), false)).collect());
    let mut workers = processor.start();
    assert!(
        processor.drain(&mut workers, Duration::from_secs(20)).await,
        "drains"
    );
    for path in [&steady_path, &flaky_path] {
        let text = std::fs::read_to_string(path).expect("sink file");
        let mut ids: Vec<&str> = text
            .lines()
            .map(|l| l.split('"').nth(3).expect("an id"))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            (text.lines().count(), ids.len()),
            (100, 100),
            "{}: every event once",
            path.display()
        );
    }
    let stats = processor.stats().await;
    assert_eq!(stats.pool.processed, 100);
    assert!(
        stats.pool.retried >= 3,
        "the flaky sink's events were retried: {:?}",
        stats.pool
    );
}

#[tokio::test]
async fn with_several_sinks_a_redelivery_after_a_crash_is_not_written_again() {
    // A crash after the write and before the ack: the sink holds the events, the queue hands
    // them out again. With one sink the per-event window (seeded from it) catches them; with
    // several, the per-sink window must.
    let dir = tempfile::tempdir().expect("tempdir");
    let (a_path, b_path) = (dir.path().join("a"), dir.path().join("b"));
    let before: Vec<Event> = (0..20).map(|i| event(&format!("c-{i}"), false)).collect();
    conveyor_sink::Sink::write(&FileSink::open(&a_path).expect("sink"), &before, 1)
        .await
        .expect("written before the crash");
    let config = conveyor_pipeline::Config::parse(
        std::path::Path::new("crash.toml"),
        "[defaults]\nroute = [\"a\"]\n\n[sinks.a]\ntype = \"blackhole\"\n\n[sinks.b]\ntype = \"blackhole\"\n\n[[pipelines]]\nname = \"to-b\"\nmatch = '.source == \"b\"'\nroute = [ { to = [\"b\"] } ]\n",
    )
    .expect("config");
    let routing = Routing::new(
        config.pipelines,
        vec![
            (
                "a".to_owned(),
                Arc::new(FileSink::open(&a_path).expect("sink")) as Arc<dyn conveyor_sink::Sink>,
            ),
            (
                "b".to_owned(),
                Arc::new(FileSink::open(&b_path).expect("sink")),
            ),
        ],
    )
    .expect("routing");
    let queue = MemoryQueue::new(MemoryQueueConfig::default());
    let processor = WorkerPool::new(
        Arc::new(queue.clone()),
        routing,
        Arc::new(MemoryDeadLetters::new(10)),
        WorkerPoolConfig::default(),
    );
    processor.remember_sink().await;
    let mut again = before.clone();
    again.extend((20..30).map(|i| event(&format!("c-{i}"), false)));
    queue.try_publish(again);
    let mut workers = processor.start();
    assert!(
        processor.drain(&mut workers, Duration::from_secs(20)).await,
        "drains"
    );
    let text = std::fs::read_to_string(&a_path).expect("sink a");
    assert_eq!(
        text.lines().count(),
        30,
        "the 20 redelivered are not written twice: {text}"
    );
}

/// A file sink that refuses for good every event whose id starts with `bad`, writing the
/// rest of the batch (what a database does with a row that breaks a constraint).
struct PickySink {
    inner: FileSink,
}

#[async_trait::async_trait]
impl conveyor_sink::Sink for PickySink {
    async fn write(
        &self,
        events: &[Event],
        processed_at_ms: u64,
    ) -> Result<(), conveyor_sink::SinkError> {
        let (bad, good): (Vec<(usize, &Event)>, Vec<(usize, &Event)>) = events
            .iter()
            .enumerate()
            .partition(|(_, e)| e.id.starts_with("bad"));
        let good: Vec<Event> = good.into_iter().map(|(_, e)| e.clone()).collect();
        self.inner.write(&good, processed_at_ms).await?;
        if bad.is_empty() {
            return Ok(());
        }
        Err(conveyor_sink::SinkError::rejected(
            "picky",
            format!("{} rows refused", bad.len()),
            bad.into_iter()
                .map(|(at, e)| (at, format!("row {} violates check constraint", e.id)))
                .collect(),
        ))
    }

    fn describe(&self) -> String {
        "picky".into()
    }
}

/// A pool on a memory queue with no stages and `sink`, and a DLQ of 100.
fn pool_writing_to(
    sink: Arc<dyn conveyor_sink::Sink>,
    config: WorkerPoolConfig,
) -> (MemoryQueue, Arc<WorkerPool>) {
    let no_stages = conveyor_pipeline::Pipelines::from_shorthands(&[]).expect("no stages");
    let queue = MemoryQueue::new(MemoryQueueConfig::default());
    let pool = WorkerPool::new(
        Arc::new(queue.clone()),
        Routing::single(no_stages, sink).expect("routing"),
        Arc::new(MemoryDeadLetters::new(100)),
        config,
    );
    (queue, pool)
}

#[tokio::test]
async fn a_sink_down_longer_than_max_attempts_loses_nothing_and_dead_letters_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.ndjson");
    let (queue, processor) = pool_writing_to(
        Arc::new(FlakySink {
            inner: FileSink::open(&path).expect("sink"),
            failures: 40.into(),
        }),
        WorkerPoolConfig {
            workers: 2,
            batch_size: 8,
            max_attempts: 2,
            backoff_initial: Duration::from_millis(2),
            sink_backoff_max: Duration::from_millis(20),
            ..WorkerPoolConfig::default()
        },
    );
    queue.try_publish((0..50).map(|i| event(&format!("d-{i}"), false)).collect());
    let mut workers = processor.start();
    // While it fails, the sink is reported unhealthy with its error.
    let unhealthy = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let stats = processor.stats().await;
            if let Some(sink) = stats.sinks.first().filter(|s| !s.healthy) {
                return sink.clone();
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the sink is seen unhealthy while it fails");
    assert!(unhealthy.failing_since_ms.is_some(), "{unhealthy:?}");
    assert!(
        unhealthy
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("down for a while")),
        "{unhealthy:?}"
    );
    assert!(
        processor.drain(&mut workers, Duration::from_secs(20)).await,
        "drains"
    );
    let text = std::fs::read_to_string(&path).expect("sink file");
    assert_eq!(text.lines().count(), 50, "every event written once: {text}");
    let stats = processor.stats().await;
    assert_eq!(
        (
            stats.pool.processed,
            stats.pool.dead_lettered,
            stats.dlq_size
        ),
        (50, 0, 0),
        "a sink being down sends nothing to the DLQ: {:?}",
        stats.pool
    );
    let sink = &stats.sinks[0];
    assert!(
        sink.healthy,
        "healthy again once writes go through: {sink:?}"
    );
    assert_eq!(sink.written, 50, "{sink:?}");
    assert!(
        sink.retried >= 40,
        "each failed write's events retried: {sink:?}"
    );
}

#[tokio::test]
async fn events_a_sink_refuses_for_good_go_to_the_dlq_at_once_and_the_rest_are_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.ndjson");
    let (queue, processor) = pool_writing_to(
        Arc::new(PickySink {
            inner: FileSink::open(&path).expect("sink"),
        }),
        WorkerPoolConfig {
            workers: 2,
            batch_size: 16,
            max_attempts: 5,
            backoff_initial: Duration::from_millis(2),
            ..WorkerPoolConfig::default()
        },
    );
    let mut events: Vec<Event> = (0..40).map(|i| event(&format!("ok-{i}"), false)).collect();
    events.insert(7, event("bad-1", false));
    events.insert(20, event("bad-2", false));
    queue.try_publish(events);
    let mut workers = processor.start();
    assert!(
        processor.drain(&mut workers, Duration::from_secs(10)).await,
        "drains"
    );
    let text = std::fs::read_to_string(&path).expect("sink file");
    assert_eq!(text.lines().count(), 40, "the good events, each once");
    assert!(!text.contains("bad-"), "{text}");
    let (size, letters) = processor.dead_letters().list(10).await;
    assert_eq!(size, 2);
    for letter in &letters {
        assert_eq!(letter.attempts, 1, "dead-lettered at once: {letter:?}");
        assert!(
            letter.error.starts_with("sink picky: row bad-")
                && letter.error.contains("violates check constraint"),
            "the sink's own text: {}",
            letter.error
        );
    }
    let stats = processor.stats().await;
    assert_eq!((stats.pool.processed, stats.pool.retried), (40, 0));
    assert_eq!((stats.sinks[0].written, stats.sinks[0].rejected), (40, 2));
    assert!(
        stats.sinks[0].healthy,
        "a refusal is an answer: {:?}",
        stats.sinks[0]
    );
}

#[test]
fn sink_backoff_is_capped_jittered_and_honours_retry_after() {
    let config = WorkerPoolConfig {
        backoff_initial: Duration::from_millis(100),
        sink_backoff_max: Duration::from_millis(400),
        ..WorkerPoolConfig::default()
    };
    for attempt in [1, 2, 3, 30] {
        let base = config.backoff(attempt).min(Duration::from_millis(400));
        let delay = config.sink_backoff(attempt, None);
        assert!(
            delay >= base && delay <= base.mul_f64(1.5),
            "{attempt}: {delay:?}"
        );
    }
    assert_eq!(
        config.sink_backoff(1, Some(Duration::from_secs(7))),
        Duration::from_secs(7),
        "no sooner than the server asked"
    );
}

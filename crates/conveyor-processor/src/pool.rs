//! The worker pool.
//!
//! Each worker owns a consumer and loops: fetch a batch, skip ids already processed, run the
//! pipelines (on the blocking pool when a stage may be slow), write what they route to each sink
//! in one call per sink, then ack; drops are acked. A stage's retryable failure is nacked with
//! backoff or, after the last attempt, dead-lettered and terminated; a sink's retryable failure
//! is nacked with a capped, jittered backoff (or the sink's `retry_after`) for as long as the
//! sink stays down (see [`conveyor_sink`]); permanent failures, of a stage or a sink, are
//! dead-lettered at once.
//!
//! Shutdown ([`WorkerPool::drain`]): with a durable queue (a broker) workers finish the batch in
//! hand and stop, leaving the rest in the broker. With the memory queue, everything the queue
//! holds was promised to clients, so workers keep going until it is empty (bounded by the drain
//! timeout).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_api::trace;

use crate::metrics;

use conveyor_core::stats::{ConfigState, PoolStats, ProcessorStats, ReplayReport};
use conveyor_core::{Event, REPLAY_HEADER, now_ms};
use conveyor_queue::{Consumer, Delivery, Handle, Health, Queue, Settlement};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::routing::{NamedSink, Routing};
use crate::seen::{Claim, SeenIds};
use conveyor_pipeline::{Outcome, Routed};
use conveyor_queue::dlq::{DeadLetter, DeadLetterQueue};
use conveyor_sink::{ErrorKind, SinkError};

#[derive(Debug, Clone)]
pub struct WorkerPoolConfig {
    pub workers: usize,
    /// Most deliveries a worker takes at once.
    pub batch_size: usize,
    /// Deliveries of one event before it is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles per attempt up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How many processed ids are remembered for dedupe.
    pub dedupe_window: usize,
    /// Longest delay before retrying events whose sink failed (they are retried until
    /// written, so this is how soon a sink that came back sees them again).
    pub sink_backoff_max: Duration,
}

impl Default for WorkerPoolConfig {
    fn default() -> Self {
        WorkerPoolConfig {
            workers: 4,
            batch_size: 256,
            max_attempts: 5,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            dedupe_window: 100_000,
            sink_backoff_max: Duration::from_secs(5),
        }
    }
}

impl WorkerPoolConfig {
    /// The delay before delivery `attempt + 1`, after `attempt` failed.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(20);
        self.backoff_initial
            .saturating_mul(1u32 << doublings)
            .min(self.backoff_max)
    }

    /// The delay before retrying an event whose sink failed on delivery `attempt`: the
    /// backoff capped at `sink_backoff_max`, no sooner than the sink's `retry_after`, and up to
    /// 50% longer at random so that workers which failed together do not retry in step.
    pub fn sink_backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let delay = self.backoff(attempt).min(self.sink_backoff_max);
        conveyor_core::retry::with_jitter(delay, 0.5).max(retry_after.unwrap_or_default())
    }
}

/// An event that failed: the event as it came from the queue, and why.
struct Failed {
    event: Event,
    error: String,
    retry: Retry,
}

/// What a failure means for the event's next delivery.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Retry {
    /// A stage may pass next time: retried with backoff up to `max_attempts`, then the DLQ.
    Limited,
    /// A sink could not take it now: retried until it is written (a sink being down is not
    /// the event's fault), no sooner than `after` when the sink said when.
    UntilWritten { after: Option<Duration> },
    /// It can never succeed: to the DLQ at once.
    Never,
}

/// Why an event's write failed, and what that means for it.
#[derive(Debug, Clone)]
struct WriteFailure {
    message: String,
    retry: Retry,
}

#[derive(Default)]
struct Counters {
    processed: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates: AtomicU64,
    deferred: AtomicU64,
    active: AtomicU64,
}

pub struct WorkerPool {
    queue: Arc<dyn Queue>,
    /// The pipelines and sinks now; a batch takes the current one and keeps it to the end.
    routing: std::sync::RwLock<Arc<Routing>>,
    dlq: Arc<dyn DeadLetterQueue>,
    config: WorkerPoolConfig,
    counters: Counters,
    /// Ids some worker is processing right now, and ids written recently. A second delivery
    /// of one in hand (a broker redelivered it while the first was still at work) waits; one
    /// already written is acked without writing it again.
    seen: Mutex<SeenIds>,
    /// `sink NUL id` pairs written recently, for events that go to more than one sink (or
    /// split into several): a retry after one sink failed skips the sinks that confirmed.
    partial: Mutex<SeenIds>,
    stop: watch::Sender<bool>,
    replays: AtomicU64,
    /// The config file's state, shown in the stats (set by whoever loads the file).
    config_state: Mutex<Option<ConfigState>>,
}

impl WorkerPool {
    pub fn new(
        queue: Arc<dyn Queue>,
        routing: Routing,
        dlq: Arc<dyn DeadLetterQueue>,
        config: WorkerPoolConfig,
    ) -> Arc<Self> {
        crate::metrics::register();
        Arc::new(WorkerPool {
            seen: Mutex::new(SeenIds::new(config.dedupe_window)),
            partial: Mutex::new(SeenIds::new(config.dedupe_window)),
            queue,
            routing: std::sync::RwLock::new(Arc::new(routing)),
            dlq,
            config,
            counters: Counters::default(),
            stop: watch::channel(false).0,
            replays: AtomicU64::new(0),
            config_state: Mutex::new(None),
        })
    }

    pub fn queue(&self) -> &Arc<dyn Queue> {
        &self.queue
    }

    /// The pipelines and sinks batches start with now.
    pub fn routing(&self) -> Arc<Routing> {
        Arc::clone(&self.routing.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Swaps in new pipelines and sinks: batches from now on use them; batches in flight
    /// finish with the ones they started with.
    pub async fn reload(&self, routing: Routing) {
        *self.routing.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routing);
        self.remember_sink().await;
    }

    /// Records the config file's state for the stats.
    pub fn set_config_state(&self, state: ConfigState) {
        *self.config_state.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    /// Seeds the seen-id windows with what the sinks already hold (see [`Sink::recent_ids`]).
    /// The per-event window only with a single sink: with several, an id one of them holds
    /// may still be owed to another.
    pub async fn remember_sink(&self) {
        let routing = self.routing();
        let single = routing.sinks().len() == 1;
        for named in routing.sinks() {
            match named.sink.recent_ids(self.config.dedupe_window).await {
                Ok(ids) if !ids.is_empty() => {
                    if single {
                        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                        for id in &ids {
                            seen.remember(&Arc::<str>::from(id.as_str()));
                        }
                    }
                    let mut partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
                    for id in &ids {
                        partial.remember(&partial_key(&named.name, id));
                    }
                    tracing::info!(sink = %named.name, ids = ids.len(), "seen-id window seeded from the sink");
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(sink = %named.name, %error, "cannot read back the sink; starting with an empty seen-id window")
                }
            }
        }
    }

    /// Starts the workers; the returned set finishes when they have all stopped.
    pub fn start(self: &Arc<Self>) -> JoinSet<()> {
        let mut workers = JoinSet::new();
        for worker in 0..self.config.workers.max(1) {
            workers.spawn(Arc::clone(self).run_worker(worker));
        }
        workers
    }

    /// Tells the workers to finish (see the module docs for what "finish" means per queue).
    pub fn begin_drain(&self) {
        self.stop.send_replace(true);
    }

    /// Drains: [`begin_drain`](Self::begin_drain), then waits for the workers up to `timeout`.
    /// Returns false if the timeout cut the drain short.
    pub async fn drain(&self, workers: &mut JoinSet<()>, timeout: Duration) -> bool {
        self.begin_drain();
        let finished = tokio::time::timeout(timeout, async {
            while workers.join_next().await.is_some() {}
        })
        .await
        .is_ok();
        if !finished {
            let stats = self.queue.stats().await;
            tracing::error!(
                left_in_queue = stats.size,
                in_flight = stats.in_flight,
                durable = stats.durable,
                "drain timeout reached before the queue was empty"
            );
            workers.abort_all();
        }
        finished
    }

    /// Events written to the sink and acked since start.
    pub fn processed(&self) -> u64 {
        self.counters.processed.load(Ordering::Relaxed)
    }

    pub async fn stats(&self) -> ProcessorStats {
        let c = &self.counters;
        let routing = self.routing();
        ProcessorStats {
            queue: self.queue.stats().await,
            pool: PoolStats {
                processed: c.processed.load(Ordering::Relaxed),
                dropped: c.dropped.load(Ordering::Relaxed),
                errors: c.errors.load(Ordering::Relaxed),
                retried: c.retried.load(Ordering::Relaxed),
                dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
                duplicates: c.duplicates.load(Ordering::Relaxed),
                deferred: c.deferred.load(Ordering::Relaxed),
                workers: self.config.workers as u64,
                active: c.active.load(Ordering::Relaxed),
            },
            dlq_size: self.dlq.size().await,
            sink: routing.describe(),
            pipelines: routing.pipeline_stats(),
            sinks: routing.sink_stats(),
            config: self
                .config_state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    pub async fn health(&self) -> Health {
        self.queue.health().await
    }

    pub fn dead_letters(&self) -> &Arc<dyn DeadLetterQueue> {
        &self.dlq
    }

    /// Re-publishes dead letters (those with `ids`, or all) with a fresh attempt count.
    pub async fn replay(&self, ids: Option<&[String]>) -> ReplayReport {
        let (letters, not_found) = self.dlq.take(ids).await;
        let mut report = ReplayReport {
            not_found,
            ..ReplayReport::default()
        };
        if letters.is_empty() {
            return report;
        }
        let replay = self.replays.fetch_add(1, Ordering::Relaxed);
        let events: Vec<Event> = letters
            .iter()
            .map(|letter| {
                let mut event = letter.event.clone();
                event.attempt = 0;
                // A new dedupe key, so the queue does not discard the replay as a duplicate.
                event
                    .headers
                    .insert(REPLAY_HEADER.to_owned(), format!("{}-{replay}", now_ms()));
                event
            })
            .collect();
        let mut refused = Vec::new();
        for (letter, confirm) in letters.into_iter().zip(self.queue.publish(events).await) {
            match confirm {
                Ok(_) => report.replayed += 1,
                Err(error) => {
                    tracing::warn!(id = %letter.event.id, %error, "replay refused by the queue; kept in the DLQ");
                    report.failed += 1;
                    refused.push(letter);
                }
            }
        }
        if !refused.is_empty() {
            self.dlq.put_back(refused).await;
        }
        report
    }

    async fn run_worker(self: Arc<Self>, worker: usize) {
        let mut stop = self.stop.subscribe();
        let mut consumer = match self.subscribe(&mut stop).await {
            Some(consumer) => consumer,
            None => return,
        };
        loop {
            let stopping = *stop.borrow();
            if stopping && self.drained().await {
                break;
            }
            // Short waits while draining, so the "is it empty" check comes round often.
            let wait = if stopping {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(500)
            };
            let batch = tokio::select! {
                fetched = consumer.fetch(self.config.batch_size, wait) => fetched,
                _ = stop.changed(), if !stopping => continue,
            };
            match batch {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => {
                    metrics::FETCH_BATCH_EVENTS.record(batch.len() as u64);
                    let started = Instant::now();
                    self.counters.active.fetch_add(1, Ordering::Relaxed);
                    self.process(batch).await;
                    self.counters.active.fetch_sub(1, Ordering::Relaxed);
                    let busy = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    metrics::WORKER_BUSY_MICROS.fetch_add(busy, Ordering::Relaxed);
                }
                Err(error) => {
                    // A broken consumer (e.g. the broker restarted under it) is replaced, not
                    // retried: a fresh subscription picks up where the shared consumer stands.
                    tracing::warn!(worker, %error, "fetch failed; subscribing again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    match self.subscribe(&mut stop).await {
                        Some(fresh) => consumer = fresh,
                        None => break,
                    }
                }
            }
        }
        consumer.release().await;
        tracing::debug!(worker, "worker stopped");
    }

    async fn subscribe(&self, stop: &mut watch::Receiver<bool>) -> Option<Box<dyn Consumer>> {
        loop {
            match self.queue.subscribe().await {
                Ok(consumer) => return Some(consumer),
                Err(error) => {
                    tracing::warn!(%error, "cannot subscribe to the queue; retrying");
                    if *stop.borrow() {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Whether a stopping worker may exit: at once for a durable queue, when nothing is held
    /// for the memory queue.
    async fn drained(&self) -> bool {
        if self.queue.durable() {
            return true;
        }
        let stats = self.queue.stats().await;
        stats.size == 0 && stats.in_flight == 0
    }

    async fn process(&self, batch: Vec<Delivery>) {
        let mut events = Vec::with_capacity(batch.len());
        let mut handles = Vec::with_capacity(batch.len());
        let mut duplicates = Vec::new();
        let mut busy = Vec::new();
        {
            let mut seen = self.seen();
            for delivery in batch {
                let (event, handle) = delivery.into_parts();
                match seen.claim(&event.id) {
                    Claim::Claimed => {
                        events.push(event);
                        handles.push(handle);
                    }
                    Claim::Written => duplicates.push(handle),
                    Claim::Busy => busy.push(handle),
                }
            }
        }
        // Another worker has this id in hand: ask again later, when it is written (then it is
        // acked as a duplicate) or failed (then it is processed).
        let wait = Settlement::Nack {
            delay: self.config.backoff_initial,
        };
        if !busy.is_empty() {
            self.counters
                .deferred
                .fetch_add(busy.len() as u64, Ordering::Relaxed);
            settle_all(busy, wait).await;
        }
        if !duplicates.is_empty() {
            self.counters
                .duplicates
                .fetch_add(duplicates.len() as u64, Ordering::Relaxed);
            settle_all(duplicates, Settlement::Ack).await;
        }
        if !events.is_empty() {
            self.process_claimed(events, handles).await;
        }
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, SeenIds> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the pipelines and the sinks for events this worker claimed, ends the claims, and
    /// settles the deliveries.
    async fn process_claimed(&self, events: Vec<Event>, handles: Vec<Handle>) {
        let routing = self.routing();
        let trace_start = trace::enabled().then(trace::now_ns);
        let keep_alive = self.queue.keep_alive_interval();
        // The events as they came: what a retry or the DLQ gets (a replay runs the pipelines
        // of the config then in force). Cheap: shared fields and reference counts.
        let originals = events.clone();
        let outcomes =
            while_keeping_alive(&handles, keep_alive, self.run_pipelines(&routing, events)).await;
        if outcomes.len() != originals.len() {
            // The pipeline task failed: the handles, dropped unsettled, send the events back.
            return;
        }
        let mut dropped = Vec::new();
        let mut failed = Vec::new();
        let mut routed: Vec<(Event, Handle, Vec<Routed>)> = Vec::with_capacity(outcomes.len());
        for ((outcome, original), handle) in outcomes.into_iter().zip(originals).zip(handles) {
            match outcome {
                Outcome::Routed(outputs) => routed.push((original, handle, outputs)),
                Outcome::Dropped { .. } => dropped.push((original, handle)),
                Outcome::Failed(failure) => failed.push((
                    Failed {
                        event: original,
                        error: failure.to_string(),
                        retry: if failure.retryable {
                            Retry::Limited
                        } else {
                            Retry::Never
                        },
                    },
                    handle,
                )),
            }
        }
        if let Some(start_ns) = trace_start {
            record_spans(
                start_ns,
                failed
                    .iter()
                    .map(|(failure, _)| (&failure.event, Some(failure.error.as_str())))
                    .chain(dropped.iter().map(|(event, _)| (event, None))),
            );
        }
        if !dropped.is_empty() {
            // A drop is an outcome, like a write: a redelivery is acked as a duplicate.
            {
                let mut seen = self.seen();
                for (event, _) in &dropped {
                    seen.finish(&event.id, true);
                }
            }
            self.counters
                .dropped
                .fetch_add(dropped.len() as u64, Ordering::Relaxed);
            settle_all(
                dropped.into_iter().map(|(_, h)| h).collect(),
                Settlement::Ack,
            )
            .await;
        }

        if !routed.is_empty() {
            let handles: Vec<&Handle> = routed.iter().map(|(_, h, _)| h).collect();
            let errors =
                while_keeping_alive(&handles, keep_alive, self.write_routed(&routing, &routed))
                    .await;
            if let Some(start_ns) = trace_start {
                record_spans(
                    start_ns,
                    routed.iter().zip(&errors).map(|((event, _, _), error)| {
                        (event, error.as_ref().map(|e| e.message.as_str()))
                    }),
                );
            }
            let mut written = Vec::with_capacity(routed.len());
            let mut written_handles = Vec::with_capacity(routed.len());
            for ((original, handle, outputs), error) in routed.into_iter().zip(errors) {
                match error {
                    None => {
                        written.extend(outputs.into_iter().map(|o| o.event));
                        written_handles.push((original.id, handle));
                    }
                    Some(WriteFailure { message, retry }) => failed.push((
                        Failed {
                            event: original,
                            error: message,
                            retry,
                        },
                        handle,
                    )),
                }
            }
            if !written_handles.is_empty() {
                record_written(&written);
                {
                    let mut seen = self.seen();
                    for (id, _) in &written_handles {
                        seen.finish(id, true);
                    }
                }
                self.counters
                    .processed
                    .fetch_add(written_handles.len() as u64, Ordering::Relaxed);
                settle_all(
                    written_handles.into_iter().map(|(_, h)| h).collect(),
                    Settlement::Ack,
                )
                .await;
            }
        }
        if !failed.is_empty() {
            {
                let mut seen = self.seen();
                for (failure, _) in &failed {
                    seen.finish(&failure.event.id, false);
                }
            }
            self.fail(failed).await;
        }
    }

    /// Writes every routed output to its sinks, one write call per sink (all sinks at once);
    /// per event, `None` when every sink it was routed to confirmed it, or why not.
    ///
    /// An event with more than one destination (several sinks, or split into several events),
    /// and any event when the routing has several sinks, is remembered per sink as each
    /// confirms, so its retry after a partial failure (or its redelivery after a crash, the
    /// window seeded from the sinks) writes only to the sinks that did not have it.
    async fn write_routed(
        &self,
        routing: &Routing,
        routed: &[(Event, Handle, Vec<Routed>)],
    ) -> Vec<Option<WriteFailure>> {
        let mut batches: Vec<(Vec<Event>, Vec<usize>)> =
            routing.sinks().iter().map(|_| Default::default()).collect();
        let mut errors: Vec<Option<WriteFailure>> = vec![None; routed.len()];
        // Tracked per sink: an event with more than one destination, and every event when there
        // are several sinks (the per-event window is then not seeded from the sinks after a
        // restart, so this one is what keeps a redelivery out of the sink that has it).
        let several_sinks = routing.sinks().len() > 1;
        let multi: Vec<bool> = routed
            .iter()
            .map(|(_, _, outputs)| {
                several_sinks || outputs.iter().map(|o| o.sinks.len()).sum::<usize>() > 1
            })
            .collect();
        {
            let partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
            for (item, (_, _, outputs)) in routed.iter().enumerate() {
                for output in outputs {
                    for name in output.sinks.iter() {
                        let Some(sink) = routing.sink_index(name) else {
                            // `Routing::new` checked every route's sinks: a bug, not a retry.
                            errors[item] = Some(WriteFailure {
                                message: format!("no sink named '{name}'"),
                                retry: Retry::Never,
                            });
                            continue;
                        };
                        if multi[item] && partial.is_written(&partial_key(name, &output.event.id)) {
                            continue;
                        }
                        batches[sink].0.push(output.event.clone());
                        batches[sink].1.push(item);
                    }
                }
            }
        }
        let processed_at = now_ms();
        let writes = routing
            .sinks()
            .iter()
            .zip(&batches)
            .filter(|(_, (events, _))| !events.is_empty())
            .map(|(named, (events, items))| async move {
                let result = write_to(named, events, processed_at).await;
                (named, events, items, result)
            });
        for (named, events, items, result) in futures_util::future::join_all(writes).await {
            // Which events of the batch did not make it, and why.
            let failed: Vec<(usize, WriteFailure)> = match result {
                Ok(()) => Vec::new(),
                Err(error) => {
                    let whole = |retry| {
                        (0..events.len())
                            .map(|at| {
                                let message = error.to_string();
                                (at, WriteFailure { message, retry })
                            })
                            .collect()
                    };
                    match &error.kind {
                        ErrorKind::Retryable { retry_after } => whole(Retry::UntilWritten {
                            after: *retry_after,
                        }),
                        ErrorKind::Permanent => whole(Retry::Never),
                        ErrorKind::Rejected(rejected) => rejected
                            .iter()
                            .filter(|(at, _)| *at < events.len())
                            .map(|(at, reason)| {
                                let message = format!("sink {}: {reason}", error.sink);
                                let retry = Retry::Never;
                                (*at, WriteFailure { message, retry })
                            })
                            .collect(),
                    }
                }
            };
            let mut ok = vec![true; events.len()];
            for (at, failure) in failed {
                if std::mem::replace(&mut ok[at], false) {
                    let item = items[at];
                    // A permanent failure at one sink outweighs a retryable one at another.
                    let slot = &mut errors[item];
                    if slot.as_ref().is_none_or(|e| e.retry != Retry::Never) {
                        *slot = Some(failure);
                    }
                }
            }
            let mut partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
            for ((event, &item), _) in events.iter().zip(items).zip(&ok).filter(|(_, ok)| **ok) {
                if multi[item] {
                    partial.remember(&partial_key(&named.name, &event.id));
                }
            }
        }
        errors
    }

    async fn run_pipelines(&self, routing: &Arc<Routing>, events: Vec<Event>) -> Vec<Outcome> {
        if !routing.is_cpu_heavy() {
            return routing.run_batch(events);
        }
        let routing = Arc::clone(routing);
        let claimed: Vec<Arc<str>> = events.iter().map(|e| Arc::clone(&e.id)).collect();
        match tokio::task::spawn_blocking(move || routing.run_batch(events)).await {
            Ok(outcomes) => outcomes,
            // The batch's events went down with the panicking task; their handles, dropped
            // unsettled by the caller, send them back to the queue, and their claims end here.
            Err(error) => {
                tracing::error!(%error, events = claimed.len(), "pipeline task failed");
                let mut seen = self.seen();
                for id in &claimed {
                    seen.finish(id, false);
                }
                Vec::new()
            }
        }
    }

    /// Retries with backoff, or dead-letters: after the last attempt for a stage that failed,
    /// at once for a permanent failure, never for a sink that could not take the event now.
    async fn fail(&self, failed: Vec<(Failed, Handle)>) {
        let count = failed.len() as u64;
        self.counters.errors.fetch_add(count, Ordering::Relaxed);
        let mut dlq_full = 0u64;
        let mut sample_error = None;
        for (
            Failed {
                event,
                error,
                retry,
            },
            handle,
        ) in failed
        {
            let attempt = event.attempt;
            let delay = match retry {
                Retry::Limited if attempt < self.config.max_attempts => {
                    Some(self.config.backoff(attempt))
                }
                Retry::UntilWritten { after } => Some(self.config.sink_backoff(attempt, after)),
                Retry::Limited | Retry::Never => None,
            };
            if let Some(delay) = delay {
                self.counters.retried.fetch_add(1, Ordering::Relaxed);
                settle(handle, Settlement::Nack { delay }).await;
                sample_error.get_or_insert(error);
                continue;
            }
            let letter = DeadLetter {
                event,
                error,
                attempts: attempt,
                failed_at_ms: now_ms(),
            };
            match self.dlq.push(letter).await {
                Ok(()) => {
                    self.counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    settle(handle, Settlement::Term).await;
                }
                Err(_) => {
                    // Never drop: the event waits in the queue until the DLQ has room.
                    dlq_full += 1;
                    settle(
                        handle,
                        Settlement::Nack {
                            delay: self.config.backoff_max,
                        },
                    )
                    .await;
                }
            }
        }
        if let Some(error) = sample_error {
            tracing::debug!(failed = count, error = %error, "events failed; retrying with backoff");
        }
        if dlq_full > 0 {
            tracing::error!(
                events = dlq_full,
                "dead-letter queue is full; events kept in the queue"
            );
        }
    }
}

/// One write of `events` to `named`, bounded by the sink's timeout, with the sink's series
/// (counts, timings, in-flight writes, health) kept up to date.
async fn write_to(named: &NamedSink, events: &[Event], processed_at: u64) -> Result<(), SinkError> {
    let series = named.series;
    let timeout = named.sink.write_timeout();
    let started = Instant::now();
    series.in_flight.fetch_add(1, Ordering::Relaxed);
    let result = match tokio::time::timeout(timeout, named.sink.write(events, processed_at)).await {
        Ok(result) => result,
        Err(_) => Err(SinkError::retryable(
            named.sink.describe(),
            format!("no answer within {timeout:?} (the write timeout)"),
        )),
    };
    series.in_flight.fetch_sub(1, Ordering::Relaxed);
    series.duration.record_duration(started.elapsed());
    series.batch_events.record(events.len() as u64);
    let count = events.len() as u64;
    match &result {
        Ok(()) => {
            series.written.fetch_add(count, Ordering::Relaxed);
            series.health.answered(&named.name);
        }
        Err(error) => {
            metrics::SINK_ERRORS.fetch_add(1, Ordering::Relaxed);
            match &error.kind {
                ErrorKind::Retryable { .. } => {
                    series.retried.fetch_add(count, Ordering::Relaxed);
                    series.health.failed(&named.name, error, count);
                }
                ErrorKind::Permanent => {
                    series.rejected.fetch_add(count, Ordering::Relaxed);
                    series.health.answered(&named.name);
                    tracing::warn!(%error, sink = %named.name, events = count, "sink refused the batch for good; its events go to the DLQ");
                }
                ErrorKind::Rejected(rejected) => {
                    let refused = rejected.len() as u64;
                    series.rejected.fetch_add(refused, Ordering::Relaxed);
                    series
                        .written
                        .fetch_add(count.saturating_sub(refused), Ordering::Relaxed);
                    series.health.answered(&named.name);
                    tracing::warn!(%error, sink = %named.name, events = refused, "sink refused events for good; they go to the DLQ");
                }
            }
        }
    }
    result
}

/// The key of `id` written to `sink` in the pool's `partial` window.
fn partial_key(sink: &str, id: &str) -> Arc<str> {
    format!("{sink}\u{0}{id}").into()
}

/// Runs `work`, telling the queue every `interval` that `handles` are still being worked on, so
/// a slow stage or sink does not get its deliveries redelivered to another processor.
async fn while_keeping_alive<F: std::future::Future, H: std::borrow::Borrow<Handle>>(
    handles: &[H],
    interval: Option<Duration>,
    work: F,
) -> F::Output {
    let Some(every) = interval.filter(|d| !d.is_zero()) else {
        return work.await;
    };
    tokio::pin!(work);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = ticker.tick() => {
                for handle in handles {
                    if let Err(error) = handle.borrow().keep_alive().await {
                        tracing::warn!(%error, "in-progress ack failed");
                        break;
                    }
                }
            }
        }
    }
}

/// Batch size and end-to-end latency (acceptance timestamp to now) of a confirmed sink write.
fn record_written(events: &[Event]) {
    let written_ms = now_ms();
    let mut latency = metrics::END_TO_END.local();
    for event in events {
        // A client-supplied timestamp in the future counts as zero.
        let micros = written_ms
            .saturating_sub(event.timestamp_ms)
            .saturating_mul(1000);
        // The bucket's exemplar: the event's trace, read only while the bucket has none yet in
        // this batch and only from an event that carries headers.
        latency.record_traced(micros, || {
            if event.headers.is_empty() {
                None
            } else {
                trace::event_context(event).map(|c| c.trace_id)
            }
        });
    }
}

async fn settle(handle: Handle, settlement: Settlement) {
    if let Err(error) = handle.settle(settlement).await {
        tracing::warn!(%error, ?settlement, "settling a delivery failed; it will be redelivered");
    }
}

/// Settles a batch the same way (one queue call for a run of slot deliveries).
async fn settle_all(handles: Vec<Handle>, settlement: Settlement) {
    if handles.is_empty() {
        return;
    }
    let errors = Handle::settle_all(handles, settlement).await;
    if let Some(error) = errors.first() {
        tracing::warn!(%error, failed = errors.len(), ?settlement, "settling deliveries failed; they will be redelivered");
    }
}

/// The `process` span of each event that carries a sampled trace context (pipeline and sink
/// write, from the batch's start), child of the span that published it. An unsampled context
/// (the decision made where the trace entered) records nothing.
fn record_spans<'a>(start_ns: u64, events: impl Iterator<Item = (&'a Event, Option<&'a str>)>) {
    trace::record(events.filter_map(|(event, error)| {
        let parent = trace::event_context(event).filter(|parent| parent.sampled())?;
        let mut span = trace::Started {
            context: parent.child(),
            parent_span_id: Some(parent.span_id),
            start_ns,
        }
        .finish("process", error.map(str::to_owned));
        span.attributes
            .push(("conveyor.attempt", i64::from(event.attempt)));
        span.string_attributes
            .push(("conveyor.event_id", event.id.to_string()));
        Some(span)
    }));
}

#[cfg(test)]
mod tests;

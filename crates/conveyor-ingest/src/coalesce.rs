//! Coalescing: many concurrent small submissions become few large ones.
//!
//! In split mode every single-event request would otherwise cost one network round trip per
//! hop (gateway → ingest over gRPC, ingest → processor over HTTP). A [`Coalescer`] lets at most
//! `in_flight` batches be on the wire at once; whatever arrives meanwhile waits and goes out
//! together as the next batch. At low load a request is sent at once, alone (no added
//! latency); under load the batches grow by themselves. Answers are split back per caller, in
//! order, so each caller sees exactly its own results.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use conveyor_core::stats::IngestStats;
use conveyor_core::{ApiError, ErrorCode, Event, EventDraft};
use conveyor_queue::{Health, PublishError, Published, Publisher};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::Intake;

type BatchFuture<T> = Pin<Box<dyn Future<Output = Vec<T>> + Send>>;

/// Queues items from many callers and sends them in batches through one function.
pub struct Coalescer<T, R> {
    queue: mpsc::Sender<(Vec<T>, oneshot::Sender<Vec<R>>)>,
}

impl<T: Send + 'static, R: Send + 'static> Coalescer<T, R> {
    /// `send` takes a batch and answers one result per item, in order. At most `in_flight`
    /// batches run at once, each of at most `max_batch` items (a single caller's larger
    /// submission goes out whole).
    pub fn new<F>(in_flight: usize, max_batch: usize, send: F) -> Self
    where
        F: Fn(Vec<T>) -> BatchFuture<R> + Send + Sync + 'static,
    {
        // Bounded: when every slot is busy and the queue is full, callers wait (backpressure).
        let (queue, mut incoming) = mpsc::channel::<(Vec<T>, oneshot::Sender<Vec<R>>)>(4096);
        let slots = Arc::new(Semaphore::new(in_flight.max(1)));
        let send = Arc::new(send);
        tokio::spawn(async move {
            loop {
                // Wait for a free slot first: what arrives meanwhile accumulates.
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let Some((first, reply)) = incoming.recv().await else {
                    return;
                };
                let mut items = first;
                let mut callers = vec![(reply, items.len())];
                while items.len() < max_batch {
                    match incoming.try_recv() {
                        Ok((more, reply)) => {
                            callers.push((reply, more.len()));
                            items.extend(more);
                        }
                        Err(_) => break,
                    }
                }
                let send = Arc::clone(&send);
                tokio::spawn(async move {
                    let mut results = send(items).await.into_iter();
                    for (reply, count) in callers {
                        let mine: Vec<R> = results.by_ref().take(count).collect();
                        // A caller that went away no longer needs its answer.
                        let _ = reply.send(mine);
                    }
                    drop(slot);
                });
            }
        });
        Coalescer { queue }
    }

    /// Submits `items` and waits for their results; `None` if the coalescer has stopped.
    pub async fn submit(&self, items: Vec<T>) -> Option<Vec<R>> {
        let (reply, answer) = oneshot::channel();
        self.queue.send((items, reply)).await.ok()?;
        answer.await.ok()
    }
}

/// An [`Intake`] whose submissions are coalesced (a split-mode gateway's gRPC calls to ingest).
pub struct CoalescingIntake {
    inner: Arc<dyn Intake>,
    coalescer: Coalescer<EventDraft, Result<String, ApiError>>,
}

impl CoalescingIntake {
    pub fn new(inner: Arc<dyn Intake>, in_flight: usize, max_batch: usize) -> Self {
        let target = Arc::clone(&inner);
        CoalescingIntake {
            inner,
            coalescer: Coalescer::new(in_flight, max_batch, move |drafts| {
                let target = Arc::clone(&target);
                Box::pin(async move { target.submit(drafts).await })
            }),
        }
    }
}

#[async_trait]
impl Intake for CoalescingIntake {
    async fn submit(&self, drafts: Vec<EventDraft>) -> Vec<Result<String, ApiError>> {
        let count = drafts.len();
        let answer = self.coalescer.submit(drafts).await;
        let missing = count - answer.as_ref().map_or(0, |a| a.len().min(count));
        if missing > 0 {
            self.inner.count_refused(ErrorCode::Unavailable, missing);
        }
        complete(answer, count, || {
            Err(ApiError::unavailable("the intake is shutting down"))
        })
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }

    fn count_refused(&self, code: ErrorCode, events: usize) {
        self.inner.count_refused(code, events);
    }

    fn own_refusals(&self) -> IngestStats {
        self.inner.own_refusals()
    }
}

/// A [`Publisher`] whose publishes are coalesced (a split-mode ingest handing events to the
/// processor's `/enqueue`).
pub struct CoalescingPublisher {
    inner: Arc<dyn Publisher>,
    coalescer: Coalescer<Event, Result<Published, PublishError>>,
}

impl CoalescingPublisher {
    pub fn new(inner: Arc<dyn Publisher>, in_flight: usize, max_batch: usize) -> Self {
        let target = Arc::clone(&inner);
        CoalescingPublisher {
            inner,
            coalescer: Coalescer::new(in_flight, max_batch, move |events| {
                let target = Arc::clone(&target);
                Box::pin(async move { target.publish(events).await })
            }),
        }
    }
}

#[async_trait]
impl Publisher for CoalescingPublisher {
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        let count = events.len();
        let answer = self.coalescer.submit(events).await;
        complete(answer, count, || Err(PublishError::Closed))
    }

    async fn health(&self) -> Health {
        self.inner.health().await
    }
}

/// The caller's answers, padded with `missing` if the batch function answered short (a broken
/// contract upstream must still not leave a client believing an event was accepted).
fn complete<R>(answer: Option<Vec<R>>, count: usize, missing: impl Fn() -> R) -> Vec<R> {
    let mut results = answer.unwrap_or_default();
    results.truncate(count);
    while results.len() < count {
        results.push(missing());
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_submissions_are_batched_and_answered_per_caller() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&batches);
        let coalescer = Arc::new(Coalescer::new(1, 1000, move |items: Vec<u32>| {
            seen.lock().expect("lock").push(items.len());
            Box::pin(async move {
                // A slow upstream: while this batch is out, the others queue up.
                tokio::time::sleep(Duration::from_millis(50)).await;
                items.into_iter().map(|i| i * 10).collect()
            }) as BatchFuture<u32>
        }));
        let callers: Vec<_> = (0..20u32)
            .map(|i| {
                let c = Arc::clone(&coalescer);
                tokio::spawn(async move { c.submit(vec![i, i + 100]).await })
            })
            .collect();
        for (i, caller) in callers.into_iter().enumerate() {
            let i = i as u32;
            assert_eq!(
                caller.await.expect("task"),
                Some(vec![i * 10, (i + 100) * 10]),
                "each caller gets exactly its own answers, in order"
            );
        }
        let batches = batches.lock().expect("lock").clone();
        assert_eq!(batches.iter().sum::<usize>(), 40, "every item sent once");
        assert!(
            batches.len() < 20,
            "concurrent callers shared batches: {batches:?}"
        );
    }

    #[tokio::test]
    async fn a_lone_submission_goes_out_at_once() {
        let coalescer = Coalescer::new(4, 1000, |items: Vec<u8>| {
            Box::pin(async move { items }) as BatchFuture<u8>
        });
        let started = tokio::time::Instant::now();
        assert_eq!(coalescer.submit(vec![7]).await, Some(vec![7]));
        assert!(started.elapsed() < Duration::from_millis(50));
    }
}

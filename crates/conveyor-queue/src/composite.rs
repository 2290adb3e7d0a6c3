//! Dual-write: one queue made of several backends (`QUEUE_TYPE=composite`), for moving from
//! one broker to another without downtime.
//!
//! Every publish goes to every backend at once. The first backend is the **primary**:
//! processors consume from it alone (subscribe, stats, durability and keep-alive are its), and
//! the others receive copies, for their own consumers or for a cut-over later.
//!
//! - [`Strategy::FailFast`]: an event is confirmed only when every backend confirmed it;
//!   otherwise the client gets the first failure (and may retry: each backend dedupes the
//!   event id, so the backends that did take it store it once). Health needs every backend.
//! - [`Strategy::BestEffort`]: an event is confirmed when the primary confirmed it; failures
//!   on the others are counted, logged (once per batch) and shown in the stats. Health is the
//!   primary's.
//!
//! Per backend, the stats count confirmed and failed publishes and the **divergence**: events
//! the primary holds that a secondary does not (it grows when the primary took an event and a
//! secondary failed it, and shrinks when a later retry of that event reaches the secondary).
//! For the primary it counts the other way round: events a secondary holds and it does not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::Event;
use conveyor_core::stats::{BackendStats, QueueStats};

use crate::{Consumer, Health, PublishError, Published, Publisher, Queue, QueueError};

/// When a composite publish counts as confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Every backend confirmed.
    FailFast,
    /// The primary confirmed.
    BestEffort,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "fail-fast" => Ok(Strategy::FailFast),
            "best-effort" => Ok(Strategy::BestEffort),
            other => Err(format!("'{other}': expected fail-fast or best-effort")),
        }
    }
}

/// One backend and what it did with the publishes.
struct Backend {
    name: String,
    queue: Arc<dyn Queue>,
    published: AtomicU64,
    failed: AtomicU64,
    divergence: AtomicU64,
}

pub struct CompositeQueue {
    /// The primary first.
    backends: Vec<Backend>,
    strategy: Strategy,
}

impl CompositeQueue {
    /// `backends`: (name, queue) pairs, the primary first. At least two.
    pub fn new(backends: Vec<(String, Arc<dyn Queue>)>, strategy: Strategy) -> Self {
        assert!(backends.len() >= 2, "a composite queue needs two backends");
        CompositeQueue {
            backends: backends
                .into_iter()
                .map(|(name, queue)| Backend {
                    name,
                    queue,
                    published: AtomicU64::new(0),
                    failed: AtomicU64::new(0),
                    divergence: AtomicU64::new(0),
                })
                .collect(),
            strategy,
        }
    }

    fn primary(&self) -> &Arc<dyn Queue> {
        &self.backends[0].queue
    }

    /// Records one event's outcome on each backend and decides the answer.
    fn settle_event(
        &self,
        outcomes: &[Result<Published, PublishError>],
    ) -> Result<Published, PublishError> {
        for (backend, outcome) in self.backends.iter().zip(outcomes) {
            let counter = if outcome.is_ok() {
                &backend.published
            } else {
                &backend.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        for (backend, outcome) in self.backends.iter().zip(outcomes).skip(1) {
            match (&outcomes[0], outcome) {
                // The primary has it, this one does not.
                (Ok(_), Err(_)) => {
                    backend.divergence.fetch_add(1, Ordering::Relaxed);
                }
                // A retry reached this backend for an event the primary already had.
                (Ok(Published::Duplicate), Ok(Published::Stored)) => {
                    let _ = backend.divergence.fetch_update(
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                        |d| d.checked_sub(1),
                    );
                }
                // This one has it, the primary does not.
                (Err(_), Ok(Published::Stored)) => {
                    self.backends[0].divergence.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        match self.strategy {
            Strategy::BestEffort => outcomes[0].clone(),
            Strategy::FailFast => {
                let first_failure = self
                    .backends
                    .iter()
                    .zip(outcomes)
                    .find_map(|(backend, outcome)| outcome.as_ref().err().map(|e| (backend, e)));
                match first_failure {
                    None => outcomes[0].clone(),
                    Some((backend, error)) => Err(name_backend(&backend.name, error)),
                }
            }
        }
    }
}

fn name_backend(name: &str, error: &PublishError) -> PublishError {
    match error {
        PublishError::Unavailable(reason) => {
            PublishError::Unavailable(format!("backend '{name}': {reason}"))
        }
        other => other.clone(),
    }
}

#[async_trait]
impl Publisher for CompositeQueue {
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>> {
        let count = events.len();
        let sends = self
            .backends
            .iter()
            .map(|backend| backend.queue.publish(events.clone()));
        let per_backend: Vec<Vec<Result<Published, PublishError>>> =
            futures_util::future::join_all(sends).await;
        let mut answers = Vec::with_capacity(count);
        let mut secondary_failures = vec![0usize; self.backends.len()];
        for index in 0..count {
            let outcomes: Vec<Result<Published, PublishError>> = per_backend
                .iter()
                .map(|results| {
                    results
                        .get(index)
                        .cloned()
                        .unwrap_or(Err(PublishError::Closed))
                })
                .collect();
            for (slot, outcome) in secondary_failures.iter_mut().zip(&outcomes).skip(1) {
                *slot += usize::from(outcome.is_err());
            }
            answers.push(self.settle_event(&outcomes));
        }
        for (index, failures) in secondary_failures.into_iter().enumerate().skip(1) {
            if failures > 0 {
                let backend = &self.backends[index];
                let example = per_backend[index]
                    .iter()
                    .find_map(|r| r.as_ref().err().map(ToString::to_string))
                    .unwrap_or_default();
                tracing::warn!(backend = %backend.name, failures, error = %example, strategy = ?self.strategy, "composite: a secondary backend failed publishes");
            }
        }
        answers
    }

    async fn health(&self) -> Health {
        match self.strategy {
            Strategy::BestEffort => self.primary().health().await,
            Strategy::FailFast => {
                for backend in &self.backends {
                    if let Health::Unhealthy(reason) = backend.queue.health().await {
                        return Health::Unhealthy(format!("backend '{}': {reason}", backend.name));
                    }
                }
                Health::Healthy
            }
        }
    }
}

#[async_trait]
impl Queue for CompositeQueue {
    async fn subscribe(&self) -> Result<Box<dyn Consumer>, QueueError> {
        self.primary().subscribe().await
    }

    async fn stats(&self) -> QueueStats {
        let mut stats = self.primary().stats().await;
        stats.backend = "composite".into();
        stats.backends = Vec::with_capacity(self.backends.len());
        for (index, backend) in self.backends.iter().enumerate() {
            stats.backends.push(BackendStats {
                name: backend.name.clone(),
                primary: index == 0,
                healthy: backend.queue.health().await == Health::Healthy,
                published: backend.published.load(Ordering::Relaxed),
                failed: backend.failed.load(Ordering::Relaxed),
                divergence: backend.divergence.load(Ordering::Relaxed),
            });
        }
        stats
    }

    fn durable(&self) -> bool {
        self.primary().durable()
    }

    fn keep_alive_interval(&self) -> Option<Duration> {
        self.primary().keep_alive_interval()
    }

    async fn close(&self) {
        for backend in &self.backends {
            backend.queue.close().await;
        }
    }

    async fn shutdown(&self) {
        for backend in &self.backends {
            backend.queue.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{CompositeQueue, Strategy};
    use crate::conformance::{event, fetch_n};
    use crate::{
        Health, MemoryQueue, MemoryQueueConfig, PublishError, Published, Publisher, Queue,
    };

    fn memory(capacity: usize) -> Arc<MemoryQueue> {
        Arc::new(MemoryQueue::new(MemoryQueueConfig {
            capacity,
            ..MemoryQueueConfig::default()
        }))
    }

    /// A composite whose primary has the conformance capacity; the secondary is roomy (in a
    /// migration it has consumers of its own).
    fn composite(capacity: usize, strategy: Strategy) -> Box<dyn Queue> {
        Box::new(CompositeQueue::new(
            vec![
                ("primary".into(), memory(capacity) as Arc<dyn Queue>),
                ("secondary".into(), memory(1_000_000) as Arc<dyn Queue>),
            ],
            strategy,
        ))
    }

    mod fail_fast {
        async fn factory(capacity: usize) -> Box<dyn crate::Queue> {
            super::composite(capacity, super::Strategy::FailFast)
        }
        crate::conformance_suite!(factory);
    }

    mod best_effort {
        async fn factory(capacity: usize) -> Box<dyn crate::Queue> {
            super::composite(capacity, super::Strategy::BestEffort)
        }
        crate::conformance_suite!(factory);
    }

    #[tokio::test]
    async fn both_up_both_backends_hold_the_same_events() {
        let (primary, secondary) = (memory(1000), memory(1000));
        let queue = CompositeQueue::new(
            vec![
                ("a".into(), Arc::clone(&primary) as Arc<dyn Queue>),
                ("b".into(), Arc::clone(&secondary) as Arc<dyn Queue>),
            ],
            Strategy::FailFast,
        );
        let sent: Vec<_> = (0..50).map(|i| event(&format!("both-{i}"))).collect();
        let results = queue.publish(sent).await;
        assert!(results.iter().all(|r| *r == Ok(Published::Stored)));
        let ids = |q: &MemoryQueue| {
            let mut ids: Vec<String> = q
                .try_fetch(1000)
                .iter()
                .map(|d| d.event.id.to_string())
                .collect();
            ids.sort();
            ids
        };
        let on_primary = ids(&primary);
        assert_eq!(on_primary.len(), 50);
        assert_eq!(on_primary, ids(&secondary));
        let stats = queue.stats().await;
        assert_eq!(stats.backend, "composite");
        assert!(
            stats
                .backends
                .iter()
                .all(|b| b.published == 50 && b.failed == 0 && b.divergence == 0)
        );
    }

    #[tokio::test]
    async fn fail_fast_refuses_when_a_secondary_is_down_and_a_retry_heals_it() {
        let (primary, secondary) = (memory(1000), memory(1000));
        let queue = CompositeQueue::new(
            vec![
                ("primary".into(), Arc::clone(&primary) as Arc<dyn Queue>),
                ("secondary".into(), Arc::clone(&secondary) as Arc<dyn Queue>),
            ],
            Strategy::FailFast,
        );
        // "Down": a queue that refuses every publish.
        secondary.close().await;
        assert!(
            matches!(queue.health().await, Health::Unhealthy(reason) if reason.contains("secondary"))
        );
        let refused = queue.publish(vec![event("ff-1")]).await;
        assert_eq!(
            refused,
            vec![Err(PublishError::Closed)],
            "the client must retry"
        );
        let stats = queue.stats().await;
        let by_name = |name: &str| {
            stats
                .backends
                .iter()
                .find(|b| b.name == name)
                .cloned()
                .expect("backend")
        };
        assert_eq!(
            (by_name("primary").published, by_name("secondary").failed),
            (1, 1)
        );
        assert_eq!(
            by_name("secondary").divergence,
            1,
            "the primary holds an event the secondary lacks"
        );
        assert!(!by_name("secondary").healthy);

        // The secondary comes back (a fresh queue stands in for the restarted broker) and the
        // client's retry reaches it; the primary dedupes it.
        let back = memory(1000);
        let queue = CompositeQueue {
            backends: vec![
                super::Backend {
                    name: "primary".into(),
                    queue: Arc::clone(&primary) as Arc<dyn Queue>,
                    published: 1.into(),
                    failed: 0.into(),
                    divergence: 0.into(),
                },
                super::Backend {
                    name: "secondary".into(),
                    queue: Arc::clone(&back) as Arc<dyn Queue>,
                    published: 0.into(),
                    failed: 1.into(),
                    divergence: 1.into(),
                },
            ],
            strategy: Strategy::FailFast,
        };
        let retried = queue.publish(vec![event("ff-1")]).await;
        assert_eq!(retried, vec![Ok(Published::Duplicate)]);
        let stats = queue.stats().await;
        assert_eq!(
            stats.backends[1].divergence, 0,
            "the retry healed the divergence"
        );
        assert_eq!(back.try_fetch(10).len(), 1);
        assert_eq!(primary.try_fetch(10).len(), 1, "stored once on the primary");
    }

    #[tokio::test]
    async fn best_effort_accepts_on_the_primary_and_counts_secondary_failures() {
        let (primary, secondary) = (memory(1000), memory(1000));
        let queue = CompositeQueue::new(
            vec![
                ("primary".into(), Arc::clone(&primary) as Arc<dyn Queue>),
                ("secondary".into(), Arc::clone(&secondary) as Arc<dyn Queue>),
            ],
            Strategy::BestEffort,
        );
        secondary.close().await;
        assert_eq!(queue.health().await, Health::Healthy, "the primary decides");
        let sent: Vec<_> = (0..10).map(|i| event(&format!("be-{i}"))).collect();
        let results = queue.publish(sent).await;
        assert!(
            results.iter().all(|r| *r == Ok(Published::Stored)),
            "{results:?}"
        );
        let stats = queue.stats().await;
        assert_eq!(stats.backends[1].failed, 10);
        assert_eq!(stats.backends[1].divergence, 10);
        assert!(!stats.backends[1].healthy);
        // Processors consume from the primary.
        let mut consumer = queue.subscribe().await.expect("subscribe");
        let got = fetch_n(consumer.as_mut(), 10, std::time::Duration::from_secs(2)).await;
        assert_eq!(got.len(), 10);

        // The primary down: best-effort refuses too (nothing would be consumed otherwise).
        primary.close().await;
        let refused = queue.publish(vec![event("be-late")]).await;
        assert_eq!(refused, vec![Err(PublishError::Closed)]);
    }
}

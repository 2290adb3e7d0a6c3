//! The queue contract every backend implements, and the in-memory backend.
//!
//! # Semantics (the contract; `conformance` checks it against every backend)
//! - **Publish with confirm.** [`Publisher::publish`] resolves only when the queue has taken
//!   each event durably for its kind (memory: in the process's queue; NATS: PubAck; Kafka:
//!   delivery report with acks=all), or refused it with a [`PublishError`] the client can act on.
//!   An event whose [`Event::dedupe_key`] was published inside the dedupe window is confirmed as
//!   [`Published::Duplicate`] and not stored twice.
//! - **At-least-once consume.** A [`Consumer`] hands out [`Delivery`]s. Each must be settled:
//!   [`Delivery::ack`] (done, never delivered again), [`Delivery::nack`] (deliver again after a
//!   delay, with its attempt count increased) or [`Delivery::term`] (never deliver again; the
//!   caller has put the event elsewhere, e.g. the dead-letter queue). A delivery that is dropped
//!   unsettled, or whose consumer goes away, is delivered again.
//! - **Bounded.** A queue with a capacity refuses publishes beyond it with
//!   [`PublishError::Full`]; nothing grows without limit.
//! - **Stats** are counts since start, and depth/in-flight right now.

pub mod composite;
/// The dedupe window lives in `conveyor_core` (sinks use it too); here for the backends.
pub use conveyor_core::dedupe;
pub mod dlq;
pub mod memory;

#[cfg(feature = "conformance")]
pub mod conformance;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use conveyor_core::Event;
use conveyor_core::stats::QueueStats;

pub use memory::{MemoryQueue, MemoryQueueConfig};

/// How the queue confirmed a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored; it will be delivered.
    Stored,
    /// Its dedupe key was seen inside the window; the earlier copy stands.
    Duplicate,
}

/// Why the queue refused a publish. Every variant is safe to retry later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the queue is full")]
    Full,
    #[error("the queue is unavailable: {0}")]
    Unavailable(String),
    #[error("the queue is closed for publishing (shutting down)")]
    Closed,
}

impl From<PublishError> for conveyor_core::ApiError {
    fn from(error: PublishError) -> Self {
        match error {
            PublishError::Full => conveyor_core::ApiError::queue_full(),
            PublishError::Unavailable(reason) => {
                conveyor_core::ApiError::unavailable(format!("the queue is unavailable: {reason}"))
            }
            PublishError::Closed => conveyor_core::ApiError::shutting_down(),
        }
    }
}

/// Failures of consuming and settling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is unavailable: {0}")]
    Unavailable(String),
    #[error("the delivery is no longer held by this consumer")]
    StaleDelivery,
}

/// What every backend takes from the role that opens it, besides its own settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// `QUEUE_SIZE`: the most events held (memory), the stream's max messages (NATS), the
    /// most the consumer group may lag (Kafka).
    pub capacity: u64,
    /// How many recent event ids a publisher remembers to store a re-published one once
    /// (memory, Kafka; NATS has the broker's duplicate window).
    pub dedupe_window: usize,
    /// Most dead letters kept; 0 for a role that writes none (an ingest), which then opens no
    /// dead-letter queue.
    pub dlq_capacity: u64,
}

/// Why a backend could not be opened at start-up. The binary exits 64 for [`Config`]
/// (the settings are wrong: retrying cannot help) and 1 for [`Unreachable`].
///
/// [`Config`]: OpenError::Config
/// [`Unreachable`]: OpenError::Unreachable
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// A setting is invalid; the text names the flag or variable and the problem.
    #[error("{0}")]
    Config(String),
    /// The broker did not answer, or refused the set-up (streams, topics, consumers).
    #[error("{0}")]
    Unreachable(String),
}

/// Is the queue usable right now, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Unhealthy(String),
}

impl Health {
    pub fn into_result(self) -> Result<(), String> {
        match self {
            Health::Healthy => Ok(()),
            Health::Unhealthy(reason) => Err(reason),
        }
    }
}

/// The publishing half of a queue: what ingest needs.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes every event and answers, in order, once each one is confirmed or refused.
    async fn publish(&self, events: Vec<Event>) -> Vec<Result<Published, PublishError>>;

    async fn health(&self) -> Health;
}

/// A queue that can also be consumed: what a processor needs.
#[async_trait]
pub trait Queue: Publisher {
    /// A new consumer. Consumers of one queue share its events: each is delivered to one of them.
    async fn subscribe(&self) -> Result<Box<dyn Consumer>, QueueError>;

    async fn stats(&self) -> QueueStats;

    /// Whether events survive the process holding this queue object (a broker: true). A
    /// processor drains a non-durable queue to empty on shutdown, and leaves a durable one.
    fn durable(&self) -> bool;

    /// How often a held delivery needs [`Handle::keep_alive`] so the queue does not
    /// redeliver it while it is still being worked on (NATS: a third of AckWait). `None`: never.
    fn keep_alive_interval(&self) -> Option<Duration> {
        None
    }

    /// Stop taking publishes (they fail with [`PublishError::Closed`]); consuming goes on so
    /// that what is held can be drained.
    async fn close(&self);

    /// Release the broker's resources once consuming is over: final commits, leaving a
    /// consumer group, flushing a producer. Bounded in time; called once, last.
    async fn shutdown(&self) {}
}

#[async_trait]
pub trait Consumer: Send {
    /// Waits up to `wait` for deliveries and returns between 0 and `max` of them.
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, QueueError>;

    /// Stops consuming and gives back what the consumer has received from the queue but not
    /// yet handed out by [`fetch`](Self::fetch), so another consumer gets it now instead of
    /// after the queue's redelivery timeout. A worker calls it when it stops; deliveries
    /// already handed out are settled by their own handles. By default the consumer is dropped
    /// (right for a queue that hands out only what `fetch` asks for).
    async fn release(self: Box<Self>) {}
}

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    Ack,
    Nack { delay: Duration },
    Term,
}

/// The backend's half of a delivery that carries its own settling state (a broker message).
#[async_trait]
pub trait DeliveryHandle: Send + Sync {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), QueueError>;

    /// "Still working on it": restarts the queue's redelivery timer (NATS `+WPI`).
    async fn keep_alive(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

/// A backend that keeps its in-flight deliveries in a table of its own and hands out slot
/// numbers instead of boxed handles: a delivery then costs no allocation, and a batch of
/// settlements takes the table's lock once (the memory queue).
pub trait SlotSettler: Send + Sync + 'static {
    /// Settles each slot; `None` means its delivery was dropped unsettled (deliver it again).
    /// A slot that is no longer held (settled before) is ignored.
    fn settle_slots(&self, settlements: &[(u64, Option<Settlement>)]);
}

/// How a delivery is settled: [`settle`](Handle::settle), [`settle_all`](Handle::settle_all)
/// or, dropped unsettled, redelivered.
pub struct Handle(HandleKind);

enum HandleKind {
    Slot {
        settler: Arc<dyn SlotSettler>,
        slot: u64,
    },
    Boxed(Box<dyn DeliveryHandle>),
    /// Settled already; dropping it does nothing.
    Done,
}

impl Handle {
    pub fn boxed(handle: Box<dyn DeliveryHandle>) -> Self {
        Handle(HandleKind::Boxed(handle))
    }

    pub fn slot(settler: Arc<dyn SlotSettler>, slot: u64) -> Self {
        Handle(HandleKind::Slot { settler, slot })
    }

    pub async fn settle(mut self, settlement: Settlement) -> Result<(), QueueError> {
        match std::mem::replace(&mut self.0, HandleKind::Done) {
            HandleKind::Slot { settler, slot } => {
                settler.settle_slots(&[(slot, Some(settlement))]);
                Ok(())
            }
            HandleKind::Boxed(handle) => handle.settle(settlement).await,
            HandleKind::Done => Ok(()),
        }
    }

    /// Settles every handle the same way. Runs of slot handles of one backend are settled
    /// together (one lock per run of up to [`SETTLE_CHUNK`], no allocation); the errors of
    /// handles that could not be settled (they will be redelivered) are returned.
    pub async fn settle_all(
        handles: impl IntoIterator<Item = Handle>,
        settlement: Settlement,
    ) -> Vec<QueueError> {
        let mut errors = Vec::new();
        let mut run: Option<Arc<dyn SlotSettler>> = None;
        let mut slots = [(0u64, None); SETTLE_CHUNK];
        let mut held = 0;
        for mut handle in handles {
            match std::mem::replace(&mut handle.0, HandleKind::Done) {
                HandleKind::Slot { settler, slot } => {
                    let same = run.as_ref().is_some_and(|r| Arc::ptr_eq(r, &settler));
                    if held == SETTLE_CHUNK || (!same && held > 0) {
                        if let Some(r) = &run {
                            r.settle_slots(&slots[..held]);
                        }
                        held = 0;
                    }
                    if !same {
                        run = Some(settler);
                    }
                    slots[held] = (slot, Some(settlement));
                    held += 1;
                }
                HandleKind::Boxed(boxed) => {
                    // Nothing may wait unsettled across an await: if this future is dropped
                    // there, the slots taken so far would be neither settled nor redelivered.
                    if let Some(r) = &run
                        && held > 0
                    {
                        r.settle_slots(&slots[..held]);
                        held = 0;
                    }
                    if let Err(error) = boxed.settle(settlement).await {
                        errors.push(error);
                    }
                }
                HandleKind::Done => {}
            }
        }
        if let Some(r) = &run
            && held > 0
        {
            r.settle_slots(&slots[..held]);
        }
        errors
    }

    /// "Still working on it": restarts the queue's redelivery timer (NATS `+WPI`).
    pub async fn keep_alive(&self) -> Result<(), QueueError> {
        match &self.0 {
            HandleKind::Boxed(handle) => handle.keep_alive().await,
            HandleKind::Slot { .. } | HandleKind::Done => Ok(()),
        }
    }
}

/// Most slot settlements [`Handle::settle_all`] passes to a backend in one call.
pub const SETTLE_CHUNK: usize = 64;

impl Drop for Handle {
    fn drop(&mut self) {
        // A boxed handle's own Drop redelivers; a slot has to be told.
        if let HandleKind::Slot { settler, slot } = &self.0 {
            settler.settle_slots(&[(*slot, None)]);
        }
    }
}

/// One event handed to a consumer. `event.attempt` is its delivery count (1 the first time).
pub struct Delivery {
    pub event: Event,
    handle: Handle,
}

impl Delivery {
    pub fn new(event: Event, handle: Box<dyn DeliveryHandle>) -> Self {
        Delivery {
            event,
            handle: Handle::boxed(handle),
        }
    }

    /// A delivery settled through its backend's slot table (see [`SlotSettler`]).
    pub fn in_slot(event: Event, settler: Arc<dyn SlotSettler>, slot: u64) -> Self {
        Delivery {
            event,
            handle: Handle::slot(settler, slot),
        }
    }

    /// Done: never delivered again.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.handle.settle(Settlement::Ack).await
    }

    /// Deliver again after `delay`.
    pub async fn nack(self, delay: Duration) -> Result<(), QueueError> {
        self.handle.settle(Settlement::Nack { delay }).await
    }

    /// Never deliver again (the caller moved it elsewhere, e.g. to the dead-letter queue).
    pub async fn term(self) -> Result<(), QueueError> {
        self.handle.settle(Settlement::Term).await
    }

    /// Splits the delivery so the event can be moved while the handle waits to settle it.
    pub fn into_parts(self) -> (Event, Handle) {
        (self.event, self.handle)
    }
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("event", &self.event.id)
            .finish()
    }
}

//! The dead-letter queue: where an event goes after its last failed attempt, with its error,
//! until someone looks at it and replays it.

use std::collections::VecDeque;
use std::sync::Mutex;

use async_trait::async_trait;
use conveyor_core::Event;
use conveyor_core::body::write_data;
use conveyor_core::stats::DeadLetterView;

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub event: Event,
    /// The last attempt's error.
    pub error: String,
    pub attempts: u32,
    pub failed_at_ms: u64,
}

impl DeadLetter {
    pub fn view(&self) -> DeadLetterView {
        let mut data = Vec::new();
        let data = if write_data(&mut data, &self.event.payload, self.event.content_type) {
            serde_json::from_slice(&data).unwrap_or(serde_json::Value::Null)
        } else {
            serde_json::Value::Null
        };
        DeadLetterView {
            id: self.event.id.to_string(),
            source: self.event.source.to_string(),
            timestamp: self.event.timestamp_ms,
            data,
            metadata: (*self.event.metadata).clone(),
            attempts: self.attempts,
            error: self.error.clone(),
            failed_at: self.failed_at_ms,
        }
    }
}

/// Where dead letters are kept. The memory queue pairs with [`MemoryDeadLetters`]; broker
/// backends keep theirs in the broker.
#[async_trait]
pub trait DeadLetterQueue: Send + Sync + 'static {
    /// Stores a dead letter; gives it back when the DLQ is full.
    async fn push(&self, letter: DeadLetter) -> Result<(), DeadLetter>;

    /// The oldest `limit` dead letters, and how many there are.
    async fn list(&self, limit: usize) -> (u64, Vec<DeadLetter>);

    /// Removes and returns the dead letters with these ids (all of them when `ids` is `None`),
    /// and the requested ids that were not found.
    async fn take(&self, ids: Option<&[String]>) -> (Vec<DeadLetter>, Vec<String>);

    /// Returns letters taken for a replay that the queue refused. By default each is pushed
    /// again (a broker DLQ appends it anew).
    async fn put_back(&self, letters: Vec<DeadLetter>) {
        for letter in letters {
            if let Err(letter) = self.push(letter).await {
                tracing::error!(id = %letter.event.id, "a replay was refused and the DLQ would not take the event back");
            }
        }
    }

    /// How many dead letters are held.
    async fn size(&self) -> u64;
}

/// The requested `ids` that are not among `taken`: the second half of
/// [`DeadLetterQueue::take`]'s answer (none when every letter was asked for).
pub fn ids_not_taken(ids: Option<&[String]>, taken: &[DeadLetter]) -> Vec<String> {
    ids.map(|ids| {
        ids.iter()
            .filter(|id| !taken.iter().any(|l| *l.event.id == ***id))
            .cloned()
            .collect()
    })
    .unwrap_or_default()
}

/// A bounded in-memory DLQ.
pub struct MemoryDeadLetters {
    letters: Mutex<VecDeque<DeadLetter>>,
    capacity: usize,
}

impl MemoryDeadLetters {
    pub fn new(capacity: usize) -> Self {
        MemoryDeadLetters {
            letters: Mutex::new(VecDeque::new()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<DeadLetter>> {
        self.letters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl DeadLetterQueue for MemoryDeadLetters {
    async fn push(&self, letter: DeadLetter) -> Result<(), DeadLetter> {
        let mut letters = self.lock();
        if letters.len() >= self.capacity {
            return Err(letter);
        }
        letters.push_back(letter);
        Ok(())
    }

    async fn list(&self, limit: usize) -> (u64, Vec<DeadLetter>) {
        let letters = self.lock();
        (
            letters.len() as u64,
            letters.iter().take(limit).cloned().collect(),
        )
    }

    async fn take(&self, ids: Option<&[String]>) -> (Vec<DeadLetter>, Vec<String>) {
        let mut letters = self.lock();
        match ids {
            None => (letters.drain(..).collect(), Vec::new()),
            Some(ids) => {
                let mut taken = Vec::new();
                let mut not_found = Vec::new();
                for id in ids {
                    match letters.iter().position(|l| *l.event.id == **id) {
                        Some(at) => taken.extend(letters.remove(at)),
                        None => not_found.push(id.clone()),
                    }
                }
                (taken, not_found)
            }
        }
    }

    async fn put_back(&self, letters: Vec<DeadLetter>) {
        // Already counted against the capacity when first pushed: never refused here.
        self.lock().extend(letters);
    }

    async fn size(&self) -> u64 {
        self.lock().len() as u64
    }
}

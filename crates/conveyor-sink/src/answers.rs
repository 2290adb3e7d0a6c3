//! What a server answered for each event of a batch, remembered while the batch comes back.
//!
//! A sink that sends a batch as many requests or messages (an HTTP request per event, a
//! publish per event) gets an answer per part. When some parts fail and are worth retrying,
//! the whole batch goes back to the queue (the contract has no "partly written" answer that
//! is not final), and comes back with every event. Without memory the sink would send all of
//! it again, and a server that fails one request in ten would almost never see a batch of a
//! hundred succeed as a whole: the batch would be retried for ever. [`Answers`] remembers, for
//! the events of such a batch, what the server confirmed (skipped next time) and what it
//! refused for good (reported next time without asking again).
//!
//! Only events of failed writes are remembered, and only events delivered before
//! (`attempt` > 1) are looked up, so a batch whose first write succeeds costs nothing here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use conveyor_core::Event;
use conveyor_core::dedupe::DedupeWindow;

use crate::SinkError;

/// How many confirmed events are remembered, to skip them when their batch comes back.
pub const CONFIRMED_WINDOW: usize = 100_000;

/// How many refusals are remembered while their batch is retried for other events.
pub const REFUSED_WINDOW: usize = 10_000;

/// The server's answers for events whose batch came back; see the module docs.
pub struct Answers {
    state: Mutex<State>,
}

struct State {
    confirmed: DedupeWindow,
    /// By dedupe key, the refusal's text; the oldest is forgotten first.
    refused: HashMap<String, String>,
    refused_order: VecDeque<String>,
}

/// One write's answers, gathered part by part and settled with [`Answers::settle`].
#[derive(Debug, Default)]
pub struct Round {
    delivered: Vec<usize>,
    refused: Vec<(usize, String)>,
    /// The first retryable failure's text, the longest wait a server asked for, and how many
    /// events must be sent again.
    retry: Option<(String, Option<Duration>, usize)>,
}

impl Round {
    /// The server confirmed these events (indices into the batch).
    pub fn delivered(&mut self, events: impl IntoIterator<Item = usize>) {
        self.delivered.extend(events);
    }

    /// The server refused this event for good.
    pub fn refused(&mut self, at: usize, message: String) {
        self.refused.push((at, message));
    }

    /// `count` events must be sent again; `message` says why, `retry_after` is the server's
    /// wait, if it named one.
    pub fn retry(&mut self, count: usize, message: String, retry_after: Option<Duration>) {
        let slot = self.retry.get_or_insert((message, None, 0));
        slot.1 = slot.1.max(retry_after);
        slot.2 += count;
    }
}

impl Default for Answers {
    fn default() -> Self {
        Answers {
            state: Mutex::new(State {
                confirmed: DedupeWindow::new(CONFIRMED_WINDOW),
                refused: HashMap::new(),
                refused_order: VecDeque::new(),
            }),
        }
    }
}

impl Answers {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The events of `events` still to send (indices, in order), and a round holding the
    /// refusals already known for the others. Confirmed events are in neither.
    pub fn sort(&self, events: &[Event]) -> (Vec<usize>, Round) {
        let mut pending = Vec::with_capacity(events.len());
        let mut round = Round::default();
        let state = self.state();
        for (at, event) in events.iter().enumerate() {
            // Only events of failed writes are remembered, so a first delivery cannot be
            // here: the common case asks nothing.
            if event.attempt <= 1 {
                pending.push(at);
                continue;
            }
            if state.confirmed.contains(event) {
                continue;
            }
            let known = (!state.refused.is_empty())
                .then(|| state.refused.get(&event.dedupe_key()))
                .flatten();
            match known {
                Some(message) => round.refused(at, message.clone()),
                None => pending.push(at),
            }
        }
        (pending, round)
    }

    /// The write's answer for the contract. When part of the batch must be sent again, what
    /// was confirmed and what was refused is remembered for when the batch comes back, and
    /// the answer is retryable; otherwise the refused events (if any) are the answer.
    pub fn settle(&self, sink: &str, events: &[Event], round: Round) -> Result<(), SinkError> {
        let Round {
            delivered,
            mut refused,
            retry,
        } = round;
        let mut state = self.state();
        if let Some((message, retry_after, count)) = retry {
            for &at in &delivered {
                state.confirmed.insert(&events[at]);
            }
            for (at, message) in &refused {
                state.refuse(events[*at].dedupe_key(), message.clone());
            }
            drop(state);
            let error = SinkError::retryable(
                sink,
                format!(
                    "{message} ({count} of {} events to send again)",
                    events.len()
                ),
            );
            return Err(match retry_after {
                Some(after) => error.retry_after(after),
                None => error,
            });
        }
        // Reported now, so forgotten: a replay of the letter is sent afresh.
        if !state.refused.is_empty() {
            for (at, _) in &refused {
                state.refused.remove(&events[*at].dedupe_key());
            }
        }
        drop(state);
        if refused.is_empty() {
            return Ok(());
        }
        refused.sort_unstable_by_key(|(at, _)| *at);
        Err(SinkError::rejected(
            sink,
            format!("{} of {} events refused", refused.len(), events.len()),
            refused,
        ))
    }
}

impl State {
    fn refuse(&mut self, key: String, message: String) {
        if self.refused_order.len() == REFUSED_WINDOW
            && let Some(oldest) = self.refused_order.pop_front()
        {
            self.refused.remove(&oldest);
        }
        if self.refused.insert(key.clone(), message).is_none() {
            self.refused_order.push_back(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn batch(attempt: u32) -> Vec<Event> {
        (0..4)
            .map(|i| Event {
                id: format!("e{i}").into(),
                source: "s".into(),
                timestamp_ms: 1,
                payload: bytes::Bytes::from_static(b"{}"),
                content_type: conveyor_core::ContentType::Json,
                metadata: Default::default(),
                attempt,
                headers: Default::default(),
            })
            .collect()
    }

    #[test]
    fn a_batch_that_comes_back_resends_only_what_was_not_confirmed() {
        let answers = Answers::default();
        let first = batch(1);
        let (pending, mut round) = answers.sort(&first);
        assert_eq!(pending, [0, 1, 2, 3]);
        round.delivered([0]);
        round.refused(1, "HTTP 400 Bad Request: no".into());
        round.retry(2, "HTTP 503".into(), Some(Duration::from_secs(2)));
        let error = answers.settle("t", &first, round).expect_err("a retry");
        assert_eq!(
            error.kind,
            ErrorKind::Retryable {
                retry_after: Some(Duration::from_secs(2))
            }
        );
        assert!(error.message.contains("2 of 4 events"), "{error}");

        let again = batch(2);
        let (pending, mut round) = answers.sort(&again);
        assert_eq!(pending, [2, 3], "e0 confirmed, e1 refused before");
        round.delivered(pending);
        let error = answers.settle("t", &again, round).expect_err("e1 refused");
        assert_eq!(
            error.kind,
            ErrorKind::Rejected(vec![(1, "HTTP 400 Bad Request: no".into())])
        );
        // Reported, so forgotten: a replay is sent afresh.
        let (pending, _) = answers.sort(&batch(3));
        assert_eq!(pending, [1, 2, 3]);
    }

    #[test]
    fn a_first_delivery_is_never_looked_up_and_a_clean_round_is_ok() {
        let answers = Answers::default();
        let events = batch(2);
        let (pending, mut round) = answers.sort(&events);
        round.delivered(pending.iter().copied());
        assert!(answers.settle("t", &events, round).is_ok());
        // Nothing was remembered for a write that succeeded.
        assert_eq!(answers.sort(&events).0, [0, 1, 2, 3]);
    }
}

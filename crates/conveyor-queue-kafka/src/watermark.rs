//! The commit watermark of one partition.
//!
//! The worker pool finishes events out of order, but Kafka keeps one committed offset per
//! partition and a restarted consumer resumes there. So the offset committed must never pass an
//! event that is not finished: it is the lowest offset still held (received and neither acked
//! nor terminated), or one past the highest received when nothing is held. Events finished above
//! a held one wait; after a crash they are delivered again, and the processor's seen-id window
//! skips them.

use std::collections::BTreeSet;

/// Received-but-unfinished offsets of one partition, and where its watermark stands.
#[derive(Debug, Default, Clone)]
pub struct Watermark {
    /// Offsets handed to this process and not finished yet.
    held: BTreeSet<i64>,
    /// One past the highest offset received; `None` before the first.
    next: Option<i64>,
    /// The watermark last committed (or learnt from the broker), to commit only on progress.
    committed: Option<i64>,
}

impl Watermark {
    /// An offset arrived from the broker. Offsets arrive in increasing order per partition
    /// (they may skip numbers: compaction, transaction markers).
    pub fn received(&mut self, offset: i64) {
        self.held.insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |next| next.max(offset + 1)));
    }

    /// The event at `offset` is finished (written and acked, or dead-lettered).
    pub fn finished(&mut self, offset: i64) {
        self.held.remove(&offset);
    }

    /// The offset a restarted consumer should resume from: nothing below it is unfinished.
    /// `None` while nothing was received.
    pub fn position(&self) -> Option<i64> {
        self.held.first().copied().or(self.next)
    }

    /// One past the highest offset received.
    pub fn received_up_to(&self) -> Option<i64> {
        self.next
    }

    /// Events received and not finished.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Events finished at or above the position: done, but not yet covered by a commit.
    pub fn finished_above_position(&self) -> u64 {
        match (self.position(), self.next) {
            (Some(position), Some(next)) => {
                (next - position).max(0) as u64 - self.held.len() as u64
            }
            _ => 0,
        }
    }

    /// The position, if it moved since the last call that returned one: what to commit now.
    pub fn take_commit(&mut self) -> Option<i64> {
        let position = self.position()?;
        if self.committed == Some(position) {
            return None;
        }
        self.committed = Some(position);
        Some(position)
    }

    /// Whether [`Watermark::take_commit`] would return something (without taking it).
    pub fn has_progress(&self) -> bool {
        self.position().is_some() && self.position() != self.committed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::Watermark;

    #[test]
    fn the_issue_example_resumes_at_the_first_failure() {
        // Complete 0, 1, 3; fail 2 and 4: a restart must resume at 2.
        let mut watermark = Watermark::default();
        for offset in 0..5 {
            watermark.received(offset);
        }
        for offset in [0, 1, 3] {
            watermark.finished(offset);
        }
        assert_eq!(watermark.take_commit(), Some(2));
        assert_eq!(watermark.take_commit(), None, "no progress, no commit");
        assert_eq!(watermark.finished_above_position(), 1, "offset 3");
        watermark.finished(2);
        assert_eq!(watermark.take_commit(), Some(4));
        watermark.finished(4);
        assert_eq!(watermark.take_commit(), Some(5));
        assert_eq!(watermark.held(), 0);
    }

    #[test]
    fn gaps_in_offsets_do_not_stall_the_watermark() {
        let mut watermark = Watermark::default();
        for offset in [10, 11, 15, 20] {
            watermark.received(offset);
        }
        for offset in [10, 11, 15, 20] {
            watermark.finished(offset);
        }
        assert_eq!(watermark.position(), Some(21));
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Finish the n-th still-held offset (mod how many are held).
        Finish(usize),
        /// A failure: the event stays held (retried later, or after a restart).
        Fail,
        /// Receive the next offset, `gap` numbers past the previous one.
        Receive { gap: i64 },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            any::<usize>().prop_map(Step::Finish),
            Just(Step::Fail),
            (0i64..3).prop_map(|gap| Step::Receive { gap }),
        ]
    }

    proptest! {
        /// For any order of arrivals, completions and failures, the committed offset never
        /// passes an unfinished event, and it is as far as it may be: everything received
        /// below it is finished.
        #[test]
        fn the_commit_never_passes_an_unfinished_event(steps in prop::collection::vec(step(), 1..200)) {
            let mut watermark = Watermark::default();
            let mut received = Vec::new();
            let mut unfinished = BTreeSet::new();
            let mut next_offset = 0i64;
            let mut last_commit: Option<i64> = None;
            for step in steps {
                match step {
                    Step::Receive { gap } => {
                        next_offset += gap;
                        watermark.received(next_offset);
                        received.push(next_offset);
                        unfinished.insert(next_offset);
                        next_offset += 1;
                    }
                    Step::Finish(n) if !unfinished.is_empty() => {
                        let offset = *unfinished.iter().nth(n % unfinished.len()).expect("held");
                        unfinished.remove(&offset);
                        watermark.finished(offset);
                    }
                    Step::Fail | Step::Finish(_) => {}
                }
                if let Some(commit) = watermark.take_commit() {
                    if let Some(lowest) = unfinished.first() {
                        prop_assert!(commit <= *lowest, "committed {commit} past unfinished {lowest}");
                    }
                    prop_assert!(
                        received.iter().filter(|o| **o < commit).all(|o| !unfinished.contains(o)),
                        "something below the commit is unfinished"
                    );
                    if let Some(previous) = last_commit {
                        prop_assert!(commit > previous, "the commit went backwards");
                    }
                    last_commit = Some(commit);
                }
                // Maximal: the position is the first unfinished offset, or one past the last.
                let expected = unfinished.first().copied().or(received.last().map(|o| o + 1));
                prop_assert_eq!(watermark.position(), expected);
                prop_assert_eq!(watermark.held(), unfinished.len());
            }
            // "Restart": a new consumer starts at the commit; every unfinished event is at or
            // above it, so each comes back.
            if let Some(commit) = last_commit {
                prop_assert!(unfinished.iter().all(|o| *o >= commit));
            }
        }
    }
}

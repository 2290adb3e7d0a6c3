//! Noticing a consumer group that leaves partitions unconsumed.
//!
//! A group coordinator that keeps a dead member listed after its session expired (tansu 0.6
//! does; README, Kafka section) hands that member's share of the partitions to nobody: their
//! lag stays, no commit moves, and the live members see nothing wrong. Each member therefore
//! watches the partitions it does *not* own: when one of them has lag and the group's commit
//! on it has not moved for the whole window (twice the session timeout: long enough for any
//! live owner to commit, or for the coordinator to expire a dead one), while this member holds
//! fewer than all partitions (so it could take more), the group is stalled.
//!
//! This is a pure state machine over observations, so its decisions are tested without a
//! broker or a clock.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

/// One partition as the broker view shows it: the group's resume offset and its lag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Observed {
    pub partition: i32,
    /// Where the group resumes (its commit, or the oldest offset before the first commit).
    pub resume_at: i64,
    pub lag: u64,
}

/// A partition nobody consumed for the whole window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stuck {
    pub partition: i32,
    pub lag: u64,
    pub since: Instant,
}

/// What [`StallWatch::observe`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing unowned is stuck (or this member already owns every partition).
    Fine,
    /// Stuck partitions, and the window since the last rejoin has not passed yet.
    Stalled(Vec<Stuck>),
    /// Stuck partitions, and it is time to rejoin the group (again).
    Rejoin(Vec<Stuck>),
}

#[derive(Debug, Clone, Copy)]
struct Tracked {
    resume_at: i64,
    since: Instant,
}

/// Per-partition "since when has the commit stood still with lag" for partitions this member
/// does not own.
#[derive(Debug)]
pub(crate) struct StallWatch {
    window: Duration,
    tracked: BTreeMap<i32, Tracked>,
    /// After a rejoin, the next one waits a full window: the rejoin needs a rebalance, and the
    /// new owner a moment to commit.
    quiet_until: Option<Instant>,
}

impl StallWatch {
    pub(crate) fn new(window: Duration) -> StallWatch {
        StallWatch {
            window,
            tracked: BTreeMap::new(),
            quiet_until: None,
        }
    }

    pub(crate) fn window(&self) -> Duration {
        self.window
    }

    /// Takes one look at the topic's partitions (`partitions`, all of them) and at which of
    /// them this member owns (`owned`), at `now`.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        partitions: &[Observed],
        owned: &HashSet<i32>,
    ) -> Verdict {
        self.tracked
            .retain(|p, _| partitions.iter().any(|o| o.partition == *p));
        for observed in partitions {
            if owned.contains(&observed.partition) || observed.lag == 0 {
                self.tracked.remove(&observed.partition);
                continue;
            }
            match self.tracked.get_mut(&observed.partition) {
                // The commit stands still: keep the time it started to.
                Some(tracked) if tracked.resume_at == observed.resume_at => {}
                // New, or someone committed: progress, start over.
                _ => {
                    self.tracked.insert(
                        observed.partition,
                        Tracked {
                            resume_at: observed.resume_at,
                            since: now,
                        },
                    );
                }
            }
        }
        // Owning every partition, there is nothing to take over: a stuck partition of our own is
        // our workers' business (a failing sink), not the group's.
        if partitions.is_empty() || partitions.iter().all(|o| owned.contains(&o.partition)) {
            return Verdict::Fine;
        }
        let stuck: Vec<Stuck> = self
            .tracked
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(t.since) >= self.window)
            .filter_map(|(partition, t)| {
                partitions
                    .iter()
                    .find(|o| o.partition == *partition)
                    .map(|o| Stuck {
                        partition: *partition,
                        lag: o.lag,
                        since: t.since,
                    })
            })
            .collect();
        if stuck.is_empty() {
            self.quiet_until = None;
            return Verdict::Fine;
        }
        if self.quiet_until.is_some_and(|until| now < until) {
            return Verdict::Stalled(stuck);
        }
        self.quiet_until = Some(now + self.window);
        Verdict::Rejoin(stuck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(12);

    fn part(partition: i32, resume_at: i64, lag: u64) -> Observed {
        Observed {
            partition,
            resume_at,
            lag,
        }
    }

    fn owned(partitions: &[i32]) -> HashSet<i32> {
        partitions.iter().copied().collect()
    }

    fn stuck_ids(verdict: &Verdict) -> Vec<i32> {
        match verdict {
            Verdict::Fine => Vec::new(),
            Verdict::Stalled(stuck) | Verdict::Rejoin(stuck) => {
                stuck.iter().map(|s| s.partition).collect()
            }
        }
    }

    #[test]
    fn an_unowned_partition_whose_commit_stands_still_is_stuck_after_the_window_not_before() {
        let start = Instant::now();
        let mut watch = StallWatch::new(WINDOW);
        let view = [part(0, 10, 0), part(1, 5, 0), part(2, 100, 5969)];
        let mine = owned(&[0, 1]);
        assert_eq!(watch.observe(start, &view, &mine), Verdict::Fine);
        let just_before = start + WINDOW - Duration::from_millis(1);
        assert_eq!(watch.observe(just_before, &view, &mine), Verdict::Fine);
        let verdict = watch.observe(start + WINDOW, &view, &mine);
        assert_eq!(
            verdict,
            Verdict::Rejoin(vec![Stuck {
                partition: 2,
                lag: 5969,
                since: start
            }])
        );
    }

    #[test]
    fn a_moving_commit_is_progress_and_restarts_the_clock() {
        let start = Instant::now();
        let mut watch = StallWatch::new(WINDOW);
        let mine = owned(&[0]);
        watch.observe(start, &[part(0, 0, 0), part(1, 100, 50)], &mine);
        // Another member commits on partition 1 just before the window ends...
        let moved = start + WINDOW - Duration::from_secs(1);
        watch.observe(moved, &[part(0, 0, 0), part(1, 120, 50)], &mine);
        // ...so a full window later than the start it is not stuck yet,
        let later = start + WINDOW + Duration::from_secs(5);
        assert_eq!(
            watch.observe(later, &[part(0, 0, 0), part(1, 120, 50)], &mine),
            Verdict::Fine
        );
        // and a full window after its last commit, it is.
        let verdict = watch.observe(moved + WINDOW, &[part(0, 0, 0), part(1, 120, 50)], &mine);
        assert_eq!(stuck_ids(&verdict), [1]);
    }

    #[test]
    fn no_lag_owning_everything_or_owning_the_stuck_one_is_never_a_stall() {
        let start = Instant::now();
        let late = start + WINDOW * 10;
        // No lag on the unowned partition.
        let mut watch = StallWatch::new(WINDOW);
        let idle = [part(0, 0, 0), part(1, 7, 0)];
        watch.observe(start, &idle, &owned(&[0]));
        assert_eq!(watch.observe(late, &idle, &owned(&[0])), Verdict::Fine);
        // Every partition owned here, lag or not: our own workers' business.
        let mut watch = StallWatch::new(WINDOW);
        let lagging = [part(0, 0, 9), part(1, 7, 9)];
        watch.observe(start, &lagging, &owned(&[0, 1]));
        assert_eq!(
            watch.observe(late, &lagging, &owned(&[0, 1])),
            Verdict::Fine
        );
        // The stuck partition is ours (assigned meanwhile): not the group's fault.
        let mut watch = StallWatch::new(WINDOW);
        watch.observe(start, &lagging, &owned(&[0]));
        assert_eq!(watch.observe(late, &lagging, &owned(&[1])), Verdict::Fine);
    }

    #[test]
    fn after_a_rejoin_the_next_waits_a_window_and_the_stall_clears_on_progress() {
        let start = Instant::now();
        let mut watch = StallWatch::new(WINDOW);
        let stuck = [part(0, 0, 0), part(1, 3, 40)];
        let mine = owned(&[0]);
        watch.observe(start, &stuck, &mine);
        assert!(matches!(
            watch.observe(start + WINDOW, &stuck, &mine),
            Verdict::Rejoin(_)
        ));
        let soon = start + WINDOW + Duration::from_secs(1);
        assert!(matches!(
            watch.observe(soon, &stuck, &mine),
            Verdict::Stalled(_)
        ));
        assert!(matches!(
            watch.observe(start + WINDOW * 2, &stuck, &mine),
            Verdict::Rejoin(_)
        ));
        // Someone finally commits on partition 1: fine at once.
        let moved = [part(0, 0, 0), part(1, 10, 33)];
        assert_eq!(
            watch.observe(start + WINDOW * 2 + Duration::from_secs(1), &moved, &mine),
            Verdict::Fine
        );
    }
}

//! Who sends what, when: the shared work counter, the open-loop schedule, and where a
//! request's latency starts.
//!
//! **Coordinated omission.** A closed-loop client that waits for each answer before sending
//! the next request stops sending while the target stalls, so the requests that *would* have
//! waited never get measured. In open-loop mode every request has an intended send time on a
//! fixed schedule (`start + index × interval`); its latency is measured from that time, not
//! from when a free connection finally sent it. A one-second stall then shows up in every
//! request that was due during it, as it would for real clients arriving at that rate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How early a paced request may leave: tokio's timer wakes at millisecond granularity, so a
/// worker sleeps until this much before the intended time and sends then (its latency is
/// measured from the actual send when that is earlier). Sending late instead would add up to a
/// millisecond of made-up latency to every request.
pub const EARLY_SLACK: Duration = Duration::from_millis(1);

/// The open-loop schedule: request `i` is due at `start + i × interval`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval_nanos: f64,
}

impl Schedule {
    /// `requests_per_sec` requests per second from `start`.
    pub fn new(start: Instant, requests_per_sec: f64) -> Schedule {
        Schedule {
            start,
            interval_nanos: 1e9 / requests_per_sec,
        }
    }

    /// When request `index` is due.
    pub fn intended(&self, index: u64) -> Instant {
        // f64 keeps nanosecond precision up to ~2^53 ns (104 days).
        self.start + Duration::from_nanos((index as f64 * self.interval_nanos) as u64)
    }
}

/// Where a request's latency is measured from: its intended send time in open loop (or the
/// actual send, when it left early by up to [`EARLY_SLACK`]); the actual send in closed loop.
pub fn latency_start(intended: Option<Instant>, sent: Instant) -> Instant {
    match intended {
        Some(intended) => intended.min(sent),
        None => sent,
    }
}

/// The instant a paced worker should sleep until before sending a request due at `intended`;
/// `None` when it should send right away.
pub fn wake_time(intended: Option<Instant>, now: Instant) -> Option<Instant> {
    let intended = intended?;
    let wake = intended.checked_sub(EARLY_SLACK)?;
    (wake > now).then_some(wake)
}

/// Sleeps until a request due at `intended` may be sent.
pub async fn pace(intended: Option<Instant>) {
    if let Some(wake) = wake_time(intended, Instant::now()) {
        tokio::time::sleep_until(wake.into()).await;
    }
}

/// One request a worker took on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Position in the run (0-based).
    pub index: u64,
    /// Events it carries.
    pub events: u64,
    /// When it is due (open loop only).
    pub intended: Option<Instant>,
}

/// The run's requests, handed out one at a time to whichever worker asks first.
#[derive(Debug)]
pub struct Work {
    next: AtomicU64,
    stopped: AtomicBool,
    /// Total events (`--events`), if bounded.
    events: Option<u64>,
    per_request: u64,
    deadline: Option<Instant>,
    schedule: Option<Schedule>,
}

impl Work {
    pub fn new(
        events: Option<u64>,
        per_request: u64,
        deadline: Option<Instant>,
        schedule: Option<Schedule>,
    ) -> Work {
        Work {
            next: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            events,
            per_request: per_request.max(1),
            deadline,
            schedule,
        }
    }

    /// The next request to send, or `None` when the run is over (all events handed out, the
    /// deadline passed, or [`Work::stop`] was called).
    pub fn claim(&self) -> Option<Claim> {
        self.claim_at(Instant::now())
    }

    /// [`Work::claim`] as of `now`.
    pub fn claim_at(&self, now: Instant) -> Option<Claim> {
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        let events = match self.events {
            None => self.per_request,
            Some(total) => {
                let first = index.checked_mul(self.per_request)?;
                if first >= total {
                    return None;
                }
                (total - first).min(self.per_request)
            }
        };
        let intended = self.schedule.map(|s| s.intended(index));
        if let Some(deadline) = self.deadline
            && intended.unwrap_or(now) >= deadline
        {
            return None;
        }
        Some(Claim {
            index,
            events,
            intended,
        })
    }

    /// Ends the run early (Ctrl-C): no more claims are handed out.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_spaces_requests_evenly() {
        let start = Instant::now();
        let s = Schedule::new(start, 1000.0);
        assert_eq!(s.intended(0), start);
        assert_eq!(s.intended(1) - start, Duration::from_millis(1));
        assert_eq!(s.intended(2500) - start, Duration::from_millis(2500));
        let s = Schedule::new(start, 3.0);
        assert_eq!(s.intended(3) - start, Duration::from_secs(1));
    }

    #[test]
    fn latency_starts_at_the_intended_time_unless_sent_earlier() {
        let t0 = Instant::now();
        let late = t0 + Duration::from_millis(400);
        assert_eq!(
            latency_start(Some(t0), late),
            t0,
            "late send: from intended"
        );
        let early = t0 + Duration::from_micros(100);
        assert_eq!(
            latency_start(Some(early), t0),
            t0,
            "early send: from actual"
        );
        assert_eq!(latency_start(None, late), late, "closed loop: from actual");
    }

    #[test]
    fn paced_workers_wake_a_little_early_and_never_for_past_times() {
        let now = Instant::now();
        assert_eq!(wake_time(None, now), None);
        assert_eq!(wake_time(Some(now), now), None);
        assert_eq!(wake_time(Some(now + Duration::from_micros(500)), now), None);
        let due = now + Duration::from_millis(10);
        assert_eq!(wake_time(Some(due), now), Some(due - EARLY_SLACK));
    }

    #[test]
    fn work_hands_out_every_event_once_with_a_short_last_batch() {
        let work = Work::new(Some(2500), 1000, None, None);
        let claims: Vec<Claim> = std::iter::from_fn(|| work.claim()).collect();
        let sizes: Vec<u64> = claims.iter().map(|c| c.events).collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
        assert!(work.claim().is_none(), "stays exhausted");
    }

    #[test]
    fn work_stops_at_the_deadline_in_schedule_time() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(1);
        // 100 requests/s for 1 s: exactly 100 intended before the deadline, whatever the
        // clock says when they are claimed.
        let work = Work::new(None, 1, Some(deadline), Some(Schedule::new(start, 100.0)));
        let n = std::iter::from_fn(|| work.claim_at(start)).count();
        assert_eq!(n, 100);
        let stopped = Work::new(None, 1, None, None);
        stopped.stop();
        assert!(stopped.claim().is_none());
    }
}

//! What each worker measures: latency histograms (total and per second), answer counts, and
//! the live counters the progress line reads.
//!
//! Every worker owns its [`Recorder`] (no sharing on the hot path); the per-second histogram
//! of the second in progress is merged into the shared [`Timeline`] when the second changes,
//! and everything is merged once at the end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency the total histogram tells apart (1 hour, in microseconds); higher values
/// are recorded as this.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Highest latency the per-second histograms tell apart (60 s): they only feed the chart.
const MAX_SECOND_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in microseconds, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("fixed, valid histogram bounds")
}

/// A per-second latency histogram in microseconds, 2 significant digits (small: one per
/// second of the run).
fn second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_SECOND_LATENCY_US, 2).expect("fixed, valid histogram bounds")
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with this HTTP status (gRPC acks are mapped: accepted → 202, `queue_full` →
    /// 429, `unavailable`/`shutting_down` → 503, any other error → 422).
    Status(u16),
    /// No answer: connection refused or broken, timeout, stream reset.
    Transport,
}

/// Requests by how they ended, and events by what became of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Requests sent (in grpc mode: events published).
    pub requests: u64,
    pub status_2xx: u64,
    pub status_429: u64,
    pub status_503: u64,
    pub status_other: u64,
    pub transport_errors: u64,
    /// Events carried by the requests sent.
    pub events_sent: u64,
    /// Events the target accepted.
    pub events_accepted: u64,
    /// Events answered but refused.
    pub events_rejected: u64,
    /// Events whose request got no answer.
    pub events_failed: u64,
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.status_2xx += other.status_2xx;
        self.status_429 += other.status_429;
        self.status_503 += other.status_503;
        self.status_other += other.status_other;
        self.transport_errors += other.transport_errors;
        self.events_sent += other.events_sent;
        self.events_accepted += other.events_accepted;
        self.events_rejected += other.events_rejected;
        self.events_failed += other.events_failed;
    }

    /// Counts one request that carried `events` events, `accepted` of which were accepted.
    pub fn count(&mut self, outcome: Outcome, events: u64, accepted: u64) {
        self.requests += 1;
        self.events_sent += events;
        match outcome {
            Outcome::Status(200..=299) => self.status_2xx += 1,
            Outcome::Status(429) => self.status_429 += 1,
            Outcome::Status(503) => self.status_503 += 1,
            Outcome::Status(_) => self.status_other += 1,
            Outcome::Transport => self.transport_errors += 1,
        }
        let accepted = accepted.min(events);
        self.events_accepted += accepted;
        match outcome {
            Outcome::Transport => self.events_failed += events - accepted,
            Outcome::Status(_) => self.events_rejected += events - accepted,
        }
    }

    /// Requests that did not end in a 2xx.
    pub fn errors(&self) -> u64 {
        self.requests - self.status_2xx
    }
}

/// Counters the progress display reads while the run goes on.
#[derive(Debug, Default)]
pub struct Live {
    pub requests: AtomicU64,
    pub events_done: AtomicU64,
    pub events_accepted: AtomicU64,
    pub errors: AtomicU64,
}

/// One second of the run, by answer time.
#[derive(Debug, Clone)]
pub struct Second {
    pub latency: Histogram<u64>,
    pub requests: u64,
    pub accepted: u64,
    pub errors: u64,
}

impl Second {
    fn new() -> Second {
        Second {
            latency: second_histogram(),
            requests: 0,
            accepted: 0,
            errors: 0,
        }
    }

    fn merge(&mut self, other: &Second) {
        self.latency
            .add(&other.latency)
            .expect("per-second histograms share their bounds");
        self.requests += other.requests;
        self.accepted += other.accepted;
        self.errors += other.errors;
    }
}

/// The run second by second (index = whole seconds since the start).
#[derive(Debug, Default)]
pub struct Timeline {
    pub seconds: Vec<Second>,
}

impl Timeline {
    fn merge(&mut self, index: usize, second: &Second) {
        while self.seconds.len() <= index {
            self.seconds.push(Second::new());
        }
        self.seconds[index].merge(second);
    }
}

/// One worker's measurements.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    pub counts: Counts,
    /// Latency of every answered request, in microseconds.
    pub latency: Histogram<u64>,
    /// When the last answer (or failure) came.
    pub last_done: Option<Instant>,
    current_index: usize,
    current: Second,
    timeline: Arc<Mutex<Timeline>>,
    live: Arc<Live>,
}

impl Recorder {
    pub fn new(start: Instant, timeline: Arc<Mutex<Timeline>>, live: Arc<Live>) -> Recorder {
        Recorder {
            start,
            counts: Counts::default(),
            latency: latency_histogram(),
            last_done: None,
            current_index: 0,
            current: Second::new(),
            timeline,
            live,
        }
    }

    /// Records one request: its latency runs from `from` (see
    /// [`crate::schedule::latency_start`]) to `done`. Transport errors count but have no
    /// latency.
    pub fn record(
        &mut self,
        from: Instant,
        done: Instant,
        outcome: Outcome,
        events: u64,
        accepted: u64,
    ) {
        self.counts.count(outcome, events, accepted);
        let index = done.saturating_duration_since(self.start).as_secs() as usize;
        if index != self.current_index {
            self.flush_second();
            self.current_index = index;
        }
        let ok = matches!(outcome, Outcome::Status(200..=299));
        if outcome != Outcome::Transport {
            let us = micros(done.saturating_duration_since(from));
            self.latency.saturating_record(us);
            self.current.latency.saturating_record(us);
        }
        self.current.requests += 1;
        self.current.accepted += accepted.min(events);
        self.current.errors += u64::from(!ok);
        self.last_done = Some(self.last_done.map_or(done, |last| last.max(done)));
        self.live.requests.fetch_add(1, Ordering::Relaxed);
        self.live.events_done.fetch_add(events, Ordering::Relaxed);
        self.live
            .events_accepted
            .fetch_add(accepted.min(events), Ordering::Relaxed);
        if !ok {
            self.live.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn flush_second(&mut self) {
        if self.current.requests == 0 {
            return;
        }
        let second = std::mem::replace(&mut self.current, Second::new());
        self.timeline
            .lock()
            .expect("timeline lock")
            .merge(self.current_index, &second);
    }

    /// Hands the second in progress to the timeline (at the end of the run).
    pub fn finish(&mut self) {
        self.flush_second();
    }
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// All workers' measurements, merged.
#[derive(Debug)]
pub struct Totals {
    pub counts: Counts,
    pub latency: Histogram<u64>,
    pub last_done: Option<Instant>,
}

/// Merges finished recorders (their seconds must already be flushed with [`Recorder::finish`]).
pub fn merge(recorders: &[Recorder]) -> Totals {
    let mut totals = Totals {
        counts: Counts::default(),
        latency: latency_histogram(),
        last_done: None,
    };
    for r in recorders {
        totals.counts.add(&r.counts);
        totals
            .latency
            .add(&r.latency)
            .expect("latency histograms share their bounds");
        totals.last_done = match (totals.last_done, r.last_done) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(start: Instant) -> (Recorder, Arc<Mutex<Timeline>>) {
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        (
            Recorder::new(start, Arc::clone(&timeline), Arc::new(Live::default())),
            timeline,
        )
    }

    #[test]
    fn counts_sort_answers_and_events() {
        let mut c = Counts::default();
        c.count(Outcome::Status(202), 1000, 1000);
        c.count(Outcome::Status(207), 1000, 400);
        c.count(Outcome::Status(429), 1000, 0);
        c.count(Outcome::Status(503), 1, 0);
        c.count(Outcome::Status(400), 1, 0);
        c.count(Outcome::Transport, 10, 0);
        assert_eq!(c.requests, 6);
        assert_eq!(
            (
                c.status_2xx,
                c.status_429,
                c.status_503,
                c.status_other,
                c.transport_errors
            ),
            (2, 1, 1, 1, 1)
        );
        assert_eq!(c.events_sent, 3012);
        assert_eq!(c.events_accepted, 1400);
        assert_eq!(c.events_rejected, 1602);
        assert_eq!(c.events_failed, 10);
        assert_eq!(c.errors(), 4);
        assert_eq!(
            c.events_accepted + c.events_rejected + c.events_failed,
            c.events_sent
        );
    }

    #[test]
    fn workers_merge_into_one_histogram_and_one_timeline() {
        let start = Instant::now();
        let (mut a, timeline) = recorder(start);
        let mut b = Recorder::new(start, Arc::clone(&timeline), Arc::new(Live::default()));
        // a: 100 answers of 1 ms in second 0; b: 100 of 10 ms in second 0 and 1 of 2 s in
        // second 2 (a transport error in second 1 counts but has no latency).
        for i in 0..100 {
            let from = start + Duration::from_millis(i);
            a.record(
                from,
                from + Duration::from_millis(1),
                Outcome::Status(202),
                1,
                1,
            );
            b.record(
                from,
                from + Duration::from_millis(10),
                Outcome::Status(202),
                1,
                1,
            );
        }
        let t1 = start + Duration::from_millis(1500);
        b.record(t1, t1, Outcome::Transport, 1, 0);
        b.record(
            start + Duration::from_millis(500),
            start + Duration::from_millis(2500),
            Outcome::Status(503),
            1,
            0,
        );
        a.finish();
        b.finish();
        let totals = merge(&[a, b]);
        assert_eq!(totals.counts.requests, 202);
        assert_eq!(totals.counts.events_accepted, 200);
        assert_eq!(
            totals.latency.len(),
            201,
            "transport errors have no latency"
        );
        // 100 × 1 ms, 100 × 10 ms, 1 × 2 s.
        let p40 = totals.latency.value_at_quantile(0.4);
        assert!((990..=1010).contains(&p40), "p40 {p40} µs");
        let p90 = totals.latency.value_at_quantile(0.9);
        assert!((9_990..=10_010).contains(&p90), "p90 {p90} µs");
        let max = totals.latency.max();
        assert!((1_999_000..=2_001_000).contains(&max), "max {max} µs");
        assert_eq!(totals.last_done, Some(start + Duration::from_millis(2500)));
        let timeline = timeline.lock().expect("timeline lock");
        let per_second: Vec<(u64, u64, u64)> = timeline
            .seconds
            .iter()
            .map(|s| (s.requests, s.accepted, s.errors))
            .collect();
        assert_eq!(per_second, vec![(200, 200, 0), (1, 0, 1), (1, 0, 1)]);
        assert_eq!(timeline.seconds[0].latency.len(), 200);
    }
}

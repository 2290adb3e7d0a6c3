//! Prometheus histograms made of atomics: recording is a bucket search over a dozen integers and
//! three relaxed atomic adds, with no lock and no allocation.
//!
//! Values are integers in a base unit chosen per histogram (microseconds for durations, plain
//! counts for sizes); `scale` converts them to the exposed unit (1e6 for seconds). A hot loop
//! that records per event collects into a [`LocalHistogram`] first and
//! [`flushes`](LocalHistogram::flush) it once per batch, so many events cost one set of atomic
//! adds.
//!
//! A histogram can also keep, per bucket, the trace id of a recent value ([`Histogram::record_traced`],
//! [`LocalHistogram::record_traced`]): the exemplars of OpenMetrics. Storing one is a `try_lock`
//! on that bucket's slot (skipped when another thread holds it), at most once per bucket per
//! batch, and only for values that carry a trace: the hot path never waits.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::exposition::{HistogramValue, TraceExemplar};

/// Most buckets a histogram may have (its `+Inf` bucket not counted).
pub const MAX_BUCKETS: usize = 16;

/// Bucket bounds for durations, in microseconds: 100 µs to 30 s.
pub const DURATION_MICROS: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000, 30_000_000,
];

/// Bucket bounds for batch sizes, in events.
pub const BATCH_EVENTS: &[u64] = &[1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 10_000];

/// Bucket bounds for payload sizes, in bytes.
pub const PAYLOAD_BYTES: &[u64] = &[
    64, 256, 1_024, 4_096, 16_384, 65_536, 262_144, 1_048_576, 4_194_304,
];

/// One histogram: per-bucket counters, a count and a sum.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    scale: f64,
    /// `buckets[i]` counts values in `(bounds[i-1], bounds[i]]`; the last used slot is `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS + 1],
    count: AtomicU64,
    sum: AtomicU64,
    /// The latest traced value of each bucket.
    exemplars: [Mutex<Option<Kept>>; MAX_BUCKETS + 1],
}

/// A bucket's exemplar as kept: trace id, value in the base unit, seconds since the epoch.
type Kept = ([u8; 16], u64, f64);

fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Histogram {
    /// A histogram over `bounds` (ascending, at most [`MAX_BUCKETS`]) whose values are exposed
    /// divided by `scale`.
    pub const fn new(bounds: &'static [u64], scale: f64) -> Self {
        assert!(bounds.len() <= MAX_BUCKETS, "too many histogram buckets");
        Histogram {
            bounds,
            scale,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            exemplars: [const { Mutex::new(None) }; MAX_BUCKETS + 1],
        }
    }

    /// A duration histogram in seconds, with [`DURATION_MICROS`] buckets.
    pub const fn seconds() -> Self {
        Histogram::new(DURATION_MICROS, 1e6)
    }

    fn slot(&self, value: u64) -> usize {
        self.bounds.partition_point(|&le| le < value)
    }

    /// Records one value (in the base unit).
    pub fn record(&self, value: u64) {
        self.buckets[self.slot(value)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Records a duration (for histograms whose base unit is the microsecond).
    pub fn record_duration(&self, elapsed: Duration) {
        self.record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// Records one value and, when it belongs to a trace, keeps `trace_id` as its bucket's
    /// exemplar.
    pub fn record_traced(&self, value: u64, trace_id: Option<[u8; 16]>) {
        self.record(value);
        if let Some(trace_id) = trace_id {
            self.keep_exemplar(self.slot(value), trace_id, value);
        }
    }

    fn keep_exemplar(&self, slot: usize, trace_id: [u8; 16], value: u64) {
        if let Ok(mut exemplar) = self.exemplars[slot].try_lock() {
            *exemplar = Some((trace_id, value, now_seconds()));
        }
    }

    /// The buckets (per bucket, not cumulative, `+Inf` last), sum and exemplars, for
    /// [`crate::exposition`].
    pub fn value(&self) -> HistogramValue {
        let bounds = self
            .bounds
            .iter()
            .map(|b| *b as f64 / self.scale)
            .chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds
            .zip(&self.buckets)
            .map(|(le, n)| (le, n.load(Ordering::Relaxed)))
            .collect();
        let exemplars = self.exemplars[..buckets.len()]
            .iter()
            .map(|slot| {
                let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
                slot.map(|(trace_id, value, at_seconds)| TraceExemplar {
                    trace_id,
                    value: value as f64 / self.scale,
                    at_seconds,
                })
            })
            .collect();
        HistogramValue {
            buckets,
            sum: self.sum.load(Ordering::Relaxed) as f64 / self.scale,
            exemplars,
        }
    }

    /// A per-batch accumulator for this histogram.
    pub fn local(&'static self) -> LocalHistogram {
        LocalHistogram {
            target: self,
            buckets: [0; MAX_BUCKETS + 1],
            count: 0,
            sum: 0,
            exemplars: [None; MAX_BUCKETS + 1],
        }
    }

    /// The bucket counts now (not cumulative), to merge or serve as JSON.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot {
            bounds: self.bounds.iter().map(|b| *b as f64 / self.scale).collect(),
            counts: vec![0; self.bounds.len() + 1],
            sum: 0.0,
        };
        self.add_to(&mut snapshot);
        snapshot
    }

    /// Adds this histogram's counts to `snapshot` (which must have the same bounds).
    pub fn add_to(&self, snapshot: &mut Snapshot) {
        for (slot, n) in snapshot.counts.iter_mut().enumerate() {
            *n += self.buckets[slot].load(Ordering::Relaxed);
        }
        snapshot.sum += self.sum.load(Ordering::Relaxed) as f64 / self.scale;
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// A histogram's buckets at one moment: `counts[i]` values fell in `(bounds[i-1], bounds[i]]`,
/// the last one above every bound. Served as JSON to the live dashboard, which takes the
/// difference of two snapshots to show percentiles over the last seconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Snapshot {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
}

/// Collects values without atomics; [`flush`](Self::flush) (or drop) adds them to the target.
pub struct LocalHistogram {
    target: &'static Histogram,
    buckets: [u64; MAX_BUCKETS + 1],
    count: u64,
    sum: u64,
    /// A traced value per bucket, kept at the flush: trace id and value.
    exemplars: [Option<([u8; 16], u64)>; MAX_BUCKETS + 1],
}

impl LocalHistogram {
    pub fn record(&mut self, value: u64) {
        self.record_slot(value);
    }

    fn record_slot(&mut self, value: u64) -> usize {
        let slot = self.target.slot(value);
        self.buckets[slot] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(value);
        slot
    }

    /// Records one value; `trace_id` is asked only when its bucket has no exemplar yet in
    /// this batch, so a batch reads at most one trace context per bucket.
    pub fn record_traced(&mut self, value: u64, trace_id: impl FnOnce() -> Option<[u8; 16]>) {
        let slot = self.record_slot(value);
        if self.exemplars[slot].is_none() {
            self.exemplars[slot] = trace_id().map(|id| (id, value));
        }
    }

    pub fn record_duration(&mut self, elapsed: Duration) {
        self.record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds what was collected to the shared histogram and starts over.
    pub fn flush(&mut self) {
        if self.count == 0 {
            return;
        }
        for (slot, n) in self.buckets.iter_mut().enumerate() {
            if *n > 0 {
                self.target.buckets[slot].fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        self.target.count.fetch_add(self.count, Ordering::Relaxed);
        self.target.sum.fetch_add(self.sum, Ordering::Relaxed);
        self.count = 0;
        self.sum = 0;
        for (slot, exemplar) in self.exemplars.iter_mut().enumerate() {
            if let Some((trace_id, value)) = exemplar.take() {
                self.target.keep_exemplar(slot, trace_id, value);
            }
        }
    }
}

impl Drop for LocalHistogram {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static H: Histogram = Histogram::new(&[10, 100, 1000], 1.0);

    #[test]
    fn values_land_in_their_buckets_and_local_flushes_add_up() {
        H.record(5);
        H.record(10);
        H.record(50);
        {
            let mut local = H.local();
            local.record(500);
            local.record_traced(5000, || Some([7; 16]));
            local.record_traced(6000, || panic!("one trace context per bucket and batch"));
        }
        let value = H.value();
        assert_eq!(
            value.buckets,
            vec![(10.0, 2), (100.0, 1), (1000.0, 1), (f64::INFINITY, 2)]
        );
        assert_eq!(value.sum, 11565.0);
        assert_eq!(H.count(), 6);
        let kept: Vec<_> = value
            .exemplars
            .iter()
            .map(|e| e.map(|e| e.trace_id))
            .collect();
        assert_eq!(kept, vec![None, None, None, Some([7; 16])]);
    }

    #[test]
    fn seconds_are_exposed_in_seconds_with_the_traced_value() {
        static S: Histogram = Histogram::seconds();
        S.record_duration(Duration::from_millis(3));
        S.record_traced(4_000, Some([1; 16]));
        let value = S.value();
        assert_eq!(value.buckets[5], (0.005, 2));
        assert!((value.sum - 0.007).abs() < 1e-9, "{value:?}");
        let exemplar = value.exemplars[5].expect("exemplar kept");
        assert_eq!((exemplar.trace_id, exemplar.value), ([1; 16], 0.004));
    }
}

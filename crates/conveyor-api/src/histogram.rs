//! Prometheus histograms made of atomics: recording is a bucket search over a dozen integers and
//! three relaxed atomic adds, with no lock and no allocation.
//!
//! Values are integers in a base unit chosen per histogram (microseconds for durations, plain
//! counts for sizes); `scale` converts them to the exposed unit (1e6 for seconds). A hot loop
//! that records per event collects into a [`LocalHistogram`] first and
//! [`flushes`](LocalHistogram::flush) it once per batch, so many events cost one set of atomic
//! adds.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// One histogram: cumulative-on-render bucket counters, a count and a sum.
pub struct Histogram {
    bounds: &'static [u64],
    scale: f64,
    /// `buckets[i]` counts values in `(bounds[i-1], bounds[i]]`; the last used slot is `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS + 1],
    count: AtomicU64,
    sum: AtomicU64,
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

    /// A per-batch accumulator for this histogram.
    pub fn local(&'static self) -> LocalHistogram {
        LocalHistogram {
            target: self,
            buckets: [0; MAX_BUCKETS + 1],
            count: 0,
            sum: 0,
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

    /// Appends `# HELP`, `# TYPE` and the samples of this histogram with no labels.
    pub fn render_family(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_samples(out, name, "");
    }

    /// Appends the `_bucket`, `_sum` and `_count` samples, with `labels` (`k="v",…` or empty).
    pub fn render_samples(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let le = *bound as f64 / self.scale;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        // The count is read after the buckets: a record racing with this render may be in one
        // and not the other, but `+Inf` must equal `_count`, so both print the buckets' total.
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum.load(Ordering::Relaxed) as f64 / self.scale;
        if labels.is_empty() {
            let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
        } else {
            let _ = writeln!(
                out,
                "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {cumulative}"
            );
        }
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
}

impl LocalHistogram {
    pub fn record(&mut self, value: u64) {
        self.buckets[self.target.slot(value)] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(value);
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
    fn values_land_in_cumulative_buckets_and_local_flushes_add_up() {
        H.record(5);
        H.record(10);
        H.record(50);
        {
            let mut local = H.local();
            local.record(500);
            local.record(5000);
        }
        let mut out = String::new();
        H.render_family(&mut out, "x", "help");
        for line in [
            "x_bucket{le=\"10\"} 2",
            "x_bucket{le=\"100\"} 3",
            "x_bucket{le=\"1000\"} 4",
            "x_bucket{le=\"+Inf\"} 5",
            "x_sum 5565",
            "x_count 5",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        let mut labelled = String::new();
        H.render_samples(&mut labelled, "x", "stage=\"json\"");
        assert!(labelled.contains("x_bucket{stage=\"json\",le=\"+Inf\"} 5"));
        assert!(labelled.contains("x_count{stage=\"json\"} 5"));
    }

    #[test]
    fn seconds_render_le_in_seconds() {
        static S: Histogram = Histogram::seconds();
        S.record_duration(Duration::from_millis(3));
        let mut out = String::new();
        S.render_family(&mut out, "d_seconds", "help");
        assert!(out.contains("d_seconds_bucket{le=\"0.0025\"} 0"), "{out}");
        assert!(out.contains("d_seconds_bucket{le=\"0.005\"} 1"), "{out}");
        assert!(out.contains("d_seconds_sum 0.003"), "{out}");
    }
}

//! Recording cost of conveyor's atomic histograms against the two Prometheus client crates
//! (BENCHMARKS.md, "Metrics crate"). Run: `cd scripts/metrics-crates && cargo run --release`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

const BOUNDS: &[u64] = &[100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 10_000_000, 30_000_000];

struct Ours { buckets: [AtomicU64; 17], count: AtomicU64, sum: AtomicU64 }
impl Ours {
    fn record(&self, v: u64) {
        let slot = BOUNDS.partition_point(|&b| b < v);
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
    }
}

fn time(name: &str, threads: usize, n: u64, f: impl Fn(u64) + Sync) {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let f = &f;
            s.spawn(move || for i in 0..n { f(black_box((i * 7919 + t as u64) % 40_000)) });
        }
    });
    let ns = start.elapsed().as_nanos() as f64 / (n as f64);
    println!("{name:<48} {threads} thread(s): {ns:6.1} ns per observation (per thread)");
}

fn main() {
    let n = 5_000_000;
    let secs: Vec<f64> = BOUNDS.iter().map(|b| *b as f64 / 1e6).collect();
    for threads in [1, 2] {
        let ours = Ours { buckets: [const { AtomicU64::new(0) }; 17], count: AtomicU64::new(0), sum: AtomicU64::new(0) };
        time("conveyor atomic Histogram::record", threads, n, |v| ours.record(v));
        let local_cost = {
            let start = Instant::now();
            let mut b = [0u64; 17];
            let (mut c, mut s) = (0u64, 0u64);
            for i in 0..n { let v = black_box((i * 7919) % 40_000); b[BOUNDS.partition_point(|&x| x < v)] += 1; c += 1; s += v; }
            black_box((b, c, s));
            start.elapsed().as_nanos() as f64 / n as f64
        };
        if threads == 1 { println!("{:<48} 1 thread(s): {local_cost:6.1} ns per observation", "conveyor LocalHistogram::record (per batch)"); }
        let pc = prometheus_client::metrics::histogram::Histogram::new(secs.iter().copied());
        time("prometheus-client Histogram::observe", threads, n, |v| pc.observe(v as f64 / 1e6));
        let pe: prometheus_client::metrics::exemplar::HistogramWithExemplars<Vec<(String, String)>> =
            prometheus_client::metrics::exemplar::HistogramWithExemplars::new(secs.iter().copied());
        time("prometheus-client HistogramWithExemplars::observe", threads, n, |v| pe.observe(v as f64 / 1e6, None, None));
        let tk = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("x", "x").buckets(secs.clone())).unwrap();
        time("prometheus (TiKV) Histogram::observe", threads, n, |v| tk.observe(v as f64 / 1e6));
    }
}

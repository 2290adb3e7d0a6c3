//! Jitter for retry delays, the one place every retry loop takes it from: processes (or
//! workers) that failed together must not retry in step.

use std::time::Duration;

/// `delay` plus a random extra of up to `spread` times it (0.5: up to 50% longer).
pub fn with_jitter(delay: Duration, spread: f64) -> Duration {
    delay + delay.mul_f64(spread * random_fraction())
}

/// A random number in `[0, 1)`. Not cryptographic.
pub fn random_fraction() -> f64 {
    (crate::trace::next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_its_spread_and_varies() {
        let base = Duration::from_millis(100);
        let delays: Vec<Duration> = (0..100).map(|_| with_jitter(base, 0.5)).collect();
        assert!(delays.iter().all(|d| *d >= base && *d < base.mul_f64(1.5)));
        assert!(delays.iter().any(|d| *d != delays[0]), "{delays:?}");
    }
}

//! Progress on stderr while the run goes on: a live bar redrawn in place on a terminal, a
//! plain line every few seconds otherwise.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::args::ProgressStyle;
use crate::recorder::Live;
use crate::report::rate;
use conveyor_core::display::thousands;

const BAR_EVERY: Duration = Duration::from_millis(200);
const LINE_EVERY: Duration = Duration::from_secs(5);
const BAR_WIDTH: usize = 30;

/// What the run is heading for, to draw the bar's fill.
#[derive(Debug, Clone, Copy)]
pub struct Goal {
    pub events: Option<u64>,
    pub duration: Option<Duration>,
}

impl Goal {
    /// Fraction done (0..=1): the further of events answered and time spent.
    pub fn fraction(&self, events_done: u64, elapsed: Duration) -> f64 {
        let by_events = self
            .events
            .map(|n| events_done as f64 / n.max(1) as f64)
            .unwrap_or(0.0);
        let by_time = self
            .duration
            .map(|d| elapsed.as_secs_f64() / d.as_secs_f64().max(1e-9))
            .unwrap_or(0.0);
        by_events.max(by_time).clamp(0.0, 1.0)
    }
}

/// The bar: `[#########---------]  45%`.
pub fn bar(fraction: f64) -> String {
    let filled = ((fraction * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
    format!(
        "[{}{}] {:>3.0}%",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        fraction * 100.0
    )
}

fn status_text(live: &Live, elapsed: Duration, recent_rate: f64) -> String {
    format!(
        "{} events accepted · {} ev/s · {} requests · {} errors · {:.1} s",
        thousands(live.events_accepted.load(Ordering::Relaxed)),
        rate(recent_rate),
        thousands(live.requests.load(Ordering::Relaxed)),
        thousands(live.errors.load(Ordering::Relaxed)),
        elapsed.as_secs_f64()
    )
}

/// Shows progress until `done` turns true; clears the bar at the end.
pub async fn show(
    style: ProgressStyle,
    live: Arc<Live>,
    goal: Goal,
    start: Instant,
    mut done: watch::Receiver<bool>,
) {
    let bar_style = match style {
        ProgressStyle::None => return,
        ProgressStyle::Bar => true,
        ProgressStyle::Plain => false,
        ProgressStyle::Auto => std::io::stderr().is_terminal(),
    };
    let every = if bar_style { BAR_EVERY } else { LINE_EVERY };
    let mut ticker = tokio::time::interval_at((start + every).into(), every);
    let mut last = (start, 0u64);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = done.changed() => break,
        }
        if *done.borrow() {
            break;
        }
        let now = Instant::now();
        let accepted = live.events_accepted.load(Ordering::Relaxed);
        let recent = accepted.saturating_sub(last.1) as f64
            / now.duration_since(last.0).as_secs_f64().max(1e-9);
        last = (now, accepted);
        let elapsed = now.duration_since(start);
        let text = status_text(&live, elapsed, recent);
        let mut err = std::io::stderr().lock();
        if bar_style {
            let fraction = goal.fraction(live.events_done.load(Ordering::Relaxed), elapsed);
            let _ = write!(err, "\r\x1b[2K{} {text}", bar(fraction));
        } else {
            let _ = writeln!(err, "conveyor load: {text}");
        }
        let _ = err.flush();
    }
    if bar_style {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K");
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_further_goal() {
        let goal = Goal {
            events: Some(1000),
            duration: Some(Duration::from_secs(10)),
        };
        assert_eq!(goal.fraction(500, Duration::from_secs(1)), 0.5);
        assert_eq!(goal.fraction(100, Duration::from_secs(8)), 0.8);
        assert_eq!(goal.fraction(5000, Duration::from_secs(80)), 1.0);
        assert_eq!(bar(0.0), format!("[{}]   0%", "-".repeat(30)));
        assert_eq!(
            bar(0.5),
            format!("[{}{}]  50%", "#".repeat(15), "-".repeat(15))
        );
    }
}

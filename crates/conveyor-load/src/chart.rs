//! The `--chart` file: an SVG of latency (p50, p99) and accepted events per second over the
//! run, drawn by hand (two panels sharing the time axis).

use std::fmt::Write as _;

use crate::report::{Report, rate};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 560.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 30.0;
/// Top and bottom of the latency panel.
const LAT_TOP: f64 = 70.0;
const LAT_BOTTOM: f64 = 290.0;
/// Top and bottom of the throughput panel.
const TPUT_TOP: f64 = 340.0;
const TPUT_BOTTOM: f64 = 500.0;

const P50_COLOUR: &str = "#1f77b4";
const P99_COLOUR: &str = "#d62728";
const TPUT_COLOUR: &str = "#2ca02c";

/// A "nice" tick step (1, 2 or 5 × 10^k) giving about `ticks` ticks up to `max`.
pub fn nice_step(max: f64, ticks: usize) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / ticks.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn format_tick(value: f64) -> String {
    if value == 0.0 {
        "0".to_owned()
    } else if value >= 1000.0 {
        rate(value)
    } else if value >= 1.0 {
        format!("{}", (value * 100.0).round() / 100.0)
    } else {
        format!("{value:.3}")
    }
}

/// Horizontal grid lines and labels for a panel from `top` to `bottom` showing 0..=`max`.
fn y_axis(svg: &mut String, top: f64, bottom: f64, max: f64, step: f64) {
    let mut value = 0.0;
    while value <= max * 1.0001 {
        let y = bottom - (bottom - top) * value / max;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            format_tick(value)
        );
        value += step;
    }
}

/// The SVG text of `report`'s timeline.
pub fn render(report: &Report) -> String {
    let seconds = &report.timeline;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let title = format!(
        "conveyor load · {} · {} · {} accepted events/s · p99 {:.2} ms",
        report.config.mode.as_str(),
        report.config.target,
        rate(report.accepted_per_sec),
        report.latency_us.p99 as f64 / 1000.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="28" font-size="16" font-weight="bold">{}</text>"#,
        escape(&title)
    );
    if seconds.is_empty() {
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{:.1}" font-size="14">no answers were recorded</text></svg>"#,
            HEIGHT / 2.0
        );
        return svg;
    }
    // Time axis: one slot per second; a point sits in the middle of its second.
    let n = seconds.len() as f64;
    let plot_width = WIDTH - LEFT - RIGHT;
    let x_of = |second: f64| LEFT + plot_width * (second + 0.5) / n;

    // Latency panel (ms).
    let max_ms = seconds
        .iter()
        .map(|s| s.p99_us.max(s.p50_us) as f64 / 1000.0)
        .fold(0.0, f64::max)
        .max(0.001);
    let step = nice_step(max_ms, 5);
    let top_ms = (max_ms / step).ceil() * step;
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{:.1}" font-size="13">latency per second of answers (ms, from the {} send time)</text>"#,
        LAT_TOP - 12.0,
        if report.latency_from_intended_send {
            "intended"
        } else {
            "actual"
        }
    );
    y_axis(&mut svg, LAT_TOP, LAT_BOTTOM, top_ms, step);
    for (colour, label, pick) in [(P99_COLOUR, "p99", 1usize), (P50_COLOUR, "p50", 0usize)] {
        let mut points = String::new();
        for s in seconds.iter().filter(|s| s.requests > 0) {
            let us = if pick == 0 { s.p50_us } else { s.p99_us };
            let y = LAT_BOTTOM - (LAT_BOTTOM - LAT_TOP) * (us as f64 / 1000.0) / top_ms;
            let _ = write!(points, "{:.1},{:.1} ", x_of(s.second as f64), y);
        }
        let _ = writeln!(
            svg,
            r#"<polyline class="{label}" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.trim_end()
        );
    }
    // Legend.
    for (i, (colour, label)) in [(P50_COLOUR, "p50"), (P99_COLOUR, "p99")]
        .iter()
        .enumerate()
    {
        let x = WIDTH - RIGHT - 150.0 + i as f64 * 70.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="12">{label}</text>"#,
            LAT_TOP - 16.0,
            x + 20.0,
            LAT_TOP - 16.0,
            x + 25.0,
            LAT_TOP - 12.0
        );
    }

    // Throughput panel (accepted events per second).
    let max_tput = seconds.iter().map(|s| s.accepted).max().unwrap_or(0).max(1) as f64;
    let step = nice_step(max_tput, 4);
    let top_tput = (max_tput / step).ceil() * step;
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{:.1}" font-size="13">accepted events per second</text>"#,
        TPUT_TOP - 12.0
    );
    y_axis(&mut svg, TPUT_TOP, TPUT_BOTTOM, top_tput, step);
    let bar = (plot_width / n * 0.8).max(1.0);
    for s in seconds {
        let h = (TPUT_BOTTOM - TPUT_TOP) * s.accepted as f64 / top_tput;
        let _ = writeln!(
            svg,
            r#"<rect class="throughput" x="{:.1}" y="{:.1}" width="{bar:.1}" height="{h:.1}" fill="{TPUT_COLOUR}"><title>second {}: {} accepted, {} errors</title></rect>"#,
            x_of(s.second as f64) - bar / 2.0,
            TPUT_BOTTOM - h,
            s.second,
            s.accepted,
            s.errors
        );
    }

    // Shared time axis.
    let step = nice_step(n, 10).max(1.0);
    let mut second = 0.0;
    while second < n {
        let x = x_of(second);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{TPUT_BOTTOM}" x2="{x:.1}" y2="{:.1}" stroke="#888"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"##,
            TPUT_BOTTOM + 5.0,
            TPUT_BOTTOM + 18.0,
            second
        );
        second += step;
    }
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">seconds since the first send</text>"#,
        LEFT + plot_width / 2.0,
        TPUT_BOTTOM + 40.0
    );
    for (top, bottom) in [(LAT_TOP, LAT_BOTTOM), (TPUT_TOP, TPUT_BOTTOM)] {
        let _ = writeln!(
            svg,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{:.1}" fill="none" stroke="#444"/>"##,
            bottom - top
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_one_two_or_five() {
        assert_eq!(nice_step(10.0, 5), 2.0);
        assert_eq!(nice_step(7.0, 5), 2.0);
        assert_eq!(nice_step(100.0, 4), 50.0);
        assert_eq!(nice_step(0.3, 5), 0.1);
        assert_eq!(nice_step(1_000_000.0, 4), 500_000.0);
        assert_eq!(nice_step(0.0, 5), 1.0);
    }
}

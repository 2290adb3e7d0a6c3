//! One scrape's metric families, encoded by `prometheus-client` as Prometheus text (0.0.4) or
//! OpenMetrics text, as the scraper asked (`Accept: application/openmetrics-text`).
//!
//! Values are read at scrape time from the atomics the work records into (and that `/stats`
//! reports), pushed here as families, and handed to the crate's encoders, which own the
//! format: names and `_total` suffixes, label escaping, float formatting, `# EOF`. Recording
//! never touches the crate: its histograms take a lock per observation, ours are relaxed
//! atomics (see ARCHITECTURE.md, Decisions).
//!
//! Exemplars (OpenMetrics only): prometheus-client 0.26 gives an exemplar no public
//! constructor, so a histogram's recent trace id per bucket is added to the bucket lines of the
//! encoded OpenMetrics text, in the order the crate wrote them ([`Exposition::encode`]).

use std::fmt::Write as _;
use std::sync::RwLock;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::Registry;

/// What adds a crate's own families to a scrape.
pub type Collect = fn(&mut Exposition);

static COLLECTORS: RwLock<Vec<(&'static str, Collect)>> = RwLock::new(Vec::new());

/// Adds `collect` (named `name`; registering a name again changes nothing) to every `/metrics`
/// of this process. A crate registers its families when it starts working here (the ingest,
/// the worker pool), so a process shows what it does and nothing else, and this crate does not
/// need to know which roles exist.
pub fn register(name: &'static str, collect: Collect) {
    let mut collectors = COLLECTORS.write().unwrap_or_else(|p| p.into_inner());
    if !collectors.iter().any(|(n, _)| *n == name) {
        collectors.push((name, collect));
    }
}

/// Runs every registered collector, in the order they were registered.
pub fn collect_registered(out: &mut Exposition) {
    let collectors = COLLECTORS.read().unwrap_or_else(|p| p.into_inner()).clone();
    for (_, collect) in collectors {
        collect(out);
    }
}

/// The content type of Prometheus text (format 0.0.4).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The content type of OpenMetrics text.
pub const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The exposition format of one scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the `Accept` header names it, else Prometheus text.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => PROMETHEUS_TEXT,
            Format::OpenMetrics => OPENMETRICS_TEXT,
        }
    }
}

/// Label pairs of one series, in the order they are written.
pub type Labels = Vec<(&'static str, String)>;

/// One recent observation of a histogram bucket, with the trace it belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceExemplar {
    pub trace_id: [u8; 16],
    /// The observed value, in the exposed unit.
    pub value: f64,
    /// When it was observed, seconds since the Unix epoch.
    pub at_seconds: f64,
}

/// A histogram's state at scrape time: per-bucket counts (not cumulative; the last one is
/// `+Inf`), the sum, and optionally an exemplar per bucket.
#[derive(Debug, Clone, Default)]
pub struct HistogramValue {
    /// `(upper bound, count in this bucket)`; the last bound is `f64::INFINITY`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    /// Empty, or one entry per bucket.
    pub exemplars: Vec<Option<TraceExemplar>>,
}

#[derive(Debug, Clone)]
enum Value {
    Counter(u64),
    CounterF(f64),
    Gauge(i64),
    GaugeF(f64),
    Histogram(HistogramValue),
}

#[derive(Debug)]
struct Family {
    kind: MetricType,
    series: Vec<(Labels, Value)>,
}

impl Family {
    fn encode_value(encoder: &mut MetricEncoder, value: &Value) -> Result<(), std::fmt::Error> {
        match value {
            Value::Counter(v) => encoder.encode_counter::<NoLabelSet, _, u64>(v, None),
            Value::CounterF(v) => encoder.encode_counter::<NoLabelSet, _, f64>(v, None),
            Value::Gauge(v) => encoder.encode_gauge(v),
            Value::GaugeF(v) => encoder.encode_gauge(v),
            Value::Histogram(h) => {
                let count = h.buckets.iter().map(|(_, n)| n).sum();
                // +Inf must equal _count: both are the buckets' total.
                encoder.encode_histogram::<NoLabelSet>(
                    h.sum,
                    count,
                    &h.buckets,
                    None::<&std::collections::HashMap<usize, Exemplar<NoLabelSet, f64>>>,
                )
            }
        }
    }
}

impl EncodeMetric for Family {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, value) in &self.series {
            if labels.is_empty() {
                Family::encode_value(&mut encoder, value)?;
            } else {
                Family::encode_value(&mut encoder.encode_family(labels)?, value)?;
            }
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

/// The families of one scrape, in the order they are added.
#[derive(Debug, Default)]
pub struct Exposition {
    families: Vec<(String, String, Family)>,
}

/// The crate adds `_total` to a counter and a full stop to the help: give it neither.
fn base_name(name: &str, kind: MetricType) -> &str {
    match kind {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    }
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    fn push(&mut self, name: &str, help: &str, kind: MetricType, series: Vec<(Labels, Value)>) {
        self.families.push((
            base_name(name, kind).to_owned(),
            help.trim_end_matches('.').to_owned(),
            Family { kind, series },
        ));
    }

    /// An unlabelled counter (`name` ends in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.push(
            name,
            help,
            MetricType::Counter,
            vec![(Vec::new(), Value::Counter(value))],
        );
    }

    /// An unlabelled counter with a fractional value (seconds).
    pub fn counter_f64(&mut self, name: &str, help: &str, value: f64) {
        self.push(
            name,
            help,
            MetricType::Counter,
            vec![(Vec::new(), Value::CounterF(value))],
        );
    }

    /// An unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: i64) {
        self.push(
            name,
            help,
            MetricType::Gauge,
            vec![(Vec::new(), Value::Gauge(value))],
        );
    }

    /// An unlabelled gauge with a fractional value.
    pub fn gauge_f64(&mut self, name: &str, help: &str, value: f64) {
        self.push(
            name,
            help,
            MetricType::Gauge,
            vec![(Vec::new(), Value::GaugeF(value))],
        );
    }

    fn labelled<T>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        series: Vec<(Labels, T)>,
        value: fn(T) -> Value,
    ) {
        let series = series.into_iter().map(|(l, v)| (l, value(v))).collect();
        self.push(name, help, kind, series);
    }

    /// A counter with a sample per label set.
    pub fn counters(&mut self, name: &str, help: &str, series: Vec<(Labels, u64)>) {
        self.labelled(name, help, MetricType::Counter, series, Value::Counter);
    }

    /// A gauge with a sample per label set.
    pub fn gauges(&mut self, name: &str, help: &str, series: Vec<(Labels, i64)>) {
        self.labelled(name, help, MetricType::Gauge, series, Value::Gauge);
    }

    /// A histogram with a series per label set (one with no labels for a plain histogram).
    pub fn histograms(&mut self, name: &str, help: &str, series: Vec<(Labels, HistogramValue)>) {
        self.labelled(name, help, MetricType::Histogram, series, Value::Histogram);
    }

    /// Adds the families of `other` after these.
    pub fn append(&mut self, mut other: Exposition) {
        self.families.append(&mut other.families);
    }

    /// The family names (as written in `# TYPE` of Prometheus text).
    pub fn names(&self) -> Vec<String> {
        self.families
            .iter()
            .map(|(name, _, f)| match f.kind {
                MetricType::Counter => format!("{name}_total"),
                _ => name.clone(),
            })
            .collect()
    }

    /// The scrape in `format`.
    pub fn encode(self, format: Format) -> String {
        // Exemplars per histogram family, flattened in the order the bucket lines are written.
        let mut exemplars: Vec<(String, Vec<Option<TraceExemplar>>)> = Vec::new();
        let mut registry = Registry::default();
        for (name, help, family) in self.families {
            if format == Format::OpenMetrics && family.kind == MetricType::Histogram {
                let flat: Vec<Option<TraceExemplar>> = family
                    .series
                    .iter()
                    .flat_map(|(_, value)| match value {
                        Value::Histogram(h) if h.exemplars.len() == h.buckets.len() => {
                            h.exemplars.clone()
                        }
                        Value::Histogram(h) => vec![None; h.buckets.len()],
                        _ => Vec::new(),
                    })
                    .collect();
                if flat.iter().any(Option::is_some) {
                    exemplars.push((format!("{name}_bucket"), flat));
                }
            }
            registry.register(name, help, family);
        }
        let mut out = String::with_capacity(16384);
        let encoded = match format {
            Format::Prometheus => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            }
            Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry),
        };
        if let Err(error) = encoded {
            tracing::error!(%error, "encoding /metrics failed");
        }
        if exemplars.is_empty() {
            out
        } else {
            add_exemplars(&out, &exemplars)
        }
    }
}

/// Appends ` # {trace_id="…"} value timestamp` to the bucket lines that have an exemplar.
fn add_exemplars(text: &str, exemplars: &[(String, Vec<Option<TraceExemplar>>)]) -> String {
    let mut out = String::with_capacity(text.len() + 64 * exemplars.len());
    let mut current: Option<(&[Option<TraceExemplar>], &str, usize)> = None;
    for line in text.lines() {
        out.push_str(line);
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let family = rest.split(' ').next().unwrap_or_default();
            current = exemplars
                .iter()
                .find(|(bucket, _)| bucket.strip_suffix("_bucket") == Some(family))
                .map(|(bucket, list)| (list.as_slice(), bucket.as_str(), 0));
        } else if let Some((list, bucket, index)) = current.as_mut()
            && line.starts_with(*bucket)
            && line[bucket.len()..].starts_with('{')
        {
            if let Some(Some(e)) = list.get(*index) {
                let _ = write!(
                    out,
                    " # {{trace_id=\"{}\"}} {} {:.3}",
                    conveyor_core::trace::hex(&e.trace_id),
                    e.value,
                    e.at_seconds
                );
            }
            *index += 1;
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Exposition {
        let mut e = Exposition::new();
        e.counter("a_total", "A counter.", 3);
        e.gauges(
            "b",
            "A gauge.",
            vec![(vec![("role", "x\"y".to_owned())], 2)],
        );
        e.histograms(
            "c_seconds",
            "A histogram.",
            vec![(
                vec![("route", "/r".to_owned())],
                HistogramValue {
                    buckets: vec![(0.1, 1), (1.0, 2), (f64::INFINITY, 0)],
                    sum: 1.25,
                    exemplars: vec![
                        None,
                        Some(TraceExemplar {
                            trace_id: [0xab; 16],
                            value: 0.5,
                            at_seconds: 1.7e9,
                        }),
                        None,
                    ],
                },
            )],
        );
        e
    }

    #[test]
    fn prometheus_text_keeps_names_and_has_no_exemplars() {
        let text = sample().encode(Format::Prometheus);
        for line in [
            "# HELP a_total A counter.\n",
            "# TYPE a_total counter\n",
            "a_total 3\n",
            "b{role=\"x\\\"y\"} 2\n",
            "# TYPE c_seconds histogram\n",
            "c_seconds_count{route=\"/r\"} 3\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
        assert!(
            text.contains("c_seconds_bucket{route=\"/r\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(
            !text.contains("trace_id") && !text.contains("# EOF"),
            "{text}"
        );
    }

    #[test]
    fn openmetrics_ends_with_eof_and_carries_the_exemplar() {
        let text = sample().encode(Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE a counter\n"), "{text}");
        let traced: Vec<&str> = text.lines().filter(|l| l.contains("trace_id")).collect();
        assert_eq!(traced.len(), 1, "{text}");
        assert!(
            traced[0].starts_with("c_seconds_bucket{")
                && traced[0].contains("le=\"1.0\"")
                && traced[0].ends_with(&format!(
                    " 3 # {{trace_id=\"{}\"}} 0.5 1700000000.000",
                    "ab".repeat(16)
                )),
            "{text}"
        );
    }
}

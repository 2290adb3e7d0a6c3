//! What a worker pool runs: the pipelines, and the sinks their routes name, with the metric
//! series of each resolved once. A pool holds one `Routing` at a time and swaps it whole on a
//! reload; a batch keeps the one it started with, so events in flight finish on the pipeline
//! they started on.

use std::sync::Arc;
use std::time::Duration;

use conveyor_api::histogram::LocalHistogram;
use conveyor_core::Event;
use conveyor_core::stats::PipelineStats;
use conveyor_pipeline::{DEFAULT_SINK, Observer, Outcome, Pipelines, StageResult};

use crate::metrics::{self, PipelineSeries, SinkSeries, StageSeries};
use conveyor_core::stats::SinkStats;
use conveyor_sink::Sink;

/// A sink a route names.
pub struct NamedSink {
    pub name: Arc<str>,
    pub sink: Arc<dyn Sink>,
    pub(crate) series: &'static SinkSeries,
}

pub struct Routing {
    pipelines: Pipelines,
    sinks: Vec<NamedSink>,
    /// Per pipeline (same order as `pipelines`): its series and its stages'.
    series: Vec<(&'static PipelineSeries, Vec<&'static StageSeries>)>,
    unmatched: &'static PipelineSeries,
}

impl Routing {
    /// The pipelines with the sinks their routes name; `Err` names a route's sink that is not
    /// among `sinks`.
    pub fn new(pipelines: Pipelines, sinks: Vec<(String, Arc<dyn Sink>)>) -> Result<Self, String> {
        let sinks: Vec<NamedSink> = sinks
            .into_iter()
            .map(|(name, sink)| NamedSink {
                series: metrics::sink_series(&name),
                name: name.into(),
                sink,
            })
            .collect();
        for name in pipelines.sink_names() {
            if !sinks.iter().any(|s| s.name == name) {
                return Err(format!(
                    "a route names the sink '{name}', which is not configured"
                ));
            }
        }
        let series = pipelines
            .pipelines
            .iter()
            .map(|p| {
                (
                    metrics::pipeline_series(&p.name),
                    p.stages
                        .iter()
                        .map(|s| metrics::stage_series(&p.name, &s.name))
                        .collect(),
                )
            })
            .collect();
        Ok(Routing {
            pipelines,
            sinks,
            series,
            unmatched: metrics::pipeline_series(metrics::UNMATCHED),
        })
    }

    /// The `--stage` quick form: those stages (perhaps none), then the one sink, `default`.
    pub fn single(pipelines: Pipelines, sink: Arc<dyn Sink>) -> Result<Self, String> {
        Self::new(pipelines, vec![(DEFAULT_SINK.to_owned(), sink)])
    }

    pub fn pipelines(&self) -> &Pipelines {
        &self.pipelines
    }

    pub fn sinks(&self) -> &[NamedSink] {
        &self.sinks
    }

    pub(crate) fn sink_index(&self, name: &str) -> Option<usize> {
        self.sinks.iter().position(|s| &*s.name == name)
    }

    /// `name=description` of every sink (just the description when there is one sink).
    pub fn describe(&self) -> String {
        match self.sinks.as_slice() {
            [only] => only.sink.describe(),
            sinks => sinks
                .iter()
                .map(|s| format!("{}={}", s.name, s.sink.describe()))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// Each sink's figures since start and its health now.
    pub fn sink_stats(&self) -> Vec<SinkStats> {
        self.sinks
            .iter()
            .map(|s| s.series.stats(&s.name, s.sink.describe()))
            .collect()
    }

    /// The sinks' health as `/ready` shows it: `{"sinks": {"db": {"healthy": false, "error":
    /// "…"}}}`.
    pub fn ready_detail(&self) -> serde_json::Value {
        let sinks: serde_json::Map<String, serde_json::Value> = self
            .sink_stats()
            .into_iter()
            .map(|s| {
                let state = match (s.healthy, s.last_error) {
                    (true, _) => serde_json::json!({"healthy": true}),
                    (false, error) => serde_json::json!({"healthy": false, "error": error}),
                };
                (s.name, state)
            })
            .collect();
        serde_json::json!({ "sinks": sinks })
    }

    /// Each pipeline's figures since start (the process's series, which outlive reloads), then
    /// the unmatched events'.
    pub fn pipeline_stats(&self) -> Vec<PipelineStats> {
        let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        self.pipelines
            .pipelines
            .iter()
            .map(|p| &*p.name)
            .zip(self.series.iter().map(|(s, _)| *s))
            .chain(std::iter::once((metrics::UNMATCHED, self.unmatched)))
            .map(|(name, s)| PipelineStats {
                name: name.to_owned(),
                events_in: load(&s.events),
                routed: load(&s.routed),
                dropped: load(&s.dropped),
                failed: load(&s.failed),
            })
            .collect()
    }

    pub fn is_cpu_heavy(&self) -> bool {
        self.pipelines.is_cpu_heavy()
    }

    /// Runs a batch through the pipelines, recording the per-pipeline and per-stage series.
    pub fn run_batch(&self, events: Vec<Event>) -> Vec<Outcome> {
        let mut observer = BatchObserver {
            routing: self,
            durations: self
                .series
                .iter()
                .map(|(_, stages)| stages.iter().map(|s| s.duration.local()).collect())
                .collect(),
            current: None,
        };
        let outcomes: Vec<Outcome> = events
            .into_iter()
            .map(|event| {
                let outcome = self.pipelines.run(event, &mut observer);
                let series = observer.current.take().unwrap_or(self.unmatched);
                let counter = match &outcome {
                    Outcome::Routed(_) => &series.routed,
                    Outcome::Dropped { .. } => &series.dropped,
                    Outcome::Failed(_) => &series.failed,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                outcome
            })
            .collect();
        outcomes
    }
}

/// Counts into the routing's series; stage durations are summed per batch (flushed on drop).
struct BatchObserver<'a> {
    routing: &'a Routing,
    durations: Vec<Vec<LocalHistogram>>,
    /// The pipeline of the event being run.
    current: Option<&'static PipelineSeries>,
}

impl Observer for BatchObserver<'_> {
    fn matched(&mut self, pipeline: Option<usize>) {
        let series = pipeline.map_or(self.routing.unmatched, |p| self.routing.series[p].0);
        series
            .events
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.current = Some(series);
    }

    fn stage(&mut self, pipeline: usize, stage: usize, took: Duration, result: StageResult) {
        let series = self.routing.series[pipeline].1[stage];
        self.durations[pipeline][stage].record_duration(took);
        let counter = match result {
            StageResult::Passed(_) => &series.passed,
            StageResult::Dropped => &series.dropped,
            StageResult::Failed => &series.failed,
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

//! The compiled pipelines: which one an event takes, what its stages make of it, and which
//! sinks it is routed to.
//!
//! An event goes to the first pipeline whose `match` holds (a pipeline without one matches
//! everything); an event no pipeline matches goes, unchanged, to the default route. Stages run
//! in order. A stage's result is one of the [`Outcome`]s: the event passes on (changed, or split
//! into several), is dropped (counted and acked, never retried), or fails, permanently (to the
//! DLQ at once) or retryably (backoff, then the DLQ). The survivors take the pipeline's first
//! route whose `when` holds (a route without one always holds); when none does, the default
//! route.

use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor_core::Event;
use jaq_json::Val;

use crate::jq::{Budget, Program};
use crate::schema::Schema;
use crate::shorthand::Shorthand;
use crate::view;

/// Sink names, as routes list them.
pub type SinkNames = Arc<[Arc<str>]>;

/// What one stage does.
#[derive(Debug, Clone)]
pub enum StageKind {
    /// Checks the event's data against a JSON Schema (permanent failure when it does not conform).
    Validate(Schema),
    /// Rewrites the event with a jq program: 0 outputs drop it, 1 replaces it, more are a
    /// permanent failure unless `split`, when each becomes its own event with the id `<id>/<n>`.
    Transform { program: Program, split: bool },
    /// Keeps the event when the jq condition holds, drops it when it does not.
    Filter(Program),
    /// One of the `--stage` shorthands.
    Shorthand(Shorthand),
}

#[derive(Debug, Clone)]
pub struct Stage {
    /// The `stage` label of its metrics and the name its failures carry.
    pub name: Arc<str>,
    pub kind: StageKind,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub when: Option<Program>,
    pub to: SinkNames,
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: Arc<str>,
    pub matcher: Option<Program>,
    pub stages: Vec<Stage>,
    pub routes: Vec<Route>,
}

/// Every pipeline of a config, in order, and where unmatched events go.
#[derive(Debug, Clone)]
pub struct Pipelines {
    pub pipelines: Vec<Pipeline>,
    pub default_route: SinkNames,
    pub budget: Budget,
}

/// An event on its way to sinks.
#[derive(Debug, Clone)]
pub struct Routed {
    pub event: Event,
    pub sinks: SinkNames,
}

/// Why an event failed, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub pipeline: Arc<str>,
    pub stage: Arc<str>,
    pub reason: String,
    /// Whether a retry could help (only sink errors and `fail-if` are; a program or a schema
    /// gives the same answer every time).
    pub retryable: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pipeline {} stage {}: {}",
            self.pipeline, self.stage, self.reason
        )
    }
}

/// What the pipelines made of one event.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Passed: one event per output (one, unless a stage split it), each with its sinks.
    Routed(Vec<Routed>),
    /// A filter, an empty transform, or a split into nothing dropped it.
    Dropped {
        pipeline: Arc<str>,
        stage: Arc<str>,
    },
    Failed(Failure),
}

/// What a stage did with one event, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageResult {
    /// Passed, as this many events (more than one after a split).
    Passed(usize),
    Dropped,
    Failed,
}

/// Told what happens, for metrics; indices are into [`Pipelines::pipelines`] and a pipeline's
/// stages. `()` observes nothing.
pub trait Observer {
    fn matched(&mut self, _pipeline: Option<usize>) {}
    fn stage(&mut self, _pipeline: usize, _stage: usize, _took: Duration, _result: StageResult) {}
}

impl Observer for () {}

/// The default pipeline set: no pipeline, everything to the one sink called `default`.
pub const DEFAULT_SINK: &str = "default";

impl Pipelines {
    /// No pipelines; every event to `route`.
    pub fn passthrough(route: SinkNames) -> Self {
        Pipelines {
            pipelines: Vec::new(),
            default_route: route,
            budget: Budget::default(),
        }
    }

    /// One pipeline named `default` of the given shorthand stages, to the `default` sink: what
    /// `--stage` flags build.
    pub fn from_shorthands(specs: &[String]) -> Result<Self, String> {
        let route: SinkNames = Arc::from(vec![Arc::<str>::from(DEFAULT_SINK)]);
        let stages = specs
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let shorthand: Shorthand = spec.parse()?;
                Ok(Stage {
                    name: format!("{}-{}", i + 1, shorthand.kind()).into(),
                    kind: StageKind::Shorthand(shorthand),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if stages.is_empty() {
            return Ok(Self::passthrough(route));
        }
        Ok(Pipelines {
            pipelines: vec![Pipeline {
                name: "default".into(),
                matcher: None,
                stages,
                routes: Vec::new(),
            }],
            default_route: route,
            budget: Budget::default(),
        })
    }

    /// Whether a batch should run off the async runtime's threads: any jq program, schema or
    /// CPU stage can take longer than a runtime thread should be held.
    pub fn is_cpu_heavy(&self) -> bool {
        self.pipelines.iter().any(|p| {
            p.matcher.is_some()
                || p.routes.iter().any(|r| r.when.is_some())
                || p.stages.iter().any(|s| match &s.kind {
                    StageKind::Shorthand(shorthand) => shorthand.cpu_heavy(),
                    _ => true,
                })
        })
    }

    /// Every sink a route names, once each, in order of first mention.
    pub fn sink_names(&self) -> Vec<Arc<str>> {
        let mut names: Vec<Arc<str>> = Vec::new();
        let routes = self
            .pipelines
            .iter()
            .flat_map(|p| p.routes.iter().map(|r| &r.to))
            .chain(std::iter::once(&self.default_route));
        for name in routes.flat_map(|to| to.iter()) {
            if !names.contains(name) {
                names.push(Arc::clone(name));
            }
        }
        names
    }

    /// Runs one event.
    pub fn run(&self, event: Event, observer: &mut dyn Observer) -> Outcome {
        let mut input = None;
        let found = self
            .pipelines
            .iter()
            .enumerate()
            .find_map(|(index, pipeline)| {
                let Some(matcher) = &pipeline.matcher else {
                    return Some(Ok(index));
                };
                let value = match cached_value(&mut input, &event) {
                    Ok(value) => value,
                    Err(reason) => return Some(Err((index, reason))),
                };
                match matcher.test(value, &self.budget) {
                    Ok(true) => Some(Ok(index)),
                    Ok(false) => None,
                    Err(reason) => Some(Err((index, reason))),
                }
            });
        match found {
            None => {
                observer.matched(None);
                Outcome::Routed(vec![Routed {
                    event,
                    sinks: Arc::clone(&self.default_route),
                }])
            }
            Some(Err((index, reason))) => {
                observer.matched(Some(index));
                Outcome::Failed(Failure {
                    pipeline: Arc::clone(&self.pipelines[index].name),
                    stage: "match".into(),
                    reason,
                    retryable: false,
                })
            }
            Some(Ok(index)) => {
                observer.matched(Some(index));
                self.run_pipeline(index, event, input, observer)
            }
        }
    }

    /// Runs a batch, keeping order.
    pub fn run_batch(&self, events: Vec<Event>, observer: &mut dyn Observer) -> Vec<Outcome> {
        events
            .into_iter()
            .map(|event| self.run(event, observer))
            .collect()
    }

    fn run_pipeline(
        &self,
        index: usize,
        event: Event,
        value: Option<Val>,
        observer: &mut dyn Observer,
    ) -> Outcome {
        let pipeline = &self.pipelines[index];
        let fail = |stage: &Arc<str>, reason: String, retryable: bool| {
            Outcome::Failed(Failure {
                pipeline: Arc::clone(&pipeline.name),
                stage: Arc::clone(stage),
                reason,
                retryable,
            })
        };
        // The events in hand (several after a split), each with its jq view when one is known.
        let mut items: Vec<(Event, Option<Val>)> = vec![(event, value)];
        let mut started = Instant::now();
        for (stage_index, stage) in pipeline.stages.iter().enumerate() {
            let mut next = Vec::with_capacity(items.len());
            for (mut event, mut value) in items {
                let result = self.run_stage(stage, &mut event, &mut value);
                let now = Instant::now();
                let took = now - started;
                started = now;
                match result {
                    Ok(StageOutput::Same) => {
                        observer.stage(index, stage_index, took, StageResult::Passed(1));
                        next.push((event, value));
                    }
                    Ok(StageOutput::Replaced(outputs)) => {
                        let result = if outputs.is_empty() {
                            StageResult::Dropped
                        } else {
                            StageResult::Passed(outputs.len())
                        };
                        observer.stage(index, stage_index, took, result);
                        next.extend(outputs);
                    }
                    Err((reason, retryable)) => {
                        observer.stage(index, stage_index, took, StageResult::Failed);
                        return fail(&stage.name, reason, retryable);
                    }
                }
            }
            if next.is_empty() {
                return Outcome::Dropped {
                    pipeline: Arc::clone(&pipeline.name),
                    stage: Arc::clone(&stage.name),
                };
            }
            items = next;
        }
        let mut routed = Vec::with_capacity(items.len());
        for (event, mut value) in items {
            let mut sinks = None;
            for route in &pipeline.routes {
                let holds = match &route.when {
                    None => true,
                    Some(when) => {
                        let input = match cached_value(&mut value, &event) {
                            Ok(input) => input,
                            Err(reason) => return fail(&"route".into(), reason, false),
                        };
                        match when.test(input, &self.budget) {
                            Ok(holds) => holds,
                            Err(reason) => return fail(&"route".into(), reason, false),
                        }
                    }
                };
                if holds {
                    sinks = Some(Arc::clone(&route.to));
                    break;
                }
            }
            routed.push(Routed {
                event,
                sinks: sinks.unwrap_or_else(|| Arc::clone(&self.default_route)),
            });
        }
        Outcome::Routed(routed)
    }

    fn run_stage(
        &self,
        stage: &Stage,
        event: &mut Event,
        value: &mut Option<Val>,
    ) -> Result<StageOutput, (String, bool)> {
        let permanent = |reason: String| (reason, false);
        match &stage.kind {
            StageKind::Validate(schema) => schema
                .check_event(event)
                .map(|()| StageOutput::Same)
                .map_err(|violation| permanent(violation.to_string())),
            StageKind::Filter(program) => {
                let input = cached_value(value, event).map_err(permanent)?;
                if program.test(input, &self.budget).map_err(permanent)? {
                    Ok(StageOutput::Same)
                } else {
                    Ok(StageOutput::Replaced(Vec::new()))
                }
            }
            StageKind::Transform { program, split } => {
                let input = cached_value(value, event).map_err(permanent)?;
                let outputs = program.run(input, &self.budget).map_err(permanent)?;
                if outputs.len() > 1 && !split {
                    return Err(permanent(format!(
                        "the transform gave {} outputs; a transform gives one (or none, to drop), unless the stage says split = true",
                        outputs.len()
                    )));
                }
                let derive = *split;
                outputs
                    .into_iter()
                    .enumerate()
                    .map(|(n, output)| {
                        let id: Arc<str> = if derive {
                            format!("{}/{n}", event.id).into()
                        } else {
                            Arc::clone(&event.id)
                        };
                        let out = view::from_value(event, output.clone(), id).map_err(permanent)?;
                        // A split output's view is made again from it, so later stages see
                        // its own id, not the parent's.
                        Ok((out, (!derive).then_some(output)))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(StageOutput::Replaced)
            }
            StageKind::Shorthand(shorthand) => {
                shorthand
                    .apply(event)
                    .map_err(|error| (error.reason, error.retryable))?;
                // The shorthand may have changed the event: its view is stale.
                *value = None;
                Ok(StageOutput::Same)
            }
        }
    }
}

enum StageOutput {
    /// The event in hand, perhaps changed in place.
    Same,
    /// Replaced by these (none: dropped).
    Replaced(Vec<(Event, Option<Val>)>),
}

/// The event's jq view: the one in hand, or made now and kept.
fn cached_value(value: &mut Option<Val>, event: &Event) -> Result<Val, String> {
    if let Some(value) = value {
        return Ok(value.clone());
    }
    let made = view::to_value(event)?;
    *value = Some(made.clone());
    Ok(made)
}

//! Stages: what a processor does to each event between the queue and the sink.
//!
//! A stage either passes the event on (possibly changed) or fails it with a reason; a failure
//! sends the event back for a retry. Stages are plain synchronous functions: the pool runs a
//! pipeline with any CPU-heavy stage on the blocking thread pool, so it never stalls the async
//! runtime.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use conveyor_api::histogram::{Histogram, LocalHistogram};
use conveyor_core::{ContentType, Event};

pub trait Stage: Send + Sync + fmt::Debug {
    /// Transforms or checks the event; `Err` is the reason it failed.
    fn apply(&self, event: &mut Event) -> Result<(), String>;

    /// Whether `apply` changes the event (the original is then kept for retries).
    fn mutates(&self) -> bool {
        false
    }

    /// Whether `apply` may take long enough to stall an async runtime thread.
    fn cpu_heavy(&self) -> bool {
        false
    }

    /// The stage's kind, the `stage` label of `conveyor_stage_duration_seconds` (a name fixed in
    /// code, so the label's values are bounded; stages built in code without one share `other`).
    fn kind(&self) -> &'static str {
        "other"
    }
}

/// The stages in order.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    stages: Arc<[Box<dyn Stage>]>,
    /// Each stage's duration histogram, by its kind (looked up once, here).
    durations: Arc<[&'static Histogram]>,
}

/// What the pipeline made of one event.
pub enum Outcome {
    /// Every stage passed; the event as the stages left it.
    Passed(Event),
    Failed(Failed),
}

/// An event that failed: the event as it came from the queue, and why.
pub struct Failed {
    pub event: Event,
    pub error: String,
}

impl Pipeline {
    pub fn new(stages: Vec<Box<dyn Stage>>) -> Self {
        let durations = stages
            .iter()
            .map(|stage| crate::metrics::stage_histogram(stage.kind()))
            .collect();
        Pipeline {
            stages: stages.into(),
            durations,
        }
    }

    /// Builds a pipeline from specs like `json`, `require:a,b`, `set-metadata:k=v`,
    /// `fail-if:k=v`, `cpu:N`.
    pub fn parse(specs: &[String]) -> Result<Self, String> {
        let stages = specs
            .iter()
            .map(|spec| parse_stage(spec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pipeline::new(stages))
    }

    pub fn is_cpu_heavy(&self) -> bool {
        self.stages.iter().any(|s| s.cpu_heavy())
    }

    fn mutates(&self) -> bool {
        self.stages.iter().any(|s| s.mutates())
    }

    /// Runs one event through every stage.
    pub fn run(&self, event: Event) -> Outcome {
        let mut timings = self.timings();
        self.run_timed(event, &mut timings)
    }

    /// One per-batch duration accumulator per stage (flushed to the shared histograms on drop).
    fn timings(&self) -> Vec<LocalHistogram> {
        self.durations.iter().map(|h| h.local()).collect()
    }

    fn run_timed(&self, event: Event, timings: &mut [LocalHistogram]) -> Outcome {
        if self.stages.is_empty() {
            return Outcome::Passed(event);
        }
        // Keep the original only when a stage may change the event, so a retry starts clean.
        let original = self.mutates().then(|| event.clone());
        let mut event = event;
        let mut started = Instant::now();
        for (stage, timing) in self.stages.iter().zip(timings.iter_mut()) {
            let applied = stage.apply(&mut event);
            let now = Instant::now();
            timing.record_duration(now - started);
            started = now;
            if let Err(error) = applied {
                return Outcome::Failed(Failed {
                    event: original.unwrap_or(event),
                    error,
                });
            }
        }
        Outcome::Passed(event)
    }

    /// Runs a batch, keeping order. Stage durations are recorded once per batch.
    pub fn run_batch(&self, events: Vec<Event>) -> Vec<Outcome> {
        let mut timings = self.timings();
        events
            .into_iter()
            .map(|event| self.run_timed(event, &mut timings))
            .collect()
    }
}

fn parse_stage(spec: &str) -> Result<Box<dyn Stage>, String> {
    let (name, arg) = match spec.split_once(':') {
        Some((name, arg)) => (name.trim(), Some(arg.trim())),
        None => (spec.trim(), None),
    };
    let key_value = |arg: Option<&str>| -> Result<(String, String), String> {
        arg.and_then(|a| a.split_once('='))
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .ok_or_else(|| format!("stage '{spec}': expected {name}:key=value"))
    };
    Ok(match name {
        "json" => Box::new(RequireJson),
        "require" => {
            let fields: Vec<String> = arg
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|f| !f.is_empty())
                .map(str::to_owned)
                .collect();
            if fields.is_empty() {
                return Err(format!("stage '{spec}': expected require:field[,field...]"));
            }
            Box::new(RequireFields { fields })
        }
        "set-metadata" => {
            let (key, value) = key_value(arg)?;
            Box::new(SetMetadata { key, value })
        }
        "fail-if" => {
            let (key, value) = key_value(arg)?;
            Box::new(FailIf { key, value })
        }
        "cpu" => {
            let rounds = arg
                .and_then(|a| a.parse::<u32>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("stage '{spec}': expected cpu:ROUNDS with ROUNDS > 0"))?;
            Box::new(CpuBurn { rounds })
        }
        other => {
            return Err(format!(
                "unknown stage '{other}' (known: json, require:a,b, set-metadata:k=v, fail-if:k=v, cpu:N)"
            ));
        }
    })
}

/// Fails unless the payload is valid JSON.
#[derive(Debug)]
struct RequireJson;

impl Stage for RequireJson {
    fn kind(&self) -> &'static str {
        "json"
    }

    fn apply(&self, event: &mut Event) -> Result<(), String> {
        serde_json::from_slice::<serde::de::IgnoredAny>(&event.payload)
            .map(|_| ())
            .map_err(|e| format!("payload is not valid JSON: {e}"))
    }
}

/// Fails unless the payload is a JSON object holding every listed top-level field.
#[derive(Debug)]
struct RequireFields {
    fields: Vec<String>,
}

impl Stage for RequireFields {
    fn kind(&self) -> &'static str {
        "require"
    }

    fn apply(&self, event: &mut Event) -> Result<(), String> {
        if event.content_type != ContentType::Json {
            return Err("payload is not JSON".into());
        }
        let object: std::collections::HashMap<&str, &serde_json::value::RawValue> =
            serde_json::from_slice(&event.payload)
                .map_err(|_| "payload is not a JSON object".to_owned())?;
        match self
            .fields
            .iter()
            .find(|f| !object.contains_key(f.as_str()))
        {
            Some(missing) => Err(format!("payload lacks required field '{missing}'")),
            None => Ok(()),
        }
    }
}

#[derive(Debug)]
struct SetMetadata {
    key: String,
    value: String,
}

impl Stage for SetMetadata {
    fn kind(&self) -> &'static str {
        "set-metadata"
    }

    fn apply(&self, event: &mut Event) -> Result<(), String> {
        std::sync::Arc::make_mut(&mut event.metadata).insert(self.key.clone(), self.value.clone());
        Ok(())
    }

    fn mutates(&self) -> bool {
        true
    }
}

/// Fails events whose metadata `key` equals `value`: a quarantine rule, and the way to make a
/// poison event on purpose.
#[derive(Debug)]
struct FailIf {
    key: String,
    value: String,
}

impl Stage for FailIf {
    fn kind(&self) -> &'static str {
        "fail-if"
    }

    fn apply(&self, event: &mut Event) -> Result<(), String> {
        if event.metadata.get(&self.key) == Some(&self.value) {
            Err(format!(
                "rejected by rule fail-if:{}={}",
                self.key, self.value
            ))
        } else {
            Ok(())
        }
    }
}

/// Burns CPU in proportion to `rounds` (FNV-1a over the payload, repeated) and records the
/// digest in metadata `cpu_digest`: a stand-in for real CPU-heavy work in benchmarks.
#[derive(Debug)]
struct CpuBurn {
    rounds: u32,
}

impl Stage for CpuBurn {
    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn apply(&self, event: &mut Event) -> Result<(), String> {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for round in 0..self.rounds {
            hash ^= u64::from(round);
            for &byte in event.payload.iter() {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        std::sync::Arc::make_mut(&mut event.metadata)
            .insert("cpu_digest".into(), format!("{hash:016x}"));
        Ok(())
    }

    fn mutates(&self) -> bool {
        true
    }

    fn cpu_heavy(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn event(payload: &str, metadata: &[(&str, &str)]) -> Event {
        Event {
            id: "e1".into(),
            source: "s".into(),
            timestamp_ms: 1,
            payload: bytes::Bytes::from(payload.to_owned()),
            content_type: ContentType::Json,
            metadata: metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
                .into(),
            attempt: 1,
            headers: BTreeMap::new(),
        }
    }

    #[test]
    fn stages_run_in_order_and_a_failure_returns_the_original() {
        let pipeline = Pipeline::parse(&["set-metadata:stage=seen".into(), "require:t".into()])
            .expect("valid specs");
        let Outcome::Passed(out) = pipeline.run(event(r#"{"t":1}"#, &[])) else {
            panic!("a payload with field t passes");
        };
        assert_eq!(out.metadata["stage"], "seen");
        let Outcome::Failed(failed) = pipeline.run(event(r#"{"x":1}"#, &[])) else {
            panic!("a payload without field t fails");
        };
        assert!(failed.error.contains("'t'"), "{}", failed.error);
        assert!(
            failed.event.metadata.is_empty(),
            "the original comes back, unchanged"
        );
    }

    #[test]
    fn the_json_stage_passes_json_payloads_and_fails_the_rest_naming_why() {
        let pipeline = Pipeline::parse(&["json".into()]).expect("valid");
        for payload in [r#"{"t":1}"#, "[1,2]", "3", r#""text""#] {
            assert!(
                matches!(pipeline.run(event(payload, &[])), Outcome::Passed(_)),
                "{payload} is JSON"
            );
        }
        for payload in ["{oops", "", "temperature:23.5"] {
            let Outcome::Failed(failed) = pipeline.run(event(payload, &[])) else {
                panic!("{payload:?} is not JSON");
            };
            assert!(
                failed.error.contains("not valid JSON"),
                "{payload:?}: {}",
                failed.error
            );
        }
    }

    #[test]
    fn fail_if_matches_metadata() {
        let pipeline = Pipeline::parse(&["fail-if:poison=yes".into()]).expect("valid");
        assert!(matches!(
            pipeline.run(event("1", &[("poison", "yes")])),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            pipeline.run(event("1", &[("poison", "no")])),
            Outcome::Passed(_)
        ));
    }

    #[test]
    fn bad_specs_are_named() {
        let err = Pipeline::parse(&["frobnicate".into()]).expect_err("unknown");
        assert!(err.contains("frobnicate"));
        assert!(Pipeline::parse(&["cpu:0".into()]).is_err());
        assert!(Pipeline::parse(&["fail-if:novalue".into()]).is_err());
        assert!(
            Pipeline::parse(&["cpu:10".into()])
                .expect("valid")
                .is_cpu_heavy()
        );
    }
}

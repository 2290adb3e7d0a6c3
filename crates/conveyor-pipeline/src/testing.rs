//! `[[tests]]` blocks: an input event and what the pipelines must make of it (outputs with
//! their data, metadata and sinks; a drop; or a failure at a stage), run by `conveyor test`.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use conveyor_core::{ContentType, Event};
use serde::Deserialize;
use toml::Spanned;

use crate::config::Loading;
use crate::pipeline::{Outcome, Pipelines};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestBlock {
    name: Spanned<String>,
    input: InputBlock,
    expect: Spanned<ExpectBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InputBlock {
    id: Option<String>,
    source: String,
    data: toml::Value,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    attempt: Option<u32>,
    timestamp: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectBlock {
    drop: Option<bool>,
    failure: Option<FailureExpect>,
    outputs: Option<Vec<OutputExpect>>,
    // The one output, written inline (`expect.data = ...`, `expect.to = [...]`).
    id: Option<String>,
    data: Option<toml::Value>,
    metadata: Option<BTreeMap<String, String>>,
    to: Option<Vec<String>>,
}

/// What a failure must look like: its stage and pipeline (when given) and a part of its reason.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FailureExpect {
    pub pipeline: Option<String>,
    pub stage: Option<String>,
    pub reason: Option<String>,
    pub retryable: Option<bool>,
}

/// What one output must look like; what is not given is not checked (metadata: the entries
/// given must be there, others may be too).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutputExpect {
    pub id: Option<String>,
    pub data: Option<serde_json::Value>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub to: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    Drop,
    Failure(FailureExpect),
    Outputs(Vec<OutputExpect>),
}

/// One test from the file.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    pub input: Event,
    pub expect: Expect,
}

impl TestCase {
    pub(crate) fn from_block(
        ctx: &mut Loading<'_>,
        index: usize,
        block: TestBlock,
    ) -> Option<Self> {
        let name = block.name.get_ref().clone();
        let at = block.expect.span().start;
        let what = format!("test {} ('{name}')", index + 1);
        let expect = block.expect.into_inner();
        let single = expect.id.is_some()
            || expect.data.is_some()
            || expect.metadata.is_some()
            || expect.to.is_some();
        let kinds = [
            expect.drop == Some(true),
            expect.failure.is_some(),
            expect.outputs.is_some(),
            single,
        ]
        .iter()
        .filter(|&&k| k)
        .count();
        if kinds != 1 {
            ctx.problem(
                at,
                format!("{what}: expect exactly one of drop = true, failure = {{...}}, outputs = [...], or the one output's id/data/metadata/to"),
            );
            return None;
        }
        let to_json = |value: toml::Value| serde_json::to_value(value).unwrap_or_default();
        let expect = if expect.drop == Some(true) {
            Expect::Drop
        } else if let Some(failure) = expect.failure {
            Expect::Failure(failure)
        } else if let Some(outputs) = expect.outputs {
            Expect::Outputs(outputs)
        } else {
            Expect::Outputs(vec![OutputExpect {
                id: expect.id,
                data: expect.data.map(to_json),
                metadata: expect.metadata,
                to: expect.to,
            }])
        };
        let input = block.input;
        let data = to_json(input.data);
        let (payload, content_type) = match &data {
            serde_json::Value::String(text) => (Bytes::from(text.clone()), ContentType::Text),
            other => (Bytes::from(other.to_string()), ContentType::Json),
        };
        Some(TestCase {
            input: Event {
                id: input
                    .id
                    .unwrap_or_else(|| format!("test-{}", index + 1))
                    .into(),
                source: input.source.into(),
                timestamp_ms: input.timestamp.unwrap_or(1_700_000_000_000),
                payload,
                content_type,
                metadata: Arc::new(input.metadata),
                attempt: input.attempt.unwrap_or(1),
                headers: BTreeMap::new(),
            },
            name,
            expect,
        })
    }

    /// Runs the test; `Err` says how the outcome differs from what was expected.
    pub fn run(&self, pipelines: &Pipelines) -> Result<(), String> {
        let outcome = pipelines.run(self.input.clone(), &mut ());
        match (&self.expect, outcome) {
            (Expect::Drop, Outcome::Dropped { .. }) => Ok(()),
            (Expect::Failure(want), Outcome::Failed(failure)) => {
                let mut wrong = Vec::new();
                if want
                    .pipeline
                    .as_deref()
                    .is_some_and(|p| p != &*failure.pipeline)
                {
                    wrong.push(format!(
                        "pipeline {} (expected {:?})",
                        failure.pipeline, want.pipeline
                    ));
                }
                if want.stage.as_deref().is_some_and(|s| s != &*failure.stage) {
                    wrong.push(format!(
                        "stage {} (expected {:?})",
                        failure.stage, want.stage
                    ));
                }
                if want
                    .reason
                    .as_deref()
                    .is_some_and(|r| !failure.reason.contains(r))
                {
                    wrong.push(format!(
                        "reason '{}' (expected it to contain {:?})",
                        failure.reason, want.reason
                    ));
                }
                if want.retryable.is_some_and(|r| r != failure.retryable) {
                    wrong.push(format!("retryable {}", failure.retryable));
                }
                if wrong.is_empty() {
                    Ok(())
                } else {
                    Err(format!("failed as expected, but with {}", wrong.join(", ")))
                }
            }
            (Expect::Outputs(want), Outcome::Routed(outputs)) => {
                if want.len() != outputs.len() {
                    return Err(format!(
                        "expected {} output(s), got {}: {}",
                        want.len(),
                        outputs.len(),
                        outputs
                            .iter()
                            .map(|o| render(&o.event))
                            .collect::<Vec<_>>()
                            .join(" ")
                    ));
                }
                for (n, (want, got)) in want.iter().zip(&outputs).enumerate() {
                    let label = format!("output {}", n + 1);
                    if let Some(id) = &want.id
                        && id.as_str() != &*got.event.id
                    {
                        return Err(format!("{label}: id {} (expected {id})", got.event.id));
                    }
                    if let Some(data) = &want.data {
                        let actual = actual_data(&got.event);
                        if !json_eq(data, &actual) {
                            return Err(format!("{label}: data {actual} (expected {data})"));
                        }
                    }
                    if let Some(metadata) = &want.metadata {
                        for (k, v) in metadata {
                            if got.event.metadata.get(k) != Some(v) {
                                return Err(format!(
                                    "{label}: metadata {k} = {:?} (expected {v:?})",
                                    got.event.metadata.get(k)
                                ));
                            }
                        }
                    }
                    if let Some(to) = &want.to {
                        let sinks: Vec<&str> = got.sinks.iter().map(|s| &**s).collect();
                        if sinks != *to {
                            return Err(format!("{label}: routed to {sinks:?} (expected {to:?})"));
                        }
                    }
                }
                Ok(())
            }
            (_, Outcome::Dropped { pipeline, stage }) => {
                Err(format!("dropped by pipeline {pipeline} stage {stage}"))
            }
            (_, Outcome::Failed(failure)) => Err(format!("failed: {failure}")),
            (_, Outcome::Routed(outputs)) => Err(format!(
                "passed as {} output(s), routed to {:?}",
                outputs.len(),
                outputs
                    .iter()
                    .map(|o| o.sinks.join("+"))
                    .collect::<Vec<_>>()
            )),
        }
    }
}

fn actual_data(event: &Event) -> serde_json::Value {
    match event.content_type {
        ContentType::Json => serde_json::from_slice(&event.payload).unwrap_or_default(),
        _ => serde_json::Value::String(String::from_utf8_lossy(&event.payload).into_owned()),
    }
}

fn render(event: &Event) -> String {
    format!("{}={}", event.id, actual_data(event))
}

/// JSON equality with numbers compared by value (`100` equals `100.0`; TOML and jq disagree on
/// which numbers are integers).
fn json_eq(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

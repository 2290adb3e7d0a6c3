//! The stage shorthands of the `--stage` flag (`json`, `require:a,b`, `set-metadata:k=v`,
//! `fail-if:k=v`, `cpu:N`), kept so existing commands work; in a config file they are written
//! `{ stage = "require:a,b" }`.

use std::sync::Arc;

use conveyor_core::{ContentType, Event};

/// One shorthand stage, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shorthand {
    /// Fails unless the payload is valid JSON (a permanent failure).
    Json,
    /// Fails unless the payload is a JSON object holding every listed top-level field
    /// (permanent).
    Require(Vec<String>),
    /// Sets a metadata entry to a constant.
    SetMetadata { key: String, value: String },
    /// Fails events whose metadata `key` equals `value`, as a *retryable* failure: a
    /// quarantine rule, and the way to make a poison event that goes through every retry.
    FailIf { key: String, value: String },
    /// Burns CPU in proportion to the rounds (FNV-1a over the payload, repeated) and records
    /// the digest in metadata `cpu_digest`: a stand-in for real CPU-heavy work in benchmarks.
    Cpu(u32),
}

/// A shorthand's failure: why, and whether a retry could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShorthandError {
    pub reason: String,
    pub retryable: bool,
}

impl std::str::FromStr for Shorthand {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
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
            "json" => Shorthand::Json,
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
                Shorthand::Require(fields)
            }
            "set-metadata" => {
                let (key, value) = key_value(arg)?;
                Shorthand::SetMetadata { key, value }
            }
            "fail-if" => {
                let (key, value) = key_value(arg)?;
                Shorthand::FailIf { key, value }
            }
            "cpu" => Shorthand::Cpu(
                arg.and_then(|a| a.parse::<u32>().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        format!("stage '{spec}': expected cpu:ROUNDS with ROUNDS > 0")
                    })?,
            ),
            other => {
                return Err(format!(
                    "unknown stage '{other}' (known: json, require:a,b, set-metadata:k=v, fail-if:k=v, cpu:N)"
                ));
            }
        })
    }
}

impl Shorthand {
    /// The stage's kind, used for its default name.
    pub fn kind(&self) -> &'static str {
        match self {
            Shorthand::Json => "json",
            Shorthand::Require(_) => "require",
            Shorthand::SetMetadata { .. } => "set-metadata",
            Shorthand::FailIf { .. } => "fail-if",
            Shorthand::Cpu(_) => "cpu",
        }
    }

    pub fn cpu_heavy(&self) -> bool {
        matches!(self, Shorthand::Cpu(_))
    }

    pub fn apply(&self, event: &mut Event) -> Result<(), ShorthandError> {
        let permanent = |reason: String| ShorthandError {
            reason,
            retryable: false,
        };
        match self {
            Shorthand::Json => serde_json::from_slice::<serde::de::IgnoredAny>(&event.payload)
                .map(|_| ())
                .map_err(|e| permanent(format!("payload is not valid JSON: {e}"))),
            Shorthand::Require(fields) => {
                if event.content_type != ContentType::Json {
                    return Err(permanent("payload is not JSON".into()));
                }
                let object: std::collections::HashMap<&str, &serde_json::value::RawValue> =
                    serde_json::from_slice(&event.payload)
                        .map_err(|_| permanent("payload is not a JSON object".into()))?;
                match fields.iter().find(|f| !object.contains_key(f.as_str())) {
                    Some(missing) => Err(permanent(format!(
                        "payload lacks required field '{missing}'"
                    ))),
                    None => Ok(()),
                }
            }
            Shorthand::SetMetadata { key, value } => {
                Arc::make_mut(&mut event.metadata).insert(key.clone(), value.clone());
                Ok(())
            }
            Shorthand::FailIf { key, value } => {
                if event.metadata.get(key) == Some(value) {
                    Err(ShorthandError {
                        reason: format!("rejected by rule fail-if:{key}={value}"),
                        retryable: true,
                    })
                } else {
                    Ok(())
                }
            }
            Shorthand::Cpu(rounds) => {
                let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
                for round in 0..*rounds {
                    hash ^= u64::from(round);
                    for &byte in event.payload.iter() {
                        hash ^= u64::from(byte);
                        hash = hash.wrapping_mul(0x0100_0000_01b3);
                    }
                }
                Arc::make_mut(&mut event.metadata)
                    .insert("cpu_digest".into(), format!("{hash:016x}"));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::event;

    fn apply(spec: &str, mut e: Event) -> Result<Event, ShorthandError> {
        spec.parse::<Shorthand>()
            .expect("valid")
            .apply(&mut e)
            .map(|()| e)
    }

    #[test]
    fn validations_fail_for_good_and_fail_if_for_a_retry() {
        let error = apply("json", event("s", "{oops")).expect_err("not JSON");
        assert!(error.reason.contains("not valid JSON") && !error.retryable);
        let error = apply("require:t", event("s", r#"{"x":1}"#)).expect_err("missing");
        assert!(error.reason.contains("'t'") && !error.retryable);
        assert!(apply("require:t", event("s", r#"{"t":1}"#)).is_ok());
        let error = apply("fail-if:k=v", event("s", "{}")).expect_err("k=v");
        assert!(error.retryable);
        assert!(apply("fail-if:k=w", event("s", "{}")).is_ok());
        let out = apply("set-metadata:a=b", event("s", "{}")).expect("sets");
        assert_eq!(out.metadata["a"], "b");
        let out = apply("cpu:2", event("s", "{}")).expect("burns");
        assert_eq!(out.metadata["cpu_digest"].len(), 16);
    }

    #[test]
    fn bad_specs_are_named() {
        let error = "frobnicate".parse::<Shorthand>().expect_err("unknown");
        assert!(error.contains("frobnicate"));
        assert!("cpu:0".parse::<Shorthand>().is_err());
        assert!("fail-if:novalue".parse::<Shorthand>().is_err());
        assert!("require:".parse::<Shorthand>().is_err());
    }
}

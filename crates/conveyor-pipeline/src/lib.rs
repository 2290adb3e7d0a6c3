//! What happens to an event between the queue and the sinks.
//!
//! A config file ([`config`]) declares named sinks, schemas checked at the door
//! ([`schema::DoorSchemas`]), and pipelines ([`pipeline`]): a `match` condition, stages
//! (JSON Schema validation, jq transforms and filters through jaq ([`jq`]), and the `--stage`
//! shorthands ([`shorthand`])), and routes to sinks. Everything is compiled when the file is
//! loaded, so a mistake is found at start-up (or refused at reload), not on the first event.
//!
//! This crate knows nothing of queues or sinks: it decides what becomes of an event (an
//! [`Outcome`]) and the processor carries that out. docs/PIPELINES.md is the user's guide.

pub mod config;
pub mod jq;
pub mod pipeline;
pub mod schema;
pub mod shorthand;
pub mod testing;
pub mod view;

pub use config::{Config, Problem, Problems, SinkDecl};
pub use pipeline::{
    DEFAULT_SINK, Failure, Observer, Outcome, Pipelines, Routed, SinkNames, StageResult,
};
pub use schema::{DoorSchemas, Schema, Violation};

#[cfg(test)]
mod tests;

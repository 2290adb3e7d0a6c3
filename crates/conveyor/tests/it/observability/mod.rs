//! Observability as an operator meets it: every service's `/metrics` holds the documented
//! families, they move when events flow, and Prometheus' own `promtool` accepts the output.
//!
//! - `openmetrics.rs`: `/metrics` as OpenMetrics (content negotiation, exemplars with the trace
//!   id of a traced request and its event), the same families as the Prometheus text.
//! - `metrics.rs`: every service's `/metrics`: the documented families, moving with traffic, and
//!   `promtool check metrics`.
//! - `deploy.rs`: `deploy/`: the Prometheus config and alert rules, and the dashboards' queries
//!   (valid PromQL, reading only metrics conveyor exposes and documents).
//! - `dashboard.rs`: the live dashboard in headless Chromium.
//! - `status.rs`: the `conveyor status` command.
//! - `profiling.rs`: CPU profiles at `/debug/pprof/profile`.
//! - `logs.rs`: `LOG_FORMAT=json`.
//!
//! Shared by them, each in a file of its own: `scrape.rs` (reading `/metrics`, and `promtool`),
//! `traffic.rs` (the stages and the traffic the tests send) and `paths.rs` (the repository and
//! the test artifacts).

mod paths;
mod scrape;
mod traffic;

mod dashboard;
mod deploy;
mod logs;
mod metrics;
mod openmetrics;
mod profiling;
mod status;

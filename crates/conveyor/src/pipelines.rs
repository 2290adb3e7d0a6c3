//! The config file for the running roles: what it makes of the worker pool (pipelines and named
//! sinks) and of ingest (schemas at the door), re-reading it on SIGHUP, and the `conveyor
//! validate` and `conveyor test` commands.
//!
//! Flags are the quick form, the file the full form: without a file, `--sink` is the one sink
//! (`default`) and `--stage` the one pipeline. With a file, `--sink` (when not left at its
//! default) overrides the file's `[sinks.default]`, and `--stage` replaces the file's
//! pipelines; both say so in the log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use conveyor_api::exposition::{self, Exposition};
use conveyor_core::now_ms;
use conveyor_core::stats::ConfigState;
use conveyor_ingest::Ingest;
use conveyor_pipeline::{Config, DEFAULT_SINK, Pipelines};
use conveyor_processor::WorkerPool;
use conveyor_processor::routing::Routing;
use conveyor_sink::Sink;

use crate::sinks::SinkSpec;

use crate::cli::{ConfigFileArgs, DEFAULT_SINK_FLAG, PoolArgs};
use crate::failure::Failure;

/// Reads and checks the config file; every problem, placed in the file, as a config failure.
pub fn load(path: &Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|problems| {
        Failure::Config(format!(
            "the config file does not load (CONVEYOR_CONFIG / --config):\n{problems}"
        ))
    })
}

/// The quick-form flags a config is combined with (what a reload needs of them).
#[derive(Debug, Clone)]
pub struct Flags {
    pub sink: SinkSpec,
    pub stages: Vec<String>,
}

impl Flags {
    pub fn of(pool: &PoolArgs) -> Self {
        Flags {
            sink: pool.sink.clone(),
            stages: pool.stages.clone(),
        }
    }

    fn sink_given(&self) -> bool {
        self.sink.to_string() != DEFAULT_SINK_FLAG
    }
}

/// Sinks opened so far, by spec: a reload that keeps a sink keeps the one already open (two
/// handles on one file would interleave their appends).
#[derive(Default)]
pub struct OpenSinks(Mutex<Vec<(SinkSpec, Arc<dyn Sink>)>>);

impl OpenSinks {
    fn open(&self, spec: &SinkSpec) -> Result<Arc<dyn Sink>, String> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, sink)) = open.iter().find(|(s, _)| s == spec) {
            return Ok(Arc::clone(sink));
        }
        // Two file sinks on one path would rotate and gzip under each other.
        if let SinkSpec::File(wanted) = spec
            && open
                .iter()
                .any(|(s, _)| matches!(s, SinkSpec::File(other) if other.path == wanted.path))
        {
            return Err(format!(
                "the file sink at '{}' is already open with other settings (rotation, gzip and \
                 durable change with a restart, not a reload; two sinks cannot share a path)",
                wanted.path.display()
            ));
        }
        let sink = spec.open()?;
        open.push((spec.clone(), Arc::clone(&sink)));
        Ok(sink)
    }
}

/// The sink each route needs, by name: from the file's `[sinks.NAME]`, and `default` from
/// `--sink` unless the file declares it (and the flag was left at its default).
fn sink_specs(
    config: Option<&Config>,
    flags: &Flags,
    pipelines: &Pipelines,
) -> Result<Vec<(String, SinkSpec)>, String> {
    let mut specs = Vec::new();
    for name in pipelines.sink_names() {
        let declared = config.and_then(|c| c.sinks.iter().find(|s| *s.name == *name));
        let spec = match declared {
            Some(_) if &*name == DEFAULT_SINK && flags.sink_given() => {
                tracing::warn!(sink = %flags.sink, "--sink (CONVEYOR_SINK) overrides the config file's [sinks.default]");
                flags.sink.clone()
            }
            Some(decl) => SinkSpec::from_settings(&decl.settings).map_err(|e| {
                let file = config.map_or(PathBuf::new(), |c| c.path.clone());
                format!(
                    "{}:{}:{}: sink {}: {e}",
                    file.display(),
                    decl.line,
                    decl.column,
                    decl.name
                )
            })?,
            None if &*name == DEFAULT_SINK => flags.sink.clone(),
            None => {
                return Err(format!(
                    "a route names the sink '{name}', which is not declared"
                ));
            }
        };
        specs.push((name.to_string(), spec));
    }
    Ok(specs)
}

/// The pipelines: `--stage` when given, else the file's, else none.
fn pipelines(config: Option<&Config>, flags: &Flags) -> Result<Pipelines, String> {
    if !flags.stages.is_empty() || config.is_none() {
        if config.is_some() {
            tracing::warn!("--stage (CONVEYOR_STAGES) replaces the config file's pipelines");
        }
        return Pipelines::from_shorthands(&flags.stages)
            .map_err(|e| format!("CONVEYOR_STAGES (--stage): {e}"));
    }
    Ok(config
        .map(|c| c.pipelines.clone())
        .expect("a config is given"))
}

/// The pool's routing: the pipelines, with their sinks opened (or reused from `open`).
pub fn routing(
    config: Option<&Config>,
    flags: &Flags,
    open: &OpenSinks,
) -> Result<Routing, String> {
    let pipelines = pipelines(config, flags)?;
    let mut sinks = Vec::new();
    for (name, spec) in sink_specs(config, flags, &pipelines)? {
        let sink = open.open(&spec).map_err(|e| format!("sink {name}: {e}"))?;
        sinks.push((name, sink));
    }
    Routing::new(pipelines, sinks)
}

static RELOADS_APPLIED: AtomicU64 = AtomicU64::new(0);
static RELOADS_REFUSED: AtomicU64 = AtomicU64::new(0);

fn render(out: &mut Exposition) {
    out.counters(
        "conveyor_config_reloads_total",
        "Config file reloads (SIGHUP): applied, or refused because the file did not load (the old config keeps running).",
        vec![
            (
                vec![("result", "applied".to_owned())],
                RELOADS_APPLIED.load(Ordering::Relaxed),
            ),
            (
                vec![("result", "refused".to_owned())],
                RELOADS_REFUSED.load(Ordering::Relaxed),
            ),
        ],
    );
}

/// What a reload changes in this process.
pub struct Reloader {
    pub path: PathBuf,
    pub flags: Flags,
    pub open: Arc<OpenSinks>,
    pub processor: Option<Arc<WorkerPool>>,
    pub ingest: Option<Arc<Ingest>>,
}

impl Reloader {
    /// Applies a config loaded at start-up, and re-reads the file on every SIGHUP from now on.
    pub fn start(self, config: &Config) {
        exposition::register("config", render);
        let mut state = ConfigState {
            path: self.path.display().to_string(),
            loaded_at: now_ms(),
            ..ConfigState::default()
        };
        if let Some(ingest) = &self.ingest {
            ingest.set_door(config.door.clone());
        }
        if let Some(processor) = &self.processor {
            processor.set_config_state(state.clone());
        }
        tracing::info!(
            path = %self.path.display(),
            pipelines = config.pipelines.pipelines.len(),
            door_schemas = config.door.len(),
            "config file loaded; SIGHUP reloads it"
        );
        tokio::spawn(async move {
            let mut hangups = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::error!(%error, "cannot listen for SIGHUP; the config file will not be reloaded");
                    return;
                }
            };
            while hangups.recv().await.is_some() {
                match self.reload().await {
                    Ok(()) => {
                        RELOADS_APPLIED.fetch_add(1, Ordering::Relaxed);
                        state.reloads_applied += 1;
                        state.loaded_at = now_ms();
                        state.last_refusal = None;
                        tracing::info!(path = %self.path.display(), "config file reloaded");
                    }
                    Err(why) => {
                        RELOADS_REFUSED.fetch_add(1, Ordering::Relaxed);
                        state.reloads_refused += 1;
                        tracing::error!(path = %self.path.display(), "config reload refused; the old config keeps running: {why}");
                        state.last_refusal = Some(why);
                    }
                }
                if let Some(processor) = &self.processor {
                    processor.set_config_state(state.clone());
                }
            }
        });
    }

    /// Loads the file and swaps it in; nothing changes unless everything loads.
    async fn reload(&self) -> Result<(), String> {
        let config = Config::load(&self.path).map_err(|problems| problems.to_string())?;
        let routing = match &self.processor {
            Some(_) => Some(routing(Some(&config), &self.flags, &self.open)?),
            None => None,
        };
        if let (Some(processor), Some(routing)) = (&self.processor, routing) {
            processor.reload(routing).await;
        }
        if let Some(ingest) = &self.ingest {
            ingest.set_door(config.door);
        }
        Ok(())
    }
}

/// `conveyor validate`: everything that can be checked offline, then a summary.
pub fn validate(args: &ConfigFileArgs) -> Result<(), Failure> {
    let config = load(&args.config)?;
    let mut problems = Vec::new();
    for decl in &config.sinks {
        if let Err(error) = SinkSpec::from_settings(&decl.settings) {
            problems.push(format!(
                "{}:{}:{}: sink {}: {error}",
                args.config.display(),
                decl.line,
                decl.column,
                decl.name
            ));
        }
    }
    if !problems.is_empty() {
        return Err(Failure::Config(format!(
            "the config file does not load:\n{}",
            problems.join("\n")
        )));
    }
    println!("{}: ok", args.config.display());
    for line in config.summary() {
        println!("  {line}");
    }
    Ok(())
}

/// `conveyor test`: runs the file's `[[tests]]`, a line per test.
pub fn test(args: &ConfigFileArgs) -> Result<(), Failure> {
    let config = load(&args.config)?;
    if config.tests.is_empty() {
        return Err(Failure::Config(format!(
            "{} has no [[tests]] to run",
            args.config.display()
        )));
    }
    let mut failed = 0;
    for test in &config.tests {
        match test.run(&config.pipelines) {
            Ok(()) => println!("ok    {}", test.name),
            Err(why) => {
                failed += 1;
                println!("FAIL  {}: {why}", test.name);
            }
        }
    }
    let total = config.tests.len();
    println!("{} passed, {failed} failed", total - failed);
    if failed > 0 {
        return Err(Failure::Runtime(anyhow::anyhow!(
            "{failed} of {total} tests failed"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sink_is_opened_once_per_path_and_other_settings_on_it_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.ndjson");
        let plain: SinkSpec = format!("file:{}", path.display()).parse().expect("spec");
        let sinks = OpenSinks::default();
        let first = sinks.open(&plain).expect("open");
        let again = sinks.open(&plain).expect("the same sink");
        assert!(Arc::ptr_eq(&first, &again));
        let rotating = SinkSpec::from_settings(&serde_json::json!({
            "type": "file", "path": path.to_str().expect("utf-8"), "rotate_bytes": 1000,
        }))
        .expect("spec");
        let refused = sinks.open(&rotating).err().unwrap_or_default();
        assert!(
            refused.contains("already open with other settings"),
            "{refused}"
        );
    }
}

//! The command line. Every flag has an environment variable; the seed's names (`API_PORT`,
//! `QUEUE_SIZE`, …) are those variables.

use std::path::PathBuf;
use std::time::Duration;

use crate::sinks::SinkSpec;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "conveyor",
    version,
    about = "Takes in streams of events over HTTP and gRPC and processes every one of them."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log format on stderr: text or json (CONVEYOR_LOG_FORMAT is read too). Level: RUST_LOG
    /// or CONVEYOR_LOG.
    #[arg(
        long,
        global = true,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        value_enum
    )]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Command {
    /// Whether `--profiling` was given to a serving role.
    pub fn profiling(&self) -> bool {
        match self {
            Command::Run(args) => args.serve.profiling,
            Command::Gateway(args) => args.serve.profiling,
            Command::Ingest(args) => args.serve.profiling,
            Command::Processor(args) => args.serve.profiling,
            _ => false,
        }
    }

    /// A serving role's name and the OTLP endpoint its flag gives (`None` for the tools).
    pub fn otlp(&self) -> Option<(&'static str, Option<&str>)> {
        let (role, serve) = match self {
            Command::Run(args) => ("run", &args.serve),
            Command::Gateway(args) => ("gateway", &args.serve),
            Command::Ingest(args) => ("ingest", &args.serve),
            Command::Processor(args) => ("processor", &args.serve),
            _ => return None,
        };
        let endpoint = serve
            .otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty());
        Some((role, endpoint))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Gateway, ingest and processor in one process on one port; the memory queue unless
    /// QUEUE_TYPE names a broker.
    Run(RunArgs),
    /// The front door: HTTP and gRPC ingest, status, DLQ; forwards to ingest over gRPC.
    Gateway(GatewayArgs),
    /// Validates events, gives them ids, publishes them to the queue.
    Ingest(IngestArgs),
    /// Consumes the queue with a worker pool and writes to the sink.
    Processor(ProcessorArgs),
    /// Sends events to a conveyor and measures latency and accepted/processed events per second.
    Load(conveyor_load::LoadArgs),
    /// Shows the system's status as the gateway sees it (GET /api/v1/status) as a table.
    Status(StatusArgs),
    /// Loads a config file (jq programs, schemas, sinks), prints what it holds, and exits 0, or
    /// 64 naming each problem with its file, line and column.
    Validate(ConfigFileArgs),
    /// Runs the `[[tests]]` of a config file: a pass/fail line per test; exits 1 if any fails.
    Test(ConfigFileArgs),
}

#[derive(Debug, Args)]
pub struct ConfigFileArgs {
    /// The config file (TOML): sinks, door schemas, pipelines, tests (docs/PIPELINES.md).
    #[arg(long, env = "CONVEYOR_CONFIG", value_name = "CONVEYOR_CONFIG")]
    pub config: PathBuf,
}

/// The config file of a running role.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Config file (TOML) with named sinks, door schemas and pipelines (docs/PIPELINES.md);
    /// re-read on SIGHUP. Without one, --sink and --stage are the whole pipeline.
    #[arg(long, env = "CONVEYOR_CONFIG", value_name = "CONVEYOR_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The gateway (or `conveyor run`) to ask.
    #[arg(
        long,
        env = "CONVEYOR_GATEWAY_URL",
        value_name = "CONVEYOR_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub gateway_url: String,

    /// Print the gateway's JSON answer as it is instead of a table.
    #[arg(long)]
    pub json: bool,

    /// Give up after this many seconds.
    #[arg(long, env = "CONVEYOR_STATUS_TIMEOUT_SECS", default_value_t = 10)]
    pub timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(
        long,
        env = "CONVEYOR_HOST",
        value_name = "CONVEYOR_HOST",
        default_value = "0.0.0.0"
    )]
    pub host: String,

    /// Longest wait on shutdown for in-flight work to finish, in seconds.
    #[arg(
        long,
        env = "CONVEYOR_DRAIN_TIMEOUT_SECS",
        value_name = "CONVEYOR_DRAIN_TIMEOUT_SECS",
        default_value_t = 30
    )]
    pub drain_timeout_secs: u64,

    /// Serve GET /debug/pprof/profile?seconds=N, a CPU flamegraph (SVG) of this process. Off
    /// by default: a profile costs CPU while it runs and shows the code's inner workings.
    #[arg(long, env = "CONVEYOR_PROFILING", value_name = "CONVEYOR_PROFILING")]
    pub profiling: bool,

    /// Export trace spans over OTLP to this collector (base URL, e.g. http://127.0.0.1:4318;
    /// http/protobuf to {endpoint}/v1/traces, or gRPC with OTEL_EXPORTER_OTLP_PROTOCOL=grpc;
    /// the other OTEL_* variables are read too). No spans are recorded without.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "OTEL_EXPORTER_OTLP_ENDPOINT"
    )]
    pub otlp_endpoint: Option<String>,
}

impl ServeArgs {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
}

/// The body limit of every role that reads events over HTTP or gRPC.
#[derive(Debug, Args)]
pub struct BodyArgs {
    /// Largest request body (and gRPC message) in bytes.
    #[arg(long, env = "CONVEYOR_MAX_BODY_BYTES", value_name = "CONVEYOR_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024 * 1024))]
    pub max_body_bytes: u64,
}

/// The batch limit of the public doors (run, gateway, ingest).
#[derive(Debug, Args)]
pub struct BatchArgs {
    /// Most events in one batch request.
    #[arg(long, env = "CONVEYOR_MAX_BATCH_EVENTS", value_name = "CONVEYOR_MAX_BATCH_EVENTS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_batch_events: u64,
}

/// The per-event rules of the roles that validate events (run, ingest, and a processor's
/// `/enqueue`); a split-mode gateway leaves validation to ingest.
#[derive(Debug, Args)]
pub struct EventArgs {
    /// Deepest nesting of arrays and objects in an event's JSON data (400 nesting_too_deep
    /// beyond it).
    #[arg(long, env = "CONVEYOR_MAX_JSON_DEPTH", value_name = "CONVEYOR_MAX_JSON_DEPTH", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_json_depth: u64,
}

/// A queue backend. NATS and Kafka are cargo features of the binary (default on); a binary
/// built without one refuses its `QUEUE_TYPE` at start-up, naming the feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum QueueType {
    Memory,
    Nats,
    Kafka,
    Composite,
}

#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Queue backend.
    #[arg(
        long,
        env = "QUEUE_TYPE",
        value_name = "QUEUE_TYPE",
        value_enum,
        default_value = "memory"
    )]
    pub queue_type: QueueType,

    /// Capacity: most events held at once (memory), the stream's max messages (NATS), the
    /// most the consumer group may lag behind (Kafka).
    #[arg(long, env = "QUEUE_SIZE", value_name = "QUEUE_SIZE", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub queue_size: u64,

    /// How many recent event ids the memory queue remembers to discard duplicate publishes.
    #[arg(
        long,
        env = "CONVEYOR_QUEUE_DEDUPE_WINDOW",
        value_name = "CONVEYOR_QUEUE_DEDUPE_WINDOW",
        default_value_t = 100_000
    )]
    pub queue_dedupe_window: usize,

    #[cfg(feature = "nats")]
    #[command(flatten)]
    pub nats: conveyor_queue_nats::NatsArgs,

    #[cfg(feature = "kafka")]
    #[command(flatten)]
    pub kafka: conveyor_queue_kafka::KafkaArgs,

    #[command(flatten)]
    pub composite: CompositeArgs,
}

/// Dual-write settings (used with `QUEUE_TYPE=composite`).
#[derive(Debug, Args)]
pub struct CompositeArgs {
    /// Backends to write to, the primary first (processors consume from it): e.g. nats,kafka.
    #[arg(
        long,
        env = "COMPOSITE_PROVIDERS",
        value_name = "COMPOSITE_PROVIDERS",
        value_enum,
        value_delimiter = ',',
        default_value = "nats,kafka"
    )]
    pub composite_providers: Vec<QueueType>,

    /// fail-fast: accepted only when every backend confirmed; best-effort: when the primary
    /// confirmed (failures on the others are counted and shown).
    #[arg(
        long,
        env = "COMPOSITE_STRATEGY",
        value_name = "COMPOSITE_STRATEGY",
        value_enum,
        default_value = "fail-fast"
    )]
    pub composite_strategy: CompositeStrategy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompositeStrategy {
    FailFast,
    BestEffort,
}

/// Where processed events go when neither --sink nor a config file says.
pub const DEFAULT_SINK_FLAG: &str = "file:./data/out.ndjson";

#[derive(Debug, Args)]
pub struct PoolArgs {
    /// Workers in the pool.
    #[arg(long, env = "PROCESSOR_WORKERS", value_name = "PROCESSOR_WORKERS", default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: u64,

    /// Where processed events go: file:PATH, stdout, blackhole, postgres://…?table=…,
    /// http(s)://…, s3://bucket/prefix, nats://…?subject=… or kafka://…/topic (docs/SINKS.md).
    /// With --config, the sink named `default` (given here, it overrides the file's
    /// `[sinks.default]`).
    #[arg(
        long,
        env = "CONVEYOR_SINK",
        value_name = "CONVEYOR_SINK",
        default_value = DEFAULT_SINK_FLAG
    )]
    pub sink: SinkSpec,

    /// Pipeline stages in order (repeat the flag, or separate with ';'): json, require:a,b,
    /// set-metadata:k=v, fail-if:k=v, cpu:N. With --config, they replace the file's pipelines.
    #[arg(
        long = "stage",
        env = "CONVEYOR_STAGES",
        value_name = "CONVEYOR_STAGES",
        value_delimiter = ';'
    )]
    pub stages: Vec<String>,

    /// Deliveries of one event before it goes to the dead-letter queue.
    #[arg(long, env = "CONVEYOR_MAX_ATTEMPTS", value_name = "CONVEYOR_MAX_ATTEMPTS", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_attempts: u32,

    /// Delay before the first retry, in milliseconds; doubles per attempt.
    #[arg(
        long,
        env = "CONVEYOR_RETRY_BACKOFF_MS",
        value_name = "CONVEYOR_RETRY_BACKOFF_MS",
        default_value_t = 100
    )]
    pub retry_backoff_ms: u64,

    /// Longest delay between retries, in milliseconds.
    #[arg(
        long,
        env = "CONVEYOR_RETRY_BACKOFF_MAX_MS",
        value_name = "CONVEYOR_RETRY_BACKOFF_MAX_MS",
        default_value_t = 30_000
    )]
    pub retry_backoff_max_ms: u64,

    /// Most events a worker takes from the queue at once.
    #[arg(long, env = "CONVEYOR_BATCH_SIZE", value_name = "CONVEYOR_BATCH_SIZE", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,

    /// How many processed ids are remembered to skip redeliveries.
    #[arg(
        long,
        env = "CONVEYOR_DEDUPE_WINDOW",
        value_name = "CONVEYOR_DEDUPE_WINDOW",
        default_value_t = 100_000
    )]
    pub dedupe_window: usize,

    /// Most events the dead-letter queue holds.
    #[arg(long, env = "CONVEYOR_DLQ_CAPACITY", value_name = "CONVEYOR_DLQ_CAPACITY", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub dlq_capacity: u64,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Port for the HTTP and gRPC API (0 picks a free one).
    #[arg(
        long,
        env = "API_PORT",
        value_name = "API_PORT",
        default_value_t = 8080
    )]
    pub port: u16,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub body: BodyArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub events: EventArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[arg(
        long,
        env = "API_PORT",
        value_name = "API_PORT",
        default_value_t = 8080
    )]
    pub port: u16,
    /// Ingest services to forward to, comma-separated; load is spread over them.
    #[arg(long, env = "INGEST_URL", value_name = "INGEST_URL", default_value = "http://127.0.0.1:8081",
          value_delimiter = ',', value_parser = parse_http_url)]
    pub ingest_url: Vec<String>,
    /// Processors to report on and reach for the DLQ, comma-separated.
    #[arg(long, env = "PROCESSOR_URL", value_name = "PROCESSOR_URL", default_value = "http://127.0.0.1:8082",
          value_delimiter = ',', value_parser = parse_http_url)]
    pub processor_url: Vec<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub body: BodyArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    #[arg(
        long,
        env = "INGEST_PORT",
        value_name = "INGEST_PORT",
        default_value_t = 8081
    )]
    pub port: u16,
    /// The processor holding the memory queue (split mode with QUEUE_TYPE=memory).
    #[arg(long, env = "PROCESSOR_URL", value_name = "PROCESSOR_URL", default_value = "http://127.0.0.1:8082",
          value_parser = parse_http_url)]
    pub processor_url: String,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub body: BodyArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub events: EventArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct ProcessorArgs {
    #[arg(
        long,
        env = "PROCESSOR_PORT",
        value_name = "PROCESSOR_PORT",
        default_value_t = 8082
    )]
    pub port: u16,
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub body: BodyArgs,
    #[command(flatten)]
    pub events: EventArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// An `http://host[:port][/path]` peer URL, without its trailing slash.
fn parse_http_url(text: &str) -> Result<String, String> {
    let text = text.trim();
    let url = url::Url::parse(text).map_err(|e| format!("'{text}' is not a URL: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!("'{text}' must start with http://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("'{text}' has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!(
            "'{text}' must be a plain http://host:port URL (no query, fragment or user)"
        ));
    }
    Ok(text.trim_end_matches('/').to_owned())
}

//! Each role wired from its configuration: what it builds, what it serves, how it stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use conveyor_api::exposition::Exposition;
use conveyor_api::metrics::{self, HttpMetrics};
use conveyor_api::{Readiness, ReadyProbe, bind, serve, service_router};
use conveyor_core::Limits;
use conveyor_gateway::peers::{LocalIngest, LocalProcessor, Remote, RemoteIngest, RemoteProcessor};
use conveyor_gateway::{Gateway, IngestPeer, ProcessorPeer};
use conveyor_ingest::grpc::IngestGrpc;
use conveyor_ingest::http::{self as ingest_http, HttpLimits};
use conveyor_ingest::{
    CoalescingIntake, CoalescingPublisher, EnqueueForwarder, Ingest, Intake, RemoteIntake,
};
use conveyor_processor::{WorkerPool, WorkerPoolConfig};
use conveyor_queue::composite::{CompositeQueue, Strategy};
use conveyor_queue::dlq::{DeadLetterQueue, MemoryDeadLetters};
use conveyor_queue::{
    Health, MemoryQueue, MemoryQueueConfig, OpenError, Publisher, Queue, QueueSettings,
};
use tokio::net::TcpListener;

use crate::cli::{
    BatchArgs, BodyArgs, Command, CompositeStrategy, ConfigArgs, DEFAULT_SINK_FLAG, EventArgs,
    GatewayArgs, IngestArgs, PoolArgs, ProcessorArgs, QueueArgs, QueueType, RunArgs,
};
use crate::failure::Failure;
use crate::pipelines::{Flags, OpenSinks, Reloader};
use crate::shutdown;
use conveyor_pipeline::Config;

/// Batches a split-mode hop keeps on the wire at once; requests arriving meanwhile are sent
/// together as the next batch (see `conveyor_ingest::coalesce`). Two keep the hop busy while
/// letting batches grow under load: measured with 64 connections of single events, 8 in flight
/// gave batches of 5.5 events and 20.1k ev/s, 2 gave batches of 15.7 and 22.8k ev/s (split mode
/// on one core, BENCHMARKS.md).
const COALESCE_IN_FLIGHT: usize = 2;
/// Largest coalesced batch, in events.
const COALESCE_MAX_BATCH: usize = 2048;

pub async fn run(command: Command) -> Result<(), Failure> {
    if command.profiling() {
        conveyor_api::profiling::enable();
        tracing::warn!("CPU profiling is on: GET /debug/pprof/profile?seconds=N");
    }
    let target = match command.otlp() {
        Some((role, endpoint)) => crate::otlp::target(endpoint)
            .map_err(Failure::Config)?
            .map(|target| (role, target)),
        None => None,
    };
    let exporter = match target {
        Some((role, target)) => {
            tracing::info!(url = %target.url, wire = ?target.wire, "exporting trace spans (OTLP)");
            let started = crate::otlp::Exporter::start(&target, role)
                .map_err(|e| Failure::Config(format!("OTLP export to {}: {e}", target.url)))?;
            Some(started)
        }
        None => None,
    };
    let result = run_command(command).await;
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    result
}

async fn run_command(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run(args) => all_in_one(args).await,
        Command::Gateway(args) => gateway(args).await,
        Command::Ingest(args) => ingest(args).await,
        Command::Processor(args) => processor(args).await,
        Command::Status(args) => crate::status::run(args).await,
        Command::Validate(args) => crate::pipelines::validate(&args),
        Command::Test(args) => crate::pipelines::test(&args),
        Command::Load(args) => conveyor_load::run(args)
            .await
            .map(drop)
            .map_err(|e| match e {
                conveyor_load::LoadError::Config(message) => Failure::Config(message),
                other => Failure::Runtime(other.into()),
            }),
    }
}

async fn all_in_one(args: RunArgs) -> Result<(), Failure> {
    let config = load_config(args.config.config.as_deref())?;
    let open = Arc::new(OpenSinks::default());
    let (processor, queue) =
        build_processor(&args.queue, &args.pool, config.as_ref(), &open).await?;
    let readiness = Readiness::default();
    let ingest = Arc::new(Ingest::new(
        queue.clone() as Arc<dyn Publisher>,
        event_limits(&args.events),
    ));
    reload_on_hangup(
        config.as_ref(),
        &args.config,
        &args.pool,
        open,
        &processor,
        Some(&ingest),
    );
    let gateway = Gateway {
        intake: Arc::clone(&ingest) as Arc<dyn Intake>,
        ingests: vec![Arc::new(LocalIngest(ingest)) as Arc<dyn IngestPeer>],
        processors: vec![Arc::new(LocalProcessor(Arc::clone(&processor))) as Arc<dyn ProcessorPeer>],
        readiness: readiness.clone(),
        limits: http_limits(&args.body, &args.batch),
        metrics: HttpMetrics::default(),
    };
    let (listener, addr) = listen(&args.serve.host, args.port, "API_PORT").await?;
    announce("run", addr);
    let url = display_url(addr);
    println!("  ingest     POST {url}/api/v1/ingest   (batch: POST {url}/api/v1/ingest/batch)");
    println!("  status     GET  {url}/api/v1/status");
    println!("  dlq        GET  {url}/api/v1/dlq");
    println!("  metrics    GET  {url}/metrics");
    println!(
        "  grpc       conveyor.v1.IngestService at {url} (with grpc.health.v1.Health and reflection)"
    );
    println!("  sink       {}", processor.routing().describe());
    if let Some(path) = &args.config.config {
        println!(
            "  config     {} (kill -HUP {} reloads it)",
            path.display(),
            std::process::id()
        );
    }
    let draining = start_pool(&queue, &processor, args.serve.drain_timeout());
    serve_until_signal(
        listener,
        conveyor_gateway::router(gateway),
        readiness,
        args.serve.drain_timeout(),
        draining,
    )
    .await?;
    queue.shutdown().await;
    Ok(())
}

async fn gateway(args: GatewayArgs) -> Result<(), Failure> {
    let limits = http_limits(&args.body, &args.batch);
    let remote = RemoteIntake::new(&args.ingest_url, limits.max_body_bytes)
        .map_err(|e| Failure::Config(format!("INGEST_URL (--ingest-url): {e}")))?;
    // Several batches per ingest endpoint on the wire at once; concurrent requests share them.
    let intake = CoalescingIntake::new(
        Arc::new(remote),
        COALESCE_IN_FLIGHT * args.ingest_url.len(),
        COALESCE_MAX_BATCH,
    );
    let readiness = Readiness::default();
    let gateway = Gateway {
        intake: Arc::new(intake),
        ingests: args
            .ingest_url
            .iter()
            .map(|url| Arc::new(RemoteIngest(Remote::new(url))) as Arc<dyn IngestPeer>)
            .collect(),
        processors: args
            .processor_url
            .iter()
            .map(|url| Arc::new(RemoteProcessor(Remote::new(url))) as Arc<dyn ProcessorPeer>)
            .collect(),
        readiness: readiness.clone(),
        limits,
        metrics: HttpMetrics::default(),
    };
    let (listener, addr) = listen(&args.serve.host, args.port, "API_PORT").await?;
    announce("gateway", addr);
    serve_until_signal(
        listener,
        conveyor_gateway::router(gateway),
        readiness,
        args.serve.drain_timeout(),
        async {},
    )
    .await
}

async fn ingest(args: IngestArgs) -> Result<(), Failure> {
    // A broker queue is shut down (producer flushed) when serving ends.
    let mut broker: Option<Arc<dyn Queue>> = None;
    let publisher: Arc<dyn Publisher> = match args.queue.queue_type {
        // With the memory queue, the queue lives in the processor: hand events to it.
        QueueType::Memory => Arc::new(CoalescingPublisher::new(
            Arc::new(EnqueueForwarder::new(&args.processor_url)),
            COALESCE_IN_FLIGHT,
            COALESCE_MAX_BATCH,
        )),
        _ => {
            let queue = open_queue(&args.queue, 0).await?.0;
            broker = Some(Arc::clone(&queue));
            queue
        }
    };
    let ingest = Arc::new(Ingest::new(publisher, event_limits(&args.events)));
    if let Some(path) = &args.config.config {
        let config = crate::pipelines::load(path)?;
        Reloader {
            path: path.clone(),
            flags: Flags {
                sink: DEFAULT_SINK_FLAG.parse().map_err(Failure::Config)?,
                stages: Vec::new(),
            },
            open: Arc::default(),
            processor: None,
            ingest: Some(Arc::clone(&ingest)),
        }
        .start(&config);
    }
    let readiness = Readiness::default();
    let limits = http_limits(&args.body, &args.batch);
    let routes = Router::new()
        .merge(ingest_http::routes(
            Arc::clone(&ingest) as Arc<dyn Intake>,
            readiness.clone(),
            limits.clone(),
            "/ingest",
            "/ingest/batch",
        ))
        .merge(ingest_http::stats_route(Arc::clone(&ingest)))
        .merge(
            IngestGrpc::new(
                Arc::clone(&ingest) as Arc<dyn Intake>,
                readiness.clone(),
                limits.max_batch_events,
            )
            .into_router(limits.max_body_bytes),
        );
    let view = IngestRole {
        ingest: Arc::clone(&ingest),
        queue: broker.clone(),
    };
    let router = role_router(routes, readiness.clone(), Arc::new(view));
    let (listener, addr) = listen(&args.serve.host, args.port, "INGEST_PORT").await?;
    announce("ingest", addr);
    serve_until_signal(
        listener,
        router,
        readiness,
        args.serve.drain_timeout(),
        async {},
    )
    .await?;
    if let Some(queue) = broker {
        queue.shutdown().await;
    }
    Ok(())
}

async fn processor(args: ProcessorArgs) -> Result<(), Failure> {
    let config = load_config(args.config.config.as_deref())?;
    let open = Arc::new(OpenSinks::default());
    let (processor, queue) =
        build_processor(&args.queue, &args.pool, config.as_ref(), &open).await?;
    reload_on_hangup(
        config.as_ref(),
        &args.config,
        &args.pool,
        open,
        &processor,
        None,
    );
    let readiness = Readiness::default();
    let routes = conveyor_processor::http::routes(
        Arc::clone(&processor),
        readiness.clone(),
        event_limits(&args.events),
        to_usize(args.body.max_body_bytes),
    );
    let router = role_router(routes, readiness.clone(), Arc::clone(&processor));
    let (listener, addr) = listen(&args.serve.host, args.port, "PROCESSOR_PORT").await?;
    announce("processor", addr);
    let draining = start_pool(&queue, &processor, args.serve.drain_timeout());
    serve_until_signal(
        listener,
        router,
        readiness,
        args.serve.drain_timeout(),
        draining,
    )
    .await?;
    queue.shutdown().await;
    Ok(())
}

/// What a split-mode ingest or processor shows on `/ready` and `/metrics`.
trait RoleView: Send + Sync + 'static {
    fn health(&self) -> impl std::future::Future<Output = Health> + Send;
    /// Appends the role's own metric families.
    fn render(&self, out: &mut Exposition) -> impl std::future::Future<Output = ()> + Send;
    /// What `/ready` shows besides its verdict.
    fn ready_detail(&self) -> Option<serde_json::Value> {
        None
    }
}

/// An ingest instance, and the broker queue it publishes to (none for the memory queue,
/// which lives in the processor).
struct IngestRole {
    ingest: Arc<Ingest>,
    queue: Option<Arc<dyn Queue>>,
}

impl RoleView for IngestRole {
    fn health(&self) -> impl std::future::Future<Output = Health> + Send {
        Intake::health(self.ingest.as_ref())
    }

    async fn render(&self, out: &mut Exposition) {
        metrics::render_ingest(out, &self.ingest.stats());
        // Composite dual-write is counted where the publishing happens: here.
        if let Some(queue) = &self.queue {
            conveyor_api::queue_metrics::render_queue_detail(out, &queue.stats().await);
        }
    }
}

impl RoleView for WorkerPool {
    fn health(&self) -> impl std::future::Future<Output = Health> + Send {
        WorkerPool::health(self)
    }

    /// The sinks' health: shown, not part of the verdict (see [`conveyor_api::ReadyProbe`]).
    fn ready_detail(&self) -> Option<serde_json::Value> {
        Some(self.routing().ready_detail())
    }

    async fn render(&self, out: &mut Exposition) {
        let stats = self.stats().await;
        metrics::render_processor(out, &stats);
    }
}

/// A role's routes plus `/health`, `/ready` (following the role's health) and `/metrics`.
fn role_router<V: RoleView>(routes: Router, readiness: Readiness, view: Arc<V>) -> Router {
    let probed = Arc::clone(&view);
    let probe: ReadyProbe = Arc::new(move || {
        let view = Arc::clone(&probed);
        Box::pin(async move {
            view.health().await.into_result()?;
            Ok(view.ready_detail())
        })
    });
    service_router(
        routes,
        readiness,
        Some(probe),
        HttpMetrics::default(),
        move || {
            let view = Arc::clone(&view);
            async move {
                let mut out = Exposition::new();
                view.render(&mut out).await;
                metrics::render_health(&mut out, view.health().await == Health::Healthy);
                out
            }
        },
    )
}

/// One broker backend with its dead-letter queue (`None` when `dlq_capacity` is 0). A backend
/// left out of this binary's build (a cargo feature) is a configuration error naming it.
async fn open_broker(
    backend: QueueType,
    args: &QueueArgs,
    dlq_capacity: u64,
) -> Result<(Arc<dyn Queue>, Option<Arc<dyn DeadLetterQueue>>), Failure> {
    let shared = QueueSettings {
        capacity: args.queue_size,
        dedupe_window: args.queue_dedupe_window,
        dlq_capacity,
    };
    let opened = match backend {
        #[cfg(feature = "nats")]
        QueueType::Nats => args.nats.open(&shared).await.map(shared_handles),
        #[cfg(feature = "kafka")]
        QueueType::Kafka => args.kafka.open(&shared).await.map(shared_handles),
        QueueType::Memory | QueueType::Composite => Err(OpenError::Config(format!(
            "{backend:?} is not a broker backend; expected nats or kafka"
        ))),
        #[allow(unreachable_patterns, reason = "reached only without a broker feature")]
        missing => Err(OpenError::Config(format!(
            "QUEUE_TYPE / COMPOSITE_PROVIDERS {name}: this conveyor was built without the {name} \
             backend (cargo feature `{name}`; the default build includes it)",
            name = format!("{missing:?}").to_lowercase()
        ))),
    };
    // Unused only in a build without any broker, where every arm above is an error.
    let _ = shared;
    opened.map_err(|error| match error {
        OpenError::Config(message) => Failure::Config(message),
        OpenError::Unreachable(message) => Failure::Runtime(anyhow::anyhow!(message)),
    })
}

/// A backend's queue and dead-letter queue as the roles hold them.
#[cfg(any(feature = "nats", feature = "kafka"))]
fn shared_handles<Q: Queue + 'static, D: DeadLetterQueue + 'static>(
    (queue, dlq): (Q, Option<D>),
) -> (Arc<dyn Queue>, Option<Arc<dyn DeadLetterQueue>>) {
    (
        Arc::new(queue),
        dlq.map(|d| Arc::new(d) as Arc<dyn DeadLetterQueue>),
    )
}

/// The queue and dead-letter queue a role uses, from `QUEUE_TYPE`. With `dlq_capacity` 0
/// (a publisher only) the DLQ is a placeholder that is never used.
async fn open_queue(
    args: &QueueArgs,
    dlq_capacity: u64,
) -> Result<(Arc<dyn Queue>, Arc<dyn DeadLetterQueue>), Failure> {
    let unused_dlq = || Arc::new(MemoryDeadLetters::new(0)) as Arc<dyn DeadLetterQueue>;
    match args.queue_type {
        QueueType::Memory => Ok((
            Arc::new(MemoryQueue::new(MemoryQueueConfig {
                capacity: to_usize(args.queue_size),
                dedupe_window: args.queue_dedupe_window,
            })),
            Arc::new(MemoryDeadLetters::new(to_usize(dlq_capacity))),
        )),
        QueueType::Nats => {
            let (queue, dlq) = open_broker(QueueType::Nats, args, dlq_capacity).await?;
            Ok((queue, dlq.unwrap_or_else(unused_dlq)))
        }
        QueueType::Kafka => {
            let (queue, dlq) = open_broker(QueueType::Kafka, args, dlq_capacity).await?;
            Ok((queue, dlq.unwrap_or_else(unused_dlq)))
        }
        QueueType::Composite => {
            let providers = &args.composite.composite_providers;
            let mut distinct = providers.clone();
            distinct.sort();
            distinct.dedup();
            let brokers_only = providers
                .iter()
                .all(|p| matches!(p, QueueType::Nats | QueueType::Kafka));
            if providers.len() < 2 || distinct.len() != providers.len() || !brokers_only {
                return Err(Failure::Config(format!(
                    "COMPOSITE_PROVIDERS (--composite-providers) needs two different broker backends (nats, kafka), the primary first (e.g. nats,kafka); got {providers:?}"
                )));
            }
            let mut backends = Vec::with_capacity(providers.len());
            let mut primary_dlq = None;
            for (index, provider) in providers.iter().enumerate() {
                // Dead letters live with the primary, which the processors consume.
                let dlq_here = if index == 0 { dlq_capacity } else { 0 };
                let (queue, dlq) = open_broker(*provider, args, dlq_here).await?;
                if index == 0 {
                    primary_dlq = dlq;
                }
                backends.push((format!("{provider:?}").to_lowercase(), queue));
            }
            let strategy = match args.composite.composite_strategy {
                CompositeStrategy::FailFast => Strategy::FailFast,
                CompositeStrategy::BestEffort => Strategy::BestEffort,
            };
            Ok((
                Arc::new(CompositeQueue::new(backends, strategy)),
                primary_dlq.unwrap_or_else(unused_dlq),
            ))
        }
    }
}

/// With a config file: applies what it says to the pool (and ingest, in `run`) and re-reads
/// it on SIGHUP. The two roles with a worker pool share this.
fn reload_on_hangup(
    config: Option<&Config>,
    args: &ConfigArgs,
    pool: &PoolArgs,
    open: Arc<OpenSinks>,
    processor: &Arc<WorkerPool>,
    ingest: Option<&Arc<Ingest>>,
) {
    if let (Some(config), Some(path)) = (config, &args.config) {
        Reloader {
            path: path.clone(),
            flags: Flags::of(pool),
            open,
            processor: Some(Arc::clone(processor)),
            ingest: ingest.map(Arc::clone),
        }
        .start(config);
    }
}

fn load_config(path: Option<&std::path::Path>) -> Result<Option<Config>, Failure> {
    path.map(crate::pipelines::load).transpose()
}

async fn build_processor(
    queue_args: &QueueArgs,
    pool: &PoolArgs,
    config: Option<&Config>,
    open: &OpenSinks,
) -> Result<(Arc<WorkerPool>, Arc<dyn Queue>), Failure> {
    let routing = crate::pipelines::routing(config, &Flags::of(pool), open).map_err(|e| {
        if config.is_some() {
            Failure::Config(e)
        } else {
            Failure::Config(format!("CONVEYOR_SINK (--sink): {e}"))
        }
    })?;
    if pool.retry_backoff_max_ms < pool.retry_backoff_ms {
        return Err(Failure::Config(
            "CONVEYOR_RETRY_BACKOFF_MAX_MS (--retry-backoff-max-ms) must not be below CONVEYOR_RETRY_BACKOFF_MS".into(),
        ));
    }
    let (queue, dlq) = open_queue(queue_args, pool.dlq_capacity).await?;
    let processor = WorkerPool::new(
        Arc::clone(&queue),
        routing,
        dlq,
        WorkerPoolConfig {
            workers: to_usize(pool.workers),
            batch_size: to_usize(pool.batch_size),
            max_attempts: pool.max_attempts,
            backoff_initial: Duration::from_millis(pool.retry_backoff_ms),
            backoff_max: Duration::from_millis(pool.retry_backoff_max_ms),
            dedupe_window: pool.dedupe_window,
            // Retries of a sink that is down are capped at 5 s, or sooner with a lower
            // --retry-backoff-max-ms: a sink that came back sees its events within that.
            sink_backoff_max: WorkerPoolConfig::default()
                .sink_backoff_max
                .min(Duration::from_millis(pool.retry_backoff_max_ms)),
        },
    );
    processor.remember_sink().await;
    Ok((processor, queue))
}

fn to_usize(value: u64) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// The per-event limits of intake: the defaults, with what the flags set.
fn event_limits(args: &EventArgs) -> Limits {
    Limits {
        max_json_depth: to_usize(args.max_json_depth),
        ..Limits::default()
    }
}

fn http_limits(body: &BodyArgs, batch: &BatchArgs) -> HttpLimits {
    HttpLimits {
        max_body_bytes: to_usize(body.max_body_bytes),
        max_batch_events: to_usize(batch.max_batch_events),
    }
}

async fn listen(
    host: &str,
    port: u16,
    port_env: &str,
) -> Result<(TcpListener, SocketAddr), Failure> {
    bind(host, port).await.map_err(|e| {
        Failure::Config(format!(
            "cannot listen on {host}:{port} (CONVEYOR_HOST / {port_env}): {e}"
        ))
    })
}

/// The line scripts and tests wait for: the bound address, after any port-0 choice.
fn announce(role: &str, addr: SocketAddr) {
    println!("conveyor {role} listening on http://{addr}");
    tracing::info!(role, %addr, "listening");
}

fn display_url(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://127.0.0.1:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// Serves until SIGTERM/SIGINT; then readiness goes false at once (new intake gets 503), the
/// listener closes, and in-flight requests get up to `drain_timeout` to finish.
async fn serve_until_signal(
    listener: TcpListener,
    router: Router,
    readiness: Readiness,
    drain_timeout: Duration,
    draining: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Failure> {
    let (drained, on_drained) = tokio::sync::oneshot::channel::<()>();
    // The listener stays open while the role drains: a client that arrives late gets a
    // clear 503 `shutting_down` (and `/ready` 503, status and metrics answer) instead of a
    // refused connection. Only then does the server stop accepting.
    let shutdown = async move {
        shutdown::signal().await;
        tracing::info!("shutdown requested: refusing new events, finishing in-flight work");
        readiness.shut_down();
        draining.await;
        let _ = drained.send(());
    };
    let server = serve(listener, router, shutdown);
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served?,
        () = async {
            if on_drained.await.is_ok() {
                tokio::time::sleep(drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::warn!(?drain_timeout, "connections still open after the drain timeout; closing them");
        }
    }
    Ok(())
}

/// Starts the pool's workers; the returned future is what the role does between the signal
/// and closing its listener: stop publishing into the queue, then let the workers finish (see
/// `WorkerPool::drain`).
fn start_pool(
    queue: &Arc<dyn Queue>,
    processor: &Arc<WorkerPool>,
    timeout: Duration,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut workers = processor.start();
    let (queue, processor) = (Arc::clone(queue), Arc::clone(processor));
    async move {
        queue.close().await;
        drain(&processor, &mut workers, timeout).await;
    }
}

async fn drain(processor: &WorkerPool, workers: &mut tokio::task::JoinSet<()>, timeout: Duration) {
    if processor.drain(workers, timeout).await {
        let stats = processor.stats().await;
        tracing::info!(
            processed = stats.pool.processed,
            dead_lettered = stats.pool.dead_lettered,
            "drained; exiting"
        );
    }
}

//! The HTTP and gRPC edge every conveyor service shares.
//!
//! - [`HttpError`] / [`grpc_status`]: an [`ApiError`] mapped once to an HTTP response (JSON body
//!   naming the problem, `Retry-After` when retrying helps) and to a gRPC status.
//! - [`Readiness`] and [`health_routes`]: `/health` (live) and `/ready` (ready), the latter
//!   turning 503 as soon as shutdown begins.
//! - [`serve`]: runs a router until a shutdown future resolves, finishing in-flight requests.
//! - [`body`]: request bodies read with a size limit and checked content type.

pub mod body;
pub mod histogram;
pub mod metrics;
pub mod process;
pub mod profiling;
pub mod queue_metrics;
pub mod recorded;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use conveyor_core::{ApiError, ErrorCode};
use tokio::net::TcpListener;

/// How long a client told to back off should wait, in seconds.
pub const RETRY_AFTER_SECS: u32 = 1;

/// An [`ApiError`] as an HTTP response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        HttpError(error)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        recorded::error_answer(self.0.code);
        let status = http_status(self.0.code);
        let body = serde_json::json!({ "error": self.0 });
        let mut response = (status, axum::Json(body)).into_response();
        if self.0.code.is_retryable() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

pub fn http_status(code: ErrorCode) -> StatusCode {
    StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// An [`ApiError`] as a gRPC status; the conveyor code travels in the message prefix.
pub fn grpc_status(error: &ApiError) -> tonic::Status {
    recorded::error_answer(error.code);
    let code = match error.code {
        ErrorCode::InvalidJson | ErrorCode::InvalidField | ErrorCode::UnsupportedMediaType => {
            tonic::Code::InvalidArgument
        }
        ErrorCode::PayloadTooLarge | ErrorCode::BatchTooLarge => tonic::Code::InvalidArgument,
        ErrorCode::QueueFull => tonic::Code::ResourceExhausted,
        ErrorCode::Unavailable | ErrorCode::ShuttingDown => tonic::Code::Unavailable,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::Internal => tonic::Code::Internal,
    };
    let message = match &error.field {
        Some(field) => format!("{} ({field}): {}", error.code.as_str(), error.message),
        None => format!("{}: {}", error.code.as_str(), error.message),
    };
    tonic::Status::new(code, message)
}

/// The inverse of [`grpc_status`], for a client of an upstream conveyor service.
pub fn api_error_from_grpc(status: &tonic::Status) -> ApiError {
    let code = match status.code() {
        tonic::Code::InvalidArgument => ErrorCode::InvalidField,
        tonic::Code::ResourceExhausted => ErrorCode::QueueFull,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            ErrorCode::Unavailable
        }
        tonic::Code::NotFound => ErrorCode::NotFound,
        _ => ErrorCode::Internal,
    };
    // Keep the upstream's own code when it sent one (see `grpc_status`).
    let message = status.message();
    let upstream = message.split([':', ' ']).next().and_then(ErrorCode::parse);
    ApiError::new(upstream.unwrap_or(code), message.to_owned())
}

/// Whether this process takes new work. Starts ready; [`Readiness::shut_down`] is one-way.
#[derive(Clone, Default)]
pub struct Readiness {
    shutting_down: Arc<AtomicBool>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire)
    }

    pub fn shut_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// `Err(shutting_down)` once shutdown began: intake checks this before accepting.
    pub fn check(&self) -> Result<(), ApiError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(ApiError::shutting_down())
        }
    }
}

/// Asks whether what this service depends on (its queue) is usable: `Err` names why not.
pub type ReadyProbe = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// `/health` answers while the process lives. `/ready` answers 503 once shutdown began, or
/// while `probe` reports a dependency down (e.g. the broker), so a load balancer stops sending
/// work that would only get 503s.
pub fn health_routes(readiness: Readiness, probe: Option<ReadyProbe>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/ready",
            get(move || {
                let ready = readiness.is_ready();
                let probe = probe.clone();
                async move {
                    let not_ready = |reason: String| {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(
                                serde_json::json!({"status": "not_ready", "reason": reason}),
                            ),
                        )
                    };
                    if !ready {
                        return not_ready("shutting down".into());
                    }
                    if let Some(probe) = probe
                        && let Err(reason) = probe().await
                    {
                        return not_ready(reason);
                    }
                    (
                        StatusCode::OK,
                        axum::Json(serde_json::json!({"status": "ready"})),
                    )
                }
            }),
        )
}

/// Completes a service's router: adds `/health`, `/ready` (with `probe`), `/metrics` (HTTP metrics followed by
/// what `render` appends), a JSON 404 for unknown paths, and request metrics on every route.
pub fn service_router<F, Fut>(
    routes: Router,
    readiness: Readiness,
    probe: Option<ReadyProbe>,
    http_metrics: metrics::HttpMetrics,
    render: F,
) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let scrape_metrics = http_metrics.clone();
    let scrape_readiness = readiness.clone();
    let metrics_route = get(move || {
        let render = render.clone();
        let scrape_metrics = scrape_metrics.clone();
        let ready = scrape_readiness.is_ready();
        async move {
            let mut out = String::with_capacity(16384);
            scrape_metrics.render(&mut out);
            metrics::render_common(&mut out, ready);
            out.push_str(&render().await);
            ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], out)
        }
    });
    routes
        .merge(health_routes(readiness, probe))
        .merge(profiling::routes())
        .route("/metrics", metrics_route)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            http_metrics,
            metrics::HttpMetrics::layer,
        ))
}

/// Binds `host:port` (port 0 picks a free one).
pub async fn bind(host: &str, port: u16) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((host, port)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Serves `router` until `shutdown` resolves, then finishes in-flight requests and returns.
///
/// Accepted connections get TCP_NODELAY: a gRPC answer is several small writes (headers, data,
/// trailers), and with Nagle's algorithm on, the later ones wait for the client's delayed ACK,
/// up to 40 ms per call.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A 404 in the common JSON error shape, for unknown paths.
pub async fn not_found() -> HttpError {
    HttpError(ApiError::new(ErrorCode::NotFound, "no such endpoint"))
}

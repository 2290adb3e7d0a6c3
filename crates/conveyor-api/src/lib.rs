//! The HTTP and gRPC edge every conveyor service shares.
//!
//! - [`HttpError`] / [`grpc_status`]: an [`ApiError`] mapped once to an HTTP response (JSON body
//!   naming the problem, `Retry-After` when retrying helps) and to a gRPC status.
//! - [`Readiness`] and [`health_routes`]: `/health` (live) and `/ready` (ready), the latter
//!   turning 503 as soon as shutdown begins.
//! - [`grpc_health`]: the standard gRPC health service, following the same readiness as `/ready`.
//! - [`serve`]: runs a router until a shutdown future resolves, finishing in-flight requests.
//! - [`body`]: request bodies read with a size limit and checked content type.

pub mod body;
pub mod exposition;
pub mod grpc_health;
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
        ErrorCode::InvalidJson
        | ErrorCode::InvalidField
        | ErrorCode::SchemaViolation
        | ErrorCode::UnsupportedMediaType
        | ErrorCode::NestingTooDeep => tonic::Code::InvalidArgument,
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
///
/// The rule is "unknown fate → 503, never 500" (ARCHITECTURE.md): an answer the upstream gave on
/// purpose carries its conveyor code as the message prefix ([`grpc_status`]) and keeps it. A
/// status without that prefix was made by the transport (a connection that broke mid-call, a
/// deadline, an HTTP/2 reset, a process that died): the upstream may or may not have stored the
/// events, so the client hears the retryable `unavailable`, and a retry with the same id is safe.
/// Only the codes that mean "refused before anything was stored" keep a meaning of their own.
pub fn api_error_from_grpc(status: &tonic::Status) -> ApiError {
    let message = status.message();
    if let Some(upstream) = message.split([':', ' ']).next().and_then(ErrorCode::parse) {
        return ApiError::new(upstream, message.to_owned());
    }
    let code = match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorCode::InvalidField,
        tonic::Code::ResourceExhausted => ErrorCode::QueueFull,
        tonic::Code::NotFound => ErrorCode::NotFound,
        // Refused for a reason a retry cannot fix (a version or configuration mismatch between
        // conveyor services): nothing was stored, and the message says which.
        tonic::Code::Unimplemented
        | tonic::Code::FailedPrecondition
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated
        | tonic::Code::AlreadyExists => ErrorCode::Internal,
        tonic::Code::Ok
        | tonic::Code::Unknown
        | tonic::Code::Internal
        | tonic::Code::Unavailable
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Aborted
        | tonic::Code::DataLoss => ErrorCode::Unavailable,
    };
    let message = if message.is_empty() {
        format!("upstream call failed ({:?})", status.code())
    } else {
        format!("upstream call failed ({:?}): {message}", status.code())
    };
    ApiError::new(code, message)
}

/// Whether this process takes new work. Starts ready; [`Readiness::shut_down`] is one-way.
#[derive(Clone, Default)]
pub struct Readiness {
    state: Arc<ReadinessState>,
}

#[derive(Default)]
struct ReadinessState {
    shutting_down: AtomicBool,
    /// Wakes [`Readiness::until_shut_down`] when shutdown begins.
    shut_down: tokio::sync::Notify,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        !self.state.shutting_down.load(Ordering::Acquire)
    }

    pub fn shut_down(&self) {
        self.state.shutting_down.store(true, Ordering::Release);
        self.state.shut_down.notify_waiters();
    }

    /// Resolves once shutdown began (at once if it already has).
    pub async fn until_shut_down(&self) {
        let notified = self.state.shut_down.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the flag is read, so a shutdown in between is not missed.
        notified.as_mut().enable();
        if self.is_ready() {
            notified.await;
        }
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

/// Asks whether what this service depends on (its queue) is usable: `Err` names why not;
/// `Ok` may carry a detail for `/ready`'s answer (e.g. the sinks' health, which does not decide
/// readiness: a sink that is down backs the queue up, and the queue's bound answers for it).
pub type ReadyProbe = Arc<
    dyn Fn() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Option<serde_json::Value>, String>> + Send>,
        > + Send
        + Sync,
>;

/// Whether this process should get new work, as `/ready` and the gRPC health service answer:
/// not once shutdown began, nor while `probe` reports a dependency down (`Err` names why).
pub async fn ready(
    readiness: &Readiness,
    probe: Option<&ReadyProbe>,
) -> Result<Option<serde_json::Value>, String> {
    if !readiness.is_ready() {
        return Err("shutting down".into());
    }
    match probe {
        Some(probe) => probe().await,
        None => Ok(None),
    }
}

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
                let readiness = readiness.clone();
                let probe = probe.clone();
                async move {
                    match ready(&readiness, probe.as_ref()).await {
                        Ok(detail) => {
                            let mut body = serde_json::json!({"status": "ready"});
                            if let (Some(body), Some(serde_json::Value::Object(detail))) =
                                (body.as_object_mut(), detail)
                            {
                                body.extend(detail);
                            }
                            (StatusCode::OK, axum::Json(body))
                        }
                        Err(reason) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(
                                serde_json::json!({"status": "not_ready", "reason": reason}),
                            ),
                        ),
                    }
                }
            }),
        )
}

/// Completes a service's router: adds `/health`, `/ready` (with `probe`), `/metrics` (HTTP metrics followed by
/// the families `render` gives and those the crates at work here registered
/// ([`exposition::register`]), as Prometheus text, or OpenMetrics when the scraper's `Accept`
/// asks for it), a JSON 404 for unknown paths, and request metrics on every route.
pub fn service_router<F, Fut>(
    routes: Router,
    readiness: Readiness,
    probe: Option<ReadyProbe>,
    http_metrics: metrics::HttpMetrics,
    render: F,
) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = exposition::Exposition> + Send + 'static,
{
    let scrape_metrics = http_metrics.clone();
    let scrape_readiness = readiness.clone();
    let metrics_route = get(move |headers: axum::http::HeaderMap| {
        let render = render.clone();
        let scrape_metrics = scrape_metrics.clone();
        let ready = scrape_readiness.is_ready();
        async move {
            let format = exposition::Format::from_accept(
                headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
            );
            // `/proc` reads are file I/O: off the async runtime.
            let process = tokio::task::spawn_blocking(process::read)
                .await
                .ok()
                .flatten();
            let mut out = exposition::Exposition::new();
            scrape_metrics.render(&mut out);
            metrics::render_common(&mut out, ready, process.as_ref());
            out.append(render().await);
            exposition::collect_registered(&mut out);
            (
                [(header::CONTENT_TYPE, format.content_type())],
                out.encode(format),
            )
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every gRPC code, as the transport would make it (no conveyor prefix): the fate of the
    /// call is unknown unless the code says the upstream refused it, and then never a 500
    /// unless the refusal is a configuration mismatch a retry cannot fix.
    #[test]
    fn transport_statuses_map_to_503_unless_the_upstream_refused() {
        use tonic::Code::*;
        let table = [
            (Ok, 503),
            (Cancelled, 503),
            (Unknown, 503),
            (InvalidArgument, 422),
            (DeadlineExceeded, 503),
            (NotFound, 404),
            (AlreadyExists, 500),
            (PermissionDenied, 500),
            (ResourceExhausted, 429),
            (FailedPrecondition, 500),
            (Aborted, 503),
            (OutOfRange, 422),
            (Unimplemented, 500),
            (Internal, 503),
            (Unavailable, 503),
            (DataLoss, 503),
            (Unauthenticated, 500),
        ];
        assert_eq!(table.len(), 17, "every tonic::Code is in the table");
        for (code, want) in table {
            let error = api_error_from_grpc(&tonic::Status::new(code, "transport error"));
            assert_eq!(
                error.code.http_status(),
                want,
                "{code:?} without a conveyor prefix answered {:?}",
                error.code
            );
            assert!(
                error.message.contains("transport error"),
                "the message keeps the cause: {}",
                error.message
            );
        }
    }

    /// The defect seen in split mode: an ingest dying mid-call ends the call with `Unknown`
    /// and "transport error"; that answer was a 500.
    #[test]
    fn a_broken_connection_is_retryable_503_with_retry_after() {
        let error = api_error_from_grpc(&tonic::Status::unknown("transport error"));
        assert_eq!(error.code, ErrorCode::Unavailable);
        let response = HttpError(error).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key(header::RETRY_AFTER));
    }

    /// Every conveyor code survives the round trip through a gRPC status, whatever gRPC code
    /// carries it: a deliberate `internal` (a bug upstream) stays a 500.
    #[test]
    fn a_conveyor_code_survives_the_grpc_hop() {
        for code in ErrorCode::ALL {
            let sent = ApiError::new(code, "why");
            let received = api_error_from_grpc(&grpc_status(&sent));
            assert_eq!(
                received.code, code,
                "{code:?} came back as {:?}",
                received.code
            );
        }
    }
}

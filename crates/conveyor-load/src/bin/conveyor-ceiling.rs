//! `conveyor-ceiling`: the bare minimum a conveyor could do per request, to measure it against.
//!
//! A plain axum server that parses the same bodies with the same code
//! (`conveyor_core::body::parse_event` / `parse_batch`), gives each event a UUIDv7 and answers
//! as conveyor does (`202 {"messageId":…,"status":"accepted"}`, the batch answer), with no
//! queue and no processing. `GET /api/v1/status` reports every accepted event as processed at
//! once, so `conveyor load` runs against it unchanged.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use conveyor_api::HttpError;
use conveyor_core::{ApiError, body};
use conveyor_ingest::http::{accepted_response, batch_response};

#[derive(Debug, Parser)]
#[command(
    name = "conveyor-ceiling",
    about = "A bare axum server that parses conveyor's ingest bodies and answers 202 at once: \
             the ceiling conveyor is measured against."
)]
struct Args {
    /// Port to listen on (0 picks a free one).
    #[arg(long, env = "CONVEYOR_CEILING_PORT", default_value_t = 8090)]
    port: u16,
    /// Address to listen on.
    #[arg(long, env = "CONVEYOR_CEILING_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Largest request body in bytes.
    #[arg(long, env = "CONVEYOR_CEILING_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Most events in one batch request.
    #[arg(
        long,
        env = "CONVEYOR_CEILING_MAX_BATCH_EVENTS",
        default_value_t = 10_000
    )]
    max_batch_events: usize,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    rejected: AtomicU64,
}

#[derive(Clone)]
struct Ceiling {
    counters: Arc<Counters>,
    max_batch_events: usize,
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

async fn ingest(State(ceiling): State<Ceiling>, headers: HeaderMap, body: Bytes) -> Response {
    let key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok());
    match body::parse_event(&body, key) {
        Ok(draft) => {
            ceiling.counters.accepted.fetch_add(1, Ordering::Relaxed);
            accepted_response(&draft.id.unwrap_or_else(new_id))
        }
        Err(error) => {
            ceiling.counters.rejected.fetch_add(1, Ordering::Relaxed);
            HttpError(error).into_response()
        }
    }
}

/// Parses like conveyor and answers with conveyor's own batch answer, minus the queue.
async fn ingest_batch(State(ceiling): State<Ceiling>, headers: HeaderMap, body: Bytes) -> Response {
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|ct| ct.trim().starts_with("application/x-ndjson"));
    let parsed = match body::parse_batch(&body, ndjson, ceiling.max_batch_events) {
        Ok(parsed) => parsed,
        Err(error) => return HttpError(error).into_response(),
    };
    let results: Vec<Result<String, ApiError>> = parsed
        .into_iter()
        .map(|item| item.map(|draft| draft.id.unwrap_or_else(new_id)))
        .collect();
    let accepted = results.iter().filter(|r| r.is_ok()).count() as u64;
    let rejected = results.len() as u64 - accepted;
    ceiling
        .counters
        .accepted
        .fetch_add(accepted, Ordering::Relaxed);
    ceiling
        .counters
        .rejected
        .fetch_add(rejected, Ordering::Relaxed);
    batch_response(results)
}

async fn status(State(ceiling): State<Ceiling>) -> Response {
    let accepted = ceiling.counters.accepted.load(Ordering::Relaxed);
    let rejected = ceiling.counters.rejected.load(Ordering::Relaxed);
    axum::Json(serde_json::json!({
        "status": "ok",
        "totals": {
            "accepted": accepted,
            "processed": accepted,
            "failed": 0,
            "retried": 0,
            "dead_lettered": 0,
            "duplicates": 0,
            "rejected": rejected,
            "pending": 0,
        }
    }))
    .into_response()
}

fn router(ceiling: Ceiling, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/api/v1/ingest", post(ingest))
        .route("/api/v1/ingest/batch", post(ingest_batch))
        .route("/api/v1/status", get(status))
        .route("/health", get(|| async { "ok" }))
        // The HTTP sink's bare receiver for `make bench-e2e`: reads the body, answers 200.
        .route("/receive", post(|_body: Bytes| async { "" }))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(ceiling)
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "error: cannot listen on {}:{} (--host/--port): {error}",
                args.host, args.port
            );
            return ExitCode::from(64);
        }
    };
    let addr: SocketAddr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(error) => {
            eprintln!("error: cannot read the bound address: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!("conveyor-ceiling listening on http://{addr}");
    let ceiling = Ceiling {
        counters: Arc::default(),
        max_batch_events: args.max_batch_events,
    };
    // TCP_NODELAY, as conveyor's own services set it: a fair ceiling is a tuned one.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream| {
        let _ = stream.set_nodelay(true);
    });
    match axum::serve(listener, router(ceiling, args.max_body_bytes))
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: serving failed: {error}");
            ExitCode::FAILURE
        }
    }
}

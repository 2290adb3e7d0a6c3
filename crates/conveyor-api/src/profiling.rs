//! On-demand CPU profiles: `GET /debug/pprof/profile?seconds=N` samples every thread of the
//! process with SIGPROF for N seconds (default 10, at most 120) at 99 Hz and answers a
//! flamegraph SVG. Off unless the process was started with `--profiling`
//! (`CONVEYOR_PROFILING=true`): then the path answers 404 like any unknown one. One profile at a
//! time; a second request meanwhile gets 409.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Query;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

static ENABLED: AtomicBool = AtomicBool::new(false);
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Sampling frequency in Hz (not a multiple of common timer rates, to avoid lockstep).
const FREQUENCY: i32 = 99;
const DEFAULT_SECONDS: u64 = 10;
const MAX_SECONDS: u64 = 120;

/// Turns the profile endpoint on for this process.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

#[derive(Deserialize)]
struct ProfileQuery {
    seconds: Option<u64>,
}

/// `/debug/pprof/profile`; 404 unless [`enable`]d.
pub fn routes() -> Router {
    Router::new().route("/debug/pprof/profile", get(profile))
}

fn text(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

async fn profile(Query(query): Query<ProfileQuery>) -> Response {
    if !enabled() {
        return crate::not_found().await.into_response();
    }
    let seconds = query
        .seconds
        .unwrap_or(DEFAULT_SECONDS)
        .clamp(1, MAX_SECONDS);
    if RUNNING.swap(true, Ordering::AcqRel) {
        return text(
            StatusCode::CONFLICT,
            "a profile is already being taken; try again when it is done\n".into(),
        );
    }
    // The profiler guard is not Send: sample and render on a blocking thread.
    let result =
        tokio::task::spawn_blocking(move || flamegraph(Duration::from_secs(seconds))).await;
    RUNNING.store(false, Ordering::Release);
    match result {
        Ok(Ok(svg)) => (
            [
                (header::CONTENT_TYPE, "image/svg+xml"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            svg,
        )
            .into_response(),
        Ok(Err(message)) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{message}\n")),
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the profiling task failed: {error}\n"),
        ),
    }
}

fn flamegraph(duration: Duration) -> Result<Vec<u8>, String> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()
        .map_err(|e| format!("cannot start the profiler: {e}"))?;
    #[expect(
        clippy::disallowed_methods,
        reason = "the profile is taken on the blocking pool (spawn_blocking), not on the runtime"
    )]
    std::thread::sleep(duration);
    let report = guard
        .report()
        .build()
        .map_err(|e| format!("cannot build the profile: {e}"))?;
    let samples: isize = report.data.values().sum();
    if samples == 0 {
        return Err(format!(
            "no CPU samples in {duration:?}: the process was idle, or SIGPROF is not delivered here"
        ));
    }
    let mut svg = Vec::new();
    report
        .flamegraph(&mut svg)
        .map_err(|e| format!("cannot draw the flamegraph: {e}"))?;
    tracing::info!(samples, ?duration, "CPU profile taken");
    Ok(svg)
}

//! The standard gRPC health service, `grpc.health.v1.Health` (tonic-health): what Kubernetes
//! gRPC probes, load balancers and gRPC clients' own health checking call.
//!
//! It answers for the whole server (`""`) and for each named service, and follows the same
//! readiness as `/ready` ([`ready`]): SERVING while this process takes new work, NOT_SERVING
//! while a dependency is down (the probe) and from the moment shutdown begins. A small task asks
//! every [`PROBE_INTERVAL`] and at shutdown, and changes the status only on a transition, so
//! `Watch` streams see one message per change. At shutdown it reports NOT_SERVING, then ends
//! every `Watch` stream (an endless stream would otherwise hold the drain open until its
//! timeout) and stops.

use std::time::Duration;

use futures_util::FutureExt;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::{Readiness, ReadyProbe, ready};

/// How often the health service asks the probe again; answers are at most this old.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// A probe that has not answered within this counts as not ready (Kubernetes' default gRPC
/// probe timeout is 1 s as well).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The health service for the server (`""`) and `services` (fully-qualified gRPC service
/// names), NOT_SERVING until the first probe (at once) answered. Spawns its reporting task:
/// call it on the Tokio runtime.
pub fn health_service(
    readiness: Readiness,
    probe: Option<ReadyProbe>,
    services: &[&str],
) -> HealthServer<HealthService> {
    HealthServer::new(reporting(readiness, probe, services, PROBE_INTERVAL))
}

/// [`health_service`] before it is wrapped for tonic, asking every `interval`.
fn reporting(
    readiness: Readiness,
    probe: Option<ReadyProbe>,
    services: &[&str],
    interval: Duration,
) -> HealthService {
    let reporter = HealthReporter::new();
    let service = HealthService::from_health_reporter(reporter.clone());
    let names: Vec<String> = std::iter::once("")
        .chain(services.iter().copied())
        .map(str::to_owned)
        .collect();
    for name in &names {
        // The reporter's lock is new and nobody else holds it: this completes at once. Were it
        // ever to wait, the task's first round sets the same status a moment later.
        let _ = reporter
            .set_service_status(name, ServingStatus::NotServing)
            .now_or_never();
    }
    tokio::spawn(report(reporter, names, readiness, probe, interval));
    service
}

/// Keeps the statuses of `names` following [`ready`] until shutdown.
async fn report(
    mut reporter: HealthReporter,
    names: Vec<String>,
    readiness: Readiness,
    probe: Option<ReadyProbe>,
    interval: Duration,
) {
    let mut serving = false;
    let mut rounds = tokio::time::interval(interval);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = rounds.tick() => {}
            () = readiness.until_shut_down() => {}
        }
        let answer = tokio::time::timeout(PROBE_TIMEOUT, ready(&readiness, probe.as_ref()))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "readiness probe took longer than {PROBE_TIMEOUT:?}"
                ))
            });
        if answer.is_ok() != serving {
            serving = answer.is_ok();
            let status = if serving {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for name in &names {
                reporter.set_service_status(name, status).await;
            }
            match answer {
                Ok(_) => tracing::info!("gRPC health: SERVING"),
                Err(reason) => tracing::info!(%reason, "gRPC health: NOT_SERVING"),
            }
        }
        if !readiness.is_ready() {
            // Watchers that have not seen NOT_SERVING yet still get it before their stream ends.
            for name in &names {
                reporter.clear_service_status(name).await;
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use futures_util::StreamExt;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::{HealthCheckRequest, health_check_response};

    use super::*;

    const SERVICE: &str = "conveyor.v1.IngestService";
    const SERVING: i32 = health_check_response::ServingStatus::Serving as i32;
    const NOT_SERVING: i32 = health_check_response::ServingStatus::NotServing as i32;

    fn request(service: &str) -> tonic::Request<HealthCheckRequest> {
        tonic::Request::new(HealthCheckRequest {
            service: service.to_owned(),
        })
    }

    /// A probe that answers what `up` says.
    fn switch(up: &Arc<AtomicBool>) -> ReadyProbe {
        let up = Arc::clone(up);
        Arc::new(move || {
            let up = up.load(Ordering::Acquire);
            Box::pin(async move {
                if up {
                    Ok(None)
                } else {
                    Err("queue down".to_owned())
                }
            })
        })
    }

    async fn check(service: &HealthService, name: &str) -> Result<i32, tonic::Code> {
        service
            .check(request(name))
            .await
            .map(|answer| answer.into_inner().status)
            .map_err(|status| status.code())
    }

    type Watch = <HealthService as Health>::WatchStream;

    async fn watch(service: &HealthService) -> Watch {
        service
            .watch(request(SERVICE))
            .await
            .expect("watch a registered service")
            .into_inner()
    }

    /// The next status a watch sends, within `within`.
    async fn next(watch: &mut Watch, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, watch.next())
            .await
            .expect("a watch message in time")
            .map(|answer| answer.expect("a status").status)
    }

    #[tokio::test]
    async fn statuses_start_not_serving_and_follow_the_probe() {
        let up = Arc::new(AtomicBool::new(true));
        let service = reporting(
            Readiness::default(),
            Some(switch(&up)),
            &[SERVICE],
            Duration::from_millis(20),
        );
        // Before the first round (the task has not run on this single-threaded runtime).
        assert_eq!(check(&service, "").await, Ok(NOT_SERVING));
        assert_eq!(check(&service, SERVICE).await, Ok(NOT_SERVING));
        assert_eq!(
            check(&service, "no.such.Service").await,
            Err(tonic::Code::NotFound)
        );
        let mut watch = watch(&service).await;
        let second = Duration::from_secs(1);
        assert_eq!(next(&mut watch, second).await, Some(NOT_SERVING));
        for (probe, want) in [(true, SERVING), (false, NOT_SERVING), (true, SERVING)] {
            up.store(probe, Ordering::Release);
            assert_eq!(
                next(&mut watch, second).await,
                Some(want),
                "probe up: {probe}"
            );
            // "" is set before the named services: a watcher of one sees both changed.
            assert_eq!(check(&service, "").await, Ok(want));
            assert_eq!(check(&service, SERVICE).await, Ok(want));
        }
    }

    #[tokio::test]
    async fn shutdown_is_reported_at_once_and_ends_the_watches() {
        let readiness = Readiness::default();
        // Rounds far apart: only the shutdown notification can make the change in time.
        let service = reporting(
            readiness.clone(),
            None,
            &[SERVICE],
            Duration::from_secs(600),
        );
        let mut watch = watch(&service).await;
        let second = Duration::from_secs(1);
        assert_eq!(next(&mut watch, second).await, Some(NOT_SERVING));
        assert_eq!(next(&mut watch, second).await, Some(SERVING));
        readiness.shut_down();
        assert_eq!(next(&mut watch, second).await, Some(NOT_SERVING));
        assert_eq!(next(&mut watch, second).await, None, "the watch ends");
    }
}

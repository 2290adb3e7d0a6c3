//! Split mode: gateway → ingest → processor as three processes, the same traffic mix and the
//! same guarantees as `conveyor run`.

use std::time::Duration;

use crate::harness::{assert_all_delivered, eventually, send_mixed_traffic, spawn_split};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_delivers_every_accepted_event_exactly_once() {
    let split = spawn_split(&[]).await;
    let gateway = &split.gateway;

    // The gateway sees both instances, healthy, at the URLs it was given.
    eventually(
        "GET /api/v1/status to list healthy ingest and processor instances",
        Duration::from_secs(15),
        async || {
            let status = gateway.status().await;
            let instances = status["instances"].as_array().cloned().unwrap_or_default();
            for (role, url) in [
                ("ingest", split.ingest.base_url()),
                ("processor", split.processor.base_url()),
            ] {
                let found = instances.iter().find(|i| i["role"] == role);
                match found {
                    Some(i) if i["healthy"] == true => {
                        let listed = i["url"].as_str().unwrap_or("").trim_end_matches('/');
                        if listed != url {
                            return Err(format!("{role} listed at {listed:?}, started at {url}"));
                        }
                    }
                    _ => return Err(format!("no healthy {role} instance in {status}")),
                }
            }
            if status["status"] != "ok" {
                return Err(format!("status is not \"ok\": {status}"));
            }
            Ok(())
        },
    )
    .await;

    let ledger = send_mixed_traffic(gateway, "split").await;
    assert!(ledger.len() >= 10_000, "sent {} events", ledger.len());
    assert_all_delivered(gateway, &split.processor, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_is_not_ready_while_no_ingest_is_reachable() {
    let mut split = spawn_split(&[]).await;
    let (ready, body) = split.gateway.get_json("/ready").await;
    assert_eq!(ready, 200, "ready with its ingest up: {body}");

    split.ingest.sigkill();
    let _ = split.ingest.wait_exit(Duration::from_secs(10)).await;
    let body = eventually(
        "the gateway's /ready to turn 503 with its only ingest gone",
        Duration::from_secs(15),
        async || {
            let (code, body) = split.gateway.get_json("/ready").await;
            if code == 503 {
                Ok(body)
            } else {
                Err(format!("{code}: {body}"))
            }
        },
    )
    .await;
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ingest")),
        "the reason names the missing ingest: {body}"
    );
    // Liveness is another matter: the gateway process itself is fine.
    let (live, _) = split.gateway.get_json("/health").await;
    assert_eq!(live, 200);
}

//! The stages and the traffic the observability tests send.

use serde_json::json;

use crate::harness::Conveyor;

/// Stages used by these tests: a JSON check, and a rule that makes poison events fail.
pub const STAGES: &[&str] = &[
    "--stage",
    "json",
    "--stage",
    "fail-if:poison=yes",
    "--max-attempts",
    "2",
    "--retry-backoff-ms",
    "10",
];

/// Sends 50 single events, a 100-line NDJSON batch, one poison event (dead-lettered after two
/// attempts) and one malformed body; returns how many events were accepted.
pub async fn send_traffic(front: &Conveyor, prefix: &str) -> u64 {
    let http = front.http();
    for i in 0..50 {
        let body = json!({"source": "obs", "data": {"i": i}, "id": format!("{prefix}-one-{i}")});
        let resp = http
            .post(front.url("/api/v1/ingest"))
            .json(&body)
            .send()
            .await
            .expect("POST /api/v1/ingest");
        assert_eq!(resp.status().as_u16(), 202, "single event {i}");
    }
    let ndjson: String = (0..100)
        .map(|i| {
            format!("{{\"source\":\"obs\",\"data\":{{\"b\":{i}}},\"id\":\"{prefix}-batch-{i}\"}}\n")
        })
        .collect();
    let resp = http
        .post(front.url("/api/v1/ingest/batch"))
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await
        .expect("POST /api/v1/ingest/batch");
    assert_eq!(resp.status().as_u16(), 202, "batch");
    let poison = json!({"source": "obs", "data": 1, "id": format!("{prefix}-poison"), "metadata": {"poison": "yes"}});
    let resp = http
        .post(front.url("/api/v1/ingest"))
        .json(&poison)
        .send()
        .await
        .expect("POST poison");
    assert_eq!(resp.status().as_u16(), 202, "poison event is accepted");
    let resp = http
        .post(front.url("/api/v1/ingest"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("POST bad body");
    assert_eq!(resp.status().as_u16(), 400, "malformed body");
    151
}

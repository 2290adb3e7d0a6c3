//! CPU profiles: off by default, a flamegraph SVG when enabled.

use std::time::Duration;

use super::paths::artifacts_dir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiling_is_404_by_default_and_answers_a_flamegraph_svg_when_enabled() {
    let off = crate::harness::Spawn::new("run")
        .env("CONVEYOR_PROFILING", "false")
        .start()
        .await;
    let (code, body) = off.get_raw("/debug/pprof/profile?seconds=1").await;
    assert_eq!(code, 404, "profiling must be off by default: {body}");
    assert!(body.contains("not_found"), "{body}");
    drop(off);

    let on = crate::harness::Spawn::new("run")
        .args(["--profiling", "--stage", "cpu:200"])
        .start()
        .await;
    // Keep the process busy while it samples itself.
    let busy = {
        let http = on.http().clone();
        let url = on.url("/api/v1/ingest/batch");
        tokio::spawn(async move {
            let body: String = (0..200)
                .map(|i| {
                    format!(
                        "{{\"source\":\"prof\",\"data\":{{\"i\":{i},\"pad\":\"{}\"}}}}\n",
                        "x".repeat(512)
                    )
                })
                .collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
            while tokio::time::Instant::now() < deadline {
                let _ = http
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await;
            }
        })
    };
    let resp = on
        .http()
        .get(on.url("/debug/pprof/profile?seconds=2"))
        .send()
        .await
        .expect("GET /debug/pprof/profile");
    let code = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let svg = resp.text().await.expect("profile body");
    busy.abort();
    assert_eq!(code, 200, "profile answer: {svg:.500}");
    assert_eq!(content_type, "image/svg+xml");
    assert!(svg.contains("<svg") && svg.contains("</svg>"), "{svg:.300}");
    // The flamegraph names our own code: the CPU stage and the runtime it runs on.
    assert!(
        svg.contains("conveyor") && svg.contains("tokio"),
        "the flamegraph holds no conveyor/tokio frames: {svg:.2000}"
    );
    std::fs::write(artifacts_dir().join("profile.svg"), &svg).expect("save the flamegraph");
}

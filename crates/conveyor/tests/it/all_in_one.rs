//! `conveyor run`: the full traffic mix through one process, every accepted event delivered
//! exactly once and as sent.

use std::time::Duration;

use conveyor_proto::v1::IngestRequest;
use serde_json::Value;

use crate::harness::{
    Expected, Spawn, assert_all_delivered, assert_sink_exact, eventually, ingest_one, sample_event,
    send_mixed_traffic, spawn_run,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_event_reaches_the_sink_exactly_once_as_sent() {
    let conveyor = spawn_run(&[]).await;
    let ledger = send_mixed_traffic(&conveyor, "aio").await;
    assert!(ledger.len() >= 10_000, "sent {} events", ledger.len());
    assert_all_delivered(&conveyor, &conveyor, &ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_answer_and_non_utf8_payloads_come_back_as_data_base64() {
    let conveyor = spawn_run(&[]).await;
    for path in ["/health", "/ready"] {
        let (code, text) = conveyor.get_raw(path).await;
        assert_eq!(code, 200, "GET {path}: {text}");
    }
    let (code, metrics) = conveyor.get_raw("/metrics").await;
    assert_eq!(code, 200, "GET /metrics");
    assert!(
        metrics.contains("# TYPE"),
        "/metrics is not Prometheus text: {metrics:.400}"
    );

    // Opaque bytes that are not UTF-8 cannot be a JSON string: the sink writes data_base64.
    let mut client = conveyor.grpc().await;
    let mut sent = Vec::new();
    for i in 0..3u8 {
        let payload = vec![0xff, 0x00, 0xfe, i, b'a', 0x80];
        let response = client
            .ingest(IngestRequest {
                source: "binary".to_owned(),
                payload: payload.clone().into(),
                content_type: "application/octet-stream".to_owned(),
                ..Default::default()
            })
            .await
            .expect("Ingest of opaque bytes")
            .into_inner();
        sent.push((response.message_id, payload));
    }
    let ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    let records = conveyor.wait_sink_ids(&ids, Duration::from_secs(20)).await;
    for (id, payload) in &sent {
        let record = records
            .iter()
            .find(|r| r["id"] == id.as_str())
            .expect("waited for it");
        assert!(
            record.get("data").is_none_or(Value::is_null),
            "a non-UTF-8 payload has no `data`: {record}"
        );
        let encoded = record["data_base64"]
            .as_str()
            .unwrap_or_else(|| panic!("no data_base64 string: {record}"));
        assert_eq!(
            &decode_base64(encoded),
            payload,
            "data_base64 of {id}: {record}"
        );
    }
}

/// Decodes standard or URL-safe base64, padded or not.
fn decode_base64(text: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.trim_end_matches('=').bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            other => panic!("not base64: {:?} in {text:?}", other as char),
        };
        bits = (bits << 6) | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    out
}

/// `--sink stdout`: every accepted event is one JSON line on stdout, exactly once, next to the
/// process's own start-up lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stdout_sink_prints_every_event_once_as_a_json_line() {
    let conveyor = Spawn::new("run").sink_spec("stdout").start().await;
    let mut sent = Vec::new();
    for i in 0..200 {
        let sample = sample_event("stdout", "sink", i, i % 2 == 0);
        sent.push((ingest_one(&conveyor, &sample).await, sample.sent));
    }
    conveyor
        .wait_until_processed(200, Duration::from_secs(30))
        .await;
    let records = eventually(
        "200 JSON lines on stdout",
        Duration::from_secs(10),
        async || {
            let records: Vec<Value> = conveyor
                .stdout_text()
                .lines()
                .filter_map(|line| serde_json::from_str::<Value>(line).ok())
                .filter(|record| record.get("id").is_some())
                .collect();
            if records.len() >= 200 {
                Ok(records)
            } else {
                Err(format!("{} so far", records.len()))
            }
        },
    )
    .await;
    let expected: Expected = sent.into_iter().collect();
    assert_sink_exact(&records, &expected);
}

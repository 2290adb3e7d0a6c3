//! Bad input gets a clear error, changes nothing, and the process keeps serving
//! (docs/INTERFACE.md "Errors"; ARCHITECTURE.md "Invariants": one error vocabulary).

use std::collections::BTreeMap;
use std::time::Duration;

use conveyor_proto::v1::{IngestRequest, PublishRequest};
use serde_json::{Value, json};

use crate::harness::{
    Conveyor, Expected, accepted_id, assert_error, raw_chunked_post, read_json, sample_event,
    spawn_run, spawn_split, total,
};

const LIMITS: &[&str] = &["--max-body-bytes", "4096", "--max-batch-events", "10"];

async fn post_bytes(
    conveyor: &Conveyor,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let resp = conveyor
        .http()
        .post(conveyor.url(path))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    read_json(resp).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_event_errors_name_the_problem_and_store_nothing() {
    let conveyor = spawn_run(LIMITS).await;
    let ingest = "/api/v1/ingest";
    let json_type = "application/json";

    let (code, body) = post_bytes(&conveyor, ingest, json_type, r#"{"source":"#).await;
    assert_error("malformed JSON", code, &body, 400, "invalid_json", None);

    let (code, body) = post_bytes(
        &conveyor,
        ingest,
        "text/plain",
        r#"{"source":"s","data":1}"#,
    )
    .await;
    assert_error(
        "text/plain body",
        code,
        &body,
        415,
        "unsupported_media_type",
        None,
    );

    let big = json!({"source": "s", "data": "x".repeat(100 * 1024)}).to_string();
    let (code, body) = post_bytes(&conveyor, ingest, json_type, big.clone()).await;
    assert_error(
        "100 KB body over --max-body-bytes 4096",
        code,
        &body,
        413,
        "payload_too_large",
        None,
    );

    let (code, text) = raw_chunked_post(
        conveyor.base_url(),
        ingest,
        json_type,
        big.as_bytes(),
        8 * 1024,
    )
    .await;
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!("chunked 100 KB body: {code} answer is not JSON ({e}): {text:?}")
    });
    assert_error(
        "chunked 100 KB body without content-length",
        code,
        &body,
        413,
        "payload_too_large",
        None,
    );

    let cases: &[(&str, Value, Option<&str>)] = &[
        ("missing source", json!({"data": 1}), Some("source")),
        (
            "empty source",
            json!({"source": "", "data": 1}),
            Some("source"),
        ),
        ("missing data", json!({"source": "s"}), Some("data")),
        (
            "source of the wrong type",
            json!({"source": 5, "data": 1}),
            Some("source"),
        ),
        (
            "metadata with a non-string value",
            json!({"source": "s", "data": 1, "metadata": {"k": 1}}),
            Some("metadata"),
        ),
        (
            "unknown field",
            json!({"source": "s", "data": 1, "sorce": "x"}),
            None,
        ),
    ];
    for (what, request, field) in cases {
        let (code, body) = conveyor.post_json(ingest, request).await;
        let message = assert_error(what, code, &body, 422, "invalid_field", *field);
        if *what == "unknown field" {
            assert!(
                message.contains("sorce"),
                "{what}: the message should name the field: {body}"
            );
        }
    }

    conveyor.assert_still_serving(Expected::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_errors_are_per_line_and_good_lines_are_kept() {
    let conveyor = spawn_run(LIMITS).await;
    let batch = "/api/v1/ingest/batch";
    let mut ledger = Expected::new();

    // More events than --max-batch-events: refused as a whole.
    let eleven: Vec<Value> = (0..11)
        .map(|i| sample_event("too-many", "bad", i, true).body)
        .collect();
    let (code, body) = conveyor.post_json(batch, &json!(eleven)).await;
    assert_error(
        "batch of 11 with --max-batch-events 10",
        code,
        &body,
        413,
        "batch_too_large",
        None,
    );

    // NDJSON: lines 1 and 3 are bad, 0, 2 and 4 good.
    let good: Vec<_> = [0, 2, 4]
        .iter()
        .map(|&i| sample_event("ndjson-good", "bad", i, i != 2))
        .collect();
    let lines = [
        good[0].body.to_string(),
        "{oops".to_owned(),
        good[1].body.to_string(),
        r#"{"source":"s"}"#.to_owned(),
        good[2].body.to_string(),
    ];
    let (code, body) = post_bytes(
        &conveyor,
        batch,
        "application/x-ndjson",
        lines.join("\n") + "\n",
    )
    .await;
    assert_eq!(code, 207, "NDJSON batch with 2 bad lines of 5: {body}");
    assert_eq!(body["accepted"].as_u64(), Some(3), "accepted: {body}");
    assert_eq!(body["rejected"].as_u64(), Some(2), "rejected: {body}");
    let results = body["results"].as_array().expect("results array");
    assert_eq!(results.len(), 5, "one result per line: {body}");
    for (i, result) in results.iter().enumerate() {
        assert_eq!(
            result["index"].as_u64(),
            Some(i as u64),
            "result order: {body}"
        );
    }
    assert_eq!(
        results[1]["error"]["code"], "invalid_json",
        "line 1: {body}"
    );
    assert_eq!(
        results[3]["error"]["code"], "invalid_field",
        "line 3: {body}"
    );
    assert_eq!(results[3]["error"]["field"], "data", "line 3: {body}");
    for (sample, result) in good.iter().zip([&results[0], &results[2], &results[4]]) {
        assert!(
            result.get("error").is_none_or(Value::is_null),
            "good line refused: {body}"
        );
        let id = result["messageId"]
            .as_str()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| panic!("good line without messageId: {body}"));
        if let Some(client_id) = &sample.id {
            assert_eq!(id, client_id, "good line's id: {body}");
        }
        ledger.insert(id.to_owned(), sample.sent.clone());
    }

    // JSON array: the middle element is bad.
    let array_good: Vec<_> = [0, 2]
        .iter()
        .map(|&i| sample_event("array-good", "bad", i, true))
        .collect();
    let array = json!([array_good[0].body, {"source": 5, "data": 1}, array_good[1].body]);
    let (code, body) = conveyor.post_json(batch, &array).await;
    assert_eq!(
        code, 207,
        "JSON array batch with 1 bad element of 3: {body}"
    );
    assert_eq!(body["accepted"].as_u64(), Some(2), "accepted: {body}");
    assert_eq!(body["rejected"].as_u64(), Some(1), "rejected: {body}");
    assert_eq!(
        body["results"][1]["error"]["code"], "invalid_field",
        "{body}"
    );
    assert_eq!(body["results"][1]["error"]["field"], "source", "{body}");
    for (sample, position) in array_good.iter().zip([0, 2]) {
        assert_eq!(
            body["results"][position]["messageId"].as_str(),
            sample.id.as_deref(),
            "{body}"
        );
        ledger.insert(sample.id.clone().expect("has id"), sample.sent.clone());
    }

    conveyor.assert_still_serving(ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bad_events_are_refused_one_by_one() {
    let conveyor = spawn_run(LIMITS).await;
    let mut client = conveyor.grpc().await;
    let mut ledger = Expected::new();

    let empty_source = IngestRequest {
        source: String::new(),
        payload: b"{\"a\":1}".to_vec().into(),
        content_type: "application/json".to_owned(),
        ..Default::default()
    };
    let status = client
        .ingest(empty_source)
        .await
        .expect_err("an empty source is refused");
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "Ingest with an empty source: {status:?}"
    );
    assert!(
        status.message().contains("source"),
        "the message should name the field: {status:?}"
    );

    let bad_json = IngestRequest {
        source: "s".to_owned(),
        payload: b"{not json".to_vec().into(),
        content_type: "application/json".to_owned(),
        metadata: BTreeMap::new(),
        ..Default::default()
    };
    let status = client
        .ingest(bad_json)
        .await
        .expect_err("invalid JSON payload is refused");
    assert_eq!(
        status.code(),
        tonic::Code::InvalidArgument,
        "Ingest with a bad JSON payload: {status:?}"
    );

    // Publish: the third of five events is bad; each gets its own answer.
    let samples: Vec<_> = (0..5)
        .map(|i| sample_event("publish", "bad", i, i % 2 == 0))
        .collect();
    let requests: Vec<PublishRequest> = samples
        .iter()
        .enumerate()
        .map(|(i, sample)| {
            let mut event = sample.grpc();
            if i == 2 {
                event.source = String::new();
            }
            PublishRequest {
                sequence: 100 + i as u64,
                event: Some(event),
            }
        })
        .collect();
    let mut acks = client
        .publish(tokio_stream::iter(requests))
        .await
        .expect("Publish starts")
        .into_inner();
    let mut answered = BTreeMap::new();
    while let Some(ack) = acks.message().await.expect("Publish ack stream") {
        assert!(
            answered.insert(ack.sequence, ack.clone()).is_none(),
            "two acks for {}",
            ack.sequence
        );
    }
    assert_eq!(answered.len(), 5, "one ack per request: {answered:?}");
    for (i, sample) in samples.iter().enumerate() {
        let ack = &answered[&(100 + i as u64)];
        if i == 2 {
            let error = ack
                .error
                .as_ref()
                .unwrap_or_else(|| panic!("the bad event was acked: {ack:?}"));
            assert_eq!(error.code, "invalid_field", "{ack:?}");
            assert_eq!(error.field, "source", "{ack:?}");
            assert!(
                ack.message_id.is_empty(),
                "a refused event has no id: {ack:?}"
            );
        } else {
            assert!(ack.error.is_none(), "a good event was refused: {ack:?}");
            assert!(!ack.message_id.is_empty(), "{ack:?}");
            if let Some(id) = &sample.id {
                assert_eq!(&ack.message_id, id, "{ack:?}");
            }
            ledger.insert(ack.message_id.clone(), sample.sent.clone());
        }
    }

    conveyor.assert_still_serving(ledger).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_makes_resends_harmless() {
    let conveyor = spawn_run(&[]).await;
    let sample = sample_event("idempotent", "idem", 1, false);
    let key = "order-4711";
    let send = async || {
        let resp = conveyor
            .http()
            .post(conveyor.url("/api/v1/ingest"))
            .header("Idempotency-Key", key)
            .json(&sample.body)
            .send()
            .await
            .expect("POST /api/v1/ingest with Idempotency-Key");
        let (code, body) = read_json(resp).await;
        assert_eq!(code, 202, "POST with Idempotency-Key: {body}");
        accepted_id("POST with Idempotency-Key", &body, Some(key))
    };
    send().await;
    send().await;
    let mut ledger = Expected::new();
    ledger.insert(key.to_owned(), sample.sent.clone());
    conveyor
        .wait_sink_ids(ledger.keys(), std::time::Duration::from_secs(20))
        .await;
    // Once more after it was processed.
    send().await;
    conveyor.assert_still_serving(ledger).await;
}

/// `data` nested `depth` arrays deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Sends one refusal of every kind through `front`'s doors (HTTP single, NDJSON and JSON-array
/// batches, gRPC unary and batch), among them data nested deeper than the limit on every
/// door; checks each answer, and returns how many events were refused.
async fn send_one_refusal_of_each_kind(front: &Conveyor) -> u64 {
    let single = "/api/v1/ingest";
    let batch = "/api/v1/ingest/batch";
    let json_type = "application/json";
    let mut refused = 0;

    let (code, body) = post_bytes(front, single, json_type, r#"{"source":"#).await;
    assert_error("malformed JSON", code, &body, 400, "invalid_json", None);
    refused += 1;
    let (code, body) = post_bytes(front, single, json_type, r#"{"source":"s"}"#).await;
    assert_error("no data", code, &body, 422, "invalid_field", Some("data"));
    refused += 1;
    let (code, body) = post_bytes(front, single, "text/plain", r#"{"source":"s","data":1}"#).await;
    assert_error(
        "text/plain",
        code,
        &body,
        415,
        "unsupported_media_type",
        None,
    );
    refused += 1;
    // 100,000 levels: refused without recursion (the process stays up), naming the limit.
    let deep = format!(r#"{{"source":"s","data":{}}}"#, nested(100_000));
    let (code, body) = post_bytes(front, single, json_type, deep).await;
    let message = assert_error(
        "data 100,000 levels deep",
        code,
        &body,
        400,
        "nesting_too_deep",
        Some("data"),
    );
    assert!(
        message.contains("128"),
        "the message names the limit: {message}"
    );
    refused += 1;
    // Exactly at the limit: accepted, as every common JSON reader can read it.
    let at_limit = format!(r#"{{"source":"s","data":{}}}"#, nested(128));
    let (code, body) = post_bytes(front, single, json_type, at_limit).await;
    assert_eq!(code, 202, "data 128 levels deep: {body}");

    // NDJSON: one bad line, one too deep, one good.
    let lines = format!(
        "{{oops\n{{\"source\":\"s\",\"data\":{}}}\n{{\"source\":\"s\",\"data\":1}}\n",
        nested(129)
    );
    let (code, body) = post_bytes(front, batch, "application/x-ndjson", lines).await;
    assert_eq!(code, 207, "{body}");
    assert_eq!(
        body["results"][0]["error"]["code"], "invalid_json",
        "{body}"
    );
    assert_eq!(
        body["results"][1]["error"]["code"], "nesting_too_deep",
        "{body}"
    );
    assert_eq!(body["results"][1]["error"]["field"], "data", "{body}");
    refused += 2;
    // A JSON array with one element refused by validation (an empty source).
    let array = json!([{"source": "", "data": 1}, {"source": "s", "data": 2}]);
    let (code, body) = front.post_json(batch, &array).await;
    assert_eq!(code, 207, "{body}");
    refused += 1;

    let mut client = front.grpc().await;
    let deep_grpc = IngestRequest {
        source: "s".to_owned(),
        payload: nested(200).into_bytes().into(),
        content_type: json_type.to_owned(),
        ..Default::default()
    };
    let status = client
        .ingest(deep_grpc.clone())
        .await
        .expect_err("too deep");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("nesting_too_deep"),
        "{status:?}"
    );
    refused += 1;
    let answer = client
        .ingest_batch(conveyor_proto::v1::IngestBatchRequest {
            events: vec![
                deep_grpc,
                IngestRequest {
                    source: "s".to_owned(),
                    payload: b"1".to_vec().into(),
                    content_type: json_type.to_owned(),
                    ..Default::default()
                },
            ],
        })
        .await
        .expect("a batch call is answered per event")
        .into_inner();
    let first = answer.results[0]
        .error
        .as_ref()
        .expect("the deep event is refused");
    assert_eq!(first.code, "nesting_too_deep", "{first:?}");
    assert!(answer.results[1].error.is_none(), "{:?}", answer.results[1]);
    refused += 1;
    refused
}

async fn every_refusal_is_counted(front: &Conveyor) {
    let refused = send_one_refusal_of_each_kind(front).await;
    // Accepted: the event at the limit, the good NDJSON line, the good array element, the
    // good gRPC batch event.
    let status = front.wait_until_processed(4, Duration::from_secs(30)).await;
    assert_eq!(total(&status, "accepted"), 4, "{}", status["totals"]);
    assert_eq!(
        total(&status, "rejected"),
        refused,
        "totals.rejected counts every refused event on every door: {}",
        status["totals"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_counted_and_deep_nesting_is_refused_in_run_mode() {
    every_refusal_is_counted(&spawn_run(&[]).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_counted_and_deep_nesting_is_refused_in_split_mode() {
    let split = spawn_split(&[]).await;
    every_refusal_is_counted(&split.gateway).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nesting_limit_is_a_flag() {
    let conveyor = spawn_run(&["--max-json-depth", "4"]).await;
    let at = |depth| json!({"source": "s", "data": serde_json::from_str::<Value>(&nested(depth)).expect("json")});
    let (code, body) = conveyor.post_json("/api/v1/ingest", &at(4)).await;
    assert_eq!(code, 202, "4 levels with --max-json-depth 4: {body}");
    let (code, body) = conveyor.post_json("/api/v1/ingest", &at(5)).await;
    let message = assert_error(
        "5 levels",
        code,
        &body,
        400,
        "nesting_too_deep",
        Some("data"),
    );
    assert!(message.contains('4'), "{message}");
}

//! Generated events and sending them: samples, one event, the standard traffic mix over every
//! door (HTTP single and batch, gRPC unary, batch, stream and `Publish`), and
//! [`Conveyor::assert_still_serving`], which sends one more event before checking the sink (so
//! it lives here, not in `expected.rs`, which this file imports).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use conveyor_proto::v1::{IngestBatchRequest, IngestRequest, PublishRequest};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::client::{accepted_id, read_json};
use super::expected::{Expected, Sent, assert_sink_exact};
use super::process::Conveyor;

impl Conveyor {
    /// Checks the process still serves: `/health` is 200 and a fresh event gets 202 and
    /// reaches the sink; then asserts the sink holds exactly `ledger` plus that event.
    pub async fn assert_still_serving(&self, mut ledger: Expected) {
        let (code, _) = self.get_raw("/health").await;
        assert_eq!(code, 200, "GET /health");
        let sample = sample_event("after-bad-input", "final", 0, true);
        let id = ingest_one(self, &sample).await;
        ledger.insert(id, sample.sent);
        self.wait_sink_ids(ledger.keys(), Duration::from_secs(20))
            .await;
        self.wait_idle(Duration::from_secs(20)).await;
        assert_sink_exact(&self.read_sink(), &ledger);
    }
}

/// One generated event: its client id (if any), its JSON body, and what was sent.
pub struct Sample {
    pub id: Option<String>,
    pub body: Value,
    pub sent: Sent,
}

fn sample_data(kind: &str, i: usize) -> Value {
    match i % 3 {
        0 => json!({
            "kind": kind,
            "n": i,
            "reading": {"t": 23.5, "ok": true, "none": null},
            "tags": ["a", "b", "ünï"],
        }),
        1 => Value::String(format!("{kind} line {i}: \"quoted\", tab\t, ✓")),
        _ => json!([i, "x", {"y": false}, -7]),
    }
}

/// Event `i` of a kind of traffic. With `with_id` it carries the client id `<tag>-<kind>-<i>`
/// and a client timestamp; every fifth event has no metadata.
pub fn sample_event(kind: &str, tag: &str, i: usize, with_id: bool) -> Sample {
    let id = with_id.then(|| format!("{tag}-{kind}-{i}"));
    let metadata: BTreeMap<String, String> = if i.is_multiple_of(5) {
        BTreeMap::new()
    } else {
        BTreeMap::from([
            ("via".to_owned(), kind.to_owned()),
            ("n".to_owned(), i.to_string()),
        ])
    };
    let timestamp = with_id.then(|| 1_700_000_000_000 + i as u64);
    let source = format!("{kind}-{}", i % 7);
    let data = sample_data(kind, i);
    let mut body = json!({"source": source, "data": data});
    if let Some(id) = &id {
        body["id"] = json!(id);
    }
    if !metadata.is_empty() {
        body["metadata"] = json!(metadata);
    }
    if let Some(ts) = timestamp {
        body["timestamp"] = json!(ts);
    }
    Sample {
        id,
        body,
        sent: Sent {
            source,
            data,
            metadata,
            timestamp,
        },
    }
}

impl Sample {
    /// Sets metadata `key` to `value`, in the body and in what the sink must show.
    pub fn with_metadata(mut self, key: &str, value: &str) -> Self {
        self.sent.metadata.insert(key.to_owned(), value.to_owned());
        self.body["metadata"] = json!(self.sent.metadata);
        self
    }

    /// The same event as a gRPC request: a string `data` becomes a `text/plain` payload, any
    /// other value an `application/json` one.
    pub fn grpc(&self) -> IngestRequest {
        let (payload, content_type) = match &self.sent.data {
            Value::String(text) => (text.clone().into_bytes(), "text/plain"),
            other => (
                serde_json::to_vec(other).expect("serialise data"),
                "application/json",
            ),
        };
        IngestRequest {
            id: self.id.clone().unwrap_or_default(),
            source: self.sent.source.clone(),
            payload: payload.into(),
            content_type: content_type.to_owned(),
            metadata: self.sent.metadata.clone(),
            timestamp_ms: self.sent.timestamp.unwrap_or(0),
            headers: Default::default(),
        }
    }
}

/// POSTs one event to `/api/v1/ingest` and expects 202; returns its message id.
pub async fn ingest_one(target: &Conveyor, sample: &Sample) -> String {
    let (code, body) = target.post_json("/api/v1/ingest", &sample.body).await;
    assert_eq!(code, 202, "POST /api/v1/ingest {}: {body}", sample.body);
    accepted_id("POST /api/v1/ingest", &body, sample.id.as_deref())
}

fn record(ledger: &mut Expected, id: String, sent: Sent) {
    if let Some(previous) = ledger.insert(id.clone(), sent) {
        panic!("message id {id} was handed out for two different events (first: {previous:?})");
    }
}

async fn http_singles(
    target: &Conveyor,
    tag: &str,
    count: usize,
    tasks: usize,
) -> Vec<(String, Sent)> {
    let mut handles: Vec<JoinHandle<Vec<(String, Sent)>>> = Vec::new();
    for task in 0..tasks {
        let http = target.http().clone();
        let url = target.url("/api/v1/ingest");
        let tag = tag.to_owned();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (task..count).step_by(tasks) {
                let sample = sample_event("http-single", &tag, i, i % 2 == 0);
                let resp = http
                    .post(&url)
                    .json(&sample.body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("POST /api/v1/ingest event {i}: {e}"));
                let (code, body) = read_json(resp).await;
                assert_eq!(code, 202, "POST /api/v1/ingest event {i}: {body}");
                let id = accepted_id("POST /api/v1/ingest", &body, sample.id.as_deref());
                out.push((id, sample.sent));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.await.expect("an HTTP sender task panicked"));
    }
    all
}

/// Sends `batches` batches of `per_batch` events to `/api/v1/ingest/batch`, alternating
/// NDJSON and JSON-array bodies.
async fn http_batches(
    target: &Conveyor,
    tag: &str,
    batches: usize,
    per_batch: usize,
) -> Vec<(String, Sent)> {
    let mut all = Vec::new();
    for b in 0..batches {
        let ndjson = b % 2 == 0;
        let kind = if ndjson { "http-ndjson" } else { "http-array" };
        let samples: Vec<Sample> = (0..per_batch)
            .map(|j| sample_event(kind, tag, b * per_batch + j, j % 2 == 1))
            .collect();
        let request = target.http().post(target.url("/api/v1/ingest/batch"));
        let request = if ndjson {
            let lines: Vec<String> = samples.iter().map(|s| s.body.to_string()).collect();
            request
                .header("content-type", "application/x-ndjson")
                .body(lines.join("\n") + "\n")
        } else {
            let array: Vec<&Value> = samples.iter().map(|s| &s.body).collect();
            request.json(&array)
        };
        let resp = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /api/v1/ingest/batch ({kind}): {e}"));
        let (code, body) = read_json(resp).await;
        assert_eq!(code, 202, "{kind} batch {b}: {body}");
        assert_eq!(
            body["accepted"].as_u64(),
            Some(per_batch as u64),
            "{kind} batch {b}: accepted"
        );
        assert_eq!(
            body["rejected"].as_u64(),
            Some(0),
            "{kind} batch {b}: rejected"
        );
        let results = body["results"]
            .as_array()
            .expect("batch answer has results");
        assert_eq!(
            results.len(),
            per_batch,
            "{kind} batch {b}: one result per event"
        );
        for (position, result) in results.iter().enumerate() {
            let index = result["index"]
                .as_u64()
                .unwrap_or_else(|| panic!("result without index: {result}"))
                as usize;
            assert_eq!(
                index, position,
                "{kind} batch {b}: results are in request order"
            );
            let sample = &samples[index];
            let id = result["messageId"]
                .as_str()
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| {
                    panic!("{kind} batch {b}: result {index} has no messageId: {result}")
                });
            if let Some(client) = &sample.id {
                assert_eq!(id, client, "{kind} batch {b}: result {index} id");
            }
            all.push((id.to_owned(), sample.sent.clone()));
        }
    }
    all
}

/// `IngestStream` calls of `per_stream` events each; every event carries a client id (the
/// summary names no ids).
async fn grpc_streams(
    target: &Conveyor,
    tag: &str,
    streams: usize,
    per_stream: usize,
) -> Vec<(String, Sent)> {
    let mut client = target.grpc().await;
    let mut all = Vec::new();
    for s in 0..streams {
        let samples: Vec<Sample> = (0..per_stream)
            .map(|j| sample_event("grpc-stream", tag, s * per_stream + j, true))
            .collect();
        let requests: Vec<IngestRequest> = samples.iter().map(Sample::grpc).collect();
        let summary = client
            .ingest_stream(tokio_stream::iter(requests))
            .await
            .unwrap_or_else(|e| panic!("IngestStream {s} failed: {e}"))
            .into_inner();
        assert_eq!(
            summary.accepted, per_stream as u64,
            "IngestStream {s}: {summary:?}"
        );
        assert_eq!(summary.rejected, 0, "IngestStream {s}: {summary:?}");
        assert!(
            summary.rejections.is_empty(),
            "IngestStream {s}: {summary:?}"
        );
        all.extend(
            samples
                .into_iter()
                .map(|sample| (sample.id.expect("stream events carry ids"), sample.sent)),
        );
    }
    all
}

/// One `Publish` call of `count` events: every event must get its own ack, matched by
/// sequence.
async fn grpc_publish(target: &Conveyor, tag: &str, count: usize) -> Vec<(String, Sent)> {
    let mut client = target.grpc().await;
    let samples: Vec<Sample> = (0..count)
        .map(|i| sample_event("grpc-publish", tag, i, i % 2 == 0))
        .collect();
    let requests: Vec<PublishRequest> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| PublishRequest {
            sequence: i as u64 + 1,
            event: Some(s.grpc()),
        })
        .collect();
    let mut acks = client
        .publish(tokio_stream::iter(requests))
        .await
        .unwrap_or_else(|e| panic!("Publish failed: {e}"))
        .into_inner();
    let mut by_sequence: HashMap<u64, String> = HashMap::new();
    while let Some(ack) = acks.message().await.unwrap_or_else(|e| {
        panic!(
            "Publish ack stream failed after {} acks: {e}",
            by_sequence.len()
        )
    }) {
        assert!(ack.error.is_none(), "Publish ack with an error: {ack:?}");
        assert!(
            !ack.message_id.is_empty(),
            "Publish ack without message id: {ack:?}"
        );
        let previous = by_sequence.insert(ack.sequence, ack.message_id.clone());
        assert!(previous.is_none(), "two acks for sequence {}", ack.sequence);
    }
    assert_eq!(by_sequence.len(), count, "Publish: one ack per request");
    samples
        .into_iter()
        .enumerate()
        .map(|(i, sample)| {
            let id = by_sequence
                .remove(&(i as u64 + 1))
                .unwrap_or_else(|| panic!("Publish: no ack for sequence {}", i + 1));
            if let Some(client_id) = &sample.id {
                assert_eq!(&id, client_id, "Publish: ack id for sequence {}", i + 1);
            }
            (id, sample.sent)
        })
        .collect()
}

/// `count` unary `Ingest` calls, with server-generated ids.
async fn grpc_unary(target: &Conveyor, tag: &str, count: usize) -> Vec<(String, Sent)> {
    let mut client = target.grpc().await;
    let mut all = Vec::new();
    for i in 0..count {
        let sample = sample_event("grpc-unary", tag, i, false);
        let response = client
            .ingest(sample.grpc())
            .await
            .unwrap_or_else(|e| panic!("Ingest {i} failed: {e}"))
            .into_inner();
        assert_eq!(response.status, "accepted", "Ingest {i}: {response:?}");
        assert!(!response.message_id.is_empty(), "Ingest {i}: {response:?}");
        all.push((response.message_id, sample.sent));
    }
    all
}

/// One `IngestBatch` call of `count` events, a third with client ids.
async fn grpc_batch(target: &Conveyor, tag: &str, count: usize) -> Vec<(String, Sent)> {
    let mut client = target.grpc().await;
    let samples: Vec<Sample> = (0..count)
        .map(|i| sample_event("grpc-batch", tag, i, i % 3 == 0))
        .collect();
    let response = client
        .ingest_batch(IngestBatchRequest {
            events: samples.iter().map(Sample::grpc).collect(),
        })
        .await
        .unwrap_or_else(|e| panic!("IngestBatch failed: {e}"))
        .into_inner();
    assert_eq!(
        response.results.len(),
        count,
        "IngestBatch: one result per event"
    );
    samples
        .into_iter()
        .zip(response.results)
        .enumerate()
        .map(|(i, (sample, result))| {
            assert_eq!(
                result.index as usize, i,
                "IngestBatch results in order: {result:?}"
            );
            assert!(
                result.error.is_none(),
                "IngestBatch event {i} refused: {result:?}"
            );
            assert!(
                !result.message_id.is_empty(),
                "IngestBatch event {i}: {result:?}"
            );
            if let Some(client_id) = &sample.id {
                assert_eq!(&result.message_id, client_id, "IngestBatch event {i} id");
            }
            (result.message_id, sample.sent)
        })
        .collect()
}

/// The standard traffic mix, all at once: 4,000 single HTTP events from 32 tasks, 4,000 in
/// NDJSON and JSON-array batches of 500, 2,000 over `IngestStream`, 500 over `Publish`, 100
/// unary `Ingest` calls and one `IngestBatch` of 100. Returns every accepted event by id.
pub async fn send_mixed_traffic(target: &Conveyor, tag: &str) -> Expected {
    let (singles, batches, streams, published, unary, batch) = tokio::join!(
        http_singles(target, tag, 4_000, 32),
        http_batches(target, tag, 8, 500),
        grpc_streams(target, tag, 2, 1_000),
        grpc_publish(target, tag, 500),
        grpc_unary(target, tag, 100),
        grpc_batch(target, tag, 100),
    );
    let mut ledger = Expected::new();
    for (id, sent) in singles
        .into_iter()
        .chain(batches)
        .chain(streams)
        .chain(published)
        .chain(unary)
        .chain(batch)
    {
        record(&mut ledger, id, sent);
    }
    ledger
}

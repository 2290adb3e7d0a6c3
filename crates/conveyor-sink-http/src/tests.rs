use std::collections::BTreeMap;

use conveyor_core::ContentType;
use conveyor_sink::ErrorKind;
use conveyor_testkit::{Reply, WebhookReceiver, free_port};
use reqwest::header::HeaderValue;

use super::*;

fn event(id: &str) -> Event {
    Event {
        id: id.into(),
        source: "test".into(),
        timestamp_ms: 7,
        payload: Bytes::from(format!("{{\"n\":\"{id}\"}}")),
        content_type: ContentType::Json,
        metadata: BTreeMap::new().into(),
        attempt: 1,
        headers: BTreeMap::new(),
    }
}

fn events(n: usize) -> Vec<Event> {
    (0..n).map(|i| event(&format!("e{i}"))).collect()
}

/// The batch as the queue delivers it again: one attempt more.
fn again(batch: &mut [Event]) -> &[Event] {
    for event in batch.iter_mut() {
        event.attempt += 1;
    }
    batch
}

fn settings(table: serde_json::Value) -> Result<HttpSettings, String> {
    HttpSettings::from_settings(table.as_object().expect("a table"))
}

fn sink(table: serde_json::Value) -> HttpSink {
    HttpSink::new(settings(table).expect("settings")).expect("sink")
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[test]
fn the_quick_form_is_one_event_per_post_and_describes_itself_without_secrets() {
    let quick =
        HttpSettings::from_url("https://user:pw@hooks.example:8443/in?token=t").expect("url");
    assert_eq!(
        (quick.method.clone(), quick.encoding, quick.concurrency),
        (reqwest::Method::POST, Encoding::Event, 16)
    );
    assert_eq!(quick.describe(), "https://hooks.example:8443/in");
    assert_eq!(
        quick.url.query(),
        Some("token=t"),
        "the query is the receiver's"
    );
}

#[test]
fn bad_settings_are_refused_naming_the_problem() {
    let refused = |table: serde_json::Value| settings(table).expect_err("refused");
    assert!(
        refused(serde_json::json!({"url": "ftp://x/y"})).contains("not an http:// or https:// URL")
    );
    assert!(refused(serde_json::json!({"url": "not a url"})).contains("'not a url' is not a URL"));
    assert_eq!(
        refused(serde_json::json!({"url": "http://h/", "method": "GET"})),
        "method is one of POST, PUT, PATCH, not 'GET'"
    );
    assert_eq!(
        refused(serde_json::json!({"url": "http://h/", "headers": {"Idempotency-Key": "x"}})),
        "headers: idempotency-key is set by the sink itself (see `encoding` and `secret`)"
    );
    assert_eq!(
        refused(serde_json::json!({"url": "http://h/", "headers": {"bad name": "x"}})),
        "headers: 'bad name' is not a header name"
    );
    assert!(
        refused(serde_json::json!({"url": "http://h/", "secret": "hunter2"})).contains("whsec_")
    );
    assert!(
        refused(serde_json::json!({"url": "http://h/", "secret": "whsec_c2hvcnQ="}))
            .contains("this one is 5 bytes")
    );
    assert_eq!(
        refused(serde_json::json!({"url": "http://h/", "secret_env": "CONVEYOR_TEST_NO_SUCH_VAR"})),
        "secret_env: the environment variable CONVEYOR_TEST_NO_SUCH_VAR is not set"
    );
    assert_eq!(
        refused(serde_json::json!({"url": "http://h/", "ca_file": "/no/such.pem"})),
        "ca_file: no file '/no/such.pem'"
    );
    assert!(
        refused(serde_json::json!({"url": "http://h/", "retries": 3}))
            .contains("no setting `retries`")
    );
    let secret =
        settings(serde_json::json!({"url": "http://h/", "secret": SECRET})).expect("secret");
    assert_eq!(format!("{:?}", secret.secret), "Some(WebhookSecret(***))");
}

#[test]
fn retry_after_is_read_as_seconds_or_a_date_and_capped() {
    let now = SystemTime::now();
    let headers = |value: &str| {
        let mut map = HeaderMap::new();
        map.insert(RETRY_AFTER, HeaderValue::from_str(value).expect("value"));
        map
    };
    assert_eq!(
        retry_after(&headers("3"), now),
        Some(Duration::from_secs(3))
    );
    assert_eq!(retry_after(&headers("86400"), now), Some(MAX_RETRY_AFTER));
    let in_a_minute = httpdate::fmt_http_date(now + Duration::from_secs(61));
    let after = retry_after(&headers(&in_a_minute), now).expect("a date");
    assert!(
        (Duration::from_secs(59)..=Duration::from_secs(61)).contains(&after),
        "{after:?}"
    );
    let past = httpdate::fmt_http_date(now - Duration::from_secs(60));
    assert_eq!(retry_after(&headers(&past), now), Some(Duration::ZERO));
    assert_eq!(retry_after(&headers("soon"), now), None);
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
    assert!(is_retryable(StatusCode::REQUEST_TIMEOUT) && is_retryable(StatusCode::BAD_GATEWAY));
    assert!(!is_retryable(StatusCode::BAD_REQUEST) && !is_retryable(StatusCode::FOUND));
}

#[tokio::test]
async fn one_event_per_request_carries_its_record_its_id_and_a_signature_that_verifies() {
    let receiver = WebhookReceiver::start(|_| Reply::ok()).await;
    let sink = sink(serde_json::json!({
        "url": receiver.url("/hooks?team=data"),
        "method": "PUT",
        "secret": SECRET,
        "headers": {"x-team": "data"},
    }));
    sink.write(&events(3), 99).await.expect("written");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    let mut keys: Vec<&str> = requests.iter().map(|r| r.key()).collect();
    keys.sort();
    assert_eq!(keys, ["e0", "e1", "e2"]);
    let secret = WebhookSecret::parse(SECRET).expect("secret");
    for request in &requests {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("PUT", "/hooks")
        );
        let record: serde_json::Value = serde_json::from_slice(&request.body).expect("JSON");
        assert_eq!(record["id"], request.key());
        assert_eq!(record["data"]["n"], request.key());
        assert_eq!(record["processed_at"], 99);
        let header = |name: &str| request.headers.get(name).cloned().unwrap_or_default();
        assert_eq!(header("content-type"), "application/json");
        assert_eq!(header("x-team"), "data");
        assert_eq!(header("webhook-id"), request.key());
        let timestamp: u64 = header("webhook-timestamp").parse().expect("seconds");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        assert!(now.abs_diff(timestamp) < 60, "{timestamp} vs {now}");
        assert_eq!(
            header("webhook-signature"),
            signature(&secret, request.key(), timestamp, &request.body)
        );
    }
}

#[tokio::test]
async fn batches_are_split_by_events_and_bytes_under_keys_that_name_their_content() {
    let receiver = WebhookReceiver::start(|_| Reply::ok()).await;
    let ndjson = sink(serde_json::json!({
        "url": receiver.url("/n"), "encoding": "ndjson", "max_events": 4,
    }));
    ndjson.write(&events(10), 1).await.expect("written");
    let array = sink(serde_json::json!({
        "url": receiver.url("/a"), "encoding": "array", "max_bytes": 300,
    }));
    array.write(&events(10), 1).await.expect("written");
    let requests = receiver.requests();
    let (lines, arrays): (Vec<_>, Vec<_>) = requests.iter().partition(|r| r.path == "/n");
    let mut sizes: Vec<usize> = lines
        .iter()
        .map(|r| {
            assert_eq!(r.headers["content-type"], "application/x-ndjson");
            assert!(r.body.ends_with(b"\n"));
            r.body
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count()
        })
        .collect();
    sizes.sort();
    assert_eq!(sizes, [2, 4, 4]);
    let mut ids = Vec::new();
    for request in &arrays {
        assert!(request.body.len() <= 300, "{}", request.body.len());
        let records: Vec<serde_json::Value> = serde_json::from_slice(&request.body).expect("array");
        ids.extend(
            records
                .iter()
                .map(|r| r["id"].as_str().unwrap_or_default().to_owned()),
        );
        assert!(
            request.key().starts_with("batch_")
                && request.key().ends_with(&format!("_{}", records.len()))
        );
    }
    assert!(arrays.len() > 1, "300 bytes hold fewer than 10 records");
    ids.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(
        batch_key(["a", "b"].into_iter()),
        batch_key(["a", "b"].into_iter()),
        "the same events make the same key"
    );
    assert_ne!(
        batch_key(["a", "b"].into_iter()),
        batch_key(["b", "a"].into_iter())
    );
}

#[tokio::test]
async fn a_retried_batch_sends_only_what_the_receiver_did_not_confirm() {
    // e3 fails twice with a 503; everything else passes.
    let receiver = WebhookReceiver::start(|r| {
        if r.key() == "e3" && r.attempt < 2 {
            Reply::status(503).body("busy")
        } else {
            Reply::ok()
        }
    })
    .await;
    let sink = sink(serde_json::json!({"url": receiver.url("/")}));
    let mut batch = events(6);
    for round in 0..2 {
        let error = sink
            .write(again(&mut batch), 1)
            .await
            .expect_err("e3 failed");
        assert!(error.is_retryable(), "{error}");
        assert_eq!(
            error.message, "HTTP 503 Service Unavailable: busy (1 of 6 events to send again)",
            "round {round}"
        );
    }
    sink.write(again(&mut batch), 1)
        .await
        .expect("all confirmed");
    let requests = receiver.requests();
    assert_eq!(requests.len(), 8, "6 once, then e3 twice more");
    assert_eq!(requests.iter().filter(|r| r.key() == "e3").count(), 3);
}

#[tokio::test]
async fn a_refusal_names_the_status_and_the_start_of_the_answer_for_its_events_only() {
    let long = "x".repeat(1000);
    let receiver = WebhookReceiver::start(move |r| match r.key() {
        "e1" => Reply::status(400).body("{\"error\": \"field `amount`\nis missing\"}"),
        "e2" => Reply::status(422).body(&long),
        "e3" => Reply::status(302).header("location", "https://elsewhere.example/"),
        _ => Reply::ok(),
    })
    .await;
    let sink = sink(serde_json::json!({"url": receiver.url("/")}));
    let error = sink.write(&events(5), 1).await.expect_err("refused");
    let ErrorKind::Rejected(mut rejected) = error.kind else {
        panic!("not a rejection: {error}");
    };
    rejected.sort();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert_eq!(
        rejected[0],
        (
            1,
            "HTTP 400 Bad Request: {\"error\": \"field `amount` is missing\"}".to_owned()
        )
    );
    assert!(
        rejected[1]
            .1
            .starts_with("HTTP 422 Unprocessable Entity: xxx"),
        "{}",
        rejected[1].1
    );
    assert!(
        rejected[1].1.ends_with("x…") && rejected[1].1.len() < 300,
        "{}",
        rejected[1].1
    );
    assert_eq!(
        rejected[2].1,
        "HTTP 302 Found to https://elsewhere.example/ (redirects are not followed)"
    );
    assert_eq!(error.message, "3 of 5 events refused");
}

#[tokio::test]
async fn retry_after_pauses_the_whole_sink_and_comes_back_with_the_error() {
    let receiver = WebhookReceiver::start(|r| {
        if r.key() == "e0" && r.attempt == 0 {
            Reply::status(429).header("retry-after", "2")
        } else {
            Reply::ok()
        }
    })
    .await;
    let sink = sink(serde_json::json!({"url": receiver.url("/"), "concurrency": 1}));
    let error = sink.write(&events(1), 1).await.expect_err("429");
    assert_eq!(
        error.kind,
        ErrorKind::Retryable {
            retry_after: Some(Duration::from_secs(2))
        }
    );
    // Another batch, at once: not sent while the pause lasts.
    let error = sink.write(&[event("other")], 1).await.expect_err("paused");
    let ErrorKind::Retryable {
        retry_after: Some(left),
    } = error.kind
    else {
        panic!("not a pause: {error}");
    };
    assert!(left > Duration::from_millis(1500), "{left:?}");
    assert!(
        error.message.contains("asked for a pause"),
        "{}",
        error.message
    );
    assert_eq!(
        receiver.requests().len(),
        1,
        "nothing sent during the pause"
    );
    tokio::time::sleep(left).await;
    sink.write(&[event("e0"), event("other")], 1)
        .await
        .expect("after the pause");
    assert_eq!(receiver.requests().len(), 3);
}

#[tokio::test]
async fn no_answer_in_time_and_no_server_are_retryable() {
    let receiver = WebhookReceiver::start(|_| Reply::ok().after(Duration::from_secs(5))).await;
    let slow = sink(serde_json::json!({"url": receiver.url("/"), "timeout_ms": 200}));
    let error = slow.write(&events(1), 1).await.expect_err("timeout");
    assert!(error.is_retryable(), "{error}");
    assert!(
        error
            .message
            .starts_with("no answer within 200ms (timeout_ms)"),
        "{}",
        error.message
    );
    let nobody = sink(serde_json::json!({"url": format!("http://127.0.0.1:{}/", free_port())}));
    let error = nobody.write(&events(1), 1).await.expect_err("refused");
    assert!(error.is_retryable(), "{error}");
    assert!(
        error.message.contains("Connection refused"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn a_refusal_in_a_batch_sent_again_for_others_is_asked_once_and_reported_at_the_end() {
    // e1 is refused; e2 fails once with a 503, so the batch comes back.
    let receiver = WebhookReceiver::start(|r| match (r.key(), r.attempt) {
        ("e1", _) => Reply::status(400).body("no"),
        ("e2", 0) => Reply::status(503),
        _ => Reply::ok(),
    })
    .await;
    let sink = sink(serde_json::json!({"url": receiver.url("/")}));
    let mut batch = events(3);
    let error = sink.write(&batch, 1).await.expect_err("e2 failed");
    assert!(error.is_retryable(), "{error}");
    let error = sink
        .write(again(&mut batch), 1)
        .await
        .expect_err("e1 refused");
    assert_eq!(
        error.kind,
        ErrorKind::Rejected(vec![(1, "HTTP 400 Bad Request: no".to_owned())])
    );
    let keys: Vec<String> = receiver
        .requests()
        .iter()
        .map(|r| r.key().to_owned())
        .collect();
    assert_eq!(keys.iter().filter(|k| *k == "e1").count(), 1, "{keys:?}");
    assert_eq!(keys.len(), 4, "e0, e1, e2, then e2 again: {keys:?}");
    // Reported, so forgotten: a replay of the letter asks the receiver again.
    let _ = sink.write(&again(&mut batch)[1..2], 1).await;
    assert_eq!(receiver.requests().len(), 5);
}

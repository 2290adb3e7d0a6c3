//! The S3 sink end to end (issue #13): the real binary writing objects to a real S3 wire
//! protocol server (moto), through a proxy that loses answers and refuses uploads, and in
//! split mode with the processor SIGKILLed; every accepted event is in exactly one object.

use std::collections::HashMap;
use std::io::Read as _;
use std::time::Duration;

use conveyor_testkit::{NatsServer, Proxied, S3_ACCESS_KEY, S3_SECRET_KEY, S3Proxy, S3Server};

use crate::delivery::{SingleSenders, send_batches};
use crate::harness::{NatsSplit, Spawn};
use crate::ledger::{Ledger, Verdict};

/// How often each id is in the bucket's objects, and how many objects there are.
async fn bucket_counts(server: &S3Server, bucket: &str) -> (HashMap<String, usize>, usize) {
    let objects = server.objects(bucket).await;
    let mut counts = HashMap::new();
    for (name, bytes) in &objects {
        let mut text = Vec::new();
        if name.ends_with(".gz") {
            flate2::read::GzDecoder::new(bytes.as_slice())
                .read_to_end(&mut text)
                .unwrap_or_else(|e| panic!("{name} is not gzip: {e}"));
        } else {
            text.clone_from(bytes);
        }
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let record: serde_json::Value = serde_json::from_slice(line).expect("a record");
            let id = record["id"].as_str().unwrap_or_default().to_owned();
            *counts.entry(id).or_default() += 1;
        }
    }
    (counts, objects.len())
}

/// Waits until every id `ledger` promised is in the bucket, then checks for lost, duplicated
/// and unexpected records.
async fn settled(server: &S3Server, bucket: &str, ledger: &Ledger, within: Duration) -> Verdict {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (counts, objects) = bucket_counts(server, bucket).await;
        let verdict = ledger.check_counts(&counts);
        if verdict.lost.is_empty() || std::time::Instant::now() >= deadline {
            eprintln!("bucket {bucket}: {objects} objects; {verdict}");
            return verdict;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// What the proxy does to an object's upload, by its name: a quarter of the objects lose the
/// answer to their first upload (the client sends it again under the same name), a quarter
/// lose every answer (the sink gives up, the events come back, the sink asks whether the
/// object is there, finds it, and skips them), a quarter are refused every time without
/// being stored (the events come back, the object is found missing, and they go into a new
/// object, under a new name), the rest pass.
fn upload_trouble(path: &str) -> u8 {
    (path.bytes().map(u32::from).sum::<u32>() % 4) as u8
}

/// 6,000 events through a proxy that loses upload answers and refuses uploads: every event
/// ends in exactly one object, and every kind of trouble happened (objects of about 250
/// events: two dozen or more, so each kind is all but sure to be drawn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_in_exactly_one_object_after_forced_retries() {
    let server = S3Server::start();
    server.create_bucket("lake").await;
    let proxy = S3Proxy::start(&server, |request| {
        if request.method != "PUT" || request.path.matches('/').count() < 3 {
            return Proxied::Pass;
        }
        match upload_trouble(&request.path) {
            0 if request.attempt == 0 => Proxied::PassThenAnswer(503),
            1 => Proxied::PassThenAnswer(500),
            2 => Proxied::Answer(503),
            _ => Proxied::Pass,
        }
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"
[defaults]
route = ["lake"]

[sinks.lake]
type = "s3"
bucket = "lake"
prefix = "events"
endpoint = "{}"
access_key_id = "{S3_ACCESS_KEY}"
secret_access_key = "{S3_SECRET_KEY}"
linger_ms = 100
max_events = 250
timeout_ms = 500
"#,
        proxy.endpoint()
    );
    let conveyor = Spawn::new("run")
        .config_file(dir.path(), &config)
        .start()
        .await;
    let accepted = send_batches(&conveyor, "lake", 6_000, 200, 2).await;
    let verdict = settled(&server, "lake", &accepted, Duration::from_secs(120)).await;
    assert!(verdict.is_clean(), "{verdict}");

    let seen = proxy.seen();
    let lost_once = seen
        .iter()
        .filter(|(r, a)| r.attempt == 0 && *a == Proxied::PassThenAnswer(503))
        .count();
    let given_up = seen
        .iter()
        .filter(|(_, a)| *a == Proxied::PassThenAnswer(500))
        .count();
    let refused = seen
        .iter()
        .filter(|(_, a)| *a == Proxied::Answer(503))
        .count();
    let asked = seen.iter().filter(|(r, _)| r.method == "HEAD").count();
    assert!(
        lost_once > 0 && given_up > 0 && refused > 0 && asked > 0,
        "every kind of trouble happened: {lost_once} answers lost once, {given_up} lost for good, {refused} refused, {asked} HEADs"
    );
    let (_, status) = conveyor.get_json("/api/v1/status").await;
    let sink = &status["processor"]["stats"]["sinks"][0];
    assert_eq!(sink["name"], "lake", "{status}");
    assert_eq!(
        sink["target"],
        format!("s3://lake/events?endpoint={}", proxy.endpoint()),
        "{status}"
    );
    assert!(
        sink["retried"].as_u64().unwrap_or_default() > 0,
        "the given-up uploads show as retried events: {sink}"
    );
}

/// Split mode on NATS, the sink's quick form, the processor SIGKILLed three times mid-stream:
/// every accepted event ends in exactly one object (objects stored before a kill are read
/// back by the next processor, which skips their events when they are redelivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_in_exactly_one_object_through_processor_kills() {
    let queue = NatsServer::start();
    let server = S3Server::start();
    server.create_bucket("crashes").await;
    let sink = format!(
        "s3://crashes/in?endpoint={}&linger_ms=100&access_key_id={S3_ACCESS_KEY}&secret_access_key_env=TEST_S3_SECRET",
        server.endpoint()
    );
    let mut split =
        NatsSplit::start_with_env(&queue.url(), &sink, &[("TEST_S3_SECRET", S3_SECRET_KEY)]).await;
    let senders = SingleSenders::start(&split.gateway, "s3crash", 2);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        split.kill_processor().await;
        split.start_processor().await;
    }
    // Objects were stored before the last kill (2 s in, with a linger of 100 ms).
    let log = split.processor.stderr_tail();
    assert!(
        log.contains("seen-id window seeded from the sink"),
        "a restarted processor reads back the newest objects: {log}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = senders.finish_accepted().await;
    let verdict = settled(&server, "crashes", &accepted, Duration::from_secs(120)).await;
    assert!(verdict.is_clean(), "{verdict}");
}

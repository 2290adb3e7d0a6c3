use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::sync::atomic::Ordering;

use conveyor_core::ContentType;
use conveyor_sink::ErrorKind;
use conveyor_testkit::{Proxied, S3_ACCESS_KEY, S3_SECRET_KEY, S3Proxy, S3Server};

use super::*;

/// 2026-12-04T01:30:00Z
const TIMESTAMP_MS: u64 = 1_796_347_800_000;

fn event(id: &str, n: usize) -> Event {
    Event {
        id: id.into(),
        source: "sensor-1".into(),
        timestamp_ms: TIMESTAMP_MS,
        payload: Bytes::from(format!("{{\"n\":{n}}}")),
        content_type: ContentType::Json,
        metadata: BTreeMap::from([("team".to_owned(), "data".to_owned())]).into(),
        attempt: 1,
        headers: BTreeMap::new(),
    }
}

fn events(prefix: &str, n: usize) -> Vec<Event> {
    (0..n).map(|i| event(&format!("{prefix}{i}"), i)).collect()
}

fn settings(endpoint: &str, bucket: &str, query: &str) -> S3Settings {
    let mut table = serde_json::Map::new();
    for (key, value) in [
        ("type", "s3"),
        ("bucket", bucket),
        ("prefix", "events/raw"),
        ("endpoint", endpoint),
        ("access_key_id", S3_ACCESS_KEY),
        ("secret_access_key", S3_SECRET_KEY),
    ] {
        table.insert(key.into(), value.into());
    }
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        table.insert(key.into_owned(), value.into_owned().into());
    }
    S3Settings::from_settings(&table).expect("settings")
}

/// Each object's name and its records.
async fn stored(server: &S3Server, bucket: &str) -> Vec<(String, Vec<serde_json::Value>)> {
    let mut objects = Vec::new();
    for (name, bytes) in server.objects(bucket).await {
        let text = if name.ends_with(".gz") {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(bytes.as_slice())
                .read_to_end(&mut plain)
                .expect("a gzip object");
            plain
        } else {
            bytes
        };
        let records = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("a JSON record"))
            .collect();
        objects.push((name, records));
    }
    objects
}

fn id_counts(objects: &[(String, Vec<serde_json::Value>)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (_, records) in objects {
        for record in records {
            *counts
                .entry(record["id"].as_str().unwrap_or_default().to_owned())
                .or_default() += 1;
        }
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_written_together_make_one_gzipped_object_named_from_its_content() {
    let server = S3Server::start();
    server.create_bucket("gather").await;
    let sink = Arc::new(
        S3Sink::new(settings(&server.endpoint(), "gather", "linger_ms=300")).expect("sink"),
    );
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let sink = Arc::clone(&sink);
            tokio::spawn(async move { sink.write(&events(&format!("w{w}-"), 100), 42).await })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer").expect("written");
    }

    let objects = stored(&server, "gather").await;
    assert_eq!(
        objects.len(),
        1,
        "one object for three writes within linger: {objects:?}"
    );
    let (name, records) = &objects[0];
    assert_eq!(records.len(), 300);
    let first = records[0]["id"].as_str().expect("id");
    assert!(
        name.starts_with(&format!("events/raw/dt=2026-12-04/hour=01/{first}-300-"))
            && name.ends_with(".ndjson.gz"),
        "named from the first event's time, its first id and count: {name}"
    );
    assert_eq!(records[0]["data"]["n"], 0);
    assert_eq!(records[0]["metadata"]["team"], "data");
    assert_eq!(records[0]["processed_at"], 42);
    assert!(id_counts(&objects).values().all(|&n| n == 1));

    // The same events make the same name; any other set another.
    let batch: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("x{i}"))).collect();
    let settings = &sink.inner.settings;
    assert_eq!(
        object_path(settings, &batch, TIMESTAMP_MS),
        object_path(settings, &batch.clone(), TIMESTAMP_MS)
    );
    assert_ne!(
        object_path(settings, &batch, TIMESTAMP_MS),
        object_path(settings, &batch[..4], TIMESTAMP_MS)
    );
    let mut swapped = batch.clone();
    swapped.swap(3, 4);
    assert_ne!(
        object_path(settings, &batch, TIMESTAMP_MS),
        object_path(settings, &swapped, TIMESTAMP_MS)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_object_is_written_without_waiting_and_plain_ndjson_on_request() {
    let server = S3Server::start();
    server.create_bucket("full").await;
    let sink = S3Sink::new(settings(
        &server.endpoint(),
        "full",
        "linger_ms=60000&max_events=100&gzip=false",
    ))
    .expect("sink");
    // Far shorter than the linger: the object is full, so it is written at once.
    tokio::time::timeout(Duration::from_secs(20), sink.write(&events("f", 100), 1))
        .await
        .expect("a full object does not wait for the linger")
        .expect("written");
    let objects = stored(&server, "full").await;
    assert_eq!(objects.len(), 1);
    assert!(
        objects[0].0.contains("/f0-100-") && objects[0].0.ends_with(".ndjson"),
        "{}",
        objects[0].0
    );
    assert_eq!(objects[0].1.len(), 100);
}

/// An upload whose answer is lost (the object stored, an error answered) is retried by the
/// client under the same name, and overwrites itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_retried_after_a_lost_answer_overwrites_itself() {
    let server = S3Server::start();
    server.create_bucket("retry").await;
    let proxy = S3Proxy::start(&server, |request| {
        if request.method == "PUT" && request.attempt < 2 {
            Proxied::PassThenAnswer(503)
        } else {
            Proxied::Pass
        }
    })
    .await;
    let sink = S3Sink::new(settings(&proxy.endpoint(), "retry", "linger_ms=0")).expect("sink");
    sink.write(&events("r", 50), 1).await.expect("written");

    let puts = proxy
        .seen()
        .iter()
        .filter(|(r, _)| r.method == "PUT")
        .count();
    assert_eq!(puts, 3, "two lost answers, then one answered");
    let objects = stored(&server, "retry").await;
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects[0].1.len(), 50);
}

/// An upload the sink gave up on, whose events come back: the sink asks whether the object
/// is there (HEAD), and writes only what is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_an_upload_given_up_on_are_asked_about_not_written_twice() {
    let server = S3Server::start();
    server.create_bucket("ask").await;
    // `landed…` objects are stored but never answered, `lost…` ones refused while
    // `refuse_lost` is set: either way the client gives up after its timeout.
    let refuse_lost = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let refusing = Arc::clone(&refuse_lost);
    let proxy = S3Proxy::start(&server, move |request| {
        let lost = request.path.contains("/lost");
        if request.method == "PUT" && request.path.contains("/landed") {
            Proxied::PassThenAnswer(503)
        } else if request.method == "PUT" && lost && refusing.load(Ordering::Relaxed) {
            Proxied::Answer(503)
        } else {
            Proxied::Pass
        }
    })
    .await;
    let sink = S3Sink::new(settings(
        &proxy.endpoint(),
        "ask",
        "linger_ms=0&timeout_ms=400",
    ))
    .expect("sink");
    let mut landed = events("landed", 20);
    let failed = sink.write(&landed, 1).await.expect_err("no answer");
    assert!(
        matches!(failed.kind, ErrorKind::Retryable { .. }),
        "{failed:?}"
    );
    assert!(failed.message.contains("503"), "{}", failed.message);
    // They come back, in another mix: half of them with new events.
    for event in &mut landed {
        event.attempt = 2;
    }
    let mut mixed = landed[10..].to_vec();
    mixed.extend(events("fresh", 5));
    let puts_before = proxy
        .seen()
        .iter()
        .filter(|(r, _)| r.method == "PUT")
        .count();
    sink.write(&mixed, 2).await.expect("written");
    let seen = proxy.seen();
    assert!(
        seen.iter().any(|(r, _)| r.method == "HEAD"),
        "the sink asked whether the object was stored"
    );
    let objects = stored(&server, "ask").await;
    let counts = id_counts(&objects);
    assert_eq!(
        objects.len(),
        2,
        "the first upload and the fresh events: {objects:?}"
    );
    assert!(
        counts.values().all(|&n| n == 1) && counts.len() == 25,
        "every event once: {counts:?}"
    );
    assert_eq!(
        seen.iter().filter(|(r, _)| r.method == "PUT").count(),
        puts_before + 1,
        "one upload, of the fresh events only"
    );

    // Never stored: asked about, found missing, written again (in another order, so
    // under another name).
    let mut lost = events("lost", 10);
    sink.write(&lost, 3)
        .await
        .expect_err("refused by the proxy");
    refuse_lost.store(false, Ordering::Relaxed);
    for event in &mut lost {
        event.attempt = 2;
    }
    lost.reverse();
    sink.write(&lost, 4).await.expect("written");
    assert!(
        proxy
            .seen()
            .iter()
            .any(|(r, _)| r.method == "HEAD" && r.path.contains("/lost0-")),
        "asked about the lost upload"
    );
    let counts = id_counts(&stored(&server, "ask").await);
    assert!(
        (0..10).all(|i| counts.get(&format!("lost{i}")) == Some(&1)),
        "every lost event once: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_permanent_and_an_unreachable_server_retryable() {
    let server = S3Server::start();
    let sink = S3Sink::new(settings(
        &server.endpoint(),
        "no-such-bucket",
        "linger_ms=0",
    ))
    .expect("sink");
    let refused = sink.write(&events("m", 3), 1).await.expect_err("no bucket");
    assert_eq!(refused.kind, ErrorKind::Permanent, "{refused:?}");
    assert!(
        refused.message.contains("NoSuchBucket"),
        "{}",
        refused.message
    );

    let port = conveyor_testkit::free_port();
    let sink = S3Sink::new(settings(
        &format!("http://127.0.0.1:{port}"),
        "nobody-home",
        "linger_ms=0&timeout_ms=300",
    ))
    .expect("sink");
    let unreachable = sink.write(&events("u", 3), 1).await.expect_err("no server");
    assert!(unreachable.is_retryable(), "{unreachable:?}");
}

/// A 4xx is the events' fault, unless its S3 code says to try again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_permanent_and_a_4xx_meaning_try_again_is_retryable() {
    let server = S3Server::start();
    server.create_bucket("codes").await;
    let proxy = S3Proxy::start(&server, |request| {
        if request.path.contains("/bad") {
            Proxied::AnswerCode(400, "InvalidArgument")
        } else if request.path.contains("/slow") {
            Proxied::AnswerCode(400, "RequestTimeout")
        } else {
            Proxied::Pass
        }
    })
    .await;
    let sink = S3Sink::new(settings(
        &proxy.endpoint(),
        "codes",
        "linger_ms=0&timeout_ms=300",
    ))
    .expect("sink");
    let refused = sink.write(&events("bad", 2), 1).await.expect_err("a 400");
    assert_eq!(refused.kind, ErrorKind::Permanent, "{refused:?}");
    assert!(
        refused.message.contains("400") && refused.message.contains("InvalidArgument"),
        "the server's words: {}",
        refused.message
    );
    let slow = sink
        .write(&events("slow", 2), 1)
        .await
        .expect_err("a 400 RequestTimeout");
    assert!(slow.is_retryable(), "{slow:?}");
}

/// A key that may write but not read: a given-up upload's events are written again when
/// they come back, instead of waiting for ever for an answer the store will not give.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_whose_upload_cannot_be_asked_about_are_written_again() {
    let server = S3Server::start();
    server.create_bucket("blind").await;
    let proxy = S3Proxy::start(&server, |request| match request.method.as_str() {
        "HEAD" => Proxied::AnswerCode(403, "AccessDenied"),
        // Every answer to the first object's uploads is lost: the sink gives up on it.
        "PUT" if request.path.contains("/e0-") => Proxied::PassThenAnswer(503),
        _ => Proxied::Pass,
    })
    .await;
    let sink = S3Sink::new(settings(
        &proxy.endpoint(),
        "blind",
        "linger_ms=0&timeout_ms=100",
    ))
    .expect("sink");
    let mut batch = events("e", 5);
    sink.write(&batch, 1)
        .await
        .expect_err("the answer was lost");
    for event in &mut batch {
        event.attempt = 2;
    }
    batch.reverse();
    sink.write(&batch, 2).await.expect("written again");
    assert!(proxy.seen().iter().any(|(r, _)| r.method == "HEAD"));
    let counts = id_counts(&stored(&server, "blind").await);
    assert_eq!(counts.len(), 5);
    assert!(
        counts.values().all(|&n| n == 2),
        "stored twice, the price of not being able to ask: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_ids_are_read_back_from_the_newest_objects() {
    let server = S3Server::start();
    server.create_bucket("back").await;
    let sink = S3Sink::new(settings(&server.endpoint(), "back", "linger_ms=0")).expect("sink");
    assert_eq!(
        sink.recent_ids(10).await.expect("empty bucket"),
        Vec::<String>::new()
    );
    let now = jiff::Timestamp::now().as_millisecond() as u64;
    for round in 0..3 {
        let mut batch = events(&format!("b{round}-"), 4);
        for event in &mut batch {
            event.timestamp_ms = now;
        }
        sink.write(&batch, 1).await.expect("written");
        // Objects a second apart, so their modification times order them.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let ids = sink.recent_ids(6).await.expect("read back");
    assert_eq!(ids, ["b1-2", "b1-3", "b2-0", "b2-1", "b2-2", "b2-3"]);
}

#[test]
fn the_quick_form_and_the_table_are_read_or_refused_by_name() {
    let s = S3Settings::from_url(
        "s3://my-events/raw/sensors/?endpoint=http://127.0.0.1:9000&gzip=false&linger_ms=50",
    )
    .expect("quick form");
    assert_eq!(
        (s.bucket.as_str(), s.prefix.as_str()),
        ("my-events", "raw/sensors")
    );
    assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
    assert!(!s.gzip);
    assert_eq!(s.linger, Duration::from_millis(50));
    assert_eq!(
        s.describe(),
        "s3://my-events/raw/sensors?endpoint=http://127.0.0.1:9000"
    );
    let refusal = |spec: &str| S3Settings::from_url(spec).expect_err(spec);
    assert!(refusal("s3://My_Bucket").contains("'My_Bucket' is not a bucket name"));
    assert!(refusal("s3://b-1/a//b").contains("segment ''"));
    assert!(refusal("s3://b-1?secret_access_key=x").contains("does not belong in a URL"));
    assert!(refusal("s3://b-1?bucket=x").contains("in the URL's path"));
    assert!(refusal("s3://b-1?endpoint=ftp://x").contains("not an http(s)://"));
    assert!(refusal("s3://b-1?max_events=0").contains("max_events is a whole number"));
    assert!(refusal("s3://b-1?colour=red").contains("no setting `colour`"));
    assert!(refusal("s3://b-1?access_key_id=a").contains("together, or neither"));
    let shown = format!(
        "{:?}",
        settings("http://127.0.0.1:1", "b-1", "").secret_access_key
    );
    assert!(!shown.contains(S3_SECRET_KEY), "{shown}");
}

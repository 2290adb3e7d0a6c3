//! Configuration: bad settings exit 64 naming the setting; environment names are honoured.

use std::time::Duration;

use crate::harness::{Spawn, ingest_one, sample_event};

/// Runs `spawn`, expects exit code 64 and stderr mentioning one of `names`.
async fn assert_rejected(spawn: Spawn, what: &str, names: &[&str]) {
    let (status, stderr) = spawn.run_to_exit(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(64),
        "{what}: exit status {status}; stderr:\n{stderr}"
    );
    assert!(
        names.iter().any(|name| stderr.contains(name)),
        "{what}: stderr should name {names:?}; it was:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_queue_size_from_env_exits_64() {
    assert_rejected(
        Spawn::new("run").env("QUEUE_SIZE", "abc"),
        "QUEUE_SIZE=abc",
        &["QUEUE_SIZE"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_queue_type_exits_64() {
    assert_rejected(
        Spawn::new("run").args(["--queue-type", "rabbit"]),
        "--queue-type rabbit",
        &["QUEUE_TYPE", "queue-type"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sink_spec_exits_64() {
    assert_rejected(
        Spawn::new("run").args(["--sink", "ftp:x"]),
        "--sink ftp:x",
        &["sink", "CONVEYOR_SINK"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_workers_exits_64() {
    assert_rejected(
        Spawn::new("run").args(["--workers", "0"]),
        "--workers 0",
        &["PROCESSOR_WORKERS", "workers"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ingest_url_exits_64() {
    assert_rejected(
        Spawn::new("gateway").args([
            "--ingest-url",
            "not a url",
            "--processor-url",
            "http://127.0.0.1:1",
        ]),
        "gateway --ingest-url 'not a url'",
        &["INGEST_URL", "ingest-url"],
    )
    .await;
    // Each problem is named: the scheme, the port, a missing host, extras a peer URL has not.
    for (url, problem) in [
        ("https://127.0.0.1:8081", "must start with http://"),
        ("http://127.0.0.1:99999", "invalid port"),
        ("http://", "empty host"),
        ("http://127.0.0.1:8081/?x=1", "plain http://host:port"),
    ] {
        assert_rejected(
            Spawn::new("gateway").args(["--ingest-url", url]),
            &format!("gateway --ingest-url {url}"),
            &["INGEST_URL", problem],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_environment_names_are_honoured() {
    let conveyor = Spawn::new("run")
        .without_listen_flags()
        .sink_from_env()
        .env("CONVEYOR_HOST", "127.0.0.1")
        .env("API_PORT", "0")
        .env("PROCESSOR_WORKERS", "2")
        .env("QUEUE_SIZE", "123")
        .start()
        .await;
    let status = conveyor.status().await;
    let processor = &status["processor"]["stats"];
    assert_eq!(
        processor["pool"]["workers"], 2,
        "PROCESSOR_WORKERS=2: status {status}"
    );
    assert_eq!(
        processor["queue"]["capacity"], 123,
        "QUEUE_SIZE=123: status {status}"
    );

    // CONVEYOR_SINK names the file the event is written to.
    let sample = sample_event("env", "cfg", 1, true);
    let id = ingest_one(&conveyor, &sample).await;
    conveyor.wait_sink_ids([&id], Duration::from_secs(20)).await;
}

#[tokio::test]
async fn bad_kafka_and_composite_settings_exit_64_naming_the_setting() {
    assert_rejected(
        Spawn::new("run")
            .env("QUEUE_TYPE", "kafka")
            .env("KAFKA_PRODUCER_CONFIG", "linger.ms=5,oops"),
        "KAFKA_PRODUCER_CONFIG without '='",
        &["KAFKA_PRODUCER_CONFIG", "oops"],
    )
    .await;
    assert_rejected(
        Spawn::new("run")
            .env("QUEUE_TYPE", "kafka")
            .env("KAFKA_CONSUMER_CONFIG", "no.such.setting=1"),
        "an unknown librdkafka setting",
        &["KAFKA_CONSUMER_CONFIG", "no.such.setting"],
    )
    .await;
    assert_rejected(
        Spawn::new("run")
            .env("QUEUE_TYPE", "kafka")
            .env("KAFKA_PARTITION_KEY", "sauce"),
        "KAFKA_PARTITION_KEY=sauce",
        &["KAFKA_PARTITION_KEY"],
    )
    .await;
    assert_rejected(
        Spawn::new("run")
            .env("QUEUE_TYPE", "composite")
            .env("COMPOSITE_PROVIDERS", "nats,nats"),
        "the same backend twice",
        &["COMPOSITE_PROVIDERS"],
    )
    .await;
    assert_rejected(
        Spawn::new("run")
            .env("QUEUE_TYPE", "composite")
            .env("COMPOSITE_PROVIDERS", "memory,nats"),
        "a backend that is not a broker",
        &["COMPOSITE_PROVIDERS", "broker"],
    )
    .await;
    assert_rejected(
        Spawn::new("run")
            .env("QUEUE_TYPE", "composite")
            .env("COMPOSITE_STRATEGY", "yolo"),
        "COMPOSITE_STRATEGY=yolo",
        &["COMPOSITE_STRATEGY"],
    )
    .await;
}

/// A role refuses the flags it would ignore: a processor takes no batch-size limit of the
/// doors, and a split-mode gateway (which leaves validation to ingest) no JSON depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_refuses_flags_it_would_ignore() {
    assert_rejected(
        Spawn::new("processor").args(["--max-batch-events", "5"]),
        "processor --max-batch-events",
        &["--max-batch-events"],
    )
    .await;
    assert_rejected(
        Spawn::new("gateway").args(["--max-json-depth", "5"]),
        "gateway --max-json-depth",
        &["--max-json-depth"],
    )
    .await;
}

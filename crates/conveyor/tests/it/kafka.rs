//! `QUEUE_TYPE=kafka` and `QUEUE_TYPE=composite` (issue #4) against a real Kafka-protocol
//! broker: each test starts its own tansu broker on a random port (conveyor-testkit) and
//! counts, over the sink(s), the accepted ids that were lost and the ids written twice.

use std::path::Path;
use std::time::Duration;

use conveyor_testkit::{KafkaBroker, NatsServer, free_port};
use serde_json::json;

use crate::delivery::{
    POISON_ARGS, assert_exactly_once, poison_goes_to_the_dlq_while_traffic_flows, send_batches,
    send_batches_to, sink_counts,
};
use crate::harness::{Conveyor, Spawn, eventually, read_sink_file};

/// Kafka settings every test uses: its own broker, and a short session timeout so the group
/// gives a killed processor's partitions to its successor within seconds.
fn kafka_env(spawn: Spawn, broker: &KafkaBroker) -> Spawn {
    spawn
        .env("QUEUE_TYPE", "kafka")
        .env("KAFKA_BROKERS", &broker.bootstrap())
        .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("KAFKA_PARTITIONS", "3")
}

async fn processor_at(broker: &KafkaBroker, port: u16, sink: &Path, extra: &[&str]) -> Conveyor {
    kafka_env(Spawn::new("processor"), broker)
        .without_listen_flags()
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(extra)
        .sink_at(sink)
        .start()
        .await
}

async fn gateway_for(ingest: &Conveyor, processors: &[&Conveyor]) -> Conveyor {
    let urls: Vec<&str> = processors.iter().map(|p| p.base_url()).collect();
    Spawn::new("gateway")
        .args([
            "--ingest-url",
            ingest.base_url(),
            "--processor-url",
            &urls.join(","),
        ])
        .start()
        .await
}

/// Waits until the consumer group's lag, summed over the partitions `/api/v1/status` shows,
/// is 0: every event's offset was committed. Returns that status.
async fn lag_reaches_zero(gateway: &Conveyor) -> serde_json::Value {
    eventually("the lag to reach 0", Duration::from_secs(30), async || {
        let (_, status) = gateway.get_json("/api/v1/status").await;
        let queue = &status["processor"]["stats"]["queue"];
        let lag: u64 = queue["partitions"]
            .as_array()
            .map(|ps| ps.iter().map(|p| p["lag"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(u64::MAX);
        if lag == 0 {
            Ok(status)
        } else {
            Err(queue.to_string())
        }
    })
    .await
}

/// The metric value of the sample line that starts with `series` (e.g. `name{labels}`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_sigkilled_five_times_mid_stream_loses_and_duplicates_nothing() {
    let broker = KafkaBroker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = dir.path().join("out.ndjson");
    let port = free_port();
    let mut processor = processor_at(&broker, port, &sink, &[]).await;
    // One record per batch: tansu answers a fetch from inside a stored batch with the next
    // batch, so a processor resuming mid-batch after a kill would never see the rest of it
    // (a broker bug; Apache Kafka returns the batch and the client skips to the offset).
    let ingest = kafka_env(Spawn::new("ingest"), &broker)
        .env("KAFKA_PRODUCER_CONFIG", "batch.num.messages=1")
        .start()
        .await;
    let gateway = gateway_for(&ingest, &[&processor]).await;

    let sending = tokio::spawn(send_batches_to(
        gateway.http().clone(),
        gateway.url("/api/v1/ingest/batch"),
        "kill",
        50_000,
        250,
        2,
    ));
    let mut kills = 0;
    while kills < 5 || !sending.is_finished() {
        // Let it join the group and write something (a restarted member gets partitions only
        // after the group dropped the killed one: the session timeout), then kill it in the
        // middle of its work.
        let before = read_sink_file(&sink).len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while read_sink_file(&sink).len() == before && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        processor.sigkill();
        let _ = processor.wait_exit(Duration::from_secs(10)).await;
        kills += 1;
        processor = processor_at(&broker, port, &sink, &[]).await;
        if kills >= 10 {
            break;
        }
    }
    let accepted = sending.await.expect("sender");
    assert!(kills >= 5, "the processor was killed {kills} times");
    assert_eq!(
        accepted.len(),
        50_000,
        "intake does not depend on the processor"
    );
    assert_exactly_once(&[&sink], &accepted, Duration::from_secs(180)).await;
    // The group's commits caught up with everything: no lag left on any partition.
    let status = lag_reaches_zero(&gateway).await;
    assert_eq!(
        status["processor"]["stats"]["queue"]["backend"], "kafka",
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_mode_on_kafka_dead_letters_a_poison_event_and_replays_it() {
    let broker = KafkaBroker::start();
    let conveyor = kafka_env(Spawn::new("run"), &broker)
        .args(POISON_ARGS)
        .start()
        .await;
    poison_goes_to_the_dlq_while_traffic_flows(&conveyor).await;
    // Its offset moved on only after it was dead-lettered: nothing lags.
    let status = lag_reaches_zero(&conveyor).await;
    assert!(status["processor"]["stats"]["queue"]["partitions"].is_array());
    // Replay takes it out of the topic and back into the queue (it fails again, and returns).
    let (code, report) = conveyor
        .post_json("/api/v1/dlq/replay", &json!({"ids": ["poison-1"]}))
        .await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["replayed"], 1, "{report}");
    // Replayed, it fails its attempts again and comes back to the DLQ topic: once.
    eventually(
        "the replayed poison event back in the DLQ",
        Duration::from_secs(30),
        async || {
            let (_, dlq) = conveyor.get_json("/api/v1/dlq").await;
            let retried = dlq["events"][0]["attempts"] == 3 && dlq["size"] == 1;
            if retried && conveyor.status().await["totals"]["dead_lettered"] == 2 {
                Ok(())
            } else {
                Err(dlq.to_string())
            }
        },
    )
    .await;
    assert!(!sink_counts(&[conveyor.sink_path()]).contains_key("poison-1"));
}

/// Starts NATS + tansu, a composite ingest with `strategy`, and returns what a test needs.
struct CompositeSetup {
    nats: NatsServer,
    kafka: KafkaBroker,
    ingest: Conveyor,
}

async fn composite_ingest(strategy: &str) -> CompositeSetup {
    let nats = NatsServer::start();
    let kafka = KafkaBroker::start();
    let ingest = composite_env(Spawn::new("ingest"), &nats, &kafka, strategy)
        .start()
        .await;
    CompositeSetup {
        nats,
        kafka,
        ingest,
    }
}

fn composite_env(spawn: Spawn, nats: &NatsServer, kafka: &KafkaBroker, strategy: &str) -> Spawn {
    kafka_env(spawn, kafka)
        .env("QUEUE_TYPE", "composite")
        .env("COMPOSITE_PROVIDERS", "nats,kafka")
        .env("COMPOSITE_STRATEGY", strategy)
        .env("NATS_URL", &nats.url())
        .env("CONVEYOR_NATS_ACK_WAIT_SECS", "2")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_with_both_backends_up_writes_the_same_events_to_each() {
    let setup = composite_ingest("fail-fast").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (nats_sink, kafka_sink) = (
        dir.path().join("nats.ndjson"),
        dir.path().join("kafka.ndjson"),
    );
    // The composite's processor consumes the primary (NATS)...
    let primary = composite_env(
        Spawn::new("processor"),
        &setup.nats,
        &setup.kafka,
        "fail-fast",
    )
    .sink_at(&nats_sink)
    .start()
    .await;
    // ...and a plain Kafka processor reads the copy, as the migration's new side would.
    let copy = processor_at(&setup.kafka, free_port(), &kafka_sink, &[]).await;
    let gateway = gateway_for(&setup.ingest, &[&primary]).await;
    let accepted = send_batches(&gateway, "dual", 5_000, 250, 2).await;
    assert_eq!(accepted.len(), 5_000);
    assert_exactly_once(&[&nats_sink], &accepted, Duration::from_secs(60)).await;
    assert_exactly_once(&[&kafka_sink], &accepted, Duration::from_secs(60)).await;
    let (_, metrics) = setup.ingest.get_raw("/metrics").await;
    for backend in ["nats\",role=\"primary", "kafka\",role=\"secondary"] {
        let series = format!("conveyor_composite_publishes_total{{backend=\"{backend}\"}}");
        assert_eq!(
            metric(&metrics, &series),
            Some(5000.0),
            "{series} in\n{metrics}"
        );
        let series = format!("conveyor_composite_divergence{{backend=\"{backend}\"}}");
        assert_eq!(
            metric(&metrics, &series),
            Some(0.0),
            "{series} in\n{metrics}"
        );
    }
    drop(copy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_with_a_secondary_down_fail_fast_refuses_and_best_effort_accepts() {
    for strategy in ["fail-fast", "best-effort"] {
        let mut setup = composite_ingest(strategy).await;
        let event =
            |i: usize| json!({"id": format!("{strategy}-{i}"), "source": "composite", "data": i});
        let (code, body) = setup.ingest.post_json("/ingest", &event(0)).await;
        assert_eq!(code, 202, "{strategy}, both up: {body}");
        setup.kafka.kill();
        // The ingest notices within its broker check (500 ms) or the delivery timeout.
        let answer = eventually(
            "publishes to react to the secondary being down",
            Duration::from_secs(30),
            async || {
                let (code, body) = setup.ingest.post_json("/ingest", &event(1)).await;
                let expected = if strategy == "fail-fast" { 503 } else { 202 };
                let (_, metrics) = setup.ingest.get_raw("/metrics").await;
                let failures = metric(
                    &metrics,
                    "conveyor_composite_failures_total{backend=\"kafka\",role=\"secondary\"}",
                )
                .unwrap_or(0.0);
                if code == expected && failures >= 1.0 {
                    Ok((code, body, metrics))
                } else {
                    Err(format!("{code} {body}, kafka failures {failures}"))
                }
            },
        )
        .await;
        let (_, body, metrics) = answer;
        if strategy == "fail-fast" {
            assert_eq!(body["error"]["code"], "unavailable", "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("kafka")),
                "the error names the backend: {body}"
            );
            let (ready, _) = setup.ingest.get_raw("/ready").await;
            assert_eq!(ready, 503, "fail-fast needs every backend");
        } else {
            assert_eq!(body["status"], "accepted", "{body}");
            let divergence = metric(
                &metrics,
                "conveyor_composite_divergence{backend=\"kafka\",role=\"secondary\"}",
            );
            assert!(divergence >= Some(1.0), "divergence shown: {metrics}");
            let (ready, _) = setup.ingest.get_raw("/ready").await;
            assert_eq!(ready, 200, "best-effort needs the primary only");
        }
        assert_eq!(
            metric(
                &metrics,
                "conveyor_composite_backend_healthy{backend=\"kafka\",role=\"secondary\"}"
            ),
            Some(0.0),
            "{metrics}"
        );
    }
}

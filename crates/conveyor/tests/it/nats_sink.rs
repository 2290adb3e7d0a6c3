//! The NATS sink end to end (issue #13): the real binary publishing processed events to a
//! subject on a second, real nats-server, checked by reading the target stream.

use std::collections::HashMap;
use std::time::Duration;

use conveyor_testkit::NatsServer;

use crate::delivery::SingleSenders;
use crate::harness::{Conveyor, NatsSplit, Spawn, eventually};
use crate::ledger::{Ledger, Verdict};

/// How often each id is in `stream` on `server` (by `Nats-Msg-Id`).
async fn stream_counts(server: &NatsServer, stream: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for message in server.stream_messages(stream).await {
        let id = message.msg_id.unwrap_or_else(|| "(no Nats-Msg-Id)".into());
        *counts.entry(id).or_default() += 1;
    }
    counts
}

/// Waits until every id `ledger` promised is in the stream, then checks for lost, duplicated
/// and unexpected messages.
async fn settled(server: &NatsServer, stream: &str, ledger: &Ledger, within: Duration) -> Verdict {
    let deadline = std::time::Instant::now() + within;
    loop {
        let verdict = ledger.check_counts(&stream_counts(server, stream).await);
        if verdict.lost.is_empty() || std::time::Instant::now() >= deadline {
            eprintln!("stream {stream}: {verdict}");
            return verdict;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until `/ready`'s detail shows the processor's sink healthy or not.
async fn sink_health(processor: &Conveyor, healthy: bool) {
    eventually(
        &format!("the sink to show healthy: {healthy}"),
        Duration::from_secs(20),
        async || {
            let (_, ready) = processor.get_json("/ready").await;
            let sink = &ready["sinks"]["default"];
            (sink["healthy"] == healthy)
                .then_some(())
                .ok_or(sink.to_string())
        },
    )
    .await;
}

/// Split mode on one NATS server, the sink on another. The processor is SIGKILLed three times
/// mid-stream, and the target broker is SIGKILLed too, so the processor's third life starts
/// while its target is down: every accepted event ends in the target stream exactly once (the
/// broker drops the re-publishes of events whose ack died with a processor, by Nats-Msg-Id),
/// and `/ready`'s detail shows the sink unhealthy while the target is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_target_stream_once_through_processor_and_broker_kills() {
    let queue = NatsServer::start();
    let mut target = NatsServer::start();
    let sink = format!("{}?subject=team.orders&stream=ORDERS", target.url());
    let mut split = NatsSplit::start(&queue.url(), &sink).await;

    let senders = SingleSenders::start(&split.gateway, "natssink", 2);
    for kill in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        split.kill_processor().await;
        if kill == 1 {
            // The target dies too, and the processor comes back while it is down.
            target.kill();
        }
        split.start_processor().await;
        if kill == 1 {
            sink_health(&split.processor, false).await;
            target.restart();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = senders.finish_accepted().await;
    let verdict = settled(&target, "ORDERS", &accepted, Duration::from_secs(120)).await;
    assert!(verdict.is_clean(), "{verdict}");

    // The messages are the records the pipeline produced.
    let stored = target.stream_messages("ORDERS").await;
    let record: serde_json::Value = serde_json::from_slice(&stored[0].payload).expect("JSON");
    assert_eq!(record["source"], "crash-test", "{record}");
    assert_eq!(
        record["id"].as_str(),
        stored[0].msg_id.as_deref(),
        "{record}"
    );
    sink_health(&split.processor, true).await;
}

/// A sink declared in the config file, with its own settings, and the quick form's mistakes
/// refused at start-up by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_nats_sink_publishes_events_and_a_bad_one_is_refused_by_name() {
    let target = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"
[defaults]
route = ["next"]

[sinks.next]
type = "nats"
url = "{}"
subject = "next.events"
stream = "NEXT"
timeout_ms = 2000
"#,
        target.url()
    );
    let conveyor = Spawn::new("run")
        .config_file(dir.path(), &config)
        .start()
        .await;
    let accepted = crate::delivery::send_batches(&conveyor, "cfg", 2_000, 200, 2).await;
    let verdict = settled(&target, "NEXT", &accepted, Duration::from_secs(60)).await;
    assert!(verdict.is_clean(), "{verdict}");
    let (_, status) = conveyor.get_json("/api/v1/status").await;
    let sink = &status["processor"]["stats"]["sinks"][0];
    assert_eq!(sink["name"], "next", "{status}");
    assert_eq!(
        sink["target"],
        format!("nats://127.0.0.1:{}?subject=next.events", target.port()),
        "{status}"
    );

    let (status, stderr) = Spawn::new("run")
        .sink_spec("nats://127.0.0.1:4222?subject=a.*")
        .run_to_exit(Duration::from_secs(20))
        .await;
    assert_eq!(status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("subject 'a.*' has a wildcard"), "{stderr}");
}

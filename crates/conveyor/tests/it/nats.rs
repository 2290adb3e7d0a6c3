//! `QUEUE_TYPE=nats` under faults (issue #3): each test starts its own `nats-server -js` on a
//! random port (conveyor-testkit) and counts, over the sink(s), the accepted ids that were lost
//! and the ids written more than once.

use std::path::Path;
use std::time::Duration;

use conveyor_testkit::{NatsServer, free_port};

use crate::delivery::{
    POISON_ARGS, SingleSenders, assert_exactly_once, event_body,
    poison_goes_to_the_dlq_while_traffic_flows, send_batches, send_batches_to,
};
use crate::harness::{Conveyor, Spawn, eventually, read_sink_file};

/// NATS settings every test uses: its own server, and a short AckWait so the broker
/// redelivers what a killed processor held within seconds.
fn nats_env(spawn: Spawn, server: &NatsServer) -> Spawn {
    spawn
        .env("QUEUE_TYPE", "nats")
        .env("NATS_URL", &server.url())
        .env("CONVEYOR_NATS_ACK_WAIT_SECS", "2")
}

/// A processor on a fixed port (so a restarted one answers at the same URL) writing `sink`.
async fn processor_at(server: &NatsServer, port: u16, sink: &Path, extra: &[&str]) -> Conveyor {
    nats_env(Spawn::new("processor"), server)
        .without_listen_flags()
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(extra)
        .sink_at(sink)
        .start()
        .await
}

async fn nats_ingest_and_gateway(
    server: &NatsServer,
    processors: &[&Conveyor],
) -> (Conveyor, Conveyor) {
    let ingest = nats_env(Spawn::new("ingest"), server).start().await;
    let gateway = Spawn::gateway_for(&ingest, processors).start().await;
    (ingest, gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_events_without_faults_arrive_exactly_once() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = dir.path().join("out.ndjson");
    let processor = processor_at(&server, free_port(), &sink, &[]).await;
    let (_ingest, gateway) = nats_ingest_and_gateway(&server, &[&processor]).await;

    let accepted = send_batches(&gateway, "clean", 100_000, 1000, 4).await;
    assert_eq!(accepted.len(), 100_000, "every event was accepted");
    assert_exactly_once(&[&sink], &accepted, Duration::from_secs(120)).await;

    let status = eventually("totals to settle", Duration::from_secs(20), async || {
        let (_, status) = gateway.get_json("/api/v1/status").await;
        if status["totals"]["processed"] == 100_000 {
            Ok(status)
        } else {
            Err(status["totals"].to_string())
        }
    })
    .await;
    assert_eq!(status["totals"]["accepted"], 100_000, "{status}");
    assert_eq!(
        status["processor"]["stats"]["queue"]["backend"], "nats",
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_sigkilled_five_times_mid_stream_loses_and_duplicates_nothing() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = dir.path().join("out.ndjson");
    let port = free_port();
    let mut processor = processor_at(&server, port, &sink, &[]).await;
    let (_ingest, gateway) = nats_ingest_and_gateway(&server, &[&processor]).await;

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
        // Let it get some work in hand, then kill it in the middle of it.
        tokio::time::sleep(Duration::from_millis(600)).await;
        processor.sigkill();
        let _ = processor.wait_exit(Duration::from_secs(10)).await;
        kills += 1;
        processor = processor_at(&server, port, &sink, &[]).await;
        if kills >= 12 {
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
    assert_exactly_once(&[&sink], &accepted, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkilled_during_intake_loses_no_accepted_event_and_clients_get_503() {
    let mut server = NatsServer::start();
    let conveyor = nats_env(Spawn::new("run"), &server).start().await;
    let senders = SingleSenders::start(&conveyor, "outage", 8);
    let unavailable = || senders.answers().refused_at.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.kill();
    eventually(
        "clients to get 503 while the broker is down",
        Duration::from_secs(20),
        async || {
            let n = unavailable();
            if n >= 10 {
                Ok(())
            } else {
                Err(format!("{n} so far"))
            }
        },
    )
    .await;
    let (ready, _) = conveyor.get_json("/ready").await;
    let during = unavailable();
    server.restart();
    // Intake resumes by itself.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let answers = senders.finish().await;
    assert!(
        answers.wrong.is_empty(),
        "answers other than 202/503: {:?}",
        answers.wrong
    );
    assert_eq!(
        answers.refusal_codes.keys().collect::<Vec<_>>(),
        ["unavailable"],
        "a broker outage is 503 unavailable"
    );
    let accepted = answers.ledger;
    assert!(during > 0, "clients got 503 during the outage");
    assert_eq!(ready, 503, "/ready reports the broker outage");
    let sink = conveyor.sink_path().to_owned();
    assert_exactly_once(&[&sink], &accepted, Duration::from_secs(60)).await;
    let after = eventually(
        "intake to accept again after the broker returned",
        Duration::from_secs(20),
        async || {
            let (code, body) = conveyor
                .post_json("/api/v1/ingest", &event_body("outage-after", 0))
                .await;
            if code == 202 {
                Ok(body)
            } else {
                Err(format!("{code}: {body}"))
            }
        },
    )
    .await;
    assert_eq!(after["status"], "accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_goes_to_the_dlq_after_max_attempts_while_traffic_flows() {
    let server = NatsServer::start();
    let conveyor = nats_env(Spawn::new("run"), &server)
        .args(POISON_ARGS)
        .start()
        .await;
    poison_goes_to_the_dlq_while_traffic_flows(&conveyor).await;
}

/// Issue #17, defect 4: in a rolling restart, what the stopped processor had prefetched but not
/// started goes to the running one at once (the stopping processor `-NAK`s it), not after
/// AckWait. AckWait is the production default here, 30 s, so holding on to it shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_processor_gives_back_what_it_prefetched_at_once() {
    let server = NatsServer::start();
    let long_ack_wait =
        |role| nats_env(Spawn::new(role), &server).env("CONVEYOR_NATS_ACK_WAIT_SECS", "30");
    let dir = tempfile::tempdir().expect("tempdir");
    let (survivor_sink, stopped_sink) = (
        dir.path().join("survivor.ndjson"),
        dir.path().join("stopped.ndjson"),
    );
    let survivor = long_ack_wait("processor")
        .sink_at(&survivor_sink)
        .start()
        .await;
    // One slow worker: it pulls a batch ahead (256) and works through it a few events a second.
    let mut stopping = long_ack_wait("processor")
        .args([
            "--workers",
            "1",
            "--batch-size",
            "4",
            "--stage",
            "cpu:100000",
        ])
        .sink_at(&stopped_sink)
        .start()
        .await;
    let ingest = long_ack_wait("ingest").start().await;
    let gateway = Spawn::gateway_for(&ingest, &[&survivor]).start().await;
    let accepted = send_batches(&gateway, "prefetched", 5_000, 250, 2).await;
    assert_eq!(accepted.len(), 5_000);
    // Everything is delivered to one processor or the other, and the fast one is done with its
    // share: what is still unacknowledged is what the slow one holds.
    let held = eventually(
        "the stream to be handed out, and only the slow processor to hold events",
        Duration::from_secs(60),
        async || {
            let queue = &gateway.status().await["processor"]["stats"]["queue"];
            let (waiting, in_flight) = (queue["size"].as_u64(), queue["in_flight"].as_u64());
            let written =
                read_sink_file(&survivor_sink).len() + read_sink_file(&stopped_sink).len();
            match (waiting, in_flight) {
                (Some(0), Some(held)) if written as u64 + held == 5_000 => Ok(held),
                _ => Err(format!("{queue} ({written} written)")),
            }
        },
    )
    .await;
    // Any held event would wait out AckWait without the give-back; a handful shows it.
    assert!(
        held >= 10,
        "the slow processor held only {held} events when it was stopped: slow its stage down"
    );
    stopping.sigterm();
    let signalled = tokio::time::Instant::now();
    let status = stopping.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "a SIGTERMed processor exits 0: {status}");
    let exited = signalled.elapsed();
    let gap = eventually(
        "every accepted event to be written",
        Duration::from_secs(60),
        async || {
            let written =
                read_sink_file(&survivor_sink).len() + read_sink_file(&stopped_sink).len();
            if written >= accepted.len() {
                Ok(signalled.elapsed())
            } else {
                Err(format!("{written} of {} written", accepted.len()))
            }
        },
    )
    .await;
    eprintln!(
        "prefetched: the stopped processor held {held} events, exited {exited:?} after its \
         SIGTERM; all written {gap:?} after it (AckWait 30 s)"
    );
    assert!(
        gap < Duration::from_secs(10),
        "the last events were written {gap:?} after the SIGTERM: the stopped processor's \
         prefetched events waited for AckWait instead of being given back"
    );
    assert_exactly_once(
        &[&survivor_sink, &stopped_sink],
        &accepted,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processors_split_one_stream_and_each_event_is_processed_once() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let sinks: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("p{i}.ndjson")))
        .collect();
    let mut processors = Vec::new();
    for sink in &sinks {
        // Small pulls, so no processor can take the whole backlog in one request.
        processors.push(processor_at(&server, free_port(), sink, &["--batch-size", "32"]).await);
    }
    let refs: Vec<&Conveyor> = processors.iter().collect();
    let (_ingest, gateway) = nats_ingest_and_gateway(&server, &refs).await;
    let accepted = send_batches(&gateway, "spread", 30_000, 500, 2).await;
    let sink_refs: Vec<&Path> = sinks.iter().map(|p| p.as_path()).collect();
    assert_exactly_once(&sink_refs, &accepted, Duration::from_secs(120)).await;
    for (i, sink) in sinks.iter().enumerate() {
        let share = read_sink_file(sink).len();
        assert!(
            share >= 1_500,
            "processor {i} processed only {share} of 30000: the work is not spread"
        );
    }
}

/// The largest batch a client may send (10,000 events, more than the 4,096 publishes the NATS
/// backend keeps in flight), several at once: every one is accepted and processed. Each batch
/// once held part of the in-flight bound while waiting for the rest, so they waited for each
/// other for ever and intake stopped for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_larger_than_the_in_flight_bound_are_accepted_and_processed() {
    let server = NatsServer::start();
    let conveyor = nats_env(Spawn::new("run"), &server).start().await;
    let accepted = tokio::time::timeout(
        Duration::from_secs(90),
        send_batches(&conveyor, "huge", 40_000, 10_000, 3),
    )
    .await
    .expect("the batches were answered");
    assert_eq!(accepted.len(), 40_000);
    let sink = conveyor.sink_path();
    let verdict = eventually(
        "every event processed",
        Duration::from_secs(60),
        async || {
            let verdict = accepted.check(&[sink]);
            if verdict.lost.is_empty() {
                Ok(verdict)
            } else {
                Err(verdict.to_string())
            }
        },
    )
    .await;
    assert!(verdict.is_clean(), "{verdict}");
}

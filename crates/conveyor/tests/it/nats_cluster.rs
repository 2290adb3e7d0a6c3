//! A replicated NATS JetStream losing nodes (issue #17): three `nats-server` processes routed
//! into one cluster (conveyor-testkit's `NatsCluster`), the stream and its consumer with three
//! replicas, conveyor pointed at all three with a comma-separated `NATS_URL`. Nodes are
//! SIGKILLed while eight clients send and a processor consumes: every accepted event must reach
//! the sink exactly once, clients may see a short burst of 503s and nothing else, and the
//! status and readiness pages must say what the cluster is going through.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use conveyor_testkit::{NatsCluster, NatsServer, free_port};
use serde_json::Value;

use crate::delivery::{Answers, SingleSenders, assert_exactly_once, event_body, send_batches_to};
use crate::harness::{Conveyor, Spawn, eventually};

const STREAM: &str = "CONVEYOR";
/// Clients sending at once, each one event per request.
const CLIENTS: usize = 8;
/// The longest pause a node loss may cost. This bounds the behaviour (intake comes back by
/// itself), not a speed: a leader's SIGKILL typically costs 4–6 s here, but killing the new
/// leader while the restarted node still catches up waits for that node (the only other
/// replica that can make a quorum), 25 s once on a loaded CI run. The measured pauses are
/// printed.
const MAX_UNAVAILABLE: Duration = Duration::from_secs(60);

fn cluster_env(spawn: Spawn, cluster: &NatsCluster) -> Spawn {
    spawn
        .env("QUEUE_TYPE", "nats")
        .env("NATS_URL", &cluster.urls())
        .env("CONVEYOR_NATS_REPLICAS", "3")
        // A redelivery of what a lost ack left unacked comes within seconds.
        .env("CONVEYOR_NATS_ACK_WAIT_SECS", "2")
}

/// A processor, an ingest and a gateway on the cluster.
struct System {
    processor: Conveyor,
    ingest: Conveyor,
    gateway: Conveyor,
    sink: PathBuf,
    _dir: tempfile::TempDir,
}

async fn start_system(cluster: &NatsCluster) -> System {
    let dir = tempfile::tempdir().expect("tempdir");
    let sink = dir.path().join("out.ndjson");
    let processor = cluster_env(Spawn::new("processor"), cluster)
        .sink_at(&sink)
        .start()
        .await;
    let ingest = cluster_env(Spawn::new("ingest"), cluster).start().await;
    let gateway = Spawn::gateway_for(&ingest, &[&processor]).start().await;
    System {
        processor,
        ingest,
        gateway,
        sink,
        _dir: dir,
    }
}

/// Eight clients retrying the same event after a 503 (see [`SingleSenders`]).
struct Clients(SingleSenders);

impl Clients {
    fn start(gateway: &Conveyor, tag: &'static str) -> Clients {
        Clients(SingleSenders::start(gateway, tag, CLIENTS))
    }

    fn accepted(&self) -> usize {
        self.0.answers().ledger.len()
    }

    /// SIGKILLs `node`, then waits until intake is steady again (see `wait_until_steady`).
    async fn kill_and_wait(
        &self,
        cluster: &mut NatsCluster,
        node: usize,
        steady: Duration,
        what: &str,
    ) -> Outage {
        let killed_at = self.now();
        cluster.kill(node);
        self.wait_until_steady(killed_at, steady, what).await
    }

    /// Waits until the clients have 200 events accepted: the system is flowing.
    async fn get_going(&self) {
        eventually(
            "clients to get going",
            Duration::from_secs(30),
            async || {
                (self.accepted() >= 200)
                    .then_some(())
                    .ok_or_else(|| format!("{} accepted", self.accepted()))
            },
        )
        .await;
    }

    fn now(&self) -> Duration {
        self.0.now()
    }

    /// Waits until intake is steady again after an outage that began at `since`: for the last
    /// `steady`, no refusal and every client accepted about once at least. Returns the outage:
    /// the longest time after `since` in which no client got a 202 (a request hanging on a
    /// PubAck counts, not only a 503), and the span of the 503s.
    async fn wait_until_steady(&self, since: Duration, steady: Duration, what: &str) -> Outage {
        let deadline = Instant::now() + MAX_UNAVAILABLE + Duration::from_secs(30);
        loop {
            let now = self.now();
            let outage = {
                let seen = self.0.answers();
                let recent = now.saturating_sub(steady);
                let quiet = seen.refused_at.iter().all(|t| *t < recent);
                let flowing = seen.accepted_at.iter().filter(|t| **t >= recent).count();
                (now > since + steady && quiet && flowing >= CLIENTS).then(|| {
                    let mut accepted: Vec<Duration> = seen
                        .accepted_at
                        .iter()
                        .copied()
                        .filter(|t| *t >= since)
                        .collect();
                    accepted.sort();
                    let mut gap = Duration::ZERO;
                    let mut previous = since;
                    for t in accepted {
                        gap = gap.max(t - previous);
                        previous = t;
                    }
                    let refused: Vec<Duration> = seen
                        .refused_at
                        .iter()
                        .copied()
                        .filter(|t| *t >= since)
                        .collect();
                    let span = match (refused.iter().min(), refused.iter().max()) {
                        (Some(first), Some(last)) => *last - *first,
                        _ => Duration::ZERO,
                    };
                    Outage {
                        gap,
                        refused_span: span,
                        refused: refused.len(),
                    }
                })
            };
            if let Some(outage) = outage {
                return outage;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: intake did not become steady again by itself within {:?}",
                MAX_UNAVAILABLE + Duration::from_secs(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn finish(self) -> Answers {
        self.0.finish().await
    }
}

/// The node leading `STREAM` now (asked of the cluster itself).
async fn leader_node(cluster: &NatsCluster) -> usize {
    let name = eventually(
        "the stream to have a leader",
        Duration::from_secs(30),
        async || {
            cluster
                .stream_leader(STREAM)
                .await
                .ok_or_else(|| "no leader yet".to_owned())
        },
    )
    .await;
    cluster
        .node_named(&name)
        .expect("the leader is a node of the cluster")
}

/// What one node loss cost the clients.
struct Outage {
    /// The longest stretch with no 202 for any client.
    gap: Duration,
    /// From the first 503/429 to the last.
    refused_span: Duration,
    refused: usize,
}

impl Outage {
    fn report(&self, what: &str) {
        println!(
            "{what}: no 202 for {:.2} s; {} answers 503/429 across {CLIENTS} clients over {:.2} s",
            self.gap.as_secs_f64(),
            self.refused,
            self.refused_span.as_secs_f64()
        );
        assert!(
            self.gap < MAX_UNAVAILABLE,
            "{what}: intake stopped for {:?}",
            self.gap
        );
    }
}

/// After the clients stopped: no wrong answer, a short burst at most, intake resumed, every
/// accepted event (and a final batch run) in the sink exactly once.
async fn assert_delivered(system: &System, seen: Answers, after_tag: &'static str) {
    assert!(
        seen.wrong.is_empty(),
        "answers other than 202/503/429: {:?}",
        &seen.wrong[..seen.wrong.len().min(5)]
    );
    // Intake is steady again: a batch run through the same gateway is accepted whole.
    let more = send_batches_to(
        system.gateway.http().clone(),
        system.gateway.url("/api/v1/ingest/batch"),
        after_tag,
        2_000,
        100,
        2,
    )
    .await;
    assert_eq!(more.len(), 2_000, "a steady cluster accepts every event");
    seen.ledger.absorb(&more);
    assert_exactly_once(&[&system.sink], &seen.ledger, Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_stream_leader_costs_a_short_burst_of_503s_and_no_event() {
    let mut cluster = NatsCluster::start().await;
    let system = start_system(&cluster).await;
    let clients = Clients::start(&system.gateway, "leader");
    clients.get_going().await;

    let leader = leader_node(&cluster).await;
    let outage = clients
        .kill_and_wait(
            &mut cluster,
            leader,
            Duration::from_secs(3),
            "after the leader's SIGKILL",
        )
        .await;
    let new_leader = leader_node(&cluster).await;
    assert_ne!(new_leader, leader, "a running node leads now");
    let seen = clients.finish().await;
    outage.report(&format!(
        "SIGKILL of stream leader {}",
        cluster.name(leader)
    ));
    assert_delivered(&system, seen, "leader-after").await;
    assert!(
        !system.processor.stderr_tail().contains("panicked"),
        "{}",
        system.processor.stderr_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_still_catching_up_and_another_node_killed_lose_no_event() {
    let mut cluster = NatsCluster::start().await;
    let system = start_system(&cluster).await;
    let clients = Clients::start(&system.gateway, "rejoin");
    clients.get_going().await;

    // The worst order: the leader dies; once intake is back it is restarted with its store,
    // and while it still catches up on what it missed, the new leader dies too.
    let first = leader_node(&cluster).await;
    let first_outage = clients
        .kill_and_wait(
            &mut cluster,
            first,
            Duration::from_secs(2),
            "after the first SIGKILL",
        )
        .await;
    cluster.restart(first);
    let second = leader_node(&cluster).await;
    assert_ne!(second, first);
    let second_outage = clients
        .kill_and_wait(
            &mut cluster,
            second,
            Duration::from_secs(3),
            "after the second SIGKILL",
        )
        .await;
    let seen = clients.finish().await;
    first_outage.report(&format!("SIGKILL of leader {}", cluster.name(first)));
    second_outage.report(&format!(
        "SIGKILL of leader {} while {} rejoined",
        cluster.name(second),
        cluster.name(first)
    ));
    cluster.restart(second);
    assert_delivered(&system, seen, "rejoin-after").await;
}

/// `/api/v1/status`'s view of the stream's cluster (from the processor's queue stats), and
/// the processor's and ingest's `/ready`.
struct View {
    cluster: Value,
    processor_ready: u16,
    processor_reason: String,
    ingest_ready: u16,
}

async fn view(system: &System) -> View {
    let (_, status) = system.gateway.get_json("/api/v1/status").await;
    let (processor_ready, ready) = system.processor.get_json("/ready").await;
    let (ingest_ready, _) = system.ingest.get_json("/ready").await;
    View {
        cluster: status["processor"]["stats"]["queue"]["cluster"].clone(),
        processor_ready,
        processor_reason: ready["reason"].as_str().unwrap_or("").to_owned(),
        ingest_ready,
    }
}

fn replica<'a>(cluster: &'a Value, name: &str) -> Option<&'a Value> {
    cluster["replicas"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

/// Waits until `check` holds for the reported view; asserts on every view on the way that a
/// killed node is never reported as the leader.
async fn wait_view(
    system: &System,
    down: &[&str],
    what: &str,
    check: impl Fn(&View) -> bool,
) -> View {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let seen = view(system).await;
        if let Some(leader) = seen.cluster["leader"].as_str() {
            assert!(
                !down.contains(&leader),
                "status reports killed node {leader} as the stream's leader: {}",
                seen.cluster
            );
        }
        if check(&seen) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never reported; last cluster {} processor /ready {} {:?} ingest /ready {}",
            seen.cluster,
            seen.processor_ready,
            seen.processor_reason,
            seen.ingest_ready
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_ready_report_the_clusters_state_as_nodes_die_and_return() {
    let mut cluster = NatsCluster::start().await;
    let system = start_system(&cluster).await;
    let names: Vec<String> = (0..cluster.len())
        .map(|n| cluster.name(n).to_owned())
        .collect();

    // All three up: the leader JetStream names, two current followers, ready.
    let leader = leader_node(&cluster).await;
    let healthy = wait_view(&system, &[], "a healthy cluster", |v| {
        v.cluster["leader"] == names[leader]
            && v.cluster["replicas"].as_array().is_some_and(|r| {
                r.len() == 2
                    && r.iter()
                        .all(|r| r["current"] == true && r["offline"] == false)
            })
            && v.processor_ready == 200
            && v.ingest_ready == 200
    })
    .await;
    assert_eq!(
        healthy.cluster["replicas"].as_array().map(Vec::len),
        Some(2)
    );

    // A follower dies: still a quorum, so still ready, and the status names it as not current.
    let follower = (0..cluster.len())
        .find(|n| *n != leader)
        .expect("a follower");
    cluster.kill(follower);
    let down = [names[follower].as_str()];
    wait_view(&system, &down, "the dead follower", |v| {
        replica(&v.cluster, &names[follower])
            .is_some_and(|r| r["current"] == false || r["offline"] == true)
            && v.cluster["leader"] == names[leader]
            && v.processor_ready == 200
            && v.ingest_ready == 200
    })
    .await;

    // The leader dies too: one node of three, no quorum, no leader. Not ready, and the reason
    // names the stream; the status shows no leader rather than a stale one.
    cluster.kill(leader);
    let down = [names[follower].as_str(), names[leader].as_str()];
    let lost = wait_view(&system, &down, "the lost quorum", |v| {
        v.processor_ready == 503 && v.ingest_ready == 503 && v.cluster["leader"].is_null()
    })
    .await;
    assert!(
        lost.processor_reason.contains(STREAM),
        "/ready names the stream: {:?}",
        lost.processor_reason
    );

    // Both come back with their stores: a leader again, every follower current, ready.
    cluster.restart(leader);
    cluster.restart(follower);
    wait_view(&system, &[], "the healed cluster", |v| {
        v.cluster["leader"].is_string()
            && v.cluster["replicas"].as_array().is_some_and(|r| {
                r.len() == 2
                    && r.iter()
                        .all(|r| r["current"] == true && r["offline"] == false)
            })
            && v.processor_ready == 200
            && v.ingest_ready == 200
    })
    .await;
    let (code, body) = system
        .gateway
        .post_json("/api/v1/ingest", &event_body("healed", 0))
        .await;
    assert_eq!(code, 202, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_url_takes_a_server_list_and_connects_past_a_dead_entry() {
    let server = NatsServer::start();
    // The first entry is a port nobody listens on: the client must go on to the next.
    let list = format!("nats://127.0.0.1:{},{}", free_port(), server.url());
    let run = Spawn::new("run")
        .env("QUEUE_TYPE", "nats")
        .env("NATS_URL", &list)
        .start()
        .await;
    let (code, body) = run
        .post_json("/api/v1/ingest", &event_body("listed", 0))
        .await;
    assert_eq!(code, 202, "{body}");
    run.wait_sink_len(1, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_in_the_nats_server_list_exits_64_naming_it() {
    let (status, stderr) = Spawn::new("processor")
        .env("QUEUE_TYPE", "nats")
        .env("NATS_URL", "nats://127.0.0.1:4222,nats://127.0.0.1:42x2")
        .run_to_exit(Duration::from_secs(20))
        .await;
    assert_eq!(status.code(), Some(64), "stderr:\n{stderr}");
    assert!(
        stderr.contains("NATS_URL") && stderr.contains("nats://127.0.0.1:42x2"),
        "the message names the setting and the bad entry: {stderr}"
    );
}

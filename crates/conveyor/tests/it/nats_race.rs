//! Roles that start together (issue #17, defect 3): on a fresh `nats-server`, three processors
//! and two ingests of the real binary started at the same moment race to create the stream,
//! the DLQ stream and the durable consumer. Every one must come up ready, twenty times over.

use std::time::Duration;

use conveyor_testkit::NatsServer;

use crate::harness::{Spawn, eventually};

const ROUNDS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_roles_started_at_once_on_a_fresh_server_all_come_up_ready_twenty_times() {
    for round in 0..ROUNDS {
        let server = NatsServer::start();
        let starting = ["processor", "processor", "processor", "ingest", "ingest"].map(|role| {
            Spawn::new(role)
                .env("QUEUE_TYPE", "nats")
                .env("NATS_URL", &server.url())
                .start()
        });
        // Polled together, so the five processes are spawned within microseconds. A role that
        // exits at start-up fails here with its stderr.
        let roles = futures_util::future::join_all(starting).await;
        for role in &roles {
            eventually(
                &format!("round {round}: {} to be ready", role.base_url()),
                Duration::from_secs(20),
                async || {
                    let (code, body) = role.get_json("/ready").await;
                    if code == 200 {
                        Ok(())
                    } else {
                        Err(body.to_string())
                    }
                },
            )
            .await;
        }
    }
}

//! Roles that start together (issue #17, defect 3): many `NatsQueue::connect` and
//! `NatsDeadLetters::open` at the same moment against a fresh server all come up, and agree on
//! one stream, one DLQ stream and one durable consumer with conveyor's settings.

use std::time::Duration;

use async_nats::jetstream::consumer::AckPolicy;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy};
use conveyor_queue_nats::{NatsConfig, NatsDeadLetters, NatsQueue};
use conveyor_testkit::NatsServer;

/// Concurrent connects per round: more than the five roles of a typical deployment, so the
/// server sees several creates of the same stream inside one round trip.
const RACERS: usize = 12;
const ROUNDS: usize = 20;

fn config(server: &NatsServer) -> NatsConfig {
    NatsConfig {
        url: server.url(),
        ack_wait: Duration::from_secs(5),
        capacity: 10_000,
        ..NatsConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connects_at_once_on_a_fresh_server_all_converge() {
    for round in 0..ROUNDS {
        let server = NatsServer::start();
        let config = config(&server);
        let racers = (0..RACERS).map(|_| {
            let config = config.clone();
            tokio::spawn(async move {
                let queue = NatsQueue::connect(config.clone()).await?;
                NatsDeadLetters::open(queue.jetstream().clone(), &config).await?;
                Ok::<_, String>(queue)
            })
        });
        let results = futures_util::future::join_all(racers).await;
        let failures: Vec<String> = results
            .iter()
            .filter_map(|r| match r {
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some(e.clone()),
                Err(panic) => Some(format!("panicked: {panic}")),
            })
            .collect();
        assert!(
            failures.is_empty(),
            "round {round}: {} of {RACERS} connects failed, e.g. {:?}",
            failures.len(),
            &failures[..failures.len().min(3)]
        );

        // What they converged on is one stream of each kind with conveyor's settings.
        let queue = results
            .into_iter()
            .next()
            .and_then(|r| r.ok())
            .and_then(|r| r.ok());
        let js = queue.expect("a connected queue").jetstream().clone();
        let mut stream = js.get_stream(&config.stream).await.expect("the stream");
        let info = stream.info().await.expect("stream info").clone();
        assert_eq!(info.config.retention, RetentionPolicy::WorkQueue);
        assert_eq!(info.config.discard, DiscardPolicy::New);
        assert_eq!(info.config.subjects, std::slice::from_ref(&config.subject));
        assert_eq!(info.config.max_messages, 10_000);
        let consumer = stream
            .consumer_info(&config.consumer)
            .await
            .expect("the durable consumer");
        assert_eq!(consumer.config.ack_policy, AckPolicy::Explicit);
        assert_eq!(consumer.config.ack_wait, Duration::from_secs(5));
        let dlq = js
            .get_stream(&config.dlq_stream)
            .await
            .expect("the DLQ stream");
        assert_eq!(
            dlq.cached_info().config.subjects,
            std::slice::from_ref(&config.dlq_subject)
        );
        let mut names = js.stream_names();
        let mut count = 0;
        while let Some(name) = futures_util::StreamExt::next(&mut names).await {
            name.expect("stream name");
            count += 1;
        }
        assert_eq!(
            count, 2,
            "round {round}: exactly the work queue and the DLQ"
        );
    }
}

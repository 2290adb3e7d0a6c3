//! librdkafka's in-process mock cluster as a test fixture: a Kafka-protocol broker with real
//! consumer-group semantics (joins, syncs, heartbeats, session expiry) and no binary to
//! install. It listens on a loopback port, so processes started by a test can use it too.

/// An in-process mock Kafka cluster, owned by a thread of its own (its handle cannot move
/// between threads); dropped, with its topics, when the guard is.
pub struct MockKafka {
    bootstrap: String,
    _stop: std::sync::mpsc::Sender<()>,
}

impl MockKafka {
    /// Starts a one-broker cluster holding `topics` (name, partitions). The mock does not
    /// implement CreateTopics, so a test names the topics conveyor would create.
    pub fn start(topics: &[(&str, i32)]) -> MockKafka {
        let topics: Vec<(String, i32)> = topics.iter().map(|(t, p)| (t.to_string(), *p)).collect();
        let (ready, bootstrap) = std::sync::mpsc::channel();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
            for (topic, partitions) in &topics {
                cluster
                    .create_topic(topic, *partitions, 1)
                    .expect("mock topic");
            }
            ready.send(cluster.bootstrap_servers()).expect("report");
            // Blocks until the guard (the sender) is dropped.
            let _ = stopped.recv();
        });
        MockKafka {
            bootstrap: bootstrap.recv().expect("mock cluster started"),
            _stop: stop,
        }
    }

    /// The cluster's `bootstrap.servers`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }
}

//! Test fixtures shared by the backend crates and the end-to-end tests.
//!
//! [`NatsServer`] starts a private `nats-server -js` on a free port with its own store
//! directory, so tests never share a broker, a stream or a port, and kills it on drop;
//! [`NatsCluster`] starts three of them routed into one JetStream cluster (for replicated
//! streams and node loss); [`KafkaBroker`] does the same with a tansu broker (Kafka protocol, in-memory storage). A test
//! that cannot find the binary fails with a message saying how to get it: there is no silent
//! skip. [`TestDatabase`] is a PostgreSQL database of a test's own; [`TcpGate`] makes a server
//! unreachable and reachable again; [`WebhookReceiver`] is an HTTP receiver answering as a
//! test's script says; [`S3Server`] is a private S3 server (moto) and [`S3Proxy`] a scripted
//! proxy in front of it.

pub mod bench;
mod gate;
mod postgres;
mod s3;
mod webhook;

pub use gate::TcpGate;
pub use postgres::{TestDatabase, psql};
pub use s3::{
    Proxied, ProxiedRequest, S3_ACCESS_KEY, S3_SECRET_KEY, S3Proxy, S3Server, find_moto_server,
};
pub use webhook::{Received, Reply, WebhookReceiver};

use std::future::Future;
use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// A `nats-server` with JetStream for one test.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    binary: PathBuf,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> NatsServer {
        let binary = find_nats_server();
        let store = tempfile::tempdir().expect("temp dir for the JetStream store");
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store,
            binary,
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// SIGKILL: the broker dies without a chance to flush (what a crash looks like).
    pub fn kill(&mut self) {
        stop(&mut self.child);
    }

    /// Starts again on the same port with the same store: what was durable comes back.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(15));
    }
}

/// A message as a stream stores it: its `Nats-Msg-Id` (if any), headers and payload.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub msg_id: Option<String>,
    pub headers: async_nats::HeaderMap,
    pub payload: Vec<u8>,
}

impl NatsServer {
    /// Every message `stream` holds now, oldest first (empty when there is no such stream).
    pub async fn stream_messages(&self, stream: &str) -> Vec<StoredMessage> {
        let client = async_nats::connect(self.url())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url()));
        let js = async_nats::jetstream::new(client);
        let Ok(mut found) = js.get_stream(stream).await else {
            return Vec::new();
        };
        let state = found.info().await.expect("stream info").state.clone();
        let mut messages = Vec::with_capacity(state.messages as usize);
        for sequence in state.first_sequence..=state.last_sequence {
            // A gap (a message deleted or acked away in a work queue) is not an error here.
            if let Ok(message) = found.get_raw_message(sequence).await {
                messages.push(StoredMessage {
                    msg_id: message
                        .headers
                        .get("Nats-Msg-Id")
                        .map(|v| v.as_str().to_owned()),
                    headers: message.headers,
                    payload: message.payload.to_vec(),
                });
            }
        }
        messages
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the broker did not listen on port {port} within {timeout:?}"
        );
        #[expect(
            clippy::disallowed_methods,
            reason = "the fixtures' start-up is synchronous: it runs before a test's runtime does any work"
        )]
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A three-node `nats-server -js` cluster for one test: each node has its own client port,
/// cluster (route) port, server name and store directory, and routes to the other two. Nodes
/// can be SIGKILLed and restarted with their store, one at a time or several; all are killed on
/// drop. Each node logs to `server.log` in its directory ([`NatsCluster::log_tail`]), which is
/// what a failing test wants to see.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    binary: PathBuf,
    name: String,
}

struct ClusterNode {
    name: String,
    port: u16,
    route_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream has elected its meta leader (before that,
    /// the cluster refuses to create streams).
    pub async fn start() -> NatsCluster {
        let binary = find_nats_server();
        let name = format!("conveyor-test-{}", free_port());
        let nodes = (0..3)
            .map(|i| ClusterNode {
                name: format!("n{i}"),
                port: free_port(),
                route_port: free_port(),
                dir: tempfile::tempdir().expect("temp dir for a cluster node"),
                child: None,
            })
            .collect();
        let mut cluster = NatsCluster {
            nodes,
            binary,
            name,
        };
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// Every node's client URL, comma-separated (what `NATS_URL` takes for a cluster).
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[node].port)
    }

    /// The server name of node `node` (what JetStream reports as leader or replica).
    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// The node with server name `name`.
    pub fn node_named(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].child.is_some()
    }

    /// SIGKILL one node: it dies without a chance to flush or hand over leadership.
    pub fn kill(&mut self, node: usize) {
        stop(&mut self.nodes[node].child);
    }

    /// Starts a killed node again on its ports with its store: it rejoins and catches up.
    /// Returns once it listens, not once it has caught up.
    pub fn restart(&mut self, node: usize) {
        self.kill(node);
        self.spawn(node);
    }

    /// The last lines of a node's log.
    pub fn log_tail(&self, node: usize, lines: usize) -> String {
        let text = std::fs::read_to_string(self.nodes[node].dir.path().join("server.log"))
            .unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The server name of `stream`'s current leader, as JetStream's stream info reports it
    /// (asked of the running nodes); `None` while it has none or no running node answers.
    pub async fn stream_leader(&self, stream: &str) -> Option<String> {
        self.stream_cluster(stream).await.and_then(|c| c.leader)
    }

    /// `stream`'s cluster state (leader and replicas) from JetStream's stream info.
    pub async fn stream_cluster(
        &self,
        stream: &str,
    ) -> Option<async_nats::jetstream::stream::ClusterInfo> {
        for node in (0..self.nodes.len()).filter(|&n| self.is_running(n)) {
            let Some(js) = self.jetstream(node).await else {
                continue;
            };
            if let Ok(mut found) = js.get_stream(stream).await
                && let Ok(info) = found.info().await
            {
                return info.cluster.clone();
            }
        }
        None
    }

    /// A JetStream context on node `node` alone (no other servers, no reconnecting), with a
    /// short request timeout, so asking a node that is down fails quickly.
    async fn jetstream(&self, node: usize) -> Option<async_nats::jetstream::Context> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(1))
            .ignore_discovered_servers()
            .connect(self.url(node))
            .await
            .ok()?;
        let mut js = async_nats::jetstream::new(client);
        js.set_timeout(Duration::from_secs(2));
        Some(js)
    }

    /// Waits until the running nodes answer JetStream account requests (the meta leader is
    /// elected), so a test starts against a cluster that can create streams.
    pub async fn wait_for_jetstream(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for node in (0..self.nodes.len()).filter(|&n| self.is_running(n)) {
                // "Stream not found" is an answer only a JetStream with a meta leader gives
                // (before that it says "temporarily unavailable").
                if let Some(js) = self.jetstream(node).await
                    && let Err(error) = js.get_stream("conveyor-testkit-probe").await
                    && let async_nats::jetstream::context::GetStreamErrorKind::JetStream(e) =
                        error.kind()
                    && e.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the NATS cluster {} elected no JetStream meta leader within 60 s; node 0's log:\n{}",
                self.name,
                self.log_tail(0, 30)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn spawn(&mut self, index: usize) {
        let routes = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(other, _)| *other != index)
            .map(|(_, n)| format!("nats://127.0.0.1:{}", n.route_port))
            .collect::<Vec<_>>()
            .join(",");
        let node = &self.nodes[index];
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &node.port.to_string()])
            .args(["--server_name", &node.name, "--cluster_name", &self.name])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.route_port),
            ])
            .args(["--routes", &routes])
            .arg("-sd")
            .arg(node.dir.path().join("store"))
            .arg("-l")
            .arg(node.dir.path().join("server.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        let port = node.port;
        self.nodes[index].child = Some(child);
        wait_for_port(port, Duration::from_secs(15));
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in 0..self.nodes.len() {
            self.kill(node);
        }
    }
}

/// A tansu broker (Kafka protocol) for one test, with in-memory storage.
pub struct KafkaBroker {
    child: Option<Child>,
    port: u16,
}

impl KafkaBroker {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> KafkaBroker {
        let binary = find_tansu();
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            // Its own settings only: nothing inherited from the environment.
            .env_remove("STORAGE_ENGINE")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let broker = KafkaBroker {
            child: Some(child),
            port,
        };
        wait_for_port(port, Duration::from_secs(30));
        broker
    }

    /// The bootstrap servers list.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        stop(&mut self.child);
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILLs a fixture's process, if it runs, and reaps it.
fn stop(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The first `name` on PATH that is a file.
fn on_path(name: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `TANSU_BIN`, else `tansu` on PATH, else `~/.cargo/bin/tansu`.
pub fn find_tansu() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(bin);
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"));
    on_path("tansu")
        .or_else(|| {
            cargo_bin
                .map(|dir| dir.join("tansu"))
                .filter(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "tansu (a Kafka-protocol broker) not found (TANSU_BIN, PATH, ~/.cargo/bin). \
                 Install it with `cargo install --locked tansu --features dynostore,libsql`, \
                 or run `make test`, which installs it."
            )
        })
}

/// `NATS_SERVER_BIN`, else `nats-server` on PATH, else Debian's `/usr/sbin/nats-server`.
pub fn find_nats_server() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    on_path("nats-server")
        .or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| Path::new(p).is_file()))
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found (NATS_SERVER_BIN, PATH, /usr/sbin). Install it with \
                 `apt-get install nats-server` (Debian), or run `make test`, which installs it."
            )
        })
}

/// The driver of the publish-path benches, the same for a raw client and for conveyor's
/// publisher so that only the layer under test differs: `tasks` concurrent tasks each take the
/// next `batch` indices of `0..events` and hand the range to `send`, which builds that batch,
/// publishes it and waits for its confirmations. Returns events per second.
pub async fn publish_rate<F, Fut>(events: usize, tasks: usize, batch: usize, send: F) -> f64
where
    F: Fn(Range<usize>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let running: Vec<_> = (0..tasks)
        .map(|_| {
            let next = Arc::clone(&next);
            let send = send.clone();
            tokio::spawn(async move {
                loop {
                    let from = next.fetch_add(batch, Ordering::Relaxed);
                    if from >= events {
                        break;
                    }
                    send(from..(from + batch).min(events)).await;
                }
            })
        })
        .collect();
    for task in running {
        task.await.expect("a publishing task panicked");
    }
    events as f64 / started.elapsed().as_secs_f64()
}

//! The gRPC ecosystem's standard services on conveyor's gRPC port: health checking
//! (`grpc.health.v1.Health`) and server reflection, asked by a client this project did not
//! write: the gRPC project's Python packages (grpcio, grpcio-health-checking, grpcio-reflection)
//! driven by tests/grpc/ecosystem.py. The script reports what it was told; the judging is here.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use conveyor_testkit::NatsServer;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::harness::{Conveyor, Spawn, eventually, spawn_run, spawn_split};

const INGEST_SERVICE: &str = "conveyor.v1.IngestService";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative)
}

/// The imports the script needs.
const PROBE: &str = "import grpc, grpc_health.v1.health_pb2_grpc, \
                     grpc_reflection.v1alpha.proto_reflection_descriptor_database";

/// A Python with the gRPC packages: the venv scripts/test.sh makes under the target dir, or
/// `python3` if it has them; otherwise a failure saying how to get them.
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        // CARGO_BIN_EXE_conveyor is <target>/<profile>/conveyor.
        let target = Path::new(env!("CARGO_BIN_EXE_conveyor"))
            .ancestors()
            .nth(2)
            .expect("the binary lives two levels under the target dir");
        let venv = target.join("grpc-venv/bin/python");
        let candidates = [venv.clone(), PathBuf::from("python3")];
        for candidate in candidates {
            let works = std::process::Command::new(&candidate)
                .args(["-c", PROBE])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if works {
                return candidate;
            }
        }
        panic!(
            "the gRPC ecosystem tests need Python with grpcio, grpcio-health-checking and \
             grpcio-reflection (tests/grpc/requirements.txt), looked for in {} and python3. \
             `make test` (scripts/test.sh) installs them; by hand, from the repository root: `python3 -m venv {venv} && \
             {venv}/bin/pip install -r tests/grpc/requirements.txt`",
            venv.display(),
            venv = target.join("grpc-venv").display(),
        )
    })
}

fn script() -> Command {
    let mut command = Command::new(python());
    command
        .arg(repo_path("tests/grpc/ecosystem.py"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `ecosystem.py <args>` to the end; its stdout as JSON.
async fn run_script(args: &[&str]) -> Value {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        script()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("ecosystem.py {args:?} ran for a minute"))
    .expect("run ecosystem.py");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "ecosystem.py {args:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("ecosystem.py {args:?} printed no JSON ({e}):\n{stdout}"))
}

/// Health checks of `names`, as the Python client sees them.
async fn check(target: &Conveyor, names: &[&str]) -> Value {
    let mut args = vec!["check", target.base_url()];
    args.extend_from_slice(names);
    run_script(&args).await
}

/// Asserts that `target` (a `role`) serves health and reflection as a standard client expects.
async fn assert_standard_services(role: &str, target: &Conveyor) {
    let report = run_script(&["describe", target.base_url()]).await;
    let context = format!("{role}: {report:#}");
    assert_eq!(
        report["watch"].as_array().and_then(|seen| seen.last()),
        Some(&json!("SERVING")),
        "Watch(\"\") reaches SERVING; {context}"
    );
    assert_eq!(
        report["health"],
        json!({"": "SERVING", INGEST_SERVICE: "SERVING", "no.such.Service": "NOT_FOUND"}),
        "{context}"
    );
    let v1alpha = &report["reflection_v1alpha"];
    assert_eq!(
        v1alpha["services"],
        json!([
            INGEST_SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"
        ]),
        "{context}"
    );
    assert_eq!(
        v1alpha["ingest_file"], "conveyor/v1/conveyor.proto",
        "{context}"
    );
    assert_eq!(
        v1alpha["ingest_file_services"],
        json!(["IngestService"]),
        "{context}"
    );
    // The health service's schema as tonic-health compiled it in (under that file name).
    assert_eq!(v1alpha["health_file"], "health.proto", "{context}");
    let method = |name: &str, input: &str, output: &str, client: bool, server: bool| {
        json!({
            "name": name,
            "input": format!("conveyor.v1.{input}"),
            "output": format!("conveyor.v1.{output}"),
            "client_streaming": client,
            "server_streaming": server,
        })
    };
    assert_eq!(
        v1alpha["methods"],
        json!([
            method("Ingest", "IngestRequest", "IngestResponse", false, false),
            method(
                "IngestStream",
                "IngestRequest",
                "IngestStreamResponse",
                true,
                false
            ),
            method(
                "IngestBatch",
                "IngestBatchRequest",
                "IngestBatchResponse",
                false,
                false
            ),
            method("Publish", "PublishRequest", "PublishAck", true, true),
        ]),
        "{context}"
    );
    let fields = v1alpha["ingest_request_fields"].as_array().expect("fields");
    for field in ["id", "source", "payload", "metadata"] {
        assert!(
            fields.contains(&json!(field)),
            "IngestRequest.{field}: {context}"
        );
    }
    let v1 = &report["reflection_v1"];
    assert_eq!(
        v1["services"],
        json!([
            INGEST_SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection"
        ]),
        "{context}"
    );
    assert_eq!(
        v1["files"].get(0),
        Some(&json!("conveyor/v1/conveyor.proto")),
        "{context}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_grpc_health_and_reflection_to_the_python_grpc_client() {
    let conveyor = spawn_run(&[]).await;
    assert_standard_services("run", &conveyor).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_gateway_and_ingest_serve_grpc_health_and_reflection() {
    let split = spawn_split(&[]).await;
    assert_standard_services("gateway", &split.gateway).await;
    assert_standard_services("ingest", &split.ingest).await;
}

/// A running `ecosystem.py watch`: the statuses the server sent, a line each.
struct Watch {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Watch {
    fn start(target: &Conveyor, service: &str) -> Watch {
        let mut child = script()
            .args(["watch", target.base_url(), service])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ecosystem.py watch");
        let stdout = child.stdout.take().expect("stdout is piped");
        Watch {
            _child: child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Asserts that the next line is `want`, arriving within `timeout` (`when`: for messages).
    async fn expect(&mut self, want: &str, when: &str, timeout: Duration) {
        match tokio::time::timeout(timeout, self.lines.next_line()).await {
            Ok(Ok(Some(line))) => assert_eq!(line, want, "the watch {when}"),
            Ok(other) => panic!("the watch ended before {want} {when}: {other:?}"),
            Err(_) => panic!("no watch message within {timeout:?}; expected {want} {when}"),
        }
    }
}

/// `/ready`'s status code.
async fn ready_status(target: &Conveyor) -> u16 {
    target.get_json("/ready").await.0
}

/// An ingest publishing to NATS: its health follows the broker down and back up, agreeing
/// with `/ready` each time, and at SIGTERM it reports NOT_SERVING and ends the watch at once,
/// so a watching client does not hold the drain open until the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_follows_the_broker_and_ends_watches_at_shutdown() {
    let mut server = NatsServer::start();
    let mut ingest = Spawn::new("ingest")
        .env("QUEUE_TYPE", "nats")
        .env("NATS_URL", &server.url())
        .args(["--drain-timeout-secs", "60"])
        .start()
        .await;
    assert_standard_services("ingest on NATS", &ingest).await;

    let mut watch = Watch::start(&ingest, INGEST_SERVICE);
    watch
        .expect(
            "SERVING",
            "first (the current status)",
            Duration::from_secs(20),
        )
        .await;

    server.kill();
    watch
        .expect(
            "NOT_SERVING",
            "after the broker died",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(ready_status(&ingest).await, 503, "/ready agrees");
    assert_eq!(
        check(&ingest, &["", INGEST_SERVICE]).await,
        json!({"": "NOT_SERVING", INGEST_SERVICE: "NOT_SERVING"})
    );

    server.restart();
    watch
        .expect(
            "SERVING",
            "after the broker returned",
            Duration::from_secs(30),
        )
        .await;
    eventually(
        "/ready to agree",
        Duration::from_secs(5),
        async || match ready_status(&ingest).await {
            200 => Ok(()),
            other => Err(other.to_string()),
        },
    )
    .await;

    let signalled = Instant::now();
    ingest.sigterm();
    watch
        .expect("NOT_SERVING", "at SIGTERM", Duration::from_secs(5))
        .await;
    watch.expect("END OK", "after NOT_SERVING at shutdown: the server ends the stream itself, not a dropped connection", Duration::from_secs(5)).await;
    let status = ingest.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "ingest exits cleanly: {status}");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "an open Watch must not hold the drain open until its timeout (60 s); exit took {took:?}"
    );
}

//! Starting `conveyor` processes, talking to them, and checking what reached the sink.
//!
//! Every process gets its own temp dir (its working directory and the home of its file sink),
//! binds a random port, and is killed when its [`Conveyor`] is dropped. Its stdout and stderr
//! are read in background tasks so the pipes never fill, and kept for failure messages.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_proto::v1::ingest_service_client::IngestServiceClient;
use conveyor_proto::v1::{IngestBatchRequest, IngestRequest, PublishRequest};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// How long a process may take to print its listening line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// What a started process keeps of the test's environment: nothing that configures conveyor
/// (every process starts from an empty environment plus these and what the test sets), so a
/// developer's shell (`QUEUE_TYPE`, `NATS_URL`, `OTEL_*`, …) cannot change what a test starts.
const KEPT_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "RUST_BACKTRACE"];

/// The `conveyor` binary under test, with an environment of [`KEPT_ENV`] only.
pub fn conveyor_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor"));
    cmd.env_clear();
    for key in KEPT_ENV {
        if let Some(value) = std::env::var_os(key) {
            cmd.env(key, value);
        }
    }
    cmd
}

/// Output of a process, shared with the task that reads it.
type Log = Arc<Mutex<String>>;

/// Most output kept per stream; older output is dropped first.
const LOG_LIMIT: usize = 1 << 20;

fn tail(log: &Log) -> String {
    let text = log.lock().expect("log lock").clone();
    let start = text.len().saturating_sub(8 * 1024);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

/// Reads `reader` line by line into `log`; the first line starting with `listen_prefix` is
/// also sent on `listening`.
async fn pump<R: AsyncRead + Unpin>(
    reader: R,
    log: Log,
    mut listening: Option<(String, oneshot::Sender<String>)>,
) {
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some((prefix, _)) = &listening
            && let Some(rest) = line.strip_prefix(prefix.as_str())
        {
            let url = rest.split_whitespace().next().unwrap_or("").to_owned();
            if let Some((_, tx)) = listening.take() {
                let _ = tx.send(url.trim_end_matches('/').to_owned());
            }
        }
        let mut text = log.lock().expect("log lock");
        if text.len() > LOG_LIMIT {
            let mut cut = text.len() / 2;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text.drain(..cut);
        }
        text.push_str(&line);
        text.push('\n');
    }
}

enum SinkMode {
    None,
    Flag,
    Env,
    /// `--sink file:<path>` at a path the test chose (to keep it across restarts).
    At(PathBuf),
    /// `--sink <spec>`, any sink (`stdout`, `blackhole`).
    Spec(String),
}

/// How to start one `conveyor` process.
pub struct Spawn {
    role: &'static str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    listen_flags: bool,
    sink: SinkMode,
}

impl Spawn {
    /// `conveyor <role> --host 127.0.0.1 --port 0`, plus `--sink file:<tmp>/out.ndjson` for
    /// the roles that have a sink (`run`, `processor`).
    pub fn new(role: &'static str) -> Self {
        Spawn {
            role,
            args: Vec::new(),
            env: Vec::new(),
            listen_flags: true,
            sink: if matches!(role, "run" | "processor") {
                SinkMode::Flag
            } else {
                SinkMode::None
            },
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Writes the file sink at `path` (which outlives the process, e.g. across a restart).
    pub fn sink_at(mut self, path: &Path) -> Self {
        self.sink = SinkMode::At(path.to_owned());
        self
    }

    /// Writes to the sink `spec` (`--sink stdout`, `--sink blackhole`) instead of a file.
    pub fn sink_spec(mut self, spec: &str) -> Self {
        self.sink = SinkMode::Spec(spec.to_owned());
        self
    }

    /// A gateway in front of `ingest`, reporting on `processors`.
    pub fn gateway_for(ingest: &Conveyor, processors: &[&Conveyor]) -> Self {
        let urls: Vec<&str> = processors.iter().map(|p| p.base_url()).collect();
        Spawn::new("gateway").args([
            "--ingest-url",
            ingest.base_url(),
            "--processor-url",
            &urls.join(","),
        ])
    }

    /// Leaves out `--host` and `--port`, for tests of the environment variables.
    pub fn without_listen_flags(mut self) -> Self {
        self.listen_flags = false;
        self
    }

    /// Names the sink with `CONVEYOR_SINK` instead of `--sink`.
    pub fn sink_from_env(mut self) -> Self {
        self.sink = SinkMode::Env;
        self
    }

    fn command(&self, dir: &Path, sink_path: &Path) -> Command {
        let mut cmd = conveyor_command();
        cmd.current_dir(dir).arg(self.role);
        cmd.env("CONVEYOR_LOG", "info");
        if self.listen_flags {
            cmd.args(["--host", "127.0.0.1", "--port", "0"]);
        }
        let sink_spec = format!("file:{}", sink_path.display());
        match self.sink {
            SinkMode::None => {}
            SinkMode::Flag => {
                cmd.args(["--sink", &sink_spec]);
            }
            SinkMode::Env => {
                cmd.env("CONVEYOR_SINK", &sink_spec);
            }
            SinkMode::At(ref path) => {
                cmd.args(["--sink", &format!("file:{}", path.display())]);
            }
            SinkMode::Spec(ref spec) => {
                cmd.args(["--sink", spec]);
            }
        }
        cmd.args(&self.args);
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    fn describe(&self) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "{} conveyor {} {}",
            env.join(" "),
            self.role,
            self.args.join(" ")
        )
    }

    /// Starts the process and waits for its listening line.
    pub async fn start(self) -> Conveyor {
        let dir = tempfile::tempdir().expect("create a temp dir for the process");
        let sink_path = match &self.sink {
            SinkMode::At(path) => path.clone(),
            _ => dir.path().join("out.ndjson"),
        };
        let what = self.describe();
        let mut child = self
            .command(dir.path(), &sink_path)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        let pid = child.id().expect("a just-started child has a pid");
        let stdout_log = Log::default();
        let stderr_log = Log::default();
        let (tx, rx) = oneshot::channel();
        let prefix = format!("conveyor {} listening on ", self.role);
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        tokio::spawn(pump(stdout, stdout_log.clone(), Some((prefix.clone(), tx))));
        let stderr_task = tokio::spawn(pump(stderr, stderr_log.clone(), None));

        let url = match tokio::time::timeout(STARTUP_TIMEOUT, rx).await {
            Ok(Ok(url)) => url,
            Ok(Err(_)) => {
                // stdout closed without the line: the process is exiting. Collect why.
                let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), stderr_task).await;
                panic!(
                    "`{what}` closed stdout without printing `{prefix}http://IP:PORT`; \
                     exit: {status:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    tail(&stdout_log),
                    tail(&stderr_log)
                );
            }
            Err(_) => panic!(
                "`{what}` did not print `{prefix}http://IP:PORT` within {STARTUP_TIMEOUT:?}\n\
                 --- stdout ---\n{}\n--- stderr ---\n{}",
                tail(&stdout_log),
                tail(&stderr_log)
            ),
        };
        assert!(
            url.starts_with("http://"),
            "`{what}` printed a listening line without an http:// URL: {url:?}"
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build()
            .expect("build an HTTP client");
        Conveyor {
            role: self.role,
            child,
            pid,
            base_url: url,
            sink_path,
            stderr: stderr_log,
            stdout: stdout_log,
            http,
            _dir: dir,
        }
    }

    /// Runs a process that is expected to exit by itself (bad configuration): its exit status
    /// and stderr. Panics if it is still running after `timeout`.
    pub async fn run_to_exit(self, timeout: Duration) -> (ExitStatus, String) {
        let dir = tempfile::tempdir().expect("create a temp dir for the process");
        let sink_path = dir.path().join("out.ndjson");
        let what = self.describe();
        let child = self
            .command(dir.path(), &sink_path)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(output)) => (
                output.status,
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ),
            Ok(Err(e)) => panic!("waiting for `{what}` failed: {e}"),
            Err(_) => panic!("`{what}` was expected to exit on its own but ran for {timeout:?}"),
        }
    }
}

/// A running `conveyor` process, killed on drop.
pub struct Conveyor {
    role: &'static str,
    child: Child,
    pid: u32,
    base_url: String,
    sink_path: PathBuf,
    stderr: Log,
    stdout: Log,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// `conveyor run` (all roles in one process) with `extra` arguments.
pub async fn spawn_run(extra: &[&str]) -> Conveyor {
    Spawn::new("run").args(extra).start().await
}

/// The three processes of split mode. Tests talk to the gateway; the sink is the processor's.
pub struct Split {
    pub processor: Conveyor,
    pub ingest: Conveyor,
    pub gateway: Conveyor,
}

/// Starts processor (with `processor_args`), then ingest pointed at it, then the gateway
/// pointed at both.
pub async fn spawn_split(processor_args: &[&str]) -> Split {
    spawn_split_with(|role, spawn| match role {
        "processor" => spawn.args(processor_args),
        _ => spawn,
    })
    .await
}

/// [`spawn_split`] with each role's process configured by `configure(role, spawn)` first
/// (`role`: "processor", "ingest" or "gateway").
pub async fn spawn_split_with(configure: impl Fn(&str, Spawn) -> Spawn) -> Split {
    let processor = configure("processor", Spawn::new("processor"))
        .start()
        .await;
    let ingest = configure("ingest", Spawn::new("ingest"))
        .args(["--processor-url", processor.base_url()])
        .start()
        .await;
    let gateway = configure("gateway", Spawn::gateway_for(&ingest, &[&processor]))
        .start()
        .await;
    Split {
        processor,
        ingest,
        gateway,
    }
}

impl Conveyor {
    /// `http://127.0.0.1:PORT`, as printed on the listening line.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The last 8 KiB the process wrote to stderr, for failure messages.
    pub fn stderr_tail(&self) -> String {
        tail(&self.stderr)
    }

    /// Everything the process printed on stdout so far (up to the last MiB).
    pub fn stdout_text(&self) -> String {
        self.stdout.lock().expect("log lock").clone()
    }

    pub async fn grpc(&self) -> IngestServiceClient<Channel> {
        IngestServiceClient::connect(self.base_url.clone())
            .await
            .unwrap_or_else(|e| panic!("gRPC connect to {} failed: {e}", self.base_url))
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -TERM {} failed: {status}", self.pid);
    }

    /// Sends SIGKILL: the process dies at once, mid-work, as in a crash.
    pub fn sigkill(&self) {
        let status = std::process::Command::new("kill")
            .args(["-KILL", &self.pid.to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -KILL {} failed: {status}", self.pid);
    }

    /// Waits for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for the conveyor process"),
            Err(_) => panic!(
                "conveyor {} did not exit within {timeout:?}\n--- stderr ---\n{}",
                self.role,
                self.stderr_tail()
            ),
        }
    }

    /// Where this process's file sink is.
    pub fn sink_path(&self) -> &Path {
        &self.sink_path
    }

    /// Every complete line of the file sink, parsed. A line that is not JSON fails the test.
    pub fn read_sink(&self) -> Vec<Value> {
        read_sink_file(&self.sink_path)
    }

    /// Polls the sink until it holds at least `n` records.
    pub async fn wait_sink_len(&self, n: usize, timeout: Duration) -> Vec<Value> {
        eventually(
            &format!("the sink to hold {n} records"),
            timeout,
            async || {
                let records = self.read_sink();
                if records.len() >= n {
                    Ok(records)
                } else {
                    Err(format!("it holds {}", records.len()))
                }
            },
        )
        .await
    }

    /// Polls the sink until every id in `ids` is in it.
    pub async fn wait_sink_ids<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a String>,
        timeout: Duration,
    ) -> Vec<Value> {
        let wanted: HashSet<&String> = ids.into_iter().collect();
        eventually(
            &format!("the sink to hold {} given ids", wanted.len()),
            timeout,
            async || {
                let records = self.read_sink();
                let have: HashSet<&str> = records.iter().filter_map(|r| r["id"].as_str()).collect();
                let missing: Vec<&&String> = wanted
                    .iter()
                    .filter(|id| !have.contains(id.as_str()))
                    .collect();
                if missing.is_empty() {
                    Ok(records)
                } else {
                    Err(format!("{} missing, e.g. {:?}", missing.len(), missing[0]))
                }
            },
        )
        .await
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on conveyor {}: {e}", self.role));
        read_json(resp).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} on conveyor {}: {e}", self.role));
        read_json(resp).await
    }

    /// `GET /api/v1/status`.
    pub async fn status(&self) -> Value {
        let (code, body) = self.get_json("/api/v1/status").await;
        assert!(
            code == 200 || code == 503,
            "GET /api/v1/status answered {code}: {body}"
        );
        body
    }

    /// Polls `/api/v1/status` until `totals.processed + totals.dead_lettered >= n`; returns
    /// that status.
    pub async fn wait_until_processed(&self, n: u64, timeout: Duration) -> Value {
        eventually(
            &format!("totals.processed + totals.dead_lettered to reach {n}"),
            timeout,
            async || {
                let status = self.status().await;
                let done = total(&status, "processed") + total(&status, "dead_lettered");
                if done >= n {
                    Ok(status)
                } else {
                    Err(format!("totals are {}", status["totals"]))
                }
            },
        )
        .await
    }

    /// Polls until `totals.pending` is 0: nothing queued or in flight.
    pub async fn wait_idle(&self, timeout: Duration) -> Value {
        eventually("totals.pending to be 0", timeout, async || {
            let status = self.status().await;
            if total(&status, "pending") == 0 {
                Ok(status)
            } else {
                Err(format!("totals are {}", status["totals"]))
            }
        })
        .await
    }

    /// Checks the process still serves: `/health` is 200 and a fresh event gets 202 and
    /// reaches the sink; then asserts the sink holds exactly `ledger` plus that event.
    pub async fn assert_still_serving(&self, mut ledger: Expected) {
        let (code, _) = self.get_raw("/health").await;
        assert_eq!(code, 200, "GET /health");
        let sample = sample_event("after-bad-input", "final", 0, true);
        let id = ingest_one(self, &sample).await;
        ledger.insert(id, sample.sent);
        self.wait_sink_ids(ledger.keys(), Duration::from_secs(20))
            .await;
        self.wait_idle(Duration::from_secs(20)).await;
        assert_sink_exact(&self.read_sink(), &ledger);
    }

    /// The status and body text of a GET.
    pub async fn get_raw(&self, path: &str) -> (u16, String) {
        let resp = self
            .http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on conveyor {}: {e}", self.role));
        let code = resp.status().as_u16();
        (code, resp.text().await.expect("read the response body"))
    }

    /// `GET /api/v1/dlq?limit=10000`: the events it holds.
    pub async fn dlq(&self) -> (u64, Vec<Value>) {
        let (code, body) = self.get_json("/api/v1/dlq?limit=10000").await;
        assert_eq!(code, 200, "GET /api/v1/dlq: {body}");
        let size = body["size"]
            .as_u64()
            .unwrap_or_else(|| panic!("DLQ answer has no numeric size: {body}"));
        let events = body["events"]
            .as_array()
            .unwrap_or_else(|| panic!("DLQ answer has no events array: {body}"))
            .clone();
        (size, events)
    }
}

/// The status code and JSON body of a response (panics naming the body if it is not JSON).
pub async fn read_json(resp: reqwest::Response) -> (u16, Value) {
    let code = resp.status().as_u16();
    let text = resp.text().await.expect("read the response body");
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("a {code} answer's body is not JSON ({e}): {text:?}"));
    (code, body)
}

/// `status.totals.<key>` as a number.
pub fn total(status: &Value, key: &str) -> u64 {
    status["totals"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no numeric totals.{key}: {status}"))
}

/// Retries `check` every 50 ms until it returns `Ok`, or panics after `timeout` with its last
/// `Err`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Asserts an error body `{"error":{"code":…,"message":…,"field":…}}` with `code` and, when
/// given, `field`; returns the message.
pub fn assert_error(
    what: &str,
    status: u16,
    body: &Value,
    want_status: u16,
    code: &str,
    field: Option<&str>,
) -> String {
    assert_eq!(
        status, want_status,
        "{what}: expected HTTP {want_status} ({code}), got {status}: {body}"
    );
    assert_eq!(
        body["error"]["code"].as_str(),
        Some(code),
        "{what}: error.code; body {body}"
    );
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.is_empty(),
        "{what}: error.message is empty; body {body}"
    );
    if let Some(field) = field {
        assert_eq!(
            body["error"]["field"].as_str(),
            Some(field),
            "{what}: error.field; body {body}"
        );
    }
    message.to_owned()
}

// ---------------------------------------------------------------------------------------------
// Events, and what must come out of the sink.

/// Every complete line of a file sink, parsed; a missing file is an empty sink. A complete line
/// that is not JSON fails the test (a torn last line, still being written, is left out).
pub fn read_sink_file(path: &Path) -> Vec<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("read the sink {}: {e}", path.display()),
    };
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("sink line is not JSON ({e}): {line}"))
        })
        .collect()
}

/// What was sent for one event, to compare with its sink record.
#[derive(Debug, Clone)]
pub struct Sent {
    pub source: String,
    /// The `data` value the sink must write back.
    pub data: Value,
    pub metadata: BTreeMap<String, String>,
    pub timestamp: Option<u64>,
}

/// What must come out of the sink: accepted events by id, each as it was sent.
pub type Expected = HashMap<String, Sent>;

/// One generated event: its client id (if any), its JSON body, and what was sent.
pub struct Sample {
    pub id: Option<String>,
    pub body: Value,
    pub sent: Sent,
}

fn sample_data(kind: &str, i: usize) -> Value {
    match i % 3 {
        0 => json!({
            "kind": kind,
            "n": i,
            "reading": {"t": 23.5, "ok": true, "none": null},
            "tags": ["a", "b", "ünï"],
        }),
        1 => Value::String(format!("{kind} line {i}: \"quoted\", tab\t, ✓")),
        _ => json!([i, "x", {"y": false}, -7]),
    }
}

/// Event `i` of a kind of traffic. With `with_id` it carries the client id `<tag>-<kind>-<i>`
/// and a client timestamp; every fifth event has no metadata.
pub fn sample_event(kind: &str, tag: &str, i: usize, with_id: bool) -> Sample {
    let id = with_id.then(|| format!("{tag}-{kind}-{i}"));
    let metadata: BTreeMap<String, String> = if i.is_multiple_of(5) {
        BTreeMap::new()
    } else {
        BTreeMap::from([
            ("via".to_owned(), kind.to_owned()),
            ("n".to_owned(), i.to_string()),
        ])
    };
    let timestamp = with_id.then(|| 1_700_000_000_000 + i as u64);
    let source = format!("{kind}-{}", i % 7);
    let data = sample_data(kind, i);
    let mut body = json!({"source": source, "data": data});
    if let Some(id) = &id {
        body["id"] = json!(id);
    }
    if !metadata.is_empty() {
        body["metadata"] = json!(metadata);
    }
    if let Some(ts) = timestamp {
        body["timestamp"] = json!(ts);
    }
    Sample {
        id,
        body,
        sent: Sent {
            source,
            data,
            metadata,
            timestamp,
        },
    }
}

impl Sample {
    /// Sets metadata `key` to `value`, in the body and in what the sink must show.
    pub fn with_metadata(mut self, key: &str, value: &str) -> Self {
        self.sent.metadata.insert(key.to_owned(), value.to_owned());
        self.body["metadata"] = json!(self.sent.metadata);
        self
    }

    /// The same event as a gRPC request: a string `data` becomes a `text/plain` payload, any
    /// other value an `application/json` one.
    pub fn grpc(&self) -> IngestRequest {
        let (payload, content_type) = match &self.sent.data {
            Value::String(text) => (text.clone().into_bytes(), "text/plain"),
            other => (
                serde_json::to_vec(other).expect("serialise data"),
                "application/json",
            ),
        };
        IngestRequest {
            id: self.id.clone().unwrap_or_default(),
            source: self.sent.source.clone(),
            payload: payload.into(),
            content_type: content_type.to_owned(),
            metadata: self.sent.metadata.clone(),
            timestamp_ms: self.sent.timestamp.unwrap_or(0),
            headers: Default::default(),
        }
    }
}

/// Reads a 202 answer `{"messageId":…,"status":"accepted"}`; the id must be the client's when
/// it sent one.
pub fn accepted_id(what: &str, body: &Value, client_id: Option<&str>) -> String {
    assert_eq!(
        body["status"].as_str(),
        Some("accepted"),
        "{what}: status field; body {body}"
    );
    let id = body["messageId"]
        .as_str()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("{what}: no messageId; body {body}"));
    if let Some(client) = client_id {
        assert_eq!(id, client, "{what}: messageId is not the client's id");
    }
    id.to_owned()
}

/// POSTs one event to `/api/v1/ingest` and expects 202; returns its message id.
pub async fn ingest_one(target: &Conveyor, sample: &Sample) -> String {
    let (code, body) = target.post_json("/api/v1/ingest", &sample.body).await;
    assert_eq!(code, 202, "POST /api/v1/ingest {}: {body}", sample.body);
    accepted_id("POST /api/v1/ingest", &body, sample.id.as_deref())
}

fn record(ledger: &mut Expected, id: String, sent: Sent) {
    if let Some(previous) = ledger.insert(id.clone(), sent) {
        panic!("message id {id} was handed out for two different events (first: {previous:?})");
    }
}

async fn http_singles(
    target: &Conveyor,
    tag: &str,
    count: usize,
    tasks: usize,
) -> Vec<(String, Sent)> {
    let mut handles: Vec<JoinHandle<Vec<(String, Sent)>>> = Vec::new();
    for task in 0..tasks {
        let http = target.http().clone();
        let url = target.url("/api/v1/ingest");
        let tag = tag.to_owned();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (task..count).step_by(tasks) {
                let sample = sample_event("http-single", &tag, i, i % 2 == 0);
                let resp = http
                    .post(&url)
                    .json(&sample.body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("POST /api/v1/ingest event {i}: {e}"));
                let (code, body) = read_json(resp).await;
                assert_eq!(code, 202, "POST /api/v1/ingest event {i}: {body}");
                let id = accepted_id("POST /api/v1/ingest", &body, sample.id.as_deref());
                out.push((id, sample.sent));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for handle in handles {
        all.extend(handle.await.expect("an HTTP sender task panicked"));
    }
    all
}

/// Sends `batches` batches of `per_batch` events to `/api/v1/ingest/batch`, alternating
/// NDJSON and JSON-array bodies.
async fn http_batches(
    target: &Conveyor,
    tag: &str,
    batches: usize,
    per_batch: usize,
) -> Vec<(String, Sent)> {
    let mut all = Vec::new();
    for b in 0..batches {
        let ndjson = b % 2 == 0;
        let kind = if ndjson { "http-ndjson" } else { "http-array" };
        let samples: Vec<Sample> = (0..per_batch)
            .map(|j| sample_event(kind, tag, b * per_batch + j, j % 2 == 1))
            .collect();
        let request = target.http().post(target.url("/api/v1/ingest/batch"));
        let request = if ndjson {
            let lines: Vec<String> = samples.iter().map(|s| s.body.to_string()).collect();
            request
                .header("content-type", "application/x-ndjson")
                .body(lines.join("\n") + "\n")
        } else {
            let array: Vec<&Value> = samples.iter().map(|s| &s.body).collect();
            request.json(&array)
        };
        let resp = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST /api/v1/ingest/batch ({kind}): {e}"));
        let (code, body) = read_json(resp).await;
        assert_eq!(code, 202, "{kind} batch {b}: {body}");
        assert_eq!(
            body["accepted"].as_u64(),
            Some(per_batch as u64),
            "{kind} batch {b}: accepted"
        );
        assert_eq!(
            body["rejected"].as_u64(),
            Some(0),
            "{kind} batch {b}: rejected"
        );
        let results = body["results"]
            .as_array()
            .expect("batch answer has results");
        assert_eq!(
            results.len(),
            per_batch,
            "{kind} batch {b}: one result per event"
        );
        for (position, result) in results.iter().enumerate() {
            let index = result["index"]
                .as_u64()
                .unwrap_or_else(|| panic!("result without index: {result}"))
                as usize;
            assert_eq!(
                index, position,
                "{kind} batch {b}: results are in request order"
            );
            let sample = &samples[index];
            let id = result["messageId"]
                .as_str()
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| {
                    panic!("{kind} batch {b}: result {index} has no messageId: {result}")
                });
            if let Some(client) = &sample.id {
                assert_eq!(id, client, "{kind} batch {b}: result {index} id");
            }
            all.push((id.to_owned(), sample.sent.clone()));
        }
    }
    all
}

/// `IngestStream` calls of `per_stream` events each; every event carries a client id (the
/// summary names no ids).
async fn grpc_streams(
    target: &Conveyor,
    tag: &str,
    streams: usize,
    per_stream: usize,
) -> Vec<(String, Sent)> {
    let mut client = target.grpc().await;
    let mut all = Vec::new();
    for s in 0..streams {
        let samples: Vec<Sample> = (0..per_stream)
            .map(|j| sample_event("grpc-stream", tag, s * per_stream + j, true))
            .collect();
        let requests: Vec<IngestRequest> = samples.iter().map(Sample::grpc).collect();
        let summary = client
            .ingest_stream(tokio_stream::iter(requests))
            .await
            .unwrap_or_else(|e| panic!("IngestStream {s} failed: {e}"))
            .into_inner();
        assert_eq!(
            summary.accepted, per_stream as u64,
            "IngestStream {s}: {summary:?}"
        );
        assert_eq!(summary.rejected, 0, "IngestStream {s}: {summary:?}");
        assert!(
            summary.rejections.is_empty(),
            "IngestStream {s}: {summary:?}"
        );
        all.extend(
            samples
                .into_iter()
                .map(|sample| (sample.id.expect("stream events carry ids"), sample.sent)),
        );
    }
    all
}

/// One `Publish` call of `count` events: every event must get its own ack, matched by
/// sequence.
async fn grpc_publish(target: &Conveyor, tag: &str, count: usize) -> Vec<(String, Sent)> {
    let mut client = target.grpc().await;
    let samples: Vec<Sample> = (0..count)
        .map(|i| sample_event("grpc-publish", tag, i, i % 2 == 0))
        .collect();
    let requests: Vec<PublishRequest> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| PublishRequest {
            sequence: i as u64 + 1,
            event: Some(s.grpc()),
        })
        .collect();
    let mut acks = client
        .publish(tokio_stream::iter(requests))
        .await
        .unwrap_or_else(|e| panic!("Publish failed: {e}"))
        .into_inner();
    let mut by_sequence: HashMap<u64, String> = HashMap::new();
    while let Some(ack) = acks.message().await.unwrap_or_else(|e| {
        panic!(
            "Publish ack stream failed after {} acks: {e}",
            by_sequence.len()
        )
    }) {
        assert!(ack.error.is_none(), "Publish ack with an error: {ack:?}");
        assert!(
            !ack.message_id.is_empty(),
            "Publish ack without message id: {ack:?}"
        );
        let previous = by_sequence.insert(ack.sequence, ack.message_id.clone());
        assert!(previous.is_none(), "two acks for sequence {}", ack.sequence);
    }
    assert_eq!(by_sequence.len(), count, "Publish: one ack per request");
    samples
        .into_iter()
        .enumerate()
        .map(|(i, sample)| {
            let id = by_sequence
                .remove(&(i as u64 + 1))
                .unwrap_or_else(|| panic!("Publish: no ack for sequence {}", i + 1));
            if let Some(client_id) = &sample.id {
                assert_eq!(&id, client_id, "Publish: ack id for sequence {}", i + 1);
            }
            (id, sample.sent)
        })
        .collect()
}

/// `count` unary `Ingest` calls, with server-generated ids.
async fn grpc_unary(target: &Conveyor, tag: &str, count: usize) -> Vec<(String, Sent)> {
    let mut client = target.grpc().await;
    let mut all = Vec::new();
    for i in 0..count {
        let sample = sample_event("grpc-unary", tag, i, false);
        let response = client
            .ingest(sample.grpc())
            .await
            .unwrap_or_else(|e| panic!("Ingest {i} failed: {e}"))
            .into_inner();
        assert_eq!(response.status, "accepted", "Ingest {i}: {response:?}");
        assert!(!response.message_id.is_empty(), "Ingest {i}: {response:?}");
        all.push((response.message_id, sample.sent));
    }
    all
}

/// One `IngestBatch` call of `count` events, a third with client ids.
async fn grpc_batch(target: &Conveyor, tag: &str, count: usize) -> Vec<(String, Sent)> {
    let mut client = target.grpc().await;
    let samples: Vec<Sample> = (0..count)
        .map(|i| sample_event("grpc-batch", tag, i, i % 3 == 0))
        .collect();
    let response = client
        .ingest_batch(IngestBatchRequest {
            events: samples.iter().map(Sample::grpc).collect(),
        })
        .await
        .unwrap_or_else(|e| panic!("IngestBatch failed: {e}"))
        .into_inner();
    assert_eq!(
        response.results.len(),
        count,
        "IngestBatch: one result per event"
    );
    samples
        .into_iter()
        .zip(response.results)
        .enumerate()
        .map(|(i, (sample, result))| {
            assert_eq!(
                result.index as usize, i,
                "IngestBatch results in order: {result:?}"
            );
            assert!(
                result.error.is_none(),
                "IngestBatch event {i} refused: {result:?}"
            );
            assert!(
                !result.message_id.is_empty(),
                "IngestBatch event {i}: {result:?}"
            );
            if let Some(client_id) = &sample.id {
                assert_eq!(&result.message_id, client_id, "IngestBatch event {i} id");
            }
            (result.message_id, sample.sent)
        })
        .collect()
}

/// The standard traffic mix, all at once: 4,000 single HTTP events from 32 tasks, 4,000 in
/// NDJSON and JSON-array batches of 500, 2,000 over `IngestStream`, 500 over `Publish`, 100
/// unary `Ingest` calls and one `IngestBatch` of 100. Returns every accepted event by id.
pub async fn send_mixed_traffic(target: &Conveyor, tag: &str) -> Expected {
    let (singles, batches, streams, published, unary, batch) = tokio::join!(
        http_singles(target, tag, 4_000, 32),
        http_batches(target, tag, 8, 500),
        grpc_streams(target, tag, 2, 1_000),
        grpc_publish(target, tag, 500),
        grpc_unary(target, tag, 100),
        grpc_batch(target, tag, 100),
    );
    let mut ledger = Expected::new();
    for (id, sent) in singles
        .into_iter()
        .chain(batches)
        .chain(streams)
        .chain(published)
        .chain(unary)
        .chain(batch)
    {
        record(&mut ledger, id, sent);
    }
    ledger
}

/// How often each id occurs in `records`.
pub fn id_counts(records: &[Value]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in records {
        let id = r["id"]
            .as_str()
            .unwrap_or_else(|| panic!("sink record without a string id: {r}"));
        *counts.entry(id.to_owned()).or_insert(0) += 1;
    }
    counts
}

/// What is wrong with one sink record of an event that was sent as `sent`.
fn record_problem(record: &Value, sent: &Sent) -> Option<String> {
    let mut wrong = Vec::new();
    if record["source"].as_str() != Some(sent.source.as_str()) {
        wrong.push(format!(
            "source {} (sent {:?})",
            record["source"], sent.source
        ));
    }
    if record["data"] != sent.data {
        wrong.push(format!("data {} (sent {})", record["data"], sent.data));
    }
    let metadata = match &record["metadata"] {
        Value::Null => Some(BTreeMap::new()),
        m => serde_json::from_value::<BTreeMap<String, String>>(m.clone()).ok(),
    };
    if metadata.as_ref() != Some(&sent.metadata) {
        wrong.push(format!(
            "metadata {} (sent {:?})",
            record["metadata"], sent.metadata
        ));
    }
    match (record["timestamp"].as_u64(), sent.timestamp) {
        (None, _) => wrong.push(format!("timestamp {} is not a number", record["timestamp"])),
        (Some(got), Some(want)) if got != want => {
            wrong.push(format!("timestamp {got} (sent {want})"));
        }
        _ => {}
    }
    if record["processed_at"].as_u64().is_none() {
        wrong.push(format!(
            "processed_at {} is not a number",
            record["processed_at"]
        ));
    }
    if record["attempt"].as_u64() != Some(1) {
        wrong.push(format!(
            "attempt {} (expected 1: no stage fails)",
            record["attempt"]
        ));
    }
    (!wrong.is_empty()).then(|| wrong.join("; "))
}

/// Asserts the sink holds every event of `expected` exactly once, nothing else, and each as
/// it was sent (source, data, metadata, timestamp; attempt 1).
pub fn assert_sink_exact(records: &[Value], expected: &Expected) {
    let counts = id_counts(records);
    let missing: Vec<&String> = expected
        .keys()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    let unexpected: Vec<&String> = counts
        .keys()
        .filter(|id| !expected.contains_key(*id))
        .collect();
    let mut mismatched = Vec::new();
    for r in records {
        if let Some(sent) = r["id"].as_str().and_then(|id| expected.get(id))
            && let Some(problem) = record_problem(r, sent)
        {
            mismatched.push(format!("{}: {problem}", r["id"]));
        }
    }
    assert!(
        missing.is_empty()
            && duplicated.is_empty()
            && unexpected.is_empty()
            && mismatched.is_empty(),
        "sink holds {} records for {} accepted events: {} missing (e.g. {:?}), {} duplicated \
         (e.g. {:?}), {} unexpected (e.g. {:?}), {} not as sent (e.g. {:?})",
        records.len(),
        expected.len(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        duplicated.len(),
        duplicated.iter().take(5).collect::<Vec<_>>(),
        unexpected.len(),
        unexpected.iter().take(5).collect::<Vec<_>>(),
        mismatched.len(),
        mismatched.iter().take(5).collect::<Vec<_>>(),
    );
}

/// Waits until everything in `ledger` has been processed (status read from `front`, records
/// from `sink`'s file), then asserts the sink and the totals are exact.
pub async fn assert_all_delivered(front: &Conveyor, sink: &Conveyor, ledger: &Expected) -> Value {
    let n = ledger.len() as u64;
    front
        .wait_until_processed(n, Duration::from_secs(120))
        .await;
    let records = sink
        .wait_sink_len(ledger.len(), Duration::from_secs(10))
        .await;
    assert_sink_exact(&records, ledger);
    let status = front.status().await;
    assert_eq!(
        total(&status, "accepted"),
        n,
        "totals.accepted: {}",
        status["totals"]
    );
    assert_eq!(
        total(&status, "processed"),
        n,
        "totals.processed: {}",
        status["totals"]
    );
    assert_eq!(
        total(&status, "failed"),
        0,
        "totals.failed: {}",
        status["totals"]
    );
    assert_eq!(
        total(&status, "dead_lettered"),
        0,
        "totals.dead_lettered: {}",
        status["totals"]
    );
    status
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP, for requests reqwest will not make (a chunked body without content-length).

/// POSTs `body` to `path` as HTTP/1.1 chunks of `chunk` bytes (no content-length), with
/// `Connection: close`; returns the status and the body of the answer. Write errors are ignored: the server may answer and close before reading it all.
pub async fn raw_chunked_post(
    base_url: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    chunk: usize,
) -> (u16, String) {
    let authority = base_url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .unwrap_or_else(|e| panic!("connect to {authority}: {e}"));
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: {content_type}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for piece in body.chunks(chunk) {
        request.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        request.extend_from_slice(piece);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let _ = stream.write_all(&request).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "no complete answer to the chunked POST {path} within 30 s"
    );
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, payload) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer to the chunked POST {path}: {text:?}"));
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let payload = if chunked {
        dechunk(payload)
    } else {
        payload.to_owned()
    };
    (code, payload)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        let (Some(piece), Some(next)) = (after.get(..size), after.get(size..)) else {
            break;
        };
        if size == 0 {
            break;
        }
        out.push_str(piece);
        rest = next.trim_start_matches("\r\n");
    }
    out
}

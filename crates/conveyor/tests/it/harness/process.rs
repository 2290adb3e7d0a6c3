//! Starting and stopping `conveyor` processes, and what they print.
//!
//! Every process gets its own temp dir (its working directory and the home of its file sink),
//! binds a random port, and is killed when its [`Conveyor`] is dropped. Its stdout and stderr
//! are read in background tasks so the pipes never fill, and kept for failure messages.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use conveyor_proto::v1::ingest_service_client::IngestServiceClient;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
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

    /// Runs with the config file `toml`, written as `conveyor.toml` into `dir` (which the
    /// caller keeps for as long as the process runs).
    pub fn config_file(self, dir: &Path, toml: &str) -> Self {
        let path = dir.join("conveyor.toml");
        std::fs::write(&path, toml).expect("write the config file");
        let path = path.to_str().expect("a UTF-8 path").to_owned();
        self.args(["--config", &path])
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
    pub(super) role: &'static str,
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

/// Split mode on a NATS server, with a processor writing to `sink` that a test SIGKILLs and
/// starts again on the same port (so the gateway keeps finding it): the sinks' crash tests.
/// AckWait is 2 s, so what a killed processor held comes back quickly.
pub struct NatsSplit {
    pub processor: Conveyor,
    pub gateway: Conveyor,
    /// Kept running for the gateway.
    _ingest: Conveyor,
    nats_url: String,
    port: u16,
    sink: String,
    /// The processor's own environment, for what a sink reads from it (a secret).
    env: Vec<(String, String)>,
}

impl NatsSplit {
    pub async fn start(nats_url: &str, sink: &str) -> NatsSplit {
        Self::start_with_env(nats_url, sink, &[]).await
    }

    /// With these variables in the processor's environment.
    pub async fn start_with_env(nats_url: &str, sink: &str, env: &[(&str, &str)]) -> NatsSplit {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let port = conveyor_testkit::free_port();
        let processor = Self::processor_at(nats_url, port, sink, &env).await;
        let ingest = Self::on_nats(Spawn::new("ingest"), nats_url).start().await;
        let gateway = Spawn::gateway_for(&ingest, &[&processor]).start().await;
        NatsSplit {
            processor,
            _ingest: ingest,
            gateway,
            nats_url: nats_url.to_owned(),
            port,
            sink: sink.to_owned(),
            env,
        }
    }

    fn on_nats(spawn: Spawn, nats_url: &str) -> Spawn {
        spawn
            .env("QUEUE_TYPE", "nats")
            .env("NATS_URL", nats_url)
            .env("CONVEYOR_NATS_ACK_WAIT_SECS", "2")
    }

    async fn processor_at(
        nats_url: &str,
        port: u16,
        sink: &str,
        env: &[(String, String)],
    ) -> Conveyor {
        let mut spawn = Self::on_nats(Spawn::new("processor"), nats_url);
        for (key, value) in env {
            spawn = spawn.env(key, value);
        }
        spawn
            .without_listen_flags()
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .sink_spec(sink)
            .start()
            .await
    }

    /// SIGKILLs the processor and waits until it is gone.
    pub async fn kill_processor(&mut self) {
        self.processor.sigkill();
        let _ = self.processor.wait_exit(Duration::from_secs(10)).await;
    }

    /// Starts the processor again, on its port.
    pub async fn start_processor(&mut self) {
        self.processor = Self::processor_at(&self.nats_url, self.port, &self.sink, &self.env).await;
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

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Where this process's file sink is.
    pub fn sink_path(&self) -> &Path {
        &self.sink_path
    }
}

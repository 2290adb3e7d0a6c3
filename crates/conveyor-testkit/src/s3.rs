//! S3 for the S3 sink's tests: [`S3Server`] is a private `moto_server` (a real S3 wire
//! protocol server from PyPI's `moto[server]`) on a free port, and [`S3Proxy`] stands between a
//! client and it, answering as a test's script says: passing a request on, answering an error
//! after passing it on (the object is stored, the answer is lost), or answering without.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt as _;
use object_store::ObjectStore as _;

use crate::{free_port, on_path, stop, wait_for_port};

/// The access key the tests sign with (moto takes any).
pub const S3_ACCESS_KEY: &str = "conveyor-test";
pub const S3_SECRET_KEY: &str = "conveyor-test-secret";

/// A `moto_server` for one test, killed on drop.
pub struct S3Server {
    child: Option<Child>,
    port: u16,
}

impl S3Server {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> S3Server {
        let binary = find_moto_server();
        let port = free_port();
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let server = S3Server {
            child: Some(child),
            port,
        };
        wait_for_port(port, Duration::from_secs(60));
        server
    }

    /// `http://127.0.0.1:PORT`, the sink's `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket (S3 `CreateBucket`).
    pub async fn create_bucket(&self, bucket: &str) {
        let answer = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {e}"));
        assert!(
            answer.status().is_success(),
            "create bucket {bucket}: {}",
            answer.status()
        );
    }

    /// Every object of the bucket: its name and its bytes as stored, in name order.
    pub async fn objects(&self, bucket: &str) -> Vec<(String, Vec<u8>)> {
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(S3_ACCESS_KEY)
            .with_secret_access_key(S3_SECRET_KEY)
            .build()
            .expect("an S3 client for the test server");
        let mut listed: Vec<_> = store
            .list(None)
            .try_collect()
            .await
            .unwrap_or_else(|e| panic!("list bucket {bucket}: {e}"));
        listed.sort_by(|a, b| a.location.cmp(&b.location));
        let mut objects = Vec::new();
        for meta in listed {
            let bytes = store
                .get(&meta.location)
                .await
                .unwrap_or_else(|e| panic!("get {}: {e}", meta.location))
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("read {}: {e}", meta.location));
            objects.push((meta.location.to_string(), bytes.to_vec()));
        }
        objects
    }

    pub fn kill(&mut self) {
        stop(&mut self.child);
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `CONVEYOR_MOTO_SERVER`, else the venv scripts/test.sh makes (`<target>/s3-venv`), else
/// `moto_server` on PATH.
pub fn find_moto_server() -> PathBuf {
    if let Some(bin) = std::env::var_os("CONVEYOR_MOTO_SERVER") {
        return PathBuf::from(bin);
    }
    // A test binary lives in <target>/<profile>/deps/.
    let venv = std::env::current_exe().ok().and_then(|exe| {
        exe.ancestors()
            .nth(3)
            .map(|target| target.join("s3-venv/bin/moto_server"))
    });
    venv.filter(|p| p.is_file())
        .or_else(|| on_path("moto_server"))
        .unwrap_or_else(|| {
            panic!(
                "moto_server (an S3 server, PyPI `moto[server]`) not found (CONVEYOR_MOTO_SERVER, \
                 target/s3-venv, PATH). Run `make test`, which installs it into target/s3-venv \
                 (tests/s3/requirements.txt), or `pip install 'moto[server]'`."
            )
        })
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct ProxiedRequest {
    pub method: String,
    /// The path, e.g. `/bucket/prefix/dt=2026-12-04/hour=01/x-10-ab.ndjson.gz`.
    pub path: String,
    /// How many earlier requests had the same method and path.
    pub attempt: usize,
}

/// What the proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// Passed on; the server's answer goes back.
    Pass,
    /// Passed on, then answered with this status instead of the server's: done, answer lost.
    PassThenAnswer(u16),
    /// Answered with this status; the server never sees it.
    Answer(u16),
    /// Answered with this status and an S3 error of this code (`RequestTimeout`, …).
    AnswerCode(u16, &'static str),
}

type ProxyScript = dyn Fn(&ProxiedRequest) -> Proxied + Send + Sync;

struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    script: Box<ProxyScript>,
    seen: Mutex<Vec<(ProxiedRequest, Proxied)>>,
}

/// An HTTP proxy in front of an S3 server, answering as its script says; stops on drop.
pub struct S3Proxy {
    port: u16,
    state: Arc<ProxyState>,
    task: tokio::task::JoinHandle<()>,
}

impl S3Proxy {
    pub async fn start(
        upstream: &S3Server,
        script: impl Fn(&ProxiedRequest) -> Proxied + Send + Sync + 'static,
    ) -> S3Proxy {
        let state = Arc::new(ProxyState {
            upstream: upstream.endpoint(),
            client: reqwest::Client::new(),
            script: Box::new(script),
            seen: Mutex::new(Vec::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let app = axum::Router::new()
            .fallback(relay)
            .with_state(Arc::clone(&state));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        S3Proxy { port, state, task }
    }

    /// `http://127.0.0.1:PORT`, the sink's `endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request so far, with what was done with it.
    pub fn seen(&self) -> Vec<(ProxiedRequest, Proxied)> {
        self.state
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    axum::extract::State(state): axum::extract::State<Arc<ProxyState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let request = {
        let seen = state.seen.lock().unwrap_or_else(|p| p.into_inner());
        let attempt = seen
            .iter()
            .filter(|(r, _)| r.method == method.as_str() && r.path == path)
            .count();
        ProxiedRequest {
            method: method.to_string(),
            path,
            attempt,
        }
    };
    let action = (state.script)(&request);
    state
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((request, action));
    match action {
        Proxied::Answer(status) => return answer(status, "ProxyRefused"),
        Proxied::AnswerCode(status, code) => return answer(status, code),
        Proxied::Pass | Proxied::PassThenAnswer(_) => {}
    }
    let target = format!(
        "{}{}",
        state.upstream,
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut forwarded = state.client.request(method, target).body(body);
    for (name, value) in &headers {
        if name != "host" && name != "content-length" {
            forwarded = forwarded.header(name, value);
        }
    }
    let upstream = match forwarded.send().await {
        Ok(upstream) => upstream,
        Err(e) => return answer_with(502, format!("proxy: {e}")),
    };
    if let Proxied::PassThenAnswer(status) = action {
        return answer(status, "ProxyLostTheAnswer");
    }
    let status = upstream.status().as_u16();
    let mut reply = Response::builder().status(status);
    for (name, value) in upstream.headers() {
        if name != "transfer-encoding" && name != "content-length" {
            reply = reply.header(name, value);
        }
    }
    let bytes = upstream.bytes().await.unwrap_or_default();
    reply
        .body(axum::body::Body::from(bytes))
        .unwrap_or_else(|e| answer_with(500, format!("proxy: {e}")))
}

fn answer(status: u16, code: &str) -> Response {
    answer_with(
        status,
        format!("<Error><Code>{code}</Code><Message>the test proxy says so</Message></Error>"),
    )
}

fn answer_with(status: u16, body: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
        .into_response()
}

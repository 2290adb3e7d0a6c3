//! A webhook receiver for the HTTP sink's tests: a real HTTP server on a free port that records
//! every request (when it came, its headers and body, what it was answered and when) and answers
//! as the test's script says: 200, a 429 with `Retry-After`, a 503, a 400 with a body, or an
//! answer held back past the sender's timeout.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub method: String,
    pub path: String,
    /// Lower-case names; the last value of a repeated header.
    pub headers: BTreeMap<String, String>,
    pub body: Bytes,
    /// How many earlier requests had this one's `idempotency-key`.
    pub attempt: usize,
    /// The status answered, and when the answer went out.
    pub answered: Option<(u16, Instant)>,
}

impl Received {
    pub fn key(&self) -> &str {
        self.headers
            .get("idempotency-key")
            .map(String::as_str)
            .unwrap_or_default()
    }
}

/// What the receiver answers to one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Held back this long before answering.
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: &str) -> Reply {
        self.body = body.to_owned();
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Script = dyn Fn(&Received) -> Reply + Send + Sync;

struct State {
    script: Box<Script>,
    requests: Mutex<Vec<Received>>,
    attempts: Mutex<HashMap<String, usize>>,
}

/// The receiver; stops when dropped.
pub struct WebhookReceiver {
    port: u16,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    /// Serves on a free port of 127.0.0.1, answering each request as `script` says.
    pub async fn start(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the webhook receiver");
        let port = listener.local_addr().expect("its address").port();
        let state = Arc::new(State {
            script: Box::new(script),
            requests: Mutex::new(Vec::new()),
            attempts: Mutex::new(HashMap::new()),
        });
        let shared = Arc::clone(&state);
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let state = Arc::clone(&shared);
                async move { answer(&state, method, uri, headers, body).await }
            },
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        WebhookReceiver {
            port,
            state,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request so far, in the order they came.
    pub fn requests(&self) -> Vec<Received> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn answer(
    state: &State,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let headers: BTreeMap<String, String> = headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let mut received = Received {
        at: Instant::now(),
        method: method.to_string(),
        path: uri.path().to_owned(),
        headers,
        body,
        attempt: 0,
        answered: None,
    };
    received.attempt = {
        let mut attempts = state.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let count = attempts.entry(received.key().to_owned()).or_default();
        *count += 1;
        *count - 1
    };
    let reply = (state.script)(&received);
    let at = {
        let mut requests = state.requests.lock().unwrap_or_else(|p| p.into_inner());
        requests.push(received);
        requests.len() - 1
    };
    tokio::time::sleep(reply.delay).await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    state.requests.lock().unwrap_or_else(|p| p.into_inner())[at].answered =
        Some((reply.status, Instant::now()));
    let mut response = (status, reply.body).into_response();
    for (name, value) in reply.headers {
        if let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

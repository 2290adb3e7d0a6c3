//! Talking to a running process over HTTP: requests and their JSON answers, `/api/v1/status`
//! and the DLQ, polling until a condition holds, and the shapes of error and accepted answers.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process::Conveyor;

impl Conveyor {
    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http()
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} on conveyor {}: {e}", self.role));
        read_json(resp).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let resp = self
            .http()
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

    /// The status and body text of a GET.
    pub async fn get_raw(&self, path: &str) -> (u16, String) {
        let resp = self
            .http()
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

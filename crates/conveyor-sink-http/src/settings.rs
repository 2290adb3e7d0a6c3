//! The HTTP sink's settings: the quick form (`--sink https://…`) and the `[sinks.NAME]` table.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use conveyor_sink::settings::Settings;
use reqwest::Method;
use reqwest::Url;
use reqwest::header::{HeaderName, HeaderValue};

/// Headers the sink sets itself, so a configured one would contradict it.
const OWN_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "idempotency-key",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

/// How events are put into request bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// One event per request: its record as a JSON object; `Idempotency-Key` is the event id.
    Event,
    /// A JSON array of records per request; `Idempotency-Key` names the batch.
    Array,
    /// Records one per line (`application/x-ndjson`); `Idempotency-Key` names the batch.
    Ndjson,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Event | Encoding::Array => "application/json",
            Encoding::Ndjson => "application/x-ndjson",
        }
    }
}

/// A Standard Webhooks signing secret (`whsec_` and base64 of 24 to 64 bytes); never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(pub(crate) Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(***)")
    }
}

impl WebhookSecret {
    pub fn parse(text: &str) -> Result<Self, String> {
        let problem = "a webhook secret is `whsec_` followed by the base64 of 24 to 64 random bytes (Standard Webhooks)";
        let encoded = text.strip_prefix("whsec_").ok_or(problem)?;
        let key = BASE64.decode(encoded).map_err(|_| problem)?;
        if !(24..=64).contains(&key.len()) {
            return Err(format!("{problem}; this one is {} bytes", key.len()));
        }
        Ok(WebhookSecret(key))
    }
}

/// Where and how the sink sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub url: Url,
    pub method: Method,
    pub encoding: Encoding,
    /// Sent with every request, after the sink's own.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Signs every request when set.
    pub secret: Option<WebhookSecret>,
    /// Longest one request may take, connecting included.
    pub timeout: Duration,
    /// Most events in one request (`array`, `ndjson`).
    pub max_events: usize,
    /// Most body bytes in one request (`array`, `ndjson`; an event larger than this goes alone).
    pub max_bytes: usize,
    /// Most requests in flight at once, across all workers.
    pub concurrency: usize,
    /// A PEM file of CA certificates trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl HttpSettings {
    /// The quick form: the receiver's URL, `http://` or `https://`, used as it is (its query
    /// string is the receiver's); one event per POST, the other settings at their defaults.
    pub fn from_url(spec: &str) -> Result<Self, String> {
        let mut table = serde_json::Map::new();
        table.insert("url".into(), serde_json::Value::String(spec.to_owned()));
        Self::from_settings(&table)
    }

    /// A `[sinks.NAME]` table with `type = "http"`: `url` (required), `method` (POST),
    /// `encoding` (event), `headers`, `secret` or `secret_env`, `timeout_ms` (10000),
    /// `max_events` (500), `max_bytes` (1 MiB), `concurrency` (16), `ca_file`.
    pub fn from_settings(
        table: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, String> {
        let settings = Settings::new(
            "http",
            table,
            &[
                "url",
                "method",
                "encoding",
                "headers",
                "secret",
                "secret_env",
                "timeout_ms",
                "max_events",
                "max_bytes",
                "concurrency",
                "ca_file",
            ],
        )?;
        let text = settings.required("url", "https://receiver.example/hooks/events")?;
        let url = Url::parse(&text).map_err(|e| format!("'{text}' is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!(
                "'{}' is not an http:// or https:// URL with a host",
                redact(&url)
            ));
        }
        let method = match settings.choice("method", &["POST", "PUT", "PATCH"])? {
            None | Some("POST") => Method::POST,
            Some("PUT") => Method::PUT,
            Some(_) => Method::PATCH,
        };
        let encoding = match settings.choice("encoding", &["event", "array", "ndjson"])? {
            None | Some("event") => Encoding::Event,
            Some("array") => Encoding::Array,
            Some(_) => Encoding::Ndjson,
        };
        let mut headers = Vec::new();
        for (name, value) in settings.strings("headers")? {
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("headers: '{name}' is not a header name"))?;
            if OWN_HEADERS.contains(&header.as_str()) {
                return Err(format!(
                    "headers: {header} is set by the sink itself (see `encoding` and `secret`)"
                ));
            }
            let value = HeaderValue::from_str(&value)
                .map_err(|_| format!("headers: the value of {header} is not a header value"))?;
            headers.push((header, value));
        }
        let secret = match (settings.text("secret"), settings.text("secret_env")) {
            (Some(_), Some(_)) => return Err("give `secret` or `secret_env`, not both".into()),
            (Some(secret), None) => Some(WebhookSecret::parse(&secret)?),
            (None, Some(name)) => {
                let secret = std::env::var(&name).map_err(|_| {
                    format!("secret_env: the environment variable {name} is not set")
                })?;
                Some(WebhookSecret::parse(&secret).map_err(|e| format!("{name}: {e}"))?)
            }
            (None, None) => None,
        };
        let ca_file = settings.text("ca_file").map(PathBuf::from);
        if let Some(path) = &ca_file
            && !path.is_file()
        {
            return Err(format!("ca_file: no file '{}'", path.display()));
        }
        Ok(HttpSettings {
            url,
            method,
            encoding,
            headers,
            secret,
            timeout: Duration::from_millis(settings.number("timeout_ms", 10_000, 1..=600_000)?),
            max_events: settings.number("max_events", 500, 1..=100_000)? as usize,
            max_bytes: settings.number("max_bytes", 1 << 20, 1..=(256 << 20))? as usize,
            concurrency: settings.number("concurrency", 16, 1..=1024)? as usize,
            ca_file,
        })
    }

    /// `https://host:port/path`: no user, password or query string (they may hold secrets).
    pub fn describe(&self) -> String {
        redact(&self.url)
    }
}

fn redact(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{}://{host}:{port}{}", url.scheme(), url.path()),
        None => format!("{}://{host}{}", url.scheme(), url.path()),
    }
}

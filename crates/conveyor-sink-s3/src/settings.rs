//! The S3 sink's settings: the quick form (`--sink s3://bucket/prefix?endpoint=…`) and the
//! `[sinks.NAME]` table.

use std::time::Duration;

use conveyor_sink::settings::{Settings, query_table};

/// An S3 secret access key; never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub(crate) String);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(***)")
    }
}

/// Where and how the sink writes its objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// Put in front of every object name, without a trailing `/` (empty: the bucket's root).
    pub prefix: String,
    /// An S3-compatible server (`http://127.0.0.1:9000` for MinIO or moto); none: AWS, or
    /// `AWS_ENDPOINT` from the environment.
    pub endpoint: Option<String>,
    /// None: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: Option<String>,
    /// None: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) from the
    /// environment.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<SecretKey>,
    /// Objects gzipped (`.ndjson.gz`, `Content-Encoding` left alone: the object is the file).
    pub gzip: bool,
    /// An object is written once it holds this many events...
    pub max_events: usize,
    /// ...or this many bytes of NDJSON (before gzip)...
    pub max_bytes: usize,
    /// ...or when its first events have waited this long for more.
    pub linger: Duration,
    /// How long one upload may take, its own retries included.
    pub timeout: Duration,
}

const KEYS: &[&str] = &[
    "bucket",
    "prefix",
    "endpoint",
    "region",
    "access_key_id",
    "secret_access_key",
    "secret_access_key_env",
    "gzip",
    "max_events",
    "max_bytes",
    "linger_ms",
    "timeout_ms",
];

impl S3Settings {
    /// The quick form: `s3://bucket/prefix?endpoint=http://127.0.0.1:9000&gzip=false`; the
    /// query takes the table's keys except the bucket and prefix, and no secret (credentials
    /// come from the environment, or the config file).
    pub fn from_url(spec: &str) -> Result<Self, String> {
        let rest = spec
            .strip_prefix("s3://")
            .ok_or_else(|| format!("'{spec}' is not an s3:// URL"))?;
        let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        let mut table = query_table(query, |key| match key {
            "bucket" | "prefix" => Some(format!(
                "the {key} is in the URL's path (s3://bucket/prefix), not `{key}=`"
            )),
            "secret_access_key" => Some(
                "a secret does not belong in a URL: set AWS_SECRET_ACCESS_KEY, or use \
                 `secret_access_key_env` or a config file"
                    .to_owned(),
            ),
            _ => None,
        })?;
        table.insert("bucket".into(), bucket.into());
        table.insert("prefix".into(), prefix.into());
        Self::from_settings(&table)
    }

    /// A `[sinks.NAME]` table with `type = "s3"`: `bucket` (required), `prefix`, `endpoint`,
    /// `region`, `access_key_id`, `secret_access_key` or `secret_access_key_env`, `gzip`
    /// (true), `max_events` (10000), `max_bytes` (33554432), `linger_ms` (200), `timeout_ms`
    /// (30000).
    pub fn from_settings(
        table: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, String> {
        let settings = Settings::new("s3", table, KEYS)?;
        let bucket = settings.required("bucket", "my-events")?;
        check_bucket(&bucket)?;
        let prefix = settings
            .text("prefix")
            .unwrap_or_default()
            .trim_matches('/')
            .to_owned();
        check_prefix(&prefix)?;
        let endpoint = settings.text("endpoint").filter(|e| !e.is_empty());
        if let Some(endpoint) = &endpoint {
            let url = url::Url::parse(endpoint)
                .map_err(|e| format!("endpoint '{endpoint}' is not a URL: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(format!(
                    "endpoint '{endpoint}' is not an http(s):// server address"
                ));
            }
        }
        let secret_access_key = match (
            settings.text("secret_access_key"),
            settings.text("secret_access_key_env"),
        ) {
            (Some(_), Some(_)) => {
                return Err("give `secret_access_key` or `secret_access_key_env`, not both".into());
            }
            (Some(secret), None) => Some(SecretKey(secret)),
            (None, Some(name)) => Some(SecretKey(std::env::var(&name).map_err(|_| {
                format!("secret_access_key_env: the environment variable {name} is not set")
            })?)),
            (None, None) => None,
        };
        let access_key_id = settings.text("access_key_id");
        if access_key_id.is_some() != secret_access_key.is_some() {
            return Err(
                "give `access_key_id` and a secret access key together, or neither (then both \
                 come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                    .into(),
            );
        }
        Ok(S3Settings {
            bucket,
            prefix,
            endpoint,
            region: settings.text("region").filter(|r| !r.is_empty()),
            access_key_id,
            secret_access_key,
            gzip: settings.boolean("gzip", true)?,
            max_events: settings.number("max_events", 10_000, 1..=1_000_000)? as usize,
            max_bytes: settings.number("max_bytes", 32 << 20, 1024..=(1 << 30))? as usize,
            linger: Duration::from_millis(settings.number("linger_ms", 200, 0..=60_000)?),
            timeout: Duration::from_millis(settings.number("timeout_ms", 30_000, 100..=600_000)?),
        })
    }

    /// `s3://bucket/prefix` (and the endpoint, when it is not AWS): no credentials.
    pub fn describe(&self) -> String {
        let mut shown = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            shown.push('/');
            shown.push_str(&self.prefix);
        }
        if let Some(endpoint) = &self.endpoint {
            shown.push_str("?endpoint=");
            shown.push_str(endpoint);
        }
        shown
    }
}

/// An S3 bucket name: 3 to 63 lower-case letters, digits, `.` and `-`, starting and ending
/// with a letter or digit.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let edges_ok =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edges_ok(bucket.chars().next())
        && edges_ok(bucket.chars().last())
    {
        Ok(())
    } else {
        Err(format!(
            "'{bucket}' is not a bucket name (3 to 63 lower-case letters, digits, '.' and '-', \
             starting and ending with a letter or digit)"
        ))
    }
}

/// A prefix of object names: path segments of printable characters, none empty, `.` or `..`.
fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    let bad_segment = prefix
        .split('/')
        .find(|s| s.is_empty() || *s == "." || *s == ".." || s.chars().any(char::is_control));
    match bad_segment {
        None if prefix.len() <= 512 => Ok(()),
        None => Err(format!("prefix is at most 512 bytes, not {}", prefix.len())),
        Some(segment) => Err(format!(
            "prefix '{prefix}' has a segment '{segment}' that cannot be part of an object name \
             (empty, '.', '..' or a control character)"
        )),
    }
}

//! Which sink a `--sink` flag or a `[sinks.NAME]` table names, and opening it: the one place
//! that knows every sink crate ([`conveyor_sink`] for the local ones,
//! `conveyor_sink_postgres`, `conveyor_sink_http`, `conveyor_sink_s3`, and `conveyor_sink_nats` /
//! `conveyor_sink_kafka` in a build with the `nats` / `kafka` feature).

use std::sync::Arc;

use conveyor_sink::settings::Settings;
use conveyor_sink::{BlackholeSink, FileSettings, FileSink, Sink, StdoutSink};
use conveyor_sink_http::{HttpSettings, HttpSink};
#[cfg(feature = "kafka")]
use conveyor_sink_kafka::{KafkaSink, KafkaSinkSettings};
#[cfg(feature = "nats")]
use conveyor_sink_nats::{NatsSink, NatsSinkSettings};
use conveyor_sink_postgres::{PostgresSettings, PostgresSink};
use conveyor_sink_s3::{S3Settings, S3Sink};

const KINDS: &str = "file, stdout, blackhole, postgres, http, s3, nats, kafka";

#[cfg(not(feature = "nats"))]
const WITHOUT_NATS: &str =
    "this conveyor was built without NATS (cargo feature `nats`; the default build includes it)";

#[cfg(not(feature = "kafka"))]
const WITHOUT_KAFKA: &str =
    "this conveyor was built without Kafka (cargo feature `kafka`; the default build includes it)";

/// Where processed events go, as the `--sink` flag names it: `file:PATH`, `stdout`,
/// `blackhole`, `postgres://…`, `http(s)://…`, `s3://bucket/prefix`, `nats://…?subject=…` or
/// `kafka://…/topic`. Parsed once, when the flag is read; [`SinkSpec::open`] builds the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    File(Box<FileSettings>),
    Stdout,
    Blackhole,
    Postgres(Box<PostgresSettings>),
    Http(Box<HttpSettings>),
    S3(Box<S3Settings>),
    #[cfg(feature = "nats")]
    Nats(Box<NatsSinkSettings>),
    #[cfg(feature = "kafka")]
    Kafka(Box<KafkaSinkSettings>),
}

impl std::str::FromStr for SinkSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            return PostgresSettings::from_url(spec).map(|s| SinkSpec::Postgres(Box::new(s)));
        }
        if spec.starts_with("http://") || spec.starts_with("https://") {
            return HttpSettings::from_url(spec).map(|s| SinkSpec::Http(Box::new(s)));
        }
        if spec.starts_with("s3://") {
            return S3Settings::from_url(spec).map(|s| SinkSpec::S3(Box::new(s)));
        }
        if spec.starts_with("nats://") {
            #[cfg(feature = "nats")]
            return NatsSinkSettings::from_url(spec).map(|s| SinkSpec::Nats(Box::new(s)));
            #[cfg(not(feature = "nats"))]
            return Err(WITHOUT_NATS.into());
        }
        if spec.starts_with("kafka://") {
            #[cfg(feature = "kafka")]
            return KafkaSinkSettings::from_url(spec).map(|s| SinkSpec::Kafka(Box::new(s)));
            #[cfg(not(feature = "kafka"))]
            return Err(WITHOUT_KAFKA.into());
        }
        match spec.split_once(':') {
            Some(("file", path)) if !path.is_empty() => {
                Ok(SinkSpec::File(Box::new(FileSettings::at(path))))
            }
            None if spec == "stdout" => Ok(SinkSpec::Stdout),
            None if spec == "blackhole" => Ok(SinkSpec::Blackhole),
            _ => Err(format!(
                "'{spec}' is not a sink; use file:PATH, stdout, blackhole, postgres://user@host:5432/db?table=events, https://receiver/path, s3://bucket/prefix, nats://host:4222?subject=orders.processed or kafka://host:9092/topic"
            )),
        }
    }
}

/// The spec as it is shown (a PostgreSQL sink without its user and password).
impl std::fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkSpec::File(settings) => write!(f, "file:{}", settings.path.display()),
            SinkSpec::Stdout => f.write_str("stdout"),
            SinkSpec::Blackhole => f.write_str("blackhole"),
            SinkSpec::Postgres(settings) => f.write_str(&settings.describe()),
            SinkSpec::Http(settings) => f.write_str(&settings.describe()),
            SinkSpec::S3(settings) => f.write_str(&settings.describe()),
            #[cfg(feature = "nats")]
            SinkSpec::Nats(settings) => f.write_str(&settings.describe()),
            #[cfg(feature = "kafka")]
            SinkSpec::Kafka(settings) => f.write_str(&settings.describe()),
        }
    }
}

impl SinkSpec {
    /// A sink declared in the config file: `type` and the type's own keys.
    pub fn from_settings(settings: &serde_json::Value) -> Result<Self, String> {
        let table = settings
            .as_object()
            .ok_or_else(|| "a sink is a table of settings".to_owned())?;
        let kind = table
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| format!("no `type` ({KINDS})"))?;
        Ok(match kind {
            "postgres" => SinkSpec::Postgres(Box::new(PostgresSettings::from_settings(table)?)),
            "http" => SinkSpec::Http(Box::new(HttpSettings::from_settings(table)?)),
            "s3" => SinkSpec::S3(Box::new(S3Settings::from_settings(table)?)),
            #[cfg(feature = "nats")]
            "nats" => SinkSpec::Nats(Box::new(NatsSinkSettings::from_settings(table)?)),
            #[cfg(not(feature = "nats"))]
            "nats" => return Err(WITHOUT_NATS.into()),
            #[cfg(feature = "kafka")]
            "kafka" => SinkSpec::Kafka(Box::new(KafkaSinkSettings::from_settings(table)?)),
            #[cfg(not(feature = "kafka"))]
            "kafka" => return Err(WITHOUT_KAFKA.into()),
            "file" => SinkSpec::File(Box::new(FileSettings::from_settings(table)?)),
            "stdout" => {
                Settings::new(kind, table, &[])?;
                SinkSpec::Stdout
            }
            "blackhole" => {
                Settings::new(kind, table, &[])?;
                SinkSpec::Blackhole
            }
            other => return Err(format!("unknown sink type '{other}' (known: {KINDS})")),
        })
    }

    /// Opens the sink (a file sink creates its directory and cuts a torn last line; a
    /// PostgreSQL sink connects when it first writes).
    pub fn open(&self) -> Result<Arc<dyn Sink>, String> {
        Ok(match self {
            SinkSpec::File(settings) => {
                Arc::new(FileSink::with(settings.as_ref().clone()).map_err(|e| {
                    format!("cannot open file sink '{}': {e}", settings.path.display())
                })?)
            }
            SinkSpec::Stdout => Arc::new(StdoutSink),
            SinkSpec::Blackhole => Arc::new(BlackholeSink),
            SinkSpec::Postgres(settings) => PostgresSink::new(settings.as_ref().clone()),
            SinkSpec::Http(settings) => Arc::new(HttpSink::new(settings.as_ref().clone())?),
            SinkSpec::S3(settings) => Arc::new(S3Sink::new(settings.as_ref().clone())?),
            #[cfg(feature = "nats")]
            SinkSpec::Nats(settings) => Arc::new(NatsSink::new(settings.as_ref().clone())),
            #[cfg(feature = "kafka")]
            SinkSpec::Kafka(settings) => Arc::new(KafkaSink::new(settings.as_ref().clone())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_form_names_each_sink_and_refuses_the_rest_by_name() {
        assert_eq!(
            "file:./out.ndjson".parse::<SinkSpec>(),
            Ok(SinkSpec::File(Box::new(FileSettings::at("./out.ndjson"))))
        );
        assert_eq!("stdout".parse::<SinkSpec>(), Ok(SinkSpec::Stdout));
        let postgres: SinkSpec = "postgres://app:pw@db:5432/shop?table=orders"
            .parse()
            .expect("a postgres sink");
        assert_eq!(postgres.to_string(), "postgres://db:5432/shop?table=orders");
        let hook: SinkSpec = "https://hooks.example/in?token=t"
            .parse()
            .expect("an http sink");
        assert_eq!(hook.to_string(), "https://hooks.example/in");
        let refused = "ftp:x".parse::<SinkSpec>().expect_err("not a sink");
        assert!(refused.contains("'ftp:x'"), "{refused}");
        let refused = "postgres://db/shop?table=a-b"
            .parse::<SinkSpec>()
            .expect_err("bad table");
        assert!(refused.contains("'a-b' is not a table name"), "{refused}");
        let refused =
            SinkSpec::from_settings(&serde_json::json!({"type": "ftp"})).expect_err("ftp");
        assert!(
            refused.contains("known: file, stdout, blackhole, postgres, http, s3, nats, kafka"),
            "{refused}"
        );
        let bucket: SinkSpec = "s3://my-events/raw?endpoint=http://127.0.0.1:9000"
            .parse()
            .expect("an s3 sink");
        assert_eq!(
            bucket.to_string(),
            "s3://my-events/raw?endpoint=http://127.0.0.1:9000"
        );
    }
}

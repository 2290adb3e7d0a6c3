//! Which sink a `--sink` flag or a `[sinks.NAME]` table names, and opening it: the one place
//! that knows every sink crate ([`conveyor_sink`] for the local ones,
//! [`conveyor_sink_postgres`]).

use std::path::PathBuf;
use std::sync::Arc;

use conveyor_sink::{BlackholeSink, FileSink, Sink, StdoutSink};
use conveyor_sink_postgres::{PostgresSettings, PostgresSink};

const KINDS: &str = "file, stdout, blackhole, postgres";

/// Where processed events go, as the `--sink` flag names it: `file:PATH`, `stdout`,
/// `blackhole` or `postgres://…`. Parsed once, when the flag is read; [`SinkSpec::open`]
/// builds the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    File(PathBuf),
    Stdout,
    Blackhole,
    Postgres(Box<PostgresSettings>),
}

impl std::str::FromStr for SinkSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            return PostgresSettings::from_url(spec).map(|s| SinkSpec::Postgres(Box::new(s)));
        }
        match spec.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(SinkSpec::File(PathBuf::from(path))),
            None if spec == "stdout" => Ok(SinkSpec::Stdout),
            None if spec == "blackhole" => Ok(SinkSpec::Blackhole),
            _ => Err(format!(
                "'{spec}' is not a sink; use file:PATH, stdout, blackhole or postgres://user@host:5432/db?table=events"
            )),
        }
    }
}

/// The spec as it is shown (a PostgreSQL sink without its user and password).
impl std::fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkSpec::File(path) => write!(f, "file:{}", path.display()),
            SinkSpec::Stdout => f.write_str("stdout"),
            SinkSpec::Blackhole => f.write_str("blackhole"),
            SinkSpec::Postgres(settings) => f.write_str(&settings.describe()),
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
        if kind == "postgres" {
            return PostgresSettings::from_settings(table).map(|s| SinkSpec::Postgres(Box::new(s)));
        }
        let allowed: &[&str] = match kind {
            "file" => &["type", "path"],
            "stdout" | "blackhole" => &["type"],
            other => return Err(format!("unknown sink type '{other}' (known: {KINDS})")),
        };
        if let Some(unknown) = table.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!(
                "a {kind} sink has no setting `{unknown}` (settings: {})",
                allowed.join(", ")
            ));
        }
        Ok(match kind {
            "file" => match table.get("path").and_then(|p| p.as_str()) {
                Some(path) if !path.is_empty() => SinkSpec::File(PathBuf::from(path)),
                _ => return Err("a file sink needs `path`".into()),
            },
            "stdout" => SinkSpec::Stdout,
            _ => SinkSpec::Blackhole,
        })
    }

    /// Opens the sink (a file sink creates its directory and cuts a torn last line; a
    /// PostgreSQL sink connects when it first writes).
    pub fn open(&self) -> Result<Arc<dyn Sink>, String> {
        Ok(match self {
            SinkSpec::File(path) => Arc::new(
                FileSink::open(path)
                    .map_err(|e| format!("cannot open file sink '{}': {e}", path.display()))?,
            ),
            SinkSpec::Stdout => Arc::new(StdoutSink),
            SinkSpec::Blackhole => Arc::new(BlackholeSink),
            SinkSpec::Postgres(settings) => PostgresSink::new(settings.as_ref().clone()),
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
            Ok(SinkSpec::File(PathBuf::from("./out.ndjson")))
        );
        assert_eq!("stdout".parse::<SinkSpec>(), Ok(SinkSpec::Stdout));
        let postgres: SinkSpec = "postgres://app:pw@db:5432/shop?table=orders"
            .parse()
            .expect("a postgres sink");
        assert_eq!(postgres.to_string(), "postgres://db:5432/shop?table=orders");
        let refused = "ftp:x".parse::<SinkSpec>().expect_err("not a sink");
        assert!(refused.contains("'ftp:x'"), "{refused}");
        let refused = "postgres://db/shop?table=a-b"
            .parse::<SinkSpec>()
            .expect_err("bad table");
        assert!(refused.contains("'a-b' is not a table name"), "{refused}");
        let refused = SinkSpec::from_settings(&serde_json::json!({"type": "s3"})).expect_err("s3");
        assert!(
            refused.contains("known: file, stdout, blackhole, postgres"),
            "{refused}"
        );
    }
}

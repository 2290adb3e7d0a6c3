//! The NATS sink's settings: the quick form (`--sink nats://host:4222?subject=…`) and the
//! `[sinks.NAME]` table.

use std::time::Duration;

use conveyor_queue_nats::{parse_servers, without_credentials};
use conveyor_sink::settings::{Settings, query_table};

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The event's record as JSON (the fields every sink writes; `application/json`).
    Record,
    /// conveyor's own protobuf event, as its NATS queue stores it: another conveyor can take
    /// the subject's stream as its queue (`QUEUE_TYPE=nats`).
    Event,
}

/// Where and how the sink publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSinkSettings {
    /// The server list as given (it may carry credentials: never shown).
    pub url: String,
    pub subject: String,
    /// The stream that must capture `subject`; created when missing unless `create_stream`
    /// is false. Without it, some stream must already capture the subject.
    pub stream: Option<String>,
    pub create_stream: bool,
    pub encoding: Encoding,
    /// The created stream's duplicate window: a re-publish of an id inside it is stored once.
    pub duplicate_window: Duration,
    /// How long a publish waits for its PubAck.
    pub timeout: Duration,
    /// Most publishes awaiting their PubAck at once, across all workers.
    pub max_in_flight: usize,
}

const KEYS: &[&str] = &[
    "url",
    "subject",
    "stream",
    "create_stream",
    "encoding",
    "duplicate_window_secs",
    "timeout_ms",
    "max_in_flight",
];

impl NatsSinkSettings {
    /// The quick form: `nats://host:4222?subject=orders.processed&stream=ORDERS` (several
    /// servers comma-separated before the `?`); the query takes the table's keys.
    pub fn from_url(spec: &str) -> Result<Self, String> {
        let (servers, query) = spec.split_once('?').unwrap_or((spec, ""));
        let mut table = query_table(query, |key| {
            (key == "url").then(|| "the servers come before the `?`, not as `url=`".to_owned())
        })?;
        table.insert("url".into(), serde_json::Value::String(servers.to_owned()));
        Self::from_settings(&table)
    }

    /// A `[sinks.NAME]` table with `type = "nats"`: `url` (nats://127.0.0.1:4222), `subject`
    /// (required), `stream`, `create_stream` (true), `encoding` (record | event),
    /// `duplicate_window_secs` (120), `timeout_ms` (5000), `max_in_flight` (1024).
    pub fn from_settings(
        table: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, String> {
        let settings = Settings::new("nats", table, KEYS)?;
        let url = settings
            .text("url")
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        parse_servers(&url).map_err(|e| format!("url: {e}"))?;
        let subject = settings.required("subject", "orders.processed")?;
        check_subject(&subject)?;
        let stream = settings.text("stream");
        if let Some(name) = &stream {
            check_stream_name(name)?;
        }
        let encoding = match settings.choice("encoding", &["record", "event"])? {
            None | Some("record") => Encoding::Record,
            Some(_) => Encoding::Event,
        };
        Ok(NatsSinkSettings {
            url,
            subject,
            create_stream: settings.boolean("create_stream", true)?,
            stream,
            encoding,
            duplicate_window: Duration::from_secs(settings.number(
                "duplicate_window_secs",
                120,
                1..=86_400,
            )?),
            timeout: Duration::from_millis(settings.number("timeout_ms", 5_000, 1..=600_000)?),
            max_in_flight: settings.number("max_in_flight", 1024, 1..=65_536)? as usize,
        })
    }

    /// `nats://host:4222?subject=orders.processed`: no user, password or token.
    pub fn describe(&self) -> String {
        let servers = parse_servers(&self.url)
            .map(|servers| {
                servers
                    .iter()
                    .map(without_credentials)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        format!("{servers}?subject={}", self.subject)
    }
}

/// A subject a message can be published to: dot-separated tokens, none empty, no wildcard,
/// no white space.
fn check_subject(subject: &str) -> Result<(), String> {
    let problem = if subject.chars().any(|c| c.is_whitespace()) {
        Some("holds white space")
    } else if subject.split('.').any(|token| token.is_empty()) {
        Some("has an empty token (a leading, trailing or double dot)")
    } else if subject.split('.').any(|token| token == "*" || token == ">") {
        Some("has a wildcard; a message is published to one subject")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!("subject '{subject}' {problem}")),
        None => Ok(()),
    }
}

/// A JetStream stream name: no white space, `.`, `*`, `>`, `/` or `\`.
fn check_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 255
        || name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(format!(
            "stream '{name}' is not a stream name (1 to 255 characters, none of . * > / \\ or white space)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_form_reads_servers_and_query_and_hides_credentials() {
        let settings = NatsSinkSettings::from_url(
            "nats://app:secret@a:4222,nats://b:4223?subject=orders.out&stream=ORDERS&encoding=event",
        )
        .expect("a nats sink");
        assert_eq!(settings.subject, "orders.out");
        assert_eq!(settings.stream.as_deref(), Some("ORDERS"));
        assert_eq!(settings.encoding, Encoding::Event);
        assert!(settings.create_stream);
        assert_eq!(settings.timeout, Duration::from_secs(5));
        assert_eq!(
            settings.describe(),
            "nats://a:4222,nats://b:4223?subject=orders.out"
        );
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let refused = |spec: &str| NatsSinkSettings::from_url(spec).expect_err(spec);
        assert_eq!(
            refused("nats://a:4222"),
            "a nats sink needs `subject` (orders.processed)"
        );
        assert!(refused("nats://a:4222?subject=a..b").contains("empty token"));
        assert!(refused("nats://a:4222?subject=a.*").contains("wildcard"));
        assert!(refused("nats://a:4222?subject=a&stream=A.B").contains("not a stream name"));
        assert!(refused("nats://a:4222?subject=a&encoding=json").contains("encoding is one of"));
        assert!(refused("nats://a:42x2?subject=a").starts_with("url: bad server"));
        assert!(refused("nats://a:4222?subject=a&topic=b").contains("no setting `topic`"));
        assert!(refused("nats://a:4222?subject=a&timeout_ms=0").contains("timeout_ms"));
    }
}

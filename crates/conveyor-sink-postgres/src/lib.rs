//! The PostgreSQL sink: each batch is one `INSERT … SELECT … FROM UNNEST(…) ON CONFLICT (id)
//! DO NOTHING` (one round trip, one transaction), so a redelivered event never makes a second
//! row: the table's primary key on the event id is the first line of defence against
//! duplicates, before the processor's seen-id window.
//!
//! Rows: `id text primary key, source text, "timestamp" timestamptz, data jsonb, metadata
//! jsonb, processed_at timestamptz`, then the user's own columns, each a field of the event
//! named by a jq path ([`conveyor_sink::field`]) and cast by the server to the column's type
//! (the table is created when missing, unless `create_table = false`). `data` is the event's
//! data as JSON (text as a JSON string, bytes that are not UTF-8 as `{"data_base64": …}`, see
//! [`conveyor_sink::record`]).
//!
//! Failures, by SQLSTATE class (see [`classify`]): a connection lost or refused, the server
//! starting up or shutting down, out of resources, a serialization failure or deadlock are
//! retryable (the events wait in the queue); a data exception (22), an integrity constraint
//! (23) or a syntax/undefined object (42) is permanent. A permanent failure of a batch is
//! narrowed down by writing its events one at a time: only the rows the server refuses go to
//! the DLQ, with the server's message; the others are written.
//!
//! Connections: a small pool (`connections`, default 4), opened when first needed and replaced
//! when the server closes them, so the sink starts even while the database is down (it is then
//! unhealthy until the database answers). TLS is not supported yet: `sslmode=require` is
//! refused when the settings are read, `prefer` (the default) connects without TLS.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use conveyor_core::Event;
use conveyor_sink::field::{EventFields, FieldPath, as_text};
use conveyor_sink::record::{write_data_value, write_metadata};
use conveyor_sink::settings::Settings;
use conveyor_sink::{Sink, SinkError};
use tokio::sync::Semaphore;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

/// Settings of conveyor's own in the quick form's query string (the rest is the server's).
const OWN_KEYS: &[&str] = &["table", "create_table", "connections", "timeout_ms"];

/// Where and how the sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// The connection settings, without conveyor's own keys.
    pub connection: tokio_postgres::Config,
    /// `table` or `schema.table`.
    pub table: TableName,
    /// Create the table when it is missing.
    pub create_table: bool,
    /// Most connections open at once (and so most batches written at once).
    pub connections: usize,
    /// Longest a write may take.
    pub timeout: Duration,
    /// The user's own columns, after the default ones.
    pub columns: Vec<Column>,
}

/// A column of the user's own: a field of the event, cast to `sql_type` by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub path: FieldPath,
    /// One of [`COLUMN_TYPES`].
    pub sql_type: &'static str,
}

/// The types a user column may have (a value is sent as text and cast: a value the type
/// cannot hold is the event's fault, and only that event goes to the DLQ).
pub const COLUMN_TYPES: &[&str] = &[
    "text",
    "integer",
    "bigint",
    "double precision",
    "numeric",
    "boolean",
    "timestamptz",
    "date",
    "uuid",
    "jsonb",
];

/// The sink's own columns, which a user column cannot be.
const DEFAULT_COLUMNS: &[&str] = &[
    "id",
    "source",
    "timestamp",
    "data",
    "metadata",
    "processed_at",
];

impl Column {
    /// `name = ".data.path"` (a text column) or `name = { path = ".data.path", type = "bigint" }`.
    fn parse(name: &str, spec: &serde_json::Value) -> Result<Self, String> {
        let problem = |why: String| format!("columns.{name}: {why}");
        if !TableName::valid_part(name) {
            return Err(problem(
                "a column name is letters, digits and _, not starting with a digit, at most 63"
                    .into(),
            ));
        }
        if DEFAULT_COLUMNS.contains(&name) {
            return Err(problem(format!(
                "{name} is one of the sink's own columns ({})",
                DEFAULT_COLUMNS.join(", ")
            )));
        }
        let (path, sql_type) = match spec {
            serde_json::Value::String(path) => (path.as_str(), "text"),
            serde_json::Value::Object(table) => {
                if let Some(key) = table.keys().find(|k| *k != "path" && *k != "type") {
                    return Err(problem(format!(
                        "no setting `{key}` (settings: path, type)"
                    )));
                }
                let path = table
                    .get("path")
                    .and_then(|p| p.as_str())
                    .ok_or_else(|| problem("needs `path` (e.g. \".data.customer.id\")".into()))?;
                let sql_type = match table.get("type") {
                    None => "text",
                    Some(serde_json::Value::String(t)) => COLUMN_TYPES
                        .iter()
                        .find(|known| **known == t.as_str())
                        .copied()
                        .ok_or_else(|| {
                            problem(format!(
                                "type is one of {}, not '{t}'",
                                COLUMN_TYPES.join(", ")
                            ))
                        })?,
                    Some(other) => return Err(problem(format!("type is a string, not {other}"))),
                };
                (path, sql_type)
            }
            other => {
                return Err(problem(format!(
                    "a column is a field path or {{ path = …, type = … }}, not {other}"
                )));
            }
        };
        Ok(Column {
            name: name.to_owned(),
            path: FieldPath::parse(path).map_err(problem)?,
            sql_type,
        })
    }

    /// The column's value for one event, as the text the server casts.
    fn value(&self, fields: &EventFields<'_>) -> Option<String> {
        let value = fields.get(&self.path)?;
        if self.sql_type == "jsonb" {
            (!value.is_null()).then(|| value.to_string())
        } else {
            as_text(&value)
        }
    }
}

impl PostgresSettings {
    /// The quick form: `postgres://user:pass@host:5432/db?table=events` (`postgresql://` too),
    /// with the optional keys `create_table` (true), `connections` (4) and `timeout_ms`
    /// (30000); every other query key is the server's (`sslmode`, `application_name`, …).
    pub fn from_url(spec: &str) -> Result<Self, String> {
        let mut url =
            url::Url::parse(spec).map_err(|e| format!("'{}' is not a URL: {e}", redact(spec)))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(format!("'{}' is not a postgres:// URL", redact(spec)));
        }
        let mut own = serde_json::Map::new();
        let mut server: Vec<(String, String)> = Vec::new();
        for (key, value) in url.query_pairs() {
            if OWN_KEYS.contains(&key.as_ref()) {
                own.insert(
                    key.into_owned(),
                    serde_json::Value::String(value.into_owned()),
                );
            } else {
                server.push((key.into_owned(), value.into_owned()));
            }
        }
        url.set_query(None);
        if !server.is_empty() {
            url.query_pairs_mut().extend_pairs(server);
        }
        own.insert("url".into(), serde_json::Value::String(url.into()));
        Self::from_settings(&own)
    }

    /// A `[sinks.NAME]` table of the config file with `type = "postgres"`: `url` (required),
    /// `table` (`events`), `create_table`, `connections`, `timeout_ms`, `columns` (see
    /// [`Column`]). Values may be given as strings (the quick form's query) or as TOML values.
    pub fn from_settings(
        settings: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, String> {
        let settings = Settings::new(
            "postgres",
            settings,
            &[
                "url",
                "table",
                "create_table",
                "connections",
                "timeout_ms",
                "columns",
            ],
        )?;
        let url = settings.required("url", "postgres://user@host:5432/database")?;
        let connection: tokio_postgres::Config = url.parse().map_err(|e| {
            format!(
                "'{}' is not a PostgreSQL connection string: {e}",
                redact(&url)
            )
        })?;
        if matches!(connection.get_ssl_mode(), SslMode::Require) {
            return Err("sslmode=require: TLS to PostgreSQL is not supported yet (use sslmode=disable, or prefer, which connects without TLS)".into());
        }
        let table = TableName::parse(&settings.text("table").unwrap_or_else(|| "events".into()))?;
        let create_table = settings.boolean("create_table", true)?;
        let connections = settings.number("connections", 4, 1..=256)? as usize;
        let timeout =
            Duration::from_millis(settings.number("timeout_ms", 30_000, 1..=3_600_000)?);
        let columns = settings
            .entries("columns")?
            .iter()
            .map(|(name, spec)| Column::parse(name, spec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PostgresSettings {
            connection,
            table,
            create_table,
            connections,
            timeout,
            columns,
        })
    }

    /// `postgres://host:port/db?table=t`, without user or password.
    pub fn describe(&self) -> String {
        let host = match self.connection.get_hosts().first() {
            Some(Host::Tcp(name)) => name.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.connection.get_ports().first().copied().unwrap_or(5432);
        let db = self
            .connection
            .get_dbname()
            .or(self.connection.get_user())
            .unwrap_or_default();
        format!("postgres://{host}:{port}/{db}?table={}", self.table)
    }
}

/// The URL with its password replaced, for error messages.
fn redact(spec: &str) -> String {
    match url::Url::parse(spec) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.into()
        }
        _ => spec.to_owned(),
    }
}

/// A table name, `name` or `schema.name`: letters, digits and `_`, not starting with a digit,
/// at most 63 characters each (PostgreSQL's limit), so it can be quoted into SQL safely.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// A name PostgreSQL takes quoted as it is: letters, digits and `_`, not starting with a
    /// digit, at most 63 bytes.
    fn valid_part(part: &str) -> bool {
        !part.is_empty()
            && part.len() <= 63
            && !part.starts_with(|c: char| c.is_ascii_digit())
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let valid = Self::valid_part;
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, text),
        };
        if !valid(name) || schema.is_some_and(|s| !valid(s)) {
            return Err(format!(
                "'{text}' is not a table name (letters, digits and _, optionally schema.table)"
            ));
        }
        Ok(TableName {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The name quoted for SQL.
    fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What a failed statement means for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Worth trying again: the server or the connection.
    Retryable,
    /// The data: trying again cannot help.
    Permanent,
    /// The table is gone (dropped while we ran): create it again, then retry.
    NoTable,
}

/// Sorts an error by its SQLSTATE: classes 22 (data exception), 23 (integrity constraint),
/// 42 (syntax error or access rule) and 2200x-style errors are the data's fault; an undefined
/// table is [`Failure::NoTable`]; everything else (no SQLSTATE: the connection; 08 connection,
/// 40 rollback, 53 resources, 55 lock not available, 57 operator intervention, 58 system) is
/// retried, so that nothing is dead-lettered for a server's trouble.
pub fn classify(error: &tokio_postgres::Error) -> Failure {
    let Some(code) = error.code() else {
        return Failure::Retryable;
    };
    let code = code.code();
    if code == "42P01" {
        return Failure::NoTable;
    }
    match &code[..2] {
        "22" | "23" | "42" => Failure::Permanent,
        _ => Failure::Retryable,
    }
}

/// The server's own words: message, detail and SQLSTATE when it answered, else the error.
fn error_text(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => error.to_string(),
    }
}

pub struct PostgresSink {
    settings: PostgresSettings,
    described: String,
    insert: String,
    create: String,
    /// Connections not in use; a permit of `open` is held while one is.
    idle: Mutex<Vec<Client>>,
    open: Semaphore,
    /// Whether this process has made sure the table exists (since the last time it was
    /// found missing).
    table_ready: AtomicBool,
}

impl PostgresSink {
    /// The sink; connects when the first write needs a connection, so a database that is down
    /// at start-up delays the events, not the process.
    pub fn new(settings: PostgresSettings) -> Arc<Self> {
        let table = settings.table.quoted();
        // The user's columns: their names, their casts, their arrays ($7 on), their aliases.
        let (mut names, mut casts, mut arrays, mut aliases, mut declared) = (
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        );
        for (i, column) in settings.columns.iter().enumerate() {
            let (name, sql_type) = (&column.name, column.sql_type);
            names.push_str(&format!(", \"{name}\""));
            casts.push_str(&format!(", u{i}::{sql_type}"));
            arrays.push_str(&format!(", ${}::text[]", 7 + i));
            aliases.push_str(&format!(", u{i}"));
            declared.push_str(&format!(", \"{name}\" {sql_type}"));
        }
        let insert = format!(
            "INSERT INTO {table} (id, source, \"timestamp\", data, metadata, processed_at{names}) \
             SELECT id, source, ts, data::jsonb, metadata::jsonb, $6::timestamptz{casts} \
             FROM UNNEST($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]{arrays}) \
             AS batch(id, source, ts, data, metadata{aliases}) \
             ON CONFLICT (id) DO NOTHING"
        );
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {table} (\
             id text PRIMARY KEY, \
             source text NOT NULL, \
             \"timestamp\" timestamptz NOT NULL, \
             data jsonb, \
             metadata jsonb NOT NULL DEFAULT '{{}}', \
             processed_at timestamptz NOT NULL{declared})"
        );
        Arc::new(PostgresSink {
            described: settings.describe(),
            open: Semaphore::new(settings.connections),
            settings,
            insert,
            create,
            idle: Mutex::new(Vec::new()),
            table_ready: AtomicBool::new(false),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Client>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn retryable(&self, message: impl Into<String>) -> SinkError {
        SinkError::retryable(self.describe(), message)
    }

    /// An open connection: an idle one, or a new one.
    async fn connection(&self) -> Result<Client, SinkError> {
        loop {
            let Some(client) = self.idle().pop() else {
                break;
            };
            if !client.is_closed() {
                return Ok(client);
            }
        }
        let (client, connection) = self
            .settings
            .connection
            .connect(NoTls)
            .await
            .map_err(|e| self.retryable(format!("cannot connect: {}", error_text(&e))))?;
        let target = self.described.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(sink = %target, %error, "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }

    /// Creates the table when missing, once per process (and again after it was dropped).
    async fn ensure_table(&self, client: &Client) -> Result<(), SinkError> {
        if !self.settings.create_table || self.table_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        match client.batch_execute(&self.create).await {
            Ok(()) => {
                self.table_ready.store(true, Ordering::Relaxed);
                Ok(())
            }
            // Two processes creating it at once: one of them loses a race on the catalog and
            // finds it there on the next try.
            Err(e) => Err(self.retryable(format!(
                "cannot create table {}: {}",
                self.settings.table,
                error_text(&e)
            ))),
        }
    }

    /// One INSERT of `events`.
    async fn insert(
        &self,
        client: &Client,
        events: &[&Event],
        processed_at: SystemTime,
    ) -> Result<(), tokio_postgres::Error> {
        let ids: Vec<&str> = events.iter().map(|e| &*e.id).collect();
        let sources: Vec<&str> = events.iter().map(|e| &*e.source).collect();
        let timestamps: Vec<SystemTime> = events
            .iter()
            .map(|e| UNIX_EPOCH + Duration::from_millis(e.timestamp_ms))
            .collect();
        let mut data = Vec::with_capacity(events.len());
        let mut metadata = Vec::with_capacity(events.len());
        let columns = &self.settings.columns;
        let mut values: Vec<Vec<Option<String>>> =
            vec![Vec::with_capacity(events.len()); columns.len()];
        let mut buffer = Vec::new();
        for event in events {
            buffer.clear();
            write_data_value(&mut buffer, event);
            data.push(String::from_utf8_lossy(&buffer).into_owned());
            buffer.clear();
            write_metadata(&mut buffer, event);
            metadata.push(String::from_utf8_lossy(&buffer).into_owned());
            if !columns.is_empty() {
                let fields = EventFields::new(event);
                for (column, values) in columns.iter().zip(&mut values) {
                    values.push(column.value(&fields));
                }
            }
        }
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&ids, &sources, &timestamps, &data, &metadata, &processed_at];
        params.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
        client.execute(&self.insert, &params).await.map(|_| ())
    }

    /// Writes the batch on `client`; see the crate docs for what each failure becomes.
    async fn write_on(
        &self,
        client: &Client,
        events: &[Event],
        processed_at: SystemTime,
    ) -> Result<(), SinkError> {
        self.ensure_table(client).await?;
        let all: Vec<&Event> = events.iter().collect();
        let error = match self.insert(client, &all, processed_at).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        match classify(&error) {
            Failure::Retryable => Err(self.retryable(error_text(&error))),
            Failure::NoTable => {
                self.table_ready.store(false, Ordering::Relaxed);
                if self.settings.create_table {
                    Err(self.retryable(format!("{} (creating it again)", error_text(&error))))
                } else {
                    Err(SinkError::permanent(
                        self.describe(),
                        format!("{} (create_table = false)", error_text(&error)),
                    ))
                }
            }
            Failure::Permanent if events.len() == 1 => {
                Err(SinkError::permanent(self.describe(), error_text(&error)))
            }
            // Which rows? One at a time: the rows already written are no-ops (ON CONFLICT).
            Failure::Permanent => {
                let mut rejected = Vec::new();
                for (at, event) in events.iter().enumerate() {
                    if let Err(e) = self.insert(client, &[event], processed_at).await {
                        match classify(&e) {
                            Failure::Permanent => rejected.push((at, error_text(&e))),
                            _ => return Err(self.retryable(error_text(&e))),
                        }
                    }
                }
                if rejected.is_empty() {
                    // Refused together, accepted one by one (e.g. a limit on the statement).
                    return Ok(());
                }
                Err(SinkError::rejected(
                    self.describe(),
                    format!("{} of {} rows refused", rejected.len(), events.len()),
                    rejected,
                ))
            }
        }
    }
}

#[async_trait]
impl Sink for PostgresSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        if events.is_empty() {
            return Ok(());
        }
        let _permit = self
            .open
            .acquire()
            .await
            .map_err(|_| self.retryable("the sink is closed"))?;
        let client = self.connection().await?;
        let processed_at = UNIX_EPOCH + Duration::from_millis(processed_at_ms);
        let result = self.write_on(&client, events, processed_at).await;
        if !client.is_closed() {
            self.idle().push(client);
        }
        result
    }

    fn describe(&self) -> String {
        self.described.clone()
    }

    fn write_timeout(&self) -> Duration {
        self.settings.timeout
    }

    fn idempotent(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;

//! Sinks: where processed events are written. A sink's `write` returning `Ok` is the
//! confirmation the pool waits for before acking (contract 2).
//!
//! Record format (file and stdout), one NDJSON line per event:
//! `{"id","source","timestamp","data","metadata","processed_at","attempt"}`; `data` is the
//! event's data as JSON (see [`conveyor_core::body::write_data`]), or `data_base64` for
//! payloads that are not UTF-8.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use conveyor_core::Event;
use conveyor_core::body::{write_data, write_json_string};

#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct SinkError {
    pub sink: String,
    pub message: String,
}

#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Writes every event; `Ok` means all of them are written (for a file: handed to the
    /// operating system, so they survive this process crashing).
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError>;

    /// A short description, e.g. `file:./data/out.ndjson`.
    fn describe(&self) -> String;

    /// Ids of the last `limit` events this sink holds, oldest first, for a sink that can read
    /// back what it wrote. A processor seeds its seen-id window with them on start, so events
    /// written just before a crash, and redelivered because their ack was lost with the
    /// process, are not written twice.
    async fn recent_ids(&self, _limit: usize) -> Result<Vec<String>, SinkError> {
        Ok(Vec::new())
    }
}

/// Where processed events go, as the `--sink` flag names it: `file:PATH`, `stdout` or
/// `blackhole`. Parsed once, when the flag is read; [`SinkSpec::open`] builds the sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkSpec {
    File(PathBuf),
    Stdout,
    Blackhole,
}

impl std::str::FromStr for SinkSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        match spec.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(SinkSpec::File(PathBuf::from(path))),
            None if spec == "stdout" => Ok(SinkSpec::Stdout),
            None if spec == "blackhole" => Ok(SinkSpec::Blackhole),
            _ => Err(format!(
                "'{spec}' is not a sink; use file:PATH, stdout or blackhole"
            )),
        }
    }
}

impl std::fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkSpec::File(path) => write!(f, "file:{}", path.display()),
            SinkSpec::Stdout => f.write_str("stdout"),
            SinkSpec::Blackhole => f.write_str("blackhole"),
        }
    }
}

impl SinkSpec {
    /// A sink declared in the config file: `type` and the type's own keys (`path` for a file).
    pub fn from_settings(settings: &serde_json::Value) -> Result<Self, String> {
        let table = settings
            .as_object()
            .ok_or_else(|| "a sink is a table of settings".to_owned())?;
        let kind = table
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| "no `type` (file, stdout or blackhole)".to_owned())?;
        let allowed: &[&str] = match kind {
            "file" => &["type", "path"],
            "stdout" | "blackhole" => &["type"],
            other => {
                return Err(format!(
                    "unknown sink type '{other}' (known: file, stdout, blackhole)"
                ));
            }
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

    /// Opens the sink (a file sink creates its directory and cuts a torn last line).
    pub fn open(&self) -> Result<Arc<dyn Sink>, String> {
        Ok(match self {
            SinkSpec::File(path) => Arc::new(
                FileSink::open(path)
                    .map_err(|e| format!("cannot open file sink '{}': {e}", path.display()))?,
            ),
            SinkSpec::Stdout => Arc::new(StdoutSink),
            SinkSpec::Blackhole => Arc::new(BlackholeSink),
        })
    }
}

/// Appends `event` as one NDJSON record line to `out`.
pub fn write_record(out: &mut Vec<u8>, event: &Event, processed_at_ms: u64) {
    out.extend_from_slice(b"{\"id\":");
    write_json_string(out, &event.id);
    out.extend_from_slice(b",\"source\":");
    write_json_string(out, &event.source);
    out.extend_from_slice(b",\"timestamp\":");
    out.extend_from_slice(event.timestamp_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"data\":");
    let mark = out.len();
    if !write_data(out, &event.payload, event.content_type) {
        out.truncate(mark - b"\"data\":".len());
        out.extend_from_slice(b"\"data_base64\":\"");
        out.extend_from_slice(BASE64.encode(&event.payload).as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"metadata\":{");
    for (i, (key, value)) in event.metadata.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json_string(out, key);
        out.push(b':');
        write_json_string(out, value);
    }
    out.extend_from_slice(b"},\"processed_at\":");
    out.extend_from_slice(processed_at_ms.to_string().as_bytes());
    out.extend_from_slice(b",\"attempt\":");
    out.extend_from_slice(event.attempt.to_string().as_bytes());
    out.extend_from_slice(b"}\n");
}

fn render(events: &[Event], processed_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.len() * 256);
    for event in events {
        write_record(&mut out, event, processed_at_ms);
    }
    out
}

/// Appends records to a file. Each batch is one `write` call under a lock, so lines from
/// different workers never interleave.
pub struct FileSink {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl FileSink {
    /// Opens (or creates) the file for appending. A last line without its newline is what a
    /// crash in the middle of a write leaves; it was never confirmed (its events will be
    /// delivered again), so it is cut off rather than glued to the next record.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        let complete = complete_length(&file)?;
        if complete < file.metadata()?.len() {
            tracing::warn!(path = %path.display(), kept_bytes = complete, "cutting a torn last line left by a crash");
            file.set_len(complete)?;
        }
        Ok(FileSink {
            path: path.to_owned(),
            file: Arc::new(Mutex::new(file)),
        })
    }
}

/// The length of the file up to and including its last newline.
fn complete_length(file: &File) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let size = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..size])?;
        if let Some(at) = chunk[..size].iter().rposition(|&b| b == b'\n') {
            return Ok(start + at as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// Reads the ids of the last `limit` records of an NDJSON file, oldest first.
fn tail_ids(path: &Path, limit: usize) -> std::io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: String,
    }
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut end = len;
    let mut tail: Vec<u8> = Vec::new();
    // Read backwards in chunks until the tail holds `limit` complete lines (or the file ends).
    while end > 0 && tail.iter().filter(|&&b| b == b'\n').count() <= limit {
        let start = end.saturating_sub(1024 * 1024);
        let mut chunk = vec![0u8; (end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        end = start;
    }
    let mut lines: Vec<&[u8]> = tail
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    if end > 0 && !lines.is_empty() {
        // The first piece may be a line cut in the middle by the chunking.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(limit);
    Ok(lines
        .into_iter()
        .skip(skip)
        .filter_map(|line| serde_json::from_slice::<IdOnly>(line).ok().map(|r| r.id))
        .collect())
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let bytes = render(events, processed_at_ms);
        let file = Arc::clone(&self.file);
        let outcome = tokio::task::spawn_blocking(move || {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            file.write_all(&bytes)
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SinkError {
                sink: self.describe(),
                message: e.to_string(),
            }),
            Err(e) => Err(SinkError {
                sink: self.describe(),
                message: format!("write task failed: {e}"),
            }),
        }
    }

    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn recent_ids(&self, limit: usize) -> Result<Vec<String>, SinkError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || tail_ids(&path, limit))
            .await
            .map_err(|e| e.to_string())
            .and_then(|read| read.map_err(|e| e.to_string()))
            .map_err(|message| SinkError {
                sink: self.describe(),
                message,
            })
    }
}

/// Writes records to standard output.
pub struct StdoutSink;

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let bytes = render(events, processed_at_ms);
        let failed = |message: String| SinkError {
            sink: "stdout".into(),
            message,
        };
        // A pipe whose reader is slow blocks the write: off the runtime, like the file sink.
        tokio::task::spawn_blocking(move || {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&bytes).and_then(|()| stdout.flush())
        })
        .await
        .map_err(|e| failed(format!("the write task failed: {e}")))?
        .map_err(|e| failed(e.to_string()))
    }

    fn describe(&self) -> String {
        "stdout".into()
    }
}

/// Discards events (for benchmarks and dry runs); confirms at once.
pub struct BlackholeSink;

#[async_trait]
impl Sink for BlackholeSink {
    async fn write(&self, _events: &[Event], _processed_at_ms: u64) -> Result<(), SinkError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "blackhole".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_core::ContentType;
    use std::collections::BTreeMap;

    fn event(payload: &'static [u8], content_type: ContentType) -> Event {
        Event {
            id: "id-\"1\"".into(),
            source: "s".into(),
            timestamp_ms: 5,
            payload: bytes::Bytes::from_static(payload),
            content_type,
            metadata: BTreeMap::from([("k".to_owned(), "v\n".to_owned())]).into(),
            attempt: 2,
            headers: BTreeMap::new(),
        }
    }

    fn record(event: &Event) -> serde_json::Value {
        let mut out = Vec::new();
        write_record(&mut out, event, 9);
        assert_eq!(out.last(), Some(&b'\n'));
        serde_json::from_slice(&out).expect("a record is one JSON object")
    }

    #[test]
    fn records_are_valid_json_with_data_kept_as_json() {
        let r = record(&event(br#"{"t": [1, 2]}"#, ContentType::Json));
        assert_eq!(r["id"], "id-\"1\"");
        assert_eq!(r["data"], serde_json::json!({"t": [1, 2]}));
        assert_eq!(r["metadata"]["k"], "v\n");
        assert_eq!(
            (
                r["timestamp"].as_u64(),
                r["processed_at"].as_u64(),
                r["attempt"].as_u64()
            ),
            (Some(5), Some(9), Some(2))
        );
        assert_eq!(
            record(&event(b"temp:23", ContentType::Text))["data"],
            "temp:23"
        );
    }

    #[test]
    fn non_utf8_bytes_become_base64() {
        let r = record(&event(&[0xff, 0x00, 0x61], ContentType::Binary));
        assert_eq!(r["data_base64"], "/wBh");
        assert!(r.get("data").is_none());
    }

    #[tokio::test]
    async fn file_sink_appends_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/out.ndjson");
        let spec: SinkSpec = format!("file:{}", path.display())
            .parse()
            .expect("a sink spec");
        assert_eq!(spec, SinkSpec::File(path.clone()));
        let sink = spec.open().expect("file sink");
        let e = event(b"1", ContentType::Json);
        sink.write(&[e.clone(), e], 1).await.expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
        let refused = "ftp:x".parse::<SinkSpec>().expect_err("not a sink");
        assert!(refused.contains("'ftp:x'"), "{refused}");
    }

    #[tokio::test]
    async fn a_torn_last_line_is_cut_and_recent_ids_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.ndjson");
        {
            let sink = FileSink::open(&path).expect("open");
            let events: Vec<Event> = (0..5)
                .map(|i| Event {
                    id: format!("e{i}").into(),
                    ..event(b"1", ContentType::Json)
                })
                .collect();
            sink.write(&events, 1).await.expect("write");
        }
        // A crash in the middle of the next write.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"{\"id\":\"torn"))
            .expect("append");
        let sink = FileSink::open(&path).expect("reopen");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.ends_with('\n') && !text.contains("torn"),
            "torn line cut: {text:?}"
        );
        assert_eq!(sink.recent_ids(3).await.expect("ids"), ["e2", "e3", "e4"]);
        assert_eq!(sink.recent_ids(100).await.expect("ids").len(), 5);
    }
}

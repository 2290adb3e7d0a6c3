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
}

/// Builds a sink from `file:PATH`, `stdout` or `blackhole`.
pub fn parse(spec: &str) -> Result<Arc<dyn Sink>, String> {
    match spec.split_once(':') {
        Some(("file", path)) if !path.is_empty() => {
            let sink = FileSink::open(Path::new(path))
                .map_err(|e| format!("cannot open file sink '{path}': {e}"))?;
            Ok(Arc::new(sink))
        }
        None if spec == "stdout" => Ok(Arc::new(StdoutSink)),
        None if spec == "blackhole" => Ok(Arc::new(BlackholeSink)),
        _ => Err(format!(
            "'{spec}' is not a sink; use file:PATH, stdout or blackhole"
        )),
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
        out.extend_from_slice(base64(&event.payload).as_bytes());
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

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
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
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(FileSink {
            path: path.to_owned(),
            file: Arc::new(Mutex::new(file)),
        })
    }
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
}

/// Writes records to standard output.
pub struct StdoutSink;

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let bytes = render(events, processed_at_ms);
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(&bytes)
            .and_then(|()| stdout.flush())
            .map_err(|e| SinkError {
                sink: "stdout".into(),
                message: e.to_string(),
            })
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
            metadata: BTreeMap::from([("k".to_owned(), "v\n".to_owned())]),
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
        let sink = parse(&format!("file:{}", path.display())).expect("file sink");
        let e = event(b"1", ContentType::Json);
        sink.write(&[e.clone(), e], 1).await.expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
        assert!(parse("ftp:x").is_err());
    }
}

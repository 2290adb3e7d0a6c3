//! The sinks that need nothing but this machine: an NDJSON file, standard output, and a
//! blackhole for benchmarks.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use conveyor_core::Event;

use crate::record::render;
use crate::{Sink, SinkError};

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
            // A full disk or a file system gone read-only may come back: retried.
            Ok(Err(e)) => Err(SinkError::retryable(self.describe(), e.to_string())),
            Err(e) => Err(SinkError::retryable(
                self.describe(),
                format!("write task failed: {e}"),
            )),
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
            .map_err(|message| SinkError::retryable(self.describe(), message))
    }
}

/// Writes records to standard output.
pub struct StdoutSink;

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let bytes = render(events, processed_at_ms);
        let failed = |message: String| SinkError::retryable("stdout", message);
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
    use crate::record::tests::event;
    use conveyor_core::ContentType;

    #[tokio::test]
    async fn file_sink_appends_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/out.ndjson");
        let sink = FileSink::open(&path).expect("file sink");
        let e = event(b"1", ContentType::Json);
        sink.write(&[e.clone(), e], 1).await.expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 2);
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

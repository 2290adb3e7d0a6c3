//! The NDJSON file sink: records appended to one file, which can be rotated by size and age
//! (the full file renamed aside with the time it was closed, optionally gzipped), and synced
//! to disk per batch when asked.
//!
//! # Guarantees
//!
//! - A batch is one `write(2)` under a lock, so lines from different workers never
//!   interleave, and a rotation happens between batches, never inside one.
//! - Confirmed when `write(2)` returned: it survives a crash of conveyor. With `durable`, only
//!   when `fdatasync(2)` returned too (and a rotation syncs the directory): it survives a power
//!   loss.
//! - A torn last line (a crash in the middle of a write) is cut when the file is opened: its
//!   events were never confirmed and will come again.
//! - [`Sink::recent_ids`] reads the active file's tail and, when that holds fewer ids than
//!   asked, the newest rotated files' (gzipped or not), so the seen-id window a processor
//!   seeds from its sink at start keeps working right after a rotation.
//! - Gzipping a rotated file runs off the write path; the plain file is removed only once its
//!   `.gz` is complete (written as `.gz.tmp`, then renamed). A crash in between leaves the
//!   plain file, which the next open compresses.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use conveyor_core::Event;
use serde_json::{Map, Value};

use crate::record::{ids_of_lines, render};
use crate::settings::Settings;
use crate::{Sink, SinkError};

/// Where and how the file sink writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSettings {
    /// The active file.
    pub path: PathBuf,
    /// Rotate before a batch would make the file larger than this; `None`: never by size.
    pub rotate_bytes: Option<u64>,
    /// Rotate at the first batch after the file has been open this long; `None`: never by age.
    pub rotate_after: Option<Duration>,
    /// Gzip rotated files.
    pub gzip: bool,
    /// `fdatasync` after every batch.
    pub durable: bool,
}

impl FileSettings {
    /// The quick form `file:PATH`: one file, never rotated, not synced.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        FileSettings {
            path: path.into(),
            rotate_bytes: None,
            rotate_after: None,
            gzip: false,
            durable: false,
        }
    }

    /// A `[sinks.NAME]` table with `type = "file"`: `path` (required), `rotate_bytes`,
    /// `rotate_secs`, `gzip` (false), `durable` (false).
    pub fn from_settings(table: &Map<String, Value>) -> Result<Self, String> {
        let settings = Settings::new(
            "file",
            table,
            &["path", "rotate_bytes", "rotate_secs", "gzip", "durable"],
        )?;
        let path = PathBuf::from(settings.required("path", "./data/out.ndjson")?);
        if path.extension().is_some_and(|e| e == "gz" || e == "tmp") {
            return Err(format!(
                "path '{}': the active file is plain NDJSON (rotated files get `.gz` with gzip = true)",
                path.display()
            ));
        }
        let rotate_bytes = settings.number("rotate_bytes", 0, 0..=(1 << 40))?;
        let rotate_secs = settings.number("rotate_secs", 0, 0..=(366 * 86_400))?;
        let gzip = settings.boolean("gzip", false)?;
        if gzip && rotate_bytes == 0 && rotate_secs == 0 {
            return Err("gzip applies to rotated files: set rotate_bytes or rotate_secs".into());
        }
        Ok(FileSettings {
            path,
            rotate_bytes: (rotate_bytes > 0).then_some(rotate_bytes),
            rotate_after: (rotate_secs > 0).then(|| Duration::from_secs(rotate_secs)),
            gzip,
            durable: settings.boolean("durable", false)?,
        })
    }

    fn rotates(&self) -> bool {
        self.rotate_bytes.is_some() || self.rotate_after.is_some()
    }

    /// The directory, and the name's stem and extension: `./data/out.ndjson` → (`./data`,
    /// `out`, `ndjson`).
    fn parts(&self) -> (PathBuf, String, String) {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let stem = self
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = self
            .path
            .extension()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        (dir, stem, ext)
    }

    /// `out-20261203T142512Z-0000.ndjson`: the time the file was closed (UTC), and a number
    /// that keeps names unique within a second; names sort in the order the files were closed.
    fn rotated_name(&self, closed: SystemTime, seq: u32) -> PathBuf {
        let (dir, stem, ext) = self.parts();
        let stamp = jiff::Timestamp::try_from(closed)
            .map(|t| t.strftime("%Y%m%dT%H%M%SZ").to_string())
            .unwrap_or_else(|_| "00000000T000000Z".into());
        let dot_ext = if ext.is_empty() {
            String::new()
        } else {
            format!(".{ext}")
        };
        dir.join(format!("{stem}-{stamp}-{seq:04}{dot_ext}"))
    }

    /// The rotated files present, oldest first (plain and gzipped; not `.gz.tmp`).
    fn rotated_files(&self) -> Vec<PathBuf> {
        let (dir, stem, ext) = self.parts();
        let prefix = format!("{stem}-");
        let plain = if ext.is_empty() {
            String::new()
        } else {
            format!(".{ext}")
        };
        let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                let Some(rest) = name.strip_prefix(&prefix) else {
                    return false;
                };
                let body = rest
                    .strip_suffix(&format!("{plain}.gz"))
                    .or_else(|| rest.strip_suffix(plain.as_str()));
                // `20261203T142512Z-0000`: a UTC time, a dash and four or more digits.
                body.is_some_and(|b| {
                    let b = b.as_bytes();
                    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
                    b.len() >= 21
                        && digits(0..8)
                        && b[8] == b'T'
                        && digits(9..15)
                        && b[15] == b'Z'
                        && b[16] == b'-'
                        && digits(17..b.len())
                })
            })
            .collect();
        found.sort();
        found
    }
}

/// Appends records to a file; see the module docs.
pub struct FileSink {
    settings: FileSettings,
    active: Arc<Mutex<Active>>,
}

struct Active {
    file: File,
    /// The active path was renamed away but no fresh file could be opened yet: the next write
    /// opens it before anything else (never appends to the renamed file).
    reopen: bool,
    len: u64,
    opened: Instant,
    /// The last rotated name's second and number, to keep names unique.
    last_rotation: Option<(u64, u32)>,
}

impl FileSink {
    /// One file, never rotated (the quick form `file:PATH`).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::with(FileSettings::at(path))
    }

    /// Opens (or creates) the active file for appending, cutting a torn last line, and
    /// compresses rotated files a crash left plain (when `gzip`).
    pub fn with(settings: FileSettings) -> std::io::Result<Self> {
        let path = &settings.path;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let existed = path.exists();
        let file = open_append(path)?;
        if settings.durable && !existed {
            sync_dir(&settings)?;
        }
        let complete = complete_length(&file)?;
        if complete < file.metadata()?.len() {
            tracing::warn!(path = %path.display(), kept_bytes = complete, "cutting a torn last line left by a crash");
            file.set_len(complete)?;
        }
        // The file's age counts from its creation when the file system knows it.
        let opened = file
            .metadata()?
            .created()
            .ok()
            .and_then(|created| created.elapsed().ok())
            .and_then(|age| Instant::now().checked_sub(age))
            .unwrap_or_else(Instant::now);
        if settings.gzip {
            for rotated in settings.rotated_files() {
                if rotated.extension().is_none_or(|e| e != "gz") {
                    compress_in_background(rotated, settings.durable);
                }
            }
        }
        Ok(FileSink {
            active: Arc::new(Mutex::new(Active {
                file,
                reopen: false,
                len: complete,
                opened,
                last_rotation: None,
            })),
            settings,
        })
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
}

impl Active {
    /// Whether a batch of `adding` bytes must go to a fresh file.
    fn must_rotate(&self, settings: &FileSettings, adding: u64) -> bool {
        self.len > 0
            && (settings
                .rotate_bytes
                .is_some_and(|most| self.len + adding > most)
                || settings
                    .rotate_after
                    .is_some_and(|age| self.opened.elapsed() >= age))
    }

    /// Closes the active file under its rotated name and opens a fresh one.
    fn rotate(&mut self, settings: &FileSettings) -> std::io::Result<()> {
        if settings.durable {
            self.file.sync_data()?;
        }
        let closed = SystemTime::now();
        let second = closed
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let seq = match self.last_rotation {
            Some((last, seq)) if last == second => seq + 1,
            _ => 0,
        };
        let mut seq = seq;
        let mut target = settings.rotated_name(closed, seq);
        // Another process's rotation (or one before a restart) in the same second.
        while target.exists() || target.with_extension(gz_extension(&target)).exists() {
            seq += 1;
            target = settings.rotated_name(closed, seq);
        }
        std::fs::rename(&settings.path, &target)?;
        self.len = 0;
        self.opened = Instant::now();
        self.last_rotation = Some((second, seq));
        tracing::info!(rotated = %target.display(), "file sink rotated");
        if settings.gzip {
            compress_in_background(target, settings.durable);
        }
        self.reopen = true;
        self.reopen(settings)
    }

    /// Opens a fresh active file after a rotation (again, if that failed before).
    fn reopen(&mut self, settings: &FileSettings) -> std::io::Result<()> {
        self.file = open_append(&settings.path)?;
        self.reopen = false;
        if settings.durable {
            sync_dir(settings)?;
        }
        Ok(())
    }
}

/// Syncs the directory of the active file, so that a rename or a new file in it survives a
/// power loss.
fn sync_dir(settings: &FileSettings) -> std::io::Result<()> {
    let (dir, _, _) = settings.parts();
    File::open(dir)?.sync_all()
}

/// `ndjson.gz` for `out-….ndjson`.
fn gz_extension(path: &Path) -> String {
    match path.extension() {
        Some(ext) => format!("{}.gz", ext.to_string_lossy()),
        None => "gz".into(),
    }
}

/// Gzips `plain` to `plain.gz` on a thread of its own; the plain file goes once the `.gz` is
/// complete.
fn compress_in_background(plain: PathBuf, durable: bool) {
    let spawned = std::thread::Builder::new()
        .name("file-sink-gzip".into())
        .spawn(move || {
            if let Err(error) = compress(&plain, durable) {
                tracing::warn!(file = %plain.display(), %error, "cannot gzip a rotated file; it stays as it is");
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start a thread to gzip a rotated file");
    }
}

fn compress(plain: &Path, durable: bool) -> std::io::Result<()> {
    let done = plain.with_extension(gz_extension(plain));
    let mut partial = done.clone().into_os_string();
    partial.push(".tmp");
    let partial = PathBuf::from(partial);
    let mut input = File::open(plain)?;
    // `create`, not `create_new`: a `.tmp` left by a crash is cut short and written again.
    let mut encoder =
        flate2::write::GzEncoder::new(File::create(&partial)?, flate2::Compression::default());
    std::io::copy(&mut input, &mut encoder)?;
    encoder.finish()?.sync_all()?;
    std::fs::rename(&partial, &done)?;
    std::fs::remove_file(plain)?;
    if durable && let Some(dir) = plain.parent().filter(|p| !p.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The length of the file up to and including its last newline.
fn complete_length(file: &File) -> std::io::Result<u64> {
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

/// Reads the ids of the last `limit` records of a plain NDJSON file, oldest first.
fn tail_ids(path: &Path, limit: usize) -> std::io::Result<Vec<String>> {
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
    Ok(ids_of_lines(&lines[skip..]))
}

/// The ids of the last `limit` records of a rotated file, gzipped or not. A gzipped file is
/// read as a stream, keeping only the last `limit` lines.
fn rotated_tail_ids(path: &Path, limit: usize) -> std::io::Result<Vec<String>> {
    use std::io::BufRead as _;
    if path.extension().is_none_or(|e| e != "gz") {
        return tail_ids(path, limit);
    }
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(File::open(path)?));
    let mut last: std::collections::VecDeque<Vec<u8>> = std::collections::VecDeque::new();
    for line in reader.split(b'\n') {
        let line = line?;
        if line.is_empty() {
            continue;
        }
        if last.len() == limit {
            last.pop_front();
        }
        last.push_back(line);
    }
    let lines: Vec<&[u8]> = last.iter().map(Vec::as_slice).collect();
    Ok(ids_of_lines(&lines))
}

/// The active file's last ids, then the newest rotated files' until `limit` are found. A
/// rotated file that cannot be read is skipped with a warning: what was gathered still seeds
/// the window.
fn recent_ids(settings: &FileSettings, limit: usize) -> std::io::Result<Vec<String>> {
    let mut ids = tail_ids(&settings.path, limit)?;
    if !settings.rotates() {
        return Ok(ids);
    }
    let rotated = settings.rotated_files();
    for file in rotated.iter().rev() {
        if ids.len() >= limit {
            break;
        }
        let gzipped = file.with_extension(gz_extension(file));
        if file.extension().is_none_or(|e| e != "gz") && rotated.contains(&gzipped) {
            continue; // being gzipped: its `.gz` is complete and read instead
        }
        let mut read = rotated_tail_ids(file, limit - ids.len());
        if matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::NotFound) {
            // Gzipped (and the plain file removed) since the directory was listed.
            read = rotated_tail_ids(&gzipped, limit - ids.len());
        }
        match read {
            Ok(mut older) => {
                older.append(&mut ids);
                ids = older;
            }
            Err(error) => {
                tracing::warn!(file = %file.display(), %error, "cannot read back a rotated file; skipping it");
            }
        }
    }
    Ok(ids)
}

#[async_trait]
impl Sink for FileSink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let bytes = render(events, processed_at_ms);
        let active = Arc::clone(&self.active);
        let settings = self.settings.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut active = active.lock().unwrap_or_else(|p| p.into_inner());
            if active.reopen {
                active
                    .reopen(&settings)
                    .map_err(|e| format!("cannot open a fresh file after rotating: {e}"))?;
            }
            if active.must_rotate(&settings, bytes.len() as u64) {
                active
                    .rotate(&settings)
                    .map_err(|e| format!("cannot rotate: {e}"))?;
            }
            if let Err(error) = active.file.write_all(&bytes) {
                // A full disk may take part of the batch: cut it, so that the retry does not
                // glue its first record to a torn one.
                let _ = active.file.set_len(active.len);
                return Err(error.to_string());
            }
            active.len += bytes.len() as u64;
            if settings.durable {
                active
                    .file
                    .sync_data()
                    .map_err(|e| format!("fdatasync: {e}"))?;
            }
            Ok::<(), String>(())
        })
        .await;
        match outcome {
            Ok(Ok(())) => Ok(()),
            // A full disk or a file system gone read-only may come back: retried.
            Ok(Err(message)) => Err(SinkError::retryable(self.describe(), message)),
            Err(e) => Err(SinkError::retryable(
                self.describe(),
                format!("write task failed: {e}"),
            )),
        }
    }

    fn describe(&self) -> String {
        format!("file:{}", self.settings.path.display())
    }

    async fn recent_ids(&self, limit: usize) -> Result<Vec<String>, SinkError> {
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || recent_ids(&settings, limit))
            .await
            .map_err(|e| e.to_string())
            .and_then(|read| read.map_err(|e| e.to_string()))
            .map_err(|message| SinkError::retryable(self.describe(), message))
    }
}

#[cfg(test)]
mod tests;

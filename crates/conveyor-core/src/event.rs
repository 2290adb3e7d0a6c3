//! The event: the unit that flows from a client through the queue to a sink.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Header set on an event re-published from the dead-letter queue. Its value makes the
/// publish-side dedupe key differ from the original publish, so the broker does not discard
/// the replay as a duplicate of the first attempt.
pub const REPLAY_HEADER: &str = "conveyor-replay";

/// How the payload bytes are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ContentType {
    /// The payload is a JSON document (validated on intake).
    Json,
    /// The payload is UTF-8 text (a JSON string `data` value, unquoted).
    Text,
    /// Opaque bytes.
    #[default]
    Binary,
}

impl ContentType {
    pub fn as_mime(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Text => "text/plain",
            ContentType::Binary => "application/octet-stream",
        }
    }

    /// Reads a MIME type; anything that is not JSON or text is opaque bytes.
    pub fn from_mime(mime: &str) -> ContentType {
        let essence = mime.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json") {
            ContentType::Json
        } else if essence.starts_with("text/") {
            ContentType::Text
        } else {
            ContentType::Binary
        }
    }
}

/// The metadata map. Shared, so that copying an event (a queue keeps one for redelivery while a
/// worker holds another) costs a reference count, not an allocation per entry; a stage that
/// changes it copies on write (`Arc::make_mut`).
pub type Metadata = Arc<BTreeMap<String, String>>;

/// An accepted event. Every event has an id (contract 3): the client's or a generated UUIDv7.
///
/// Cheap to clone: the text fields and the metadata are shared, the payload is `Bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unique id; the dedupe key at the queue and at the processor.
    pub id: Arc<str>,
    /// Who produced it (e.g. `sensor-01`).
    pub source: Arc<str>,
    /// Acceptance time, milliseconds since the Unix epoch (or the client's own timestamp).
    pub timestamp_ms: u64,
    pub payload: Bytes,
    pub content_type: ContentType,
    pub metadata: Metadata,
    /// How many times this event has been delivered to a processor (1 on first delivery).
    pub attempt: u32,
    /// Transport headers (trace context, replay marker); not part of the user's data.
    pub headers: BTreeMap<String, String>,
}

impl Event {
    /// The key the queue uses to discard duplicate publishes: the id, or the id plus the replay
    /// marker for an event replayed from the dead-letter queue.
    pub fn dedupe_key(&self) -> String {
        match self.headers.get(REPLAY_HEADER) {
            Some(replay) => format!("{}#replay-{replay}", self.id),
            None => self.id.to_string(),
        }
    }

    /// Feeds the dedupe key to a hasher without building it: the same bytes as
    /// [`dedupe_key`](Self::dedupe_key), so equal keys hash equal.
    pub fn hash_dedupe_key(&self, hasher: &mut impl std::hash::Hasher) {
        hasher.write(self.id.as_bytes());
        if let Some(replay) = self.headers.get(REPLAY_HEADER) {
            hasher.write(b"#replay-");
            hasher.write(replay.as_bytes());
        }
    }
}

/// What a client submitted, before validation gave it an id and a timestamp.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventDraft {
    pub id: Option<String>,
    pub source: String,
    pub timestamp_ms: Option<u64>,
    pub payload: Bytes,
    pub content_type: ContentType,
    pub metadata: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    /// The payload was already checked against its content type by whoever built the draft
    /// (the JSON body parser has parsed `data`), so validation need not parse it again.
    pub payload_checked: bool,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

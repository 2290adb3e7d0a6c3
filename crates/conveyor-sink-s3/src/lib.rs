//! The S3 sink: processed events as NDJSON objects in S3-compatible storage (AWS S3, MinIO,
//! Ceph, R2, moto), gzipped unless told otherwise, through `object_store`'s S3 client.
//!
//! # Objects
//!
//! The batches several workers hand the sink within `linger` are gathered into one object
//! (up to `max_events` / `max_bytes`), so a busy pipeline writes fewer, larger objects; each
//! write returns when the object holding its events is stored. An object is named from its
//! content:
//!
//! `PREFIX/dt=YYYY-MM-DD/hour=HH/<first id>-<count>-<digest>.ndjson[.gz]`
//!
//! where the date and hour are the first event's timestamp (UTC) and the digest is the start
//! of a SHA-256 over every id of the object. The same events make the same name, and any other
//! set of events a different one, so:
//!
//! - an upload retried (by the client's own retries, after a 5xx, a timeout or a lost answer)
//!   overwrites itself instead of adding a copy;
//! - an upload that finished after the sink gave up on it can only add a copy, never replace
//!   another object's events.
//!
//! # Once, and where a copy can still happen
//!
//! When an upload fails, its events go back to the queue and may come back in another
//! mix, which would be another object. Whether the failed upload in fact landed (an answer
//! lost with the connection) is asked, not guessed: the sink remembers which object each
//! recently uploaded event went into, and when one of them comes back it asks the store for
//! that object (`HEAD`) and skips the events it holds. After a crash, [`Sink::recent_ids`]
//! reads the newest objects of today's and yesterday's partitions, so the processor's seen-id
//! window skips what was stored before the crash.
//!
//! A second copy (in another object, never instead of one) remains possible when: an event
//! more than a day old is redelivered after a crash; another processor, which did not upload
//! it, takes a redelivery (several processors on one prefix); the store says the object is
//! missing and a given-up upload lands after all; the key may not read (`HEAD` refused: the
//! events are written again rather than kept waiting). Two sinks must not share a bucket and
//! prefix: the same events would make the same names, and one sink's objects would replace
//! the other's.

mod settings;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use conveyor_core::Event;
use conveyor_sink::record::{ids_of_lines, write_record};
use conveyor_sink::{Sink, SinkError};
use futures_util::TryStreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::path::{Path, PathPart};
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};
use tokio::sync::watch;

pub use settings::{S3Settings, SecretKey};

/// How many events' objects are remembered, to ask about them when the events come back (at
/// least two full objects' worth).
const REMEMBERED_EVENTS: usize = 200_000;

/// S3 error codes that come with a 4xx but mean "try again" (a slow or interrupted upload, a
/// clock or a session token to renew): retryable, not the events' fault.
const TEMPORARY_CODES: &[&str] = &[
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "IncompleteBody",
    "ExpiredToken",
    "TokenRefreshRequired",
    "OperationAborted",
    "SlowDown",
];

/// The client's longest pause between two tries of one request.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The first id is cut to this many bytes in an object's name (the digest tells objects apart).
const NAME_ID_BYTES: usize = 128;

/// What became of one upload: nothing yet, or its answer.
type Outcome = Option<Result<(), SinkError>>;

/// Writes events as NDJSON objects; see the crate docs.
pub struct S3Sink {
    inner: Arc<Inner>,
}

struct Inner {
    settings: S3Settings,
    described: String,
    store: Box<dyn ObjectStore>,
    open: Mutex<Option<Open>>,
    uploads: Mutex<Uploads>,
    opened: std::sync::atomic::AtomicU64,
}

/// The object being gathered: its records, its events' ids, and the channel its writers wait on.
struct Open {
    number: u64,
    lines: Vec<u8>,
    ids: Vec<Arc<str>>,
    first_timestamp_ms: u64,
    done: watch::Sender<Outcome>,
}

/// Which object each recent event went into, and what its upload answered.
#[derive(Default)]
struct Uploads {
    /// By event id: its latest object, and the number of the remembering (so an id
    /// remembered again is not forgotten at its earlier place in `order`).
    by_id: HashMap<Arc<str>, (Arc<Upload>, u64)>,
    order: VecDeque<(Arc<str>, u64)>,
    remembered: u64,
}

struct Upload {
    path: Path,
    outcome: watch::Receiver<Outcome>,
}

impl S3Sink {
    /// Builds the client; nothing is sent until the first write.
    pub fn new(settings: S3Settings) -> Result<Self, String> {
        let store = client(&settings)?;
        Ok(S3Sink {
            inner: Arc::new(Inner {
                described: settings.describe(),
                settings,
                store,
                open: Mutex::new(None),
                uploads: Mutex::new(Uploads::default()),
                opened: Default::default(),
            }),
        })
    }
}

/// The S3 client: credentials and region from the settings, else the environment; the
/// client's own retries (exponential backoff with jitter, for 5xx, 429, 408 and connection
/// errors) bounded by the settings' timeout.
fn client(settings: &S3Settings) -> Result<Box<dyn ObjectStore>, String> {
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(&settings.bucket);
    if let Some(region) = &settings.region {
        builder = builder.with_region(region);
    } else if std::env::var_os("AWS_REGION").is_none()
        && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    if let Some(endpoint) = &settings.endpoint {
        // A server of one's own is addressed by path (`endpoint/bucket/key`): it has no
        // wildcard DNS for `bucket.endpoint`.
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
    }
    if let (Some(id), Some(secret)) = (&settings.access_key_id, &settings.secret_access_key) {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(&secret.0);
    }
    let request_timeout = request_timeout(settings);
    builder
        .with_client_options(
            ClientOptions::new()
                // A server of one's own may speak plain HTTP; AWS never needs it. (These options
                // replace the ones `from_env` read, so AWS_ENDPOINT and AWS_ALLOW_HTTP are
                // looked at here again.)
                .with_allow_http(allow_http(settings))
                .with_timeout(request_timeout)
                .with_connect_timeout(request_timeout.min(Duration::from_secs(5))),
        )
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: MAX_BACKOFF,
                base: 2.0,
            },
            max_retries: 10,
            // No retry starts after this; the last one may take one more request timeout.
            retry_timeout: settings.timeout,
        })
        .build()
        .map(|store| Box::new(store) as Box<dyn ObjectStore>)
        .map_err(|e| format!("s3 sink {}: {e}", settings.describe()))
}

/// Whether the endpoint (the setting, else `AWS_ENDPOINT`) is plain HTTP, or `AWS_ALLOW_HTTP`
/// says to allow it.
fn allow_http(settings: &S3Settings) -> bool {
    let endpoint = settings
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT").ok());
    endpoint.is_some_and(|e| e.starts_with("http://"))
        || std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// How long one request may take: the settings' timeout, at most 10 s (so a hung request
/// leaves time for retries).
fn request_timeout(settings: &S3Settings) -> Duration {
    settings.timeout.min(Duration::from_secs(10))
}

/// The object's name; see the crate docs.
fn object_path(settings: &S3Settings, ids: &[Arc<str>], first_timestamp_ms: u64) -> Path {
    let time = i64::try_from(first_timestamp_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let first = ids.first().map(|id| id.as_ref()).unwrap_or_default();
    let mut cut = first.len().min(NAME_ID_BYTES);
    while !first.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for id in ids {
        digest.update(id.as_bytes());
        digest.update(b"\n");
    }
    let digest: String = digest.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let extension = if settings.gzip { "ndjson.gz" } else { "ndjson" };
    let name = format!("{}-{}-{digest}.{extension}", &first[..cut], ids.len());
    partition(settings, time)
        .chain([
            PathPart::from(format!("hour={}", time.strftime("%H"))),
            PathPart::from(name),
        ])
        .collect()
}

/// The prefix's parts and the day partition of `time`.
fn partition(
    settings: &S3Settings,
    time: jiff::Timestamp,
) -> impl Iterator<Item = PathPart<'static>> {
    settings
        .prefix
        .split('/')
        .filter(|p| !p.is_empty())
        .map(|p| PathPart::from(p.to_owned()))
        .chain([PathPart::from(format!("dt={}", time.strftime("%Y-%m-%d")))])
        .collect::<Vec<_>>()
        .into_iter()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn retryable(&self, message: impl Into<String>) -> SinkError {
        SinkError::retryable(&self.described, message)
    }

    /// Adds the records to the open object (sealing it first when they would not fit) and
    /// returns what the writer waits on.
    fn add(self: &Arc<Self>, events: &[&Event], processed_at_ms: u64) -> watch::Receiver<Outcome> {
        let mut lines = Vec::with_capacity(events.len() * 256);
        for event in events {
            write_record(&mut lines, event, processed_at_ms);
        }
        let limits = &self.settings;
        let mut open = lock(&self.open);
        if let Some(current) = open.as_ref()
            && (current.ids.len() + events.len() > limits.max_events
                || current.lines.len() + lines.len() > limits.max_bytes)
            && let Some(full) = open.take()
        {
            self.seal(full);
        }
        let current = open.get_or_insert_with(|| {
            let number = self
                .opened
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !limits.linger.is_zero() {
                let inner = Arc::clone(self);
                tokio::spawn(async move {
                    tokio::time::sleep(inner.settings.linger).await;
                    let mut open = lock(&inner.open);
                    if open.as_ref().is_some_and(|o| o.number == number)
                        && let Some(due) = open.take()
                    {
                        inner.seal(due);
                    }
                });
            }
            Open {
                number,
                lines: Vec::new(),
                ids: Vec::new(),
                first_timestamp_ms: events.first().map_or(0, |e| e.timestamp_ms),
                done: watch::channel(None).0,
            }
        });
        current.lines.extend_from_slice(&lines);
        current.ids.extend(events.iter().map(|e| Arc::clone(&e.id)));
        let waiting = current.done.subscribe();
        let full = limits.linger.is_zero()
            || current.ids.len() >= limits.max_events
            || current.lines.len() >= limits.max_bytes;
        if full && let Some(full) = open.take() {
            self.seal(full);
        }
        waiting
    }

    /// Remembers where the object's events go and uploads it in a task of its own (a writer
    /// that stops waiting does not stop the upload its other writers wait for).
    fn seal(self: &Arc<Self>, open: Open) {
        let path = object_path(&self.settings, &open.ids, open.first_timestamp_ms);
        let upload = Arc::new(Upload {
            path: path.clone(),
            outcome: open.done.subscribe(),
        });
        {
            let keep = REMEMBERED_EVENTS.max(2 * self.settings.max_events);
            let mut uploads = lock(&self.uploads);
            for id in &open.ids {
                uploads.remembered += 1;
                let number = uploads.remembered;
                uploads
                    .by_id
                    .insert(Arc::clone(id), (Arc::clone(&upload), number));
                uploads.order.push_back((Arc::clone(id), number));
            }
            while uploads.order.len() > keep {
                if let Some((old, number)) = uploads.order.pop_front()
                    && uploads.by_id.get(&old).is_some_and(|(_, n)| *n == number)
                {
                    uploads.by_id.remove(&old);
                }
            }
        }
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let outcome = inner.upload(&path, open.lines).await;
            if let Err(error) = &outcome {
                tracing::debug!(%error, object = %path, "upload failed; its events go back to the queue");
            }
            open.done.send_replace(Some(outcome));
        });
    }

    async fn upload(&self, path: &Path, lines: Vec<u8>) -> Result<(), SinkError> {
        let body = if self.settings.gzip {
            tokio::task::spawn_blocking(move || gzip(&lines))
                .await
                .map_err(|e| self.retryable(format!("gzip task failed: {e}")))?
                .map_err(|e| self.retryable(format!("gzip failed: {e}")))?
        } else {
            lines
        };
        self.store
            .put(path, PutPayload::from(Bytes::from(body)))
            .await
            .map(|_| ())
            .map_err(|error| self.answer(&error, path))
    }

    /// The store's error as the sink contract's: refusals (a 4xx other than 408 and 429: no
    /// such bucket, access denied, a bad request) are permanent, unless the S3 error code says
    /// to try again ([`TEMPORARY_CODES`]); everything else is retryable.
    fn answer(&self, error: &object_store::Error, path: &Path) -> SinkError {
        let text = conveyor_core::display::error_chain(error);
        let message = format!("{path}: {text}");
        let temporary = TEMPORARY_CODES
            .iter()
            .any(|code| text.contains(&format!("<Code>{code}</Code>")));
        let refused = !temporary
            && match error {
                object_store::Error::NotFound { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => true,
                _ => status_in(&text)
                    .is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429),
            };
        if refused {
            SinkError::permanent(&self.described, message)
        } else {
            self.retryable(message)
        }
    }

    /// The indices of `events` that an earlier upload already stored: each event delivered
    /// before whose object this sink remembers is asked about (once per object).
    async fn already_stored(&self, events: &[Event]) -> Result<HashSet<usize>, SinkError> {
        let mut by_object: HashMap<Path, (Arc<Upload>, Vec<usize>)> = HashMap::new();
        {
            let uploads = lock(&self.uploads);
            for (at, event) in events.iter().enumerate().filter(|(_, e)| e.attempt > 1) {
                if let Some((upload, _)) = uploads.by_id.get(&event.id) {
                    by_object
                        .entry(upload.path.clone())
                        .or_insert_with(|| (Arc::clone(upload), Vec::new()))
                        .1
                        .push(at);
                }
            }
        }
        let asked = by_object.into_iter().map(|(path, (upload, indices))| async move {
            let outcome = upload.outcome.borrow().clone();
            let landed = match outcome {
                None => {
                    return Err(self.retryable(format!(
                        "an earlier upload of some of these events ({path}) has not finished"
                    )));
                }
                Some(Ok(())) => true,
                Some(Err(_)) => match self.store.head(&path).await {
                    Ok(_) => true,
                    Err(object_store::Error::NotFound { .. }) => false,
                    // A key that may write but not read (PutObject only), or a store that
                    // hides what it holds: unknown, so written again. A second copy beats
                    // events stuck for ever.
                    Err(
                        error @ (object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }),
                    ) => {
                        tracing::warn!(object = %path, error = %conveyor_core::display::error_chain(&error), "cannot ask whether an upload given up on was stored; writing its events again (they may be stored twice; the sink needs s3:GetObject to tell)");
                        false
                    }
                    Err(error) => {
                        return Err(self.retryable(format!(
                            "cannot tell whether {path} was stored: {}",
                            conveyor_core::display::error_chain(&error)
                        )));
                    }
                },
            };
            Ok(if landed { indices } else { Vec::new() })
        });
        let mut stored = HashSet::new();
        for answer in futures_util::future::join_all(asked).await {
            stored.extend(answer?);
        }
        Ok(stored)
    }

    /// The ids in the newest objects of today's and yesterday's partitions, oldest first.
    async fn recent_ids(&self, limit: usize) -> Result<Vec<String>, SinkError> {
        let now = jiff::Timestamp::now();
        let mut objects = Vec::new();
        for day in [now - jiff::SignedDuration::from_hours(24), now] {
            let prefix: Path = partition(&self.settings, day).collect();
            let listed: Vec<_> = self
                .store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| self.answer(&e, &prefix))?;
            objects.extend(listed);
        }
        objects.sort_by(|a, b| (b.last_modified, &b.location).cmp(&(a.last_modified, &a.location)));
        objects.dedup_by(|a, b| a.location == b.location);
        let mut newest_first: Vec<Vec<String>> = Vec::new();
        let mut found = 0;
        for object in objects {
            if found >= limit {
                break;
            }
            let read = async { self.store.get(&object.location).await?.bytes().await };
            let body = match tokio::time::timeout(self.settings.timeout, read).await {
                Ok(Ok(body)) => body,
                // Deleted since it was listed: nothing of it to remember.
                Ok(Err(object_store::Error::NotFound { .. })) => continue,
                Ok(Err(e)) => return Err(self.answer(&e, &object.location)),
                Err(_) => {
                    return Err(self.retryable(format!(
                        "reading {} back took longer than {:?}",
                        object.location, self.settings.timeout
                    )));
                }
            };
            let text = if object.location.as_ref().ends_with(".gz") {
                let mut plain = Vec::new();
                match std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(body.as_ref()),
                    &mut plain,
                ) {
                    Ok(_) => plain,
                    Err(error) => {
                        tracing::warn!(object = %object.location, %error, "not a gzip object; its ids are not read back");
                        continue;
                    }
                }
            } else {
                body.to_vec()
            };
            let lines: Vec<&[u8]> = text
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .collect();
            let ids = ids_of_lines(&lines);
            found += ids.len();
            newest_first.push(ids);
        }
        let mut ids: Vec<String> = newest_first.into_iter().rev().flatten().collect();
        let skip = ids.len().saturating_sub(limit);
        ids.drain(..skip);
        Ok(ids)
    }
}

/// The HTTP status in an error's text (`… status code: 400 Bad Request …`), if it has one:
/// `object_store` keeps the status inside an error type it does not export.
fn status_in(text: &str) -> Option<u16> {
    let (_, after) = text.split_once("status code: ")?;
    after.get(..3)?.parse().ok()
}

fn gzip(lines: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(lines.len() / 4),
        flate2::Compression::default(),
    );
    encoder.write_all(lines)?;
    encoder.finish()
}

#[async_trait]
impl Sink for S3Sink {
    async fn write(&self, events: &[Event], processed_at_ms: u64) -> Result<(), SinkError> {
        let stored = if events.iter().any(|e| e.attempt > 1) {
            self.inner.already_stored(events).await?
        } else {
            HashSet::new()
        };
        let pending: Vec<&Event> = events
            .iter()
            .enumerate()
            .filter(|(at, _)| !stored.contains(at))
            .map(|(_, e)| e)
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let mut waiting = self.inner.add(&pending, processed_at_ms);
        let outcome = waiting
            .wait_for(Option::is_some)
            .await
            .map_err(|_| {
                self.inner
                    .retryable("the upload task ended without an answer")
            })?
            .clone();
        outcome.unwrap_or_else(|| Err(self.inner.retryable("no answer from the upload")))
    }

    fn describe(&self) -> String {
        self.inner.described.clone()
    }

    /// Asking about earlier uploads (one request), gathering for `linger`, then one upload
    /// with the client's own retries: none starts after `timeout`, but the last may come after
    /// one more pause and take one more request timeout.
    fn write_timeout(&self) -> Duration {
        let settings = &self.inner.settings;
        let request = request_timeout(settings);
        request
            + settings.linger
            + settings.timeout
            + MAX_BACKOFF
            + request
            + Duration::from_secs(1)
    }

    async fn recent_ids(&self, limit: usize) -> Result<Vec<String>, SinkError> {
        self.inner.recent_ids(limit).await
    }
}

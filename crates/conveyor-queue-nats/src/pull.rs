//! A continuous pull from the durable consumer that can be stopped without losing what the
//! server already sent.
//!
//! async-nats' `pull::Stream` keeps a pull request open ahead of the worker, which is what
//! keeps a worker busy, but it can only be stopped by dropping it, and dropping it unsubscribes
//! at once: whatever the server had sent and the client had not yet read is thrown away and
//! comes back only after AckWait (30 s by default). Every rolling restart paid that for what the
//! stopped processor had prefetched. So conveyor pulls by hand, with the same protocol:
//! - one inbox subscription; pull requests (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`)
//!   for `batch` messages, each expiring after [`EXPIRES`] with idle heartbeats every
//!   [`HEARTBEAT`]; a new request goes out whenever half a batch or less is outstanding;
//! - the server's status messages keep the count honest: 408/409 end a request and say how
//!   many of its messages it will not send (`Nats-Pending-Messages`), 100 is a heartbeat;
//! - nothing heard for [`SILENCE`] while requests are outstanding (a server that restarted
//!   and forgot them, a lost connection) is an error: the worker subscribes again;
//! - [`Puller::stop`] drains the subscription (UNSUB, then a PING: everything the server sent
//!   before it removed the interest arrives before the PONG) and returns what arrived. The
//!   server drops a pull request nobody listens to, so nothing is sent to it afterwards.

use std::time::Duration;

use async_nats::jetstream::{self, Context};
use async_nats::{Client, StatusCode, Subscriber};
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

/// How long one pull request waits on the server for messages.
const EXPIRES: Duration = Duration::from_secs(30);
/// How often the server says "still here, nothing to send" to a waiting request.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Silence after which the requests are taken as lost (three missed heartbeats).
const SILENCE: Duration = Duration::from_secs(15);
/// Longest wait for a drained subscription to close.
const STOP_WITHIN: Duration = Duration::from_secs(2);

pub(crate) struct Puller {
    client: Client,
    js: Context,
    /// Where pull requests go.
    next_subject: String,
    inbox: String,
    subscriber: Subscriber,
    batch: usize,
    /// Messages requested that the server may still send.
    outstanding: usize,
    last_heard: Instant,
}

impl Puller {
    pub(crate) async fn start(
        client: Client,
        js: Context,
        stream: &str,
        consumer: &str,
        batch: usize,
    ) -> Result<Puller, String> {
        let inbox = client.new_inbox();
        let subscriber = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| format!("cannot subscribe to the pull inbox: {e}"))?;
        Ok(Puller {
            client,
            js,
            next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
            inbox,
            subscriber,
            batch: batch.max(1),
            outstanding: 0,
            last_heard: Instant::now(),
        })
    }

    /// Keeps at least half a batch requested.
    async fn request_more(&mut self) -> Result<(), String> {
        if self.outstanding > self.batch / 2 {
            return Ok(());
        }
        let request = format!(
            r#"{{"batch":{},"expires":{},"idle_heartbeat":{}}}"#,
            self.batch,
            EXPIRES.as_nanos(),
            HEARTBEAT.as_nanos()
        );
        self.client
            .publish_with_reply(
                self.next_subject.clone(),
                self.inbox.clone(),
                request.into(),
            )
            .await
            .map_err(|e| format!("cannot send a pull request: {e}"))?;
        if self.outstanding == 0 {
            // Silence is measured from the first request, not from the last message.
            self.last_heard = Instant::now();
        }
        self.outstanding += self.batch;
        Ok(())
    }

    /// The next message, waiting up to `wait`; `Ok(None)` when none came.
    pub(crate) async fn next(
        &mut self,
        wait: Duration,
    ) -> Result<Option<jetstream::Message>, String> {
        let deadline = Instant::now() + wait;
        loop {
            self.request_more().await?;
            let read = match tokio::time::timeout_at(deadline, self.subscriber.next()).await {
                Err(_) => {
                    if self.last_heard.elapsed() > SILENCE {
                        return Err(format!(
                            "nothing heard from the server for {:?} (no message, no heartbeat)",
                            self.last_heard.elapsed()
                        ));
                    }
                    return Ok(None);
                }
                Ok(None) => return Err("the pull subscription closed".into()),
                Ok(Some(message)) => self.read(message),
            };
            if let Some(message) = read? {
                return Ok(Some(message));
            }
        }
    }

    /// A message that has already arrived, without waiting.
    pub(crate) fn ready(&mut self) -> Option<jetstream::Message> {
        loop {
            let message = self.subscriber.next().now_or_never()??;
            match self.read(message) {
                Ok(Some(message)) => return Some(message),
                Ok(None) => continue,
                Err(_) => return None,
            }
        }
    }

    /// A message for the caller, `None` for a heartbeat or the end of a request, or why the
    /// pull cannot go on.
    fn read(&mut self, message: async_nats::Message) -> Result<Option<jetstream::Message>, String> {
        self.last_heard = Instant::now();
        match message.status {
            None | Some(StatusCode::OK) => {
                self.outstanding = self.outstanding.saturating_sub(1);
                Ok(Some(jetstream::Message {
                    message,
                    context: self.js.clone(),
                }))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => Ok(None),
            Some(StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED) => {
                let description = message.description.as_deref().unwrap_or("");
                if description.contains("Consumer Deleted") || description.contains("push based") {
                    return Err(format!("pull request refused: {description}"));
                }
                // The request is over; without the count (a leadership change) assume the
                // worst, that none of its messages will come, and ask again.
                let unsent = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Pending-Messages"))
                    .and_then(|v| v.as_str().parse::<usize>().ok());
                self.outstanding = match unsent {
                    Some(unsent) => self.outstanding.saturating_sub(unsent),
                    None => 0,
                };
                Ok(None)
            }
            Some(status) => Err(format!(
                "pull request answered {status}: {}",
                message.description.as_deref().unwrap_or("")
            )),
        }
    }

    /// Stops pulling and returns every message the server sent to this puller that was not
    /// handed out (see the module docs).
    pub(crate) async fn stop(mut self) -> Vec<jetstream::Message> {
        let mut held = Vec::new();
        if self.subscriber.drain().await.is_err() {
            // The connection is gone; take what has arrived.
            while let Some(message) = self.ready() {
                held.push(message);
            }
            return held;
        }
        let deadline = Instant::now() + STOP_WITHIN;
        while let Ok(Some(message)) =
            tokio::time::timeout_at(deadline, self.subscriber.next()).await
        {
            if let Ok(Some(message)) = self.read(message) {
                held.push(message);
            }
        }
        held
    }
}

//! gRPC mode: each connection holds one `Publish` stream (bidirectional) and keeps up to
//! `--grpc-window` events in flight on it; every event's latency runs until its own ack.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use conveyor_proto::v1::ingest_service_client::IngestServiceClient;
use conveyor_proto::v1::{IngestRequest, PublishAck, PublishRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::args::Plan;
use crate::body;
use crate::http::ERROR_BACKOFF;
use crate::recorder::{Outcome, Recorder};
use crate::schedule::{Claim, Work, latency_start, wake_time};

/// Most events sent in one go before acks are read again.
const BURST: usize = 256;

/// Opens `Publish` streams and sends the same event on them.
#[derive(Debug)]
pub struct GrpcDriver {
    endpoint: Endpoint,
    event: IngestRequest,
    window: usize,
    timeout: Duration,
}

/// What an ack means, as an HTTP-like outcome: accepted → 202, `queue_full` → 429,
/// `unavailable`/`shutting_down` → 503, any other refusal → 422.
pub fn ack_outcome(ack: &PublishAck) -> (Outcome, u64) {
    match &ack.error {
        None if !ack.message_id.is_empty() => (Outcome::Status(202), 1),
        None => (Outcome::Status(500), 0),
        Some(error) => {
            let status = match error.code.as_str() {
                "queue_full" => 429,
                "unavailable" | "shutting_down" => 503,
                _ => 422,
            };
            (Outcome::Status(status), 0)
        }
    }
}

type Stream = (mpsc::Sender<PublishRequest>, Streaming<PublishAck>);

impl GrpcDriver {
    pub fn new(plan: &Plan) -> Result<GrpcDriver, String> {
        let endpoint = Endpoint::from_shared(plan.target.clone())
            .map_err(|e| format!("'{}' is not a gRPC endpoint: {e}", plan.target))?
            .tcp_nodelay(true)
            .connect_timeout(plan.request_timeout);
        Ok(GrpcDriver {
            endpoint,
            event: IngestRequest {
                id: String::new(),
                source: plan.source.clone(),
                payload: Bytes::from(body::data_json(plan.payload_bytes)),
                content_type: "application/json".to_owned(),
                metadata: body::metadata(),
                timestamp_ms: 0,
                headers: Default::default(),
            },
            window: plan.grpc_window.max(1),
            timeout: plan.request_timeout,
        })
    }

    async fn open(&self) -> Result<Stream, String> {
        let channel: Channel = self.endpoint.connect().await.map_err(|e| e.to_string())?;
        let mut client = IngestServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024);
        let (tx, rx) = mpsc::channel(self.window);
        let acks = client
            .publish(ReceiverStream::new(rx))
            .await
            .map_err(|status| status.to_string())?
            .into_inner();
        Ok((tx, acks))
    }

    fn request(&self, sequence: u64) -> PublishRequest {
        PublishRequest {
            sequence,
            event: Some(self.event.clone()),
        }
    }

    /// One connection's loop: (re)opens its stream and publishes claimed events until the run
    /// is over and every event in flight was answered (or its stream broke).
    pub async fn worker(self: Arc<Self>, work: Arc<Work>, mut recorder: Recorder) -> Recorder {
        let mut pending: Option<Claim> = None;
        let mut exhausted = false;
        loop {
            if pending.is_none() && !exhausted {
                pending = work.claim();
                exhausted = pending.is_none();
            }
            if exhausted && pending.is_none() {
                break;
            }
            let (tx, acks) = match self.open().await {
                Ok(stream) => stream,
                Err(_) => {
                    // The event due now cannot go out: it failed.
                    if let Some(claim) = pending.take() {
                        let now = Instant::now();
                        recorder.record(now, now, Outcome::Transport, claim.events, 0);
                    }
                    tokio::time::sleep(ERROR_BACKOFF).await;
                    continue;
                }
            };
            let clean = self
                .stream_loop(&work, &mut recorder, &mut pending, &mut exhausted, tx, acks)
                .await;
            if clean {
                break;
            }
            tokio::time::sleep(ERROR_BACKOFF).await;
        }
        recorder
    }

    /// Publishes on one stream. Returns `true` when the run is over and everything was
    /// answered, `false` when the stream broke (its unanswered events are counted as
    /// transport errors).
    async fn stream_loop(
        &self,
        work: &Work,
        recorder: &mut Recorder,
        pending: &mut Option<Claim>,
        exhausted: &mut bool,
        tx: mpsc::Sender<PublishRequest>,
        mut acks: Streaming<PublishAck>,
    ) -> bool {
        let mut tx = Some(tx);
        let mut outstanding: HashMap<u64, Instant> = HashMap::with_capacity(self.window);
        let mut sequence = 0u64;
        let mut last_progress = Instant::now();
        let watchdog = tokio::time::sleep(self.timeout);
        tokio::pin!(watchdog);
        let broken = loop {
            if pending.is_none() && !*exhausted {
                *pending = work.claim();
                *exhausted = pending.is_none();
            }
            if *exhausted && pending.is_none() {
                // Nothing more to send: close our half so the server ends the stream after
                // the last ack.
                tx = None;
                if outstanding.is_empty() {
                    break false;
                }
            }
            let room = outstanding.len() < self.window;
            let now = Instant::now();
            let due_now = room && pending.is_some_and(|c| wake_time(c.intended, now).is_none());
            if due_now && let Some(sender) = &tx {
                // Send everything due, up to the window and a burst.
                let mut sent_any = false;
                for _ in 0..BURST {
                    let Some(claim) = pending.filter(|c| {
                        outstanding.len() < self.window
                            && wake_time(c.intended, Instant::now()).is_none()
                    }) else {
                        break;
                    };
                    sequence += 1;
                    let sent = Instant::now();
                    if sender.try_send(self.request(sequence)).is_err() {
                        break;
                    }
                    sent_any = true;
                    outstanding.insert(sequence, latency_start(claim.intended, sent));
                    *pending = work.claim();
                    if pending.is_none() {
                        *exhausted = true;
                        break;
                    }
                }
                if sent_any {
                    continue;
                }
            }
            let wake = if room {
                pending.and_then(|c| wake_time(c.intended, now))
            } else {
                None
            };
            tokio::select! {
                biased;
                ack = acks.message() => match ack {
                    Ok(Some(ack)) => {
                        last_progress = Instant::now();
                        if let Some(from) = outstanding.remove(&ack.sequence) {
                            let (outcome, accepted) = ack_outcome(&ack);
                            recorder.record(from, last_progress, outcome, 1, accepted);
                        }
                    }
                    Ok(None) | Err(_) => break true,
                },
                () = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
                () = &mut watchdog => {
                    if !outstanding.is_empty() && last_progress.elapsed() >= self.timeout {
                        break true;
                    }
                    watchdog.as_mut().reset((Instant::now() + self.timeout).into());
                }
            }
        };
        if broken {
            let now = Instant::now();
            for _ in outstanding.drain() {
                recorder.record(now, now, Outcome::Transport, 1, 0);
            }
        }
        !broken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use conveyor_proto::v1::ErrorDetail;

    fn ack(message_id: &str, code: Option<&str>) -> PublishAck {
        PublishAck {
            sequence: 1,
            message_id: message_id.to_owned(),
            error: code.map(|code| ErrorDetail {
                code: code.to_owned(),
                message: String::new(),
                field: String::new(),
            }),
        }
    }

    #[test]
    fn acks_map_to_http_like_outcomes() {
        assert_eq!(ack_outcome(&ack("id", None)), (Outcome::Status(202), 1));
        assert_eq!(
            ack_outcome(&ack("", Some("queue_full"))),
            (Outcome::Status(429), 0)
        );
        assert_eq!(
            ack_outcome(&ack("", Some("shutting_down"))),
            (Outcome::Status(503), 0)
        );
        assert_eq!(
            ack_outcome(&ack("", Some("invalid_field"))),
            (Outcome::Status(422), 0)
        );
    }
}

//! Dead letters kept in a JetStream stream, so they survive restarts and every processor sees
//! the same list. Bounded by the stream's `max_msgs` (discard-new: a full DLQ refuses, and the
//! pool keeps the event in the work queue instead of dropping it).

use async_nats::HeaderMap;
use async_nats::jetstream::stream::{DiscardPolicy, RetentionPolicy, Stream};
use async_nats::jetstream::{self, Context};
use async_trait::async_trait;
use bytes::Bytes;
use conveyor_proto::v1;
use conveyor_queue::dlq::{DeadLetter, DeadLetterQueue, ids_not_taken};
use prost::Message;

use crate::NatsConfig;

pub struct NatsDeadLetters {
    js: Context,
    stream_name: String,
    subject: String,
}

impl NatsDeadLetters {
    /// Creates or finds the DLQ stream on an existing connection.
    pub async fn open(js: Context, config: &NatsConfig) -> Result<Self, String> {
        let wanted = jetstream::stream::Config {
            name: config.dlq_stream.clone(),
            subjects: vec![config.dlq_subject.clone()],
            retention: RetentionPolicy::Limits,
            max_messages: config.dlq_capacity,
            discard: DiscardPolicy::New,
            storage: config.storage_type(),
            num_replicas: config.replicas,
            ..Default::default()
        };
        // Every processor opens it at start-up, possibly at the same moment.
        crate::setup::ensure_stream(&js, wanted, "DLQ").await?;
        Ok(NatsDeadLetters {
            js,
            stream_name: config.dlq_stream.clone(),
            subject: config.dlq_subject.clone(),
        })
    }

    async fn stream(&self) -> Option<Stream> {
        match self.js.get_stream(&self.stream_name).await {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::warn!(stream = %self.stream_name, %error, "DLQ stream unavailable");
                None
            }
        }
    }

    /// Every stored letter with its stream sequence, oldest first, up to `limit`.
    async fn scan(&self, limit: usize) -> Vec<(u64, DeadLetter)> {
        let Some(mut stream) = self.stream().await else {
            return Vec::new();
        };
        let Ok(info) = stream.info().await else {
            return Vec::new();
        };
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        let mut letters = Vec::new();
        let mut sequence = first;
        while sequence <= last && letters.len() < limit {
            // Deleted sequences (replayed letters) answer "not found": skip them.
            if let Ok(message) = stream.get_raw_message(sequence).await
                && let Ok(letter) = v1::DeadLetter::decode(message.payload.clone())
            {
                letters.push((sequence, from_wire(letter)));
            }
            sequence += 1;
        }
        letters
    }
}

fn from_wire(letter: v1::DeadLetter) -> DeadLetter {
    DeadLetter {
        event: conveyor_proto::event_from_wire(letter.event.unwrap_or_default()),
        error: letter.error,
        attempts: letter.attempts,
        failed_at_ms: letter.failed_at_ms,
    }
}

fn to_wire(letter: &DeadLetter) -> Bytes {
    Bytes::from(
        v1::DeadLetter {
            event: Some(conveyor_proto::event_to_wire(letter.event.clone())),
            error: letter.error.clone(),
            attempts: letter.attempts,
            failed_at_ms: letter.failed_at_ms,
        }
        .encode_to_vec(),
    )
}

#[async_trait]
impl DeadLetterQueue for NatsDeadLetters {
    async fn push(&self, letter: DeadLetter) -> Result<(), DeadLetter> {
        let mut headers = HeaderMap::new();
        // One dead letter per event and attempt series, even if this push is retried.
        headers.insert(
            "Nats-Msg-Id",
            format!("dlq-{}-{}", letter.event.dedupe_key(), letter.failed_at_ms).as_str(),
        );
        let sent = self
            .js
            .publish_with_headers(self.subject.clone(), headers, to_wire(&letter))
            .await;
        match sent {
            Ok(ack) => match ack.await {
                Ok(_) => Ok(()),
                Err(error) => {
                    tracing::warn!(%error, id = %letter.event.id, "DLQ refused the event");
                    Err(letter)
                }
            },
            Err(error) => {
                tracing::warn!(%error, id = %letter.event.id, "DLQ unreachable");
                Err(letter)
            }
        }
    }

    async fn list(&self, limit: usize) -> (u64, Vec<DeadLetter>) {
        let size = self.size().await;
        let letters = self.scan(limit).await.into_iter().map(|(_, l)| l).collect();
        (size, letters)
    }

    async fn take(&self, ids: Option<&[String]>) -> (Vec<DeadLetter>, Vec<String>) {
        let all = self.scan(usize::MAX).await;
        let Some(stream) = self.stream().await else {
            return (Vec::new(), ids.map(<[String]>::to_vec).unwrap_or_default());
        };
        let mut taken = Vec::new();
        for (sequence, letter) in all {
            let wanted = ids.is_none_or(|ids| ids.iter().any(|id| **id == *letter.event.id));
            if wanted && matches!(stream.delete_message(sequence).await, Ok(true)) {
                taken.push(letter);
            }
        }
        let not_found = ids_not_taken(ids, &taken);
        (taken, not_found)
    }

    async fn size(&self) -> u64 {
        match self.stream().await {
            Some(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
            None => 0,
        }
    }
}

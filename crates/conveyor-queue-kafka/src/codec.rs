//! Events as Kafka records: ours are the protobuf `conveyor.v1.Event` marked with
//! [`ENCODING_HEADER`]; a record a plain Kafka producer wrote is read as a raw event.

use bytes::Bytes;
use conveyor_core::{ContentType, Event};
use conveyor_proto::v1;
use prost::Message as _;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message as _, OwnedHeaders};

/// Header marking a record as a protobuf `conveyor.v1.Event`.
pub(crate) const ENCODING_HEADER: &str = "conveyor-encoding";

/// Writes an event as a record's value (the protobuf `conveyor.v1.Event`) and headers: what
/// the queue stores, and what the Kafka sink's `event` encoding sends, so that another
/// conveyor can take the topic as its queue.
pub fn encode(event: &Event) -> (Vec<u8>, OwnedHeaders) {
    let payload = conveyor_proto::event_to_wire(event.clone()).encode_to_vec();
    let headers = OwnedHeaders::new().insert(Header {
        key: ENCODING_HEADER,
        value: Some("proto"),
    });
    (payload, headers)
}

/// Reads a record as an event: ours (protobuf) or a plain Kafka producer's (raw payload).
pub(crate) fn decode(message: &BorrowedMessage<'_>) -> Event {
    let ours = message.headers().is_some_and(|headers| {
        headers
            .iter()
            .any(|h| h.key == ENCODING_HEADER && h.value == Some(b"proto".as_slice()))
    });
    let payload = message.payload().unwrap_or_default();
    if ours && let Ok(wire) = v1::Event::decode(payload) {
        return conveyor_proto::event_from_wire(wire);
    }
    let payload = Bytes::copy_from_slice(payload);
    Event {
        id: format!(
            "kafka-{}-{}-{}",
            message.topic(),
            message.partition(),
            message.offset()
        )
        .into(),
        source: message
            .key()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or(message.topic())
            .into(),
        timestamp_ms: conveyor_core::now_ms(),
        content_type: if matches!(
            payload.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{') | Some(b'[')
        ) {
            ContentType::Json
        } else {
            ContentType::Binary
        },
        payload,
        metadata: Default::default(),
        attempt: 0,
        headers: Default::default(),
    }
}

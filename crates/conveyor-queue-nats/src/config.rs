use std::time::Duration;

use async_nats::ServerAddr;

/// Where the stream lives and how it behaves.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated (the seed's `NATS_URL`): one server, or seed servers of
    /// a cluster (`nats://a:4222,nats://b:4222`). See [`NatsConfig::servers`].
    pub url: String,
    pub stream: String,
    pub subject: String,
    /// The durable consumer every processor shares.
    pub consumer: String,
    pub replicas: usize,
    /// File (durable) or memory storage.
    pub file_storage: bool,
    /// How long a delivery may stay unacked before the broker redelivers it.
    pub ack_wait: Duration,
    /// Deliveries after which the broker stops redelivering; `None` leaves it to the processor
    /// (which dead-letters at its `max_attempts`).
    pub max_deliver: Option<i64>,
    /// The stream's `max_msgs`: the queue's capacity.
    pub capacity: i64,
    /// Publishes with the same `Nats-Msg-Id` inside this window are stored once.
    pub duplicate_window: Duration,
    /// Most publishes awaiting their PubAck at once.
    pub max_in_flight_publishes: usize,
    /// How long a publish waits for its PubAck before the client gets 503.
    pub publish_timeout: Duration,
    /// Messages a consumer pulls per request.
    pub fetch_batch: usize,
    pub dlq_stream: String,
    pub dlq_subject: String,
    pub dlq_capacity: i64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://localhost:4222".into(),
            stream: "CONVEYOR".into(),
            subject: "conveyor.events".into(),
            consumer: "conveyor-processor".into(),
            replicas: 1,
            file_storage: true,
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            capacity: 1_000_000,
            duplicate_window: Duration::from_secs(120),
            max_in_flight_publishes: 4096,
            publish_timeout: Duration::from_secs(5),
            fetch_batch: 256,
            dlq_stream: "CONVEYOR_DLQ".into(),
            dlq_subject: "conveyor.dlq".into(),
            dlq_capacity: 100_000,
        }
    }
}

impl NatsConfig {
    /// The servers `url` names, each entry checked on its own so that a bad one is named.
    pub fn servers(&self) -> Result<Vec<ServerAddr>, String> {
        parse_servers(&self.url)
    }

    /// The servers as they may be shown: without user, password or token.
    pub fn shown_url(&self) -> String {
        match self.servers() {
            Ok(servers) => servers
                .iter()
                .map(crate::without_credentials)
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => "(a bad server list)".into(),
        }
    }

    /// JetStream storage for the streams conveyor creates.
    pub(crate) fn storage_type(&self) -> async_nats::jetstream::stream::StorageType {
        if self.file_storage {
            async_nats::jetstream::stream::StorageType::File
        } else {
            async_nats::jetstream::stream::StorageType::Memory
        }
    }
}

/// Parses a comma-separated server list. The client's own parser takes one URL only (a list
/// fails as "invalid port number" on the text after the first comma), so each entry is parsed
/// alone; an entry without a scheme is taken as `nats://` and one without a port as 4222, as the
/// client does for a single URL.
pub fn parse_servers(list: &str) -> Result<Vec<ServerAddr>, String> {
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    let mut servers = Vec::with_capacity(entries.len());
    for (index, entry) in entries.iter().enumerate() {
        let at = || {
            if entries.len() == 1 {
                String::new()
            } else {
                format!(" (entry {} of {})", index + 1, entries.len())
            }
        };
        if entry.is_empty() {
            return Err(format!(
                "empty server entry{} in {:?}; expected e.g. nats://a:4222,nats://b:4222",
                at(),
                hide_credentials(list)
            ));
        }
        let server: ServerAddr = entry
            .parse()
            .map_err(|e| format!("bad server {:?}{}: {e}", hide_credentials(entry), at()))?;
        if server.host().is_empty() {
            return Err(format!(
                "bad server {:?}{}: no host",
                hide_credentials(entry),
                at()
            ));
        }
        servers.push(server);
    }
    Ok(servers)
}

/// A server list as it may be shown in an error: `nats://***@host:4222` for an entry that
/// carries a user, password or token.
fn hide_credentials(list: &str) -> String {
    list.split(',')
        .map(|entry| {
            let (scheme, rest) = entry.split_once("://").unwrap_or(("", entry));
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) if scheme.is_empty() => format!("***{}", &rest[at..]),
                Some(at) => format!("{scheme}://***{}", &rest[at..]),
                None => entry.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Percent-decodes a URL's user or password (`p%40ss` → `p@ss`): the server wants the text,
/// the URL holds it encoded.
pub(crate) fn decode_credential(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::{decode_credential, parse_servers};

    #[test]
    fn credentials_never_appear_in_errors_and_are_decoded_for_the_server() {
        let error = parse_servers("nats://app:s3cret@a:42x2").expect_err("a bad port");
        assert!(
            !error.contains("s3cret") && error.contains("***@a:42x2"),
            "{error}"
        );
        let error = parse_servers("nats://tok@a:4222,,b").expect_err("an empty entry");
        assert!(!error.contains("tok"), "{error}");
        assert_eq!(decode_credential("p%40ss%2Fw0rd"), "p@ss/w0rd");
        assert_eq!(decode_credential("plain%zz"), "plain%zz");
    }

    #[test]
    fn a_comma_separated_list_names_every_server() {
        let servers = parse_servers("nats://a:4222, nats://b:4223,c").expect("a valid list");
        let named: Vec<(String, u16)> = servers
            .iter()
            .map(|s| (s.host().to_owned(), s.port()))
            .collect();
        assert_eq!(
            named,
            [("a".into(), 4222), ("b".into(), 4223), ("c".into(), 4222)]
        );
    }

    #[test]
    fn a_bad_entry_is_named_with_its_position() {
        let error =
            parse_servers("nats://a:4222,nats://b:42x2,nats://c:4222").expect_err("a bad list");
        assert!(
            error.contains("\"nats://b:42x2\"") && error.contains("entry 2 of 3"),
            "{error}"
        );
        let error = parse_servers("nats://a:4222,,nats://c:4222").expect_err("a bad list");
        assert!(
            error.contains("empty server entry (entry 2 of 3)"),
            "{error}"
        );
        let error = parse_servers("http://a:4222").expect_err("a bad list");
        assert!(error.contains("invalid scheme"), "{error}");
    }
}

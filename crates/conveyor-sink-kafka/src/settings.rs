//! The Kafka sink's settings: the quick form (`--sink kafka://host:9092/topic`) and the
//! `[sinks.NAME]` table.

use std::time::Duration;

use conveyor_queue_kafka::{KafkaConfig, check_settings};
use conveyor_sink::field::FieldPath;
use conveyor_sink::settings::{Settings, query_table};

/// What a record carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The event's record as JSON (the fields every sink writes; `content-type:
    /// application/json`).
    Record,
    /// conveyor's own protobuf event, as its Kafka queue stores it: another conveyor can take
    /// the topic as its queue (`QUEUE_TYPE=kafka`).
    Event,
}

/// Which part of an event is the record's key (and so picks its partition: records with the
/// same key stay in order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Id,
    Source,
    None,
    /// A field of the event by its jq path (`.data.customer.id`, `.metadata.tenant`).
    Field(FieldPath),
}

/// Where and how the sink produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSinkSettings {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    pub topic: String,
    pub key: Key,
    pub encoding: Encoding,
    /// Partitions of the topic when the sink creates it.
    pub partitions: i32,
    pub replication_factor: i32,
    /// How long a write waits for its delivery reports.
    pub timeout: Duration,
    /// Most records awaiting their delivery report at once, across all workers.
    pub max_in_flight: usize,
    /// librdkafka producer settings applied last (`compression.type`, `security.protocol`…).
    pub options: Vec<(String, String)>,
}

const KEYS: &[&str] = &[
    "brokers",
    "topic",
    "key",
    "encoding",
    "partitions",
    "replication_factor",
    "timeout_ms",
    "max_in_flight",
    "options",
];

impl KafkaSinkSettings {
    /// The quick form: `kafka://host:9092[,host2:9092]/topic?key=data.customer_id`; the query
    /// takes the table's keys (but `options`).
    pub fn from_url(spec: &str) -> Result<Self, String> {
        let rest = spec
            .strip_prefix("kafka://")
            .ok_or_else(|| format!("'{spec}' does not start with kafka://"))?;
        let (place, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (brokers, topic) = place
            .split_once('/')
            .ok_or_else(|| format!("'{spec}' names no topic; expected kafka://host:9092/topic"))?;
        let mut table = query_table(query, |key| {
            matches!(key, "brokers" | "topic" | "options").then(|| {
                format!(
                    "`{key}` is not a query key of the quick form (the brokers and the topic are its host and path; options need a [sinks] table)"
                )
            })
        })?;
        table.insert("brokers".into(), brokers.into());
        table.insert("topic".into(), topic.into());
        Self::from_settings(&table)
    }

    /// A `[sinks.NAME]` table with `type = "kafka"`: `brokers` (127.0.0.1:9092), `topic`
    /// (required), `key` (source | id | none | a field path such as .data.customer.id or .metadata.tenant; default
    /// source),
    /// `encoding` (record | event), `partitions` (6), `replication_factor` (1), `timeout_ms`
    /// (10000), `max_in_flight` (4096), `options` (librdkafka producer settings).
    pub fn from_settings(
        table: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, String> {
        let settings = Settings::new("kafka", table, KEYS)?;
        let brokers = settings
            .text("brokers")
            .unwrap_or_else(|| "127.0.0.1:9092".into());
        if brokers.split(',').any(|b| b.trim().is_empty()) {
            return Err(format!(
                "brokers '{brokers}' has an empty entry; expected host:9092[,host:9092]"
            ));
        }
        let topic = settings.required("topic", "orders-processed")?;
        check_topic(&topic)?;
        let key = match settings.text("key").as_deref() {
            None | Some("source") => Key::Source,
            Some("id") => Key::Id,
            Some("none") => Key::None,
            Some(path) => Key::Field(
                FieldPath::parse(path)
                    .map_err(|e| format!("key is source, id, none or a field path: {e}"))?,
            ),
        };
        let encoding = match settings.choice("encoding", &["record", "event"])? {
            None | Some("record") => Encoding::Record,
            Some(_) => Encoding::Event,
        };
        let sink = KafkaSinkSettings {
            brokers,
            topic,
            key,
            encoding,
            partitions: settings.number("partitions", 6, 1..=10_000)? as i32,
            replication_factor: settings.number("replication_factor", 1, 1..=16)? as i32,
            timeout: Duration::from_millis(settings.number("timeout_ms", 10_000, 1..=600_000)?),
            max_in_flight: settings.number("max_in_flight", 4096, 1..=1_000_000)? as usize,
            options: settings.strings("options")?,
        };
        check_settings(&sink.producer_config()).map_err(|e| format!("options: {e}"))?;
        Ok(sink)
    }

    /// The Kafka backend's settings for the producer and the topic (the group is never
    /// joined; nothing here bounds the topic's lag).
    pub fn producer_config(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            group: format!("conveyor-sink-{}", self.topic),
            partitions: self.partitions,
            replication_factor: self.replication_factor,
            capacity: 0,
            max_in_flight_publishes: self.max_in_flight,
            publish_timeout: self.timeout,
            producer_overrides: self.options.clone(),
            ..KafkaConfig::default()
        }
    }

    /// `kafka://host:9092/topic`.
    pub fn describe(&self) -> String {
        format!("kafka://{}/{}", self.brokers, self.topic)
    }
}

/// A Kafka topic name: 1 to 249 of `a-z A-Z 0-9 . _ -`, not `.` or `..`.
fn check_topic(topic: &str) -> Result<(), String> {
    let valid = (1..=249).contains(&topic.len())
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && topic != "."
        && topic != "..";
    if valid {
        Ok(())
    } else {
        Err(format!(
            "topic '{topic}' is not a Kafka topic name (1 to 249 of a-z A-Z 0-9 . _ -)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_form_reads_brokers_topic_and_query() {
        let settings =
            KafkaSinkSettings::from_url("kafka://a:9092,b:9092/orders.out?key=data.customer.id")
                .expect("a kafka sink");
        assert_eq!(settings.brokers, "a:9092,b:9092");
        assert_eq!(settings.topic, "orders.out");
        assert_eq!(
            settings.key,
            Key::Field(FieldPath::parse("data.customer.id").expect("a path"))
        );
        assert_eq!(settings.encoding, Encoding::Record);
        assert_eq!(settings.describe(), "kafka://a:9092,b:9092/orders.out");
        let settings = KafkaSinkSettings::from_url("kafka://a:9092/t?key=metadata.tenant")
            .expect("a kafka sink");
        assert_eq!(
            settings.key,
            Key::Field(FieldPath::parse(".metadata.tenant").expect("a path"))
        );
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let refused = |spec: &str| KafkaSinkSettings::from_url(spec).expect_err(spec);
        assert!(refused("kafka://a:9092").contains("names no topic"));
        assert!(refused("kafka://a:9092/a b").contains("not a Kafka topic name"));
        assert!(refused("kafka://a:9092/t?key=data.").contains("key is source, id, none"));
        assert!(
            refused("kafka://a:9092/t?key=customer").contains("'customer' is not a field path")
        );
        assert!(refused("kafka://a:9092/t?encoding=avro").contains("encoding is one of"));
        assert!(refused("kafka://a:9092/t?partitions=0").contains("partitions"));
        assert!(refused("kafka://a:9092/t?group=g").contains("no setting `group`"));
        assert!(refused("kafka://,a:9092/t").contains("empty entry"));
        let mut table = serde_json::Map::new();
        table.insert("type".into(), "kafka".into());
        table.insert("topic".into(), "t".into());
        table.insert(
            "options".into(),
            serde_json::json!({"compression.type": "zip"}),
        );
        let refused = KafkaSinkSettings::from_settings(&table).expect_err("bad option");
        assert!(
            refused.starts_with("options: producer settings:") && refused.contains("compression"),
            "{refused}"
        );
    }
}

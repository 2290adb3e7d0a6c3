//! Against a real PostgreSQL: a database of each test's own (see `conveyor_testkit`).

use std::collections::BTreeMap;

use conveyor_core::ContentType;
use conveyor_sink::ErrorKind;
use conveyor_testkit::TestDatabase;

use super::*;

fn event(id: &str, data: &'static str) -> Event {
    Event {
        id: id.into(),
        source: "sensor-1".into(),
        timestamp_ms: 1_764_000_000_123,
        payload: bytes::Bytes::from_static(data.as_bytes()),
        content_type: ContentType::Json,
        metadata: BTreeMap::from([("region".to_owned(), "eu".to_owned())]).into(),
        attempt: 1,
        headers: BTreeMap::new(),
    }
}

fn sink(url: &str) -> Arc<PostgresSink> {
    PostgresSink::new(PostgresSettings::from_url(url).expect("settings"))
}

#[tokio::test]
async fn a_batch_is_one_row_per_event_and_a_redelivery_adds_none() {
    let db = TestDatabase::create();
    let sink = sink(&format!("{}?table=events&connections=2", db.url()));
    let first: Vec<Event> = (0..500)
        .map(|i| event(&format!("e-{i}"), r#"{"celsius": 21.5, "tags": ["a"]}"#))
        .collect();
    sink.write(&first, 1_764_000_001_000)
        .await
        .expect("first write");
    // A redelivery of half of them, with new events, and an id twice in one batch.
    let mut second: Vec<Event> = (250..750)
        .map(|i| event(&format!("e-{i}"), r#"{"celsius": 21.5, "tags": ["a"]}"#))
        .collect();
    second.push(event("e-700", "{}"));
    sink.write(&second, 1_764_000_002_000)
        .await
        .expect("second write");
    assert_eq!(
        db.query("SELECT count(*), count(DISTINCT id) FROM events"),
        "750|750"
    );
    assert_eq!(
        db.query(
            "SELECT source, data->>'celsius', data->'tags'->>0, metadata->>'region', \
             (extract(epoch FROM \"timestamp\") * 1000)::bigint, \
             (extract(epoch FROM processed_at) * 1000)::bigint FROM events WHERE id = 'e-1'"
        ),
        "sensor-1|21.5|a|eu|1764000000123|1764000001000",
        "the columns hold the event"
    );
    assert!(sink.idempotent());
    assert_eq!(
        sink.describe(),
        format!(
            "postgres://127.0.0.1:5432/{}?table=events",
            db.url().rsplit('/').next().unwrap_or_default()
        )
    );
}

#[tokio::test]
async fn text_and_bytes_payloads_are_stored_as_json_values() {
    let db = TestDatabase::create();
    let sink = sink(&format!("{}?table=app.raw", db.url()));
    db.query("CREATE SCHEMA app");
    let mut text = event("t", "temp:23");
    text.content_type = ContentType::Text;
    let mut bytes = event("b", "");
    bytes.payload = bytes::Bytes::from_static(&[0xff, 0x00]);
    bytes.content_type = ContentType::Binary;
    sink.write(&[text, bytes], 1).await.expect("write");
    assert_eq!(
        db.query("SELECT id, data::text FROM app.raw ORDER BY id"),
        "b|{\"data_base64\": \"/wA=\"}\nt|\"temp:23\""
    );
}

#[tokio::test]
async fn rows_the_server_refuses_go_back_alone_with_its_message() {
    let db = TestDatabase::create();
    let sink = sink(&format!("{}?table=events", db.url()));
    // jsonb has no NUL character: the server refuses that row, and only that row.
    let mut batch: Vec<Event> = (0..10).map(|i| event(&format!("r-{i}"), "{}")).collect();
    batch[3] = event("r-3", r#"{"bad": "\u0000"}"#);
    let error = sink.write(&batch, 1).await.expect_err("a refused row");
    let ErrorKind::Rejected(rejected) = &error.kind else {
        panic!("rejected, not {error:?}");
    };
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, 3);
    assert!(
        rejected[0].1.contains("SQLSTATE 22P05"),
        "the server's words: {}",
        rejected[0].1
    );
    assert_eq!(db.query("SELECT count(*) FROM events"), "9");
}

#[tokio::test]
async fn a_server_out_of_reach_is_retryable_and_writes_resume_when_it_is_back() {
    let db = TestDatabase::create();
    let (gate, through) = db.behind_gate().await;
    let sink = sink(&format!("{through}?table=events"));
    sink.write(&[event("g-0", "{}")], 1)
        .await
        .expect("open gate");

    gate.close().await;
    let error = sink
        .write(&[event("g-1", "{}")], 1)
        .await
        .expect_err("no server");
    assert!(error.is_retryable(), "{error:?}");
    gate.open().await;
    sink.write(&[event("g-1", "{}")], 1).await.expect("back");
    assert_eq!(db.query("SELECT count(*) FROM events"), "2");
}

#[tokio::test]
async fn a_missing_table_is_created_again_or_with_create_table_false_refused() {
    let db = TestDatabase::create();
    let sink = sink(&format!("{}?table=events", db.url()));
    sink.write(&[event("m-0", "{}")], 1).await.expect("created");
    db.query("DROP TABLE events");
    let error = sink
        .write(&[event("m-1", "{}")], 1)
        .await
        .expect_err("gone");
    assert!(error.is_retryable(), "{error:?}");
    sink.write(&[event("m-1", "{}")], 1)
        .await
        .expect("created again");
    assert_eq!(db.query("SELECT id FROM events"), "m-1");

    let strict = self::sink(&format!("{}?table=missing&create_table=false", db.url()));
    let error = strict
        .write(&[event("m-2", "{}")], 1)
        .await
        .expect_err("no table");
    assert_eq!(error.kind, ErrorKind::Permanent, "{error:?}");
    assert!(error.message.contains("42P01"), "{error}");
}

#[test]
fn settings_are_checked_and_name_the_problem() {
    let bad = |spec: &str| PostgresSettings::from_url(spec).expect_err(spec);
    assert!(bad("postgres://h/db?table=x;drop").contains("not a table name"));
    assert!(bad("postgres://h/db?sslmode=require").contains("TLS"));
    assert!(bad("postgres://h/db?connections=0").contains("connections"));
    assert!(bad("postgres://h/db?create_table=maybe").contains("create_table"));
    assert!(bad("mysql://h/db").contains("not a postgres:// URL"));
    let settings = PostgresSettings::from_url(
        "postgres://app:secret@db.internal:6543/shop?table=public.orders&application_name=conveyor",
    )
    .expect("settings");
    let described = settings.describe();
    assert_eq!(
        described,
        "postgres://db.internal:6543/shop?table=public.orders"
    );
    assert_eq!(settings.connection.get_application_name(), Some("conveyor"));
    let unknown = PostgresSettings::from_settings(
        serde_json::json!({"type": "postgres", "url": "postgres://h/db", "tabel": "x"})
            .as_object()
            .expect("object"),
    )
    .expect_err("a typo");
    assert!(unknown.contains("`tabel`"), "{unknown}");
}

fn with_columns(url: &str, columns: serde_json::Value) -> Result<PostgresSettings, String> {
    PostgresSettings::from_settings(
        serde_json::json!({"type": "postgres", "url": url, "table": "orders", "columns": columns})
            .as_object()
            .expect("object"),
    )
}

#[tokio::test]
async fn user_columns_hold_the_fields_their_paths_name_and_a_value_of_the_wrong_type_goes_alone() {
    let db = TestDatabase::create();
    let settings = with_columns(
        db.url(),
        serde_json::json!({
            "customer": ".data.customer.id",
            "total": {"path": ".data.total", "type": "numeric"},
            "region": ".metadata.region",
            "tags": {"path": ".data.tags", "type": "jsonb"},
            "paid": {"path": "data.paid", "type": "boolean"},
        }),
    )
    .expect("settings");
    let sink = PostgresSink::new(settings);
    let events = vec![
        event(
            "o-1",
            r#"{"customer": {"id": 42}, "total": 9.5, "tags": ["a"], "paid": true}"#,
        ),
        // A total the column's type cannot hold: this event alone is refused.
        event("o-2", r#"{"customer": {"id": "c-7"}, "total": "lots"}"#),
        // No customer, no tags: NULLs.
        event("o-3", r#"{"total": 1, "paid": false}"#),
    ];
    let error = sink.write(&events, 1).await.expect_err("o-2's total");
    let ErrorKind::Rejected(rejected) = &error.kind else {
        panic!("rejected, not {error:?}");
    };
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].0, 1);
    assert!(
        rejected[0].1.contains("numeric") && rejected[0].1.contains("lots"),
        "the server's words: {}",
        rejected[0].1
    );
    assert_eq!(
        db.query(
            "SELECT id, customer, total, region, tags->>0, paid, data->>'total' FROM orders ORDER BY id"
        ),
        "o-1|42|9.5|eu|a|t|9.5\no-3||1|eu||f|1",
        "the user columns beside the default ones"
    );
}

#[test]
fn user_columns_are_checked_and_name_the_problem() {
    let bad = |columns: serde_json::Value| {
        with_columns("postgres://h/db", columns).expect_err("a bad column")
    };
    assert!(
        bad(serde_json::json!({"id": ".data.id"}))
            .contains("columns.id: id is one of the sink's own columns")
    );
    assert!(bad(serde_json::json!({"a-b": ".data.x"})).contains("columns.a-b: a column name"));
    assert!(
        bad(serde_json::json!({"c": ".body.x"}))
            .contains("columns.c: '.body.x' is not a field path")
    );
    assert!(
        bad(serde_json::json!({"c": {"path": ".data.x", "type": "money; drop"}}))
            .contains("type is one of text, integer")
    );
    assert!(
        bad(serde_json::json!({"c": {"path": ".data.x", "kind": "text"}}))
            .contains("no setting `kind`")
    );
    assert!(bad(serde_json::json!({"c": {"type": "text"}})).contains("needs `path`"));
    assert!(bad(serde_json::json!({"c": 5})).contains("a column is a field path"));
    assert!(bad(serde_json::json!("x")).contains("columns is a table"));
}

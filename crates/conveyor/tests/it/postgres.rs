//! The PostgreSQL sink end to end (issue #13): the real binary writing to a real PostgreSQL,
//! a database of each test's own (`conveyor_testkit::TestDatabase`), checked with SQL.

use std::collections::HashMap;
use std::time::Duration;

use conveyor_testkit::{NatsServer, TestDatabase};

use crate::delivery::{SingleSenders, send_batches};
use crate::harness::{Conveyor, NatsSplit, Spawn, eventually, read_sink_file};
use crate::ledger::{Ledger, Verdict};

/// How often each id is in `table`.
fn table_counts(db: &TestDatabase, table: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for id in db.query(&format!("SELECT id FROM {table}")).lines() {
        *counts.entry(id.to_owned()).or_default() += 1;
    }
    counts
}

/// Waits until every id `ledger` promised is in the table, then checks for lost, duplicated
/// and unexpected rows.
async fn settled(db: &TestDatabase, table: &str, ledger: &Ledger, timeout: Duration) -> Verdict {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let verdict = ledger.check_counts(&table_counts(db, table));
        if verdict.lost.is_empty() || std::time::Instant::now() >= deadline {
            eprintln!("table {table}: {verdict}");
            return verdict;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conveyor_run_writes_every_event_to_postgres_once_with_its_columns() {
    let db = TestDatabase::create();
    let sink = format!("{}?table=events", db.url());
    let conveyor = Spawn::new("run").sink_spec(&sink).start().await;
    let accepted = send_batches(&conveyor, "pg", 10_000, 500, 2).await;
    assert_eq!(accepted.len(), 10_000);
    let verdict = settled(&db, "events", &accepted, Duration::from_secs(60)).await;
    assert!(verdict.is_clean(), "{verdict}");
    assert_eq!(
        db.query("SELECT count(*), count(DISTINCT id) FROM events"),
        "10000|10000"
    );
    // The columns hold the event as sent (the body of `delivery::event_body`).
    let row = db.query(
        "SELECT source, data->>'i', data->>'tag', metadata::text, processed_at >= \"timestamp\" \
         FROM events WHERE id = 'pg-42'",
    );
    assert_eq!(row, "crash-test|42|pg|{}|t", "{row}");

    let (_, status) = conveyor.get_json("/api/v1/status").await;
    let sinks = &status["processor"]["stats"]["sinks"];
    assert_eq!(sinks[0]["name"], "default", "{status}");
    assert_eq!(sinks[0]["healthy"], true, "{status}");
    assert_eq!(sinks[0]["written"], 10_000, "{status}");
    let target = sinks[0]["target"].as_str().unwrap_or_default();
    assert!(
        target.starts_with("postgres://127.0.0.1:") && target.ends_with("?table=events"),
        "{target}"
    );
    let (code, ready) = conveyor.get_json("/ready").await;
    assert_eq!(code, 200);
    assert_eq!(ready["sinks"]["default"]["healthy"], true, "{ready}");
}

/// A config file's sink with columns of its own, behind a pipeline that shapes the events:
/// each row's columns hold what the pipeline produced, cast to their types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn columns_of_ones_own_hold_what_the_pipeline_produced() {
    let db = TestDatabase::create();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        r#"
[sinks.db]
type = "postgres"
url = "{}"
table = "shaped"

[sinks.db.columns]
n = {{ path = ".data.i", type = "integer" }}
doubled = {{ path = ".data.doubled", type = "bigint" }}
tag = ".metadata.tag"
odd = {{ path = ".data.odd", type = "boolean" }}

[[pipelines]]
name = "shape"
stages = [
  {{ transform = '.data.doubled = .data.i * 2 | .data.odd = (.data.i % 2 == 1) | .metadata.tag = .data.tag' }},
]
route = [ {{ to = ["db"] }} ]
"#,
        db.url()
    );
    let conveyor = Spawn::new("run")
        .config_file(dir.path(), &config)
        .start()
        .await;
    let accepted = send_batches(&conveyor, "col", 2_000, 250, 2).await;
    let verdict = settled(&db, "shaped", &accepted, Duration::from_secs(60)).await;
    assert!(verdict.is_clean(), "{verdict}");
    assert_eq!(
        db.query("SELECT n, doubled, tag, odd, data->>'doubled' FROM shaped WHERE id = 'col-21'"),
        "21|42|col|t|42"
    );
    assert_eq!(
        db.query("SELECT count(*) FROM shaped WHERE doubled = 2 * n AND odd = (n % 2 = 1)"),
        "2000",
        "every row's columns are its pipeline output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_with_the_processor_sigkilled_mid_stream_leaves_every_id_once_in_the_table() {
    let server = NatsServer::start();
    let db = TestDatabase::create();
    let mut split = NatsSplit::start(&server.url(), &format!("{}?table=events", db.url())).await;

    // Clients that keep sending until the last kill is done (each retrying its event after a
    // 503, as README tells clients): every kill lands in the middle of the stream, however
    // fast this machine sends.
    let senders = SingleSenders::start(&split.gateway, "pgkill", 2);
    for _ in 0..3 {
        // Some work in hand (rows committed, acks not yet sent), then a kill in the middle.
        tokio::time::sleep(Duration::from_millis(500)).await;
        split.kill_processor().await;
        split.start_processor().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = senders.finish_accepted().await;
    let verdict = settled(&db, "events", &accepted, Duration::from_secs(120)).await;
    assert!(verdict.is_clean(), "{verdict}");
    let counts = db.query("SELECT count(*), count(DISTINCT id) FROM events");
    let (rows, distinct) = counts.split_once('|').expect("two counts");
    assert_eq!(rows, distinct, "one row per id");
}

/// One pipeline routed to PostgreSQL and a file; PostgreSQL out of reach (its port closed by
/// the test) while events keep coming: they wait in the queue, none goes to the DLQ, the sink
/// shows unhealthy in the status, `/ready` and the metrics, and when it is back both sinks
/// hold every event, the file without duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_out_of_reach_events_wait_and_then_reach_both_sinks_once() {
    let db = TestDatabase::create();
    let (gate, through) = db.behind_gate().await;

    let dir = tempfile::tempdir().expect("tempdir");
    let archive = dir.path().join("archive.ndjson");
    let config = format!(
        r#"
[defaults]
route = ["db", "archive"]

[sinks.db]
type = "postgres"
url = "{through}"
table = "events"
timeout_ms = 2000

[sinks.archive]
type = "file"
path = "{}"
"#,
        archive.display()
    );
    let conveyor = Spawn::new("run")
        .config_file(dir.path(), &config)
        .args(["--max-attempts", "2", "--retry-backoff-ms", "20"])
        .start()
        .await;

    let before = send_batches(&conveyor, "up", 1_000, 100, 2).await;
    assert!(
        settled(&db, "events", &before, Duration::from_secs(30))
            .await
            .is_clean()
    );
    gate.close().await;
    let during = send_batches(&conveyor, "down", 3_000, 100, 2).await;
    assert_eq!(during.len(), 3_000, "intake goes on while a sink is down");
    let (status, metrics) = eventually(
        "the sink to show unhealthy",
        Duration::from_secs(20),
        async || {
            let (_, status) = conveyor.get_json("/api/v1/status").await;
            let (_, metrics) = conveyor.get_raw("/metrics").await;
            let db_sink = status["processor"]["stats"]["sinks"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["name"] == "db"))
                .cloned()
                .unwrap_or_default();
            if db_sink["healthy"] == false {
                Ok((status, metrics))
            } else {
                Err(db_sink.to_string())
            }
        },
    )
    .await;
    assert_eq!(status["status"], "degraded", "{status}");
    assert!(
        metrics.contains("conveyor_sink_healthy{sink=\"db\"} 0")
            && metrics.contains("conveyor_sink_healthy{sink=\"archive\"} 1"),
        "{metrics}"
    );
    let (code, ready) = conveyor.get_json("/ready").await;
    assert_eq!(
        code, 200,
        "a sink down does not take the process out: {ready}"
    );
    assert_eq!(ready["sinks"]["db"]["healthy"], false, "{ready}");
    // Longer than max-attempts x backoff many times over: still nothing in the DLQ.
    tokio::time::sleep(Duration::from_secs(3)).await;
    gate.open().await;

    before.absorb(&during);
    let verdict = settled(&db, "events", &before, Duration::from_secs(60)).await;
    assert!(verdict.is_clean(), "{verdict}");
    let file = before.check(&[&archive]);
    assert!(file.is_clean(), "the file sink: {file}");
    assert_eq!(read_sink_file(&archive).len(), 4_000);
    let (_, status) = conveyor.get_json("/api/v1/status").await;
    assert_eq!(status["totals"]["dead_lettered"], 0, "{status}");
    assert_eq!(status["processor"]["stats"]["dlq_size"], 0, "{status}");
    let db_sink = &status["processor"]["stats"]["sinks"][0];
    assert_eq!(
        (db_sink["name"].as_str(), db_sink["healthy"].as_bool()),
        (Some("db"), Some(true)),
        "{status}"
    );
    assert!(db_sink["retried"].as_u64() > Some(0), "{status}");
}

/// A refused row (jsonb has no NUL) goes to the DLQ at once with the server's words; the rest
/// of its batch is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_postgres_refuses_goes_to_the_dlq_at_once_with_the_servers_message() {
    let db = TestDatabase::create();
    let conveyor: Conveyor = Spawn::new("run")
        .sink_spec(&format!("{}?table=events", db.url()))
        .start()
        .await;
    let batch = "{\"id\":\"fine-1\",\"source\":\"s\",\"data\":{}}\n\
                 {\"id\":\"nul-1\",\"source\":\"s\",\"data\":{\"x\":\"\\u0000\"}}\n\
                 {\"id\":\"fine-2\",\"source\":\"s\",\"data\":{}}\n";
    let answer = conveyor
        .http()
        .post(conveyor.url("/api/v1/ingest/batch"))
        .header("content-type", "application/x-ndjson")
        .body(batch)
        .send()
        .await
        .expect("post");
    assert_eq!(answer.status(), 202);
    let letters = eventually(
        "the refused row in the DLQ",
        Duration::from_secs(20),
        async || {
            let (size, letters) = conveyor.dlq().await;
            if size == 1 {
                Ok(letters)
            } else {
                Err(format!("{size} letters"))
            }
        },
    )
    .await;
    let letter = &letters[0];
    assert_eq!(letter["id"], "nul-1", "{letter}");
    assert_eq!(letter["attempts"], 1, "at once: {letter}");
    let error = letter["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("sink postgres://") && error.contains("SQLSTATE 22P05"),
        "{error}"
    );
    assert_eq!(
        db.query("SELECT string_agg(id, ',' ORDER BY id) FROM events"),
        "fine-1,fine-2"
    );
}

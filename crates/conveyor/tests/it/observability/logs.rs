//! Log output: `LOG_FORMAT=json`.

use std::time::Duration;

use crate::harness::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_writes_one_json_object_per_log_line() {
    let conveyor = crate::harness::Spawn::new("run")
        .env("LOG_FORMAT", "json")
        .start()
        .await;
    let log = eventually(
        "a log line on stderr",
        Duration::from_secs(10),
        async || {
            let tail = conveyor.stderr_tail();
            if tail.trim().is_empty() {
                Err("no log yet".to_owned())
            } else {
                Ok(tail)
            }
        },
    )
    .await;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["fields"].is_object(),
            "{line}"
        );
    }
    assert!(log.contains("\"listening\""), "{log}");
}

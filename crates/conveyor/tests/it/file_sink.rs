//! The file sink's rotation end to end (issue #13): the real binary with a config-file sink
//! that rotates and gzips, every accepted event found once across the files it left.

use std::collections::HashMap;
use std::io::Read as _;
use std::time::Duration;

use crate::delivery::send_batches;
use crate::harness::{Spawn, eventually};

/// How often each id is in the active file and the rotated ones (gzipped or not) in `dir`.
fn counts_in(dir: &std::path::Path) -> (HashMap<String, usize>, Vec<String>) {
    let mut counts = HashMap::new();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if !name.starts_with("archive") || name.ends_with(".tmp") {
            continue;
        }
        let mut text = Vec::new();
        // A rotated file gzipped (and removed) since the directory was listed: its `.gz` is
        // read on the next look (the caller looks again while anything is missing).
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        if name.ends_with(".gz") {
            flate2::read::GzDecoder::new(file)
                .read_to_end(&mut text)
                .expect("gunzip");
        } else {
            std::io::BufReader::new(file)
                .read_to_end(&mut text)
                .expect("read");
        }
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let record: serde_json::Value = serde_json::from_slice(line).expect("a record");
            let id = record["id"].as_str().unwrap_or_default().to_owned();
            *counts.entry(id).or_default() += 1;
        }
        names.push(name);
    }
    (counts, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotating_gzipping_file_sink_holds_every_event_once_across_its_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let config = format!(
        r#"
[defaults]
route = ["archive"]

[sinks.archive]
type = "file"
path = "{}"
rotate_bytes = 100000
gzip = true
durable = true
"#,
        out.join("archive.ndjson").display()
    );
    let conveyor = Spawn::new("run")
        .config_file(dir.path(), &config)
        .start()
        .await;
    let accepted = send_batches(&conveyor, "rot", 5_000, 250, 2).await;
    assert_eq!(accepted.len(), 5_000);
    let names = eventually(
        "every event in the files, the rotated ones gzipped",
        Duration::from_secs(60),
        async || {
            let (counts, names) = counts_in(&out);
            let verdict = accepted.check_counts(&counts);
            let plain_rotated = names
                .iter()
                .filter(|n| n.as_str() != "archive.ndjson" && !n.ends_with(".gz"))
                .count();
            if verdict.lost.is_empty() && plain_rotated == 0 {
                assert!(verdict.is_clean(), "{verdict}");
                Ok(names)
            } else {
                Err(format!("{verdict}; files {names:?}"))
            }
        },
    )
    .await;
    // About 800 KB of records in files of at most 100 KB.
    assert!(names.len() >= 8, "{names:?}");
}

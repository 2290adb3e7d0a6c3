use std::io::Write as _;

use conveyor_core::ContentType;

use super::*;
use crate::record::tests::event;

fn events(from: usize, n: usize) -> Vec<Event> {
    (from..from + n)
        .map(|i| Event {
            id: format!("e{i}").into(),
            ..event(b"1", ContentType::Json)
        })
        .collect()
}

fn table(value: serde_json::Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

/// Every record's id in `path`'s directory, oldest file first (gzipped ones read too), and
/// the files' names.
fn all_ids(settings: &FileSettings) -> (Vec<String>, Vec<String>) {
    let mut ids = Vec::new();
    let mut names = Vec::new();
    let mut files = settings.rotated_files();
    files.push(settings.path.clone());
    for file in files {
        let mut text = Vec::new();
        let mut opened = File::open(&file).expect("open");
        if file.extension().is_some_and(|e| e == "gz") {
            flate2::read::GzDecoder::new(opened)
                .read_to_end(&mut text)
                .expect("gunzip");
        } else {
            opened.read_to_end(&mut text).expect("read");
        }
        let lines: Vec<&[u8]> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        ids.extend(ids_of_lines(&lines));
        names.push(
            file.file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned(),
        );
    }
    (ids, names)
}

fn expected_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("e{i}")).collect()
}

#[tokio::test]
async fn file_sink_appends_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nested/out.ndjson");
    let sink = FileSink::open(&path).expect("file sink");
    let e = event(b"1", ContentType::Json);
    sink.write(&[e.clone(), e], 1).await.expect("write");
    let text = std::fs::read_to_string(&path).expect("read");
    assert_eq!(text.lines().count(), 2);
}

#[tokio::test]
async fn a_torn_last_line_is_cut_and_recent_ids_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("out.ndjson");
    {
        let sink = FileSink::open(&path).expect("open");
        sink.write(&events(0, 5), 1).await.expect("write");
    }
    // A crash in the middle of the next write.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"{\"id\":\"torn"))
        .expect("append");
    let sink = FileSink::open(&path).expect("reopen");
    let text = std::fs::read_to_string(&path).expect("read");
    assert!(
        text.ends_with('\n') && !text.contains("torn"),
        "torn line cut: {text:?}"
    );
    assert_eq!(sink.recent_ids(3).await.expect("ids"), ["e2", "e3", "e4"]);
    assert_eq!(sink.recent_ids(100).await.expect("ids").len(), 5);
}

#[tokio::test]
async fn rotation_by_size_keeps_every_file_under_the_bound_and_every_record_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = FileSettings::from_settings(&table(serde_json::json!({
        "path": dir.path().join("out.ndjson").to_str().expect("utf-8"),
        "rotate_bytes": 2000,
        "durable": true,
    })))
    .expect("settings");
    let sink = FileSink::with(settings.clone()).expect("open");
    for batch in 0..40 {
        sink.write(&events(batch * 5, 5), 1).await.expect("write");
    }
    let (ids, names) = all_ids(&settings);
    assert_eq!(ids, expected_ids(200), "every record once, in order");
    assert!(names.len() > 5, "{names:?}");
    for name in &names[..names.len() - 1] {
        // `out-20261203T142512Z-0001.ndjson`
        assert!(
            name.starts_with("out-") && name.ends_with(".ndjson") && name.len() == 32,
            "{name}"
        );
    }
    for file in settings.rotated_files() {
        let size = std::fs::metadata(&file).expect("size").len();
        assert!(size <= 2000 && size > 1000, "{}: {size}", file.display());
    }
    // Right after a rotation the active file holds little: the window reads on into the
    // rotated files.
    let recent = sink.recent_ids(50).await.expect("ids");
    assert_eq!(recent, expected_ids(200)[150..]);
}

#[tokio::test]
async fn rotated_files_are_gzipped_and_still_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = FileSettings::from_settings(&table(serde_json::json!({
        "path": dir.path().join("out.ndjson").to_str().expect("utf-8"),
        "rotate_bytes": 3000,
        "gzip": true,
    })))
    .expect("settings");
    let sink = FileSink::with(settings.clone()).expect("open");
    for batch in 0..20 {
        sink.write(&events(batch * 10, 10), 1).await.expect("write");
    }
    // Gzipping runs off the write path: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while settings
        .rotated_files()
        .iter()
        .any(|f| f.extension().is_none_or(|e| e != "gz"))
    {
        assert!(Instant::now() < deadline, "rotated files still plain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ids, names) = all_ids(&settings);
    assert_eq!(ids, expected_ids(200), "{names:?}");
    assert!(names[0].ends_with(".ndjson.gz"), "{names:?}");
    assert_eq!(
        sink.recent_ids(120).await.expect("ids"),
        expected_ids(200)[80..]
    );
}

#[tokio::test]
async fn a_file_open_longer_than_rotate_secs_is_rotated_at_the_next_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = FileSettings::from_settings(&table(serde_json::json!({
        "path": dir.path().join("hourly.ndjson").to_str().expect("utf-8"),
        "rotate_secs": 1,
    })))
    .expect("settings");
    let sink = FileSink::with(settings.clone()).expect("open");
    sink.write(&events(0, 3), 1).await.expect("write");
    sink.write(&events(3, 3), 1).await.expect("write");
    assert!(settings.rotated_files().is_empty());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sink.write(&events(6, 3), 1).await.expect("write");
    let (ids, names) = all_ids(&settings);
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(ids, expected_ids(9));
    assert_eq!(
        std::fs::read_to_string(&settings.path)
            .expect("active")
            .lines()
            .count(),
        3
    );
}

#[tokio::test]
async fn a_rotated_file_a_crash_left_plain_is_gzipped_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = FileSettings::from_settings(&table(serde_json::json!({
        "path": dir.path().join("out.ndjson").to_str().expect("utf-8"),
        "rotate_bytes": 100000,
        "gzip": true,
    })))
    .expect("settings");
    let left = dir.path().join("out-20261203T101010Z-0000.ndjson");
    std::fs::write(&left, crate::record::render(&events(0, 4), 1)).expect("write");
    // And the partial .gz of a compression the crash cut short.
    std::fs::write(
        dir.path().join("out-20261203T101010Z-0000.ndjson.gz.tmp"),
        b"x",
    )
    .expect("write");
    let _sink = FileSink::with(settings.clone()).expect("open");
    let deadline = Instant::now() + Duration::from_secs(10);
    while left.exists() {
        assert!(Instant::now() < deadline, "still plain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ids, _) = all_ids(&settings);
    assert_eq!(ids, expected_ids(4));
}

#[test]
fn bad_settings_are_refused_by_name() {
    let refused =
        |value: serde_json::Value| FileSettings::from_settings(&table(value)).expect_err("refused");
    assert_eq!(
        refused(serde_json::json!({"path": "x", "gzip": true})),
        "gzip applies to rotated files: set rotate_bytes or rotate_secs"
    );
    assert!(refused(serde_json::json!({"path": "x", "rotate": 5})).contains("no setting `rotate`"));
    assert!(
        refused(serde_json::json!({"path": "x", "rotate_bytes": "big"}))
            .contains("rotate_bytes is a whole number")
    );
    assert!(refused(serde_json::json!({"durable": true})).contains("needs `path`"));
}

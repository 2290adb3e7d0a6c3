//! Observability as an operator meets it: every service's `/metrics` holds the documented
//! families, they move when events flow, and Prometheus' own `promtool` accepts the output.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::harness::{Conveyor, conveyor_command, eventually, spawn_run, spawn_split};

/// One scrape: family name → its `# TYPE`, and every sample `name{labels}` → value.
#[derive(Debug, Default)]
pub struct Scrape {
    pub text: String,
    pub types: BTreeMap<String, String>,
    pub samples: BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: String) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    scrape.types.insert(name.to_owned(), kind.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
                let value: f64 = value
                    .parse()
                    .unwrap_or_else(|e| panic!("sample value in {line:?}: {e}"));
                scrape.samples.insert(series.to_owned(), value);
            }
        }
        scrape.text = text;
        scrape
    }

    /// Sum of every sample of `name` (exactly that name, any labels).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, v)| v)
            .sum()
    }

    /// The value of one series, e.g. `conveyor_events_rejected_total{reason="invalid"}`.
    pub fn get(&self, series: &str) -> f64 {
        *self.samples.get(series).unwrap_or_else(|| {
            panic!(
                "no series {series} in /metrics:\n{}",
                self.text.chars().take(6000).collect::<String>()
            )
        })
    }

    pub fn assert_families(&self, service: &str, names: &[&str]) {
        let missing: Vec<&&str> = names
            .iter()
            .filter(|n| !self.types.contains_key(**n))
            .collect();
        assert!(
            missing.is_empty(),
            "{service} /metrics lacks {missing:?}; it has {:?}",
            self.types.keys().collect::<Vec<_>>()
        );
    }
}

pub async fn scrape(service: &Conveyor) -> Scrape {
    let (code, text) = service.get_raw("/metrics").await;
    assert_eq!(code, 200, "GET /metrics: {text}");
    Scrape::parse(text)
}

/// `promtool`, or a failure saying how to install it.
pub fn promtool() -> PathBuf {
    for candidate in ["/usr/bin/promtool", "/usr/local/bin/promtool"] {
        let path = PathBuf::from(candidate);
        if path.is_file() {
            return path;
        }
    }
    if let Ok(found) = std::process::Command::new("sh")
        .args(["-c", "command -v promtool"])
        .output()
        && found.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
    }
    panic!(
        "promtool not found: install Prometheus' tools (Debian: `apt-get install prometheus`; \
         `make test` does this) and run the tests again"
    );
}

/// Runs `promtool check metrics` on `text`; panics with its complaints.
pub fn promtool_check_metrics(service: &str, text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(text.as_bytes())
        .expect("write metrics to promtool");
    let output = child.wait_with_output().expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check metrics rejected {service}'s /metrics ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Families on every service's `/metrics`.
const COMMON: &[&str] = &[
    "http_requests_total",
    "http_request_duration_seconds",
    "http_requests_in_flight",
    "system_health_status",
    "conveyor_build_info",
    "conveyor_ready",
    "conveyor_events_received_total",
    "conveyor_error_answers_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_threads",
    "process_start_time_seconds",
    "process_open_fds",
];

/// Families of a process that validates and publishes (ingest, run).
const INGEST: &[&str] = &[
    "conveyor_events_accepted_total",
    "conveyor_events_rejected_total",
    "conveyor_publish_duration_seconds",
    "conveyor_publish_batch_events",
    "conveyor_event_payload_bytes",
];

/// Families of the queue and pool, from stats (processor, run, and the gateway's system view).
const POOL: &[&str] = &[
    "queue_size",
    "worker_pool_active",
    "messages_processed_total",
    "conveyor_queue_info",
    "conveyor_queue_capacity",
    "conveyor_queue_in_flight",
    "conveyor_queue_consumer_lag",
    "conveyor_queue_published_total",
    "conveyor_queue_acked_total",
    "conveyor_queue_nacked_total",
    "conveyor_queue_terminated_total",
    "conveyor_queue_redelivered_total",
    "conveyor_queue_duplicates_total",
    "conveyor_worker_pool_size",
    "conveyor_processing_errors_total",
    "conveyor_retries_total",
    "conveyor_dead_lettered_total",
    "conveyor_duplicates_skipped_total",
    "conveyor_dlq_size",
];

/// Families recorded by a process that runs the worker pool (processor, run).
const PROCESSOR_RECORDED: &[&str] = &[
    "conveyor_fetch_batch_events",
    "conveyor_stage_duration_seconds",
    "conveyor_sink_write_duration_seconds",
    "conveyor_sink_batch_events",
    "conveyor_end_to_end_latency_seconds",
    "conveyor_sink_errors_total",
    "conveyor_worker_busy_seconds_total",
];

/// Stages used by these tests: a JSON check, and a rule that makes poison events fail.
const STAGES: &[&str] = &[
    "--stage",
    "json",
    "--stage",
    "fail-if:poison=yes",
    "--max-attempts",
    "2",
    "--retry-backoff-ms",
    "10",
];

/// Sends 50 single events, a 100-line NDJSON batch, one poison event (dead-lettered after two
/// attempts) and one malformed body; returns how many events were accepted.
pub async fn send_traffic(front: &Conveyor, prefix: &str) -> u64 {
    let http = front.http();
    for i in 0..50 {
        let body = json!({"source": "obs", "data": {"i": i}, "id": format!("{prefix}-one-{i}")});
        let resp = http
            .post(front.url("/api/v1/ingest"))
            .json(&body)
            .send()
            .await
            .expect("POST /api/v1/ingest");
        assert_eq!(resp.status().as_u16(), 202, "single event {i}");
    }
    let ndjson: String = (0..100)
        .map(|i| {
            format!("{{\"source\":\"obs\",\"data\":{{\"b\":{i}}},\"id\":\"{prefix}-batch-{i}\"}}\n")
        })
        .collect();
    let resp = http
        .post(front.url("/api/v1/ingest/batch"))
        .header("content-type", "application/x-ndjson")
        .body(ndjson)
        .send()
        .await
        .expect("POST /api/v1/ingest/batch");
    assert_eq!(resp.status().as_u16(), 202, "batch");
    let poison = json!({"source": "obs", "data": 1, "id": format!("{prefix}-poison"), "metadata": {"poison": "yes"}});
    let resp = http
        .post(front.url("/api/v1/ingest"))
        .json(&poison)
        .send()
        .await
        .expect("POST poison");
    assert_eq!(resp.status().as_u16(), 202, "poison event is accepted");
    let resp = http
        .post(front.url("/api/v1/ingest"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("POST bad body");
    assert_eq!(resp.status().as_u16(), 400, "malformed body");
    151
}

/// Waits until the front's status shows `n` events done (processed or dead-lettered) and the
/// DLQ holds the poison event.
async fn wait_done(front: &Conveyor, n: u64) {
    front.wait_until_processed(n, Duration::from_secs(30)).await;
    eventually(
        "the poison event in the DLQ",
        Duration::from_secs(20),
        async || {
            let status = front.status().await;
            if status["totals"]["dead_lettered"] == 1 {
                Ok(())
            } else {
                Err(format!("{}", status["totals"]))
            }
        },
    )
    .await;
}

fn assert_at_least_20(service: &str, scrape: &Scrape) {
    assert!(
        scrape.types.len() >= 20,
        "{service} exposes {} metric families, want at least 20: {:?}",
        scrape.types.len(),
        scrape.types.keys().collect::<Vec<_>>()
    );
}

/// The figures that must have moved in a process that did everything (run) or the processor.
fn assert_processor_moved(service: &str, before: &Scrape, after: &Scrape) {
    let moved = |name: &str| after.sum(name) - before.sum(name);
    assert_eq!(
        moved("messages_processed_total"),
        150.0,
        "{service}: messages_processed_total"
    );
    assert_eq!(
        after.get("conveyor_dlq_size"),
        1.0,
        "{service}: conveyor_dlq_size"
    );
    assert_eq!(moved("conveyor_dead_lettered_total"), 1.0, "{service}");
    assert!(moved("conveyor_retries_total") >= 1.0, "{service}: retries");
    assert!(
        moved("conveyor_processing_errors_total") >= 2.0,
        "{service}: two failed attempts of the poison event"
    );
    assert!(
        moved("conveyor_queue_acked_total") >= 150.0,
        "{service}: acked"
    );
    assert!(
        moved("conveyor_queue_redelivered_total") >= 1.0,
        "{service}: the poison event was delivered twice"
    );
    assert_eq!(after.get("conveyor_worker_pool_size"), 2.0, "{service}");
    // Histograms recorded on the hot path.
    for count in [
        "conveyor_fetch_batch_events_count",
        "conveyor_sink_write_duration_seconds_count",
        "conveyor_sink_batch_events_count",
    ] {
        assert!(moved(count) >= 1.0, "{service}: {count} did not move");
    }
    assert_eq!(
        moved("conveyor_end_to_end_latency_seconds_count"),
        150.0,
        "{service}: one end-to-end latency per written event"
    );
    assert!(
        after.get("conveyor_end_to_end_latency_seconds_bucket{le=\"+Inf\"}") >= 150.0,
        "{service}"
    );
    // Every delivery (151 events, the poison one twice) went through the json stage.
    assert!(
        after.get("conveyor_stage_duration_seconds_count{stage=\"json\"}")
            - before.get("conveyor_stage_duration_seconds_count{stage=\"json\"}")
            >= 152.0,
        "{service}: json stage timings"
    );
    assert!(
        moved("conveyor_worker_busy_seconds_total") > 0.0,
        "{service}: worker busy time"
    );
}

fn assert_ingest_moved(service: &str, before: &Scrape, after: &Scrape) {
    let moved = |name: &str| after.sum(name) - before.sum(name);
    assert_eq!(
        moved("conveyor_events_accepted_total"),
        151.0,
        "{service}: accepted"
    );
    assert!(
        moved("conveyor_publish_duration_seconds_count") >= 1.0,
        "{service}: publish latency recorded"
    );
    assert!(
        moved("conveyor_publish_batch_events_sum") >= 151.0,
        "{service}: every accepted event was in a published batch"
    );
    assert_eq!(
        moved("conveyor_event_payload_bytes_count"),
        151.0,
        "{service}: one payload size per valid event"
    );
}

fn assert_front_moved(service: &str, before: &Scrape, after: &Scrape) {
    let moved = |series: &str| after.get(series) - before.get(series);
    assert_eq!(
        moved("conveyor_events_received_total{door=\"http_single\"}"),
        52.0,
        "{service}: 50 events, the poison one and the malformed body came in one by one"
    );
    assert_eq!(
        moved("conveyor_events_received_total{door=\"http_batch\"}"),
        100.0,
        "{service}"
    );
    assert_eq!(
        moved("conveyor_error_answers_total{code=\"invalid_json\"}"),
        1.0,
        "{service}: the malformed body"
    );
    assert!(
        after.sum("http_requests_total") - before.sum("http_requests_total") >= 52.0,
        "{service}: http_requests_total"
    );
    assert!(
        after.get("http_requests_total{route=\"/api/v1/ingest\",method=\"POST\",status=\"400\"}")
            >= 1.0,
        "{service}: the 400 is counted under its route pattern"
    );
    assert!(
        after.sum("http_request_duration_seconds_count")
            > before.sum("http_request_duration_seconds_count"),
        "{service}"
    );
    assert_eq!(after.get("system_health_status"), 1.0, "{service}");
    assert_eq!(after.get("conveyor_ready"), 1.0, "{service}");
    assert!(
        after.get("process_resident_memory_bytes") > 1e6,
        "{service}: RSS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_mode_metrics_cover_every_family_move_with_traffic_and_pass_promtool() {
    let mut args = STAGES.to_vec();
    args.extend(["--workers", "2"]);
    let conveyor = spawn_run(&args).await;
    let before = scrape(&conveyor).await;
    let all: Vec<&str> = [COMMON, INGEST, POOL, PROCESSOR_RECORDED].concat();
    before.assert_families("run", &all);

    let accepted = send_traffic(&conveyor, "run").await;
    wait_done(&conveyor, accepted).await;
    let after = scrape(&conveyor).await;

    assert_at_least_20("run", &after);
    assert_front_moved("run", &before, &after);
    assert_ingest_moved("run", &before, &after);
    assert_processor_moved("run", &before, &after);
    assert_eq!(
        after.get("conveyor_queue_info{backend=\"memory\",durable=\"false\"}"),
        1.0
    );
    assert_eq!(after.get("queue_size"), 0.0, "queue drained");
    assert_eq!(
        after.get("conveyor_queue_consumer_lag"),
        0.0,
        "nothing left"
    );
    promtool_check_metrics("run", &after.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_mode_every_service_exposes_its_metrics_and_passes_promtool() {
    let mut processor_args = STAGES.to_vec();
    processor_args.extend(["--workers", "2"]);
    let split = spawn_split(&processor_args).await;
    let services = [
        ("gateway", &split.gateway),
        ("ingest", &split.ingest),
        ("processor", &split.processor),
    ];
    let mut before = BTreeMap::new();
    for (name, service) in services {
        before.insert(name, scrape(service).await);
    }

    let accepted = send_traffic(&split.gateway, "split").await;
    wait_done(&split.gateway, accepted).await;

    let mut after = BTreeMap::new();
    for (name, service) in services {
        let scrape = scrape(service).await;
        assert_at_least_20(name, &scrape);
        scrape.assert_families(name, COMMON);
        promtool_check_metrics(name, &scrape.text);
        after.insert(name, scrape);
    }

    // The gateway: client doors, error answers, the system-wide view, each instance's health.
    let (gw_before, gw) = (&before["gateway"], &after["gateway"]);
    gw.assert_families("gateway", &[INGEST[..2].to_vec(), POOL.to_vec()].concat());
    assert_front_moved("gateway", gw_before, gw);
    assert_eq!(
        gw.sum("messages_processed_total") - gw_before.sum("messages_processed_total"),
        150.0,
        "gateway: the system-wide processed count"
    );
    for role in ["ingest", "processor"] {
        let url = match role {
            "ingest" => split.ingest.base_url(),
            _ => split.processor.base_url(),
        };
        let healthy: Vec<(&String, &f64)> = gw
            .samples
            .iter()
            .filter(|(s, _)| {
                s.starts_with("conveyor_instance_healthy{")
                    && s.contains(&format!("role=\"{role}\""))
                    && s.contains(url)
            })
            .collect();
        assert_eq!(
            healthy.iter().map(|(_, v)| **v).collect::<Vec<_>>(),
            vec![1.0],
            "gateway: conveyor_instance_healthy for the {role} at {url}"
        );
    }
    // The gateway does not run the pool: no empty sink histograms pretending otherwise.
    assert!(
        !gw.types
            .contains_key("conveyor_sink_write_duration_seconds"),
        "gateway shows processor-only histograms"
    );

    // Ingest: what arrived over gRPC from the gateway, what it published, and how long that took.
    let (in_before, ingest) = (&before["ingest"], &after["ingest"]);
    ingest.assert_families("ingest", INGEST);
    assert_ingest_moved("ingest", in_before, ingest);
    assert!(
        ingest.sum("conveyor_events_received_total")
            - in_before.sum("conveyor_events_received_total")
            >= 151.0,
        "ingest: events received from the gateway"
    );

    // Processor: the queue, the pool and the hot-path histograms.
    let (pr_before, processor) = (&before["processor"], &after["processor"]);
    processor.assert_families("processor", &[POOL, PROCESSOR_RECORDED].concat());
    assert_processor_moved("processor", pr_before, processor);
    assert!(
        processor.get("conveyor_events_received_total{door=\"enqueue\"}") >= 151.0,
        "processor: events handed over by ingest"
    );

    let names: BTreeSet<&String> = after.values().flat_map(|s| s.types.keys()).collect();
    assert!(names.len() >= 40, "{} families in all", names.len());
}

/// The repository's root.
fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where tests leave files for people to look at: `target/test-artifacts/`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

fn run_promtool(args: &[&str], dir: &std::path::Path) -> String {
    let output = std::process::Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "promtool {args:?} in {} failed ({}):\n{text}",
        dir.display(),
        output.status
    );
    text
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo_root().join("deploy/prometheus");
    for config in ["prometheus.yml", "prometheus-run.yml"] {
        run_promtool(&["check", "config", config], &dir);
    }
    let rules = run_promtool(&["check", "rules", "alerts.yml"], &dir);
    assert!(rules.contains("9 rules found"), "{rules}");
    let tests = run_promtool(&["test", "rules", "alerts.test.yml"], &dir);
    assert!(tests.contains("SUCCESS"), "{tests}");
}

/// Metric names a PromQL expression reads (functions, keywords, labels, durations left out).
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    // Drop strings, label matchers, ranges, and the label lists of by/without/on/ignoring.
    let mut plain = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' if depth_brace == 0 => in_string = !in_string,
            _ if in_string => {}
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            _ => plain.push(c),
        }
    }
    let tokens: Vec<(String, char)> = {
        let chars: Vec<char> = plain.chars().collect();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            if chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let next = chars[i..]
                    .iter()
                    .find(|c| !c.is_whitespace())
                    .copied()
                    .unwrap_or(' ');
                tokens.push((chars[start..i].iter().collect(), next));
            } else {
                i += 1;
            }
        }
        tokens
    };
    let mut names = BTreeSet::new();
    let mut skip_group = false;
    for (token, next) in tokens {
        let grouping = [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ];
        if grouping.contains(&token.as_str()) {
            skip_group = next == '(';
            continue;
        }
        if skip_group {
            // Inside `by (a, b)`: label names until the closing paren.
            if next == ')' {
                skip_group = false;
            }
            continue;
        }
        // Aggregations may be followed by `by (...)` rather than their parenthesis.
        let keyword = [
            "and",
            "or",
            "unless",
            "bool",
            "offset",
            "sum",
            "min",
            "max",
            "avg",
            "count",
            "group",
            "stddev",
            "stdvar",
            "topk",
            "bottomk",
            "quantile",
            "count_values",
        ]
        .contains(&token.as_str());
        let number = token.starts_with(|c: char| c.is_ascii_digit());
        if next == '(' || keyword || number {
            continue;
        }
        names.insert(token);
    }
    names
}

/// Every `expr` in the dashboards and alert rules, with where it is.
fn deploy_expressions() -> Vec<(String, String)> {
    let mut exprs = Vec::new();
    let dashboards = repo_root().join("deploy/grafana/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dashboards)
        .expect("deploy/grafana/dashboards")
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "four dashboards: {files:?}");
    fn walk(value: &serde_json::Value, file: &str, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    if key == "expr" {
                        out.push((
                            file.to_owned(),
                            v.as_str().expect("expr is text").to_owned(),
                        ));
                    } else {
                        walk(v, file, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, file, out)),
            _ => {}
        }
    }
    let mut uids = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read dashboard");
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
        assert!(
            uids.insert(json["uid"].as_str().expect("dashboard uid").to_owned()),
            "duplicate uid in {}",
            file.display()
        );
        let name = file
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let before = exprs.len();
        walk(&json, &name, &mut exprs);
        assert!(exprs.len() - before >= 6, "{name} has few queries");
    }
    // Alert rules: `expr:` on one line, or a `|` block of deeper-indented lines.
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");
    let lines: Vec<&str> = rules.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let expr = if rest.trim() == "|" {
            lines[i + 1..]
                .iter()
                .take_while(|l| l.len() - l.trim_start().len() > indent || l.trim().is_empty())
                .map(|l| l.trim())
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            rest.trim().to_owned()
        };
        exprs.push(("alerts.yml".to_owned(), expr));
    }
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_use_only_metrics_conveyor_exposes_and_valid_promql() {
    let exprs = deploy_expressions();
    assert!(exprs.len() >= 40, "{} expressions", exprs.len());

    // The dashboard queries must be PromQL Prometheus accepts: check them as recording rules.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, (file, expr)) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        # {file}\n        expr: {}\n",
            serde_json::to_string(expr).expect("quote")
        ));
    }
    std::fs::write(dir.path().join("dashboards.rules.yml"), rules).expect("write rules");
    run_promtool(&["check", "rules", "dashboards.rules.yml"], dir.path());

    // Every metric they read exists on a live conveyor (run mode has every family).
    let conveyor = spawn_run(STAGES).await;
    let live = scrape(&conveyor).await;
    // Kafka's families exist only on a Kafka-backed conveyor (run mode here has the memory
    // queue): for them, being documented in docs/METRICS.md stands in for being live.
    let metrics_doc =
        std::fs::read_to_string(repo_root().join("docs/METRICS.md")).expect("METRICS.md");
    let exists = |name: &str| {
        if name == "up" || live.types.contains_key(name) {
            return true;
        }
        if name.starts_with("conveyor_kafka_") && metrics_doc.contains(&format!("`{name}`")) {
            return true;
        }
        ["_bucket", "_sum", "_count"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| live.types.get(base).is_some_and(|t| t == "histogram"))
        })
    };
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for (file, expr) in &exprs {
        for name in promql_metric_names(expr) {
            if !exists(&name) {
                unknown.push(format!("{file}: {name} (in {expr})"));
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics read by deploy/ that conveyor does not expose:\n{}",
        unknown.join("\n")
    );
    assert!(
        used.len() >= 30,
        "dashboards read {} metrics: {used:?}",
        used.len()
    );
    // Every metric family is documented.
    let doc = std::fs::read_to_string(repo_root().join("docs/METRICS.md")).expect("METRICS.md");
    let undocumented: Vec<&String> = live
        .types
        .keys()
        .filter(|name| !doc.contains(&format!("`{name}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "families missing from docs/METRICS.md: {undocumented:?}"
    );
}

#[test]
fn promql_names_leave_out_functions_labels_and_groupings() {
    let names = promql_metric_names(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{job="x"}[1m]))) / on(job, instance) conveyor_worker_pool_size and up == 0 > 1e-9"#,
    );
    let want: BTreeSet<String> = [
        "http_request_duration_seconds_bucket",
        "conveyor_worker_pool_size",
        "up",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(names, want);
}

/// `node`, or a failure saying how to install it.
fn node() -> PathBuf {
    for candidate in ["/usr/bin/node", "/usr/local/bin/node"] {
        if std::path::Path::new(candidate).is_file() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "node not found: install Node.js 18+ (Debian: `apt-get install nodejs npm`; `make test` does this)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_headless_chromium_shows_events_arrive_live() {
    let browser_dir = repo_root().join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "tests/browser/node_modules is missing: run `npm ci` in tests/browser (`make test` does this)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).is_file(),
        "{chromium} not found: install Chromium (Debian: `apt-get install chromium`; `make test` does this) or set CHROMIUM"
    );
    let conveyor = spawn_run(&["--workers", "2"]).await;
    let (code, page) = conveyor.get_raw("/dashboard").await;
    assert_eq!(code, 200, "GET /dashboard");
    assert!(page.contains("<canvas id=\"chart\""), "the dashboard page");

    let screenshot = artifacts_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(node())
            .arg("dashboard.mjs")
            .arg(conveyor.base_url())
            .arg(&screenshot)
            .env("CHROMIUM", &chromium)
            .current_dir(&browser_dir)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser check finishes within 2 minutes")
    .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the dashboard check in Chromium failed ({}):\n{stdout}\n{stderr}\n--- conveyor ---\n{}",
        output.status,
        conveyor.stderr_tail()
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("the browser check printed no JSON ({e}): {stdout}"));
    let after = &seen["after"];
    assert!(
        after["processed"].as_f64()
            >= Some(seen["before"]["processed"].as_f64().unwrap_or(0.0) + 320.0),
        "{seen}"
    );
    assert_eq!(after["status"], "ok", "{seen}");
    assert_ne!(after["e2eP50"], "–", "end-to-end latency shown: {seen}");
    let instances = after["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2, "{seen}");
    assert!(instances.iter().all(|i| i["healthy"] == true), "{seen}");
    let png = std::fs::read(&screenshot).expect("the screenshot was saved");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real PNG screenshot"
    );
}

/// Runs `conveyor status` with `args` and `env`; its exit code, stdout and stderr.
async fn conveyor_status(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = conveyor_command();
    cmd.arg("status").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("conveyor status finishes")
        .expect("run conveyor status");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_prints_a_table_json_and_names_an_unreachable_gateway() {
    let split = spawn_split(&["--workers", "3"]).await;
    let accepted = send_traffic(&split.gateway, "status").await;
    split
        .gateway
        .wait_until_processed(accepted, Duration::from_secs(30))
        .await;
    split.gateway.wait_idle(Duration::from_secs(30)).await;

    let url = split.gateway.base_url();
    let (code, table, stderr) = conveyor_status(&["--gateway-url", url], &[]).await;
    assert_eq!(code, Some(0), "conveyor status: {stderr}");
    assert!(
        table.starts_with(&format!("conveyor at {url}: ok (gateway ready)")),
        "{table}"
    );
    // The totals row under its header.
    let lines: Vec<&str> = table.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.starts_with("ACCEPTED"))
        .unwrap_or_else(|| panic!("no totals header in\n{table}"));
    let totals: Vec<&str> = lines[header + 1].split_whitespace().collect();
    let columns: Vec<&str> = lines[header].split_whitespace().collect();
    let cell = |name: &str| totals[columns.iter().position(|c| *c == name).expect(name)];
    assert_eq!(cell("ACCEPTED"), "151", "{table}");
    // No stages here: the "poison" event is an ordinary one.
    assert_eq!(cell("PROCESSED"), "151", "{table}");
    assert_eq!(cell("DEAD_LETTERED"), "0", "{table}");
    assert_eq!(cell("PENDING"), "0", "{table}");
    for (role, instance) in [
        ("ingest", split.ingest.base_url()),
        ("processor", split.processor.base_url()),
    ] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(role) && l.contains(instance))
            .unwrap_or_else(|| panic!("no line for the {role} at {instance}:\n{table}"));
        assert!(line.contains(" yes "), "{line}");
    }
    assert!(table.contains("memory") && table.contains("0/3"), "{table}");

    // The same gateway through the environment, as JSON.
    let (code, json, stderr) = conveyor_status(&["--json"], &[("CONVEYOR_GATEWAY_URL", url)]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&json).expect("--json prints JSON");
    assert_eq!(status["totals"]["accepted"], 151, "{status}");

    // Nothing listens here: a clear error naming the URL, non-zero exit.
    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", free.local_addr().expect("addr"));
    drop(free);
    let (code, out, stderr) = conveyor_status(&["--gateway-url", &dead], &[]).await;
    assert_eq!(
        code,
        Some(1),
        "exit code for an unreachable gateway: {out}{stderr}"
    );
    assert!(
        stderr.contains(&format!("{dead}/api/v1/status"))
            && stderr.contains("CONVEYOR_GATEWAY_URL"),
        "{stderr}"
    );
    assert!(out.is_empty(), "nothing on stdout: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiling_is_404_by_default_and_answers_a_flamegraph_svg_when_enabled() {
    let off = crate::harness::Spawn::new("run")
        .env("CONVEYOR_PROFILING", "false")
        .start()
        .await;
    let (code, body) = off.get_raw("/debug/pprof/profile?seconds=1").await;
    assert_eq!(code, 404, "profiling must be off by default: {body}");
    assert!(body.contains("not_found"), "{body}");
    drop(off);

    let on = crate::harness::Spawn::new("run")
        .args(["--profiling", "--stage", "cpu:200"])
        .start()
        .await;
    // Keep the process busy while it samples itself.
    let busy = {
        let http = on.http().clone();
        let url = on.url("/api/v1/ingest/batch");
        tokio::spawn(async move {
            let body: String = (0..200)
                .map(|i| {
                    format!(
                        "{{\"source\":\"prof\",\"data\":{{\"i\":{i},\"pad\":\"{}\"}}}}\n",
                        "x".repeat(512)
                    )
                })
                .collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(4);
            while tokio::time::Instant::now() < deadline {
                let _ = http
                    .post(&url)
                    .header("content-type", "application/x-ndjson")
                    .body(body.clone())
                    .send()
                    .await;
            }
        })
    };
    let resp = on
        .http()
        .get(on.url("/debug/pprof/profile?seconds=2"))
        .send()
        .await
        .expect("GET /debug/pprof/profile");
    let code = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let svg = resp.text().await.expect("profile body");
    busy.abort();
    assert_eq!(code, 200, "profile answer: {svg:.500}");
    assert_eq!(content_type, "image/svg+xml");
    assert!(svg.contains("<svg") && svg.contains("</svg>"), "{svg:.300}");
    // The flamegraph names our own code: the CPU stage and the runtime it runs on.
    assert!(
        svg.contains("conveyor") && svg.contains("tokio"),
        "the flamegraph holds no conveyor/tokio frames: {svg:.2000}"
    );
    std::fs::write(artifacts_dir().join("profile.svg"), &svg).expect("save the flamegraph");
}

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

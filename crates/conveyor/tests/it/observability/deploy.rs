//! What `deploy/` holds: the Prometheus config and alert rules pass `promtool` and their unit
//! tests, and the dashboards and alerts read only metrics conveyor exposes, in valid PromQL.

use std::collections::BTreeSet;

use crate::harness::spawn_run;

use super::paths::repo_root;
use super::scrape::{promtool, scrape};
use super::traffic::STAGES;

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
    assert!(rules.contains("10 rules found"), "{rules}");
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

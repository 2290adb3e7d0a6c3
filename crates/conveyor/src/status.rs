//! `conveyor status`: the gateway's `GET /api/v1/status` as a table (or its JSON as it is).

use std::fmt::Write as _;
use std::time::Duration;

use conveyor_core::display::{error_chain, thousands};
use serde_json::Value;

use crate::cli::StatusArgs;
use crate::failure::Failure;

pub async fn run(args: StatusArgs) -> Result<(), Failure> {
    let base = args.gateway_url.trim_end_matches('/');
    let url = format!("{base}/api/v1/status");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(args.timeout_secs.max(1)))
        .build()
        .map_err(|e| Failure::Runtime(e.into()))?;
    let unreachable = |reason: String| {
        Failure::Runtime(anyhow::anyhow!(
            "cannot read the status from the gateway at {url} (CONVEYOR_GATEWAY_URL / --gateway-url): {reason}"
        ))
    };
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    let code = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    let status: Value = serde_json::from_str(&text).map_err(|e| {
        unreachable(format!(
            "answered {code} with a body that is not status JSON ({e}): {:.200}",
            text
        ))
    })?;
    if status.get("totals").is_none() {
        return Err(unreachable(format!(
            "answered {code} without totals: {:.200}",
            text
        )));
    }
    if args.json {
        println!("{text}");
    } else {
        print!("{}", table(base, &status));
    }
    Ok(())
}

fn num(value: &Value) -> String {
    match value.as_u64() {
        Some(n) => thousands(n),
        None => "-".into(),
    }
}

/// Rows of cells as left-aligned columns (numbers right-aligned).
fn columns(rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..rows.iter().map(Vec::len).max().unwrap_or(0))
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let numeric =
                cell.chars().all(|ch| ch.is_ascii_digit() || ch == ',') && !cell.is_empty();
            let pad = widths[c].saturating_sub(cell.chars().count());
            if numeric {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The readable view of a status answer.
pub fn table(gateway: &str, status: &Value) -> String {
    let mut out = String::new();
    let state = status["status"].as_str().unwrap_or("unknown");
    let ready = if status["gateway"]["ready"] == true {
        "ready"
    } else {
        "not ready"
    };
    let _ = writeln!(out, "conveyor at {gateway}: {state} (gateway {ready})\n");

    let totals = &status["totals"];
    let keys = [
        "accepted",
        "processed",
        "dropped",
        "failed",
        "retried",
        "dead_lettered",
        "duplicates",
        "rejected",
        "pending",
    ];
    let mut rows = vec![
        keys.iter().map(|k| k.to_uppercase()).collect::<Vec<_>>(),
        keys.iter().map(|k| num(&totals[*k])).collect(),
    ];
    out.push_str(&columns(&rows));

    let processor = &status["processor"]["stats"];
    let queue = &processor["queue"];
    let pool = &processor["pool"];
    let lag = queue["size"].as_u64().unwrap_or(0) + queue["in_flight"].as_u64().unwrap_or(0);
    let capacity = match queue["capacity"].as_u64() {
        Some(0) | None => "broker".to_owned(),
        Some(n) => thousands(n),
    };
    out.push('\n');
    rows = vec![
        vec![
            "QUEUE".into(),
            "SIZE".into(),
            "IN FLIGHT".into(),
            "LAG".into(),
            "CAPACITY".into(),
            "WORKERS BUSY".into(),
            "DLQ".into(),
        ],
        vec![
            queue["backend"].as_str().unwrap_or("-").to_owned(),
            num(&queue["size"]),
            num(&queue["in_flight"]),
            thousands(lag),
            capacity,
            format!("{}/{}", num(&pool["active"]), num(&pool["workers"])),
            num(&processor["dlq_size"]),
        ],
    ];
    out.push_str(&columns(&rows));

    let pipelines = processor["pipelines"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if !pipelines.is_empty() {
        out.push('\n');
        rows = vec![
            ["PIPELINE", "IN", "ROUTED", "DROPPED", "FAILED"]
                .iter()
                .map(|h| (*h).to_owned())
                .collect(),
        ];
        for pipeline in &pipelines {
            rows.push(vec![
                pipeline["name"].as_str().unwrap_or("-").to_owned(),
                num(&pipeline["in"]),
                num(&pipeline["routed"]),
                num(&pipeline["dropped"]),
                num(&pipeline["failed"]),
            ]);
        }
        out.push_str(&columns(&rows));
    }
    let sinks = processor["sinks"].as_array().cloned().unwrap_or_default();
    if !sinks.is_empty() {
        out.push('\n');
        rows = vec![
            [
                "SINK",
                "TARGET",
                "HEALTHY",
                "WRITTEN",
                "RETRIED",
                "REJECTED",
                "LAST ERROR",
            ]
            .iter()
            .map(|h| (*h).to_owned())
            .collect(),
        ];
        for sink in &sinks {
            let healthy = sink["healthy"] == true;
            rows.push(vec![
                sink["name"].as_str().unwrap_or("-").to_owned(),
                sink["target"].as_str().unwrap_or("-").to_owned(),
                if healthy { "yes".into() } else { "NO".into() },
                num(&sink["written"]),
                num(&sink["retried"]),
                num(&sink["rejected"]),
                sink["last_error"].as_str().unwrap_or("").to_owned(),
            ]);
        }
        out.push_str(&columns(&rows));
    }
    if let Some(config) = processor["config"].as_object() {
        let _ = writeln!(
            out,
            "\nconfig {}: {} reloads applied, {} refused{}",
            config.get("path").and_then(Value::as_str).unwrap_or("-"),
            config.get("reloads_applied").map_or("0".into(), num),
            config.get("reloads_refused").map_or("0".into(), num),
            config
                .get("last_refusal")
                .and_then(Value::as_str)
                .map(|why| format!(" (last refused: {})", why.lines().next().unwrap_or(why)))
                .unwrap_or_default()
        );
    }

    out.push('\n');
    rows = vec![vec![
        "ROLE".into(),
        "INSTANCE".into(),
        "HEALTHY".into(),
        "ACCEPTED/PROCESSED".into(),
        "ERROR".into(),
    ]];
    for instance in status["instances"].as_array().into_iter().flatten() {
        let stats = &instance["stats"];
        let count = if instance["role"] == "processor" {
            num(&stats["pool"]["processed"])
        } else {
            num(&stats["accepted"])
        };
        rows.push(vec![
            instance["role"].as_str().unwrap_or("-").to_owned(),
            instance["url"].as_str().unwrap_or("-").to_owned(),
            if instance["healthy"] == true {
                "yes".into()
            } else {
                "NO".into()
            },
            count,
            instance["error"].as_str().unwrap_or("").to_owned(),
        ]);
    }
    out.push_str(&columns(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let text = columns(&[
            vec!["A".into(), "NAME".into()],
            vec!["1,000".into(), "x".into()],
        ]);
        assert_eq!(text, "A      NAME\n1,000  x\n");
    }

    #[test]
    fn the_table_shows_dropped_events_pipelines_and_the_config_file() {
        let status = serde_json::json!({
            "status": "ok",
            "gateway": {"ready": true},
            "totals": {"accepted": 10, "processed": 6, "dropped": 3, "dead_lettered": 1},
            "processor": {"stats": {
                "queue": {}, "pool": {},
                "pipelines": [{"name": "sensors", "in": 10, "routed": 6, "dropped": 3, "failed": 1}],
                "sinks": [{"name": "db", "target": "postgres://h:5432/app?table=events", "healthy": false,
                           "written": 6, "retried": 4, "rejected": 0, "last_error": "cannot connect"}],
                "config": {"path": "c.toml", "reloads_applied": 2, "reloads_refused": 1,
                           "last_refusal": "c.toml:3:5: jq: expected term\nmore"},
            }},
            "instances": [],
        });
        let text = table("http://g", &status);
        assert!(text.contains("DROPPED"), "{text}");
        assert!(
            text.contains("sensors   10       6        3       1"),
            "{text}"
        );
        assert!(
            text.contains("db    postgres://h:5432/app?table=events  NO             6        4         0  cannot connect"),
            "{text}"
        );
        assert!(
            text.contains("config c.toml: 2 reloads applied, 1 refused (last refused: c.toml:3:5: jq: expected term)"),
            "{text}"
        );
    }
}

//! `conveyor status`: the table, `--json`, and an unreachable gateway.

use std::time::Duration;

use crate::harness::{conveyor_command, spawn_split};

use super::traffic::send_traffic;

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

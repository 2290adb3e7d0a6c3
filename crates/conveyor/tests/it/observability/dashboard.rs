//! The live dashboard, driven in headless Chromium.

use std::path::PathBuf;
use std::time::Duration;

use crate::harness::spawn_run;

use super::paths::{artifacts_dir, repo_root};

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

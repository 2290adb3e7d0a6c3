//! Reading the target's `GET /api/v1/status` before the run and after it, until every event it
//! accepted from us shows as processed (or dead-lettered).

use std::time::{Duration, Instant};

use serde::Deserialize;

/// How often the status is read while waiting.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

/// The part of `/api/v1/status` this needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Totals {
    #[serde(default)]
    pub accepted: u64,
    pub processed: u64,
    #[serde(default)]
    pub dead_lettered: u64,
}

impl Totals {
    /// Events done (processed or dead-lettered) since `baseline`.
    pub fn done_since(&self, baseline: &Totals) -> u64 {
        (self.processed + self.dead_lettered)
            .saturating_sub(baseline.processed + baseline.dead_lettered)
    }
}

#[derive(Deserialize)]
struct Status {
    totals: Totals,
}

/// Reads the totals. `Err` names why there are none (no such endpoint, not conveyor's shape,
/// unreachable).
pub async fn read_totals(client: &reqwest::Client, target: &str) -> Result<Totals, String> {
    let url = format!("{target}/api/v1/status");
    let response = client
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("GET {url} failed: {e}"))?;
    let code = response.status().as_u16();
    let text = response
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: reading the answer failed: {e}"))?;
    // conveyor answers 503 with the same body while degraded.
    match serde_json::from_slice::<Status>(&text) {
        Ok(status) => Ok(status.totals),
        Err(_) if code == 404 => Err(format!("the target has no {url} (404)")),
        Err(e) => Err(format!(
            "GET {url} answered {code} without totals.processed: {e}"
        )),
    }
}

/// How the wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The last totals read.
    pub totals: Totals,
    /// When they first showed `want` events done; `None` if they never did in time.
    pub done_at: Option<Instant>,
    /// The last error while polling, if the status stopped answering.
    pub error: Option<String>,
}

/// Polls until `want` events are done since `baseline`, or `timeout` passed.
pub async fn wait_processed(
    client: &reqwest::Client,
    target: &str,
    baseline: Totals,
    want: u64,
    timeout: Duration,
) -> Settled {
    let give_up = Instant::now() + timeout;
    let mut last = Settled {
        totals: baseline,
        done_at: None,
        error: None,
    };
    loop {
        match read_totals(client, target).await {
            Ok(totals) => {
                last.totals = totals;
                last.error = None;
                if totals.done_since(&baseline) >= want {
                    last.done_at = Some(Instant::now());
                    return last;
                }
            }
            Err(e) => last.error = Some(e),
        }
        if Instant::now() >= give_up {
            return last;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_counts_only_what_happened_since_the_baseline() {
        let before = Totals {
            accepted: 100,
            processed: 90,
            dead_lettered: 5,
        };
        let after = Totals {
            accepted: 1100,
            processed: 1080,
            dead_lettered: 15,
        };
        assert_eq!(after.done_since(&before), 1000);
        assert_eq!(before.done_since(&after), 0);
        let status: Status = serde_json::from_str(
            r#"{"status":"ok","totals":{"accepted":3,"processed":2,"failed":0,"dead_lettered":1}}"#,
        )
        .expect("conveyor's status shape");
        assert_eq!(
            status.totals,
            Totals {
                accepted: 3,
                processed: 2,
                dead_lettered: 1
            }
        );
        assert!(serde_json::from_str::<Status>(r#"{"totals":{}}"#).is_err());
    }
}

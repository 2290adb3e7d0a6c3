//! Reading `/metrics` ([`Scrape`]), and Prometheus' `promtool`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::harness::Conveyor;

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

//! A PostgreSQL database of a test's own: created on a server the test command provides
//! (`CONVEYOR_TEST_POSTGRES_URL`, by default the machine's at 127.0.0.1:5432; `make test`
//! starts a private one with `initdb` when none answers), dropped when the test ends. Driven
//! through `psql`, so the fixture needs no client crate and can clean up in `Drop`.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::TcpGate;

/// The server tests create their databases on, as a URL of a database that exists there.
pub fn server_url() -> String {
    std::env::var("CONVEYOR_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Runs one statement with `psql` on `url`; the output, or a panic that says how to get a
/// server.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run psql ({e}): install the PostgreSQL client (apt-get install postgresql-client), or run `make test`")
        });
    if !out.status.success() {
        panic!(
            "psql on {url} failed: {}\nThe PostgreSQL tests need a server: set \
             CONVEYOR_TEST_POSTGRES_URL to one where they may create databases, start the \
             machine's (127.0.0.1:5432, trust auth), or run `make test`, which starts a private \
             one when none answers.",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A database created for one test, dropped (with its connections) on drop.
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    pub fn create() -> TestDatabase {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "conveyor_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let server = server_url();
        psql(
            &server,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
        psql(&server, &format!("CREATE DATABASE {name}"));
        let url = match server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("CONVEYOR_TEST_POSTGRES_URL '{server}' has no /database"),
        };
        TestDatabase { name, url }
    }

    /// The database's URL (`postgres://user@host:port/name`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A [`TcpGate`] in front of the server, and this database's URL through it, for tests
    /// that take the database away and bring it back.
    pub async fn behind_gate(&self) -> (TcpGate, String) {
        // postgres://[user@]host[:port]/name
        let (scheme, rest) = self.url.split_once("://").expect("a URL");
        let (authority, path) = rest.split_once('/').expect("a /database");
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((user, host_port)) => (format!("{user}@"), host_port),
            None => (String::new(), authority),
        };
        let (host, port) = match host_port.rsplit_once(':') {
            Some((host, port)) => (host, port.parse().expect("a port")),
            None => (host_port, 5432),
        };
        let server = tokio::net::lookup_host((host, port))
            .await
            .ok()
            .and_then(|mut addresses| addresses.next())
            .unwrap_or_else(|| panic!("cannot resolve the PostgreSQL server {host}:{port}"));
        let gate = TcpGate::start(server).await;
        let url = format!("{scheme}://{user}127.0.0.1:{}/{path}", gate.port());
        (gate, url)
    }

    /// Runs `sql` in this database; its output rows, `|`-separated.
    pub fn query(&self, sql: &str) -> String {
        psql(&self.url, sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &server_url(),
                "-X",
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

//! Throwaway PostgreSQL databases for tests (the store suite and the end-to-end harness).
//!
//! The server is reached through `GPUMETER_TEST_PG` (a libpq connection string or URL of a
//! role that may create databases), by default `host=/var/run/postgresql user=root
//! dbname=postgres`. Each [`TestPg`] is a database of its own with a unique name, dropped
//! when it goes out of scope, so tests run in parallel. When the server cannot be reached,
//! [`TestPg::create`] panics if `GPUMETER_REQUIRE_ALL=1` (CI) and otherwise prints a line
//! with `SKIPPED` and returns `None`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::postgres::off_runtime;

/// The default server for tests: the local cluster's unix socket, as root.
pub const DEFAULT_TEST_PG: &str = "host=/var/run/postgresql user=root dbname=postgres";

/// A database made for one test; dropped with it.
#[derive(Debug)]
pub struct TestPg {
    /// `postgres://…` naming the test database (what `--db` takes).
    pub url: String,
    /// The database's name.
    pub name: String,
    base: postgres::Config,
}

fn base_config() -> Result<postgres::Config, String> {
    let base = std::env::var("GPUMETER_TEST_PG").unwrap_or_else(|_| DEFAULT_TEST_PG.into());
    base.parse::<postgres::Config>()
        .map_err(|e| format!("GPUMETER_TEST_PG {base:?}: {e}"))
}

/// `config` with `dbname` as a `postgres://` URL.
fn url_of(config: &postgres::Config, dbname: &str) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let mut auth = config.get_user().map(enc).unwrap_or_default();
    if let Some(p) = config.get_password() {
        auth.push(':');
        auth.push_str(&enc(&String::from_utf8_lossy(p)));
    }
    if !auth.is_empty() {
        auth.push('@');
    }
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => enc(h),
        Some(postgres::config::Host::Unix(p)) => enc(&p.to_string_lossy()),
        None => enc("/var/run/postgresql"),
    };
    let port = config
        .get_ports()
        .first()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    format!("postgres://{auth}{host}{port}/{dbname}")
}

impl TestPg {
    /// A fresh empty database named after `tag`; `None` (with a `SKIPPED` line) when no
    /// server can be reached and CI does not require one.
    pub fn create(tag: &str) -> Option<TestPg> {
        match Self::try_create(tag) {
            Ok(db) => Some(db),
            Err(e) => {
                if std::env::var("GPUMETER_REQUIRE_ALL").as_deref() == Ok("1") {
                    panic!(
                        "PostgreSQL is required (GPUMETER_REQUIRE_ALL=1) but cannot be used: {e}"
                    );
                }
                // Past the test harness's capture (as the other skips in this project), so a
                // skip shows in every log.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {tag} on PostgreSQL: {e} (set GPUMETER_TEST_PG to a server; see DEVELOPERS.md)"
                );
                None
            }
        }
    }

    fn try_create(tag: &str) -> Result<TestPg, String> {
        Self::create_in(base_config()?, tag)
    }

    /// A fresh empty database named after `tag` on the server `server` (a libpq connection
    /// string or URL of a role that may create databases), or why it could not be made.
    /// For benchmarks, which take the server as an option and report a skip themselves.
    pub fn create_on(server: &str, tag: &str) -> Result<TestPg, String> {
        let base = server
            .parse::<postgres::Config>()
            .map_err(|e| format!("{server:?}: {e}"))?;
        Self::create_in(base, tag)
    }

    fn create_in(base: postgres::Config, tag: &str) -> Result<TestPg, String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let clean: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "gpm_{clean}_{}_{}_{nanos:x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let sql = format!("CREATE DATABASE \"{name}\"");
        let b = base.clone();
        off_runtime(move || -> Result<(), String> {
            let mut c = b.connect(postgres::NoTls).map_err(|e| e.to_string())?;
            c.batch_execute(&sql).map_err(|e| e.to_string())
        })?;
        Ok(TestPg {
            url: url_of(&base, &name),
            name,
            base,
        })
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        let b = self.base.clone();
        let _ = off_runtime(move || -> Result<(), String> {
            let mut c = b.connect(postgres::NoTls).map_err(|e| e.to_string())?;
            c.batch_execute(&sql).map_err(|e| e.to_string())
        });
    }
}

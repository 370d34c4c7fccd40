//! Collector configuration (TOML, for `serve --config`). Flags given on the command line win
//! over the file. `validate` names the bad field.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ingest::Limits;
use crate::server::ServerOptions;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("config field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// Address to serve Ingest, Query and Admin on (`--listen` wins).
    pub listen: Option<String>,
    /// The ledger: a SQLite file path, or a PostgreSQL database as `postgres://…` (`--db`
    /// wins).
    pub db: Option<String>,
    /// The collector's signing key file (heads, signed reports), created 0600 on first use;
    /// required with a PostgreSQL `db`, which never holds the key. A SQLite `db` keeps it
    /// beside the file (`<db>.collector-key`) and ignores this (`--collector-key` wins).
    pub collector_key: Option<std::path::PathBuf>,
    /// This collector's name in Welcome messages and metrics; default `collector`.
    pub collector_id: Option<String>,
    /// Address of the Prometheus and health endpoint (`/metrics`, `/healthz`, `/readyz`).
    pub metrics_listen: Option<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Seconds between signed ledger heads (default 600; see `crate::heads`).
    pub head_interval_s: Option<u64>,
    /// Address of the read-only web console (HTTPS with the collector's certificate; off
    /// when unset; `--console-listen` wins). See docs/console.md.
    pub console_listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most records in one batch; a larger batch is refused.
    #[serde(default = "d_batch")]
    pub max_batch_records: u32,
    /// Largest gRPC message accepted or sent on the Ingest stream.
    #[serde(default = "d_msg")]
    pub max_message_bytes: u32,
    /// A session with no message for this long is closed.
    #[serde(default = "d_idle")]
    pub idle_timeout_s: u64,
    /// Agent clocks further off than this raise a `clock_skew` alarm.
    #[serde(default = "d_skew")]
    pub max_clock_skew_s: u64,
    /// Most concurrent streams on one connection.
    #[serde(default = "d_streams")]
    pub max_streams_per_connection: u32,
    /// Most cards one Hello may list.
    #[serde(default = "d_gpus")]
    pub max_gpus_per_hello: u32,
    /// Longest string in a Hello, and in a record's identity fields (card, grant, principal).
    #[serde(default = "d_string")]
    pub max_string_bytes: u32,
    /// How far before an agent's first registration its windows may start (0: not at all).
    #[serde(default)]
    pub max_backfill_s: u64,
    /// A session must say Hello within this long.
    #[serde(default = "d_hello")]
    pub hello_timeout_s: u64,
    /// Open connections in total, and from one peer address.
    #[serde(default = "d_conns")]
    pub max_connections: u32,
    #[serde(default = "d_conns_ip")]
    pub max_connections_per_ip: u32,
    /// A connection that reads nothing for this long is closed (keepalive pings count).
    #[serde(default = "d_conn_idle")]
    pub connection_idle_timeout_s: u64,
    /// HTTP/2 keepalive: a ping this often, and the connection is closed when one is not
    /// answered within the timeout.
    #[serde(default = "d_ka")]
    pub http2_keepalive_interval_s: u64,
    #[serde(default = "d_ka_timeout")]
    pub http2_keepalive_timeout_s: u64,
    /// A connection that has not finished its TLS handshake within this long is closed.
    #[serde(default = "d_handshake")]
    pub tls_handshake_timeout_s: u64,
}

fn d_handshake() -> u64 {
    10
}

fn d_batch() -> u32 {
    4096
}
fn d_msg() -> u32 {
    16 << 20
}
fn d_idle() -> u64 {
    900
}
fn d_skew() -> u64 {
    300
}
fn d_streams() -> u32 {
    16
}
fn d_gpus() -> u32 {
    1024
}
fn d_string() -> u32 {
    256
}
fn d_hello() -> u64 {
    30
}
fn d_conns() -> u32 {
    768
}
fn d_conns_ip() -> u32 {
    256
}
fn d_conn_idle() -> u64 {
    300
}
fn d_ka() -> u64 {
    30
}
fn d_ka_timeout() -> u64 {
    20
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_batch_records: d_batch(),
            max_message_bytes: d_msg(),
            idle_timeout_s: d_idle(),
            max_clock_skew_s: d_skew(),
            max_streams_per_connection: d_streams(),
            max_gpus_per_hello: d_gpus(),
            max_string_bytes: d_string(),
            max_backfill_s: 0,
            hello_timeout_s: d_hello(),
            max_connections: d_conns(),
            max_connections_per_ip: d_conns_ip(),
            connection_idle_timeout_s: d_conn_idle(),
            http2_keepalive_interval_s: d_ka(),
            http2_keepalive_timeout_s: d_ka_timeout(),
            tls_handshake_timeout_s: d_handshake(),
        }
    }
}

/// The Markdown reference of collector.toml, generated from these types
/// (docs/config/collector.md).
pub fn reference() -> String {
    gpumeter_telemetry::docs::config_reference(
        "gpumeter-collector configuration (collector.toml)",
        schemars::schema_for!(CollectorConfig).as_value(),
    )
}

impl CollectorConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let c: CollectorConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| ConfigError::Invalid {
            field,
            reason: reason.to_string(),
        };
        if let Some(l) = &self.listen {
            l.parse::<std::net::SocketAddr>()
                .map_err(|_| bad("listen", "must be an address like 127.0.0.1:7070"))?;
        }
        if let Some(m) = &self.metrics_listen {
            m.parse::<std::net::SocketAddr>()
                .map_err(|_| bad("metrics_listen", "must be an address like 127.0.0.1:9401"))?;
        }
        if let Some(m) = &self.console_listen {
            m.parse::<std::net::SocketAddr>()
                .map_err(|_| bad("console_listen", "must be an address like 127.0.0.1:7443"))?;
        }
        let l = &self.limits;
        if !(1..=100_000).contains(&l.max_batch_records) {
            return Err(bad("limits.max_batch_records", "must be 1..=100000"));
        }
        if !(64 << 10..=256 << 20).contains(&l.max_message_bytes) {
            return Err(bad("limits.max_message_bytes", "must be 64 KiB..=256 MiB"));
        }
        if l.idle_timeout_s < 10 {
            return Err(bad("limits.idle_timeout_s", "must be at least 10"));
        }
        if !(1..=300).contains(&l.tls_handshake_timeout_s) {
            return Err(bad("limits.tls_handshake_timeout_s", "must be 1..=300"));
        }
        if l.max_streams_per_connection == 0 {
            return Err(bad("limits.max_streams_per_connection", "must be positive"));
        }
        if self
            .head_interval_s
            .is_some_and(|s| !(1..=86_400).contains(&s))
        {
            return Err(bad("head_interval_s", "must be 1..=86400"));
        }
        if !(1..=65_536).contains(&l.max_gpus_per_hello) {
            return Err(bad("limits.max_gpus_per_hello", "must be 1..=65536"));
        }
        if !(64..=65_536).contains(&l.max_string_bytes) {
            return Err(bad("limits.max_string_bytes", "must be 64..=65536"));
        }
        if l.max_backfill_s > 400 * 86_400 {
            return Err(bad("limits.max_backfill_s", "must be at most 400 days"));
        }
        if !(1..=600).contains(&l.hello_timeout_s) {
            return Err(bad("limits.hello_timeout_s", "must be 1..=600"));
        }
        if l.max_connections == 0 {
            return Err(bad("limits.max_connections", "must be positive"));
        }
        if l.max_connections_per_ip == 0 || l.max_connections_per_ip > l.max_connections {
            return Err(bad(
                "limits.max_connections_per_ip",
                "must be positive and at most limits.max_connections",
            ));
        }
        if l.http2_keepalive_interval_s == 0 || l.http2_keepalive_timeout_s == 0 {
            return Err(bad(
                "limits.http2_keepalive_interval_s",
                "interval and timeout must be positive",
            ));
        }
        if l.connection_idle_timeout_s <= l.http2_keepalive_interval_s + l.http2_keepalive_timeout_s
        {
            return Err(bad(
                "limits.connection_idle_timeout_s",
                "must be longer than the keepalive interval plus its timeout, or live agents are cut",
            ));
        }
        Ok(())
    }

    pub fn server_options(&self) -> ServerOptions {
        ServerOptions {
            collector_id: self
                .collector_id
                .clone()
                .unwrap_or_else(|| "collector".into()),
            limits: Limits {
                max_batch_records: self.limits.max_batch_records,
                max_message_bytes: self.limits.max_message_bytes,
                idle_timeout: Duration::from_secs(self.limits.idle_timeout_s),
                max_clock_skew_ms: self.limits.max_clock_skew_s as i64 * 1000,
                max_gpus_per_hello: self.limits.max_gpus_per_hello,
                max_string_bytes: self.limits.max_string_bytes,
                max_backfill_ms: self.limits.max_backfill_s as i64 * 1000,
                hello_timeout: Duration::from_secs(self.limits.hello_timeout_s),
            },
            connections: crate::limiter::ConnectionLimits {
                max_total: self.limits.max_connections as usize,
                max_per_ip: self.limits.max_connections_per_ip as usize,
                idle_timeout: Duration::from_secs(self.limits.connection_idle_timeout_s),
                handshake_timeout: Duration::from_secs(self.limits.tls_handshake_timeout_s),
            },
            http2_keepalive_interval: Duration::from_secs(self.limits.http2_keepalive_interval_s),
            http2_keepalive_timeout: Duration::from_secs(self.limits.http2_keepalive_timeout_s),
            max_streams_per_connection: self.limits.max_streams_per_connection,
            drain_timeout: Duration::from_secs(10),
            metrics_listen: self.metrics_listen.as_deref().and_then(|m| m.parse().ok()),
            head_interval: Duration::from_secs(self.head_interval_s.unwrap_or(600)),
            // TLS material comes from `serve`'s flags, and so does the reports folder.
            tls: None,
            reports_dir: None,
            reports_interval: Duration::from_secs(600),
            console: self
                .console_listen
                .as_deref()
                .and_then(|m| m.parse().ok())
                .map(crate::server::ConsoleListen::Addr),
            console_options: crate::console::ConsoleOptions::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config/collector.md");
        let written = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            written == reference(),
            "docs/config/collector.md is stale: regenerate it with `gpumeter-collector config-reference > docs/config/collector.md`"
        );
        assert!(written.contains("`max_batch_records`"), "{written}");
    }

    #[test]
    fn bad_fields_are_named() {
        let c: CollectorConfig = toml::from_str("listen = \"nowhere\"").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("listen"));
        let c: CollectorConfig = toml::from_str("[limits]\nmax_batch_records = 0").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("limits.max_batch_records")
        );
        assert!(toml::from_str::<CollectorConfig>("lissten = \"x\"").is_err());
        let c: CollectorConfig = toml::from_str("listen = \"127.0.0.1:7070\"").unwrap();
        assert!(c.validate().is_ok());
        assert_eq!(c.server_options().limits.max_batch_records, 4096);
        let d = CollectorConfig::default().server_options();
        assert_eq!(d.limits.max_gpus_per_hello, 1024);
        assert_eq!(d.limits.max_backfill_ms, 0);
        assert_eq!(d.connections.max_total, 768);
        for (text, field) in [
            (
                "[limits]\nmax_gpus_per_hello = 0",
                "limits.max_gpus_per_hello",
            ),
            ("[limits]\nmax_string_bytes = 1", "limits.max_string_bytes"),
            (
                "[limits]\nmax_connections = 10\nmax_connections_per_ip = 11",
                "limits.max_connections_per_ip",
            ),
            (
                "[limits]\nconnection_idle_timeout_s = 40",
                "limits.connection_idle_timeout_s",
            ),
        ] {
            let c: CollectorConfig = toml::from_str(text).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{text}: {e}");
        }
    }
}

//! Collector configuration (TOML, for `serve --config`). Flags given on the command line win
//! over the file. `validate` names the bad field.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

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

#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    pub listen: Option<String>,
    pub db: Option<String>,
    pub collector_id: Option<String>,
    /// Address of the Prometheus endpoint (`GET /metrics`).
    pub metrics_listen: Option<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "d_batch")]
    pub max_batch_records: u32,
    #[serde(default = "d_msg")]
    pub max_message_bytes: u32,
    #[serde(default = "d_idle")]
    pub idle_timeout_s: u64,
    #[serde(default = "d_skew")]
    pub max_clock_skew_s: u64,
    #[serde(default = "d_streams")]
    pub max_streams_per_connection: u32,
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

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_batch_records: d_batch(),
            max_message_bytes: d_msg(),
            idle_timeout_s: d_idle(),
            max_clock_skew_s: d_skew(),
            max_streams_per_connection: d_streams(),
        }
    }
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
        if l.max_streams_per_connection == 0 {
            return Err(bad("limits.max_streams_per_connection", "must be positive"));
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
            },
            max_streams_per_connection: self.limits.max_streams_per_connection,
            metrics_listen: self.metrics_listen.as_deref().and_then(|m| m.parse().ok()),
            // TLS material comes from `serve`'s flags.
            tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}

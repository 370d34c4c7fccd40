//! Agent configuration (TOML). The file says what to meter and where to send it; command-line
//! flags say how to run this process. `validate` names the bad field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a configuration is unusable (the binary exits 64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("config field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Stable identity of this agent; records are keyed by (agent_id, seq).
    pub agent_id: String,
    /// The server's id as the grants name it; defaults to the agent id.
    #[serde(default)]
    pub host_id: String,
    /// Cloud provider operating this server.
    pub csp: String,
    pub collector: CollectorConfig,
    #[serde(default)]
    pub sampling: SamplingConfig,
    #[serde(default)]
    pub source: SourceConfig,
    /// Where the spool, key and assignment cache live.
    pub state_dir: PathBuf,
    #[serde(default)]
    pub spool: SpoolSettings,
    #[serde(default)]
    pub enforcement: EnforcementConfig,
    /// Address of the Prometheus and health endpoint (`/metrics`, `/healthz`, `/readyz`);
    /// none by default.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Also export the card readings under dcgm-exporter's metric names and labels.
    #[serde(default)]
    pub metrics_dcgm_compat: bool,
    /// Where GPU processes are looked up.
    #[serde(default)]
    pub attribution: AttributionConfig,
}

/// Where processes are read from.
#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttributionConfig {
    /// The host's procfs: the driver names processes by their host pids, so an agent in a
    /// container reads the host's `/proc` mounted here (and needs the host's pid namespace to
    /// signal them). Default `/proc`.
    #[serde(default = "default_proc_root")]
    pub proc_root: PathBuf,
    /// The kubelet's pod-resources socket (normally
    /// `/var/lib/kubelet/pod-resources/kubelet.sock`). When set, the agent asks the kubelet
    /// which pod and container each GPU is allocated to, names a process's pod and container
    /// where its cgroup pod is the card's holder, and records processes on cards the kubelet
    /// gave another pod or none. Absent: pods are known from cgroup paths only (pod UID).
    #[serde(default)]
    pub kubelet_pod_resources_socket: Option<PathBuf>,
    /// How often the kubelet's answer is asked for again (the kubelet rate-limits this API);
    /// a process the answer cannot place asks sooner, but never more than once a second.
    #[serde(default = "default_kubelet_refresh")]
    pub kubelet_refresh_ms: u64,
}

fn default_kubelet_refresh() -> u64 {
    10_000
}

fn default_proc_root() -> PathBuf {
    PathBuf::from("/proc")
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            proc_root: default_proc_root(),
            kubelet_pod_resources_socket: None,
            kubelet_refresh_ms: default_kubelet_refresh(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// `https://host:port` (or `http://` for a collector run with `--insecure`).
    pub url: String,
    /// The collector's CA certificate (PEM), to trust its server certificate. Required for
    /// `https://`.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// This agent's client certificate (PEM), issued by the collector's CA for this agent id
    /// and host id (`gpumeter-collector ca issue-agent`). Required for `https://`.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM). Required for `https://`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Most records in one signed batch (the collector may lower it in its Welcome).
    #[serde(default = "default_batch")]
    pub max_batch_records: u32,
    /// First wait before reconnecting after a failed session; doubles up to `backoff_max_ms`.
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial_ms: u64,
    /// Longest wait between reconnect attempts.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
}

fn default_batch() -> u32 {
    512
}
fn default_backoff_initial() -> u64 {
    200
}
fn default_backoff_max() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// How often every card is read; divides `window_ms`.
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Length of one record's window, aligned to the wall clock; divides a day.
    #[serde(default = "default_window")]
    pub window_ms: u64,
}

fn default_interval() -> u64 {
    1_000
}
fn default_window() -> u64 {
    60_000
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            interval_ms: default_interval(),
            window_ms: default_window(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq, Default)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum SourceConfig {
    /// The NVIDIA driver through NVML.
    #[default]
    Nvml,
    /// A library path other than the system's libnvidia-ml.
    #[serde(rename = "nvml-lib")]
    NvmlLib {
        /// Path of libnvidia-ml.so.
        path: PathBuf,
    },
    /// Simulated cards from a scenario file.
    Sim {
        /// TOML file describing the simulated cards and their load over time.
        scenario: PathBuf,
        /// Simulated seconds per real second.
        #[serde(default = "default_speed")]
        speed: f64,
    },
}

fn default_speed() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    /// Most bytes of records kept on disk while the collector has not acknowledged them.
    #[serde(default = "default_spool_max")]
    pub max_bytes: u64,
    /// Size of one spool segment file; acknowledged segments are deleted whole.
    #[serde(default = "default_segment")]
    pub segment_bytes: u64,
    /// What to do when the spool is full (the collector unreachable for a long time).
    #[serde(default)]
    pub on_full: OnFull,
}

/// The spool-full policy. Neither drops a record without a record saying so.
#[derive(
    Debug, Clone, Copy, Deserialize, Serialize, schemars::JsonSchema, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Hold new records in memory and raise an alarm until the spool has room again.
    #[default]
    Block,
    /// Drop new records and write a signed gap record naming the span and cards instead.
    Gap,
}

fn default_spool_max() -> u64 {
    1 << 30
}
fn default_segment() -> u64 {
    8 << 20
}

impl Default for SpoolSettings {
    fn default() -> Self {
        Self {
            max_bytes: default_spool_max(),
            segment_bytes: default_segment(),
            on_full: OnFull::Block,
        }
    }
}

#[derive(
    Debug, Clone, Copy, Deserialize, Serialize, schemars::JsonSchema, PartialEq, Eq, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum EnforcementMode {
    /// Record violations, touch nothing.
    #[default]
    Observe,
    /// SIGTERM, grace period, SIGKILL.
    Terminate,
}

#[derive(Debug, Clone, Deserialize, Serialize, schemars::JsonSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EnforcementConfig {
    /// `observe` records violations; `terminate` also ends the offending processes.
    #[serde(default)]
    pub mode: EnforcementMode,
    /// In `terminate` mode, how long after SIGTERM a process gets before SIGKILL.
    #[serde(default = "default_grace")]
    pub grace_ms: u64,
    /// Set compute mode PROHIBITED on unassigned cards. Off unless the operator turns it on.
    #[serde(default)]
    pub lock_unassigned: bool,
}

fn default_grace() -> u64 {
    10_000
}

impl Default for EnforcementConfig {
    fn default() -> Self {
        Self {
            mode: EnforcementMode::Observe,
            grace_ms: default_grace(),
            lock_unassigned: false,
        }
    }
}

/// The Markdown reference of agent.toml, generated from these types (docs/config/agent.md).
pub fn reference() -> String {
    gpumeter_telemetry::docs::config_reference(
        "gpumeter-agent configuration (agent.toml)",
        schemars::schema_for!(AgentConfig).as_value(),
    )
}

impl AgentConfig {
    /// A config for an agent over simulated cards (demo, tests, benchmarks): 1 s samples,
    /// 60 s windows, fast reconnects, state under `state_dir`. The source itself is handed
    /// to [`crate::run::Agent::build`] directly.
    pub fn simulated(
        agent_id: &str,
        csp: &str,
        url: &str,
        state_dir: &Path,
        max_batch_records: u32,
    ) -> Self {
        AgentConfig {
            agent_id: agent_id.into(),
            host_id: agent_id.into(),
            csp: csp.into(),
            collector: CollectorConfig {
                url: url.into(),
                ca_cert: None,
                client_cert: None,
                client_key: None,
                max_batch_records,
                backoff_initial_ms: 50,
                backoff_max_ms: 1_000,
            },
            sampling: SamplingConfig::default(),
            source: SourceConfig::Sim {
                scenario: PathBuf::new(),
                speed: 1.0,
            },
            state_dir: state_dir.to_path_buf(),
            spool: SpoolSettings::default(),
            enforcement: EnforcementConfig::default(),
            metrics_listen: None,
            metrics_dcgm_compat: false,
            attribution: AttributionConfig::default(),
        }
    }

    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut c: AgentConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if c.host_id.is_empty() {
            c.host_id = c.agent_id.clone();
        }
        c.validate()?;
        Ok(c)
    }

    /// Reads, parses and validates a config file. Relative certificate paths are relative
    /// to the file's directory, and each must be readable.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut c = Self::from_toml(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let c2 = &mut c.collector;
        for (field, v) in [
            ("collector.ca_cert", &mut c2.ca_cert),
            ("collector.client_cert", &mut c2.client_cert),
            ("collector.client_key", &mut c2.client_key),
        ] {
            if let Some(p) = v {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
                std::fs::File::open(&*p)
                    .map_err(|e| invalid(field, format!("cannot read {}: {e}", p.display())))?;
            }
        }
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        };
        if !ident(&self.agent_id) {
            return Err(invalid(
                "agent_id",
                "must be 1-128 characters of letters, digits, '-', '_', '.', ':'",
            ));
        }
        if !ident(&self.host_id) {
            return Err(invalid(
                "host_id",
                "must be 1-128 characters of letters, digits, '-', '_', '.', ':'",
            ));
        }
        if self.csp.trim().is_empty() {
            return Err(invalid("csp", "must not be empty"));
        }
        if !self.attribution.proc_root.is_absolute() {
            return Err(invalid(
                "attribution.proc_root",
                "must be an absolute path (the host's procfs)",
            ));
        }
        if let Some(sock) = &self.attribution.kubelet_pod_resources_socket {
            if !sock.is_absolute() {
                return Err(invalid(
                    "attribution.kubelet_pod_resources_socket",
                    "must be an absolute path (the kubelet's pod-resources socket)",
                ));
            }
        }
        if !(1_000..=600_000).contains(&self.attribution.kubelet_refresh_ms) {
            return Err(invalid(
                "attribution.kubelet_refresh_ms",
                "must be 1000..=600000 (the kubelet rate-limits its pod-resources API)",
            ));
        }
        let url = &self.collector.url;
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return Err(invalid(
                "collector.url",
                format!("{url:?} is not an http:// or https:// URL"),
            ));
        }
        if url.starts_with("https://") {
            let c = &self.collector;
            for (field, v) in [
                ("collector.ca_cert", &c.ca_cert),
                ("collector.client_cert", &c.client_cert),
                ("collector.client_key", &c.client_key),
            ] {
                if v.as_ref().is_none_or(|p| p.as_os_str().is_empty()) {
                    return Err(invalid(
                        field,
                        "required with an https:// url (from `gpumeter-collector ca issue-agent`)",
                    ));
                }
            }
        } else if self.collector.ca_cert.is_some()
            || self.collector.client_cert.is_some()
            || self.collector.client_key.is_some()
        {
            return Err(invalid(
                "collector.url",
                "certificates are given but the url is http://; use https://",
            ));
        }
        if self.collector.max_batch_records == 0 || self.collector.max_batch_records > 10_000 {
            return Err(invalid("collector.max_batch_records", "must be 1..=10000"));
        }
        if self.collector.backoff_initial_ms == 0
            || self.collector.backoff_max_ms < self.collector.backoff_initial_ms
        {
            return Err(invalid(
                "collector.backoff_max_ms",
                "backoff_initial_ms must be positive and not above backoff_max_ms",
            ));
        }
        let s = &self.sampling;
        if s.interval_ms < 1_000 && !matches!(self.source, SourceConfig::Sim { .. }) {
            return Err(invalid("sampling.interval_ms", "must be at least 1000"));
        }
        if s.interval_ms == 0 {
            return Err(invalid("sampling.interval_ms", "must be positive"));
        }
        if s.window_ms < s.interval_ms || s.window_ms % s.interval_ms != 0 {
            return Err(invalid(
                "sampling.window_ms",
                "must be a positive multiple of sampling.interval_ms",
            ));
        }
        if 86_400_000 % s.window_ms != 0 {
            return Err(invalid("sampling.window_ms", "must divide a day evenly"));
        }
        if let SourceConfig::Sim { speed, .. } = &self.source {
            if !(speed.is_finite() && *speed > 0.0 && *speed <= 100_000.0) {
                return Err(invalid("source.speed", "must be in (0, 100000]"));
            }
        }
        if let Some(l) = &self.metrics_listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "metrics_listen",
                    format!("{l:?} is not an address like 127.0.0.1:9400"),
                ));
            }
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(invalid("state_dir", "must not be empty"));
        }
        if self.spool.segment_bytes < 4096 || self.spool.max_bytes < self.spool.segment_bytes {
            return Err(invalid(
                "spool.max_bytes",
                "segment_bytes must be at least 4096 and max_bytes at least segment_bytes",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/config/agent.md");
        let written = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            written == reference(),
            "docs/config/agent.md is stale: regenerate it with `gpumeter-agent config-reference > docs/config/agent.md`"
        );
        assert!(written.contains("`interval_ms`"), "{written}");
    }

    const GOOD: &str = r#"
agent_id = "kt-gpu-001"
csp = "kt"
state_dir = "/var/lib/gpumeter"
[collector]
url = "http://127.0.0.1:7070"
"#;

    fn parse(t: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml(t, Path::new("agent.toml"))
    }

    #[test]
    fn defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.host_id, "kt-gpu-001");
        assert_eq!(c.sampling, SamplingConfig::default());
        assert_eq!(c.source, SourceConfig::Nvml);
        assert_eq!(c.enforcement.mode, EnforcementMode::Observe);
        assert!(!c.enforcement.lock_unassigned);
        assert_eq!(c.attribution.proc_root, PathBuf::from("/proc"));
        let host = parse(&format!(
            "{GOOD}[attribution]\nproc_root = \"/host/proc\"\n"
        ))
        .unwrap();
        assert_eq!(host.attribution.proc_root, PathBuf::from("/host/proc"));
        assert_eq!(c.attribution.kubelet_pod_resources_socket, None);
        assert_eq!(c.attribution.kubelet_refresh_ms, 10_000);
        let k8s = parse(&format!(
            "{GOOD}[attribution]\nkubelet_pod_resources_socket = \"/var/lib/kubelet/pod-resources/kubelet.sock\"\n"
        ))
        .unwrap();
        assert_eq!(
            k8s.attribution.kubelet_pod_resources_socket.as_deref(),
            Some(Path::new("/var/lib/kubelet/pod-resources/kubelet.sock"))
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (GOOD.replace("kt-gpu-001", "bad id!"), "agent_id"),
            (
                format!("{GOOD}[attribution]\nproc_root = \"proc\"\n"),
                "attribution.proc_root",
            ),
            (
                format!("{GOOD}[attribution]\nkubelet_pod_resources_socket = \"kubelet.sock\"\n"),
                "attribution.kubelet_pod_resources_socket",
            ),
            (
                format!("{GOOD}[attribution]\nkubelet_refresh_ms = 10\n"),
                "attribution.kubelet_refresh_ms",
            ),
            (
                GOOD.replace("http://127.0.0.1:7070", "127.0.0.1"),
                "collector.url",
            ),
            (
                format!("{GOOD}[sampling]\ninterval_ms = 1000\nwindow_ms = 1500\n"),
                "sampling.window_ms",
            ),
            (
                format!("{GOOD}[sampling]\ninterval_ms = 10\n"),
                "sampling.interval_ms",
            ),
            (GOOD.replace("csp = \"kt\"", "csp = \" \""), "csp"),
            (GOOD.replace("http://", "https://"), "collector.ca_cert"),
            (
                GOOD.replace("http://", "https://")
                    + "ca_cert = \"ca.pem\"\nclient_cert = \"a.pem\"\n",
                "collector.client_key",
            ),
            (GOOD.to_string() + "ca_cert = \"ca.pem\"\n", "collector.url"),
        ];
        for (text, field) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let e = parse(&format!("{GOOD}bogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("agent_id = 5").unwrap_err().to_string();
        assert!(e.contains("agent.toml"), "{e}");
    }
}

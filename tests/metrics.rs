//! The operators' endpoints of both programs, over real HTTP on loopback: the real
//! `gpumeter-agent` binary on the fake libnvidia-ml (through the real nvml-wrapper path) and an
//! in-process collector. Per-card series carry their labels and the values the driver gave; a
//! field the card does not support is absent, never 0; the dcgm-exporter compatible family
//! appears when asked for; `/healthz` and `/readyz` answer; and `promtool check metrics`
//! (Debian's `prometheus` package) accepts both scrapes. Without promtool the check says
//! `skipping: …`, which GPUMETER_REQUIRE_ALL (set by .ci/run) turns into a failure.

// Helpers outside `#[test]` fns too: in a test, a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpumeter_agent::clock::align_down;
use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_collector::server::ServerOptions;
use gpumeter_collector::store::sqlite::SqliteStore;
use gpumeter_collector::store::{Alarm, Store};
use gpumeter_e2e::{TestCollector, agent_config, bin, now_ms, spawn_sim_agent, target_dir};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BUSY: &str = "GPU-7e0c1a2b-0000-4000-8000-00000000a001";
const BARE: &str = "GPU-7e0c1a2b-0000-4000-8000-00000000b002";
const PATIENCE: Duration = Duration::from_secs(30);
const GIB: u64 = 1 << 30;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 exchange; returns (status code, body).
async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut c = tokio::net::TcpStream::connect(addr).await.ok()?;
    c.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).await.ok()?;
    let code = s.get(9..12)?.parse().ok()?;
    let body = s.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The value of the one series of `name` whose labels include every `labels` pair.
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        let (labelset, v) = match rest.strip_prefix('{') {
            Some(r) => r.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        labels
            .iter()
            .all(|(k, want)| labelset.contains(&format!("{k}=\"{want}\"")))
            .then(|| v.trim().parse().ok())?
    })
}

/// promtool's complaints about `scrape`, one per line (none: it passes); `None` when promtool
/// is missing (a skip, or a failure in CI).
fn promtool_problems(scrape: &str) -> Option<Vec<String>> {
    let promtool = std::env::var("GPUMETER_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let Ok(mut child) = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        if std::env::var_os("GPUMETER_REQUIRE_ALL").is_some() {
            panic!("promtool not installed, and GPUMETER_REQUIRE_ALL is set");
        }
        let _ = writeln!(std::io::stderr(), "skipping: promtool not installed");
        return None;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let problems: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        out.status.success(),
        problems.is_empty(),
        "promtool: {text}"
    );
    Some(problems)
}

/// `promtool check metrics` on `scrape`; a missing promtool is a skip (or a failure in CI).
fn promtool_accepts(what: &str, scrape: &str) {
    if let Some(problems) = promtool_problems(scrape) {
        assert!(
            problems.is_empty(),
            "promtool check metrics refuses the {what} scrape:\n{}\n--- scrape:\n{scrape}",
            problems.join("\n")
        );
    }
}

/// Every metric name the Grafana dashboard's queries use (deploy/grafana/gpumeter.json).
fn dashboard_metrics() -> std::collections::BTreeSet<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/gpumeter.json"
    );
    let dash: serde_json::Value = serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(q)) => out.push(q.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut queries);
    let names: std::collections::BTreeSet<String> = queries
        .iter()
        .flat_map(|q| {
            q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .filter(|t| t.starts_with("gpumeter_") || t.starts_with("DCGM_"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        names.len() >= 10,
        "the dashboard names too few metrics: {names:?}"
    );
    names
}

/// Each dashboard metric with one of `prefixes` appears in `scrape`.
fn dashboard_covered_by(scrape: &str, prefixes: &[&str]) {
    let exported: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    for name in dashboard_metrics() {
        if prefixes.iter().any(|p| name.starts_with(p)) {
            assert!(
                exported.contains(name.as_str()),
                "the dashboard queries {name}, which is not exported"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_exports_every_card_with_labels_and_health() {
    let agent_bin = bin("gpumeter-agent");
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    fs::copy(target_dir().join("libnvidia_ml.so"), &lib).unwrap();
    let scenario = json!({"cards": [
        {"uuid": BUSY, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * GIB,
         "util_gpu": 73, "util_mem": 20, "memory_used": 10 * GIB, "power_mw": 250_000,
         "energy_mj": 5_000_000, "temperature_c": 61, "sm_clock_mhz": 1980,
         "mem_clock_mhz": 2619, "ecc_corrected": 3,
         "xid_events": [{"code": 31, "seq": 1}, {"code": 31, "seq": 2}, {"code": 13, "seq": 1}]},
        {"uuid": BARE, "name": "NVIDIA L4", "memory_total": 24 * GIB, "util_gpu": 5,
         "not_supported": ["power", "temperature", "energy"]}
    ]});
    fs::write(
        dir.path().join("fake-nvml-scenario.json"),
        scenario.to_string(),
    )
    .unwrap();
    let metrics = free_port();
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        format!(
            r#"agent_id = "metrics-e2e"
csp = "kt"
state_dir = "{state}"
metrics_listen = "{metrics}"
metrics_dcgm_compat = true

[collector]
url = "http://127.0.0.1:1"
backoff_initial_ms = 200
backoff_max_ms = 1000

[source]
kind = "nvml-lib"
path = "{lib}"
"#,
            state = dir.path().join("state").display(),
            lib = lib.display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let _agent = Killed(
        Command::new(agent_bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("GPUMETER_FAKE_NVML_SCENARIO")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + PATIENCE;
    let scrape = loop {
        if let Some((200, body)) = http(metrics, "GET", "/metrics").await {
            let xids = value(
                &body,
                "gpumeter_gpu_xid_errors_total",
                &[("uuid", BUSY), ("xid", "31")],
            );
            if value(&body, "gpumeter_gpu_utilization_ratio", &[("uuid", BUSY)]).is_some()
                && xids == Some(2.0)
            {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no per-card metrics in time; log:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let busy = [
        ("uuid", BUSY),
        ("gpu", "0"),
        ("model_name", "NVIDIA H100 80GB HBM3"),
        ("csp", "kt"),
        ("grant", ""),
    ];
    let v = |name: &str| value(&scrape, name, &busy);
    assert_eq!(v("gpumeter_gpu_up"), Some(1.0), "{scrape}");
    assert_eq!(v("gpumeter_gpu_utilization_ratio"), Some(0.73), "{scrape}");
    assert_eq!(
        v("gpumeter_gpu_memory_utilization_ratio"),
        Some(0.2),
        "{scrape}"
    );
    assert_eq!(v("gpumeter_gpu_memory_used_bytes"), Some((10 * GIB) as f64));
    assert_eq!(v("gpumeter_gpu_memory_free_bytes"), Some((70 * GIB) as f64));
    assert_eq!(v("gpumeter_gpu_power_watts"), Some(250.0));
    assert_eq!(v("gpumeter_gpu_energy_joules_total"), Some(5000.0));
    assert_eq!(v("gpumeter_gpu_temperature_celsius"), Some(61.0));
    assert_eq!(v("gpumeter_gpu_sm_clock_hertz"), Some(1.98e9));
    assert_eq!(v("gpumeter_gpu_memory_clock_hertz"), Some(2.619e9));
    assert_eq!(
        value(
            &scrape,
            "gpumeter_gpu_ecc_errors_total",
            &[("uuid", BUSY), ("type", "corrected")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &scrape,
            "gpumeter_gpu_xid_errors_total",
            &[("uuid", BUSY), ("xid", "13")]
        ),
        Some(1.0)
    );
    // Not supported on the L4: absent, never 0.
    assert_eq!(
        value(&scrape, "gpumeter_gpu_utilization_ratio", &[("uuid", BARE)]),
        Some(0.05)
    );
    for absent in [
        "gpumeter_gpu_power_watts",
        "gpumeter_gpu_temperature_celsius",
        "gpumeter_gpu_energy_joules_total",
    ] {
        assert_eq!(
            value(&scrape, absent, &[("uuid", BARE)]),
            None,
            "{absent} for the L4:\n{scrape}"
        );
    }
    // The dcgm-exporter family, with its units and labels.
    let dcgm = [
        ("UUID", BUSY),
        ("gpu", "0"),
        ("device", "nvidia0"),
        ("modelName", "NVIDIA H100 80GB HBM3"),
    ];
    assert_eq!(value(&scrape, "DCGM_FI_DEV_GPU_UTIL", &dcgm), Some(73.0));
    assert_eq!(value(&scrape, "DCGM_FI_DEV_FB_USED", &dcgm), Some(10240.0));
    assert_eq!(
        value(&scrape, "DCGM_FI_DEV_POWER_USAGE", &dcgm),
        Some(250.0)
    );
    assert_eq!(
        value(&scrape, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", &dcgm),
        Some(5_000_000.0)
    );
    assert_eq!(value(&scrape, "DCGM_FI_DEV_GPU_TEMP", &dcgm), Some(61.0));
    // The pipeline: records are spooled, none acknowledged (no collector answers).
    let agent = [("agent_id", "metrics-e2e")];
    assert!(
        value(&scrape, "gpumeter_agent_head_seq", &agent).unwrap() >= 1.0,
        "{scrape}"
    );
    assert_eq!(
        value(&scrape, "gpumeter_agent_acked_seq", &agent),
        Some(0.0)
    );
    assert_eq!(
        value(&scrape, "gpumeter_agent_collector_connected", &agent),
        Some(0.0)
    );
    assert!(
        value(
            &scrape,
            "gpumeter_agent_spool_oldest_record_age_seconds",
            &agent
        )
        .is_some()
    );

    assert_eq!(
        http(metrics, "GET", "/healthz").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http(metrics, "GET", "/readyz").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http(metrics, "HEAD", "/metrics").await.map(|r| r.0),
        Some(200)
    );
    let q = http(metrics, "GET", "/metrics?collect%5B%5D=gpu")
        .await
        .unwrap();
    assert_eq!(q.0, 200);
    assert!(q.1.contains("gpumeter_gpu_up"));
    // gpumeter's own families pass promtool whole. dcgm-exporter's family keeps its
    // camelCase labels on purpose, which promtool's lint names and nothing else.
    let (dcgm_lines, own): (Vec<&str>, Vec<&str>) =
        scrape.lines().partition(|l| l.contains("DCGM_FI_"));
    promtool_accepts("agent", &(own.join("\n") + "\n"));
    dashboard_covered_by(&scrape, &["gpumeter_gpu_", "gpumeter_agent_", "DCGM_"]);
    if let Some(complaints) = promtool_problems(&(dcgm_lines.join("\n") + "\n")) {
        assert!(!complaints.is_empty());
        for c in &complaints {
            assert!(
                c.starts_with("DCGM_FI_")
                    && c.ends_with("label names should be written in 'snake_case' not 'camelCase'"),
                "unexpected promtool complaint about the dcgm family: {c}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_exports_ingest_and_health() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let metrics = free_port();
    // The simulated agent replays the last hour, which production limits would refuse.
    let opts = ServerOptions {
        collector_id: "metrics-e2e".into(),
        metrics_listen: Some(metrics),
        ..gpumeter_e2e::replay_options()
    };
    let collector = TestCollector::start_with(&db, "127.0.0.1:0", opts)
        .await
        .unwrap();
    let scenario: Scenario = toml::from_str(
        r#"
[[cards]]
uuid = "GPU-7e0c1a2b-0000-4000-8000-00000000c003"
[[cards.phases]]
from_s = 0
util_pct = 40
"#,
    )
    .unwrap();
    let start = align_down(now_ms() - 3_600_000, 60_000);
    let agent = spawn_sim_agent(
        agent_config(
            "metrics-sim",
            "kt",
            &collector.url,
            &dir.path().join("sim"),
            4,
        ),
        scenario,
        start,
        start + 600_000,
        5_000.0,
    )
    .unwrap();
    tokio::time::timeout(PATIENCE, agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // An alarm of its own kind, stored the way the collector stores every alarm.
    let store = SqliteStore::open(&db).unwrap();
    store
        .alarm(&Alarm {
            agent_id: "metrics-sim".into(),
            at_ms: now_ms(),
            kind: "metrics_probe".into(),
            seq: None,
            detail: "stored by the metrics test".into(),
        })
        .unwrap();
    let held = store.alarms(None).unwrap();

    let (code, scrape) = http(metrics, "GET", "/metrics").await.unwrap();
    assert_eq!(code, 200);
    let id = [("collector_id", "metrics-e2e")];
    assert_eq!(
        value(&scrape, "gpumeter_collector_live_sessions", &id),
        Some(0.0),
        "{scrape}"
    );
    assert!(
        value(&scrape, "gpumeter_collector_commits_total", &id).unwrap() >= 1.0,
        "{scrape}"
    );
    // 10 windows and the agent's start event, at least (batches of 4 records).
    assert!(
        value(&scrape, "gpumeter_collector_records_committed_total", &id).unwrap() >= 11.0,
        "{scrape}"
    );
    assert_eq!(
        value(&scrape, "gpumeter_collector_failed_commits_total", &id),
        Some(0.0)
    );
    assert!(value(&scrape, "gpumeter_collector_database_bytes", &id).unwrap() > 0.0);
    let sim = [("agent_id", "metrics-sim"), ("csp", "kt")];
    assert!(
        value(&scrape, "gpumeter_collector_agent_durable_seq", &sim).unwrap() >= 11.0,
        "{scrape}"
    );
    assert!(
        value(
            &scrape,
            "gpumeter_collector_agent_last_seen_age_seconds",
            &sim
        )
        .is_some()
    );
    for kind in held
        .iter()
        .map(|a| a.kind.as_str())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let n = held.iter().filter(|a| a.kind == kind).count() as f64;
        assert_eq!(
            value(
                &scrape,
                "gpumeter_collector_alarms_total",
                &[("kind", kind)]
            ),
            Some(n),
            "{scrape}"
        );
    }
    assert_eq!(
        value(
            &scrape,
            "gpumeter_collector_alarms_total",
            &[("kind", "metrics_probe")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &scrape,
            "gpumeter_collector_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    let commits = value(&scrape, "gpumeter_collector_commits_total", &id).unwrap();
    let observed = value(
        &scrape,
        "gpumeter_collector_commit_latency_seconds_count",
        &id,
    )
    .unwrap_or(
        value(
            &scrape,
            "gpumeter_collector_commit_latency_seconds_count",
            &[],
        )
        .unwrap(),
    );
    assert!(
        observed >= commits,
        "every committed batch is timed: {scrape}"
    );
    assert_eq!(
        http(metrics, "GET", "/healthz").await.map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http(metrics, "GET", "/readyz").await.map(|r| r.0),
        Some(200)
    );
    promtool_accepts("collector", &scrape);
    dashboard_covered_by(&scrape, &["gpumeter_collector_"]);
    collector.stop().await.unwrap();
}

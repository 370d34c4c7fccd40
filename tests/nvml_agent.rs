//! The real `gpumeter-agent` binary against the fake libnvidia-ml, through the real nvml-wrapper
//! path, streaming to a real in-process collector on port 0 with a real SQLite file; what the
//! collector stored is checked exactly.
//!
//! Exact yet robust to a loaded machine: every figure is built so that it does not depend on
//! when the agent's reads happen. Utilization is constant between scenario changes (or comes
//! in one explicit sample batch that exactly one read can take); the energy counter is fixed
//! and stepped between windows, so each step shows up whole in exactly one window; a slot the
//! agent misses only lowers a window's sample count, which the checks read from the row.
//!
//! Each test copies the fake library into its own temp directory beside its own scenario file,
//! so the tests run in parallel without sharing driver state. The first test starts a process
//! under uid 65534, so it runs as root (as the enforcement tests do).

// Helpers outside `#[test]` fns too: in a test, a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpumeter_e2e::{TestCollector, bin, target_dir};
use rusqlite::Connection;
use serde_json::{Value, json};
use tempfile::TempDir;

const INTERVAL_MS: i64 = 1_000;
/// Short windows keep each test under about 20 s; 4 s divides a day, as the config requires.
const WINDOW_MS: i64 = 4_000;
/// How long any one awaited state may take on a slow, shared machine.
const PATIENCE: Duration = Duration::from_secs(30);
const NOBODY: u32 = 65_534;
const GIB: u64 = 1 << 30;
const SCENARIO_FILE: &str = "fake-nvml-scenario.json";

const H100: &str = "GPU-4a1b2c3d-0000-4000-8000-0000000000a1";
const A100: &str = "GPU-4a1b2c3d-0000-4000-8000-0000000000b2";
const L4: &str = "GPU-4a1b2c3d-0000-4000-8000-0000000000c3";

// ---- harness ----

/// One test's world: its copy of the fake driver, a collector and the agent binary.
struct Rig {
    dir: TempDir,
    collector: Option<TestCollector>,
    conn: Connection,
    agent: Option<AgentProcess>,
}

/// The agent binary, killed and reaped however the test ends.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `sleep 60` children standing in for GPU processes, killed and reaped at the end.
#[derive(Default)]
struct Sleepers(Vec<Child>);

impl Sleepers {
    fn spawn(&mut self, uid: Option<u32>) -> u32 {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        if let Some(u) = uid {
            cmd.uid(u).gid(u);
        }
        let child = cmd.spawn().expect("spawn sleep (another uid needs root)");
        let pid = child.id();
        self.0.push(child);
        pid
    }
}

impl Drop for Sleepers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn assert_root() {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let uid = gpumeter_agent::attribution::parse_status(&status).uid;
    assert_eq!(
        uid,
        Some(0),
        "these tests start a process under uid {NOBODY} and must run as root"
    );
}

/// The label a process of `uid` is reported under, read from /etc/passwd here (not through the
/// agent's code): `user:NAME`, or `uid:N` where the uid has no name.
fn label_of(uid: u32) -> String {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| format!("user:{}", f[0]))
        })
        .unwrap_or_else(|| format!("uid:{uid}"))
}

fn now_us() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros(),
    )
    .unwrap()
}

impl Rig {
    /// Starts the collector, writes the scenario and starts the agent binary on the fake.
    async fn start(scenario: &Value) -> Rig {
        assert!(
            std::env::var_os("GPUMETER_FAKE_NVML_SCENARIO").is_none(),
            "unset GPUMETER_FAKE_NVML_SCENARIO: it overrides every test's own scenario"
        );
        // Builds the binaries and the fake library (target/<profile>/libnvidia_ml.so).
        let agent_bin = bin("gpumeter-agent");
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnvidia-ml.so.1");
        fs::copy(target_dir().join("libnvidia_ml.so"), &lib).unwrap();
        let db = dir.path().join("ledger.db");
        let collector = TestCollector::start(&db).await.unwrap();
        let conn = Connection::open(&db).unwrap();
        let rig = Rig {
            dir,
            collector: Some(collector),
            conn,
            agent: None,
        };
        rig.set(scenario);

        let cfg = rig.dir.path().join("agent.toml");
        fs::write(
            &cfg,
            format!(
                r#"agent_id = "nvml-e2e"
csp = "kt"
state_dir = "{state}"

[collector]
url = "{url}"
{tls}backoff_initial_ms = 50
backoff_max_ms = 500

[sampling]
interval_ms = {INTERVAL_MS}
window_ms = {WINDOW_MS}

[source]
kind = "nvml-lib"
path = "{lib}"
"#,
                state = rig.dir.path().join("state").display(),
                url = rig.collector.as_ref().unwrap().url,
                tls = gpumeter_e2e::agent_tls_toml(
                    "nvml-e2e",
                    "nvml-e2e",
                    &rig.dir.path().join("tls")
                ),
                lib = lib.display(),
            ),
        )
        .unwrap();
        let log = rig.dir.path().join("agent.log");
        let child = Command::new(agent_bin)
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("GPUMETER_FAKE_NVML_SCENARIO")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Rig {
            agent: Some(AgentProcess { child, log }),
            ..rig
        }
    }

    /// Replaces the scenario by rename, so the library never reads half a file.
    fn set(&self, scenario: &Value) {
        let tmp = self.dir.path().join("scenario.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(scenario).unwrap()).unwrap();
        fs::rename(&tmp, self.dir.path().join(SCENARIO_FILE)).unwrap();
    }

    fn log(&self) -> String {
        self.agent
            .as_ref()
            .and_then(|a| fs::read_to_string(&a.log).ok())
            .unwrap_or_default()
    }

    /// Polls `probe` until it gives a value; fails with the agent's log when `PATIENCE` runs out
    /// or the agent exits.
    async fn until<T>(&mut self, what: &str, mut probe: impl FnMut(&Connection) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(v) = probe(&self.conn) {
                return v;
            }
            let exited = self
                .agent
                .as_mut()
                .and_then(|a| a.child.try_wait().unwrap());
            assert!(
                exited.is_none(),
                "the agent exited ({exited:?}) while waiting for {what}; log:\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then the agent must exit 0 in time; then the collector stops.
    async fn stop(&mut self) {
        let mut agent = self.agent.take().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&agent.child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(st) = agent.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "the agent ignores SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = fs::read_to_string(&agent.log).unwrap_or_default();
        assert!(status.success(), "agent exit {status:?}; log:\n{log}");
        assert!(!log.contains("panicked"), "{log}");
        self.collector.take().unwrap().stop().await.unwrap();
    }
}

// ---- reading the ledger ----

/// One row of the collector's `windows` table.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    seq: i64,
    start: i64,
    end: i64,
    expected: i64,
    good: i64,
    util_avg: Option<f64>,
    util_max: Option<f64>,
    mem_util_avg: Option<f64>,
    mem_used_max: Option<i64>,
    energy: Option<i64>,
    energy_estimated: bool,
    energy_estimated_mj: Option<i64>,
    power_avg: Option<f64>,
    temperature_max: Option<i64>,
    throttle: Option<i64>,
    health: String,
    unavailable_ms: i64,
    active_ms: i64,
    occupied_ms: i64,
    foreign_ms: i64,
}

fn windows(conn: &Connection, uuid: &str) -> Vec<Window> {
    let mut st = conn
        .prepare(
            "SELECT seq, start_ms, end_ms, expected_samples, good_samples, util_avg_pct,
                    util_max_pct, mem_util_avg_pct, memory_used_max_bytes, energy_mj,
                    energy_estimated, power_avg_w, temperature_max_c, throttle_reasons, health,
                    unavailable_ms, active_ms, occupied_ms, foreign_ms, energy_estimated_mj
             FROM windows WHERE gpu_uuid = ?1 ORDER BY start_ms",
        )
        .unwrap();
    st.query_map([uuid], |r| {
        Ok(Window {
            seq: r.get(0)?,
            start: r.get(1)?,
            end: r.get(2)?,
            expected: r.get(3)?,
            good: r.get(4)?,
            util_avg: r.get(5)?,
            util_max: r.get(6)?,
            mem_util_avg: r.get(7)?,
            mem_used_max: r.get(8)?,
            energy: r.get(9)?,
            energy_estimated: r.get(10)?,
            power_avg: r.get(11)?,
            temperature_max: r.get(12)?,
            throttle: r.get(13)?,
            health: r.get(14)?,
            unavailable_ms: r.get(15)?,
            active_ms: r.get(16)?,
            occupied_ms: r.get(17)?,
            foreign_ms: r.get(18)?,
            energy_estimated_mj: r.get(19)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// One row of `window_principals`.
#[derive(Debug, Clone, PartialEq)]
struct Principal {
    principal: String,
    uid: Option<i64>,
    occupied_ms: i64,
    active_ms: i64,
    memory_max: i64,
    processes: i64,
    matches_grant: bool,
}

fn principals(conn: &Connection, seq: i64) -> Vec<Principal> {
    let mut st = conn
        .prepare(
            "SELECT principal, uid, occupied_ms, active_ms, memory_max_bytes, process_count,
                    matches_grant
             FROM window_principals WHERE agent_id = 'nvml-e2e' AND seq = ?1 ORDER BY principal",
        )
        .unwrap();
    st.query_map([seq], |r| {
        Ok(Principal {
            principal: r.get(0)?,
            uid: r.get(1)?,
            occupied_ms: r.get(2)?,
            active_ms: r.get(3)?,
            memory_max: r.get(4)?,
            processes: r.get(5)?,
            matches_grant: r.get(6)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// Events of one kind, counted by (card, code).
fn event_counts(conn: &Connection, kind: &str) -> BTreeMap<(String, i64), i64> {
    let mut st = conn
        .prepare(
            "SELECT gpu_uuid, code, COUNT(*) FROM events WHERE kind = ?1
             GROUP BY gpu_uuid, code",
        )
        .unwrap();
    st.query_map([kind], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn counts(pairs: &[(&str, i64, i64)]) -> BTreeMap<(String, i64), i64> {
    pairs
        .iter()
        .map(|(uuid, code, n)| (((*uuid).to_owned(), *code), *n))
        .collect()
}

/// Windows of one card follow each other without gap or overlap, each inside its period of
/// `WINDOW_MS` aligned to the clock and spanning the intervals it sampled: the whole period,
/// except that the first may start late (the agent started inside it) and the last end early.
fn assert_contiguous(uuid: &str, ws: &[Window]) {
    for (i, w) in ws.iter().enumerate() {
        let period = w.start - w.start.rem_euclid(WINDOW_MS);
        assert_eq!(
            w.end - w.start,
            w.expected * INTERVAL_MS,
            "{uuid}: spans its samples: {w:?}"
        );
        assert!(
            w.end <= period + WINDOW_MS,
            "{uuid}: inside its period: {w:?}"
        );
        assert!(
            i == 0 || w.start == period,
            "{uuid}: only the first window starts late: {w:?}"
        );
        assert!(
            i + 1 == ws.len() || w.end == period + WINDOW_MS,
            "{uuid}: only the last window ends early: {w:?}"
        );
        assert!(
            (1..=WINDOW_MS / INTERVAL_MS).contains(&w.expected) && w.good <= w.expected,
            "{uuid}: {w:?}"
        );
    }
    for pair in ws.windows(2) {
        assert_eq!(pair[0].end, pair[1].start, "{uuid}: contiguous: {ws:#?}");
    }
}

/// The nonzero energies of a card's windows, in order.
fn energy_steps(ws: &[Window]) -> Vec<i64> {
    ws.iter()
        .filter_map(|w| w.energy)
        .filter(|e| *e != 0)
        .collect()
}

// ---- scenarios ----

/// An H100 with two processes (pids filled in by the test) and every field supported.
fn h100(energy_mj: u64, pids: (u32, u32)) -> Value {
    json!({
        "uuid": H100,
        "name": "NVIDIA H100 80GB HBM3",
        "serial": "1650123456789",
        "pci_bus_id": "00000000:17:00.0",
        "memory_total": 80 * GIB,
        "mig_mode": false,
        "util_gpu": 40, "util_mem": 12,
        "memory_used": 8 * GIB,
        "power_mw": 250_000, "energy_mj": energy_mj,
        "temperature_c": 61, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
        "throttle_reasons": 4,
        // A fresh sample every millisecond: every read finds new ones, however close the
        // reads fall, so the per-process split never falls back to equal shares.
        "sample_period_us": 1000,
        "processes": [
            { "pid": pids.0, "used_memory": GIB, "sm_util": 30 },
            { "pid": pids.1, "used_memory": GIB / 2, "sm_util": 10 }
        ]
    })
}

/// An A100 without a sample buffer (utilization comes from `utilization_rates`), without power
/// and temperature readings, without a serial number and without MIG.
fn a100(energy_mj: u64) -> Value {
    json!({
        "uuid": A100,
        "name": "NVIDIA A100-SXM4-40GB",
        "pci_bus_id": "00000000:65:00.0",
        "memory_total": 40 * GIB,
        "util_gpu": 64, "util_mem": 16,
        "memory_used": 2 * GIB,
        "energy_mj": energy_mj,
        "samples_supported": false,
        "not_supported": ["power", "temperature"]
    })
}

/// A card that answers almost nothing but its name and UUID.
fn l4() -> Value {
    json!({
        "uuid": L4,
        "name": "NVIDIA L4",
        "memory_total": 24 * GIB,
        "util_gpu": 99, "memory_used": GIB, "power_mw": 70_000, "energy_mj": 9_000,
        "temperature_c": 80, "throttle_reasons": 1,
        "not_supported": [
            "pci", "memory", "utilization", "samples", "process_utilization", "energy",
            "power", "temperature", "clocks", "throttle", "ecc"
        ]
    })
}

// ---- tests ----

/// Inventory, utilization (sample buffer and the `utilization_rates` fallback), energy,
/// per-process attribution by real uid, and fields the card does not support stored as NULL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_meters_fake_cards_exactly() {
    assert_root();
    let mut sleepers = Sleepers::default();
    let root_pid = sleepers.spawn(None);
    let nobody_pid = sleepers.spawn(Some(NOBODY));
    let pids = (root_pid, nobody_pid);
    let (h100_e0, a100_e0) = (1_000_000_u64, 5_000_u64);
    let scenario = |h: u64, a: u64| json!({ "driver_version": "550.54.15", "cards": [h100(h, pids), a100(a), l4()] });
    let mut rig = Rig::start(&scenario(h100_e0, a100_e0)).await;

    // The first windows prove the agent has taken its energy baseline.
    rig.until("a first window of every card", |c| {
        [H100, A100, L4]
            .iter()
            .all(|u| !windows(c, u).is_empty())
            .then_some(())
    })
    .await;
    // Energy steps between windows: each must appear whole in exactly one window.
    let (h1, a1) = (7_777_u64, 333_u64);
    rig.set(&scenario(h100_e0 + h1, a100_e0 + a1));
    rig.until("the first energy step", |c| {
        (energy_steps(&windows(c, H100)) == [h1 as i64]
            && energy_steps(&windows(c, A100)) == [a1 as i64])
        .then_some(())
    })
    .await;
    let (h2, a2) = (12_345_u64, 1_u64);
    rig.set(&scenario(h100_e0 + h1 + h2, a100_e0 + a1 + a2));
    rig.until("the second energy step", |c| {
        (energy_steps(&windows(c, H100)).len() == 2 && energy_steps(&windows(c, A100)).len() == 2)
            .then_some(())
    })
    .await;
    rig.stop().await;
    let conn = &rig.conn;

    // Inventory, exactly as the driver reported it.
    let mut st = conn
        .prepare(
            "SELECT gpu_uuid, agent_id, idx, name, serial, pci_bus_id, memory_total_bytes, mig_mode
             FROM gpus ORDER BY idx",
        )
        .unwrap();
    type Gpu = (
        String,
        String,
        i64,
        String,
        String,
        String,
        Option<i64>,
        String,
    );
    let gpus: Vec<Gpu> = st
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let gib = |n: u64| Some(i64::try_from(n * GIB).unwrap());
    let agent = "nvml-e2e".to_owned();
    assert_eq!(
        gpus,
        vec![
            (
                H100.into(),
                agent.clone(),
                0,
                "NVIDIA H100 80GB HBM3".into(),
                "1650123456789".into(),
                "00000000:17:00.0".into(),
                gib(80),
                "disabled".into()
            ),
            (
                A100.into(),
                agent.clone(),
                1,
                "NVIDIA A100-SXM4-40GB".into(),
                String::new(),
                "00000000:65:00.0".into(),
                gib(40),
                String::new()
            ),
            // No PCI info, no memory info: empty and NULL, not zero.
            (
                L4.into(),
                agent,
                2,
                "NVIDIA L4".into(),
                String::new(),
                String::new(),
                None,
                String::new()
            ),
        ]
    );
    let driver: String = conn
        .query_row(
            "SELECT driver_version FROM agents WHERE agent_id = 'nvml-e2e'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(driver, "550.54.15");

    // H100: constant utilization from the sample buffer, two principals split 30:10 by their
    // SM samples, the counter's steps and nothing else.
    let root = label_of(0);
    let nobody = label_of(NOBODY);
    let hw = windows(conn, H100);
    assert_contiguous(H100, &hw);
    assert!(hw.len() >= 3, "{hw:#?}");
    assert_eq!(energy_steps(&hw), vec![h1 as i64, h2 as i64], "{hw:#?}");
    let mut metered = 0;
    for w in &hw {
        assert_eq!(w.health, "ok", "{w:?}");
        assert_eq!(w.unavailable_ms, 0, "{w:?}");
        assert!(!w.energy_estimated, "{w:?}");
        if w.good == 0 {
            // Every slot of this window missed (a stalled machine): nothing measured, so
            // nothing may read as zero.
            assert_eq!((w.util_avg, w.power_avg), (None, None), "{w:?}");
            continue;
        }
        metered += 1;
        let g = w.good;
        // The counter only moves in the windows the test steps it in; in the others it stands
        // still while the card draws 250 W: frozen, so energy is absent and estimated beside.
        match w.energy {
            Some(e) => {
                assert!(e > 0, "{w:?}");
                assert_eq!(w.energy_estimated_mj, None, "{w:?}");
            }
            None => assert_eq!(w.energy_estimated_mj, Some(g * 250_000), "{w:?}"),
        }
        assert_eq!(
            (w.util_avg, w.util_max, w.mem_util_avg),
            (Some(40.0), Some(40.0), Some(12.0)),
            "{w:?}"
        );
        assert_eq!(w.mem_used_max, gib(8), "{w:?}");
        assert_eq!(
            (w.power_avg, w.temperature_max, w.throttle),
            (Some(250.0), Some(61), Some(4)),
            "{w:?}"
        );
        // No grant anywhere: every process is foreign to the (missing) assignment.
        assert_eq!(
            (w.occupied_ms, w.foreign_ms, w.active_ms),
            (g * 1000, g * 1000, g * 400),
            "{w:?}"
        );
        let mut want = vec![
            Principal {
                principal: root.clone(),
                uid: Some(0),
                occupied_ms: g * 1000,
                // 1000 ms × 40 % × 30/40
                active_ms: g * 300,
                memory_max: i64::try_from(GIB).unwrap(),
                processes: 1,
                matches_grant: false,
            },
            Principal {
                principal: nobody.clone(),
                uid: Some(i64::from(NOBODY)),
                occupied_ms: g * 1000,
                active_ms: g * 100,
                memory_max: i64::try_from(GIB / 2).unwrap(),
                processes: 1,
                matches_grant: false,
            },
        ];
        want.sort_by(|a, b| a.principal.cmp(&b.principal));
        assert_eq!(principals(conn, w.seq), want, "{w:?}");
    }
    assert!(metered >= 3, "{hw:#?}");

    // A100: no sample buffer, so `utilization_rates` stands in, exactly; power and temperature
    // are not supported and stay NULL, not zero.
    let aw = windows(conn, A100);
    assert_contiguous(A100, &aw);
    assert_eq!(energy_steps(&aw), vec![a1 as i64, a2 as i64], "{aw:#?}");
    for w in aw.iter().filter(|w| w.good > 0) {
        assert_eq!(w.health, "ok", "{w:?}");
        assert_eq!(
            (w.util_avg, w.util_max, w.mem_util_avg),
            (Some(64.0), Some(64.0), Some(16.0)),
            "{w:?}"
        );
        assert_eq!(w.mem_used_max, gib(2), "{w:?}");
        assert_eq!((w.power_avg, w.temperature_max), (None, None), "{w:?}");
        assert!(!w.energy_estimated, "{w:?}");
        assert_eq!((w.occupied_ms, w.active_ms), (0, 0), "{w:?}");
        assert!(principals(conn, w.seq).is_empty());
    }

    // L4: read fine, but every unsupported figure is absent.
    let lw = windows(conn, L4);
    assert_contiguous(L4, &lw);
    assert!(lw.iter().any(|w| w.good > 0), "{lw:#?}");
    for w in &lw {
        assert_eq!(w.health, "ok", "{w:?}");
        assert_eq!(
            (w.util_avg, w.util_max, w.mem_util_avg, w.mem_used_max),
            (None, None, None, None),
            "{w:?}"
        );
        assert_eq!(
            (w.energy, w.energy_estimated, w.power_avg),
            (None, false, None),
            "{w:?}"
        );
        assert_eq!((w.temperature_max, w.throttle), (None, None), "{w:?}");
    }
    drop(sleepers);
}

/// XID events counted once per occurrence, a lost card that neither crashes the agent nor stops
/// the other card, its recovery, and an explicit sample buffer that is read exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xids_once_lost_card_isolated_and_sample_buffer_read_once() {
    // Utilization from the buffer is only the explicit samples; without new ones, the rates
    // (10 % / 5 %) stand in. `[]`: a buffer that is supported but empty.
    let healthy = |xids: Value, gpu_samples: Value, mem_samples: Value| {
        json!({
            "uuid": H100, "pci_bus_id": "00000000:17:00.0", "memory_total": 80 * GIB,
            "util_gpu": 10, "util_mem": 5, "memory_used": GIB,
            "power_mw": 300_000, "energy_mj": 50_000, "temperature_c": 50,
            "gpu_samples": gpu_samples, "mem_samples": mem_samples,
            "xid_events": xids
        })
    };
    let flaky = |lost: bool, xids: Value| {
        json!({
            "uuid": A100, "pci_bus_id": "00000000:65:00.0", "memory_total": 40 * GIB,
            "util_gpu": 70, "util_mem": 30, "memory_used": GIB,
            "power_mw": 200_000, "energy_mj": 60_000, "temperature_c": 45,
            "lost": lost, "xid_events": xids
        })
    };
    let mut rig = Rig::start(&json!({ "cards": [
        healthy(json!([]), json!([]), json!([])),
        flaky(false, json!([])),
    ]}))
    .await;
    rig.until("a first window of both cards", |c| {
        (!windows(c, H100).is_empty() && !windows(c, A100).is_empty()).then_some(())
    })
    .await;

    // The A100 falls off the bus with an XID 79; the H100 reports three XIDs and gets one
    // batch of utilization samples: 90 and 70 (mean 80), memory 50.
    let ts = now_us();
    let batch_gpu = json!([{ "ts_us": ts, "value": 90 }, { "ts_us": ts + 1000, "value": 70 }]);
    let batch_mem = json!([{ "ts_us": ts + 500, "value": 50 }]);
    let h100_xids = json!([
        { "code": 79, "seq": 1 }, { "code": 79, "seq": 2 }, { "code": 13, "seq": 1 }
    ]);
    let a100_xids = json!([{ "code": 79, "seq": 1 }]);
    rig.set(&json!({ "cards": [
        healthy(h100_xids.clone(), batch_gpu.clone(), batch_mem.clone()),
        flaky(true, a100_xids.clone()),
    ]}));
    let lost_window = rig
        .until("a whole window of the lost card", |c| {
            windows(c, A100)
                .into_iter()
                .find(|w| w.health == "lost" && w.good == 0 && w.expected > 0)
        })
        .await;
    // The other card went on, with good samples, through the same window.
    rig.until("the healthy card's window beside it", |c| {
        windows(c, H100)
            .into_iter()
            .find(|w| w.start == lost_window.start)
    })
    .await;

    // Rewrite the scenario: the old XIDs again plus one new one, and the lost card comes back.
    // Only the new XID may be counted.
    let mut more_xids = h100_xids.as_array().unwrap().clone();
    more_xids.push(json!({ "code": 48, "seq": 1 }));
    rig.set(&json!({ "cards": [
        healthy(Value::Array(more_xids), batch_gpu, batch_mem),
        flaky(false, a100_xids),
    ]}));
    let rewritten_at = gpumeter_e2e::now_ms();
    rig.until("the new XID and the recovery", |c| {
        let xids = event_counts(c, "xid");
        let recovered = event_counts(c, "gpu_recovered");
        (xids.contains_key(&(H100.to_owned(), 48)) && !recovered.is_empty()).then_some(())
    })
    .await;
    // A window closed two slots after the rewrite: a re-delivery (say, after the lost card's
    // events are registered again) has had time to show up.
    rig.until("a window after the rewrite", |c| {
        windows(c, H100)
            .into_iter()
            .find(|w| w.end >= rewritten_at + 2 * INTERVAL_MS)
    })
    .await;
    rig.stop().await;
    let conn = &rig.conn;

    assert_eq!(
        event_counts(conn, "xid"),
        counts(&[(H100, 13, 1), (H100, 48, 1), (H100, 79, 2), (A100, 79, 1)]),
        "every XID once per occurrence"
    );
    assert_eq!(event_counts(conn, "gpu_lost"), counts(&[(A100, 0, 1)]));
    assert_eq!(event_counts(conn, "gpu_recovered"), counts(&[(A100, 0, 1)]));

    // The H100 never missed a beat; exactly one read took the sample batch.
    let hw = windows(conn, H100);
    assert_contiguous(H100, &hw);
    let mut batch_windows = 0;
    for w in hw.iter().filter(|w| w.good > 0) {
        assert_eq!((w.health.as_str(), w.unavailable_ms), ("ok", 0), "{w:?}");
        assert_eq!(
            (w.power_avg, w.temperature_max, w.mem_used_max),
            (Some(300.0), Some(50), Some(i64::try_from(GIB).unwrap())),
            "{w:?}"
        );
        let g = w.good as f64;
        if w.util_max == Some(80.0) {
            batch_windows += 1;
            // One slot at the batch's mean, the others at the rates.
            assert_eq!(w.util_avg, Some((80.0 + 10.0 * (g - 1.0)) / g), "{w:?}");
            assert_eq!(w.mem_util_avg, Some((50.0 + 5.0 * (g - 1.0)) / g), "{w:?}");
        } else {
            assert_eq!(
                (w.util_avg, w.util_max, w.mem_util_avg),
                (Some(10.0), Some(10.0), Some(5.0)),
                "{w:?}"
            );
        }
    }
    assert_eq!(batch_windows, 1, "the batch is read once: {hw:#?}");
    let beside = hw.iter().find(|w| w.start == lost_window.start).unwrap();
    assert!(
        beside.good > 0,
        "the healthy card kept sampling: {beside:?}"
    );

    // The A100: healthy, then lost (metered but unavailable, every figure absent), then back.
    let aw = windows(conn, A100);
    assert_contiguous(A100, &aw);
    let mut whole_lost = 0;
    for w in &aw {
        match w.health.as_str() {
            "ok" => assert_eq!(w.unavailable_ms, 0, "{w:?}"),
            "lost" => {
                assert!(w.unavailable_ms > 0, "{w:?}");
                assert!(
                    w.unavailable_ms + w.good * INTERVAL_MS <= w.expected * INTERVAL_MS,
                    "{w:?}"
                );
            }
            other => panic!("unexpected health {other}: {w:?}"),
        }
        if w.good == 0 {
            whole_lost += 1;
            assert_eq!(
                (w.util_avg, w.mem_util_avg, w.mem_used_max),
                (None, None, None),
                "{w:?}"
            );
            assert_eq!(
                (w.energy, w.power_avg, w.temperature_max),
                (None, None, None),
                "{w:?}"
            );
        } else {
            assert_eq!((w.util_avg, w.util_max), (Some(70.0), Some(70.0)), "{w:?}");
        }
    }
    assert!(whole_lost >= 1, "{aw:#?}");
    assert_eq!(aw[0].health, "ok", "{aw:#?}");
    let lost_at = aw.iter().position(|w| w.health == "lost").unwrap();
    assert!(aw[..lost_at].iter().all(|w| w.health == "ok"), "{aw:#?}");
    // Only the lost span is unavailable: after it the card is healthy again (its last window
    // may still be the one it came back in).
    let back = aw.iter().rposition(|w| w.health == "lost").unwrap();
    assert!(
        aw[lost_at..=back].iter().all(|w| w.health == "lost"),
        "one lost span: {aw:#?}"
    );
}

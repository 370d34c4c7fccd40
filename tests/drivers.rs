//! Drivers unlike the one the agent expects: the real `gpumeter-agent` binary against the fake
//! libnvidia-ml configured to behave as real drivers and hosts do, through the real
//! nvml-wrapper path, streaming to a real in-process collector with a real SQLite file.
//!
//! - a process-count query that answers SUCCESS with the count (nvml-wrapper 0.13 then lists
//!   nothing), a process list that is NOT_SUPPORTED, processes visible only in the
//!   per-process utilization samples or only in the accounting records, and a busy card with
//!   no process at all: every pid any source names is attributed and enforced, and time nobody
//!   can be credited with is `unattributed`, neither idle nor occupied;
//! - an event delivered through another card's event set is credited to the card it names;
//! - the fake's event wait blocks instead of polling.
//!
//! Exact yet robust to a loaded machine: figures are checked per window against what the
//! scenario made true in every sample of it, and the reconciliation against the windows.
//! The tests start processes under uid 65534, so they run as root (as the enforcement tests do).

// Helpers outside `#[test]` fns too: in a test, a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gpumeter_e2e::{TestCollector, bin, now_ms, target_dir};
use gpumeter_proto::v1;
use rusqlite::Connection;
use serde_json::{Value, json};
use tempfile::TempDir;

const INTERVAL_MS: i64 = 1_000;
const WINDOW_MS: i64 = 4_000;
/// How long any one awaited state may take on a slow, shared machine.
const PATIENCE: Duration = Duration::from_secs(40);
const NOBODY: u32 = 65_534;
const GIB: u64 = 1 << 30;
const SCENARIO_FILE: &str = "fake-nvml-scenario.json";
const HOST: &str = "drv-host";

// ---- harness ----

/// One test's world: its copy of the fake driver, a collector and the agent binary.
struct Rig {
    dir: TempDir,
    lib: PathBuf,
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

/// `sleep 600` children standing in for GPU processes, killed and reaped at the end.
#[derive(Default)]
struct Sleepers(Vec<Child>);

impl Sleepers {
    fn spawn(&mut self, uid: Option<u32>) -> u32 {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        if let Some(u) = uid {
            cmd.uid(u).gid(u);
        }
        let child = cmd.spawn().expect("spawn sleep (another uid needs root)");
        let pid = child.id();
        self.0.push(child);
        pid
    }

    fn child(&mut self, pid: u32) -> &mut Child {
        self.0.iter_mut().find(|c| c.id() == pid).unwrap()
    }

    fn exited(&mut self, pid: u32) -> Option<ExitStatus> {
        self.child(pid).try_wait().unwrap()
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
        "these tests start processes under uid {NOBODY} and must run as root"
    );
}

/// The fake library copied into a fresh temp directory, beside its scenario file.
fn fake_copy() -> (TempDir, PathBuf) {
    assert!(
        std::env::var_os("GPUMETER_FAKE_NVML_SCENARIO").is_none(),
        "unset GPUMETER_FAKE_NVML_SCENARIO: it overrides every test's own scenario"
    );
    // Builds the binaries and the fake library (target/<profile>/libnvidia_ml.so).
    bin("gpumeter-agent");
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    fs::copy(target_dir().join("libnvidia_ml.so"), &lib).unwrap();
    (dir, lib)
}

/// Replaces the scenario in `dir` by rename, so the library never reads half a file.
fn write_scenario(dir: &std::path::Path, scenario: &Value) {
    let tmp = dir.join("scenario.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(scenario).unwrap()).unwrap();
    fs::rename(&tmp, dir.join(SCENARIO_FILE)).unwrap();
}

impl Rig {
    /// Starts the collector with `grants` imported, writes the scenario and starts the agent
    /// binary on the fake in `mode` (`observe` or `terminate`).
    async fn start(scenario: &Value, grants: &[String], mode: &str) -> Rig {
        Self::start_with(scenario, grants, mode, &[]).await
    }

    /// As [`Rig::start`], with extra environment variables for the agent process.
    async fn start_with(
        scenario: &Value,
        grants: &[String],
        mode: &str,
        env: &[(&str, PathBuf)],
    ) -> Rig {
        let (dir, lib) = fake_copy();
        let db = dir.path().join("ledger.db");
        let collector = TestCollector::start(&db).await.unwrap();
        import_grants(&collector.url, grants).await;
        let conn = Connection::open(&db).unwrap();
        write_scenario(dir.path(), scenario);
        let cfg = dir.path().join("agent.toml");
        fs::write(
            &cfg,
            format!(
                r#"agent_id = "drv-e2e"
host_id = "{HOST}"
csp = "kt"
state_dir = "{state}"

[collector]
url = "{url}"
backoff_initial_ms = 50
backoff_max_ms = 500
{tls}

[sampling]
interval_ms = {INTERVAL_MS}
window_ms = {WINDOW_MS}

[source]
kind = "nvml-lib"
path = "{lib}"

[enforcement]
mode = "{mode}"
grace_ms = 1000
"#,
                state = dir.path().join("state").display(),
                url = collector.url,
                lib = lib.display(),
                tls = gpumeter_e2e::agent_tls_toml("drv-e2e", HOST, &dir.path().join("tls")),
            ),
        )
        .unwrap();
        let log = dir.path().join("agent.log");
        let child = Command::new(bin("gpumeter-agent"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env_remove("GPUMETER_FAKE_NVML_SCENARIO")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Rig {
            dir,
            lib,
            collector: Some(collector),
            conn,
            agent: Some(AgentProcess { child, log }),
        }
    }

    fn set(&self, scenario: &Value) {
        write_scenario(self.dir.path(), scenario);
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
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a window of every card in `cards` has ended at or after `at`.
    async fn windows_until(&mut self, cards: &[&str], at: i64) {
        self.until("windows up to the mark", |c| {
            cards
                .iter()
                .all(|u| windows(c, u).iter().any(|w| w.end >= at))
                .then_some(())
        })
        .await;
    }

    /// SIGTERM, then the agent must exit 0 in time; then the collector stops.
    async fn stop(&mut self) -> TestCollectorStopped {
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
        TestCollectorStopped { log }
    }

    /// The collector's reconciliation of `grant_id` over the whole run, through the Query
    /// service.
    async fn reconcile(&self, grant_id: &str, from: i64, until: i64) -> v1::Figures {
        self.reconcile_eq(grant_id, from, until).await.0
    }

    /// A grant's figures, and the same in GPU-equivalents.
    async fn reconcile_eq(
        &self,
        grant_id: &str,
        from: i64,
        until: i64,
    ) -> (v1::Figures, v1::Equivalent) {
        let url = self.collector.as_ref().unwrap().url.clone();
        let mut q = gpumeter_e2e::query_at(&url).await;
        let rfc = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        let r = q
            .reconcile(v1::ReconcileRequest {
                period: format!("{}..{}", rfc(from), rfc(until)),
                grant_id: grant_id.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let g = r.grants.iter().find(|g| g.grant_id == grant_id).unwrap();
        let eq = r
            .gpu_equivalents
            .as_ref()
            .and_then(|e| e.grants.iter().find(|k| k.key == grant_id))
            .and_then(|k| k.figures)
            .unwrap();
        (g.figures.unwrap(), eq)
    }

    async fn shutdown(mut self) {
        self.collector.take().unwrap().stop().await.unwrap();
    }
}

/// What the agent logged, once it has stopped.
struct TestCollectorStopped {
    log: String,
}

async fn import_grants(url: &str, rows: &[String]) {
    if rows.is_empty() {
        return;
    }
    let mut admin = gpumeter_e2e::admin_at(url).await;
    let csv = format!(
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n{}\n",
        rows.join("\n")
    );
    let r = admin
        .import_grants(v1::ImportGrantsRequest {
            csv,
            actor: "test".into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

/// A grant of one card to `principal`, valid for years around now.
fn grant(id: &str, principal: &str, uuid: &str) -> String {
    format!("{id},hpc,Acme,{principal},kt,{HOST},{uuid},2020-01-01,2099-12-31")
}

// ---- reading the ledger ----

#[derive(Debug, Clone, PartialEq)]
struct Window {
    start: i64,
    end: i64,
    good: i64,
    status: String,
    occupied_ms: i64,
    grantee_occupied_ms: Option<i64>,
    foreign_ms: i64,
    unattributed_ms: Option<i64>,
}

fn windows(conn: &Connection, uuid: &str) -> Vec<Window> {
    let mut st = conn
        .prepare(
            "SELECT start_ms, end_ms, good_samples, assignment_status, occupied_ms,
                    grantee_occupied_ms, foreign_ms, unattributed_ms
             FROM windows WHERE gpu_uuid = ?1 ORDER BY start_ms",
        )
        .unwrap();
    st.query_map([uuid], |r| {
        Ok(Window {
            start: r.get(0)?,
            end: r.get(1)?,
            good: r.get(2)?,
            status: r.get(3)?,
            occupied_ms: r.get(4)?,
            grantee_occupied_ms: r.get(5)?,
            foreign_ms: r.get(6)?,
            unattributed_ms: r.get(7)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// (card, pid, action, result, principal) of every enforcement event, in ledger order.
fn enforcement(conn: &Connection) -> Vec<(String, u32, String, String, String)> {
    let mut st = conn
        .prepare(
            "SELECT gpu_uuid, pid, action, result, principal FROM events
             WHERE kind = 'enforcement' ORDER BY seq",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
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

/// Whether every card has a window metered under its assignment (the first session's
/// assignments are applied).
fn assigned(conn: &Connection, cards: &[&str]) -> bool {
    cards
        .iter()
        .all(|u| windows(conn, u).iter().any(|w| w.status == "assigned"))
}

/// Sums of the windows that reconciliation counts for a grant on its card (all windows lie
/// inside the grant and the period): delivered, grantee occupied (under the grant),
/// unattributed.
fn sums(ws: &[Window]) -> (u64, u64, u64) {
    let delivered = ws.iter().map(|w| w.good * INTERVAL_MS).sum::<i64>();
    let occupied = ws
        .iter()
        .filter(|w| w.status == "assigned")
        .map(|w| w.grantee_occupied_ms.unwrap())
        .sum::<i64>();
    let unattributed = ws.iter().map(|w| w.unattributed_ms.unwrap()).sum::<i64>();
    (
        u64::try_from(delivered).unwrap(),
        u64::try_from(occupied).unwrap(),
        u64::try_from(unattributed).unwrap(),
    )
}

fn warnings_for(log: &str, uuid: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("cannot be attributed") && l.contains(uuid))
        .count()
}

// ---- process discovery ----

/// The count query answers SUCCESS with the count.
const COUNT_OK: &str = "GPU-d1000000-0000-4000-8000-000000000001";
/// No process list; the per-process utilization samples name the processes.
const SAMPLES_ONLY: &str = "GPU-d1000000-0000-4000-8000-000000000002";
/// No process list and no samples: nobody can be credited with its use.
const BLIND: &str = "GPU-d1000000-0000-4000-8000-000000000003";
/// A working but empty process list on a busy card.
const BUSY_EMPTY: &str = "GPU-d1000000-0000-4000-8000-000000000004";
/// No process list and no samples; the operator's accounting records name the process.
const ACCOUNTED: &str = "GPU-d1000000-0000-4000-8000-000000000005";
const CARDS: [&str; 5] = [COUNT_OK, SAMPLES_ONLY, BLIND, BUSY_EMPTY, ACCOUNTED];

/// Pids of the processes of the discovery test.
#[derive(Debug, Clone, Copy)]
struct Pids {
    grantee: u32,
    stranger_listed: u32,
    grantee_sampled: u32,
    stranger_sampled: u32,
    stranger_accounted: u32,
}

/// The five cards; `running` says whether the processes are on them (the strangers only while
/// `strangers`).
fn discovery_scenario(pids: Option<Pids>, strangers: bool) -> Value {
    let card = |uuid: &str, extra: Value| {
        let mut c = json!({
            "uuid": uuid, "memory_total": 80 * GIB, "memory_used": GIB,
            "power_mw": 100_000, "energy_mj": 1_000, "util_gpu": 0, "util_mem": 0,
            "sample_period_us": 1000
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let proc = |pid: u32, sm: u32| json!({ "pid": pid, "used_memory": GIB, "sm_util": sm });
    let (count_ok, sampled, accounted) = match pids {
        Some(p) => {
            let mut count_ok = vec![proc(p.grantee, 50)];
            let mut sampled = vec![proc(p.grantee_sampled, 30)];
            let mut accounted = vec![];
            if strangers {
                count_ok.push(proc(p.stranger_listed, 23));
                sampled.push(proc(p.stranger_sampled, 20));
                accounted.push(json!({
                    "pid": p.stranger_accounted,
                    "accounting": { "gpu_util": 40, "running": true }
                }));
            }
            (count_ok, sampled, accounted)
        }
        None => (vec![], vec![], vec![]),
    };
    let busy = if pids.is_some() { 73 } else { 0 };
    json!({ "cards": [
        card(COUNT_OK, json!({ "process_count_success": true, "util_gpu": busy, "processes": count_ok })),
        card(SAMPLES_ONLY, json!({ "not_supported": ["processes"], "util_gpu": busy, "processes": sampled })),
        card(BLIND, json!({ "not_supported": ["processes", "process_utilization"], "util_gpu": 60 })),
        card(BUSY_EMPTY, json!({ "util_gpu": busy })),
        card(ACCOUNTED, json!({
            "not_supported": ["processes", "process_utilization"], "util_gpu": busy,
            "accounting_mode": true, "processes": accounted
        })),
    ]})
}

/// Every source of pids is used, every pid any source names is attributed and enforced, and
/// use nobody can be credited with is unattributed, exactly, from the window to the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_source_is_attributed_and_enforced_and_blind_use_is_unattributed() {
    assert_root();
    let mut sleepers = Sleepers::default();
    let pids = Pids {
        grantee: sleepers.spawn(None),
        stranger_listed: sleepers.spawn(Some(NOBODY)),
        grantee_sampled: sleepers.spawn(None),
        stranger_sampled: sleepers.spawn(Some(NOBODY)),
        stranger_accounted: sleepers.spawn(Some(NOBODY)),
    };
    let strangers = [
        pids.stranger_listed,
        pids.stranger_sampled,
        pids.stranger_accounted,
    ];
    let grants: Vec<String> = CARDS
        .iter()
        .enumerate()
        .map(|(i, u)| grant(&format!("G-{i}"), "uid:0", u))
        .collect();
    let started = now_ms();
    // Quiet cards until the assignments are applied: in `terminate` mode, a process on a card
    // the agent does not know to be assigned is a violation.
    let mut rig = Rig::start(&discovery_scenario(None, false), &grants, "terminate").await;
    rig.until("the assignments applied", |c| {
        assigned(c, &CARDS).then_some(())
    })
    .await;

    // What `probe` sees: the lists despite the count query, the samples, the accounting, and
    // the cards whose use nobody can be credited with.
    rig.set(&discovery_scenario(Some(pids), true));
    let switched = now_ms();
    let probe = Command::new(bin("gpumeter-agent"))
        .args(["probe", "--json", "--nvml-lib"])
        .arg(&rig.lib)
        .env_remove("GPUMETER_FAKE_NVML_SCENARIO")
        .output()
        .unwrap();
    assert!(probe.status.success(), "{probe:?}");
    let probe: Value = serde_json::from_slice(&probe.stdout).unwrap();
    let field = |uuid: &str, name: &str| {
        probe["cards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["uuid"] == uuid)
            .unwrap()["fields"][name]
            .clone()
    };
    assert_eq!(
        field(COUNT_OK, "processes"),
        json!({ "supported": true, "detail": "2 compute, 0 graphics" })
    );
    assert_eq!(
        field(COUNT_OK, "process_discovery")["detail"],
        "2 processes visible (2 listed, 2 in samples, 0 in accounting)"
    );
    assert_eq!(
        field(SAMPLES_ONLY, "process_discovery")["detail"],
        "2 processes visible (0 listed, 2 in samples, 0 in accounting)"
    );
    assert_eq!(
        field(ACCOUNTED, "process_discovery")["detail"],
        "1 processes visible (0 listed, 0 in samples, 1 in accounting)"
    );
    for (uuid, why) in [
        (
            BLIND,
            "utilization 60%: usage is unattributed (the driver gives no process list",
        ),
        (
            BUSY_EMPTY,
            "utilization 73%: usage is unattributed (the card is busy but no process is visible)",
        ),
    ] {
        let f = field(uuid, "process_discovery");
        assert_eq!(f["supported"], false, "{uuid}: {f}");
        assert!(f["error"].as_str().unwrap().contains(why), "{uuid}: {f}");
    }

    // Every stranger, whichever source named it, is ended; the driver then stops naming it.
    let deadline = Instant::now() + PATIENCE;
    let mut gone: BTreeMap<u32, ExitStatus> = BTreeMap::new();
    while gone.len() < strangers.len() {
        for pid in strangers {
            if !gone.contains_key(&pid)
                && let Some(st) = sleepers.exited(pid)
            {
                gone.insert(pid, st);
            }
        }
        assert!(
            Instant::now() < deadline,
            "strangers still running: {gone:?}; log:\n{}",
            rig.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rig.set(&discovery_scenario(Some(pids), false));
    let settled = now_ms();
    // Two whole windows after the strangers left.
    rig.windows_until(&CARDS, settled + 3 * WINDOW_MS).await;
    let stopped = rig.stop().await;
    let finished = now_ms();

    for pid in strangers {
        assert_eq!(gone[&pid].signal(), Some(15), "pid {pid} ended by SIGTERM");
    }
    for pid in [pids.grantee, pids.grantee_sampled] {
        assert!(sleepers.exited(pid).is_none(), "the grantee's {pid} lives");
    }
    let events = enforcement(&rig.conn);
    let stranger_card = [
        (pids.stranger_listed, COUNT_OK),
        (pids.stranger_sampled, SAMPLES_ONLY),
        (pids.stranger_accounted, ACCOUNTED),
    ];
    for (pid, card) in stranger_card {
        // A driver still listing a pid whose process has gone (for the moment between its end
        // and the next scenario) shows a process nobody can be named for; that is recorded,
        // never signalled.
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.1 == pid && e.4 != "unknown")
            .collect();
        assert!(!mine.is_empty(), "{pid}: {events:#?}");
        assert_eq!(
            (mine[0].0.as_str(), mine[0].2.as_str(), mine[0].3.as_str()),
            (card, "none", "recorded"),
            "{events:#?}"
        );
        assert!(
            mine[0].4 == "user:nobody" || mine[0].4 == "uid:65534",
            "{events:#?}"
        );
        let acted: Vec<(&str, &str)> = mine
            .iter()
            .filter(|e| e.2 != "none")
            .map(|e| (e.2.as_str(), e.3.as_str()))
            .collect();
        assert_eq!(
            acted,
            vec![("sigterm", "sent"), ("sigterm", "exited")],
            "{events:#?}"
        );
    }
    // Nothing but the strangers was ever acted on or recorded.
    assert!(
        events.iter().all(|e| strangers.contains(&e.1)),
        "{events:#?}"
    );

    // Window by window. Before the switch only the blind card was busy, and the cards without
    // a process list saw nobody; a window wholly after the strangers left holds exactly what
    // the scenario made true in each of its samples.
    let after = |w: &Window| w.start >= settled + INTERVAL_MS && w.good > 0;
    let before = |w: &Window| w.end <= switched;
    for uuid in CARDS {
        let ws = windows(&rig.conn, uuid);
        assert!(
            ws.iter().filter(|w| after(w)).count() >= 2,
            "{uuid}: {ws:#?}"
        );
        for w in &ws {
            let g = w.good * INTERVAL_MS;
            let u = w.unattributed_ms.unwrap();
            assert!(u + w.occupied_ms <= g, "{uuid}: {w:?}");
            match uuid {
                BLIND => assert_eq!((u, w.occupied_ms), (g, 0), "{uuid}: {w:?}"),
                COUNT_OK => assert_eq!(u, 0, "{uuid}: {w:?}"),
                // No list and nobody in the samples or the accounting yet.
                SAMPLES_ONLY | ACCOUNTED if before(w) => {
                    assert_eq!((u, w.occupied_ms), (g, 0), "{uuid}: {w:?}")
                }
                // Idle, with a list that says so.
                BUSY_EMPTY if before(w) => assert_eq!(u, 0, "{uuid}: {w:?}"),
                _ => {}
            }
            if after(w) {
                assert_eq!(w.status, "assigned", "{uuid}: {w:?}");
                assert_eq!(w.foreign_ms, 0, "{uuid}: {w:?}");
                let (occupied, unattributed) = match uuid {
                    COUNT_OK | SAMPLES_ONLY => (g, 0),
                    // The accounting card has nothing left but its missing list.
                    _ => (0, g),
                };
                assert_eq!(
                    (w.grantee_occupied_ms.unwrap(), w.occupied_ms, u),
                    (occupied, occupied, unattributed),
                    "{uuid}: {w:?}"
                );
            }
        }
        // While the strangers ran, each was foreign on its card.
        if uuid == COUNT_OK || uuid == SAMPLES_ONLY || uuid == ACCOUNTED {
            assert!(ws.iter().any(|w| w.foreign_ms > 0), "{uuid}: {ws:#?}");
        }
        // The reconciliation: exactly the windows' figures, and unattributed time is not idle.
        let f = rig
            .reconcile(
                &format!("G-{}", CARDS.iter().position(|c| *c == uuid).unwrap()),
                started - 60_000,
                finished + 60_000,
            )
            .await;
        let (delivered, occupied, unattributed) = sums(&ws);
        assert_eq!(
            (f.delivered_ms, f.occupied_ms, f.unattributed_ms),
            (delivered, occupied, unattributed),
            "{uuid}: {f:?}"
        );
        assert_eq!(
            f.idle_ms,
            delivered - occupied - unattributed,
            "{uuid}: {f:?}"
        );
        if uuid == BLIND {
            assert_eq!((f.unattributed_ms, f.idle_ms), (f.delivered_ms, 0), "{f:?}");
        }
    }

    // One warning per episode: the blind card's lasted the whole run; the cards without a
    // list were blind until the samples or the accounting named someone, and the accounting
    // card again once its stranger left; the busy card from when it got busy.
    let log = stopped.log;
    assert_eq!(warnings_for(&log, BLIND), 1, "{log}");
    assert_eq!(warnings_for(&log, SAMPLES_ONLY), 1, "{log}");
    assert_eq!(warnings_for(&log, ACCOUNTED), 2, "{log}");
    assert_eq!(warnings_for(&log, BUSY_EMPTY), 1, "{log}");
    assert_eq!(warnings_for(&log, COUNT_OK), 0, "{log}");
    rig.shutdown().await;
}

// ---- users from the name service ----

const NSS_CARD: &str = "GPU-f1000000-0000-4000-8000-000000000001";
/// A uid and gid that exist only in the directory the test sets up (not in /etc/passwd).
const DIRECTORY_ID: u32 = 4_711;

/// Where Debian's `libnss-wrapper` puts the library.
const NSS_WRAPPER: &str = "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so";

/// A user that exists only in a name-service source other than /etc/passwd (as LDAP or SSSD
/// users do) is named through NSS, matches its `user:` grant, and is spared by `terminate`,
/// while a stranger on the same card is ended. The source is nss_wrapper's files, preloaded
/// into the agent alone: nothing on the machine changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_only_user_matches_its_grant_through_nss_wrapper() {
    assert_root();
    if !std::path::Path::new(NSS_WRAPPER).exists() {
        assert!(
            std::env::var_os("GPUMETER_REQUIRE_ALL").is_none(),
            "{NSS_WRAPPER} is missing (Debian package libnss-wrapper) and GPUMETER_REQUIRE_ALL is set"
        );
        eprintln!("skipped: needs nss_wrapper ({NSS_WRAPPER}, Debian package libnss-wrapper)");
        return;
    }
    for db in ["/etc/passwd", "/etc/group"] {
        let text = fs::read_to_string(db).unwrap();
        assert!(
            !text.lines().any(|l| l.split(':').nth(2) == Some("4711")),
            "{db} must not know id {DIRECTORY_ID}: the test's user exists only in its directory"
        );
    }
    let names = tempfile::tempdir().unwrap();
    let passwd = names.path().join("passwd");
    let group = names.path().join("group");
    fs::write(
        &passwd,
        format!(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:{NOBODY}:{NOBODY}:nobody:/:/bin/false\n\
             dir.alice:x:{DIRECTORY_ID}:{DIRECTORY_ID}:Alice from the directory:/home/alice:/bin/sh\n"
        ),
    )
    .unwrap();
    fs::write(
        &group,
        format!("root:x:0:\nnogroup:x:{NOBODY}:\ndir-lab:x:{DIRECTORY_ID}:dir.alice\n"),
    )
    .unwrap();

    let mut sleepers = Sleepers::default();
    let alice = sleepers.spawn(Some(DIRECTORY_ID));
    let stranger = sleepers.spawn(Some(NOBODY));
    let card = |procs: Value| {
        json!({ "cards": [{
            "uuid": NSS_CARD, "util_gpu": 50, "sample_period_us": 1000, "processes": procs
        }]})
    };
    let mut rig = Rig::start_with(
        &card(json!([])),
        &[grant("G-NSS", "user:dir.alice", NSS_CARD)],
        "terminate",
        &[
            ("LD_PRELOAD", PathBuf::from(NSS_WRAPPER)),
            ("NSS_WRAPPER_PASSWD", passwd),
            ("NSS_WRAPPER_GROUP", group),
        ],
    )
    .await;
    rig.until("the assignment applied", |c| {
        assigned(c, &[NSS_CARD]).then_some(())
    })
    .await;
    let both = json!([
        { "pid": alice, "used_memory": GIB, "sm_util": 30 },
        { "pid": stranger, "used_memory": GIB, "sm_util": 20 }
    ]);
    rig.set(&card(both));
    let deadline = Instant::now() + PATIENCE;
    let ended = loop {
        if let Some(st) = sleepers.exited(stranger) {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "stranger still running; log:\n{}",
            rig.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    rig.set(&card(
        json!([{ "pid": alice, "used_memory": GIB, "sm_util": 30 }]),
    ));
    let settled = now_ms();
    rig.windows_until(&[NSS_CARD], settled + 3 * WINDOW_MS)
        .await;
    rig.stop().await;

    assert_eq!(ended.signal(), Some(15), "the stranger ended by SIGTERM");
    assert!(
        sleepers.exited(alice).is_none(),
        "the directory user's process lives"
    );
    let events = enforcement(&rig.conn);
    assert!(
        events.iter().all(|e| e.1 == stranger),
        "only the stranger is a violator: {events:#?}"
    );
    assert!(
        events.iter().any(|e| e.2 == "none" && e.4 == "user:nobody"),
        "{events:#?}"
    );
    // Alice is named from the directory and matches her grant in every window she was in.
    let mut st = rig
        .conn
        .prepare(
            "SELECT p.principal, p.uid, p.matches_grant, p.occupied_ms, w.good_samples
             FROM window_principals p JOIN windows w ON w.agent_id = p.agent_id AND w.seq = p.seq
             WHERE w.gpu_uuid = ?1 AND w.start_ms >= ?2",
        )
        .unwrap();
    let rows: Vec<(String, i64, bool, i64, i64)> = st
        .query_map(rusqlite::params![NSS_CARD, settled + INTERVAL_MS], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(rows.len() >= 2, "{rows:?}");
    for (principal, uid, matches, occupied, good) in &rows {
        assert_eq!(
            (principal.as_str(), *uid, *matches, *occupied),
            (
                "user:dir.alice",
                i64::from(DIRECTORY_ID),
                true,
                good * INTERVAL_MS
            ),
            "{rows:?}"
        );
    }
    drop(st);
    rig.shutdown().await;
}

// ---- card health ----

const FROZEN: &str = "GPU-c1000000-0000-4000-8000-000000000001";
const MOVING: &str = "GPU-c1000000-0000-4000-8000-000000000002";

/// An energy counter that stands still while the card draws 95 W gives no energy for the
/// window (not 0 kWh) and a power-integrated estimate beside it; a counter that moves is
/// counted as before. Health counters that change (uncorrected ECC, volatile and aggregate,
/// retired pages, pending retirement, remapped rows, pending remaps) are events, once each, and
/// so is a card turning MIG on under its grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_energy_counter_is_absent_and_estimated_and_health_changes_are_events() {
    let health = |bad: bool| {
        let n = u32::from(bad);
        json!({
            "ecc_uncorrected": n, "ecc_uncorrected_aggregate": 5 + n, "mig_mode": bad,
            "retired_pages": { "single_bit": 2, "double_bit": n, "pending": bad },
            "remapped_rows": { "corrected": 4, "uncorrected": n, "pending": bad, "failure": false }
        })
    };
    let scenario = |bad: bool| {
        let mut frozen = json!({
            "uuid": FROZEN, "power_mw": 95_000, "energy_mj": 5_000_000, "util_gpu": 0
        });
        for (k, v) in health(bad).as_object().unwrap() {
            frozen[k] = v.clone();
        }
        json!({ "cards": [
            frozen,
            { "uuid": MOVING, "power_mw": 95_000, "energy_mj": 1_000, "energy_at_ms": 0, "util_gpu": 0 }
        ]})
    };
    let grants = [grant("G-F", "uid:0", FROZEN), grant("G-M", "uid:0", MOVING)];
    let started = now_ms();
    let mut rig = Rig::start(&scenario(false), &grants, "observe").await;
    rig.until("a first window of both cards", |c| {
        (!windows(c, FROZEN).is_empty() && !windows(c, MOVING).is_empty()).then_some(())
    })
    .await;
    rig.set(&scenario(true));
    rig.until("the health events", |c| {
        (event_counts(c, "card_health").values().sum::<i64>() >= 7).then_some(())
    })
    .await;
    // The same counters again give nothing new; a couple more windows.
    let mark = now_ms() + 2 * WINDOW_MS;
    rig.windows_until(&[FROZEN, MOVING], mark).await;
    rig.stop().await;
    let finished = now_ms();

    let mut st = rig
        .conn
        .prepare(
            "SELECT gpu_uuid, code, detail FROM events WHERE kind = 'card_health'
             ORDER BY gpu_uuid, detail",
        )
        .unwrap();
    let got: Vec<(String, i64, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(st);
    let want: Vec<(String, i64, String)> = [
        (6, "ecc_uncorrected_aggregate 5 -> 6"),
        (1, "ecc_uncorrected_volatile 0 -> 1"),
        // MIG turned on under the grant.
        (1, "mig_mode 0 -> 1"),
        (1, "remap_pending 0 -> 1"),
        (1, "remapped_rows_uncorrected 0 -> 1"),
        (3, "retired_pages 2 -> 3"),
        (1, "retired_pages_pending 0 -> 1"),
    ]
    .into_iter()
    .map(|(code, detail)| (FROZEN.to_owned(), code, detail.to_owned()))
    .collect();
    assert_eq!(got, want);

    let mut st = rig
        .conn
        .prepare(
            "SELECT good_samples, energy_mj, energy_estimated, energy_estimated_mj FROM windows
             WHERE gpu_uuid = ?1 ORDER BY start_ms",
        )
        .unwrap();
    let mut energy = |uuid: &str| -> Vec<(i64, Option<i64>, bool, Option<i64>)> {
        st.query_map([uuid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let frozen = energy(FROZEN);
    let moving = energy(MOVING);
    drop(st);
    assert!(frozen.iter().filter(|w| w.0 > 0).count() >= 3, "{frozen:?}");
    for w in frozen.iter().filter(|w| w.0 > 0) {
        // 95 W for each good second, exactly; no energy, and not the no-counter estimate.
        assert_eq!(
            (w.1, w.2, w.3),
            (None, false, Some(w.0 * 95_000)),
            "{frozen:?}"
        );
    }
    for w in moving.iter().filter(|w| w.0 > 0) {
        assert!(w.1.is_some_and(|e| e > 0), "{moving:?}");
        assert_eq!((w.2, w.3), (false, None), "{moving:?}");
    }
    let f = rig
        .reconcile("G-F", started - 60_000, finished + 60_000)
        .await;
    assert_eq!(f.energy_mj, 0, "a frozen counter measured nothing: {f:?}");
    let m = rig
        .reconcile("G-M", started - 60_000, finished + 60_000)
        .await;
    let measured: i64 = moving.iter().filter_map(|w| w.1).sum();
    assert_eq!(m.energy_mj, u64::try_from(measured).unwrap(), "{m:?}");
    rig.shutdown().await;
}

// ---- events ----

const EV_A: &str = "GPU-e1000000-0000-4000-8000-00000000000a";
const EV_B: &str = "GPU-e1000000-0000-4000-8000-00000000000b";

/// An event that comes through one card's event set but names another card is credited to the
/// card it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_through_another_cards_set_is_credited_to_the_card_it_names() {
    let card = |uuid: &str, xids: Value| json!({ "uuid": uuid, "xid_events": xids });
    let quiet = json!({ "cards": [card(EV_A, json!([])), card(EV_B, json!([]))] });
    let mut rig = Rig::start(&quiet, &[], "observe").await;
    rig.until("a first window of both cards", |c| {
        (!windows(c, EV_A).is_empty() && !windows(c, EV_B).is_empty()).then_some(())
    })
    .await;
    rig.set(&json!({ "cards": [
        card(EV_A, json!([{ "code": 13, "seq": 1 }])),
        // B's XIDs arrive through A's event set.
        card(EV_B, json!([{ "code": 79, "seq": 1, "via": EV_A }, { "code": 48, "seq": 2, "via": EV_A }])),
    ]}));
    rig.until("all three XIDs", |c| {
        (event_counts(c, "xid").values().sum::<i64>() >= 3).then_some(())
    })
    .await;
    // A little longer: a second delivery would show up by now.
    let mark = now_ms() + 2 * INTERVAL_MS;
    rig.windows_until(&[EV_A, EV_B], mark).await;
    rig.stop().await;
    let want: BTreeMap<(String, i64), i64> = [((EV_A, 13), 1), ((EV_B, 48), 1), ((EV_B, 79), 1)]
        .into_iter()
        .map(|((u, c), n)| ((u.to_owned(), c), n))
        .collect();
    assert_eq!(event_counts(&rig.conn, "xid"), want);
    rig.shutdown().await;
}

// ---- the fake driver itself ----

/// Voluntary context switches of the calling thread so far.
fn voluntary_switches() -> u64 {
    let status = fs::read_to_string("/proc/thread-self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The fake's event wait blocks until an event or the timeout, as a real driver's does, instead
/// of waking every few milliseconds to look for one: a quiet two-second wait costs a handful of
/// context switches, not hundreds; and an event that a scenario change brings is delivered
/// during the wait.
#[test]
fn the_fake_drivers_event_wait_blocks_until_an_event_or_the_timeout() {
    use nvml_wrapper::Nvml;
    use nvml_wrapper::bitmasks::event::EventTypes;
    use nvml_wrapper::error::NvmlError;

    let (dir, lib) = fake_copy();
    let card = |xids: Value| json!({ "cards": [{ "uuid": EV_A, "xid_events": xids }] });
    write_scenario(dir.path(), &card(json!([])));
    let nvml = Nvml::builder().lib_path(lib.as_os_str()).init().unwrap();
    let dev = nvml.device_by_uuid(EV_A).unwrap();
    let set = dev
        .register_events(
            EventTypes::CRITICAL_XID_ERROR,
            nvml.create_event_set().unwrap(),
        )
        .unwrap();

    let before = voluntary_switches();
    let t = Instant::now();
    assert!(matches!(set.wait(2_000), Err(NvmlError::Timeout)));
    let waited = t.elapsed();
    let switches = voluntary_switches() - before;
    assert!(waited >= Duration::from_millis(1_900), "{waited:?}");
    assert!(switches < 20, "{switches} wake-ups in a quiet 2 s wait");

    std::thread::scope(|s| {
        let waiter = s.spawn(move || {
            let t = Instant::now();
            let got = set.wait(20_000).map(|e| e.event_data);
            (got, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        write_scenario(dir.path(), &card(json!([{ "code": 79, "seq": 1 }])));
        // Any call that reads the changed scenario wakes the wait.
        dev.temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
            .unwrap();
        let (got, took) = waiter.join().unwrap();
        assert!(
            matches!(
                got,
                Ok(Some(nvml_wrapper::enums::event::XidError::Value(79)))
            ),
            "{got:?}"
        );
        assert!(took < Duration::from_secs(10), "{took:?}");
    });
}

// ---- MIG ----

const MIG_PARENT: &str = "GPU-a1000000-0000-4000-8000-0000000000a0";

fn mig_uuid(i: usize) -> String {
    format!("MIG-a1000000-0000-4000-8000-00000000000{i}")
}

/// A GPU in MIG mode with 7 instances, 4 granted to one tenant and 3 to another: each instance
/// is a card of its own (keyed by its MIG UUID, with its parent, profile and slices in the
/// inventory), its processes are attributed and enforced on it alone, its memory is its own
/// and its utilization (which the driver does not give per instance) is absent, not 0. The
/// parent, whose process list names every instance's processes, lists none itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_mig_instances_of_two_tenants_are_metered_and_enforced_as_cards() {
    assert_root();
    let mut sleepers = Sleepers::default();
    let mine: Vec<u32> = (0..4).map(|_| sleepers.spawn(None)).collect();
    let theirs: Vec<u32> = (4..7).map(|_| sleepers.spawn(Some(NOBODY))).collect();
    let stranger = sleepers.spawn(Some(NOBODY));
    let owner = |i: usize| if i < 4 { mine[i] } else { theirs[i - 4] };
    let scenario = |procs: bool, with_stranger: bool| {
        let migs: Vec<Value> = (0..7)
            .map(|i| {
                let mut p = vec![];
                if procs {
                    p.push(json!({ "pid": owner(i), "used_memory": GIB }));
                    if with_stranger && i == 0 {
                        p.push(json!({ "pid": stranger, "used_memory": GIB / 2 }));
                    }
                }
                json!({
                    "uuid": mig_uuid(i), "profile": "1g.10gb",
                    "memory_total": 10 * GIB, "memory_used": (i as u64 + 1) * GIB,
                    "processes": p
                })
            })
            .collect();
        // The parent's own list names the instances' processes, as a real driver's does.
        let parent_procs: Vec<Value> = if procs {
            vec![json!({ "pid": mine[0], "used_memory": GIB })]
        } else {
            vec![]
        };
        json!({ "cards": [{
            "uuid": MIG_PARENT, "name": "NVIDIA A100-SXM4-80GB", "mig_mode": true,
            "memory_total": 80 * GIB, "memory_used": 28 * GIB, "power_mw": 200_000,
            "energy_mj": 1_000, "energy_at_ms": 0,
            "not_supported": ["utilization", "samples", "process_utilization"],
            "processes": parent_procs, "mig_devices": migs
        }]})
    };
    let migs: Vec<String> = (0..7).map(mig_uuid).collect();
    let mut grants: Vec<String> = (0..4)
        .map(|i| grant("G-MIG-A", "uid:0", &migs[i]))
        .collect();
    grants.extend((4..7).map(|i| grant("G-MIG-B", &format!("uid:{NOBODY}"), &migs[i])));
    let started = now_ms();
    let mut rig = Rig::start(&scenario(false, false), &grants, "terminate").await;
    let refs: Vec<&str> = migs.iter().map(String::as_str).collect();
    rig.until("the assignments applied", |c| {
        assigned(c, &refs).then_some(())
    })
    .await;
    rig.set(&scenario(true, true));
    let deadline = Instant::now() + PATIENCE;
    let ended = loop {
        if let Some(st) = sleepers.exited(stranger) {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "stranger still running; log:\n{}",
            rig.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    rig.set(&scenario(true, false));
    let settled = now_ms();
    rig.windows_until(&refs, settled + 3 * WINDOW_MS).await;
    rig.stop().await;
    let finished = now_ms();

    assert_eq!(
        ended.signal(),
        Some(15),
        "the stranger on tenant A's instance ended"
    );
    for pid in mine.iter().chain(&theirs) {
        assert!(
            sleepers.exited(*pid).is_none(),
            "{pid} is on its own tenant's instance"
        );
    }
    let events = enforcement(&rig.conn);
    assert!(events.iter().all(|e| e.1 == stranger), "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e.0 == migs[0] && e.2 == "sigterm" && e.3 == "exited"),
        "{events:#?}"
    );

    // The inventory: the parent and its 7 instances, each placed on it.
    let mut st = rig
        .conn
        .prepare(
            "SELECT gpu_uuid, name, memory_total_bytes, mig_mode, parent_uuid, mig_profile,
                    mig_slices, parent_slices FROM gpus ORDER BY gpu_uuid",
        )
        .unwrap();
    type Gpu = (
        String,
        String,
        Option<i64>,
        String,
        String,
        String,
        Option<i64>,
        Option<i64>,
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
    drop(st);
    let gib = |n: u64| Some(i64::try_from(n * GIB).unwrap());
    let mut want: Vec<Gpu> = vec![(
        MIG_PARENT.into(),
        "NVIDIA A100-SXM4-80GB".into(),
        gib(80),
        "enabled".into(),
        String::new(),
        String::new(),
        None,
        None,
    )];
    for m in &migs {
        want.push((
            m.clone(),
            "NVIDIA A100-SXM4-80GB MIG 1g.10gb".into(),
            gib(10),
            String::new(),
            MIG_PARENT.into(),
            "1g.10gb".into(),
            Some(1),
            Some(7),
        ));
    }
    assert_eq!(gpus, want);

    // Each instance: its own memory, no utilization (absent, never 0), its tenant's processes.
    let mut st = rig
        .conn
        .prepare(
            "SELECT good_samples, util_avg_pct, memory_used_max_bytes, start_ms FROM windows
             WHERE gpu_uuid = ?1 ORDER BY start_ms",
        )
        .unwrap();
    for (i, m) in migs.iter().enumerate() {
        let rows: Vec<(i64, Option<f64>, Option<i64>, i64)> = st
            .query_map([m], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for r in rows.iter().filter(|r| r.0 > 0) {
            assert_eq!((r.1, r.2), (None, gib(i as u64 + 1)), "{m}: {rows:?}");
        }
        let ws = windows(&rig.conn, m);
        let after: Vec<&Window> = ws
            .iter()
            .filter(|w| w.start >= settled + INTERVAL_MS && w.good > 0)
            .collect();
        assert!(after.len() >= 2, "{m}: {ws:#?}");
        for w in after {
            let g = w.good * INTERVAL_MS;
            assert_eq!(
                (
                    w.status.as_str(),
                    w.grantee_occupied_ms,
                    w.occupied_ms,
                    w.foreign_ms,
                    w.unattributed_ms
                ),
                ("assigned", Some(g), g, 0, Some(0)),
                "{m}: {w:?}"
            );
        }
    }
    drop(st);
    // The parent lists nobody: its instances do.
    for w in windows(&rig.conn, MIG_PARENT) {
        assert_eq!((w.occupied_ms, w.foreign_ms), (0, 0), "{w:?}");
    }
    // Reconciliation per tenant: exactly its instances' windows; in GPU-equivalents each
    // 1g.10gb instance of the 7-slice GPU is 1/7 of it.
    for (grant_id, range) in [("G-MIG-A", 0..4), ("G-MIG-B", 4..7)] {
        let n = range.len() as f64;
        let (f, eq) = rig
            .reconcile_eq(grant_id, started - 60_000, finished + 60_000)
            .await;
        assert!((eq.gpus - n / 7.0).abs() < 1e-9, "{grant_id}: {eq:?}");
        let hours = |ms: u64| ms as f64 / 3_600_000.0;
        assert!(
            (eq.delivered_gpu_hours - hours(f.delivered_ms) / 7.0).abs() < 1e-9,
            "{grant_id}: {eq:?} {f:?}"
        );
        assert!(
            (eq.allocated_gpu_hours - hours(f.allocated_ms) / 7.0).abs() < 1e-9,
            "{grant_id}: {eq:?} {f:?}"
        );
        let ws: Vec<Window> = range.flat_map(|i| windows(&rig.conn, &migs[i])).collect();
        let (delivered, occupied, unattributed) = sums(&ws);
        assert_eq!(
            (f.delivered_ms, f.occupied_ms, f.unattributed_ms, f.idle_ms),
            (
                delivered,
                occupied,
                unattributed,
                delivered - occupied - unattributed
            ),
            "{grant_id}: {f:?}"
        );
    }
    rig.shutdown().await;
}

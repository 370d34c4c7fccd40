//! Enforcement end to end: real processes, their real pids put on simulated cards and their
//! identities read from the real /proc, agents in-process at real time against a real
//! collector whose grants come through the Admin API. Checks what dies, what lives and what
//! the ledger says about it. The tests start processes under uid 65534, so they run as root.

// Helpers outside `#[test]` fns too: in a test, a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpumeter_agent::attribution::parse_stat;
use gpumeter_agent::attribution::{Attributor, ProcAttributor};
use gpumeter_agent::clock::{SystemClock, align_up};
use gpumeter_agent::config::{EnforcementConfig, EnforcementMode, SamplingConfig};
use gpumeter_agent::gpu::sim::{Scenario, SimSource};
use gpumeter_agent::gpu::{
    CardReading, GpuError, GpuEvent, GpuProcess, GpuSource, Inventory, ProcessSources,
};
use gpumeter_agent::run::{Agent, Parts, RunOptions};
use gpumeter_agent::uplink::UplinkStatus;
use gpumeter_e2e::{TestCollector, agent_config, now_ms};
use gpumeter_proto::v1;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const C0: &str = "GPU-0000000e-0000-4000-8000-000000000000";
const C1: &str = "GPU-0000000e-0000-4000-8000-000000000001";
const NOBODY: u32 = 65534;
const INTERVAL_MS: i64 = 1_000;

/// Which real pids sit on which card, changeable while the agent runs.
type OnCards = Arc<Mutex<BTreeMap<String, Vec<u32>>>>;

/// Simulated cards C0 and C1 whose process lists are real pids. Like the driver, it stops
/// listing a process once it has exited.
struct LiveCards {
    inner: SimSource,
    on: OnCards,
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_stat(&t))
        .is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

impl GpuSource for LiveCards {
    fn inventory(&mut self) -> Result<Inventory, GpuError> {
        self.inner.inventory()
    }

    fn read(&mut self, at_ms: i64) -> Vec<CardReading> {
        let mut readings = self.inner.read(at_ms);
        let on = self.on.lock().unwrap();
        for r in &mut readings {
            if let CardReading::Ok(s) = r {
                for &pid in on.get(&s.uuid).into_iter().flatten() {
                    if running(pid) {
                        s.processes.push(GpuProcess {
                            pid,
                            used_memory_bytes: Some(1 << 30),
                            sm_util_pct: None,
                            graphics: false,
                            accounting: None,
                            seen_in: ProcessSources {
                                list: true,
                                ..Default::default()
                            },
                        });
                    }
                }
            }
        }
        readings
    }

    fn drain_events(&mut self) -> Vec<GpuEvent> {
        self.inner.drain_events()
    }
}

fn put(on: &OnCards, card: &str, pid: u32) {
    on.lock().unwrap().entry(card.into()).or_default().push(pid);
}

fn take_off(on: &OnCards, card: &str, pid: u32) {
    if let Some(v) = on.lock().unwrap().get_mut(card) {
        v.retain(|p| *p != pid);
    }
}

/// Child processes, killed and reaped when the test ends however it ends.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    /// `sleep 60` as `uid` (this process's user when `None`); with `ignore_term` it ignores
    /// SIGTERM, so only SIGKILL ends it.
    fn spawn(&mut self, uid: Option<u32>, ignore_term: bool) -> u32 {
        let mut cmd = if ignore_term {
            let mut c = Command::new("sh");
            c.args(["-c", "trap '' TERM; exec sleep 60"]);
            c
        } else {
            let mut c = Command::new("sleep");
            c.arg("60");
            c
        };
        if let Some(u) = uid {
            cmd.uid(u).gid(u);
        }
        let child = cmd
            .spawn()
            .expect("spawn a test process (needs root for another uid)");
        let pid = child.id();
        self.0.push(child);
        if ignore_term {
            // The trap must be set before anyone signals it: wait for the exec into sleep.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default()
                != "sleep\n"
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "sh never became sleep"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        pid
    }

    fn child(&mut self, pid: u32) -> &mut Child {
        self.0.iter_mut().find(|c| c.id() == pid).unwrap()
    }

    fn alive(&mut self, pid: u32) -> bool {
        self.child(pid).try_wait().unwrap().is_none()
    }

    /// Waits for `pid` to end; returns how and when (wall ms, within 20 ms).
    async fn wait_exit(&mut self, pid: u32, timeout: Duration) -> (ExitStatus, i64) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(st) = self.child(pid).try_wait().unwrap() {
                return (st, now_ms());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "process {pid} still alive after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn assert_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let uid = gpumeter_agent::attribution::parse_status(&status).uid;
    assert_eq!(
        uid,
        Some(0),
        "enforcement tests start processes under uid {NOBODY} and must run as root"
    );
}

/// The principal label the agent will report for `pid`.
fn label(pid: u32) -> String {
    ProcAttributor::default().identify(pid).unwrap().label()
}

async fn import_grants(url: &str, rows: &[String]) {
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

struct RunningAgent {
    task: JoinHandle<anyhow::Result<()>>,
    status: watch::Receiver<UplinkStatus>,
}

impl RunningAgent {
    /// Waits until the first session applied the collector's assignments.
    async fn assignments_applied(&mut self) {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.status.wait_for(|s| s.sessions >= 1),
        )
        .await
        .expect("agent connects within 10 s")
        .unwrap();
    }

    async fn finish(self) {
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("agent stops and drains within 30 s")
            .unwrap()
            .unwrap();
    }
}

/// What differs between the agents of these tests.
struct AgentSpec<'a> {
    /// Parent of the agent's state directory (named after the host).
    state: &'a Path,
    url: String,
    host: &'a str,
    enforcement: EnforcementConfig,
    window_ms: u64,
    stop_at: i64,
    /// Wait for the collector's assignments before sampling; without it the agent starts
    /// from its cache.
    await_collector: bool,
}

/// An agent over cards C0 and C1, at real time, sampling every second until `stop_at`, then
/// draining to the collector.
fn start_agent(spec: AgentSpec<'_>, on: &OnCards) -> RunningAgent {
    let mut cfg = agent_config(spec.host, "kt", &spec.url, &spec.state.join(spec.host), 64);
    cfg.sampling = SamplingConfig {
        interval_ms: INTERVAL_MS as u64,
        window_ms: spec.window_ms,
    };
    cfg.enforcement = spec.enforcement;
    let scenario: Scenario = toml::from_str(&format!(
        "[[cards]]\nuuid = \"{C0}\"\n[[cards]]\nuuid = \"{C1}\"\n"
    ))
    .unwrap();
    let parts = Parts {
        source: Box::new(LiveCards {
            inner: SimSource::new(scenario, now_ms()),
            on: on.clone(),
        }),
        attributor: Box::new(ProcAttributor::default()),
        clock: Arc::new(SystemClock),
    };
    let agent = Agent::build(cfg, parts).unwrap();
    let status = agent.status();
    let opts = RunOptions {
        stop_at: Some(spec.stop_at),
        start_at: None,
        drain: true,
        await_assignments: spec.await_collector.then_some(Duration::from_secs(10)),
    };
    let task = tokio::spawn(async move {
        let (tx, rx) = watch::channel(false);
        let r = agent.run(opts, rx).await;
        drop(tx);
        r
    });
    RunningAgent { task, status }
}

fn enforcement(mode: EnforcementMode, grace_ms: u64) -> EnforcementConfig {
    EnforcementConfig {
        mode,
        grace_ms,
        lock_unassigned: false,
    }
}

/// An `enforcement` row of the collector's events table.
#[derive(Debug, Clone, PartialEq)]
struct Ev {
    gpu: String,
    at: i64,
    pid: u32,
    principal: String,
    grant_id: String,
    mode: String,
    action: String,
    result: String,
    detail: String,
}

fn enforcement_events(db: &Path) -> Vec<Ev> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut st = conn
        .prepare(
            "SELECT gpu_uuid, at_ms, pid, principal, grant_id, mode, action, result, detail
             FROM events WHERE kind = 'enforcement' ORDER BY seq",
        )
        .unwrap();
    st.query_map([], |r| {
        Ok(Ev {
            gpu: r.get(0)?,
            at: r.get(1)?,
            pid: r.get(2)?,
            principal: r.get(3)?,
            grant_id: r.get(4)?,
            mode: r.get(5)?,
            action: r.get(6)?,
            result: r.get(7)?,
            detail: r.get(8)?,
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

/// (action, result) of each event about `pid`, in ledger order.
fn trail(events: &[Ev], pid: u32) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e.pid == pid)
        .map(|e| (e.action.clone(), e.result.clone()))
        .collect()
}

fn pair(a: &str, r: &str) -> (String, String) {
    (a.into(), r.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_ends_foreign_processes_and_spares_the_grantee() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    import_grants(
        &collector.url,
        &[format!(
            "G-T,hpc,Acme,uid:0,kt,enf-term,{C0},2020-01-01,2099-12-31"
        )],
    )
    .await;

    let mut procs = Procs::default();
    let grantee = procs.spawn(None, false);
    let foreign = procs.spawn(Some(NOBODY), false);
    let stubborn = procs.spawn(Some(NOBODY), true);
    let on_unassigned = procs.spawn(None, false);
    let bystander = procs.spawn(Some(NOBODY), false);
    let on = OnCards::default();
    for pid in [grantee, foreign, stubborn] {
        put(&on, C0, pid);
    }
    put(&on, C1, on_unassigned);
    let foreign_label = label(foreign);
    assert!(
        foreign_label == "user:nobody" || foreign_label == "uid:65534",
        "{foreign_label}"
    );

    let grace_ms = 2_000;
    let mut agent = start_agent(
        AgentSpec {
            state: dir.path(),
            url: collector.url.clone(),
            host: "enf-term",
            enforcement: enforcement(EnforcementMode::Terminate, grace_ms),
            window_ms: 60_000,
            stop_at: now_ms() + 9_000,
            await_collector: true,
        },
        &on,
    );
    agent.assignments_applied().await;
    let limit = Duration::from_millis(INTERVAL_MS as u64 * 2 + grace_ms + 2_000);
    let (foreign_st, _) = procs.wait_exit(foreign, limit).await;
    let (stubborn_st, stubborn_died) = procs.wait_exit(stubborn, limit).await;
    let (unassigned_st, _) = procs.wait_exit(on_unassigned, limit).await;
    assert_eq!(foreign_st.signal(), Some(15), "sleep ends on SIGTERM");
    assert_eq!(
        unassigned_st.signal(),
        Some(15),
        "any process on an unassigned card"
    );
    assert_eq!(
        stubborn_st.signal(),
        Some(9),
        "ignoring SIGTERM earns SIGKILL"
    );
    agent.finish().await;
    assert!(procs.alive(grantee), "the grantee's process lives");
    assert!(
        procs.alive(bystander),
        "a process on no card is never touched"
    );

    let events = enforcement_events(&db);
    assert_eq!(
        trail(&events, foreign),
        vec![
            pair("none", "recorded"),
            pair("sigterm", "sent"),
            pair("sigterm", "exited")
        ],
        "{events:#?}"
    );
    assert_eq!(
        trail(&events, stubborn),
        vec![
            pair("none", "recorded"),
            pair("sigterm", "sent"),
            pair("sigkill", "killed")
        ],
        "{events:#?}"
    );
    assert_eq!(
        trail(&events, on_unassigned),
        vec![
            pair("none", "recorded"),
            pair("sigterm", "sent"),
            pair("sigterm", "exited")
        ],
        "{events:#?}"
    );
    assert!(trail(&events, grantee).is_empty(), "{events:#?}");
    assert!(trail(&events, bystander).is_empty(), "{events:#?}");
    for e in &events {
        assert_eq!(e.mode, "terminate");
        let (gpu, grant) = if e.pid == on_unassigned {
            (C1, "")
        } else {
            (C0, "G-T")
        };
        assert_eq!((e.gpu.as_str(), e.grant_id.as_str()), (gpu, grant), "{e:?}");
    }
    let found = events
        .iter()
        .find(|e| e.pid == stubborn && e.action == "none")
        .unwrap();
    assert_eq!(found.principal, foreign_label);
    assert!(
        found.detail.contains("does not match grant G-T"),
        "{}",
        found.detail
    );
    // SIGKILL came after the whole grace period, and soon after it.
    let waited = stubborn_died - found.at;
    assert!(
        (grace_ms as i64..=grace_ms as i64 + 2_000).contains(&waited),
        "died {waited} ms after the violation was seen"
    );
    // The assignment the agent applied is an event too, once.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let changes: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM events WHERE kind = 'assignment_changed' AND code > 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(changes, 1);
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_records_each_violation_once_per_episode_and_signals_nothing() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    import_grants(
        &collector.url,
        &[format!(
            "G-O,hpc,Acme,uid:0,kt,enf-obs,{C0},2020-01-01,2099-12-31"
        )],
    )
    .await;
    let mut procs = Procs::default();
    let grantee = procs.spawn(None, false);
    let foreign = procs.spawn(Some(NOBODY), false);
    let on_unassigned = procs.spawn(None, false);
    let on = OnCards::default();
    put(&on, C0, grantee);
    put(&on, C0, foreign);
    put(&on, C1, on_unassigned);

    let mut agent = start_agent(
        AgentSpec {
            state: dir.path(),
            url: collector.url.clone(),
            host: "enf-obs",
            enforcement: enforcement(EnforcementMode::Observe, 100),
            window_ms: 60_000,
            stop_at: now_ms() + 8_000,
            await_collector: true,
        },
        &on,
    );
    agent.assignments_applied().await;
    // Three slots with the same violations, then the foreign process leaves the card for
    // two slots and comes back: a second episode.
    tokio::time::sleep(Duration::from_millis(3 * INTERVAL_MS as u64 + 200)).await;
    take_off(&on, C0, foreign);
    tokio::time::sleep(Duration::from_millis(2 * INTERVAL_MS as u64 + 200)).await;
    put(&on, C0, foreign);
    agent.finish().await;
    for pid in [grantee, foreign, on_unassigned] {
        assert!(procs.alive(pid), "observe signals nothing: {pid}");
    }
    let events = enforcement_events(&db);
    assert_eq!(
        trail(&events, foreign),
        vec![pair("none", "recorded"), pair("none", "recorded")],
        "{events:#?}"
    );
    assert_eq!(
        trail(&events, on_unassigned),
        vec![pair("none", "recorded")]
    );
    assert!(trail(&events, grantee).is_empty(), "{events:#?}");
    for e in &events {
        assert_eq!(e.mode, "observe");
    }
    let unassigned = events.iter().find(|e| e.pid == on_unassigned).unwrap();
    assert_eq!(
        (
            unassigned.gpu.as_str(),
            unassigned.grant_id.as_str(),
            unassigned.principal.as_str()
        ),
        (C1, "", label(on_unassigned).as_str())
    );
    assert!(
        unassigned.detail.contains("no assignment"),
        "{}",
        unassigned.detail
    );
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_grant_turns_its_grantee_into_a_violator_at_the_second() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let until = align_up(now_ms() + 4_000, 1_000);
    let until_text = chrono::DateTime::from_timestamp_millis(until)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    import_grants(
        &collector.url,
        &[format!(
            "G-X,hpc,Acme,uid:0,kt,enf-exp,{C0},2020-01-01,{until_text}"
        )],
    )
    .await;
    let mut procs = Procs::default();
    let grantee = procs.spawn(None, false);
    let on = OnCards::default();
    put(&on, C0, grantee);
    let mut agent = start_agent(
        AgentSpec {
            state: dir.path(),
            url: collector.url.clone(),
            host: "enf-exp",
            enforcement: enforcement(EnforcementMode::Observe, 100),
            window_ms: 2_000,
            stop_at: until + 4_000,
            await_collector: true,
        },
        &on,
    );
    agent.assignments_applied().await;
    assert!(
        now_ms() < until - INTERVAL_MS,
        "the agent must start before expiry"
    );
    agent.finish().await;
    assert!(procs.alive(grantee));

    let events = enforcement_events(&db);
    let mine: Vec<&Ev> = events.iter().filter(|e| e.pid == grantee).collect();
    assert_eq!(mine.len(), 1, "{events:#?}");
    let e = mine[0];
    assert!(
        (until..until + INTERVAL_MS).contains(&e.at),
        "violation seen at {} for a grant ending at {until}",
        e.at
    );
    assert_eq!((e.grant_id.as_str(), e.gpu.as_str()), ("", C0));
    assert!(
        e.detail.contains("grant G-X is not valid now"),
        "{}",
        e.detail
    );

    // Windows before the end are assigned, windows after it expired.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut st = conn
        .prepare(
            "SELECT start_ms, end_ms, assignment_status FROM windows WHERE gpu_uuid = ?1 ORDER BY start_ms",
        )
        .unwrap();
    let windows: Vec<(i64, i64, String)> = st
        .query_map([C0], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let before: Vec<_> = windows.iter().filter(|w| w.1 <= until).collect();
    let after: Vec<_> = windows.iter().filter(|w| w.0 >= until).collect();
    assert!(!before.is_empty() && !after.is_empty(), "{windows:?}");
    assert!(before.iter().all(|w| w.2 == "assigned"), "{windows:?}");
    assert!(after.iter().all(|w| w.2 == "expired"), "{windows:?}");
    collector.stop().await.unwrap();
}

/// Stops the collector; it ends the agent's open session.
async fn stop_collector(c: TestCollector) {
    tokio::time::timeout(Duration::from_secs(10), c.stop())
        .await
        .expect("collector stops within 10 s")
        .unwrap();
}

/// A foreign process put on C0 is ended by SIGTERM within one interval plus the grace period.
async fn foreign_is_ended(procs: &mut Procs, on: &OnCards, grace_ms: u64) -> u32 {
    let foreign = procs.spawn(Some(NOBODY), false);
    put(on, C0, foreign);
    let limit = Duration::from_millis(INTERVAL_MS as u64 + grace_ms + 2_000);
    let (st, _) = procs.wait_exit(foreign, limit).await;
    assert_eq!(st.signal(), Some(15));
    foreign
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforcement_goes_on_from_cached_assignments_while_the_collector_is_down() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    // The collector comes back on the same address.
    let at = collector.addr.to_string();
    import_grants(
        &collector.url,
        &[format!(
            "G-D,hpc,Acme,uid:0,kt,enf-down,{C0},2020-01-01,2099-12-31"
        )],
    )
    .await;
    let mut procs = Procs::default();
    let grantee = procs.spawn(None, false);
    let on = OnCards::default();
    put(&on, C0, grantee);
    let grace_ms = 1_000;
    let spec = |stop_at, await_collector| AgentSpec {
        state: dir.path(),
        url: format!("https://{at}"),
        host: "enf-down",
        enforcement: enforcement(EnforcementMode::Terminate, grace_ms),
        window_ms: 60_000,
        stop_at,
        await_collector,
    };

    // A running agent loses its collector after the assignments arrived.
    let mut agent = start_agent(spec(now_ms() + 5_000, true), &on);
    agent.assignments_applied().await;
    stop_collector(collector).await;
    assert!(
        tokio::net::TcpStream::connect(at.as_str()).await.is_err(),
        "nothing listens on {at} any more"
    );
    let first = foreign_is_ended(&mut procs, &on, grace_ms).await;
    assert!(!agent.status.borrow().connected, "it all happened offline");
    // The collector comes back for the agent to deliver and stop.
    let collector = TestCollector::start_on(&db, &at).await.unwrap();
    agent.finish().await;
    stop_collector(collector).await;

    // An agent started while the collector is down works from the cache on disk.
    let agent = start_agent(spec(now_ms() + 4_000, false), &on);
    let second = foreign_is_ended(&mut procs, &on, grace_ms).await;
    assert!(procs.alive(grantee), "the grantee's process lives");
    assert!(!agent.status.borrow().connected, "it all happened offline");
    let collector = TestCollector::start_on(&db, &at).await.unwrap();
    agent.finish().await;
    assert!(procs.alive(grantee));

    let events = enforcement_events(&db);
    for pid in [first, second] {
        assert_eq!(
            trail(&events, pid),
            vec![
                pair("none", "recorded"),
                pair("sigterm", "sent"),
                pair("sigterm", "exited")
            ],
            "{events:#?}"
        );
    }
    assert!(
        events
            .iter()
            .all(|e| e.grant_id == "G-D" && e.pid != grantee),
        "{events:#?}"
    );
    stop_collector(collector).await;
}

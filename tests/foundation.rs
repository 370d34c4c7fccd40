//! Foundation, end to end: a real collector on port 0 with a real SQLite file (and the same on
//! a PostgreSQL database), two agents with simulated cards over loopback gRPC; the stored
//! windows and the report are checked against the scenario's ground truth exactly. Also the
//! bad-input paths of the foundation.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use gpumeter_agent::clock::align_down;
use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_e2e::{TestCollector, TestDb, agent_config, bin, now_ms, pg_rows, spawn_sim_agent};
use gpumeter_proto::v1;

const A0: &str = "GPU-0000000a-0000-4000-8000-000000000000";
const A1: &str = "GPU-0000000a-0000-4000-8000-000000000001";
const A2: &str = "GPU-0000000a-0000-4000-8000-000000000002";
const B0: &str = "GPU-0000000b-0000-4000-8000-000000000000";
const B1: &str = "GPU-0000000b-0000-4000-8000-000000000001";

fn scenario_a() -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{A0}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 50
memory_used_bytes = 1000
processes = [{{ pid = 101, uid = 1001, user = "alice", memory_bytes = 1000 }}]

[[cards]]
uuid = "{A1}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 300
util_pct = 80
processes = [
  {{ pid = 102, uid = 1001, user = "alice", sm_util_pct = 60, memory_bytes = 2000 }},
  {{ pid = 103, uid = 1002, user = "bob", sm_util_pct = 20, memory_bytes = 500 }},
]

[[cards]]
uuid = "{A2}"
idle_power_w = 100
max_power_w = 500
lost = [{{ from_s = 120, until_s = 180 }}]
[[cards.phases]]
from_s = 0
util_pct = 30
processes = [{{ pid = 104, uid = 1003, user = "carol", memory_bytes = 3000 }}]
"#
    ))
    .unwrap()
}

fn scenario_b() -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{B0}"
idle_power_w = 60
max_power_w = 700

[[cards]]
uuid = "{B1}"
idle_power_w = 60
max_power_w = 700
[[cards.phases]]
from_s = 0
util_pct = 100
processes = [{{ pid = 201, uid = 1004, user = "dave", memory_bytes = 4000 }}]
"#
    ))
    .unwrap()
}

fn grants_csv() -> String {
    format!(
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
         G-HPC,hpc,Acme,user:alice,kt,host-a,{A0},2020-01-01,2099-12-31\n\
         G-HPC,hpc,Acme,user:alice,kt,host-a,{A1},2020-01-01,2099-12-31\n\
         G-RES,research,Lab,user:carol,kt,host-a,{A2},2020-01-01,2099-12-31\n\
         G-ADV,advanced,Bio,user:erin,nhn,host-b,{B0},2026-11-01,2027-02-28\n"
    )
}

/// A `windows` row: gpu_uuid, start_ms, end_ms, expected, good, unavailable_ms, util_avg_pct,
/// energy_mj, assignment_status, grant_id, occupied_ms, active_ms, foreign_ms.
type StoredWindow = (
    String,
    i64,
    i64,
    u32,
    u32,
    i64,
    Option<f64>,
    Option<i64>,
    String,
    String,
    i64,
    i64,
    i64,
);

#[derive(Debug, PartialEq)]
struct WindowTruth {
    good: u32,
    unavailable_ms: u64,
    util_avg: Option<f64>,
    energy_mj: Option<u64>,
}

/// The ground truth of a card's 60 s windows, straight from the scenario model: a sample at
/// `t` reports the state at `t - 1 ms`; energy is the counter's rise between good reads, so
/// energy used while the card was lost shows up at the first good read after it.
fn truth(s: &Scenario, uuid: &str, windows: i64) -> Vec<WindowTruth> {
    let c = s.cards.iter().find(|c| c.uuid == uuid).unwrap();
    let mut last_good = 0i64; // the priming read at t = 0
    (0..windows)
        .map(|w| {
            let mut good = 0;
            let mut lost = 0;
            let mut util_sum = 0.0;
            let mut energy = None;
            for k in 1..=60 {
                let t = w * 60_000 + k * 1000;
                if c.lost_at(t - 1) {
                    lost += 1;
                } else {
                    good += 1;
                    util_sum += f64::from(c.phase_at(t - 1).map_or(0, |p| p.util_pct));
                    let rise = c.energy_mj_at(t) - c.energy_mj_at(last_good);
                    energy = Some(energy.unwrap_or(0) + rise);
                    last_good = t;
                }
            }
            WindowTruth {
                good,
                unavailable_ms: lost * 1000,
                util_avg: (good > 0).then(|| util_sum / f64::from(good)),
                energy_mj: energy,
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_stream_windows_that_match_the_scenario_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::sqlite(&dir.path().join("ledger.db"));
    two_agents_stream_windows(dir, db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_stream_windows_that_match_the_scenario_exactly_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::postgres("foundation", dir.path()) else {
        return;
    };
    two_agents_stream_windows(dir, db).await;
}

async fn two_agents_stream_windows(dir: tempfile::TempDir, backend: TestDb) {
    let collector = TestCollector::start_in(&backend).await.unwrap();

    let mut admin = collector.admin().await;
    let r = admin
        .import_grants(v1::ImportGrantsRequest {
            csv: grants_csv(),
            actor: "test".into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((r.grants, r.cards), (3, 4));
    assert_eq!(r.warnings.len(), 4, "cards not seen yet are warnings");

    // Ten minutes of simulated time, ending in the past so clocks agree.
    let start = align_down(now_ms() - 3_600_000, 60_000);
    let stop = start + 600_000;
    let (sa, sb) = (scenario_a(), scenario_b());
    let a = spawn_sim_agent(
        agent_config("host-a", "kt", &collector.url, &dir.path().join("a"), 7),
        sa.clone(),
        start,
        stop,
        2_000.0,
    )
    .unwrap();
    let b = spawn_sim_agent(
        agent_config("host-b", "nhn", &collector.url, &dir.path().join("b"), 64),
        sb.clone(),
        start,
        stop,
        2_000.0,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        a.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
    })
    .await
    .expect("agents finish within 60 s");

    // Stored windows, read straight from the database.
    const WINDOWS: &str = "SELECT gpu_uuid, start_ms, end_ms, expected_samples, good_samples, unavailable_ms, util_avg_pct, energy_mj,
                    assignment_status, grant_id, occupied_ms, active_ms, foreign_ms
             FROM windows ORDER BY gpu_uuid, start_ms";
    let xid_79 = format!(
        "SELECT COUNT(*) FROM events WHERE kind = 'xid' AND code = 79 AND gpu_uuid = '{A2}'"
    );
    let (rows, xids): (Vec<StoredWindow>, i64) = match &backend {
        TestDb::Postgres { pg, .. } => (
            pg_rows(&pg.url, WINDOWS)
                .iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get::<_, i64>(3) as u32,
                        r.get::<_, i64>(4) as u32,
                        r.get(5),
                        r.get(6),
                        r.get(7),
                        r.get(8),
                        r.get(9),
                        r.get(10),
                        r.get(11),
                        r.get(12),
                    )
                })
                .collect(),
            pg_rows(&pg.url, &xid_79)[0].get(0),
        ),
        TestDb::Sqlite(db) => sqlite_rows(db, WINDOWS, &xid_79),
    };
    let mut per_card: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for r in rows {
        per_card.entry(r.0.clone()).or_default().push(r);
    }
    assert_eq!(per_card.len(), 5);
    for (uuid, windows) in &per_card {
        let s = if uuid.starts_with("GPU-0000000a") {
            &sa
        } else {
            &sb
        };
        assert_eq!(windows.len(), 10, "{uuid}: one record per window");
        let truths = truth(s, uuid, 10);
        for (w, row) in windows.iter().enumerate() {
            let w = w as i64;
            assert_eq!(
                (row.1, row.2),
                (start + w * 60_000, start + (w + 1) * 60_000),
                "{uuid}"
            );
            assert_eq!(row.3, 60, "{uuid} expected samples");
            let t = &truths[w as usize];
            assert_eq!(
                WindowTruth {
                    good: row.4,
                    unavailable_ms: row.5 as u64,
                    util_avg: row.6,
                    energy_mj: row.7.map(|e| e as u64)
                },
                *t,
                "{uuid} window {w}"
            );
        }
    }
    // Assignment as applied by the agent, per card.
    let status_of = |uuid: &str| {
        let w = &per_card[uuid][3];
        (w.8.clone(), w.9.clone())
    };
    assert_eq!(status_of(A0), ("assigned".into(), "G-HPC".into()));
    assert_eq!(status_of(A2), ("assigned".into(), "G-RES".into()));
    assert_eq!(status_of(B1), ("unassigned".into(), "".into()));
    // The advanced grant's validity is judged per slot by its dates.
    let adv_from = gpumeter_collector::report::parse_period("2026-11-01")
        .unwrap()
        .0;
    let b0_status = if start >= adv_from {
        "assigned"
    } else {
        "expired"
    };
    assert_eq!(per_card[B0][0].8, b0_status);
    // A1: alice and bob share 80 % utilization 60:20 over the last 5 minutes.
    let a1: (i64, i64, i64) = per_card[A1].iter().fold((0, 0, 0), |acc, r| {
        (acc.0 + r.10, acc.1 + r.11, acc.2 + r.12)
    });
    assert_eq!(a1, (300_000, 240_000, 300_000));

    // The usage view of the report, through the Query service and the real CLI binary.
    let out = gpumeter_e2e::cli()
        .args([
            "report",
            "--view",
            "usage",
            "--format",
            "json",
            "--server",
            &collector.url,
            "--period",
        ])
        .arg(format!("{}..{}", rfc3339(start), rfc3339(stop)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let card = |uuid: &str| {
        report["cards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["gpu_uuid"] == uuid)
            .unwrap_or_else(|| panic!("{uuid} in report"))
            .clone()
    };
    for uuid in [A0, A1, A2, B0, B1] {
        let s = if uuid.starts_with("GPU-0000000a") {
            &sa
        } else {
            &sb
        };
        let c = s.cards.iter().find(|c| c.uuid == uuid).unwrap();
        let e = c.energy_mj_at(600_000) - c.energy_mj_at(0);
        let r = card(uuid);
        assert_eq!(r["metered_ms"], 600_000, "{uuid}");
        assert_eq!(r["energy_mj"], e, "{uuid}");
        assert_eq!(r["windows"], 10, "{uuid}");
    }
    assert_eq!(card(A2)["unavailable_ms"], 60_000);
    assert_eq!(card(A0)["active_ms"], 300_000);
    assert_eq!(card(A0)["util_avg_pct"], 50.0);
    assert_eq!(card(A0)["occupied_hours"], 600_000.0 / 3_600_000.0);
    assert_eq!(card(A1)["foreign_ms"], 300_000);
    assert_eq!(card(A1)["util_avg_pct"], 40.0);
    assert_eq!(card(B0)["occupied_ms"], 0);
    assert_eq!(card(B1)["active_ms"], 600_000);
    let tenant = |uuid: &str, who: &str| {
        report["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["gpu_uuid"] == uuid && t["principal"] == who)
            .unwrap_or_else(|| panic!("{who} on {uuid}"))
            .clone()
    };
    let alice = tenant(A1, "user:alice");
    assert_eq!(
        (alice["occupied_ms"].as_u64(), alice["active_ms"].as_u64()),
        (Some(300_000), Some(180_000))
    );
    assert_eq!(alice["matches_grant"], true);
    let bob = tenant(A1, "user:bob");
    assert_eq!(
        (bob["occupied_ms"].as_u64(), bob["active_ms"].as_u64()),
        (Some(300_000), Some(60_000))
    );
    assert_eq!(bob["matches_grant"], false);
    let carol = tenant(A2, "user:carol");
    // Carol's card was lost for one window: 9 windows occupied at 30 %.
    assert_eq!(
        (carol["occupied_ms"].as_u64(), carol["active_ms"].as_u64()),
        (Some(540_000), Some(162_000))
    );
    assert_eq!(tenant(B1, "user:dave")["matches_grant"], false);

    // The table names every card.
    let out = gpumeter_e2e::cli()
        .args([
            "report",
            "--view",
            "usage",
            // Whole GPU UUIDs (the default table shortens them to fit 120 columns).
            "--wide",
            "--server",
            &collector.url,
            "--period",
        ])
        .arg(format!("{}..{}", rfc3339(start), rfc3339(stop)))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    for uuid in [A0, A1, A2, B0, B1] {
        assert!(table.contains(uuid), "{table}");
    }
    assert!(table.contains("user:bob"), "{table}");

    // XID 79 from the lost span arrived as an event, exactly once.
    assert_eq!(xids, 1);
    collector.stop().await.unwrap();
}

/// The stored windows and the XID 79 count, read straight from the SQLite file.
fn sqlite_rows(db: &std::path::Path, windows: &str, xid_79: &str) -> (Vec<StoredWindow>, i64) {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut st = conn.prepare(windows).unwrap();
    let rows: Vec<StoredWindow> = st
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
                r.get(8)?,
                r.get(9)?,
                r.get(10)?,
                r.get(11)?,
                r.get(12)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let xids: i64 = conn.query_row(xid_79, [], |r| r.get(0)).unwrap();
    (rows, xids)
}

/// An RFC 3339 time for a CLI period bound.
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn write_agent_config(dir: &std::path::Path, url: &str, extra: &str) -> std::path::PathBuf {
    let scenario = dir.join("scenario.toml");
    std::fs::write(
        &scenario,
        format!(
            "[[cards]]\nuuid = \"{A0}\"\n[[cards.phases]]\nfrom_s = 0\nutil_pct = 40\nprocesses = [{{ pid = 7, uid = 1001, user = \"alice\" }}]\n"
        ),
    )
    .unwrap();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "agent_id = \"bin-agent\"\ncsp = \"kt\"\nstate_dir = \"{}\"\n{extra}\n[collector]\nurl = \"{url}\"\n{tls}backoff_initial_ms = 50\nbackoff_max_ms = 200\n\n[sampling]\ninterval_ms = 1000\nwindow_ms = 60000\n\n[source]\nkind = \"sim\"\nscenario = \"{}\"\nspeed = 300.0\n",
            dir.join("state").display(),
            scenario.display(),
            tls = if url.starts_with("https://") {
                gpumeter_e2e::agent_tls_toml("bin-agent", "bin-agent", &dir.join("tls"))
            } else {
                String::new()
            },
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn malformed_configs_exit_64_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_agent_config(dir.path(), "http://127.0.0.1:9", "");
    let text = std::fs::read_to_string(&good).unwrap();
    let cases = [
        (text.replace("bin-agent", "bad agent"), "agent_id"),
        (
            text.replace("http://127.0.0.1:9", "127.0.0.1:9"),
            "collector.url",
        ),
        (
            text.replace("window_ms = 60000", "window_ms = 1500"),
            "sampling.window_ms",
        ),
        (format!("{text}\n[enforcement]\nmode = \"nuke\"\n"), "nuke"),
        (format!("colour = \"blue\"\n{text}"), "colour"),
        ("agent_id = [".to_string(), "agent.toml"),
    ];
    for (body, field) in cases {
        let p = dir.path().join("agent.toml");
        std::fs::write(&p, body).unwrap();
        let out = Command::new(bin("gpumeter-agent"))
            .args(["run", "--config"])
            .arg(&p)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{field}: {err}");
        assert!(err.contains(field), "{field}: {err}");
    }
    let out = Command::new(bin("gpumeter-agent"))
        .args(["run", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
    let out = Command::new(bin("gpumeter-agent"))
        .args(["run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "usage error");

    let cfg = dir.path().join("collector.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\n[limits]\nmax_batch_records = 0\n",
    )
    .unwrap();
    let out = gpumeter_e2e::cli()
        .args(["serve", "--db"])
        .arg(dir.path().join("c.db"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("limits.max_batch_records"));
}

/// The real agent binary against a collector that is not there yet: it keeps retrying (and
/// says so), keeps metering into its spool, and delivers every window once the collector
/// comes up on that port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_outlives_a_collector_that_is_down_and_loses_no_window() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("https://127.0.0.1:{port}");
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = write_agent_config(
        dir.path(),
        &url,
        &format!("metrics_listen = \"127.0.0.1:{metrics_port}\""),
    );
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut agent = std::process::Command::new(bin("gpumeter-agent"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(log)
        .spawn()
        .unwrap();
    // 300x: three simulated minutes of windows pile up in the spool while nobody listens.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(agent.try_wait().unwrap().is_none(), "agent must not exit");
    let db = dir.path().join("ledger.db");
    // The agent's clock runs 300x from now: its windows lie in the collector's future.
    let collector = TestCollector::start_with(
        &db,
        &format!("127.0.0.1:{port}"),
        gpumeter_e2e::sped_up_options(),
    )
    .await
    .unwrap();
    // Wait for at least 5 windows to be stored.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM windows", [], |r| r.get(0))
            .unwrap();
        if n >= 5 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "windows never arrived ({n})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The Prometheus endpoint tells an operator the same story (the ack that follows the
    // commit may still be on its way on a loaded machine).
    let acked = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("gpumeter_agent_acked_seq "))
            .is_some_and(|v| v.trim() != "0")
    };
    let mut metrics = get_metrics(metrics_port).await;
    while !acked(&metrics) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        metrics = get_metrics(metrics_port).await;
    }
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| {
                // One series, labelled with the agent's id.
                let rest = l.strip_prefix(name)?.strip_prefix('{')?;
                rest.split_once("} ")?.1.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    assert_eq!(
        gauge("gpumeter_agent_collector_connected"),
        1.0,
        "{metrics}"
    );
    assert!(gauge("gpumeter_agent_acked_seq") > 0.0, "{metrics}");
    assert!(gauge("gpumeter_agent_sessions_total") >= 1.0, "{metrics}");
    let pid = agent.id() as i32;
    assert_eq!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .code(),
        Some(0)
    );
    let status = agent.wait().unwrap();
    assert!(
        status.success(),
        "agent exits cleanly on SIGTERM: {status:?}"
    );
    let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(
        log.contains("retrying"),
        "the agent logs its retries:\n{log}"
    );
    // Every window from the first to the last is there once, back to back.
    let mut st = conn
        .prepare("SELECT start_ms, end_ms, good_samples, expected_samples FROM windows ORDER BY start_ms")
        .unwrap();
    let w: Vec<(i64, i64, u32, u32)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for pair in w.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "windows are contiguous: {w:?}");
    }
    // The first window is partial (the agent started inside it); every later one is whole.
    assert!(w[0].3 <= 60 && w[0].2 == w[0].3, "{w:?}");
    for x in &w[1..] {
        assert_eq!(
            (x.2, x.3),
            (60, 60),
            "every full window has all its samples: {w:?}"
        );
    }
    let seqs: Vec<i64> = conn
        .prepare("SELECT seq FROM records WHERE agent_id = 'bin-agent' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "no gap, no duplicate"
    );
    collector.stop().await.unwrap();
}

#[tokio::test]
async fn a_second_live_session_for_the_same_agent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::sqlite(&dir.path().join("l.db"));
    a_second_live_session_is_refused(db).await;
}

#[tokio::test]
async fn a_second_live_session_for_the_same_agent_is_refused_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::postgres("second_session", dir.path()) else {
        return;
    };
    a_second_live_session_is_refused(db).await;
}

async fn a_second_live_session_is_refused(backend: TestDb) {
    use gpumeter_proto::v1::agent_message;
    let collector = TestCollector::start_in(&backend).await.unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
    let hello = v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(v1::Hello {
            protocol_version: 1,
            agent_id: "twin".into(),
            host_id: "twin".into(),
            csp: "kt".into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            epoch: 1,
            next_seq: 1,
            ..Default::default()
        })),
    };
    let open = |hello: v1::AgentMessage| {
        let url = collector.url.clone();
        async move {
            let mut c = gpumeter_e2e::ingest_at(&url, "twin").await;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(hello).await.unwrap();
            let r = c
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            (tx, r)
        }
    };
    let (_tx1, first) = open(hello.clone()).await;
    let mut first = first.unwrap().into_inner();
    let welcome = first.message().await.unwrap().unwrap();
    assert!(matches!(
        welcome.kind,
        Some(v1::collector_message::Kind::Welcome(_))
    ));
    let (_tx2, second) = open(hello.clone()).await;
    let err = match second {
        Err(s) => s,
        Ok(r) => r.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    assert!(
        err.message().contains("twin already has a live session"),
        "{}",
        err.message()
    );
    // Once the first session ends, the agent may connect again.
    drop(_tx1);
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_tx3, third) = open(hello).await;
    assert!(third.is_ok());
    collector.stop().await.unwrap();
}

async fn get_metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).await.unwrap();
    assert!(s.starts_with("HTTP/1.1 200 OK"), "{s}");
    s
}

//! The operator and auditor listings through the real CLI, on a real ledger: `hosts`,
//! `alarms`, `events`, `timeline` and `violations`, each as a table (header row, KST) and as
//! JSON, against what the ledger holds (read with SQL) and what the report counts; and the
//! violations-by-action gauge on /metrics. Runs on SQLite, and on PostgreSQL when one is
//! reachable (`GPUMETER_TEST_PG`; the PostgreSQL test says `SKIPPED` otherwise).
//!
//! The scenario (T0 = 2026-04-10 10:00 KST), host-l of CSP kt, 30 minutes:
//! - L0: alice at 50 % all along; mallory (not of the grant) joins for minutes 10-15.
//! - L1: alice at 80 %; the card is lost for minutes 20-25 (XID 79).
//!   L0 and L1 are G-L's (hpc, the whole of April).
//! - L2: no grant; bob uses it all along.

use std::process::Command;
use std::time::Duration;

use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_collector::server::ServerOptions;
use gpumeter_e2e::{TestCollector, TestDb, agent_config, bin, spawn_sim_agent};
use gpumeter_proto::v1;
use serde_json::Value;

const L0: &str = "GPU-0000001a-0000-4000-8000-000000000000";
const L1: &str = "GPU-0000001a-0000-4000-8000-000000000001";
const L2: &str = "GPU-0000001a-0000-4000-8000-000000000002";
const MIN: i64 = 60_000;

fn t0() -> i64 {
    chrono::DateTime::parse_from_rfc3339("2026-04-10T10:00:00+09:00")
        .unwrap()
        .timestamp_millis()
}

fn scenario() -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{L0}"
[[cards.phases]]
from_s = 0
until_s = 600
util_pct = 50
processes = [{{ pid = 301, uid = 1001, user = "alice" }}]
[[cards.phases]]
from_s = 600
until_s = 900
util_pct = 50
processes = [
  {{ pid = 301, uid = 1001, user = "alice" }},
  {{ pid = 302, uid = 1666, user = "mallory" }},
]
[[cards.phases]]
from_s = 900
util_pct = 50
processes = [{{ pid = 301, uid = 1001, user = "alice" }}]

[[cards]]
uuid = "{L1}"
lost = [{{ from_s = 1200, until_s = 1500 }}]
[[cards.phases]]
from_s = 0
util_pct = 80
processes = [{{ pid = 303, uid = 1001, user = "alice" }}]

[[cards]]
uuid = "{L2}"
[[cards.phases]]
from_s = 0
util_pct = 90
processes = [{{ pid = 304, uid = 1002, user = "bob" }}]
"#
    ))
    .unwrap()
}

const GRANTS: &str = "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
G-L,hpc,Lab,user:alice,kt,host-l,GPU-0000001a-0000-4000-8000-000000000000,2026-04-01,2026-04-30\n\
G-L,hpc,Lab,user:alice,kt,host-l,GPU-0000001a-0000-4000-8000-000000000001,2026-04-01,2026-04-30\n";

/// A port nobody listens on (for the metrics endpoint).
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The body of `GET /metrics`.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// One number from the ledger, by SQL on whichever backend holds it.
fn count(db: &TestDb, sql: &str) -> i64 {
    match db {
        TestDb::Sqlite(path) => rusqlite::Connection::open(path)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap(),
        TestDb::Postgres { pg, .. } => gpumeter_e2e::pg_rows(&pg.url, sql)[0].get::<_, i64>(0),
    }
}

struct Cli<'a> {
    url: &'a str,
}

impl Cli<'_> {
    /// `gpumeter-collector ARGS --server URL`, which must succeed; its standard output.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(bin("gpumeter-collector"))
            .envs(gpumeter_e2e::cli_env())
            .args(args)
            .args(["--server", self.url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The same with `--json`: an array of objects.
    fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let text = self.run(&a);
        match serde_json::from_str(&text) {
            Ok(Value::Array(items)) => items,
            other => panic!("{args:?}: not a JSON array: {other:?}\n{text}"),
        }
    }

    /// A table's header cells and its rows' lines (the rule under the header checked).
    fn table(&self, args: &[&str], first_header: &str) -> (Vec<String>, Vec<String>) {
        let text = self.run(args);
        let mut lines = text.lines().skip_while(|l| !l.starts_with(first_header));
        let header = lines
            .next()
            .unwrap_or_else(|| panic!("{args:?}: no header {first_header}:\n{text}"));
        let rule = lines.next().unwrap_or_default();
        assert!(
            !rule.is_empty() && rule.chars().all(|c| c == '-' || c == ' '),
            "{args:?}: no rule under the header:\n{text}"
        );
        (
            header.split_whitespace().map(str::to_string).collect(),
            lines.map(str::to_string).collect(),
        )
    }
}

/// Instants in JSON come twice; the RFC 3339 form is KST and names the same millisecond.
fn same_instant(item: &Value, name: &str) {
    let ms = item[format!("{name}_unix_ms")].as_i64().unwrap();
    let text = item[name].as_str().unwrap();
    assert!(text.ends_with("+09:00"), "{text}");
    assert_eq!(
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis(),
        ms,
        "{item}"
    );
}

async fn every_listing_shows_what_the_ledger_holds(backend: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = free_port();
    let opts = ServerOptions {
        collector_id: "listings".into(),
        metrics_listen: Some(metrics),
        ..gpumeter_e2e::replay_options()
    };
    let collector = TestCollector::start_in_with(&backend, "127.0.0.1:0", opts)
        .await
        .unwrap();
    let url = collector.url.clone();
    let started = gpumeter_e2e::now_ms();
    let r = gpumeter_e2e::admin_at(&url)
        .await
        .import_grants(v1::ImportGrantsRequest {
            csv: GRANTS.into(),
            actor: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let agent = spawn_sim_agent(
        agent_config("host-l", "kt", &url, &dir.path().join("agent"), 64),
        scenario(),
        t0(),
        t0() + 30 * MIN,
        2_000.0,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(120), agent)
        .await
        .expect("the agent finishes within 120 s")
        .unwrap()
        .unwrap();
    let cli = Cli { url: &url };
    let db = &backend;

    // hosts: the agent, its durable seq as the ledger holds it, last seen just now.
    let max_seq = count(db, "SELECT MAX(seq) FROM records WHERE agent_id = 'host-l'");
    let hosts = cli.json(&["hosts"]);
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    let h = &hosts[0];
    assert_eq!(
        (&h["agent_id"], &h["host_id"], &h["csp"]),
        (&"host-l".into(), &"host-l".into(), &"kt".into())
    );
    assert_eq!(h["durable_seq"], max_seq);
    assert_eq!(h["cards"].as_array().unwrap().len(), 3);
    // The collector took the agent's Hello, so it knows the agent's head then; everything
    // the agent held is durable now.
    assert!(h["agent_head_seq"].as_i64().unwrap() <= max_seq, "{h}");
    assert_eq!(h["seq_lag"], 0, "{h}");
    let last_record = h["last_record_unix_ms"].as_i64().unwrap();
    assert!(
        last_record >= started && last_record <= gpumeter_e2e::now_ms(),
        "{h}"
    );
    assert!(h["last_seen_unix_ms"].as_i64().unwrap() >= last_record);
    assert!((0..120_000).contains(&h["lag_ms"].as_i64().unwrap()), "{h}");
    for t in ["last_hello", "last_record", "last_seen"] {
        same_instant(h, t);
    }
    let (header, rows) = cli.table(&["hosts"], "AGENT");
    assert_eq!(
        header,
        [
            "AGENT",
            "HOST",
            "CSP",
            "HOSTNAME",
            "VERSION",
            "CARDS",
            "DURABLE_SEQ",
            "AGENT_HEAD",
            "SEQ_LAG",
            "LAST_SEEN_KST",
            "AGE"
        ]
    );
    assert_eq!(rows.len(), 1);
    let cells: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!((cells[0], cells[5]), ("host-l", "3"));
    assert_eq!(cells[6], max_seq.to_string());

    // timeline: every window the ledger counts for the card, in time order.
    let windows_l1 = count(
        db,
        &format!(
            "SELECT COUNT(*) FROM windows w WHERE w.gpu_uuid = '{L1}'
             AND NOT EXISTS (SELECT 1 FROM window_flags f WHERE f.agent_id = w.agent_id AND f.seq = w.seq)"
        ),
    );
    assert!(
        (25..=30).contains(&windows_l1),
        "about 30 one-minute windows: {windows_l1}"
    );
    let unavailable_l1 = count(
        db,
        &format!("SELECT COUNT(*) FROM windows WHERE gpu_uuid = '{L1}' AND unavailable_ms > 0"),
    );
    assert!(unavailable_l1 >= 5, "minutes 20-25 lost: {unavailable_l1}");
    let timeline = cli.json(&["timeline", "--gpu", L1, "--period", "2026-04-10"]);
    assert_eq!(timeline.len() as i64, windows_l1);
    let starts: Vec<i64> = timeline
        .iter()
        .map(|w| w["start_unix_ms"].as_i64().unwrap())
        .collect();
    assert!(starts.windows(2).all(|p| p[0] <= p[1]), "in time order");
    assert_eq!(starts[0], t0());
    assert!(*starts.last().unwrap() < t0() + 30 * MIN);
    for w in &timeline {
        same_instant(w, "start");
        same_instant(w, "end");
        assert_eq!(w["grant_id"], "G-L");
        assert_eq!(w["gpu_uuid"], L1);
    }
    let lost: Vec<&Value> = timeline
        .iter()
        .filter(|w| {
            w["flags"]
                .as_array()
                .unwrap()
                .contains(&"unavailable".into())
        })
        .collect();
    assert_eq!(lost.len() as i64, unavailable_l1);
    // The same figures the report counts on the card.
    let report: Value = {
        let text = cli.run(&["report", "--period", "2026-04", "--format", "json"]);
        let (content, _) = gpumeter_collector::provenance::extract(&text).unwrap();
        serde_json::from_str(&content).unwrap()
    };
    let card = report["grants"][0]["cards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["gpu_uuid"] == L1)
        .unwrap()
        .clone();
    let sum = |k: &str| -> u64 { timeline.iter().map(|w| w[k].as_u64().unwrap_or(0)).sum() };
    assert_eq!(
        sum("unavailable_ms"),
        card["unavailable_ms"].as_u64().unwrap()
    );
    assert_eq!(sum("energy_mj"), card["energy_mj"].as_u64().unwrap());
    assert_eq!(sum("occupied_ms"), card["occupied_ms"].as_u64().unwrap());
    assert!(timeline.iter().any(|w| w["memory_used_max_bytes"].is_u64()));
    let text = cli.run(&["timeline", "--gpu", L1, "--period", "2026-04-10"]);
    assert!(
        text.starts_with(&format!(
            "card {L1}: {windows_l1} windows, 2026-04-10 00:00:00 .. 2026-04-11 00:00:00 KST\n"
        )) && text.contains("held by grant G-L 2026-04-10 00:00:00 .. 2026-04-11 00:00:00 KST"),
        "{text}"
    );
    let (header, rows) = cli.table(
        &["timeline", "--gpu", L1, "--period", "2026-04-10"],
        "START_KST",
    );
    assert_eq!(header[..4], ["START_KST", "END_KST", "AGENT", "SEQ"]);
    assert_eq!(header.last().unwrap(), "FLAGS");
    assert_eq!(rows.len() as i64, windows_l1);
    // The first window: 10:00:00 to 10:01:00 KST, alice at 80 %.
    let first: Vec<&str> = rows[0].split_whitespace().collect();
    assert_eq!(
        first[..4],
        ["2026-04-10", "10:00:00", "2026-04-10", "10:01:00"]
    );
    assert!(
        rows[0].contains(" ok ") && rows[0].contains(" assigned ") && rows[0].contains("80.0"),
        "{}",
        rows[0]
    );
    assert_eq!(
        rows.iter().filter(|r| r.contains("unavailable")).count() as i64,
        unavailable_l1
    );

    // events: what the ledger holds for the day, and the filters.
    let in_day = format!(
        "SELECT COUNT(*) FROM events WHERE at_ms >= {} AND at_ms < {}",
        t0() - 10 * 3_600_000,
        t0() + 14 * 3_600_000
    );
    let events = cli.json(&["events", "--period", "2026-04-10"]);
    assert_eq!(events.len() as i64, count(db, &in_day));
    let kinds = |es: &[Value]| -> Vec<String> {
        es.iter()
            .map(|e| e["kind"].as_str().unwrap().to_string())
            .collect()
    };
    for k in ["xid", "gpu_lost", "gpu_recovered", "enforcement"] {
        assert!(kinds(&events).iter().any(|x| x == k), "{k}: {events:?}");
    }
    for e in &events {
        same_instant(e, "at");
    }
    let xids = cli.json(&["events", "--period", "2026-04-10", "--kind", "xid"]);
    assert_eq!(
        xids.iter()
            .map(|e| (e["gpu_uuid"].as_str().unwrap(), e["code"].as_i64().unwrap()))
            .collect::<Vec<_>>(),
        [(L1, 79)]
    );
    let at = xids[0]["at_unix_ms"].as_i64().unwrap();
    assert!((t0() + 20 * MIN..t0() + 21 * MIN).contains(&at), "{xids:?}");
    let on_l1 = cli.json(&["events", "--period", "2026-04-10", "--gpu", L1]);
    assert!(on_l1.iter().all(|e| e["gpu_uuid"] == L1) && on_l1.len() >= 3);
    assert!(
        cli.json(&["events", "--period", "2026-04-10", "--agent", "nobody"])
            .is_empty()
    );
    assert_eq!(
        cli.json(&["events", "--period", "2026-04-10", "--agent", "host-l"])
            .len(),
        events.len()
    );
    let (header, rows) = cli.table(&["events", "--period", "2026-04-10"], "TIME_KST");
    assert_eq!(
        header,
        [
            "TIME_KST", "HOST", "AGENT", "SEQ", "GPU", "KIND", "CODE", "DETAIL"
        ]
    );
    assert_eq!(rows.len(), events.len());
    assert!(
        rows.iter().any(|r| r.starts_with("2026-04-10 10:20:")
            && r.contains(" xid ")
            && r.contains(" 79 ")),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .any(|r| r.contains(" enforcement ") && r.contains("pid 302, user:mallory, grant G-L")),
        "{rows:?}"
    );

    // violations: one row per episode, as many as the report counts.
    let violations = cli.json(&["violations", "--period", "2026-04"]);
    assert_eq!(
        violations.len() as u64,
        report["all_violations"].as_u64().unwrap()
    );
    let mut got: Vec<(String, Value, String, i64, String)> = violations
        .iter()
        .map(|v| {
            same_instant(v, "at");
            (
                v["gpu_uuid"].as_str().unwrap().to_string(),
                v["grant_id"].clone(),
                v["principal"].as_str().unwrap().to_string(),
                v["pid"].as_i64().unwrap(),
                v["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            (
                L0.to_string(),
                Value::from("G-L"),
                "user:mallory".into(),
                302,
                "none".into()
            ),
            (
                L2.to_string(),
                Value::Null,
                "user:bob".into(),
                304,
                "none".into()
            ),
        ]
    );
    assert!(violations.iter().all(|v| v["host_id"] == "host-l"));
    let (header, rows) = cli.table(&["violations", "--period", "2026-04"], "TIME_KST");
    assert_eq!(
        header,
        [
            "TIME_KST",
            "HOST",
            "GPU",
            "GRANT",
            "PRINCIPAL",
            "PID",
            "MODE",
            "ACTION",
            "RESULT"
        ]
    );
    assert_eq!(rows.len(), violations.len());
    assert!(
        rows.iter()
            .any(|r| r.contains(L2) && r.contains(" none ") && r.contains("user:bob"))
    );
    let granted = cli.json(&["violations", "--period", "2026-04", "--grant", "G-L"]);
    assert_eq!(
        granted.len() as u64,
        report["total"]["violations"].as_u64().unwrap()
    );
    assert_eq!(granted[0]["gpu_uuid"], L0);

    // alarms: the same array and table shape (whatever this run raised).
    let alarms = cli.json(&["alarms"]);
    assert_eq!(
        alarms.len() as i64,
        count(db, "SELECT COUNT(*) FROM alarms")
    );
    for a in &alarms {
        same_instant(a, "at");
    }
    let (header, rows) = cli.table(&["alarms"], "TIME_KST");
    assert_eq!(header, ["TIME_KST", "AGENT", "KIND", "SEQ", "DETAIL"]);
    assert_eq!(rows.len(), alarms.len());

    // The metrics count the same episodes, by the action taken.
    let body = scrape(metrics).await;
    let line = body
        .lines()
        .find(|l| {
            l.starts_with("gpumeter_collector_violation_episodes{") && l.contains("action=\"none\"")
        })
        .unwrap_or_else(|| panic!("{body}"));
    let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(value, violations.len() as f64, "{line}");

    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listing_shows_what_the_ledger_holds_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    every_listing_shows_what_the_ledger_holds(TestDb::sqlite(&dir.path().join("ledger.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listing_shows_what_the_ledger_holds_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::postgres("listings", dir.path()) else {
        return;
    };
    every_listing_shows_what_the_ledger_holds(db).await;
}

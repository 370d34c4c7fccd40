//! `report --view jobs` on a real ledger: a simulated agent whose processes run in a Slurm job
//! (on two cards) and in a Kubernetes pod, metered over TLS into a SQLite file; the jobs view
//! in every format against the principals' rows the ledger derived from the same records.
//!
//! The scenario (T0 = 2026-04-10 10:00 KST), host-j of CSP kt, 20 minutes:
//! - J0: alice in Slurm job 4711 at 60 %.
//! - J1: alice in the same job at 40 %, and bob in pod 3f2a1b4c-… at the same time.

use std::time::Duration;

use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_e2e::{TestCollector, agent_config, spawn_sim_agent};
use serde_json::Value;

const J0: &str = "GPU-0000002a-0000-4000-8000-000000000000";
const J1: &str = "GPU-0000002a-0000-4000-8000-000000000001";
const SLURM: &str = "/system.slice/slurmstepd.scope/job_4711/step_0/user/task_0";
const POD: &str = "3f2a1b4c-1111-2222-3333-444455556666";
const MIN: i64 = 60_000;

fn t0() -> i64 {
    chrono::DateTime::parse_from_rfc3339("2026-04-10T10:00:00+09:00")
        .unwrap()
        .timestamp_millis()
}

fn scenario() -> Scenario {
    let pod_cgroup = format!("/kubepods/burstable/pod{POD}/c0ffee");
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{J0}"
[[cards.phases]]
from_s = 0
util_pct = 60
processes = [{{ pid = 401, uid = 1001, user = "alice", cgroup = "{SLURM}" }}]

[[cards]]
uuid = "{J1}"
[[cards.phases]]
from_s = 0
util_pct = 40
processes = [
  {{ pid = 402, uid = 1001, user = "alice", cgroup = "{SLURM}" }},
  {{ pid = 403, uid = 1002, user = "bob", cgroup = "{pod_cgroup}" }},
]
"#
    ))
    .unwrap()
}

/// (occupied, active, windows) of `principal`'s rows on the cards, as the ledger derived them.
fn ledger_sums(db: &std::path::Path, principal: &str, cards: &[&str]) -> (u64, u64, u64) {
    let c = rusqlite::Connection::open(db).unwrap();
    let list = cards
        .iter()
        .map(|g| format!("'{g}'"))
        .collect::<Vec<_>>()
        .join(",");
    c.query_row(
        &format!(
            "SELECT COALESCE(SUM(p.occupied_ms), 0), COALESCE(SUM(p.active_ms), 0), COUNT(*)
             FROM window_principals p JOIN windows w ON w.agent_id = p.agent_id AND w.seq = p.seq
             WHERE p.principal = ?1 AND w.gpu_uuid IN ({list}) AND p.occupied_ms > 0"
        ),
        [principal],
        |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_view_sums_each_slurm_job_and_pod_from_the_signed_records() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("jobs.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let url = collector.url.clone();
    let agent = spawn_sim_agent(
        agent_config("host-j", "kt", &url, &dir.path().join("agent"), 64),
        scenario(),
        t0(),
        t0() + 20 * MIN,
        2_000.0,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(120), agent)
        .await
        .expect("the agent finishes within 120 s")
        .unwrap()
        .unwrap();
    let report = |format: &str| {
        let out = collector
            .cli()
            .args([
                "report", "--view", "jobs", "--period", "2026-04", "--format", format, "--server",
                &url,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{format}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let jobs: Vec<Value> = serde_json::from_str(&report("json")).unwrap();
    let keys: Vec<(&str, &str, &str)> = jobs
        .iter()
        .map(|j| {
            (
                j["kind"].as_str().unwrap(),
                j["job_id"].as_str().unwrap(),
                j["principal"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![("k8s", POD, "user:bob"), ("slurm", "4711", "user:alice")]
    );
    let (pod, slurm) = (&jobs[0], &jobs[1]);
    // The job's figures are its principals' rows, summed over both cards for the Slurm job.
    let (occupied, active, windows) = ledger_sums(&db, "user:alice", &[J0, J1]);
    assert!(occupied > 15 * MIN as u64, "{occupied}");
    assert_eq!(
        (
            slurm["occupied_ms"].as_u64(),
            slurm["active_ms"].as_u64(),
            slurm["windows"].as_u64()
        ),
        (Some(occupied), Some(active), Some(windows)),
        "{slurm}"
    );
    assert_eq!(slurm["gpu_uuids"], serde_json::json!([J0, J1]));
    assert_eq!(slurm["host_ids"], serde_json::json!(["host-j"]));
    assert_eq!(slurm["uid"], 1001);
    let h = slurm["gpu_hours"].as_f64().unwrap();
    assert!((h - occupied as f64 / 3_600_000.0).abs() < 1e-9, "{h}");
    let (occupied, active, _) = ledger_sums(&db, "user:bob", &[J1]);
    assert_eq!(
        (pod["occupied_ms"].as_u64(), pod["active_ms"].as_u64()),
        (Some(occupied), Some(active)),
        "{pod}"
    );
    assert_eq!(pod["gpu_uuids"], serde_json::json!([J1]));
    // Alice's share on J1 is less than the card's: two principals divide its utilization.
    assert!(
        slurm["active_ms"].as_u64().unwrap() < slurm["occupied_ms"].as_u64().unwrap(),
        "{slurm}"
    );

    // The table names the jobs and fits 120 columns; the CSV is the shared writer's (BOM, one
    // row per job); the HTML page is self-contained.
    let table = report("table");
    assert!(
        table.contains("slurm  4711") && table.contains(&POD[..11]),
        "{table}"
    );
    assert!(table.lines().all(|l| l.chars().count() <= 120), "{table}");
    let csv = report("csv");
    assert!(csv.starts_with('\u{feff}'), "no BOM");
    let rows: Vec<&str> = csv.trim_end().split("\r\n").collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[0].contains("job_id") && rows[2].starts_with("slurm,4711,user:alice,1001,"));
    let html = report("html");
    assert!(html.contains("<section id=\"jobs\">") && html.contains("4711"));
    assert!(!html.contains("http://") && !html.contains("https://"));
    // A grant filter keeps only windows metered under that grant: none here.
    let out = collector
        .cli()
        .args([
            "report", "--view", "jobs", "--period", "2026-04", "--grant", "G-NONE", "--format",
            "json", "--server", &url,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    collector.stop().await.unwrap();
}

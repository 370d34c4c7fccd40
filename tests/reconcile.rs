//! Reconciliation, end to end, against a scenario with known ground truth: a real collector on
//! a SQLite file, simulated agents over loopback gRPC replaying two hours of 10 April 2026
//! (KST), the report for the Korean month 2026-04 through the real CLI, every JSON figure
//! checked exactly, and the table checked byte for byte.
//!
//! The scenario (minutes after T0 = 2026-04-10 10:00 KST):
//! - host-a (CSP kt) runs 0-60 and 80-120: an agent outage of 20 minutes.
//!   A0 and A1: alice all along; G-HPC (hpc, user:alice) holds both for 10-100, so they are in
//!   use unassigned for 0-10 and 100-120. On A1, bob (not of the grant) runs 40-50.
//!   A2: carol all along, granted to G-RES (research) for 0-120; the card is lost for 30-35.
//! - host-b (CSP nhn) runs 0-120. B0 is granted to G-ADV (advanced, user:erin) for the whole of
//!   April and never used (an idle grant). B1 has no grant; dave uses it all along.

use std::time::Duration;

use gpumeter_agent::gpu::sim::{Scenario, SimCard};
use gpumeter_e2e::{TestCollector, agent_config, spawn_sim_agent};
use gpumeter_proto::v1;
use serde_json::{Value, json};

const A0: &str = "GPU-0000000a-0000-4000-8000-000000000000";
const A1: &str = "GPU-0000000a-0000-4000-8000-000000000001";
const A2: &str = "GPU-0000000a-0000-4000-8000-000000000002";
const B0: &str = "GPU-0000000b-0000-4000-8000-000000000000";
const B1: &str = "GPU-0000000b-0000-4000-8000-000000000001";

const MIN: i64 = 60_000;
const DAY: i64 = 86_400_000;
/// Simulated seconds per real second.
const SPEED: f64 = 5_000.0;

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

/// T0: 2026-04-10 10:00 KST.
fn t0() -> i64 {
    ms("2026-04-10T10:00:00+09:00")
}

/// host-a's first run (minutes 0-60).
fn scenario_a1() -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{A0}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 50
processes = [{{ pid = 101, uid = 1001, user = "alice", memory_bytes = 1000 }}]

[[cards]]
uuid = "{A1}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
until_s = 2400
util_pct = 80
processes = [{{ pid = 102, uid = 1001, user = "alice", sm_util_pct = 60 }}]
[[cards.phases]]
from_s = 2400
until_s = 3000
util_pct = 80
processes = [
  {{ pid = 102, uid = 1001, user = "alice", sm_util_pct = 60 }},
  {{ pid = 103, uid = 1002, user = "bob", sm_util_pct = 20 }},
]
[[cards.phases]]
from_s = 3000
util_pct = 80
processes = [{{ pid = 102, uid = 1001, user = "alice", sm_util_pct = 60 }}]

[[cards]]
uuid = "{A2}"
idle_power_w = 100
max_power_w = 500
lost = [{{ from_s = 1800, until_s = 2100 }}]
[[cards.phases]]
from_s = 0
util_pct = 30
processes = [{{ pid = 104, uid = 1003, user = "carol" }}]
"#
    ))
    .unwrap()
}

/// host-a's second run (minutes 80-120, times from its own start): no bob, no fault.
fn scenario_a2() -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{A0}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 50
processes = [{{ pid = 101, uid = 1001, user = "alice" }}]

[[cards]]
uuid = "{A1}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 80
processes = [{{ pid = 102, uid = 1001, user = "alice", sm_util_pct = 60 }}]

[[cards]]
uuid = "{A2}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 30
processes = [{{ pid = 104, uid = 1003, user = "carol" }}]
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
processes = [{{ pid = 201, uid = 1004, user = "dave" }}]
"#
    ))
    .unwrap()
}

fn grants_csv() -> String {
    format!(
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
         G-HPC,hpc,Acme,user:alice,kt,host-a,{A0},2026-04-10T10:10:00+09:00,2026-04-10T11:40:00+09:00\n\
         G-HPC,hpc,Acme,user:alice,kt,host-a,{A1},2026-04-10T10:10:00+09:00,2026-04-10T11:40:00+09:00\n\
         G-RES,research,Lab,user:carol,kt,host-a,{A2},2026-04-10T10:00:00+09:00,2026-04-10T12:00:00+09:00\n\
         G-ADV,advanced,Bio,user:erin,nhn,host-b,{B0},2026-04-01,2026-04-30\n"
    )
}

fn card<'a>(s: &'a Scenario, uuid: &str) -> &'a SimCard {
    s.cards.iter().find(|c| c.uuid == uuid).unwrap()
}

/// Energy a card used over `[from_s, until_s)` of a run, in mJ (the sum of its windows').
fn energy(s: &Scenario, uuid: &str, from_min: i64, until_min: i64) -> u64 {
    let c = card(s, uuid);
    c.energy_mj_at(until_min * MIN) - c.energy_mj_at(from_min * MIN)
}

/// Ground-truth figures, in ms (and mJ).
#[derive(Debug, Clone, Copy, Default)]
struct Fig {
    allocated: u64,
    unmetered: u64,
    unavailable: u64,
    delivered: u64,
    occupied: u64,
    active: u64,
    idle: u64,
    foreign: u64,
    energy_mj: u64,
    violations: u64,
}

impl Fig {
    fn plus(self, o: Fig) -> Fig {
        Fig {
            allocated: self.allocated + o.allocated,
            unmetered: self.unmetered + o.unmetered,
            unavailable: self.unavailable + o.unavailable,
            delivered: self.delivered + o.delivered,
            occupied: self.occupied + o.occupied,
            active: self.active + o.active,
            idle: self.idle + o.idle,
            foreign: self.foreign + o.foreign,
            energy_mj: self.energy_mj + o.energy_mj,
            violations: self.violations + o.violations,
        }
    }

    /// Every JSON key of these figures with its exact value.
    fn json(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        for (name, v) in [
            ("allocated", self.allocated),
            ("unmetered", self.unmetered),
            ("unavailable", self.unavailable),
            ("delivered", self.delivered),
            ("occupied", self.occupied),
            ("active", self.active),
            ("idle", self.idle),
            ("foreign", self.foreign),
            // Every simulated card shows its processes whenever it is busy: nothing is
            // unattributed.
            ("unattributed", 0),
        ] {
            m.insert(format!("{name}_ms"), json!(v));
            m.insert(format!("{name}_gpu_hours"), json!(v as f64 / 3_600_000.0));
        }
        m.insert(
            "utilization_pct".into(),
            json!(self.active as f64 * 100.0 / self.allocated as f64),
        );
        m.insert("energy_mj".into(), json!(self.energy_mj));
        m.insert("energy_kwh".into(), json!(self.energy_mj as f64 / 3.6e9));
        m.insert("violations".into(), json!(self.violations));
        m
    }
}

/// `head` with the figures' keys added.
fn with(head: Value, f: &Fig) -> Value {
    let mut m = head.as_object().unwrap().clone();
    m.extend(f.json());
    Value::Object(m)
}

fn interval(from: i64, until: i64) -> Value {
    json!([{ "from_ms": from, "until_exclusive_ms": until }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_april_report_matches_the_scenario_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let collector = TestCollector::start(&dir.path().join("ledger.db"))
        .await
        .unwrap();
    let url = collector.url.clone();
    let mut admin = gpumeter_e2e::admin_at(&url).await;
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

    let t0 = t0();
    let (sa1, sa2, sb) = (scenario_a1(), scenario_a2(), scenario_b());
    let state_a = dir.path().join("a");
    let a1 = spawn_sim_agent(
        agent_config("host-a", "kt", &url, &state_a, 64),
        sa1.clone(),
        t0,
        t0 + 60 * MIN,
        SPEED,
    )
    .unwrap();
    let b = spawn_sim_agent(
        agent_config("host-b", "nhn", &url, &dir.path().join("b"), 64),
        sb.clone(),
        t0,
        t0 + 120 * MIN,
        SPEED,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(120), async {
        a1.await.unwrap().unwrap();
        // host-a is down for 20 minutes, then comes back with its spool and sequence.
        let a2 = spawn_sim_agent(
            agent_config("host-a", "kt", &url, &state_a, 64),
            sa2.clone(),
            t0 + 80 * MIN,
            t0 + 120 * MIN,
            SPEED,
        )
        .unwrap();
        a2.await.unwrap().unwrap();
        b.await.unwrap().unwrap();
    })
    .await
    .expect("agents finish within 120 s");

    // Invoices: one bad file (nothing stored), then the CSPs' bills, then a re-issued one.
    let bad = dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "csp,grant_id,period,billed_gpu_hours\nkt,G-HPC,2026-04,3\nkt,G-NOPE,2026-04,1\nnhn,G-ADV,2026-4,1\n",
    )
    .unwrap();
    let out = gpumeter_e2e::cli()
        .args(["invoices", "import"])
        .arg(&bad)
        .args(["--server", &url])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(":3: grant_id: unknown grant \"G-NOPE\""),
        "{err}"
    );
    assert!(err.contains(":4: period: bad month"), "{err}");
    assert!(err.contains("nothing was imported"), "{err}");
    let import = |text: &str| {
        let f = dir.path().join("invoices.csv");
        std::fs::write(&f, text).unwrap();
        let out = gpumeter_e2e::cli()
            .args(["invoices", "import"])
            .arg(&f)
            .args(["--server", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(
        import(
            "csp,grant_id,period,billed_gpu_hours\nkt,G-HPC,2026-04,3\nkt,G-RES,2026-04,2\nnhn,G-ADV,2026-04,720\nkt,G-HPC,2026-03,5\n"
        ),
        "4 invoices imported\n"
    );
    assert_eq!(
        import("csp,grant_id,period,billed_gpu_hours\nkt,G-RES,2026-04,1.5\n"),
        "1 invoices imported\n"
    );

    // The ground truth.
    let (from, until) = (
        ms("2026-04-01T00:00:00+09:00"),
        ms("2026-05-01T00:00:00+09:00"),
    );
    let (g_hpc_from, g_hpc_until) = (t0 + 10 * MIN, t0 + 100 * MIN);
    let minutes = |m: i64| (m * MIN) as u64;
    // A0 in G-HPC: metered 10-60 and 80-100, alice at 50 % the whole time.
    let a0 = Fig {
        allocated: minutes(90),
        unmetered: minutes(20),
        delivered: minutes(70),
        occupied: minutes(70),
        active: minutes(35),
        energy_mj: energy(&sa1, A0, 10, 60) + energy(&sa2, A0, 0, 20),
        ..Fig::default()
    };
    // A1: alice's share of 80 % is all of it, or 60:20 against bob in 40-50.
    let a1 = Fig {
        allocated: minutes(90),
        unmetered: minutes(20),
        delivered: minutes(70),
        occupied: minutes(70),
        active: (40 * 48_000 + 10 * 36_000) + 20 * 48_000,
        foreign: minutes(10),
        energy_mj: energy(&sa1, A1, 10, 60) + energy(&sa2, A1, 0, 20),
        violations: 1,
        ..Fig::default()
    };
    // A2 in G-RES: metered 0-60 and 80-120, lost 30-35, carol at 30 %.
    let a2 = Fig {
        allocated: minutes(120),
        unmetered: minutes(20),
        unavailable: minutes(5),
        delivered: minutes(95),
        occupied: minutes(95),
        active: 95 * 18_000,
        energy_mj: energy(&sa1, A2, 0, 60) + energy(&sa2, A2, 0, 40),
        ..Fig::default()
    };
    // B0 in G-ADV: all of April allocated, two hours metered, never used.
    let b0 = Fig {
        allocated: (30 * DAY) as u64,
        unmetered: (30 * DAY) as u64 - minutes(120),
        delivered: minutes(120),
        idle: minutes(120),
        energy_mj: energy(&sb, B0, 0, 120),
        ..Fig::default()
    };
    let g_hpc = a0.plus(a1);
    let kt = g_hpc.plus(a2);
    let total = kt.plus(b0);

    let grant_head = |id: &str,
                      program: &str,
                      grantee: &str,
                      principal: &str,
                      csp: &str,
                      vf: i64,
                      vu: i64,
                      cards: Vec<Value>| {
        json!({
            "grant_id": id, "program": program, "grantee": grantee, "principal": principal,
            "csp": csp, "valid_from_ms": vf, "valid_until_exclusive_ms": vu, "revoked_at_ms": null,
            "cards": cards,
        })
    };
    let card_row = |host: &str, gpu: &str, iv: Value, f: &Fig| {
        with(
            json!({ "host_id": host, "gpu_uuid": gpu, "intervals": iv }),
            f,
        )
    };
    let hours = |ms: u64| ms as f64 / 3_600_000.0;
    let look_from = until - 14 * DAY;
    // Violations on A0 and A1 while G-HPC did not hold them (alice before minute 10 and
    // from minute 100), as the Violations RPC lists them: the report must count each.
    let listed = gpumeter_e2e::query_at(&url)
        .await
        .violations(v1::ViolationsRequest {
            period: "2026-04".into(),
            grant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let outside_g_hpc = |gpu: &str| {
        listed
            .iter()
            .filter(|e| e.gpu_uuid == gpu)
            .filter(|e| !(g_hpc_from..g_hpc_until).contains(&e.at_unix_ms))
            .count() as u64
    };
    let (a0_unassigned, a1_unassigned) = (outside_g_hpc(A0), outside_g_hpc(A1));
    assert!(a0_unassigned >= 2 && a1_unassigned >= 2, "{listed:?}");
    assert_eq!(outside_g_hpc(B1), 1, "{listed:?}");
    // carol's process on A2 at the instant G-RES ended (minute 120, exclusive): unassigned.
    let a2_unassigned = listed
        .iter()
        .filter(|e| e.gpu_uuid == A2 && e.at_unix_ms >= t0 + 120 * MIN)
        .count() as u64;
    assert_eq!(
        listed.iter().filter(|e| e.gpu_uuid == A2).count() as u64,
        a2_unassigned
    );
    let kt_unassigned_violations = a0_unassigned + a1_unassigned + a2_unassigned;
    let mut host_a_unassigned = vec![
        json!({ "gpu_uuid": A0, "unassigned_use_ms": minutes(30), "violations": a0_unassigned }),
        json!({ "gpu_uuid": A1, "unassigned_use_ms": minutes(30), "violations": a1_unassigned }),
    ];
    if a2_unassigned > 0 {
        host_a_unassigned
            .push(json!({ "gpu_uuid": A2, "unassigned_use_ms": 0, "violations": a2_unassigned }));
    }
    let as_of_placeholder = 0;
    let mut expected = json!({
        "period": "2026-04",
        "from_ms": from,
        "until_exclusive_ms": until,
        // The period is over: all of it elapsed (as_of is the moment of the run).
        "as_of_ms": as_of_placeholder,
        "elapsed_until_exclusive_ms": until,
        "not_elapsed": null,
        "time_zone": "Asia/Seoul",
        "program": null,
        "grant_id": null,
        "grants": [
            with(grant_head("G-ADV", "advanced", "Bio", "user:erin", "nhn", from, until, vec![
                card_row("host-b", B0, interval(from, until), &b0),
            ]), &b0),
            with(grant_head("G-HPC", "hpc", "Acme", "user:alice", "kt", g_hpc_from, g_hpc_until, vec![
                card_row("host-a", A0, interval(g_hpc_from, g_hpc_until), &a0),
                card_row("host-a", A1, interval(g_hpc_from, g_hpc_until), &a1),
            ]), &g_hpc),
            with(grant_head("G-RES", "research", "Lab", "user:carol", "kt", t0, t0 + 120 * MIN, vec![
                card_row("host-a", A2, interval(t0, t0 + 120 * MIN), &a2),
            ]), &a2),
        ],
        "programs": [
            with(json!({ "program": "hpc", "grants": 1, "cards": 2 }), &g_hpc),
            with(json!({ "program": "research", "grants": 1, "cards": 1 }), &a2),
            with(json!({ "program": "advanced", "grants": 1, "cards": 1 }), &b0),
        ],
        "csps": [
            with(json!({ "csp": "kt", "grants": 2, "cards": 3,
                         "unassigned_use_ms": minutes(60), "unassigned_use_gpu_hours": 1.0,
                         "unassigned_violations": kt_unassigned_violations }), &kt),
            with(json!({ "csp": "nhn", "grants": 1, "cards": 1,
                         "unassigned_use_ms": minutes(120), "unassigned_use_gpu_hours": 2.0,
                         "unassigned_violations": 1 }), &b0),
        ],
        "total": Value::Object(total.json()),
        "unassigned": [
            { "csp": "kt", "host_id": "host-a",
              "cards": host_a_unassigned,
              "unassigned_use_ms": minutes(60), "unassigned_use_gpu_hours": 1.0,
              "violations": kt_unassigned_violations },
            // dave on B1, which no grant ever held: one episode.
            { "csp": "nhn", "host_id": "host-b",
              "cards": [{ "gpu_uuid": B1, "unassigned_use_ms": minutes(120), "violations": 1 }],
              "unassigned_use_ms": minutes(120), "unassigned_use_gpu_hours": 2.0, "violations": 1 },
        ],
        "unassigned_violations": kt_unassigned_violations + 1,
        "all_violations": total.violations + kt_unassigned_violations + 1,
        "idle": {
            "threshold_pct": 10.0,
            "days": 14,
            "as_of_ms": until,
            "grants": [{
                "grant_id": "G-ADV", "program": "advanced", "grantee": "Bio", "csp": "nhn",
                "window": { "from_ms": look_from, "until_exclusive_ms": until },
                "allocated_ms": 14 * DAY, "delivered_ms": 0, "active_ms": 0,
                "utilization_pct": 0.0,
                "reclaimable_cards": [{
                    "host_id": "host-b", "gpu_uuid": B0, "allocated_ms": 14 * DAY,
                    "active_ms": 0, "utilization_pct": 0.0,
                }],
            }],
        },
        "invoices": [
            { "csp": "kt", "grant_id": "G-HPC", "periods": ["2026-04"], "billed_gpu_hours": 3.0,
              "delivered_ms": g_hpc.delivered, "delivered_gpu_hours": hours(g_hpc.delivered),
              "difference_gpu_hours": 3.0 - hours(g_hpc.delivered) },
            { "csp": "kt", "grant_id": "G-RES", "periods": ["2026-04"], "billed_gpu_hours": 1.5,
              "delivered_ms": a2.delivered, "delivered_gpu_hours": hours(a2.delivered),
              "difference_gpu_hours": 1.5 - hours(a2.delivered) },
            { "csp": "nhn", "grant_id": "G-ADV", "periods": ["2026-04"], "billed_gpu_hours": 720.0,
              "delivered_ms": b0.delivered, "delivered_gpu_hours": hours(b0.delivered),
              "difference_gpu_hours": 720.0 - hours(b0.delivered) },
        ],
        "invoice_csps": [
            { "csp": "kt", "billed_gpu_hours": 4.5, "delivered_ms": kt.delivered,
              "delivered_gpu_hours": hours(kt.delivered), "difference_gpu_hours": 4.5 - hours(kt.delivered) },
            { "csp": "nhn", "billed_gpu_hours": 720.0, "delivered_ms": b0.delivered,
              "delivered_gpu_hours": hours(b0.delivered), "difference_gpu_hours": 720.0 - hours(b0.delivered) },
        ],
        // Every card reported the model and serial it was first seen with.
        "card_alarms": [],
    });

    let report = |args: &[&str]| {
        let out = gpumeter_e2e::cli()
            .args(["report", "--period", "2026-04", "--server", &url])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Every reconciliation report names its head and hashes its content (the usage view
        // is raw metering, not a report of record); the figures are the content.
        let file = String::from_utf8(out.stdout).unwrap();
        if args.contains(&"usage") || args.contains(&"--out") {
            return file;
        }
        let (content, p) = gpumeter_collector::provenance::extract(&file).unwrap();
        assert_eq!(
            p.content_sha256,
            gpumeter_collector::provenance::content_hash(&content)
        );
        assert!(p.head_id > 0, "{p:?}");
        content
    };
    let mut got: Value = serde_json::from_str(&report(&["--format", "json"])).unwrap();
    // Every card is a whole GPU: in GPU-equivalents each grant is its cards, and its hours are
    // its GPU-hours.
    let eq = got
        .as_object_mut()
        .unwrap()
        .remove("gpu_equivalents")
        .unwrap();
    assert_eq!(eq["cards"], json!([]), "{eq}");
    let grants = expected["grants"].as_array().unwrap();
    assert_eq!(eq["grants"].as_array().unwrap().len(), grants.len(), "{eq}");
    for (e, g) in eq["grants"].as_array().unwrap().iter().zip(grants) {
        assert_eq!(e["key"], g["grant_id"]);
        let cards = g["cards"].as_array().unwrap().len() as f64;
        assert_eq!(e["gpus"].as_f64(), Some(cards), "{e}");
        for (k, want) in [
            ("allocated_gpu_hours", "allocated_ms"),
            ("delivered_gpu_hours", "delivered_ms"),
            ("active_gpu_hours", "active_ms"),
        ] {
            let a = e[k].as_f64().unwrap();
            let b = g[want].as_u64().unwrap() as f64 / 3_600_000.0;
            assert!((a - b).abs() < 1e-9, "{k}: {a} vs {b}");
        }
    }
    // The as-of is the moment of the run: after the period, and not in the future.
    let as_of = got["as_of_ms"].as_i64().unwrap();
    assert!(as_of >= until, "{as_of}");
    assert!(as_of <= chrono::Utc::now().timestamp_millis());
    expected["as_of_ms"] = json!(as_of);
    assert_json_eq(&got, &expected, "");
    assert_eq!(got, expected);

    // Filters: one program, one grant. Unassigned use belongs to neither.
    let hpc: Value =
        serde_json::from_str(&report(&["--format", "json", "--program", "hpc"])).unwrap();
    assert_eq!(hpc["grants"], json!([expected["grants"][1].clone()]));
    assert_eq!(hpc["programs"], json!([expected["programs"][0].clone()]));
    assert_eq!(hpc["unassigned"], json!([]));
    assert_eq!(hpc["csps"][0]["unassigned_use_ms"], 0);
    assert_eq!(hpc["program"], "hpc");
    let res: Value =
        serde_json::from_str(&report(&["--format", "json", "--grant", "G-RES"])).unwrap();
    assert_eq!(res["grants"], json!([expected["grants"][2].clone()]));
    assert_eq!(res["invoices"], json!([expected["invoices"][1].clone()]));

    // The terminal table with every column (--wide), byte for byte ...
    let table = report(&["--wide"]);
    assert_eq!(table, EXPECTED_TABLE, "\n{table}");
    // ... and by default, fewer columns that fit 120 terminal columns, with the terms defined
    // under them.
    let narrow = report(&[]);
    for line in narrow.lines() {
        assert!(
            line.chars().count() <= 120,
            "{} columns: {line}",
            line.chars().count()
        );
    }
    assert!(narrow.contains("ACT/ALLOC_%"), "{narrow}");
    assert!(!narrow.contains("ENERGY_KWH"), "{narrow}");
    assert!(
        narrow.contains("  Delivered: Allocated − unmetered − unavailable"),
        "{narrow}"
    );
    assert!(narrow.contains("G-HPC · Acme"), "{narrow}");

    // The other formats come from the renderers, in both languages.
    for (format, lang) in [("csv", "ko"), ("focus", "en"), ("html", "ko")] {
        let text = report(&["--format", format, "--lang", lang]);
        assert!(text.contains("G-HPC"), "{format}: {text}");
    }
    // The page's heatmaps get the per-day figures from the collector: metered days are
    // drawn with a value, not as "no data".
    let html = report(&["--format", "html"]);
    let metered_cells = html
        .match_indices("<rect class=\"cell")
        .filter(|(i, _)| {
            !html[*i..*i + 40].contains("nodata") && !html[*i..*i + 40].contains("unallocated")
        })
        .count();
    assert!(metered_cells > 0, "no metered heatmap cell drawn");
    let out_file = dir.path().join("report.json");
    report(&["--format", "json", "--out", out_file.to_str().unwrap()]);
    let saved = std::fs::read_to_string(&out_file).unwrap();
    let mut saved: Value =
        serde_json::from_str(&gpumeter_collector::provenance::extract(&saved).unwrap().0).unwrap();
    saved["as_of_ms"] = expected["as_of_ms"].clone();
    assert_eq!(
        saved.as_object_mut().unwrap().remove("gpu_equivalents"),
        Some(eq)
    );
    assert_eq!(saved, expected);

    // The raw usage view is still there.
    let usage: Value =
        serde_json::from_str(&report(&["--view", "usage", "--format", "json"])).unwrap();
    assert_eq!(usage["cards"].as_array().unwrap().len(), 5);

    // Auditors' other questions, over gRPC.
    let mut q = gpumeter_e2e::query_at(&url).await;
    let v = q
        .violations(v1::ViolationsRequest {
            period: "2026-04".into(),
            grant_id: "G-HPC".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let v: Vec<(&str, i64, Option<u32>, &str, &str)> = v
        .iter()
        .map(|e| {
            (
                e.gpu_uuid.as_str(),
                e.at_unix_ms,
                e.pid,
                e.principal.as_str(),
                e.action.as_str(),
            )
        })
        .collect();
    assert_eq!(v, [(A1, t0 + 2_401_000, Some(103), "user:bob", "none")]);
    let all = q
        .violations(v1::ViolationsRequest {
            period: "2026-04".into(),
            grant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        all.iter()
            .any(|e| e.gpu_uuid == B1 && e.principal == "user:dave")
    );
    // Every violation the RPC lists is counted in the report: in its grant, or with the
    // unassigned use of its card (observe mode: each episode is one event).
    assert!(all.iter().all(|e| e.action == "none"), "{all:?}");
    assert_eq!(json!(all.len()), got["all_violations"], "{all:?}");
    let unassigned_listed: u64 = got["unassigned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["violations"].as_u64().unwrap())
        .sum();
    assert_eq!(
        unassigned_listed + got["total"]["violations"].as_u64().unwrap(),
        all.len() as u64
    );
    let xids = q
        .events(v1::EventsRequest {
            period: "2026-04".into(),
            kind: "xid".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let xids: Vec<(&str, i64, &str)> = xids
        .iter()
        .map(|e| (e.gpu_uuid.as_str(), e.code, e.host_id.as_str()))
        .collect();
    assert_eq!(xids, [(A2, 79, "host-a")]);
    let tl = q
        .card_timeline(v1::CardTimelineRequest {
            gpu_uuid: A2.into(),
            period: "2026-04-10".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(tl.windows.len(), 100, "60 + 40 minutes metered");
    let lost: Vec<i64> = tl
        .windows
        .iter()
        .filter(|w| w.unavailable_ms > 0)
        .map(|w| (w.start_unix_ms - t0) / MIN)
        .collect();
    assert_eq!(lost, [30, 31, 32, 33, 34]);
    assert!(tl.windows.iter().all(|w| w.applied_grant_id == "G-RES"));
    assert_eq!(tl.windows[0].grantee_occupied_ms, Some(60_000));
    assert_eq!(tl.holdings.len(), 1);
    assert_eq!(tl.holdings[0].grant_id, "G-RES");
    assert!(tl.events.iter().any(|e| e.kind == "xid"));
    let grants = q
        .grants(v1::GrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    let ids: Vec<(&str, &str)> = grants
        .iter()
        .map(|g| {
            (
                g.grant.as_ref().unwrap().grant_id.as_str(),
                g.history[0].action.as_str(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("G-ADV", "import"),
            ("G-HPC", "import"),
            ("G-RES", "import")
        ]
    );
    // Idle grants up to now (long after these grants ended): none.
    let idle = q
        .idle_grants(v1::IdleGrantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (idle.threshold_pct, idle.days, idle.grants.len()),
        (10.0, 14, 0)
    );
    let e = q
        .reconcile(v1::ReconcileRequest {
            period: "April".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("period"), "{}", e.message());
    let e = q
        .reconcile(v1::ReconcileRequest {
            period: "2026-04".into(),
            grant_id: "G-NOPE".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let out = gpumeter_e2e::cli()
        .args(["idle", "--format", "json", "--server", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let idle: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(idle["grants"], json!([]));
    collector.stop().await.unwrap();
}

/// Like `assert_eq!` on two JSON documents, but names the first path where they differ.
fn assert_json_eq(got: &Value, want: &Value, path: &str) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let gk: Vec<&String> = g.keys().collect();
            let wk: Vec<&String> = w.keys().collect();
            assert_eq!(gk, wk, "keys at {path}");
            for (k, v) in w {
                assert_json_eq(&g[k], v, &format!("{path}.{k}"));
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "length at {path}");
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert_json_eq(a, b, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(got, want, "at {path}"),
    }
}

/// The table of the report, for the ground truth above (a snapshot checked by hand: every
/// figure is the JSON's, rounded to 3 decimals).
const EXPECTED_TABLE: &str = r#"Reconciliation 2026-04: 2026-04-01 – 2026-04-30 (KST, Asia/Seoul)
Figures in GPU-hours; every time KST (Asia/Seoul), end dates inclusive.

Grants
GRANT / CARD                                       PROGRAM   GRANTEE  CSP  ALLOCATED  UNMETERED  UNAVAILABLE  DELIVERED  OCCUPIED  ACTIVE   IDLE  FOREIGN  ACT/ALLOC_%  ENERGY_KWH  VIOL
-------------------------------------------------  --------  -------  ---  ---------  ---------  -----------  ---------  --------  ------  -----  -------  -----------  ----------  ----
G-ADV                                              advanced  Bio      nhn    720.000    718.000        0.000      2.000     0.000   0.000  2.000    0.000          0.0       0.120     0
  host-b GPU-0000000b-0000-4000-8000-000000000000                            720.000    718.000        0.000      2.000     0.000   0.000  2.000    0.000          0.0       0.120     0
G-HPC                                              hpc       Acme     kt       3.000      0.667        0.000      2.333     2.333   1.483  0.000    0.167         49.4       0.840     1
  host-a GPU-0000000a-0000-4000-8000-000000000000                              1.500      0.333        0.000      1.167     1.167   0.583  0.000    0.000         38.9       0.350     0
  host-a GPU-0000000a-0000-4000-8000-000000000001                              1.500      0.333        0.000      1.167     1.167   0.900  0.000    0.167         60.0       0.490     1
G-RES                                              research  Lab      kt       2.000      0.333        0.083      1.583     1.583   0.475  0.000    0.000         23.8       0.367     0
  host-a GPU-0000000a-0000-4000-8000-000000000002                              2.000      0.333        0.083      1.583     1.583   0.475  0.000    0.000         23.8       0.367     0
total                                                                        725.000    719.000        0.083      5.917     3.917   1.958  2.000    0.167          0.3       1.327     1

Programs
PROGRAM   GRANTS  CARDS  ALLOCATED  UNMETERED  UNAVAILABLE  DELIVERED  OCCUPIED  ACTIVE   IDLE  FOREIGN  ACT/ALLOC_%  ENERGY_KWH  VIOL
--------  ------  -----  ---------  ---------  -----------  ---------  --------  ------  -----  -------  -----------  ----------  ----
hpc            1      2      3.000      0.667        0.000      2.333     2.333   1.483  0.000    0.167         49.4       0.840     1
research       1      1      2.000      0.333        0.083      1.583     1.583   0.475  0.000    0.000         23.8       0.367     0
advanced       1      1    720.000    718.000        0.000      2.000     0.000   0.000  2.000    0.000          0.0       0.120     0

CSPs
CSP  GRANTS  CARDS  ALLOCATED  UNMETERED  UNAVAILABLE  DELIVERED  OCCUPIED  ACTIVE   IDLE  FOREIGN  ACT/ALLOC_%  ENERGY_KWH  VIOL  UNASSIGNED  UNASSIGNED_VIOL
---  ------  -----  ---------  ---------  -----------  ---------  --------  ------  -----  -------  -----------  ----------  ----  ----------  ---------------
kt        2      3      5.000      1.000        0.083      3.917     3.917   1.958  0.000    0.167         39.2       1.207     1       1.000                5
nhn       1      1    720.000    718.000        0.000      2.000     0.000   0.000  2.000    0.000          0.0       0.120     0       2.000                1

Use of unassigned cards
CSP  HOST    GPU                                       UNASSIGNED  VIOL
---  ------  ----------------------------------------  ----------  ----
kt   host-a  GPU-0000000a-0000-4000-8000-000000000000       0.500     2
kt   host-a  GPU-0000000a-0000-4000-8000-000000000001       0.500     2
kt   host-a  GPU-0000000a-0000-4000-8000-000000000002       0.000     1
nhn  host-b  GPU-0000000b-0000-4000-8000-000000000001       2.000     1

Idle grants (utilization under 10% over the 14 days 2026-04-17 – 2026-04-30 KST), with the cards to reclaim
GRANT / CARD                                       PROGRAM   GRANTEE  CSP  ALLOCATED  ACTIVE  ACT/ALLOC_%
-------------------------------------------------  --------  -------  ---  ---------  ------  -----------
G-ADV                                              advanced  Bio      nhn    336.000   0.000          0.0
  host-b GPU-0000000b-0000-4000-8000-000000000000                            336.000   0.000          0.0

Invoices against delivery
CSP  GRANT  INVOICED   BILLED  DELIVERED  DIFFERENCE
---  -----  --------  -------  ---------  ----------
kt   G-HPC  2026-04     3.000      2.333      +0.667
kt   G-RES  2026-04     1.500      1.583      -0.083
nhn  G-ADV  2026-04   720.000      2.000    +718.000
kt   total              4.500      3.917      +0.583
nhn  total            720.000      2.000    +718.000

Card identity alarms (a card changed under its UUID, or not the granted model)
(none)

Terms:
  Allocated: GPU-hours granted in the elapsed part of the period: each card's time in its grant, by the calendar,
    whatever was metered.
  Unmetered: Allocated time no signed record covers (agent down, records missing, failed reads).
  Unavailable: Metered allocated time in which the card was lost or failed (XID 79 and the like); the CSP's side of the
    SLA, credited in FOCUS.
  Delivered: Allocated − unmetered − unavailable: card-time proven delivered to the grantee, what the CSP is paid for.
  Active: Utilization-weighted grantee time: Σ window × GPU utilization × the grantee's share of it.
  Occupied: Delivered time in which the grantee had at least one process on the card.
  Idle: Delivered − occupied: delivered time with no process of the grantee on the card.
  Foreign use: Time in which processes not of the grantee ran on the grantee's cards.
  Energy (kWh): Energy the grant's cards used while in the grant, from the cards' energy counters.
  Utilization (active ÷ allocated): A grant's, program's or CSP's utilization: active ÷ allocated × 100.
  Violations: Episodes of a process not of the card's grantee on a card (one per card, process and assignment), counted
    against the grant holding the card, or as unassigned when none did.
  Unassigned use: Time with processes on cards no grant held, per CSP and host; part of no grant or program.
  Times: Every time is Korea Standard Time (KST, UTC+9, Asia/Seoul); end dates are inclusive; figures are GPU-hours (one
    GPU for one hour).
"#;

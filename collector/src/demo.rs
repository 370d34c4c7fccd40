//! `gpumeter-collector demo`: the whole system on one machine. A collector on a SQLite file,
//! grants of all three programs, and three simulated GPU servers (16 cards) whose agents run
//! faster than real time over loopback gRPC; then the usage report, the reconciliation and a
//! short legend of its figures.
//!
//! The demo replays the last half hour at 150× speed, so two things are set for it alone: its
//! collector tolerates agent clocks as far behind as the replay starts (a scaled clock starts
//! in the past by design; that is not the skew an operator must hear about), and its idle-grant
//! search looks back 1 day with a 0.5 % threshold (the real default is 14 days and 10 %, which a
//! half-hour demo never fills), so that the card nobody uses is flagged as it would be.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use gpumeter_agent::clock::{Clock, ScaledClock, SystemClock, align_down};
use gpumeter_agent::config::AgentConfig;
use gpumeter_agent::gpu::sim::{Phase, Scenario, SimCard, SimProcess, SimSource, Span};
use gpumeter_agent::run::{Agent, Parts, RunOptions};
use gpumeter_proto::v1;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::{ServerOptions, run};
use crate::store::sqlite::SqliteStore;

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Simulated minutes to meter.
    pub minutes: u32,
    /// Simulated seconds per real second.
    pub speed: f64,
    /// Keep the database here instead of a temporary directory.
    pub db: Option<PathBuf>,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            minutes: 30,
            speed: 150.0,
            db: None,
        }
    }
}

/// A card UUID in NVIDIA's form, unique per (host, card).
pub fn demo_uuid(host: u32, card: u32) -> String {
    format!("GPU-{host:08x}-0000-4000-8000-{card:012x}")
}

fn proc_(pid: u32, uid: u32, user: &str, gid: u32, group: &str, sm: u32) -> SimProcess {
    SimProcess {
        pid,
        uid,
        user: Some(user.into()),
        gid: Some(gid),
        group: Some(group.into()),
        cgroup: Some(format!(
            "/system.slice/slurmstepd.scope/job_{}/step_0",
            4000 + pid
        )),
        sm_util_pct: Some(sm),
        memory_bytes: 20 << 30,
    }
}

fn acme(pid: u32) -> SimProcess {
    proc_(pid, 1001, "acme", 1001, "acme", 90)
}
fn lab(pid: u32) -> SimProcess {
    proc_(pid, 1101, "kim", 3000, "nlplab", 70)
}
fn bio(pid: u32) -> SimProcess {
    proc_(pid, 1201, "biosme", 1201, "biosme", 60)
}
fn mallory(pid: u32) -> SimProcess {
    proc_(pid, 2001, "mallory", 2001, "mallory", 30)
}

fn card(host: u32, idx: u32, phases: Vec<Phase>) -> SimCard {
    SimCard {
        uuid: demo_uuid(host, idx),
        name: "NVIDIA H100 80GB HBM3 (simulated)".into(),
        memory_total_bytes: 80 << 30,
        idle_power_w: 70,
        max_power_w: 700,
        phases,
        lost: vec![],
    }
}

fn phase(from_s: u64, until_s: Option<u64>, util: u32, procs: Vec<SimProcess>) -> Phase {
    Phase {
        from_s,
        until_s,
        util_pct: util,
        mem_util_pct: None,
        memory_used_bytes: procs.iter().map(|p| p.memory_bytes).sum(),
        processes: procs,
    }
}

/// The three demo hosts: (host id, scenario).
pub fn demo_hosts(minutes: u32) -> Vec<(String, Scenario)> {
    let half = u64::from(minutes) * 30;
    let mut pid = 10_000;
    let mut next = || {
        pid += 1;
        pid
    };
    // host 1: cards 0-3 hpc (acme), 4-7 research (nlplab). Card 0 is the busy one; card 5
    // carries a foreign process beside the lab's.
    let mut h1 = Vec::new();
    h1.push(card(1, 0, vec![phase(0, None, 100, vec![acme(next())])]));
    for i in 1..4 {
        let p = next();
        h1.push(card(
            1,
            i,
            vec![
                phase(0, Some(half), 40 + 10 * i, vec![acme(p)]),
                phase(half, None, 20, vec![acme(p)]),
            ],
        ));
    }
    for i in 4..8 {
        let mut procs = vec![lab(next())];
        if i == 5 {
            procs.push(mallory(next()));
        }
        h1.push(card(1, i, vec![phase(0, None, 55 + 5 * i, procs)]));
    }
    // host 2: cards 0-1 hpc (card 1 granted but idle), 2-3 advanced (biosme); card 3 is lost
    // for two minutes.
    let mut h2 = vec![
        card(2, 0, vec![phase(0, None, 35, vec![acme(next())])]),
        card(2, 1, vec![]),
        card(2, 2, vec![phase(0, Some(half), 80, vec![bio(next())])]),
        card(2, 3, vec![phase(0, None, 65, vec![bio(next())])]),
    ];
    h2[3].lost = vec![Span {
        from_s: 300,
        until_s: 420,
    }];
    // host 3: cards 0-2 research; card 3 has no grant but someone uses it.
    let h3 = vec![
        card(3, 0, vec![phase(0, None, 75, vec![lab(next())])]),
        card(3, 1, vec![phase(0, None, 45, vec![lab(next())])]),
        card(3, 2, vec![phase(half, None, 90, vec![lab(next())])]),
        card(3, 3, vec![phase(0, None, 50, vec![mallory(next())])]),
    ];
    vec![
        (
            "kt-gpu-01".into(),
            Scenario {
                driver_version: "580.65.06-sim".into(),
                cards: h1,
            },
        ),
        (
            "kt-gpu-02".into(),
            Scenario {
                driver_version: "580.65.06-sim".into(),
                cards: h2,
            },
        ),
        (
            "nhn-gpu-01".into(),
            Scenario {
                driver_version: "580.65.06-sim".into(),
                cards: h3,
            },
        ),
    ]
}

/// The demo's grants file, valid around `day` (YYYY-MM-DD, KST).
pub fn demo_grants_csv(from_day: &str, until_day: &str) -> String {
    let mut csv = String::from(
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n",
    );
    let mut row = |g: &str,
                   prog: &str,
                   grantee: &str,
                   principal: &str,
                   csp: &str,
                   host: &str,
                   uuid: String| {
        csv.push_str(&format!(
            "{g},{prog},{grantee},{principal},{csp},{host},{uuid},{from_day},{until_day}\n"
        ));
    };
    for i in 0..4 {
        row(
            "HPC-2026-001",
            "hpc",
            "Acme AI",
            "user:acme",
            "kt",
            "kt-gpu-01",
            demo_uuid(1, i),
        );
    }
    row(
        "HPC-2026-001",
        "hpc",
        "Acme AI",
        "user:acme",
        "kt",
        "kt-gpu-02",
        demo_uuid(2, 0),
    );
    // The idle card: granted to a startup that never runs anything on it.
    row(
        "HPC-2026-002",
        "hpc",
        "Startup X",
        "user:startx",
        "kt",
        "kt-gpu-02",
        demo_uuid(2, 1),
    );
    for i in 4..8 {
        row(
            "RES-2026-007",
            "research",
            "\"KAIST NLP Lab, 자연어처리연구실\"",
            "group:nlplab",
            "kt",
            "kt-gpu-01",
            demo_uuid(1, i),
        );
    }
    for i in 2..4 {
        row(
            "ADV-2026-003",
            "advanced",
            "Bio SME",
            "user:biosme",
            "kt",
            "kt-gpu-02",
            demo_uuid(2, i),
        );
    }
    for i in 0..3 {
        row(
            "RES-2026-011",
            "research",
            "SNU Vision Lab",
            "group:nlplab",
            "nhn",
            "nhn-gpu-01",
            demo_uuid(3, i),
        );
    }
    csv
}

/// The demo's idle-grant search: a 1-day look-back and a 0.5 % threshold (see the module doc).
pub const DEMO_IDLE_DAYS: u32 = 1;
pub const DEMO_IDLE_THRESHOLD_PCT: f64 = 0.5;

/// What the demo's figures mean, in a few lines (the full glossary: `report --help`).
pub const DEMO_LEGEND: &str = "\
Legend (GPU-hours; `report --help` defines every figure):
  ALLOCATED    card-time granted            DELIVERED  allocated - unmetered - unavailable
  UNMETERED    no signed record covers it   ACTIVE     utilization-weighted grantee time
  UNAVAILABLE  card lost or failed          VIOL       processes not of the grantee
  ACT/ALLOC_%  utilization = active / allocated; idle grants: under 0.5 % over the last day
  In this demo: HPC-2026-002's card is never used (idle, to reclaim); kt-gpu-02 card 3 is lost
  for two minutes (unavailable); a foreign process runs on a research card (a violation); a
  card of nhn-gpu-01 is used with no grant (unassigned use and its violation).
";

/// Runs the demo and returns the report text.
pub async fn run_demo(opts: DemoOptions) -> anyhow::Result<String> {
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let db = opts
        .db
        .clone()
        .unwrap_or_else(|| tmp.path().join("gpumeter.db"));
    let store = Arc::new(SqliteStore::open(&db)?);
    // TLS on, as in production: a CA of its own in the temporary directory, a server
    // certificate for loopback, a certificate per agent, an admin token for the report.
    let ca_dir = crate::auth::ca::CaDir::new(tmp.path().join("ca"));
    crate::auth::ca::init(&ca_dir, 2)?;
    crate::auth::ca::issue_server(
        &ca_dir,
        &["localhost".to_string()],
        &[std::net::IpAddr::from([127, 0, 0, 1])],
        2,
    )?;
    let tls =
        crate::auth::tls::ServerTls::load(&crate::auth::tls::TlsFiles::from_ca_dir(&ca_dir.dir))?;
    let token = crate::auth::tokens::create(
        store.as_ref(),
        "demo-admin",
        crate::auth::tokens::Role::Admin,
        SystemClock.now_ms(),
    )
    .or_else(|_| {
        // A kept ledger (--db) already holds the demo's token name: make another.
        crate::auth::tokens::create(
            store.as_ref(),
            &format!("demo-admin-{}", SystemClock.now_ms()),
            crate::auth::tokens::Role::Admin,
            SystemClock.now_ms(),
        )
    })?;
    let client = crate::client::ClientAuth {
        ca_pem: Some(std::fs::read(ca_dir.ca_cert())?),
        token: Some(token),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let url = format!("https://{addr}");
    let (stop_tx, mut stop_rx) = watch::channel(false);
    // The demo replays the last minutes with agents that register as it starts: their
    // windows begin before registration, which a production collector refuses, and their
    // scaled clocks are that far behind at their Hello, which is the demo's design, not skew
    // to alarm about.
    let mut options = ServerOptions {
        tls: Some(Arc::new(tls)),
        ..ServerOptions::default()
    };
    options.limits.max_backfill_ms = i64::from(opts.minutes) * 60_000 + 600_000;
    options.limits.max_clock_skew_ms = options
        .limits
        .max_clock_skew_ms
        .max(i64::from(opts.minutes) * 60_000 + 10 * 60_000);
    // The web console too (docs/console.md), on a port of its own.
    let (console, console_addr) = crate::server::ConsoleListen::bind("127.0.0.1:0")?;
    options.console = Some(console);
    let console_token = client.token.clone().unwrap_or_default();
    let server = tokio::spawn(run(listener, store, options, async move {
        let _ = stop_rx.changed().await;
    }));

    // The simulated run ends well before now, so no agent clock is ahead of the collector's.
    let window = 60_000u64;
    let span_ms = i64::from(opts.minutes) * 60_000;
    let start = align_down(SystemClock.now_ms() - span_ms - 2 * window as i64, window);
    let stop_at = start + span_ms;
    let day = |ms: i64| {
        chrono::TimeZone::timestamp_millis_opt(&crate::report::kst(), ms)
            .single()
            .map(|t| t.format("%Y-%m-%d").to_string())
            .unwrap_or_default()
    };
    let csv = demo_grants_csv(&day(start - 86_400_000), &day(start + 30 * 86_400_000));

    // Agents register their cards first, so the grants refer to cards the collector knows.
    let mut admin = crate::client::admin(&url, &client).await?;
    let reply = admin
        .import_grants(v1::ImportGrantsRequest {
            csv,
            actor: String::new(),
            dry_run: false,
        })
        .await?
        .into_inner();
    if !reply.errors.is_empty() {
        anyhow::bail!("demo grants refused: {:?}", reply.errors);
    }
    let mut out = format!(
        "gpumeter demo: collector {url} (TLS: CA, agent certificates and an admin token made in its temporary directory), database {}\nimported {} grants ({} cards, {} warnings: cards not yet seen)\n",
        db.display(),
        reply.grants,
        reply.cards,
        reply.warnings.len()
    );
    out.push_str(&format!(
        "console https://{console_addr}/ while the demo runs (log in with the demo's admin token {console_token}; the certificate is the demo CA's)\n"
    ));

    let mut tasks = Vec::new();
    for (i, (host, scenario)) in demo_hosts(opts.minutes).into_iter().enumerate() {
        let csp = if host.starts_with("kt") { "kt" } else { "nhn" };
        let state = tmp.path().join(format!("agent-{i}"));
        let mut cfg = AgentConfig::simulated(&host, csp, &url, &state, 256);
        let (cert, key, _) = crate::auth::ca::issue_agent(&ca_dir, &host, &host, 2, None)?;
        cfg.collector.ca_cert = Some(ca_dir.ca_cert());
        cfg.collector.client_cert = Some(cert);
        cfg.collector.client_key = Some(key);
        let clock: Arc<dyn Clock> = Arc::new(ScaledClock::new(start, opts.speed));
        let parts = Parts {
            attributor: Box::new(scenario.attributor()),
            source: Box::new(SimSource::new(scenario, start)),
            clock,
        };
        let agent = Agent::build(cfg, parts)?;
        let (_tx, rx) = watch::channel(false);
        tasks.push(tokio::spawn(async move {
            let _keep = _tx;
            agent
                .run(
                    RunOptions {
                        stop_at: Some(stop_at),
                        start_at: Some(start),
                        drain: true,
                        await_assignments: Some(std::time::Duration::from_secs(10)),
                    },
                    rx,
                )
                .await
        }));
    }
    for t in tasks {
        t.await??;
    }

    let mut query = crate::client::query(&url, &client).await?;
    let report = crate::parts::usage(
        &mut query,
        v1::UsageRequest {
            from_unix_ms: start,
            until_unix_ms: stop_at,
            ..Default::default()
        },
    )
    .await?;
    out.push_str(&format!(
        "metered {} simulated minutes on 3 hosts, {} cards\n\n",
        opts.minutes,
        report.cards.len()
    ));
    out.push_str(&crate::report::usage_table(
        &crate::report::UsageJson::from(&report),
    ));

    // What the ministry reads: the period reconciled against the grants.
    // Every time in KST, as in every report.
    let rfc3339 = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| {
                t.with_timezone(&crate::report::kst())
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, false)
            })
            .unwrap_or_default()
    };
    let reconciled = crate::parts::reconcile(
        &mut query,
        v1::ReconcileRequest {
            period: format!("{}..{}", rfc3339(start), rfc3339(stop_at)),
            idle_threshold_pct: Some(DEMO_IDLE_THRESHOLD_PCT),
            idle_days: Some(DEMO_IDLE_DAYS),
            as_of_unix_ms: Some(stop_at),
            ..Default::default()
        },
    )
    .await?;
    out.push('\n');
    out.push_str(&crate::report::reconciliation_table(
        &crate::query::reconciliation_from_wire(&reconciled),
        false,
    ));
    out.push('\n');
    out.push_str(DEMO_LEGEND);
    let alarms = query
        .alarms(v1::AlarmsRequest::default())
        .await?
        .into_inner()
        .alarms;
    out.push_str(&format!("\nalarms raised: {}\n", alarms.len()));
    for a in &alarms {
        out.push_str(&format!("  {} {}: {}\n", a.agent_id, a.kind, a.detail));
    }
    let verified = query
        .verify(v1::VerifyRequest::default())
        .await?
        .into_inner();
    out.push_str(&format!(
        "\nledger: {} records from {} agents; {}\n",
        verified.records,
        verified.agents.len(),
        if verified.ok {
            "every hash chain and signature verifies"
        } else {
            "VERIFICATION FAILED"
        }
    ));
    let _ = stop_tx.send(true);
    server.await??;
    if opts.db.is_some() {
        out.push_str(&format!("\nThe ledger stays in {}\n", db.display()));
    }
    Ok(out)
}

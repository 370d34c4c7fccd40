//! Live figures end to end: simulated agents at real time (2 s windows) metered over TLS into a
//! real collector; `Query.Watch` read by an auditor, and `gpumeter-collector top` driven in
//! tmux and read off its screen, both checked against the ledger.
//!
//! The tmux test needs tmux (Debian's `tmux`): it says `skipping: …` and passes without it,
//! unless GPUMETER_REQUIRE_ALL is set (as .ci/run does), where it fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use gpumeter_agent::config::SamplingConfig;
use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_collector::top::Model;
use gpumeter_e2e::{TestCollector, TestDb, agent_config, now_ms, query_client, spawn_sim_agent};
use gpumeter_proto::v1;

const WINDOW_MS: i64 = 2_000;
const INTERVAL_MS: u64 = 500;
const DAY_MS: i64 = 86_400_000;

/// Korean calendar day of `ms`, `YYYY-MM-DD`.
fn kst_day(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(9 * 3600).unwrap())
        .format("%Y-%m-%d")
        .to_string()
}

fn card(n: u32) -> String {
    format!("GPU-0000005{n}-0000-4000-8000-000000000000")
}

/// Grants from yesterday to tomorrow (KST days): `(grant, program, host, card)` rows, grantee
/// Lab-<grant>, principal user:alice.
fn grants_csv(rows: &[(&str, &str, &str, String)]) -> String {
    let now = now_ms();
    let (from, until) = (kst_day(now - DAY_MS), kst_day(now + DAY_MS));
    let mut csv =
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n"
            .to_string();
    for (g, program, host, gpu) in rows {
        csv.push_str(&format!(
            "{g},{program},Lab-{g},user:alice,kt,{host},{gpu},{from},{until}\n"
        ));
    }
    csv
}

async fn import(collector: &TestCollector, csv: String) {
    let r = collector
        .admin()
        .await
        .import_grants(v1::ImportGrantsRequest {
            csv,
            actor: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
}

/// A simulated host at real time from now until `stop_at`, sampling every 500 ms into 2 s
/// windows.
fn start_agent(
    collector: &TestCollector,
    host: &str,
    dir: &Path,
    scenario: &str,
    start: i64,
    stop_at: i64,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let mut cfg = agent_config(host, "kt", &collector.url, &dir.join(host), 64);
    cfg.sampling = SamplingConfig {
        interval_ms: INTERVAL_MS,
        window_ms: WINDOW_MS as u64,
    };
    let scenario: Scenario = toml::from_str(scenario).unwrap();
    spawn_sim_agent(cfg, scenario, start, stop_at, 1.0).unwrap()
}

/// Reads a Watch stream into a model, noting when each event arrived.
fn follow(
    mut stream: tonic::Streaming<v1::WatchEvent>,
) -> tokio::sync::mpsc::UnboundedReceiver<(i64, v1::WatchEvent)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            if tx.send((now_ms(), ev)).is_err() {
                return;
            }
        }
    });
    rx
}

async fn watch_sees_a_change_within_one_window(backend: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let collector = TestCollector::start_in(&backend).await.unwrap();
    let (c0, c1) = (card(0), card(1));
    import(
        &collector,
        grants_csv(&[("G-W", "research", "host-w", c0.clone())]),
    )
    .await;
    let auditor = collector.token("auditor", "watcher");

    // Watch is a Query RPC: no token, no figures; a bad filter is named.
    let refused = query_client(&collector.url, None)
        .await
        .watch(v1::WatchRequest::default())
        .await
        .expect_err("a Watch without a token is refused");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let bad = query_client(&collector.url, Some(&auditor))
        .await
        .watch(v1::WatchRequest {
            program: "gaming".into(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown program is refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("program"), "{}", bad.message());

    let stream = query_client(&collector.url, Some(&auditor))
        .await
        .watch(v1::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut events = follow(stream);

    // C0: alice (the grantee) at 70 %, then nobody from `switch` on: idle.
    // C1 (no grant): nobody, then bob at 30 %: use of an unassigned card, a violation.
    let start = now_ms();
    let switch_s = 8;
    let switch = start + switch_s * 1000;
    let stop_at = start + 16_000;
    let agent = start_agent(
        &collector,
        "host-w",
        dir.path(),
        &format!(
            r#"
[[cards]]
uuid = "{c0}"
[[cards.phases]]
from_s = 0
until_s = {switch_s}
util_pct = 70
memory_used_bytes = 8589934592
processes = [{{ pid = 501, uid = 1001, user = "alice", memory_bytes = 8589934592 }}]
[[cards.phases]]
from_s = {switch_s}
util_pct = 0

[[cards]]
uuid = "{c1}"
[[cards.phases]]
from_s = 0
until_s = {switch_s}
util_pct = 0
[[cards.phases]]
from_s = {switch_s}
util_pct = 30
processes = [{{ pid = 502, uid = 1002, user = "bob" }}]
"#
        ),
        start,
        stop_at,
    );

    let mut model = Model::default();
    let mut busy_seen = false;
    // (arrival, the window that showed it) of the first idle C0 and violating C1.
    let mut idle_at: Option<(i64, i64)> = None;
    let mut violating_at: Option<(i64, i64)> = None;
    let mut versions = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while idle_at.is_none() || violating_at.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, ev) = tokio::time::timeout(left, events.recv())
            .await
            .expect("C0 idle and C1 violating within 40 s")
            .expect("the watch goes on");
        versions.push((ev.version, ev.reset));
        model.apply(ev);
        if let Some(c) = model.cards.get(&c0) {
            if c.reporting && c.util_pct == Some(70.0) && c.window_end_unix_ms <= switch {
                assert_eq!(
                    (c.idle, c.violating, c.grant_id.as_str()),
                    (false, false, "G-W")
                );
                assert_eq!(c.grantee, "Lab-G-W");
                // Its agent's session is live while it streams.
                assert!(c.connected, "{c:?}");
                busy_seen = true;
            }
            if c.idle && idle_at.is_none() {
                idle_at = Some((at, c.window_end_unix_ms));
            }
        }
        let first_violating = model
            .cards
            .get(&c1)
            .filter(|c| c.violating && violating_at.is_none());
        if let Some(c) = first_violating {
            assert!(c.grant_id.is_empty(), "{c:?}");
            assert!(c.window_unassigned_ms > 0, "{c:?}");
            violating_at = Some((at, c.window_end_unix_ms));
        }
    }
    assert!(
        busy_seen,
        "C0 was shown busy under its grant before the switch"
    );
    // The first window wholly after the switch ends one window after the aligned switch.
    let first_after = switch.div_euclid(WINDOW_MS) * WINDOW_MS + 2 * WINDOW_MS
        - if switch.rem_euclid(WINDOW_MS) == 0 {
            WINDOW_MS
        } else {
            0
        };
    for (what, (arrived, window_end)) in [
        ("idle", idle_at.unwrap()),
        ("violating", violating_at.unwrap()),
    ] {
        assert!(
            window_end >= first_after - WINDOW_MS && window_end <= first_after + WINDOW_MS,
            "{what}: shown for the window ending {window_end}, the first after the switch ends {first_after}"
        );
        eprintln!(
            "{what}: shown {} ms after its window ended",
            arrived - window_end
        );
        assert!(
            arrived - window_end <= WINDOW_MS,
            "{what} shown {} ms after the agent could send its window (one window is {WINDOW_MS} ms)",
            arrived - window_end
        );
    }
    // Snapshot first, then versions one apart.
    assert!(versions[0].1, "the first event is a snapshot");
    for w in versions.windows(2) {
        assert!(
            w[1].0 == w[0].0 + 1 || w[1].0 == w[0].0 && !w[1].1,
            "{versions:?}"
        );
    }

    // Once the agent has drained: what Watch shows is what the ledger holds.
    tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .expect("the agent stops and drains")
        .unwrap()
        .unwrap();
    while let Ok(Some((_, ev))) = tokio::time::timeout(Duration::from_secs(3), events.recv()).await
    {
        model.apply(ev);
    }
    let store = backend.open().unwrap();
    let latest = |gpu: &str| {
        store
            .windows(start - DAY_MS, now_ms() + DAY_MS, Some(gpu))
            .unwrap()
            .into_iter()
            .max_by_key(|w| w.window.start_ms)
            .unwrap()
    };
    for gpu in [&c0, &c1] {
        let (l, c) = (latest(gpu), &model.cards[gpu]);
        assert_eq!(
            (
                c.window_start_unix_ms,
                c.window_end_unix_ms,
                c.util_pct,
                c.host_id.as_str()
            ),
            (
                l.window.start_ms,
                l.window.end_ms,
                l.window.util_avg_pct,
                "host-w"
            ),
            "{gpu}"
        );
    }
    assert!(model.cards[&c0].idle && !model.cards[&c0].violating);
    assert!(model.cards[&c1].violating && !model.cards[&c1].idle);
    let today = kst_day(now_ms());
    let mut q = collector.query().await;
    let reply = q
        .reconcile(v1::ReconcileRequest {
            period: today.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let g = reply.grants.iter().find(|g| g.grant_id == "G-W").unwrap();
    let (report, live) = (g.figures.unwrap(), model.grants["G-W"].day.unwrap());
    assert_eq!(
        (
            live.delivered_ms,
            live.occupied_ms,
            live.active_ms,
            live.idle_ms
        ),
        (
            report.delivered_ms,
            report.occupied_ms,
            report.active_ms,
            report.idle_ms
        ),
        "the grant's day figures are today's reconciliation"
    );
    assert!(live.occupied_ms > 0 && live.idle_ms > 0, "{live:?}");
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_a_cards_change_within_one_window_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    watch_sees_a_change_within_one_window(TestDb::sqlite(&dir.path().join("watch.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_a_cards_change_within_one_window_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::postgres("watch_e2e", dir.path()) else {
        return;
    };
    watch_sees_a_change_within_one_window(db).await;
}

// ---------------------------------------------------------------------------------------------
// top in tmux

/// Says a component is missing: a failure under GPUMETER_REQUIRE_ALL, else a skip.
fn missing(what: &str) {
    if std::env::var_os("GPUMETER_REQUIRE_ALL").is_some() {
        panic!("{what} not installed, and GPUMETER_REQUIRE_ALL is set");
    }
    eprintln!("skipping: {what} not installed");
}

fn tmux_path() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("tmux"))
        .find(|p| p.is_file())
}

/// A tmux server of the test's own (its own socket), so nobody else's sessions are touched.
struct Tmux {
    bin: std::path::PathBuf,
    socket: String,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-L").arg(&self.socket);
        c
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd().args(args).output().expect("tmux runs")
    }

    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "top"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let out = self.run(&["send-keys", "-t", "top", keys]);
        assert!(out.status.success(), "send-keys {keys}: {out:?}");
    }

    /// Waits until the screen passes `ok`; panics with the last screen after 30 s.
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}; the screen:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Each group's title and the card ids under it, in screen order.
fn groups(screen: &str, cards: &[String]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in screen.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("▸ ") {
            let title = rest
                .split(" — ")
                .next()
                .unwrap()
                .split(" · ")
                .next()
                .unwrap();
            out.push((title.trim().to_string(), vec![]));
        } else if let (Some(c), Some(g)) = (
            cards.iter().find(|c| line.contains(c.as_str())),
            out.last_mut(),
        ) {
            g.1.push(c.clone());
        }
    }
    out
}

/// The screen line of `gpu`.
fn line_of<'a>(screen: &'a str, gpu: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.contains(gpu))
        .unwrap_or_else(|| panic!("{gpu} not on the screen:\n{screen}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_in_tmux_shows_the_ledgers_cards_and_regroups_and_sorts_on_keys() {
    let Some(tmux) = tmux_path() else {
        return missing("tmux");
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("top.db");
    let backend = TestDb::sqlite(&db);
    let collector = TestCollector::start_in(&backend).await.unwrap();
    let c: Vec<String> = (0..4).map(card).collect();
    // G-A (hpc) holds C0 on top-a and C3 on top-b; G-B (research) holds C1; C2 has no grant.
    import(
        &collector,
        grants_csv(&[
            ("G-A", "hpc", "top-a", c[0].clone()),
            ("G-B", "research", "top-a", c[1].clone()),
            ("G-A", "hpc", "top-b", c[3].clone()),
        ]),
    )
    .await;
    let start = now_ms();
    let stop_at = start + 120_000;
    let alice =
        |pid: u32| format!(r#"processes = [{{ pid = {pid}, uid = 1001, user = "alice" }}]"#);
    // C0 alice 30 %, C1 granted and unused (idle), on top-a; C2 bob on a card of no grant
    // (violating), C3 alice 60 %, on top-b.
    let a = start_agent(
        &collector,
        "top-a",
        dir.path(),
        &format!(
            "[[cards]]\nuuid = \"{}\"\n[[cards.phases]]\nfrom_s = 0\nutil_pct = 30\n{}\n\
             [[cards]]\nuuid = \"{}\"\n[[cards.phases]]\nfrom_s = 0\nutil_pct = 0\n",
            c[0],
            alice(601),
            c[1]
        ),
        start,
        stop_at,
    );
    let b = start_agent(
        &collector,
        "top-b",
        dir.path(),
        &format!(
            "[[cards]]\nuuid = \"{}\"\n[[cards.phases]]\nfrom_s = 0\nutil_pct = 45\nprocesses = [{{ pid = 602, uid = 1002, user = \"bob\" }}]\n\
             [[cards]]\nuuid = \"{}\"\n[[cards.phases]]\nfrom_s = 0\nutil_pct = 60\n{}\n",
            c[2],
            c[3],
            alice(603)
        ),
        start,
        stop_at,
    );
    let auditor = collector.token("auditor", "top-reader");
    let bin = gpumeter_e2e::bin("gpumeter-collector");
    let t = Tmux {
        bin: tmux,
        socket: format!("gpumeter-top-{}", std::process::id()),
    };
    let exit_file = dir.path().join("top.exit");
    let command = format!(
        "GPUMETER_CA_CERT='{}' GPUMETER_TOKEN='{auditor}' '{}' top --server {}; echo $? > '{}'",
        gpumeter_e2e::test_tls().ca_cert.display(),
        bin.display(),
        collector.url,
        exit_file.display()
    );
    let out = t.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "220",
        "-y",
        "50",
        "sh",
        "-c",
        &command,
    ]);
    assert!(out.status.success(), "tmux new-session: {out:?}");

    // Every card shown with its state, once each has reported under the agent's assignment.
    let ready = |s: &str| {
        c.iter().all(|g| s.contains(g.as_str()))
            && s.contains("group: grant")
            && line_of_opt(s, &c[1]).is_some_and(|l| l.contains("IDLE"))
            && line_of_opt(s, &c[2]).is_some_and(|l| l.contains("VIOL"))
            && line_of_opt(s, &c[0]).is_some_and(|l| l.contains("30"))
            && line_of_opt(s, &c[3]).is_some_and(|l| l.contains("60"))
    };
    let screen = t.wait_for("all four cards with their states", ready);

    // The marks are the ledger's: C1's latest window had no grantee process on a granted
    // card, C2's had processes on a card no grant holds, C0's and C3's had alice, the grantee.
    let store = backend.open().unwrap();
    let latest = |gpu: &str| {
        store
            .windows(start - DAY_MS, now_ms() + DAY_MS, Some(gpu))
            .unwrap()
            .into_iter()
            .max_by_key(|w| w.window.start_ms)
            .unwrap()
            .window
    };
    let grants: BTreeMap<String, String> = store
        .grants()
        .unwrap()
        .into_iter()
        .flat_map(|g| {
            g.cards
                .iter()
                .map(|gc| (gc.gpu_uuid.clone(), g.grant_id.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    for gpu in &c {
        let w = latest(gpu);
        let line = line_of(&screen, gpu);
        let idle = grants.contains_key(gpu) && w.grantee_occupied_ms == Some(0);
        let violating = !grants.contains_key(gpu) && w.occupied_ms > 0;
        assert_eq!(line.contains("IDLE"), idle, "{gpu}: {line}\n{w:?}");
        assert_eq!(line.contains("VIOL"), violating, "{gpu}: {line}\n{w:?}");
        let util = format!(" {:.0} ", w.util_avg_pct.unwrap());
        assert!(line.contains(&util), "{gpu}: {line} lacks{util}");
        assert!(
            line.contains(grants.get(gpu).map_or("-", String::as_str)),
            "{gpu}: {line}"
        );
    }
    // Grouped by grant, sorted by utilization within each group.
    assert_eq!(
        groups(&screen, &c),
        vec![
            ("GRANT (no grant)".to_string(), vec![c[2].clone()]),
            ("GRANT G-A".to_string(), vec![c[3].clone(), c[0].clone()]),
            ("GRANT G-B".to_string(), vec![c[1].clone()]),
        ],
        "{screen}"
    );
    assert!(screen.contains("cards 4"), "{screen}");

    // g: by host.
    t.keys("g");
    let screen = t.wait_for("grouped by host", |s| s.contains("group: host"));
    assert_eq!(
        groups(&screen, &c),
        vec![
            ("HOST top-a".to_string(), vec![c[0].clone(), c[1].clone()]),
            ("HOST top-b".to_string(), vec![c[3].clone(), c[2].clone()]),
        ],
        "{screen}"
    );
    // g: by program.
    t.keys("g");
    let screen = t.wait_for("grouped by program", |s| s.contains("group: program"));
    assert_eq!(
        groups(&screen, &c),
        vec![
            ("PROGRAM (no grant)".to_string(), vec![c[2].clone()]),
            ("PROGRAM hpc".to_string(), vec![c[3].clone(), c[0].clone()]),
            ("PROGRAM research".to_string(), vec![c[1].clone()]),
        ],
        "{screen}"
    );
    // n: by card id; r: reversed; x: by state (violating, then idle, first), across one group.
    t.keys("n");
    let screen = t.wait_for("sorted by card", |s| s.contains("sort: card"));
    assert_eq!(
        groups(&screen, &c)[1].1,
        vec![c[0].clone(), c[3].clone()],
        "{screen}"
    );
    t.keys("r");
    let screen = t.wait_for("reversed", |s| s.contains("(reversed)"));
    assert_eq!(
        groups(&screen, &c)[1].1,
        vec![c[3].clone(), c[0].clone()],
        "{screen}"
    );
    t.keys("r");
    // program → grant → host
    t.keys("g");
    t.keys("g");
    t.keys("x");
    let screen = t.wait_for("by host, sorted by state", |s| {
        s.contains("group: host") && s.contains("sort: state") && !s.contains("(reversed)")
    });
    assert_eq!(
        groups(&screen, &c),
        vec![
            ("HOST top-a".to_string(), vec![c[1].clone(), c[0].clone()]),
            ("HOST top-b".to_string(), vec![c[2].clone(), c[3].clone()]),
        ],
        "{screen}"
    );

    // q quits, with status 0.
    t.keys("q");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exit_file.exists() {
        assert!(
            Instant::now() < deadline,
            "top did not exit on q:\n{}",
            t.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(std::fs::read_to_string(&exit_file).unwrap().trim(), "0");

    // The scripts' forms show the same: --json's states are the screen's.
    let out = collector
        .cli()
        .env("GPUMETER_TOKEN", &auditor)
        .args(["top", "--json", "--server", &collector.url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: BTreeMap<String, (bool, bool)> = json["cards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["gpu_uuid"].as_str().unwrap().to_string(),
                (
                    c["idle"].as_bool().unwrap(),
                    c["violating"].as_bool().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(states[&c[1]], (true, false));
    assert_eq!(states[&c[2]], (false, true));
    assert_eq!(states[&c[0]], (false, false));
    a.abort();
    b.abort();
    collector.stop().await.unwrap();
}

fn line_of_opt<'a>(screen: &'a str, gpu: &str) -> Option<&'a str> {
    screen.lines().find(|l| l.contains(gpu))
}

//! The providers and hosts registry and report delivery, end to end: a collector over TLS on
//! loopback with a real SQLite file, a simulated agent, the real CLI.
//!
//! - Providers and hosts are registered through the CLI; `KT` and `kt` are one provider, and
//!   a file naming both is refused with line and field.
//! - A grants import naming an unknown CSP, or a host registered to another CSP, is refused
//!   with line and field, and stores nothing.
//! - The report's fleet table (per CSP and program: committed, registered, healthy, granted,
//!   delivered cards) is exact for the scenario below, in JSON, table, CSV and HTML.
//! - `serve --reports-dir` (the real binary) writes every closed month's files once, does not
//!   rewrite them after a restart, and catches up a month it missed; the files verify.
//!
//! The scenario (minutes after T0 = 2026-04-10 10:00 KST, 30 minutes), host-r, whose agent
//! says CSP `KT` (registered to `kt`):
//! - R0: alice at 50 % all along (G-HPC, hpc): healthy at the end.
//! - R1: alice at 80 %; lost from minute 25 on (G-HPC): delivered, not healthy at the end.
//! - R2: never used (G-RES, research, imported with CSP `Kt`): delivered (idle), healthy.
//! - R9: in G-RES on host-r but never reported: granted, not registered, not delivered.
//! - R3: no grant: registered, healthy, in the CSP's row without a program.
//!
//! host-n is registered to nhn and never reports: a host of nhn with no card.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_e2e::{TestCollector, agent_config, bin, collector_serve_command, spawn_sim_agent};
use gpumeter_proto::v1;
use serde_json::{Value, json};

const R0: &str = "GPU-0000000f-0000-4000-8000-000000000000";
const R1: &str = "GPU-0000000f-0000-4000-8000-000000000001";
const R2: &str = "GPU-0000000f-0000-4000-8000-000000000002";
const R3: &str = "GPU-0000000f-0000-4000-8000-000000000003";
const R9: &str = "GPU-0000000f-0000-4000-8000-000000000009";

const MIN: i64 = 60_000;
const SPEED: f64 = 2_000.0;

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

fn t0() -> i64 {
    ms("2026-04-10T10:00:00+09:00")
}

/// The report period: the scenario's half hour.
const PERIOD: &str = "2026-04-10T10:00:00+09:00..2026-04-10T10:30:00+09:00";

fn scenario() -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{R0}"
[[cards.phases]]
from_s = 0
util_pct = 50
processes = [{{ pid = 401, uid = 1001, user = "alice" }}]

[[cards]]
uuid = "{R1}"
lost = [{{ from_s = 1500, until_s = 1800 }}]
[[cards.phases]]
from_s = 0
util_pct = 80
processes = [{{ pid = 402, uid = 1001, user = "alice" }}]

[[cards]]
uuid = "{R2}"

[[cards]]
uuid = "{R3}"
"#
    ))
    .unwrap()
}

const GRANTS_HEADER: &str =
    "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n";

fn grants_csv() -> String {
    format!(
        "{GRANTS_HEADER}\
         G-HPC,hpc,Acme,user:alice,kt,host-r,{R0},2026-04-01,2026-04-30\n\
         G-HPC,hpc,Acme,user:alice,kt,host-r,{R1},2026-04-01,2026-04-30\n\
         G-RES,research,Lab,user:carol,Kt,host-r,{R2},2026-04-01,2026-05-31\n\
         G-RES,research,Lab,user:carol,Kt,host-r,{R9},2026-04-01,2026-05-31\n"
    )
}

const PROVIDERS: &str = "csp,name_ko,name_en,committed_hpc,committed_research,committed_advanced\n\
                         KT,케이티 클라우드,KT Cloud,4,2,0\n\
                         nhn,엔에이치엔 클라우드,NHN Cloud,0,0,2\n";

/// Runs the real CLI (the test CA and admin token in its environment) without blocking the
/// collector's runtime.
async fn cli(args: &[&str]) -> Output {
    tokio::process::Command::new(bin("gpumeter-collector"))
        .args(args)
        .envs(gpumeter_e2e::cli_env())
        .output()
        .await
        .expect("gpumeter-collector runs")
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Minimal RFC 4180 reader (quoted fields, doubled quotes, CRLF).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_refuses_what_it_does_not_know_and_reports_count_every_card() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let collector = TestCollector::start(&d.join("ledger.db")).await.unwrap();
    let url = collector.url.clone();

    // Two spellings of one CSP in one file: refused with line and field, nothing stored.
    let twice = write(d, "twice.csv", &format!("{PROVIDERS}kt,케이티,KT,1,1,1\n"));
    let out = cli(&["providers", "import", &twice, "--server", &url]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{twice}:4: csp:")), "{err}");
    assert!(err.contains("nothing was imported"), "{err}");

    let providers = write(d, "providers.csv", PROVIDERS);
    // Only admins change the registry: an auditor's token is refused, and nothing is stored.
    let auditor = collector.token("auditor", "auditor-park");
    let out = tokio::process::Command::new(bin("gpumeter-collector"))
        .args(["providers", "import", &providers, "--server", &url])
        .envs(gpumeter_e2e::cli_env())
        .env("GPUMETER_TOKEN", &auditor)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused"), "{err}");
    let said = ok(&cli(&["providers", "import", &providers, "--server", &url]).await);
    assert_eq!(said, "2 providers registered (2 added or changed)\n");
    let said = ok(&cli(&["providers", "import", &providers, "--server", &url]).await);
    assert_eq!(said, "2 providers registered (0 added or changed)\n");

    // A host of an unknown CSP is refused; `Kt` is kt.
    let out = cli(&[
        "hosts", "register", "host-x", "--csp", "lg", "--server", &url,
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("csp: CSP lg is not a registered provider"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = ok(&cli(&[
        "hosts", "register", "host-r", "--csp", "Kt", "--server", &url,
    ])
    .await);
    assert_eq!(said, "host host-r registered to CSP kt\n");
    let hosts = write(d, "hosts.csv", "host_id,csp\nhost-n,NHN\n");
    ok(&cli(&["hosts", "import", &hosts, "--server", &url]).await);

    let listed: Value = serde_json::from_str(&ok(&cli(&[
        "providers",
        "list",
        "--json",
        "--server",
        &url,
    ])
    .await))
    .unwrap();
    let ids: Vec<&str> = listed["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["csp"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["kt", "nhn"], "one provider for KT and kt");
    assert_eq!(
        listed["providers"][0]["committed"],
        json!({"hpc": 4, "research": 2, "advanced": 0})
    );
    assert_eq!(listed["providers"][0]["name_ko"], "케이티 클라우드");
    // Every change, with the token's name (the test admin token's) and when.
    let history = listed["history"].as_array().unwrap();
    let kinds: Vec<(&str, &str, &str)> = history
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap(),
                c["subject"].as_str().unwrap(),
                c["action"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("provider", "kt", "add"),
            ("provider", "nhn", "add"),
            ("host", "host-r", "add"),
            ("host", "host-n", "add"),
        ]
    );
    let actor = history[0]["actor"].as_str().unwrap();
    assert!(!actor.is_empty());
    assert!(
        history
            .iter()
            .all(|c| c["actor"] == actor && c["at_unix_ms"].as_i64().unwrap() > 0)
    );
    let table = ok(&cli(&["providers", "list", "--history", "--server", &url]).await);
    assert!(table.starts_with("CSP"), "{table}");
    assert!(
        table.contains("케이티 클라우드") && table.contains("TIME_KST"),
        "{table}"
    );

    // Grants naming an unknown CSP, or a host of another CSP: refused by line and field.
    let bad = write(
        d,
        "bad-grants.csv",
        &format!(
            "{GRANTS_HEADER}\
             G-X,hpc,Acme,user:alice,lg,host-r,{R0},2026-04-01,2026-04-30\n\
             G-Y,hpc,Acme,user:alice,kt,host-n,{R3},2026-04-01,2026-04-30\n"
        ),
    );
    let out = cli(&["grants", "import", &bad, "--server", &url]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{bad}:2: field csp: CSP lg is not a registered provider"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{bad}:3: field host_id: host host-n is registered to CSP nhn, not kt"
        )),
        "{err}"
    );
    let mut admin = collector.admin().await;
    let held = admin
        .list_grants(v1::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(held.grants.is_empty(), "a refused import stores nothing");

    let good = write(d, "grants.csv", &grants_csv());
    ok(&cli(&["grants", "import", &good, "--server", &url]).await);
    let held = admin
        .list_grants(v1::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        held.grants.iter().all(|g| g.csp == "kt"),
        "Kt is stored as kt"
    );

    let agent = spawn_sim_agent(
        agent_config("host-r", "KT", &url, &d.join("agent"), 64),
        scenario(),
        t0(),
        t0() + 30 * MIN,
        SPEED,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(120), agent)
        .await
        .expect("the agent finishes within 120 s")
        .unwrap()
        .unwrap();

    let report = |format: &'static str, lang: &'static str| {
        let url = url.clone();
        async move {
            let file = ok(&cli(&[
                "report", "--period", PERIOD, "--format", format, "--lang", lang, "--server", &url,
            ])
            .await);
            match gpumeter_collector::provenance::extract(&file) {
                Ok((content, _)) => content,
                Err(_) => file,
            }
        }
    };
    // The ground truth, per CSP and program:
    // [committed, hosts, registered, healthy, granted, delivered].
    let want: Vec<(&str, &str, [u64; 6])> = vec![
        ("kt", "hpc", [4, 1, 2, 1, 2, 2]),
        ("kt", "research", [2, 1, 1, 1, 2, 1]),
        ("kt", "", [0, 1, 1, 1, 0, 0]),
        ("nhn", "advanced", [2, 0, 0, 0, 0, 0]),
        ("nhn", "", [0, 1, 0, 0, 0, 0]),
    ];
    let j: Value = serde_json::from_str(&report("json", "en").await).unwrap();
    let got: Vec<(String, String, [u64; 6])> = j["fleet"]
        .as_array()
        .expect("a fleet table")
        .iter()
        .map(|f| {
            let n = |k: &str| f[k].as_u64().unwrap();
            (
                f["csp"].as_str().unwrap().to_owned(),
                f["program"].as_str().unwrap().to_owned(),
                [
                    n("committed_cards"),
                    n("registered_hosts"),
                    n("registered_cards"),
                    n("healthy_cards"),
                    n("granted_cards"),
                    n("delivered_cards"),
                ],
            )
        })
        .collect();
    let want_owned: Vec<(String, String, [u64; 6])> = want
        .iter()
        .map(|(c, p, n)| (c.to_string(), p.to_string(), *n))
        .collect();
    assert_eq!(got, want_owned);
    assert_eq!(j["fleet"][0]["name_en"], "KT Cloud");
    // The CSP totals are one kt, whatever case the grants file and the agent used.
    let csps: Vec<&str> = j["csps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["csp"].as_str().unwrap())
        .collect();
    assert_eq!(csps, ["kt"]);

    // The CSV: one `fleet` row per CSP and program, the counts in the last six columns.
    let csv = parse_csv(&report("csv", "en").await);
    let header = &csv[0];
    assert_eq!(
        &header[header.len() - 6..],
        [
            "committed_cards",
            "registered_hosts",
            "registered_cards",
            "healthy_cards",
            "granted_cards",
            "delivered_cards"
        ]
    );
    let fleet: Vec<(String, String, Vec<String>)> = csv
        .iter()
        .filter(|r| r[0] == "fleet")
        .map(|r| (r[3].clone(), r[2].clone(), r[r.len() - 6..].to_vec()))
        .collect();
    let want_csv: Vec<(String, String, Vec<String>)> = want
        .iter()
        .map(|(c, p, n)| {
            (
                c.to_string(),
                p.to_string(),
                n.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(fleet, want_csv);
    assert!(csv.iter().all(|r| r.len() == header.len()));

    // The table and the page carry the same rows.
    for lang in ["en", "ko"] {
        let table = report("table", lang).await;
        let title = if lang == "en" {
            "Providers (cards)"
        } else {
            "사업자별 공급 현황"
        };
        let at = table.find(title).unwrap_or_else(|| panic!("{table}"));
        let section: Vec<Vec<&str>> = table[at..]
            .lines()
            .skip(3)
            .take(want.len())
            .map(|l| l.split_whitespace().collect())
            .collect();
        for (row, (csp, prog, n)) in section.iter().zip(&want) {
            assert_eq!(row[0], *csp, "{table}");
            assert_eq!(
                *row.iter().rev().nth(6).unwrap(),
                if prog.is_empty() { "-" } else { prog },
                "{table}"
            );
            let counts: Vec<String> = row[row.len() - 6..].iter().map(|s| s.to_string()).collect();
            assert_eq!(
                counts,
                n.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
                "{table}"
            );
        }
        let html = report("html", lang).await;
        let at = html
            .find("<section id=\"fleet\">")
            .expect("a fleet section");
        let section = &html[at..at + html[at..].find("</section>").unwrap()];
        let cells = |i: usize| {
            let row = section.split("<tr>").nth(i + 2).unwrap();
            row.split("<td class=\"n\">")
                .skip(1)
                .map(|c| c.split('<').next().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        for (i, (_, _, n)) in want.iter().enumerate() {
            assert_eq!(
                cells(i),
                n.iter().map(|v| v.to_string()).collect::<Vec<_>>()
            );
        }
    }

    // Delivery with an injected now, on the same SQLite file: April is closed once May has
    // begun in Korea, not before; May follows once June has.
    let store = collector.backend.open().unwrap();
    let out = d.join("direct");
    let pass = gpumeter_collector::delivery::catch_up(
        store.as_ref(),
        &out,
        ms("2026-04-30T23:59:00+09:00"),
    )
    .unwrap();
    assert!(pass.written.is_empty() && pass.complete.is_empty());
    let pass = gpumeter_collector::delivery::catch_up(
        store.as_ref(),
        &out,
        ms("2026-05-01T00:00:00+09:00"),
    )
    .unwrap();
    assert_eq!(pass.written.len(), 11);
    assert!(
        pass.written
            .iter()
            .all(|p| p.starts_with(out.join("2026-04")))
    );
    let pass = gpumeter_collector::delivery::catch_up(
        store.as_ref(),
        &out,
        ms("2026-06-01T00:00:00+09:00"),
    )
    .unwrap();
    assert_eq!(pass.complete, ["2026-04"]);
    assert!(
        pass.written
            .iter()
            .all(|p| p.starts_with(out.join("2026-05")))
    );
    drop(store);
    collector.stop().await.unwrap();
}

/// The real binary serving with `--reports-dir`.
struct Serving {
    child: Child,
    url: String,
}

impl Serving {
    async fn start(db: &Path, reports: &Path, log: &Path) -> Serving {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let logf = std::fs::File::create(log).unwrap();
        let child = collector_serve_command(&format!("127.0.0.1:{port}"), db, None)
            .arg("--reports-dir")
            .arg(reports)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        Serving {
            child,
            url: format!("https://127.0.0.1:{port}"),
        }
    }

    /// Waits until `path` exists (the writer works month by month, oldest first).
    async fn wait_for(&mut self, path: &Path, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !path.exists() {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "serve exited: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            assert!(
                Instant::now() < deadline,
                "{} not written within 120 s: {}",
                path.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert_eq!(st.code(), Some(0));
                return;
            }
            assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file under `dir` with its modification time and content.
fn snapshot(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime, Vec<u8>)> {
    let mut out = Vec::new();
    for month in std::fs::read_dir(dir).unwrap() {
        let month = month.unwrap().path();
        for f in std::fs::read_dir(&month).unwrap() {
            let p = f.unwrap().path();
            let meta = std::fs::metadata(&p).unwrap();
            out.push((
                p.clone(),
                meta.modified().unwrap(),
                std::fs::read(&p).unwrap(),
            ));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_writes_each_closed_month_once_and_catches_up_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("ledger.db");
    {
        let collector = TestCollector::start(&db).await.unwrap();
        let mut admin = collector.admin().await;
        // Grants from September on: the closed months are September to the last month that
        // has ended in Korea (today's month is open).
        let r = admin
            .import_grants(v1::ImportGrantsRequest {
                csv: format!(
                    "{GRANTS_HEADER}G-HPC,hpc,Acme,user:alice,kt,host-r,{R0},2026-09-01,2027-06-30\n"
                ),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        collector.stop().await.unwrap();
    }
    let now = gpumeter_e2e::now_ms();
    let months = gpumeter_collector::delivery::closed_months(ms("2026-09-01T00:00:00+09:00"), now);
    assert!(
        months.len() >= 2,
        "this test needs two closed months since 2026-09: {months:?}"
    );
    let last = months.last().unwrap().clone();
    let reports = d.join("reports");
    let log = d.join("serve.log");

    let mut serving = Serving::start(&db, &reports, &log).await;
    serving
        .wait_for(&reports.join(&last).join("idle-notice.en.txt"), &log)
        .await;
    // A signed report straight from the folder verifies against the running collector.
    let out = tokio::process::Command::new(bin("gpumeter-collector"))
        .envs(gpumeter_e2e::cli_env())
        .arg("verify-report")
        .arg(reports.join(&months[0]).join("report.en.json"))
        .args(["--server", &serving.url])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serving.stop().await;
    let first = snapshot(&reports);
    assert_eq!(first.len(), months.len() * 11, "{first:?}");
    let names: Vec<String> = std::fs::read_dir(reports.join(&last))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with(".tmp-")), "{names:?}");
    let notice = std::fs::read_to_string(reports.join(&last).join("idle-notice.ko.txt")).unwrap();
    assert!(notice.contains("유휴 과제 회수 검토"), "{notice}");

    // A month missed (its folder gone, as if the collector had been down when it closed):
    // the restart writes it and leaves every other file as it was.
    let missed = &months[months.len() - 2];
    std::fs::remove_dir_all(reports.join(missed)).unwrap();
    let mut serving = Serving::start(&db, &reports, &log).await;
    serving
        .wait_for(&reports.join(missed).join("idle-notice.en.txt"), &log)
        .await;
    // One more pass cannot have started yet (every 10 minutes); stop, then compare.
    serving.stop().await;
    let second = snapshot(&reports);
    assert_eq!(second.len(), first.len());
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.0, b.0);
        if !a.0.starts_with(reports.join(missed)) {
            assert_eq!(a.1, b.1, "{} was rewritten", a.0.display());
            assert_eq!(a.2, b.2, "{} changed", a.0.display());
        }
    }
}

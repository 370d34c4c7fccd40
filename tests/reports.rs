//! Reports for analysts, end to end on a real ledger: a collector on a SQLite file, a simulated
//! agent over loopback gRPC, grants imported through the Admin service, and the reports read
//! through the real CLI — periods in progress (as-of), inclusive end dates, violations on
//! ungranted cards against the Violations RPC, the glossary, FOCUS against focus-validator's
//! full rule list, the printed PDF's text, and the demo.
//!
//! The scenario (minutes after T0 = 2026-04-10 10:00 KST), host-r of CSP kt, 30 minutes:
//! - R0: alice all along at 50 %; mallory (not of the grant) joins for minutes 10-15.
//! - R1: alice at 80 %; the card is lost for minutes 20-25.
//!   R0 and R1 are G-MON's (hpc, the whole of April).
//! - R2: no grant; bob uses it all along (unassigned use, and a violation).
//! - R3: G-DEC's (research, 2026-12-01 to 2026-12-31), never used: the month in progress.
//!
//! Chromium, pdftotext and focus-validator are external programs: without them the tests that
//! need them say `skipping: …` and pass, unless GPUMETER_REQUIRE_ALL is set (as .ci/run does).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_e2e::{TestCollector, agent_config, bin, spawn_sim_agent};
use gpumeter_proto::v1;
use serde_json::Value;

const R0: &str = "GPU-0000000e-0000-4000-8000-000000000000";
const R1: &str = "GPU-0000000e-0000-4000-8000-000000000001";
const R2: &str = "GPU-0000000e-0000-4000-8000-000000000002";
const R3: &str = "GPU-0000000e-0000-4000-8000-000000000003";

const MIN: i64 = 60_000;
const H: f64 = 3_600_000.0;
const SPEED: f64 = 2_000.0;

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

fn t0() -> i64 {
    ms("2026-04-10T10:00:00+09:00")
}

fn scenario() -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{R0}"
idle_power_w = 100
max_power_w = 500
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
uuid = "{R1}"
idle_power_w = 100
max_power_w = 500
lost = [{{ from_s = 1200, until_s = 1500 }}]
[[cards.phases]]
from_s = 0
util_pct = 80
processes = [{{ pid = 303, uid = 1001, user = "alice" }}]

[[cards]]
uuid = "{R2}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 90
processes = [{{ pid = 304, uid = 1002, user = "bob" }}]

[[cards]]
uuid = "{R3}"
idle_power_w = 60
max_power_w = 700
"#
    ))
    .unwrap()
}

/// The grantee name is a formula: user input that a spreadsheet must not run.
const FORMULA_GRANTEE: &str = "=HYPERLINK(\"http://x.invalid\",\"Acme\")";

fn grants_csv() -> String {
    let grantee = format!("\"{}\"", FORMULA_GRANTEE.replace('"', "\"\""));
    format!(
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
         G-MON,hpc,{grantee},user:alice,kt,host-r,{R0},2026-04-01,2026-04-30\n\
         G-MON,hpc,{grantee},user:alice,kt,host-r,{R1},2026-04-01,2026-04-30\n\
         G-DEC,research,Lab,user:carol,kt,host-r,{R3},2026-12-01,2026-12-31\n"
    )
}

/// The ledger: a collector with the scenario's 30 minutes metered.
struct Ledger {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    collector: TestCollector,
}

async fn ledger() -> Ledger {
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
    let agent = spawn_sim_agent(
        agent_config("host-r", "kt", &url, &dir.path().join("agent"), 64),
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
    Ledger {
        dir: dir.path().to_path_buf(),
        _dir: dir,
        collector,
    }
}

impl Ledger {
    /// `gpumeter-collector report ARGS --server URL`, which must succeed.
    fn report(&self, args: &[&str]) -> Vec<u8> {
        let out = self.report_output(args, &[]);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// The report's content: the file without its provenance line (tests/integrity.rs checks
    /// provenance; the content is what these tests read).
    fn report_text(&self, args: &[&str]) -> String {
        let file = String::from_utf8(self.report(args)).unwrap();
        match gpumeter_collector::provenance::extract(&file) {
            Ok((content, _)) => content,
            Err(_) => file,
        }
    }

    fn report_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        serde_json::from_str(&self.report_text(&a)).unwrap()
    }

    fn report_output(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(bin("gpumeter-collector"));
        cmd.envs(gpumeter_e2e::cli_env())
            .arg("report")
            .args(args)
            .args(["--server", &self.collector.url]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }
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

fn column<'a>(records: &'a [Vec<String>], row: usize, name: &str) -> &'a str {
    let i = records[0]
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("no column {name}"));
    &records[row][i]
}

// ---------------------------------------------------------------------------------------------
// As-of and inclusive ends

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_period_in_progress_counts_only_what_has_elapsed() {
    let l = ledger().await;
    // April as of 10:15 on the 10th: G-MON's cards were allocated from 1 April 00:00 to then,
    // and delivered for the 15 metered minutes before it; the 15 after count nowhere.
    let as_of = "2026-04-10T10:15:00+09:00";
    let r = l.report_json(&["--period", "2026-04", "--as-of", as_of]);
    let apr1 = ms("2026-04-01T00:00:00+09:00");
    assert_eq!(r["as_of_ms"], ms(as_of));
    assert_eq!(r["elapsed_until_exclusive_ms"], ms(as_of));
    assert_eq!(r["until_exclusive_ms"], ms("2026-05-01T00:00:00+09:00"));
    assert_eq!(r["not_elapsed"]["from_ms"], ms(as_of));
    assert_eq!(
        r["not_elapsed"]["until_exclusive_ms"],
        ms("2026-05-01T00:00:00+09:00")
    );
    let g = &r["grants"][0];
    assert_eq!(g["grant_id"], "G-MON");
    let per_card = (ms(as_of) - apr1) as u64;
    assert_eq!(g["allocated_ms"], 2 * per_card);
    for c in g["cards"].as_array().unwrap() {
        assert_eq!(c["allocated_ms"], per_card);
        assert_eq!(c["delivered_ms"], 15 * MIN);
        assert_eq!(
            c["intervals"][0]["until_exclusive_ms"],
            ms(as_of),
            "cut at the as-of"
        );
    }
    // The grant's own end is still the grant's: 2026-05-01 00:00, exclusive.
    assert_eq!(
        g["valid_until_exclusive_ms"],
        ms("2026-05-01T00:00:00+09:00")
    );
    // Without --as-of, April is over (now is later): everything metered counts.
    let whole = l.report_json(&["--period", "2026-04"]);
    assert_eq!(whole["not_elapsed"], Value::Null);
    assert_eq!(whole["grants"][0]["cards"][0]["delivered_ms"], 30 * MIN);

    // December as of the 2nd, 14:00: G-DEC's card is allocated 38 hours (1 December 00:00 to
    // 2 December 14:00), not the month's 744, and the rest is not yet elapsed.
    let dec_as_of = "2026-12-02T14:00:00+09:00";
    let d = l.report_json(&["--period", "2026-12", "--as-of", dec_as_of]);
    assert_eq!(d["grants"][0]["grant_id"], "G-DEC");
    assert_eq!(d["grants"][0]["allocated_ms"], 38 * 3_600_000);
    assert_eq!(d["grants"][0]["unmetered_ms"], 38 * 3_600_000);
    assert_eq!(d["not_elapsed"]["from_ms"], ms(dec_as_of));
    // People read the end inclusive: the CSV's last day is the 31st, not 1 January.
    let csv = l.report_text(&[
        "--period", "2026-12", "--as-of", dec_as_of, "--format", "csv",
    ]);
    let rows = parse_csv(&csv);
    assert_eq!(column(&rows, 1, "valid_until_inclusive"), "2026-12-31");
    assert_eq!(column(&rows, 1, "valid_from"), "2026-12-01");
    assert_eq!(column(&rows, 1, "as_of"), "2026-12-02 14:00");
    assert_eq!(
        column(&rows, 1, "not_elapsed"),
        "2026-12-02 14:00 – 2026-12-31"
    );
    assert!(!csv.contains("2027-01-01"), "{csv}");
    // The page: inclusive ends, the as-of said, future days drawn as not yet elapsed.
    let html = l.report_text(&[
        "--period", "2026-12", "--as-of", dec_as_of, "--format", "html", "--lang", "en",
    ]);
    assert!(
        html.contains("2026-12-01 – 2026-12-31"),
        "no inclusive span"
    );
    assert!(!html.contains("2027-01-01"), "an exclusive end leaked");
    assert!(html.contains("id=\"as-of\""));
    assert!(html.contains("Period in progress: reconciled as of 2026-12-02 14:00 KST"));
    // 3 to 31 December: 29 days after the as-of's day.
    assert_eq!(html.matches("<rect class=\"cell future\"").count(), 29);
    // The terminal table says so too, in KST.
    let table = l.report_text(&["--period", "2026-12", "--as-of", dec_as_of]);
    assert!(
        table.contains("Reconciliation 2026-12: 2026-12-01 – 2026-12-31 (KST, Asia/Seoul)"),
        "{table}"
    );
    assert!(
        table.contains("not yet elapsed and counts in no figure"),
        "{table}"
    );
    assert!(table.contains("38.000"), "{table}");
    // A bad --as-of is a usage error.
    let out = l.report_output(&["--period", "2026-12", "--as-of", "tomorrow"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad --as-of"));
}

// ---------------------------------------------------------------------------------------------
// Violations

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_violation_the_rpc_lists_is_counted_in_the_report() {
    let l = ledger().await;
    let mut q = gpumeter_e2e::query_at(&l.collector.url).await;
    let listed = q
        .violations(v1::ViolationsRequest {
            period: "2026-04".into(),
            grant_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    // mallory on R0 (in G-MON) and bob on R2 (no grant), once each.
    let on = |gpu: &str| listed.iter().filter(|e| e.gpu_uuid == gpu).count() as u64;
    assert_eq!((on(R0), on(R2)), (1, 1), "{listed:?}");
    let r = l.report_json(&["--period", "2026-04"]);
    assert_eq!(r["total"]["violations"], on(R0) + on(R1));
    assert_eq!(r["unassigned"][0]["host_id"], "host-r");
    assert_eq!(r["unassigned"][0]["csp"], "kt");
    assert_eq!(r["unassigned"][0]["cards"][0]["gpu_uuid"], R2);
    assert_eq!(r["unassigned"][0]["cards"][0]["violations"], on(R2));
    assert_eq!(r["csps"][0]["unassigned_violations"], on(R2));
    assert_eq!(r["unassigned_violations"], on(R2));
    assert_eq!(r["all_violations"], listed.len());
    // The CSV's total row and the table carry the same count.
    let rows = parse_csv(&l.report_text(&["--period", "2026-04", "--format", "csv"]));
    let total = rows.iter().position(|r| r[0] == "total").unwrap();
    let n = |col: &str| column(&rows, total, col).parse::<u64>().unwrap();
    assert_eq!(
        n("violations") + n("unassigned_violations"),
        listed.len() as u64
    );
    let table = l.report_text(&["--period", "2026-04"]);
    assert!(table.contains("UNASSIGNED_VIOL"), "{table}");
}

// ---------------------------------------------------------------------------------------------
// Glossary, zones and widths

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_are_defined_where_they_are_read_and_tables_fit_120_columns() {
    let l = ledger().await;
    // report --help: every figure, in both languages.
    let help = Command::new(bin("gpumeter-collector"))
        .envs(gpumeter_e2e::cli_env())
        .args(["report", "--help"])
        .output()
        .unwrap();
    assert!(help.status.success());
    let help = String::from_utf8(help.stdout).unwrap();
    for term in gpumeter_collector::render::glossary::TERMS {
        assert!(help.contains(term.en_def), "--help lacks {}", term.key);
        assert!(help.contains(term.ko_def), "--help lacks {} (ko)", term.key);
    }
    // The page: a glossary section with every term, each utilization named by its formula.
    for (lang, utilization) in [
        ("en", "Utilization (active ÷ allocated)"),
        ("ko", "활용률(활성 사용 ÷ 배정)"),
    ] {
        let html = l.report_text(&["--period", "2026-04", "--format", "html", "--lang", lang]);
        assert!(html.contains("<section id=\"glossary\""), "{lang}");
        assert!(html.contains(&format!("<th>{utilization}</th>")), "{lang}");
        for term in gpumeter_collector::render::glossary::TERMS {
            let def = if lang == "ko" {
                term.ko_def
            } else {
                term.en_def
            };
            let escaped = def.replace('&', "&amp;").replace('\'', "&#39;");
            assert!(html.contains(&escaped), "{lang}: page lacks {}", term.key);
        }
        assert!(html.contains("KST (Asia/Seoul)"), "{lang}: zone not named");
    }
    // The CSV: a definition row under the figures, which Excel imports as one more row.
    let rows = parse_csv(&l.report_text(&["--period", "2026-04", "--format", "csv"]));
    let def = rows.last().unwrap();
    assert_eq!(def[0], "definition");
    assert_eq!(def.len(), rows[0].len());
    assert!(column(&rows, rows.len() - 1, "idle_gpu_hours").starts_with("Delivered − occupied"));
    // Terminal tables: 120 columns by default, the terms under them; --wide has every column.
    for args in [
        vec!["--period", "2026-04"],
        vec!["--period", "2026-04", "--lang", "ko"],
        vec!["--period", "2026-04", "--view", "usage"],
    ] {
        let t = l.report_text(&args);
        for line in t.lines() {
            let w: usize = line
                .chars()
                .map(|c| if ('가'..='힣').contains(&c) { 2 } else { 1 })
                .sum();
            assert!(w <= 120, "{args:?}: {w} columns: {line}");
        }
        assert!(t.contains("Terms:") || t.contains("용어:"), "{args:?}: {t}");
    }
    let usage = l.report_text(&["--period", "2026-04", "--view", "usage"]);
    assert!(usage.contains("MEAN_UTIL/METERED_%") && usage.contains("ACT/OCC_%"));
    assert!(
        usage.contains("Usage 2026-04-01 – 2026-04-30 (KST, Asia/Seoul)"),
        "{usage}"
    );
    let wide = l.report_text(&["--period", "2026-04", "--wide"]);
    for col in ["OCCUPIED", "IDLE", "FOREIGN", "ENERGY_KWH", R0] {
        assert!(wide.contains(col), "--wide lacks {col}");
    }
    let narrow = l.report_text(&["--period", "2026-04"]);
    assert!(!narrow.contains(R0), "narrow tables shorten UUIDs");
    assert!(narrow.contains("GPU-0000000e…0000"), "{narrow}");
}

// ---------------------------------------------------------------------------------------------
// FOCUS

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Says a component is missing: a failure under GPUMETER_REQUIRE_ALL, else a skip.
fn missing(what: &str) {
    if std::env::var_os("GPUMETER_REQUIRE_ALL").is_some() {
        panic!("{what} not installed, and GPUMETER_REQUIRE_ALL is set");
    }
    let _ = writeln!(std::io::stderr(), "skipping: {what} not installed");
}

fn run_for(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn focus_validator() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUMETER_FOCUS_VALIDATOR") {
        return Some(PathBuf::from(p));
    }
    let ci = Path::new("/opt/gpumeter-ci/venv/bin/focus-validator");
    if ci.exists() {
        return Some(ci.to_path_buf());
    }
    find_on_path("focus-validator")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_focus_export_of_a_real_ledger_passes_every_validator_rule() {
    let l = ledger().await;
    let text = l.report_text(&["--period", "2026-04", "--format", "focus"]);
    let rows = parse_csv(&text);
    // The same guard as the report CSV: the formula grantee is text.
    for i in 1..rows.len() {
        assert_eq!(
            column(&rows, i, "SubAccountName"),
            format!("'{FORMULA_GRANTEE}")
        );
    }
    // R1's five lost minutes: one SLA credit against the CSP for G-MON.
    let credits: Vec<usize> = (1..rows.len())
        .filter(|i| column(&rows, *i, "ChargeCategory") == "Credit")
        .collect();
    assert_eq!(credits.len(), 1);
    let c = credits[0];
    assert_eq!(column(&rows, c, "ProviderName"), "kt");
    assert_eq!(column(&rows, c, "SubAccountId"), "G-MON");
    let credit: f64 = column(&rows, c, "x_CreditGpuHours").parse().unwrap();
    // Six decimals of a GPU-hour (3.6 ms).
    assert!((credit - (5 * MIN) as f64 / H).abs() < 1e-6, "{credit}");
    let Some(validator) = focus_validator() else {
        missing("focus-validator");
        return;
    };
    let data = l.dir.join("april.focus.csv");
    std::fs::write(&data, &text).unwrap();
    // The validator reads its currency list relative to its package's parent folder.
    let script = std::fs::read_to_string(&validator).unwrap();
    let python = script
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .map(str::trim)
        .unwrap_or("python3")
        .to_owned();
    let site = run_for(
        Command::new(&python).args([
            "-c",
            "import os, focus_validator; print(os.path.dirname(os.path.dirname(focus_validator.__file__)))",
        ]),
        Duration::from_secs(60),
    );
    let site = String::from_utf8(site.stdout).unwrap().trim().to_owned();
    let out = run_for(
        Command::new(&validator)
            .current_dir(&site)
            .arg("--data-file")
            .arg(&data)
            .args(["--validate-version", "1.0"]),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    // It exits 0 with failed rules too: the full output must name none.
    let failed: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.trim().strip_suffix(" failed:"))
        .collect();
    assert!(failed.is_empty(), "failed rules {failed:?}:\n{stdout}");
    assert!(!stdout.to_lowercase().contains("fail"), "{stdout}");
    assert!(stdout.contains("Validation succeeded."), "{stdout}");
}

// ---------------------------------------------------------------------------------------------
// Print

/// `&amp;`-style escapes back to text.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// Every table of the page: its header cells, and the text of every body cell (lines of a
/// cell separately).
fn tables(html: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let cells = |part: &str, tag: &str| -> Vec<String> {
        let open = format!("<{tag}");
        let close = format!("</{tag}>");
        part.split(&open)
            .skip(1)
            .filter_map(|c| {
                let body = &c[c.find('>')? + 1..c.find(&close)?];
                Some(body.to_owned())
            })
            .collect()
    };
    html.split("<table>")
        .skip(1)
        .map(|t| {
            let t = &t[..t.find("</table>").unwrap()];
            let heads = cells(t, "th").iter().map(|h| unescape(h)).collect();
            let body = cells(t, "td")
                .iter()
                .flat_map(|c| c.split("<br>").map(unescape).collect::<Vec<_>>())
                .filter(|c| !c.is_empty())
                .collect();
            (heads, body)
        })
        .collect()
}

fn squash(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_pdf_keeps_every_column_of_every_table() {
    let l = ledger().await;
    let Some(_) = gpumeter_collector::pdf::find_chromium() else {
        missing("chromium");
        return;
    };
    let Some(pdftotext) = find_on_path("pdftotext") else {
        missing("pdftotext (Debian poppler-utils)");
        return;
    };
    for lang in ["en", "ko"] {
        let args = ["--period", "2026-04", "--lang", lang];
        let html = l.report_text(&[&args[..], &["--format", "html"]].concat());
        let pdf = l.dir.join(format!("april-{lang}.pdf"));
        l.report(
            &[
                &args[..],
                &["--format", "pdf", "--out", pdf.to_str().unwrap()],
            ]
            .concat(),
        );
        let bytes = std::fs::read(&pdf).unwrap();
        assert!(bytes.starts_with(b"%PDF"), "{lang}: not a PDF");
        let out = run_for(
            Command::new(&pdftotext).arg("-raw").arg(&pdf).arg("-"),
            Duration::from_secs(60),
        );
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let flat = squash(&text);
        let found = tables(&html);
        assert!(found.len() >= 5, "{lang}: {} tables", found.len());
        for (ti, (heads, body)) in found.iter().enumerate() {
            for h in heads {
                assert!(
                    flat.contains(&squash(h)),
                    "{lang}: table {ti} lost column {h:?}"
                );
            }
            for c in body {
                assert!(
                    flat.contains(&squash(c)),
                    "{lang}: table {ti} lost cell {c:?}"
                );
            }
        }
        // A4 landscape, and a footer naming the period, the filter and the provenance.
        let pages = text.matches('\u{c}').count().max(1);
        assert!(
            flat.matches(&squash("2026-04 (2026-04-01 – 2026-04-30)"))
                .count()
                >= pages,
            "{lang}: no footer on every page"
        );
        assert!(
            flat.contains("SHA-256"),
            "{lang}: no provenance in the footer"
        );
        let doc = String::from_utf8_lossy(&bytes);
        assert!(
            doc.contains("/MediaBox [0 0 841.") || doc.contains("/MediaBox [0 0 842"),
            "{lang}: not A4 landscape"
        );
    }
    // Without Chromium, --format pdf names what to install.
    let out = l.report_output(
        &["--period", "2026-04", "--format", "pdf"],
        &[("PATH", "/nonexistent"), ("GPUMETER_CHROMIUM", "")],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install chromium"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The demo

#[test]
fn the_demo_explains_itself_flags_its_idle_card_and_raises_no_alarm() {
    let out = run_for(
        Command::new(bin("gpumeter-collector")).args(["demo"]),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Legend ("), "{text}");
    assert!(text.contains("alarms raised: 0"), "{text}");
    let idle = &text[text.find("Idle grants (").unwrap()..];
    let idle = &idle[..idle.find("\n\n").unwrap()];
    assert!(idle.contains("HPC-2026-002"), "{idle}");
    assert!(idle.contains("kt-gpu-02 GPU-00000002…0001"), "{idle}");
    assert!(!idle.contains("HPC-2026-001"), "{idle}");
    // One zone: the reconciliation's period is in KST, no UTC `Z` time anywhere.
    assert!(!text.contains("Z.."), "{text}");
    assert!(text.contains("+09:00"), "{text}");
    assert!(text.contains("every hash chain and signature verifies"));
}

// ---------------------------------------------------------------------------------------------
// Trends

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trends_go_month_by_month_and_agree_with_each_months_report() {
    let l = ledger().await;
    let as_of = "2026-12-02T14:00:00+09:00";
    let args = ["--trend", "2026-04..2026-12", "--as-of", as_of];
    let t: Value =
        serde_json::from_str(&l.report_text(&[&args[..], &["--format", "json"]].concat())).unwrap();
    let months: Vec<&str> = t["months"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(months.len(), 9);
    assert_eq!((months[0], months[8]), ("2026-04", "2026-12"));
    assert_eq!(t["as_of_ms"], ms(as_of));
    let rows = t["rows"].as_array().unwrap();
    let find = |level: &str, key: &str, month: &str| {
        rows.iter()
            .find(|r| r["level"] == level && r["key"] == key && r["month"] == month)
    };
    // Each month's program row is that month's report's program total, as of the same time.
    for (program, month) in [("hpc", "2026-04"), ("research", "2026-12")] {
        let report = l.report_json(&["--period", month, "--as-of", as_of]);
        let total = report["programs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["program"] == program)
            .unwrap();
        let row = find("program", program, month).unwrap();
        for k in [
            "allocated_ms",
            "delivered_ms",
            "active_ms",
            "unavailable_ms",
            "violations",
        ] {
            assert_eq!(row[k], total[k], "{program} {month} {k}");
        }
    }
    // December is in progress: 38 hours of G-DEC's card so far.
    assert_eq!(
        find("grant", "G-DEC", "2026-12").unwrap()["allocated_ms"],
        38 * 3_600_000
    );
    // No grant held a card from May to November: no rows are invented for them.
    for m in &months[1..8] {
        assert!(rows.iter().all(|r| r["month"] != *m), "{m}");
    }
    // Per grantee and per principal.
    assert!(find("grantee", FORMULA_GRANTEE, "2026-04").is_some());
    assert_eq!(
        find("principal", "user:alice", "2026-04").unwrap()["grants"],
        1
    );
    assert!(find("csp", "kt", "2026-12").is_some());
    // CSV: the same rows, guarded like every CSV.
    let csv = parse_csv(&l.report_text(&[&args[..], &["--format", "csv"]].concat()));
    assert_eq!(csv.len(), 1 + rows.len());
    assert!(csv.iter().any(|r| r[1] == format!("'{FORMULA_GRANTEE}")));
    // HTML: line charts per program and CSP, a point per program and month with a grant.
    let html = l.report_text(&[&args[..], &["--format", "html"]].concat());
    for id in [
        "chart-trend-program-util",
        "chart-trend-csp-util",
        "chart-trend-program-delivered",
    ] {
        assert!(html.contains(&format!("<svg id=\"{id}\"")), "{id}");
    }
    let program_chart = &html[html.find("<svg id=\"chart-trend-program-util\"").unwrap()..];
    let program_chart = &program_chart[..program_chart.find("</svg>").unwrap()];
    assert_eq!(program_chart.matches("<polyline").count(), 2);
    assert_eq!(program_chart.matches("<circle class=\"point\"").count(), 2);
    assert!(!html.contains("<script"));
    // The table fits 120 columns.
    let table = l.report_text(&args);
    for line in table.lines() {
        assert!(line.chars().count() <= 120, "{line}");
    }
    assert!(table.contains("Per principal"), "{table}");
    // --trend and --period exclude each other.
    let out = l.report_output(&["--trend", "2026-04..2026-05", "--period", "2026-04"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

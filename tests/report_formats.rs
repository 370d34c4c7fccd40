//! Report formats: the spreadsheet CSV, the FOCUS CSV (checked by the real `focus-validator`)
//! and the HTML page (rendered by headless Chromium), from a hand-made reconciliation.
//!
//! The validator and Chromium are external programs. Without them these tests print
//! `skipping: ... not installed` and pass, unless GPUMETER_REQUIRE_ALL is set (as .ci/run
//! does, after installing both), where a missing one is a failure.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use gpumeter_collector::reconcile::{
    CardRow, CspTotal, Figures, GrantRow, IdleGrant, IdleReport, Interval, InvoiceCspTotal,
    InvoiceRow, ProgramTotal, ReclaimableCard, Reconciliation, UnassignedCard, UnassignedUse,
    gpu_hours,
};
use gpumeter_collector::render::{self, CardDay, Lang, period_days};

/// 2026-04-01 00:00 KST.
const APR1: i64 = 1_774_969_200_000;
const DAY: i64 = 86_400_000;
const H: u64 = 3_600_000;

const UUID_A: &str = "GPU-aaaaaaaa-0000-0000-0000-000000000001";
const UUID_B: &str = "GPU-bbbbbbbb-0000-0000-0000-000000000002";
const UUID_C: &str = "GPU-cccccccc-0000-0000-0000-000000000003";
const UUID_D: &str = "GPU-dddddddd-0000-0000-0000-000000000004";

const KOREAN_GRANTEE: &str = "한국대학교 인공지능연구소, \"초거대\" 팀";
const SCRIPT_GRANTEE: &str = "<script>alert('x')</script> Lab";

/// Figures from hours: allocated, unmetered, unavailable, occupied, idle, active, foreign.
fn figs(h: [u64; 7], energy_kwh: u64, violations: u64) -> Figures {
    let [
        allocated,
        unmetered,
        unavailable,
        occupied,
        idle,
        active,
        foreign,
    ] = h.map(|x| x * H);
    assert_eq!(allocated, unmetered + unavailable + occupied + idle);
    Figures {
        allocated_ms: allocated,
        unmetered_ms: unmetered,
        unavailable_ms: unavailable,
        delivered_ms: occupied + idle,
        occupied_ms: occupied,
        active_ms: active,
        idle_ms: idle,
        foreign_ms: foreign,
        energy_mj: energy_kwh * 3_600_000_000,
        violations,
        unattributed_ms: 0,
    }
}

fn sum(fs: &[&Figures]) -> Figures {
    let mut t = Figures::default();
    for f in fs {
        t.add(f);
    }
    t
}

fn card(host: &str, uuid: &str, from: i64, until: i64, f: Figures) -> CardRow {
    CardRow {
        host_id: host.into(),
        gpu_uuid: uuid.into(),
        intervals: vec![Interval {
            from_ms: from,
            until_ms: until,
        }],
        figures: f,
    }
}

fn grant(
    id: &str,
    program: &str,
    grantee: &str,
    csp: &str,
    from: i64,
    cards: Vec<CardRow>,
) -> GrantRow {
    let figures = sum(&cards.iter().map(|c| &c.figures).collect::<Vec<_>>());
    GrantRow {
        grant_id: id.into(),
        program: program.into(),
        grantee: grantee.into(),
        principal: "uid:1001".into(),
        csp: csp.into(),
        valid_from_ms: from,
        valid_until_ms: APR1 + 30 * DAY,
        revoked_at_ms: None,
        cards,
        figures,
    }
}

/// Three days of April 2026: a Korean grantee with two cards (with a comma and quotes in its
/// name), a `<script>` grantee with violations, and an idle grant; invoices; unassigned use.
/// A fixture with its GPU-equivalent figures filled in as the collector does, every card one
/// GPU except the MIG instance `MIG_1G` (1/7 of its GPU).
fn with_equivalents(mut r: Reconciliation) -> Reconciliation {
    r.gpu_equivalents = gpumeter_collector::reconcile::equivalents(&r, &|g| {
        if g == MIG_1G { 1.0 / 7.0 } else { 1.0 }
    });
    r
}

const MIG_1G: &str = "MIG-00000001-0000-4000-8000-0000000000a1";

fn sample() -> Reconciliation {
    with_equivalents(sample_figures())
}

fn sample_figures() -> Reconciliation {
    let until = APR1 + 3 * DAY;
    let g1 = grant(
        "G-001",
        "hpc",
        KOREAN_GRANTEE,
        "csp-a",
        APR1,
        vec![
            card(
                "h1",
                UUID_A,
                APR1,
                until,
                figs([72, 2, 1, 60, 9, 45, 0], 30, 0),
            ),
            card(
                "h1",
                UUID_B,
                APR1,
                until,
                figs([72, 0, 0, 50, 22, 20, 0], 25, 0),
            ),
        ],
    );
    let g2 = grant(
        "G-002",
        "research",
        SCRIPT_GRANTEE,
        "csp-b",
        APR1,
        vec![card(
            "h2",
            UUID_C,
            APR1,
            until,
            figs([72, 6, 0, 40, 26, 30, 5], 20, 3),
        )],
    );
    let g3 = grant(
        "G-003",
        "hpc",
        "Idle Startup Inc.",
        "csp-a",
        APR1 + DAY,
        vec![card(
            "h3",
            UUID_D,
            APR1 + DAY,
            until,
            figs([48, 0, 0, 2, 46, 1, 0], 2, 0),
        )],
    );
    let hpc = sum(&[&g1.figures, &g3.figures]);
    let total = sum(&[&g1.figures, &g2.figures, &g3.figures]);
    let unassigned = UnassignedUse {
        csp: "csp-b".into(),
        host_id: "h9".into(),
        cards: vec![UnassignedCard {
            gpu_uuid: "GPU-99999999-0000-0000-0000-000000000009".into(),
            unassigned_use_ms: 4 * H,
            violations: 1,
        }],
        unassigned_use_ms: 4 * H,
        unassigned_use_gpu_hours: 4.0,
        violations: 1,
    };
    let invoices = vec![
        InvoiceRow {
            csp: "csp-a".into(),
            grant_id: "G-001".into(),
            periods: vec!["2026-04".into()],
            billed_gpu_hours: Some(150.0),
            delivered_ms: g1.figures.delivered_ms,
            delivered_gpu_hours: gpu_hours(g1.figures.delivered_ms),
            difference_gpu_hours: 150.0 - gpu_hours(g1.figures.delivered_ms),
        },
        InvoiceRow {
            csp: "csp-a".into(),
            grant_id: "G-003".into(),
            periods: vec![],
            billed_gpu_hours: None,
            delivered_ms: g3.figures.delivered_ms,
            delivered_gpu_hours: gpu_hours(g3.figures.delivered_ms),
            difference_gpu_hours: -gpu_hours(g3.figures.delivered_ms),
        },
    ];
    let invoice_csps = vec![InvoiceCspTotal {
        csp: "csp-a".into(),
        billed_gpu_hours: 150.0,
        delivered_ms: g1.figures.delivered_ms + g3.figures.delivered_ms,
        delivered_gpu_hours: gpu_hours(g1.figures.delivered_ms + g3.figures.delivered_ms),
        difference_gpu_hours: 150.0 - gpu_hours(g1.figures.delivered_ms + g3.figures.delivered_ms),
    }];
    let idle = IdleReport {
        threshold_pct: 10.0,
        days: 2,
        as_of_ms: until,
        grants: vec![IdleGrant {
            grant_id: "G-003".into(),
            program: "hpc".into(),
            grantee: "Idle Startup Inc.".into(),
            csp: "csp-a".into(),
            window: Interval {
                from_ms: APR1 + DAY,
                until_ms: until,
            },
            allocated_ms: 48 * H,
            delivered_ms: 48 * H,
            active_ms: H,
            utilization_pct: 100.0 / 48.0,
            reclaimable_cards: vec![ReclaimableCard {
                host_id: "h3".into(),
                gpu_uuid: UUID_D.into(),
                allocated_ms: 48 * H,
                active_ms: H,
                utilization_pct: 100.0 / 48.0,
            }],
        }],
    };
    Reconciliation {
        period: "2026-04-01..2026-04-03".into(),
        from_ms: APR1,
        until_ms: until,
        as_of_ms: until,
        elapsed_until_ms: until,
        not_elapsed: None,
        time_zone: "Asia/Seoul".into(),
        program: None,
        grant_id: None,
        programs: vec![
            ProgramTotal {
                program: "hpc".into(),
                grants: 2,
                cards: 3,
                figures: hpc,
            },
            ProgramTotal {
                program: "research".into(),
                grants: 1,
                cards: 1,
                figures: g2.figures,
            },
        ],
        csps: vec![
            CspTotal {
                csp: "csp-a".into(),
                grants: 2,
                cards: 3,
                figures: hpc,
                unassigned_use_ms: 0,
                unassigned_use_gpu_hours: 0.0,
                unassigned_violations: 0,
            },
            CspTotal {
                csp: "csp-b".into(),
                grants: 1,
                cards: 1,
                figures: g2.figures,
                unassigned_use_ms: 4 * H,
                unassigned_use_gpu_hours: 4.0,
                unassigned_violations: 1,
            },
        ],
        all_violations: total.violations + 1,
        grants: vec![g1, g2, g3],
        total,
        unassigned: vec![unassigned],
        unassigned_violations: 1,
        idle,
        invoices,
        invoice_csps,
        card_alarms: Vec::new(),
        gpu_equivalents: Default::default(),
        fleet: Vec::new(),
    }
}

/// The smallest report: one grant of one card for one day.
fn tiny() -> Reconciliation {
    with_equivalents(tiny_figures())
}

fn tiny_figures() -> Reconciliation {
    let until = APR1 + DAY;
    let g = grant(
        "G-9",
        "advanced",
        "가나다, \"라\"",
        "csp-a",
        APR1,
        vec![card(
            "h1",
            UUID_A,
            APR1,
            until,
            figs([24, 1, 2, 12, 9, 6, 1], 5, 2),
        )],
    );
    let f = g.figures;
    Reconciliation {
        period: "2026-04-01".into(),
        from_ms: APR1,
        until_ms: until,
        as_of_ms: until,
        elapsed_until_ms: until,
        not_elapsed: None,
        time_zone: "Asia/Seoul".into(),
        program: None,
        grant_id: None,
        grants: vec![g],
        programs: vec![ProgramTotal {
            program: "advanced".into(),
            grants: 1,
            cards: 1,
            figures: f,
        }],
        csps: vec![CspTotal {
            csp: "csp-a".into(),
            grants: 1,
            cards: 1,
            figures: f,
            unassigned_use_ms: H / 2,
            unassigned_use_gpu_hours: 0.5,
            unassigned_violations: 0,
        }],
        total: f,
        unassigned: vec![],
        unassigned_violations: 0,
        all_violations: f.violations,
        idle: IdleReport {
            threshold_pct: 10.0,
            days: 7,
            as_of_ms: until,
            grants: vec![],
        },
        invoices: vec![],
        invoice_csps: vec![],
        card_alarms: Vec::new(),
        gpu_equivalents: Default::default(),
        fleet: Vec::new(),
    }
}

/// Per-day figures of `sample()`'s cards: utilization rising over the days, card B not
/// metered on day 2.
fn sample_days(r: &Reconciliation) -> Vec<CardDay> {
    let days = period_days(r.from_ms, r.until_ms);
    let mut out = Vec::new();
    for g in &r.grants {
        for (ci, c) in g.cards.iter().enumerate() {
            for (di, d) in days.iter().enumerate() {
                let iv = c.intervals[0];
                let allocated = d.span.overlap_ms(iv.from_ms, iv.until_ms);
                if allocated == 0 {
                    continue;
                }
                let metered = !(c.gpu_uuid == UUID_B && di == 1);
                let pct = (10 + 40 * di + 15 * ci) as f64;
                let active = if metered {
                    (allocated as f64 * pct / 100.0) as u64
                } else {
                    0
                };
                out.push(CardDay {
                    grant_id: g.grant_id.clone(),
                    host_id: c.host_id.clone(),
                    gpu_uuid: c.gpu_uuid.clone(),
                    day: d.day.clone(),
                    allocated_ms: allocated,
                    delivered_ms: if metered { allocated } else { 0 },
                    active_ms: active,
                    utilization_pct: metered.then_some(pct),
                });
            }
        }
    }
    out
}

/// RFC 4180 records of `text` (quotes, doubled quotes, commas and line breaks in quotes).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            _ => field.push(c),
        }
    }
    assert!(
        field.is_empty() && record.is_empty(),
        "text does not end with a line end"
    );
    records
}

/// Records as maps from header to value.
fn rows_by_header(records: &[Vec<String>]) -> Vec<HashMap<String, String>> {
    let header = &records[0];
    records[1..]
        .iter()
        .map(|r| {
            assert_eq!(r.len(), header.len(), "{r:?}");
            header.iter().cloned().zip(r.iter().cloned()).collect()
        })
        .collect()
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-5
}

// ---------------------------------------------------------------------------------------------
// Spreadsheet CSV

#[test]
fn csv_is_excel_ready_utf8_with_bom_and_crlf() {
    let r = sample();
    for lang in [Lang::Ko, Lang::En] {
        let csv = render::csv(&r, lang);
        assert!(csv.starts_with('\u{feff}'), "no BOM");
        assert!(csv.as_bytes().starts_with(&[0xef, 0xbb, 0xbf]));
        assert!(csv.ends_with("\r\n"));
        assert_eq!(
            csv.matches('\n').count(),
            csv.matches("\r\n").count(),
            "bare LF"
        );
        let records = parse_csv(&csv['\u{feff}'.len_utf8()..]);
        // Header, 3 grants, 2 programs, 2 CSPs, the total, the definitions.
        assert_eq!(records.len(), 1 + 3 + 2 + 2 + 1 + 1);
        assert!(records.iter().all(|r| r.len() == records[0].len()));
        // The Korean grantee with a comma and quotes survives quoting.
        assert_eq!(records[1][5], KOREAN_GRANTEE);
        assert!(csv.contains("\"한국대학교 인공지능연구소, \"\"초거대\"\" 팀\""));
        assert_eq!(records[2][5], SCRIPT_GRANTEE);
    }
    let en = rows_by_header(&parse_csv(&render::csv(&r, Lang::En)[3..]));
    let levels: Vec<&str> = en.iter().map(|r| r["level"].as_str()).collect();
    assert_eq!(
        levels,
        [
            "grant",
            "grant",
            "grant",
            "program",
            "program",
            "csp",
            "csp",
            "total",
            "definition"
        ]
    );
    // Each figure's column is defined under it, once.
    assert!(en[8]["delivered_gpu_hours"].starts_with("Allocated − unmetered − unavailable"));
    assert!(en[8]["utilization_pct"].contains("active ÷ allocated"));
    assert!(en[8]["valid_until_inclusive"].contains("inclusive"));
    assert_eq!(en[0]["grant_id"], "G-001");
    assert_eq!(en[0]["cards"], "2");
    assert_eq!(en[0]["allocated_gpu_hours"], "144.000000");
    assert_eq!(en[0]["delivered_gpu_hours"], "141.000000");
    assert_eq!(en[0]["active_gpu_hours"], "65.000000");
    assert_eq!(en[0]["utilization_pct"], "45.14");
    assert_eq!(en[0]["valid_from"], "2026-04-01");
    // The grants end at 2026-05-01 00:00 KST, exclusive: their last day is 30 April.
    assert_eq!(en[0]["valid_until_inclusive"], "2026-04-30");
    assert_eq!(en[7]["unassigned_violations"], "1");
    assert_eq!(en[7]["as_of"], "2026-04-04 00:00");
    assert_eq!(en[7]["not_elapsed"], "");
    assert_eq!(en[1]["violations"], "3");
    assert_eq!(en[3]["program"], "hpc");
    assert_eq!(en[3]["grants"], "2");
    assert_eq!(en[6]["csp"], "csp-b");
    assert_eq!(en[6]["unassigned_use_gpu_hours"], "4.000000");
    assert_eq!(en[7]["allocated_gpu_hours"], "264.000000");
    assert_eq!(en[7]["unassigned_use_gpu_hours"], "4.000000");
    // The grant rows add up to the total row, column by column.
    for col in [
        "allocated_gpu_hours",
        "delivered_gpu_hours",
        "idle_gpu_hours",
        "energy_kwh",
    ] {
        let grants: f64 = en[..3].iter().map(|r| r[col].parse::<f64>().unwrap()).sum();
        assert!(approx(grants, en[7][col].parse().unwrap()), "{col}");
    }
    let ko = parse_csv(&render::csv(&r, Lang::Ko)[3..]);
    assert_eq!(ko[0][0], "구분");
    assert_eq!(ko[0][5], "수혜기관");
    assert_eq!(ko[0][11], "배정(GPU시간)");
    assert_eq!(ko[1][0], "과제");
    assert_eq!(ko[8][0], "합계");
    assert_eq!(ko[9][0], "정의");
    assert!(
        ko[9][14].starts_with("배정 − 미계측 − 장애"),
        "{}",
        ko[9][14]
    );
}

#[test]
fn csv_snapshot_of_a_one_card_report() {
    let en = render::csv(&tiny(), Lang::En);
    let expected = "\u{feff}\
level,period,program,csp,grant_id,grantee,principal,grants,cards,valid_from,valid_until_inclusive,allocated_gpu_hours,unmetered_gpu_hours,unavailable_gpu_hours,delivered_gpu_hours,occupied_gpu_hours,active_gpu_hours,idle_gpu_hours,foreign_gpu_hours,utilization_pct,energy_kwh,violations,unassigned_use_gpu_hours,unassigned_violations,as_of,not_elapsed,unattributed_gpu_hours,card_identity_alarms,gpu_equivalents,allocated_gpu_equivalent_hours,delivered_gpu_equivalent_hours,active_gpu_equivalent_hours,committed_cards,registered_hosts,registered_cards,healthy_cards,granted_cards,delivered_cards\r\n\
grant,2026-04-01,advanced,csp-a,G-9,\"가나다, \"\"라\"\"\",uid:1001,,1,2026-04-01,2026-04-30,24.000000,1.000000,2.000000,21.000000,12.000000,6.000000,9.000000,1.000000,25.00,5.000,2,,,2026-04-02 00:00,,0.000000,0,1.000000,24.000000,21.000000,6.000000,,,,,,\r\n\
program,2026-04-01,advanced,,,,,1,1,,,24.000000,1.000000,2.000000,21.000000,12.000000,6.000000,9.000000,1.000000,25.00,5.000,2,,,2026-04-02 00:00,,0.000000,0,1.000000,24.000000,21.000000,6.000000,,,,,,\r\n\
csp,2026-04-01,,csp-a,,,,1,1,,,24.000000,1.000000,2.000000,21.000000,12.000000,6.000000,9.000000,1.000000,25.00,5.000,2,0.500000,0,2026-04-02 00:00,,0.000000,0,1.000000,24.000000,21.000000,6.000000,,,,,,\r\n\
total,2026-04-01,,,,,,1,1,,,24.000000,1.000000,2.000000,21.000000,12.000000,6.000000,9.000000,1.000000,25.00,5.000,2,0.000000,0,2026-04-02 00:00,,0.000000,0,1.000000,24.000000,21.000000,6.000000,,,,,,\r\n";
    let (data, definitions) = en.split_at(expected.len());
    assert_eq!(data, expected);
    assert!(definitions.starts_with("definition,"), "{definitions}");
    let ko = render::csv(&tiny(), Lang::Ko);
    let header = ko.split("\r\n").next().unwrap();
    assert_eq!(
        header,
        "\u{feff}구분,기간,사업,클라우드 사업자(CSP),과제 ID,수혜기관,사용 주체,과제 수,GPU 수,시작(KST),종료(KST·당일 포함),배정(GPU시간),미계측(GPU시간),장애(GPU시간),제공(GPU시간),점유(GPU시간),활성 사용(GPU시간),유휴(GPU시간),타 사용자 사용(GPU시간),활용률(%),전력량(kWh),위반(건),미배정 사용(GPU시간),미배정 위반(건),정산 기준 시각(KST),미경과 기간(KST),귀속 불명(GPU시간),GPU 식별 경보(건),GPU 환산 수,배정(GPU 환산 시간),제공(GPU 환산 시간),활성 사용(GPU 환산 시간),약정 GPU 수,등록 서버 수,등록 GPU 수,정상 GPU 수,배정 GPU 수,제공 GPU 수"
    );
    assert_eq!(
        ko.split("\r\n").nth(1).unwrap().split(',').next(),
        Some("과제")
    );
}

#[test]
fn a_mig_instance_counts_its_slices_in_gpu_equivalents_in_every_format() {
    let mut r = tiny_figures();
    r.grants[0].cards[0].gpu_uuid = MIG_1G.into();
    let r = with_equivalents(r);
    let eq = &r.gpu_equivalents;
    assert_eq!(eq.cards.len(), 1);
    assert!((eq.total.gpus - 1.0 / 7.0).abs() < 1e-12, "{eq:?}");
    assert!(
        (eq.total.allocated_gpu_hours - 24.0 / 7.0).abs() < 1e-9,
        "{eq:?}"
    );
    assert!((eq.total.delivered_gpu_hours - 3.0).abs() < 1e-9, "{eq:?}");
    let csv = parse_csv(&render::csv(&r, Lang::En)[3..]);
    let rows = rows_by_header(&csv);
    let grant = rows.iter().find(|r| r["level"] == "grant").unwrap();
    assert_eq!(
        (
            grant["gpu_equivalents"].as_str(),
            grant["allocated_gpu_equivalent_hours"].as_str(),
            grant["delivered_gpu_equivalent_hours"].as_str(),
            grant["allocated_gpu_hours"].as_str()
        ),
        ("0.142857", "3.428571", "3.000000", "24.000000")
    );
    let table = gpumeter_collector::report::reconciliation_table(&r, false);
    assert!(
        table.contains("GPU-equivalents") && table.contains("3.429"),
        "{table}"
    );
    let page = render::html(&r, &[], Lang::Ko);
    assert!(page.contains("id=\"gpu-equivalents\""), "no section");
    let json: serde_json::Value =
        serde_json::from_str(&gpumeter_collector::report::reconciliation_json(&r).unwrap())
            .unwrap();
    assert_eq!(
        json["gpu_equivalents"]["cards"][0]["gpu_uuid"].as_str(),
        Some(MIG_1G)
    );
    // A report of whole GPUs shows no such section.
    let whole = tiny();
    assert!(
        !gpumeter_collector::report::reconciliation_table(&whole, false)
            .contains("GPU-equivalents (")
    );
    assert!(!render::html(&whole, &[], Lang::En).contains("id=\"gpu-equivalents\""));
}

#[test]
fn csv_guards_formulas_in_user_text() {
    let mut r = tiny();
    r.grants[0].grantee = "=HYPERLINK(\"x\",\"y\")".into();
    r.grants[0].csp = "=cmd|'/c calc'!A1".into();
    r.grants[0].principal = "@SUM(A1)".into();
    let rows = parse_csv(&render::csv(&r, Lang::En)[3..]);
    assert_eq!(rows[1][5], "'=HYPERLINK(\"x\",\"y\")");
    assert_eq!(rows[1][3], "'=cmd|'/c calc'!A1");
    assert_eq!(rows[1][6], "'@SUM(A1)");
    // The FOCUS export goes through the same writer: the same cells are guarded there.
    let focus = parse_csv(&render::focus(&r));
    let head = &focus[0];
    let col = |name: &str| head.iter().position(|h| h == name).unwrap();
    for row in &focus[1..] {
        assert_eq!(row[col("SubAccountName")], "'=HYPERLINK(\"x\",\"y\")");
        assert_eq!(row[col("ProviderName")], "'=cmd|'/c calc'!A1");
        assert_eq!(row[col("x_Principal")], "'@SUM(A1)");
    }
    // Numbers stay numbers.
    assert!(focus[1..].iter().all(|row| row[col("BilledCost")] == "0.0"));
}

// ---------------------------------------------------------------------------------------------
// FOCUS CSV

/// FOCUS 1.0's columns (all of them; the spec requires each in a dataset of this kind).
const FOCUS_1_0: [&str; 43] = [
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
];

fn is_utc_iso(s: &str) -> bool {
    chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.ends_with('Z') && s.len() == 20
}

#[test]
fn focus_has_every_column_with_valid_values() {
    let r = sample();
    let text = render::focus(&r);
    assert!(!text.starts_with('\u{feff}'), "FOCUS is for tools: no BOM");
    let records = parse_csv(&text);
    let header = &records[0];
    for col in FOCUS_1_0 {
        assert!(header.iter().any(|h| h == col), "missing {col}");
    }
    for h in header {
        assert!(
            FOCUS_1_0.contains(&h.as_str())
                || h.starts_with("x_")
                || h.starts_with("CapacityReservation")
                || VALIDATOR_PRE_1_0_COLUMNS.contains(&h.as_str()),
            "{h} is neither FOCUS nor x_"
        );
    }
    let all = rows_by_header(&records);
    // The pre-1.0 ids the validator wants repeat their 1.0 columns.
    for row in &all {
        assert_eq!(row["Provider"], row["ProviderName"]);
        assert_eq!(row["Publisher"], row["PublisherName"]);
        assert_eq!(row["InvoiceIssuer"], row["InvoiceIssuerName"]);
        assert_eq!(row["ResourceID"], row["ResourceId"]);
        assert_eq!(row["ChargeType"], row["ChargeCategory"]);
    }
    // SLA credits: one row per grant with unavailable time, against its CSP.
    let credits: Vec<&HashMap<String, String>> = all
        .iter()
        .filter(|r| r["ChargeCategory"] == "Credit")
        .collect();
    let with_unavailable: Vec<&GrantRow> = r
        .grants
        .iter()
        .filter(|g| g.figures.unavailable_ms > 0)
        .collect();
    assert!(!with_unavailable.is_empty());
    assert_eq!(credits.len(), with_unavailable.len());
    for (c, g) in credits.iter().zip(&with_unavailable) {
        assert_eq!(c["SubAccountId"], g.grant_id);
        assert_eq!(c["ProviderName"], g.csp);
        assert_eq!(c["ConsumedQuantity"], "", "a credit consumes nothing");
        let q = c["PricingQuantity"].parse::<f64>().unwrap();
        assert!(approx(q, g.figures.unavailable_gpu_hours()));
        assert_eq!(c["x_CreditGpuHours"], c["PricingQuantity"]);
        assert!(c["ChargeDescription"].contains("SLA credit"));
    }
    let credited: f64 = credits
        .iter()
        .map(|c| c["x_CreditGpuHours"].parse::<f64>().unwrap())
        .sum();
    assert!(approx(credited, r.total.unavailable_gpu_hours()));
    let rows: Vec<HashMap<String, String>> = all
        .into_iter()
        .filter(|r| r["ChargeCategory"] == "Usage")
        .collect();
    // Two rows (Used, Unused) per grant card.
    assert_eq!(rows.len(), 2 * 4);
    let not_null = [
        "BilledCost",
        "BillingAccountId",
        "BillingCurrency",
        "BillingPeriodEnd",
        "BillingPeriodStart",
        "ChargeCategory",
        "ChargeFrequency",
        "ChargePeriodEnd",
        "ChargePeriodStart",
        "ConsumedQuantity",
        "ConsumedUnit",
        "ContractedCost",
        "EffectiveCost",
        "InvoiceIssuerName",
        "ListCost",
        "PricingCategory",
        "PricingQuantity",
        "PricingUnit",
        "ProviderName",
        "PublisherName",
        "ResourceId",
        "ServiceCategory",
        "ServiceName",
        "SkuId",
        "SkuPriceId",
        "SubAccountId",
        "CapacityReservationStatus",
    ];
    for row in &rows {
        for col in not_null {
            assert!(!row[col].is_empty(), "{col} is empty in {row:?}");
        }
        for col in [
            "ChargePeriodStart",
            "ChargePeriodEnd",
            "BillingPeriodStart",
            "BillingPeriodEnd",
        ] {
            assert!(is_utc_iso(&row[col]), "{col}: {}", row[col]);
        }
        assert_eq!(row["ChargeCategory"], "Usage");
        assert_eq!(row["ChargeFrequency"], "Usage-Based");
        assert_eq!(row["ConsumedUnit"], "GPU-Hours");
        assert_eq!(row["PricingUnit"], "GPU-Hours");
        assert_eq!(row["BillingCurrency"], "KRW");
        assert_eq!(row["ServiceCategory"], "Compute");
        assert_eq!(row["PublisherName"], row["ProviderName"]);
        assert_eq!(row["InvoiceIssuerName"], row["ProviderName"]);
        assert_eq!(row["ResourceType"], "GPU");
        assert!(
            row["ConsumedQuantity"].contains('.'),
            "decimal, not integer"
        );
        assert!(
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&row["Tags"])
                .is_ok()
        );
    }
    // Per card: Used = occupied, Unused = idle, together the delivered GPU-hours.
    let by = |uuid: &str, status: &str| {
        rows.iter()
            .find(|r| r["ResourceId"] == uuid && r["CapacityReservationStatus"] == status)
            .unwrap()
            .clone()
    };
    for g in &r.grants {
        for c in &g.cards {
            let used = by(&c.gpu_uuid, "Used");
            let unused = by(&c.gpu_uuid, "Unused");
            assert_eq!(used["SubAccountId"], g.grant_id);
            assert_eq!(used["SubAccountName"], g.grantee);
            assert_eq!(used["ProviderName"], g.csp);
            let q = |r: &HashMap<String, String>| r["ConsumedQuantity"].parse::<f64>().unwrap();
            assert!(approx(q(&used), c.figures.occupied_gpu_hours()));
            assert!(approx(q(&unused), c.figures.idle_gpu_hours()));
            assert!(approx(
                q(&used) + q(&unused),
                c.figures.delivered_gpu_hours()
            ));
            assert_eq!(
                used["x_AllocatedGpuHours"].parse::<f64>().unwrap(),
                c.figures.allocated_gpu_hours()
            );
            assert_eq!(unused["x_AllocatedGpuHours"], "");
            assert_eq!(
                used["ChargePeriodStart"],
                chrono::DateTime::from_timestamp_millis(c.intervals[0].from_ms)
                    .unwrap()
                    .format("%Y-%m-%dT%H:%M:%SZ")
                    .to_string()
            );
        }
    }
    // x_ columns summed over the file are the report's totals.
    for (col, want) in [
        ("x_AllocatedGpuHours", r.total.allocated_gpu_hours()),
        ("x_ActiveGpuHours", r.total.active_gpu_hours()),
        ("x_Violations", r.total.violations as f64),
        ("ConsumedQuantity", r.total.delivered_gpu_hours()),
    ] {
        let got: f64 = rows
            .iter()
            .filter(|r| !r[col].is_empty())
            .map(|r| r[col].parse::<f64>().unwrap())
            .sum();
        assert!(approx(got, want), "{col}: {got} != {want}");
    }
    // The G-003 grant starts on day 2: its card's charge period says so.
    assert_eq!(
        by(UUID_D, "Used")["ChargePeriodStart"],
        "2026-04-01T15:00:00Z"
    );
}

/// Where the FOCUS validator is: $GPUMETER_FOCUS_VALIDATOR, the CI venv, or PATH.
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
    // Straight to stderr, past the test harness's capture, so that a CI log shows the skip.
    let _ = writeln!(std::io::stderr(), "skipping: {what} not installed");
}

/// Runs `cmd` for at most `limit`, killing it past that.
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
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} ran past {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pre-1.0 column ids that focus-validator 1.0.0's FOCUS 1.0 rules still require
/// (`Provider_Required`, `Publisher_Required`, `InvoiceIssuer_Required`, `ResourceID_Required`,
/// and `SkuPriceId_Nullable`, which reads `ChargeType`): the export carries them, repeating
/// their 1.0 columns, so that it passes every rule.
const VALIDATOR_PRE_1_0_COLUMNS: [&str; 5] = [
    "Provider",
    "Publisher",
    "InvoiceIssuer",
    "ResourceID",
    "ChargeType",
];

/// Every check the validator reports, with its outcome: (name, passed).
fn validator_checks(stdout: &str) -> Vec<(String, bool)> {
    stdout
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(name) = l.strip_suffix(" failed:") {
                return Some((name.to_owned(), false));
            }
            // A passed check reads `<name>: Passed` (or "... passed").
            let (name, outcome) = l.rsplit_once(':')?;
            let passed = outcome.trim().eq_ignore_ascii_case("passed");
            (passed && !name.contains(' ')).then(|| (name.trim().to_owned(), true))
        })
        .collect()
}

/// Runs focus-validator 1.0.0 on `data` (FOCUS 1.0 rules) and returns its console output; a
/// non-zero exit is a failure.
fn run_focus_validator(validator: &Path, data: &Path) -> String {
    // The validator reads its currency list from a path relative to its package's parent
    // folder: run it from there. Its interpreter is the script's `#!` line.
    let script = std::fs::read_to_string(validator).unwrap();
    let python = script
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("#!"))
        .map(str::trim)
        .unwrap_or("python3")
        .to_owned();
    let out = run_for(
        Command::new(&python).args([
            "-c",
            "import os, focus_validator; print(os.path.dirname(os.path.dirname(focus_validator.__file__)))",
        ]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let site = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut cmd = Command::new(validator);
    cmd.current_dir(&site)
        .arg("--data-file")
        .arg(data)
        .args(["--validate-version", "1.0"]);
    let out = run_for(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "validator exited {:?}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The validator's full output must name no failed rule (it exits 0 even when rules fail).
fn assert_focus_valid(validator: &Path, text: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("report.focus.csv");
    std::fs::write(&data, text).unwrap();
    let out = run_focus_validator(validator, &data);
    let checks = validator_checks(&out);
    let failed: Vec<&String> = checks.iter().filter(|c| !c.1).map(|c| &c.0).collect();
    assert!(failed.is_empty(), "{what}: failed rules {failed:?}:\n{out}");
    assert!(
        !out.to_lowercase().contains("failed"),
        "{what}: the validator's output mentions a failure:\n{out}"
    );
    assert!(out.contains("Validation succeeded."), "{what}:\n{out}");
}

#[test]
fn focus_validator_accepts_the_focus_csv_with_every_rule() {
    let Some(validator) = focus_validator() else {
        missing("focus-validator");
        return;
    };
    assert_focus_valid(&validator, &render::focus(&sample()), "sample");
    // The check itself can fail: without the pre-1.0 columns, the validator names the rules.
    let text = render::focus(&sample());
    let records = parse_csv(&text);
    let keep: Vec<usize> = (0..records[0].len())
        .filter(|i| !VALIDATOR_PRE_1_0_COLUMNS.contains(&records[0][*i].as_str()))
        .collect();
    let mut stripped = render::csv_writer::CsvWriter::new(false);
    for r in &records {
        let cells: Vec<String> = keep.iter().map(|i| r[*i].clone()).collect();
        stripped.record(&cells);
    }
    let stripped = stripped.finish();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("stripped.csv");
    std::fs::write(&data, stripped).unwrap();
    let out = run_focus_validator(&validator, &data);
    let mut failed: Vec<String> = validator_checks(&out)
        .into_iter()
        .filter(|c| !c.1)
        .map(|c| c.0)
        .collect();
    failed.sort();
    assert_eq!(
        failed,
        [
            "InvoiceIssuer_Required",
            "Provider_Required",
            "Publisher_Required",
            "ResourceID_Required",
            "SkuPriceId_Nullable"
        ],
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// HTML

#[test]
fn html_is_self_contained_escaped_and_complete() {
    let r = sample();
    let days = sample_days(&r);
    for lang in [Lang::Ko, Lang::En] {
        let page = render::html(&r, &days, lang);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains(&format!("<html lang=\"{lang}\">")));
        // Nothing to fetch: no script, no link, no src/href, no CSS url(), and a policy that
        // forbids fetching anyway.
        for banned in [
            "<script", "<link", "src=", "href=", "url(", "@import", "http://", "https://",
        ] {
            assert!(!page.contains(banned), "{lang}: page holds {banned:?}");
        }
        assert!(page.contains("content=\"default-src 'none'; style-src 'unsafe-inline'\""));
        // The grantee named like a script is text.
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; Lab"));
        assert!(page.contains("한국대학교 인공지능연구소, &quot;초거대&quot; 팀"));
        // Bars: three per grant; heatmaps: one per grant, a cell per card and day.
        for (gi, _) in r.grants.iter().enumerate() {
            for s in ["allocated", "delivered", "active"] {
                assert!(page.contains(&format!("id=\"chart-grants-{gi}-{s}\"")));
            }
            assert!(page.contains(&format!("<svg id=\"heat-{gi}\"")));
        }
        assert_eq!(
            page.matches("class=\"bar ").count(),
            3 * 3 + 2 * 3 + 2 * 4 + 2 * 2
        );
        assert_eq!(page.matches("<rect class=\"cell").count(), 4 * 3);
        assert_eq!(page.matches("<rect class=\"cell nodata\"").count(), 1);
        assert_eq!(page.matches("<rect class=\"cell unallocated\"").count(), 1);
        for id in [
            "summary",
            "programs",
            "csps",
            "idle",
            "violations",
            "invoices",
            "grant-table",
        ] {
            assert!(page.contains(&format!("<section id=\"{id}\"")), "{id}");
        }
    }
    let ko = render::html(&r, &days, Lang::Ko);
    for word in [
        "GPU 사용 정산 보고서",
        "회수 대상 유휴 과제",
        "사업별 합계",
        "고성능 컴퓨팅 지원",
        "청구 대비 제공",
    ] {
        assert!(ko.contains(word), "{word}");
    }
    let en = render::html(&r, &days, Lang::En);
    for word in [
        "GPU usage reconciliation report",
        "Idle grants to reclaim",
        "Program totals",
        "Invoiced vs delivered",
    ] {
        assert!(en.contains(word), "{word}");
    }
    // Without invoices there is no invoice section; without grants, a sentence says so.
    let mut bare = tiny();
    bare.grants.clear();
    let page = render::html(&bare, &[], Lang::En);
    assert!(!page.contains("id=\"invoices\""));
    assert!(page.contains("No grant held a GPU in this period."));
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("GPUMETER_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    find_on_path("chromium").or_else(|| {
        let p = Path::new("/usr/bin/chromium");
        p.exists().then(|| p.to_path_buf())
    })
}

/// Headless Chromium on `page` with `args` (no network, a throwaway profile).
fn run_chromium(bin: &Path, profile: &Path, page: &Path, args: &[String]) -> Output {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(format!("file://{}", page.display()));
    let out = run_for(&mut cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// RGB pixels of a PNG.
fn decode_png(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut decoder = png::Decoder::new(file);
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(channels)
        .map(|p| [p[0], p[1], p[2]])
        .collect();
    (info.width, info.height, pixels)
}

fn rgb(hex: &str) -> [u8; 3] {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap();
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

fn count_near(pixels: &[[u8; 3]], colour: [u8; 3]) -> usize {
    pixels
        .iter()
        .filter(|p| (0..3).all(|i| p[i].abs_diff(colour[i]) <= 6))
        .count()
}

#[test]
fn chromium_draws_the_charts() {
    let Some(bin) = chromium() else {
        missing("chromium");
        return;
    };
    let r = sample();
    let days = sample_days(&r);
    // Screenshots are kept where GPUMETER_REPORT_SHOTS points, for a person to look at.
    let keep = std::env::var_os("GPUMETER_REPORT_SHOTS").map(PathBuf::from);
    for lang in [Lang::Ko, Lang::En] {
        let dir = tempfile::tempdir().unwrap();
        let page = dir.path().join(format!("report-{lang}.html"));
        std::fs::write(&page, render::html(&r, &days, lang)).unwrap();
        let profile = dir.path().join("profile");

        // The DOM as the browser parsed it: the charts are SVG elements with sized bars, and
        // the script-like grantee is a text node, not an element.
        let out = run_chromium(&bin, &profile, &page, &["--dump-dom".into()]);
        let dom = String::from_utf8_lossy(&out.stdout);
        assert!(
            dom.contains("<svg id=\"chart-grants\""),
            "{lang}: no bar chart in DOM"
        );
        for banned in ["<script", "src=", "href=", "http://", "https://"] {
            assert!(!dom.contains(banned), "{lang}: the DOM holds {banned:?}");
        }
        assert!(
            dom.contains("&lt;script&gt;alert('x')&lt;/script&gt; Lab"),
            "{lang}"
        );
        let bars: Vec<f64> = dom
            .split("class=\"bar ")
            .skip(1)
            .map(|s| {
                let w = s.split("width=\"").nth(1).unwrap();
                w[..w.find('"').unwrap()].parse::<f64>().unwrap()
            })
            .collect();
        assert_eq!(bars.len(), 3 * 3 + 2 * 3 + 2 * 4 + 2 * 2, "{lang}");
        assert!(
            bars.iter().filter(|w| **w > 0.0).count() >= 20,
            "{lang}: {bars:?}"
        );
        assert_eq!(dom.matches("class=\"cell").count(), 12, "{lang}");

        // The picture: bar colours and heatmap colours are on screen, and the page is not blank.
        let shot = dir.path().join(format!("report-{lang}.png"));
        run_chromium(
            &bin,
            &profile,
            &page,
            &[
                format!("--screenshot={}", shot.display()),
                "--window-size=1400,3000".into(),
            ],
        );
        let (w, h, pixels) = decode_png(&shot);
        assert_eq!((w, h), (1400, 3000), "{lang}");
        for (what, colour) in [
            ("allocated bars", "#9ecae1"),
            ("delivered bars", "#3182bd"),
            ("active bars", "#e6550d"),
            ("unassigned bars", "#756bb1"),
            ("billed bars", "#31a354"),
            ("not-metered cells", "#bdbdbd"),
        ] {
            let n = count_near(&pixels, rgb(colour));
            assert!(n > 150, "{lang}: {what} ({colour}) cover {n} pixels");
        }
        let distinct: std::collections::HashSet<[u8; 3]> = pixels.iter().copied().collect();
        assert!(
            distinct.len() > 100,
            "{lang}: only {} colours",
            distinct.len()
        );
        // Dark (text) pixels in the page's header, where the title is.
        let dark_top = pixels[..1400 * 80]
            .iter()
            .filter(|p| p.iter().all(|c| *c < 90))
            .count();
        assert!(dark_top > 300, "{lang}: no title text drawn ({dark_top})");
        if let Some(keep) = &keep {
            std::fs::create_dir_all(keep).unwrap();
            std::fs::copy(&shot, keep.join(format!("report-{lang}.png"))).unwrap();
            std::fs::copy(&page, keep.join(format!("report-{lang}.html"))).unwrap();
        }
    }
}

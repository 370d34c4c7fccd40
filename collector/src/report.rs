//! Reports: periods in Korean calendar terms; the usage view and the reconciliation, as
//! terminal tables and JSON (the other formats live in `render`).

use chrono::{Datelike, FixedOffset, NaiveDate, TimeZone};
use gpumeter_proto::v1;
use serde::Serialize;

use crate::reconcile::{Figures, IdleReport, Reconciliation, gpu_hours};

/// Korea Standard Time (UTC+9, no daylight saving).
pub fn kst() -> FixedOffset {
    FixedOffset::east_opt(9 * 3600).expect("UTC+9 is a valid offset")
}

/// A bad `--period`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "bad period {value:?}: {reason} (expected YYYY-MM, YYYY-MM-DD, or FROM..UNTIL with dates or RFC 3339 times)"
)]
pub struct PeriodError {
    pub value: String,
    pub reason: String,
}

fn day_start_ms(d: NaiveDate) -> Option<i64> {
    kst()
        .from_local_datetime(&d.and_hms_opt(0, 0, 0)?)
        .single()
        .map(|t| t.timestamp_millis())
}

fn point_ms(s: &str, end: bool) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    // An end date is inclusive: the period runs to the start of the next day.
    day_start_ms(if end { d.succ_opt()? } else { d })
}

/// Parses a period into [from, until) in ms since the Unix epoch, in KST calendar terms.
pub fn parse_period(s: &str) -> Result<(i64, i64), PeriodError> {
    let err = |reason: &str| PeriodError {
        value: s.to_string(),
        reason: reason.to_string(),
    };
    let s = s.trim();
    if let Some((a, b)) = s.split_once("..") {
        let from = point_ms(a, false).ok_or_else(|| err("bad start"))?;
        let until = point_ms(b, true).ok_or_else(|| err("bad end"))?;
        if until <= from {
            return Err(err("end is not after start"));
        }
        return Ok((from, until));
    }
    if let Ok(d) = NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d") {
        if s.len() == 7 {
            let next = if d.month() == 12 {
                NaiveDate::from_ymd_opt(d.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(d.year(), d.month() + 1, 1)
            };
            let from = day_start_ms(d).ok_or_else(|| err("bad month"))?;
            let until = next
                .and_then(day_start_ms)
                .ok_or_else(|| err("bad month"))?;
            return Ok((from, until));
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        let from = day_start_ms(d).ok_or_else(|| err("bad day"))?;
        let until = d
            .succ_opt()
            .and_then(day_start_ms)
            .ok_or_else(|| err("bad day"))?;
        return Ok((from, until));
    }
    Err(err("not a month, day or range"))
}

const MS_PER_HOUR: f64 = 3_600_000.0;

fn hours(ms: u64) -> f64 {
    ms as f64 / MS_PER_HOUR
}

#[derive(Debug, Serialize, PartialEq)]
pub struct CardJson {
    pub host_id: String,
    pub csp: String,
    pub gpu_uuid: String,
    pub gpu_name: String,
    pub windows: u32,
    pub metered_ms: u64,
    pub occupied_ms: u64,
    pub active_ms: u64,
    pub foreign_ms: u64,
    pub unavailable_ms: u64,
    pub metered_hours: f64,
    pub occupied_hours: f64,
    pub active_hours: f64,
    pub util_avg_pct: Option<f64>,
    pub energy_mj: u64,
    pub energy_kwh: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct TenantJson {
    pub host_id: String,
    pub gpu_uuid: String,
    pub principal: String,
    pub grant_id: String,
    pub matches_grant: bool,
    pub occupied_ms: u64,
    pub active_ms: u64,
    pub occupied_hours: f64,
    pub active_hours: f64,
    /// Utilization while occupied: active / occupied × 100.
    pub util_while_occupied_pct: Option<f64>,
    pub memory_max_bytes: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct UsageJson {
    pub from_unix_ms: i64,
    pub until_unix_ms: i64,
    pub cards: Vec<CardJson>,
    pub tenants: Vec<TenantJson>,
}

impl From<&v1::UsageReport> for UsageJson {
    fn from(r: &v1::UsageReport) -> Self {
        UsageJson {
            from_unix_ms: r.from_unix_ms,
            until_unix_ms: r.until_unix_ms,
            cards: r
                .cards
                .iter()
                .map(|c| CardJson {
                    host_id: c.host_id.clone(),
                    csp: c.csp.clone(),
                    gpu_uuid: c.gpu_uuid.clone(),
                    gpu_name: c.gpu_name.clone(),
                    windows: c.windows,
                    metered_ms: c.metered_ms,
                    occupied_ms: c.occupied_ms,
                    active_ms: c.active_ms,
                    foreign_ms: c.foreign_ms,
                    unavailable_ms: c.unavailable_ms,
                    metered_hours: hours(c.metered_ms),
                    occupied_hours: hours(c.occupied_ms),
                    active_hours: hours(c.active_ms),
                    util_avg_pct: c.util_avg_pct,
                    energy_mj: c.energy_mj,
                    energy_kwh: c.energy_mj as f64 / 3.6e9,
                })
                .collect(),
            tenants: r
                .tenants
                .iter()
                .map(|t| TenantJson {
                    host_id: t.host_id.clone(),
                    gpu_uuid: t.gpu_uuid.clone(),
                    principal: t.principal.clone(),
                    grant_id: t.grant_id.clone(),
                    matches_grant: t.matches_grant,
                    occupied_ms: t.occupied_ms,
                    active_ms: t.active_ms,
                    occupied_hours: hours(t.occupied_ms),
                    active_hours: hours(t.active_ms),
                    util_while_occupied_pct: (t.occupied_ms > 0)
                        .then(|| t.active_ms as f64 * 100.0 / t.occupied_ms as f64),
                    memory_max_bytes: t.memory_max_bytes,
                })
                .collect(),
        }
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.1}"))
}

/// The terminal rendering (narrow, fitting 120 columns): cards, then tenants.
pub fn usage_table(r: &UsageJson) -> String {
    usage_table_width(r, Width::Narrow)
}

/// [`usage_table`] at a chosen width. Each utilization column names its formula: a card's is
/// its mean utilization over metered time, a tenant's active ÷ occupied.
pub fn usage_table_width(r: &UsageJson, width: Width) -> String {
    let wide = width == Width::Wide;
    let mut out = format!(
        "Usage {} (KST, Asia/Seoul)\n\nCards\n",
        crate::render::kst_span(r.from_unix_ms, r.until_unix_ms),
    );
    let rows: Vec<Vec<String>> = r
        .cards
        .iter()
        .map(|c| {
            let mut row = vec![
                c.host_id.clone(),
                short_uuid(&c.gpu_uuid, width),
                c.csp.clone(),
                format!("{:.3}", c.metered_hours),
                format!("{:.3}", c.occupied_hours),
                format!("{:.3}", c.active_hours),
                fmt_opt(c.util_avg_pct),
                format!("{:.3}", c.energy_kwh),
            ];
            if wide {
                row.push(format!("{:.3}", hours(c.foreign_ms)));
                row.push(format!("{:.3}", hours(c.unavailable_ms)));
            }
            row
        })
        .collect();
    let mut header = vec![
        "HOST",
        "GPU",
        "CSP",
        "METERED_H",
        "OCCUPIED_H",
        "ACTIVE_H",
        "MEAN_UTIL/METERED_%",
        "ENERGY_KWH",
    ];
    if wide {
        header.extend(["FOREIGN_H", "UNAVAIL_H"]);
    }
    let right: Vec<bool> = (0..header.len()).map(|i| i >= 3).collect();
    out.push_str(&grid(&header, &rows, &right));
    out.push_str("\nTenants\n");
    let rows: Vec<Vec<String>> = r
        .tenants
        .iter()
        .map(|t| {
            vec![
                t.host_id.clone(),
                short_uuid(&t.gpu_uuid, width),
                if wide {
                    t.principal.clone()
                } else {
                    clip_width(&t.principal, 24)
                },
                if t.grant_id.is_empty() {
                    "-".into()
                } else {
                    t.grant_id.clone()
                },
                if t.matches_grant {
                    "yes".into()
                } else {
                    "NO".into()
                },
                format!("{:.3}", t.occupied_hours),
                format!("{:.3}", t.active_hours),
                fmt_opt(t.util_while_occupied_pct),
            ]
        })
        .collect();
    out.push_str(&grid(
        &[
            "HOST",
            "GPU",
            "PRINCIPAL",
            "GRANT",
            "MATCHES",
            "OCCUPIED_H",
            "ACTIVE_H",
            "ACT/OCC_%",
        ],
        &rows,
        &[false, false, false, false, false, true, true, true],
    ));
    out.push('\n');
    out.push_str(&notes(
        &["card_util_pct", "util_while_occupied_pct", "time_zone"],
        false,
    ));
    out
}

// ---------------------------------------------------------------------------------------------
// Reconciliation: the terminal table and JSON

/// Columns a terminal gives a character: 2 for Hangul and other wide scripts, so Korean
/// labels line up.
fn display_width(s: &str) -> usize {
    s.chars()
        .map(|c| match u32::from(c) {
            0x1100..=0x115F
            | 0x2E80..=0xA4CF
            | 0xAC00..=0xD7A3
            | 0xF900..=0xFAFF
            | 0xFE30..=0xFE4F
            | 0xFF00..=0xFF60
            | 0xFFE0..=0xFFE6 => 2,
            _ => 1,
        })
        .sum()
}

/// An aligned table under a header row and a rule; columns flagged in `right` (numbers) are
/// right-aligned. Every terminal table of the CLI is one of these.
pub fn grid(header: &[&str], rows: &[Vec<String>], right: &[bool]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| display_width(h)).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(display_width(c));
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = " ".repeat(w[i].saturating_sub(display_width(c)));
            if right.get(i).copied().unwrap_or(false) {
                out.push_str(&pad);
                out.push_str(c);
            } else {
                out.push_str(c);
                out.push_str(&pad);
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    out.push_str(&line(&w.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>()));
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// How wide a terminal table is: the default fits 120 columns (the figures that explain
/// delivery and use, card ids shortened); `Wide` shows every column and whole ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Width {
    #[default]
    Narrow,
    Wide,
}

/// The width the default tables fit in.
pub const NARROW_COLUMNS: usize = 120;

/// `s` cut to `max` display columns, with `…` where it was cut.
fn clip_width(s: &str, max: usize) -> String {
    if display_width(s) <= max {
        return s.to_owned();
    }
    let mut out = String::new();
    for c in s.chars() {
        if display_width(&out) + display_width(&c.to_string()) + 1 > max {
            break;
        }
        out.push(c);
    }
    out.push('…');
    out
}

/// A GPU UUID as the narrow tables show it: its first 12 and last 4 characters
/// (`GPU-0000000a…0001`), enough to tell a server's cards apart; `--wide` shows it whole.
fn short_uuid(u: &str, width: Width) -> String {
    let n = u.chars().count();
    if width == Width::Wide || n <= 17 {
        return u.to_owned();
    }
    let head: String = u.chars().take(12).collect();
    let tail: String = u.chars().skip(n - 4).collect();
    format!("{head}…{tail}")
}

/// `text` wrapped to `max` display columns, each line indented by `indent`.
fn wrap(text: &str, indent: &str, max: usize) -> String {
    let mut out = String::new();
    let mut line = indent.to_owned();
    for word in text.split(' ') {
        if display_width(&line) + 1 + display_width(word) > max && line.trim() != "" {
            out.push_str(line.trim_end());
            out.push('\n');
            line = format!("{indent}  ");
        }
        if !line.trim().is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(line.trim_end());
    out.push('\n');
    out
}

/// The glossary entries `keys`, wrapped to fit the narrow width, under a table.
fn notes(keys: &[&str], korean: bool) -> String {
    use crate::render::{Lang, glossary};
    let lang = if korean { Lang::Ko } else { Lang::En };
    let mut out = String::from(if korean { "용어:\n" } else { "Terms:\n" });
    for k in keys {
        if let Some(t) = glossary::term(k) {
            out.push_str(&wrap(
                &format!("{}: {}", t.name(lang), t.definition(lang)),
                "  ",
                NARROW_COLUMNS,
            ));
        }
    }
    out
}

/// The words of the reconciliation table.
struct Words {
    title: &'static str,
    figures_in: &'static str,
    none: &'static str,
    grants: &'static str,
    programs: &'static str,
    csps: &'static str,
    unassigned: &'static str,
    idle: &'static str,
    invoices: &'static str,
    identity: &'static str,
    no_grant: &'static str,
    equivalents: &'static str,
    /// GPU-equivalents, then allocated, delivered and active GPU-equivalent hours.
    eq_headers: [&'static str; 4],
    grant_card: &'static str,
    grant: &'static str,
    program: &'static str,
    grantee: &'static str,
    csp: &'static str,
    host: &'static str,
    gpu: &'static str,
    grants_n: &'static str,
    cards_n: &'static str,
    total: &'static str,
    /// The eight time figures, in [`Figures::times`] order.
    times: [&'static str; 9],
    util: &'static str,
    energy: &'static str,
    violations: &'static str,
    unassigned_use: &'static str,
    unassigned_violations: &'static str,
    periods: &'static str,
    billed: &'static str,
    difference: &'static str,
    no_invoice: &'static str,
}

const EN: Words = Words {
    title: "Reconciliation",
    figures_in: "Figures in GPU-hours; every time KST (Asia/Seoul), end dates inclusive.",
    none: "(none)",
    grants: "Grants",
    programs: "Programs",
    csps: "CSPs",
    unassigned: "Use of unassigned cards",
    idle: "Idle grants",
    invoices: "Invoices against delivery",
    identity: "Card identity alarms (a card changed under its UUID, or not the granted model)",
    no_grant: "(no grant)",
    equivalents: "GPU-equivalents (a MIG instance counts its slices ÷ its GPU's slices; hours × that)",
    eq_headers: ["GPU_EQ", "ALLOCATED_EQ", "DELIVERED_EQ", "ACTIVE_EQ"],
    grant_card: "GRANT / CARD",
    grant: "GRANT",
    program: "PROGRAM",
    grantee: "GRANTEE",
    csp: "CSP",
    host: "HOST",
    gpu: "GPU",
    grants_n: "GRANTS",
    cards_n: "CARDS",
    total: "total",
    times: [
        "ALLOCATED",
        "UNMETERED",
        "UNAVAILABLE",
        "DELIVERED",
        "OCCUPIED",
        "ACTIVE",
        "IDLE",
        "FOREIGN",
        "UNATTRIBUTED",
    ],
    util: "ACT/ALLOC_%",
    energy: "ENERGY_KWH",
    violations: "VIOL",
    unassigned_use: "UNASSIGNED",
    unassigned_violations: "UNASSIGNED_VIOL",
    periods: "INVOICED",
    billed: "BILLED",
    difference: "DIFFERENCE",
    no_invoice: "no invoice",
};

const KO: Words = Words {
    title: "정산 대조",
    figures_in: "단위: GPU시간. 모든 시각은 KST(Asia/Seoul), 종료일은 그날 포함.",
    none: "(없음)",
    grants: "과제별",
    programs: "사업별",
    csps: "클라우드 사업자(CSP)별",
    unassigned: "미배정 GPU 사용",
    idle: "유휴 과제",
    invoices: "청구 대비 제공",
    identity: "GPU 식별 경보 (같은 UUID의 카드가 바뀌었거나 과제가 지정한 모델이 아님)",
    no_grant: "(미배정)",
    equivalents: "GPU 환산 (MIG 인스턴스는 슬라이스 ÷ 상위 GPU 슬라이스, 시간 × 그 값)",
    eq_headers: ["GPU 환산 수", "배정(환산)", "제공(환산)", "활성 사용(환산)"],
    grant_card: "과제 / GPU",
    grant: "과제",
    program: "사업",
    grantee: "수혜기관",
    csp: "CSP",
    host: "호스트",
    gpu: "GPU",
    grants_n: "과제 수",
    cards_n: "GPU 수",
    total: "합계",
    times: [
        "배정",
        "미계측",
        "장애",
        "제공",
        "점유",
        "활성 사용",
        "유휴",
        "타 사용자 사용",
        "귀속 불명",
    ],
    util: "활용률(활성/배정 %)",
    energy: "전력량(kWh)",
    violations: "위반(건)",
    unassigned_use: "미배정 사용",
    unassigned_violations: "미배정 위반",
    periods: "청구 월",
    billed: "청구",
    difference: "차이",
    no_invoice: "청구 없음",
};

fn h3(ms: u64) -> String {
    format!("{:.3}", gpu_hours(ms))
}

fn pct1(v: Option<f64>) -> String {
    fmt_opt(v)
}

/// Which figure columns a width shows, as indices into [`Figures::times`] (the rest follow:
/// utilization, then energy in wide tables only, then violations).
fn time_columns(cols: Cols) -> Vec<usize> {
    let mut shown = match cols.width {
        // allocated, unmetered, unavailable, delivered, active: the chain from granted to
        // delivered, and the use that utilization is made of.
        Width::Narrow => vec![0, 1, 2, 3, 5],
        Width::Wide => vec![0, 1, 2, 3, 4, 5, 6, 7],
    };
    // The unattributed time (the last of the times) has a column only where some card of
    // the report had any, so the usual table stays as narrow as before it existed.
    if cols.blind {
        shown.push(8);
    }
    shown
}

/// Which columns a table shows: its width, and whether any card had unattributed time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cols {
    width: Width,
    blind: bool,
}

/// The figure cells of a row.
fn figure_cells(f: &Figures, cols: Cols) -> Vec<String> {
    let width = cols.width;
    let times = f.times();
    let mut cells: Vec<String> = time_columns(cols).iter().map(|i| h3(times[*i].1)).collect();
    cells.push(pct1(f.utilization_pct()));
    if width == Width::Wide {
        cells.push(format!("{:.3}", f.energy_kwh()));
    }
    cells.push(f.violations.to_string());
    cells
}

fn figure_header<'a>(w: &'a Words, lead: &[&'a str], cols: Cols) -> (Vec<&'a str>, Vec<bool>) {
    let width = cols.width;
    let mut h: Vec<&str> = lead.to_vec();
    h.extend(time_columns(cols).iter().map(|i| w.times[*i]));
    h.push(w.util);
    if width == Width::Wide {
        h.push(w.energy);
    }
    h.push(w.violations);
    let right = (0..h.len()).map(|i| i >= lead.len()).collect();
    (h, right)
}

/// The terminal rendering of a reconciliation (the narrow default): grants with their cards,
/// program and CSP totals, use of unassigned cards, idle grants, invoices against delivery,
/// and the terms they use.
pub fn reconciliation_table(r: &Reconciliation, korean: bool) -> String {
    reconciliation_table_width(r, korean, Width::Narrow)
}

/// The fleet section of the table (present once a provider is registered): per CSP and
/// program, the card counts, with what each column means under it.
fn fleet_table(fleet: &[crate::registry::FleetRow], korean: bool) -> String {
    let (title, header) = if korean {
        (
            "사업자별 공급 현황 (GPU 수)",
            [
                "CSP", "사업", "약정", "서버", "등록", "정상", "배정", "제공",
            ],
        )
    } else {
        (
            "Providers (cards)",
            [
                "CSP",
                "PROGRAM",
                "COMMITTED",
                "HOSTS",
                "REGISTERED",
                "HEALTHY",
                "GRANTED",
                "DELIVERED",
            ],
        )
    };
    let rows: Vec<Vec<String>> = fleet
        .iter()
        .map(|f| {
            let name = if korean { &f.name_ko } else { &f.name_en };
            let mut row = vec![
                if name.is_empty() {
                    f.csp.clone()
                } else {
                    format!("{} ({})", f.csp, name)
                },
                if f.program.is_empty() {
                    "-".to_owned()
                } else {
                    f.program.clone()
                },
            ];
            row.extend(
                [
                    f.committed_cards,
                    f.registered_hosts,
                    f.registered_cards,
                    f.healthy_cards,
                    f.granted_cards,
                    f.delivered_cards,
                ]
                .map(|n| n.to_string()),
            );
            row
        })
        .collect();
    let right: Vec<bool> = (0..header.len()).map(|i| i >= 2).collect();
    let mut out = format!("{title}\n");
    out.push_str(&grid(&header, &rows, &right));
    for (col, h) in crate::registry::FLEET_COLUMNS.iter().zip(&header[2..]) {
        out.push_str(&wrap(
            &format!("{h}: {}", crate::registry::fleet_definition(col, korean)),
            "  ",
            NARROW_COLUMNS,
        ));
    }
    out
}

/// [`reconciliation_table`] at a chosen width.
pub fn reconciliation_table_width(r: &Reconciliation, korean: bool, width: Width) -> String {
    let w = if korean { &KO } else { &EN };
    let lang = if korean {
        crate::render::Lang::Ko
    } else {
        crate::render::Lang::En
    };
    let blind = r.total.unattributed_ms > 0 || r.csps.iter().any(|c| c.figures.unattributed_ms > 0);
    let cols = Cols { width, blind };
    let mut out = format!(
        "{} {}: {} (KST, {})\n",
        w.title,
        r.period,
        crate::render::kst_span(r.from_ms, r.until_ms),
        r.time_zone
    );
    if let Some(note) = crate::render::as_of_note(r, lang) {
        out.push_str(&wrap(&note, "", NARROW_COLUMNS));
    }
    let mut filters = vec![];
    if let Some(p) = &r.program {
        filters.push(format!("{}={p}", w.program));
    }
    if let Some(g) = &r.grant_id {
        filters.push(format!("{}={g}", w.grant));
    }
    if !filters.is_empty() {
        out.push_str(&filters.join(", "));
        out.push('\n');
    }
    out.push_str(w.figures_in);
    out.push_str("\n\n");

    out.push_str(w.grants);
    out.push('\n');
    if r.grants.is_empty() {
        out.push_str(w.none);
        out.push('\n');
    } else {
        let lead: Vec<&str> = match width {
            Width::Narrow => vec![w.grant_card, w.csp],
            Width::Wide => vec![w.grant_card, w.program, w.grantee, w.csp],
        };
        let (h, right) = figure_header(w, &lead, cols);
        let mut rows = Vec::new();
        for g in &r.grants {
            let mut row = match width {
                Width::Narrow => vec![
                    clip_width(&format!("{} · {}", g.grant_id, g.grantee), 30),
                    g.csp.clone(),
                ],
                Width::Wide => vec![
                    g.grant_id.clone(),
                    g.program.clone(),
                    g.grantee.clone(),
                    g.csp.clone(),
                ],
            };
            row.extend(figure_cells(&g.figures, cols));
            rows.push(row);
            for c in &g.cards {
                let mut row = vec![format!(
                    "  {} {}",
                    c.host_id,
                    short_uuid(&c.gpu_uuid, width)
                )];
                row.extend(std::iter::repeat_n(String::new(), lead.len() - 1));
                row.extend(figure_cells(&c.figures, cols));
                rows.push(row);
            }
        }
        let mut row = vec![w.total.to_string()];
        row.extend(std::iter::repeat_n(String::new(), lead.len() - 1));
        row.extend(figure_cells(&r.total, cols));
        rows.push(row);
        out.push_str(&grid(&h, &rows, &right));
    }

    out.push('\n');
    out.push_str(w.programs);
    out.push('\n');
    if r.programs.is_empty() {
        out.push_str(w.none);
        out.push('\n');
    } else {
        let (h, right) = figure_header(w, &[w.program, w.grants_n, w.cards_n], cols);
        let mut right = right;
        right[1] = true;
        right[2] = true;
        let rows: Vec<Vec<String>> = r
            .programs
            .iter()
            .map(|p| {
                let mut row = vec![p.program.clone(), p.grants.to_string(), p.cards.to_string()];
                row.extend(figure_cells(&p.figures, cols));
                row
            })
            .collect();
        out.push_str(&grid(&h, &rows, &right));
    }

    out.push('\n');
    out.push_str(w.csps);
    out.push('\n');
    if r.csps.is_empty() {
        out.push_str(w.none);
        out.push('\n');
    } else {
        // The CSP table has two columns more than the others: narrow, it shows delivery and
        // use only (allocated, delivered, active).
        let csp_width = width;
        let (mut h, mut right) = match csp_width {
            Width::Narrow => {
                let mut h = vec![
                    w.csp, w.grants_n, w.cards_n, w.times[0], w.times[3], w.times[5],
                ];
                h.extend([w.util, w.violations]);
                let right = (0..h.len()).map(|i| i >= 1).collect::<Vec<_>>();
                (h, right)
            }
            Width::Wide => figure_header(w, &[w.csp, w.grants_n, w.cards_n], cols),
        };
        h.push(w.unassigned_use);
        h.push(w.unassigned_violations);
        right.push(true);
        right.push(true);
        right[1] = true;
        right[2] = true;
        let rows: Vec<Vec<String>> = r
            .csps
            .iter()
            .map(|c| {
                let mut row = vec![c.csp.clone(), c.grants.to_string(), c.cards.to_string()];
                match csp_width {
                    Width::Narrow => {
                        let f = &c.figures;
                        row.extend([
                            h3(f.allocated_ms),
                            h3(f.delivered_ms),
                            h3(f.active_ms),
                            pct1(f.utilization_pct()),
                            f.violations.to_string(),
                        ]);
                    }
                    Width::Wide => row.extend(figure_cells(&c.figures, cols)),
                }
                row.push(h3(c.unassigned_use_ms));
                row.push(c.unassigned_violations.to_string());
                row
            })
            .collect();
        out.push_str(&grid(&h, &rows, &right));
    }

    if !r.fleet.is_empty() {
        out.push('\n');
        out.push_str(&fleet_table(&r.fleet, korean));
    }

    out.push('\n');
    out.push_str(w.unassigned);
    out.push('\n');
    let rows: Vec<Vec<String>> = r
        .unassigned
        .iter()
        .flat_map(|u| {
            u.cards.iter().map(|c| {
                vec![
                    u.csp.clone(),
                    u.host_id.clone(),
                    c.gpu_uuid.clone(),
                    h3(c.unassigned_use_ms),
                    c.violations.to_string(),
                ]
            })
        })
        .collect();
    if rows.is_empty() {
        out.push_str(w.none);
        out.push('\n');
    } else {
        out.push_str(&grid(
            &[w.csp, w.host, w.gpu, w.unassigned_use, w.violations],
            &rows,
            &[false, false, false, true, true],
        ));
    }

    out.push('\n');
    out.push_str(&idle_table_width(&r.idle, korean, width));

    out.push('\n');
    out.push_str(w.invoices);
    out.push('\n');
    if r.invoices.is_empty() {
        out.push_str(w.none);
        out.push('\n');
    } else {
        let mut rows: Vec<Vec<String>> = r
            .invoices
            .iter()
            .map(|i| {
                vec![
                    i.csp.clone(),
                    i.grant_id.clone(),
                    if i.periods.is_empty() {
                        w.no_invoice.to_string()
                    } else {
                        i.periods.join(" ")
                    },
                    i.billed_gpu_hours
                        .map_or("-".to_string(), |b| format!("{b:.3}")),
                    h3(i.delivered_ms),
                    format!("{:+.3}", i.difference_gpu_hours),
                ]
            })
            .collect();
        for c in &r.invoice_csps {
            rows.push(vec![
                c.csp.clone(),
                w.total.to_string(),
                String::new(),
                format!("{:.3}", c.billed_gpu_hours),
                h3(c.delivered_ms),
                format!("{:+.3}", c.difference_gpu_hours),
            ]);
        }
        out.push_str(&grid(
            &[
                w.csp,
                w.grant,
                w.periods,
                w.billed,
                w.times[3],
                w.difference,
            ],
            &rows,
            &[false, false, false, true, true, true],
        ));
    }
    if r.gpu_equivalents.fractional() {
        out.push('\n');
        out.push_str(&equivalent_lines(r, w));
    }
    out.push('\n');
    out.push_str(&identity_lines(r, w, width));
    out.push('\n');
    let mut keys = vec![
        "allocated",
        "unmetered",
        "unavailable",
        "delivered",
        "active",
    ];
    if width == Width::Wide {
        keys.extend(["occupied", "idle", "foreign", "energy_kwh"]);
    }
    keys.extend(["utilization_pct", "violations", "unassigned_use"]);
    if r.not_elapsed.is_some() {
        keys.push("not_elapsed");
    }
    keys.push("time_zone");
    out.push_str(&notes(&keys, korean));
    if width == Width::Narrow {
        out.push_str(if korean {
            "(--wide: 점유·유휴·타 사용자 사용·전력량 열과 전체 GPU UUID)\n"
        } else {
            "(--wide shows occupied, idle, foreign and energy too, and whole GPU UUIDs)\n"
        });
    }
    out
}

/// The grants' figures in GPU-equivalents, shown when a card is a MIG instance.
fn equivalent_lines(r: &Reconciliation, w: &Words) -> String {
    let cells = |key: &str, e: &crate::reconcile::Equivalent| {
        vec![
            key.to_owned(),
            format!("{:.3}", e.gpus),
            format!("{:.3}", e.allocated_gpu_hours),
            format!("{:.3}", e.delivered_gpu_hours),
            format!("{:.3}", e.active_gpu_hours),
        ]
    };
    let eq = &r.gpu_equivalents;
    let mut rows: Vec<Vec<String>> = eq
        .grants
        .iter()
        .map(|g| cells(&g.key, &g.figures))
        .collect();
    rows.push(cells(w.total, &eq.total));
    let h = w.eq_headers;
    format!(
        "{}\n{}",
        w.equivalents,
        grid(
            &[w.grant, h[0], h[1], h[2], h[3]],
            &rows,
            &[false, true, true, true, true]
        )
    )
}

/// The report's card identity alarms, one entry each: when, what, which card and grants,
/// then the alarm's own words wrapped to the table width.
fn identity_lines(r: &Reconciliation, w: &Words, width: Width) -> String {
    let mut out = format!("{}\n", w.identity);
    if r.card_alarms.is_empty() {
        out.push_str(w.none);
        out.push('\n');
        return out;
    }
    let max = if width == Width::Wide {
        usize::MAX
    } else {
        NARROW_COLUMNS
    };
    for a in &r.card_alarms {
        let grants = if a.grant_ids.is_empty() {
            w.no_grant.to_owned()
        } else {
            a.grant_ids.join(" ")
        };
        out.push_str(&clip_width(
            &format!(
                "{}  {}  {}  {}  {}",
                crate::render::kst_minute(a.at_ms),
                a.kind,
                a.host_id,
                short_uuid(&a.gpu_uuid, width),
                grants
            ),
            max,
        ));
        out.push('\n');
        out.push_str(&wrap(&a.detail, "  ", max));
    }
    out
}

/// The idle grants with their reclaimable cards, as a table.
pub fn idle_table(idle: &IdleReport, korean: bool) -> String {
    idle_table_width(idle, korean, Width::Wide)
}

fn idle_table_width(idle: &IdleReport, korean: bool, width: Width) -> String {
    let w = if korean { &KO } else { &EN };
    let days_ms = i64::from(idle.days) * 86_400_000;
    let look = crate::render::kst_span(idle.as_of_ms - days_ms, idle.as_of_ms);
    let rule = if korean {
        format!(
            "{} (최근 {}일 {} KST 활용률 {}% 미만) 및 회수 가능 GPU\n",
            w.idle, idle.days, look, idle.threshold_pct,
        )
    } else {
        format!(
            "{} (utilization under {}% over the {} days {} KST), with the cards to reclaim\n",
            w.idle, idle.threshold_pct, idle.days, look,
        )
    };
    let mut out = rule;
    if idle.grants.is_empty() {
        out.push_str(w.none);
        out.push('\n');
        return out;
    }
    let mut rows = Vec::new();
    for g in &idle.grants {
        rows.push(vec![
            g.grant_id.clone(),
            g.program.clone(),
            match width {
                Width::Narrow => clip_width(&g.grantee, 20),
                Width::Wide => g.grantee.clone(),
            },
            g.csp.clone(),
            h3(g.allocated_ms),
            h3(g.active_ms),
            format!("{:.1}", g.utilization_pct),
        ]);
        for c in &g.reclaimable_cards {
            rows.push(vec![
                format!("  {} {}", c.host_id, short_uuid(&c.gpu_uuid, width)),
                String::new(),
                String::new(),
                String::new(),
                h3(c.allocated_ms),
                h3(c.active_ms),
                format!("{:.1}", c.utilization_pct),
            ]);
        }
    }
    out.push_str(&grid(
        &[
            w.grant_card,
            w.program,
            w.grantee,
            w.csp,
            w.times[0],
            w.times[5],
            w.util,
        ],
        &rows,
        &[false, false, false, false, true, true, true],
    ));
    out
}

/// A trend as terminal tables: one per level (program, CSP, grant, grantee, principal), a
/// row per key and month.
pub fn trend_table(t: &crate::trend::Trend, korean: bool, width: Width) -> String {
    use crate::trend::Level;
    let w = if korean { &KO } else { &EN };
    let mut out = format!(
        "{} {} (KST, {}; {} {} KST)\n{}\n",
        if korean { "월별 추이" } else { "Trends" },
        match (t.months.first(), t.months.last()) {
            (Some(a), Some(b)) => format!("{a} – {b}"),
            _ => String::new(),
        },
        t.time_zone,
        if korean { "기준" } else { "as of" },
        crate::render::kst_minute(t.as_of_ms),
        w.figures_in
    );
    for level in Level::ALL {
        let (title, key) = match (korean, level) {
            (false, Level::Program) => ("Per program", w.program),
            (false, Level::Csp) => ("Per CSP", w.csp),
            (false, Level::Grant) => ("Per grant", w.grant),
            (false, Level::Grantee) => ("Per grantee", w.grantee),
            (false, Level::Principal) => ("Per principal", "PRINCIPAL"),
            (true, Level::Program) => ("사업별", w.program),
            (true, Level::Csp) => ("CSP별", w.csp),
            (true, Level::Grant) => ("과제별", w.grant),
            (true, Level::Grantee) => ("수혜기관별", w.grantee),
            (true, Level::Principal) => ("사용 주체별", "사용 주체"),
        };
        out.push('\n');
        out.push_str(title);
        out.push('\n');
        let rows: Vec<Vec<String>> = t
            .rows
            .iter()
            .filter(|r| r.level == level)
            .map(|r| {
                let f = &r.figures;
                vec![
                    match width {
                        Width::Narrow => clip_width(&r.key, 30),
                        Width::Wide => r.key.clone(),
                    },
                    r.month.clone(),
                    r.grants.to_string(),
                    h3(f.allocated_ms),
                    h3(f.delivered_ms),
                    h3(f.active_ms),
                    pct1(f.utilization_pct()),
                    f.violations.to_string(),
                ]
            })
            .collect();
        if rows.is_empty() {
            out.push_str(w.none);
            out.push('\n');
            continue;
        }
        out.push_str(&grid(
            &[
                key,
                if korean { "월" } else { "MONTH" },
                w.grants_n,
                w.times[0],
                w.times[3],
                w.times[5],
                w.util,
                w.violations,
            ],
            &rows,
            &[false, false, true, true, true, true, true, true],
        ));
    }
    out.push('\n');
    out.push_str(&notes(
        &[
            "allocated",
            "delivered",
            "active",
            "utilization_pct",
            "time_zone",
        ],
        korean,
    ));
    out
}

/// The JSON rendering: the report's own shape (see [`Reconciliation`]), pretty-printed.
pub fn reconciliation_json(r: &Reconciliation) -> Result<String, serde_json::Error> {
    Ok(serde_json::to_string_pretty(r)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn korean_months() {
        // 2026-04-01 00:00 KST = 2026-03-31 15:00 UTC
        assert_eq!(
            parse_period("2026-04").unwrap(),
            (1_774_969_200_000, 1_777_561_200_000)
        );
        let (f, u) = parse_period("2026-12").unwrap();
        assert_eq!(u - f, 31 * 86_400_000);
        assert_eq!(
            parse_period("2026-04-01").unwrap().1 - parse_period("2026-04-01").unwrap().0,
            86_400_000
        );
        let (f, u) = parse_period("2026-04-01..2026-04-02").unwrap();
        assert_eq!(u - f, 2 * 86_400_000);
        assert!(parse_period("2026-13").is_err());
        assert!(
            parse_period("april")
                .unwrap_err()
                .to_string()
                .contains("april")
        );
        assert!(parse_period("2026-04-03..2026-04-01").is_err());
    }

    #[test]
    fn table_renders_absent_utilization_as_dash() {
        let r = UsageJson::from(&v1::UsageReport {
            from_unix_ms: 0,
            until_unix_ms: 3_600_000,
            cards: vec![v1::CardUsage {
                host_id: "h1".into(),
                gpu_uuid: "GPU-0123456789".into(),
                metered_ms: 1_800_000,
                util_avg_pct: None,
                energy_mj: 3_600_000_000,
                ..Default::default()
            }],
            tenants: vec![],
        });
        assert_eq!(r.cards[0].metered_hours, 0.5);
        assert_eq!(r.cards[0].energy_kwh, 1.0);
        let t = usage_table(&r);
        assert!(t.contains("h1    GPU-0123456789  "), "{t}");
        assert!(t.contains("0.500"), "{t}");
        assert!(t.contains("  -  "), "{t}");
    }
}

#[cfg(test)]
mod reconciliation_tests {
    use super::*;
    use crate::reconcile::{
        CardRow, CspTotal, GrantRow, IdleGrant, Interval, InvoiceCspTotal, InvoiceRow,
        ProgramTotal, ReclaimableCard, UnassignedCard, UnassignedUse,
    };

    const H: u64 = 3_600_000;

    fn small() -> Reconciliation {
        let (from, until) = parse_period("2026-04").unwrap();
        let f = Figures {
            allocated_ms: 10 * H,
            unmetered_ms: H,
            unavailable_ms: H / 2,
            delivered_ms: 17 * H / 2,
            occupied_ms: 6 * H,
            active_ms: 3 * H,
            idle_ms: 5 * H / 2,
            foreign_ms: H / 4,
            energy_mj: 7_200_000_000,
            violations: 2,
            unattributed_ms: 0,
        };
        Reconciliation {
            period: "2026-04".into(),
            from_ms: from,
            until_ms: until,
            as_of_ms: until,
            elapsed_until_ms: until,
            not_elapsed: None,
            time_zone: "Asia/Seoul".into(),
            program: None,
            grant_id: None,
            grants: vec![GrantRow {
                grant_id: "G-1".into(),
                program: "hpc".into(),
                grantee: "에이씨미".into(),
                principal: "user:alice".into(),
                csp: "kt".into(),
                valid_from_ms: from,
                valid_until_ms: until,
                revoked_at_ms: None,
                cards: vec![CardRow {
                    host_id: "h1".into(),
                    gpu_uuid: "GPU-1".into(),
                    intervals: vec![Interval {
                        from_ms: from,
                        until_ms: until,
                    }],
                    figures: f,
                }],
                figures: f,
            }],
            programs: vec![ProgramTotal {
                program: "hpc".into(),
                grants: 1,
                cards: 1,
                figures: f,
            }],
            csps: vec![CspTotal {
                csp: "kt".into(),
                grants: 1,
                cards: 1,
                figures: f,
                unassigned_use_ms: H,
                unassigned_use_gpu_hours: 1.0,
                unassigned_violations: 1,
            }],
            total: f,
            unassigned_violations: 1,
            all_violations: 3,
            unassigned: vec![UnassignedUse {
                csp: "kt".into(),
                host_id: "h2".into(),
                cards: vec![UnassignedCard {
                    gpu_uuid: "GPU-2".into(),
                    unassigned_use_ms: H,
                    violations: 1,
                }],
                unassigned_use_ms: H,
                unassigned_use_gpu_hours: 1.0,
                violations: 1,
            }],
            idle: IdleReport {
                threshold_pct: 10.0,
                days: 14,
                as_of_ms: until,
                grants: vec![IdleGrant {
                    grant_id: "G-1".into(),
                    program: "hpc".into(),
                    grantee: "에이씨미".into(),
                    csp: "kt".into(),
                    window: Interval {
                        from_ms: until - 14 * 86_400_000,
                        until_ms: until,
                    },
                    allocated_ms: 336 * H,
                    delivered_ms: 300 * H,
                    active_ms: 3 * H,
                    utilization_pct: 3.0 / 336.0 * 100.0,
                    reclaimable_cards: vec![ReclaimableCard {
                        host_id: "h1".into(),
                        gpu_uuid: "GPU-1".into(),
                        allocated_ms: 336 * H,
                        active_ms: 3 * H,
                        utilization_pct: 3.0 / 336.0 * 100.0,
                    }],
                }],
            },
            invoices: vec![InvoiceRow {
                csp: "kt".into(),
                grant_id: "G-1".into(),
                periods: vec!["2026-04".into()],
                billed_gpu_hours: Some(9.0),
                delivered_ms: 17 * H / 2,
                delivered_gpu_hours: 8.5,
                difference_gpu_hours: 0.5,
            }],
            invoice_csps: vec![InvoiceCspTotal {
                csp: "kt".into(),
                billed_gpu_hours: 9.0,
                delivered_ms: 17 * H / 2,
                delivered_gpu_hours: 8.5,
                difference_gpu_hours: 0.5,
            }],
            card_alarms: vec![crate::identity::CardAlarm {
                gpu_uuid: "GPU-0000000a-0000-4000-8000-000000000001".into(),
                host_id: "h1".into(),
                grant_ids: vec!["G-1".into()],
                kind: "card_model_mismatch".into(),
                agent_id: "a1".into(),
                at_ms: from,
                detail: "card GPU-0000000a-0000-4000-8000-000000000001 reports model \"NVIDIA A10\" but grant G-1 names \"H100 80GB\" and this sentence goes on long enough to be wrapped at the table width".into(),
            }],
            gpu_equivalents: Default::default(),
            fleet: Vec::new(),
        }
    }

    #[test]
    fn english_table_snapshot() {
        let want = "\
Reconciliation 2026-04: 2026-04-01 – 2026-04-30 (KST, Asia/Seoul)
Figures in GPU-hours; every time KST (Asia/Seoul), end dates inclusive.

Grants
GRANT / CARD    CSP  ALLOCATED  UNMETERED  UNAVAILABLE  DELIVERED  ACTIVE  ACT/ALLOC_%  VIOL
--------------  ---  ---------  ---------  -----------  ---------  ------  -----------  ----
G-1 · 에이씨미  kt      10.000      1.000        0.500      8.500   3.000         30.0     2
  h1 GPU-1              10.000      1.000        0.500      8.500   3.000         30.0     2
total                   10.000      1.000        0.500      8.500   3.000         30.0     2

Programs
PROGRAM  GRANTS  CARDS  ALLOCATED  UNMETERED  UNAVAILABLE  DELIVERED  ACTIVE  ACT/ALLOC_%  VIOL
-------  ------  -----  ---------  ---------  -----------  ---------  ------  -----------  ----
hpc           1      1     10.000      1.000        0.500      8.500   3.000         30.0     2

CSPs
CSP  GRANTS  CARDS  ALLOCATED  DELIVERED  ACTIVE  ACT/ALLOC_%  VIOL  UNASSIGNED  UNASSIGNED_VIOL
---  ------  -----  ---------  ---------  ------  -----------  ----  ----------  ---------------
kt        1      1     10.000      8.500   3.000         30.0     2       1.000                1

Use of unassigned cards
CSP  HOST  GPU    UNASSIGNED  VIOL
---  ----  -----  ----------  ----
kt   h2    GPU-2       1.000     1

Idle grants (utilization under 10% over the 14 days 2026-04-17 – 2026-04-30 KST), with the cards to reclaim
GRANT / CARD  PROGRAM  GRANTEE   CSP  ALLOCATED  ACTIVE  ACT/ALLOC_%
------------  -------  --------  ---  ---------  ------  -----------
G-1           hpc      에이씨미  kt     336.000   3.000          0.9
  h1 GPU-1                              336.000   3.000          0.9

Invoices against delivery
CSP  GRANT  INVOICED  BILLED  DELIVERED  DIFFERENCE
---  -----  --------  ------  ---------  ----------
kt   G-1    2026-04    9.000      8.500      +0.500
kt   total             9.000      8.500      +0.500

Card identity alarms (a card changed under its UUID, or not the granted model)
2026-04-01 00:00  card_model_mismatch  h1  GPU-0000000a…0001  G-1
  card GPU-0000000a-0000-4000-8000-000000000001 reports model \"NVIDIA A10\" but grant G-1 names \"H100 80GB\" and this
    sentence goes on long enough to be wrapped at the table width

Terms:
  Allocated: GPU-hours granted in the elapsed part of the period: each card's time in its grant, by the calendar,
    whatever was metered.
  Unmetered: Allocated time no signed record covers (agent down, records missing, failed reads).
  Unavailable: Metered allocated time in which the card was lost or failed (XID 79 and the like); the CSP's side of the
    SLA, credited in FOCUS.
  Delivered: Allocated − unmetered − unavailable: card-time proven delivered to the grantee, what the CSP is paid for.
  Active: Utilization-weighted grantee time: Σ window × GPU utilization × the grantee's share of it.
  Utilization (active ÷ allocated): A grant's, program's or CSP's utilization: active ÷ allocated × 100.
  Violations: Episodes of a process not of the card's grantee on a card (one per card, process and assignment), counted
    against the grant holding the card, or as unassigned when none did.
  Unassigned use: Time with processes on cards no grant held, per CSP and host; part of no grant or program.
  Times: Every time is Korea Standard Time (KST, UTC+9, Asia/Seoul); end dates are inclusive; figures are GPU-hours (one
    GPU for one hour).
(--wide shows occupied, idle, foreign and energy too, and whole GPU UUIDs)
";
        let got = reconciliation_table(&small(), false);
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn korean_table_snapshot_lines_up_wide_characters() {
        let mut r = small();
        r.unassigned.clear();
        r.invoices.clear();
        r.invoice_csps.clear();
        r.idle.grants.clear();
        r.programs.clear();
        r.csps.clear();
        let want = "\
정산 대조 2026-04: 2026-04-01 – 2026-04-30 (KST, Asia/Seoul)
단위: GPU시간. 모든 시각은 KST(Asia/Seoul), 종료일은 그날 포함.

과제별
과제 / GPU      CSP    배정  미계측   장애   제공  활성 사용  활용률(활성/배정 %)  위반(건)
--------------  ---  ------  ------  -----  -----  ---------  -------------------  --------
G-1 · 에이씨미  kt   10.000   1.000  0.500  8.500      3.000                 30.0         2
  h1 GPU-1           10.000   1.000  0.500  8.500      3.000                 30.0         2
합계                 10.000   1.000  0.500  8.500      3.000                 30.0         2

사업별
(없음)

클라우드 사업자(CSP)별
(없음)

미배정 GPU 사용
(없음)

유휴 과제 (최근 14일 2026-04-17 – 2026-04-30 KST 활용률 10% 미만) 및 회수 가능 GPU
(없음)

청구 대비 제공
(없음)

GPU 식별 경보 (같은 UUID의 카드가 바뀌었거나 과제가 지정한 모델이 아님)
2026-04-01 00:00  card_model_mismatch  h1  GPU-0000000a…0001  G-1
  card GPU-0000000a-0000-4000-8000-000000000001 reports model \"NVIDIA A10\" but grant G-1 names \"H100 80GB\" and this
    sentence goes on long enough to be wrapped at the table width

용어:
  배정: 기간 중 경과한 부분에서 과제에 배정된 GPU시간. 계측 여부와 관계없이 달력 기준으로 셉니다.
  미계측: 배정 시간 중 서명된 계측 기록이 없는 시간(에이전트 중단, 기록 누락, 측정 실패).
  장애: 계측된 배정 시간 중 GPU가 유실·고장 상태였던 시간(XID 79 등). CSP 책임 시간으로 FOCUS에서 크레딧으로 표시됩니다.
  제공: 배정 − 미계측 − 장애. 수혜기관에 제공된 것이 입증된 시간으로 CSP 정산의 기준입니다.
  활성 사용: 사용률 가중 시간: Σ 구간 × GPU 사용률 × 수혜기관 몫.
  활용률(활성 사용 ÷ 배정): 과제·사업·CSP 활용률: 활성 사용 ÷ 배정 × 100.
  위반(건): GPU에서 수혜기관이 아닌 프로세스가 적발된 건수(GPU·프로세스·배정별 1건). 과제가 보유한 GPU면 그 과제에,
    아니면 미배정으로 셉니다.
  미배정 사용: 어느 과제에도 배정되지 않은 GPU에서 프로세스가 실행된 시간(CSP·서버별). 과제·사업 합계에 포함되지
    않습니다.
  시각: 모든 시각은 한국 표준시(KST, UTC+9, Asia/Seoul)이고 종료일은 그날을 포함합니다. 시간 수치는 GPU시간(GPU 1장 ×
    1시간)입니다.
(--wide: 점유·유휴·타 사용자 사용·전력량 열과 전체 GPU UUID)
";
        let got = reconciliation_table(&r, true);
        assert_eq!(got, want, "\n{got}");
    }

    #[test]
    fn unattributed_time_gets_a_column_where_there_is_any() {
        let mut r = small();
        assert!(!reconciliation_table(&r, false).contains("UNATTRIBUTED"));
        r.grants[0].figures.unattributed_ms = H / 2;
        r.grants[0].figures.idle_ms -= H / 2;
        r.total = r.grants[0].figures;
        // Shown where any card had some, in the narrow table as in the wide one.
        let narrow = reconciliation_table(&r, false);
        assert!(narrow.contains("  ACTIVE  UNATTRIBUTED  "), "{narrow}");
        let got = reconciliation_table_width(&r, false, Width::Wide);
        let header = got.lines().find(|l| l.starts_with("GRANT / CARD")).unwrap();
        assert!(header.contains("  FOREIGN  UNATTRIBUTED  "), "{got}");
        let total = got.lines().find(|l| l.starts_with("total")).unwrap();
        assert!(total.contains("  0.500  "), "{got}");
        let v: serde_json::Value = serde_json::from_str(&reconciliation_json(&r).unwrap()).unwrap();
        assert_eq!(v["grants"][0]["unattributed_ms"], H / 2);
        assert_eq!(v["grants"][0]["unattributed_gpu_hours"], 0.5);
    }

    #[test]
    fn json_is_the_reports_own_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&reconciliation_json(&small()).unwrap()).unwrap();
        assert_eq!(v["grants"][0]["delivered_gpu_hours"], 8.5);
        assert_eq!(v["grants"][0]["utilization_pct"], 30.0);
        assert_eq!(v["grants"][0]["energy_kwh"], 2.0);
        assert_eq!(
            v["grants"][0]["cards"][0]["intervals"][0]["until_exclusive_ms"],
            v["until_exclusive_ms"]
        );
        assert_eq!(
            v["grants"][0]["valid_until_exclusive_ms"],
            v["until_exclusive_ms"]
        );
        assert_eq!(v["elapsed_until_exclusive_ms"], v["until_exclusive_ms"]);
        assert_eq!(v["all_violations"], 3);
        assert_eq!(v["not_elapsed"], serde_json::Value::Null);
        assert_eq!(v["invoices"][0]["difference_gpu_hours"], 0.5);
        assert_eq!(
            v["idle"]["grants"][0]["reclaimable_cards"][0]["gpu_uuid"],
            "GPU-1"
        );
    }
}

//! The spreadsheet CSV: the reconciliation's figures per grant, program, CSP and in total.
//!
//! Format: UTF-8 with a byte order mark (so that Excel reads Korean text as UTF-8 instead of
//! the system code page), RFC 4180 (fields holding a comma, a quote or a line break are
//! quoted, a quote is doubled), CRLF line ends, and a trailing CRLF. The columns are
//! [`CSV_COLUMNS`](super::CSV_COLUMNS): English snake_case names (the JSON report's names, for
//! tools) or Korean headers (for people). Rows: one `grant` row per grant, then one `program`
//! row per program, one `csp` row per CSP, and one `total` row; a column that does not apply to
//! a level is empty. Times are GPU-hours with 6 decimals (3.6 ms, finer than any sample
//! interval), utilization in percent with 2 decimals (empty when nothing was allocated),
//! energy in kWh with 3 decimals.
//!
//! Every cell goes through the one shared writer ([`super::csv_writer`]), which quotes it and
//! guards text a spreadsheet would run as a formula. Validity is shown as people read it: the
//! start day (or minute), and the *inclusive* last day (`valid_until_inclusive`: a grant to
//! 2026-12-31 reads `2026-12-31`, not the next midnight). Every time is KST.
//!
//! Once a provider is registered, one `fleet` row per CSP and program follows the total
//! (`crate::registry::fleet`): its card counts are in the six columns at the end
//! (`committed_cards` … `delivered_cards`), which are empty on every other row.
//!
//! After the data rows comes one `definition` row: under each column, what it means (the
//! glossary, [`super::glossary`]), so that the file explains itself when opened in Excel, and a
//! tool that filters rows by `level` skips it as it skips the totals.

use crate::reconcile::{Equivalent, Figures, KeyedEquivalent, Reconciliation, gpu_hours};

use super::csv_writer::CsvWriter;
use super::glossary;
use super::labels::CSV_COLUMNS;
use super::{Lang, kst_end_inclusive, kst_minute, kst_span, kst_start};

/// GPU-hours of `ms`, for a CSV or FOCUS cell.
pub(super) fn hours(ms: u64) -> String {
    format!("{:.6}", gpu_hours(ms))
}

/// The figure columns, in [`CSV_COLUMNS`] order.
fn figure_cells(f: &Figures) -> [String; 11] {
    [
        hours(f.allocated_ms),
        hours(f.unmetered_ms),
        hours(f.unavailable_ms),
        hours(f.delivered_ms),
        hours(f.occupied_ms),
        hours(f.active_ms),
        hours(f.idle_ms),
        hours(f.foreign_ms),
        f.utilization_pct()
            .map_or(String::new(), |u| format!("{u:.2}")),
        format!("{:.3}", f.energy_kwh()),
        f.violations.to_string(),
    ]
}

/// One row: the leading descriptive columns, the figures, unassigned use and violations, the
/// as-of columns, then the columns added later at the end (so the columns before them keep
/// their places): the unattributed time, the count of card identity alarms, and the figures
/// in GPU-equivalents.
fn row(
    head: [String; 11],
    f: &Figures,
    unassigned: Option<(u64, u64)>,
    as_of: &[String; 2],
    identity_alarms: usize,
    eq: &Equivalent,
) -> Vec<String> {
    let mut cells: Vec<String> = head.into();
    cells.extend(figure_cells(f));
    cells.push(unassigned.map_or(String::new(), |u| hours(u.0)));
    cells.push(unassigned.map_or(String::new(), |u| u.1.to_string()));
    cells.extend(as_of.iter().cloned());
    cells.push(hours(f.unattributed_ms));
    cells.push(identity_alarms.to_string());
    cells.push(format!("{:.6}", eq.gpus));
    for h in [
        eq.allocated_gpu_hours,
        eq.delivered_gpu_hours,
        eq.active_gpu_hours,
    ] {
        cells.push(format!("{h:.6}"));
    }
    // The fleet columns: filled on `fleet` rows only.
    cells.extend(std::iter::repeat_n(String::new(), FLEET_COLUMNS));
    cells
}

/// The fleet columns at the end of [`CSV_COLUMNS`], and the GPU-equivalent ones before them.
const FLEET_COLUMNS: usize = 6;
const EQ_COLUMNS: usize = 4;

/// A `fleet` row (one per CSP and program, [`crate::registry::FleetRow`]): CSP and program,
/// the as-of columns and the card counts; the figure columns are empty.
fn fleet_row(
    f: &crate::registry::FleetRow,
    period: &str,
    as_of: &[String; 2],
    ko: bool,
) -> Vec<String> {
    let mut cells = vec![
        if ko { "공급 현황" } else { "fleet" }.to_owned(),
        period.to_owned(),
        f.program.clone(),
        f.csp.clone(),
    ];
    cells.resize(
        CSV_COLUMNS.len() - FLEET_COLUMNS - EQ_COLUMNS - 4,
        String::new(),
    );
    cells.extend(as_of.iter().cloned());
    // Unattributed time, identity alarms and the GPU-equivalents: empty here.
    cells.extend(std::iter::repeat_n(String::new(), 2 + EQ_COLUMNS));
    cells.extend(
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
    cells
}

/// The GPU-equivalent figures of the grant, program or CSP `key` in `of`.
fn eq_of<'a>(of: &'a [KeyedEquivalent], key: &str) -> &'a Equivalent {
    static NONE: Equivalent = Equivalent {
        gpus: 0.0,
        allocated_gpu_hours: 0.0,
        delivered_gpu_hours: 0.0,
        active_gpu_hours: 0.0,
    };
    of.iter()
        .find(|k| k.key == key)
        .map_or(&NONE, |k| &k.figures)
}

/// How many of the report's card identity alarms are on a card of a grant `holds` accepts, or
/// (with `unassigned_on`) on a card without a grant on a host it accepts.
fn identity_count(
    r: &Reconciliation,
    holds: impl Fn(&crate::reconcile::GrantRow) -> bool,
    unassigned_on: impl Fn(&str) -> bool,
) -> usize {
    r.card_alarms
        .iter()
        .filter(|a| {
            if a.grant_ids.is_empty() {
                unassigned_on(&a.host_id)
            } else {
                r.grants
                    .iter()
                    .any(|g| a.grant_ids.contains(&g.grant_id) && holds(g))
            }
        })
        .count()
}

/// The `definition` row: what each column means, in `lang`.
fn definitions(lang: Lang, level: &str) -> Vec<String> {
    let def =
        |key: &str| glossary::term(key).map_or(String::new(), |t| t.definition(lang).to_owned());
    let ko = lang == Lang::Ko;
    let own = |en: &str, k: &str| if ko { k.to_owned() } else { en.to_owned() };
    CSV_COLUMNS
        .iter()
        .map(|(col, _)| match *col {
            "level" => level.to_owned(),
            "valid_from" => own(
                "First day of the grant (KST); a minute when it starts within a day",
                "과제 시작일(KST). 하루 중간에 시작하면 시각까지 표시",
            ),
            "valid_until_inclusive" => own(
                "Last day of the grant, inclusive (KST); a minute when it ends within a day",
                "과제 종료일(KST, 그날 포함). 하루 중간에 끝나면 종료 시각",
            ),
            "unassigned_use_gpu_hours" => def("unassigned_use"),
            "unassigned_violations" => own(
                "Violations on cards while no grant held them",
                "어느 과제에도 배정되지 않은 GPU에서의 위반 건수",
            ),
            "as_of" => own(
                "The figures cover the period up to this minute (KST)",
                "수치가 반영한 기간의 끝(KST)",
            ),
            "not_elapsed" => def("not_elapsed"),
            "card_identity_alarms" => def("identity_alarms"),
            "gpu_equivalents" => def("gpu_equivalents"),
            "allocated_gpu_equivalent_hours" => own(
                "Allocated GPU-hours × each card's GPU-equivalents",
                "배정 GPU시간 × GPU별 환산 계수",
            ),
            "delivered_gpu_equivalent_hours" => own(
                "Delivered GPU-hours × each card's GPU-equivalents",
                "제공 GPU시간 × GPU별 환산 계수",
            ),
            "active_gpu_equivalent_hours" => own(
                "Active GPU-hours × each card's GPU-equivalents",
                "활성 사용 GPU시간 × GPU별 환산 계수",
            ),
            c @ ("committed_cards" | "registered_hosts" | "registered_cards" | "healthy_cards"
            | "granted_cards" | "delivered_cards") => {
                crate::registry::fleet_definition(c, ko).to_owned()
            }
            c if c.ends_with("_gpu_hours") => def(&c.replace("_gpu_hours", "")),
            c => def(c),
        })
        .collect()
}

pub(super) fn render(r: &Reconciliation, lang: Lang) -> String {
    let l = lang.labels();
    let mut out = CsvWriter::new(true);
    let header: Vec<&str> = CSV_COLUMNS
        .iter()
        .map(|(en, ko)| if lang == Lang::Ko { *ko } else { *en })
        .collect();
    out.record(&header);
    let period = r.period.clone();
    let none = String::new;
    let as_of = [
        kst_minute(r.elapsed_until_ms),
        r.not_elapsed
            .map_or(String::new(), |n| kst_span(n.from_ms, n.until_ms)),
    ];
    for g in &r.grants {
        let head = [
            l.level_grant.to_owned(),
            period.clone(),
            g.program.clone(),
            g.csp.clone(),
            g.grant_id.clone(),
            g.grantee.clone(),
            g.principal.clone(),
            none(),
            g.cards.len().to_string(),
            kst_start(g.valid_from_ms),
            kst_end_inclusive(g.valid_until_ms),
        ];
        let n = identity_count(r, |h| h.grant_id == g.grant_id, |_| false);
        let eq = eq_of(&r.gpu_equivalents.grants, &g.grant_id);
        out.record(&row(head, &g.figures, None, &as_of, n, eq));
    }
    for p in &r.programs {
        let head = [
            l.level_program.to_owned(),
            period.clone(),
            p.program.clone(),
            none(),
            none(),
            none(),
            none(),
            p.grants.to_string(),
            p.cards.to_string(),
            none(),
            none(),
        ];
        let n = identity_count(r, |g| g.program == p.program, |_| false);
        let eq = eq_of(&r.gpu_equivalents.programs, &p.program);
        out.record(&row(head, &p.figures, None, &as_of, n, eq));
    }
    for c in &r.csps {
        let head = [
            l.level_csp.to_owned(),
            period.clone(),
            none(),
            c.csp.clone(),
            none(),
            none(),
            none(),
            c.grants.to_string(),
            c.cards.to_string(),
            none(),
            none(),
        ];
        let n = identity_count(
            r,
            |g| g.csp == c.csp,
            |host| {
                r.unassigned
                    .iter()
                    .any(|u| u.csp == c.csp && u.host_id == host)
            },
        );
        out.record(&row(
            head,
            &c.figures,
            Some((c.unassigned_use_ms, c.unassigned_violations)),
            &as_of,
            n,
            eq_of(&r.gpu_equivalents.csps, &c.csp),
        ));
    }
    let cards: usize = r.grants.iter().map(|g| g.cards.len()).sum();
    let unassigned: u64 = r.unassigned.iter().map(|u| u.unassigned_use_ms).sum();
    let head = [
        l.level_total.to_owned(),
        period,
        r.program.clone().unwrap_or_default(),
        none(),
        r.grant_id.clone().unwrap_or_default(),
        none(),
        none(),
        r.grants.len().to_string(),
        cards.to_string(),
        none(),
        none(),
    ];
    out.record(&row(
        head,
        &r.total,
        Some((unassigned, r.unassigned_violations)),
        &as_of,
        r.card_alarms.len(),
        &r.gpu_equivalents.total,
    ));
    for f in &r.fleet {
        out.record(&fleet_row(f, &r.period, &as_of, lang == Lang::Ko));
    }
    out.record(&definitions(lang, l.level_definition));
    out.finish()
}

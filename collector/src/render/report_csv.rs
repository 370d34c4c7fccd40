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
//! energy in kWh with 3 decimals. Validity bounds are RFC 3339 in KST; `valid_until` is
//! exclusive.
//!
//! Text that a spreadsheet would run as a formula (a cell starting with `=`, `+`, `-`, `@`, a
//! tab or a carriage return: grantee names are user input) gets a leading `'`, the usual guard
//! against CSV formula injection; no other text is changed.

use crate::reconcile::{Figures, Reconciliation, gpu_hours};

use super::labels::CSV_COLUMNS;
use super::{Lang, kst_rfc3339};

/// UTF-8 byte order mark.
pub(super) const BOM: &str = "\u{feff}";

/// `field` as an RFC 4180 field: quoted when it holds a comma, quote or line break.
pub(super) fn quote(field: &str) -> String {
    if field.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_owned()
    }
}

/// Appends one CRLF-terminated record.
pub(super) fn push_record<S: AsRef<str>>(out: &mut String, fields: &[S]) {
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&quote(f.as_ref()));
    }
    out.push_str("\r\n");
}

/// User text, guarded against being run as a spreadsheet formula.
fn text(s: &str) -> String {
    if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    }
}

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

/// One row: the leading descriptive columns, then the figures, then unassigned use, then the
/// unattributed time (last, so the columns before it keep their places).
fn row(head: [String; 11], f: &Figures, unassigned: Option<u64>) -> Vec<String> {
    let mut cells: Vec<String> = head.into();
    cells.extend(figure_cells(f));
    cells.push(unassigned.map_or(String::new(), hours));
    cells.push(hours(f.unattributed_ms));
    cells
}

pub(super) fn render(r: &Reconciliation, lang: Lang) -> String {
    let l = lang.labels();
    let mut out = String::from(BOM);
    let header: Vec<&str> = CSV_COLUMNS
        .iter()
        .map(|(en, ko)| if lang == Lang::Ko { *ko } else { *en })
        .collect();
    push_record(&mut out, &header);
    let period = text(&r.period);
    let none = String::new;
    for g in &r.grants {
        let head = [
            l.level_grant.to_owned(),
            period.clone(),
            text(&g.program),
            text(&g.csp),
            text(&g.grant_id),
            text(&g.grantee),
            text(&g.principal),
            none(),
            g.cards.len().to_string(),
            kst_rfc3339(g.valid_from_ms),
            kst_rfc3339(g.valid_until_ms),
        ];
        push_record(&mut out, &row(head, &g.figures, None));
    }
    for p in &r.programs {
        let head = [
            l.level_program.to_owned(),
            period.clone(),
            text(&p.program),
            none(),
            none(),
            none(),
            none(),
            p.grants.to_string(),
            p.cards.to_string(),
            none(),
            none(),
        ];
        push_record(&mut out, &row(head, &p.figures, None));
    }
    for c in &r.csps {
        let head = [
            l.level_csp.to_owned(),
            period.clone(),
            none(),
            text(&c.csp),
            none(),
            none(),
            none(),
            c.grants.to_string(),
            c.cards.to_string(),
            none(),
            none(),
        ];
        push_record(&mut out, &row(head, &c.figures, Some(c.unassigned_use_ms)));
    }
    let cards: usize = r.grants.iter().map(|g| g.cards.len()).sum();
    let unassigned: u64 = r.unassigned.iter().map(|u| u.unassigned_use_ms).sum();
    let head = [
        l.level_total.to_owned(),
        period,
        r.program.as_deref().map_or(String::new(), text),
        none(),
        r.grant_id.as_deref().map_or(String::new(), text),
        none(),
        none(),
        r.grants.len().to_string(),
        cards.to_string(),
        none(),
        none(),
    ];
    push_record(&mut out, &row(head, &r.total, Some(unassigned)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_follows_rfc_4180() {
        assert_eq!(quote("plain"), "plain");
        assert_eq!(quote("a,b"), "\"a,b\"");
        assert_eq!(quote("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(quote("two\nlines"), "\"two\nlines\"");
        assert_eq!(quote("한국어"), "한국어");
        let mut out = String::new();
        push_record(&mut out, &["x", "y,z", ""]);
        assert_eq!(out, "x,\"y,z\",\r\n");
    }

    #[test]
    fn formulas_are_guarded_and_other_text_is_not() {
        assert_eq!(text("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(text("+1"), "'+1");
        assert_eq!(text("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(text("한국대학교, 연구소"), "한국대학교, 연구소");
        assert_eq!(text("a-b"), "a-b");
    }
}

//! CSP invoices and the validation of an invoice CSV import (pure: no I/O, no clock).
//!
//! File format: UTF-8 CSV, one row per grant and month, with this exact header line:
//!
//! ```text
//! csp,grant_id,period,billed_gpu_hours
//! ```
//!
//! - A byte order mark at the start is skipped; LF and CRLF line ends are accepted; blank lines
//!   are ignored; a field may be quoted (`""` for a quote, no line breaks inside). Spaces
//!   around a value are dropped.
//! - `period` is a Korean calendar month `YYYY-MM`; `billed_gpu_hours` a decimal number ≥ 0.
//! - `grant_id` must name a grant the collector holds, and `csp` must be that grant's CSP.
//! - A (csp, grant_id, period) appears once in a file. Importing it again later supersedes the
//!   earlier invoice (both are kept; the latest counts).
//!
//! An import is all or nothing, and every problem names its 1-based line and the field.

use std::collections::HashMap;

use crate::grants::{Grant, ImportProblem};
use crate::store::Invoice;

/// The header line of an invoice file, column by column.
pub const COLUMNS: [&str; 4] = ["csp", "grant_id", "period", "billed_gpu_hours"];

fn problem(line: u32, field: &str, message: impl Into<String>) -> ImportProblem {
    ImportProblem {
        line,
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Whether `s` is a month `YYYY-MM`.
fn is_month(s: &str) -> bool {
    s.len() == 7
        && s.as_bytes()[4] == b'-'
        && chrono::NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").is_ok()
}

/// Validates an invoice file against the grants held. Either every row is good and the
/// invoices come back in file order, or every problem found comes back.
pub fn parse_invoices_csv(
    text: &str,
    grants: &[Grant],
) -> Result<Vec<Invoice>, Vec<ImportProblem>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let by_id: HashMap<&str, &Grant> = grants.iter().map(|g| (g.grant_id.as_str(), g)).collect();
    let mut problems = Vec::new();
    let mut invoices = Vec::new();
    let mut seen: HashMap<(String, String, String), u32> = HashMap::new();
    let mut header_seen = false;
    for raw in crate::csv::split_csv(text) {
        if raw.is_blank() {
            continue;
        }
        let line = raw.line;
        let fields = match raw.body {
            Ok(f) => f,
            Err(fault) => {
                let field = if header_seen {
                    COLUMNS.get(fault.column).copied().unwrap_or("row")
                } else {
                    "header"
                };
                problems.push(problem(line, field, fault.message));
                header_seen = true;
                continue;
            }
        };
        let fields: Vec<&str> = fields.iter().map(|f| f.trim()).collect();
        if !header_seen {
            header_seen = true;
            if fields != COLUMNS {
                problems.push(problem(
                    line,
                    "header",
                    format!("expected the header {:?}", COLUMNS.join(",")),
                ));
            }
            continue;
        }
        if fields.len() != COLUMNS.len() {
            problems.push(problem(
                line,
                "row",
                format!("{} fields, expected {}", fields.len(), COLUMNS.len()),
            ));
            continue;
        }
        let (csp, grant_id, period, billed) = (fields[0], fields[1], fields[2], fields[3]);
        let before = problems.len();
        for (name, value) in COLUMNS.iter().zip(&fields) {
            if value.is_empty() {
                problems.push(problem(line, name, "required field is empty"));
            }
        }
        if !grant_id.is_empty() {
            match by_id.get(grant_id) {
                None => problems.push(problem(
                    line,
                    "grant_id",
                    format!("unknown grant {grant_id:?}"),
                )),
                Some(g) if !csp.is_empty() && g.csp != csp => problems.push(problem(
                    line,
                    "csp",
                    format!("grant {grant_id} is with CSP {:?}, not {csp:?}", g.csp),
                )),
                Some(_) => {}
            }
        }
        if !period.is_empty() && !is_month(period) {
            problems.push(problem(
                line,
                "period",
                format!("bad month {period:?}: expected YYYY-MM (a Korean calendar month)"),
            ));
        }
        let hours = match billed.parse::<f64>() {
            Ok(h) if h.is_finite() && h >= 0.0 => Some(h),
            _ if billed.is_empty() => None,
            _ => {
                problems.push(problem(
                    line,
                    "billed_gpu_hours",
                    format!(
                        "bad number {billed:?}: expected a decimal number of GPU-hours, 0 or more"
                    ),
                ));
                None
            }
        };
        if problems.len() > before {
            continue;
        }
        let key = (csp.to_owned(), grant_id.to_owned(), period.to_owned());
        if let Some(first) = seen.get(&key) {
            problems.push(problem(
                line,
                "row",
                format!("invoice for {grant_id} in {period} already given on line {first}"),
            ));
            continue;
        }
        seen.insert(key, line);
        invoices.push(Invoice {
            csp: csp.to_owned(),
            grant_id: grant_id.to_owned(),
            period: period.to_owned(),
            billed_gpu_hours: hours.unwrap_or(0.0),
            line,
        });
    }
    if !header_seen {
        problems.push(problem(1, "header", "the file is empty"));
    }
    if problems.is_empty() {
        Ok(invoices)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::{GrantCard, Program};

    fn grant(id: &str, csp: &str) -> Grant {
        Grant {
            grant_id: id.into(),
            program: Program::Hpc,
            grantee: "Acme".into(),
            principal: "user:alice".parse().unwrap(),
            csp: csp.into(),
            valid_from_ms: 0,
            valid_until_ms: 1,
            cards: vec![GrantCard::new("h1", "GPU-x")],
            revoked_at_ms: None,
        }
    }

    #[test]
    fn a_good_file_parses_with_bom_crlf_quotes_and_blank_lines() {
        let text = "\u{feff}csp,grant_id,period,billed_gpu_hours\r\nkt,G1,2026-04,\"1,5\"\r\n\r\n";
        // "1,5" is not a number: the quoted comma stays inside the field.
        let e = parse_invoices_csv(text, &[grant("G1", "kt")]).unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].line, e[0].field.as_str()), (2, "billed_gpu_hours"));

        let text =
            "csp,grant_id,period,billed_gpu_hours\r\nkt, G1 ,2026-04,720.5\n\"nhn\",G2,2026-05,0\n";
        let got = parse_invoices_csv(text, &[grant("G1", "kt"), grant("G2", "nhn")]).unwrap();
        assert_eq!(
            got,
            vec![
                Invoice {
                    csp: "kt".into(),
                    grant_id: "G1".into(),
                    period: "2026-04".into(),
                    billed_gpu_hours: 720.5,
                    line: 2,
                },
                Invoice {
                    csp: "nhn".into(),
                    grant_id: "G2".into(),
                    period: "2026-05".into(),
                    billed_gpu_hours: 0.0,
                    line: 3,
                },
            ]
        );
    }

    #[test]
    fn every_problem_is_named_by_line_and_field_and_nothing_passes() {
        let text = "csp,grant_id,period,billed_gpu_hours\n\
                    kt,G1,2026-04,10\n\
                    kt,NOPE,2026-04,10\n\
                    nhn,G1,2026-04,10\n\
                    kt,G1,2026-13,10\n\
                    kt,G1,2026-05,-1\n\
                    kt,G1,2026-05,lots\n\
                    kt,G1,2026-04,11\n\
                    ,G1,2026-06,1\n\
                    kt,G1\n\
                    kt,G\"1,2026-07,1\n";
        let e = parse_invoices_csv(text, &[grant("G1", "kt")]).unwrap_err();
        let got: Vec<(u32, &str)> = e.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            got,
            vec![
                (3, "grant_id"),
                (4, "csp"),
                (5, "period"),
                (6, "billed_gpu_hours"),
                (7, "billed_gpu_hours"),
                (8, "row"),
                (9, "csp"),
                (10, "row"),
                (11, "grant_id"),
            ]
        );
        assert!(e[0].message.contains("unknown grant \"NOPE\""), "{}", e[0]);
        assert!(e[5].message.contains("line 2"), "{}", e[5]);

        let e = parse_invoices_csv("grant,csp\n", &[]).unwrap_err();
        assert_eq!((e[0].line, e[0].field.as_str()), (1, "header"));
        let e = parse_invoices_csv("", &[]).unwrap_err();
        assert_eq!(e[0].field, "header");
    }
}

//! Trends: month-by-month figures per program, CSP, grant, grantee and principal, from one
//! reconciliation per Korean calendar month (`report --trend 2026-04..2026-09`).
//!
//! Rules. Each month is reconciled on its own, by the engine's rules (`crate::reconcile`), as
//! of the same instant, so a month still in progress counts only what has elapsed of it and a
//! month not begun counts nothing. A month's row for a key (a program, CSP, grant, grantee or
//! principal) sums the grants of that key in that month; a key without any grant in a month
//! has no row for it (no figure is invented). Grantee and principal rollups sum grants by
//! their grantee name and their principal text as imported. Utilization is active ÷
//! allocated, as everywhere.

use std::collections::BTreeMap;

use chrono::Datelike;
use serde::Serialize;

use crate::reconcile::{Figures, Reconciliation};
use crate::report::PeriodError;

/// The most months one trend spans.
pub const MAX_MONTHS: usize = 36;

/// What a trend row sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Program,
    Csp,
    Grant,
    Grantee,
    Principal,
}

impl Level {
    pub const ALL: [Level; 5] = [
        Level::Program,
        Level::Csp,
        Level::Grant,
        Level::Grantee,
        Level::Principal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Program => "program",
            Level::Csp => "csp",
            Level::Grant => "grant",
            Level::Grantee => "grantee",
            Level::Principal => "principal",
        }
    }
}

/// One key's figures in one month.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrendRow {
    pub level: Level,
    pub key: String,
    /// `YYYY-MM` (Korean calendar).
    pub month: String,
    pub grants: u32,
    #[serde(flatten)]
    pub figures: Figures,
}

/// A trend: its months and rows (by level, key, month).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trend {
    pub months: Vec<String>,
    /// The instant every month was reconciled as of (Unix ms).
    pub as_of_ms: i64,
    pub time_zone: String,
    pub program: Option<String>,
    pub rows: Vec<TrendRow>,
}

/// The months of `FROM..UNTIL` (`2026-04..2026-09`, both `YYYY-MM`, both included).
pub fn months(spec: &str) -> Result<Vec<String>, PeriodError> {
    let err = |reason: &str| PeriodError {
        value: spec.to_owned(),
        reason: reason.to_owned(),
    };
    let (a, b) = spec
        .trim()
        .split_once("..")
        .ok_or_else(|| err("a trend is FROM..UNTIL in months, e.g. 2026-04..2026-09"))?;
    let parse = |m: &str| {
        chrono::NaiveDate::parse_from_str(&format!("{}-01", m.trim()), "%Y-%m-%d")
            .ok()
            .filter(|_| m.trim().len() == 7)
    };
    let (mut d, end) = (
        parse(a).ok_or_else(|| err("bad first month"))?,
        parse(b).ok_or_else(|| err("bad last month"))?,
    );
    if end < d {
        return Err(err("last month is before the first"));
    }
    let mut out = Vec::new();
    while d <= end {
        if out.len() == MAX_MONTHS {
            return Err(err("longer than 36 months"));
        }
        out.push(format!("{:04}-{:02}", d.year(), d.month()));
        d = d
            .checked_add_months(chrono::Months::new(1))
            .ok_or_else(|| err("bad month"))?;
    }
    Ok(out)
}

/// The trend of month-by-month reconciliations (each one's `period` its month).
pub fn build(reports: &[Reconciliation], as_of_ms: i64) -> Trend {
    let mut sums: BTreeMap<(Level, String, String), (u32, Figures)> = BTreeMap::new();
    for r in reports {
        for g in &r.grants {
            for (level, key) in [
                (Level::Program, &g.program),
                (Level::Csp, &g.csp),
                (Level::Grant, &g.grant_id),
                (Level::Grantee, &g.grantee),
                (Level::Principal, &g.principal),
            ] {
                let e = sums
                    .entry((level, key.clone(), r.period.clone()))
                    .or_default();
                e.0 += 1;
                e.1.add(&g.figures);
            }
        }
    }
    Trend {
        months: reports.iter().map(|r| r.period.clone()).collect(),
        as_of_ms,
        time_zone: crate::reconcile::TIME_ZONE.to_owned(),
        program: reports.first().and_then(|r| r.program.clone()),
        rows: sums
            .into_iter()
            .map(|((level, key, month), (grants, figures))| TrendRow {
                level,
                key,
                month,
                grants,
                figures,
            })
            .collect(),
    }
}

impl Trend {
    /// One level's keys, each with its value per month (`None`: no grant that month).
    pub fn series(
        &self,
        level: Level,
        value: impl Fn(&Figures) -> Option<f64>,
    ) -> Vec<(String, Vec<Option<f64>>)> {
        let mut by_key: BTreeMap<&str, Vec<Option<f64>>> = BTreeMap::new();
        for r in self.rows.iter().filter(|r| r.level == level) {
            let v = by_key
                .entry(r.key.as_str())
                .or_insert_with(|| vec![None; self.months.len()]);
            if let Some(i) = self.months.iter().position(|m| *m == r.month) {
                v[i] = value(&r.figures);
            }
        }
        by_key.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

/// The JSON rendering.
pub fn json(t: &Trend) -> Result<String, serde_json::Error> {
    Ok(serde_json::to_string_pretty(t)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{CardRow, GrantRow};

    #[test]
    fn months_are_listed_inclusive_and_bounded() {
        assert_eq!(
            months("2026-11..2027-02").unwrap(),
            ["2026-11", "2026-12", "2027-01", "2027-02"]
        );
        assert_eq!(months("2026-04..2026-04").unwrap(), ["2026-04"]);
        assert!(months("2026-09..2026-04").is_err());
        assert!(months("2026-04").is_err());
        assert!(months("2026-4..2026-09").is_err());
        assert!(
            months("2020-01..2026-01")
                .unwrap_err()
                .to_string()
                .contains("36")
        );
    }

    fn report(month: &str, grants: &[(&str, &str, &str, u64, u64)]) -> Reconciliation {
        let mut r = crate::reconcile::reconcile(&crate::reconcile::Inputs {
            period: month,
            from_ms: 0,
            until_ms: 1,
            program: None,
            grant_id: None,
            grants: &[],
            windows: &[],
            events: &[],
            invoices: &[],
            idle: crate::reconcile::IdleSettings {
                threshold_pct: 10.0,
                days: 1,
                as_of_ms: 1,
            },
        });
        r.grants = grants
            .iter()
            .map(|(id, program, grantee, allocated, active)| {
                let figures = Figures {
                    allocated_ms: *allocated,
                    delivered_ms: *allocated,
                    active_ms: *active,
                    occupied_ms: *active,
                    idle_ms: allocated - active,
                    ..Figures::default()
                };
                GrantRow {
                    grant_id: (*id).into(),
                    program: (*program).into(),
                    grantee: (*grantee).into(),
                    principal: format!("user:{grantee}"),
                    csp: "kt".into(),
                    valid_from_ms: 0,
                    valid_until_ms: 1,
                    revoked_at_ms: None,
                    cards: vec![CardRow {
                        host_id: "h".into(),
                        gpu_uuid: "GPU-1".into(),
                        intervals: vec![],
                        figures,
                    }],
                    figures,
                }
            })
            .collect();
        r
    }

    #[test]
    fn rows_sum_grants_per_level_key_and_month() {
        let t = build(
            &[
                report(
                    "2026-04",
                    &[("G1", "hpc", "a", 100, 10), ("G2", "hpc", "a", 100, 30)],
                ),
                report("2026-05", &[("G1", "hpc", "a", 100, 50)]),
            ],
            7,
        );
        assert_eq!(t.months, ["2026-04", "2026-05"]);
        let row = |level, key: &str, month: &str| {
            t.rows
                .iter()
                .find(|r| r.level == level && r.key == key && r.month == month)
                .cloned()
        };
        let hpc = row(Level::Program, "hpc", "2026-04").unwrap();
        assert_eq!(
            (hpc.grants, hpc.figures.allocated_ms, hpc.figures.active_ms),
            (2, 200, 40)
        );
        assert_eq!(
            row(Level::Grantee, "a", "2026-04")
                .unwrap()
                .figures
                .active_ms,
            40
        );
        assert_eq!(
            row(Level::Principal, "user:a", "2026-05").unwrap().grants,
            1
        );
        assert!(
            row(Level::Grant, "G2", "2026-05").is_none(),
            "no invented months"
        );
        let util = t.series(Level::Grant, Figures::utilization_pct);
        assert_eq!(util[1], ("G2".to_owned(), vec![Some(30.0), None]));
        assert_eq!(util[0].1, vec![Some(10.0), Some(50.0)]);
        let v: serde_json::Value = serde_json::from_str(&json(&t).unwrap()).unwrap();
        assert_eq!(v["rows"][0]["level"], "program");
        assert_eq!(v["rows"][0]["utilization_pct"], 20.0);
    }
}

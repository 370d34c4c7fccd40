//! Usage reports: periods in Korean calendar terms, and the table and JSON renderings.

use chrono::{Datelike, FixedOffset, NaiveDate, TimeZone};
use gpumeter_proto::v1;
use serde::Serialize;

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

/// Renders rows as an aligned text table.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    out.push('\n');
    out.push_str(&line(w.iter().map(|n| "-".repeat(*n)).collect()));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

/// The terminal rendering: cards, then tenants.
pub fn usage_table(r: &UsageJson) -> String {
    let period = |ms: i64| {
        kst()
            .timestamp_millis_opt(ms)
            .single()
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default()
    };
    let mut out = format!(
        "Usage {} .. {} (KST)\n\nCards\n",
        period(r.from_unix_ms),
        period(r.until_unix_ms)
    );
    let rows: Vec<Vec<String>> = r
        .cards
        .iter()
        .map(|c| {
            vec![
                c.host_id.clone(),
                c.gpu_uuid.clone(),
                c.csp.clone(),
                format!("{:.3}", c.metered_hours),
                format!("{:.3}", c.occupied_hours),
                format!("{:.3}", c.active_hours),
                fmt_opt(c.util_avg_pct),
                format!("{:.3}", c.energy_kwh),
                format!("{:.3}", hours(c.foreign_ms)),
                format!("{:.3}", hours(c.unavailable_ms)),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "HOST",
            "GPU",
            "CSP",
            "METERED_H",
            "OCCUPIED_H",
            "ACTIVE_H",
            "UTIL_%",
            "ENERGY_KWH",
            "FOREIGN_H",
            "UNAVAIL_H",
        ],
        &rows,
    ));
    out.push_str("\nTenants\n");
    let rows: Vec<Vec<String>> = r
        .tenants
        .iter()
        .map(|t| {
            vec![
                t.host_id.clone(),
                t.gpu_uuid.clone(),
                t.principal.clone(),
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
    out.push_str(&table(
        &[
            "HOST",
            "GPU",
            "PRINCIPAL",
            "GRANT",
            "MATCHES",
            "OCCUPIED_H",
            "ACTIVE_H",
            "UTIL_%",
        ],
        &rows,
    ));
    out
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

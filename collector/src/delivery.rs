//! `serve --reports-dir DIR`: each closed month's reports, written once, without being asked.
//!
//! Format. `DIR/YYYY-MM/` holds, for the Korean calendar month `YYYY-MM`:
//! `report.{ko,en}.txt` (the terminal table), `report.{ko,en}.json`, `report.{ko,en}.csv`,
//! `report.{ko,en}.html`, `focus.csv` (FOCUS has no language), each the file `report --out`
//! writes — with its provenance line, signed by the collector, so `verify-report` checks it —
//! and `idle-notice.{ko,en}.txt`, the month's idle grants for the reclaim review (the idle
//! rule's defaults: under 10 % over the last 14 days of the month).
//!
//! Rules:
//! - Which months: from the Korean month of the earliest grant start held to the last month
//!   that has ended in Korea (KST) at `now`; a month is closed once its last day has ended in
//!   Asia/Seoul. With no grant nothing is written (a report without grants has no figures).
//!   At most [`MAX_MONTHS`] months back from the last closed one.
//! - Nothing is written twice: a file that exists is never rewritten, and each file is
//!   written to a temporary name in the same folder, synced, then renamed into place, so a
//!   crash leaves either the whole file or none (a stray `.tmp-*` is overwritten next time).
//! - A restart catches up: every pass looks at every month in the range and writes only the
//!   files missing, so months the collector was down for are written when it is back.
//! - A month's reports are computed once per pass (all files from one head); a month whose
//!   files all exist costs a directory listing, not a report.
//! - Reports are as of the head signed when they are computed: records that arrive for a
//!   closed month after its files were written are in the ledger (and in a report asked for
//!   later) but not in these files, which name the head they were computed from.

use std::path::{Path, PathBuf};

use chrono::{Datelike, TimeZone};
use gpumeter_proto::v1;

use crate::store::Store;

/// How far back a pass looks (months before the last closed one).
pub const MAX_MONTHS: usize = 36;

/// The report files of a month: (file name, format, language).
pub const FILES: [(&str, &str, &str); 9] = [
    ("report.ko.txt", "table", "ko"),
    ("report.en.txt", "table", "en"),
    ("report.ko.json", "json", "ko"),
    ("report.en.json", "json", "en"),
    ("report.ko.csv", "csv", "ko"),
    ("report.en.csv", "csv", "en"),
    ("report.ko.html", "html", "ko"),
    ("report.en.html", "html", "en"),
    ("focus.csv", "focus", "en"),
];

/// The idle-grants notices of a month: (file name, language).
pub const NOTICES: [(&str, &str); 2] = [("idle-notice.ko.txt", "ko"), ("idle-notice.en.txt", "en")];

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("reports dir {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("report {month}: {reason}")]
    Report { month: String, reason: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What one pass wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    /// Files written, in order.
    pub written: Vec<PathBuf>,
    /// Months whose files all existed already.
    pub complete: Vec<String>,
}

/// The Korean month (`YYYY-MM`) an instant falls in.
pub fn kst_month(ms: i64) -> String {
    let t = crate::report::kst()
        .timestamp_millis_opt(ms)
        .single()
        .unwrap_or_else(|| crate::report::kst().timestamp_opt(0, 0).unwrap());
    format!("{:04}-{:02}", t.year(), t.month())
}

/// The months from the one `first_ms` falls in to the last one that ended at or before
/// `now_ms` (Korean calendar), at most [`MAX_MONTHS`] of them, the latest last.
pub fn closed_months(first_ms: i64, now_ms: i64) -> Vec<String> {
    let mut months = Vec::new();
    let mut month = kst_month(first_ms);
    while let Ok((_, until)) = crate::report::parse_period(&month) {
        if until > now_ms {
            break;
        }
        months.push(month);
        month = kst_month(until);
    }
    let skip = months.len().saturating_sub(MAX_MONTHS);
    months.split_off(skip)
}

fn io(path: &Path, e: std::io::Error) -> DeliveryError {
    DeliveryError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Writes `content` to `path` unless it exists: a temporary file in the same folder, synced,
/// then renamed into place. `Ok(false)`: it existed.
pub fn write_once(path: &Path, content: &str) -> Result<bool, DeliveryError> {
    if path.exists() {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
        f.write_all(content.as_bytes()).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    // The rename is durable once the folder is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(true)
}

/// The file a report of `format` in `lang` is as `report --out` writes it: the rendered
/// content with its provenance line, signed by the collector.
fn report_file(
    store: &dyn Store,
    q: &v1::ReconcileRequest,
    computed: &(
        crate::reconcile::Reconciliation,
        Vec<crate::render::CardDay>,
        crate::heads::SignedHead,
    ),
    format: &str,
    lang: &str,
) -> Result<String, DeliveryError> {
    let (rec, days, head) = computed;
    let failed = |reason: String| DeliveryError::Report {
        month: q.period.clone(),
        reason,
    };
    let content = crate::provenance::render(rec, days, format, lang == "ko")
        .map_err(|e| failed(e.to_string()))?;
    let mut p = crate::query::provenance_of(q, head, format, lang, &content);
    let (sig, key) = store.collector_sign(&p.signed_message())?;
    p.signature = hex::encode(sig);
    p.collector_key = hex::encode(key);
    Ok(crate::provenance::embed(&content, &p))
}

/// Writes the files of `month` that are missing; returns those written.
pub fn write_month(
    store: &dyn Store,
    dir: &Path,
    month: &str,
) -> Result<Vec<PathBuf>, DeliveryError> {
    let folder = dir.join(month);
    let missing_reports: Vec<_> = FILES
        .iter()
        .filter(|(name, _, _)| !folder.join(name).exists())
        .collect();
    let missing_notices: Vec<_> = NOTICES
        .iter()
        .filter(|(name, _)| !folder.join(name).exists())
        .collect();
    if missing_reports.is_empty() && missing_notices.is_empty() {
        return Ok(vec![]);
    }
    std::fs::create_dir_all(&folder).map_err(|e| io(&folder, e))?;
    let q = v1::ReconcileRequest {
        period: month.to_owned(),
        ..Default::default()
    };
    let computed = crate::query::compute_report(store, &q).map_err(|s| DeliveryError::Report {
        month: month.to_owned(),
        reason: s.message().to_owned(),
    })?;
    let mut written = Vec::new();
    for (name, format, lang) in missing_reports {
        let path = folder.join(name);
        if write_once(&path, &report_file(store, &q, &computed, format, lang)?)? {
            written.push(path);
        }
    }
    for (name, lang) in missing_notices {
        let path = folder.join(name);
        if write_once(&path, &idle_notice(&computed, month, *lang == "ko"))? {
            written.push(path);
        }
    }
    Ok(written)
}

/// The idle-grants notice: the month's idle grants and the cards to reclaim, naming the head
/// the month's reports were computed from.
fn idle_notice(
    computed: &(
        crate::reconcile::Reconciliation,
        Vec<crate::render::CardDay>,
        crate::heads::SignedHead,
    ),
    month: &str,
    korean: bool,
) -> String {
    let (rec, _, head) = computed;
    let title = if korean {
        format!("{month} 유휴 과제 회수 검토 통지")
    } else {
        format!("Idle grants for the reclaim review, {month}")
    };
    let basis = if korean {
        format!(
            "같은 폴더의 {month} 보고서와 같은 원장 헤드(#{}, {})에서 계산.",
            head.id,
            crate::render::kst_minute(head.at_ms)
        )
    } else {
        format!(
            "Computed from the same ledger head as this folder's {month} reports (#{}, {} KST).",
            head.id,
            crate::render::kst_minute(head.at_ms)
        )
    };
    format!(
        "{title}\n{basis}\n\n{}",
        crate::report::idle_table(&rec.idle, korean)
    )
}

/// One pass at `now_ms`: every closed month's missing files.
pub fn catch_up(store: &dyn Store, dir: &Path, now_ms: i64) -> Result<Pass, DeliveryError> {
    let Some(first) = store.grants()?.iter().map(|g| g.valid_from_ms).min() else {
        return Ok(Pass::default());
    };
    let mut pass = Pass::default();
    for month in closed_months(first, now_ms) {
        let written = write_month(store, dir, &month)?;
        if written.is_empty() {
            pass.complete.push(month);
        } else {
            pass.written.extend(written);
        }
    }
    Ok(pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn a_month_is_closed_once_it_has_ended_in_korea() {
        let first = ms("2026-09-15T00:00:00+09:00");
        // 30 November 23:59 KST: November is still open.
        assert_eq!(
            closed_months(first, ms("2026-11-30T23:59:00+09:00")),
            ["2026-09", "2026-10"]
        );
        // 1 December 00:00 KST is 30 November 15:00 UTC: November has ended in Korea.
        assert_eq!(
            closed_months(first, ms("2026-11-30T15:00:00Z")),
            ["2026-09", "2026-10", "2026-11"]
        );
        assert!(closed_months(first, first).is_empty());
        // A grant starting on the first instant of a Korean month (the previous UTC day).
        assert_eq!(kst_month(ms("2026-09-30T15:00:00Z")), "2026-10");
        let long = closed_months(ms("2020-01-01T00:00:00+09:00"), ms("2026-12-02T00:00:00Z"));
        assert_eq!(long.len(), MAX_MONTHS);
        assert_eq!(long.last().unwrap(), "2026-11");
    }

    #[test]
    fn a_file_is_written_once_and_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        assert!(write_once(&p, "one").unwrap());
        assert!(!write_once(&p, "two").unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "one");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.txt"]);
    }
}

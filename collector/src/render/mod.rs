//! Report renderers: the reconciliation of a period as spreadsheet CSV, FOCUS (FinOps) CSV and
//! a self-contained HTML page with charts, in Korean or English (DESIGN.md §5 Reports).
//!
//! Every renderer is a pure function of a [`Reconciliation`] (and, for the page's heatmaps, the
//! per-day figures of [`days::card_days`]); none reads a clock, a file or the network, so the
//! same report renders to the same bytes.

pub mod csv_writer;
mod days;
mod focus_csv;
pub mod glossary;
mod html_page;
pub mod jobs_page;
mod labels;
mod report_csv;
mod svg;
mod trend_page;

use std::fmt;
use std::str::FromStr;

use crate::reconcile::Reconciliation;

pub use days::{CardDay, DayFigures, PeriodDay, card_days, period_days};
pub use labels::{CSV_COLUMNS, Labels};
pub use trend_page::{TREND_COLUMNS, csv as trend_csv, html as trend_html};

/// Why a renderer's setting is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("unknown report language {value:?} (expected ko or en)")]
    UnknownLang { value: String },
}

/// The language of a report's labels. Figures, ids and timestamps are the same in both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lang {
    /// Korean: the ministry's and the operating agency's language.
    Ko,
    /// English: for CSPs, auditors from abroad, and tools that want plain column names.
    En,
}

impl Lang {
    /// The language's code, as in `--lang` and HTML's `lang` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Lang::Ko => "ko",
            Lang::En => "en",
        }
    }

    /// This language's label table.
    pub fn labels(self) -> &'static Labels {
        match self {
            Lang::Ko => &labels::KO,
            Lang::En => &labels::EN,
        }
    }
}

impl FromStr for Lang {
    type Err = RenderError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ko" | "kr" | "ko-kr" | "korean" | "한국어" => Ok(Lang::Ko),
            "en" | "en-us" | "en-gb" | "english" => Ok(Lang::En),
            _ => Err(RenderError::UnknownLang {
                value: s.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The report as a spreadsheet CSV: one row per grant, then per program, per CSP and the
/// total, every time figure in GPU-hours. See [`report_csv`](self) for the format.
pub fn csv(r: &Reconciliation, lang: Lang) -> String {
    report_csv::render(r, lang)
}

/// The report as a FOCUS 1.0 CSV: per grant card, one row for its occupied (`Used`) and one
/// for its idle (`Unused`) delivered time.
pub fn focus(r: &Reconciliation) -> String {
    focus_csv::render(r)
}

/// The report as one self-contained HTML page with inline SVG charts; `days` feeds the
/// per-grant heatmaps (see [`card_days`]); an empty slice leaves them blank.
pub fn html(r: &Reconciliation, days: &[CardDay], lang: Lang) -> String {
    html_page::render(r, days, lang)
}

/// Unix ms as ISO 8601 in UTC with a `Z`, to the second (FOCUS's date/time format).
fn utc_iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Unix ms as a KST date and minute, for people (`2026-04-01 09:30`).
pub fn kst_minute(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(&crate::grants::KST)
        .format("%Y-%m-%d %H:%M")
        .to_string()
}

/// Whether `ms` is a Korean midnight.
fn is_kst_midnight(ms: i64) -> bool {
    (ms + 9 * 3_600_000).rem_euclid(86_400_000) == 0
}

/// A start instant for people: the KST date when it is a midnight (`2026-04-01`), else the
/// date and minute (`2026-04-10 10:10`).
pub fn kst_start(ms: i64) -> String {
    if is_kst_midnight(ms) {
        kst_minute(ms)[..10].to_owned()
    } else {
        kst_minute(ms)
    }
}

/// An exclusive end instant as people read an end: at a Korean midnight, the *inclusive* last
/// day (`[.., 2027-01-01 00:00)` reads `2026-12-31`); otherwise the date and minute it ended
/// (`2026-04-10 11:40`), which reads the same either way.
pub fn kst_end_inclusive(ms: i64) -> String {
    if is_kst_midnight(ms) {
        kst_minute(ms - 1)[..10].to_owned()
    } else {
        kst_minute(ms)
    }
}

/// `[from, until)` for people: `2026-12-01 – 2026-12-31`, or `2026-04-10 10:10 – 11:40`.
pub fn kst_span(from: i64, until: i64) -> String {
    format!("{} – {}", kst_start(from), kst_end_inclusive(until))
}

/// The report's as-of, for people: `None` for a period that is over, else what was reconciled
/// and what is not yet elapsed, in `lang`.
pub fn as_of_note(r: &Reconciliation, lang: Lang) -> Option<String> {
    let rest = r.not_elapsed?;
    let name = glossary::term("not_elapsed").map_or("", |t| t.name(lang));
    Some(match lang {
        Lang::Ko => format!(
            "진행 중인 기간: {} KST 기준으로 정산 ({} 경과분). {} ~ {}는 {}이며 어떤 수치에도 포함되지 않습니다.",
            kst_minute(r.elapsed_until_ms),
            kst_span(r.from_ms, r.elapsed_until_ms),
            kst_minute(rest.from_ms),
            kst_end_inclusive(rest.until_ms),
            name
        ),
        Lang::En => format!(
            "Period in progress: reconciled as of {} KST ({} elapsed); {} – {} is {} and counts in no figure.",
            kst_minute(r.elapsed_until_ms),
            kst_span(r.from_ms, r.elapsed_until_ms),
            kst_minute(rest.from_ms),
            kst_end_inclusive(rest.until_ms),
            name.to_lowercase()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_read_inclusive() {
        // 2027-01-01 00:00 KST ends a grant whose last day is 2026-12-31.
        let jan1 = 1_798_729_200_000;
        assert_eq!(kst_minute(jan1), "2027-01-01 00:00");
        assert_eq!(kst_end_inclusive(jan1), "2026-12-31");
        assert_eq!(kst_start(jan1), "2027-01-01");
        assert_eq!(kst_end_inclusive(jan1 + 100 * 60_000), "2027-01-01 01:40");
        assert_eq!(kst_start(jan1 + 60_000), "2027-01-01 00:01");
        assert_eq!(
            kst_span(jan1 - 31 * 86_400_000, jan1),
            "2026-12-01 – 2026-12-31"
        );
    }

    #[test]
    fn times_format_in_kst_and_utc() {
        // 2026-04-01 00:00 KST = 2026-03-31 15:00 UTC.
        let ms = 1_774_969_200_000;
        assert_eq!(utc_iso(ms), "2026-03-31T15:00:00Z");
        assert_eq!(kst_minute(ms + 90 * 60_000), "2026-04-01 01:30");
    }

    #[test]
    fn lang_parses_codes_and_refuses_others() {
        assert_eq!("ko".parse::<Lang>().unwrap(), Lang::Ko);
        assert_eq!(" KO ".parse::<Lang>().unwrap(), Lang::Ko);
        assert_eq!("한국어".parse::<Lang>().unwrap(), Lang::Ko);
        assert_eq!("en".parse::<Lang>().unwrap(), Lang::En);
        assert_eq!("English".parse::<Lang>().unwrap(), Lang::En);
        let e = "fr".parse::<Lang>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown report language \"fr\" (expected ko or en)"
        );
        assert_eq!(Lang::Ko.to_string(), "ko");
        assert_eq!(Lang::En.as_str(), "en");
    }
}

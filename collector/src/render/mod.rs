//! Report renderers: the reconciliation of a period as spreadsheet CSV, FOCUS (FinOps) CSV and
//! a self-contained HTML page with charts, in Korean or English (DESIGN.md §5 Reports).
//!
//! Every renderer is a pure function of a [`Reconciliation`] (and, for the page's heatmaps, the
//! per-day figures of [`days::card_days`]); none reads a clock, a file or the network, so the
//! same report renders to the same bytes.

mod days;
mod focus_csv;
mod html_page;
mod labels;
mod report_csv;
mod svg;

use std::fmt;
use std::str::FromStr;

use crate::reconcile::Reconciliation;

pub use days::{CardDay, PeriodDay, card_days, period_days};
pub use labels::{CSV_COLUMNS, Labels};

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

/// Unix ms as RFC 3339 in Korea Standard Time, to the second (`2026-04-01T00:00:00+09:00`).
fn kst_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(&crate::grants::KST)
        .format("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// Unix ms as ISO 8601 in UTC with a `Z`, to the second (FOCUS's date/time format).
fn utc_iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Unix ms as a KST date and minute, for people (`2026-04-01 09:30`).
fn kst_minute(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .with_timezone(&crate::grants::KST)
        .format("%Y-%m-%d %H:%M")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_in_kst_and_utc() {
        // 2026-04-01 00:00 KST = 2026-03-31 15:00 UTC.
        let ms = 1_774_969_200_000;
        assert_eq!(kst_rfc3339(ms), "2026-04-01T00:00:00+09:00");
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

//! Trends as CSV (the shared writer, UTF-8 with a BOM for Excel) and as a self-contained HTML
//! page with line charts: utilization (active ÷ allocated) per program and per CSP, and
//! delivered GPU-hours per program, month by month; then every row in a table, and the
//! glossary. Same rules as the report page: no script, nothing fetched, text escaped, KST.

use crate::reconcile::Figures;
use crate::trend::{Level, Trend};

use super::csv_writer::CsvWriter;
use super::glossary;
use super::svg::{Line, esc, line_chart, num};
use super::{Lang, kst_minute};

/// The trend CSV's columns: (machine name, Korean header).
pub const TREND_COLUMNS: [(&str, &str); 12] = [
    ("level", "구분"),
    ("key", "대상"),
    ("month", "월(KST)"),
    ("grants", "과제 수"),
    ("allocated_gpu_hours", "배정(GPU시간)"),
    ("unmetered_gpu_hours", "미계측(GPU시간)"),
    ("unavailable_gpu_hours", "장애(GPU시간)"),
    ("delivered_gpu_hours", "제공(GPU시간)"),
    ("active_gpu_hours", "활성 사용(GPU시간)"),
    ("utilization_pct", "활용률(활성÷배정 %)"),
    ("violations", "위반(건)"),
    ("as_of", "정산 기준 시각(KST)"),
];

fn level_name(level: Level, lang: Lang) -> &'static str {
    match (lang, level) {
        (Lang::Ko, Level::Program) => "사업",
        (Lang::Ko, Level::Csp) => "클라우드 사업자",
        (Lang::Ko, Level::Grant) => "과제",
        (Lang::Ko, Level::Grantee) => "수혜기관",
        (Lang::Ko, Level::Principal) => "사용 주체",
        (Lang::En, l) => l.as_str(),
    }
}

fn h6(ms: u64) -> String {
    format!("{:.6}", crate::reconcile::gpu_hours(ms))
}

/// The trend as a spreadsheet CSV: one row per level, key and month.
pub fn csv(t: &Trend, lang: Lang) -> String {
    let mut w = CsvWriter::new(true);
    let header: Vec<&str> = TREND_COLUMNS
        .iter()
        .map(|(en, ko)| if lang == Lang::Ko { *ko } else { *en })
        .collect();
    w.record(&header);
    let as_of = kst_minute(t.as_of_ms);
    for r in &t.rows {
        let f = &r.figures;
        w.record(&[
            level_name(r.level, lang).to_owned(),
            r.key.clone(),
            r.month.clone(),
            r.grants.to_string(),
            h6(f.allocated_ms),
            h6(f.unmetered_ms),
            h6(f.unavailable_ms),
            h6(f.delivered_ms),
            h6(f.active_ms),
            f.utilization_pct()
                .map_or(String::new(), |u| format!("{u:.2}")),
            f.violations.to_string(),
            as_of.clone(),
        ]);
    }
    w.finish()
}

pub(super) const CSS: &str = r#"
body { font-family: "Noto Sans CJK KR", "Noto Sans KR", "Malgun Gothic", system-ui, sans-serif; margin: 24px 32px; color: #1f2933; font-size: 14px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 2px solid #d9e2ec; }
.note { color: #52606d; }
table { border-collapse: collapse; }
th, td { border: 1px solid #d9e2ec; padding: 3px 8px; white-space: nowrap; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
svg.chart text { font-size: 11px; fill: #52606d; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; }
dt { font-weight: 600; } dd { margin: 0; }
@page { size: A4 landscape; margin: 10mm; }
@media print { body { margin: 0; font-size: 8pt; } table { width: 100%; font-size: 6.5pt; } thead { display: table-header-group; } tr { break-inside: avoid; } th, td { white-space: normal; } svg.chart { max-width: 100%; height: auto; } }
"#;

fn chart(
    t: &Trend,
    id: &str,
    title: &str,
    level: Level,
    value: fn(&Figures) -> Option<f64>,
    unit: &str,
    max: Option<f64>,
) -> String {
    let lines: Vec<Line> = t
        .series(level, value)
        .into_iter()
        .map(|(label, values)| Line { label, values })
        .collect();
    format!(
        "<section id=\"{id}\"><h2>{}</h2>{}</section>",
        esc(title),
        line_chart(&format!("chart-{id}"), &t.months, &lines, unit, max)
    )
}

/// The trend as one self-contained HTML page with line charts.
pub fn html(t: &Trend, lang: Lang) -> String {
    let l = lang.labels();
    let ko = lang == Lang::Ko;
    let title = if ko {
        "월별 추이"
    } else {
        "Month-by-month trends"
    };
    let span = match (t.months.first(), t.months.last()) {
        (Some(a), Some(b)) => format!("{a} – {b}"),
        _ => String::new(),
    };
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"{lang}\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <title>{t} {span}</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <header><h1>{t}</h1><p class=\"note\">{pl}: {span} · {tzl}: KST ({tz}) · {asl}: {asof} KST</p></header>\n",
        lang = lang.as_str(),
        t = esc(title),
        span = esc(&span),
        pl = esc(l.period),
        tzl = esc(l.time_zone),
        tz = esc(&t.time_zone),
        asl = esc(l.as_of),
        asof = esc(&kst_minute(t.as_of_ms)),
    );
    let util = |x: &str| format!("{x} · {}", l.utilization);
    s.push_str(&chart(
        t,
        "trend-program-util",
        &util(l.programs),
        Level::Program,
        Figures::utilization_pct,
        "%",
        Some(100.0),
    ));
    s.push_str(&chart(
        t,
        "trend-csp-util",
        &util(l.csps),
        Level::Csp,
        Figures::utilization_pct,
        "%",
        Some(100.0),
    ));
    s.push_str(&chart(
        t,
        "trend-program-delivered",
        &format!("{} · {} ({})", l.programs, l.delivered, l.gpu_hours),
        Level::Program,
        |f| Some(f.delivered_gpu_hours()),
        l.gpu_hours,
        None,
    ));
    s.push_str(&chart(
        t,
        "trend-grant-util",
        &util(l.grant),
        Level::Grant,
        Figures::utilization_pct,
        "%",
        Some(100.0),
    ));
    s.push_str("<section id=\"trend-table\"><table><thead><tr>");
    for (en, k) in TREND_COLUMNS.iter().take(11) {
        s.push_str(&format!("<th>{}</th>", esc(if ko { k } else { en })));
    }
    s.push_str("</tr></thead><tbody>");
    for r in &t.rows {
        let f = &r.figures;
        s.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td>",
            esc(level_name(r.level, lang)),
            esc(&r.key),
            esc(&r.month),
            r.grants
        ));
        for ms in [
            f.allocated_ms,
            f.unmetered_ms,
            f.unavailable_ms,
            f.delivered_ms,
            f.active_ms,
        ] {
            s.push_str(&format!(
                "<td class=\"n\">{}</td>",
                num(crate::reconcile::gpu_hours(ms), 2)
            ));
        }
        s.push_str(&format!(
            "<td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            f.utilization_pct()
                .map_or("-".to_owned(), |u| format!("{}%", num(u, 1))),
            f.violations
        ));
    }
    s.push_str("</tbody></table></section>");
    s.push_str(&format!(
        "<section id=\"glossary\"><h2>{}</h2><dl>",
        esc(l.glossary)
    ));
    for term in &glossary::TERMS {
        s.push_str(&format!(
            "<dt>{}</dt><dd>{}</dd>",
            esc(term.name(lang)),
            esc(term.definition(lang))
        ));
    }
    s.push_str("</dl></section>\n</body>\n</html>\n");
    s
}

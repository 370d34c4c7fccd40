//! The console's HTML: escaping, the page frame (navigation, language switch, logout form),
//! and the small pieces pages share (bars, heatmap cells, pagination, tables).
//!
//! Rules:
//! - Every text that did not come from this file goes through [`esc`] (element text and
//!   attribute values alike: `&`, `<`, `>`, `"` and `'` are escaped), URL parts through
//!   [`url_part`]. Pages build strings, never parse them.
//! - No inline script or style: the Content-Security-Policy forbids both. Bars and heatmaps
//!   are SVG whose sizes and colours are presentation attributes, which CSP does not govern;
//!   behaviour lives in `assets/console.js`, looks in `assets/console.css`.

use std::fmt::Write as _;

use super::i18n::{Lang, T};
use super::session::Session;

/// `s` escaped for HTML text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` percent-encoded for a path segment or a query value.
pub fn url_part(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// GPU-hours, one decimal.
pub fn hours(ms: u64) -> String {
    format!("{:.1}", crate::reconcile::gpu_hours(ms))
}

/// A percentage, one decimal; "–" when unknown.
pub fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.1}%"))
}

/// `part / whole × 100`, `None` when `whole` is 0.
pub fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

/// A KST minute, as every report prints it.
pub fn kst(ms: i64) -> String {
    if ms <= 0 {
        return "–".into();
    }
    crate::listing::kst_cell(ms)
}

/// Three stacked bars: allocated (the frame), delivered, active; widths relative to
/// `allocated`. Sizes are SVG attributes, so no inline style is needed.
pub fn bars(allocated: u64, delivered: u64, active: u64, t: &T) -> String {
    let w = |v: u64| -> f64 {
        if allocated == 0 {
            0.0
        } else {
            (v as f64 / allocated as f64 * 200.0).min(200.0)
        }
    };
    format!(
        "<svg class=\"bars\" width=\"200\" height=\"18\" viewBox=\"0 0 200 18\" role=\"img\" aria-label=\"{label}\">\
<title>{label}</title>\
<rect class=\"b-alloc\" x=\"0\" y=\"0\" width=\"200\" height=\"18\"/>\
<rect class=\"b-deliv\" x=\"0\" y=\"2\" width=\"{d:.1}\" height=\"14\"/>\
<rect class=\"b-active\" x=\"0\" y=\"6\" width=\"{a:.1}\" height=\"6\"/></svg>",
        label = esc(&format!(
            "{} {} / {} {} / {} {}",
            t.labels().allocated,
            hours(allocated),
            t.labels().delivered,
            hours(delivered),
            t.labels().active,
            hours(active)
        )),
        d = w(delivered),
        a = w(active),
    )
}

/// The heatmap class of a utilization: none (no data), then five steps.
pub fn heat_class(util: Option<f64>) -> &'static str {
    match util {
        None => "h-none",
        Some(u) if u < 5.0 => "h0",
        Some(u) if u < 25.0 => "h1",
        Some(u) if u < 50.0 => "h2",
        Some(u) if u < 75.0 => "h3",
        Some(_) => "h4",
    }
}

/// One row of heatmap cells (SVG), each with a title naming its label and value.
pub fn heat_row(cells: &[(String, Option<f64>)]) -> String {
    let mut s = format!(
        "<svg class=\"heat\" width=\"{}\" height=\"14\" viewBox=\"0 0 {} 14\">",
        cells.len() * 14,
        cells.len() * 14
    );
    for (i, (label, u)) in cells.iter().enumerate() {
        let _ = write!(
            s,
            "<rect class=\"{}\" x=\"{}\" y=\"0\" width=\"13\" height=\"13\"><title>{} {}</title></rect>",
            heat_class(*u),
            i * 14,
            esc(label),
            pct(*u)
        );
    }
    s.push_str("</svg>");
    s
}

/// Page links: `base` already holds the filters (ending in `?…&` or `?`).
pub fn pager(base: &str, page: usize, pages: usize, t: &T) -> String {
    if pages <= 1 {
        return String::new();
    }
    let mut s = String::from("<nav class=\"pager\">");
    if page > 1 {
        let _ = write!(
            s,
            "<a href=\"{}page={}\" rel=\"prev\">{}</a> ",
            esc(base),
            page - 1,
            t.prev
        );
    }
    let _ = write!(s, "<span>{page} / {pages}</span>");
    if page < pages {
        let _ = write!(
            s,
            " <a href=\"{}page={}\" rel=\"next\">{}</a>",
            esc(base),
            page + 1,
            t.next
        );
    }
    s.push_str("</nav>");
    s
}

/// The slice of `items` on `page` (1-based) of `per` each, and the number of pages.
pub fn paginate<X>(items: &[X], page: usize, per: usize) -> (&[X], usize, usize) {
    let pages = items.len().div_ceil(per).max(1);
    let page = page.clamp(1, pages);
    let from = (page - 1) * per;
    (
        &items[from.min(items.len())..(from + per).min(items.len())],
        page,
        pages,
    )
}

/// A table: header cells (already escaped text) and rows of already-built cell HTML;
/// `num` marks right-aligned columns.
pub fn table(id: &str, head: &[&str], num: &[bool], rows: &[Vec<String>]) -> String {
    let mut s = format!("<table id=\"{}\"><thead><tr>", esc(id));
    for (i, h) in head.iter().enumerate() {
        let cls = if num.get(i).copied().unwrap_or(false) {
            " class=\"n\""
        } else {
            ""
        };
        let _ = write!(s, "<th{cls}>{h}</th>");
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            let cls = if num.get(i).copied().unwrap_or(false) {
                " class=\"n\""
            } else {
                ""
            };
            let _ = write!(s, "<td{cls}>{c}</td>");
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// `table` with an attribute `name="value"` on each body row, in order (the script finds
/// rows by card, host or grant).
pub fn tag_rows<'a>(table: &str, tags: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let Some((head, body)) = table.split_once("<tbody>") else {
        return table.to_string();
    };
    let mut out = String::with_capacity(table.len() + 1024);
    out.push_str(head);
    out.push_str("<tbody>");
    let mut rest = body;
    for (name, value) in tags {
        let Some(i) = rest.find("<tr>") else { break };
        out.push_str(&rest[..i]);
        let _ = write!(out, "<tr {}=\"{}\">", name, esc(value));
        rest = &rest[i + 4..];
    }
    out.push_str(rest);
    out
}

/// Which navigation entry a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Fleet,
    Grants,
    Cards,
    Violations,
    Alarms,
    Idle,
    Downloads,
    Ledger,
    Admin,
    None,
}

/// A whole page: head (the console's own stylesheet and script only), navigation with the
/// language switch and the logout form, and `body`.
pub fn page(
    t: &T,
    session: Option<&Session>,
    nav: Nav,
    path: &str,
    title: &str,
    body: &str,
) -> String {
    let mut s = String::with_capacity(body.len() + 2048);
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"{lang}\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} · gpumeter</title>\
<link rel=\"stylesheet\" href=\"/assets/console.css\">\
<link rel=\"icon\" href=\"/assets/favicon.svg\" type=\"image/svg+xml\">\
<script src=\"/assets/console.js\" defer></script></head><body>",
        lang = t.lang.as_str(),
        title = esc(title),
    );
    s.push_str("<header><a class=\"brand\" href=\"/\">gpumeter</a>");
    if let Some(sess) = session {
        s.push_str("<nav class=\"main\">");
        let mut entries = vec![
            (Nav::Fleet, "/", t.nav_fleet),
            (Nav::Grants, "/grants", t.nav_grants),
            (Nav::Violations, "/violations", t.nav_violations),
            (Nav::Alarms, "/alarms", t.nav_alarms),
            (Nav::Idle, "/idle", t.nav_idle),
            (Nav::Downloads, "/downloads", t.nav_downloads),
            (Nav::Ledger, "/ledger", t.nav_ledger),
        ];
        if sess.is_admin() {
            entries.push((Nav::Admin, "/admin/tokens", t.nav_admin));
        }
        for (n, href, label) in entries {
            let cur = if n == nav {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(s, "<a href=\"{href}\"{cur}>{label}</a>");
        }
        s.push_str("</nav>");
    }
    let other = match t.lang {
        Lang::Ko => Lang::En,
        Lang::En => Lang::Ko,
    };
    let _ = write!(
        s,
        "<div class=\"side\"><a id=\"lang-switch\" href=\"/lang/{}?back={}\" hreflang=\"{}\">{}</a>",
        other.as_str(),
        url_part(path),
        other.as_str(),
        t.switch_to
    );
    if let Some(sess) = session {
        let _ = write!(
            s,
            "<span class=\"who\">{} ({})</span>\
<form method=\"post\" action=\"/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
<button type=\"submit\" id=\"logout\">{}</button></form>",
            esc(&sess.name),
            sess.role.as_str(),
            esc(&sess.csrf),
            t.logout
        );
    }
    s.push_str("</div></header><main>");
    let _ = write!(s, "<h1>{}</h1>", esc(title));
    s.push_str(body);
    s.push_str("</main><footer>");
    s.push_str(t.footer);
    s.push_str("</footer></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"y\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;y&quot;"
        );
        assert_eq!(esc("고성능 컴퓨팅"), "고성능 컴퓨팅");
        assert_eq!(url_part("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
        assert_eq!(url_part("GPU-0a_1.x~"), "GPU-0a_1.x~");
    }

    #[test]
    fn a_page_escapes_what_it_is_given_and_inlines_nothing() {
        let t = T::of(Lang::En);
        let html = page(
            t,
            None,
            Nav::None,
            "/x\"><script>",
            "<img src=x onerror=alert(1)>",
            "",
        );
        assert!(!html.contains("<img src=x"), "{html}");
        assert!(html.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(!html.contains("\"><script>"));
        // Only the console's own script and stylesheet, no inline ones.
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"/assets/console.js\" defer></script>"));
        assert!(!html.contains("style="));
        assert!(!html.contains("<style"));
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn pages_cut_lists() {
        let items: Vec<u32> = (0..25).collect();
        let (p, page, pages) = paginate(&items, 3, 10);
        assert_eq!((p.len(), page, pages), (5, 3, 3));
        let (p, page, _) = paginate(&items, 99, 10);
        assert_eq!((p[0], page), (20, 3));
        let (p, page, pages) = paginate::<u32>(&[], 1, 10);
        assert_eq!((p.len(), page, pages), (0, 1, 1));
    }

    #[test]
    fn bars_and_heat_are_attributes_only() {
        let t = T::of(Lang::Ko);
        let b = bars(3_600_000, 1_800_000, 900_000, t);
        assert!(
            b.contains("width=\"100.0\"") && b.contains("width=\"50.0\""),
            "{b}"
        );
        assert!(!b.contains("style"));
        assert_eq!(heat_class(None), "h-none");
        assert_eq!(heat_class(Some(80.0)), "h4");
        assert!(
            heat_row(&[("2026-11-01".into(), Some(1.0))])
                .contains("<title>2026-11-01 1.0%</title>")
        );
    }
}

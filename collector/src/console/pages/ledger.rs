//! Report downloads (every format the `report` command writes, each with its provenance
//! line), the ledger's verification state and its latest signed head, and the admin-only
//! read-only views of tokens and agent registrations.

use std::fmt::Write as _;

use super::{Ctx, PageError};
use crate::console::ListQuery;
use crate::console::data::{Report, VerifyState};
use crate::console::html::{self, Nav, esc, url_part};

/// The formats offered: (format, file extension, media type).
pub const FORMATS: &[(&str, &str, &str)] = &[
    ("table", "txt", "text/plain; charset=utf-8"),
    ("table-wide", "txt", "text/plain; charset=utf-8"),
    ("json", "json", "application/json"),
    ("csv", "csv", "text/csv; charset=utf-8"),
    ("focus", "csv", "text/csv; charset=utf-8"),
    ("html", "html", "text/html; charset=utf-8"),
    ("pdf", "pdf", "application/pdf"),
];

/// A report file as `report --format F` writes it: the content rendered by
/// [`crate::provenance::render`] with its provenance line embedded (the PDF is the HTML page,
/// provenance included, printed by headless Chromium). Returns (file name, media type, bytes).
pub fn report_file(
    r: &Report,
    format: &str,
    korean: bool,
) -> Result<(String, &'static str, Vec<u8>), String> {
    let &(_, ext, mime) = FORMATS
        .iter()
        .find(|(f, _, _)| *f == format)
        .ok_or_else(|| {
            format!("format {format:?}: one of table, table-wide, json, csv, focus, html, pdf")
        })?;
    let lang = if korean { "ko" } else { "en" };
    let rendered_as = if format == "pdf" { "html" } else { format };
    let content = crate::provenance::render(&r.rec, &r.days, rendered_as, korean)
        .map_err(|e| e.to_string())?;
    let p = crate::query::provenance_of(&r.query, &r.head, rendered_as, lang, &content);
    let file = crate::provenance::embed(&content, &p);
    let name = format!(
        "gpumeter-{}-{format}.{lang}.{ext}",
        r.period.replace("..", "_")
    );
    if format == "pdf" {
        let pdf = crate::pdf::print_html(&file).map_err(|e| e.to_string())?;
        return Ok((name, mime, pdf));
    }
    Ok((name, mime, file.into_bytes()))
}

pub fn downloads(c: &Ctx<'_>, r: &Report) -> String {
    let t = c.t;
    let mut b = String::new();
    b.push_str(&super::period_line(t, r, "/downloads", &[]));
    let _ = write!(b, "<p>{}</p>", t.downloads_note);
    let rows: Vec<Vec<String>> = FORMATS
        .iter()
        .map(|(f, _, _)| {
            let link = |lang: &str| {
                format!(
                    "<a class=\"download\" data-format=\"{f}\" data-lang=\"{lang}\" href=\"/downloads/report?period={}&amp;format={f}&amp;lang={lang}\">{lang}</a>",
                    url_part(&r.period)
                )
            };
            vec![format!("<code>{f}</code>"), format!("{} · {}", link("ko"), link("en"))]
        })
        .collect();
    b.push_str(&html::table(
        "formats",
        &[t.format, ""],
        &[false, false],
        &rows,
    ));
    let _ = write!(b, "<h2>provenance</h2>");
    b.push_str(&head_table(t, &r.head));
    c.page(Nav::Downloads, t.downloads_title, &b)
}

fn head_table(t: &crate::console::i18n::T, h: &crate::heads::SignedHead) -> String {
    let rows = vec![
        vec!["head".into(), format!("<b id=\"head-id\">#{}</b>", h.id)],
        vec![t.time.into(), html::kst(h.at_ms)],
        vec!["agents".into(), h.agents.to_string()],
        vec![
            "root".into(),
            format!("<code id=\"head-root\">{}</code>", hex::encode(&h.root)),
        ],
        vec![
            "collector key".into(),
            format!("<code>{}</code>", hex::encode(&h.public_key)),
        ],
        vec![
            "signature".into(),
            format!("<code>{}</code>", hex::encode(&h.signature)),
        ],
    ];
    html::table("head", &["", ""], &[false, false], &rows)
}

pub fn ledger(c: &Ctx<'_>, v: &VerifyState, _q: &ListQuery) -> Result<String, PageError> {
    let t = c.t;
    let mut b = String::new();
    let _ = write!(b, "<h2>{}</h2>", t.ledger_title);
    match &v.last {
        None => {
            let _ = write!(
                b,
                "<p id=\"verify-state\" class=\"muted\">{}</p>",
                t.verify_never
            );
        }
        Some((from, until, Ok(report))) => {
            let bad: usize = report.agents.iter().map(|a| a.findings.len()).sum();
            let _ = write!(
                b,
                "<p id=\"verify-state\" class=\"{}\">{} · {} records · {} agents · {} findings · {} … {}</p>",
                if report.ok { "ok-text" } else { "error" },
                if report.ok {
                    t.verify_ok
                } else {
                    t.verify_failed
                },
                report.records,
                report.agents.len(),
                bad,
                html::kst(*from),
                html::kst(*until)
            );
            let rows: Vec<Vec<String>> = report
                .agents
                .iter()
                .map(|a| {
                    vec![
                        esc(&a.agent_id),
                        a.records.to_string(),
                        format!("{}..{}", a.first_seq, a.last_seq),
                        a.checkpoints.to_string(),
                        a.flagged.len().to_string(),
                        if a.findings.is_empty() {
                            "✓".into()
                        } else {
                            a.findings
                                .iter()
                                .take(5)
                                .map(|f| esc(&f.to_string()))
                                .collect::<Vec<_>>()
                                .join("<br>")
                        },
                    ]
                })
                .collect();
            b.push_str(&html::table(
                "verify-agents",
                &[
                    "agent",
                    "records",
                    "seq",
                    "checkpoints",
                    "flagged",
                    "findings",
                ],
                &[false, true, false, true, true, false],
                &rows,
            ));
        }
        Some((_, _, Err(e))) => {
            let _ = write!(
                b,
                "<p id=\"verify-state\" class=\"error\">{}: {}</p>",
                t.verify_failed,
                esc(e)
            );
        }
    }
    if v.running {
        let _ = write!(b, "<p id=\"verify-running\">{}</p>", t.verify_running);
    }
    let _ = write!(
        b,
        "<form method=\"post\" action=\"/ledger/verify\"><input type=\"hidden\" name=\"csrf\" value=\"{}\">\
<button type=\"submit\" id=\"verify-now\">{}</button></form>",
        esc(&c.session.csrf),
        t.verify_now
    );
    let _ = write!(b, "<h2>{}</h2>", t.latest_head);
    let heads = c.store.heads(c.now_ms - 7 * 86_400_000)?;
    match heads.last() {
        Some(h) => b.push_str(&head_table(t, h)),
        None => {
            let _ = write!(b, "<p class=\"muted\">{}</p>", t.no_head);
        }
    }
    Ok(c.page(Nav::Ledger, t.ledger_title, &b))
}

pub fn tokens(c: &Ctx<'_>) -> Result<String, PageError> {
    let t = c.t;
    // Names, roles and times only: the hashes stay in the store.
    let rows: Vec<Vec<String>> = c
        .store
        .tokens()?
        .iter()
        .map(|k| {
            vec![
                esc(&k.name),
                esc(&k.role),
                html::kst(k.created_ms),
                k.revoked_ms.map_or_else(|| "–".into(), html::kst),
            ]
        })
        .collect();
    let mut b = format!("<p><a href=\"/admin/agents\">{}</a></p>", t.agents_title);
    b.push_str(&html::table(
        "tokens",
        &[t.name, t.role, t.created, t.revoked],
        &[false; 4],
        &rows,
    ));
    Ok(c.page(Nav::Admin, t.tokens_title, &b))
}

pub fn agents(
    c: &Ctx<'_>,
    r: &Report,
    connected: &dyn Fn(&str) -> bool,
) -> Result<String, PageError> {
    let t = c.t;
    let mut rows = Vec::new();
    for h in &r.hosts {
        let registered = c.store.agent_registered_ms(&h.agent_id)?;
        rows.push(vec![
            esc(&h.agent_id),
            esc(&h.host_id),
            esc(&h.csp),
            esc(&h.agent_version),
            registered.map_or_else(|| "–".into(), html::kst),
            html::kst(h.last_seen_ms),
            super::state_badge(
                t,
                if connected(&h.agent_id) {
                    "connected"
                } else {
                    "disconnected"
                },
            ),
        ]);
    }
    let mut b = format!("<p><a href=\"/admin/tokens\">{}</a></p>", t.tokens_title);
    b.push_str(&html::table(
        "agents",
        &[
            "agent",
            "host",
            "CSP",
            "version",
            "registered",
            t.last_seen,
            t.state,
        ],
        &[false; 7],
        &rows,
    ));
    Ok(c.page(Nav::Admin, t.agents_title, &b))
}

//! The fleet page: the period's totals, the registry's table per CSP and program (committed,
//! registered, healthy, granted and delivered cards: the report's own fleet table), the
//! program and CSP totals, and every host with its live connection state.

use std::fmt::Write as _;

use super::{Ctx, PER_PAGE, PageError, period_line, state_badge};
use crate::console::ListQuery;
use crate::console::data::Report;
use crate::console::html::{self, Nav, esc, hours, pct, url_part};

pub fn page(
    c: &Ctx<'_>,
    r: &Report,
    connected: &dyn Fn(&str) -> bool,
    q: &ListQuery,
) -> Result<String, PageError> {
    let t = c.t;
    let l = t.labels();
    let rec = &r.rec;
    let mut b = String::with_capacity(64 << 10);
    b.push_str("<div data-live=\"fleet\" data-live-view=\"hosts\">");
    b.push_str(&period_line(t, r, "/", &[]));
    let _ = write!(
        b,
        "<div class=\"kpis\" id=\"totals\">\
<div class=\"kpi\">{}<b id=\"total-allocated\">{}</b>{}</div>\
<div class=\"kpi\">{}<b id=\"total-delivered\">{}</b>{}</div>\
<div class=\"kpi\">{}<b id=\"total-active\">{}</b>{}</div>\
<div class=\"kpi\">{}<b id=\"total-utilization\">{}</b></div>\
<div class=\"kpi\">{}<b id=\"total-violations\">{}</b></div>\
<div class=\"kpi\"><span class=\"live-dot\" id=\"live-dot\"></span>{}</div></div>",
        l.allocated,
        hours(rec.total.allocated_ms),
        l.gpu_hours,
        l.delivered,
        hours(rec.total.delivered_ms),
        l.gpu_hours,
        l.active,
        hours(rec.total.active_ms),
        l.gpu_hours,
        l.utilization,
        pct(html::ratio(rec.total.active_ms, rec.total.allocated_ms)),
        l.violations,
        rec.all_violations,
        t.live_now,
    );
    let _ = write!(b, "<h2>{}</h2>", t.fleet_title);
    if rec.fleet.is_empty() {
        let _ = write!(b, "<p class=\"muted\">{}</p>", t.no_registry);
    } else {
        let rows: Vec<Vec<String>> = rec
            .fleet
            .iter()
            .map(|f| {
                let name = match t.lang {
                    crate::render::Lang::Ko if !f.name_ko.is_empty() => f.name_ko.as_str(),
                    _ if !f.name_en.is_empty() => f.name_en.as_str(),
                    _ => f.csp.as_str(),
                };
                vec![
                    format!(
                        "{} <span class=\"muted mono\">{}</span>",
                        esc(name),
                        esc(&f.csp)
                    ),
                    if f.program.is_empty() {
                        format!("<span class=\"muted\">{}</span>", l.no_grant)
                    } else {
                        esc(l.program_name(&f.program))
                    },
                    f.committed_cards.to_string(),
                    f.registered_cards.to_string(),
                    f.healthy_cards.to_string(),
                    f.granted_cards.to_string(),
                    f.delivered_cards.to_string(),
                ]
            })
            .collect();
        b.push_str(&html::table(
            "fleet",
            &[
                l.csp,
                l.program,
                t.committed,
                t.registered,
                t.healthy,
                t.granted,
                t.delivered_cards,
            ],
            &[false, false, true, true, true, true, true],
            &rows,
        ));
    }
    let _ = write!(b, "<h2>{}</h2>", l.programs);
    let rows: Vec<Vec<String>> = rec
        .programs
        .iter()
        .map(|p| {
            vec![
                format!(
                    "<a href=\"/grants?period={}&amp;program={}\">{}</a>",
                    url_part(&r.period),
                    url_part(&p.program),
                    esc(l.program_name(&p.program))
                ),
                p.grants.to_string(),
                p.cards.to_string(),
                hours(p.figures.allocated_ms),
                hours(p.figures.delivered_ms),
                hours(p.figures.active_ms),
                html::bars(
                    p.figures.allocated_ms,
                    p.figures.delivered_ms,
                    p.figures.active_ms,
                    t,
                ),
            ]
        })
        .collect();
    b.push_str(&html::table(
        "programs",
        &[
            l.program,
            l.grants,
            l.cards,
            l.allocated,
            l.delivered,
            l.active,
            "",
        ],
        &[false, true, true, true, true, true, false],
        &rows,
    ));
    let _ = write!(b, "<h2>{}</h2>", l.csps);
    let rows: Vec<Vec<String>> = rec
        .csps
        .iter()
        .map(|p| {
            vec![
                format!(
                    "<a href=\"/grants?period={}&amp;csp={}\">{}</a>",
                    url_part(&r.period),
                    url_part(&p.csp),
                    esc(&p.csp)
                ),
                p.grants.to_string(),
                p.cards.to_string(),
                hours(p.figures.allocated_ms),
                hours(p.figures.delivered_ms),
                hours(p.figures.active_ms),
                hours(p.unassigned_use_ms),
            ]
        })
        .collect();
    b.push_str(&html::table(
        "csps",
        &[
            l.csp,
            l.grants,
            l.cards,
            l.allocated,
            l.delivered,
            l.active,
            l.unassigned_use,
        ],
        &[false, true, true, true, true, true, true],
        &rows,
    ));
    // Hosts, with the live connection state (first as this collector's sessions stand, then
    // as the hub's frames say).
    let mut hosts: Vec<&crate::store::HostRow> = r.hosts.iter().collect();
    hosts.sort_by(|a, b| {
        (a.csp.as_str(), a.host_id.as_str()).cmp(&(b.csp.as_str(), b.host_id.as_str()))
    });
    let (shown, page, pages) = html::paginate(&hosts, q.page.unwrap_or(1), PER_PAGE);
    let _ = write!(
        b,
        "<h2>{} <span class=\"muted\">({})</span></h2>",
        t.hosts_title,
        hosts.len()
    );
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|h| {
            let cards = h
                .gpus
                .iter()
                .map(|g| {
                    format!(
                        "<a class=\"mono\" href=\"/cards/{}\">{}</a>",
                        url_part(&g.uuid),
                        esc(g.uuid.get(..12).unwrap_or(&g.uuid))
                    )
                })
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                format!(
                    "<span class=\"conn-cell\">{}</span>",
                    state_badge(
                        t,
                        if connected(&h.agent_id) {
                            "connected"
                        } else {
                            "disconnected"
                        },
                    )
                )
                .replace("class=\"state ", "class=\"conn state "),
                format!("<span class=\"mono\">{}</span>", esc(&h.host_id)),
                esc(&h.csp),
                esc(&h.agent_id),
                html::kst(h.last_seen_ms),
                h.last_record_ms.map_or_else(|| "–".into(), html::kst),
                h.durable_seq.to_string(),
                cards,
            ]
        })
        .collect();
    let table = html::table(
        "hosts",
        &[
            t.state,
            l.host,
            l.csp,
            "agent",
            t.last_seen,
            t.last_record,
            "seq",
            l.cards,
        ],
        &[false, false, false, false, false, false, true, false],
        &rows,
    );
    // Each host row names its host for the script.
    let table = html::tag_rows(
        &table,
        shown.iter().map(|h| ("data-host", h.host_id.as_str())),
    );
    b.push_str(&table);
    b.push_str(&html::pager(
        &format!("/?period={}&", url_part(&r.period)),
        page,
        pages,
        t,
    ));
    b.push_str("</div>");
    Ok(c.page(Nav::Fleet, t.fleet_title, &b))
}

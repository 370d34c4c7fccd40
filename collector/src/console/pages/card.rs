//! A card's page: its live state, identity (as its host's agent reported it, and identity
//! alarms), the grants that held it and its moves between hosts, its per-day heatmap in the
//! period, one day's windows (paged), and the period's events: XIDs, violations with the
//! enforcement actions that followed each, and the rest.

use std::fmt::Write as _;

use super::{Ctx, PageError, period_line, state_badge};
use crate::console::ListQuery;
use crate::console::data::Report;
use crate::console::html::{self, Nav, esc, hours, pct, url_part};

/// Windows per page.
const WINDOWS_PER_PAGE: usize = 60;

pub fn page(
    c: &Ctx<'_>,
    r: &Report,
    uuid: &str,
    connected: &dyn Fn(&str) -> bool,
    q: &ListQuery,
) -> Result<String, PageError> {
    let t = c.t;
    let l = t.labels();
    let hosts = &r.hosts;
    let holder = hosts
        .iter()
        .find_map(|h| h.gpus.iter().find(|g| g.uuid == uuid).map(|g| (h, g)));
    let grants = c.store.grants()?;
    let held: Vec<(&crate::grants::Grant, &crate::grants::GrantCard)> = grants
        .iter()
        .flat_map(|g| {
            g.cards
                .iter()
                .filter(|x| x.gpu_uuid == uuid)
                .map(move |x| (g, x))
        })
        .collect();
    if holder.is_none() && held.is_empty() {
        return Err(PageError::NotFound(format!("{} {uuid}", l.gpu)));
    }
    let host_id = holder
        .map(|(h, _)| h.host_id.clone())
        .or_else(|| held.first().map(|(_, x)| x.host_id.clone()))
        .unwrap_or_default();
    let mut b = String::with_capacity(64 << 10);
    let _ = write!(
        b,
        "<div data-live=\"card\" data-live-host=\"{}\">",
        esc(&host_id)
    );
    b.push_str(&period_line(
        t,
        r,
        &format!("/cards/{}", url_part(uuid)),
        &[],
    ));
    // Live.
    let _ = write!(
        b,
        "<h2><span class=\"live-dot\" id=\"live-dot\"></span>{}</h2>",
        t.live_now
    );
    let live = html::table(
        "live",
        &[t.state, l.utilization, "power", "window end", "agent"],
        &[false, true, true, false, false],
        &[vec![
            state_badge(t, "…"),
            "<span class=\"live-util\">–</span>".into(),
            "<span class=\"live-power\">–</span>".into(),
            "<span class=\"live-end\">–</span>".into(),
            holder.map_or_else(String::new, |(h, _)| {
                format!(
                    "{} {}",
                    esc(&h.agent_id),
                    state_badge(
                        t,
                        if connected(&h.agent_id) {
                            "connected"
                        } else {
                            "disconnected"
                        }
                    )
                )
            }),
        ]],
    );
    b.push_str(&html::tag_rows(&live, std::iter::once(("data-card", uuid))));
    // Identity.
    let _ = write!(b, "<h2>{}</h2>", t.identity);
    let mut rows = vec![vec![
        "UUID".to_string(),
        format!("<code>{}</code>", esc(uuid)),
    ]];
    if let Some((h, g)) = holder {
        rows.push(vec![l.host.into(), esc(&h.host_id)]);
        rows.push(vec![l.csp.into(), esc(&h.csp)]);
        rows.push(vec!["hostname".into(), esc(&h.hostname)]);
        rows.push(vec!["model".into(), esc(&g.name)]);
        rows.push(vec!["serial".into(), esc(&g.serial)]);
        rows.push(vec!["PCI".into(), esc(&g.pci_bus_id)]);
        rows.push(vec![
            "memory".into(),
            g.memory_total_bytes.map_or_else(
                || "–".into(),
                |m| format!("{:.1} GiB", m as f64 / (1u64 << 30) as f64),
            ),
        ]);
        rows.push(vec!["MIG".into(), esc(&g.mig_mode)]);
        if let Some(m) = &g.mig {
            rows.push(vec![
                "MIG parent".into(),
                format!("<code>{}</code> {}", esc(&m.parent_uuid), esc(&m.profile)),
            ]);
        }
    }
    b.push_str(&html::table("identity", &["", ""], &[false, false], &rows));
    let alarms: Vec<Vec<String>> = r
        .rec
        .card_alarms
        .iter()
        .filter(|a| a.gpu_uuid == uuid)
        .map(|a| vec![html::kst(a.at_ms), esc(&a.kind), esc(&a.detail)])
        .collect();
    if !alarms.is_empty() {
        let _ = write!(b, "<h2>{}</h2>", l.identity_title);
        b.push_str(&html::table(
            "identity-alarms",
            &[t.time, t.kind, t.detail],
            &[false; 3],
            &alarms,
        ));
    }
    // History: grants and moves.
    let _ = write!(b, "<h2>{}</h2>", t.holdings);
    let rows: Vec<Vec<String>> = held
        .iter()
        .map(|(g, x)| {
            let (from, until) = g.card_interval(x);
            vec![
                format!(
                    "<a href=\"/grants/{}?period={}\">{}</a>",
                    url_part(&g.grant_id),
                    url_part(&r.period),
                    esc(&g.grant_id)
                ),
                esc(l.program_name(g.program.as_str())),
                esc(&g.grantee),
                esc(&x.host_id),
                esc(&crate::render::kst_span(from, until)),
            ]
        })
        .collect();
    b.push_str(&html::table(
        "holdings",
        &[l.grant, l.program, l.grantee, l.host, l.valid],
        &[false; 5],
        &rows,
    ));
    let moves = c.store.card_moves(Some(uuid))?;
    if !moves.is_empty() {
        let _ = write!(b, "<h2>{}</h2>", t.moves);
        let rows: Vec<Vec<String>> = moves
            .iter()
            .map(|m| {
                vec![
                    html::kst(m.at_ms),
                    esc(&m.from_host_id),
                    esc(&m.to_host_id),
                    esc(&m.actor),
                    esc(&m.reason),
                ]
            })
            .collect();
        b.push_str(&html::table(
            "moves",
            &[t.time, "from", "to", "actor", t.detail],
            &[false; 5],
            &rows,
        ));
    }
    // Heatmap over the period (the report's per-day figures for each grant holding it).
    let days = crate::render::period_days(r.rec.from_ms, r.rec.until_ms);
    let mut heat_rows = Vec::new();
    for (g, _) in &held {
        let cells: Vec<(String, Option<f64>)> = days
            .iter()
            .map(|d| {
                let u = r
                    .days
                    .iter()
                    .find(|x| x.gpu_uuid == uuid && x.grant_id == g.grant_id && x.day == d.day)
                    .and_then(|x| x.utilization_pct);
                (d.day.clone(), u)
            })
            .collect();
        heat_rows.push(vec![esc(&g.grant_id), html::heat_row(&cells)]);
    }
    if !heat_rows.is_empty() {
        let _ = write!(b, "<h2>{}</h2>", t.heatmap);
        b.push_str(&html::table(
            "card-heat",
            &[l.grant, t.heatmap],
            &[false, false],
            &heat_rows,
        ));
    }
    // One day's windows.
    let (day, from, until) = super::grants::chosen_day(r, q)?;
    c.store.retention()?.check_raw(from, "a card's windows")?;
    let windows = c.store.windows(from, until, Some(uuid))?;
    let (shown, page, pages) = html::paginate(&windows, q.page.unwrap_or(1), WINDOWS_PER_PAGE);
    let _ = write!(
        b,
        "<h2>{} · {} <span class=\"muted\">({})</span></h2>\
<form class=\"filters\" method=\"get\"><input type=\"hidden\" name=\"period\" value=\"{}\">\
<label>{}<input name=\"day\" value=\"{}\" size=\"10\"></label><button type=\"submit\">{}</button></form>",
        t.windows,
        esc(&day),
        windows.len(),
        esc(&r.period),
        t.day,
        esc(&day),
        t.apply
    );
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|m| {
            let w = &m.window;
            vec![
                html::kst(w.start_ms),
                format!("{} s", (w.end_ms - w.start_ms) / 1000),
                pct(w.util_avg_pct),
                w.memory_used_max_bytes.map_or_else(
                    || "–".into(),
                    |v| format!("{:.1} GiB", v as f64 / (1u64 << 30) as f64),
                ),
                w.power_avg_w
                    .map_or_else(|| "–".into(), |p| format!("{p:.0} W")),
                esc(w.health),
                esc(w.assignment_status),
                esc(&w.grant_id),
                hours(w.occupied_ms),
                hours(w.active_ms),
                hours(w.foreign_ms),
                m.seq.to_string(),
            ]
        })
        .collect();
    b.push_str(&html::table(
        "windows",
        &[
            t.time,
            "length",
            l.utilization,
            "memory",
            "power",
            t.state,
            "assignment",
            l.grant,
            l.occupied,
            l.active,
            l.foreign,
            "seq",
        ],
        &[
            false, true, true, true, true, false, false, false, true, true, true, true,
        ],
        &rows,
    ));
    b.push_str(&html::pager(
        &format!(
            "/cards/{}?period={}&day={}&",
            url_part(uuid),
            url_part(&r.period),
            url_part(&day)
        ),
        page,
        pages,
        t,
    ));
    // The period's events.
    let events = c
        .store
        .events(r.rec.from_ms, r.rec.until_ms, None, Some(uuid))?;
    let xids: Vec<Vec<String>> = events
        .iter()
        .filter(|e| e.event.kind == "xid")
        .map(|e| {
            vec![
                html::kst(e.event.at_ms),
                e.event.code.to_string(),
                esc(&e.event.detail),
            ]
        })
        .collect();
    let _ = write!(b, "<h2>{}</h2>", t.xids);
    if xids.is_empty() {
        let _ = write!(b, "<p class=\"muted\">{}</p>", t.none);
    } else {
        b.push_str(&html::table(
            "xids",
            &[t.time, "XID", t.detail],
            &[false, true, false],
            &xids,
        ));
    }
    let episodes = crate::episodes::episodes(&events);
    let _ = write!(b, "<h2>{} · {}</h2>", l.violations, t.enforcement);
    let rows: Vec<Vec<String>> = episodes
        .iter()
        .map(|ep| {
            let v = &ep.violation.event;
            let steps = ep
                .follow_ups
                .iter()
                .map(|f| {
                    format!(
                        "{} {} → {}",
                        esc(&html::kst(f.event.at_ms)),
                        esc(&f.event.action),
                        esc(&f.event.result)
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>");
            vec![
                html::kst(v.at_ms),
                v.pid.map_or_else(|| "–".into(), |p| p.to_string()),
                format!("<code>{}</code>", esc(&v.principal)),
                esc(&v.grant_id),
                esc(&v.mode),
                esc(ep.action()),
                esc(ep.result()),
                steps,
            ]
        })
        .collect();
    if rows.is_empty() {
        let _ = write!(b, "<p class=\"muted\">{}</p>", t.none);
    } else {
        b.push_str(&html::table(
            "card-violations",
            &[
                t.time,
                "pid",
                l.principal,
                l.grant,
                "mode",
                t.action,
                t.result,
                t.enforcement,
            ],
            &[false, true, false, false, false, false, false, false],
            &rows,
        ));
    }
    let other: Vec<Vec<String>> = events
        .iter()
        .filter(|e| e.event.kind != "xid" && e.event.kind != "enforcement")
        .map(|e| {
            vec![
                html::kst(e.event.at_ms),
                esc(e.event.kind),
                e.event.code.to_string(),
                esc(&e.event.detail),
            ]
        })
        .collect();
    let _ = write!(b, "<h2>{}</h2>", t.events);
    if other.is_empty() {
        let _ = write!(b, "<p class=\"muted\">{}</p>", t.none);
    } else {
        b.push_str(&html::table(
            "events",
            &[t.time, t.kind, "code", t.detail],
            &[false, false, true, false],
            &other,
        ));
    }
    b.push_str("</div>");
    Ok(c.page(Nav::Cards, &format!("{} {uuid}", t.card_title), &b))
}

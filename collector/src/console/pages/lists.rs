//! Violations (the period's violation episodes, as `violations` and the report count them),
//! alarms, and idle grants to reclaim with the evidence behind each.

use std::fmt::Write as _;

use super::{Ctx, PER_PAGE, PageError, period_line};
use crate::console::ListQuery;
use crate::console::data::Report;
use crate::console::html::{self, Nav, esc, hours, pct, url_part};

pub fn violations(c: &Ctx<'_>, r: &Report, q: &ListQuery) -> Result<String, PageError> {
    let t = c.t;
    let l = t.labels();
    let mut events = c.store.events(
        r.rec.from_ms,
        r.rec.elapsed_until_ms.max(r.rec.from_ms),
        Some("enforcement"),
        None,
    )?;
    // Only records the report's head covers, as the report counts them.
    let covered: std::collections::HashMap<&str, u64> = r
        .head
        .leaves
        .iter()
        .map(|x| (x.agent_id.as_str(), x.seq))
        .collect();
    events.retain(|e| {
        covered
            .get(e.agent_id.as_str())
            .is_some_and(|&s| e.seq <= s)
    });
    let grant = if q.grant.trim().is_empty() {
        None
    } else {
        Some(
            c.store
                .grant(q.grant.trim())?
                .ok_or_else(|| PageError::NotFound(format!("{} {}", l.grant, q.grant)))?
                .grant,
        )
    };
    let episodes = crate::episodes::episodes(&events);
    let kept: Vec<_> = episodes
        .iter()
        .filter(|ep| {
            let e = ep.violation;
            grant
                .as_ref()
                .is_none_or(|g| crate::query::held_at(g, &e.event.gpu_uuid, e.event.at_ms))
                && (q.csp.is_empty() || e.csp == q.csp)
                && (q.kind.is_empty() || ep.action() == q.kind)
        })
        .collect();
    let mut b = String::new();
    b.push_str(&period_line(t, r, "/violations", &[]));
    let _ = write!(
        b,
        "<form class=\"filters\" method=\"get\" action=\"/violations\"><input type=\"hidden\" name=\"period\" value=\"{}\">\
<label>{}<input name=\"grant\" value=\"{}\"></label><label>{}<input name=\"csp\" value=\"{}\"></label>\
<label>{}<select name=\"kind\">",
        esc(&r.period),
        l.grant,
        esc(&q.grant),
        l.csp,
        esc(&q.csp),
        t.action
    );
    for k in ["", "none", "sigterm", "sigkill", "terminate"] {
        let _ = write!(
            b,
            "<option value=\"{k}\"{}>{}</option>",
            if q.kind == k { " selected" } else { "" },
            if k.is_empty() { l.all } else { k }
        );
    }
    let _ = write!(
        b,
        "</select></label><button type=\"submit\">{}</button></form><p class=\"muted\" id=\"violation-count\">{} · {}: {}</p>",
        t.apply,
        kept.len(),
        l.violations,
        r.rec.all_violations
    );
    let (shown, page, pages) = html::paginate(&kept, q.page.unwrap_or(1), PER_PAGE);
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|ep| {
            let e = ep.violation;
            vec![
                html::kst(e.event.at_ms),
                format!(
                    "<a class=\"mono\" href=\"/cards/{}?period={}\">{}</a>",
                    url_part(&e.event.gpu_uuid),
                    url_part(&r.period),
                    esc(&e.event.gpu_uuid)
                ),
                esc(&e.host_id),
                esc(&e.csp),
                esc(&e.event.grant_id),
                format!("<code>{}</code>", esc(&e.event.principal)),
                e.event.pid.map_or_else(|| "–".into(), |p| p.to_string()),
                esc(ep.action()),
                esc(ep.result()),
            ]
        })
        .collect();
    b.push_str(&html::table(
        "violations",
        &[
            t.time,
            l.gpu,
            l.host,
            l.csp,
            l.grant,
            l.principal,
            "pid",
            t.action,
            t.result,
        ],
        &[false, false, false, false, false, false, true, false, false],
        &rows,
    ));
    b.push_str(&html::pager(
        &format!(
            "/violations?period={}&grant={}&csp={}&kind={}&",
            url_part(&r.period),
            url_part(&q.grant),
            url_part(&q.csp),
            url_part(&q.kind)
        ),
        page,
        pages,
        t,
    ));
    Ok(c.page(Nav::Violations, l.violations_title, &b))
}

pub fn alarms(c: &Ctx<'_>, q: &ListQuery) -> Result<String, PageError> {
    let t = c.t;
    let mut alarms = c.store.alarms(None)?;
    let mut kinds: Vec<String> = alarms.iter().map(|a| a.kind.clone()).collect();
    kinds.sort();
    kinds.dedup();
    alarms.retain(|a| {
        (q.kind.is_empty() || a.kind == q.kind) && (q.agent.is_empty() || a.agent_id == q.agent)
    });
    alarms.sort_by_key(|a| std::cmp::Reverse(a.at_ms));
    let mut b = String::new();
    let _ = write!(
        b,
        "<form class=\"filters\" method=\"get\" action=\"/alarms\"><label>{}<select name=\"kind\"><option value=\"\">{}</option>",
        t.kind,
        t.labels().all
    );
    for k in &kinds {
        let _ = write!(
            b,
            "<option value=\"{}\"{}>{}</option>",
            esc(k),
            if *k == q.kind { " selected" } else { "" },
            esc(k)
        );
    }
    let _ = write!(
        b,
        "</select></label><label>agent<input name=\"agent\" value=\"{}\"></label><button type=\"submit\">{}</button></form>\
<p class=\"muted\" id=\"alarm-count\">{}</p>",
        esc(&q.agent),
        t.apply,
        alarms.len()
    );
    let (shown, page, pages) = html::paginate(&alarms, q.page.unwrap_or(1), PER_PAGE);
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|a| {
            vec![
                html::kst(a.at_ms),
                esc(&a.agent_id),
                esc(&a.kind),
                a.seq.map_or_else(|| "–".into(), |s| s.to_string()),
                esc(&a.detail),
            ]
        })
        .collect();
    b.push_str(&html::table(
        "alarms",
        &[t.time, "agent", t.kind, "seq", t.detail],
        &[false, false, false, true, false],
        &rows,
    ));
    b.push_str(&html::pager(
        &format!(
            "/alarms?kind={}&agent={}&",
            url_part(&q.kind),
            url_part(&q.agent)
        ),
        page,
        pages,
        t,
    ));
    Ok(c.page(Nav::Alarms, t.alarms_title, &b))
}

pub fn idle(c: &Ctx<'_>, r: &Report, q: &ListQuery) -> Result<String, PageError> {
    let t = c.t;
    let l = t.labels();
    let idle = &r.rec.idle;
    let mut b = String::new();
    b.push_str(&period_line(t, r, "/idle", &[]));
    let _ = write!(
        b,
        "<p id=\"idle-rule\">{} · {} {}</p>",
        esc(&l.idle_rule(idle.threshold_pct, idle.days)),
        t.as_of,
        esc(&crate::render::kst_minute(idle.as_of_ms))
    );
    if idle.grants.is_empty() {
        let _ = write!(b, "<p class=\"muted\">{}</p>", l.idle_none);
    }
    let (shown, page, pages) = html::paginate(&idle.grants, q.page.unwrap_or(1), PER_PAGE);
    let days = crate::render::period_days(r.rec.from_ms, r.rec.until_ms);
    for g in shown {
        let occupied = r
            .rec
            .grants
            .iter()
            .find(|x| x.grant_id == g.grant_id)
            .map(|x| x.figures.occupied_ms);
        let _ = write!(
            b,
            "<section class=\"idle-grant\" data-grant=\"{id}\"><h2><a href=\"/grants/{uid}?period={p}\">{id}</a> \
<span class=\"muted\">{} · {} · {}</span></h2>",
            esc(l.program_name(&g.program)),
            esc(&g.grantee),
            esc(&g.csp),
            id = esc(&g.grant_id),
            uid = url_part(&g.grant_id),
            p = url_part(&r.period),
        );
        let rows = vec![vec![
            esc(&crate::render::kst_span(
                g.window.from_ms,
                g.window.until_ms,
            )),
            hours(g.allocated_ms),
            hours(g.delivered_ms),
            hours(g.active_ms),
            format!(
                "<b class=\"idle-util\">{}</b>",
                pct(Some(g.utilization_pct))
            ),
            occupied.map_or_else(|| "–".into(), hours),
        ]];
        b.push_str(&html::table(
            "idle-figures",
            &[
                l.lookback,
                l.allocated,
                l.delivered,
                l.active,
                l.utilization,
                &format!("{} ({})", t.occupied_days, l.period),
            ],
            &[false, true, true, true, true, true],
            &rows,
        ));
        // Evidence: each reclaimable card's utilization per day in the period.
        let rows: Vec<Vec<String>> = g
            .reclaimable_cards
            .iter()
            .map(|rc| {
                let cells: Vec<(String, Option<f64>)> = days
                    .iter()
                    .map(|d| {
                        let u = r
                            .days
                            .iter()
                            .find(|x| {
                                x.grant_id == g.grant_id
                                    && x.gpu_uuid == rc.gpu_uuid
                                    && x.day == d.day
                            })
                            .and_then(|x| x.utilization_pct);
                        (d.day.clone(), u)
                    })
                    .collect();
                vec![
                    format!(
                        "<a class=\"mono\" href=\"/cards/{}?period={}\">{}</a>",
                        url_part(&rc.gpu_uuid),
                        url_part(&r.period),
                        esc(&rc.gpu_uuid)
                    ),
                    esc(&rc.host_id),
                    hours(rc.allocated_ms),
                    hours(rc.active_ms),
                    pct(Some(rc.utilization_pct)),
                    html::heat_row(&cells),
                ]
            })
            .collect();
        let _ = write!(b, "<h3>{} · {}</h3>", t.evidence, l.reclaimable_cards);
        b.push_str(&html::table(
            "idle-cards",
            &[
                l.gpu,
                l.host,
                l.allocated,
                l.active,
                l.utilization,
                t.heatmap,
            ],
            &[false, false, true, true, true, false],
            &rows,
        ));
        b.push_str("</section>");
    }
    b.push_str(&html::pager(
        &format!("/idle?period={}&", url_part(&r.period)),
        page,
        pages,
        t,
    ));
    Ok(c.page(Nav::Idle, l.idle_title, &b))
}

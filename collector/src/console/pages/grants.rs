//! Grants: the list with allocated / delivered / active bars and filters by program, CSP and
//! grantee; a grant's page with its figures, each card's per-day heatmap (the report's own
//! per-day figures) and per-hour utilization for one day, its tenants, its history; and its
//! jobs for one day.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Ctx, PER_PAGE, PageError, period_line, state_badge};
use crate::console::ListQuery;
use crate::console::data::Report;
use crate::console::html::{self, Nav, esc, hours, pct, url_part};
use crate::reconcile::{self, Figures, GrantRow, IdleSettings, Inputs};

const HOUR_MS: i64 = 3_600_000;

/// Each card's figures hour by hour, and the windows they were computed from.
pub type Hourly = (
    BTreeMap<String, Vec<Figures>>,
    Vec<crate::store::MeteredWindow>,
);
const DAY_MS: i64 = 86_400_000;

/// The grants the filters keep, in report order.
pub fn filtered<'a>(r: &'a Report, q: &ListQuery) -> Vec<&'a GrantRow> {
    let grantee = q.grantee.trim().to_lowercase();
    r.rec
        .grants
        .iter()
        .filter(|g| q.program.is_empty() || g.program == q.program)
        .filter(|g| q.csp.is_empty() || g.csp == q.csp.trim().to_lowercase() || g.csp == q.csp)
        .filter(|g| grantee.is_empty() || g.grantee.to_lowercase().contains(&grantee))
        .collect()
}

fn option(value: &str, label: &str, selected: &str) -> String {
    format!(
        "<option value=\"{}\"{}>{}</option>",
        esc(value),
        if value == selected { " selected" } else { "" },
        esc(label)
    )
}

pub fn list(c: &Ctx<'_>, r: &Report, q: &ListQuery) -> Result<String, PageError> {
    let t = c.t;
    let l = t.labels();
    let mut b = String::with_capacity(64 << 10);
    let _ = write!(
        b,
        "<div data-live=\"grants\" data-live-view=\"grants\" data-live-program=\"{}\">",
        esc(&q.program)
    );
    b.push_str(&period_line(t, r, "/grants", &[]));
    // Filters.
    let mut csps: Vec<&str> = r.rec.csps.iter().map(|c| c.csp.as_str()).collect();
    csps.dedup();
    let _ = write!(
        b,
        "<form class=\"filters\" id=\"grant-filters\" method=\"get\" action=\"/grants\">\
<input type=\"hidden\" name=\"period\" value=\"{}\"><label>{}<select name=\"program\">{}",
        esc(&r.period),
        l.program,
        option("", l.all, &q.program)
    );
    for p in ["hpc", "research", "advanced"] {
        b.push_str(&option(p, l.program_name(p), &q.program));
    }
    let _ = write!(
        b,
        "</select></label><label>{}<select name=\"csp\">{}",
        l.csp,
        option("", l.all, &q.csp)
    );
    for csp in csps {
        b.push_str(&option(csp, csp, &q.csp));
    }
    let _ = write!(
        b,
        "</select></label><label>{}<input name=\"grantee\" value=\"{}\"></label>\
<button type=\"submit\">{}</button></form>",
        l.grantee,
        esc(&q.grantee),
        t.apply
    );
    let kept = filtered(r, q);
    let (shown, page, pages) = html::paginate(&kept, q.page.unwrap_or(1), PER_PAGE);
    let _ = write!(
        b,
        "<p class=\"muted\" id=\"grant-count\">{} {}</p>",
        kept.len(),
        l.grants
    );
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|g| {
            let f = &g.figures;
            vec![
                format!(
                    "<a href=\"/grants/{}?period={}\">{}</a>",
                    url_part(&g.grant_id),
                    url_part(&r.period),
                    esc(&g.grant_id)
                ),
                esc(l.program_name(&g.program)),
                esc(&g.grantee),
                esc(&g.csp),
                g.cards.len().to_string(),
                format!(
                    "<span class=\"fig-allocated\" data-ms=\"{}\">{}</span>",
                    f.allocated_ms,
                    hours(f.allocated_ms)
                ),
                format!(
                    "<span class=\"fig-delivered\" data-ms=\"{}\">{}</span>",
                    f.delivered_ms,
                    hours(f.delivered_ms)
                ),
                format!(
                    "<span class=\"fig-active\" data-ms=\"{}\">{}</span>",
                    f.active_ms,
                    hours(f.active_ms)
                ),
                pct(html::ratio(f.active_ms, f.allocated_ms)),
                html::bars(f.allocated_ms, f.delivered_ms, f.active_ms, t),
                "<span class=\"live-reporting\">…</span>".into(),
                "<span class=\"live-idle\">…</span>".into(),
                "<span class=\"live-violating\">…</span>".into(),
            ]
        })
        .collect();
    let table = html::table(
        "grants",
        &[
            l.grant,
            l.program,
            l.grantee,
            l.csp,
            l.cards,
            l.allocated,
            l.delivered,
            l.active,
            l.utilization,
            "",
            "reporting",
            l.idle,
            l.violations,
        ],
        &[
            false, false, false, false, true, true, true, true, true, false, true, true, true,
        ],
        &rows,
    );
    b.push_str(&html::tag_rows(
        &table,
        shown.iter().map(|g| ("data-grant", g.grant_id.as_str())),
    ));
    let base = format!(
        "/grants?period={}&program={}&csp={}&grantee={}&",
        url_part(&r.period),
        url_part(&q.program),
        url_part(&q.csp),
        url_part(&q.grantee)
    );
    b.push_str(&html::pager(&base, page, pages, t));
    b.push_str("</div>");
    Ok(c.page(Nav::Grants, l.grants, &b))
}

/// The figures of one row, as the report's table names them.
fn figures_table(t: &crate::console::i18n::T, f: &Figures) -> String {
    let l = t.labels();
    let rows = vec![
        vec![l.allocated.to_string(), hours(f.allocated_ms)],
        vec![l.unmetered.to_string(), hours(f.unmetered_ms)],
        vec![l.unavailable.to_string(), hours(f.unavailable_ms)],
        vec![l.delivered.to_string(), hours(f.delivered_ms)],
        vec![l.occupied.to_string(), hours(f.occupied_ms)],
        vec![l.active.to_string(), hours(f.active_ms)],
        vec![l.idle.to_string(), hours(f.idle_ms)],
        vec![l.unattributed.to_string(), hours(f.unattributed_ms)],
        vec![l.foreign.to_string(), hours(f.foreign_ms)],
        vec![
            l.utilization.to_string(),
            pct(html::ratio(f.active_ms, f.allocated_ms)),
        ],
        vec![
            l.energy.to_string(),
            format!("{:.2}", reconcile::kwh(f.energy_mj)),
        ],
        vec![l.violations.to_string(), f.violations.to_string()],
    ];
    html::table("figures", &["", l.gpu_hours], &[false, true], &rows)
}

/// The day a page shows hour by hour: `q.day`, else the last elapsed day of the period.
pub fn chosen_day(r: &Report, q: &ListQuery) -> Result<(String, i64, i64), PageError> {
    if !q.day.trim().is_empty() {
        let (from, until) = crate::report::parse_period(q.day.trim())
            .map_err(|e| PageError::BadRequest(format!("day: {e}")))?;
        if until - from != DAY_MS {
            return Err(PageError::BadRequest(
                "day: one calendar day (YYYY-MM-DD)".into(),
            ));
        }
        return Ok((q.day.trim().to_string(), from, until));
    }
    let end = r.rec.elapsed_until_ms.max(r.rec.from_ms + 1);
    let days = crate::render::period_days(r.rec.from_ms, r.rec.until_ms);
    let day = days
        .iter()
        .rev()
        .find(|d| d.span.from_ms < end)
        .or(days.first())
        .ok_or_else(|| PageError::BadRequest("period: no day".into()))?;
    let (from, until) = crate::report::parse_period(&day.day)
        .map_err(|e| PageError::BadRequest(format!("day: {e}")))?;
    Ok((day.day.clone(), from, until))
}

/// Per hour of `[from, from + 24 h)`, each card's figures under `grant`: the reconciliation
/// engine run on the grant's cards' windows of that day, one hour at a time.
pub fn hourly(
    c: &Ctx<'_>,
    grant: &crate::grants::Grant,
    from: i64,
    until: i64,
    as_of_ms: i64,
) -> Result<Hourly, PageError> {
    c.store.retention()?.check_raw(from, "a grant's hours")?;
    let mut windows = Vec::new();
    let mut events = Vec::new();
    for card in &grant.cards {
        windows.extend(c.store.windows(from, until, Some(&card.gpu_uuid))?);
        events.extend(
            c.store
                .events(from, until, Some("enforcement"), Some(&card.gpu_uuid))?,
        );
    }
    let grants = std::slice::from_ref(grant);
    let mut out: BTreeMap<String, Vec<Figures>> = BTreeMap::new();
    let mut h = from;
    while h < until {
        let rec = reconcile::reconcile_as_of(
            &Inputs {
                period: "",
                from_ms: h,
                until_ms: (h + HOUR_MS).min(until),
                program: None,
                grant_id: Some(&grant.grant_id),
                grants,
                windows: &windows,
                events: &events,
                invoices: &[],
                idle: IdleSettings {
                    threshold_pct: 0.0,
                    days: 1,
                    as_of_ms: h,
                },
            },
            as_of_ms,
        );
        for card in &grant.cards {
            let f = rec
                .grants
                .iter()
                .flat_map(|g| &g.cards)
                .find(|x| x.gpu_uuid == card.gpu_uuid)
                .map(|x| x.figures)
                .unwrap_or_default();
            out.entry(card.gpu_uuid.clone()).or_default().push(f);
        }
        h += HOUR_MS;
    }
    Ok((out, windows))
}

pub fn detail(c: &Ctx<'_>, r: &Report, id: &str, q: &ListQuery) -> Result<String, PageError> {
    let t = c.t;
    let l = t.labels();
    let record = c
        .store
        .grant(id)?
        .ok_or_else(|| PageError::NotFound(format!("{} {id}", l.grant)))?;
    let g = &record.grant;
    let row = r.rec.grants.iter().find(|x| x.grant_id == id);
    let mut b = String::with_capacity(64 << 10);
    let _ = write!(
        b,
        "<div data-live=\"grant\" data-live-grant=\"{}\">",
        esc(id)
    );
    b.push_str(&period_line(
        t,
        r,
        &format!("/grants/{}", url_part(id)),
        &[],
    ));
    let valid = crate::render::kst_span(g.valid_from_ms, g.effective_until_ms());
    let rows = vec![
        vec![
            l.program.to_string(),
            esc(l.program_name(g.program.as_str())),
        ],
        vec![l.grantee.to_string(), esc(&g.grantee)],
        vec![
            l.principal.to_string(),
            format!("<code>{}</code>", esc(&g.principal.to_string())),
        ],
        vec![l.csp.to_string(), esc(&g.csp)],
        vec![l.valid.to_string(), esc(&valid)],
        vec![l.cards.to_string(), g.cards.len().to_string()],
    ];
    b.push_str(&html::table(
        "grant-info",
        &["", ""],
        &[false, false],
        &rows,
    ));
    match row {
        Some(row) => {
            let _ = write!(b, "<h2>{}</h2>", l.summary);
            b.push_str(&html::bars(
                row.figures.allocated_ms,
                row.figures.delivered_ms,
                row.figures.active_ms,
                t,
            ));
            b.push_str(&figures_table(t, &row.figures));
        }
        None => {
            let _ = write!(b, "<p class=\"muted\">{}</p>", l.not_allocated);
        }
    }
    // Cards: live state, figures, per-day heatmap.
    let _ = write!(b, "<h2>{} · {}</h2>", l.cards, t.heatmap);
    let period_days = crate::render::period_days(r.rec.from_ms, r.rec.until_ms);
    let mut per_card: BTreeMap<&str, BTreeMap<&str, Option<f64>>> = BTreeMap::new();
    for d in r.days.iter().filter(|d| d.grant_id == id) {
        per_card
            .entry(d.gpu_uuid.as_str())
            .or_default()
            .insert(d.day.as_str(), d.utilization_pct);
    }
    let cards: Vec<(&str, &str, Figures)> = match row {
        Some(row) => row
            .cards
            .iter()
            .map(|x| (x.host_id.as_str(), x.gpu_uuid.as_str(), x.figures))
            .collect(),
        None => g
            .cards
            .iter()
            .map(|x| (x.host_id.as_str(), x.gpu_uuid.as_str(), Figures::default()))
            .collect(),
    };
    let card_rows: Vec<Vec<String>> = cards
        .iter()
        .map(|(host, gpu, f)| {
            let days = per_card.get(gpu);
            let cells: Vec<(String, Option<f64>)> = period_days
                .iter()
                .map(|d| {
                    (
                        d.day.clone(),
                        days.and_then(|m| m.get(d.day.as_str()).copied().flatten()),
                    )
                })
                .collect();
            vec![
                format!(
                    "<a class=\"mono\" href=\"/cards/{}?period={}\">{}</a>",
                    url_part(gpu),
                    url_part(&r.period),
                    esc(gpu)
                ),
                esc(host),
                state_badge(t, "…"),
                "<span class=\"live-util\">–</span>".into(),
                hours(f.allocated_ms),
                hours(f.delivered_ms),
                hours(f.active_ms),
                pct(html::ratio(f.active_ms, f.allocated_ms)),
                html::heat_row(&cells),
            ]
        })
        .collect();
    let table = html::table(
        "grant-cards",
        &[
            l.gpu,
            l.host,
            t.state,
            l.utilization,
            l.allocated,
            l.delivered,
            l.active,
            l.utilization,
            t.heatmap,
        ],
        &[false, false, false, true, true, true, true, true, false],
        &card_rows,
    );
    b.push_str(&html::tag_rows(
        &table,
        cards.iter().map(|(_, gpu, _)| ("data-card", *gpu)),
    ));
    // One day, hour by hour.
    let (day, from, until) = chosen_day(r, q)?;
    let _ = write!(
        b,
        "<h2>{} · {}</h2><form class=\"filters\" method=\"get\"><input type=\"hidden\" name=\"period\" value=\"{}\">\
<label>{}<input name=\"day\" value=\"{}\" size=\"10\"></label><button type=\"submit\">{}</button></form>",
        t.hourly,
        esc(&day),
        esc(&r.period),
        t.day,
        esc(&day),
        t.apply
    );
    let (hourly, windows) = hourly(c, g, from, until, r.rec.as_of_ms)?;
    let hour_rows: Vec<Vec<String>> = hourly
        .iter()
        .map(|(gpu, figs)| {
            let cells: Vec<(String, Option<f64>)> = figs
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let u = (f.delivered_ms > 0)
                        .then(|| html::ratio(f.active_ms, f.allocated_ms).unwrap_or(0.0));
                    (format!("{day} {i:02}:00"), u)
                })
                .collect();
            vec![
                format!("<span class=\"mono\">{}</span>", esc(gpu)),
                html::heat_row(&cells),
            ]
        })
        .collect();
    b.push_str(&html::table(
        "hourly",
        &[l.gpu, t.hourly],
        &[false, false],
        &hour_rows,
    ));
    // Tenants of that day: each principal's occupied and active time on the grant's cards,
    // summed from the windows' principal rows as `Store::usage` sums them.
    let mut tenants: BTreeMap<(&str, bool), (u64, u64, u64)> = BTreeMap::new();
    for w in &windows {
        if w.window.grant_id != id {
            continue;
        }
        for p in &w.window.principals {
            let e = tenants
                .entry((p.principal.as_str(), p.matches_grant))
                .or_default();
            e.0 += p.occupied_ms;
            e.1 += p.active_ms;
            e.2 = e.2.max(p.memory_max_bytes);
        }
    }
    let _ = write!(b, "<h2>{} · {}</h2>", t.tenants, esc(&day));
    let tenant_rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|((p, ok), (occ, act, mem))| {
            vec![
                format!("<code>{}</code>", esc(p)),
                if *ok {
                    "✓".into()
                } else {
                    format!("<span class=\"error\">{}</span>", l.foreign)
                },
                hours(*occ),
                hours(*act),
                format!("{:.1} GiB", *mem as f64 / (1u64 << 30) as f64),
            ]
        })
        .collect();
    if tenant_rows.is_empty() {
        let _ = write!(b, "<p class=\"muted\">{}</p>", t.none);
    } else {
        b.push_str(&html::table(
            "tenants",
            &[l.principal, l.grant, l.occupied, l.active, "memory"],
            &[false, false, true, true, true],
            &tenant_rows,
        ));
    }
    let _ = write!(
        b,
        "<p><a id=\"jobs-link\" href=\"/grants/{}/jobs?day={}\">{} · {}</a></p>",
        url_part(id),
        url_part(&day),
        t.jobs,
        esc(&day)
    );
    // History.
    let _ = write!(b, "<h2>{}</h2>", t.history);
    let hist: Vec<Vec<String>> = record
        .history
        .iter()
        .map(|h| {
            vec![
                html::kst(h.at_ms),
                esc(&h.actor),
                esc(&h.action),
                esc(&h.detail),
            ]
        })
        .collect();
    b.push_str(&html::table(
        "history",
        &[t.time, "actor", t.action, t.detail],
        &[false; 4],
        &hist,
    ));
    b.push_str("</div>");
    Ok(c.page(Nav::Grants, &format!("{} {id}", t.grant_title), &b))
}

/// A grant's jobs on one day ([`crate::jobs::jobs`] over that day's signed window bodies, as
/// `report --view jobs` reads them). It reads the bodies of the cards the grant ever held
/// (the cards a window saying this grant can come from), a page of its own rather than part
/// of the grant's.
pub fn jobs(c: &Ctx<'_>, id: &str, q: &ListQuery) -> Result<String, PageError> {
    let t = c.t;
    let l = t.labels();
    let (from, until) = crate::report::parse_period(q.day.trim())
        .map_err(|e| PageError::BadRequest(format!("day: {e}")))?;
    if until - from > DAY_MS {
        return Err(PageError::BadRequest(
            "day: one calendar day (YYYY-MM-DD)".into(),
        ));
    }
    let record = c
        .store
        .grant(id)?
        .ok_or_else(|| PageError::NotFound(format!("{} {id}", l.grant)))?;
    let cards: Vec<String> = record
        .grant
        .cards
        .iter()
        .map(|k| k.gpu_uuid.clone())
        .collect();
    c.store.retention()?.check_raw(from, "the jobs view")?;
    let bodies = c.store.window_bodies(from, until, Some(&cards))?;
    let jobs = crate::jobs::jobs(&bodies, Some(id));
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                esc(&j.kind),
                format!("<code>{}</code>", esc(&j.job_id)),
                format!("<code>{}</code>", esc(&j.principal)),
                j.gpu_uuids.len().to_string(),
                html::kst(j.first_ms),
                html::kst(j.last_ms),
                hours(j.occupied_ms),
                hours(j.active_ms),
            ]
        })
        .collect();
    let mut b = String::new();
    if rows.is_empty() {
        let _ = write!(b, "<p class=\"muted\">{}</p>", t.none);
    } else {
        b.push_str(&html::table(
            "jobs",
            &[
                "kind",
                t.jobs,
                l.principal,
                l.cards,
                "from",
                "until",
                l.occupied,
                l.active,
            ],
            &[false, false, false, true, false, false, true, true],
            &rows,
        ));
    }
    Ok(c.page(
        Nav::Grants,
        &format!("{} {id} · {} {}", t.grant_title, t.jobs, q.day.trim()),
        &b,
    ))
}

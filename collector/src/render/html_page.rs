//! The HTML report: one self-contained page (inline CSS and SVG, no script, no font or image
//! to fetch) that a browser renders offline.
//!
//! A Content-Security-Policy of `default-src 'none'` in the page itself makes the browser
//! refuse any fetch, so the page cannot leak that it was opened, and stays complete when mailed
//! or archived. Every text from the data (grantee names, ids) is escaped.
//!
//! Sections, in order: summary; allocated vs delivered vs active per grant; per grant, a
//! day-by-card utilization heatmap; program and CSP totals (table and bars); idle grants to
//! reclaim; violations and use of unassigned cards; invoices vs delivered (when any invoice
//! was imported); every grant's figures; the glossary; the footer.
//!
//! Times are KST throughout, the zone named in the header; end dates read inclusive. A period
//! still in progress says so under the title, and its days after the as-of are drawn as "not
//! yet elapsed" in the heatmaps.
//!
//! Print. An A4-landscape print stylesheet keeps every column of every table: tables take the
//! page's width with small type, cells wrap (long ids break anywhere, numbers never), header
//! rows repeat on every page (`thead` as a table-header group), rows do not split across
//! pages, and each page's bottom margin names the period, the filters, the as-of and the
//! report's provenance ([`provenance_slot`]: today the as-of and a SHA-256 of the report's
//! JSON; the ledger head the report was computed from goes there once reports carry it).

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::reconcile::{Figures, Reconciliation, gpu_hours};

use super::days::period_days;
use super::labels::Labels;
use super::svg::{BarGroup, Cell, Series, clip, esc, grouped_bars, heatmap, num};
use super::{CardDay, Lang, as_of_note, glossary, kst_minute, kst_span};

const CSS: &str = r#"
:root { color-scheme: light; }
body { font-family: "Noto Sans CJK KR", "Noto Sans KR", "Malgun Gothic", "Apple SD Gothic Neo", system-ui, sans-serif; margin: 24px 32px; color: #1f2933; background: #ffffff; font-size: 14px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 8px; border-bottom: 2px solid #d9e2ec; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 4px; }
.meta, .note { color: #52606d; margin: 4px 0 8px; }
.tiles { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 12px; }
.tile { border: 1px solid #d9e2ec; border-radius: 6px; padding: 10px 14px; min-width: 130px; }
.tile .k { color: #52606d; font-size: 12px; }
.tile .v { font-size: 20px; font-weight: 600; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #d9e2ec; padding: 3px 8px; text-align: left; vertical-align: top; white-space: nowrap; }
th { background: #f0f4f8; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.neg { color: #b42318; }
tr.total td { font-weight: 600; background: #f8fafc; }
svg.chart text { font-size: 12px; fill: #1f2933; }
svg.chart text.value, svg.chart text.axis { fill: #52606d; font-size: 11px; }
svg.chart text.month { font-weight: 600; }
.bar.allocated, .legend.allocated { fill: #9ecae1; }
.bar.delivered, .legend.delivered { fill: #3182bd; }
.bar.active, .legend.active { fill: #e6550d; }
.bar.unassigned, .legend.unassigned { fill: #756bb1; }
.bar.billed, .legend.billed { fill: #31a354; }
rect.cell { stroke: #e4e7eb; stroke-width: 0.5; }
.swatch { display: inline-block; width: 14px; height: 12px; border: 1px solid #cbd2d9; vertical-align: middle; margin: 0 4px 0 12px; }
footer { margin-top: 40px; color: #52606d; font-size: 12px; }
dl.glossary { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.glossary dt { font-weight: 600; }
dl.glossary dd { margin: 0; }
.asof { border-left: 4px solid #d97706; background: #fff7e6; padding: 6px 10px; }
@page { size: A4 landscape; margin: 10mm 8mm 14mm 8mm; }
@media print {
  body { margin: 0; font-size: 8pt; }
  h1 { font-size: 14pt; }
  h2 { font-size: 11pt; margin: 12px 0 4px; break-after: avoid; }
  h3 { font-size: 9pt; break-after: avoid; }
  .scroll { overflow: visible; }
  table { width: 100%; font-size: 6.5pt; }
  thead { display: table-header-group; }
  tr { break-inside: avoid; }
  th, td { white-space: normal; padding: 1px 3px; }
  td { overflow-wrap: anywhere; }
  td.n { white-space: nowrap; }
  svg.chart { max-width: 100%; height: auto; }
  .tile { padding: 4px 8px; min-width: 90px; }
  .tile .v { font-size: 12pt; }
}
"#;

/// A table cell: text (escaped here), lines of text, or a number (right-aligned).
enum Td {
    Text(String),
    Lines(Vec<String>),
    Num(String),
    Neg(String),
}

fn table(headers: &[&str], rows: &[(bool, Vec<Td>)]) -> String {
    let mut s = String::from("<div class=\"scroll\"><table><thead><tr>");
    for h in headers {
        s.push_str(&format!("<th>{}</th>", esc(h)));
    }
    s.push_str("</tr></thead><tbody>");
    for (total, cells) in rows {
        s.push_str(if *total {
            "<tr class=\"total\">"
        } else {
            "<tr>"
        });
        for c in cells {
            match c {
                Td::Text(t) => s.push_str(&format!("<td>{}</td>", esc(t))),
                Td::Lines(ls) => {
                    let ls: Vec<String> = ls.iter().map(|l| esc(l)).collect();
                    s.push_str(&format!("<td>{}</td>", ls.join("<br>")));
                }
                Td::Num(t) => s.push_str(&format!("<td class=\"n\">{}</td>", esc(t))),
                Td::Neg(t) => s.push_str(&format!("<td class=\"n neg\">{}</td>", esc(t))),
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table></div>");
    s
}

fn h(ms: u64) -> Td {
    Td::Num(num(gpu_hours(ms), 2))
}

fn pct(p: Option<f64>) -> Td {
    Td::Num(p.map_or("-".to_owned(), |p| format!("{}%", num(p, 1))))
}

/// The figure columns shared by the grant, program and CSP tables.
fn figure_headers(l: &Labels) -> [&'static str; 12] {
    [
        l.allocated,
        l.unmetered,
        l.unavailable,
        l.delivered,
        l.occupied,
        l.active,
        l.idle,
        l.foreign,
        l.unattributed,
        l.utilization,
        l.energy,
        l.violations,
    ]
}

fn figure_cells(f: &Figures) -> Vec<Td> {
    vec![
        h(f.allocated_ms),
        h(f.unmetered_ms),
        h(f.unavailable_ms),
        h(f.delivered_ms),
        h(f.occupied_ms),
        h(f.active_ms),
        h(f.idle_ms),
        h(f.foreign_ms),
        h(f.unattributed_ms),
        pct(f.utilization_pct()),
        Td::Num(num(f.energy_kwh(), 2)),
        Td::Num(f.violations.to_string()),
    ]
}

fn three_series(l: &Labels) -> [Series<'static>; 3] {
    [
        Series {
            class: "allocated",
            label: l.allocated,
        },
        Series {
            class: "delivered",
            label: l.delivered,
        },
        Series {
            class: "active",
            label: l.active,
        },
    ]
}

fn three_values(f: &Figures) -> Vec<f64> {
    vec![
        f.allocated_gpu_hours(),
        f.delivered_gpu_hours(),
        f.active_gpu_hours(),
    ]
}

fn tile(k: &str, v: &str) -> String {
    format!(
        "<div class=\"tile\"><div class=\"k\">{}</div><div class=\"v\">{}</div></div>",
        esc(k),
        esc(v)
    )
}

fn summary(r: &Reconciliation, l: &Labels) -> String {
    let t = &r.total;
    let cards: usize = r.grants.iter().map(|g| g.cards.len()).sum();
    let gh = |ms: u64| format!("{} {}", num(gpu_hours(ms), 1), l.gpu_hours);
    let mut s = format!(
        "<section id=\"summary\"><h2>{}</h2><div class=\"tiles\">",
        esc(l.summary)
    );
    for (k, v) in [
        (l.grants, r.grants.len().to_string()),
        (l.cards, cards.to_string()),
        (l.allocated, gh(t.allocated_ms)),
        (l.delivered, gh(t.delivered_ms)),
        (l.active, gh(t.active_ms)),
        (
            l.utilization,
            t.utilization_pct()
                .map_or("-".into(), |p| format!("{}%", num(p, 1))),
        ),
        (l.idle_title, r.idle.grants.len().to_string()),
        (l.violations, t.violations.to_string()),
    ] {
        s.push_str(&tile(k, &v));
    }
    s.push_str("</div></section>");
    s
}

fn grants_chart(r: &Reconciliation, l: &Labels) -> String {
    let mut s = format!(
        "<section id=\"grants\"><h2>{}</h2><p class=\"note\">{}</p>",
        esc(l.chart_grants),
        esc(l.chart_grants_note)
    );
    if r.grants.is_empty() {
        s.push_str(&format!("<p>{}</p>", esc(l.no_grants)));
    } else {
        let groups: Vec<BarGroup> = r
            .grants
            .iter()
            .map(|g| BarGroup {
                label: format!("{} · {}", g.grant_id, g.grantee),
                title: format!("{} · {} · {}", g.grant_id, g.grantee, g.program),
                values: three_values(&g.figures),
            })
            .collect();
        s.push_str("<div class=\"scroll\">");
        s.push_str(&grouped_bars(
            "chart-grants",
            &three_series(l),
            &groups,
            l.gpu_hours,
        ));
        s.push_str("</div>");
    }
    s.push_str("</section>");
    s
}

fn heatmaps(r: &Reconciliation, days: &[CardDay], l: &Labels) -> String {
    let mut s = format!(
        "<section id=\"heatmaps\"><h2>{}</h2><p class=\"note\">{}",
        esc(l.heatmaps),
        esc(l.heatmaps_note)
    );
    for (fill, label) in [
        ("#eef3fb", "0%"),
        ("#6baed6", "50%"),
        ("#08306b", "100%"),
        ("#bdbdbd", l.no_data),
        ("#ffffff", l.not_allocated),
        ("#f5f0e1", l.not_elapsed),
    ] {
        s.push_str(&format!(
            "<span class=\"swatch\" style=\"background:{fill}\"></span>{}",
            esc(label)
        ));
    }
    s.push_str("</p>");
    let spans = period_days(r.from_ms, r.until_ms);
    let period: Vec<String> = spans.iter().map(|d| d.day.clone()).collect();
    let starts: Vec<(String, i64)> = spans.into_iter().map(|d| (d.day, d.span.from_ms)).collect();
    let by_key: HashMap<(&str, &str, &str), &CardDay> = days
        .iter()
        .map(|d| {
            (
                (d.grant_id.as_str(), d.gpu_uuid.as_str(), d.day.as_str()),
                d,
            )
        })
        .collect();
    for (gi, g) in r.grants.iter().enumerate() {
        s.push_str(&format!(
            "<h3>{} · {}</h3><div class=\"scroll\">",
            esc(&g.grant_id),
            esc(&g.grantee)
        ));
        let rows: Vec<(String, String)> = g
            .cards
            .iter()
            .map(|c| {
                (
                    format!("{} · {}", c.host_id, clip(&c.gpu_uuid, 16)),
                    format!("{} {}", c.host_id, c.gpu_uuid),
                )
            })
            .collect();
        let cells: Vec<Vec<Cell>> = g
            .cards
            .iter()
            .map(|c| {
                starts
                    .iter()
                    .map(|(day, start)| {
                        match by_key.get(&(g.grant_id.as_str(), c.gpu_uuid.as_str(), day.as_str()))
                        {
                            _ if *start >= r.elapsed_until_ms => Cell::NotElapsed,
                            None => Cell::NotAllocated,
                            Some(d) => d.utilization_pct.map_or(Cell::NoData, Cell::Pct),
                        }
                    })
                    .collect()
            })
            .collect();
        s.push_str(&heatmap(&format!("heat-{gi}"), &rows, &period, &cells));
        s.push_str("</div>");
    }
    if r.grants.is_empty() {
        s.push_str(&format!("<p>{}</p>", esc(l.no_grants)));
    }
    s.push_str("</section>");
    s
}

fn programs(r: &Reconciliation, l: &Labels) -> String {
    let mut s = format!("<section id=\"programs\"><h2>{}</h2>", esc(l.programs));
    let mut headers = vec![l.program, l.grants, l.cards];
    headers.extend(figure_headers(l));
    let mut rows: Vec<(bool, Vec<Td>)> = r
        .programs
        .iter()
        .map(|p| {
            let mut cells = vec![
                Td::Text(format!("{} ({})", l.program_name(&p.program), p.program)),
                Td::Num(p.grants.to_string()),
                Td::Num(p.cards.to_string()),
            ];
            cells.extend(figure_cells(&p.figures));
            (false, cells)
        })
        .collect();
    let cards: usize = r.grants.iter().map(|g| g.cards.len()).sum();
    let mut total = vec![
        Td::Text(l.total.to_owned()),
        Td::Num(r.grants.len().to_string()),
        Td::Num(cards.to_string()),
    ];
    total.extend(figure_cells(&r.total));
    rows.push((true, total));
    s.push_str(&table(&headers, &rows));
    let groups: Vec<BarGroup> = r
        .programs
        .iter()
        .map(|p| BarGroup {
            label: l.program_name(&p.program).to_owned(),
            title: p.program.clone(),
            values: three_values(&p.figures),
        })
        .collect();
    if !groups.is_empty() {
        s.push_str("<div class=\"scroll\">");
        s.push_str(&grouped_bars(
            "chart-programs",
            &three_series(l),
            &groups,
            l.gpu_hours,
        ));
        s.push_str("</div>");
    }
    s.push_str("</section>");
    s
}

fn csps(r: &Reconciliation, l: &Labels) -> String {
    let mut s = format!("<section id=\"csps\"><h2>{}</h2>", esc(l.csps));
    let mut headers = vec![l.csp, l.grants, l.cards];
    headers.extend(figure_headers(l));
    headers.push(l.unassigned_use);
    headers.push(l.unassigned_violations);
    let rows: Vec<(bool, Vec<Td>)> = r
        .csps
        .iter()
        .map(|c| {
            let mut cells = vec![
                Td::Text(c.csp.clone()),
                Td::Num(c.grants.to_string()),
                Td::Num(c.cards.to_string()),
            ];
            cells.extend(figure_cells(&c.figures));
            cells.push(h(c.unassigned_use_ms));
            cells.push(Td::Num(c.unassigned_violations.to_string()));
            (false, cells)
        })
        .collect();
    s.push_str(&table(&headers, &rows));
    let [a, d, ac] = three_series(l);
    let series = [
        a,
        d,
        ac,
        Series {
            class: "unassigned",
            label: l.unassigned_use,
        },
    ];
    let groups: Vec<BarGroup> = r
        .csps
        .iter()
        .map(|c| {
            let mut values = three_values(&c.figures);
            values.push(gpu_hours(c.unassigned_use_ms));
            BarGroup {
                label: c.csp.clone(),
                title: c.csp.clone(),
                values,
            }
        })
        .collect();
    if !groups.is_empty() {
        s.push_str("<div class=\"scroll\">");
        s.push_str(&grouped_bars("chart-csps", &series, &groups, l.gpu_hours));
        s.push_str("</div>");
    }
    s.push_str("</section>");
    s
}

/// The providers section (once a provider is registered): per CSP and program, committed,
/// registered, healthy, granted and delivered cards, each column defined under the table.
fn fleet(r: &Reconciliation, lang: Lang) -> String {
    if r.fleet.is_empty() {
        return String::new();
    }
    let ko = lang == Lang::Ko;
    let (title, headers) = if ko {
        (
            "사업자별 공급 현황 (GPU 수)",
            [
                "CSP",
                "사업자",
                "사업",
                "약정",
                "등록 서버",
                "등록 GPU",
                "정상 GPU",
                "배정 GPU",
                "제공 GPU",
            ],
        )
    } else {
        (
            "Providers (cards)",
            [
                "CSP",
                "Provider",
                "Program",
                "Committed",
                "Hosts",
                "Registered",
                "Healthy",
                "Granted",
                "Delivered",
            ],
        )
    };
    let mut s = format!("<section id=\"fleet\"><h2>{}</h2>", esc(title));
    let rows: Vec<(bool, Vec<Td>)> = r
        .fleet
        .iter()
        .map(|f| {
            let mut cells = vec![
                Td::Text(f.csp.clone()),
                Td::Text(if ko {
                    f.name_ko.clone()
                } else {
                    f.name_en.clone()
                }),
                Td::Text(if f.program.is_empty() {
                    "-".into()
                } else {
                    f.program.clone()
                }),
            ];
            cells.extend(
                [
                    f.committed_cards,
                    f.registered_hosts,
                    f.registered_cards,
                    f.healthy_cards,
                    f.granted_cards,
                    f.delivered_cards,
                ]
                .map(|n| Td::Num(n.to_string())),
            );
            (false, cells)
        })
        .collect();
    s.push_str(&table(&headers, &rows));
    s.push_str("<dl class=\"glossary\">");
    for (col, h) in crate::registry::FLEET_COLUMNS.iter().zip(&headers[3..]) {
        s.push_str(&format!(
            "<dt>{}</dt><dd>{}</dd>",
            esc(h),
            esc(crate::registry::fleet_definition(col, ko))
        ));
    }
    s.push_str("</dl></section>");
    s
}

fn idle(r: &Reconciliation, l: &Labels) -> String {
    let i = &r.idle;
    let mut s = format!(
        "<section id=\"idle\"><h2>{}</h2><p class=\"note\">{}</p>",
        esc(l.idle_title),
        esc(&l.idle_rule(i.threshold_pct, i.days))
    );
    if i.grants.is_empty() {
        s.push_str(&format!("<p>{}</p>", esc(l.idle_none)));
    } else {
        let headers = [
            l.grant,
            l.grantee,
            l.program,
            l.csp,
            l.lookback,
            l.allocated,
            l.delivered,
            l.active,
            l.utilization,
            l.reclaimable_cards,
        ];
        let rows: Vec<(bool, Vec<Td>)> = i
            .grants
            .iter()
            .map(|g| {
                let cards: Vec<String> = g
                    .reclaimable_cards
                    .iter()
                    .map(|c| {
                        format!(
                            "{} {} ({}%)",
                            c.host_id,
                            c.gpu_uuid,
                            num(c.utilization_pct, 1)
                        )
                    })
                    .collect();
                (
                    false,
                    vec![
                        Td::Text(g.grant_id.clone()),
                        Td::Text(g.grantee.clone()),
                        Td::Text(g.program.clone()),
                        Td::Text(g.csp.clone()),
                        Td::Text(kst_span(g.window.from_ms, g.window.until_ms)),
                        h(g.allocated_ms),
                        h(g.delivered_ms),
                        h(g.active_ms),
                        pct(Some(g.utilization_pct)),
                        Td::Lines(cards),
                    ],
                )
            })
            .collect();
        s.push_str(&table(&headers, &rows));
    }
    s.push_str("</section>");
    s
}

fn violations(r: &Reconciliation, l: &Labels) -> String {
    let mut s = format!(
        "<section id=\"violations\"><h2>{}</h2><p class=\"note\">{}</p>",
        esc(l.violations_title),
        esc(l.violations_note)
    );
    // Per card, so that an inspector knows which card to look at.
    let rows: Vec<(bool, Vec<Td>)> = r
        .grants
        .iter()
        .flat_map(|g| {
            g.cards
                .iter()
                .filter(|c| c.figures.violations > 0 || c.figures.foreign_ms > 0)
                .map(move |c| {
                    (
                        false,
                        vec![
                            Td::Text(g.grant_id.clone()),
                            Td::Text(g.grantee.clone()),
                            Td::Text(g.csp.clone()),
                            Td::Text(c.host_id.clone()),
                            Td::Text(c.gpu_uuid.clone()),
                            Td::Num(c.figures.violations.to_string()),
                            h(c.figures.foreign_ms),
                        ],
                    )
                })
        })
        .collect();
    if rows.is_empty() {
        s.push_str(&format!("<p>{}</p>", esc(l.violations_none)));
    } else {
        s.push_str(&table(
            &[
                l.grant,
                l.grantee,
                l.csp,
                l.host,
                l.gpu,
                l.violations,
                l.foreign,
            ],
            &rows,
        ));
    }
    s.push_str(&format!("<h3>{}</h3>", esc(l.unassigned_title)));
    let rows: Vec<(bool, Vec<Td>)> = r
        .unassigned
        .iter()
        .flat_map(|u| {
            u.cards.iter().map(|c| {
                (
                    false,
                    vec![
                        Td::Text(u.csp.clone()),
                        Td::Text(u.host_id.clone()),
                        Td::Text(c.gpu_uuid.clone()),
                        h(c.unassigned_use_ms),
                        Td::Num(c.violations.to_string()),
                    ],
                )
            })
        })
        .collect();
    if rows.is_empty() {
        s.push_str(&format!("<p>{}</p>", esc(l.unassigned_none)));
    } else {
        s.push_str(&table(
            &[l.csp, l.host, l.gpu, l.unassigned_use, l.violations],
            &rows,
        ));
    }
    s.push_str("</section>");
    s
}

/// The grants' figures in GPU-equivalents (absent unless a card is a MIG instance).
fn gpu_equivalents(r: &Reconciliation, l: &Labels) -> String {
    let eq = &r.gpu_equivalents;
    if !eq.fractional() {
        return String::new();
    }
    let mut s = format!(
        "<section id=\"gpu-equivalents\"><h2>{}</h2>",
        esc(l.equivalents_title)
    );
    let cells = |key: &str, e: &crate::reconcile::Equivalent| {
        vec![
            Td::Text(key.to_owned()),
            Td::Num(num(e.gpus, 3)),
            Td::Num(num(e.allocated_gpu_hours, 2)),
            Td::Num(num(e.delivered_gpu_hours, 2)),
            Td::Num(num(e.active_gpu_hours, 2)),
        ]
    };
    let mut rows: Vec<(bool, Vec<Td>)> = eq
        .grants
        .iter()
        .map(|g| (false, cells(&g.key, &g.figures)))
        .collect();
    rows.push((true, cells(l.total, &eq.total)));
    s.push_str(&table(
        &[
            l.grant,
            l.eq_gpus,
            l.eq_allocated,
            l.eq_delivered,
            l.eq_active,
        ],
        &rows,
    ));
    s.push_str("</section>");
    s
}

/// The card identity alarms on the report's cards (absent when there are none).
fn card_alarms(r: &Reconciliation, l: &Labels) -> String {
    if r.card_alarms.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "<section id=\"card-identity\"><h2>{}</h2>",
        esc(l.identity_title)
    );
    let rows: Vec<(bool, Vec<Td>)> = r
        .card_alarms
        .iter()
        .map(|a| {
            (
                false,
                vec![
                    Td::Text(kst_minute(a.at_ms)),
                    Td::Text(a.kind.clone()),
                    Td::Text(a.host_id.clone()),
                    Td::Text(a.gpu_uuid.clone()),
                    Td::Text(if a.grant_ids.is_empty() {
                        l.no_grant.to_owned()
                    } else {
                        a.grant_ids.join(", ")
                    }),
                    Td::Text(a.detail.clone()),
                ],
            )
        })
        .collect();
    s.push_str(&table(
        &[
            l.alarm_time,
            l.alarm_kind,
            l.host,
            l.gpu,
            l.grant,
            l.alarm_detail,
        ],
        &rows,
    ));
    s.push_str("</section>");
    s
}

fn invoices(r: &Reconciliation, l: &Labels) -> String {
    if r.invoices.is_empty() {
        return String::new();
    }
    let mut s = format!(
        "<section id=\"invoices\"><h2>{}</h2>",
        esc(l.invoices_title)
    );
    let diff = |d: f64| {
        let t = num(d, 2);
        if d < 0.0 { Td::Neg(t) } else { Td::Num(t) }
    };
    let mut rows: Vec<(bool, Vec<Td>)> = r
        .invoices
        .iter()
        .map(|i| {
            (
                false,
                vec![
                    Td::Text(i.csp.clone()),
                    Td::Text(i.grant_id.clone()),
                    Td::Text(i.periods.join(", ")),
                    i.billed_gpu_hours
                        .map_or(Td::Text(l.no_invoice.to_owned()), |b| Td::Num(num(b, 2))),
                    Td::Num(num(i.delivered_gpu_hours, 2)),
                    diff(i.difference_gpu_hours),
                ],
            )
        })
        .collect();
    rows.extend(r.invoice_csps.iter().map(|c| {
        (
            true,
            vec![
                Td::Text(c.csp.clone()),
                Td::Text(l.total.to_owned()),
                Td::Text(String::new()),
                Td::Num(num(c.billed_gpu_hours, 2)),
                Td::Num(num(c.delivered_gpu_hours, 2)),
                diff(c.difference_gpu_hours),
            ],
        )
    }));
    s.push_str(&table(
        &[
            l.csp,
            l.grant,
            l.period,
            l.billed,
            l.delivered,
            l.difference,
        ],
        &rows,
    ));
    let groups: Vec<BarGroup> = r
        .invoices
        .iter()
        .map(|i| BarGroup {
            label: format!("{} · {}", i.csp, i.grant_id),
            title: format!("{} · {}", i.csp, i.grant_id),
            values: vec![i.billed_gpu_hours.unwrap_or(0.0), i.delivered_gpu_hours],
        })
        .collect();
    s.push_str("<div class=\"scroll\">");
    s.push_str(&grouped_bars(
        "chart-invoices",
        &[
            Series {
                class: "billed",
                label: l.billed,
            },
            Series {
                class: "delivered",
                label: l.delivered,
            },
        ],
        &groups,
        l.gpu_hours,
    ));
    s.push_str("</div></section>");
    s
}

fn grant_table(r: &Reconciliation, l: &Labels) -> String {
    let mut s = format!(
        "<section id=\"grant-table\"><h2>{}</h2>",
        esc(l.grant_table)
    );
    if r.grants.is_empty() {
        s.push_str(&format!("<p>{}</p></section>", esc(l.no_grants)));
        return s;
    }
    let mut headers = vec![
        l.grant,
        l.grantee,
        l.principal,
        l.program,
        l.csp,
        l.valid,
        l.cards,
    ];
    headers.extend(figure_headers(l));
    let rows: Vec<(bool, Vec<Td>)> = r
        .grants
        .iter()
        .map(|g| {
            let mut cells = vec![
                Td::Text(g.grant_id.clone()),
                Td::Text(g.grantee.clone()),
                Td::Text(g.principal.clone()),
                Td::Text(g.program.clone()),
                Td::Text(g.csp.clone()),
                Td::Text(kst_span(g.valid_from_ms, g.valid_until_ms)),
                Td::Num(g.cards.len().to_string()),
            ];
            cells.extend(figure_cells(&g.figures));
            (false, cells)
        })
        .collect();
    s.push_str(&table(&headers, &rows));
    s.push_str("</section>");
    s
}

pub(super) fn render(r: &Reconciliation, days: &[CardDay], lang: Lang) -> String {
    let l = lang.labels();
    let mut filters = Vec::new();
    if let Some(p) = &r.program {
        filters.push(format!("{} = {p}", l.program));
    }
    if let Some(g) = &r.grant_id {
        filters.push(format!("{} = {g}", l.grant));
    }
    let filter = if filters.is_empty() {
        l.all.to_owned()
    } else {
        filters.join(", ")
    };
    let mut s = format!(
        "<!DOCTYPE html>\n<html lang=\"{lang}\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} {period}</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <header><h1>{title}</h1><p class=\"meta\">{pl}: {period} ({span}) · {tzl}: KST ({tz}) · {fl}: {filter}</p></header>\n",
        lang = lang.as_str(),
        title = esc(l.title),
        period = esc(&r.period),
        pl = esc(l.period),
        span = esc(&kst_span(r.from_ms, r.until_ms)),
        tzl = esc(l.time_zone),
        tz = esc(&r.time_zone),
        fl = esc(l.filter),
        filter = esc(&filter),
    );
    if let Some(note) = as_of_note(r, lang) {
        s.push_str(&format!(
            "<p class=\"asof\" id=\"as-of\">{}</p>\n",
            esc(&note)
        ));
    }
    // The print footer, in each page's bottom margin: period, filters, provenance.
    let footer_line = format!(
        "{}: {} ({}) · {}: {} · {}",
        l.period,
        r.period,
        kst_span(r.from_ms, r.until_ms),
        l.filter,
        filter,
        provenance_slot(r, l)
    );
    s.push_str(&format!(
        "<style>@page {{ @bottom-left {{ content: {}; font-size: 7pt; color: #52606d; }} @bottom-right {{ content: counter(page) \" / \" counter(pages); font-size: 7pt; color: #52606d; }} }}</style>\n",
        css_string(&footer_line)
    ));
    for part in [
        summary(r, l),
        grants_chart(r, l),
        heatmaps(r, days, l),
        programs(r, l),
        csps(r, l),
        fleet(r, lang),
        idle(r, l),
        violations(r, l),
        gpu_equivalents(r, l),
        card_alarms(r, l),
        invoices(r, l),
        grant_table(r, l),
        glossary_section(lang, l),
    ] {
        s.push_str(&part);
        s.push('\n');
    }
    s.push_str(&format!(
        "<footer>{} · {} · <span class=\"provenance\" id=\"provenance\">{}</span> · gpumeter</footer>\n</body>\n</html>\n",
        esc(l.figures_note),
        esc(&format!("{}: {} · {}: {}", l.period, r.period, l.filter, filter)),
        esc(&provenance_slot(r, l))
    ));
    s
}

/// What the report was computed from, for the footer. Today: the as-of and a SHA-256 of the
/// report's JSON (so two printouts can be told apart or matched). The ledger head the report
/// was computed from belongs here too, once reports carry one: this is its one slot.
pub fn provenance_slot(r: &Reconciliation, l: &Labels) -> String {
    let json = serde_json::to_vec(r).unwrap_or_default();
    let digest = Sha256::digest(&json);
    format!(
        "{}: {} KST · {}: {}",
        l.as_of,
        kst_minute(r.as_of_ms),
        l.content_hash,
        hex::encode(&digest[..8])
    )
}

/// `s` as a CSS string literal: quotes, backslashes, line breaks and `<` escaped (so that no
/// text can close the style element).
fn css_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '<' | '>' | '&' | '\n' | '\r' => out.push_str(&format!("\\{:x} ", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Every figure defined, in the page's language, with the other language's term beside it.
fn glossary_section(lang: Lang, l: &Labels) -> String {
    let mut s = format!(
        "<section id=\"glossary\"><h2>{}</h2><dl class=\"glossary\">",
        esc(l.glossary)
    );
    let other = match lang {
        Lang::Ko => Lang::En,
        Lang::En => Lang::Ko,
    };
    for t in &glossary::TERMS {
        s.push_str(&format!(
            "<dt>{} <span class=\"note\">({})</span></dt><dd>{}</dd>",
            esc(t.name(lang)),
            esc(t.name(other)),
            esc(t.definition(lang))
        ));
    }
    s.push_str("</dl></section>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn css_strings_cannot_close_the_string_or_the_style_element() {
        assert_eq!(css_string("plain"), "\"plain\"");
        assert_eq!(css_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        let s = css_string("</style><script>x</script>\nend");
        assert!(
            !s.contains('<') && !s.contains('>') && !s.contains('\n'),
            "{s}"
        );
        assert!(s.starts_with("\"\\3c /style\\3e "), "{s}");
    }
}

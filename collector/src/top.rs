//! `gpumeter-collector top --server URL`: the fleet in a terminal, like nvtop for every card
//! the collector meters, fed by `Query.Watch` (see [`crate::watch`]).
//!
//! The model ([`Model`]) applies Watch events (a snapshot's parts are gathered before they
//! replace what is shown, so the screen never shows half a fleet); [`lines`] groups and sorts
//! it (pure, so `--once` prints exactly what the screen shows); the screen is ratatui over
//! crossterm. Idle and violating cards carry a textual mark (`IDLE`, `VIOL`; `OFF` for a card
//! that stopped reporting) besides their colour, so the state reads the same on a terminal
//! without colour, in a screen capture, and to a colour-blind reader.
//!
//! Keys: `g` cycles the grouping (program → grant → host), `s` cycles the sort key, `u` `p` `m`
//! `a` `n` `h` `x` sort by utilization, power, memory, today's active time, card, host or state
//! (violating, then idle, first), `r` reverses, ↑/↓ and PgUp/PgDn scroll, `q` (or Esc, or
//! Ctrl-C) quits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpumeter_proto::v1;

/// How cards are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    Program,
    Grant,
    Host,
}

impl Group {
    pub fn next(self) -> Group {
        match self {
            Group::Program => Group::Grant,
            Group::Grant => Group::Host,
            Group::Host => Group::Program,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Group::Program => "program",
            Group::Grant => "grant",
            Group::Host => "host",
        }
    }
}

/// What cards are sorted by within a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sort {
    /// Utilization of the latest window, highest first.
    Util,
    /// Power, highest first.
    Power,
    /// Memory used, most first.
    Memory,
    /// Today's active time, most first.
    Active,
    /// Card id.
    Card,
    /// Host, then card.
    Host,
    /// Violating, then idle, then the rest.
    State,
}

impl Sort {
    pub fn next(self) -> Sort {
        match self {
            Sort::Util => Sort::Power,
            Sort::Power => Sort::Memory,
            Sort::Memory => Sort::Active,
            Sort::Active => Sort::Card,
            Sort::Card => Sort::Host,
            Sort::Host => Sort::State,
            Sort::State => Sort::Util,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Sort::Util => "util",
            Sort::Power => "power",
            Sort::Memory => "memory",
            Sort::Active => "active",
            Sort::Card => "card",
            Sort::Host => "host",
            Sort::State => "state",
        }
    }
}

/// What the screen shows: the cards and grants as Watch last said.
#[derive(Debug, Default, Clone)]
pub struct Model {
    pub cards: BTreeMap<String, v1::LiveCard>,
    pub grants: BTreeMap<String, v1::LiveGrant>,
    pub version: u64,
    pub at_ms: i64,
    pub day: String,
    /// A complete snapshot has arrived.
    pub ready: bool,
    /// A snapshot being gathered (its parts before the last).
    staging: Option<(
        BTreeMap<String, v1::LiveCard>,
        BTreeMap<String, v1::LiveGrant>,
    )>,
    /// The connection's state, when it is not simply live.
    pub status: String,
}

impl Model {
    /// Applies one Watch event.
    pub fn apply(&mut self, ev: v1::WatchEvent) {
        if ev.reset {
            self.staging = Some((BTreeMap::new(), BTreeMap::new()));
        }
        let (cards, grants) = match &mut self.staging {
            Some((c, g)) => (c, g),
            None => (&mut self.cards, &mut self.grants),
        };
        for id in &ev.removed_cards {
            cards.remove(id);
        }
        for id in &ev.removed_grants {
            grants.remove(id);
        }
        for c in ev.cards {
            cards.insert(c.gpu_uuid.clone(), c);
        }
        for g in ev.grants {
            grants.insert(g.grant_id.clone(), g);
        }
        if ev.complete {
            if let Some((c, g)) = self.staging.take() {
                self.cards = c;
                self.grants = g;
            }
            self.version = ev.version;
            self.at_ms = ev.at_unix_ms;
            self.day = ev.day;
            self.ready = true;
        }
    }
}

/// The state mark of a card: `VIOL`, `IDLE`, both, `OFF` (not reporting), or empty.
pub fn mark(c: &v1::LiveCard) -> &'static str {
    match (c.violating, c.idle, c.reporting) {
        (true, true, _) => "VIOL+IDLE",
        (true, false, _) => "VIOL",
        (false, true, _) => "IDLE",
        (false, false, false) => "OFF",
        (false, false, true) => "",
    }
}

/// One line of the view.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Group {
        title: String,
        summary: String,
        violating: bool,
        idle: bool,
    },
    Card(Box<v1::LiveCard>),
}

fn hours(ms: u64) -> String {
    format!("{:.2}", ms as f64 / 3_600_000.0)
}

fn day_of(c: &v1::LiveCard) -> v1::Figures {
    c.day.unwrap_or_default()
}

/// The cards grouped and sorted, each group headed by its line.
pub fn lines(m: &Model, group: Group, sort: Sort, reverse: bool) -> Vec<Line> {
    let mut groups: BTreeMap<String, Vec<&v1::LiveCard>> = BTreeMap::new();
    for c in m.cards.values() {
        let key = match group {
            Group::Program if c.program.is_empty() => "(no grant)".to_string(),
            Group::Program => c.program.clone(),
            Group::Grant if c.grant_id.is_empty() => "(no grant)".to_string(),
            Group::Grant => c.grant_id.clone(),
            Group::Host => c.host_id.clone(),
        };
        groups.entry(key).or_default().push(c);
    }
    let mut out = Vec::new();
    for (key, mut cards) in groups {
        sort_cards(&mut cards, sort);
        if reverse {
            cards.reverse();
        }
        let idle = cards.iter().filter(|c| c.idle).count();
        let violating = cards.iter().filter(|c| c.violating).count();
        let reporting = cards.iter().filter(|c| c.reporting).count();
        let title = match group {
            Group::Grant => match m.grants.get(&key) {
                Some(g) => format!("GRANT {key} · {} · {} · {}", g.program, g.grantee, g.csp),
                None => format!("GRANT {key}"),
            },
            Group::Program => format!("PROGRAM {key}"),
            Group::Host => format!("HOST {key}"),
        };
        // A grant's figures are its reconciliation's; a program's or host's, its cards' sums.
        let day = match (group, m.grants.get(&key)) {
            (Group::Grant, Some(g)) => g.day.unwrap_or_default(),
            _ => {
                let mut f = v1::Figures::default();
                for c in &cards {
                    let d = day_of(c);
                    f.delivered_ms += d.delivered_ms;
                    f.occupied_ms += d.occupied_ms;
                    f.active_ms += d.active_ms;
                    f.violations += d.violations;
                }
                f
            }
        };
        let summary = format!(
            "cards {} · reporting {reporting} · idle {idle} · violating {violating} · today delivered {} h · occupied {} h · active {} h · violations {}",
            cards.len(),
            hours(day.delivered_ms),
            hours(day.occupied_ms),
            hours(day.active_ms),
            day.violations,
        );
        out.push(Line::Group {
            title,
            summary,
            violating: violating > 0,
            idle: idle > 0,
        });
        out.extend(cards.into_iter().map(|c| Line::Card(Box::new(c.clone()))));
    }
    out
}

fn sort_cards(cards: &mut [&v1::LiveCard], sort: Sort) {
    let desc = |a: Option<f64>, b: Option<f64>| {
        b.unwrap_or(-1.0)
            .partial_cmp(&a.unwrap_or(-1.0))
            .unwrap_or(std::cmp::Ordering::Equal)
    };
    let state = |c: &v1::LiveCard| (!c.violating, !c.idle, !c.reporting);
    cards.sort_by(|a, b| {
        let first = match sort {
            Sort::Util => desc(a.util_pct, b.util_pct),
            Sort::Power => desc(a.power_w, b.power_w),
            Sort::Memory => b
                .memory_used_bytes
                .unwrap_or(0)
                .cmp(&a.memory_used_bytes.unwrap_or(0)),
            Sort::Active => day_of(b).active_ms.cmp(&day_of(a).active_ms),
            Sort::Card => std::cmp::Ordering::Equal,
            Sort::Host => a.host_id.cmp(&b.host_id),
            Sort::State => state(a).cmp(&state(b)),
        };
        first.then_with(|| a.gpu_uuid.cmp(&b.gpu_uuid))
    });
}

/// The column heads of a card line.
pub const HEADS: [&str; 12] = [
    "STATE",
    "CARD",
    "HOST",
    "GRANT",
    "GRANTEE",
    "UTIL%",
    "MEM GiB",
    "POWER W",
    "WINDOW END",
    "TODAY DELIV h",
    "OCC h",
    "ACTIVE h",
];

fn kst_time(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| {
            t.with_timezone(&crate::report::kst())
                .format("%H:%M:%S")
                .to_string()
        })
        .unwrap_or_default()
}

/// The cells of a card line, in [`HEADS`] order.
pub fn cells(c: &v1::LiveCard) -> [String; 12] {
    let gib = |b: u64| format!("{:.1}", b as f64 / (1u64 << 30) as f64);
    let mem = match (c.memory_used_bytes, c.memory_total_bytes) {
        (Some(u), Some(t)) => format!("{}/{}", gib(u), gib(t)),
        (Some(u), None) => gib(u),
        (None, Some(t)) => format!("-/{}", gib(t)),
        (None, None) => "-".into(),
    };
    let d = day_of(c);
    [
        mark(c).to_string(),
        c.gpu_uuid.clone(),
        c.host_id.clone(),
        if c.grant_id.is_empty() {
            "-".into()
        } else {
            c.grant_id.clone()
        },
        if c.grantee.is_empty() {
            "-".into()
        } else {
            c.grantee.clone()
        },
        c.util_pct.map_or("-".into(), |u| format!("{u:.0}")),
        mem,
        c.power_w.map_or("-".into(), |p| format!("{p:.0}")),
        kst_time(c.window_end_unix_ms),
        hours(d.delivered_ms),
        hours(d.occupied_ms),
        hours(d.active_ms),
    ]
}

/// The header line: what is shown, as of when.
pub fn title(m: &Model, server: &str, group: Group, sort: Sort, reverse: bool) -> String {
    let idle = m.cards.values().filter(|c| c.idle).count();
    let violating = m.cards.values().filter(|c| c.violating).count();
    format!(
        "gpumeter top · {server} · {} KST · v{} at {} · cards {} · grants {} · idle {idle} · violating {violating} · group: {} · sort: {}{}",
        m.day,
        m.version,
        kst_time(m.at_ms),
        m.cards.len(),
        m.grants.len(),
        group.label(),
        sort.label(),
        if reverse { " (reversed)" } else { "" },
    )
}

/// How a line of the view is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Heads,
    Group {
        violating: bool,
        idle: bool,
    },
    Card {
        violating: bool,
        idle: bool,
        reporting: bool,
    },
}

/// The view's lines, laid out in aligned columns: the column heads, then each group's line
/// and its cards' (the screen and `--once` print exactly these).
pub fn layout(m: &Model, group: Group, sort: Sort, reverse: bool) -> Vec<(String, Kind)> {
    let lines = lines(m, group, sort, reverse);
    let mut widths: Vec<usize> = HEADS.iter().map(|h| h.chars().count()).collect();
    for l in &lines {
        if let Line::Card(c) = l {
            for (w, cell) in widths.iter_mut().zip(cells(c)) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let row = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![(
        row(HEADS.iter().map(|h| h.to_string()).collect()),
        Kind::Heads,
    )];
    for l in lines {
        out.push(match l {
            Line::Group {
                title,
                summary,
                violating,
                idle,
            } => (
                format!("▸ {title} — {summary}"),
                Kind::Group { violating, idle },
            ),
            Line::Card(c) => (
                row(cells(&c).to_vec()),
                Kind::Card {
                    violating: c.violating,
                    idle: c.idle,
                    reporting: c.reporting,
                },
            ),
        });
    }
    out
}

/// `--once`: the view as plain text.
pub fn text(m: &Model, server: &str, group: Group, sort: Sort, reverse: bool) -> String {
    let mut out = title(m, server, group, sort, reverse);
    out.push('\n');
    for (line, _) in layout(m, group, sort, reverse) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// `--json`: every card and grant of the snapshot.
pub fn json(m: &Model) -> serde_json::Value {
    let figures = |f: Option<v1::Figures>| {
        let f = f.unwrap_or_default();
        serde_json::json!({
            "delivered_ms": f.delivered_ms, "occupied_ms": f.occupied_ms,
            "active_ms": f.active_ms, "idle_ms": f.idle_ms, "foreign_ms": f.foreign_ms,
            "unattributed_ms": f.unattributed_ms, "allocated_ms": f.allocated_ms,
            "unmetered_ms": f.unmetered_ms, "unavailable_ms": f.unavailable_ms,
            "energy_mj": f.energy_mj, "violations": f.violations,
        })
    };
    serde_json::json!({
        "version": m.version,
        "at_ms": m.at_ms,
        "day": m.day,
        "cards": m.cards.values().map(|c| serde_json::json!({
            "gpu_uuid": c.gpu_uuid, "host_id": c.host_id, "agent_id": c.agent_id, "csp": c.csp,
            "gpu_name": c.gpu_name, "window_start_ms": c.window_start_unix_ms,
            "window_end_ms": c.window_end_unix_ms, "util_pct": c.util_pct,
            "memory_used_bytes": c.memory_used_bytes, "memory_total_bytes": c.memory_total_bytes,
            "power_w": c.power_w, "health": c.health, "reporting": c.reporting,
            "connected": c.connected, "grant_id": c.grant_id, "program": c.program,
            "grantee": c.grantee, "window": figures(c.window),
            "window_unassigned_ms": c.window_unassigned_ms, "day": figures(c.day),
            "day_unassigned_ms": c.day_unassigned_ms, "idle": c.idle, "violating": c.violating,
        })).collect::<Vec<_>>(),
        "grants": m.grants.values().map(|g| serde_json::json!({
            "grant_id": g.grant_id, "program": g.program, "grantee": g.grantee, "csp": g.csp,
            "cards": g.cards, "hosts": g.hosts, "reporting_cards": g.reporting_cards,
            "idle_cards": g.idle_cards, "violating_cards": g.violating_cards,
            "window": figures(g.window), "day": figures(g.day),
        })).collect::<Vec<_>>(),
    })
}

/// Why `top` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
    #[error("watch refused: {0}")]
    Refused(String),
    #[error("the collector ended the watch before a snapshot arrived")]
    Ended,
    #[error("terminal: {0}")]
    Terminal(String),
}

fn refused(s: &tonic::Status) -> TopError {
    TopError::Refused(format!("{} ({:?})", s.message(), s.code()))
}

type WatchStream = tonic::Streaming<v1::WatchEvent>;

async fn open(
    url: &str,
    auth: &crate::client::ClientAuth,
    q: &v1::WatchRequest,
) -> Result<WatchStream, TopError> {
    let mut c = crate::client::query(url, auth).await?;
    Ok(c.watch(q.clone())
        .await
        .map_err(|s| refused(&s))?
        .into_inner())
}

/// Reads until the first complete snapshot (`--once`, `--json`).
pub async fn snapshot(
    url: &str,
    auth: &crate::client::ClientAuth,
    q: &v1::WatchRequest,
) -> Result<Model, TopError> {
    let mut stream = open(url, auth, q).await?;
    let mut m = Model::default();
    while let Some(ev) = stream.message().await.map_err(|s| refused(&s))? {
        m.apply(ev);
        if m.ready {
            return Ok(m);
        }
    }
    Err(TopError::Ended)
}

/// The interactive view, until `q`. The first connection's failure is returned (a bad token
/// or URL says so at once); later ones are shown and retried every 2 s.
pub async fn run(
    url: &str,
    auth: &crate::client::ClientAuth,
    q: &v1::WatchRequest,
    group: Group,
    sort: Sort,
) -> Result<(), TopError> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return Err(TopError::Terminal(
            "standard output is not a terminal; use --once or --json".into(),
        ));
    }
    let first = open(url, auth, q).await?;
    let model = Arc::new(Mutex::new(Model::default()));
    let reader = {
        let (model, url, auth, q) = (model.clone(), url.to_string(), auth.clone(), q.clone());
        tokio::spawn(async move {
            let mut stream = Some(first);
            loop {
                let mut s = match stream.take() {
                    Some(s) => s,
                    None => match open(&url, &auth, &q).await {
                        Ok(s) => s,
                        Err(e) => {
                            set_status(&model, format!("disconnected: {e}; retrying"));
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            continue;
                        }
                    },
                };
                set_status(&model, String::new());
                loop {
                    match s.message().await {
                        Ok(Some(ev)) => {
                            if let Ok(mut m) = model.lock() {
                                m.apply(ev);
                            }
                        }
                        Ok(None) => {
                            set_status(
                                &model,
                                "the collector ended the watch; reconnecting".into(),
                            );
                            break;
                        }
                        Err(e) => {
                            set_status(
                                &model,
                                format!("disconnected: {}; reconnecting", e.message()),
                            );
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let server = url.to_string();
    let screen = tokio::task::spawn_blocking(move || screen(&model, &server, group, sort));
    let result = screen
        .await
        .map_err(|e| TopError::Terminal(e.to_string()))?;
    reader.abort();
    result
}

fn set_status(model: &Mutex<Model>, status: String) {
    if let Ok(mut m) = model.lock() {
        m.status = status;
    }
}

/// The screen loop: draws every 250 ms and at every key, until `q`.
fn screen(model: &Mutex<Model>, server: &str, group: Group, sort: Sort) -> Result<(), TopError> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    let terminal_err = |e: std::io::Error| TopError::Terminal(e.to_string());
    let mut terminal = ratatui::try_init().map_err(terminal_err)?;
    let mut view = ViewState {
        group,
        sort,
        reverse: false,
        scroll: 0,
    };
    let result = (|| loop {
        let m = model.lock().map(|m| m.clone()).unwrap_or_default();
        terminal
            .draw(|f| draw(f, &m, server, &mut view))
            .map_err(terminal_err)?;
        if !event::poll(Duration::from_millis(250)).map_err(terminal_err)? {
            continue;
        }
        let Event::Key(k) = event::read().map_err(terminal_err)? else {
            continue;
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        match k.code {
            KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
            KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
            KeyCode::Char('g') => view.group = view.group.next(),
            KeyCode::Char('s') => view.sort = view.sort.next(),
            KeyCode::Char('r') => view.reverse = !view.reverse,
            KeyCode::Char('u') => view.sort = Sort::Util,
            KeyCode::Char('p') => view.sort = Sort::Power,
            KeyCode::Char('m') => view.sort = Sort::Memory,
            KeyCode::Char('a') => view.sort = Sort::Active,
            KeyCode::Char('n') => view.sort = Sort::Card,
            KeyCode::Char('h') => view.sort = Sort::Host,
            KeyCode::Char('x') => view.sort = Sort::State,
            KeyCode::Down => view.scroll = view.scroll.saturating_add(1),
            KeyCode::Up => view.scroll = view.scroll.saturating_sub(1),
            KeyCode::PageDown => view.scroll = view.scroll.saturating_add(20),
            KeyCode::PageUp => view.scroll = view.scroll.saturating_sub(20),
            KeyCode::Home => view.scroll = 0,
            _ => {}
        }
    })();
    ratatui::try_restore().map_err(terminal_err)?;
    result
}

struct ViewState {
    group: Group,
    sort: Sort,
    reverse: bool,
    scroll: usize,
}

fn draw(f: &mut ratatui::Frame<'_>, m: &Model, server: &str, v: &mut ViewState) {
    use ratatui::layout::{Constraint, Layout};
    use ratatui::style::{Color, Modifier, Style};
    use ratatui::text::Line as Text;
    use ratatui::widgets::Paragraph;
    let [head, body, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(f.area());
    let mut top = title(m, server, v.group, v.sort, v.reverse);
    if !m.ready {
        top.push_str(" · waiting for the first snapshot");
    }
    if !m.status.is_empty() {
        top.push_str(" · ");
        top.push_str(&m.status);
    }
    f.render_widget(
        Paragraph::new(top).style(Style::new().add_modifier(Modifier::BOLD)),
        head,
    );
    let all = layout(m, v.group, v.sort, v.reverse);
    let visible = usize::from(body.height.saturating_sub(1)).max(1);
    v.scroll = v.scroll.min(all.len().saturating_sub(1 + visible));
    let style = |k: Kind| match k {
        Kind::Heads => Style::new().add_modifier(Modifier::REVERSED),
        Kind::Group { violating, idle } => {
            let colour = if violating {
                Color::Red
            } else if idle {
                Color::Yellow
            } else {
                Color::Cyan
            };
            Style::new().fg(colour).add_modifier(Modifier::BOLD)
        }
        Kind::Card {
            violating: true, ..
        } => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        Kind::Card { idle: true, .. } => Style::new().fg(Color::Yellow),
        Kind::Card {
            reporting: false, ..
        } => Style::new().fg(Color::DarkGray),
        Kind::Card { .. } => Style::new(),
    };
    // The column heads stay; the groups and cards under them scroll.
    let shown: Vec<Text<'_>> = all
        .iter()
        .take(1)
        .chain(all.iter().skip(1 + v.scroll).take(visible))
        .map(|(line, kind)| Text::styled(line.clone(), style(*kind)))
        .collect();
    f.render_widget(Paragraph::new(shown), body);
    f.render_widget(
        Paragraph::new(Text::from(
            "g group  s sort  u util  p power  m memory  a active  n card  h host  x state  r reverse  ↑↓ scroll  q quit",
        ))
        .style(Style::new().add_modifier(Modifier::REVERSED)),
        foot,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(
        uuid: &str,
        host: &str,
        grant: &str,
        util: f64,
        idle: bool,
        violating: bool,
    ) -> v1::LiveCard {
        v1::LiveCard {
            gpu_uuid: uuid.into(),
            host_id: host.into(),
            grant_id: grant.into(),
            program: if grant.is_empty() {
                String::new()
            } else {
                "research".into()
            },
            util_pct: Some(util),
            reporting: true,
            idle,
            violating,
            ..Default::default()
        }
    }

    #[test]
    fn a_snapshot_in_parts_replaces_the_view_only_when_complete() {
        let mut m = Model::default();
        m.apply(v1::WatchEvent {
            reset: true,
            complete: true,
            version: 1,
            cards: vec![card("A", "h1", "G", 10.0, false, false)],
            ..Default::default()
        });
        m.apply(v1::WatchEvent {
            reset: true,
            complete: false,
            version: 5,
            cards: vec![card("B", "h1", "G", 10.0, false, false)],
            ..Default::default()
        });
        assert_eq!(
            m.cards.keys().collect::<Vec<_>>(),
            ["A"],
            "half a snapshot is not shown"
        );
        m.apply(v1::WatchEvent {
            reset: false,
            complete: true,
            version: 5,
            cards: vec![card("C", "h2", "", 0.0, false, true)],
            ..Default::default()
        });
        assert_eq!(m.cards.keys().collect::<Vec<_>>(), ["B", "C"]);
        m.apply(v1::WatchEvent {
            complete: true,
            version: 6,
            removed_cards: vec!["B".into()],
            ..Default::default()
        });
        assert_eq!(m.cards.keys().collect::<Vec<_>>(), ["C"]);
        assert_eq!(m.version, 6);
    }

    #[test]
    fn cards_are_grouped_and_sorted_with_their_marks() {
        let mut m = Model::default();
        for c in [
            card("A", "h2", "G1", 10.0, false, false),
            card("B", "h1", "G1", 90.0, false, false),
            card("C", "h1", "", 50.0, false, true),
            card("D", "h2", "G2", 0.0, true, false),
        ] {
            m.cards.insert(c.gpu_uuid.clone(), c);
        }
        let order = |g, s, r| -> Vec<String> {
            lines(&m, g, s, r)
                .into_iter()
                .map(|l| match l {
                    Line::Group { title, .. } => title,
                    Line::Card(c) => format!("{}:{}", c.gpu_uuid, mark(&c)),
                })
                .collect()
        };
        assert_eq!(
            order(Group::Grant, Sort::Util, false),
            [
                "GRANT (no grant)",
                "C:VIOL",
                "GRANT G1",
                "B:",
                "A:",
                "GRANT G2",
                "D:IDLE"
            ]
        );
        assert_eq!(
            order(Group::Host, Sort::Util, true),
            ["HOST h1", "C:VIOL", "B:", "HOST h2", "D:IDLE", "A:"]
        );
        assert_eq!(
            order(Group::Program, Sort::State, false),
            [
                "PROGRAM (no grant)",
                "C:VIOL",
                "PROGRAM research",
                "D:IDLE",
                "A:",
                "B:"
            ]
        );
    }
}

//! Rollups: per card, per hour and per Korean calendar day, what reconciliation sums over a
//! card's windows, kept current as windows commit (derived rows: `verify` re-derives and
//! compares them).
//!
//! A rollup row sums the windows of one bucket (an hour, or a day in Asia/Seoul) of one card,
//! one agent and one applied assignment (status and grant): good time, unavailable,
//! unattributed, energy, occupied, the grantee's occupied time, the grantee's active time and
//! foreign time, with the highest seq summed. Only windows that count and that lie wholly
//! inside the bucket are summed. A counted window that crosses the bucket's edge, or that was
//! reported for a card another host held (whether it counts can change with `hosts
//! move-card`), is not summed: it leaves a *marker* row (`raw`) in every bucket it touches, and
//! those buckets are always read window by window.
//!
//! Reports read rollups through [`metered`]: a bucket stands in for its windows, as one
//! window spanning the bucket, only where that is exact:
//! - no boundary the report cuts at (its period, the elapsed part, the idle look-back, any
//!   grant's card interval) falls strictly inside the bucket, so every interval the figures
//!   are summed over holds the bucket whole or not at all, and pro-rating by overlap gives
//!   each window's whole value or nothing, as it does for the windows themselves;
//! - it has no marker; and
//! - the report's signed head covers every window summed (each row's highest seq is at most
//!   the head's seq for that agent), so a rollup never counts a window the head does not.
//!
//! A day that fails goes down to its hours, an hour that fails to its windows, so a report
//! reads about one row per card and day, and windows only at its edges.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::store::{MeteredWindow, PrincipalRow, Store, StoreError, WindowRow};

pub const HOUR_MS: i64 = 3_600_000;
pub const DAY_MS: i64 = 86_400_000;
/// Asia/Seoul is UTC+9 all year: its days start at 15:00 UTC.
pub const KST_OFFSET_MS: i64 = 9 * HOUR_MS;

/// The two bucket sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    Hour,
    /// A calendar day in Asia/Seoul.
    Day,
}

impl Level {
    pub fn len_ms(self) -> i64 {
        match self {
            Level::Hour => HOUR_MS,
            Level::Day => DAY_MS,
        }
    }

    /// Start of the bucket holding `t`.
    pub fn bucket(self, t: i64) -> i64 {
        match self {
            Level::Hour => t - t.rem_euclid(HOUR_MS),
            Level::Day => t - (t + KST_OFFSET_MS).rem_euclid(DAY_MS),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Hour => "hour",
            Level::Day => "day",
        }
    }
}

/// One rollup row as stored, with the host and CSP of its agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRow {
    pub level: Level,
    pub start_ms: i64,
    pub gpu_uuid: String,
    pub agent_id: String,
    pub host_id: String,
    pub csp: String,
    /// The applied assignment of the windows summed; empty in a marker.
    pub assignment_status: &'static str,
    pub grant_id: String,
    pub windows: u64,
    /// A marker: the bucket holds a window that is not summed.
    pub raw: bool,
    pub sums: RollupSums,
    pub max_seq: u64,
}

impl RollupRow {
    /// A row as a store reads it: its key, the host and CSP of its agent, `raw`, and
    /// `[windows, the eight sums in `RollupSums` order, max_seq]` as stored (negatives read
    /// as 0).
    #[allow(clippy::too_many_arguments)]
    pub fn stored(
        level: Level,
        start_ms: i64,
        gpu_uuid: String,
        agent_id: String,
        (host_id, csp): (String, String),
        status: &str,
        grant_id: String,
        raw: bool,
        n: [i64; 10],
    ) -> Self {
        let u = |v: i64| v.max(0) as u64;
        Self {
            level,
            start_ms,
            gpu_uuid,
            agent_id,
            host_id,
            csp,
            assignment_status: if status.is_empty() {
                ""
            } else {
                crate::store::sqlite::known(status, crate::store::sqlite::STATUSES)
            },
            grant_id,
            windows: u(n[0]),
            raw,
            sums: RollupSums {
                good_ms: u(n[1]),
                unavailable_ms: u(n[2]),
                unattributed_ms: u(n[3]),
                energy_mj: u(n[4]),
                occupied_ms: u(n[5]),
                grantee_occupied_ms: u(n[6]),
                active_ms: u(n[7]),
                foreign_ms: u(n[8]),
            },
            max_seq: u(n[9]),
        }
    }
}

/// Rows read in bucket order, handed to a visitor one card's bucket (all its rows) at a time,
/// as [`Store::rollups`] promises.
#[derive(Default)]
pub struct Buckets(Vec<RollupRow>);

impl Buckets {
    pub fn push(&mut self, row: RollupRow, visit: &mut dyn FnMut(Vec<RollupRow>)) {
        if self
            .0
            .first()
            .is_some_and(|g| g.start_ms != row.start_ms || g.gpu_uuid != row.gpu_uuid)
        {
            visit(std::mem::take(&mut self.0));
        }
        self.0.push(row);
    }

    pub fn finish(self, visit: &mut dyn FnMut(Vec<RollupRow>)) {
        if !self.0.is_empty() {
            visit(self.0);
        }
    }
}

/// What a rollup row sums, per window as reconciliation reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupSums {
    /// good samples × interval.
    pub good_ms: u64,
    pub unavailable_ms: u64,
    pub unattributed_ms: u64,
    pub energy_mj: u64,
    pub occupied_ms: u64,
    pub grantee_occupied_ms: u64,
    /// Active time of the principals that matched the grant.
    pub active_ms: u64,
    pub foreign_ms: u64,
}

impl RollupSums {
    /// Adds `o` (energy saturating, as it is summed everywhere).
    pub fn add(&mut self, o: RollupSums) {
        self.good_ms += o.good_ms;
        self.unavailable_ms += o.unavailable_ms;
        self.unattributed_ms += o.unattributed_ms;
        self.energy_mj = self.energy_mj.saturating_add(o.energy_mj);
        self.occupied_ms += o.occupied_ms;
        self.grantee_occupied_ms += o.grantee_occupied_ms;
        self.active_ms += o.active_ms;
        self.foreign_ms += o.foreign_ms;
    }

    /// What one window adds (as [`crate::reconcile`] reads a window).
    pub fn of(w: &WindowRow) -> Self {
        Self {
            good_ms: u64::from(w.good_samples).saturating_mul(w.interval_ms),
            unavailable_ms: w.unavailable_ms,
            unattributed_ms: w.unattributed_ms.unwrap_or(0),
            energy_mj: w.energy_mj.unwrap_or(0),
            occupied_ms: w.occupied_ms,
            grantee_occupied_ms: crate::reconcile::grantee_occupied(w),
            active_ms: grantee_active(w),
            foreign_ms: w.foreign_ms,
        }
    }
}

/// Active time of a window's principals that matched its grant.
fn grantee_active(w: &WindowRow) -> u64 {
    w.principals
        .iter()
        .filter(|p| p.matches_grant)
        .map(|p| p.active_ms)
        .sum()
}

/// A stored rollup row that differs from the one the windows give (found by `verify`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RollupMismatch {
    pub table: &'static str,
    pub start_ms: i64,
    pub gpu_uuid: String,
    pub agent_id: String,
    /// "differs", "missing" (the windows give it, the table lacks it) or "not derived" (the
    /// table holds a row no window gives).
    pub problem: &'static str,
}

/// How a window enters the rollups of a level: summed into its bucket, or marking each
/// bucket it touches.
pub enum Entry {
    Summed(i64),
    Marks(Vec<i64>),
}

/// Where a counted window goes at `level`; `disputed`: reported for a card another host held.
pub fn entry(level: Level, w: &WindowRow, disputed: bool) -> Entry {
    let first = level.bucket(w.start_ms);
    let last = level.bucket(w.end_ms.max(w.start_ms + 1) - 1);
    if first == last && !disputed {
        return Entry::Summed(first);
    }
    let mut marks = Vec::new();
    let mut b = first;
    while b <= last {
        marks.push(b);
        b += level.len_ms();
    }
    Entry::Marks(marks)
}

/// One rollup row's increment from one batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Add {
    pub windows: i64,
    pub raw: bool,
    pub sums: RollupSums,
    pub max_seq: i64,
}

/// One batch's counted windows (seq, window, disputed) summed per row of `level`, keyed by
/// (bucket start, card, status, grant): both stores then touch each row once per batch
/// instead of once per window. A marker row has an empty status and grant.
pub fn batch_rows<'a>(
    level: Level,
    windows: &[(i64, &'a WindowRow, bool)],
) -> BTreeMap<(i64, &'a str, &'a str, &'a str), Add> {
    let mut rows: BTreeMap<(i64, &str, &str, &str), Add> = BTreeMap::new();
    for &(seq, w, disputed) in windows {
        for (start, marker, d) in increments(level, seq, w, disputed) {
            let key = if marker {
                (start, w.gpu_uuid.as_str(), "", "")
            } else {
                (
                    start,
                    w.gpu_uuid.as_str(),
                    w.assignment_status,
                    w.grant_id.as_str(),
                )
            };
            rows.entry(key).or_default().merge(&d);
        }
    }
    rows
}

impl Add {
    fn merge(&mut self, d: &Add) {
        self.windows += d.windows;
        self.raw |= d.raw;
        self.max_seq = self.max_seq.max(d.max_seq);
        self.sums.add(d.sums);
    }
}

/// What one counted window adds to the rows of `level` it enters: (bucket start, whether
/// the row is a marker, the increment).
fn increments(level: Level, seq: i64, w: &WindowRow, disputed: bool) -> Vec<(i64, bool, Add)> {
    match entry(level, w, disputed) {
        Entry::Summed(start) => vec![(
            start,
            false,
            Add {
                windows: 1,
                raw: false,
                sums: RollupSums::of(w),
                max_seq: seq,
            },
        )],
        Entry::Marks(starts) => starts
            .into_iter()
            .map(|start| {
                let mark = Add {
                    windows: 1,
                    raw: true,
                    sums: RollupSums::default(),
                    max_seq: seq,
                };
                (start, true, mark)
            })
            .collect(),
    }
}

/// The key of one rollup row of one agent: level, bucket start, card, status, grant.
pub type FoldKey = (Level, i64, String, &'static str, String);

/// One agent's rollup rows in the buckets before `until_ms`, summed from its windows one at a
/// time as `verify` reads them from the signed bodies (where retention dropped the window
/// rows the SQL derivation reads).
#[derive(Debug, Default)]
pub struct Fold {
    pub until_ms: i64,
    pub rows: BTreeMap<FoldKey, Add>,
}

impl Fold {
    pub fn new(until_ms: i64) -> Self {
        Self {
            until_ms,
            rows: BTreeMap::new(),
        }
    }

    /// Adds a window that counts (`disputed`: reported for a card another host held).
    pub fn add(&mut self, seq: u64, w: &WindowRow, disputed: bool) {
        for level in [Level::Hour, Level::Day] {
            for (start, marker, d) in increments(level, seq as i64, w, disputed) {
                // Rows at or after the horizon are compared by the SQL derivation.
                if start >= self.until_ms {
                    continue;
                }
                let key = if marker {
                    (level, start, w.gpu_uuid.clone(), "", String::new())
                } else {
                    (
                        level,
                        start,
                        w.gpu_uuid.clone(),
                        w.assignment_status,
                        w.grant_id.clone(),
                    )
                };
                self.rows.entry(key).or_default().merge(&d);
            }
        }
    }

    /// The stored rows (of this agent, before `until_ms`) that differ from the fold.
    pub fn mismatches(self, agent_id: &str, stored: Vec<RollupRow>) -> Vec<RollupMismatch> {
        let mut derived = self.rows;
        let mut out = Vec::new();
        let mut push = |level: Level, start_ms: i64, gpu_uuid: String, problem| {
            out.push(RollupMismatch {
                table: crate::store::rollup_sql::table(level),
                start_ms,
                gpu_uuid,
                agent_id: agent_id.to_owned(),
                problem,
            })
        };
        for r in stored {
            let key = (
                r.level,
                r.start_ms,
                r.gpu_uuid,
                r.assignment_status,
                r.grant_id,
            );
            let got = Add {
                windows: r.windows as i64,
                raw: r.raw,
                sums: r.sums,
                max_seq: r.max_seq as i64,
            };
            match derived.remove(&key) {
                Some(want) if want == got => {}
                Some(_) => push(key.0, key.1, key.2, "differs"),
                None => push(key.0, key.1, key.2, "not derived"),
            }
        }
        for (k, _) in derived {
            push(k.0, k.1, k.2, "missing");
        }
        out.sort_by(|a, b| {
            (a.table, a.start_ms, &a.gpu_uuid).cmp(&(b.table, b.start_ms, &b.gpu_uuid))
        });
        out
    }
}

/// A rollup row (or a run of them, `len` ms long) as one window spanning it, for
/// reconciliation: delivered time is `good_samples × interval_ms` with a 1-ms interval, and
/// the grantee's active time is one matching principal's.
fn as_window(r: RollupRow, len: i64) -> MeteredWindow {
    let s = r.sums;
    MeteredWindow {
        agent_id: r.agent_id,
        host_id: r.host_id,
        csp: r.csp,
        seq: r.max_seq,
        window: WindowRow {
            gpu_uuid: r.gpu_uuid,
            start_ms: r.start_ms,
            end_ms: r.start_ms + len,
            interval_ms: 1,
            expected_samples: s.good_ms.min(u64::from(u32::MAX)) as u32,
            good_samples: s.good_ms.min(u64::from(u32::MAX)) as u32,
            util_avg_pct: None,
            util_max_pct: None,
            mem_util_avg_pct: None,
            memory_used_max_bytes: None,
            energy_mj: Some(s.energy_mj),
            energy_estimated: false,
            power_avg_w: None,
            temperature_max_c: None,
            throttle_reasons: None,
            health: "ok",
            unavailable_ms: s.unavailable_ms,
            assignment_status: r.assignment_status,
            grant_id: r.grant_id,
            principal: String::new(),
            active_ms: s.active_ms,
            occupied_ms: s.occupied_ms,
            foreign_ms: s.foreign_ms,
            grantee_occupied_ms: Some(s.grantee_occupied_ms),
            unattributed_ms: Some(s.unattributed_ms),
            energy_estimated_mj: None,
            principals: vec![PrincipalRow {
                principal: String::new(),
                uid: None,
                occupied_ms: s.grantee_occupied_ms,
                active_ms: s.active_ms,
                memory_max_bytes: 0,
                process_count: 0,
                matches_grant: true,
            }],
        },
    }
}

/// The boundaries a report cuts at: everywhere, and per card.
#[derive(Debug, Default, Clone)]
pub struct Cuts {
    pub everywhere: Vec<i64>,
    pub by_card: HashMap<String, Vec<i64>>,
}

impl Cuts {
    /// `everywhere` plus every card interval of every grant.
    pub fn of_grants(everywhere: Vec<i64>, grants: &[crate::grants::Grant]) -> Self {
        let mut by_card: HashMap<String, Vec<i64>> = HashMap::new();
        for g in grants {
            for c in &g.cards {
                let (from, until) = g.card_interval(c);
                by_card
                    .entry(c.gpu_uuid.clone())
                    .or_default()
                    .extend([from, until]);
            }
        }
        Self {
            everywhere,
            by_card,
        }
    }

    /// Whether a boundary falls strictly inside `[start, start + len)`.
    fn splits(&self, gpu_uuid: &str, start: i64, len: i64) -> bool {
        let inside = |c: &i64| *c > start && *c < start + len;
        self.everywhere.iter().any(inside)
            || self
                .by_card
                .get(gpu_uuid)
                .is_some_and(|cs| cs.iter().any(inside))
    }
}

/// What one row read for a report counts, as the per-day figures need it: a window, a bucket
/// or an hour, before consecutive days are merged.
#[derive(Debug, Clone, Copy)]
pub struct Counted<'a> {
    pub gpu_uuid: &'a str,
    pub start_ms: i64,
    pub end_ms: i64,
    /// Good samples × interval.
    pub delivered_ms: u64,
    /// The grant the agent metered it under, when assigned.
    pub assigned_to: Option<&'a str>,
    /// Active time of the principals that matched that grant.
    pub grantee_active_ms: u64,
}

impl<'a> Counted<'a> {
    pub fn of(w: &'a WindowRow) -> Self {
        Self {
            gpu_uuid: &w.gpu_uuid,
            start_ms: w.start_ms,
            end_ms: w.end_ms,
            delivered_ms: u64::from(w.good_samples).saturating_mul(w.interval_ms),
            assigned_to: (w.assignment_status == "assigned").then_some(w.grant_id.as_str()),
            grantee_active_ms: grantee_active(w),
        }
    }

    fn of_row(r: &'a RollupRow) -> Self {
        Self {
            gpu_uuid: &r.gpu_uuid,
            start_ms: r.start_ms,
            end_ms: r.start_ms + r.level.len_ms(),
            delivered_ms: r.sums.good_ms,
            assigned_to: (r.assignment_status == "assigned").then_some(r.grant_id.as_str()),
            grantee_active_ms: r.sums.active_ms,
        }
    }
}

/// Consecutive clean days of one card, agent and assignment, merged into one window: between
/// the report's cuts every figure is a sum over whole rows, so one row spanning several days
/// sums to exactly what its days do, and a month reads about one window per card instead of
/// one per card-day.
#[derive(Default)]
struct DayRuns {
    runs: BTreeMap<(String, String, &'static str, String), (RollupRow, i64)>,
    done: Vec<MeteredWindow>,
}

impl DayRuns {
    fn push(&mut self, row: RollupRow, cuts: &Cuts) {
        let key = (
            row.gpu_uuid.clone(),
            row.agent_id.clone(),
            row.assignment_status,
            row.grant_id.clone(),
        );
        let day = row.level.len_ms();
        match self.runs.get_mut(&key) {
            Some((run, len))
                if run.start_ms + *len == row.start_ms
                    && !cuts.splits(&row.gpu_uuid, run.start_ms, *len + day)
                    // Delivered time travels as a u32 count of 1-ms samples.
                    && run.sums.good_ms + row.sums.good_ms <= u64::from(u32::MAX) =>
            {
                *len += day;
                run.windows += row.windows;
                run.max_seq = run.max_seq.max(row.max_seq);
                run.sums.add(row.sums);
            }
            _ => {
                if let Some((run, len)) = self.runs.insert(key, (row, day)) {
                    self.done.push(as_window(run, len));
                }
            }
        }
    }

    fn finish(self, out: &mut Vec<MeteredWindow>) {
        out.extend(self.done);
        out.extend(self.runs.into_values().map(|(r, len)| as_window(r, len)));
    }
}

/// The card's windows in `[from, until)` as reconciliation needs them, with rollups standing in
/// for whole buckets where that is exact (see the module doc), and consecutive clean days of a
/// card merged into one window; `in_head` says whether the report's head covers an agent's
/// seq. `count` sees every window, hour and day before days are merged (for the per-day
/// figures). The figures summed over the windows are those over the windows
/// [`Store::windows`] returns, less the ones the head does not cover: a store without rollups
/// gives exactly those windows.
pub fn metered(
    store: &dyn Store,
    from_ms: i64,
    until_ms: i64,
    cuts: &Cuts,
    in_head: &dyn Fn(&str, u64) -> bool,
    count: &mut dyn FnMut(Counted<'_>),
) -> Result<Vec<MeteredWindow>, StoreError> {
    let mut out = Vec::new();
    let mut need_hours: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    let mut days = DayRuns::default();
    let any = store.rollups(Level::Day, from_ms, until_ms, &mut |group| {
        take_or_descend(
            group,
            cuts,
            in_head,
            &mut |r| {
                count(Counted::of_row(&r));
                days.push(r, cuts);
            },
            &mut |day, gpu, _| {
                need_hours.entry(day).or_default().insert(gpu.to_owned());
            },
        );
    })?;
    days.finish(&mut out);
    if !any {
        let mut ws = store.windows(from_ms, until_ms, None)?;
        ws.retain(|w| in_head(&w.agent_id, w.seq));
        for w in &ws {
            count(Counted::of(&w.window));
        }
        return Ok(ws);
    }
    let mut need_raw: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    // An hour read window by window must still hold its windows (see `crate::retention`).
    let retention = if need_hours.is_empty() {
        crate::retention::Retention::default()
    } else {
        store.retention()?
    };
    let mut refused: Option<StoreError> = None;
    for (day, cards) in need_hours {
        let (f, u) = (day.max(from_ms), (day + DAY_MS).min(until_ms));
        store.rollups(Level::Hour, f, u, &mut |group| {
            if !cards.contains(group[0].gpu_uuid.as_str()) {
                return;
            }
            take_or_descend(
                group,
                cuts,
                in_head,
                &mut |r| {
                    count(Counted::of_row(&r));
                    out.push(as_window(r, HOUR_MS));
                },
                &mut |hour, gpu, rows| {
                    if let Err(e) = retention.check_hour(rows) {
                        refused.get_or_insert(e);
                    }
                    need_raw.entry(hour).or_default().insert(gpu.to_owned());
                },
            );
        })?;
    }
    if let Some(e) = refused {
        return Err(e);
    }
    // A window crossing a bucket's edge is read for each bucket it touches: once is kept.
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    for (hour, cards) in need_raw {
        let (f, u) = (hour.max(from_ms), (hour + HOUR_MS).min(until_ms));
        let ws = if cards.len() > 16 {
            let mut ws = store.windows(f, u, None)?;
            ws.retain(|w| cards.contains(w.window.gpu_uuid.as_str()));
            ws
        } else {
            let mut ws = Vec::new();
            for gpu in &cards {
                ws.extend(store.windows(f, u, Some(gpu))?);
            }
            ws
        };
        for w in ws {
            if in_head(&w.agent_id, w.seq) && seen.insert((w.agent_id.clone(), w.seq)) {
                count(Counted::of(&w.window));
                out.push(w);
            }
        }
    }
    Ok(out)
}

/// One bucket of one card (every row of it): its rows handed to `take` where they stand in
/// exactly, or the bucket handed to `descend`.
fn take_or_descend(
    group: Vec<RollupRow>,
    cuts: &Cuts,
    in_head: &dyn Fn(&str, u64) -> bool,
    take: &mut dyn FnMut(RollupRow),
    descend: &mut dyn FnMut(i64, &str, &[RollupRow]),
) {
    let Some(first) = group.first() else {
        return;
    };
    let (start, len) = (first.start_ms, first.level.len_ms());
    let exact = !cuts.splits(&first.gpu_uuid, start, len)
        && group
            .iter()
            .all(|r| !r.raw && in_head(&r.agent_id, r.max_seq));
    if exact {
        group.into_iter().filter(|r| r.windows > 0).for_each(take);
    } else {
        descend(start, &first.gpu_uuid, &group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_utc_hours_and_seoul_days() {
        // 2026-11-29T15:00Z is midnight (30 November) in Seoul.
        let midnight = 1_795_964_400_000;
        assert_eq!(Level::Day.bucket(midnight), midnight);
        assert_eq!(Level::Day.bucket(midnight - 1), midnight - DAY_MS);
        assert_eq!(Level::Day.bucket(midnight + DAY_MS - 1), midnight);
        assert_eq!(Level::Hour.bucket(midnight + 59 * 60_000), midnight);
        assert_eq!(Level::Hour.bucket(-1), -HOUR_MS);
    }

    fn window(start: i64, end: i64) -> WindowRow {
        WindowRow {
            gpu_uuid: "GPU-1".into(),
            start_ms: start,
            end_ms: end,
            interval_ms: 1_000,
            expected_samples: 60,
            good_samples: 60,
            util_avg_pct: None,
            util_max_pct: None,
            mem_util_avg_pct: None,
            memory_used_max_bytes: None,
            energy_mj: None,
            energy_estimated: false,
            power_avg_w: None,
            temperature_max_c: None,
            throttle_reasons: None,
            health: "ok",
            unavailable_ms: 0,
            assignment_status: "assigned",
            grant_id: "G".into(),
            principal: String::new(),
            active_ms: 0,
            occupied_ms: 0,
            foreign_ms: 0,
            grantee_occupied_ms: None,
            unattributed_ms: None,
            energy_estimated_mj: None,
            principals: vec![],
        }
    }

    #[test]
    fn a_window_inside_its_bucket_is_summed_and_one_across_an_edge_marks_each_bucket() {
        let h = 10 * HOUR_MS;
        assert!(matches!(
            entry(Level::Hour, &window(h, h + 60_000), false),
            Entry::Summed(b) if b == h
        ));
        assert!(matches!(
            entry(Level::Hour, &window(h + HOUR_MS - 60_000, h + HOUR_MS), false),
            Entry::Summed(b) if b == h
        ));
        let Entry::Marks(m) = entry(Level::Hour, &window(h + 1_800_000, h + 3 * HOUR_MS), false)
        else {
            panic!("a window over three hours is not summed")
        };
        assert_eq!(m, vec![h, h + HOUR_MS, h + 2 * HOUR_MS]);
        // Inside one Seoul day it is summed there, whatever its hours.
        assert!(matches!(
            entry(Level::Day, &window(h + 1_800_000, h + 3 * HOUR_MS), false),
            Entry::Summed(_)
        ));
        let Entry::Marks(m) = entry(Level::Hour, &window(h, h + 60_000), true) else {
            panic!("a disputed window is not summed")
        };
        assert_eq!(m, vec![h]);
    }

    #[test]
    fn a_boundary_strictly_inside_a_bucket_splits_it() {
        let mut cuts = Cuts::default();
        cuts.everywhere.push(HOUR_MS);
        cuts.by_card.insert("GPU-2".into(), vec![3 * HOUR_MS + 1]);
        assert!(!cuts.splits("GPU-1", 0, HOUR_MS));
        assert!(!cuts.splits("GPU-1", HOUR_MS, HOUR_MS));
        assert!(cuts.splits("GPU-1", 0, DAY_MS));
        assert!(!cuts.splits("GPU-1", 3 * HOUR_MS, HOUR_MS));
        assert!(cuts.splits("GPU-2", 3 * HOUR_MS, HOUR_MS));
    }
}

//! Retention: raw windows older than a configurable age (default 400 days) dropped where the
//! rollups stand in for them exactly, the signed bodies kept.
//!
//! `gpumeter-collector retain` signs a fresh head, then picks a horizon `H` (the start of the
//! Korean day `max_age_days` before now) and, per agent, a *cut*: the highest checkpoint seq
//! that head covers such that every window and event record at or below it ends by `H`. It
//! drops the derived window rows (`windows`, `window_principals`) of records at or below the
//! cut, except in *pinned* card-hours, where every window is kept:
//! - an hour holding a rollup marker (a window across a bucket edge, or disputed), which
//!   reports always read window by window;
//! - an hour touched by a flagged window (kept as evidence, and for the card-time check);
//! - an hour a grant's card interval starts or ends strictly inside;
//! - the last hour of every Korean day, for every card (a report ending at a day's end reads
//!   each card's health from its last quarter hour).
//!
//! Pins are added only for hours from the previous horizon on (earlier hours may already have
//! lost rows), and a horizon never moves back. Nothing signed is deleted: records, bodies,
//! checkpoints, events and flags stay, so the chain, heads and acks are as before, and every
//! dropped row can be re-derived from its body.
//!
//! What the rest of the collector does with it:
//! - reports read rollups, as before; the planner ([`crate::rollup::metered`]) refuses to read
//!   an unpinned hour window by window where an agent's windows below its horizon may have
//!   been dropped ([`Retention::check_hour`]), so a report either gives the answer it gave
//!   before retention or says why it cannot;
//! - the views that list raw windows (card timelines, the console's card page, jobs) refuse
//!   periods before the horizon ([`Retention::check_raw`]);
//! - `verify` expects a window row below an agent's cut only in a pinned hour (a row present
//!   elsewhere is still compared with its body), and re-derives the agent's rollup rows
//!   before its horizon from the signed bodies instead of the window rows
//!   ([`crate::rollup::Fold`]).

use std::collections::{BTreeSet, HashMap};

/// Card-hours, by card: hour starts.
pub type Pins = HashMap<String, BTreeSet<i64>>;

use crate::rollup::{DAY_MS, HOUR_MS, Level, RollupRow};
use crate::store::StoreError;

/// The default age past which raw windows may be dropped.
pub const DEFAULT_MAX_AGE_DAYS: u32 = 400;

/// One agent's cut: window rows of records at or below `seq` may be dropped, and every such
/// record ends by `horizon_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    pub seq: u64,
    pub horizon_ms: i64,
}

/// What retention has dropped, as readers need it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub cuts: HashMap<String, Cut>,
    /// Card-hours whose windows are all kept, by card.
    pub pins: Pins,
}

impl Retention {
    pub fn is_empty(&self) -> bool {
        self.cuts.is_empty()
    }

    /// The latest horizon of any agent: raw windows before it may be gone.
    pub fn horizon_ms(&self) -> Option<i64> {
        self.cuts.values().map(|c| c.horizon_ms).max()
    }

    /// Whether the card-hour holding `start_ms` keeps every window: pinned when retention
    /// ran, or the last hour of a Korean day (see [`last_hour_of_day`]).
    pub fn pinned(&self, gpu_uuid: &str, start_ms: i64) -> bool {
        let hour = Level::Hour.bucket(start_ms);
        last_hour_of_day(hour) || self.pins.get(gpu_uuid).is_some_and(|h| h.contains(&hour))
    }

    /// Records a pinned card-hour, as loaded.
    pub fn pin(&mut self, gpu_uuid: String, hour_ms: i64) {
        self.pins.entry(gpu_uuid).or_default().insert(hour_ms);
    }

    /// Whether `agent_id`'s window row at `seq` (on `gpu_uuid`, starting at `start_ms`) may
    /// have been dropped.
    pub fn may_drop(&self, agent_id: &str, seq: u64, gpu_uuid: &str, start_ms: i64) -> bool {
        self.cuts
            .get(agent_id)
            .is_some_and(|c| seq <= c.seq && !self.pinned(gpu_uuid, start_ms))
    }

    /// A report needs the windows of one card's hour (`rows`: its rollup rows) one by one:
    /// refused where an agent's rows there may have been dropped.
    pub fn check_hour(&self, rows: &[RollupRow]) -> Result<(), StoreError> {
        let Some(first) = rows.first() else {
            return Ok(());
        };
        if self.is_empty() || self.pinned(&first.gpu_uuid, first.start_ms) {
            return Ok(());
        }
        let Some(cut) = rows
            .iter()
            .filter_map(|r| self.cuts.get(&r.agent_id))
            .find(|c| first.start_ms < c.horizon_ms)
        else {
            return Ok(());
        };
        Err(StoreError::Retained(format!(
            "this report needs the windows of card {} in the hour from {} one by one (a boundary it cuts at falls inside that hour, or its head does not cover the hour's rollups), but raw windows before {} were dropped by retention: only whole hours can be reported there",
            first.gpu_uuid,
            kst(first.start_ms),
            kst(cut.horizon_ms)
        )))
    }

    /// A view listing raw windows from `from_ms` on: refused before the horizon.
    pub fn check_raw(&self, from_ms: i64, what: &str) -> Result<(), StoreError> {
        match self.horizon_ms() {
            Some(h) if from_ms < h => Err(StoreError::Retained(format!(
                "{what} lists raw windows, and those before {} were dropped by retention (the reports' figures are kept): ask for a period from then on",
                kst(h)
            ))),
            _ => Ok(()),
        }
    }
}

/// The last hour of a Korean day (14:00-15:00 UTC) keeps every window, for every card: a
/// report ending at a day's end reads each card's health from its latest window of the
/// quarter hour before ([`crate::query::HEALTH_LOOKBACK_MS`]), so that window must stay.
pub fn last_hour_of_day(hour_ms: i64) -> bool {
    Level::Day.bucket(hour_ms + HOUR_MS) == hour_ms + HOUR_MS
}

/// SQL for [`last_hour_of_day`] of the hour holding `start` (an integer column, ms).
pub fn last_hour_sql(start: &str) -> String {
    format!("((({start}) - ((({start}) % 3600000) + 3600000) % 3600000 + 36000000) % 86400000 = 0)")
}

/// The horizon for `max_age_days` before `now_ms`: the start of that Korean day.
pub fn horizon(now_ms: i64, max_age_days: u32) -> i64 {
    Level::Day.bucket(now_ms - i64::from(max_age_days) * DAY_MS)
}

/// The card-hours a set of instants pins: each instant strictly inside an hour pins it.
pub fn edge_pins(edges: impl IntoIterator<Item = (String, i64)>) -> BTreeSet<(String, i64)> {
    edges
        .into_iter()
        .filter(|(_, t)| t.rem_euclid(HOUR_MS) != 0)
        .map(|(g, t)| (g, Level::Hour.bucket(t)))
        .collect()
}

/// Every hour `[start, end)` touches, from `from_ms` on and before `until_ms`.
pub fn hours_touched(start_ms: i64, end_ms: i64, from_ms: i64, until_ms: i64) -> Vec<i64> {
    let mut out = Vec::new();
    let mut h = Level::Hour.bucket(start_ms);
    let last = Level::Hour.bucket(end_ms.max(start_ms + 1) - 1);
    while h <= last {
        if h >= from_ms && h < until_ms {
            out.push(h);
        }
        h += HOUR_MS;
    }
    out
}

/// An instant as the Korean time operators read.
pub fn kst(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms + crate::rollup::KST_OFFSET_MS).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M KST").to_string(),
    )
}

/// What one run of `retain` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Retained {
    pub horizon_ms: i64,
    /// The head signed first, that covers every cut.
    pub head_id: u64,
    /// Agents whose cut moved: from above `above` to `cut`.
    pub cuts: Vec<MovedCut>,
    pub pins_added: u64,
    pub windows_dropped: u64,
}

/// One agent's cut as a run moved it: records in `(above, cut]` went below it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MovedCut {
    pub agent_id: String,
    pub above: u64,
    pub cut: u64,
}

/// What `retain` is asked for.
#[derive(Debug, Clone)]
pub struct RetainRequest {
    pub horizon_ms: i64,
    pub at_ms: i64,
    pub actor: String,
    /// Each grant card interval's ends, by card.
    pub edges: Vec<(String, i64)>,
}

/// What a backend does for [`run`]: its SQL, each call its own statement or transaction.
pub trait RetainOps {
    /// The latest horizon retention ran to.
    fn previous_horizon(&mut self) -> Result<Option<i64>, StoreError>;
    /// An agent's cut so far (0: none), and the first of its seqs above that whose window
    /// ends after `horizon_ms` or whose event is at or after it.
    fn first_after(
        &mut self,
        agent_id: &str,
        horizon_ms: i64,
    ) -> Result<(u64, Option<u64>), StoreError>;
    /// An agent's checkpoint seqs in `(above, upto]`, ascending.
    fn checkpoints(
        &mut self,
        agent_id: &str,
        above: u64,
        upto: u64,
    ) -> Result<Vec<u64>, StoreError>;
    /// The card-hours in `[from_ms, until_ms)` holding a rollup marker.
    fn marked_hours(
        &mut self,
        from_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, i64)>, StoreError>;
    /// Every flagged window starting before `until_ms`: card, start, end.
    fn flagged_windows(&mut self, until_ms: i64) -> Result<Vec<(String, i64, i64)>, StoreError>;
    /// In one transaction: the pins (those new counted), the cuts (at `horizon_ms`) and the
    /// run's row.
    fn record(
        &mut self,
        req: &RetainRequest,
        head_id: u64,
        pins: &BTreeSet<(String, i64)>,
        cuts: &[MovedCut],
    ) -> Result<u64, StoreError>;
    /// Every agent's recorded cut.
    fn cuts(&mut self) -> Result<Vec<(String, u64)>, StoreError>;
    /// In one transaction: drops the agent's unpinned window rows with seq in `(lo, hi]`;
    /// how many.
    fn drop_range(&mut self, agent_id: &str, lo: u64, hi: u64) -> Result<u64, StoreError>;
}

/// Seq range dropped per transaction.
const RANGE: u64 = 20_000;

/// One run of `retain` under `head` (signed just before): each agent's cut, the pins from
/// the previous horizon on, recorded together; then the window rows below every recorded
/// cut dropped a seq range per transaction, so an interrupted run is finished by the next.
pub fn run(
    ops: &mut dyn RetainOps,
    req: &RetainRequest,
    head: &crate::heads::SignedHead,
) -> Result<Retained, StoreError> {
    let h = req.horizon_ms;
    let previous = ops.previous_horizon()?;
    if let Some(p) = previous.filter(|p| *p > h) {
        return Err(StoreError::Conflict(format!(
            "a horizon never moves back: the last retention ran to {}, after the {} asked for",
            kst(p),
            kst(h)
        )));
    }
    let from = previous.unwrap_or(i64::MIN);
    // Seqs committed after the head are above every leaf's, so these reads need no snapshot.
    let mut cuts = Vec::new();
    for leaf in &head.leaves {
        let (before, first_after) = ops.first_after(&leaf.agent_id, h)?;
        let checkpoints = ops.checkpoints(&leaf.agent_id, before, leaf.seq)?;
        if let Some(cut) = pick_cut(&checkpoints, leaf.seq, first_after, before) {
            cuts.push(MovedCut {
                agent_id: leaf.agent_id.clone(),
                above: before,
                cut,
            });
        }
    }
    let mut pins: BTreeSet<(String, i64)> = edge_pins(req.edges.iter().cloned())
        .into_iter()
        .filter(|(_, hour)| *hour >= from && *hour < h)
        .collect();
    pins.extend(ops.marked_hours(from, h)?);
    for (gpu, start, end) in ops.flagged_windows(h)? {
        for hour in hours_touched(start, end, from, h) {
            pins.insert((gpu.clone(), hour));
        }
    }
    let pins_added = ops.record(req, head.id, &pins, &cuts)?;
    let mut dropped = 0;
    for (agent, cut) in ops.cuts()? {
        let mut lo = 0;
        while lo < cut {
            let hi = (lo + RANGE).min(cut);
            dropped += ops.drop_range(&agent, lo, hi)?;
            lo = hi;
        }
    }
    Ok(Retained {
        horizon_ms: h,
        head_id: head.id,
        cuts,
        pins_added,
        windows_dropped: dropped,
    })
}

/// One agent's cut as `retain` picks it: the highest of `checkpoints` (ascending) at or below
/// `covered` (the signed head's seq for the agent) and below `first_after` (the first seq
/// that ends after the horizon), if it moves past `previous`.
pub fn pick_cut(
    checkpoints: &[u64],
    covered: u64,
    first_after: Option<u64>,
    previous: u64,
) -> Option<u64> {
    checkpoints
        .iter()
        .rev()
        .copied()
        .find(|&s| s <= covered && first_after.is_none_or(|f| s < f))
        .filter(|&s| s > previous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(agent: &str, start: i64) -> RollupRow {
        RollupRow {
            level: Level::Hour,
            start_ms: start,
            gpu_uuid: "GPU-1".into(),
            agent_id: agent.into(),
            host_id: String::new(),
            csp: String::new(),
            assignment_status: "assigned",
            grant_id: "G".into(),
            windows: 60,
            raw: false,
            sums: Default::default(),
            max_seq: 9,
        }
    }

    #[test]
    fn the_horizon_is_the_start_of_a_korean_day() {
        // 2026-12-04 10:00 UTC is 19:00 KST; 400 days before is 2025-10-30 KST, which starts
        // at 2025-10-29 15:00 UTC.
        let now = 1_796_378_400_000;
        let h = horizon(now, 400);
        assert_eq!(h, 1_761_750_000_000);
        assert_eq!((h + crate::rollup::KST_OFFSET_MS).rem_euclid(DAY_MS), 0);
        assert!(now - h >= 400 * DAY_MS && now - h < 401 * DAY_MS);
    }

    #[test]
    fn a_cut_is_a_covered_checkpoint_before_the_first_record_past_the_horizon() {
        let cps = [8, 16, 24, 32];
        assert_eq!(pick_cut(&cps, 32, Some(20), 0), Some(16));
        assert_eq!(pick_cut(&cps, 12, Some(20), 0), Some(8));
        assert_eq!(pick_cut(&cps, 32, None, 0), Some(32));
        assert_eq!(pick_cut(&cps, 32, Some(17), 16), None);
        assert_eq!(pick_cut(&cps, 32, Some(5), 0), None);
        assert_eq!(pick_cut(&[], 32, None, 0), None);
    }

    #[test]
    fn only_hours_below_an_agents_horizon_and_unpinned_are_refused() {
        let h = 10 * HOUR_MS;
        let mut r = Retention::default();
        assert!(r.check_hour(&[row("a", 0)]).is_ok());
        r.cuts.insert(
            "a".into(),
            Cut {
                seq: 100,
                horizon_ms: h,
            },
        );
        let err = r.check_hour(&[row("b", 0), row("a", 0)]).unwrap_err();
        assert!(err.to_string().contains("GPU-1"), "{err}");
        assert!(r.check_hour(&[row("b", 0)]).is_ok());
        assert!(r.check_hour(&[row("a", h)]).is_ok());
        r.pin("GPU-1".into(), 0);
        assert!(r.check_hour(&[row("a", 0)]).is_ok());
        assert!(r.may_drop("a", 100, "GPU-1", HOUR_MS + 5));
        assert!(!r.may_drop("a", 100, "GPU-1", 5));
        assert!(!r.may_drop("a", 101, "GPU-1", HOUR_MS + 5));
        assert!(r.check_raw(h, "the timeline").is_ok());
        assert!(r.check_raw(h - 1, "the timeline").is_err());
    }

    #[test]
    fn the_last_hour_of_each_korean_day_is_always_pinned() {
        // 2026-04-10 23:00 KST is 14:00 UTC.
        let h = 1_775_829_600_000;
        assert!(last_hour_of_day(h));
        assert!(!last_hour_of_day(h - HOUR_MS) && !last_hour_of_day(h + HOUR_MS));
        let r = Retention::default();
        assert!(r.pinned("any", h + 59 * 60_000) && !r.pinned("any", h + HOUR_MS));
    }

    #[test]
    fn edges_pin_only_the_hours_they_fall_strictly_inside() {
        let pins = edge_pins([
            ("g".to_string(), 3 * HOUR_MS),
            ("g".to_string(), 5 * HOUR_MS + 7),
        ]);
        assert_eq!(
            pins.into_iter().collect::<Vec<_>>(),
            vec![("g".into(), 5 * HOUR_MS)]
        );
        assert_eq!(
            hours_touched(HOUR_MS - 10, 3 * HOUR_MS, 0, 10 * HOUR_MS),
            vec![0, HOUR_MS, 2 * HOUR_MS]
        );
        assert_eq!(
            hours_touched(HOUR_MS - 10, 3 * HOUR_MS, HOUR_MS, 2 * HOUR_MS),
            vec![HOUR_MS]
        );
    }
}

//! Reconciliation: metered card windows, events and invoices against grants, per card, grant,
//! program and CSP over a period (DESIGN.md §5). Pure functions over plain data.
//!
//! Figures are kept in integer milliseconds of card time (and millijoules of energy) and turned
//! into GPU-hours / kWh only for display, so sums are exact and the identities below hold
//! exactly, not just to rounding.
//!
//! How a window counts. An agent signs one window per card per `[start, end)` (60 s by
//! default) with sample counts and times, but not the instant of each sample. A window that
//! overlaps an allocation interval (the time a card belonged to a grant, cut to the period)
//! contributes each of its figures pro rata: `figure × overlap / window length`, rounded down.
//! That is the unbiased share when samples are spread evenly over the window, it is exact for
//! every window wholly inside or outside the interval (the common case: grants start and end
//! on whole minutes, windows are aligned to the wall clock), and its error is at most one
//! window per card at each edge of an allocation. Counting the window wholly on one side
//! instead would move up to a whole window across a grant boundary, and recording every
//! sample's time would multiply the ledger's size for a minute of precision nobody bills for.
//!
//! Per allocation interval of a card:
//! - `allocated`: the interval's length (calendar time, independent of data);
//! - `unavailable`: the windows' `unavailable_ms` (samples in which the card was lost);
//! - `delivered`: the windows' good samples × interval; `unmetered` is what is left,
//!   `allocated − delivered − unavailable` (agent down, sequence gaps, failed or missed reads),
//!   so `delivered = allocated − unmetered − unavailable` holds by construction;
//! - `occupied`: the windows' `grantee_occupied_ms` (samples with at least one process of the
//!   grantee), only from windows the agent metered under this grant;
//! - `unattributed`: the windows' `unattributed_ms` (samples in which the card was used but
//!   the driver showed no process: no process list, or utilization with no process visible),
//!   whatever the assignment: nobody can be credited with that time, and it is not idle
//!   either, so `idle = delivered − occupied − unattributed` (a card whose driver goes blind
//!   is never reported reclaimable for it). Windows from agents older than the field count 0;
//! - `active`: Σ of the grantee's principals' `active_ms` (utilization × their share);
//! - `foreign`: the windows' `foreign_ms` (samples with any process not of the grantee);
//! - `energy`: the windows' energy; `violations`: enforcement events recording a violation
//!   (action `none`; not the signals and locks that follow) on the card in the interval.
//!
//! Should overlapping windows (the same card reported twice) push a sum past what the interval
//! can hold, it is capped: unavailable ≤ allocated, delivered ≤ allocated − unavailable,
//! occupied and foreign ≤ delivered, active ≤ occupied.
//!
//! `unassigned_use` is the windows' occupied time on cards outside every grant's allocation
//! (by the collector's grants, not the agent's view), by CSP and host. It belongs to no program
//! or grant, so a report filtered by either leaves it out. Violations recorded on a card at an
//! instant no grant held it are counted there too (`violations` of the unassigned card, host
//! and CSP), so that an unfiltered report's `all_violations` (grants' plus unassigned) is every
//! violation episode of the period, as the Violations RPC lists them.
//!
//! As of. A period still in progress is reconciled up to `as_of` ([`reconcile_as_of`]; the
//! query service passes now, or the reader's `--as-of`): every figure, allocated included,
//! counts only `[from, min(until, as_of))`, the *elapsed* part. The rest, `[as_of, until)`, is
//! *not yet elapsed* and counts in no figure; the report names it (`not_elapsed`) so that a
//! reader does not take the remaining days for unmetered ones. Grants' own validity is not
//! cut: `valid_until` stays the grant's end.
//!
//! Idle grants: over the look-back window `[as_of − days, as_of)`, a grant that held its cards
//! for all of it and whose utilization (active / allocated) stayed under the threshold; its
//! reclaimable cards are those still in it at `as_of` whose own utilization is under the
//! threshold. A grant younger than the window is not judged yet.
//!
//! Invoices: those of months lying wholly inside the period count (the latest import of each
//! CSP, grant and month), summed per grant against the grant's delivered time; grants of the
//! report without an invoice are listed with none billed, once any invoice counts.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::grants::Grant;
use crate::store::{MeteredWindow, StoredEvent, StoredInvoice, WindowRow};

/// Milliseconds in one GPU-hour.
pub const MS_PER_GPU_HOUR: f64 = 3_600_000.0;
/// Millijoules in one kilowatt-hour.
pub const MJ_PER_KWH: f64 = 3_600_000_000.0;
/// The reports' time zone (DESIGN.md §5: Korean calendar).
pub const TIME_ZONE: &str = "Asia/Seoul";

/// GPU-hours in `ms` milliseconds of card time.
pub fn gpu_hours(ms: u64) -> f64 {
    ms as f64 / MS_PER_GPU_HOUR
}

/// Kilowatt-hours in `mj` millijoules.
pub fn kwh(mj: u64) -> f64 {
    mj as f64 / MJ_PER_KWH
}

/// The reconciliation figures of one card, grant, program or CSP, in integer milliseconds of
/// card time (see the module doc for each one's meaning).
///
/// Serialized (for JSON) as each `X_ms` with its `X_gpu_hours`, then `utilization_pct`,
/// `energy_mj`, `energy_kwh` and `violations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figures {
    pub allocated_ms: u64,
    pub unmetered_ms: u64,
    pub unavailable_ms: u64,
    pub delivered_ms: u64,
    pub occupied_ms: u64,
    pub active_ms: u64,
    pub idle_ms: u64,
    pub foreign_ms: u64,
    pub energy_mj: u64,
    /// Enforcement events (processes not of the grantee, or on unassigned cards).
    pub violations: u64,
    /// Delivered time in which the card was used with no process visible (see the module doc).
    pub unattributed_ms: u64,
}

impl Figures {
    /// Adds `other` field by field. Saturating: windows that count are bounded by
    /// `crate::sanity` and never overlap, so no real sum comes near `u64::MAX`; one that
    /// reached it would show as exactly `u64::MAX` rather than wrap to a plausible figure.
    pub fn add(&mut self, other: &Figures) {
        self.allocated_ms = self.allocated_ms.saturating_add(other.allocated_ms);
        self.unmetered_ms = self.unmetered_ms.saturating_add(other.unmetered_ms);
        self.unavailable_ms = self.unavailable_ms.saturating_add(other.unavailable_ms);
        self.delivered_ms = self.delivered_ms.saturating_add(other.delivered_ms);
        self.occupied_ms = self.occupied_ms.saturating_add(other.occupied_ms);
        self.active_ms = self.active_ms.saturating_add(other.active_ms);
        self.idle_ms = self.idle_ms.saturating_add(other.idle_ms);
        self.foreign_ms = self.foreign_ms.saturating_add(other.foreign_ms);
        self.energy_mj = self.energy_mj.saturating_add(other.energy_mj);
        self.violations = self.violations.saturating_add(other.violations);
        self.unattributed_ms = self.unattributed_ms.saturating_add(other.unattributed_ms);
    }

    /// `active / allocated × 100`; `None` with nothing allocated.
    pub fn utilization_pct(&self) -> Option<f64> {
        (self.allocated_ms > 0).then(|| self.active_ms as f64 * 100.0 / self.allocated_ms as f64)
    }

    pub fn allocated_gpu_hours(&self) -> f64 {
        gpu_hours(self.allocated_ms)
    }
    pub fn unmetered_gpu_hours(&self) -> f64 {
        gpu_hours(self.unmetered_ms)
    }
    pub fn unavailable_gpu_hours(&self) -> f64 {
        gpu_hours(self.unavailable_ms)
    }
    pub fn delivered_gpu_hours(&self) -> f64 {
        gpu_hours(self.delivered_ms)
    }
    pub fn occupied_gpu_hours(&self) -> f64 {
        gpu_hours(self.occupied_ms)
    }
    pub fn active_gpu_hours(&self) -> f64 {
        gpu_hours(self.active_ms)
    }
    pub fn idle_gpu_hours(&self) -> f64 {
        gpu_hours(self.idle_ms)
    }
    pub fn foreign_gpu_hours(&self) -> f64 {
        gpu_hours(self.foreign_ms)
    }
    pub fn unattributed_gpu_hours(&self) -> f64 {
        gpu_hours(self.unattributed_ms)
    }
    pub fn energy_kwh(&self) -> f64 {
        kwh(self.energy_mj)
    }

    /// The time figures by name, in report order: (name, ms).
    pub fn times(&self) -> [(&'static str, u64); 9] {
        [
            ("allocated", self.allocated_ms),
            ("unmetered", self.unmetered_ms),
            ("unavailable", self.unavailable_ms),
            ("delivered", self.delivered_ms),
            ("occupied", self.occupied_ms),
            ("active", self.active_ms),
            ("idle", self.idle_ms),
            ("foreign", self.foreign_ms),
            ("unattributed", self.unattributed_ms),
        ]
    }
}

impl Serialize for Figures {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (name, ms) in self.times() {
            m.serialize_entry(&format!("{name}_ms"), &ms)?;
            m.serialize_entry(&format!("{name}_gpu_hours"), &gpu_hours(ms))?;
        }
        m.serialize_entry("utilization_pct", &self.utilization_pct())?;
        m.serialize_entry("energy_mj", &self.energy_mj)?;
        m.serialize_entry("energy_kwh", &self.energy_kwh())?;
        m.serialize_entry("violations", &self.violations)?;
        m.end()
    }
}

/// A half-open span of time `[from, until)`, Unix ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Interval {
    pub from_ms: i64,
    /// Exclusive (JSON `until_exclusive_ms`).
    #[serde(rename = "until_exclusive_ms")]
    pub until_ms: i64,
}

impl Interval {
    pub fn len_ms(&self) -> u64 {
        (self.until_ms - self.from_ms).max(0) as u64
    }

    /// Length of the overlap with `[from, until)`.
    pub fn overlap_ms(&self, from: i64, until: i64) -> u64 {
        (self.until_ms.min(until) - self.from_ms.max(from)).max(0) as u64
    }
}

/// One card of a grant over the period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CardRow {
    pub host_id: String,
    pub gpu_uuid: String,
    /// When the card belonged to the grant within the period (usually one interval; a card
    /// moved away and back has several).
    pub intervals: Vec<Interval>,
    #[serde(flatten)]
    pub figures: Figures,
}

/// One grant over the period: its cards, and their sums.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GrantRow {
    pub grant_id: String,
    pub program: String,
    pub grantee: String,
    pub principal: String,
    pub csp: String,
    pub valid_from_ms: i64,
    /// Exclusive; a revocation is already applied (JSON `valid_until_exclusive_ms`; people
    /// read the inclusive day, see `render`).
    #[serde(rename = "valid_until_exclusive_ms")]
    pub valid_until_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub cards: Vec<CardRow>,
    #[serde(flatten)]
    pub figures: Figures,
}

/// The grants of one program, summed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgramTotal {
    pub program: String,
    pub grants: u32,
    pub cards: u32,
    #[serde(flatten)]
    pub figures: Figures,
}

/// The grants of one CSP, summed; with the unassigned use on the CSP's hosts beside them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CspTotal {
    pub csp: String,
    pub grants: u32,
    pub cards: u32,
    #[serde(flatten)]
    pub figures: Figures,
    /// Occupied time on the CSP's cards outside every grant (not part of `figures`).
    pub unassigned_use_ms: u64,
    pub unassigned_use_gpu_hours: f64,
    /// Violations on the CSP's cards while no grant held them (not part of `figures`).
    pub unassigned_violations: u64,
}

/// Use of one card while no grant held it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnassignedCard {
    pub gpu_uuid: String,
    pub unassigned_use_ms: u64,
    /// Violation episodes on the card while no grant held it.
    pub violations: u64,
}

/// Use of a host's cards while no grant held them (processes on unassigned cards).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnassignedUse {
    pub csp: String,
    pub host_id: String,
    pub cards: Vec<UnassignedCard>,
    pub unassigned_use_ms: u64,
    pub unassigned_use_gpu_hours: f64,
    pub violations: u64,
}

/// A card of an idle grant that could be given to someone else.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReclaimableCard {
    pub host_id: String,
    pub gpu_uuid: String,
    pub allocated_ms: u64,
    pub active_ms: u64,
    pub utilization_pct: f64,
}

/// A grant whose utilization stayed under the threshold over the look-back window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdleGrant {
    pub grant_id: String,
    pub program: String,
    pub grantee: String,
    pub csp: String,
    /// The look-back window the utilization is measured over.
    pub window: Interval,
    pub allocated_ms: u64,
    pub delivered_ms: u64,
    pub active_ms: u64,
    pub utilization_pct: f64,
    /// Cards still in the grant at the window's end whose own utilization is under the
    /// threshold.
    pub reclaimable_cards: Vec<ReclaimableCard>,
}

/// The idle-grant search: settings and findings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdleReport {
    pub threshold_pct: f64,
    pub days: u32,
    /// The end of the look-back window (the period's end, or now if earlier).
    pub as_of_ms: i64,
    pub grants: Vec<IdleGrant>,
}

/// One grant's invoiced GPU-hours against what was delivered.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvoiceRow {
    pub csp: String,
    pub grant_id: String,
    /// Invoice months (YYYY-MM) counted here.
    pub periods: Vec<String>,
    /// `None`: the CSP sent no invoice for this grant.
    pub billed_gpu_hours: Option<f64>,
    pub delivered_ms: u64,
    pub delivered_gpu_hours: f64,
    /// billed − delivered (a missing invoice counts as 0 billed).
    pub difference_gpu_hours: f64,
}

/// A CSP's invoices summed against its grants' delivery.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvoiceCspTotal {
    pub csp: String,
    pub billed_gpu_hours: f64,
    pub delivered_ms: u64,
    pub delivered_gpu_hours: f64,
    pub difference_gpu_hours: f64,
}

/// The whole reconciliation report of a period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reconciliation {
    /// The period as asked for (`2026-04`, `2026-04-01..2026-04-15`, ...).
    pub period: String,
    pub from_ms: i64,
    /// Exclusive (JSON `until_exclusive_ms`).
    #[serde(rename = "until_exclusive_ms")]
    pub until_ms: i64,
    /// The instant the period was reconciled to (now, or the reader's `--as-of`).
    pub as_of_ms: i64,
    /// The end of the elapsed part, `min(until, max(from, as_of))`, exclusive: every figure
    /// counts `[from_ms, elapsed_until_exclusive_ms)` only.
    #[serde(rename = "elapsed_until_exclusive_ms")]
    pub elapsed_until_ms: i64,
    /// The part of the period not yet elapsed at `as_of` (counted in no figure); `None` when
    /// the period is over.
    pub not_elapsed: Option<Interval>,
    pub time_zone: String,
    /// Filters the report was made with (`None`: all).
    pub program: Option<String>,
    pub grant_id: Option<String>,
    pub grants: Vec<GrantRow>,
    pub programs: Vec<ProgramTotal>,
    pub csps: Vec<CspTotal>,
    /// Every grant of the report, summed.
    pub total: Figures,
    pub unassigned: Vec<UnassignedUse>,
    /// Violations on cards while no grant held them, summed over `unassigned`.
    pub unassigned_violations: u64,
    /// `total.violations + unassigned_violations`: every violation episode of the (elapsed)
    /// period in an unfiltered report.
    pub all_violations: u64,
    pub idle: IdleReport,
    pub invoices: Vec<InvoiceRow>,
    pub invoice_csps: Vec<InvoiceCspTotal>,
    /// Identity alarms on the report's cards (filled from the ledger's alarms by the query
    /// layer, see [`crate::identity`]; the engine leaves it empty).
    pub card_alarms: Vec<crate::identity::CardAlarm>,
    /// The figures in GPU-equivalents (see [`equivalents`]); the engine counts every card as
    /// one GPU, and the query layer applies the card inventory's MIG slices.
    pub gpu_equivalents: Equivalents,
    /// Per CSP and program: committed, registered, healthy, granted and delivered cards
    /// (filled by the query layer from the registry, see [`crate::registry::fleet`]; empty,
    /// and absent from the JSON, while no provider is registered).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fleet: Vec<crate::registry::FleetRow>,
}

/// Figures in GPU-equivalents: each card's hours × its GPU-equivalents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Equivalent {
    /// The GPUs the cards make up: Σ each card's GPU-equivalents.
    pub gpus: f64,
    pub allocated_gpu_hours: f64,
    pub delivered_gpu_hours: f64,
    pub active_gpu_hours: f64,
}

impl Equivalent {
    fn add_card(&mut self, factor: f64, f: &Figures) {
        self.gpus += factor;
        self.allocated_gpu_hours += gpu_hours(f.allocated_ms) * factor;
        self.delivered_gpu_hours += gpu_hours(f.delivered_ms) * factor;
        self.active_gpu_hours += gpu_hours(f.active_ms) * factor;
    }

    fn add(&mut self, o: &Equivalent) {
        self.gpus += o.gpus;
        self.allocated_gpu_hours += o.allocated_gpu_hours;
        self.delivered_gpu_hours += o.delivered_gpu_hours;
        self.active_gpu_hours += o.active_gpu_hours;
    }
}

/// [`Equivalent`] figures of one grant, program or CSP (`key` is its id).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KeyedEquivalent {
    pub key: String,
    #[serde(flatten)]
    pub figures: Equivalent,
}

/// A grant card that is not one whole GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CardEquivalent {
    pub grant_id: String,
    pub gpu_uuid: String,
    pub gpu_equivalents: f64,
}

/// A report's figures in GPU-equivalents. The rule: a whole GPU is 1; a MIG instance is its
/// compute slices ÷ its parent GPU's slices (a `1g.10gb` instance of a 7-slice A100 is 1/7),
/// as the agent's inventory reports them; a card whose slices are unknown counts as 1.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Equivalents {
    /// Only the cards that are not 1 (MIG instances), in report order.
    pub cards: Vec<CardEquivalent>,
    pub grants: Vec<KeyedEquivalent>,
    pub programs: Vec<KeyedEquivalent>,
    pub csps: Vec<KeyedEquivalent>,
    pub total: Equivalent,
}

impl Equivalents {
    /// Whether any card counts as other than one GPU (a MIG instance).
    pub fn fractional(&self) -> bool {
        !self.cards.is_empty()
    }
}

/// The GPU-equivalent figures of `r`, with `factor` giving each card's GPU-equivalents.
pub fn equivalents(r: &Reconciliation, factor: &dyn Fn(&str) -> f64) -> Equivalents {
    let mut out = Equivalents::default();
    let mut programs: BTreeMap<&str, Equivalent> = BTreeMap::new();
    let mut csps: BTreeMap<&str, Equivalent> = BTreeMap::new();
    for g in &r.grants {
        let mut e = Equivalent::default();
        for c in &g.cards {
            let k = factor(&c.gpu_uuid);
            if k != 1.0 {
                out.cards.push(CardEquivalent {
                    grant_id: g.grant_id.clone(),
                    gpu_uuid: c.gpu_uuid.clone(),
                    gpu_equivalents: k,
                });
            }
            e.add_card(k, &c.figures);
        }
        programs.entry(&g.program).or_default().add(&e);
        csps.entry(&g.csp).or_default().add(&e);
        out.total.add(&e);
        out.grants.push(KeyedEquivalent {
            key: g.grant_id.clone(),
            figures: e,
        });
    }
    let keyed = |m: BTreeMap<&str, Equivalent>| {
        m.into_iter()
            .map(|(k, figures)| KeyedEquivalent {
                key: k.to_owned(),
                figures,
            })
            .collect()
    };
    out.programs = keyed(programs);
    out.csps = keyed(csps);
    out
}

// ---------------------------------------------------------------------------------------------
// The engine

const DAY_MS: i64 = 86_400_000;

/// How idle grants are looked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IdleSettings {
    /// A grant (and a card) under this utilization is idle.
    pub threshold_pct: f64,
    /// Look-back window in days; a grant must have held its cards for all of it.
    pub days: u32,
    /// End of the look-back window.
    pub as_of_ms: i64,
}

impl IdleSettings {
    /// The look-back window `[as_of − days, as_of)`.
    pub fn window(&self) -> Interval {
        Interval {
            from_ms: self.as_of_ms - i64::from(self.days) * DAY_MS,
            until_ms: self.as_of_ms,
        }
    }
}

/// Everything a reconciliation is made from.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// The period's label as asked for, and its bounds.
    pub period: &'a str,
    pub from_ms: i64,
    pub until_ms: i64,
    pub program: Option<&'a str>,
    pub grant_id: Option<&'a str>,
    /// Every grant held (unassigned use is judged against all of them, whatever the filters).
    pub grants: &'a [Grant],
    /// Windows overlapping the period and the idle look-back window (more do no harm).
    pub windows: &'a [MeteredWindow],
    /// Enforcement events in the period and the look-back window (other kinds are skipped).
    pub events: &'a [StoredEvent],
    pub invoices: &'a [StoredInvoice],
    pub idle: IdleSettings,
}

/// `x × num / den`, rounded down, without overflow.
pub(crate) fn share(x: u64, num: u64, den: u64) -> u64 {
    if den == 0 {
        return 0;
    }
    (u128::from(x) * u128::from(num) / u128::from(den)) as u64
}

pub(crate) fn window_len(w: &WindowRow) -> u64 {
    (w.end_ms - w.start_ms).max(0) as u64
}

/// The grantee's occupied time in a window. Windows from agents older than the field carry
/// only per-principal rows: the longest matching principal's time is then the best lower
/// bound of the union (exact when one principal, or every principal, matches).
pub(crate) fn grantee_occupied(w: &WindowRow) -> u64 {
    if let Some(ms) = w.grantee_occupied_ms {
        return ms;
    }
    if !w.principals.is_empty() && w.principals.iter().all(|p| p.matches_grant) {
        return w.occupied_ms;
    }
    w.principals
        .iter()
        .filter(|p| p.matches_grant)
        .map(|p| p.occupied_ms)
        .max()
        .unwrap_or(0)
}

/// Windows and enforcement events, by card.
struct ByCard<'a> {
    windows: HashMap<&'a str, Vec<&'a MeteredWindow>>,
    violations: HashMap<&'a str, Vec<i64>>,
    /// The (CSP, host) of the agent that recorded a card's latest violation.
    violation_hosts: HashMap<&'a str, (&'a str, &'a str)>,
}

impl<'a> ByCard<'a> {
    fn new(windows: &'a [MeteredWindow], events: &'a [StoredEvent]) -> Self {
        let mut by: HashMap<&str, Vec<&MeteredWindow>> = HashMap::new();
        for w in windows {
            if window_len(&w.window) > 0 {
                by.entry(w.window.gpu_uuid.as_str()).or_default().push(w);
            }
        }
        for v in by.values_mut() {
            v.sort_by_key(|w| (w.window.start_ms, w.window.end_ms));
        }
        let mut violations: HashMap<&str, Vec<i64>> = HashMap::new();
        let mut violation_hosts: HashMap<&str, (&str, &str)> = HashMap::new();
        // One violation, one event: the agent records each episode once with action `none`;
        // its follow-ups (signals and their outcomes, compute-mode locks) are not new ones.
        for e in events
            .iter()
            .filter(|e| e.event.kind == "enforcement" && e.event.action == "none")
        {
            violations
                .entry(e.event.gpu_uuid.as_str())
                .or_default()
                .push(e.event.at_ms);
            violation_hosts.insert(
                e.event.gpu_uuid.as_str(),
                (e.csp.as_str(), e.host_id.as_str()),
            );
        }
        Self {
            windows: by,
            violations,
            violation_hosts,
        }
    }

    /// Violations on a card outside `held` (sorted, disjoint), within `range`.
    fn unassigned_violations(&self, gpu_uuid: &str, held: &[Interval], range: Interval) -> u64 {
        self.violations.get(gpu_uuid).map_or(0, |v| {
            v.iter()
                .filter(|t| **t >= range.from_ms && **t < range.until_ms)
                .filter(|t| !held.iter().any(|h| **t >= h.from_ms && **t < h.until_ms))
                .count() as u64
        })
    }

    /// The card's windows that overlap `iv`.
    fn windows_in(&self, gpu_uuid: &str, iv: Interval) -> impl Iterator<Item = &'a WindowRow> {
        self.windows
            .get(gpu_uuid)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|w| &w.window)
            .filter(move |w| w.start_ms < iv.until_ms && w.end_ms > iv.from_ms)
    }

    /// Figures of one card while it belonged to `grant_id`, over one interval.
    fn figures(&self, gpu_uuid: &str, grant_id: &str, iv: Interval) -> Figures {
        let allocated = iv.len_ms();
        let (mut delivered, mut unavailable, mut occupied, mut active, mut foreign, mut energy) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        let mut unattributed = 0u64;
        for w in self.windows_in(gpu_uuid, iv) {
            let len = window_len(w);
            let ov = iv.overlap_ms(w.start_ms, w.end_ms);
            let part = |x: u64| share(x, ov, len);
            delivered = delivered.saturating_add(part(
                u64::from(w.good_samples).saturating_mul(w.interval_ms),
            ));
            unattributed = unattributed.saturating_add(part(w.unattributed_ms.unwrap_or(0)));
            unavailable = unavailable.saturating_add(part(w.unavailable_ms));
            energy = energy.saturating_add(part(w.energy_mj.unwrap_or(0)));
            // The agent judged who matches against the assignment it applied; only a window
            // metered under this very grant says anything about this grantee. Under another
            // (a stale assignment) or none, every process on the card was someone else's.
            if w.assignment_status == "assigned" && w.grant_id == grant_id {
                occupied += part(grantee_occupied(w));
                active += part(
                    w.principals
                        .iter()
                        .filter(|p| p.matches_grant)
                        .map(|p| p.active_ms)
                        .sum(),
                );
                foreign += part(w.foreign_ms);
            } else {
                foreign += part(w.occupied_ms);
            }
        }
        let unavailable = unavailable.min(allocated);
        let delivered = delivered.min(allocated - unavailable);
        let occupied = occupied.min(delivered);
        // A sample with a visible process is never unattributed, so the two never overlap.
        let unattributed = unattributed.min(delivered - occupied);
        let violations = self.violations.get(gpu_uuid).map_or(0, |v| {
            v.iter()
                .filter(|t| **t >= iv.from_ms && **t < iv.until_ms)
                .count() as u64
        });
        Figures {
            allocated_ms: allocated,
            unmetered_ms: allocated - delivered - unavailable,
            unavailable_ms: unavailable,
            delivered_ms: delivered,
            occupied_ms: occupied,
            active_ms: active.min(occupied),
            idle_ms: delivered - occupied - unattributed,
            foreign_ms: foreign.min(delivered),
            energy_mj: energy,
            violations,
            unattributed_ms: unattributed,
        }
    }

    /// Occupied time of a card's windows outside `held` (sorted, disjoint), within `range`.
    fn unassigned_use(&self, gpu_uuid: &str, held: &[Interval], range: Interval) -> u64 {
        let mut total = 0;
        for w in self.windows_in(gpu_uuid, range) {
            let inside = range.overlap_ms(w.start_ms, w.end_ms);
            let granted: u64 = held
                .iter()
                .map(|h| {
                    Interval {
                        from_ms: h.from_ms.max(range.from_ms),
                        until_ms: h.until_ms.min(range.until_ms),
                    }
                    .overlap_ms(w.start_ms, w.end_ms)
                })
                .sum();
            total += share(w.occupied_ms, inside.saturating_sub(granted), window_len(w));
        }
        total
    }
}

/// Sorts and merges intervals; drops empty ones.
fn merge(mut ivs: Vec<Interval>) -> Vec<Interval> {
    ivs.retain(|i| i.until_ms > i.from_ms);
    ivs.sort();
    let mut out: Vec<Interval> = Vec::with_capacity(ivs.len());
    for i in ivs {
        match out.last_mut() {
            Some(last) if i.from_ms <= last.until_ms => {
                last.until_ms = last.until_ms.max(i.until_ms)
            }
            _ => out.push(i),
        }
    }
    out
}

/// A grant's cards over `range`: per distinct card, in order of first appearance, the
/// intervals in which it belonged to the grant (cut to `range`); cards with none are left out.
fn card_intervals(g: &Grant, range: Interval) -> Vec<(String, String, Vec<Interval>)> {
    let mut out: Vec<(String, String, Vec<Interval>)> = Vec::new();
    for c in &g.cards {
        let (from, until) = g.card_interval(c);
        let iv = Interval {
            from_ms: from.max(range.from_ms),
            until_ms: until.min(range.until_ms),
        };
        if iv.until_ms <= iv.from_ms {
            continue;
        }
        match out
            .iter_mut()
            .find(|(h, u, _)| *h == c.host_id && *u == c.gpu_uuid)
        {
            Some(entry) => entry.2.push(iv),
            None => out.push((c.host_id.clone(), c.gpu_uuid.clone(), vec![iv])),
        }
    }
    for entry in &mut out {
        entry.2 = merge(std::mem::take(&mut entry.2));
    }
    out
}

/// A report's grant and its cards over the elapsed range, as [`report_grant_cards`] gives.
pub type GrantCards<'a> = (&'a Grant, Vec<(String, String, Vec<Interval>)>);

/// The grants a report shows, in its order (by grant id), each with its cards over `range`
/// (host, card, intervals; see [`card_intervals`]); grants that held no card in it are left
/// out. The engine builds its grant rows from exactly these, so a reader summing something
/// else per grant card (the per-day figures) can start before the engine runs.
pub fn report_grant_cards<'a>(
    grants: &'a [Grant],
    program: Option<&str>,
    grant_id: Option<&str>,
    range: Interval,
) -> Vec<GrantCards<'a>> {
    let mut out: Vec<GrantCards<'a>> = grants
        .iter()
        .filter(|g| selected(g, program, grant_id))
        .map(|g| (g, card_intervals(g, range)))
        .filter(|(_, cards)| !cards.is_empty())
        .collect();
    out.sort_by(|a, b| a.0.grant_id.cmp(&b.0.grant_id));
    out
}

/// The part of `[from, until)` elapsed at `as_of`: `[from, min(until, max(from, as_of)))`.
pub fn elapsed_range(from_ms: i64, until_ms: i64, as_of_ms: i64) -> Interval {
    Interval {
        from_ms,
        until_ms: until_ms.min(as_of_ms.max(from_ms)),
    }
}

/// One grant over `range`, from its cards there (never empty).
fn grant_row(
    g: &Grant,
    card_intervals: Vec<(String, String, Vec<Interval>)>,
    by: &ByCard<'_>,
) -> GrantRow {
    let cards: Vec<CardRow> = card_intervals
        .into_iter()
        .map(|(host_id, gpu_uuid, intervals)| {
            let mut figures = Figures::default();
            for iv in &intervals {
                figures.add(&by.figures(&gpu_uuid, &g.grant_id, *iv));
            }
            CardRow {
                host_id,
                gpu_uuid,
                intervals,
                figures,
            }
        })
        .collect();
    let mut figures = Figures::default();
    for c in &cards {
        figures.add(&c.figures);
    }
    GrantRow {
        grant_id: g.grant_id.clone(),
        program: g.program.as_str().to_owned(),
        grantee: g.grantee.clone(),
        principal: g.principal.to_string(),
        csp: g.csp.clone(),
        valid_from_ms: g.valid_from_ms,
        valid_until_ms: g.effective_until_ms(),
        revoked_at_ms: g.revoked_at_ms,
        cards,
        figures,
    }
}

fn selected(g: &Grant, program: Option<&str>, grant_id: Option<&str>) -> bool {
    program.is_none_or(|p| g.program.as_str() == p) && grant_id.is_none_or(|id| g.grant_id == id)
}

/// Use of cards outside every grant, by CSP and host, over `range`.
fn unassigned(grants: &[Grant], by: &ByCard<'_>, range: Interval) -> Vec<UnassignedUse> {
    let mut held: HashMap<&str, Vec<Interval>> = HashMap::new();
    for g in grants {
        for c in &g.cards {
            let (from, until) = g.card_interval(c);
            held.entry(c.gpu_uuid.as_str()).or_default().push(Interval {
                from_ms: from,
                until_ms: until,
            });
        }
    }
    let held: HashMap<&str, Vec<Interval>> = held.into_iter().map(|(k, v)| (k, merge(v))).collect();
    // A card is reported under the host and CSP of the agent that metered it (or, for a card
    // with violations and no window, that recorded the violation).
    let mut rows: BTreeMap<(String, String), BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    let cards: BTreeSet<&str> = by
        .windows
        .keys()
        .chain(by.violations.keys())
        .copied()
        .collect();
    for uuid in cards {
        let held = held.get(uuid).map_or(&[][..], Vec::as_slice);
        let ms = by.unassigned_use(uuid, held, range);
        let violations = by.unassigned_violations(uuid, held, range);
        if ms == 0 && violations == 0 {
            continue;
        }
        let metered_by = by.windows.get(uuid).and_then(|ws| {
            ws.iter()
                .rev()
                .find(|w| w.window.start_ms < range.until_ms)
                .map(|w| (w.csp.as_str(), w.host_id.as_str()))
        });
        let Some((csp, host)) = metered_by.or_else(|| by.violation_hosts.get(uuid).copied()) else {
            continue;
        };
        let e = rows
            .entry((csp.to_owned(), host.to_owned()))
            .or_default()
            .entry(uuid.to_owned())
            .or_default();
        e.0 += ms;
        e.1 += violations;
    }
    rows.into_iter()
        .map(|((csp, host_id), cards)| {
            let total = cards.values().map(|c| c.0).sum();
            let violations = cards.values().map(|c| c.1).sum();
            UnassignedUse {
                csp,
                host_id,
                cards: cards
                    .into_iter()
                    .map(
                        |(gpu_uuid, (unassigned_use_ms, violations))| UnassignedCard {
                            gpu_uuid,
                            unassigned_use_ms,
                            violations,
                        },
                    )
                    .collect(),
                unassigned_use_ms: total,
                unassigned_use_gpu_hours: gpu_hours(total),
                violations,
            }
        })
        .collect()
}

/// Grants whose utilization stayed under the threshold over the look-back window, and which of
/// their cards could be reassigned.
pub fn idle_grants<'a>(
    grants: impl IntoIterator<Item = &'a Grant>,
    windows: &[MeteredWindow],
    events: &[StoredEvent],
    settings: IdleSettings,
) -> Vec<IdleGrant> {
    let by = ByCard::new(windows, events);
    let look = settings.window();
    let mut out = Vec::new();
    for g in grants {
        // A grant is judged only on a whole look-back window it held cards for.
        if g.valid_from_ms > look.from_ms || g.effective_until_ms() < look.until_ms {
            continue;
        }
        let cards = card_intervals(g, look);
        if cards.is_empty() {
            continue;
        }
        let row = grant_row(g, cards, &by);
        let Some(util) = row.figures.utilization_pct() else {
            continue;
        };
        if util >= settings.threshold_pct {
            continue;
        }
        let reclaimable_cards = row
            .cards
            .iter()
            .filter(|c| {
                c.intervals
                    .last()
                    .is_some_and(|i| i.until_ms == look.until_ms)
            })
            .filter_map(|c| {
                let u = c.figures.utilization_pct()?;
                (u < settings.threshold_pct).then(|| ReclaimableCard {
                    host_id: c.host_id.clone(),
                    gpu_uuid: c.gpu_uuid.clone(),
                    allocated_ms: c.figures.allocated_ms,
                    active_ms: c.figures.active_ms,
                    utilization_pct: u,
                })
            })
            .collect();
        out.push(IdleGrant {
            grant_id: row.grant_id,
            program: row.program,
            grantee: row.grantee,
            csp: row.csp,
            window: look,
            allocated_ms: row.figures.allocated_ms,
            delivered_ms: row.figures.delivered_ms,
            active_ms: row.figures.active_ms,
            utilization_pct: util,
            reclaimable_cards,
        });
    }
    out.sort_by(|a, b| a.grant_id.cmp(&b.grant_id));
    out
}

/// Invoices of months wholly inside the period, against the grants' delivery.
fn invoice_rows(inputs: &Inputs<'_>, rows: &[GrantRow]) -> (Vec<InvoiceRow>, Vec<InvoiceCspTotal>) {
    let grant_of: HashMap<&str, &Grant> = inputs
        .grants
        .iter()
        .map(|g| (g.grant_id.as_str(), g))
        .collect();
    let mut billed: BTreeMap<(String, String), (Vec<String>, f64)> = BTreeMap::new();
    for i in inputs.invoices.iter().map(|i| &i.invoice) {
        let Ok((from, until)) = crate::report::parse_period(&i.period) else {
            continue;
        };
        let wanted = grant_of
            .get(i.grant_id.as_str())
            .is_some_and(|g| selected(g, inputs.program, inputs.grant_id));
        if from >= inputs.from_ms && until <= inputs.until_ms && wanted {
            let e = billed
                .entry((i.csp.clone(), i.grant_id.clone()))
                .or_default();
            e.0.push(i.period.clone());
            e.1 += i.billed_gpu_hours;
        }
    }
    if billed.is_empty() {
        return (vec![], vec![]);
    }
    let delivered: HashMap<&str, u64> = rows
        .iter()
        .map(|r| (r.grant_id.as_str(), r.figures.delivered_ms))
        .collect();
    let mut keys: BTreeSet<(String, String)> = billed.keys().cloned().collect();
    keys.extend(rows.iter().map(|r| (r.csp.clone(), r.grant_id.clone())));
    let out: Vec<InvoiceRow> = keys
        .into_iter()
        .map(|key| {
            let d = delivered.get(key.1.as_str()).copied().unwrap_or(0);
            let (periods, b) = match billed.get(&key) {
                Some((p, b)) => (p.clone(), Some(*b)),
                None => (vec![], None),
            };
            InvoiceRow {
                csp: key.0,
                grant_id: key.1,
                periods,
                billed_gpu_hours: b,
                delivered_ms: d,
                delivered_gpu_hours: gpu_hours(d),
                difference_gpu_hours: b.unwrap_or(0.0) - gpu_hours(d),
            }
        })
        .collect();
    let mut totals: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
    for r in &out {
        let t = totals.entry(r.csp.as_str()).or_default();
        t.0 += r.billed_gpu_hours.unwrap_or(0.0);
        t.1 += r.delivered_ms;
    }
    let totals = totals
        .into_iter()
        .map(|(csp, (b, d))| InvoiceCspTotal {
            csp: csp.to_owned(),
            billed_gpu_hours: b,
            delivered_ms: d,
            delivered_gpu_hours: gpu_hours(d),
            difference_gpu_hours: b - gpu_hours(d),
        })
        .collect();
    (out, totals)
}

/// The reconciliation of a period that is over (or taken as over): as of its end.
pub fn reconcile(inputs: &Inputs<'_>) -> Reconciliation {
    reconcile_as_of(inputs, inputs.until_ms)
}

/// The reconciliation of a period as of `as_of_ms`: figures count only the part of the period
/// elapsed by then (see the module doc).
pub fn reconcile_as_of(inputs: &Inputs<'_>, as_of_ms: i64) -> Reconciliation {
    let range = elapsed_range(inputs.from_ms, inputs.until_ms, as_of_ms);
    let elapsed_until = range.until_ms;
    let by = ByCard::new(inputs.windows, inputs.events);
    let grants: Vec<GrantRow> =
        report_grant_cards(inputs.grants, inputs.program, inputs.grant_id, range)
            .into_iter()
            .map(|(g, cards)| grant_row(g, cards, &by))
            .collect();

    let mut total = Figures::default();
    let mut programs: BTreeMap<crate::grants::Program, ProgramTotal> = BTreeMap::new();
    let mut csps: BTreeMap<String, CspTotal> = BTreeMap::new();
    for r in &grants {
        total.add(&r.figures);
        let Ok(program) = r.program.parse::<crate::grants::Program>() else {
            continue;
        };
        let p = programs.entry(program).or_insert_with(|| ProgramTotal {
            program: r.program.clone(),
            grants: 0,
            cards: 0,
            figures: Figures::default(),
        });
        p.grants += 1;
        p.cards += r.cards.len() as u32;
        p.figures.add(&r.figures);
        let c = csps.entry(r.csp.clone()).or_insert_with(|| CspTotal {
            csp: r.csp.clone(),
            grants: 0,
            cards: 0,
            figures: Figures::default(),
            unassigned_use_ms: 0,
            unassigned_use_gpu_hours: 0.0,
            unassigned_violations: 0,
        });
        c.grants += 1;
        c.cards += r.cards.len() as u32;
        c.figures.add(&r.figures);
    }
    // Use outside every grant belongs to no program or grant: only the unfiltered report
    // shows it.
    let unassigned = if inputs.program.is_none() && inputs.grant_id.is_none() {
        unassigned(inputs.grants, &by, range)
    } else {
        vec![]
    };
    for u in &unassigned {
        let c = csps.entry(u.csp.clone()).or_insert_with(|| CspTotal {
            csp: u.csp.clone(),
            grants: 0,
            cards: 0,
            figures: Figures::default(),
            unassigned_use_ms: 0,
            unassigned_use_gpu_hours: 0.0,
            unassigned_violations: 0,
        });
        c.unassigned_use_ms += u.unassigned_use_ms;
        c.unassigned_use_gpu_hours = gpu_hours(c.unassigned_use_ms);
        c.unassigned_violations += u.violations;
    }
    let unassigned_violations: u64 = unassigned.iter().map(|u| u.violations).sum();
    let (invoices, invoice_csps) = invoice_rows(inputs, &grants);
    let mut r = Reconciliation {
        period: inputs.period.to_owned(),
        from_ms: inputs.from_ms,
        until_ms: inputs.until_ms,
        as_of_ms,
        elapsed_until_ms: elapsed_until,
        not_elapsed: (elapsed_until < inputs.until_ms).then_some(Interval {
            from_ms: elapsed_until,
            until_ms: inputs.until_ms,
        }),
        time_zone: TIME_ZONE.to_owned(),
        program: inputs.program.map(str::to_owned),
        grant_id: inputs.grant_id.map(str::to_owned),
        grants,
        programs: programs.into_values().collect(),
        csps: csps.into_values().collect(),
        all_violations: total.violations + unassigned_violations,
        total,
        unassigned,
        unassigned_violations,
        idle: IdleReport {
            threshold_pct: inputs.idle.threshold_pct,
            days: inputs.idle.days,
            as_of_ms: inputs.idle.as_of_ms,
            grants: idle_grants(
                inputs
                    .grants
                    .iter()
                    .filter(|g| selected(g, inputs.program, inputs.grant_id)),
                inputs.windows,
                inputs.events,
                inputs.idle,
            ),
        },
        invoices,
        invoice_csps,
        card_alarms: Vec::new(),
        gpu_equivalents: Equivalents::default(),
        fleet: Vec::new(),
    };
    r.gpu_equivalents = equivalents(&r, &|_| 1.0);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::{GrantCard, Program};
    use crate::store::{EventRow, Invoice, PrincipalRow};
    use proptest::prelude::*;

    const MIN: i64 = 60_000;
    const C1: &str = "GPU-00000001-0000-4000-8000-000000000000";
    const C2: &str = "GPU-00000002-0000-4000-8000-000000000000";
    const C3: &str = "GPU-00000003-0000-4000-8000-000000000000";

    fn grant(
        id: &str,
        program: Program,
        csp: &str,
        from: i64,
        until: i64,
        cards: &[(&str, &str)],
    ) -> Grant {
        Grant {
            grant_id: id.into(),
            program,
            grantee: format!("{id}-lab"),
            principal: "user:alice".parse().unwrap(),
            csp: csp.into(),
            valid_from_ms: from,
            valid_until_ms: until,
            cards: cards.iter().map(|(h, u)| GrantCard::new(*h, *u)).collect(),
            revoked_at_ms: None,
        }
    }

    /// A 60 s window of 1 s samples.
    #[derive(Clone, Copy)]
    struct W {
        minute: i64,
        good: u32,
        lost: u32,
        occupied: u64,
        grantee: u64,
        foreign: u64,
        active: u64,
        energy: u64,
    }

    fn w(minute: i64) -> W {
        W {
            minute,
            good: 60,
            lost: 0,
            occupied: 0,
            grantee: 0,
            foreign: 0,
            active: 0,
            energy: 0,
        }
    }

    fn window(
        host: &str,
        csp: &str,
        gpu: &str,
        grant_id: &str,
        status: &'static str,
        x: W,
    ) -> MeteredWindow {
        let mut principals = vec![];
        if x.grantee > 0 {
            principals.push(PrincipalRow {
                principal: "user:alice".into(),
                uid: Some(1001),
                occupied_ms: x.grantee,
                active_ms: x.active,
                memory_max_bytes: 0,
                process_count: 1,
                matches_grant: true,
            });
        }
        if x.foreign > 0 {
            principals.push(PrincipalRow {
                principal: "user:mallory".into(),
                uid: Some(1002),
                occupied_ms: x.foreign,
                active_ms: 1_000,
                memory_max_bytes: 0,
                process_count: 1,
                matches_grant: false,
            });
        }
        MeteredWindow {
            agent_id: host.into(),
            host_id: host.into(),
            csp: csp.into(),
            seq: x.minute.unsigned_abs(),
            window: WindowRow {
                gpu_uuid: gpu.into(),
                start_ms: x.minute * MIN,
                end_ms: (x.minute + 1) * MIN,
                interval_ms: 1_000,
                expected_samples: 60,
                good_samples: x.good,
                util_avg_pct: None,
                util_max_pct: None,
                mem_util_avg_pct: None,
                memory_used_max_bytes: None,
                energy_mj: Some(x.energy),
                energy_estimated: false,
                power_avg_w: None,
                temperature_max_c: None,
                throttle_reasons: None,
                health: if x.lost > 0 { "lost" } else { "ok" },
                unavailable_ms: u64::from(x.lost) * 1_000,
                assignment_status: status,
                grant_id: grant_id.into(),
                principal: String::new(),
                active_ms: x.active,
                occupied_ms: x.occupied,
                foreign_ms: x.foreign,
                grantee_occupied_ms: Some(x.grantee),
                unattributed_ms: None,
                energy_estimated_mj: None,
                principals,
            },
        }
    }

    fn violation(gpu: &str, at: i64) -> StoredEvent {
        StoredEvent {
            agent_id: "h1".into(),
            host_id: "h1".into(),
            csp: "kt".into(),
            seq: 0,
            event: EventRow {
                gpu_uuid: gpu.into(),
                at_ms: at,
                kind: "enforcement",
                code: 0,
                detail: String::new(),
                pid: Some(7),
                principal: "user:mallory".into(),
                grant_id: String::new(),
                mode: "observe".into(),
                action: "none".into(),
                result: "recorded".into(),
            },
        }
    }

    fn no_idle() -> IdleSettings {
        IdleSettings {
            threshold_pct: 10.0,
            days: 1,
            as_of_ms: 0,
        }
    }

    fn run(
        from: i64,
        until: i64,
        grants: &[Grant],
        windows: &[MeteredWindow],
        events: &[StoredEvent],
    ) -> Reconciliation {
        reconcile(&Inputs {
            period: "test",
            from_ms: from,
            until_ms: until,
            program: None,
            grant_id: None,
            grants,
            windows,
            events,
            invoices: &[],
            idle: no_idle(),
        })
    }

    /// Card C1 over ten minutes: granted to G1 for minutes 2-7; an outage, a lost span, failed
    /// reads, a foreign process, a stale assignment, and use while unassigned.
    fn ten_minutes() -> (Vec<MeteredWindow>, Vec<StoredEvent>) {
        let a = |x: W| window("h1", "kt", C1, "G1", "assigned", x);
        let windows = vec![
            // Before the grant: someone uses the unassigned card.
            window(
                "h1",
                "kt",
                C1,
                "",
                "unassigned",
                W {
                    occupied: 60_000,
                    foreign: 60_000,
                    ..w(0)
                },
            ),
            window(
                "h1",
                "kt",
                C1,
                "",
                "unassigned",
                W {
                    occupied: 60_000,
                    foreign: 60_000,
                    ..w(1)
                },
            ),
            a(W {
                occupied: 30_000,
                grantee: 30_000,
                active: 15_000,
                energy: 1_000,
                ..w(2)
            }),
            // minute 3: no record (agent down)
            a(W {
                good: 50,
                lost: 10,
                energy: 500,
                ..w(4)
            }),
            a(W {
                good: 55,
                energy: 700,
                ..w(5)
            }),
            a(W {
                occupied: 60_000,
                grantee: 60_000,
                foreign: 20_000,
                active: 40_000,
                energy: 2_000,
                ..w(6)
            }),
            // The agent still applied an expired assignment: none of it is the grantee's.
            window(
                "h1",
                "kt",
                C1,
                "",
                "expired",
                W {
                    occupied: 60_000,
                    foreign: 60_000,
                    energy: 900,
                    ..w(7)
                },
            ),
            window("h1", "kt", C1, "", "unassigned", w(8)),
            window(
                "h1",
                "kt",
                C1,
                "",
                "unassigned",
                W {
                    occupied: 6_000,
                    foreign: 6_000,
                    ..w(9)
                },
            ),
        ];
        let events = vec![
            violation(C1, MIN),
            violation(C1, 6 * MIN + 30_000),
            violation(C1, 8 * MIN),
            // A follow-up of the 6:30 violation, not a new one.
            StoredEvent {
                event: EventRow {
                    action: "sigterm".into(),
                    result: "sent".into(),
                    ..violation(C1, 6 * MIN + 31_000).event
                },
                ..violation(C1, 0)
            },
        ];
        (windows, events)
    }

    #[test]
    fn hand_built_windows_give_exact_figures() {
        let g = grant("G1", Program::Hpc, "kt", 2 * MIN, 8 * MIN, &[("h1", C1)]);
        let (windows, events) = ten_minutes();
        let r = run(0, 10 * MIN, &[g], &windows, &events);
        assert_eq!(r.grants.len(), 1);
        let f = r.grants[0].figures;
        assert_eq!(
            f,
            Figures {
                allocated_ms: 360_000,
                // minute 3 missing, 5 failed reads in minute 5
                unmetered_ms: 65_000,
                unavailable_ms: 10_000,
                delivered_ms: 285_000,
                occupied_ms: 90_000,
                active_ms: 55_000,
                idle_ms: 195_000,
                foreign_ms: 80_000,
                energy_mj: 5_100,
                violations: 1,
                unattributed_ms: 0,
            }
        );
        assert_eq!(r.grants[0].cards[0].figures, f);
        assert_eq!(
            r.grants[0].cards[0].intervals,
            vec![Interval {
                from_ms: 2 * MIN,
                until_ms: 8 * MIN
            }]
        );
        assert_eq!(f.utilization_pct(), Some(55_000.0 * 100.0 / 360_000.0));
        assert_eq!(r.total, f);
        assert_eq!(r.programs.len(), 1);
        assert_eq!(
            (
                r.programs[0].program.as_str(),
                r.programs[0].grants,
                r.programs[0].cards
            ),
            ("hpc", 1, 1)
        );
        assert_eq!(r.programs[0].figures, f);
        // Unassigned use: minutes 0, 1 and 9 (minute 7 was inside the grant).
        assert_eq!(r.unassigned.len(), 1);
        assert_eq!(
            (
                r.unassigned[0].csp.as_str(),
                r.unassigned[0].host_id.as_str()
            ),
            ("kt", "h1")
        );
        assert_eq!(r.unassigned[0].unassigned_use_ms, 126_000);
        assert_eq!(
            r.unassigned[0].cards,
            vec![UnassignedCard {
                gpu_uuid: C1.into(),
                unassigned_use_ms: 126_000,
                // At 1:00, before the grant, and at 8:00, the instant it ended.
                violations: 2,
            }]
        );
        assert_eq!(r.csps.len(), 1);
        assert_eq!(r.csps[0].figures, f);
        assert_eq!(r.csps[0].unassigned_use_ms, 126_000);
        assert_eq!(r.csps[0].unassigned_violations, 2);
        // Every violation episode is counted once, in the grant or as unassigned.
        assert_eq!((r.unassigned_violations, r.all_violations), (2, 3));
        assert_eq!((r.elapsed_until_ms, r.not_elapsed), (10 * MIN, None));
    }

    #[test]
    fn a_period_in_progress_counts_only_its_elapsed_part() {
        let g = grant("G1", Program::Hpc, "kt", 2 * MIN, 8 * MIN, &[("h1", C1)]);
        let (windows, events) = ten_minutes();
        let inputs = Inputs {
            period: "p",
            from_ms: 0,
            until_ms: 10 * MIN,
            program: None,
            grant_id: None,
            grants: std::slice::from_ref(&g),
            windows: &windows,
            events: &events,
            invoices: &[],
            idle: no_idle(),
        };
        // As of 5:00: the grant's 2:00-5:00 is elapsed, 5:00-8:00 is not, and counts nowhere.
        let r = reconcile_as_of(&inputs, 5 * MIN);
        let whole = reconcile(&inputs);
        assert_eq!((r.from_ms, r.until_ms), (0, 10 * MIN));
        assert_eq!((r.as_of_ms, r.elapsed_until_ms), (5 * MIN, 5 * MIN));
        assert_eq!(
            r.not_elapsed,
            Some(Interval {
                from_ms: 5 * MIN,
                until_ms: 10 * MIN
            })
        );
        let f = r.grants[0].figures;
        assert_eq!(f.allocated_ms, 3 * MIN as u64);
        assert_eq!(
            r.grants[0].cards[0].intervals,
            vec![Interval {
                from_ms: 2 * MIN,
                until_ms: 5 * MIN
            }]
        );
        assert_eq!(
            f.allocated_ms,
            f.unmetered_ms + f.unavailable_ms + f.delivered_ms
        );
        assert!(f.delivered_ms < whole.grants[0].figures.delivered_ms);
        // The grant's own end is not cut.
        assert_eq!(r.grants[0].valid_until_ms, 8 * MIN);
        // The 6:30 violation lies after the as-of; the 1:00 one is unassigned.
        assert_eq!((f.violations, r.unassigned_violations), (0, 1));
        // Before the period starts nothing has elapsed; after it ends, all of it.
        let before = reconcile_as_of(&inputs, -MIN);
        assert_eq!(before.total.allocated_ms, 0);
        assert_eq!(before.elapsed_until_ms, 0);
        let after = reconcile_as_of(&inputs, 99 * MIN);
        assert_eq!((after.grants, after.not_elapsed), (whole.grants, None));
    }

    #[test]
    fn a_boundary_inside_a_window_splits_it_pro_rata() {
        // The grant starts at 2:30 and ends at 6:15: half of minute 2 and a quarter of minute 6.
        let g = grant(
            "G1",
            Program::Hpc,
            "kt",
            2 * MIN + 30_000,
            6 * MIN + 15_000,
            &[("h1", C1)],
        );
        let (windows, events) = ten_minutes();
        let r = run(0, 10 * MIN, &[g], &windows, &events);
        let f = r.grants[0].figures;
        assert_eq!(f.allocated_ms, 225_000);
        assert_eq!(f.delivered_ms, 30_000 + 50_000 + 55_000 + 15_000);
        assert_eq!(f.unavailable_ms, 10_000);
        assert_eq!(f.unmetered_ms, 225_000 - 150_000 - 10_000);
        assert_eq!(f.occupied_ms, 15_000 + 15_000);
        assert_eq!(f.active_ms, 7_500 + 10_000);
        assert_eq!(f.foreign_ms, 5_000);
        assert_eq!(f.energy_mj, 500 + 500 + 700 + 500);
        assert_eq!(f.violations, 0, "6:30 is after the end");
        // Outside: 1.5 minutes before, and the rest of minute 6 counts only its occupied
        // time pro rata (3/4 of 60 s), then minutes 7 and 9.
        assert_eq!(
            r.unassigned[0].unassigned_use_ms,
            60_000 + 60_000 + 15_000 + 45_000 + 60_000 + 6_000
        );
    }

    #[test]
    fn a_period_cuts_grants_and_windows() {
        let g = grant("G1", Program::Hpc, "kt", 2 * MIN, 8 * MIN, &[("h1", C1)]);
        let (windows, events) = ten_minutes();
        let r = run(5 * MIN, 7 * MIN, &[g], &windows, &events);
        let f = r.grants[0].figures;
        assert_eq!(
            (f.allocated_ms, f.delivered_ms, f.unmetered_ms),
            (120_000, 115_000, 5_000)
        );
        assert_eq!(
            (f.occupied_ms, f.foreign_ms, f.violations),
            (60_000, 20_000, 1)
        );
        assert!(r.unassigned.is_empty());
        // A grant wholly outside the period is left out.
        let g = grant("G2", Program::Research, "kt", 0, MIN, &[("h1", C2)]);
        assert!(
            run(5 * MIN, 7 * MIN, &[g], &windows, &events)
                .grants
                .is_empty()
        );
    }

    #[test]
    fn older_windows_without_the_grantee_union_use_the_longest_matching_principal() {
        let g = grant("G1", Program::Hpc, "kt", 0, MIN, &[("h1", C1)]);
        let mut m = window(
            "h1",
            "kt",
            C1,
            "G1",
            "assigned",
            W {
                occupied: 50_000,
                grantee: 40_000,
                foreign: 20_000,
                active: 10_000,
                ..w(0)
            },
        );
        m.window.grantee_occupied_ms = None;
        m.window.principals.push(PrincipalRow {
            principal: "user:bob".into(),
            uid: Some(1003),
            occupied_ms: 30_000,
            active_ms: 5_000,
            memory_max_bytes: 0,
            process_count: 1,
            matches_grant: true,
        });
        let r = run(
            0,
            MIN,
            std::slice::from_ref(&g),
            std::slice::from_ref(&m),
            &[],
        );
        assert_eq!(
            (
                r.grants[0].figures.occupied_ms,
                r.grants[0].figures.active_ms
            ),
            (40_000, 15_000)
        );
        // Every principal matching: the card's occupied time is the grantee's.
        m.window.principals.retain(|p| p.matches_grant);
        let r = run(0, MIN, &[g], &[m], &[]);
        assert_eq!(r.grants[0].figures.occupied_ms, 50_000);
    }

    #[test]
    fn moved_cards_count_for_their_own_time_and_totals_group_by_program_and_csp() {
        let mut g1 = grant("G1", Program::Hpc, "kt", 0, 10 * MIN, &[("h1", C1)]);
        // C1 leaves at minute 4, C2 joins then.
        g1.cards[0].until_ms = Some(4 * MIN);
        g1.cards.push(GrantCard {
            host_id: "h2".into(),
            gpu_uuid: C2.into(),
            from_ms: Some(4 * MIN),
            until_ms: None,
        });
        let g2 = grant("G2", Program::Research, "nhn", 0, 10 * MIN, &[("h3", C3)]);
        let mut g3 = grant("G3", Program::Hpc, "nhn", 0, 10 * MIN, &[("h1", C1)]);
        g3.cards[0].from_ms = Some(5 * MIN);
        let mut windows = vec![];
        for m in 0..10 {
            windows.push(window("h1", "kt", C1, "", "assigned", w(m)));
            windows.push(window("h2", "kt", C2, "G1", "assigned", w(m)));
            windows.push(window("h3", "nhn", C3, "G2", "assigned", w(m)));
        }
        let r = run(0, 10 * MIN, &[g1, g2, g3], &windows, &[]);
        let ids: Vec<&str> = r.grants.iter().map(|g| g.grant_id.as_str()).collect();
        assert_eq!(ids, ["G1", "G2", "G3"]);
        let g1 = &r.grants[0];
        let cards: Vec<(&str, u64, u64)> = g1
            .cards
            .iter()
            .map(|c| {
                (
                    c.gpu_uuid.as_str(),
                    c.figures.allocated_ms,
                    c.figures.delivered_ms,
                )
            })
            .collect();
        assert_eq!(cards, [(C1, 240_000, 240_000), (C2, 360_000, 360_000)]);
        assert_eq!(r.grants[2].figures.allocated_ms, 300_000);
        let programs: Vec<(&str, u32, u32, u64)> = r
            .programs
            .iter()
            .map(|p| {
                (
                    p.program.as_str(),
                    p.grants,
                    p.cards,
                    p.figures.allocated_ms,
                )
            })
            .collect();
        assert_eq!(
            programs,
            [("hpc", 2, 3, 900_000), ("research", 1, 1, 600_000)]
        );
        let csps: Vec<(&str, u32, u64)> = r
            .csps
            .iter()
            .map(|c| (c.csp.as_str(), c.grants, c.figures.allocated_ms))
            .collect();
        assert_eq!(csps, [("kt", 1, 600_000), ("nhn", 2, 900_000)]);
        // C1 between minute 4 and 5 was in no grant, but nobody used it.
        assert!(r.unassigned.is_empty());

        // Filters.
        let grants = [
            grant("G1", Program::Hpc, "kt", 0, 10 * MIN, &[("h1", C1)]),
            grant("G2", Program::Research, "nhn", 0, 10 * MIN, &[("h3", C3)]),
        ];
        let r = reconcile(&Inputs {
            period: "test",
            from_ms: 0,
            until_ms: 10 * MIN,
            program: Some("research"),
            grant_id: None,
            grants: &grants,
            windows: &windows,
            events: &[],
            invoices: &[],
            idle: no_idle(),
        });
        assert_eq!(r.grants.len(), 1);
        assert_eq!(r.grants[0].grant_id, "G2");
        assert_eq!(r.program.as_deref(), Some("research"));
    }

    #[test]
    fn invoices_of_months_in_the_period_are_set_against_delivery() {
        // April 2026 in KST.
        let (from, until) = crate::report::parse_period("2026-04").unwrap();
        let g1 = grant(
            "G1",
            Program::Hpc,
            "kt",
            from,
            from + 10 * MIN,
            &[("h1", C1)],
        );
        let g2 = grant(
            "G2",
            Program::Hpc,
            "kt",
            from,
            from + 10 * MIN,
            &[("h2", C2)],
        );
        let windows: Vec<MeteredWindow> = (0..6)
            .map(|m| {
                let mut x = window("h1", "kt", C1, "G1", "assigned", w(m));
                x.window.start_ms += from;
                x.window.end_ms += from;
                x
            })
            .collect();
        let inv = |grant_id: &str, period: &str, hours: f64| StoredInvoice {
            invoice: Invoice {
                csp: "kt".into(),
                grant_id: grant_id.into(),
                period: period.into(),
                billed_gpu_hours: hours,
                line: 2,
            },
            actor: "t".into(),
            imported_at_ms: 0,
        };
        let invoices = [inv("G1", "2026-04", 0.25), inv("G1", "2026-05", 9.0)];
        let grants = [g1, g2];
        let r = reconcile(&Inputs {
            period: "2026-04",
            from_ms: from,
            until_ms: until,
            program: None,
            grant_id: None,
            grants: &grants,
            windows: &windows,
            events: &[],
            invoices: &invoices,
            idle: no_idle(),
        });
        assert_eq!(
            r.invoices,
            vec![
                InvoiceRow {
                    csp: "kt".into(),
                    grant_id: "G1".into(),
                    periods: vec!["2026-04".into()],
                    billed_gpu_hours: Some(0.25),
                    delivered_ms: 360_000,
                    delivered_gpu_hours: 0.1,
                    difference_gpu_hours: 0.25 - 0.1,
                },
                InvoiceRow {
                    csp: "kt".into(),
                    grant_id: "G2".into(),
                    periods: vec![],
                    billed_gpu_hours: None,
                    delivered_ms: 0,
                    delivered_gpu_hours: 0.0,
                    difference_gpu_hours: 0.0,
                },
            ]
        );
        assert_eq!(
            r.invoice_csps,
            vec![InvoiceCspTotal {
                csp: "kt".into(),
                billed_gpu_hours: 0.25,
                delivered_ms: 360_000,
                delivered_gpu_hours: 0.1,
                difference_gpu_hours: 0.25 - 0.1,
            }]
        );
    }

    #[test]
    fn idle_grants_are_those_under_the_threshold_for_the_whole_look_back() {
        let day = DAY_MS;
        let busy = grant("BUSY", Program::Hpc, "kt", 0, 30 * day, &[("h1", C1)]);
        let idle = grant(
            "IDLE",
            Program::Research,
            "kt",
            0,
            30 * day,
            &[("h2", C2), ("h3", C3)],
        );
        let young = grant(
            "YOUNG",
            Program::Hpc,
            "kt",
            9 * day,
            30 * day,
            &[("h4", "GPU-young")],
        );
        let mut windows = vec![];
        // BUSY at 50 % for the whole look-back (two days, in 12-hour windows for brevity);
        // IDLE: C2 is used 20 % of one window, C3 not at all.
        for k in 0..4i64 {
            let start = 8 * day + k * day / 2;
            let mk = |gpu: &str, grant: &str, active: u64| {
                let mut m = window(
                    "h",
                    "kt",
                    gpu,
                    grant,
                    "assigned",
                    W {
                        grantee: active,
                        occupied: active,
                        active,
                        ..w(0)
                    },
                );
                m.window.start_ms = start;
                m.window.end_ms = start + day / 2;
                m.window.good_samples = (day / 2 / 1000) as u32;
                m
            };
            windows.push(mk(C1, "BUSY", (day / 4) as u64));
            windows.push(mk(C2, "IDLE", if k == 0 { (day / 10) as u64 } else { 0 }));
            windows.push(mk(C3, "IDLE", 0));
        }
        let settings = IdleSettings {
            threshold_pct: 10.0,
            days: 2,
            as_of_ms: 10 * day,
        };
        let found = idle_grants([&busy, &idle, &young], &windows, &[], settings);
        assert_eq!(found.len(), 1);
        let g = &found[0];
        assert_eq!(g.grant_id, "IDLE");
        assert_eq!(
            g.window,
            Interval {
                from_ms: 8 * day,
                until_ms: 10 * day
            }
        );
        assert_eq!(
            (g.allocated_ms, g.active_ms),
            (4 * day as u64, (day / 10) as u64)
        );
        assert_eq!(g.utilization_pct, 2.5);
        // C2 ran at 5 % over the window: under 10 %, reclaimable too.
        let cards: Vec<(&str, f64)> = g
            .reclaimable_cards
            .iter()
            .map(|c| (c.gpu_uuid.as_str(), c.utilization_pct))
            .collect();
        assert_eq!(cards, [(C2, 5.0), (C3, 0.0)]);
        // A stricter threshold keeps C2.
        let found = idle_grants(
            [&idle],
            &windows,
            &[],
            IdleSettings {
                threshold_pct: 4.0,
                ..settings
            },
        );
        let cards: Vec<&str> = found[0]
            .reclaimable_cards
            .iter()
            .map(|c| c.gpu_uuid.as_str())
            .collect();
        assert_eq!(cards, [C3]);
    }

    #[test]
    fn json_names_figures_with_gpu_hours() {
        let g = grant("G1", Program::Hpc, "kt", 0, 6 * MIN, &[("h1", C1)]);
        let windows: Vec<_> = (0..6)
            .map(|m| {
                window(
                    "h1",
                    "kt",
                    C1,
                    "G1",
                    "assigned",
                    W {
                        occupied: 60_000,
                        grantee: 60_000,
                        active: 30_000,
                        ..w(m)
                    },
                )
            })
            .collect();
        let r = run(0, 6 * MIN, &[g], &windows, &[]);
        let v = serde_json::to_value(&r).unwrap();
        let g = &v["grants"][0];
        assert_eq!(g["grant_id"], "G1");
        assert_eq!(g["allocated_ms"], 360_000);
        assert_eq!(g["allocated_gpu_hours"], 0.1);
        assert_eq!(g["delivered_gpu_hours"], 0.1);
        assert_eq!(g["active_gpu_hours"], 0.05);
        assert_eq!(g["utilization_pct"], 50.0);
        assert_eq!(g["cards"][0]["gpu_uuid"], C1);
        assert_eq!(g["cards"][0]["idle_gpu_hours"], 0.0);
        assert_eq!(v["programs"][0]["program"], "hpc");
        assert_eq!(v["csps"][0]["unassigned_use_gpu_hours"], 0.0);
        assert!(v["total"]["violations"].is_u64());
    }

    // -----------------------------------------------------------------------------------------
    // Properties

    const CARDS: [(&str, &str, &str); 3] = [("h1", "kt", C1), ("h1", "kt", C2), ("h2", "nhn", C3)];

    fn arb_grant(i: usize) -> impl Strategy<Value = Grant> {
        (
            prop_oneof![
                Just(Program::Hpc),
                Just(Program::Research),
                Just(Program::Advanced)
            ],
            prop_oneof![Just("kt"), Just("nhn")],
            0i64..30 * MIN,
            1i64..20 * MIN,
            proptest::sample::subsequence(vec![0usize, 1, 2], 1..=3),
            proptest::option::of(0i64..30 * MIN),
        )
            .prop_map(move |(program, csp, from, len, cards, revoked)| {
                let mut g = grant(&format!("G{i}"), program, csp, from, from + len, &[]);
                g.cards = cards
                    .iter()
                    .map(|k| GrantCard::new(CARDS[*k].0, CARDS[*k].2))
                    .collect();
                g.revoked_at_ms = revoked;
                g
            })
    }

    fn arb_window() -> impl Strategy<Value = (usize, i64, u32, u32, u64, u64, u64, u64, u8, u64)> {
        (
            0usize..3,
            -5i64..35,
            0u32..=60,
            0u32..=60,
            0u64..=100,
            0u64..=100,
            0u64..=100,
            0u64..=100,
            0u8..4,
            0u64..5_000,
        )
    }

    fn check(f: &Figures, what: &str) {
        assert_eq!(
            f.delivered_ms,
            f.allocated_ms - f.unmetered_ms - f.unavailable_ms,
            "{what}: {f:?}"
        );
        assert_eq!(
            f.delivered_ms + f.unmetered_ms + f.unavailable_ms,
            f.allocated_ms,
            "{what}: {f:?}"
        );
        assert!(f.occupied_ms <= f.delivered_ms, "{what}: {f:?}");
        assert_eq!(f.idle_ms, f.delivered_ms - f.occupied_ms, "{what}: {f:?}");
        assert!(f.active_ms <= f.occupied_ms, "{what}: {f:?}");
        assert!(f.foreign_ms <= f.delivered_ms, "{what}: {f:?}");
    }

    fn sum<'a>(it: impl Iterator<Item = &'a Figures>) -> Figures {
        let mut s = Figures::default();
        for f in it {
            s.add(f);
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn figures_balance_and_sums_agree(
            grants in (arb_grant(0), arb_grant(1), arb_grant(2), arb_grant(3)).prop_map(|(a, b, c, d)| vec![a, b, c, d]),
            raw in proptest::collection::vec(arb_window(), 0..120),
            from in -5i64..35,
            len in 1i64..40,
            offset in 0i64..MIN,
        ) {
            let windows: Vec<MeteredWindow> = raw
                .iter()
                .enumerate()
                .map(|(i, &(card, minute, good, lost, occ, gr, fo, act, st, energy))| {
                    let good = good.min(60);
                    let lost = lost.min(60 - good);
                    let good_ms = u64::from(good) * 1000;
                    // percentages of the good time, nested as the agent's figures are
                    let occupied = good_ms * occ / 100;
                    let grantee = occupied * gr / 100;
                    let foreign = occupied * fo / 100;
                    let active = grantee * act / 100;
                    let (host, csp, gpu) = CARDS[card];
                    let (grant_id, status) = match st {
                        0 => ("", "unassigned"),
                        1 => ("G0", "assigned"),
                        2 => ("G1", "assigned"),
                        _ => ("G2", "expired"),
                    };
                    let mut m = window(host, csp, gpu, grant_id, status, W {
                        minute, good, lost, occupied, grantee, foreign, active, energy,
                    });
                    m.seq = i as u64;
                    m
                })
                .collect();
            let (from, until) = (from * MIN + offset, (from + len) * MIN + offset);
            let r = run(from, until, &grants, &windows, &[]);
            for g in &r.grants {
                check(&g.figures, &g.grant_id);
                for c in &g.cards {
                    check(&c.figures, &c.gpu_uuid);
                }
                prop_assert_eq!(g.figures, sum(g.cards.iter().map(|c| &c.figures)));
                // allocated is calendar time: the card intervals cut to the period
                let held = grants.iter().find(|x| x.grant_id == g.grant_id).unwrap();
                let expect: u64 = card_intervals(held, Interval { from_ms: from, until_ms: until })
                    .iter()
                    .flat_map(|(_, _, ivs)| ivs.iter().map(Interval::len_ms))
                    .sum();
                prop_assert_eq!(g.figures.allocated_ms, expect);
            }
            for p in &r.programs {
                check(&p.figures, &p.program);
                prop_assert_eq!(p.figures, sum(r.grants.iter().filter(|g| g.program == p.program).map(|g| &g.figures)));
            }
            for c in &r.csps {
                check(&c.figures, &c.csp);
                prop_assert_eq!(c.figures, sum(r.grants.iter().filter(|g| g.csp == c.csp).map(|g| &g.figures)));
                let unassigned: u64 = r.unassigned.iter().filter(|u| u.csp == c.csp).map(|u| u.unassigned_use_ms).sum();
                prop_assert_eq!(c.unassigned_use_ms, unassigned);
            }
            check(&r.total, "total");
            prop_assert_eq!(r.total, sum(r.grants.iter().map(|g| &g.figures)));
            prop_assert_eq!(r.total, sum(r.programs.iter().map(|p| &p.figures)));
            prop_assert_eq!(r.total, sum(r.csps.iter().map(|c| &c.figures)));
        }
    }
}

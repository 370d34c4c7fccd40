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
//!   grantee), only from windows the agent metered under this grant; `idle = delivered − occupied`;
//! - `active`: Σ of the grantee's principals' `active_ms` (utilization × their share);
//! - `foreign`: the windows' `foreign_ms` (samples with any process not of the grantee);
//! - `energy`: the windows' energy; `violations`: enforcement events on the card in the interval.
//!
//! Should overlapping windows (the same card reported twice) push a sum past what the interval
//! can hold, it is capped: unavailable ≤ allocated, delivered ≤ allocated − unavailable,
//! occupied and foreign ≤ delivered, active ≤ occupied.
//!
//! `unassigned_use` is the windows' occupied time on cards outside every grant's allocation
//! (by the collector's grants, not the agent's view), by CSP and host.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde::ser::SerializeMap;

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
}

impl Figures {
    /// Adds `other` field by field.
    pub fn add(&mut self, other: &Figures) {
        self.allocated_ms += other.allocated_ms;
        self.unmetered_ms += other.unmetered_ms;
        self.unavailable_ms += other.unavailable_ms;
        self.delivered_ms += other.delivered_ms;
        self.occupied_ms += other.occupied_ms;
        self.active_ms += other.active_ms;
        self.idle_ms += other.idle_ms;
        self.foreign_ms += other.foreign_ms;
        self.energy_mj += other.energy_mj;
        self.violations += other.violations;
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
    pub fn energy_kwh(&self) -> f64 {
        kwh(self.energy_mj)
    }

    /// The time figures by name, in report order: (name, ms).
    pub fn times(&self) -> [(&'static str, u64); 8] {
        [
            ("allocated", self.allocated_ms),
            ("unmetered", self.unmetered_ms),
            ("unavailable", self.unavailable_ms),
            ("delivered", self.delivered_ms),
            ("occupied", self.occupied_ms),
            ("active", self.active_ms),
            ("idle", self.idle_ms),
            ("foreign", self.foreign_ms),
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
    /// Exclusive; a revocation is already applied.
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
}

/// Use of one card while no grant held it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnassignedCard {
    pub gpu_uuid: String,
    pub unassigned_use_ms: u64,
}

/// Use of a host's cards while no grant held them (processes on unassigned cards).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnassignedUse {
    pub csp: String,
    pub host_id: String,
    pub cards: Vec<UnassignedCard>,
    pub unassigned_use_ms: u64,
    pub unassigned_use_gpu_hours: f64,
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
    pub delivered_gpu_hours: f64,
    pub difference_gpu_hours: f64,
}

/// The whole reconciliation report of a period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reconciliation {
    /// The period as asked for (`2026-04`, `2026-04-01..2026-04-15`, ...).
    pub period: String,
    pub from_ms: i64,
    /// Exclusive.
    pub until_ms: i64,
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
    pub idle: IdleReport,
    pub invoices: Vec<InvoiceRow>,
    pub invoice_csps: Vec<InvoiceCspTotal>,
}

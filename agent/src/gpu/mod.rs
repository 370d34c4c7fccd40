//! GPU access: the one trait every card reading goes through, and the plain data it returns.
//!
//! Everything is keyed by GPU UUID, never by index. A field a card does not support is `None`,
//! never zero. Implementations may block (NVML calls do); the agent calls them off the async
//! runtime.

pub mod nvml;
pub mod sim;

/// Card utilization (percent) above which a read with no process visible from any of the
/// driver's sources is time nobody can be credited with ("unattributed"), not idle time. An
/// idle card reads 0; a few percent is the driver's own housekeeping.
pub const UNATTRIBUTED_UTIL_PCT: f64 = 5.0;

/// Why a read's usage cannot be attributed to anyone, if it cannot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unattributed {
    /// The driver could not list the card's processes and no other source named one.
    ProcessListUnavailable,
    /// The card was busy and no source named a process.
    BusyWithoutProcesses,
}

impl Unattributed {
    /// Whether `sample`'s time is unattributed, given how many of its processes the agent could
    /// attribute: a process the agent sees counts as attributed even when its owner is unknown.
    pub fn judge(sample: &CardSample, visible_processes: usize) -> Option<Unattributed> {
        if visible_processes > 0 {
            return None;
        }
        if sample.processes_unknown {
            return Some(Unattributed::ProcessListUnavailable);
        }
        sample
            .util_pct
            .is_some_and(|u| u > UNATTRIBUTED_UTIL_PCT)
            .then_some(Unattributed::BusyWithoutProcesses)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Unattributed::ProcessListUnavailable => {
                "the driver gives no process list and no other source names a process"
            }
            Unattributed::BusyWithoutProcesses => "the card is busy but no process is visible",
        }
    }
}

/// A card's memory health counters; each `None` where the card does not report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthCounters {
    pub ecc_uncorrected_volatile: Option<u64>,
    pub ecc_uncorrected_aggregate: Option<u64>,
    /// Pages retired for multiple single-bit and for double-bit errors.
    pub retired_pages: Option<u64>,
    pub retired_pages_pending: Option<bool>,
    pub remapped_rows_corrected: Option<u64>,
    pub remapped_rows_uncorrected: Option<u64>,
    pub remap_pending: Option<bool>,
    pub remap_failed: Option<bool>,
    /// MIG mode: a change while the agent runs is an event (its devices are listed again only
    /// when the agent restarts).
    pub mig_enabled: Option<bool>,
}

impl HealthCounters {
    /// Each counter as (name, value), booleans as 0/1, for comparing two readings.
    pub fn named(&self) -> [(&'static str, Option<u64>); 9] {
        let b = |v: Option<bool>| v.map(u64::from);
        [
            ("ecc_uncorrected_volatile", self.ecc_uncorrected_volatile),
            ("ecc_uncorrected_aggregate", self.ecc_uncorrected_aggregate),
            ("retired_pages", self.retired_pages),
            ("retired_pages_pending", b(self.retired_pages_pending)),
            ("remapped_rows_corrected", self.remapped_rows_corrected),
            ("remapped_rows_uncorrected", self.remapped_rows_uncorrected),
            ("remap_pending", b(self.remap_pending)),
            ("remap_failed", b(self.remap_failed)),
            ("mig_mode", b(self.mig_enabled)),
        ]
    }

    /// The counters that changed from `before` to `self`: (name, old, new). A counter known in
    /// only one of the two readings is not a change (the card stopped or started answering).
    pub fn changes(&self, before: &HealthCounters) -> Vec<(&'static str, u64, u64)> {
        self.named()
            .iter()
            .zip(before.named())
            .filter_map(|((name, now), (_, was))| match (was, now) {
                (Some(was), Some(now)) if was != *now => Some((*name, was, *now)),
                _ => None,
            })
            .collect()
    }
}

/// What a card is. Read once at start and again when cards change.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CardInfo {
    pub uuid: String,
    pub index: u32,
    pub name: String,
    pub serial: Option<String>,
    pub pci_bus_id: Option<String>,
    pub memory_total_bytes: Option<u64>,
    /// `Some(true)` when MIG is enabled; `None` when the card has no MIG (and for a MIG
    /// device itself).
    pub mig_enabled: Option<bool>,
    /// For a MIG device (metered as a card of its own, keyed by its `MIG-…` UUID): its parent
    /// GPU's UUID, its profile (`1g.10gb`), its compute slices and the parent's slices.
    pub mig: Option<MigInfo>,
}

/// What places a MIG device on its parent GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigInfo {
    pub parent_uuid: String,
    /// The profile as `nvidia-smi` names it (`1g.10gb`, `3g.40gb`); empty when unknown.
    pub profile: String,
    /// Compute slices of this device (the `Ng` of its profile).
    pub slices: Option<u32>,
    /// Compute slices of the parent: the most MIG devices it can hold.
    pub parent_slices: Option<u32>,
}

impl MigInfo {
    /// The profile from a MIG device's name (`NVIDIA A100-SXM4-40GB MIG 1g.5gb`).
    pub fn profile_from_name(name: &str) -> String {
        name.rsplit_once(" MIG ")
            .map(|(_, p)| p.trim().to_owned())
            .unwrap_or_default()
    }

    /// Compute slices from a profile: the `N` of its `Ng` part (`1g.10gb` → 1, `1c.3g.40gb` → 3).
    pub fn slices_of(profile: &str) -> Option<u32> {
        profile
            .split('.')
            .find_map(|part| part.strip_suffix('g')?.parse().ok())
    }
}

/// Inventory of a whole server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    pub driver_version: Option<String>,
    pub cards: Vec<CardInfo>,
}

/// A process using a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// GPU memory used by the process, where the driver reports it.
    pub used_memory_bytes: Option<u64>,
    /// SM utilization of this process (percent) over the sample, where the driver reports it.
    pub sm_util_pct: Option<u32>,
    /// `true` for a graphics context, `false` for compute.
    pub graphics: bool,
    /// The driver's per-process accounting record, where the operator has enabled accounting
    /// mode on the card (the agent never enables it) and the driver holds one for this pid.
    pub accounting: Option<ProcessAccounting>,
    /// Which of the driver's sources named this pid in this read.
    pub seen_in: ProcessSources,
}

/// The driver's sources of process ids; a pid seen in any of them is on the card.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcessSources {
    /// The running compute or graphics process list.
    pub list: bool,
    /// The per-process utilization samples since the last read.
    pub samples: bool,
    /// A running accounting record (accounting mode enabled by the operator).
    pub accounting: bool,
}

/// NVML's per-process accounting record. Figures cover the process's whole lifetime, not one
/// sample. A value the driver reports as unavailable is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessAccounting {
    /// Percent of the process's lifetime during which a kernel of it was running.
    pub gpu_util_pct: Option<u32>,
    /// Percent of the process's lifetime during which device memory was read or written.
    pub mem_util_pct: Option<u32>,
    /// Most GPU memory the process ever had allocated.
    pub max_memory_bytes: Option<u64>,
    /// How long the compute context was active (ms); the driver fills it in only once the
    /// process has ended, so a running process has `None`.
    pub time_ms: Option<u64>,
    /// When the process started (Unix µs, CPU clock).
    pub start_time_us: Option<u64>,
    pub running: bool,
}

/// How a utilization figure was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UtilSource {
    /// Averaged from the driver's sample buffer since the last read.
    Samples,
    /// `utilization_rates`, the driver's instantaneous figure.
    Rates,
    /// A simulated card.
    Simulated,
}

/// One reading of one card.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CardSample {
    pub uuid: String,
    /// GPU (SM) utilization, percent.
    pub util_pct: Option<f64>,
    /// Memory-controller utilization, percent.
    pub mem_util_pct: Option<f64>,
    pub util_source: Option<UtilSource>,
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    /// Cumulative energy counter, millijoules since driver load (may reset).
    pub energy_counter_mj: Option<u64>,
    pub power_mw: Option<u32>,
    pub temperature_c: Option<u32>,
    pub sm_clock_mhz: Option<u32>,
    pub mem_clock_mhz: Option<u32>,
    pub throttle_reasons: Option<u64>,
    pub ecc_corrected_total: Option<u64>,
    pub ecc_uncorrected_total: Option<u64>,
    /// Slow-moving health counters, read every few samples (`None` in the reads between).
    pub health: Option<Box<HealthCounters>>,
    pub processes: Vec<GpuProcess>,
    /// `true` when the driver could not list the card's processes this read (NOT_SUPPORTED, or
    /// the call failed): an empty `processes` then means "not known", not "none".
    pub processes_unknown: bool,
}

/// What reading a card gave.
#[derive(Debug, Clone, PartialEq)]
pub enum CardReading {
    Ok(CardSample),
    /// The card is gone (fallen off the bus, GPU_IS_LOST); other cards carry on.
    Lost {
        uuid: String,
        reason: String,
    },
    /// The read failed this time.
    Failed {
        uuid: String,
        reason: String,
    },
}

impl CardReading {
    pub fn uuid(&self) -> &str {
        match self {
            CardReading::Ok(s) => &s.uuid,
            CardReading::Lost { uuid, .. } | CardReading::Failed { uuid, .. } => uuid,
        }
    }
}

/// A driver event (XID, ECC) seen between reads. Every occurrence is one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuEvent {
    pub uuid: String,
    pub at_ms: i64,
    pub kind: GpuEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuEventKind {
    Xid(u64),
    EccSingleBit,
    EccDoubleBit,
    Lost,
    Recovered,
    /// A health counter changed: (counter, old value, new value).
    Health {
        counter: &'static str,
        from: u64,
        to: u64,
    },
}

/// Why a GPU source could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("cannot load the NVML library {path}: {reason}")]
    LibraryLoad { path: String, reason: String },
    #[error("NVML call {call} failed: {reason}")]
    Call { call: &'static str, reason: String },
    #[error("bad simulation scenario {path}: {reason}")]
    Scenario { path: String, reason: String },
}

/// Every card reading goes through this trait.
pub trait GpuSource: Send + 'static {
    /// Cards present now.
    fn inventory(&mut self) -> Result<Inventory, GpuError>;

    /// Reads every card. `at_ms` is the sample slot's wall-clock time; a live source reads now
    /// and ignores it, a replayable one answers for that instant.
    fn read(&mut self, at_ms: i64) -> Vec<CardReading>;

    /// Driver events seen since the last call, oldest first.
    fn drain_events(&mut self) -> Vec<GpuEvent>;

    /// Whether the source can answer for a past instant (simulation). A late sampler then
    /// catches up slot by slot instead of marking slots missed.
    fn replayable(&self) -> bool {
        false
    }

    /// Sets compute mode PROHIBITED (`true`) or back to default (`false`); used only when the
    /// operator turns on `lock_unassigned`.
    fn set_compute_prohibited(&mut self, _uuid: &str, _prohibited: bool) -> Result<(), GpuError> {
        Err(GpuError::Call {
            call: "set_compute_mode",
            reason: "not supported by this source".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_profile_and_slices_from_the_device_name() {
        let p = MigInfo::profile_from_name("NVIDIA A100-SXM4-40GB MIG 1g.5gb");
        assert_eq!(p, "1g.5gb");
        assert_eq!(MigInfo::slices_of(&p), Some(1));
        assert_eq!(MigInfo::slices_of("3g.40gb"), Some(3));
        // A compute-instance profile inside a larger GPU instance: the GPU instance's slices.
        assert_eq!(MigInfo::slices_of("1c.3g.40gb"), Some(3));
        assert_eq!(MigInfo::profile_from_name("NVIDIA H100 80GB HBM3"), "");
        assert_eq!(MigInfo::slices_of(""), None);
    }

    #[test]
    fn health_changes_are_the_counters_known_both_times_that_differ() {
        let before = HealthCounters {
            ecc_uncorrected_aggregate: Some(5),
            retired_pages: Some(2),
            remap_pending: Some(false),
            ..HealthCounters::default()
        };
        let now = HealthCounters {
            ecc_uncorrected_aggregate: Some(6),
            retired_pages: Some(2),
            remap_pending: Some(true),
            // Newly answering: not a change.
            mig_enabled: Some(true),
            ..HealthCounters::default()
        };
        assert_eq!(
            now.changes(&before),
            vec![("ecc_uncorrected_aggregate", 5, 6), ("remap_pending", 0, 1)]
        );
        assert!(now.changes(&now).is_empty());
    }

    #[test]
    fn unattributed_needs_no_visible_process_and_a_blind_or_busy_card() {
        let busy = CardSample {
            util_pct: Some(73.0),
            ..CardSample::default()
        };
        assert_eq!(
            Unattributed::judge(&busy, 0),
            Some(Unattributed::BusyWithoutProcesses)
        );
        assert_eq!(Unattributed::judge(&busy, 1), None);
        let quiet = CardSample {
            util_pct: Some(UNATTRIBUTED_UTIL_PCT),
            ..CardSample::default()
        };
        assert_eq!(Unattributed::judge(&quiet, 0), None);
        let blind = CardSample {
            util_pct: None,
            processes_unknown: true,
            ..CardSample::default()
        };
        assert_eq!(
            Unattributed::judge(&blind, 0),
            Some(Unattributed::ProcessListUnavailable)
        );
        // Utilization absent (a MIG device) and a list that works: nothing to say.
        assert_eq!(Unattributed::judge(&CardSample::default(), 0), None);
    }
}

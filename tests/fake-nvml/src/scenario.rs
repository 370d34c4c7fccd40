//! The scenario file: what the fake driver reports, and how it is (re)loaded.
//!
//! Format: one JSON object (see the crate docs for every field). Rules:
//! - The file is re-read when its mtime, size or inode changes, so tests change the scenario
//!   while a reader has the library open. Write a new file and rename it over the old one: a
//!   reader never sees half a file that way.
//! - A file that does not parse keeps the last good scenario (a torn write must not look like a
//!   server without GPUs); the error goes to stderr. With no good scenario yet, the call fails.
//! - Unknown fields are errors, so a typo in a test fails loudly instead of being ignored.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

/// Names accepted in `not_supported`, one per group of NVML calls.
pub const FEATURES: &[&str] = &[
    "serial",
    "pci",
    "memory",
    "mig",
    "utilization",
    "samples",
    "process_utilization",
    "energy",
    "power",
    "temperature",
    "clocks",
    "throttle",
    "ecc",
    "processes",
    "events",
    "compute_mode",
    "accounting",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default = "default_driver_version")]
    pub driver_version: String,
    #[serde(default)]
    pub cards: Vec<Card>,
}

fn default_driver_version() -> String {
    "550.54.15".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Card {
    pub uuid: String,
    #[serde(default = "default_name")]
    pub name: String,
    /// Absent: the card has no serial number (the call says NOT_SUPPORTED).
    #[serde(default)]
    pub serial: Option<String>,
    /// `DDDDDDDD:BB:DD.F`, as NVML prints it.
    #[serde(default)]
    pub pci_bus_id: String,
    #[serde(default)]
    pub memory_total: u64,
    /// Absent: the card has no MIG (the call says NOT_SUPPORTED).
    #[serde(default)]
    pub mig_mode: Option<bool>,
    #[serde(default)]
    pub util_gpu: u32,
    #[serde(default)]
    pub util_mem: u32,
    #[serde(default)]
    pub memory_used: u64,
    #[serde(default)]
    pub power_mw: u32,
    /// Energy counter (mJ). Without `energy_at_ms` it is returned as is; with it, the counter
    /// grows by `power_mw` from that wall-clock instant (Unix ms) on:
    /// `energy_mj + power_mw * (now_ms - energy_at_ms) / 1000`.
    #[serde(default)]
    pub energy_mj: u64,
    #[serde(default)]
    pub energy_at_ms: Option<i64>,
    #[serde(default)]
    pub temperature_c: u32,
    #[serde(default)]
    pub sm_clock_mhz: u32,
    #[serde(default)]
    pub mem_clock_mhz: u32,
    #[serde(default)]
    pub throttle_reasons: u64,
    /// Volatile ECC totals.
    #[serde(default)]
    pub ecc_corrected: u64,
    #[serde(default)]
    pub ecc_uncorrected: u64,
    /// Aggregate (lifetime) uncorrected ECC total; absent: the same as the volatile one.
    #[serde(default)]
    pub ecc_uncorrected_aggregate: Option<u64>,
    /// Retired pages; absent: the calls say NOT_SUPPORTED.
    #[serde(default)]
    pub retired_pages: Option<RetiredPages>,
    /// Remapped rows (Ampere and later); absent: NOT_SUPPORTED.
    #[serde(default)]
    pub remapped_rows: Option<RemappedRows>,
    #[serde(default)]
    pub processes: Vec<Process>,
    /// `false`: nvmlDeviceGetSamples says NOT_SUPPORTED (same as `"samples"` in
    /// `not_supported`).
    #[serde(default = "yes")]
    pub samples_supported: bool,
    /// Spacing of the synthesized utilization samples (µs of wall-clock time).
    #[serde(default = "default_sample_period_us")]
    pub sample_period_us: u64,
    /// Explicit GPU-utilization sample buffer; replaces the synthesized samples.
    #[serde(default)]
    pub gpu_samples: Option<Vec<SampleAt>>,
    /// Explicit memory-utilization sample buffer; replaces the synthesized samples.
    #[serde(default)]
    pub mem_samples: Option<Vec<SampleAt>>,
    #[serde(default)]
    pub not_supported: Vec<String>,
    /// Every call on the card answers NVML_ERROR_GPU_IS_LOST (handle lookups still work).
    #[serde(default)]
    pub lost: bool,
    /// NVML function names that answer NVML_ERROR_UNKNOWN.
    #[serde(default)]
    pub failing_calls: Vec<String>,
    #[serde(default)]
    pub xid_events: Vec<XidEvent>,
    #[serde(default)]
    pub ecc_events: Vec<EccEvent>,
    /// Per-process accounting mode as the operator left it (`nvmlDeviceSetAccountingMode`
    /// overrides it in memory).
    #[serde(default)]
    pub accounting_mode: bool,
    /// The process lists' null-buffer count query answers SUCCESS with the count instead of
    /// INSUFFICIENT_SIZE, as some drivers do (a call with a buffer is unchanged).
    #[serde(default)]
    pub process_count_success: bool,
    /// MIG devices of this card (with `mig_mode: true`), in handle-index order.
    #[serde(default)]
    pub mig_devices: Vec<MigDevice>,
    /// Compute slices of the whole card: the most MIG devices it can hold (7 on an A100/H100).
    #[serde(default = "default_mig_slices")]
    pub mig_slices: u32,
}

fn default_mig_slices() -> u32 {
    7
}

/// One MIG device (a GPU instance with its compute instance): its own UUID, name (the
/// parent's name and ` MIG <profile>`), memory and processes. Utilization, power, energy,
/// temperature, clocks, ECC and events answer NOT_SUPPORTED on it, as on a real MIG device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigDevice {
    pub uuid: String,
    /// As `nvidia-smi` names it: `1g.10gb`, `3g.40gb`, ...
    pub profile: String,
    #[serde(default)]
    pub memory_total: u64,
    #[serde(default)]
    pub memory_used: u64,
    #[serde(default)]
    pub processes: Vec<Process>,
}

fn default_name() -> String {
    "NVIDIA H100 80GB HBM3".to_owned()
}

fn yes() -> bool {
    true
}

fn default_sample_period_us() -> u64 {
    50_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub pid: u32,
    /// Absent: the driver reports the value as not available.
    #[serde(default)]
    pub used_memory: Option<u64>,
    /// Absent: the process gets no utilization samples.
    #[serde(default)]
    pub sm_util: Option<u32>,
    #[serde(default)]
    pub graphics: bool,
    /// The driver's accounting record for the process; absent: NOT_FOUND.
    #[serde(default)]
    pub accounting: Option<Accounting>,
}

/// `nvmlAccountingStats_t` as the scenario gives it. An absent value is reported as
/// NVML_VALUE_NOT_AVAILABLE.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accounting {
    #[serde(default)]
    pub gpu_util: Option<u32>,
    #[serde(default)]
    pub mem_util: Option<u32>,
    #[serde(default)]
    pub max_memory: Option<u64>,
    #[serde(default)]
    pub time_ms: Option<u64>,
    #[serde(default)]
    pub start_time_us: Option<u64>,
    #[serde(default = "yes")]
    pub running: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredPages {
    /// Pages retired for multiple single-bit errors, and for a double-bit error.
    #[serde(default)]
    pub single_bit: u32,
    #[serde(default)]
    pub double_bit: u32,
    #[serde(default)]
    pub pending: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemappedRows {
    #[serde(default)]
    pub corrected: u32,
    #[serde(default)]
    pub uncorrected: u32,
    #[serde(default)]
    pub pending: bool,
    #[serde(default)]
    pub failure: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleAt {
    pub ts_us: u64,
    pub value: u32,
}

/// One XID occurrence; `seq` tells two occurrences of the same code apart.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidEvent {
    pub code: u64,
    pub seq: u64,
    /// Deliver it through the event set of this other card (its UUID) instead: the event still
    /// names this card's device, as when one set watches several cards.
    #[serde(default)]
    pub via: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EccEvent {
    #[serde(default)]
    pub double_bit: bool,
    pub seq: u64,
    /// As [`XidEvent::via`].
    #[serde(default)]
    pub via: Option<String>,
}

impl Card {
    pub fn unsupported(&self, feature: &str) -> bool {
        self.not_supported.iter().any(|f| f == feature)
            || (feature == "samples" && !self.samples_supported)
    }

    pub fn fails(&self, call: &str) -> bool {
        self.failing_calls.iter().any(|c| c == call)
    }

    /// The energy counter at `now_ms`.
    pub fn energy_at(&self, now_ms: i64) -> u64 {
        let grown = match self.energy_at_ms {
            Some(at) if now_ms > at => {
                let elapsed = u128::try_from(now_ms - at).unwrap_or(0);
                u64::try_from(u128::from(self.power_mw) * elapsed / 1000).unwrap_or(u64::MAX)
            }
            _ => 0,
        };
        self.energy_mj.saturating_add(grown)
    }
}

impl Scenario {
    pub fn card(&self, uuid: &str) -> Option<&Card> {
        self.cards.iter().find(|c| c.uuid == uuid)
    }

    /// A card or a MIG device by UUID; a MIG device is answered as a card of its own that
    /// supports what a MIG device supports.
    pub fn find(&self, uuid: &str) -> Option<Card> {
        if let Some(c) = self.card(uuid) {
            return Some(c.clone());
        }
        let (parent, mig) = self.cards.iter().find_map(|c| {
            c.mig_devices
                .iter()
                .find(|m| m.uuid == uuid)
                .map(|m| (c, m))
        })?;
        let mut card = parent.clone();
        card.uuid = mig.uuid.clone();
        card.name = format!("{} MIG {}", parent.name, mig.profile);
        card.serial = None;
        card.mig_mode = None;
        card.memory_total = mig.memory_total;
        card.memory_used = mig.memory_used;
        card.processes = mig.processes.clone();
        card.mig_devices = Vec::new();
        card.xid_events = Vec::new();
        card.ecc_events = Vec::new();
        card.accounting_mode = false;
        card.gpu_samples = None;
        card.mem_samples = None;
        card.not_supported = [
            "serial",
            "pci",
            "mig",
            "utilization",
            "samples",
            "process_utilization",
            "energy",
            "power",
            "temperature",
            "clocks",
            "throttle",
            "ecc",
            "events",
            "compute_mode",
            "accounting",
        ]
        .map(str::to_owned)
        .to_vec();
        Some(card)
    }

    /// The parent card of a MIG device, and the device's index on it.
    pub fn mig_parent(&self, uuid: &str) -> Option<(&Card, usize)> {
        self.cards.iter().find_map(|c| {
            c.mig_devices
                .iter()
                .position(|m| m.uuid == uuid)
                .map(|i| (c, i))
        })
    }

    fn validate(&self) -> Result<(), String> {
        for card in &self.cards {
            if let Some(bad) = card
                .not_supported
                .iter()
                .find(|f| !FEATURES.contains(&f.as_str()))
            {
                return Err(format!(
                    "card {}: unknown not_supported entry {bad:?} (known: {})",
                    card.uuid,
                    FEATURES.join(", ")
                ));
            }
            if card.sample_period_us == 0 {
                return Err(format!("card {}: sample_period_us is 0", card.uuid));
            }
        }
        Ok(())
    }
}

/// What identifies one version of the file on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
}

struct Loaded {
    stamp: Stamp,
    scenario: Scenario,
}

/// Scenarios by path, re-read when the file changes.
#[derive(Default)]
pub struct Scenarios {
    loaded: HashMap<PathBuf, Loaded>,
    /// Bumped on every reload: what event waits block on.
    generation: u64,
}

impl Scenarios {
    /// How many times a scenario has been (re)loaded; changes when a scenario changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current scenario at `path`.
    pub fn get(&mut self, path: &Path) -> Result<&Scenario, String> {
        let stamp = fs::metadata(path).map(|m| Stamp {
            modified: m.modified().ok(),
            len: m.len(),
            ino: m.ino(),
        });
        let fresh = match (&stamp, self.loaded.get(path)) {
            (Ok(stamp), Some(old)) => old.stamp == *stamp,
            // Gone for a moment (between unlink and rename, say): keep what we had.
            (Err(_), Some(_)) => true,
            (_, None) => false,
        };
        if !fresh {
            let stamp = stamp.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            match read(path) {
                Ok(scenario) => {
                    self.loaded
                        .insert(path.to_owned(), Loaded { stamp, scenario });
                    self.generation += 1;
                }
                Err(reason) => match self.loaded.get_mut(path) {
                    Some(old) => {
                        // Remember the bad version so it is reported once, not on every call.
                        old.stamp = stamp;
                        eprintln!("fake-nvml: keeping the previous scenario: {reason}");
                    }
                    None => return Err(reason),
                },
            }
        }
        self.loaded
            .get(path)
            .map(|l| &l.scenario)
            .ok_or_else(|| format!("no scenario loaded from {}", path.display()))
    }
}

fn read(path: &Path) -> Result<Scenario, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let scenario: Scenario =
        serde_json::from_str(&text).map_err(|e| format!("bad scenario {}: {e}", path.display()))?;
    scenario
        .validate()
        .map_err(|e| format!("bad scenario {}: {e}", path.display()))?;
    Ok(scenario)
}

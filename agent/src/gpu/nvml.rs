//! The production [`GpuSource`]: NVML through `nvml-wrapper`. The only module that touches NVML
//! types; everything leaves it as the plain data of [`crate::gpu`].
//!
//! Threads: [`NvmlSource`] is driven from one blocking thread (NVML calls block). It owns a
//! second thread that waits on one NVML event set, holding every card, for XID and ECC events
//! and sends every occurrence down a channel that [`GpuSource::drain_events`] empties. Both share
//! the library through an `Arc<Nvml>`; `Device` handles borrow the `Nvml`, so they are looked up
//! by UUID for each read instead of being stored (a table lookup in the driver). Cards are keyed
//! by UUID, never index.
//!
//! Utilization comes from the driver's sample buffers, queried with the newest timestamp seen so
//! far per card, so every sample lands in exactly one read. The buffers are primed when a card
//! is first seen: samples from before the agent started belong to no slot of ours.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, ComputeMode, EccCounter, MemoryError, RetirementCause, Sampling, TemperatureSensor,
};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::{Bits, NvmlError};
use nvml_wrapper::struct_wrappers::device::{AccountingStats, ProcessInfo, Sample};
use nvml_wrapper::struct_wrappers::event::EventData;
use nvml_wrapper::{Device, EventSet, Nvml};
use nvml_wrapper_sys::bindings::{
    nvmlProcessInfo_t, nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE, nvmlReturn_enum_NVML_SUCCESS,
};
use tracing::{debug, info, warn};

use super::{
    CardInfo, CardReading, CardSample, GpuError, GpuEvent, GpuEventKind, GpuProcess, GpuSource,
    HealthCounters, Inventory, MigInfo, ProcessAccounting, ProcessSources, Unattributed,
    UtilSource,
};

/// What nvml-wrapper loads when no path is given.
const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// How long one event-thread round waits in total; also how long stopping it can take.
const EVENT_ROUND: Duration = Duration::from_millis(500);

/// How soon the event thread tries again to register a card that refused.
const EVENT_RETRY: Duration = Duration::from_secs(30);

/// NVML's XID value for "unknown"; kept as a number so every occurrence is still counted.
const XID_UNKNOWN: u64 = 999;

/// Reads every card through NVML. `Send`: hand it to the blocking thread that samples.
pub struct NvmlSource {
    nvml: Arc<Nvml>,
    cards: Vec<CardState>,
    /// Lost/recovered transitions seen by `read`, waiting for `drain_events`.
    transitions: Vec<GpuEvent>,
    events: mpsc::Receiver<GpuEvent>,
    /// Tells the event thread which cards to watch (again).
    watch: mpsc::Sender<String>,
    stop: Arc<AtomicBool>,
    watcher: Option<JoinHandle<()>>,
}

/// Per-card reading state.
struct CardState {
    uuid: String,
    /// Newest sample timestamps seen (µs, the driver's clock).
    last_gpu_sample: Option<u64>,
    last_mem_sample: Option<u64>,
    last_process_sample: Option<u64>,
    /// Length of the last compute and graphics lists: the next read's first buffer size.
    compute_hint: u32,
    graphics_hint: u32,
    /// Reads of this card so far, for [`HEALTH_EVERY`].
    reads: u64,
    /// The health counters last read; changes become events.
    health: Option<HealthCounters>,
    /// Volatile corrected and uncorrected ECC totals and the accounting mode, as last read
    /// (every [`HEALTH_EVERY`] reads, with the health counters: they move rarely, and each is
    /// a driver call per card per slot).
    ecc_totals: (Option<u64>, Option<u64>),
    accounting_on: Option<bool>,
    /// A GPU in MIG mode: its processes belong to its MIG devices, which are read as cards of
    /// their own, so the parent lists none (else each would count twice, and on an unassigned
    /// parent be a violation).
    mig_parent: bool,
    lost: bool,
}

/// A card answered GPU_IS_LOST; carries the reason.
struct Lost(String);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Loads the library and initializes NVML.
fn init(lib_path: Option<&Path>) -> Result<Nvml, GpuError> {
    let shown = lib_path.map_or_else(|| DEFAULT_LIBRARY.to_owned(), |p| p.display().to_string());
    let mut builder = Nvml::builder();
    if let Some(path) = lib_path {
        builder.lib_path(path.as_os_str());
    }
    builder.init().map_err(|e| match e {
        NvmlError::LibloadingError(inner) => GpuError::LibraryLoad {
            path: shown,
            reason: inner.to_string(),
        },
        NvmlError::FailedToLoadSymbol(_) | NvmlError::LibraryNotFound => GpuError::LibraryLoad {
            path: shown,
            reason: e.to_string(),
        },
        NvmlError::DriverNotLoaded => GpuError::Call {
            call: "nvmlInit_v2",
            reason: format!("the NVIDIA driver is not loaded (library {shown})"),
        },
        other => GpuError::Call {
            call: "nvmlInit_v2",
            reason: other.to_string(),
        },
    })
}

fn call_error(call: &'static str) -> impl Fn(NvmlError) -> GpuError {
    move |e| GpuError::Call {
        call,
        reason: e.to_string(),
    }
}

/// A field's value: `None` when the card does not support it or the call failed (logged), so a
/// missing field is absent, never zero. Only a lost card stops the read.
fn field<T>(
    result: Result<T, NvmlError>,
    call: &'static str,
    uuid: &str,
) -> Result<Option<T>, Lost> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(NvmlError::GpuLost) => Err(Lost(format!("{call}: {}", NvmlError::GpuLost))),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => {
            debug!(gpu = %uuid, call, error = %e, "field unavailable this read");
            Ok(None)
        }
    }
}

fn sample_value(v: &SampleValue) -> f64 {
    match *v {
        SampleValue::F64(x) => x,
        SampleValue::U32(x) => f64::from(x),
        // Utilization percentages; far below f64's exact-integer range.
        #[allow(clippy::cast_precision_loss)]
        SampleValue::U64(x) => x as f64,
        #[allow(clippy::cast_precision_loss)]
        SampleValue::I64(x) => x as f64,
    }
}

/// The mean of the samples newer than `last_seen`, and the newest timestamp among them. `None`
/// when there is nothing new or the card keeps no sample buffer.
fn sampled(
    dev: &Device<'_>,
    sampling: Sampling,
    last_seen: Option<u64>,
    uuid: &str,
) -> Result<Option<(f64, u64)>, Lost> {
    let samples: Vec<Sample> = match dev.samples(sampling, last_seen) {
        Ok(s) => s,
        // NOT_FOUND: no sample newer than `last_seen`.
        Err(NvmlError::NotFound) => return Ok(None),
        Err(e) => return field::<Vec<Sample>>(Err(e), "nvmlDeviceGetSamples", uuid).map(|_| None),
    };
    let Some(newest) = samples.iter().map(|s| s.timestamp).max() else {
        return Ok(None);
    };
    let sum: f64 = samples.iter().map(|s| sample_value(&s.value)).sum();
    #[allow(clippy::cast_precision_loss)] // a sample buffer holds far fewer than 2^52 entries
    let mean = sum / samples.len() as f64;
    Ok(Some((mean, newest)))
}

/// Throttle reasons with every bit the driver set, including ones this nvml-wrapper predates.
fn throttle_bits(dev: &Device<'_>) -> Result<u64, NvmlError> {
    match dev.current_throttle_reasons_strict() {
        Ok(r) => Ok(r.bits()),
        Err(NvmlError::IncorrectBits(Bits::U64(raw))) => Ok(raw),
        Err(e) => Err(e),
    }
}

fn used_memory(p: &ProcessInfo) -> Option<u64> {
    match p.used_gpu_memory {
        UsedGpuMemory::Used(bytes) => Some(bytes),
        UsedGpuMemory::Unavailable => None,
    }
}

/// Health counters (ECC aggregates, retired pages, remapped rows) move rarely and cost several
/// calls: they are read on the first read of a card and every this many reads after.
const HEALTH_EVERY: u64 = 10;

/// `nvmlDeviceGetRemappedRows` (not wrapped by nvml-wrapper 0.13): corrected rows, uncorrected
/// rows, a remap pending, a remapping failure.
#[allow(unsafe_code)]
fn remapped_rows(dev: &Device<'_>) -> Result<(u32, u32, bool, bool), NvmlError> {
    let sym = dev
        .nvml()
        .lib()
        .nvmlDeviceGetRemappedRows
        .as_ref()
        .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let (mut corrected, mut uncorrected, mut pending, mut failed) = (0, 0, 0, 0);
    // SAFETY: the handle is `dev`'s and stays valid while `dev` lives; the four out-pointers
    // are to live locals of the type nvml.h declares.
    let code = unsafe {
        sym(
            dev.handle(),
            &mut corrected,
            &mut uncorrected,
            &mut pending,
            &mut failed,
        )
    };
    if code != nvmlReturn_enum_NVML_SUCCESS {
        return Err(NvmlError::from(code));
    }
    Ok((corrected, uncorrected, pending != 0, failed != 0))
}

/// The card's memory health counters; a counter the card does not report is `None`.
fn read_health(dev: &Device<'_>, uuid: &str) -> Result<HealthCounters, Lost> {
    fn count<T>(r: Result<Vec<T>, NvmlError>) -> Result<u64, NvmlError> {
        r.map(|pages| pages.len() as u64)
    }
    let single = field(
        count(dev.retired_pages(RetirementCause::MultipleSingleBitEccErrors)),
        "nvmlDeviceGetRetiredPages_v2",
        uuid,
    )?;
    let double = field(
        count(dev.retired_pages(RetirementCause::DoubleBitEccError)),
        "nvmlDeviceGetRetiredPages_v2",
        uuid,
    )?;
    let remapped = field(remapped_rows(dev), "nvmlDeviceGetRemappedRows", uuid)?;
    let mig = field(dev.mig_mode(), "nvmlDeviceGetMigMode", uuid)?;
    Ok(HealthCounters {
        mig_enabled: mig.map(|m| m.current == 1),
        ecc_uncorrected_volatile: field(
            dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
            "nvmlDeviceGetTotalEccErrors",
            uuid,
        )?,
        ecc_uncorrected_aggregate: field(
            dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate),
            "nvmlDeviceGetTotalEccErrors",
            uuid,
        )?,
        retired_pages: single.zip(double).map(|(s, d)| s + d),
        retired_pages_pending: field(
            dev.are_pages_pending_retired(),
            "nvmlDeviceGetRetiredPagesPendingStatus",
            uuid,
        )?,
        remapped_rows_corrected: remapped.map(|r| u64::from(r.0)),
        remapped_rows_uncorrected: remapped.map(|r| u64::from(r.1)),
        remap_pending: remapped.map(|r| r.2),
        remap_failed: remapped.map(|r| r.3),
    })
}

/// The smallest buffer a process list is first asked with.
const PROCESS_BUFFER_MIN: u32 = 16;

/// How many times a process list is asked again with the size the driver said it needs (the
/// list can grow between two calls).
const PROCESS_LIST_ROUNDS: usize = 4;

/// Which running-process list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcessKind {
    Compute,
    Graphics,
}

/// One running-process list, sized by the `_v3` call itself.
///
/// nvml-wrapper 0.13's `running_compute_processes` first asks for the count with a null
/// buffer and takes only INSUFFICIENT_SIZE as "the count is in `*count`": a driver that answers
/// that query SUCCESS with the count (some do) gets an empty list back, and the card looks
/// empty however many processes run on it. So the list is asked for directly with a buffer
/// (as large as the last list of this card, at least [`PROCESS_BUFFER_MIN`]); SUCCESS gives
/// the list, INSUFFICIENT_SIZE the count needed, and the call is made again with that much
/// room. The null-buffer count is never relied on, whatever it answers.
#[allow(unsafe_code)]
fn running_processes(
    dev: &Device<'_>,
    kind: ProcessKind,
    hint: &mut u32,
) -> Result<Vec<ProcessInfo>, NvmlError> {
    let lib = dev.nvml().lib();
    let sym = match kind {
        ProcessKind::Compute => lib.nvmlDeviceGetComputeRunningProcesses_v3.as_ref(),
        ProcessKind::Graphics => lib.nvmlDeviceGetGraphicsRunningProcesses_v3.as_ref(),
    };
    let sym = *sym.map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    // SAFETY: the handle is `dev`'s, valid while `dev` (which borrows the loaded library)
    // lives; it is only passed back to the library that issued it.
    let handle = unsafe { dev.handle() };
    let mut capacity = (*hint).max(PROCESS_BUFFER_MIN);
    for _ in 0..PROCESS_LIST_ROUNDS {
        let empty = nvmlProcessInfo_t {
            pid: 0,
            usedGpuMemory: 0,
            gpuInstanceId: 0,
            computeInstanceId: 0,
        };
        let mut buffer = vec![empty; usize::try_from(capacity).unwrap_or(usize::MAX)];
        let mut count = capacity;
        // SAFETY: `count` holds the buffer's length and `buffer` has that many initialized
        // elements of the type the `_v3` call writes (nvml.h's contract for this call).
        let code = unsafe { sym(handle, &mut count, buffer.as_mut_ptr()) };
        if code == nvmlReturn_enum_NVML_SUCCESS {
            buffer.truncate(usize::try_from(count.min(capacity)).unwrap_or(0));
            *hint = count.min(capacity);
            return Ok(buffer.into_iter().map(ProcessInfo::from).collect());
        }
        if code != nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE {
            return Err(NvmlError::from(code));
        }
        // `count` is what the list needs now; leave room for a few more that may start.
        capacity = count.max(capacity.saturating_mul(2)).saturating_add(8);
    }
    Err(NvmlError::InsufficientSize(None))
}

/// A process list's answer: the list, or that the driver could not give one (NOT_SUPPORTED or
/// an error, logged) so that "no process" is not known. Only a lost card stops the read.
fn process_list(
    dev: &Device<'_>,
    kind: ProcessKind,
    hint: &mut u32,
    uuid: &str,
) -> Result<Option<Vec<ProcessInfo>>, Lost> {
    let call = match kind {
        ProcessKind::Compute => "nvmlDeviceGetComputeRunningProcesses_v3",
        ProcessKind::Graphics => "nvmlDeviceGetGraphicsRunningProcesses_v3",
    };
    field(running_processes(dev, kind, hint), call, uuid)
}

/// NVML's "not available" marker (-1) in the accounting record's 64-bit fields, which
/// nvml-wrapper passes through as is.
const NOT_AVAILABLE_U64: u64 = u64::MAX;

fn accounting(stats: &AccountingStats) -> ProcessAccounting {
    let known = |v: u64| (v != NOT_AVAILABLE_U64).then_some(v);
    ProcessAccounting {
        gpu_util_pct: stats.gpu_utilization,
        mem_util_pct: stats.memory_utilization,
        max_memory_bytes: stats.max_memory_usage,
        // The driver reports 0 until the process ends: not known yet, not zero.
        time_ms: known(stats.time).filter(|&t| !(stats.is_running && t == 0)),
        start_time_us: known(stats.start_time).filter(|&t| t != 0),
        running: stats.is_running,
    }
}

/// Per-process accounting records, read only where the operator has enabled accounting mode
/// (the agent never turns it on: that is the operator's call, and it changes driver state; the
/// mode is asked with the health counters, so a change is seen within [`HEALTH_EVERY`] reads).
/// Accounting utilization covers the process's lifetime, so it only stands in where the sample
/// buffer gave no figure for the pid this read. A running record of a pid no other source
/// named adds that process: the driver saw it on the card.
fn read_accounting(
    dev: &Device<'_>,
    processes: &mut Vec<GpuProcess>,
    uuid: &str,
) -> Result<(), Lost> {
    let listed: Vec<u32> = processes.iter().map(|p| p.pid).collect();
    let recorded = field(dev.accounting_pids(), "nvmlDeviceGetAccountingPids", uuid)?;
    let mut pids = listed.clone();
    for pid in recorded.into_iter().flatten() {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    }
    for pid in pids {
        // NOT_FOUND (no record for this pid) is absent like any unavailable field.
        let Some(stats) = field(
            dev.accounting_stats_for(pid),
            "nvmlDeviceGetAccountingStats",
            uuid,
        )?
        else {
            continue;
        };
        // On a pid collision the driver answers with the record of the earlier process that
        // ended last; a finished record for a live process is not this process's. A finished
        // record of a pid no other source names is a process that has left the card.
        if !stats.is_running {
            continue;
        }
        let record = accounting(&stats);
        let p = match processes.iter_mut().position(|p| p.pid == pid) {
            Some(i) => &mut processes[i],
            None => {
                processes.push(GpuProcess {
                    pid,
                    used_memory_bytes: None,
                    sm_util_pct: None,
                    graphics: false,
                    accounting: None,
                    seen_in: ProcessSources::default(),
                });
                let last = processes.len() - 1;
                &mut processes[last]
            }
        };
        p.seen_in.accounting = true;
        if p.sm_util_pct.is_none() {
            p.sm_util_pct = record.gpu_util_pct;
        }
        p.accounting = Some(record);
    }
    Ok(())
}

impl CardState {
    fn new(uuid: String) -> CardState {
        CardState {
            uuid,
            last_gpu_sample: None,
            last_mem_sample: None,
            last_process_sample: None,
            compute_hint: 0,
            graphics_hint: 0,
            reads: 0,
            health: None,
            ecc_totals: (None, None),
            accounting_on: None,
            mig_parent: false,
            lost: false,
        }
    }

    /// Skips what the driver buffered before we started watching the card.
    fn prime(&mut self, dev: &Device<'_>) {
        let newest = |r: Result<Vec<Sample>, NvmlError>| {
            r.ok().and_then(|s| s.iter().map(|s| s.timestamp).max())
        };
        self.last_gpu_sample = newest(dev.samples(Sampling::GpuUtilization, None));
        self.last_mem_sample = newest(dev.samples(Sampling::MemoryUtilization, None));
        self.last_process_sample = dev
            .process_utilization_stats(None)
            .ok()
            .and_then(|s| s.iter().map(|s| s.timestamp).max());
    }

    fn read(&mut self, dev: &Device<'_>) -> Result<CardSample, Lost> {
        let uuid = self.uuid.clone();
        let uuid = uuid.as_str();
        let mut s = CardSample {
            uuid: uuid.to_owned(),
            ..CardSample::default()
        };

        let gpu = sampled(dev, Sampling::GpuUtilization, self.last_gpu_sample, uuid)?;
        let mem = sampled(dev, Sampling::MemoryUtilization, self.last_mem_sample, uuid)?;
        if let Some((mean, newest)) = gpu {
            s.util_pct = Some(mean);
            s.util_source = Some(UtilSource::Samples);
            self.last_gpu_sample = Some(newest);
        }
        if let Some((mean, newest)) = mem {
            s.mem_util_pct = Some(mean);
            self.last_mem_sample = Some(newest);
        }
        if gpu.is_none() || mem.is_none() {
            // No sample buffer (or nothing new in it): the driver's instantaneous figure.
            let rates = field(
                dev.utilization_rates(),
                "nvmlDeviceGetUtilizationRates",
                uuid,
            )?;
            if let Some(rates) = rates {
                if gpu.is_none() {
                    s.util_pct = Some(f64::from(rates.gpu));
                    s.util_source = Some(UtilSource::Rates);
                }
                if mem.is_none() {
                    s.mem_util_pct = Some(f64::from(rates.memory));
                }
            }
        }

        if let Some(m) = field(dev.memory_info(), "nvmlDeviceGetMemoryInfo_v2", uuid)? {
            s.memory_used_bytes = Some(m.used);
            s.memory_total_bytes = Some(m.total);
        }
        s.energy_counter_mj = field(
            dev.total_energy_consumption(),
            "nvmlDeviceGetTotalEnergyConsumption",
            uuid,
        )?;
        s.power_mw = field(dev.power_usage(), "nvmlDeviceGetPowerUsage", uuid)?;
        s.temperature_c = field(
            dev.temperature(TemperatureSensor::Gpu),
            "nvmlDeviceGetTemperature",
            uuid,
        )?;
        s.sm_clock_mhz = field(dev.clock_info(Clock::SM), "nvmlDeviceGetClockInfo", uuid)?;
        s.mem_clock_mhz = field(
            dev.clock_info(Clock::Memory),
            "nvmlDeviceGetClockInfo",
            uuid,
        )?;
        s.throttle_reasons = field(
            throttle_bits(dev),
            "nvmlDeviceGetCurrentClocksThrottleReasons",
            uuid,
        )?;
        if self.health.is_none() || self.reads % HEALTH_EVERY == 0 {
            self.ecc_totals = (
                field(
                    dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
                    "nvmlDeviceGetTotalEccErrors",
                    uuid,
                )?,
                field(
                    dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
                    "nvmlDeviceGetTotalEccErrors",
                    uuid,
                )?,
            );
            self.accounting_on = field(
                dev.is_accounting_enabled(),
                "nvmlDeviceGetAccountingMode",
                uuid,
            )?;
            s.health = Some(Box::new(read_health(dev, uuid)?));
        }
        (s.ecc_corrected_total, s.ecc_uncorrected_total) = self.ecc_totals;
        self.reads += 1;
        if self.mig_parent {
            return Ok(s);
        }
        let compute = process_list(dev, ProcessKind::Compute, &mut self.compute_hint, uuid)?;
        let graphics = process_list(dev, ProcessKind::Graphics, &mut self.graphics_hint, uuid)?;
        // Compute contexts are where CUDA work runs: without their list, an empty list of
        // processes is not known to be empty.
        s.processes_unknown = compute.is_none();
        let listed = ProcessSources {
            list: true,
            ..ProcessSources::default()
        };
        for p in compute.iter().flatten() {
            s.processes.push(GpuProcess {
                pid: p.pid,
                used_memory_bytes: used_memory(p),
                sm_util_pct: None,
                graphics: false,
                accounting: None,
                seen_in: listed,
            });
        }
        // A process with both contexts is listed once, as compute (where its CUDA work is).
        for p in graphics.iter().flatten() {
            if !s.processes.iter().any(|q| q.pid == p.pid) {
                s.processes.push(GpuProcess {
                    pid: p.pid,
                    used_memory_bytes: used_memory(p),
                    sm_util_pct: None,
                    graphics: true,
                    accounting: None,
                    seen_in: listed,
                });
            }
        }
        self.read_process_utilization(dev, &mut s.processes)?;
        if self.accounting_on == Some(true) {
            read_accounting(dev, &mut s.processes, uuid)?;
        }
        Ok(s)
    }

    /// Per-process SM utilization: the mean of each process's samples since the last read. The
    /// driver only samples processes that were busy, so a process without samples while the
    /// query works was idle: 0, not absent. A pid in the samples that no list named (a driver
    /// whose lists come back short or unsupported) was on the card all the same, and is added.
    fn read_process_utilization(
        &mut self,
        dev: &Device<'_>,
        processes: &mut Vec<GpuProcess>,
    ) -> Result<(), Lost> {
        let samples = match dev.process_utilization_stats(self.last_process_sample) {
            Ok(samples) => samples,
            Err(NvmlError::NotFound) => Vec::new(),
            Err(e) => {
                field::<()>(Err(e), "nvmlDeviceGetProcessUtilization", &self.uuid)?;
                return Ok(());
            }
        };
        if let Some(newest) = samples.iter().map(|s| s.timestamp).max() {
            self.last_process_sample = Some(newest);
        }
        let mut per_pid: HashMap<u32, (u64, u64)> = HashMap::new();
        for sample in &samples {
            let entry = per_pid.entry(sample.pid).or_default();
            entry.0 += u64::from(sample.sm_util);
            entry.1 += 1;
            if !processes.iter().any(|p| p.pid == sample.pid) {
                processes.push(GpuProcess {
                    pid: sample.pid,
                    used_memory_bytes: None,
                    sm_util_pct: None,
                    graphics: false,
                    accounting: None,
                    seen_in: ProcessSources::default(),
                });
            }
        }
        for p in processes.iter_mut() {
            if per_pid.contains_key(&p.pid) {
                p.seen_in.samples = true;
            }
            let mean = per_pid.get(&p.pid).map_or(0, |(sum, n)| sum / n);
            p.sm_util_pct = Some(u32::try_from(mean).unwrap_or(u32::MAX));
        }
        Ok(())
    }
}

impl NvmlSource {
    /// Loads NVML from `lib_path` (default `libnvidia-ml.so.1`), takes the inventory and starts
    /// the event thread.
    pub fn open(lib_path: Option<&Path>) -> Result<NvmlSource, GpuError> {
        let nvml = Arc::new(init(lib_path)?);
        let (event_tx, event_rx) = mpsc::channel();
        let (watch_tx, watch_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let nvml = Arc::clone(&nvml);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("nvml-events".into())
                .spawn(move || watch_events(&nvml, &watch_rx, &event_tx, &stop))
                .map_err(|e| GpuError::Call {
                    call: "spawn nvml-events thread",
                    reason: e.to_string(),
                })?
        };
        let mut source = NvmlSource {
            nvml,
            cards: Vec::new(),
            transitions: Vec::new(),
            events: event_rx,
            watch: watch_tx,
            stop,
            watcher: Some(watcher),
        };
        source.inventory()?;
        Ok(source)
    }

    /// Starts reading (and watching the events of) a card first seen now.
    fn track(&mut self, dev: &Device<'_>, uuid: &str, mig_parent: bool) {
        match self.cards.iter_mut().find(|c| c.uuid == uuid) {
            Some(card) => card.mig_parent = mig_parent,
            None => {
                let mut card = CardState::new(uuid.to_owned());
                card.mig_parent = mig_parent;
                card.prime(dev);
                self.cards.push(card);
                // A send only fails once the event thread is gone, and then nothing is
                // watched anyway.
                let _ = self.watch.send(uuid.to_owned());
            }
        }
    }

    fn read_card(&mut self, i: usize) -> CardReading {
        let nvml = Arc::clone(&self.nvml);
        let card = &mut self.cards[i];
        let uuid = card.uuid.clone();
        let dev = match nvml.device_by_uuid(uuid.as_str()) {
            Ok(dev) => dev,
            Err(e @ (NvmlError::GpuLost | NvmlError::NotFound)) => {
                return CardReading::Lost {
                    uuid,
                    reason: format!("nvmlDeviceGetHandleByUUID: {e}"),
                };
            }
            Err(e) => {
                return CardReading::Failed {
                    uuid,
                    reason: format!("nvmlDeviceGetHandleByUUID: {e}"),
                };
            }
        };
        match card.read(&dev) {
            Ok(sample) => CardReading::Ok(sample),
            Err(Lost(reason)) => CardReading::Lost { uuid, reason },
        }
    }
}

impl GpuSource for NvmlSource {
    fn inventory(&mut self) -> Result<Inventory, GpuError> {
        let nvml = Arc::clone(&self.nvml);
        let count = nvml
            .device_count()
            .map_err(call_error("nvmlDeviceGetCount_v2"))?;
        let mut cards = Vec::new();
        for index in 0..count {
            let dev = match nvml.device_by_index(index) {
                Ok(dev) => dev,
                Err(e) => {
                    warn!(index, error = %e, "card does not answer; left out of the inventory");
                    continue;
                }
            };
            let info = match card_info(&dev, index) {
                Ok(info) => info,
                Err(e) => {
                    warn!(index, error = %e, "card has no readable UUID; left out of the inventory");
                    continue;
                }
            };
            let mig_on = info.mig_enabled == Some(true);
            self.track(&dev, &info.uuid, mig_on);
            cards.push(info.clone());
            if mig_on {
                for (mig_dev, mig) in mig_devices(&dev, &info) {
                    self.track(&mig_dev, &mig.uuid, false);
                    cards.push(mig);
                }
            }
        }
        Ok(Inventory {
            driver_version: nvml.sys_driver_version().ok(),
            cards,
        })
    }

    fn read(&mut self, at_ms: i64) -> Vec<CardReading> {
        let mut readings = Vec::with_capacity(self.cards.len());
        for i in 0..self.cards.len() {
            let reading = self.read_card(i);
            let card = &mut self.cards[i];
            if let CardReading::Ok(CardSample {
                health: Some(now), ..
            }) = &reading
            {
                // The first reading is the baseline; from then on every change is an event.
                for (counter, from, to) in
                    card.health.map(|was| now.changes(&was)).unwrap_or_default()
                {
                    warn!(gpu = %card.uuid, counter, from, to, "card health counter changed");
                    self.transitions.push(GpuEvent {
                        uuid: card.uuid.clone(),
                        at_ms,
                        kind: GpuEventKind::Health { counter, from, to },
                    });
                }
                card.health = Some(**now);
            }
            match &reading {
                CardReading::Lost { reason, .. } if !card.lost => {
                    card.lost = true;
                    warn!(gpu = %card.uuid, %reason, "card lost");
                    self.transitions.push(GpuEvent {
                        uuid: card.uuid.clone(),
                        at_ms,
                        kind: GpuEventKind::Lost,
                    });
                }
                CardReading::Ok(_) if card.lost => {
                    card.lost = false;
                    info!(gpu = %card.uuid, "card answers again");
                    self.transitions.push(GpuEvent {
                        uuid: card.uuid.clone(),
                        at_ms,
                        kind: GpuEventKind::Recovered,
                    });
                    // Its old event registration may have died with it.
                    let _ = self.watch.send(card.uuid.clone());
                }
                _ => {}
            }
            readings.push(reading);
        }
        readings
    }

    fn drain_events(&mut self) -> Vec<GpuEvent> {
        let mut events = std::mem::take(&mut self.transitions);
        events.extend(self.events.try_iter());
        events.sort_by_key(|e| e.at_ms);
        events
    }

    fn set_compute_prohibited(&mut self, uuid: &str, prohibited: bool) -> Result<(), GpuError> {
        let nvml = Arc::clone(&self.nvml);
        let mut dev = nvml.device_by_uuid(uuid).map_err(|e| GpuError::Call {
            call: "nvmlDeviceGetHandleByUUID",
            reason: format!("card {uuid}: {e}"),
        })?;
        let mode = if prohibited {
            ComputeMode::Prohibited
        } else {
            ComputeMode::Default
        };
        dev.set_compute_mode(mode).map_err(|e| GpuError::Call {
            call: "nvmlDeviceSetComputeMode",
            reason: format!("card {uuid}: {e}"),
        })
    }
}

impl Drop for NvmlSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(watcher) = self.watcher.take() {
            // A panicked event thread has nothing left to clean up.
            let _ = watcher.join();
        }
    }
}

/// The MIG devices of a GPU in MIG mode, each as a card of its own. A device that does not
/// answer is left out (logged), as a card is.
fn mig_devices<'n>(dev: &Device<'n>, parent: &CardInfo) -> Vec<(Device<'n>, CardInfo)> {
    let max = match dev.mig_device_count() {
        Ok(n) => n,
        Err(e) => {
            warn!(gpu = %parent.uuid, error = %e, "MIG is on but its devices cannot be counted");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for i in 0..max {
        let mig = match dev.mig_device_by_index(i) {
            Ok(mig) => mig,
            // An index without a device: the GPU is not fully partitioned.
            Err(NvmlError::NotFound) => continue,
            Err(e) => {
                warn!(gpu = %parent.uuid, index = i, error = %e, "MIG device does not answer; left out of the inventory");
                continue;
            }
        };
        let uuid = match mig.uuid() {
            Ok(uuid) => uuid,
            Err(e) => {
                warn!(gpu = %parent.uuid, index = i, error = %e, "MIG device has no readable UUID; left out of the inventory");
                continue;
            }
        };
        let name = mig.name().unwrap_or_default();
        let profile = MigInfo::profile_from_name(&name);
        let info = CardInfo {
            uuid,
            index: parent.index,
            serial: None,
            pci_bus_id: parent.pci_bus_id.clone(),
            memory_total_bytes: mig.memory_info().ok().map(|m| m.total),
            mig_enabled: None,
            mig: Some(MigInfo {
                parent_uuid: parent.uuid.clone(),
                slices: MigInfo::slices_of(&profile),
                parent_slices: Some(max),
                profile,
            }),
            name,
        };
        out.push((mig, info));
    }
    out
}

fn card_info(dev: &Device<'_>, index: u32) -> Result<CardInfo, NvmlError> {
    Ok(CardInfo {
        uuid: dev.uuid()?,
        index,
        name: dev.name().unwrap_or_default(),
        serial: dev.serial().ok(),
        pci_bus_id: dev.pci_info().ok().map(|p| p.bus_id),
        memory_total_bytes: dev.memory_info().ok().map(|m| m.total),
        mig_enabled: dev.mig_mode().ok().map(|m| m.current == 1),
        mig: None,
    })
}

// ---- event thread ----

/// A card waiting to join the event set, and when to try.
struct Pending {
    uuid: String,
    retry_at: Instant,
}

/// The event thread's state: one event set holding every card that registered, so one wait
/// covers the whole host and the thread wakes for an event or once per [`EVENT_ROUND`], not
/// once per card. An event names its card by the device handle it carries, mapped to the UUID
/// at registration. nvml-wrapper frees a set whose registration fails, so a card that refuses
/// takes the others' registrations with it: the set is then made anew and they join it again
/// at once, while the card that refused waits [`EVENT_RETRY`].
struct Watcher<'nvml> {
    nvml: &'nvml Nvml,
    set: Option<EventSet<'nvml>>,
    /// Cards in `set`.
    joined: Vec<String>,
    pending: Vec<Pending>,
    /// Device handle → UUID of every card registered.
    handles: HashMap<usize, String>,
}

impl<'nvml> Watcher<'nvml> {
    /// Queues `uuid`; a card already in the set is registered again in a new set (a card that
    /// was lost may have lost its registration with it).
    fn add(&mut self, uuid: String) {
        if self.joined.contains(&uuid) {
            self.rebuild();
        }
        self.queue(uuid, Instant::now());
    }

    /// Drops the set; every card that was in it is queued to join a new one now.
    fn rebuild(&mut self) {
        self.set = None;
        let now = Instant::now();
        for uuid in std::mem::take(&mut self.joined) {
            self.queue(uuid, now);
        }
    }

    /// Queues `uuid` to register at `at`, or sooner where it already waits for an earlier time.
    fn queue(&mut self, uuid: String, at: Instant) {
        match self.pending.iter_mut().find(|p| p.uuid == uuid) {
            Some(p) => p.retry_at = p.retry_at.min(at),
            None => self.pending.push(Pending { uuid, retry_at: at }),
        }
    }

    /// Registers every queued card that is due.
    fn register_due(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].retry_at > now {
                i += 1;
                continue;
            }
            let uuid = self.pending[i].uuid.clone();
            match self.register(&uuid) {
                Ok(()) => {
                    debug!(gpu = %uuid, "watching XID and ECC events");
                    self.pending.remove(i);
                    self.joined.push(uuid);
                }
                Err(reason) => {
                    debug!(gpu = %uuid, %reason, "no event registration; will retry");
                    self.pending[i].retry_at = now + EVENT_RETRY;
                    i += 1;
                }
            }
        }
    }

    fn register(&mut self, uuid: &str) -> Result<(), String> {
        let dev = self.nvml.device_by_uuid(uuid).map_err(|e| e.to_string())?;
        let supported = dev.supported_event_types().map_err(|e| e.to_string())?;
        let wanted = supported
            & (EventTypes::CRITICAL_XID_ERROR
                | EventTypes::SINGLE_BIT_ECC_ERROR
                | EventTypes::DOUBLE_BIT_ECC_ERROR);
        if wanted.is_empty() {
            return Err("the card reports neither XID nor ECC events".into());
        }
        let set = match self.set.take() {
            Some(set) => set,
            None => self.nvml.create_event_set().map_err(|e| e.to_string())?,
        };
        match dev.register_events(wanted, set) {
            Ok(set) => {
                self.set = Some(set);
                self.handles.insert(handle_key(&dev), uuid.to_owned());
                Ok(())
            }
            Err(e) => {
                // The set is gone with the failed registration: the others join a new one.
                self.rebuild();
                Err(e.to_string())
            }
        }
    }

    /// Waits up to [`EVENT_ROUND`] for events and sends each; false once the source is gone.
    fn wait(&mut self, events: &mpsc::Sender<GpuEvent>) -> bool {
        let Some(set) = &self.set else {
            std::thread::sleep(EVENT_ROUND);
            return true;
        };
        let mut timeout = u32::try_from(EVENT_ROUND.as_millis()).unwrap_or(u32::MAX);
        loop {
            match set.wait(timeout) {
                Ok(data) => {
                    // Drain what else is queued without waiting.
                    timeout = 0;
                    let Some(uuid) = event_card(&data, &self.handles) else {
                        continue;
                    };
                    for kind in event_kinds(&data) {
                        let event = GpuEvent {
                            uuid: uuid.clone(),
                            at_ms: now_ms(),
                            kind,
                        };
                        info!(gpu = %uuid, kind = ?event.kind, "driver event");
                        if events.send(event).is_err() {
                            return false;
                        }
                    }
                }
                Err(NvmlError::Timeout) => return true,
                Err(e) => {
                    debug!(error = %e, "event wait failed; registering every card again");
                    self.rebuild();
                    // Not at once: a set that fails to wait may fail again straight away.
                    let soonest = Instant::now() + EVENT_ROUND;
                    for p in &mut self.pending {
                        p.retry_at = p.retry_at.max(soonest);
                    }
                    return true;
                }
            }
        }
    }
}

fn event_kinds(data: &EventData<'_>) -> Vec<GpuEventKind> {
    let mut kinds = Vec::new();
    if data.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
        kinds.push(GpuEventKind::Xid(match data.event_data {
            Some(XidError::Value(code)) => code,
            Some(XidError::Unknown) | None => XID_UNKNOWN,
        }));
    }
    if data.event_type.contains(EventTypes::SINGLE_BIT_ECC_ERROR) {
        kinds.push(GpuEventKind::EccSingleBit);
    }
    if data.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
        kinds.push(GpuEventKind::EccDoubleBit);
    }
    kinds
}

/// A device handle's value, to tell which card an event names. Handles are stable for as long
/// as the library is loaded, and compared only, never dereferenced.
#[allow(unsafe_code)]
fn handle_key(dev: &Device<'_>) -> usize {
    // SAFETY: reading the handle's value has no precondition; nothing is called through it.
    unsafe { dev.handle() }.addr()
}

/// The card an event names: by its device handle (known from registration), else by asking
/// the device for its UUID. An event of a device that answers neither is logged, not
/// credited to a card it may not be.
fn event_card(data: &EventData<'_>, handles: &HashMap<usize, String>) -> Option<String> {
    if let Some(uuid) = handles.get(&handle_key(&data.device)) {
        return Some(uuid.clone());
    }
    match data.device.uuid() {
        Ok(uuid) => Some(uuid),
        Err(e) => {
            let kinds = event_kinds(data);
            warn!(error = %e, ?kinds, "an event names a device the agent cannot identify; not recorded");
            None
        }
    }
}

/// The event thread: registers each card it is told about into one set and waits on it, in
/// waits short enough that `stop` is seen within about [`EVENT_ROUND`].
fn watch_events(
    nvml: &Nvml,
    cards: &mpsc::Receiver<String>,
    events: &mpsc::Sender<GpuEvent>,
    stop: &AtomicBool,
) {
    let mut watcher = Watcher {
        nvml,
        set: None,
        joined: Vec::new(),
        pending: Vec::new(),
        handles: HashMap::new(),
    };
    while !stop.load(Ordering::Relaxed) {
        for uuid in cards.try_iter() {
            watcher.add(uuid);
        }
        watcher.register_due();
        if !watcher.wait(events) {
            // The source is gone.
            return;
        }
    }
}

// ---- probe ----

/// Whether a card answers one field, for `gpumeter-agent probe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    /// Answered; the text shows what it said.
    Yes(String),
    /// NOT_SUPPORTED (or not exported by this library).
    No,
    /// Another error.
    Error(String),
}

/// One field of one card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProbe {
    pub field: &'static str,
    pub support: Support,
}

/// One card as the probe saw it. `problem` is set when the card could not even name itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardProbe {
    pub info: CardInfo,
    pub problem: Option<String>,
    pub fields: Vec<FieldProbe>,
}

/// What NVML sees on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    pub library: String,
    pub driver_version: Option<String>,
    pub nvml_version: Option<String>,
    pub cards: Vec<CardProbe>,
}

fn support<T>(result: Result<T, NvmlError>, show: impl FnOnce(T) -> String) -> Support {
    match result {
        Ok(v) => Support::Yes(show(v)),
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => Support::No,
        Err(e) => Support::Error(e.to_string()),
    }
}

/// Like [`support`], for the sample buffers, where NOT_FOUND means "supported, still empty".
fn buffer_support<T>(result: Result<Vec<T>, NvmlError>) -> Support {
    match result {
        Err(NvmlError::NotFound) => Support::Yes("0 samples buffered".into()),
        other => support(other, |v| format!("{} samples buffered", v.len())),
    }
}

fn probe_fields(dev: &Device<'_>) -> Vec<FieldProbe> {
    const MIB: u64 = 1 << 20;
    let mut fields = vec![
        (
            "utilization samples",
            buffer_support(dev.samples(Sampling::GpuUtilization, None)),
        ),
        (
            "utilization rates",
            support(dev.utilization_rates(), |u| {
                format!("gpu {}%, memory {}%", u.gpu, u.memory)
            }),
        ),
        (
            "process utilization",
            buffer_support(dev.process_utilization_stats(None)),
        ),
        (
            "memory",
            support(dev.memory_info(), |m| {
                format!("{} of {} MiB used", m.used / MIB, m.total / MIB)
            }),
        ),
        (
            "energy",
            support(dev.total_energy_consumption(), |e| format!("{e} mJ")),
        ),
        ("power", support(dev.power_usage(), |p| format!("{p} mW"))),
        (
            "temperature",
            support(dev.temperature(TemperatureSensor::Gpu), |t| {
                format!("{t} C")
            }),
        ),
    ];
    let clocks = dev
        .clock_info(Clock::SM)
        .and_then(|sm| dev.clock_info(Clock::Memory).map(|mem| (sm, mem)));
    fields.push((
        "clocks",
        support(clocks, |(sm, mem)| format!("sm {sm} MHz, memory {mem} MHz")),
    ));
    fields.push((
        "throttle reasons",
        support(throttle_bits(dev), |r| format!("{r:#x}")),
    ));
    let ecc = dev
        .total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile)
        .and_then(|c| {
            dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                .map(|u| (c, u))
        });
    fields.push((
        "ecc",
        support(ecc, |(c, u)| {
            format!("volatile corrected {c}, uncorrected {u}")
        }),
    ));
    let (mut compute_hint, mut graphics_hint) = (0, 0);
    let compute = running_processes(dev, ProcessKind::Compute, &mut compute_hint);
    let graphics = running_processes(dev, ProcessKind::Graphics, &mut graphics_hint);
    fields.push((
        "process discovery",
        discovery(dev, compute.as_ref().ok(), graphics.as_ref().ok()),
    ));
    let processes = compute.and_then(|c| graphics.map(|g| (c.len(), g.len())));
    fields.push((
        "processes",
        support(processes, |(c, g)| format!("{c} compute, {g} graphics")),
    ));
    let events = dev.supported_event_types().and_then(|t| {
        if t.intersects(
            EventTypes::CRITICAL_XID_ERROR
                | EventTypes::SINGLE_BIT_ECC_ERROR
                | EventTypes::DOUBLE_BIT_ECC_ERROR,
        ) {
            Ok(t)
        } else {
            Err(NvmlError::NotSupported)
        }
    });
    fields.push((
        "events",
        support(events, |t| {
            let mut names = Vec::new();
            if t.contains(EventTypes::CRITICAL_XID_ERROR) {
                names.push("xid");
            }
            if t.contains(EventTypes::SINGLE_BIT_ECC_ERROR) {
                names.push("ecc single-bit");
            }
            if t.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
                names.push("ecc double-bit");
            }
            names.join(", ")
        }),
    ));
    fields.push((
        "compute mode",
        support(dev.compute_mode(), |m| format!("{m:?}").to_lowercase()),
    ));
    fields.push((
        "accounting",
        support(dev.is_accounting_enabled(), |on| {
            if on { "enabled" } else { "disabled" }.to_owned()
        }),
    ));
    fields
        .into_iter()
        .map(|(field, support)| FieldProbe { field, support })
        .collect()
}

/// Which processes every source of the driver names, and whether the card's use could be
/// attributed now: the probe's view of what the sampler does each read.
fn discovery(
    dev: &Device<'_>,
    compute: Option<&Vec<ProcessInfo>>,
    graphics: Option<&Vec<ProcessInfo>>,
) -> Support {
    let mut pids: Vec<u32> = Vec::new();
    let add = |pid: u32, pids: &mut Vec<u32>| {
        if !pids.contains(&pid) {
            pids.push(pid);
        }
    };
    for p in compute.into_iter().chain(graphics).flatten() {
        add(p.pid, &mut pids);
    }
    let listed = pids.len();
    let sampled: Vec<u32> = dev
        .process_utilization_stats(None)
        .map(|s| s.iter().map(|s| s.pid).collect())
        .unwrap_or_default();
    for pid in &sampled {
        add(*pid, &mut pids);
    }
    let accounted: Vec<u32> = if dev.is_accounting_enabled().unwrap_or(false) {
        dev.accounting_pids().unwrap_or_default()
    } else {
        Vec::new()
    };
    for pid in &accounted {
        add(*pid, &mut pids);
    }
    let sample = CardSample {
        util_pct: dev.utilization_rates().ok().map(|u| f64::from(u.gpu)),
        processes_unknown: compute.is_none(),
        ..CardSample::default()
    };
    let seen = format!(
        "{} processes visible ({listed} listed, {} in samples, {} in accounting)",
        pids.len(),
        sampled.len(),
        accounted.len()
    );
    match Unattributed::judge(&sample, pids.len()) {
        None => Support::Yes(seen),
        Some(why) => Support::Error(format!(
            "{seen}; utilization {}: usage is unattributed ({})",
            sample
                .util_pct
                .map_or_else(|| "unknown".to_owned(), |u| format!("{u}%")),
            why.describe()
        )),
    }
}

/// Loads NVML and asks every card for every field once. Registers no events, so it takes
/// nothing from a running agent's event stream.
pub fn probe_cards(lib_path: Option<&Path>) -> Result<ProbeReport, GpuError> {
    let nvml = init(lib_path)?;
    let count = nvml
        .device_count()
        .map_err(call_error("nvmlDeviceGetCount_v2"))?;
    let mut cards = Vec::new();
    for index in 0..count {
        let unnamed = |problem: String| CardProbe {
            info: CardInfo {
                index,
                ..CardInfo::default()
            },
            problem: Some(problem),
            fields: Vec::new(),
        };
        let dev = match nvml.device_by_index(index) {
            Ok(dev) => dev,
            Err(e) => {
                cards.push(unnamed(format!("nvmlDeviceGetHandleByIndex_v2: {e}")));
                continue;
            }
        };
        match card_info(&dev, index) {
            Ok(info) => cards.push(CardProbe {
                info,
                problem: None,
                fields: probe_fields(&dev),
            }),
            Err(e) => cards.push(unnamed(format!("nvmlDeviceGetUUID: {e}"))),
        }
    }
    Ok(ProbeReport {
        library: lib_path.map_or_else(|| DEFAULT_LIBRARY.to_owned(), |p| p.display().to_string()),
        driver_version: nvml.sys_driver_version().ok(),
        nvml_version: nvml.sys_nvml_version().ok(),
        cards,
    })
}

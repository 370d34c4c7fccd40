//! The fake driver's state and answers, in safe Rust; `lib.rs` only moves them across the C ABI.

use std::collections::{HashMap, HashSet};
use std::os::raw::c_uint;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, LazyLock, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nvml_wrapper_sys::bindings::*;

use crate::scenario::{Card, Scenario, Scenarios};

/// An NVML return code other than success.
pub type Code = nvmlReturn_t;

pub const ENV_SCENARIO: &str = "GPUMETER_FAKE_NVML_SCENARIO";
pub const SIDECAR_NAME: &str = "fake-nvml-scenario.json";

/// How many utilization samples the fake keeps per card, as the driver's ring buffer does.
const SAMPLE_BUFFER: u64 = 1000;

/// One process-wide driver, as with the real library.
static DRIVER: LazyLock<Mutex<Driver>> = LazyLock::new(|| Mutex::new(Driver::default()));

/// Signalled whenever a scenario is (re)loaded: event waits sleep on it, as the real driver's
/// waits sleep until the kernel has an event, instead of polling.
static CHANGED: Condvar = Condvar::new();

/// Runs `f` on the driver. A panic elsewhere must not wedge every later call, so a poisoned lock
/// is taken over as is. A call that reloaded a changed scenario wakes the event waits.
pub fn with<T>(f: impl FnOnce(&mut Driver) -> T) -> T {
    let mut driver = DRIVER.lock().unwrap_or_else(PoisonError::into_inner);
    let before = driver.scenarios.generation();
    let out = f(&mut driver);
    if driver.scenarios.generation() != before {
        CHANGED.notify_all();
    }
    out
}

/// `nvmlEventSetWait_v2`: the next undelivered event of `set`, waiting up to `timeout` for one.
/// Blocks on [`CHANGED`] (the driver lock is released meanwhile, so other calls go on); the
/// scenario file is looked at once per wake, not polled.
pub fn wait_event(set: usize, timeout: Duration) -> Result<Option<Event>, Code> {
    let deadline = Instant::now() + timeout;
    let mut driver = DRIVER.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let before = driver.scenarios.generation();
        let event = driver.next_event(set)?;
        if driver.scenarios.generation() != before {
            CHANGED.notify_all();
        }
        if event.is_some() {
            return Ok(event);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let seen = driver.scenarios.generation();
        driver = CHANGED
            .wait_timeout_while(driver, deadline - now, |d| d.scenarios.generation() == seen)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

/// A card as handed out: which scenario file, which UUID. Handles stay valid for the life of the
/// process, like real NVML handles stay valid while the driver is loaded.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DeviceRef {
    path: PathBuf,
    uuid: String,
}

struct EventSet {
    path: PathBuf,
    /// (device handle, registered event-type mask)
    registered: Vec<(usize, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EventKey {
    Xid { code: u64, seq: u64 },
    Ecc { double_bit: bool, seq: u64 },
}

/// A driver event ready to hand out.
pub struct Event {
    pub device: usize,
    pub event_type: u64,
    pub data: u64,
}

#[derive(Default)]
pub struct Driver {
    init_count: u32,
    scenario_path: Option<PathBuf>,
    scenarios: Scenarios,
    /// Device handle `n` is `devices[n - 1]`.
    devices: Vec<DeviceRef>,
    /// Event set handle `n` is `sets[n - 1]`; `None` once freed.
    sets: Vec<Option<EventSet>>,
    compute_modes: HashMap<DeviceRef, nvmlComputeMode_t>,
    /// Accounting modes set through `nvmlDeviceSetAccountingMode`; they win over the scenario.
    accounting_modes: HashMap<DeviceRef, bool>,
    /// Every scenario event already handed out: each is delivered once per process.
    delivered: HashSet<(DeviceRef, EventKey)>,
}

/// The scenario at `path`; borrows only `scenarios`, so the rest of the driver stays usable.
fn load<'a>(scenarios: &'a mut Scenarios, path: &Path) -> Result<&'a Scenario, Code> {
    scenarios.get(path).map_err(|reason| {
        eprintln!("fake-nvml: {reason}");
        nvmlReturn_enum_NVML_ERROR_UNKNOWN
    })
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn now_ms() -> i64 {
    i64::try_from(now_us() / 1000).unwrap_or(i64::MAX)
}

impl Driver {
    /// `nvmlInit`: finds and loads the scenario. `library` is where this library was loaded from.
    pub fn init(&mut self, library: Option<&Path>) -> Result<(), Code> {
        let path = match std::env::var_os(ENV_SCENARIO) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => match library.and_then(Path::parent).map(|d| d.join(SIDECAR_NAME)) {
                Some(p) if p.exists() => p,
                // No scenario is what a machine without the NVIDIA driver looks like.
                _ => return Err(nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED),
            },
        };
        if let Err(reason) = self.scenarios.get(&path) {
            eprintln!("fake-nvml: {reason}");
            return Err(nvmlReturn_enum_NVML_ERROR_UNKNOWN);
        }
        self.scenario_path = Some(path);
        self.init_count += 1;
        Ok(())
    }

    pub fn shutdown(&mut self) -> Result<(), Code> {
        if self.init_count == 0 {
            return Err(nvmlReturn_enum_NVML_ERROR_UNINITIALIZED);
        }
        self.init_count -= 1;
        Ok(())
    }

    fn path(&self) -> Result<PathBuf, Code> {
        match (&self.scenario_path, self.init_count) {
            (Some(p), 1..) => Ok(p.clone()),
            _ => Err(nvmlReturn_enum_NVML_ERROR_UNINITIALIZED),
        }
    }

    fn scenario_at(&mut self, path: &Path) -> Result<&Scenario, Code> {
        load(&mut self.scenarios, path)
    }

    fn scenario(&mut self) -> Result<(PathBuf, &Scenario), Code> {
        let path = self.path()?;
        let scenario = self.scenario_at(&path)?;
        Ok((path, scenario))
    }

    pub fn driver_version(&mut self) -> Result<String, Code> {
        Ok(self.scenario()?.1.driver_version.clone())
    }

    pub fn device_count(&mut self) -> Result<u32, Code> {
        let n = self.scenario()?.1.cards.len();
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    fn handle_for(&mut self, device: DeviceRef) -> usize {
        match self.devices.iter().position(|d| *d == device) {
            Some(i) => i + 1,
            None => {
                self.devices.push(device);
                self.devices.len()
            }
        }
    }

    pub fn handle_by_index(&mut self, index: u32) -> Result<usize, Code> {
        let (path, scenario) = self.scenario()?;
        let card = usize::try_from(index)
            .ok()
            .and_then(|i| scenario.cards.get(i))
            .ok_or(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT)?;
        let uuid = card.uuid.clone();
        Ok(self.handle_for(DeviceRef { path, uuid }))
    }

    pub fn handle_by_uuid(&mut self, uuid: &str) -> Result<usize, Code> {
        let (path, scenario) = self.scenario()?;
        if scenario.find(uuid).is_none() {
            return Err(nvmlReturn_enum_NVML_ERROR_NOT_FOUND);
        }
        let uuid = uuid.to_owned();
        Ok(self.handle_for(DeviceRef { path, uuid }))
    }

    fn device(&self, handle: usize) -> Result<DeviceRef, Code> {
        self.path()?;
        handle
            .checked_sub(1)
            .and_then(|i| self.devices.get(i))
            .cloned()
            .ok_or(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT)
    }

    /// The card behind `handle`, after the faults the scenario asks for: a lost card answers
    /// GPU_IS_LOST, a call in `failing_calls` UNKNOWN, an unsupported feature NOT_SUPPORTED.
    pub fn card(&mut self, handle: usize, call: &str, feature: Option<&str>) -> Result<Card, Code> {
        let device = self.device(handle)?;
        let scenario = self.scenario_at(&device.path)?;
        let card = scenario
            .find(&device.uuid)
            // A card that left the scenario fell off the bus.
            .ok_or(nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST)?;
        if card.lost {
            return Err(nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST);
        }
        if card.fails(call) {
            return Err(nvmlReturn_enum_NVML_ERROR_UNKNOWN);
        }
        if feature.is_some_and(|f| card.unsupported(f)) {
            return Err(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED);
        }
        Ok(card)
    }

    /// `nvmlDeviceGetMaxMigDeviceCount`: the card's slices while MIG is on.
    pub fn max_mig_devices(&mut self, handle: usize) -> Result<u32, Code> {
        let card = self.card(handle, "nvmlDeviceGetMaxMigDeviceCount", Some("mig"))?;
        match card.mig_mode {
            Some(true) => Ok(card.mig_slices),
            Some(false) => Ok(0),
            None => Err(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED),
        }
    }

    /// `nvmlDeviceGetMigDeviceHandleByIndex`: NOT_FOUND for an index without a device.
    pub fn mig_device(&mut self, handle: usize, index: u32) -> Result<usize, Code> {
        let card = self.card(handle, "nvmlDeviceGetMigDeviceHandleByIndex", Some("mig"))?;
        if card.mig_mode != Some(true) {
            return Err(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT);
        }
        let mig = usize::try_from(index)
            .ok()
            .and_then(|i| card.mig_devices.get(i))
            .ok_or(nvmlReturn_enum_NVML_ERROR_NOT_FOUND)?;
        let path = self.device(handle)?.path;
        Ok(self.handle_for(DeviceRef {
            path,
            uuid: mig.uuid.clone(),
        }))
    }

    /// The parent of a MIG device handle; `None` for a card that is not a MIG device.
    pub fn mig_parent(&mut self, handle: usize) -> Result<Option<usize>, Code> {
        let device = self.device(handle)?;
        let scenario = self.scenario_at(&device.path)?;
        let parent = scenario
            .mig_parent(&device.uuid)
            .map(|(c, _)| c.uuid.clone());
        Ok(parent.map(|uuid| {
            self.handle_for(DeviceRef {
                path: device.path,
                uuid,
            })
        }))
    }

    pub fn index_of(&mut self, handle: usize) -> Result<u32, Code> {
        let card = self.card(handle, "nvmlDeviceGetIndex", None)?;
        let device = self.device(handle)?;
        let scenario = self.scenario_at(&device.path)?;
        let i = scenario
            .cards
            .iter()
            .position(|c| c.uuid == card.uuid)
            // A MIG device has its parent's index.
            .or_else(|| {
                let (parent, _) = scenario.mig_parent(&card.uuid)?;
                scenario.cards.iter().position(|c| c.uuid == parent.uuid)
            })
            .ok_or(nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST)?;
        Ok(u32::try_from(i).unwrap_or(u32::MAX))
    }

    /// Utilization samples newer than `last_seen` (µs), oldest first. Explicit buffers from the
    /// scenario are returned as written; otherwise one sample of the current value every
    /// `sample_period_us` of wall-clock time, on multiples of the period.
    pub fn samples(
        &mut self,
        handle: usize,
        sampling: nvmlSamplingType_t,
        last_seen: u64,
    ) -> Result<Vec<(u64, u32)>, Code> {
        let card = self.card(handle, "nvmlDeviceGetSamples", Some("samples"))?;
        let (explicit, value) = match sampling {
            nvmlSamplingType_enum_NVML_GPU_UTILIZATION_SAMPLES => {
                (&card.gpu_samples, card.util_gpu)
            }
            nvmlSamplingType_enum_NVML_MEMORY_UTILIZATION_SAMPLES => {
                (&card.mem_samples, card.util_mem)
            }
            _ => return Err(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED),
        };
        let mut out: Vec<(u64, u32)> = match explicit {
            Some(list) => list
                .iter()
                .filter(|s| s.ts_us > last_seen)
                .map(|s| (s.ts_us, s.value))
                .collect(),
            None => {
                let period = card.sample_period_us;
                let latest = now_us() / period * period;
                let oldest = latest.saturating_sub((SAMPLE_BUFFER - 1) * period);
                let first_new = (last_seen / period + 1).saturating_mul(period);
                let mut ts = oldest.max(first_new);
                let mut v = Vec::new();
                while ts <= latest {
                    v.push((ts, value));
                    ts += period;
                }
                v
            }
        };
        out.sort_by_key(|s| s.0);
        if out.is_empty() {
            // What the driver answers when nothing is newer than `last_seen`.
            return Err(nvmlReturn_enum_NVML_ERROR_NOT_FOUND);
        }
        Ok(out)
    }

    /// Per-process samples newer than `last_seen`: one per process with `sm_util`, stamped with
    /// the latest sample tick.
    pub fn process_utilization(
        &mut self,
        handle: usize,
        last_seen: u64,
    ) -> Result<Vec<nvmlProcessUtilizationSample_t>, Code> {
        let card = self.card(
            handle,
            "nvmlDeviceGetProcessUtilization",
            Some("process_utilization"),
        )?;
        let period = card.sample_period_us;
        let ts = now_us() / period * period;
        let out: Vec<_> = card
            .processes
            .iter()
            .filter(|_| ts > last_seen)
            .filter_map(|p| {
                p.sm_util.map(|sm| nvmlProcessUtilizationSample_t {
                    pid: p.pid,
                    timeStamp: ts,
                    smUtil: sm,
                    memUtil: 0,
                    encUtil: 0,
                    decUtil: 0,
                })
            })
            .collect();
        if out.is_empty() {
            return Err(nvmlReturn_enum_NVML_ERROR_NOT_FOUND);
        }
        Ok(out)
    }

    /// The card's running processes of one kind, and whether its null-buffer count query
    /// answers SUCCESS (see `process_count_success`).
    pub fn processes(
        &mut self,
        handle: usize,
        call: &str,
        graphics: bool,
    ) -> Result<(Vec<nvmlProcessInfo_t>, bool), Code> {
        let card = self.card(handle, call, Some("processes"))?;
        // NVML_VALUE_NOT_AVAILABLE is -1 as an unsigned long long.
        let not_available = u64::MAX;
        let no_instance = u32::MAX;
        let list = card
            .processes
            .iter()
            .filter(|p| p.graphics == graphics)
            .map(|p| nvmlProcessInfo_t {
                pid: p.pid,
                usedGpuMemory: p.used_memory.unwrap_or(not_available),
                gpuInstanceId: no_instance,
                computeInstanceId: no_instance,
            })
            .collect();
        Ok((list, card.process_count_success))
    }

    pub fn compute_mode(&mut self, handle: usize) -> Result<nvmlComputeMode_t, Code> {
        self.card(handle, "nvmlDeviceGetComputeMode", Some("compute_mode"))?;
        let device = self.device(handle)?;
        Ok(self
            .compute_modes
            .get(&device)
            .copied()
            .unwrap_or(nvmlComputeMode_enum_NVML_COMPUTEMODE_DEFAULT))
    }

    pub fn set_compute_mode(&mut self, handle: usize, mode: nvmlComputeMode_t) -> Result<(), Code> {
        self.card(handle, "nvmlDeviceSetComputeMode", Some("compute_mode"))?;
        if mode >= nvmlComputeMode_enum_NVML_COMPUTEMODE_COUNT {
            return Err(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT);
        }
        let device = self.device(handle)?;
        self.compute_modes.insert(device, mode);
        Ok(())
    }

    pub fn accounting_mode(&mut self, handle: usize) -> Result<bool, Code> {
        let card = self.card(handle, "nvmlDeviceGetAccountingMode", Some("accounting"))?;
        let device = self.device(handle)?;
        Ok(self
            .accounting_modes
            .get(&device)
            .copied()
            .unwrap_or(card.accounting_mode))
    }

    pub fn set_accounting_mode(
        &mut self,
        handle: usize,
        mode: nvmlEnableState_t,
    ) -> Result<(), Code> {
        self.card(handle, "nvmlDeviceSetAccountingMode", Some("accounting"))?;
        let on = match mode {
            nvmlEnableState_enum_NVML_FEATURE_ENABLED => true,
            nvmlEnableState_enum_NVML_FEATURE_DISABLED => false,
            _ => return Err(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT),
        };
        let device = self.device(handle)?;
        self.accounting_modes.insert(device, on);
        Ok(())
    }

    /// The accounting record of `pid`: NOT_SUPPORTED while accounting mode is off (as the driver
    /// answers), NOT_FOUND for a process without one in the scenario.
    pub fn accounting_stats(
        &mut self,
        handle: usize,
        pid: u32,
    ) -> Result<nvmlAccountingStats_t, Code> {
        if !self.accounting_mode(handle)? {
            return Err(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED);
        }
        let card = self.card(handle, "nvmlDeviceGetAccountingStats", Some("accounting"))?;
        let record = card
            .processes
            .iter()
            .find(|p| p.pid == pid)
            .and_then(|p| p.accounting)
            .ok_or(nvmlReturn_enum_NVML_ERROR_NOT_FOUND)?;
        // NVML_VALUE_NOT_AVAILABLE is -1 in every width.
        Ok(nvmlAccountingStats_t {
            gpuUtilization: record.gpu_util.unwrap_or(u32::MAX),
            memoryUtilization: record.mem_util.unwrap_or(u32::MAX),
            maxMemoryUsage: record.max_memory.unwrap_or(u64::MAX),
            time: record.time_ms.unwrap_or(u64::MAX),
            startTime: record.start_time_us.unwrap_or(u64::MAX),
            isRunning: u32::from(record.running),
            reserved: [0; 5],
        })
    }

    /// Pids with an accounting record (running or not): NOT_SUPPORTED while the mode is off.
    pub fn accounting_pids(&mut self, handle: usize) -> Result<Vec<c_uint>, Code> {
        if !self.accounting_mode(handle)? {
            return Err(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED);
        }
        let card = self.card(handle, "nvmlDeviceGetAccountingPids", Some("accounting"))?;
        Ok(card
            .processes
            .iter()
            .filter(|p| p.accounting.is_some())
            .map(|p| p.pid)
            .collect())
    }

    pub fn supported_events(&mut self, handle: usize, call: &str) -> Result<u64, Code> {
        let card = self.card(handle, call, Some("events"))?;
        let mut mask = u64::from(nvmlEventTypeXidCriticalError);
        if !card.unsupported("ecc") {
            mask |= u64::from(nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError);
        }
        Ok(mask)
    }

    pub fn create_set(&mut self) -> Result<usize, Code> {
        let path = self.path()?;
        self.sets.push(Some(EventSet {
            path,
            registered: Vec::new(),
        }));
        Ok(self.sets.len())
    }

    fn set_mut(&mut self, set: usize) -> Result<&mut EventSet, Code> {
        set.checked_sub(1)
            .and_then(|i| self.sets.get_mut(i))
            .and_then(Option::as_mut)
            .ok_or(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT)
    }

    pub fn free_set(&mut self, set: usize) -> Result<(), Code> {
        self.set_mut(set)?;
        if let Some(slot) = set.checked_sub(1).and_then(|i| self.sets.get_mut(i)) {
            *slot = None;
        }
        Ok(())
    }

    pub fn register(&mut self, handle: usize, mask: u64, set: usize) -> Result<(), Code> {
        let supported = self.supported_events(handle, "nvmlDeviceRegisterEvents")?;
        if mask & !supported != 0 {
            return Err(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED);
        }
        let set = self.set_mut(set)?;
        set.registered.retain(|(h, _)| *h != handle);
        set.registered.push((handle, mask));
        Ok(())
    }

    /// The next scenario event for a card registered in `set`, if any is still undelivered. An
    /// event with `via` comes through the set of the card it names there, and names its own
    /// card's device.
    pub fn next_event(&mut self, set: usize) -> Result<Option<Event>, Code> {
        let (path, registered) = {
            let s = self.set_mut(set)?;
            (s.path.clone(), s.registered.clone())
        };
        let mut ready: Option<(DeviceRef, EventKey, u64, u64)> = None;
        {
            let scenario = load(&mut self.scenarios, &path)?;
            'cards: for (handle, mask) in registered {
                let Some(watched) = handle.checked_sub(1).and_then(|i| self.devices.get(i)) else {
                    continue;
                };
                // (order, source card, type, data, key) of every event this registration sees.
                let mut pending: Vec<(u64, &str, u64, u64, EventKey)> = Vec::new();
                for card in &scenario.cards {
                    let arrives_here = |via: &Option<String>| match via {
                        Some(v) => *v == watched.uuid,
                        None => card.uuid == watched.uuid,
                    };
                    if mask & u64::from(nvmlEventTypeXidCriticalError) != 0 {
                        for x in card.xid_events.iter().filter(|x| arrives_here(&x.via)) {
                            let key = EventKey::Xid {
                                code: x.code,
                                seq: x.seq,
                            };
                            let kind = u64::from(nvmlEventTypeXidCriticalError);
                            pending.push((x.seq, &card.uuid, kind, x.code, key));
                        }
                    }
                    for e in card.ecc_events.iter().filter(|e| arrives_here(&e.via)) {
                        let kind = if e.double_bit {
                            nvmlEventTypeDoubleBitEccError
                        } else {
                            nvmlEventTypeSingleBitEccError
                        };
                        if mask & u64::from(kind) != 0 {
                            let key = EventKey::Ecc {
                                double_bit: e.double_bit,
                                seq: e.seq,
                            };
                            pending.push((e.seq, &card.uuid, u64::from(kind), 0, key));
                        }
                    }
                }
                pending.sort_by_key(|p| p.0);
                for (_, uuid, event_type, data, key) in pending {
                    let source = DeviceRef {
                        path: path.clone(),
                        uuid: uuid.to_owned(),
                    };
                    if !self.delivered.contains(&(source.clone(), key.clone())) {
                        ready = Some((source, key, event_type, data));
                        break 'cards;
                    }
                }
            }
        }
        Ok(ready.map(|(source, key, event_type, data)| {
            self.delivered.insert((source.clone(), key));
            Event {
                device: self.handle_for(source),
                event_type,
                data,
            }
        }))
    }
}

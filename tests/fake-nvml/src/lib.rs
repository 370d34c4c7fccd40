//! Fake libnvidia-ml: answers the NVML C calls gpumeter makes from a JSON scenario file, so the
//! agent's real `nvml-wrapper` path runs in CI without a GPU.
//!
//! Build: `cargo build -p fake-nvml` gives `target/debug/libnvidia_ml.so`; point the agent at it
//! with `--nvml-lib` (nvml-wrapper's `lib_path`).
//!
//! # Which scenario
//! The file named by `GPUMETER_FAKE_NVML_SCENARIO`, or else `fake-nvml-scenario.json` next to the
//! loaded library. The second form lets in-process tests copy the library into their own temp
//! directory: each copy is a separate library instance with its own state and scenario, and no
//! test touches the process environment. With neither, `nvmlInit` answers DRIVER_NOT_LOADED, as
//! on a machine without the NVIDIA driver. The file is re-read when it changes (see
//! [`scenario`]); replace it by rename.
//!
//! # Scenario format (JSON; every field but `uuid` optional)
//! ```json
//! { "driver_version": "550.54.15",
//!   "cards": [{
//!     "uuid": "GPU-…", "name": "NVIDIA H100 80GB HBM3", "serial": "1650…",
//!     "pci_bus_id": "00000000:17:00.0", "memory_total": 85899345920, "mig_mode": false,
//!     "util_gpu": 40, "util_mem": 20, "memory_used": 1073741824,
//!     "power_mw": 300000, "energy_mj": 1000000, "energy_at_ms": null,
//!     "temperature_c": 55, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
//!     "throttle_reasons": 4, "ecc_corrected": 0, "ecc_uncorrected": 0,
//!     "processes": [{ "pid": 4242, "used_memory": 1048576, "sm_util": 35, "graphics": false,
//!       "accounting": { "gpu_util": 60, "mem_util": 10, "max_memory": 2097152,
//!                       "time_ms": 0, "start_time_us": 1700000000000000, "running": true } }],
//!     "accounting_mode": false,
//!     "samples_supported": true, "sample_period_us": 50000,
//!     "gpu_samples": [{ "ts_us": 1000, "value": 10 }], "mem_samples": null,
//!     "not_supported": ["power"], "lost": false,
//!     "failing_calls": ["nvmlDeviceGetMemoryInfo_v2"],
//!     "xid_events": [{ "code": 79, "seq": 1 }],
//!     "ecc_events": [{ "double_bit": true, "seq": 1 }] }] }
//! ```
//! - Utilization samples: `gpu_samples`/`mem_samples` when given (those newer than the caller's
//!   last-seen timestamp), else one sample of `util_gpu`/`util_mem` per `sample_period_us` of
//!   wall-clock time (Unix µs, on multiples of the period, up to 1000 kept). Nothing newer than
//!   last-seen answers NOT_FOUND, as the driver does. `nvmlDeviceGetUtilizationRates` answers
//!   `util_gpu`/`util_mem`.
//! - Per-process utilization: one sample per process that has `sm_util`, stamped with the latest
//!   sample tick; NOT_FOUND when there is none newer than last-seen.
//! - Energy: `energy_mj`, plus `power_mw × (now_ms − energy_at_ms) / 1000` when `energy_at_ms`
//!   is set, so a test can give an exact counter or a computable ramp.
//! - `not_supported`: `serial pci memory mig utilization samples process_utilization energy power
//!   temperature clocks throttle ecc processes events compute_mode accounting` answer
//!   NOT_SUPPORTED. `failing_calls` (NVML function names) answer UNKNOWN. `lost`: every call on
//!   the card answers GPU_IS_LOST (handle lookups still work).
//! - Events: each `xid_events`/`ecc_events` entry is delivered exactly once per process by
//!   `nvmlEventSetWait_v2`, to the first event set that has the card registered for its type.
//!   Entries are told apart by (card, kind, code, `seq`).
//! - An event with `"via": "<UUID>"` is delivered through the event set of that other card and
//!   names its own card's device (one set watching several cards). `nvmlEventSetWait_v2`
//!   blocks on a condition variable signalled when a scenario is (re)loaded, until an event or
//!   the timeout, as a real driver's wait blocks; it does not poll.
//! - `"process_count_success": true`: the process lists' null-buffer count query answers
//!   SUCCESS with the count (a driver quirk nvml-wrapper 0.13 reads as "no processes").
//! - Health: `"ecc_uncorrected_aggregate"` (default: the volatile count), `"retired_pages":
//!   { "single_bit": 2, "double_bit": 1, "pending": true }` and `"remapped_rows": {
//!   "corrected": 4, "uncorrected": 1, "pending": false, "failure": false }`; absent: those
//!   calls answer NOT_SUPPORTED. `nvmlDeviceGetAccountingPids` lists the processes with an
//!   `accounting` record.
//! - MIG: a card with `"mig_mode": true` and `"mig_devices": [{ "uuid": "MIG-…", "profile":
//!   "1g.10gb", "memory_total": …, "memory_used": …, "processes": [...] }]` (and
//!   `"mig_slices"`, default 7: `nvmlDeviceGetMaxMigDeviceCount`) hands out MIG device handles
//!   by index and by UUID; each is named `<parent name> MIG <profile>`, has the parent's index,
//!   its own memory and processes, and answers NOT_SUPPORTED for utilization, samples,
//!   process utilization, power, energy, temperature, clocks, ECC, events and accounting.
//! - Compute mode set through `nvmlDeviceSetComputeMode` is kept in memory per card.
//! - Accounting: `nvmlDeviceGetAccountingMode` answers `accounting_mode`, or what
//!   `nvmlDeviceSetAccountingMode` set (kept in memory per card, so a test can see that nobody
//!   turned it on). `nvmlDeviceGetAccountingStats` answers a process's `accounting` record
//!   (absent values as NVML_VALUE_NOT_AVAILABLE); NOT_FOUND for a process without one,
//!   NOT_SUPPORTED while the mode is off.
//!
//! The library is linked with `-z nodelete`, so its state outlives the last `nvmlShutdown` and
//! `dlclose` for the rest of the process, as the kernel driver's would.
//!
//! # Safety
//! This crate alone in the workspace uses `unsafe`: to read and write through the pointers NVML
//! callers pass. Every exported function has NVML's contract from `nvml.h`: each pointer is null
//! or valid for the documented type and length. Null pointers are refused with
//! INVALID_ARGUMENT; the rest of the contract is the caller's. All unsafe code is in the
//! pointer helpers below; the driver's answers are computed in safe Rust ([`driver`]).

// This crate exists to speak C: see "Safety" above.
#![allow(unsafe_code)]
// The safety contract of every export is NVML's own, stated once above.
#![allow(clippy::missing_safety_doc)]
// NVML's C names, used as they are in nvml.h.
#![allow(non_snake_case, non_upper_case_globals)]
#![warn(clippy::unwrap_used, clippy::dbg_macro)]

mod driver;
mod scenario;

use std::ffi::CStr;
use std::os::raw::{c_char, c_uint, c_ulonglong};
use std::path::PathBuf;
use std::ptr;
use std::time::Duration;

use nvml_wrapper_sys::bindings::*;

use driver::Code;
use scenario::Card;

const SUCCESS: nvmlReturn_t = nvmlReturn_enum_NVML_SUCCESS;
const INVALID_ARGUMENT: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT;
const INSUFFICIENT_SIZE: nvmlReturn_t = nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE;

// ---- pointer helpers: the only unsafe code ----

/// Writes `value` through an out-pointer.
unsafe fn put<T>(out: *mut T, value: T) -> nvmlReturn_t {
    if out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, and valid for a write of `T` by the caller's contract.
    unsafe { out.write(value) };
    SUCCESS
}

/// Writes the answer, or returns the error code.
unsafe fn answer<T>(out: *mut T, result: Result<T, Code>) -> nvmlReturn_t {
    match result {
        // SAFETY: forwarded caller contract.
        Ok(v) => unsafe { put(out, v) },
        Err(code) => code,
    }
}

/// Copies `s` and a NUL into a caller buffer of `len` bytes.
unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> nvmlReturn_t {
    if buf.is_null() {
        return INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if usize::try_from(len).map_or(true, |len| len < bytes.len() + 1) {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: the buffer is non-null and holds `len` > `bytes.len()` bytes by the caller's
    // contract; the source is a separate Rust allocation.
    unsafe {
        ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        buf.add(bytes.len()).write(0);
    }
    SUCCESS
}

unsafe fn answer_str(buf: *mut c_char, len: c_uint, result: Result<String, Code>) -> nvmlReturn_t {
    match result {
        // SAFETY: forwarded caller contract.
        Ok(s) => unsafe { put_str(buf, len, &s) },
        Err(code) => code,
    }
}

/// Reads a NUL-terminated string argument.
unsafe fn read_str(s: *const c_char) -> Option<String> {
    if s.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    let s = unsafe { CStr::from_ptr(s) };
    s.to_str().ok().map(str::to_owned)
}

/// NVML's list protocol for the process lists: `*count` holds the buffer's capacity on entry
/// and the number of entries on return; a buffer too small (or null) answers INSUFFICIENT_SIZE
/// with the count set, except that an empty list is a success.
/// With `count_success`, a null buffer is answered SUCCESS with the count set (a driver quirk
/// that nvml-wrapper 0.13 reads as "no processes").
unsafe fn put_list<T: Copy>(
    count: *mut c_uint,
    out: *mut T,
    items: &[T],
    count_success: bool,
) -> nvmlReturn_t {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null, valid for read and write by the caller's contract.
    let capacity = unsafe { count.read() };
    let n = c_uint::try_from(items.len()).unwrap_or(c_uint::MAX);
    // SAFETY: as above.
    unsafe { count.write(n) };
    if n == 0 || (out.is_null() && count_success) {
        return SUCCESS;
    }
    if out.is_null() || capacity < n {
        return INSUFFICIENT_SIZE;
    }
    // SAFETY: `out` holds `capacity` >= `n` elements by the caller's contract.
    unsafe { ptr::copy_nonoverlapping(items.as_ptr(), out, items.len()) };
    SUCCESS
}

/// The sample-buffer protocol: a null buffer asks for the count; otherwise the oldest entries
/// that fit are written and `*count` says how many. The caller's last-seen timestamp then picks
/// up the rest next time, so nothing is dropped.
unsafe fn put_oldest<T: Copy>(count: *mut c_uint, out: *mut T, items: &[T]) -> nvmlReturn_t {
    if count.is_null() {
        return INVALID_ARGUMENT;
    }
    let n = c_uint::try_from(items.len()).unwrap_or(c_uint::MAX);
    if out.is_null() {
        // SAFETY: non-null, valid for a write by the caller's contract.
        unsafe { count.write(n) };
        return SUCCESS;
    }
    // SAFETY: as above, and valid for a read.
    let written = unsafe { count.read() }.min(n);
    let len = usize::try_from(written).unwrap_or(0);
    // SAFETY: `out` holds `*count` >= `written` elements by the caller's contract.
    unsafe {
        ptr::copy_nonoverlapping(items.as_ptr(), out, len);
        count.write(written);
    }
    SUCCESS
}

// ---- handles ----

/// Handles are small integers in pointer clothing: never dereferenced, looked up in the
/// driver's tables, so a stale or foreign handle is an INVALID_ARGUMENT, not a crash.
fn handle<T>(p: *mut T) -> usize {
    p.addr()
}

fn device_ptr(handle: usize) -> nvmlDevice_t {
    ptr::without_provenance_mut(handle)
}

fn card(device: nvmlDevice_t, call: &str, feature: Option<&str>) -> Result<Card, Code> {
    driver::with(|d| d.card(handle(device), call, feature))
}

fn status(result: Result<(), Code>) -> nvmlReturn_t {
    result.err().unwrap_or(SUCCESS)
}

/// Where this library was loaded from: the mapping in /proc/self/maps that holds this function.
fn library_path() -> Option<PathBuf> {
    let here = library_path as fn() -> Option<PathBuf> as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let (range, _) = line.split_once(' ')?;
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        if !(start..end).contains(&here) {
            return None;
        }
        // The path is the last column and the only one that starts with '/'.
        line.find('/').map(|i| PathBuf::from(&line[i..]))
    })
}

// ---- library ----

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    let library = library_path();
    status(driver::with(|d| d.init(library.as_deref())))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    nvmlInit_v2()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    status(driver::with(|d| d.shutdown()))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.driver_version());
    unsafe { answer_str(version, length, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.driver_version()).map(|v| format!("12.{v}"));
    unsafe { answer_str(version, length, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    let r = driver::with(|d| d.device_count());
    unsafe { answer(count, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.handle_by_index(index)).map(device_ptr);
    unsafe { answer(device, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let Some(uuid) = (unsafe { read_str(uuid) }) else {
        return INVALID_ARGUMENT;
    };
    let r = driver::with(|d| d.handle_by_uuid(&uuid)).map(device_ptr);
    unsafe { answer(device, r) }
}

// ---- inventory ----

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetUUID", None).map(|c| c.uuid);
    unsafe { answer_str(uuid, length, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetName", None).map(|c| c.name);
    unsafe { answer_str(name, length, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSerial(
    device: nvmlDevice_t,
    serial: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetSerial", Some("serial"))
        .and_then(|c| c.serial.ok_or(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED));
    unsafe { answer_str(serial, length, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.index_of(handle(device)));
    unsafe { answer(index, r) }
}

/// Fills an NVML PCI record from `DDDDDDDD:BB:DD.F`; unparsable parts stay 0.
fn pci_info(bus_id: &str) -> nvmlPciInfo_t {
    let mut info = nvmlPciInfo_t {
        busIdLegacy: [0; 16],
        domain: 0,
        bus: 0,
        device: 0,
        pciDeviceId: 0x2330_10de,
        pciSubSystemId: 0x16c1_10de,
        busId: [0; 32],
    };
    let mut parts = bus_id.split([':', '.']);
    let mut field = || {
        parts
            .next()
            .and_then(|p| u32::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    info.domain = field();
    info.bus = field();
    info.device = field();
    let legacy = format!("{:04x}:{:02x}:{:02x}.0", info.domain, info.bus, info.device);
    for (dst, src) in info.busId.iter_mut().zip(bus_id.bytes().take(31)) {
        *dst = src as c_char;
    }
    for (dst, src) in info.busIdLegacy.iter_mut().zip(legacy.bytes().take(15)) {
        *dst = src as c_char;
    }
    info
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetPciInfo_v3", Some("pci")).map(|c| pci_info(&c.pci_bus_id));
    unsafe { answer(pci, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetMemoryInfo_v2", Some("memory")).map(|c| nvmlMemory_v2_t {
        version: u32::try_from(size_of::<nvmlMemory_v2_t>() | (2 << 24)).unwrap_or(0),
        total: c.memory_total,
        reserved: 0,
        free: c.memory_total.saturating_sub(c.memory_used),
        used: c.memory_used,
    });
    unsafe { answer(memory, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetMigMode", Some("mig"))
        .and_then(|c| c.mig_mode.ok_or(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED));
    match r {
        Ok(on) => {
            let mode = c_uint::from(on);
            match unsafe { put(current, mode) } {
                SUCCESS => unsafe { put(pending, mode) },
                code => code,
            }
        }
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.max_mig_devices(handle(device)));
    unsafe { answer(count, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.mig_device(handle(device), index)).map(device_ptr);
    unsafe { answer(mig, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.mig_parent(handle(mig)))
        .and_then(|p| p.ok_or(nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT))
        .map(device_ptr);
    unsafe { answer(device, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    is_mig: *mut c_uint,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.mig_parent(handle(device))).map(|p| c_uint::from(p.is_some()));
    unsafe { answer(is_mig, r) }
}

// ---- utilization ----

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetUtilizationRates", Some("utilization")).map(|c| {
        nvmlUtilization_t {
            gpu: c.util_gpu,
            memory: c.util_mem,
        }
    });
    unsafe { answer(utilization, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSamples(
    device: nvmlDevice_t,
    sampling: nvmlSamplingType_t,
    last_seen: c_ulonglong,
    value_type: *mut nvmlValueType_t,
    count: *mut c_uint,
    samples: *mut nvmlSample_t,
) -> nvmlReturn_t {
    let list = match driver::with(|d| d.samples(handle(device), sampling, last_seen)) {
        Ok(list) => list,
        Err(code) => return code,
    };
    let list: Vec<nvmlSample_t> = list
        .into_iter()
        .map(|(ts, v)| nvmlSample_t {
            timeStamp: ts,
            sampleValue: nvmlValue_t { uiVal: v },
        })
        .collect();
    match unsafe { put(value_type, nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT) } {
        SUCCESS => unsafe { put_oldest(count, samples, &list) },
        code => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    match driver::with(|d| d.process_utilization(handle(device), last_seen)) {
        Ok(list) => unsafe { put_oldest(count, utilization, &list) },
        Err(code) => code,
    }
}

// ---- power, thermals, clocks, health ----

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    let r = card(
        device,
        "nvmlDeviceGetTotalEnergyConsumption",
        Some("energy"),
    )
    .map(|c| c.energy_at(driver::now_ms()));
    unsafe { answer(energy, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetPowerUsage", Some("power")).map(|c| c.power_mw);
    unsafe { answer(power, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetTemperature", Some("temperature")).and_then(|c| {
        if sensor == nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU {
            Ok(c.temperature_c)
        } else {
            Err(INVALID_ARGUMENT)
        }
    });
    unsafe { answer(temp, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: nvmlDevice_t,
    clock_type: nvmlClockType_t,
    clock: *mut c_uint,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetClockInfo", Some("clocks")).and_then(|c| match clock_type {
        nvmlClockType_enum_NVML_CLOCK_GRAPHICS | nvmlClockType_enum_NVML_CLOCK_SM => {
            Ok(c.sm_clock_mhz)
        }
        nvmlClockType_enum_NVML_CLOCK_MEM => Ok(c.mem_clock_mhz),
        _ => Err(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED),
    });
    unsafe { answer(clock, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCurrentClocksThrottleReasons(
    device: nvmlDevice_t,
    reasons: *mut c_ulonglong,
) -> nvmlReturn_t {
    let r = card(
        device,
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        Some("throttle"),
    )
    .map(|c| c.throttle_reasons);
    unsafe { answer(reasons, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: nvmlDevice_t,
    error_type: nvmlMemoryErrorType_t,
    counter_type: nvmlEccCounterType_t,
    count: *mut c_ulonglong,
) -> nvmlReturn_t {
    // The aggregate uncorrected count is `ecc_uncorrected_aggregate` where given; otherwise
    // volatile and aggregate counters are the same.
    let aggregate = counter_type == nvmlEccCounterType_enum_NVML_AGGREGATE_ECC;
    let r =
        card(device, "nvmlDeviceGetTotalEccErrors", Some("ecc")).and_then(|c| match error_type {
            nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_CORRECTED => Ok(c.ecc_corrected),
            nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_UNCORRECTED if aggregate => {
                Ok(c.ecc_uncorrected_aggregate.unwrap_or(c.ecc_uncorrected))
            }
            nvmlMemoryErrorType_enum_NVML_MEMORY_ERROR_TYPE_UNCORRECTED => Ok(c.ecc_uncorrected),
            _ => Err(INVALID_ARGUMENT),
        });
    unsafe { answer(count, r) }
}

/// The retired pages of one cause as (address, timestamp), one per page.
fn retired(
    device: nvmlDevice_t,
    call: &str,
    cause: nvmlPageRetirementCause_t,
) -> Result<Vec<(u64, u64)>, Code> {
    let c = card(device, call, Some("ecc"))?;
    let pages = c
        .retired_pages
        .ok_or(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED)?;
    let n = match cause {
        nvmlPageRetirementCause_enum_NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS => {
            pages.single_bit
        }
        nvmlPageRetirementCause_enum_NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR => {
            pages.double_bit
        }
        _ => return Err(INVALID_ARGUMENT),
    };
    Ok((0..u64::from(n))
        .map(|i| (0x1000 * (i + 1), 1_700_000_000 + i))
        .collect())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> nvmlReturn_t {
    match retired(device, "nvmlDeviceGetRetiredPages", cause) {
        Ok(pages) => {
            let list: Vec<c_ulonglong> = pages.iter().map(|p| p.0).collect();
            unsafe { put_list(count, addresses, &list, false) }
        }
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: nvmlDevice_t,
    cause: nvmlPageRetirementCause_t,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> nvmlReturn_t {
    match retired(device, "nvmlDeviceGetRetiredPages_v2", cause) {
        Ok(pages) => {
            let list: Vec<c_ulonglong> = pages.iter().map(|p| p.0).collect();
            let times: Vec<c_ulonglong> = pages.iter().map(|p| p.1).collect();
            // SAFETY: the caller's contract for both buffers, which hold `*count` entries.
            let capacity = if count.is_null() {
                0
            } else {
                unsafe { count.read() }
            };
            match unsafe { put_list(count, addresses, &list, false) } {
                SUCCESS if !list.is_empty() => {
                    // `put_list` checked the capacity; the timestamps buffer is as long.
                    unsafe {
                        count.write(capacity);
                        put_list(count, timestamps, &times, false)
                    }
                }
                code => code,
            }
        }
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    device: nvmlDevice_t,
    pending: *mut nvmlEnableState_t,
) -> nvmlReturn_t {
    let r = card(
        device,
        "nvmlDeviceGetRetiredPagesPendingStatus",
        Some("ecc"),
    )
    .and_then(|c| {
        let pages = c
            .retired_pages
            .ok_or(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED)?;
        Ok(if pages.pending {
            nvmlEnableState_enum_NVML_FEATURE_ENABLED
        } else {
            nvmlEnableState_enum_NVML_FEATURE_DISABLED
        })
    });
    unsafe { answer(pending, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: nvmlDevice_t,
    corrected: *mut c_uint,
    uncorrected: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> nvmlReturn_t {
    let r = card(device, "nvmlDeviceGetRemappedRows", Some("ecc")).and_then(|c| {
        c.remapped_rows
            .ok_or(nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED)
    });
    match r {
        Ok(rows) => {
            for (out, v) in [
                (corrected, rows.corrected),
                (uncorrected, rows.uncorrected),
                (pending, c_uint::from(rows.pending)),
                (failure, c_uint::from(rows.failure)),
            ] {
                match unsafe { put(out, v) } {
                    SUCCESS => {}
                    code => return code,
                }
            }
            SUCCESS
        }
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetAccountingMode(
    device: nvmlDevice_t,
    mode: *mut nvmlEnableState_t,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.accounting_mode(handle(device))).map(|on| {
        if on {
            nvmlEnableState_enum_NVML_FEATURE_ENABLED
        } else {
            nvmlEnableState_enum_NVML_FEATURE_DISABLED
        }
    });
    unsafe { answer(mode, r) }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceSetAccountingMode(
    device: nvmlDevice_t,
    mode: nvmlEnableState_t,
) -> nvmlReturn_t {
    status(driver::with(|d| {
        d.set_accounting_mode(handle(device), mode)
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetAccountingStats(
    device: nvmlDevice_t,
    pid: c_uint,
    stats: *mut nvmlAccountingStats_t,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.accounting_stats(handle(device), pid));
    unsafe { answer(stats, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetAccountingPids(
    device: nvmlDevice_t,
    count: *mut c_uint,
    pids: *mut c_uint,
) -> nvmlReturn_t {
    match driver::with(|d| d.accounting_pids(handle(device))) {
        Ok(list) => unsafe { put_list(count, pids, &list, false) },
        Err(code) => code,
    }
}

// ---- processes ----

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    let call = "nvmlDeviceGetComputeRunningProcesses_v3";
    match driver::with(|d| d.processes(handle(device), call, false)) {
        Ok((list, count_success)) => unsafe { put_list(count, infos, &list, count_success) },
        Err(code) => code,
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: nvmlDevice_t,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    let call = "nvmlDeviceGetGraphicsRunningProcesses_v3";
    match driver::with(|d| d.processes(handle(device), call, true)) {
        Ok((list, count_success)) => unsafe { put_list(count, infos, &list, count_success) },
        Err(code) => code,
    }
}

// ---- compute mode ----

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeMode(
    device: nvmlDevice_t,
    mode: *mut nvmlComputeMode_t,
) -> nvmlReturn_t {
    let r = driver::with(|d| d.compute_mode(handle(device)));
    unsafe { answer(mode, r) }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceSetComputeMode(
    device: nvmlDevice_t,
    mode: nvmlComputeMode_t,
) -> nvmlReturn_t {
    status(driver::with(|d| d.set_compute_mode(handle(device), mode)))
}

// ---- events ----

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    types: *mut c_ulonglong,
) -> nvmlReturn_t {
    let call = "nvmlDeviceGetSupportedEventTypes";
    let r = driver::with(|d| d.supported_events(handle(device), call));
    unsafe { answer(types, r) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    let r = driver::with(|d| d.create_set()).map(ptr::without_provenance_mut);
    unsafe { answer(set, r) }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    status(driver::with(|d| {
        d.register(handle(device), types, handle(set))
    }))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    status(driver::with(|d| d.free_set(handle(set))))
}

/// Waits up to `timeout_ms` for the next undelivered scenario event, blocking (not polling)
/// until a scenario change or the timeout; other calls go on meanwhile.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeout_ms: c_uint,
) -> nvmlReturn_t {
    let timeout = Duration::from_millis(u64::from(timeout_ms));
    match driver::wait_event(handle(set), timeout) {
        Ok(Some(event)) => {
            let data_out = nvmlEventData_t {
                device: device_ptr(event.device),
                eventType: event.event_type,
                eventData: event.data,
                gpuInstanceId: u32::MAX,
                computeInstanceId: u32::MAX,
            };
            unsafe { put(data, data_out) }
        }
        Ok(None) => nvmlReturn_enum_NVML_ERROR_TIMEOUT,
        Err(code) => code,
    }
}

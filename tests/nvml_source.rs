//! `NvmlSource` and `probe` against the fake libnvidia-ml, through the real nvml-wrapper path.
//!
//! Each test copies the fake library into its own temp directory next to its own scenario file
//! (`fake-nvml-scenario.json`): every copy is a separate library instance, so tests run in
//! parallel without sharing driver state or touching the process environment.

// Helpers outside `#[test]` fns too: in a test, a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpumeter_agent::gpu::nvml::NvmlSource;
use gpumeter_agent::gpu::{
    CardInfo, CardReading, CardSample, GpuError, GpuEventKind, GpuProcess, GpuSource,
    HealthCounters, Inventory, ProcessAccounting, ProcessSources, UtilSource,
};
use gpumeter_agent::probe::probe;
use serde_json::{Value, json};
use tempfile::TempDir;

const SCENARIO_FILE: &str = "fake-nvml-scenario.json";
const UUID_A: &str = "GPU-aaaaaaaa-0000-0000-0000-000000000001";
const UUID_B: &str = "GPU-bbbbbbbb-0000-0000-0000-000000000002";

/// Newest modification time of the fake library's sources.
fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = UNIX_EPOCH;
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_source(&path)
        } else {
            entry.metadata().unwrap().modified().unwrap()
        };
        newest = newest.max(t);
    }
    newest
}

/// `target/debug/libnvidia_ml.so`, built first when missing or older than its sources (a
/// `cargo test -p gpumeter-e2e` does not build it: it is no dependency of this crate).
fn fake_library() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        // target/debug/deps/nvml_source-HASH → target/debug
        let exe = std::env::current_exe().unwrap();
        let target = exe.parent().unwrap().parent().unwrap();
        let lib = target.join("libnvidia_ml.so");
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("fake-nvml");
        let built = fs::metadata(&lib).and_then(|m| m.modified()).ok();
        if built.is_none_or(|t| t < newest_source(&sources)) {
            let cargo = option_env!("CARGO").unwrap_or("cargo");
            let mut build = Command::new(cargo);
            build
                .args(["build", "-p", "fake-nvml", "--manifest-path"])
                .arg(sources.join("Cargo.toml"));
            // Build into the profile directory this test runs from.
            match target.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => {}
                Some("release") => {
                    build.arg("--release");
                }
                Some(profile) => {
                    build.args(["--profile", profile]);
                }
            }
            let status = build.status().unwrap();
            assert!(status.success(), "cargo build -p fake-nvml failed");
        }
        assert!(lib.exists(), "no fake library at {}", lib.display());
        lib
    })
}

/// One test's own copy of the fake driver.
struct Fake {
    dir: TempDir,
}

impl Fake {
    fn new(scenario: &Value) -> Fake {
        assert!(
            std::env::var_os("GPUMETER_FAKE_NVML_SCENARIO").is_none(),
            "unset GPUMETER_FAKE_NVML_SCENARIO: it overrides every test's own scenario"
        );
        let dir = tempfile::tempdir().unwrap();
        fs::copy(fake_library(), dir.path().join("libnvidia-ml.so.1")).unwrap();
        let fake = Fake { dir };
        fake.set(scenario);
        fake
    }

    /// A copy of the library with no scenario beside it: a machine without the driver.
    fn without_driver() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(fake_library(), dir.path().join("libnvidia-ml.so.1")).unwrap();
        Fake { dir }
    }

    fn lib(&self) -> PathBuf {
        self.dir.path().join("libnvidia-ml.so.1")
    }

    /// Replaces the scenario by rename, so the library never reads half a file.
    fn set(&self, scenario: &Value) {
        let tmp = self.dir.path().join("scenario.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(scenario).unwrap()).unwrap();
        fs::rename(&tmp, self.dir.path().join(SCENARIO_FILE)).unwrap();
    }

    fn open(&self) -> NvmlSource {
        NvmlSource::open(Some(&self.lib())).unwrap()
    }
}

fn now_ms() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn card_a() -> Value {
    json!({
        "uuid": UUID_A,
        "name": "NVIDIA H100 80GB HBM3",
        "serial": "1650123456789",
        "pci_bus_id": "00000000:17:00.0",
        "memory_total": 85_899_345_920u64,
        "mig_mode": false,
        "util_gpu": 40, "util_mem": 20,
        "memory_used": 1_073_741_824u64,
        "power_mw": 300_000, "energy_mj": 123_456_789u64,
        "temperature_c": 55, "sm_clock_mhz": 1980, "mem_clock_mhz": 2619,
        "throttle_reasons": 4, "ecc_corrected": 3, "ecc_uncorrected": 1,
        // Fast synthesized samples, so a read a few ms after the last one has new ones.
        "sample_period_us": 1000,
        "processes": [
            { "pid": 4242, "used_memory": 524_288_000u64, "sm_util": 35 },
            { "pid": 4343, "sm_util": 5 },
            { "pid": 4444, "used_memory": 1_048_576u64, "graphics": true }
        ]
    })
}

fn card_b() -> Value {
    json!({
        "uuid": UUID_B,
        "name": "NVIDIA A100-SXM4-40GB",
        "pci_bus_id": "00000000:65:00.0",
        "memory_total": 42_949_672_960u64,
        "util_gpu": 0, "util_mem": 0,
        "power_mw": 60_000, "energy_mj": 5_000,
        "sample_period_us": 1000
    })
}

fn two_cards() -> Value {
    json!({ "driver_version": "550.54.15", "cards": [card_a(), card_b()] })
}

fn ok(reading: &CardReading) -> &CardSample {
    match reading {
        CardReading::Ok(s) => s,
        other => panic!("expected a good reading, got {other:?}"),
    }
}

/// Reads after the fake's next sample tick, so every buffer has something new.
fn read_fresh(source: &mut NvmlSource) -> Vec<CardReading> {
    std::thread::sleep(Duration::from_millis(5));
    source.read(now_ms())
}

#[test]
fn inventory_is_exact() {
    let fake = Fake::new(&two_cards());
    let mut source = fake.open();
    let inventory = source.inventory().unwrap();
    assert_eq!(
        inventory,
        Inventory {
            driver_version: Some("550.54.15".into()),
            cards: vec![
                CardInfo {
                    uuid: UUID_A.into(),
                    index: 0,
                    name: "NVIDIA H100 80GB HBM3".into(),
                    serial: Some("1650123456789".into()),
                    pci_bus_id: Some("00000000:17:00.0".into()),
                    memory_total_bytes: Some(85_899_345_920),
                    mig_enabled: Some(false),
                    mig: None,
                },
                CardInfo {
                    uuid: UUID_B.into(),
                    index: 1,
                    name: "NVIDIA A100-SXM4-40GB".into(),
                    // No serial number on this card: absent, not empty.
                    serial: None,
                    pci_bus_id: Some("00000000:65:00.0".into()),
                    memory_total_bytes: Some(42_949_672_960),
                    // No MIG on this card: absent, not "off".
                    mig_enabled: None,
                    mig: None,
                },
            ],
        }
    );
}

#[test]
fn every_field_is_read_exactly() {
    let fake = Fake::new(&two_cards());
    let mut source = fake.open();
    let readings = read_fresh(&mut source);
    assert_eq!(readings.len(), 2);
    let a = ok(&readings[0]);
    assert_eq!(
        *a,
        CardSample {
            uuid: UUID_A.into(),
            util_pct: Some(40.0),
            mem_util_pct: Some(20.0),
            util_source: Some(UtilSource::Samples),
            memory_used_bytes: Some(1_073_741_824),
            memory_total_bytes: Some(85_899_345_920),
            energy_counter_mj: Some(123_456_789),
            power_mw: Some(300_000),
            temperature_c: Some(55),
            sm_clock_mhz: Some(1980),
            mem_clock_mhz: Some(2619),
            throttle_reasons: Some(4),
            ecc_corrected_total: Some(3),
            ecc_uncorrected_total: Some(1),
            processes: vec![
                GpuProcess {
                    pid: 4242,
                    used_memory_bytes: Some(524_288_000),
                    sm_util_pct: Some(35),
                    graphics: false,
                    accounting: None,
                    seen_in: ProcessSources {
                        list: true,
                        samples: true,
                        ..Default::default()
                    },
                },
                GpuProcess {
                    pid: 4343,
                    // The driver reports the memory as not available.
                    used_memory_bytes: None,
                    sm_util_pct: Some(5),
                    graphics: false,
                    accounting: None,
                    seen_in: ProcessSources {
                        list: true,
                        samples: true,
                        ..Default::default()
                    },
                },
                GpuProcess {
                    pid: 4444,
                    used_memory_bytes: Some(1_048_576),
                    // Supported, but no samples for it: it was idle.
                    sm_util_pct: Some(0),
                    graphics: true,
                    accounting: None,
                    seen_in: ProcessSources {
                        list: true,
                        ..Default::default()
                    },
                },
            ],
            processes_unknown: false,
            // The first read of a card reads its health counters too; this card has no
            // retired pages or remapped rows to report.
            health: Some(Box::new(HealthCounters {
                ecc_uncorrected_volatile: Some(1),
                ecc_uncorrected_aggregate: Some(1),
                mig_enabled: Some(false),
                ..HealthCounters::default()
            })),
        }
    );
    assert_eq!(ok(&readings[1]).uuid, UUID_B);
}

#[test]
fn utilization_from_samples_is_exact_and_nothing_is_read_twice() {
    let mut card = card_a();
    card["util_gpu"] = json!(77);
    card["util_mem"] = json!(33);
    // Buffered before the source opened: not ours.
    card["gpu_samples"] = json!([{ "ts_us": 1000, "value": 99 }]);
    card["mem_samples"] = json!([{ "ts_us": 1000, "value": 99 }]);
    let fake = Fake::new(&json!({ "cards": [card] }));
    let mut source = fake.open();

    card["gpu_samples"] = json!([
        { "ts_us": 1000, "value": 99 },
        { "ts_us": 2000, "value": 20 },
        { "ts_us": 3000, "value": 60 },
        { "ts_us": 4000, "value": 31 }
    ]);
    card["mem_samples"] = json!([
        { "ts_us": 1000, "value": 99 },
        { "ts_us": 2500, "value": 10 },
        { "ts_us": 3500, "value": 15 }
    ]);
    fake.set(&json!({ "cards": [card] }));
    let first = source.read(now_ms());
    let s = ok(&first[0]);
    assert_eq!(s.util_pct, Some(37.0)); // (20 + 60 + 31) / 3
    assert_eq!(s.mem_util_pct, Some(12.5)); // (10 + 15) / 2
    assert_eq!(s.util_source, Some(UtilSource::Samples));

    // Nothing new in the buffers: the instantaneous rates stand in.
    let second = source.read(now_ms());
    let s = ok(&second[0]);
    assert_eq!(s.util_pct, Some(77.0));
    assert_eq!(s.mem_util_pct, Some(33.0));
    assert_eq!(s.util_source, Some(UtilSource::Rates));

    // Only what is newer than the last read counts.
    card["gpu_samples"] = json!([
        { "ts_us": 3000, "value": 60 },
        { "ts_us": 4000, "value": 31 },
        { "ts_us": 5000, "value": 90 }
    ]);
    fake.set(&json!({ "cards": [card] }));
    let third = source.read(now_ms());
    let s = ok(&third[0]);
    assert_eq!(s.util_pct, Some(90.0));
    assert_eq!(s.util_source, Some(UtilSource::Samples));
    assert_eq!(s.mem_util_pct, Some(33.0), "no new memory samples: rates");
}

#[test]
fn rates_stand_in_when_samples_are_not_supported() {
    let mut card = card_a();
    card["samples_supported"] = json!(false);
    card["util_gpu"] = json!(64);
    card["util_mem"] = json!(16);
    let fake = Fake::new(&json!({ "cards": [card] }));
    let mut source = fake.open();
    let readings = read_fresh(&mut source);
    let s = ok(&readings[0]);
    assert_eq!(s.util_pct, Some(64.0));
    assert_eq!(s.mem_util_pct, Some(16.0));
    assert_eq!(s.util_source, Some(UtilSource::Rates));
}

#[test]
fn unsupported_and_failing_fields_are_absent_not_zero() {
    let mut a = card_a();
    a["not_supported"] = json!([
        "samples",
        "utilization",
        "process_utilization",
        "energy",
        "power",
        "temperature",
        "clocks",
        "throttle",
        "ecc"
    ]);
    let mut b = card_b();
    b["failing_calls"] = json!(["nvmlDeviceGetMemoryInfo_v2", "nvmlDeviceGetPowerUsage"]);
    let fake = Fake::new(&json!({ "cards": [a, b] }));
    let mut source = fake.open();
    let readings = read_fresh(&mut source);

    let a = ok(&readings[0]);
    assert_eq!(a.util_pct, None);
    assert_eq!(a.mem_util_pct, None);
    assert_eq!(a.util_source, None);
    assert_eq!(a.energy_counter_mj, None);
    assert_eq!(a.power_mw, None);
    assert_eq!(a.temperature_c, None);
    assert_eq!(a.sm_clock_mhz, None);
    assert_eq!(a.mem_clock_mhz, None);
    assert_eq!(a.throttle_reasons, None);
    assert_eq!(a.ecc_corrected_total, None);
    assert_eq!(a.ecc_uncorrected_total, None);
    // What is supported still comes through.
    assert_eq!(a.memory_used_bytes, Some(1_073_741_824));
    assert_eq!(a.processes.len(), 3);
    assert!(a.processes.iter().all(|p| p.sm_util_pct.is_none()));

    let b = ok(&readings[1]);
    assert_eq!(b.memory_used_bytes, None);
    assert_eq!(b.memory_total_bytes, None);
    assert_eq!(b.power_mw, None);
    assert_eq!(b.energy_counter_mj, Some(5_000));
}

#[test]
fn energy_counter_follows_power_over_time() {
    let at = now_ms() - 10_000;
    let mut card = card_b();
    card["energy_at_ms"] = json!(at);
    let fake = Fake::new(&json!({ "cards": [card] }));
    let mut source = fake.open();
    let before = now_ms();
    let readings = source.read(now_ms());
    let after = now_ms();
    let energy = ok(&readings[0]).energy_counter_mj.unwrap();
    // 60 W for (now - at) ms, on top of the 5 J base.
    let low = 5_000 + u64::try_from(60 * (before - at)).unwrap();
    let high = 5_000 + u64::try_from(60 * (after - at)).unwrap();
    assert!(
        (low..=high).contains(&energy),
        "{energy} not in {low}..={high}"
    );
}

#[test]
fn a_lost_card_does_not_stop_the_others_and_is_reported_once() {
    let fake = Fake::new(&two_cards());
    let mut source = fake.open();
    assert!(
        source
            .read(now_ms())
            .iter()
            .all(|r| matches!(r, CardReading::Ok(_)))
    );

    let mut lost = card_b();
    lost["lost"] = json!(true);
    fake.set(&json!({ "cards": [card_a(), lost] }));
    for _ in 0..3 {
        let readings = read_fresh(&mut source);
        assert_eq!(ok(&readings[0]).power_mw, Some(300_000));
        assert!(
            matches!(&readings[1], CardReading::Lost { uuid, .. } if uuid == UUID_B),
            "{:?}",
            readings[1]
        );
    }
    let events = source.drain_events();
    let kinds: Vec<_> = events.iter().map(|e| (e.uuid.as_str(), &e.kind)).collect();
    assert_eq!(kinds, vec![(UUID_B, &GpuEventKind::Lost)]);

    fake.set(&two_cards());
    let readings = read_fresh(&mut source);
    assert_eq!(ok(&readings[1]).power_mw, Some(60_000));
    let events = source.drain_events();
    let kinds: Vec<_> = events.iter().map(|e| (e.uuid.as_str(), &e.kind)).collect();
    assert_eq!(kinds, vec![(UUID_B, &GpuEventKind::Recovered)]);
}

/// Drains events until `want` have come or `limit` passes.
fn collect_events(
    source: &mut NvmlSource,
    want: usize,
    limit: Duration,
) -> Vec<(String, GpuEventKind)> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        got.extend(source.drain_events().into_iter().map(|e| (e.uuid, e.kind)));
        std::thread::sleep(Duration::from_millis(20));
    }
    got
}

#[test]
fn every_xid_and_ecc_occurrence_is_counted_once() {
    let fake = Fake::new(&two_cards());
    let mut source = fake.open();

    let mut a = card_a();
    a["xid_events"] =
        json!([{ "code": 79, "seq": 1 }, { "code": 79, "seq": 2 }, { "code": 13, "seq": 1 }]);
    a["ecc_events"] = json!([{ "double_bit": true, "seq": 1 }]);
    let mut b = card_b();
    b["xid_events"] = json!([{ "code": 48, "seq": 1 }]);
    b["ecc_events"] = json!([{ "seq": 1 }, { "seq": 2 }]);
    let scenario = json!({ "cards": [a, b] });
    fake.set(&scenario);

    let got = collect_events(&mut source, 7, Duration::from_secs(10));
    // GpuEventKind is not Hash/Ord: count by its debug form.
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (uuid, kind) in got {
        *counts.entry((uuid, format!("{kind:?}"))).or_default() += 1;
    }
    let expected: BTreeMap<(String, String), usize> = [
        (UUID_A, GpuEventKind::Xid(79), 2),
        (UUID_A, GpuEventKind::Xid(13), 1),
        (UUID_A, GpuEventKind::EccDoubleBit, 1),
        (UUID_B, GpuEventKind::Xid(48), 1),
        (UUID_B, GpuEventKind::EccSingleBit, 2),
    ]
    .into_iter()
    .map(|(uuid, kind, n)| ((uuid.to_owned(), format!("{kind:?}")), n))
    .collect();
    assert_eq!(counts, expected);

    // Rewriting the same scenario delivers nothing again.
    fake.set(&scenario);
    let again = collect_events(&mut source, 1, Duration::from_millis(1500));
    assert!(again.is_empty(), "delivered twice: {again:?}");
}

#[test]
fn a_scenario_change_is_seen_on_the_next_read() {
    let fake = Fake::new(&json!({ "cards": [card_a()] }));
    let mut source = fake.open();
    assert_eq!(ok(&source.read(now_ms())[0]).temperature_c, Some(55));

    let mut hot = card_a();
    hot["temperature_c"] = json!(91);
    hot["throttle_reasons"] = json!(0x48);
    fake.set(&json!({ "cards": [hot, card_b()] }));
    let readings = source.read(now_ms());
    assert_eq!(
        readings.len(),
        1,
        "a new card is read once the inventory knows it"
    );
    assert_eq!(ok(&readings[0]).temperature_c, Some(91));
    assert_eq!(ok(&readings[0]).throttle_reasons, Some(0x48));

    assert_eq!(source.inventory().unwrap().cards.len(), 2);
    let readings = source.read(now_ms());
    assert_eq!(ok(&readings[1]).uuid, UUID_B);
}

#[test]
fn compute_mode_is_set_and_restored() {
    let fake = Fake::new(&two_cards());
    let mut source = fake.open();
    source.set_compute_prohibited(UUID_B, true).unwrap();
    let report = probe(Some(&fake.lib()), true).unwrap();
    let report: Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        report["cards"][0]["fields"]["compute_mode"]["detail"],
        "default"
    );
    assert_eq!(
        report["cards"][1]["fields"]["compute_mode"]["detail"],
        "prohibited"
    );

    source.set_compute_prohibited(UUID_B, false).unwrap();
    let report: Value = serde_json::from_str(&probe(Some(&fake.lib()), true).unwrap()).unwrap();
    assert_eq!(
        report["cards"][1]["fields"]["compute_mode"]["detail"],
        "default"
    );

    let err = source.set_compute_prohibited("GPU-nope", true).unwrap_err();
    assert!(err.to_string().contains("GPU-nope"), "{err}");
}

#[test]
fn a_missing_library_names_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nowhere").join("libnvidia-ml.so.1");
    let err = NvmlSource::open(Some(&path)).err().unwrap();
    assert!(matches!(err, GpuError::LibraryLoad { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );

    let err = probe(Some(&path), false).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn no_driver_is_a_clear_error() {
    let fake = Fake::without_driver();
    let err = NvmlSource::open(Some(&fake.lib())).err().unwrap();
    assert!(
        matches!(
            err,
            GpuError::Call {
                call: "nvmlInit_v2",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("driver is not loaded"), "{err}");

    let err = probe(Some(&fake.lib()), false).unwrap_err();
    assert!(err.to_string().contains("driver is not loaded"), "{err}");
}

#[test]
fn probe_lists_the_cards_and_what_they_support() {
    let mut b = card_b();
    b["not_supported"] = json!(["power", "ecc", "accounting"]);
    let fake = Fake::new(&json!({ "driver_version": "550.54.15", "cards": [card_a(), b] }));

    let text = probe(Some(&fake.lib()), false).unwrap();
    assert!(text.contains("driver 550.54.15"), "{text}");
    assert!(
        text.contains(&format!("GPU 0: NVIDIA H100 80GB HBM3 (UUID: {UUID_A})")),
        "{text}"
    );
    assert!(
        text.contains(&format!("GPU 1: NVIDIA A100-SXM4-40GB (UUID: {UUID_B})")),
        "{text}"
    );
    let card_b_text = text.split("GPU 1:").nth(1).unwrap();
    let line = |field: &str| {
        card_b_text
            .lines()
            .find(|l| l.trim_start().starts_with(field))
            .unwrap_or_else(|| panic!("no {field} line in {text}"))
            .to_owned()
    };
    let words = |field: &str| {
        line(field)
            .split_whitespace()
            .skip(field.split(' ').count())
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(words("power"), "no", "{text}");
    assert_eq!(words("energy"), "yes 5000 mJ", "{text}");
    assert_eq!(words("events"), "yes xid", "{text}");
    assert_eq!(
        words("utilization rates"),
        "yes gpu 0%, memory 0%",
        "{text}"
    );

    let json: Value = serde_json::from_str(&probe(Some(&fake.lib()), true).unwrap()).unwrap();
    let cards = json["cards"].as_array().unwrap();
    assert_eq!(cards.len(), 2);
    assert_eq!(cards[0]["uuid"], UUID_A);
    assert_eq!(cards[0]["fields"]["power"]["supported"], true);
    assert_eq!(cards[0]["fields"]["utilization_samples"]["supported"], true);
    assert_eq!(cards[1]["fields"]["power"]["supported"], false);
    assert_eq!(cards[1]["fields"]["ecc"]["supported"], false);
    assert_eq!(cards[1]["fields"]["accounting"]["supported"], false);
    assert_eq!(cards[0]["fields"]["accounting"]["detail"], "disabled");
}

/// Processes with accounting records, for the accounting tests. Utilization samples per process
/// are off on card A, on on card B.
fn accounting_scenario(mode: bool) -> Value {
    let mut a = card_a();
    a["not_supported"] = json!(["process_utilization"]);
    a["accounting_mode"] = json!(mode);
    a["processes"] = json!([
        { "pid": 4242, "used_memory": 524_288_000u64, "sm_util": 35,
          "accounting": { "gpu_util": 61, "mem_util": 12, "max_memory": 629_145_600u64,
                          "time_ms": 0, "start_time_us": 1_780_000_000_123_456u64 } },
        // Every value unavailable but the (finished-context) time.
        { "pid": 4343, "accounting": { "time_ms": 1500, "start_time_us": 1_780_000_001_000_000u64 } },
        // No record: NOT_FOUND.
        { "pid": 4444, "used_memory": 1_048_576u64, "graphics": true },
        // A record of an earlier process that had this pid and has ended.
        { "pid": 4545, "accounting": { "gpu_util": 99, "running": false } }
    ]);
    let mut b = card_b();
    b["accounting_mode"] = json!(mode);
    b["processes"] = json!([
        { "pid": 5151, "sm_util": 35,
          "accounting": { "gpu_util": 61, "mem_util": 12, "max_memory": 1024 } }
    ]);
    json!({ "cards": [a, b] })
}

fn accounting_detail(fake: &Fake, card: usize) -> Value {
    let report: Value = serde_json::from_str(&probe(Some(&fake.lib()), true).unwrap()).unwrap();
    report["cards"][card]["fields"]["accounting"]["detail"].clone()
}

#[test]
fn accounting_stats_stand_in_for_process_samples_where_the_operator_enabled_them() {
    let fake = Fake::new(&accounting_scenario(true));
    let mut source = fake.open();
    let readings = read_fresh(&mut source);
    let a = ok(&readings[0]);
    assert_eq!(
        a.processes,
        vec![
            GpuProcess {
                pid: 4242,
                used_memory_bytes: Some(524_288_000),
                // No per-process samples on this card: the accounting figure.
                sm_util_pct: Some(61),
                graphics: false,
                accounting: Some(ProcessAccounting {
                    gpu_util_pct: Some(61),
                    mem_util_pct: Some(12),
                    max_memory_bytes: Some(629_145_600),
                    // Reported as 0 while the process runs: not known yet.
                    time_ms: None,
                    start_time_us: Some(1_780_000_000_123_456),
                    running: true,
                }),
                seen_in: ProcessSources {
                    list: true,
                    accounting: true,
                    ..Default::default()
                },
            },
            GpuProcess {
                pid: 4343,
                used_memory_bytes: None,
                sm_util_pct: None,
                graphics: false,
                accounting: Some(ProcessAccounting {
                    gpu_util_pct: None,
                    mem_util_pct: None,
                    max_memory_bytes: None,
                    time_ms: Some(1500),
                    start_time_us: Some(1_780_000_001_000_000),
                    running: true,
                }),
                seen_in: ProcessSources {
                    list: true,
                    accounting: true,
                    ..Default::default()
                },
            },
            // Compute processes first, then graphics.
            GpuProcess {
                pid: 4545,
                used_memory_bytes: None,
                // The ended process's record is not this process's.
                sm_util_pct: None,
                graphics: false,
                accounting: None,
                seen_in: ProcessSources {
                    list: true,
                    ..Default::default()
                },
            },
            GpuProcess {
                pid: 4444,
                used_memory_bytes: Some(1_048_576),
                sm_util_pct: None,
                graphics: true,
                accounting: None,
                seen_in: ProcessSources {
                    list: true,
                    ..Default::default()
                },
            },
        ]
    );
    // Where the sample buffer has a figure for this read, it wins over the lifetime average.
    let b = ok(&readings[1]);
    assert_eq!(b.processes.len(), 1);
    assert_eq!(b.processes[0].sm_util_pct, Some(35));
    assert_eq!(
        b.processes[0].accounting,
        Some(ProcessAccounting {
            gpu_util_pct: Some(61),
            mem_util_pct: Some(12),
            max_memory_bytes: Some(1024),
            time_ms: None,
            start_time_us: None,
            running: true,
        })
    );
}

#[test]
fn accounting_disabled_is_read_as_absent_and_never_enabled() {
    let fake = Fake::new(&accounting_scenario(false));
    let mut source = fake.open();
    for _ in 0..2 {
        let readings = read_fresh(&mut source);
        for reading in &readings {
            for p in &ok(reading).processes {
                assert_eq!(p.accounting, None, "pid {}", p.pid);
            }
        }
        let a = ok(&readings[0]);
        // No process samples and no accounting on card A: absent, not zero.
        assert!(a.processes.iter().all(|p| p.sm_util_pct.is_none()), "{a:?}");
        assert_eq!(ok(&readings[1]).processes[0].sm_util_pct, Some(35));
    }
    // The fake keeps what nvmlDeviceSetAccountingMode set; the source set nothing.
    assert_eq!(accounting_detail(&fake, 0), "disabled");
    assert_eq!(accounting_detail(&fake, 1), "disabled");

    // The operator turns it on: the mode is asked with the health counters, every tenth read,
    // so the records are picked up within ten reads, with no restart.
    fake.set(&accounting_scenario(true));
    assert_eq!(accounting_detail(&fake, 0), "enabled");
    let picked_up = (1..=10).find(|_| {
        let readings = read_fresh(&mut source);
        ok(&readings[0]).processes[0].sm_util_pct == Some(61)
    });
    assert!(
        picked_up.is_some(),
        "accounting records not read within ten reads"
    );
}

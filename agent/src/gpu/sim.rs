//! Simulated cards driven by a scenario: utilization, processes and power as piecewise-constant
//! phases over time, lost spans with their XID. Replayable: it answers for any instant, so a
//! demo or test can run faster than real time and still know the exact ground truth.
//!
//! A read at slot `t` reports the state at `t - 1 ms` (the interval that just ended), matching
//! the window convention of [`crate::window`]. Energy is the integral of power since `t0`.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::{
    CardInfo, CardReading, CardSample, GpuError, GpuEvent, GpuEventKind, GpuProcess, GpuSource,
    Inventory, ProcessSources, UtilSource,
};
use crate::attribution::{Identity, ProcessIdentity, TableAttributor};
use crate::clock::UnixMs;

/// A whole simulated server.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default = "default_driver")]
    pub driver_version: String,
    pub cards: Vec<SimCard>,
}

fn default_driver() -> String {
    "580.00-sim".into()
}

fn default_idle_w() -> u32 {
    60
}

fn default_max_w() -> u32 {
    700
}

fn default_mem_total() -> u64 {
    80 * (1 << 30)
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimCard {
    pub uuid: String,
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default = "default_mem_total")]
    pub memory_total_bytes: u64,
    /// Power at 0% and 100% utilization; power is linear in between (integer mW).
    #[serde(default = "default_idle_w")]
    pub idle_power_w: u32,
    #[serde(default = "default_max_w")]
    pub max_power_w: u32,
    /// Phases, by seconds since `t0`; outside every phase the card is idle with no process.
    #[serde(default)]
    pub phases: Vec<Phase>,
    /// Spans in which the card is lost (an XID 79 is raised at each span's start).
    #[serde(default)]
    pub lost: Vec<Span>,
}

fn default_name() -> String {
    "NVIDIA H100 80GB HBM3 (simulated)".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Span {
    pub from_s: u64,
    pub until_s: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub from_s: u64,
    /// Exclusive; absent means forever.
    pub until_s: Option<u64>,
    pub util_pct: u32,
    pub mem_util_pct: Option<u32>,
    #[serde(default)]
    pub memory_used_bytes: u64,
    #[serde(default)]
    pub processes: Vec<SimProcess>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimProcess {
    pub pid: u32,
    pub uid: u32,
    pub user: Option<String>,
    pub gid: Option<u32>,
    pub group: Option<String>,
    pub cgroup: Option<String>,
    pub sm_util_pct: Option<u32>,
    #[serde(default)]
    pub memory_bytes: u64,
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Self, GpuError> {
        let err = |reason: String| GpuError::Scenario {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let s: Scenario = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        s.validate().map_err(err)?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.cards.iter().enumerate() {
            if c.uuid.is_empty() {
                return Err(format!("cards[{i}].uuid is empty"));
            }
            if !seen.insert(&c.uuid) {
                return Err(format!("cards[{i}].uuid {} appears twice", c.uuid));
            }
            if c.max_power_w < c.idle_power_w {
                return Err(format!("cards[{i}].max_power_w is below idle_power_w"));
            }
            for (j, p) in c.phases.iter().enumerate() {
                if p.util_pct > 100 {
                    return Err(format!("cards[{i}].phases[{j}].util_pct is over 100"));
                }
                if p.until_s.is_some_and(|u| u <= p.from_s) {
                    return Err(format!(
                        "cards[{i}].phases[{j}].until_s is not after from_s"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The pid → identity table of every simulated process.
    pub fn attributor(&self) -> TableAttributor {
        let mut table = HashMap::new();
        for c in &self.cards {
            for ph in &c.phases {
                for p in &ph.processes {
                    table.insert(
                        p.pid,
                        Identity::from_parts(ProcessIdentity {
                            uid: Some(p.uid),
                            gid: p.gid,
                            user: p.user.clone(),
                            group: p.group.clone(),
                            supplementary_gids: vec![],
                            supplementary_groups: vec![],
                            cgroup: p.cgroup.clone(),
                        }),
                    );
                }
            }
        }
        TableAttributor { table }
    }
}

impl SimCard {
    /// The phase in force at `ms` since t0.
    pub fn phase_at(&self, ms: i64) -> Option<&Phase> {
        self.phases.iter().find(|p| {
            let from = p.from_s as i64 * 1000;
            ms >= from && p.until_s.is_none_or(|u| ms < u as i64 * 1000)
        })
    }

    pub fn lost_at(&self, ms: i64) -> bool {
        self.lost
            .iter()
            .any(|s| ms >= s.from_s as i64 * 1000 && ms < s.until_s as i64 * 1000)
    }

    /// Power draw in mW at `ms` since t0.
    pub fn power_mw_at(&self, ms: i64) -> u64 {
        let util = self.phase_at(ms).map_or(0, |p| u64::from(p.util_pct));
        let idle = u64::from(self.idle_power_w) * 1000;
        let max = u64::from(self.max_power_w) * 1000;
        idle + (max - idle) * util / 100
    }

    /// Energy counter in mJ at `ms` since t0: the exact integral of power (floored).
    pub fn energy_mj_at(&self, ms: i64) -> u64 {
        if ms <= 0 {
            return 0;
        }
        // Breakpoints where power can change.
        let mut points: Vec<i64> = vec![0, ms];
        for p in &self.phases {
            points.push(p.from_s as i64 * 1000);
            if let Some(u) = p.until_s {
                points.push(u as i64 * 1000);
            }
        }
        points.retain(|&x| (0..=ms).contains(&x));
        points.sort_unstable();
        points.dedup();
        let micro_j: u128 = points
            .windows(2)
            .map(|w| u128::from(self.power_mw_at(w[0])) * (w[1] - w[0]) as u128)
            .sum();
        (micro_j / 1000) as u64
    }
}

/// A [`GpuSource`] over a [`Scenario`], with time measured from `t0`.
#[derive(Debug)]
pub struct SimSource {
    scenario: Scenario,
    t0: UnixMs,
    last_read: Option<UnixMs>,
    events: Vec<GpuEvent>,
    was_lost: HashMap<String, bool>,
}

impl SimSource {
    pub fn new(scenario: Scenario, t0: UnixMs) -> Self {
        Self {
            scenario,
            t0,
            last_read: None,
            events: Vec::new(),
            was_lost: HashMap::new(),
        }
    }

    pub fn scenario(&self) -> &Scenario {
        &self.scenario
    }
}

impl GpuSource for SimSource {
    fn inventory(&mut self) -> Result<Inventory, GpuError> {
        Ok(Inventory {
            driver_version: Some(self.scenario.driver_version.clone()),
            cards: self
                .scenario
                .cards
                .iter()
                .enumerate()
                .map(|(i, c)| CardInfo {
                    uuid: c.uuid.clone(),
                    index: i as u32,
                    name: c.name.clone(),
                    serial: Some(format!("SIM{i:08}")),
                    pci_bus_id: Some(format!("00000000:{:02X}:00.0", 0x10 + i)),
                    memory_total_bytes: Some(c.memory_total_bytes),
                    mig_enabled: Some(false),
                    mig: None,
                })
                .collect(),
        })
    }

    fn read(&mut self, at_ms: i64) -> Vec<CardReading> {
        let t = at_ms - self.t0;
        let state_t = t - 1;
        let mut out = Vec::with_capacity(self.scenario.cards.len());
        for c in &self.scenario.cards {
            // XID 79 for each lost span that started since the previous read.
            let prev = self.last_read.map(|p| p - self.t0);
            for span in &c.lost {
                let s = span.from_s as i64 * 1000;
                if prev.is_none_or(|p| s > p - 1) && s <= state_t {
                    self.events.push(GpuEvent {
                        uuid: c.uuid.clone(),
                        at_ms: self.t0 + s,
                        kind: GpuEventKind::Xid(79),
                    });
                }
            }
            let lost = c.lost_at(state_t);
            let was = self.was_lost.insert(c.uuid.clone(), lost).unwrap_or(false);
            if was != lost {
                self.events.push(GpuEvent {
                    uuid: c.uuid.clone(),
                    at_ms,
                    kind: if lost {
                        GpuEventKind::Lost
                    } else {
                        GpuEventKind::Recovered
                    },
                });
            }
            if lost {
                out.push(CardReading::Lost {
                    uuid: c.uuid.clone(),
                    reason: "simulated: GPU is lost".into(),
                });
                continue;
            }
            let phase = c.phase_at(state_t);
            let util = phase.map_or(0, |p| p.util_pct);
            out.push(CardReading::Ok(CardSample {
                uuid: c.uuid.clone(),
                util_pct: Some(f64::from(util)),
                mem_util_pct: Some(f64::from(
                    phase.and_then(|p| p.mem_util_pct).unwrap_or(util / 2),
                )),
                util_source: Some(UtilSource::Simulated),
                memory_used_bytes: Some(phase.map_or(0, |p| p.memory_used_bytes)),
                memory_total_bytes: Some(c.memory_total_bytes),
                energy_counter_mj: Some(c.energy_mj_at(t)),
                power_mw: Some(c.power_mw_at(state_t) as u32),
                temperature_c: Some(35 + util / 2),
                sm_clock_mhz: Some(if util > 0 { 1980 } else { 345 }),
                mem_clock_mhz: Some(2619),
                throttle_reasons: Some(if util > 0 { 0 } else { 1 }),
                ecc_corrected_total: Some(0),
                ecc_uncorrected_total: Some(0),
                processes: phase
                    .map(|p| {
                        p.processes
                            .iter()
                            .map(|sp| GpuProcess {
                                pid: sp.pid,
                                used_memory_bytes: Some(sp.memory_bytes),
                                sm_util_pct: sp.sm_util_pct,
                                graphics: false,
                                accounting: None,
                                seen_in: ProcessSources {
                                    list: true,
                                    ..ProcessSources::default()
                                },
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                processes_unknown: false,
                health: None,
            }));
        }
        self.last_read = Some(at_ms);
        out
    }

    fn drain_events(&mut self) -> Vec<GpuEvent> {
        std::mem::take(&mut self.events)
    }

    fn replayable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCENARIO: &str = r#"
[[cards]]
uuid = "GPU-11111111-1111-1111-1111-111111111111"
idle_power_w = 100
max_power_w = 500
lost = [{ from_s = 100, until_s = 110 }]
[[cards.phases]]
from_s = 0
until_s = 60
util_pct = 50
processes = [{ pid = 10, uid = 1001, user = "alice", memory_bytes = 1024 }]
"#;

    #[test]
    fn energy_is_the_integral_of_power() {
        let s: Scenario = toml::from_str(SCENARIO).unwrap();
        let c = &s.cards[0];
        assert_eq!(c.power_mw_at(0), 300_000);
        assert_eq!(c.power_mw_at(60_000), 100_000);
        assert_eq!(c.energy_mj_at(60_000), 18_000_000);
        assert_eq!(c.energy_mj_at(70_000), 19_000_000);
    }

    #[test]
    fn reads_lost_spans_and_processes() {
        let s: Scenario = toml::from_str(SCENARIO).unwrap();
        let mut src = SimSource::new(s.clone(), 1_000_000);
        let r = src.read(1_000_000 + 1_000);
        let CardReading::Ok(sample) = &r[0] else {
            panic!("expected a reading, got {r:?}")
        };
        assert_eq!(sample.util_pct, Some(50.0));
        assert_eq!(sample.processes[0].pid, 10);
        assert!(matches!(
            src.read(1_000_000 + 101_000)[0],
            CardReading::Lost { .. }
        ));
        let ev = src.drain_events();
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[0].kind, GpuEventKind::Xid(79));
        assert_eq!(ev[0].at_ms, 1_100_000);
        assert_eq!(ev[1].kind, GpuEventKind::Lost);
        assert!(matches!(
            src.read(1_000_000 + 111_000)[0],
            CardReading::Ok(_)
        ));
        assert_eq!(src.drain_events()[0].kind, GpuEventKind::Recovered);
        assert!(src.read(1_000_000 + 112_000).len() == 1 && src.drain_events().is_empty());
        let who = s.attributor().table[&10].label();
        assert_eq!(who, "user:alice");
    }

    #[test]
    fn bad_scenarios_name_the_field() {
        let s: Scenario = toml::from_str(
            "[[cards]]\nuuid = \"GPU-x\"\n[[cards.phases]]\nfrom_s = 5\nuntil_s = 5\nutil_pct = 10\n",
        )
        .unwrap();
        assert_eq!(
            s.validate().unwrap_err(),
            "cards[0].phases[0].until_s is not after from_s"
        );
        assert!(toml::from_str::<Scenario>("[[cards]]\nuuid = \"a\"\nbogus = 1\n").is_err());
    }
}

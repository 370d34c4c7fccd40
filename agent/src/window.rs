//! The window aggregator: folds one card's samples into one summary per wall-clock window.
//!
//! Pure: no I/O, no clock. A sample taken at slot `t` describes the interval `(t - interval, t]`
//! (NVML's utilization and the energy delta both look backwards), so window `[W, W + window)`
//! holds the samples at `W + interval, ..., W + window`, and it closes with the sample at its
//! end. The first read of a card only sets the energy baseline. Energy is the sum of counter
//! deltas between consecutive good reads (a counter that goes backwards was reset: the delta
//! is the new value); without a counter it is estimated as power × interval and flagged. A
//! counter that did not move in the whole window while the card drew power (at least
//! [`DRAWING_POWER_MW`] in some sample) is frozen: the window's energy is then absent, not 0,
//! and `energy_estimated_mj` carries power × interval over its good samples beside it. (A
//! counter that moved at all in the window is trusted: a stall within a window is not seen.)

use std::collections::BTreeMap;

use crate::assignments::Status;
use crate::attribution::Identity;
use crate::clock::{UnixMs, align_down};
use crate::gpu::{CardSample, Unattributed};

/// Power (mW) at or above which a card is drawing power: an energy counter that stands still
/// through a window at this power is frozen.
pub const DRAWING_POWER_MW: u32 = 1_000;

/// Sampling and window lengths; `window_ms` is a multiple of `interval_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub interval_ms: u64,
    pub window_ms: u64,
}

impl Periods {
    pub fn samples_per_window(&self) -> u32 {
        (self.window_ms / self.interval_ms.max(1)) as u32
    }

    /// Start of the window a sample at slot `t` belongs to.
    pub fn window_of(&self, slot: UnixMs) -> UnixMs {
        align_down(slot - 1, self.window_ms)
    }
}

/// A GPU process with its owner and whether the owner may use this card.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributedProcess {
    pub pid: u32,
    /// `None` when the process could not be read (gone, or not visible to the agent).
    pub identity: Option<Identity>,
    pub used_memory_bytes: Option<u64>,
    pub sm_util_pct: Option<u32>,
    pub matches_grant: bool,
}

impl AttributedProcess {
    pub fn label(&self) -> String {
        self.identity
            .as_ref()
            .map(Identity::label)
            .unwrap_or_else(|| "unknown".into())
    }
}

/// The assignment the agent applied to the card at a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub status: Status,
    pub grant_id: String,
    pub principal: String,
    pub version: u64,
}

impl Default for Applied {
    fn default() -> Self {
        Self {
            status: Status::Unassigned,
            grant_id: String::new(),
            principal: String::new(),
            version: 0,
        }
    }
}

/// What one slot gave for one card.
#[derive(Debug, Clone, PartialEq)]
pub enum SlotOutcome {
    Good {
        sample: Box<CardSample>,
        procs: Vec<AttributedProcess>,
    },
    /// The card was lost: metered, but not available.
    Lost,
    /// The read failed: not metered.
    Failed,
    /// The sampler did not get to this slot (it ran late).
    Missed,
}

/// Health over a window, worst first wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Ok,
    Degraded,
    Lost,
}

/// One principal's use of a card over a window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PrincipalWindow {
    pub principal: String,
    pub identity: Option<Identity>,
    pub occupied_ms: u64,
    pub active_ms: u64,
    pub memory_max_bytes: u64,
    pub process_count: u32,
    pub matches_grant: bool,
}

/// One card over one window: the figures of DESIGN.md §3.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSummary {
    pub gpu_uuid: String,
    pub start_ms: UnixMs,
    pub end_ms: UnixMs,
    pub interval_ms: u64,
    pub expected_samples: u32,
    pub good_samples: u32,
    pub util_avg_pct: Option<f64>,
    pub util_max_pct: Option<f64>,
    pub mem_util_avg_pct: Option<f64>,
    pub memory_used_max_bytes: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub energy_mj: Option<u64>,
    pub energy_estimated: bool,
    /// Power × interval over the good samples, where the energy counter was frozen (and
    /// `energy_mj` is absent for it).
    pub energy_estimated_mj: Option<u64>,
    pub power_avg_w: Option<f64>,
    pub temperature_max_c: Option<u32>,
    pub sm_clock_max_mhz: Option<u32>,
    pub mem_clock_max_mhz: Option<u32>,
    pub throttle_reasons: Option<u64>,
    pub ecc_corrected_total: Option<u64>,
    pub ecc_uncorrected_total: Option<u64>,
    pub health: Health,
    pub unavailable_ms: u64,
    pub assignment: Applied,
    pub principals: Vec<PrincipalWindow>,
    pub active_ms: u64,
    pub occupied_ms: u64,
    pub foreign_ms: u64,
    /// Time in which at least one process matching the applied grant was on the card: the
    /// union over the grantee's principals, which their per-principal rows cannot give.
    pub grantee_occupied_ms: u64,
    /// Time (good samples × interval) in which the card was used but no process could be seen
    /// ([`Unattributed`]): neither idle nor anyone's occupied time.
    pub unattributed_ms: u64,
}

#[derive(Debug, Default)]
struct Mean {
    sum: f64,
    n: u32,
}

impl Mean {
    fn add(&mut self, v: Option<f64>) {
        if let Some(v) = v {
            self.sum += v;
            self.n += 1;
        }
    }
    fn get(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / f64::from(self.n))
    }
}

fn max_opt<T: PartialOrd + Copy>(acc: &mut Option<T>, v: Option<T>) {
    if let Some(v) = v {
        match acc {
            Some(a) if *a >= v => {}
            _ => *acc = Some(v),
        }
    }
}

#[derive(Debug, Default)]
struct PrincipalAcc {
    identity: Option<Identity>,
    occupied_samples: u32,
    active_ms: f64,
    memory_max: u64,
    process_count: u32,
    matches: bool,
}

#[derive(Debug)]
struct Acc {
    /// Start of the aligned window the slots belong to.
    start: UnixMs,
    /// First and last slot folded in: a window the agent started or stopped inside covers
    /// only the time it sampled.
    first_slot: UnixMs,
    last_slot: UnixMs,
    expected: u32,
    good: u32,
    util: Mean,
    util_max: Option<f64>,
    mem_util: Mean,
    mem_used_max: Option<u64>,
    mem_total: Option<u64>,
    energy_mj: Option<u64>,
    energy_estimated: bool,
    /// Counter deltas taken in the window, whether one of them moved, and power × interval
    /// over the good samples, for judging a frozen counter.
    energy_deltas: u32,
    energy_moved: bool,
    drawing_power: bool,
    power_integral_mj: u64,
    power: Mean,
    temp_max: Option<u32>,
    sm_clock_max: Option<u32>,
    mem_clock_max: Option<u32>,
    throttle: Option<u64>,
    ecc_corr: Option<u64>,
    ecc_uncorr: Option<u64>,
    health: Health,
    unavailable_samples: u32,
    occupied_samples: u32,
    foreign_samples: u32,
    grantee_samples: u32,
    unattributed_samples: u32,
    principals: BTreeMap<String, PrincipalAcc>,
    applied: Applied,
}

impl Acc {
    fn new(start: UnixMs, slot: UnixMs) -> Self {
        Self {
            start,
            first_slot: slot,
            last_slot: slot,
            expected: 0,
            good: 0,
            util: Mean::default(),
            util_max: None,
            mem_util: Mean::default(),
            mem_used_max: None,
            mem_total: None,
            energy_mj: None,
            energy_estimated: false,
            energy_deltas: 0,
            energy_moved: false,
            drawing_power: false,
            power_integral_mj: 0,
            power: Mean::default(),
            temp_max: None,
            sm_clock_max: None,
            mem_clock_max: None,
            throttle: None,
            ecc_corr: None,
            ecc_uncorr: None,
            health: Health::Ok,
            unavailable_samples: 0,
            occupied_samples: 0,
            foreign_samples: 0,
            grantee_samples: 0,
            unattributed_samples: 0,
            principals: BTreeMap::new(),
            applied: Applied::default(),
        }
    }
}

/// Folds one card's slots into windows.
#[derive(Debug)]
pub struct CardAggregator {
    uuid: String,
    periods: Periods,
    acc: Option<Acc>,
    last_energy: Option<u64>,
}

impl CardAggregator {
    pub fn new(uuid: &str, periods: Periods) -> Self {
        Self {
            uuid: uuid.to_string(),
            periods,
            acc: None,
            last_energy: None,
        }
    }

    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The read that starts metering: sets the energy baseline, counts nothing.
    pub fn prime(&mut self, sample: Option<&CardSample>) {
        self.last_energy = sample.and_then(|s| s.energy_counter_mj);
    }

    /// Adds the slot at `slot` (an aligned sample time). Returns the window it closes, if any;
    /// a slot that belongs to a later window first closes the open one.
    pub fn push(
        &mut self,
        slot: UnixMs,
        outcome: SlotOutcome,
        applied: &Applied,
    ) -> Vec<WindowSummary> {
        let mut closed = Vec::new();
        let start = self.periods.window_of(slot);
        if self.acc.as_ref().is_some_and(|a| a.start != start) {
            closed.extend(self.close());
        }
        let interval = self.periods.interval_ms;
        let acc = self.acc.get_or_insert_with(|| Acc::new(start, slot));
        acc.last_slot = slot;
        acc.expected += 1;
        acc.applied = applied.clone();
        match outcome {
            SlotOutcome::Good { sample, procs } => {
                acc.good += 1;
                acc.util.add(sample.util_pct);
                max_opt(&mut acc.util_max, sample.util_pct);
                acc.mem_util.add(sample.mem_util_pct);
                max_opt(&mut acc.mem_used_max, sample.memory_used_bytes);
                if sample.memory_total_bytes.is_some() {
                    acc.mem_total = sample.memory_total_bytes;
                }
                acc.power
                    .add(sample.power_mw.map(|p| f64::from(p) / 1000.0));
                max_opt(&mut acc.temp_max, sample.temperature_c);
                max_opt(&mut acc.sm_clock_max, sample.sm_clock_mhz);
                max_opt(&mut acc.mem_clock_max, sample.mem_clock_mhz);
                if let Some(t) = sample.throttle_reasons {
                    acc.throttle = Some(acc.throttle.unwrap_or(0) | t);
                }
                if sample.ecc_corrected_total.is_some() {
                    acc.ecc_corr = sample.ecc_corrected_total;
                }
                if sample.ecc_uncorrected_total.is_some() {
                    acc.ecc_uncorr = sample.ecc_uncorrected_total;
                }
                match (sample.energy_counter_mj, self.last_energy) {
                    (Some(now), Some(before)) => {
                        let delta = if now >= before { now - before } else { now };
                        acc.energy_mj = Some(acc.energy_mj.unwrap_or(0) + delta);
                        acc.energy_deltas += 1;
                        acc.energy_moved |= now != before;
                    }
                    (Some(_), None) => {}
                    (None, _) => {
                        if let Some(p) = sample.power_mw {
                            acc.energy_mj =
                                Some(acc.energy_mj.unwrap_or(0) + u64::from(p) * interval / 1000);
                            acc.energy_estimated = true;
                        }
                    }
                }
                if sample.energy_counter_mj.is_some() {
                    self.last_energy = sample.energy_counter_mj;
                }
                if let Some(p) = sample.power_mw {
                    acc.power_integral_mj += u64::from(p) * interval / 1000;
                    acc.drawing_power |= p >= DRAWING_POWER_MW;
                }
                if Unattributed::judge(&sample, procs.len()).is_some() {
                    acc.unattributed_samples += 1;
                }
                fold_processes(acc, sample.util_pct, &procs, interval);
            }
            SlotOutcome::Lost => {
                acc.health = acc.health.max(Health::Lost);
                acc.unavailable_samples += 1;
            }
            SlotOutcome::Failed => {
                acc.health = acc.health.max(Health::Degraded);
            }
            SlotOutcome::Missed => {}
        }
        if slot == start + self.periods.window_ms as i64 {
            closed.extend(self.close());
        }
        closed
    }

    /// Closes the open window (also used at shutdown for a partial window).
    pub fn close(&mut self) -> Option<WindowSummary> {
        let acc = self.acc.take()?;
        let interval = self.periods.interval_ms;
        let ms = |n: u32| u64::from(n) * interval;
        let frozen = acc.energy_deltas > 0 && !acc.energy_moved && acc.drawing_power;
        let principals: Vec<PrincipalWindow> = acc
            .principals
            .into_iter()
            .map(|(principal, p)| PrincipalWindow {
                principal,
                identity: p.identity,
                occupied_ms: ms(p.occupied_samples),
                active_ms: p.active_ms.round() as u64,
                memory_max_bytes: p.memory_max,
                process_count: p.process_count,
                matches_grant: p.matches,
            })
            .collect();
        // A slot stands for the interval ending at it. A whole window spans its aligned
        // bounds; one the agent started or stopped inside spans only the intervals it
        // sampled, so a window flushed at shutdown and the first one after a restart inside
        // the same aligned window never claim the same time.
        Some(WindowSummary {
            gpu_uuid: self.uuid.clone(),
            start_ms: (acc.first_slot - interval as i64).max(acc.start),
            end_ms: acc.last_slot,
            interval_ms: interval,
            expected_samples: acc.expected,
            good_samples: acc.good,
            util_avg_pct: acc.util.get(),
            util_max_pct: acc.util_max,
            mem_util_avg_pct: acc.mem_util.get(),
            memory_used_max_bytes: acc.mem_used_max,
            memory_total_bytes: acc.mem_total,
            energy_mj: if frozen { None } else { acc.energy_mj },
            energy_estimated: acc.energy_estimated,
            energy_estimated_mj: frozen.then_some(acc.power_integral_mj),
            power_avg_w: acc.power.get(),
            temperature_max_c: acc.temp_max,
            sm_clock_max_mhz: acc.sm_clock_max,
            mem_clock_max_mhz: acc.mem_clock_max,
            throttle_reasons: acc.throttle,
            ecc_corrected_total: acc.ecc_corr,
            ecc_uncorrected_total: acc.ecc_uncorr,
            health: acc.health,
            unavailable_ms: ms(acc.unavailable_samples),
            assignment: acc.applied,
            active_ms: principals.iter().map(|p| p.active_ms).sum(),
            occupied_ms: ms(acc.occupied_samples),
            foreign_ms: ms(acc.foreign_samples),
            grantee_occupied_ms: ms(acc.grantee_samples),
            unattributed_ms: ms(acc.unattributed_samples),
            principals,
        })
    }
}

/// Splits a sample's utilization between the principals on the card: by their processes' SM
/// utilization where the driver reports it, otherwise equally.
fn fold_processes(acc: &mut Acc, util: Option<f64>, procs: &[AttributedProcess], interval: u64) {
    if procs.is_empty() {
        return;
    }
    acc.occupied_samples += 1;
    if procs.iter().any(|p| !p.matches_grant) {
        acc.foreign_samples += 1;
    }
    if procs.iter().any(|p| p.matches_grant) {
        acc.grantee_samples += 1;
    }
    struct Here {
        sm: u64,
        any_sm: bool,
        mem: u64,
        pids: u32,
        matches: bool,
    }
    let mut here: BTreeMap<String, Here> = BTreeMap::new();
    for p in procs {
        let label = p.label();
        let first_time = !acc.principals.contains_key(&label);
        let entry = acc.principals.entry(label.clone()).or_default();
        if first_time {
            entry.matches = true;
        }
        // The first identity seen, or a later one that names the kubelet's pod when the first
        // did not (a pod's UID is bound to its name a slot after its first process was seen).
        let named = |i: &Option<Identity>| i.as_ref().is_some_and(|i| i.k8s_pod_name.is_some());
        if entry.identity.is_none() || (!named(&entry.identity) && named(&p.identity)) {
            entry.identity = p.identity.clone();
        }
        let h = here.entry(label).or_insert(Here {
            sm: 0,
            any_sm: false,
            mem: 0,
            pids: 0,
            matches: true,
        });
        h.sm += u64::from(p.sm_util_pct.unwrap_or(0));
        h.any_sm |= p.sm_util_pct.is_some();
        h.mem += p.used_memory_bytes.unwrap_or(0);
        h.pids += 1;
        h.matches &= p.matches_grant;
    }
    let total_sm: u64 = here.values().map(|h| h.sm).sum();
    let by_sm = total_sm > 0 && here.values().all(|h| h.any_sm);
    let n = here.len() as f64;
    let util = util.unwrap_or(0.0);
    for (label, h) in here {
        let share = if by_sm {
            h.sm as f64 / total_sm as f64
        } else {
            1.0 / n
        };
        let p = acc.principals.entry(label).or_default();
        p.occupied_samples += 1;
        p.active_ms += interval as f64 * util / 100.0 * share;
        p.memory_max = p.memory_max.max(h.mem);
        p.process_count = p.process_count.max(h.pids);
        p.matches &= h.matches;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpumeter_proto::principal::ProcessIdentity;

    const P: Periods = Periods {
        interval_ms: 1_000,
        window_ms: 10_000,
    };

    fn user(name: &str, uid: u32) -> Option<Identity> {
        Some(Identity::from_parts(ProcessIdentity {
            uid: Some(uid),
            user: Some(name.into()),
            ..Default::default()
        }))
    }

    fn proc_(pid: u32, who: &str, uid: u32, sm: Option<u32>, ok: bool) -> AttributedProcess {
        AttributedProcess {
            pid,
            identity: user(who, uid),
            used_memory_bytes: Some(1 << 30),
            sm_util_pct: sm,
            matches_grant: ok,
        }
    }

    fn sample(util: f64, energy: Option<u64>, power_mw: Option<u32>) -> CardSample {
        CardSample {
            uuid: "GPU-a".into(),
            util_pct: Some(util),
            mem_util_pct: Some(util / 2.0),
            memory_used_bytes: Some(2 << 30),
            energy_counter_mj: energy,
            power_mw,
            temperature_c: Some(50),
            throttle_reasons: Some(0),
            ..Default::default()
        }
    }

    fn assigned() -> Applied {
        Applied {
            status: Status::Assigned,
            grant_id: "G1".into(),
            principal: "user:alice".into(),
            version: 1,
        }
    }

    #[test]
    fn a_principal_keeps_the_first_identity_that_names_the_kubelets_pod() {
        let mut agg = CardAggregator::new("GPU-a", P);
        let t0 = 1_000_000i64;
        agg.prime(Some(&sample(0.0, Some(5_000), Some(100_000))));
        let named = |pod: &str| {
            let mut id = user("alice", 1001).unwrap();
            id.k8s_namespace = Some("ml".into());
            id.k8s_pod_name = Some(pod.into());
            id.k8s_container_name = Some("trainer".into());
            Some(id)
        };
        let mut out = Vec::new();
        for i in 1..=10i64 {
            // Unnamed in the first slot (the UID is not bound yet), then named, then a later
            // name that does not replace the first.
            let identity = match i {
                1 => user("alice", 1001),
                2..=5 => named("train"),
                _ => named("other"),
            };
            let p = AttributedProcess {
                identity,
                ..proc_(10, "alice", 1001, Some(60), true)
            };
            out.extend(agg.push(
                t0 + i * 1000,
                SlotOutcome::Good {
                    sample: Box::new(sample(50.0, Some(5_000 + 300 * i as u64), Some(120_000))),
                    procs: vec![p],
                },
                &assigned(),
            ));
        }
        let id = out[0].principals[0].identity.as_ref().unwrap();
        assert_eq!(id.k8s_pod_name.as_deref(), Some("train"));
        assert_eq!(out[0].principals[0].occupied_ms, 10_000);
    }

    #[test]
    fn full_window_exact_figures() {
        let mut agg = CardAggregator::new("GPU-a", P);
        let t0 = 1_000_000i64; // window boundary
        agg.prime(Some(&sample(0.0, Some(5_000), Some(100_000))));
        let mut out = Vec::new();
        for i in 1..=10i64 {
            // utilization 10, 20, ..., 100; energy +300 mJ per second
            let util = 10.0 * i as f64;
            let procs = if i <= 5 {
                vec![proc_(10, "alice", 1001, Some(60), true)]
            } else {
                vec![
                    proc_(10, "alice", 1001, Some(60), true),
                    proc_(11, "mallory", 1002, Some(20), false),
                ]
            };
            out.extend(agg.push(
                t0 + i * 1000,
                SlotOutcome::Good {
                    sample: Box::new(sample(util, Some(5_000 + 300 * i as u64), Some(120_000))),
                    procs,
                },
                &assigned(),
            ));
        }
        assert_eq!(out.len(), 1);
        let w = &out[0];
        assert_eq!((w.start_ms, w.end_ms), (t0, t0 + 10_000));
        assert_eq!((w.expected_samples, w.good_samples), (10, 10));
        assert_eq!(w.util_avg_pct, Some(55.0));
        assert_eq!(w.util_max_pct, Some(100.0));
        assert_eq!(w.mem_util_avg_pct, Some(27.5));
        assert_eq!(w.energy_mj, Some(3_000));
        assert!(!w.energy_estimated);
        assert_eq!(w.power_avg_w, Some(120.0));
        assert_eq!(w.occupied_ms, 10_000);
        assert_eq!(w.foreign_ms, 5_000);
        assert_eq!(w.grantee_occupied_ms, 10_000);
        let alice = &w.principals[0];
        assert_eq!(alice.principal, "user:alice");
        assert_eq!(alice.occupied_ms, 10_000);
        // first 5 s alone: 1000*(0.1+..+0.5) = 1500; then 3/4 share of 0.6..1.0: 750*4.0 = 3000
        assert_eq!(alice.active_ms, 4_500);
        assert!(alice.matches_grant);
        let mallory = &w.principals[1];
        assert_eq!(mallory.principal, "user:mallory");
        assert_eq!(mallory.occupied_ms, 5_000);
        assert_eq!(mallory.active_ms, 1_000);
        assert!(!mallory.matches_grant);
        assert_eq!(w.active_ms, 5_500);
        assert_eq!(w.health, Health::Ok);
    }

    #[test]
    fn lost_failed_missed_and_partial_window() {
        let mut agg = CardAggregator::new("GPU-a", P);
        let t0 = 2_000_000i64;
        agg.prime(Some(&sample(0.0, Some(0), None)));
        let mut out = Vec::new();
        for i in 1..=10i64 {
            let o = match i {
                3 | 4 => SlotOutcome::Lost,
                5 => SlotOutcome::Failed,
                6 => SlotOutcome::Missed,
                _ => SlotOutcome::Good {
                    sample: Box::new(sample(50.0, Some(100 * i as u64), None)),
                    procs: vec![],
                },
            };
            out.extend(agg.push(t0 + i * 1000, o, &Applied::default()));
        }
        // Two more slots of the next window, then shutdown.
        for i in 11..=12i64 {
            out.extend(agg.push(
                t0 + i * 1000,
                SlotOutcome::Good {
                    sample: Box::new(sample(50.0, Some(100 * i as u64), None)),
                    procs: vec![],
                },
                &Applied::default(),
            ));
        }
        out.extend(agg.close());
        assert_eq!(out.len(), 2);
        let w = &out[0];
        assert_eq!((w.expected_samples, w.good_samples), (10, 6));
        assert_eq!(w.unavailable_ms, 2_000);
        assert_eq!(w.health, Health::Lost);
        // deltas across the gap are kept: counter went 0 -> 1000 over the window
        assert_eq!(w.energy_mj, Some(1_000));
        assert_eq!(w.occupied_ms, 0);
        assert_eq!(w.grantee_occupied_ms, 0);
        assert_eq!(w.active_ms, 0);
        let p = &out[1];
        // The partial window spans the two intervals it sampled, not its aligned bounds.
        assert_eq!(
            (p.start_ms, p.end_ms, p.expected_samples, p.good_samples),
            (t0 + 10_000, t0 + 12_000, 2, 2)
        );
        assert_eq!((w.start_ms, w.end_ms), (t0, t0 + 10_000));
        assert_eq!(p.energy_mj, Some(200));
    }

    #[test]
    fn a_window_begun_and_ended_inside_its_aligned_period_spans_only_what_it_sampled() {
        let mut agg = CardAggregator::new("GPU-a", P);
        let t0 = 2_000_000i64;
        let good = |i: i64| SlotOutcome::Good {
            sample: Box::new(sample(50.0, Some(100 * i as u64), None)),
            procs: vec![],
        };
        // Started at t0 + 6 s (the read there primes), stopped after the slot at t0 + 8 s.
        agg.prime(Some(&sample(50.0, Some(600), None)));
        for i in 7..=8 {
            assert!(
                agg.push(t0 + i * 1000, good(i), &Applied::default())
                    .is_empty()
            );
        }
        let w = agg.close().unwrap();
        assert_eq!((w.start_ms, w.end_ms), (t0 + 6_000, t0 + 8_000));
        assert_eq!(w.expected_samples, 2);
        // A restart inside the same aligned window: its first window starts where it began.
        let mut agg = CardAggregator::new("GPU-a", P);
        agg.prime(Some(&sample(50.0, Some(900), None)));
        let out: Vec<_> = (10..=10)
            .flat_map(|i| agg.push(t0 + i * 1000, good(i), &Applied::default()))
            .collect();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].start_ms, out[0].end_ms), (t0 + 9_000, t0 + 10_000));
    }

    #[test]
    fn unsupported_fields_stay_absent_and_energy_is_estimated_from_power() {
        let mut agg = CardAggregator::new("GPU-a", P);
        agg.prime(None);
        let bare = CardSample {
            uuid: "GPU-a".into(),
            power_mw: Some(200_000),
            ..Default::default()
        };
        let mut out = Vec::new();
        for i in 1..=10i64 {
            out.extend(agg.push(
                i * 1000,
                SlotOutcome::Good {
                    sample: Box::new(bare.clone()),
                    procs: vec![],
                },
                &Applied::default(),
            ));
        }
        let w = &out[0];
        assert_eq!(w.util_avg_pct, None);
        assert_eq!(w.util_max_pct, None);
        assert_eq!(w.temperature_max_c, None);
        assert_eq!(w.memory_used_max_bytes, None);
        assert_eq!(w.throttle_reasons, None);
        assert_eq!(w.energy_mj, Some(2_000_000));
        assert!(w.energy_estimated);
    }

    #[test]
    fn energy_counter_reset_is_detected() {
        let mut agg = CardAggregator::new("GPU-a", P);
        agg.prime(Some(&sample(0.0, Some(1_000_000), None)));
        let mut out = Vec::new();
        let counters = [1_000_100, 1_000_200, 50, 150, 250, 350, 450, 550, 650, 750];
        for (i, c) in counters.iter().enumerate() {
            out.extend(agg.push(
                (i as i64 + 1) * 1000,
                SlotOutcome::Good {
                    sample: Box::new(sample(1.0, Some(*c), None)),
                    procs: vec![],
                },
                &Applied::default(),
            ));
        }
        // 100 + 100 + 50 (after reset) + 7 * 100
        assert_eq!(out[0].energy_mj, Some(950));
    }

    #[test]
    fn equal_split_without_process_utilization() {
        let mut agg = CardAggregator::new("GPU-a", P);
        agg.prime(None);
        let mut out = Vec::new();
        for i in 1..=10i64 {
            out.extend(agg.push(
                i * 1000,
                SlotOutcome::Good {
                    sample: Box::new(sample(80.0, None, None)),
                    procs: vec![
                        proc_(1, "alice", 1001, None, true),
                        proc_(2, "alice", 1001, None, true),
                        proc_(3, "bob", 1003, None, true),
                    ],
                },
                &assigned(),
            ));
        }
        let w = &out[0];
        assert_eq!(w.principals[0].active_ms, 4_000);
        assert_eq!(w.principals[0].process_count, 2);
        assert_eq!(w.principals[0].memory_max_bytes, 2 << 30);
        assert_eq!(w.principals[1].active_ms, 4_000);
        assert_eq!(w.active_ms, 8_000);
        assert_eq!(w.foreign_ms, 0);
    }

    #[test]
    fn grantee_occupied_is_the_union_of_the_grantees_principals() {
        // Samples 1-4: alice; 3-6: bob (both match the grant); 6-8: mallory (foreign);
        // 9-10: nobody. The grantee had a process on the card in samples 1-6: 6 s, which no
        // sum or maximum of the per-principal rows (4 s + 4 s) gives.
        let mut agg = CardAggregator::new("GPU-a", P);
        agg.prime(None);
        let mut out = Vec::new();
        for i in 1..=10i64 {
            let mut procs = vec![];
            if (1..=4).contains(&i) {
                procs.push(proc_(1, "alice", 1001, Some(50), true));
            }
            if (3..=6).contains(&i) {
                procs.push(proc_(2, "bob", 1003, Some(50), true));
            }
            if (6..=8).contains(&i) {
                procs.push(proc_(3, "mallory", 1002, Some(50), false));
            }
            out.extend(agg.push(
                i * 1000,
                SlotOutcome::Good {
                    sample: Box::new(sample(60.0, None, None)),
                    procs,
                },
                &assigned(),
            ));
        }
        let w = &out[0];
        assert_eq!(w.occupied_ms, 8_000);
        assert_eq!(w.foreign_ms, 3_000);
        assert_eq!(w.grantee_occupied_ms, 6_000);
        let occ: Vec<u64> = w.principals.iter().map(|p| p.occupied_ms).collect();
        assert_eq!(occ, vec![4_000, 4_000, 3_000]);

        // On an unassigned card nothing matches: all of it is foreign, none the grantee's.
        let mut agg = CardAggregator::new("GPU-a", P);
        agg.prime(None);
        let mut out = Vec::new();
        for i in 1..=10i64 {
            out.extend(agg.push(
                i * 1000,
                SlotOutcome::Good {
                    sample: Box::new(sample(60.0, None, None)),
                    procs: vec![proc_(1, "alice", 1001, None, false)],
                },
                &Applied::default(),
            ));
        }
        assert_eq!(
            (
                out[0].occupied_ms,
                out[0].foreign_ms,
                out[0].grantee_occupied_ms
            ),
            (10_000, 10_000, 0)
        );
    }
}

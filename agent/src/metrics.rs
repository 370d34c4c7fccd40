//! The agent's Prometheus metrics, served by gpumeter-telemetry's endpoint (`/metrics`,
//! `/healthz`, `/readyz`).
//!
//! - Per card, labelled `gpu` (index), `uuid`, `model_name`, `hostname`, `csp`, `grant` and
//!   `principal` (empty when the card has no valid assignment; snake_case, as Prometheus
//!   conventions and `promtool` want): what the latest slot read —
//!   utilization, memory used/free, power, the energy counter, temperature, SM and memory
//!   clocks, ECC totals, health — and XID events by code since the agent started.
//! - The pipeline: spool depth and bytes, age of the oldest unacknowledged record, head and
//!   acknowledged seq, epoch, connection state, sessions and the age of the last ack.
//! - Optionally (`metrics_dcgm_compat = true`) the same card readings under dcgm-exporter's
//!   names and labels (`DCGM_FI_DEV_GPU_UTIL`, …; labels `gpu`, `UUID`, `device`,
//!   `modelName`, `Hostname`), so dashboards built for it work unchanged.
//!
//! A field the card does not support is absent from the scrape, never 0. Values are read at
//! scrape time from [`CardMetrics`] (one copy of each slot's readings, taken by the sampler's
//! reader), the ledger and the uplink status: nothing here runs on the sampling path but that
//! copy.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use gpumeter_telemetry::prometheus_client::collector::Collector;
use gpumeter_telemetry::prometheus_client::encoding::DescriptorEncoder;
use gpumeter_telemetry::prometheus_client::registry::Registry;
use gpumeter_telemetry::series::{counter, gauge};
use prost::Message;
use tokio::sync::watch;

use crate::assignments::{Assignments, Status};
use crate::clock::Clock;
use crate::gpu::{CardInfo, CardReading, GpuEvent, GpuEventKind};
use crate::ledger::Ledger;
use crate::uplink::UplinkStatus;

/// What the latest slot read of one card.
#[derive(Debug, Clone, Default, PartialEq)]
struct Last {
    health: &'static str,
    util_pct: Option<f64>,
    mem_util_pct: Option<f64>,
    memory_used_bytes: Option<u64>,
    memory_total_bytes: Option<u64>,
    energy_counter_mj: Option<u64>,
    power_mw: Option<u32>,
    temperature_c: Option<u32>,
    sm_clock_mhz: Option<u32>,
    mem_clock_mhz: Option<u32>,
    ecc_corrected_total: Option<u64>,
    ecc_uncorrected_total: Option<u64>,
    processes: usize,
    last_xid: Option<u64>,
}

#[derive(Debug, Default)]
struct Seen {
    cards: BTreeMap<String, Last>,
    /// (card, XID code) → events since start.
    xids: BTreeMap<(String, u64), u64>,
}

/// The latest readings of every card, shared between the sampler's reader (which writes once
/// per slot) and the metrics endpoint (which reads at scrape time).
#[derive(Debug, Default)]
pub struct CardMetrics {
    seen: Mutex<Seen>,
}

impl CardMetrics {
    /// Takes one slot's readings and events.
    pub fn observe<'a>(
        &self,
        readings: impl IntoIterator<Item = &'a CardReading>,
        events: &[GpuEvent],
    ) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for r in readings {
            let entry = seen.cards.entry(r.uuid().to_string()).or_default();
            let last_xid = entry.last_xid;
            *entry = match r {
                CardReading::Ok(s) => Last {
                    health: "ok",
                    util_pct: s.util_pct,
                    mem_util_pct: s.mem_util_pct,
                    memory_used_bytes: s.memory_used_bytes,
                    memory_total_bytes: s.memory_total_bytes,
                    energy_counter_mj: s.energy_counter_mj,
                    power_mw: s.power_mw,
                    temperature_c: s.temperature_c,
                    sm_clock_mhz: s.sm_clock_mhz,
                    mem_clock_mhz: s.mem_clock_mhz,
                    ecc_corrected_total: s.ecc_corrected_total,
                    ecc_uncorrected_total: s.ecc_uncorrected_total,
                    processes: s.processes.len(),
                    last_xid,
                },
                CardReading::Lost { .. } => Last {
                    health: "lost",
                    last_xid,
                    ..Last::default()
                },
                CardReading::Failed { .. } => Last {
                    health: "degraded",
                    last_xid,
                    ..Last::default()
                },
            };
        }
        for e in events {
            if let GpuEventKind::Xid(code) = e.kind {
                *seen.xids.entry((e.uuid.clone(), code)).or_default() += 1;
                seen.cards.entry(e.uuid.clone()).or_default().last_xid = Some(code);
            }
        }
    }
}

/// Everything the agent's scrape reads.
pub struct AgentMetrics {
    pub cards: Arc<CardMetrics>,
    pub inventory: Vec<CardInfo>,
    pub assignments: watch::Receiver<Arc<Assignments>>,
    pub ledger: Ledger,
    pub status: watch::Receiver<UplinkStatus>,
    pub clock: Arc<dyn Clock>,
    pub agent_id: String,
    pub hostname: String,
    pub csp: String,
    pub dcgm_compat: bool,
    /// The kubelet's pod-resources state, when the agent asks it.
    pub kubelet: Option<crate::kubelet::KubeletHandle>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics")
            .field("agent_id", &self.agent_id)
            .field("cards", &self.inventory.len())
            .finish()
    }
}

/// A registry holding the agent's metrics.
pub fn registry(metrics: AgentMetrics) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(metrics));
    r
}

type Labels = Vec<(&'static str, String)>;

impl AgentMetrics {
    fn card_labels(&self, c: &CardInfo, now: i64) -> Labels {
        let assignments = self.assignments.borrow().clone();
        let (grant, principal) = match assignments.judge(&c.uuid, now) {
            (Status::Assigned, Some(a)) => (a.grant_id.clone(), a.principal.clone()),
            _ => (String::new(), String::new()),
        };
        vec![
            ("gpu", c.index.to_string()),
            ("uuid", c.uuid.clone()),
            ("model_name", c.name.clone()),
            ("hostname", self.hostname.clone()),
            ("csp", self.csp.clone()),
            ("grant", grant),
            ("principal", principal),
        ]
    }

    fn dcgm_labels(&self, c: &CardInfo) -> Labels {
        vec![
            ("gpu", c.index.to_string()),
            ("UUID", c.uuid.clone()),
            ("device", format!("nvidia{}", c.index)),
            ("modelName", c.name.clone()),
            ("Hostname", self.hostname.clone()),
        ]
    }

    fn encode_cards(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let now = self.clock.now_ms();
        let (cards, xids) = {
            let seen = self.cards.seen.lock().unwrap_or_else(|p| p.into_inner());
            (seen.cards.clone(), seen.xids.clone())
        };
        // One list of series per metric, filled card by card.
        let mut m: BTreeMap<&'static str, Vec<(Labels, f64)>> = BTreeMap::new();
        let mut dcgm: BTreeMap<&'static str, Vec<(Labels, f64)>> = BTreeMap::new();
        let mut xid_series = Vec::new();
        for c in &self.inventory {
            let labels = self.card_labels(c, now);
            let dl = self.dcgm_labels(c);
            let last = cards.get(&c.uuid);
            let mut put = |name, v: Option<f64>| {
                if let Some(v) = v {
                    m.entry(name).or_default().push((labels.clone(), v));
                }
            };
            let up = last.map(|l| if l.health == "ok" { 1.0 } else { 0.0 });
            put("gpumeter_gpu_up", up);
            let Some(l) = last else { continue };
            put(
                "gpumeter_gpu_utilization_ratio",
                l.util_pct.map(|p| p / 100.0),
            );
            put(
                "gpumeter_gpu_memory_utilization_ratio",
                l.mem_util_pct.map(|p| p / 100.0),
            );
            put(
                "gpumeter_gpu_memory_used_bytes",
                l.memory_used_bytes.map(|b| b as f64),
            );
            let total = l.memory_total_bytes.or(c.memory_total_bytes);
            let free = match (total, l.memory_used_bytes) {
                (Some(t), Some(u)) => Some(t.saturating_sub(u) as f64),
                _ => None,
            };
            put("gpumeter_gpu_memory_free_bytes", free);
            put(
                "gpumeter_gpu_power_watts",
                l.power_mw.map(|w| f64::from(w) / 1000.0),
            );
            put(
                "gpumeter_gpu_temperature_celsius",
                l.temperature_c.map(f64::from),
            );
            put(
                "gpumeter_gpu_sm_clock_hertz",
                l.sm_clock_mhz.map(|c| f64::from(c) * 1e6),
            );
            put(
                "gpumeter_gpu_memory_clock_hertz",
                l.mem_clock_mhz.map(|c| f64::from(c) * 1e6),
            );
            put("gpumeter_gpu_processes", Some(l.processes as f64));
            if l.health == "ok" {
                let mut dput = |name, v: Option<f64>| {
                    if let Some(v) = v {
                        dcgm.entry(name).or_default().push((dl.clone(), v));
                    }
                };
                dput("DCGM_FI_DEV_GPU_UTIL", l.util_pct);
                dput("DCGM_FI_DEV_MEM_COPY_UTIL", l.mem_util_pct);
                dput(
                    "DCGM_FI_DEV_FB_USED",
                    l.memory_used_bytes.map(|b| (b >> 20) as f64),
                );
                dput(
                    "DCGM_FI_DEV_FB_FREE",
                    free.map(|b| ((b as u64) >> 20) as f64),
                );
                dput(
                    "DCGM_FI_DEV_POWER_USAGE",
                    l.power_mw.map(|w| f64::from(w) / 1000.0),
                );
                dput(
                    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
                    l.energy_counter_mj.map(|e| e as f64),
                );
                dput("DCGM_FI_DEV_GPU_TEMP", l.temperature_c.map(f64::from));
                dput("DCGM_FI_DEV_SM_CLOCK", l.sm_clock_mhz.map(f64::from));
                dput("DCGM_FI_DEV_MEM_CLOCK", l.mem_clock_mhz.map(f64::from));
                dput(
                    "DCGM_FI_DEV_XID_ERRORS",
                    Some(l.last_xid.unwrap_or(0) as f64),
                );
            }
            for ((uuid, code), n) in xids.iter().filter(|((u, _), _)| *u == c.uuid) {
                let _ = uuid;
                let mut l = labels.clone();
                l.push(("xid", code.to_string()));
                xid_series.push((l, *n as f64));
            }
            let mut energy = Vec::new();
            if let Some(e) = l.energy_counter_mj {
                energy.push((labels.clone(), e as f64 / 1000.0));
            }
            let mut ecc = Vec::new();
            if let Some(v) = l.ecc_corrected_total {
                let mut el = labels.clone();
                el.push(("type", "corrected".into()));
                ecc.push((el, v as f64));
            }
            if let Some(v) = l.ecc_uncorrected_total {
                let mut el = labels.clone();
                el.push(("type", "uncorrected".into()));
                ecc.push((el, v as f64));
            }
            m.entry("energy").or_default().extend(energy);
            m.entry("ecc").or_default().extend(ecc);
        }
        let help = |name: &str| match name {
            "gpumeter_gpu_up" => {
                "1 when the latest read of the card succeeded, 0 when it is lost or failing."
            }
            "gpumeter_gpu_utilization_ratio" => "GPU (SM) utilization of the latest slot, 0 to 1.",
            "gpumeter_gpu_memory_utilization_ratio" => {
                "Memory-controller utilization of the latest slot, 0 to 1."
            }
            "gpumeter_gpu_memory_used_bytes" => "GPU memory in use.",
            "gpumeter_gpu_memory_free_bytes" => "GPU memory not in use.",
            "gpumeter_gpu_power_watts" => "Power draw.",
            "gpumeter_gpu_temperature_celsius" => "GPU temperature.",
            "gpumeter_gpu_sm_clock_hertz" => "SM clock.",
            "gpumeter_gpu_memory_clock_hertz" => "Memory clock.",
            "gpumeter_gpu_processes" => "GPU processes seen on the card in the latest slot.",
            _ => "",
        };
        for (name, series) in &m {
            match *name {
                "energy" => counter(
                    enc,
                    "gpumeter_gpu_energy_joules",
                    "The card's energy counter since driver load.",
                    series,
                )?,
                "ecc" => counter(
                    enc,
                    "gpumeter_gpu_ecc_errors",
                    "ECC errors the driver has counted (volatile), by type.",
                    series,
                )?,
                _ => gauge(enc, name, help(name), series)?,
            }
        }
        counter(
            enc,
            "gpumeter_gpu_xid_errors",
            "XID events seen since the agent started, by code.",
            &xid_series,
        )?;
        if self.dcgm_compat {
            for (name, series) in &dcgm {
                gauge(
                    enc,
                    name,
                    "dcgm-exporter compatible field (see docs/metrics.md).",
                    series,
                )?;
            }
        }
        Ok(())
    }

    fn encode_pipeline(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let now = self.clock.now_ms();
        let (head, acked, pending, bytes, epoch, oldest_body) = {
            let g = self.ledger.lock();
            let oldest = g
                .spool
                .oldest_unacked()
                .and_then(|seq| g.spool.read_from(seq, 1).ok())
                .and_then(|mut v| v.pop())
                .map(|r| r.body);
            (
                g.spool.head().0,
                g.spool.acked().0,
                g.spool.pending(),
                g.spool.bytes(),
                g.spool.epoch(),
                oldest,
            )
        };
        let st = self.status.borrow().clone();
        let l: Labels = vec![("agent_id", self.agent_id.clone())];
        let one = |v: f64| vec![(l.clone(), v)];
        gauge(
            enc,
            "gpumeter_agent_head_seq",
            "Seq of the last record written to the spool.",
            &one(head as f64),
        )?;
        gauge(
            enc,
            "gpumeter_agent_acked_seq",
            "Seq the collector has acknowledged as durable.",
            &one(acked as f64),
        )?;
        gauge(
            enc,
            "gpumeter_agent_spool_pending_records",
            "Records spooled and not yet acknowledged.",
            &one(pending as f64),
        )?;
        gauge(
            enc,
            "gpumeter_agent_spool_bytes",
            "Bytes of spool segment files on disk.",
            &one(bytes as f64),
        )?;
        let oldest_age = oldest_body
            .and_then(|b| gpumeter_proto::v1::RecordBody::decode(b.as_slice()).ok())
            .map(|b| ((now - b.created_unix_ms).max(0) as f64) / 1000.0)
            .unwrap_or(0.0);
        gauge(
            enc,
            "gpumeter_agent_spool_oldest_record_age_seconds",
            "Age of the oldest record not yet acknowledged (0 when none is waiting).",
            &one(oldest_age),
        )?;
        gauge(
            enc,
            "gpumeter_agent_epoch",
            "The agent's ledger epoch.",
            &one(epoch as f64),
        )?;
        gauge(
            enc,
            "gpumeter_agent_collector_connected",
            "1 while a session with the collector is open.",
            &one(if st.connected { 1.0 } else { 0.0 }),
        )?;
        counter(
            enc,
            "gpumeter_agent_sessions",
            "Sessions opened with the collector.",
            &one(st.sessions as f64),
        )?;
        if let Some(at) = st.last_ack_ms {
            gauge(
                enc,
                "gpumeter_agent_last_ack_age_seconds",
                "Time since the collector last acknowledged records.",
                &one(((now - at).max(0) as f64) / 1000.0),
            )?;
        }
        if let Some(k) = &self.kubelet {
            let snap = k.snapshot.borrow().clone();
            gauge(
                enc,
                "gpumeter_agent_kubelet_pod_resources_up",
                "1 while the kubelet's pod-resources API answers (pods named from it), 0 while attribution falls back to cgroup paths.",
                &one(if snap.allocations.is_some() { 1.0 } else { 0.0 }),
            )?;
            counter(
                enc,
                "gpumeter_agent_kubelet_pod_resources_failures",
                "Calls to the kubelet's pod-resources API that failed.",
                &one(snap.failures as f64),
            )?;
            counter(
                enc,
                "gpumeter_agent_pod_device_mismatches",
                "Pod device mismatches recorded (a pod's process on a card the kubelet gave another pod or none, or a process outside pods on a pod's card).",
                &one(k.mismatches.load(std::sync::atomic::Ordering::Relaxed) as f64),
            )?;
        }
        gauge(
            enc,
            "gpumeter_agent_build_info",
            "The agent's version, as a label; always 1.",
            &[(
                vec![
                    ("agent_id", self.agent_id.clone()),
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                ],
                1.0,
            )],
        )?;
        Ok(())
    }
}

impl Collector for AgentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        self.encode_cards(&mut encoder)?;
        self.encode_pipeline(&mut encoder)
    }
}

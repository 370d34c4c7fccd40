//! The sampler: reads every card once per slot (aligned to the wall clock), attributes each GPU
//! process, judges the card's assignment, folds the slot into the card's window and turns
//! closed windows and driver events into spooled records.

use std::collections::BTreeMap;
use std::sync::Arc;

use gpumeter_proto::v1;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::assignments::{Assignments, Status};
use crate::attribution::{Attributor, Identity, PrincipalSpec};
use crate::clock::{Clock, UnixMs, align_up};
use crate::config::OnFull;
use crate::enforce::{Enforcer, apply_locks};
use crate::gpu::{CardReading, GpuEvent, GpuEventKind, GpuSource};
use crate::ledger::Ledger;
use crate::record::{event_body, gap_body, window_body};
use crate::spool::SpoolError;
use crate::window::{Applied, AttributedProcess, CardAggregator, Periods, SlotOutcome};

/// The blocking side: the GPU source and the attributor, moved onto a blocking thread for
/// each read.
pub struct Reader {
    pub source: Box<dyn GpuSource>,
    pub attributor: Box<dyn Attributor>,
    /// Where each slot's readings are copied for the metrics endpoint, when it is on.
    pub metrics: Option<Arc<crate::metrics::CardMetrics>>,
    /// Pod names and mismatches from the kubelet, when the agent asks it.
    pub pods: Option<crate::kubelet::PodAttribution>,
}

/// What one read gave: each card's reading with its processes' identities, and events.
pub struct SlotRead {
    pub readings: Vec<(CardReading, Vec<Option<Identity>>)>,
    pub events: Vec<GpuEvent>,
    /// Pod device mismatches confirmed in this read (`EVENT_KIND_POD_DEVICE_MISMATCH`).
    pub pod_events: Vec<v1::Event>,
}

impl Reader {
    pub fn read(&mut self, at: UnixMs) -> SlotRead {
        let mut readings: Vec<(CardReading, Vec<Option<Identity>>)> = self
            .source
            .read(at)
            .into_iter()
            .map(|mut r| {
                let ids = match &mut r {
                    CardReading::Ok(s) => {
                        let mut ids = Vec::with_capacity(s.processes.len());
                        // A pid only the utilization samples or the accounting records named
                        // may have ended since; without a /proc entry it is nobody's now, and
                        // a signal could only hit a reused pid.
                        s.processes.retain(|p| {
                            let id = self.attributor.identify(p.pid);
                            let keep = p.seen_in.list || id.is_some();
                            if keep {
                                ids.push(id);
                            }
                            keep
                        });
                        ids
                    }
                    _ => Vec::new(),
                };
                (r, ids)
            })
            .collect();
        let pod_events = match &mut self.pods {
            Some(p) => p.apply(at, &mut readings),
            None => Vec::new(),
        };
        let events = self.source.drain_events();
        if let Some(m) = &self.metrics {
            m.observe(readings.iter().map(|(r, _)| r), &events);
        }
        SlotRead {
            readings,
            events,
            pod_events,
        }
    }
}

/// Pure per-slot logic, separate from the loop so tests can drive it directly.
#[derive(Debug)]
pub struct SlotFolder {
    periods: Periods,
    aggs: BTreeMap<String, CardAggregator>,
    primed: bool,
    /// Cards whose use is unattributed now: warned about once per episode.
    blind: std::collections::BTreeSet<String>,
}

impl SlotFolder {
    pub fn new(periods: Periods, cards: impl IntoIterator<Item = String>) -> Self {
        Self {
            periods,
            aggs: cards
                .into_iter()
                .map(|u| (u.clone(), CardAggregator::new(&u, periods)))
                .collect(),
            primed: false,
            blind: Default::default(),
        }
    }

    /// Folds one read at `slot`; returns record bodies (closed windows, then events).
    pub fn fold(
        &mut self,
        slot: UnixMs,
        read: SlotRead,
        assignments: &Assignments,
        now: UnixMs,
    ) -> Vec<Vec<u8>> {
        let mut bodies = Vec::new();
        if !self.primed {
            self.primed = true;
            for (r, _) in &read.readings {
                let agg = self
                    .aggs
                    .entry(r.uuid().to_string())
                    .or_insert_with(|| CardAggregator::new(r.uuid(), self.periods));
                agg.prime(match r {
                    CardReading::Ok(s) => Some(s),
                    _ => None,
                });
            }
        } else {
            let mut seen = std::collections::BTreeSet::new();
            for (reading, ids) in read.readings {
                let uuid = reading.uuid().to_string();
                seen.insert(uuid.clone());
                let (applied, spec) = applied_at(assignments, &uuid, slot);
                let outcome = match reading {
                    CardReading::Ok(sample) => {
                        self.note_blind(&sample, ids.len());
                        let procs = sample
                            .processes
                            .iter()
                            .zip(ids)
                            .map(|(p, id)| AttributedProcess {
                                pid: p.pid,
                                matches_grant: applied.status == Status::Assigned
                                    && matches!((&spec, &id), (Some(s), Some(i)) if s.matches(&i.id)),
                                identity: id,
                                used_memory_bytes: p.used_memory_bytes,
                                sm_util_pct: p.sm_util_pct,
                            })
                            .collect();
                        SlotOutcome::Good {
                            sample: Box::new(sample),
                            procs,
                        }
                    }
                    CardReading::Lost { .. } => SlotOutcome::Lost,
                    CardReading::Failed { uuid, reason } => {
                        warn!(gpu = %uuid, %reason, "card read failed");
                        SlotOutcome::Failed
                    }
                };
                let agg = self
                    .aggs
                    .entry(uuid.clone())
                    .or_insert_with(|| CardAggregator::new(&uuid, self.periods));
                for w in agg.push(slot, outcome, &applied) {
                    bodies.push(window_body(now, &w));
                }
            }
            // A card that vanished from the reading is failed for this slot, not silently skipped.
            for (uuid, agg) in &mut self.aggs {
                if !seen.contains(uuid) {
                    let (applied, _) = applied_at(assignments, uuid, slot);
                    for w in agg.push(slot, SlotOutcome::Failed, &applied) {
                        bodies.push(window_body(now, &w));
                    }
                }
            }
        }
        for e in read.events {
            bodies.push(event_body(now, gpu_event_to_wire(&e)));
        }
        for e in read.pod_events {
            bodies.push(event_body(now, e));
        }
        bodies
    }

    /// Warns when a card's use becomes unattributed, once per episode, and says when it ends.
    fn note_blind(&mut self, sample: &crate::gpu::CardSample, visible: usize) {
        match crate::gpu::Unattributed::judge(sample, visible) {
            Some(why) => {
                if self.blind.insert(sample.uuid.clone()) {
                    warn!(
                        gpu = %sample.uuid,
                        util_pct = ?sample.util_pct,
                        reason = why.describe(),
                        "card use cannot be attributed to any process; counted as unattributed until a process is visible"
                    );
                }
            }
            None => {
                if self.blind.remove(&sample.uuid) {
                    info!(gpu = %sample.uuid, "card use is attributed again");
                }
            }
        }
    }

    /// Slots the sampler could not get to: counted as expected, not good.
    pub fn missed(&mut self, slot: UnixMs, assignments: &Assignments, now: UnixMs) -> Vec<Vec<u8>> {
        let mut bodies = Vec::new();
        if !self.primed {
            return bodies;
        }
        for (uuid, agg) in &mut self.aggs {
            let (applied, _) = applied_at(assignments, uuid, slot);
            for w in agg.push(slot, SlotOutcome::Missed, &applied) {
                bodies.push(window_body(now, &w));
            }
        }
        bodies
    }

    /// Closes every open (partial) window, at shutdown.
    pub fn flush(&mut self, now: UnixMs) -> Vec<Vec<u8>> {
        self.aggs
            .values_mut()
            .filter_map(|a| a.close())
            .map(|w| window_body(now, &w))
            .collect()
    }
}

fn applied_at(a: &Assignments, uuid: &str, slot: UnixMs) -> (Applied, Option<PrincipalSpec>) {
    // The slot describes the interval ending at `slot`; judge it at its first instant.
    let (status, card) = a.judge(uuid, slot - 1);
    let applied = Applied {
        status,
        grant_id: card.map(|c| c.grant_id.clone()).unwrap_or_default(),
        principal: card.map(|c| c.principal.clone()).unwrap_or_default(),
        version: a.version,
    };
    let spec = card.and_then(|c| c.principal.parse().ok());
    (applied, spec)
}

pub fn gpu_event_to_wire(e: &GpuEvent) -> v1::Event {
    let (kind, code, detail) = match &e.kind {
        GpuEventKind::Xid(x) => (v1::EventKind::Xid, *x as i64, format!("XID {x}")),
        GpuEventKind::EccSingleBit => (v1::EventKind::EccSingleBit, 1, String::new()),
        GpuEventKind::EccDoubleBit => (v1::EventKind::EccDoubleBit, 1, String::new()),
        GpuEventKind::Lost => (v1::EventKind::GpuLost, 0, "card lost".into()),
        GpuEventKind::Recovered => (v1::EventKind::GpuRecovered, 0, "card answers again".into()),
        GpuEventKind::Health { counter, from, to } => (
            v1::EventKind::CardHealth,
            i64::try_from(*to).unwrap_or(i64::MAX),
            format!("{counter} {from} -> {to}"),
        ),
    };
    v1::Event {
        kind: kind as i32,
        gpu_uuid: e.uuid.clone(),
        at_unix_ms: e.at_ms,
        code,
        detail,
        enforcement: None,
    }
}

/// Settings of the sampling loop.
#[derive(Debug, Clone)]
pub struct SamplerSettings {
    pub periods: Periods,
    /// Stop after the slot at this instant (demo and tests); `None` runs until shutdown.
    pub stop_at: Option<UnixMs>,
    /// First slot (the priming read) for a replayable source; live sources start at the
    /// next slot after now.
    pub start_at: Option<UnixMs>,
    /// The spool-full policy.
    pub on_full: OnFull,
}

/// Runs the sampling loop until `shutdown` turns true (or `stop_at`), then closes the open
/// windows and spools them. Each slot's reading also goes to the enforcer.
// Each argument is a separate handle the loop owns; a struct around them would only rename them.
#[allow(clippy::too_many_arguments)]
pub async fn run_sampler(
    mut reader: Reader,
    cards: Vec<String>,
    settings: SamplerSettings,
    clock: Arc<dyn Clock>,
    ledger: Ledger,
    assignments: watch::Receiver<Arc<Assignments>>,
    mut enforcer: Enforcer,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let periods = settings.periods;
    let interval = periods.interval_ms as i64;
    let replayable = reader.source.replayable();
    let mut folder = SlotFolder::new(periods, cards.iter().cloned());
    let mut slot = match settings.start_at {
        Some(at) if replayable => align_up(at, periods.interval_ms),
        _ => align_up(clock.now_ms(), periods.interval_ms),
    };
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut spooler = Spooler::new(settings.on_full);
    info!(
        interval_ms = periods.interval_ms,
        window_ms = periods.window_ms,
        "sampling"
    );
    loop {
        tokio::select! {
            _ = clock.sleep_until(slot) => {}
            _ = shutdown.changed() => break,
        }
        if *shutdown.borrow() {
            break;
        }
        let now = clock.now_ms();
        let current = assignments.borrow().clone();
        if !replayable {
            while now - slot >= interval {
                pending.extend(folder.missed(slot, &current, now));
                slot += interval;
            }
        }
        let at = slot;
        // Compute-mode locks are set on the blocking thread that owns the source, before the
        // read, so a card that just lost its assignment is closed as early as possible.
        let locks = enforcer.lock_changes(&cards, &current, at);
        let (r, read, locked) = tokio::task::spawn_blocking(move || {
            let locked = apply_locks(reader.source.as_mut(), locks);
            let read = reader.read(at);
            (reader, read, locked)
        })
        .await?;
        reader = r;
        pending.extend(enforcer.locks_applied(locked));
        pending.extend(enforcer.on_slot(at, &current, &read.readings));
        pending.extend(enforcer.drain());
        pending.extend(folder.fold(at, read, &current, clock.now_ms()));
        spooler.flush(&ledger, &mut pending, clock.now_ms()).await;
        if settings.stop_at.is_some_and(|s| at >= s) {
            break;
        }
        slot += interval;
    }
    pending.extend(enforcer.drain());
    if enforcer.in_flight() > 0 {
        warn!(
            in_flight = enforcer.in_flight(),
            "stopping with terminations in progress; their outcomes are not recorded"
        );
    }
    pending.extend(folder.flush(clock.now_ms()));
    spooler.flush(&ledger, &mut pending, clock.now_ms()).await;
    if spooler.owes_gap() {
        error!("stopping with a gap record not yet written: the spool is full");
    }
    if !pending.is_empty() {
        error!(
            records = pending.len(),
            "could not spool records at shutdown; they are lost"
        );
    }
    Ok(())
}

/// Writes pending records to the spool, applying the spool-full policy. Nothing is dropped
/// without a record saying so: `block` keeps records in memory until the spool has room;
/// `gap` drops them and writes a signed gap record naming the span, the cards and the count.
#[derive(Debug)]
pub struct Spooler {
    policy: OnFull,
    gap: Option<GapSpan>,
    full: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GapSpan {
    from: UnixMs,
    until: UnixMs,
    cards: std::collections::BTreeSet<String>,
    records: u64,
}

impl GapSpan {
    /// Widens the span by a dropped record (its window, or its creation time).
    fn add(&mut self, body: &[u8]) {
        use prost::Message;
        self.records += 1;
        let Ok(b) = v1::RecordBody::decode(body) else {
            return;
        };
        let (from, until, card) = match &b.kind {
            Some(v1::record_body::Kind::CardWindow(w)) => (
                w.window_start_unix_ms,
                w.window_end_unix_ms,
                Some(w.gpu_uuid.clone()),
            ),
            Some(v1::record_body::Kind::Event(e)) => (e.at_unix_ms, e.at_unix_ms, None),
            _ => (b.created_unix_ms, b.created_unix_ms, None),
        };
        self.from = self.from.min(from);
        self.until = self.until.max(until);
        self.cards.extend(card);
    }
}

impl Spooler {
    pub fn new(policy: OnFull) -> Self {
        Self {
            policy,
            gap: None,
            full: false,
        }
    }

    /// Appends `pending` (and a gap record owed from earlier, first).
    pub async fn flush(&mut self, ledger: &Ledger, pending: &mut Vec<Vec<u8>>, now: UnixMs) {
        if pending.is_empty() && self.gap.is_none() {
            return;
        }
        let owed = self.gap.as_ref().map(|g| {
            gap_body(
                now,
                g.from,
                g.until,
                g.cards.iter().cloned().collect(),
                g.records,
                "spool full: records not written",
            )
        });
        let mut bodies: Vec<Vec<u8>> = owed.iter().cloned().collect();
        bodies.append(pending);
        let (mut bodies, res) = append_blocking(ledger, bodies).await;
        match res {
            Ok(()) => {
                self.gap = None;
                if self.full {
                    self.full = false;
                    info!("spool has room again");
                }
            }
            Err(SpoolError::Full { bytes, limit }) => {
                if owed.is_some() {
                    bodies.remove(0);
                }
                if !self.full {
                    self.full = true;
                    error!(bytes, limit, policy = ?self.policy, "spool full: the collector has not acknowledged records for a long time");
                }
                match self.policy {
                    OnFull::Block => *pending = bodies,
                    OnFull::Gap => {
                        let gap = self.gap.get_or_insert_with(|| GapSpan {
                            from: i64::MAX,
                            until: i64::MIN,
                            cards: Default::default(),
                            records: 0,
                        });
                        for b in &bodies {
                            gap.add(b);
                        }
                        // The gap record itself is small: write it as soon as it fits.
                        let g = gap.clone();
                        let body = gap_body(
                            now,
                            g.from,
                            g.until,
                            g.cards.into_iter().collect(),
                            g.records,
                            "spool full: records not written",
                        );
                        if append_blocking(ledger, vec![body]).await.1.is_ok() {
                            self.gap = None;
                        }
                    }
                }
            }
            Err(e) => {
                if owed.is_some() {
                    bodies.remove(0);
                }
                error!(error = %e, held = bodies.len(), "cannot spool records; holding them in memory");
                *pending = bodies;
            }
        }
    }

    /// Records held in memory or owed as a gap (for shutdown reporting).
    pub fn owes_gap(&self) -> bool {
        self.gap.is_some()
    }
}

async fn append_blocking(
    ledger: &Ledger,
    bodies: Vec<Vec<u8>>,
) -> (Vec<Vec<u8>>, Result<(), SpoolError>) {
    let l = ledger.clone();
    match tokio::task::spawn_blocking(move || {
        let r = l.append(&bodies).map(|_| ());
        (bodies, r)
    })
    .await
    {
        Ok(v) => v,
        Err(e) => (
            Vec::new(),
            Err(SpoolError::Io {
                path: "spool".into(),
                source: std::io::Error::other(e.to_string()),
            }),
        ),
    }
}

#[cfg(test)]
mod spooler_tests {
    use super::*;
    use crate::spool::{Spool, SpoolConfig};
    use crate::window::WindowSummary;

    fn window(uuid: &str, start: i64) -> Vec<u8> {
        let w = WindowSummary {
            gpu_uuid: uuid.into(),
            start_ms: start,
            end_ms: start + 60_000,
            interval_ms: 1000,
            expected_samples: 60,
            good_samples: 60,
            util_avg_pct: Some(50.0),
            util_max_pct: Some(50.0),
            mem_util_avg_pct: None,
            memory_used_max_bytes: None,
            memory_total_bytes: None,
            energy_mj: Some(1),
            energy_estimated: false,
            power_avg_w: None,
            temperature_max_c: None,
            sm_clock_max_mhz: None,
            mem_clock_max_mhz: None,
            throttle_reasons: None,
            ecc_corrected_total: None,
            ecc_uncorrected_total: None,
            health: crate::window::Health::Ok,
            unavailable_ms: 0,
            assignment: Default::default(),
            principals: vec![],
            active_ms: 0,
            occupied_ms: 0,
            grantee_occupied_ms: 0,
            unattributed_ms: 0,
            energy_estimated_mj: None,
            foreign_ms: 0,
        };
        crate::record::window_body(start, &w)
    }

    fn tiny_ledger(dir: &std::path::Path) -> Ledger {
        let (spool, _) = Spool::open(SpoolConfig {
            dir: dir.to_path_buf(),
            max_bytes: 1_500,
            segment_bytes: 400,
        })
        .unwrap();
        Ledger::new(spool)
    }

    fn kinds(ledger: &Ledger) -> Vec<String> {
        use prost::Message;
        ledger
            .lock()
            .spool
            .read_from(0, 1000)
            .unwrap()
            .iter()
            .map(
                |r| match v1::RecordBody::decode(r.body.as_slice()).unwrap().kind {
                    Some(v1::record_body::Kind::CardWindow(_)) => "window".to_string(),
                    Some(v1::record_body::Kind::Gap(g)) => format!(
                        "gap {}..{} {:?} {}",
                        g.from_unix_ms, g.until_unix_ms, g.gpu_uuids, g.records_not_written
                    ),
                    other => format!("{other:?}"),
                },
            )
            .collect()
    }

    #[tokio::test]
    async fn block_holds_records_until_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = tiny_ledger(dir.path());
        let mut sp = Spooler::new(OnFull::Block);
        let mut held = 0;
        for i in 0..40 {
            let mut pending = vec![window("GPU-a", i * 60_000)];
            sp.flush(&ledger, &mut pending, 0).await;
            held += pending.len();
            if !pending.is_empty() {
                // Held, not dropped: the next flush carries it.
                let mut again = pending.clone();
                sp.flush(&ledger, &mut again, 0).await;
                assert_eq!(again, pending);
                break;
            }
        }
        assert_eq!(held, 1, "the spool filled up and the record was held");
        // Acks make room; the held record goes in.
        let (seq, hash) = ledger.head();
        ledger.lock().spool.ack(seq, hash).unwrap();
        let mut pending = vec![window("GPU-a", 99 * 60_000)];
        sp.flush(&ledger, &mut pending, 0).await;
        assert!(pending.is_empty());
        assert!(kinds(&ledger).iter().all(|k| k == "window"));
    }

    #[tokio::test]
    async fn gap_policy_writes_a_gap_record_naming_what_was_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = tiny_ledger(dir.path());
        let mut sp = Spooler::new(OnFull::Gap);
        let mut written = 0;
        let mut i = 0;
        // Fill the spool until the first record does not fit.
        loop {
            let before = ledger.head().0;
            let mut pending = vec![window("GPU-a", i * 60_000)];
            sp.flush(&ledger, &mut pending, 0).await;
            assert!(pending.is_empty(), "the gap policy never holds records");
            i += 1;
            if ledger.head().0 == before || sp.owes_gap() {
                break;
            }
            written += 1;
        }
        // Two more are dropped while full.
        for c in ["GPU-b", "GPU-c"] {
            let mut pending = vec![window(c, i * 60_000)];
            sp.flush(&ledger, &mut pending, 0).await;
            i += 1;
        }
        assert!(sp.owes_gap());
        let (seq, hash) = ledger.head();
        ledger.lock().spool.ack(seq, hash).unwrap();
        let mut none = vec![];
        sp.flush(&ledger, &mut none, 0).await;
        assert!(!sp.owes_gap());
        let k = kinds(&ledger);
        let first_dropped = written * 60_000;
        assert_eq!(
            k.last().unwrap(),
            &format!(
                "gap {}..{} [\"GPU-a\", \"GPU-b\", \"GPU-c\"] 3",
                first_dropped,
                first_dropped + 3 * 60_000
            ),
            "{k:?}"
        );
    }
}

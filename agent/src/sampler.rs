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
use crate::enforce::{Enforcer, apply_locks};
use crate::gpu::{CardReading, GpuEvent, GpuEventKind, GpuSource};
use crate::ledger::Ledger;
use crate::record::{event_body, window_body};
use crate::window::{Applied, AttributedProcess, CardAggregator, Periods, SlotOutcome};

/// The blocking side: the GPU source and the attributor, moved onto a blocking thread for
/// each read.
pub struct Reader {
    pub source: Box<dyn GpuSource>,
    pub attributor: Box<dyn Attributor>,
}

/// What one read gave: each card's reading with its processes' identities, and events.
pub struct SlotRead {
    pub readings: Vec<(CardReading, Vec<Option<Identity>>)>,
    pub events: Vec<GpuEvent>,
}

impl Reader {
    pub fn read(&mut self, at: UnixMs) -> SlotRead {
        let readings = self
            .source
            .read(at)
            .into_iter()
            .map(|r| {
                let ids = match &r {
                    CardReading::Ok(s) => s
                        .processes
                        .iter()
                        .map(|p| self.attributor.identify(p.pid))
                        .collect(),
                    _ => Vec::new(),
                };
                (r, ids)
            })
            .collect();
        SlotRead {
            readings,
            events: self.source.drain_events(),
        }
    }
}

/// Pure per-slot logic, separate from the loop so tests can drive it directly.
#[derive(Debug)]
pub struct SlotFolder {
    periods: Periods,
    aggs: BTreeMap<String, CardAggregator>,
    primed: bool,
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
        bodies
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
        spool_pending(&ledger, &mut pending).await;
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
    spool_pending(&ledger, &mut pending).await;
    if !pending.is_empty() {
        error!(
            records = pending.len(),
            "could not spool records at shutdown; they are lost"
        );
    }
    Ok(())
}

/// Appends what is pending; on failure keeps it for the next slot (nothing is dropped).
async fn spool_pending(ledger: &Ledger, pending: &mut Vec<Vec<u8>>) {
    if pending.is_empty() {
        return;
    }
    let l = ledger.clone();
    let bodies = std::mem::take(pending);
    let (bodies, res) = match tokio::task::spawn_blocking(move || {
        let r = l.append(&bodies);
        (bodies, r)
    })
    .await
    {
        Ok(v) => v,
        Err(e) => {
            error!(error = %e, "spool writer panicked");
            return;
        }
    };
    if let Err(e) = res {
        error!(error = %e, held = bodies.len(), "cannot spool records; holding them in memory");
        *pending = bodies;
    }
}

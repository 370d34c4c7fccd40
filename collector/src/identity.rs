//! Card identity: what a card first reported itself as, and the alarms that say it changed or
//! is not the model its grant names. Both stores write these alarms with the functions here,
//! and reports read them back with [`alarm_card`], so the wording and its parsing sit together.
//!
//! Rules:
//! - A card's model, serial, PCI bus id and memory as first reported are kept and never
//!   updated; a later Hello reporting another model, serial or memory under the same UUID is a
//!   `card_changed` alarm.
//! - A grant may name the model each card must be (`gpu_model` in the grants CSV); a card whose
//!   first-reported model does not contain it (case-insensitively) is a
//!   `card_model_mismatch` alarm, raised when whichever of the two comes second arrives.
//! - A report lists every identity alarm on its cards raised up to the head it was computed
//!   from ([`report_alarms`]), whenever raised: a card swapped in before the period is still
//!   the card the period metered.

use serde::Serialize;

use crate::reconcile::Reconciliation;
use crate::store::{Alarm, GpuRow};

pub const CARD_CHANGED: &str = "card_changed";
pub const CARD_MODEL_MISMATCH: &str = "card_model_mismatch";

/// Whether a reported model name is the granted one: it contains it, case-insensitively
/// ("NVIDIA H100 80GB HBM3" is an "H100 80GB").
pub fn model_matches(reported: &str, granted: &str) -> bool {
    reported
        .to_lowercase()
        .contains(granted.trim().to_lowercase().as_str())
}

/// The alarm for a card reported as `reported` under a grant naming `granted`.
pub fn model_alarm(
    agent_id: &str,
    at_ms: i64,
    uuid: &str,
    reported: &str,
    grant_id: &str,
    granted: &str,
) -> Alarm {
    Alarm {
        agent_id: agent_id.into(),
        at_ms,
        kind: CARD_MODEL_MISMATCH.into(),
        seq: None,
        detail: format!(
            "card {uuid} reports model {reported:?} but grant {grant_id} names {granted:?}"
        ),
    }
}

/// The alarm for a card now reported as `g` when it was first reported with model `name`,
/// `serial` and `memory` bytes; `None` when none of them changed.
pub fn changed_alarm(
    agent_id: &str,
    at_ms: i64,
    g: &GpuRow,
    (name, serial, memory): (&str, &str, Option<i64>),
) -> Option<Alarm> {
    let now_memory = g.memory_total_bytes.map(|m| m as i64);
    let mut changes = Vec::new();
    if name != g.name {
        changes.push(format!("model {name:?} -> {:?}", g.name));
    }
    if serial != g.serial {
        changes.push(format!("serial {serial:?} -> {:?}", g.serial));
    }
    if memory != now_memory {
        changes.push(format!("memory {memory:?} -> {now_memory:?} B"));
    }
    (!changes.is_empty()).then(|| Alarm {
        agent_id: agent_id.into(),
        at_ms,
        kind: CARD_CHANGED.into(),
        seq: None,
        detail: format!(
            "card {} changed under the same UUID since first reported: {}",
            g.uuid,
            changes.join(", ")
        ),
    })
}

/// The card an identity alarm is about (`None` for an alarm of another kind).
pub fn alarm_card(a: &Alarm) -> Option<&str> {
    if a.kind != CARD_CHANGED && a.kind != CARD_MODEL_MISMATCH {
        return None;
    }
    a.detail.strip_prefix("card ")?.split(' ').next()
}

/// One identity alarm on a card of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardAlarm {
    pub gpu_uuid: String,
    pub host_id: String,
    /// The report's grants that held the card in the period (empty: an unassigned card).
    pub grant_ids: Vec<String>,
    /// [`CARD_CHANGED`] or [`CARD_MODEL_MISMATCH`].
    pub kind: String,
    pub agent_id: String,
    pub at_ms: i64,
    pub detail: String,
}

/// The identity alarms of `alarms` raised at or before `up_to_ms` on a card of `r` (one of
/// its grants' cards, or an unassigned card it lists), oldest first.
pub fn report_alarms(alarms: &[Alarm], r: &Reconciliation, up_to_ms: i64) -> Vec<CardAlarm> {
    let mut cards: std::collections::BTreeMap<&str, (String, Vec<String>)> = Default::default();
    for g in &r.grants {
        for c in &g.cards {
            let e = cards
                .entry(c.gpu_uuid.as_str())
                .or_insert_with(|| (c.host_id.clone(), Vec::new()));
            if !e.1.contains(&g.grant_id) {
                e.1.push(g.grant_id.clone());
            }
        }
    }
    for u in &r.unassigned {
        for c in &u.cards {
            cards
                .entry(c.gpu_uuid.as_str())
                .or_insert_with(|| (u.host_id.clone(), Vec::new()));
        }
    }
    let mut out: Vec<CardAlarm> = alarms
        .iter()
        .filter(|a| a.at_ms <= up_to_ms)
        .filter_map(|a| {
            let card = alarm_card(a)?;
            let (host_id, grant_ids) = cards.get(card)?;
            Some(CardAlarm {
                gpu_uuid: card.to_owned(),
                host_id: host_id.clone(),
                grant_ids: grant_ids.clone(),
                kind: a.kind.clone(),
                agent_id: a.agent_id.clone(),
                at_ms: a.at_ms,
                detail: a.detail.clone(),
            })
        })
        .collect();
    out.sort_by(|a, b| (a.at_ms, &a.gpu_uuid, &a.detail).cmp(&(b.at_ms, &b.gpu_uuid, &b.detail)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(name: &str, serial: &str, memory: Option<u64>) -> GpuRow {
        GpuRow {
            uuid: "GPU-a".into(),
            index: 0,
            name: name.into(),
            serial: serial.into(),
            pci_bus_id: "0000:01:00.0".into(),
            memory_total_bytes: memory,
            mig_mode: String::new(),
            mig: None,
        }
    }

    #[test]
    fn each_alarm_names_the_card_it_is_about() {
        let m = model_alarm("a", 1, "GPU-a", "NVIDIA A10", "g-1", "H100 80GB");
        assert_eq!(alarm_card(&m), Some("GPU-a"));
        let c = changed_alarm(
            "a",
            2,
            &gpu("NVIDIA A10", "S2", Some(24)),
            ("NVIDIA H100 80GB HBM3", "S1", Some(80)),
        )
        .unwrap();
        assert_eq!(c.kind, CARD_CHANGED);
        assert_eq!(alarm_card(&c), Some("GPU-a"));
        assert!(c.detail.contains("serial \"S1\" -> \"S2\""), "{}", c.detail);
        assert!(
            c.detail.contains("memory Some(80) -> Some(24) B"),
            "{}",
            c.detail
        );
        let other = Alarm {
            kind: "seq_gap".into(),
            detail: "card GPU-a".into(),
            ..m
        };
        assert_eq!(alarm_card(&other), None);
    }

    #[test]
    fn an_unchanged_card_raises_nothing() {
        assert_eq!(
            changed_alarm(
                "a",
                2,
                &gpu("NVIDIA H100", "S1", Some(80)),
                ("NVIDIA H100", "S1", Some(80))
            ),
            None
        );
        assert!(model_matches("NVIDIA H100 80GB HBM3", " h100 80gb "));
        assert!(!model_matches("NVIDIA A10", "H100"));
    }
}

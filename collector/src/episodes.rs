//! Violation episodes: an agent's enforcement events grouped into the violation and what was
//! done about it (pure; `violations` lists them, the metrics count them by action).
//!
//! Rules (agent/src/enforce.rs records the events):
//! - An episode opens with its violation, the enforcement event with action `none`: one per
//!   episode, as the reconciliation counts them (result `recorded` or `skipped: …`).
//! - Its follow-ups are the enforcement events of the same agent, card and pid with another
//!   action (`sigterm`, `sigkill`, …) and a higher seq, up to the next violation of that
//!   agent, card and pid. The seq, not the time, orders them: the agent assigns seqs in the
//!   order it records, while a follow-up's time is when its signal went out.
//! - Card-level events (`lock_compute_mode`, `unlock_compute_mode`; pid 0) and follow-ups
//!   whose violation lies outside the events given belong to no episode.
//! - The action taken is the last follow-up's action and result; with none, `none` and the
//!   violation's own result (observe mode, or a skipped termination).

use std::collections::HashMap;

use gpumeter_proto::v1;

use crate::store::StoredEvent;

/// What the grouping reads of an enforcement event.
pub trait EnforcementEvent {
    fn agent_id(&self) -> &str;
    fn seq(&self) -> u64;
    fn gpu_uuid(&self) -> &str;
    fn pid(&self) -> Option<u32>;
    fn action(&self) -> &str;
    fn result(&self) -> &str;
    fn is_enforcement(&self) -> bool;
}

impl EnforcementEvent for StoredEvent {
    fn agent_id(&self) -> &str {
        &self.agent_id
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn gpu_uuid(&self) -> &str {
        &self.event.gpu_uuid
    }
    fn pid(&self) -> Option<u32> {
        self.event.pid
    }
    fn action(&self) -> &str {
        &self.event.action
    }
    fn result(&self) -> &str {
        &self.event.result
    }
    fn is_enforcement(&self) -> bool {
        self.event.kind == "enforcement"
    }
}

impl EnforcementEvent for v1::EventInfo {
    fn agent_id(&self) -> &str {
        &self.agent_id
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn gpu_uuid(&self) -> &str {
        &self.gpu_uuid
    }
    fn pid(&self) -> Option<u32> {
        self.pid
    }
    fn action(&self) -> &str {
        &self.action
    }
    fn result(&self) -> &str {
        &self.result
    }
    fn is_enforcement(&self) -> bool {
        self.kind == "enforcement"
    }
}

/// One violation and what followed it, in seq order.
#[derive(Debug)]
pub struct Episode<'a, E> {
    pub violation: &'a E,
    pub follow_ups: Vec<&'a E>,
}

impl<'a, E: EnforcementEvent> Episode<'a, E> {
    /// The action taken: the last follow-up's, or `none`.
    pub fn action(&self) -> &'a str {
        self.follow_ups.last().map_or("none", |e| e.action())
    }

    /// Its outcome: the last follow-up's result, or the violation's own.
    pub fn result(&self) -> &'a str {
        self.follow_ups
            .last()
            .map_or(self.violation.result(), |e| e.result())
    }
}

/// (agent, card, pid): what a follow-up shares with its violation.
type Key<'a> = (&'a str, &'a str, u32);

/// The episodes among `events`, in the order their violations come in `events`.
pub fn episodes<E: EnforcementEvent>(events: &[E]) -> Vec<Episode<'_, E>> {
    let mut out: Vec<Episode<'_, E>> = Vec::new();
    // Per (agent, card, pid): the violations' seqs and their episodes' indexes in `out`.
    let mut open: HashMap<Key<'_>, Vec<(u64, usize)>> = HashMap::new();
    for e in events.iter().filter(|e| e.is_enforcement()) {
        if e.action() != "none" {
            continue;
        }
        open.entry((e.agent_id(), e.gpu_uuid(), e.pid().unwrap_or(0)))
            .or_default()
            .push((e.seq(), out.len()));
        out.push(Episode {
            violation: e,
            follow_ups: Vec::new(),
        });
    }
    for list in open.values_mut() {
        list.sort_unstable();
    }
    let mut follow: Vec<&E> = events
        .iter()
        .filter(|e| e.is_enforcement() && e.action() != "none" && e.pid().unwrap_or(0) != 0)
        .collect();
    follow.sort_by_key(|e| e.seq());
    for f in follow {
        let Some(list) = open.get(&(f.agent_id(), f.gpu_uuid(), f.pid().unwrap_or(0))) else {
            continue;
        };
        // The latest violation before it.
        let i = list.partition_point(|(seq, _)| *seq < f.seq());
        if let Some((_, at)) = i.checked_sub(1).and_then(|i| list.get(i)) {
            out[*at].follow_ups.push(f);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, gpu: &str, pid: u32, action: &str, result: &str) -> v1::EventInfo {
        v1::EventInfo {
            agent_id: "a".into(),
            seq,
            gpu_uuid: gpu.into(),
            kind: "enforcement".into(),
            pid: Some(pid),
            action: action.into(),
            result: result.into(),
            ..Default::default()
        }
    }

    #[test]
    fn follow_ups_join_the_latest_violation_of_their_card_and_pid() {
        let events = vec![
            ev(1, "G1", 7, "none", "recorded"),
            ev(2, "G2", 7, "none", "skipped: observe"),
            ev(3, "G1", 7, "sigterm", "sent"),
            ev(4, "G1", 0, "lock_compute_mode", "applied"),
            ev(6, "G1", 7, "sigkill", "killed"),
            // The same pid again later: a new episode, with its own follow-up.
            ev(7, "G1", 7, "none", "recorded"),
            ev(8, "G1", 7, "sigterm", "exited"),
            // A follow-up whose violation is not among the events.
            ev(9, "G3", 5, "sigterm", "exited"),
            v1::EventInfo {
                kind: "xid".into(),
                ..ev(10, "G1", 7, "none", "")
            },
        ];
        let got: Vec<(u64, Vec<u64>, &str, &str)> = episodes(&events)
            .iter()
            .map(|e| {
                (
                    e.violation.seq,
                    e.follow_ups.iter().map(|f| f.seq).collect(),
                    e.action(),
                    e.result(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (1, vec![3, 6], "sigkill", "killed"),
                (2, vec![], "none", "skipped: observe"),
                (7, vec![8], "sigterm", "exited"),
            ]
        );
    }
}

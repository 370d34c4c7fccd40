//! Scheduler jobs on the cards, like `sacct`: per Slurm job, Kubernetes pod or container, the
//! card time its processes held (GPU-hours), its utilization-weighted time and its peak memory.
//!
//! Read from the signed window bodies ([`crate::store::Store::window_bodies`]), which carry
//! each principal's workload identity as the agent read it from the process's cgroup; no
//! derived row keeps it, so these figures rest on exactly what `verify` proves.
//!
//! Rules:
//! - A principal's usage in a window belongs to its Slurm job when it has one, else to its
//!   pod, else to its container; a principal with none is one `none` row per principal.
//! - GPU-hours are the principal's occupied time (card time with at least one of its
//!   processes on the card); active time is its utilization-weighted share; memory is the
//!   largest any window saw. Windows that count in no figure (flagged, or reported for a card
//!   another host holds) are not read.

use std::collections::{BTreeMap, BTreeSet};

use gpumeter_proto::v1;
use prost::Message;
use serde::Serialize;

use crate::reconcile::gpu_hours;

/// One job over a period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobRow {
    /// "slurm", "k8s", "container" or "none".
    pub kind: String,
    pub job_id: String,
    pub principal: String,
    pub uid: Option<u32>,
    /// Grants the windows were metered under; empty string: no grant held the card.
    pub grant_ids: Vec<String>,
    pub host_ids: Vec<String>,
    pub gpu_uuids: Vec<String>,
    pub first_ms: i64,
    /// Exclusive.
    pub last_ms: i64,
    pub windows: u64,
    pub occupied_ms: u64,
    pub gpu_hours: f64,
    pub active_ms: u64,
    pub active_gpu_hours: f64,
    pub memory_max_bytes: u64,
    /// For a pod: "namespace/name" as the kubelet named it in any of the job's windows
    /// (empty when none did).
    pub k8s_pod: String,
}

/// The job a principal's usage belongs to: (kind, id).
fn job_of(p: &v1::PrincipalUsage) -> (&'static str, &str) {
    if !p.slurm_job_id.is_empty() {
        ("slurm", &p.slurm_job_id)
    } else if !p.k8s_pod_uid.is_empty() {
        ("k8s", &p.k8s_pod_uid)
    } else if !p.container_id.is_empty() {
        ("container", &p.container_id)
    } else {
        ("none", "")
    }
}

#[derive(Default)]
struct Acc {
    uid: Option<u32>,
    grants: BTreeSet<String>,
    hosts: BTreeSet<String>,
    gpus: BTreeSet<String>,
    first_ms: i64,
    last_ms: i64,
    windows: u64,
    occupied_ms: u64,
    active_ms: u64,
    memory_max_bytes: u64,
    k8s_pod: String,
}

/// The jobs of the window bodies `bodies` (agent, host, seq, body), only windows metered under
/// `grant_id` when given; in order of kind, job id and principal. A body that does not decode
/// as a card window is skipped (`verify` names it).
pub fn jobs(bodies: &[crate::store::WindowBody], grant_id: Option<&str>) -> Vec<JobRow> {
    let mut acc: BTreeMap<(&'static str, String, String), Acc> = BTreeMap::new();
    for (_, host, _, body) in bodies {
        let Ok(b) = v1::RecordBody::decode(body.as_slice()) else {
            continue;
        };
        let Some(v1::record_body::Kind::CardWindow(w)) = b.kind else {
            continue;
        };
        let grant = w
            .assignment
            .as_ref()
            .map(|a| a.grant_id.clone())
            .unwrap_or_default();
        if grant_id.is_some_and(|g| g != grant) {
            continue;
        }
        for p in &w.principals {
            if p.occupied_ms == 0 && p.process_count == 0 {
                continue;
            }
            let (kind, id) = job_of(p);
            let a = acc
                .entry((kind, id.to_owned(), p.principal.clone()))
                .or_insert_with(|| Acc {
                    first_ms: i64::MAX,
                    last_ms: i64::MIN,
                    ..Acc::default()
                });
            a.uid = a.uid.or(p.uid);
            a.grants.insert(grant.clone());
            a.hosts.insert(host.clone());
            a.gpus.insert(w.gpu_uuid.clone());
            a.first_ms = a.first_ms.min(w.window_start_unix_ms);
            a.last_ms = a.last_ms.max(w.window_end_unix_ms);
            a.windows += 1;
            a.occupied_ms = a.occupied_ms.saturating_add(p.occupied_ms);
            a.active_ms = a.active_ms.saturating_add(p.active_ms);
            a.memory_max_bytes = a.memory_max_bytes.max(p.memory_max_bytes);
            if kind == "k8s" && a.k8s_pod.is_empty() && !p.k8s_pod_name.is_empty() {
                a.k8s_pod = format!("{}/{}", p.k8s_namespace, p.k8s_pod_name);
            }
        }
    }
    acc.into_iter()
        .map(|((kind, job_id, principal), a)| JobRow {
            kind: kind.to_owned(),
            job_id,
            principal,
            uid: a.uid,
            grant_ids: a.grants.into_iter().collect(),
            host_ids: a.hosts.into_iter().collect(),
            gpu_uuids: a.gpus.into_iter().collect(),
            first_ms: a.first_ms,
            last_ms: a.last_ms,
            windows: a.windows,
            occupied_ms: a.occupied_ms,
            gpu_hours: gpu_hours(a.occupied_ms),
            active_ms: a.active_ms,
            active_gpu_hours: gpu_hours(a.active_ms),
            memory_max_bytes: a.memory_max_bytes,
            k8s_pod: a.k8s_pod,
        })
        .collect()
}

/// A job as the wire carries it.
pub fn to_wire(j: &JobRow) -> v1::JobInfo {
    v1::JobInfo {
        kind: j.kind.clone(),
        job_id: j.job_id.clone(),
        principal: j.principal.clone(),
        uid: j.uid,
        grant_ids: j.grant_ids.clone(),
        host_ids: j.host_ids.clone(),
        gpu_uuids: j.gpu_uuids.clone(),
        first_unix_ms: j.first_ms,
        last_unix_ms: j.last_ms,
        windows: j.windows,
        occupied_ms: j.occupied_ms,
        active_ms: j.active_ms,
        memory_max_bytes: j.memory_max_bytes,
        k8s_pod: j.k8s_pod.clone(),
    }
}

/// A job from the wire, with its GPU-hours computed from the exact integers.
pub fn from_wire(j: v1::JobInfo) -> JobRow {
    JobRow {
        gpu_hours: gpu_hours(j.occupied_ms),
        active_gpu_hours: gpu_hours(j.active_ms),
        kind: j.kind,
        job_id: j.job_id,
        principal: j.principal,
        uid: j.uid,
        grant_ids: j.grant_ids,
        host_ids: j.host_ids,
        gpu_uuids: j.gpu_uuids,
        first_ms: j.first_unix_ms,
        last_ms: j.last_unix_ms,
        windows: j.windows,
        occupied_ms: j.occupied_ms,
        active_ms: j.active_ms,
        memory_max_bytes: j.memory_max_bytes,
        k8s_pod: j.k8s_pod,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(principal: &str, job: &str, pod: &str, occupied: u64, mem: u64) -> v1::PrincipalUsage {
        v1::PrincipalUsage {
            principal: principal.into(),
            uid: Some(1001),
            slurm_job_id: job.into(),
            k8s_pod_uid: pod.into(),
            occupied_ms: occupied,
            active_ms: occupied / 2,
            memory_max_bytes: mem,
            process_count: 1,
            ..Default::default()
        }
    }

    fn body(gpu: &str, start: i64, grant: &str, ps: Vec<v1::PrincipalUsage>) -> Vec<u8> {
        v1::RecordBody {
            created_unix_ms: start + 60_000,
            kind: Some(v1::record_body::Kind::CardWindow(v1::CardWindow {
                gpu_uuid: gpu.into(),
                window_start_unix_ms: start,
                window_end_unix_ms: start + 60_000,
                assignment: Some(v1::AppliedAssignment {
                    grant_id: grant.into(),
                    ..Default::default()
                }),
                principals: ps,
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn usage_is_summed_per_job_across_cards_and_windows() {
        let rows = vec![
            (
                "a".into(),
                "h1".into(),
                1,
                body(
                    "GPU-1",
                    0,
                    "G-1",
                    vec![
                        usage("user:alice", "4711", "", 60_000, 5),
                        usage("user:bob", "", "pod-9", 30_000, 7),
                    ],
                ),
            ),
            (
                "a".into(),
                "h1".into(),
                4,
                body(
                    "GPU-3",
                    0,
                    "G-1",
                    vec![v1::PrincipalUsage {
                        k8s_namespace: "ml".into(),
                        k8s_pod_name: "train".into(),
                        k8s_container_name: "trainer".into(),
                        ..usage("user:bob", "", "pod-9", 20_000, 3)
                    }],
                ),
            ),
            (
                "a".into(),
                "h1".into(),
                2,
                body(
                    "GPU-2",
                    60_000,
                    "G-1",
                    vec![usage("user:alice", "4711", "", 40_000, 9)],
                ),
            ),
            (
                "a".into(),
                "h1".into(),
                3,
                body(
                    "GPU-2",
                    120_000,
                    "",
                    vec![usage("user:carol", "", "", 10_000, 1)],
                ),
            ),
        ];
        let all = jobs(&rows, None);
        let keys: Vec<(&str, &str, &str)> = all
            .iter()
            .map(|j| (j.kind.as_str(), j.job_id.as_str(), j.principal.as_str()))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("k8s", "pod-9", "user:bob"),
                ("none", "", "user:carol"),
                ("slurm", "4711", "user:alice"),
            ]
        );
        let alice = &all[2];
        assert_eq!(
            (alice.occupied_ms, alice.active_ms, alice.memory_max_bytes),
            (100_000, 50_000, 9)
        );
        assert_eq!(alice.gpu_uuids, vec!["GPU-1", "GPU-2"]);
        assert_eq!(
            (alice.first_ms, alice.last_ms, alice.windows),
            (0, 120_000, 2)
        );
        assert_eq!(all[1].grant_ids, vec![String::new()]);
        // The pod's row takes the kubelet's name from the window that carried it.
        let bob = &all[0];
        assert_eq!(
            (bob.k8s_pod.as_str(), bob.occupied_ms, bob.windows),
            ("ml/train", 50_000, 2)
        );
        assert_eq!(from_wire(to_wire(bob)), *bob);
        assert_eq!(alice.k8s_pod, "");
        // Only one grant's windows.
        let g1 = jobs(&rows, Some("G-1"));
        assert_eq!(g1.len(), 2);
        assert!(g1.iter().all(|j| j.grant_ids == vec!["G-1".to_string()]));
        // What goes on the wire comes back.
        assert_eq!(from_wire(to_wire(alice)), *alice);
    }
}

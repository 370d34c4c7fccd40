//! Kubernetes pods (pure): maps the kubelet's pod-resources answer — which pod and container
//! each device is allocated to — onto the agent's cards, binds the pod UIDs that processes'
//! cgroup paths give to the pods the kubelet names, judges each GPU process against the card's
//! allocation, and keeps mismatches as episodes. The gRPC edge is `kubelet.rs`.
//!
//! Rules:
//! - Devices are those of resources named `nvidia.com/…` (`nvidia.com/gpu`,
//!   `nvidia.com/mig-1g.10gb`, renamed shared resources). A device id is a card's UUID
//!   (`GPU-…`, `MIG-…`), the index of a card without MIG, or either with a `::N` replica
//!   suffix (time-slicing: the card is shared by every holder of one of its replicas). An id
//!   that names no card of this agent is kept as unmapped, for `probe`.
//! - The API names pods by namespace and name, never by UID; cgroup paths give only the UID.
//!   A UID is bound to a pod when one slot shows it unambiguously: the UID's processes are on
//!   at least one card that pod holds alone (no replicas), every card they are on is that
//!   pod's (alone or shared), no other UID not bound elsewhere has processes on the cards the
//!   pod holds alone, and the pod is not bound to another UID that
//!   still has processes. A binding lasts while the pod is in the kubelet's answer (a pod
//!   recreated under the same name gets a new UID, bound afresh once the old one has no
//!   process left).
//! - Verdicts, per process with a readable identity:
//!   - no pod UID, on a card no pod holds: a host process, nothing to say;
//!   - its UID is bound to a pod that holds the card: that pod and container (`Holder`), the
//!     only case that names a pod in the record;
//!   - an unbound UID on a shared card: which holder it is cannot be told (`Shared`);
//!   - otherwise a mismatch: a pod's process on a card allocated to other pods (its own pod
//!     named when its UID is bound), on a card allocated to no pod, or a process outside any
//!     pod on a card allocated to a pod.
//! - Limit, stated: the first unambiguous slot decides a binding. A pod that uses another
//!   pod's card before the owner ever runs a process there, and has no card of its own, is
//!   bound to the owner; when the owner starts, the owner's process is the one reported. The
//!   event names both pod UIDs, so an operator can tell them apart with `kubectl`.
//! - A mismatch is a suspect until an answer fetched after it was first seen still shows it (a
//!   pod started since the last answer is missing from it); then it is recorded once per
//!   episode. An episode is one (card, pid, mismatch); it ends when a reading of the card no
//!   longer shows it. Cards not read this slot change nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::gpu::CardInfo;

/// The resource-name prefix whose devices are GPUs.
pub const GPU_RESOURCE_PREFIX: &str = "nvidia.com/";

/// A pod as the kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A container the kubelet allocated a card (or a replica of it) to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder {
    pub pod: PodRef,
    pub container: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pod, self.container)
    }
}

/// One container's devices of one resource, as the kubelet lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDevices {
    pub pod: PodRef,
    pub container: String,
    pub resource: String,
    pub device_ids: Vec<String>,
}

/// The kubelet's List answer, in plain data: every pod on the node (with devices or not) and
/// every container's devices.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodList {
    pub pods: BTreeSet<PodRef>,
    pub devices: Vec<ContainerDevices>,
}

/// Who holds one card.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CardHolders {
    /// Sorted, without repeats.
    pub holders: Vec<Holder>,
    /// The card was allocated as replicas (`UUID::N`): its holders share it.
    pub shared: bool,
}

impl CardHolders {
    /// The card is one pod's alone.
    fn exclusive_pod(&self) -> Option<&PodRef> {
        let first = &self.holders.first()?.pod;
        (!self.shared && self.holders.iter().all(|h| &h.pod == first)).then_some(first)
    }

    fn of_pod(&self, pod: &PodRef) -> Option<&Holder> {
        self.holders.iter().find(|h| &h.pod == pod)
    }
}

/// The kubelet's answer mapped onto this agent's cards.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    pub cards: BTreeMap<String, CardHolders>,
    pub pods: BTreeSet<PodRef>,
    /// `resource=device` of GPU resources that name no card of this agent.
    pub unmapped: Vec<String>,
}

/// The card a device id names, and whether it is a replica (`::N`).
pub fn card_of<'a>(device_id: &str, cards: &'a [CardInfo]) -> Option<(&'a str, bool)> {
    let (id, shared) = match device_id.split_once("::") {
        Some((id, _replica)) => (id, true),
        None => (device_id, false),
    };
    let card = if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) {
        cards
            .iter()
            .find(|c| c.mig.is_none() && c.index.to_string() == id)
    } else {
        cards.iter().find(|c| c.uuid.eq_ignore_ascii_case(id))
    }?;
    Some((card.uuid.as_str(), shared))
}

impl Allocations {
    pub fn map(list: &PodList, cards: &[CardInfo]) -> Self {
        let mut out = Allocations {
            pods: list.pods.clone(),
            ..Default::default()
        };
        for d in &list.devices {
            if !d.resource.starts_with(GPU_RESOURCE_PREFIX) {
                continue;
            }
            out.pods.insert(d.pod.clone());
            for id in &d.device_ids {
                match card_of(id, cards) {
                    Some((uuid, shared)) => {
                        let c = out.cards.entry(uuid.to_string()).or_default();
                        c.shared |= shared;
                        c.holders.push(Holder {
                            pod: d.pod.clone(),
                            container: d.container.clone(),
                        });
                    }
                    None => out.unmapped.push(format!("{}={id}", d.resource)),
                }
            }
        }
        for c in out.cards.values_mut() {
            c.holders.sort();
            c.holders.dedup();
        }
        out
    }

    pub fn holders(&self, card: &str) -> Option<&CardHolders> {
        self.cards.get(card).filter(|c| !c.holders.is_empty())
    }
}

/// A process on a card, as attribution read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen<'a> {
    pub card: &'a str,
    pub pid: u32,
    /// From the process's cgroup path.
    pub pod_uid: Option<&'a str>,
}

/// What the kubelet's allocation says about one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Not a pod's process, on a card no pod holds.
    Host,
    /// The process's pod holds the card: its pod and container.
    Holder(Holder),
    /// A pod's process, not yet bound, on a card several pods share.
    Shared,
    Mismatch(Mismatch),
}

/// A process where the kubelet's allocation says it should not be.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mismatch {
    /// A pod's process on a card allocated to other pods; `pod` is the pod its UID is bound
    /// to, when one is.
    OtherPods {
        pod_uid: String,
        pod: Option<PodRef>,
        holders: Vec<Holder>,
    },
    /// A pod's process on a card the kubelet allocated to no pod.
    Unallocated {
        pod_uid: String,
        pod: Option<PodRef>,
    },
    /// A process outside any pod on a card allocated to a pod.
    OutsidePod { holders: Vec<Holder> },
}

fn holders_text(h: &[Holder]) -> String {
    h.iter()
        .map(Holder::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn pod_text(uid: &str, pod: &Option<PodRef>) -> String {
    match pod {
        Some(p) => format!("pod {p} (uid {uid})"),
        None => format!("pod uid {uid}"),
    }
}

impl Mismatch {
    /// One line for the event's detail and the log.
    pub fn describe(&self) -> String {
        match self {
            Mismatch::OtherPods {
                pod_uid,
                pod: None,
                holders,
            } => format!(
                "process of pod uid {pod_uid}, which the agent cannot tie to the card's pod (its pod's processes are also on other cards or beside another pod's), on a card the kubelet allocated to {}",
                holders_text(holders)
            ),
            Mismatch::OtherPods {
                pod_uid,
                pod,
                holders,
            } => format!(
                "process of {} on a card the kubelet allocated to {}",
                pod_text(pod_uid, pod),
                holders_text(holders)
            ),
            Mismatch::Unallocated { pod_uid, pod } => format!(
                "process of {} on a card the kubelet allocated to no pod",
                pod_text(pod_uid, pod)
            ),
            Mismatch::OutsidePod { holders } => format!(
                "process outside any pod on a card the kubelet allocated to {}",
                holders_text(holders)
            ),
        }
    }
}

/// Pod UID → pod bindings, kept across slots.
#[derive(Debug, Default, Clone)]
pub struct Binder {
    bound: BTreeMap<String, PodRef>,
}

impl Binder {
    /// The pod a UID is bound to.
    pub fn pod_of(&self, uid: &str) -> Option<&PodRef> {
        self.bound.get(uid)
    }

    /// Judges one slot's processes (all cards) against `alloc`; one verdict per process, in
    /// order. Updates the bindings first.
    pub fn judge(&mut self, alloc: &Allocations, seen: &[Seen<'_>]) -> Vec<Verdict> {
        self.bound.retain(|_, pod| alloc.pods.contains(pod));
        self.bind(alloc, seen);
        seen.iter().map(|s| self.verdict(alloc, s)).collect()
    }

    fn bind(&mut self, alloc: &Allocations, seen: &[Seen<'_>]) {
        let mut cards_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for s in seen {
            if let Some(uid) = s.pod_uid {
                cards_of.entry(uid).or_default().insert(s.card);
            }
        }
        // Per pod holding cards alone: the UIDs on them that are not bound to another pod.
        let mut on_pod: BTreeMap<&PodRef, BTreeSet<&str>> = BTreeMap::new();
        for s in seen {
            let (Some(uid), Some(pod)) = (
                s.pod_uid,
                alloc.holders(s.card).and_then(CardHolders::exclusive_pod),
            ) else {
                continue;
            };
            if self.bound.get(uid).is_none_or(|p| p == pod) {
                on_pod.entry(pod).or_default().insert(uid);
            }
        }
        let mut new = Vec::new();
        for (uid, cards) in &cards_of {
            if self.bound.contains_key(*uid) {
                continue;
            }
            // One pod holds some of the UID's cards alone, and is among the holders of all.
            let mut alone = cards
                .iter()
                .filter_map(|c| alloc.holders(c).and_then(CardHolders::exclusive_pod));
            let Some(pod) = alone.next() else {
                continue;
            };
            if alone.any(|p| p != pod)
                || !cards
                    .iter()
                    .all(|c| alloc.holders(c).is_some_and(|h| h.of_pod(pod).is_some()))
            {
                continue;
            }
            if on_pod.get(pod).is_none_or(|uids| uids.len() != 1) {
                continue;
            }
            // The pod bound to another UID that still has processes: not a new pod.
            let other_live = self
                .bound
                .iter()
                .any(|(u, p)| p == pod && u != uid && cards_of.contains_key(u.as_str()));
            if other_live {
                continue;
            }
            new.push((uid.to_string(), pod.clone()));
        }
        for (uid, pod) in new {
            self.bound.retain(|_, p| p != &pod);
            self.bound.insert(uid, pod);
        }
    }

    fn verdict(&self, alloc: &Allocations, s: &Seen<'_>) -> Verdict {
        let holders = alloc.holders(s.card);
        match (s.pod_uid, holders) {
            (None, None) => Verdict::Host,
            (None, Some(h)) => Verdict::Mismatch(Mismatch::OutsidePod {
                holders: h.holders.clone(),
            }),
            (Some(uid), None) => Verdict::Mismatch(Mismatch::Unallocated {
                pod_uid: uid.to_string(),
                pod: self.bound.get(uid).cloned(),
            }),
            (Some(uid), Some(h)) => match self.bound.get(uid) {
                Some(pod) => match h.of_pod(pod) {
                    Some(holder) => Verdict::Holder(holder.clone()),
                    None => Verdict::Mismatch(Mismatch::OtherPods {
                        pod_uid: uid.to_string(),
                        pod: Some(pod.clone()),
                        holders: h.holders.clone(),
                    }),
                },
                None if h.shared => Verdict::Shared,
                None => Verdict::Mismatch(Mismatch::OtherPods {
                    pod_uid: uid.to_string(),
                    pod: None,
                    holders: h.holders.clone(),
                }),
            },
        }
    }
}

/// A mismatch on one card by one process.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Found {
    pub card: String,
    pub pid: u32,
    pub mismatch: Mismatch,
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    first_generation: u64,
    recorded: bool,
}

/// Open mismatch episodes.
#[derive(Debug, Default)]
pub struct Episodes {
    open: BTreeMap<Found, Episode>,
}

impl Episodes {
    /// Takes one slot's mismatches, judged against the answer numbered `generation`, on the
    /// cards read this slot. Returns the episodes to record now, and whether a suspect waits
    /// for a newer answer (the caller asks the kubelet again).
    pub fn update(
        &mut self,
        generation: u64,
        cards_read: &BTreeSet<&str>,
        found: Vec<Found>,
    ) -> (Vec<Found>, bool) {
        let now: BTreeSet<&Found> = found.iter().collect();
        self.open
            .retain(|k, _| !cards_read.contains(k.card.as_str()) || now.contains(k));
        let mut record = Vec::new();
        for f in &found {
            let e = self.open.entry(f.clone()).or_insert(Episode {
                first_generation: generation,
                recorded: false,
            });
            if !e.recorded && generation > e.first_generation {
                e.recorded = true;
                record.push(f.clone());
            }
        }
        let waiting = self.open.values().any(|e| !e.recorded);
        (record, waiting)
    }

    /// Episodes open now (recorded or suspected).
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::MigInfo;

    const A: &str = "GPU-aaaaaaaa-0000-4000-8000-00000000000a";
    const B: &str = "GPU-bbbbbbbb-0000-4000-8000-00000000000b";
    const C: &str = "GPU-cccccccc-0000-4000-8000-00000000000c";
    const MIG: &str = "MIG-dddddddd-0000-4000-8000-00000000000d";
    const U1: &str = "11111111-1111-1111-1111-111111111111";
    const U2: &str = "22222222-2222-2222-2222-222222222222";
    const U3: &str = "33333333-3333-3333-3333-333333333333";

    fn cards() -> Vec<CardInfo> {
        let card = |uuid: &str, index: u32, mig: Option<MigInfo>| CardInfo {
            uuid: uuid.into(),
            index,
            name: "NVIDIA H100".into(),
            serial: None,
            pci_bus_id: None,
            memory_total_bytes: None,
            mig_enabled: None,
            mig,
        };
        vec![
            card(A, 0, None),
            card(B, 1, None),
            card(C, 2, None),
            card(
                MIG,
                3,
                Some(MigInfo {
                    parent_uuid: C.into(),
                    ..Default::default()
                }),
            ),
        ]
    }

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "ml".into(),
            name: name.into(),
        }
    }

    fn holder(name: &str) -> Holder {
        Holder {
            pod: pod(name),
            container: "main".into(),
        }
    }

    fn list(entries: &[(&str, &str, &[&str])]) -> PodList {
        let mut l = PodList::default();
        for (name, resource, ids) in entries {
            l.pods.insert(pod(name));
            if !ids.is_empty() {
                l.devices.push(ContainerDevices {
                    pod: pod(name),
                    container: "main".into(),
                    resource: (*resource).into(),
                    device_ids: ids.iter().map(|s| s.to_string()).collect(),
                });
            }
        }
        l
    }

    fn seen<'a>(card: &'a str, pid: u32, uid: Option<&'a str>) -> Seen<'a> {
        Seen {
            card,
            pid,
            pod_uid: uid,
        }
    }

    #[test]
    fn device_ids_name_cards_by_uuid_index_mig_and_replica() {
        let c = cards();
        assert_eq!(card_of(A, &c), Some((A, false)));
        assert_eq!(card_of(&A.to_lowercase(), &c), Some((A, false)));
        assert_eq!(card_of("1", &c), Some((B, false)));
        assert_eq!(card_of(MIG, &c), Some((MIG, false)));
        assert_eq!(card_of(&format!("{C}::3"), &c), Some((C, true)));
        assert_eq!(card_of("2::0", &c), Some((C, true)));
        // Index 3 is a MIG device's: indexes name whole cards only.
        assert_eq!(card_of("3", &c), None);
        assert_eq!(card_of("GPU-unknown", &c), None);
        assert_eq!(card_of("", &c), None);
    }

    #[test]
    fn the_answer_maps_gpu_resources_only_and_keeps_unmapped_ids() {
        let mut l = list(&[
            ("train", "nvidia.com/gpu", &[A, "1"]),
            ("infer", "nvidia.com/mig-1g.10gb", &[MIG]),
            (
                "shared-a",
                "nvidia.com/gpu.shared",
                &["GPU-cccccccc-0000-4000-8000-00000000000c::0"],
            ),
            (
                "shared-b",
                "nvidia.com/gpu.shared",
                &["GPU-cccccccc-0000-4000-8000-00000000000c::1"],
            ),
            ("nic", "example.com/nic", &["0"]),
            ("idle", "", &[]),
        ]);
        l.devices.push(ContainerDevices {
            pod: pod("train"),
            container: "main".into(),
            resource: "nvidia.com/gpu".into(),
            device_ids: vec!["GPU-gone".into()],
        });
        let a = Allocations::map(&l, &cards());
        assert_eq!(a.holders(A).unwrap().holders, vec![holder("train")]);
        assert_eq!(a.holders(B).unwrap().holders, vec![holder("train")]);
        assert_eq!(a.holders(MIG).unwrap().holders, vec![holder("infer")]);
        let c = a.holders(C).unwrap();
        assert!(c.shared);
        assert_eq!(c.holders, vec![holder("shared-a"), holder("shared-b")]);
        assert_eq!(a.unmapped, vec!["nvidia.com/gpu=GPU-gone".to_string()]);
        assert!(a.pods.contains(&pod("idle")) && a.pods.contains(&pod("nic")));
        assert_eq!(a.cards.len(), 4);
    }

    #[test]
    fn a_pods_process_on_its_own_cards_is_named_with_its_container() {
        let a = Allocations::map(&list(&[("train", "nvidia.com/gpu", &[A, B])]), &cards());
        let mut b = Binder::default();
        let v = b.judge(&a, &[seen(A, 10, Some(U1)), seen(B, 11, Some(U1))]);
        assert_eq!(v, vec![Verdict::Holder(holder("train")); 2]);
        assert_eq!(b.pod_of(U1), Some(&pod("train")));
        // A host process on a card no pod holds: nothing to say.
        assert_eq!(b.judge(&a, &[seen(C, 12, None)]), vec![Verdict::Host]);
    }

    #[test]
    fn a_bound_pod_on_another_pods_card_is_a_mismatch_naming_both() {
        let a = Allocations::map(
            &list(&[("a", "nvidia.com/gpu", &[A]), ("b", "nvidia.com/gpu", &[B])]),
            &cards(),
        );
        let mut bd = Binder::default();
        bd.judge(&a, &[seen(A, 10, Some(U1)), seen(B, 20, Some(U2))]);
        // Pod a's process turns up on b's card too.
        let v = bd.judge(
            &a,
            &[
                seen(A, 10, Some(U1)),
                seen(B, 20, Some(U2)),
                seen(B, 11, Some(U1)),
            ],
        );
        assert_eq!(v[0], Verdict::Holder(holder("a")));
        assert_eq!(v[1], Verdict::Holder(holder("b")));
        let m = Mismatch::OtherPods {
            pod_uid: U1.into(),
            pod: Some(pod("a")),
            holders: vec![holder("b")],
        };
        assert_eq!(v[2], Verdict::Mismatch(m.clone()));
        assert_eq!(
            m.describe(),
            format!("process of pod ml/a (uid {U1}) on a card the kubelet allocated to ml/b/main")
        );
    }

    #[test]
    fn an_unbound_pod_on_two_pods_cards_is_bound_to_neither() {
        let a = Allocations::map(
            &list(&[("a", "nvidia.com/gpu", &[A]), ("b", "nvidia.com/gpu", &[B])]),
            &cards(),
        );
        let mut bd = Binder::default();
        let v = bd.judge(&a, &[seen(A, 10, Some(U1)), seen(B, 11, Some(U1))]);
        assert!(
            v.iter()
                .all(|v| matches!(v, Verdict::Mismatch(Mismatch::OtherPods { pod: None, .. })))
        );
        assert_eq!(bd.pod_of(U1), None);
        // Two pods' processes on one exclusive card: neither is bound; both are reported.
        let v = bd.judge(&a, &[seen(A, 10, Some(U1)), seen(A, 12, Some(U2))]);
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|v| matches!(v, Verdict::Mismatch(_))), "{v:?}");
    }

    #[test]
    fn the_owner_binds_even_beside_a_known_intruder() {
        let a = Allocations::map(
            &list(&[("a", "nvidia.com/gpu", &[A]), ("b", "nvidia.com/gpu", &[B])]),
            &cards(),
        );
        let mut bd = Binder::default();
        bd.judge(&a, &[seen(A, 10, Some(U1))]);
        let v = bd.judge(&a, &[seen(B, 11, Some(U1)), seen(B, 20, Some(U2))]);
        assert!(matches!(
            v[0],
            Verdict::Mismatch(Mismatch::OtherPods { .. })
        ));
        assert_eq!(v[1], Verdict::Holder(holder("b")));
    }

    #[test]
    fn unallocated_cards_and_processes_outside_pods_are_mismatches() {
        let a = Allocations::map(&list(&[("a", "nvidia.com/gpu", &[A])]), &cards());
        let mut bd = Binder::default();
        let v = bd.judge(
            &a,
            &[
                seen(A, 10, Some(U1)),
                seen(C, 11, Some(U2)),
                seen(A, 12, None),
            ],
        );
        assert_eq!(v[0], Verdict::Holder(holder("a")));
        assert_eq!(
            v[1],
            Verdict::Mismatch(Mismatch::Unallocated {
                pod_uid: U2.into(),
                pod: None
            })
        );
        assert_eq!(
            v[2],
            Verdict::Mismatch(Mismatch::OutsidePod {
                holders: vec![holder("a")]
            })
        );
    }

    #[test]
    fn shared_cards_name_only_pods_bound_elsewhere() {
        let mut l = list(&[
            ("s1", "nvidia.com/gpu", &[&format!("{C}::0"), A]),
            ("s2", "nvidia.com/gpu", &[&format!("{C}::1")]),
        ]);
        l.pods.insert(pod("other"));
        let a = Allocations::map(&l, &cards());
        let mut bd = Binder::default();
        let v = bd.judge(
            &a,
            &[
                seen(C, 10, Some(U1)),
                seen(C, 20, Some(U2)),
                seen(A, 11, Some(U1)),
            ],
        );
        // s1 is bound through its own card A; s2's UID cannot be told from s1's on C.
        assert_eq!(v[0], Verdict::Holder(holder("s1")));
        assert_eq!(v[1], Verdict::Shared);
        assert_eq!(v[2], Verdict::Holder(holder("s1")));
    }

    #[test]
    fn a_pod_recreated_under_its_name_is_bound_again_and_gone_pods_unbound() {
        let a = Allocations::map(&list(&[("a", "nvidia.com/gpu", &[A])]), &cards());
        let mut bd = Binder::default();
        bd.judge(&a, &[seen(A, 10, Some(U1))]);
        // The old UID has no process left; the new one on the pod's card takes the name.
        let v = bd.judge(&a, &[seen(A, 30, Some(U3))]);
        assert_eq!(v, vec![Verdict::Holder(holder("a"))]);
        assert_eq!(bd.pod_of(U1), None);
        assert_eq!(bd.pod_of(U3), Some(&pod("a")));
        // While the old UID still runs somewhere, a second UID is not the pod.
        let v = bd.judge(&a, &[seen(A, 30, Some(U3)), seen(A, 40, Some(U2))]);
        assert_eq!(v[0], Verdict::Holder(holder("a")));
        assert!(matches!(v[1], Verdict::Mismatch(_)));
        // The pod leaves the kubelet's answer: its binding goes with it.
        let empty = Allocations::map(&list(&[]), &cards());
        bd.judge(&empty, &[]);
        assert_eq!(bd.pod_of(U3), None);
    }

    #[test]
    fn a_mismatch_is_recorded_once_after_a_newer_answer_confirms_it() {
        let mut e = Episodes::default();
        let f = Found {
            card: A.into(),
            pid: 10,
            mismatch: Mismatch::Unallocated {
                pod_uid: U1.into(),
                pod: None,
            },
        };
        let read: BTreeSet<&str> = [A].into();
        // Seen against answer 4: a suspect, and a newer answer is wanted.
        assert_eq!(e.update(4, &read, vec![f.clone()]), (vec![], true));
        assert_eq!(e.update(4, &read, vec![f.clone()]), (vec![], true));
        // Answer 5 still shows it: recorded, once.
        assert_eq!(
            e.update(5, &read, vec![f.clone()]),
            (vec![f.clone()], false)
        );
        assert_eq!(e.update(6, &read, vec![f.clone()]), (vec![], false));
        // A slot that did not read the card changes nothing.
        assert_eq!(e.update(6, &BTreeSet::new(), vec![]), (vec![], false));
        assert_eq!(e.open(), 1);
        // The card read without it ends the episode; seen again, it is a new one.
        assert_eq!(e.update(6, &read, vec![]), (vec![], false));
        assert_eq!(e.open(), 0);
        assert_eq!(e.update(6, &read, vec![f.clone()]), (vec![], true));
        assert_eq!(e.update(7, &read, vec![f.clone()]), (vec![f], false));
        // A suspect that a newer answer no longer shows is never recorded.
        let g = Found {
            card: B.into(),
            pid: 11,
            mismatch: Mismatch::OutsidePod { holders: vec![] },
        };
        let read_b: BTreeSet<&str> = [B].into();
        assert_eq!(e.update(7, &read_b, vec![g]), (vec![], true));
        assert_eq!(e.update(8, &read_b, vec![]), (vec![], false));
    }
}

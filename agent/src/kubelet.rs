//! The kubelet's pod-resources API (`v1.PodResourcesLister` on a unix socket, normally
//! `/var/lib/kubelet/pod-resources/kubelet.sock`): a client; the task that keeps the kubelet's
//! List answer mapped onto the cards (asked every `kubelet_refresh_ms`, sooner when the reader
//! asks, never more than once a second: the kubelet rate-limits this API); and the reader's
//! step that names pods in identities and turns confirmed mismatches into events. The rules
//! are in `crate::pods`; generated types stop in this file.
//!
//! When the kubelet does not answer (no socket, an error, a timeout), attribution falls back to
//! cgroup paths: identities carry the pod UID and container id only, and nothing is judged. The
//! agent warns once when the API stops answering and says when it answers again;
//! `gpumeter_agent_kubelet_pod_resources_up` and `probe --kubelet-socket` show the state.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gpumeter_proto::podresources::v1 as pr;
use gpumeter_proto::v1;
use hyper_util::rt::TokioIo;
use pr::pod_resources_lister_client::PodResourcesListerClient;
use tokio::net::UnixStream;
use tokio::sync::{Notify, watch};
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::{info, warn};

use crate::attribution::Identity;
use crate::clock::UnixMs;
use crate::gpu::{CardInfo, CardReading};
use crate::pods::{
    Allocations, Binder, ContainerDevices, Episodes, Found, PodList, PodRef, Seen, Verdict,
};

/// The least time between two List calls, however often the reader asks.
pub const MIN_GAP: Duration = Duration::from_secs(1);
/// How long one call (connect included) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer accepted (a node's pods and devices are far smaller).
const MAX_ANSWER: usize = 16 << 20;

/// Why the kubelet gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("cannot connect to the kubelet's pod-resources socket {socket}: {reason}")]
    Connect { socket: String, reason: String },
    #[error("kubelet pod-resources {method} failed: {code}: {message}")]
    Call {
        method: &'static str,
        code: String,
        message: String,
    },
}

/// An error with its causes, so "transport error" says what went wrong underneath.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// A client of one kubelet socket. Each call opens its own connection: calls are seconds
/// apart, and a kubelet restarted in between (a new socket) is found without reconnect state.
#[derive(Debug, Clone)]
pub struct PodResourcesClient {
    socket: PathBuf,
}

impl PodResourcesClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(&self) -> Result<PodResourcesListerClient<Channel>, KubeletError> {
        let path = self.socket.clone();
        // The URI is not used: the connector always opens the socket.
        let channel =
            Endpoint::from_static("http://kubelet.invalid")
                .connect_timeout(CALL_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .map_err(|e| KubeletError::Connect {
                    socket: self.socket.display().to_string(),
                    reason: with_causes(&e),
                })?;
        Ok(PodResourcesListerClient::new(channel).max_decoding_message_size(MAX_ANSWER))
    }

    fn call_error(method: &'static str, s: &tonic::Status) -> KubeletError {
        KubeletError::Call {
            method,
            code: format!("{:?}", s.code()),
            message: s.message().to_string(),
        }
    }

    /// Every pod on the node and its containers' devices.
    pub async fn list(&self) -> Result<PodList, KubeletError> {
        let answer = self
            .connect()
            .await?
            .list(pr::ListPodResourcesRequest {})
            .await
            .map_err(|s| Self::call_error("List", &s))?
            .into_inner();
        Ok(pod_list(answer))
    }

    /// The devices the kubelet knows, by resource: `None` when this kubelet does not serve
    /// `GetAllocatableResources` (older kubelets, or its feature gate off).
    pub async fn allocatable(&self) -> Result<Option<Vec<(String, Vec<String>)>>, KubeletError> {
        match self
            .connect()
            .await?
            .get_allocatable_resources(pr::AllocatableResourcesRequest {})
            .await
        {
            Ok(r) => Ok(Some(
                r.into_inner()
                    .devices
                    .into_iter()
                    .map(|d| (d.resource_name, d.device_ids))
                    .collect(),
            )),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
            Err(s) => Err(Self::call_error("GetAllocatableResources", &s)),
        }
    }
}

/// The gRPC answer in plain data.
pub fn pod_list(answer: pr::ListPodResourcesResponse) -> PodList {
    let mut list = PodList::default();
    for p in answer.pod_resources {
        let pod = PodRef {
            namespace: p.namespace,
            name: p.name,
        };
        for c in p.containers {
            for d in c.devices {
                list.devices.push(ContainerDevices {
                    pod: pod.clone(),
                    container: c.name.clone(),
                    resource: d.resource_name,
                    device_ids: d.device_ids,
                });
            }
        }
        list.pods.insert(pod);
    }
    list
}

/// The latest state of the kubelet's answer.
#[derive(Debug, Clone, Default)]
pub struct KubeletSnapshot {
    /// Answers received so far; the number of the one held.
    pub generation: u64,
    /// The latest answer mapped onto the cards; `None` while the kubelet does not answer.
    pub allocations: Option<Arc<Allocations>>,
    /// Why the last call failed, while it fails.
    pub error: Option<String>,
    /// Calls that failed since the agent started.
    pub failures: u64,
}

/// What the metrics endpoint reads.
#[derive(Debug, Clone)]
pub struct KubeletHandle {
    pub snapshot: watch::Receiver<KubeletSnapshot>,
    /// Mismatches recorded since the agent started.
    pub mismatches: Arc<AtomicU64>,
}

/// Keeps the kubelet's answer fresh.
#[derive(Debug)]
pub struct Refresher {
    pub client: PodResourcesClient,
    pub cards: Vec<CardInfo>,
    pub every: Duration,
    pub nudge: Arc<Notify>,
    pub tx: watch::Sender<KubeletSnapshot>,
}

impl Refresher {
    /// Asks the kubelet until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let socket = self.client.socket().display().to_string();
        let mut snap = KubeletSnapshot::default();
        // `None` until the first call: the first failure warns too.
        let mut up: Option<bool> = None;
        loop {
            let asked = tokio::time::Instant::now();
            match self.client.list().await {
                Ok(list) => {
                    let a = Allocations::map(&list, &self.cards);
                    if up != Some(true) {
                        info!(
                            %socket,
                            pods = a.pods.len(),
                            cards_allocated = a.cards.len(),
                            unmapped = ?a.unmapped,
                            "kubelet pod-resources API answers; naming pods from it"
                        );
                    }
                    up = Some(true);
                    snap.generation += 1;
                    snap.allocations = Some(Arc::new(a));
                    snap.error = None;
                }
                Err(e) => {
                    if up != Some(false) {
                        warn!(
                            %socket,
                            error = %e,
                            "kubelet pod-resources API does not answer; attributing pods from cgroup paths only until it does"
                        );
                    }
                    up = Some(false);
                    snap.failures += 1;
                    snap.allocations = None;
                    snap.error = Some(e.to_string());
                }
            }
            self.tx.send_replace(snap.clone());
            tokio::select! {
                _ = tokio::time::sleep(self.every) => {}
                _ = self.nudge.notified() => {
                    tokio::time::sleep_until(asked + MIN_GAP).await;
                }
                r = shutdown.changed() => {
                    // The agent is gone with its shutdown sender: so is the reason to ask.
                    if r.is_err() {
                        return;
                    }
                }
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

/// Starts the refresher; the reader's step and the metrics handle come back.
pub fn start(
    socket: &Path,
    cards: Vec<CardInfo>,
    every: Duration,
    shutdown: watch::Receiver<bool>,
) -> (PodAttribution, KubeletHandle) {
    let (tx, rx) = watch::channel(KubeletSnapshot::default());
    let nudge = Arc::new(Notify::new());
    tokio::spawn(
        Refresher {
            client: PodResourcesClient::new(socket),
            cards,
            every,
            nudge: nudge.clone(),
            tx,
        }
        .run(shutdown),
    );
    let mismatches = Arc::new(AtomicU64::new(0));
    (
        PodAttribution {
            snapshot: rx.clone(),
            nudge,
            binder: Binder::default(),
            episodes: Episodes::default(),
            mismatches: mismatches.clone(),
        },
        KubeletHandle {
            snapshot: rx,
            mismatches,
        },
    )
}

/// The reader's step (on its blocking thread): names pods and judges processes against the
/// latest answer.
#[derive(Debug)]
pub struct PodAttribution {
    snapshot: watch::Receiver<KubeletSnapshot>,
    nudge: Arc<Notify>,
    binder: Binder,
    episodes: Episodes,
    mismatches: Arc<AtomicU64>,
}

impl PodAttribution {
    /// Sets the kubelet's pod and container names on the identities of processes whose pod
    /// holds their card, and returns the mismatches to record (events at `at`). Without an
    /// answer it does nothing: attribution stays with cgroup paths.
    pub fn apply(
        &mut self,
        at: UnixMs,
        readings: &mut [(CardReading, Vec<Option<Identity>>)],
    ) -> Vec<v1::Event> {
        let snap = self.snapshot.borrow().clone();
        let Some(alloc) = snap.allocations else {
            return Vec::new();
        };
        let mut place = Vec::new();
        let verdicts = {
            let mut seen = Vec::new();
            for (ri, (reading, ids)) in readings.iter().enumerate() {
                let CardReading::Ok(s) = reading else {
                    continue;
                };
                for (pi, (p, id)) in s.processes.iter().zip(ids).enumerate() {
                    if let Some(id) = id {
                        seen.push(Seen {
                            card: &s.uuid,
                            pid: p.pid,
                            pod_uid: id.k8s_pod_uid.as_deref(),
                        });
                        place.push((ri, pi));
                    }
                }
            }
            self.binder.judge(&alloc, &seen)
        };
        let mut found = Vec::new();
        for ((ri, pi), v) in place.into_iter().zip(verdicts) {
            let (reading, ids) = &mut readings[ri];
            match v {
                Verdict::Holder(h) => {
                    if let Some(Some(id)) = ids.get_mut(pi) {
                        id.k8s_namespace = Some(h.pod.namespace);
                        id.k8s_pod_name = Some(h.pod.name);
                        id.k8s_container_name = Some(h.container);
                    }
                }
                Verdict::Mismatch(m) => {
                    if let CardReading::Ok(s) = reading {
                        found.push(Found {
                            card: s.uuid.clone(),
                            pid: s.processes[pi].pid,
                            mismatch: m,
                        });
                    }
                }
                Verdict::Host | Verdict::Shared => {}
            }
        }
        let read: BTreeSet<&str> = readings
            .iter()
            .filter_map(|(r, _)| match r {
                CardReading::Ok(s) => Some(s.uuid.as_str()),
                _ => None,
            })
            .collect();
        let (record, waiting) = self.episodes.update(snap.generation, &read, found);
        if waiting {
            self.nudge.notify_one();
        }
        self.mismatches
            .fetch_add(record.len() as u64, Ordering::Relaxed);
        record
            .into_iter()
            .map(|f| {
                let detail = f.mismatch.describe();
                warn!(gpu = %f.card, pid = f.pid, %detail, "pod device mismatch");
                v1::Event {
                    kind: v1::EventKind::PodDeviceMismatch as i32,
                    gpu_uuid: f.card,
                    at_unix_ms: at,
                    code: i64::from(f.pid),
                    detail,
                    enforcement: None,
                }
            })
            .collect()
    }
}

/// What `probe --kubelet-socket` prints: whether the kubelet answers, the GPU devices it
/// knows, and which pod holds each card.
pub async fn probe_report(socket: &Path, cards: &[CardInfo]) -> serde_json::Value {
    use serde_json::json;
    let client = PodResourcesClient::new(socket);
    let list = client.list().await;
    let allocatable = client.allocatable().await;
    let mut out = json!({ "socket": socket.display().to_string() });
    match list {
        Ok(list) => {
            let a = Allocations::map(&list, cards);
            out["up"] = json!(true);
            out["pods"] = json!(a.pods.len());
            out["cards"] = a
                .cards
                .iter()
                .map(|(uuid, h)| {
                    (
                        uuid.clone(),
                        json!({
                            "holders": h.holders.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                            "shared": h.shared,
                        }),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into();
            out["unmapped"] = json!(a.unmapped);
        }
        Err(e) => {
            out["up"] = json!(false);
            out["error"] = json!(e.to_string());
        }
    }
    out["allocatable"] = match allocatable {
        Ok(Some(devs)) => {
            // One entry per device or per NUMA node: gathered by resource.
            let mut by: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for (r, ids) in devs {
                if r.starts_with(crate::pods::GPU_RESOURCE_PREFIX) {
                    by.entry(r).or_default().extend(ids);
                }
            }
            json!(by)
        }
        Ok(None) => json!("not served by this kubelet"),
        Err(e) => json!({ "error": e.to_string() }),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::ProcessIdentity;
    use crate::gpu::{CardSample, GpuProcess, ProcessSources};
    use pr::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};

    const A: &str = "GPU-aaaaaaaa-0000-4000-8000-00000000000a";
    const B: &str = "GPU-bbbbbbbb-0000-4000-8000-00000000000b";
    const U1: &str = "11111111-1111-4111-8111-111111111111";

    /// A kubelet older than GetAllocatableResources: List only.
    struct OldKubelet;

    #[tonic::async_trait]
    impl PodResourcesLister for OldKubelet {
        async fn list(
            &self,
            _: tonic::Request<pr::ListPodResourcesRequest>,
        ) -> Result<tonic::Response<pr::ListPodResourcesResponse>, tonic::Status> {
            Ok(tonic::Response::new(pr::ListPodResourcesResponse {
                pod_resources: vec![pr::PodResources {
                    name: "train".into(),
                    namespace: "ml".into(),
                    containers: vec![pr::ContainerResources {
                        name: "trainer".into(),
                        devices: vec![pr::ContainerDevices {
                            resource_name: "nvidia.com/gpu".into(),
                            device_ids: vec![A.into()],
                            topology: None,
                        }],
                        cpu_ids: vec![3],
                    }],
                }],
            }))
        }

        async fn get_allocatable_resources(
            &self,
            _: tonic::Request<pr::AllocatableResourcesRequest>,
        ) -> Result<tonic::Response<pr::AllocatableResourcesResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not served"))
        }

        async fn get(
            &self,
            _: tonic::Request<pr::GetPodResourcesRequest>,
        ) -> Result<tonic::Response<pr::GetPodResourcesResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("not served"))
        }
    }

    fn card(uuid: &str, index: u32) -> CardInfo {
        CardInfo {
            uuid: uuid.into(),
            index,
            name: "NVIDIA L4".into(),
            serial: None,
            pci_bus_id: None,
            memory_total_bytes: None,
            mig_enabled: None,
            mig: None,
        }
    }

    #[tokio::test]
    async fn the_client_lists_over_a_unix_socket_and_knows_what_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kubelet.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(OldKubelet))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let client = PodResourcesClient::new(&socket);
        let list = client.list().await.unwrap();
        let train = PodRef {
            namespace: "ml".into(),
            name: "train".into(),
        };
        assert_eq!(list.pods, [train.clone()].into());
        assert_eq!(
            list.devices,
            vec![ContainerDevices {
                pod: train,
                container: "trainer".into(),
                resource: "nvidia.com/gpu".into(),
                device_ids: vec![A.into()],
            }]
        );
        assert_eq!(client.allocatable().await.unwrap(), None);
        let report = probe_report(&socket, &[card(A, 0)]).await;
        assert_eq!(report["up"], serde_json::json!(true));
        assert_eq!(
            report["allocatable"],
            serde_json::json!("not served by this kubelet")
        );

        // No socket: the error names it and says why underneath "transport error".
        let gone = dir.path().join("gone.sock");
        let e = PodResourcesClient::new(&gone).list().await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("gone.sock"), "{text}");
        assert!(text.contains("No such file or directory"), "{text}");
    }

    fn reading(uuid: &str, pids: &[u32]) -> CardReading {
        CardReading::Ok(CardSample {
            uuid: uuid.into(),
            processes: pids
                .iter()
                .map(|&pid| GpuProcess {
                    pid,
                    used_memory_bytes: None,
                    sm_util_pct: None,
                    graphics: false,
                    accounting: None,
                    seen_in: ProcessSources {
                        list: true,
                        ..Default::default()
                    },
                })
                .collect(),
            ..Default::default()
        })
    }

    fn in_pod(uid: &str) -> Option<Identity> {
        Some(Identity::from_parts(ProcessIdentity {
            uid: Some(1000),
            cgroup: Some(format!("/kubepods/burstable/pod{uid}/0123")),
            ..Default::default()
        }))
    }

    #[test]
    fn the_readers_step_names_holders_and_records_confirmed_mismatches_once() {
        let cards = [card(A, 0), card(B, 1)];
        let list = PodList {
            pods: [PodRef {
                namespace: "ml".into(),
                name: "train".into(),
            }]
            .into(),
            devices: vec![ContainerDevices {
                pod: PodRef {
                    namespace: "ml".into(),
                    name: "train".into(),
                },
                container: "trainer".into(),
                resource: "nvidia.com/gpu".into(),
                device_ids: vec!["0".into()],
            }],
        };
        let (tx, rx) = watch::channel(KubeletSnapshot::default());
        let nudge = Arc::new(Notify::new());
        let mismatches = Arc::new(AtomicU64::new(0));
        let mut step = PodAttribution {
            snapshot: rx,
            nudge: nudge.clone(),
            binder: Binder::default(),
            episodes: Episodes::default(),
            mismatches: mismatches.clone(),
        };
        let slot = || {
            vec![
                (reading(A, &[10]), vec![in_pod(U1)]),
                (reading(B, &[11]), vec![in_pod(U1)]),
            ]
        };
        // No answer yet: cgroup paths only, nothing judged.
        let mut r = slot();
        assert!(step.apply(0, &mut r).is_empty());
        assert_eq!(r[0].1[0].as_ref().unwrap().k8s_pod_name, None);
        assert_eq!(r[0].1[0].as_ref().unwrap().k8s_pod_uid.as_deref(), Some(U1));

        let put = |generation| {
            tx.send_replace(KubeletSnapshot {
                generation,
                allocations: Some(Arc::new(Allocations::map(&list, &cards))),
                ..Default::default()
            })
        };
        put(1);
        // The pod's process on card B, which no pod holds: the UID is on an unallocated card
        // too, so it is bound to no pod; both are suspects until a newer answer.
        let mut r = slot();
        assert!(step.apply(1_000, &mut r).is_empty());
        assert_eq!(r[0].1[0].as_ref().unwrap().k8s_pod_name, None);
        assert_eq!(mismatches.load(Ordering::Relaxed), 0);
        put(2);
        let events = step.apply(2_000, &mut slot());
        assert_eq!(events.len(), 2, "{events:?}");
        let on_b = events.iter().find(|e| e.gpu_uuid == B).unwrap();
        assert_eq!(on_b.kind, v1::EventKind::PodDeviceMismatch as i32);
        assert_eq!((on_b.code, on_b.at_unix_ms), (11, 2_000));
        assert_eq!(
            on_b.detail,
            format!("process of pod uid {U1} on a card the kubelet allocated to no pod")
        );
        let on_a = events.iter().find(|e| e.gpu_uuid == A).unwrap();
        assert!(
            on_a.detail.starts_with(&format!(
                "process of pod uid {U1}, which the agent cannot tie to the card's pod"
            )) && on_a.detail.ends_with("allocated to ml/train/trainer"),
            "{}",
            on_a.detail
        );
        assert!(
            step.apply(3_000, &mut slot()).is_empty(),
            "once per episode"
        );
        assert_eq!(mismatches.load(Ordering::Relaxed), 2);

        // The stray process leaves card B: the pod is bound, its process named.
        put(3);
        let mut r = vec![
            (reading(A, &[10]), vec![in_pod(U1)]),
            (reading(B, &[]), vec![]),
        ];
        assert!(step.apply(4_000, &mut r).is_empty());
        let id = r[0].1[0].as_ref().unwrap();
        assert_eq!(
            (
                id.k8s_namespace.as_deref(),
                id.k8s_pod_name.as_deref(),
                id.k8s_container_name.as_deref()
            ),
            (Some("ml"), Some("train"), Some("trainer"))
        );
    }
}

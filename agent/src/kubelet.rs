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
                _ = shutdown.changed() => {}
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

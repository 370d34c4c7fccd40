//! The real `gpumeter-agent` binary against the fake libnvidia-ml, a procfs written by the test
//! (`[attribution] proc_root`: pods' processes by their cgroup paths) and a real gRPC server
//! implementing the kubelet's `v1.PodResourcesLister` on a unix socket in a temp directory,
//! streaming to a real in-process collector with a real SQLite file. What the collector stored
//! (the signed window bodies and the events) is checked.

// Helpers outside `#[test]` fns too: in a test, a panic is how a failure is reported.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gpumeter_e2e::{TestCollector, bin, target_dir};
use gpumeter_proto::podresources::v1 as pr;
use gpumeter_proto::v1;
use pr::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};
use prost::Message;
use rusqlite::Connection;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const HOST: &str = "k8s-node-1";
const PATIENCE: Duration = Duration::from_secs(30);
const GIB: u64 = 1 << 30;
const CARD_A: &str = "GPU-6b0c1d2e-0000-4000-8000-0000000000a1";
const CARD_B: &str = "GPU-6b0c1d2e-0000-4000-8000-0000000000b2";
const TRAIN_UID: &str = "7d3f1a20-1111-4222-8333-000000000001";
const INFER_UID: &str = "7d3f1a20-1111-4222-8333-000000000002";
/// Pids of processes that exist only in the test's procfs.
const TRAIN_PID: u32 = 4_100_001;
const INFER_PID: u32 = 4_100_002;
const STRAY_PID: u32 = 4_100_003;

// ---- the kubelet ----

/// A PodResourcesLister answering from a List reply the test may change.
#[derive(Clone)]
struct Kubelet {
    list: Arc<Mutex<pr::ListPodResourcesResponse>>,
    calls: Arc<Mutex<u64>>,
}

#[tonic::async_trait]
impl PodResourcesLister for Kubelet {
    async fn list(
        &self,
        _: tonic::Request<pr::ListPodResourcesRequest>,
    ) -> Result<tonic::Response<pr::ListPodResourcesResponse>, tonic::Status> {
        *self.calls.lock().unwrap() += 1;
        Ok(tonic::Response::new(self.list.lock().unwrap().clone()))
    }

    async fn get_allocatable_resources(
        &self,
        _: tonic::Request<pr::AllocatableResourcesRequest>,
    ) -> Result<tonic::Response<pr::AllocatableResourcesResponse>, tonic::Status> {
        Ok(tonic::Response::new(pr::AllocatableResourcesResponse {
            devices: vec![devices("nvidia.com/gpu", &[CARD_A, "1"])],
            cpu_ids: vec![0, 1],
        }))
    }

    async fn get(
        &self,
        r: tonic::Request<pr::GetPodResourcesRequest>,
    ) -> Result<tonic::Response<pr::GetPodResourcesResponse>, tonic::Status> {
        let r = r.into_inner();
        let list = self.list.lock().unwrap();
        let pod = list
            .pod_resources
            .iter()
            .find(|p| p.name == r.pod_name && p.namespace == r.pod_namespace)
            .cloned()
            .ok_or_else(|| tonic::Status::not_found("no such pod"))?;
        Ok(tonic::Response::new(pr::GetPodResourcesResponse {
            pod_resources: Some(pod),
        }))
    }
}

fn devices(resource: &str, ids: &[&str]) -> pr::ContainerDevices {
    pr::ContainerDevices {
        resource_name: resource.into(),
        device_ids: ids.iter().map(|s| s.to_string()).collect(),
        topology: Some(pr::TopologyInfo {
            nodes: vec![pr::NumaNode { id: 0 }],
        }),
    }
}

fn pod(ns: &str, name: &str, container: &str, devs: Vec<pr::ContainerDevices>) -> pr::PodResources {
    pr::PodResources {
        name: name.into(),
        namespace: ns.into(),
        containers: vec![pr::ContainerResources {
            name: container.into(),
            devices: devs,
            cpu_ids: vec![],
        }],
    }
}

/// The node's pods: ml/train holds card A by UUID, ml/infer card B by index (as the device
/// plugin's index strategy names it), and a pod without GPUs.
fn node_pods() -> pr::ListPodResourcesResponse {
    pr::ListPodResourcesResponse {
        pod_resources: vec![
            pod(
                "ml",
                "train",
                "trainer",
                vec![devices("nvidia.com/gpu", &[CARD_A])],
            ),
            pod(
                "ml",
                "infer",
                "server",
                vec![devices("nvidia.com/gpu", &["1"])],
            ),
            pod("kube-system", "coredns", "coredns", vec![]),
        ],
    }
}

/// A served kubelet socket; stopping it removes the socket, as a kubelet going away does.
struct Served {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Served {
    fn start(socket: &Path, kubelet: Kubelet) -> Served {
        let _ = fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(PodResourcesListerServer::new(kubelet))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async {
                        let _ = rx.await;
                    },
                )
                .await
                .unwrap();
        });
        Served {
            socket: socket.to_path_buf(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

// ---- the node ----

/// A procfs entry for a process running as `uid` in `cgroup`.
fn fake_process(proc_root: &Path, pid: u32, uid: u32, cgroup: &str) {
    let dir = proc_root.join(pid.to_string());
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("status"),
        format!("Name:\tpython\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\nGroups:\t{uid}\n"),
    )
    .unwrap();
    fs::write(dir.join("cgroup"), format!("0::{cgroup}\n")).unwrap();
}

/// The cgroup of a container of pod `uid` under the systemd driver and containerd.
fn pod_cgroup(uid: &str, container: u64) -> String {
    format!(
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container:064x}.scope",
        uid.replace('-', "_")
    )
}

fn scenario(stray: bool) -> Value {
    let proc = |pid: u32| json!({ "pid": pid, "used_memory": GIB, "sm_util": 40 });
    let mut on_b = vec![proc(INFER_PID)];
    if stray {
        on_b.push(proc(STRAY_PID));
    }
    let card = |uuid: &str, procs: Vec<Value>| {
        json!({
            "uuid": uuid, "memory_total": 80 * GIB, "memory_used": GIB,
            "power_mw": 100_000, "energy_mj": 1_000, "util_gpu": 50, "util_mem": 10,
            "processes": procs
        })
    };
    json!({ "cards": [card(CARD_A, vec![proc(TRAIN_PID)]), card(CARD_B, on_b)] })
}

fn write_scenario(dir: &Path, scenario: &Value) {
    let tmp = dir.join("scenario.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(scenario).unwrap()).unwrap();
    fs::rename(&tmp, dir.join("fake-nvml-scenario.json")).unwrap();
}

struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl AgentProcess {
    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `probe` until it gives a value; fails with the agent's log when `PATIENCE` runs
    /// out or the agent exits.
    async fn until<T>(&mut self, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(v) = probe() {
                return v;
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none(),
                "the agent exited ({exited:?}) while waiting for {what}; log:\n{}",
                self.log()
            );
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A principal's workload identity in one stored window.
#[derive(Debug, Clone, PartialEq)]
struct Who {
    seq: i64,
    start: i64,
    card: String,
    pod_uid: String,
    namespace: String,
    pod: String,
    container: String,
}

/// Every principal of every stored window, from the signed bodies.
fn principals(conn: &Connection) -> Vec<Who> {
    // Bodies lie in the ledger's compressed blocks: read each back as signed.
    let mut st = conn
        .prepare("SELECT agent_id, seq FROM windows ORDER BY seq")
        .unwrap();
    let keys: Vec<(String, i64)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let rows: Vec<(i64, Vec<u8>)> = keys
        .into_iter()
        .map(|(agent, seq)| (seq, gpumeter_e2e::record_body(conn, &agent, seq as u64)))
        .collect();
    let mut out = Vec::new();
    for (seq, body) in rows {
        let Some(v1::record_body::Kind::CardWindow(w)) =
            v1::RecordBody::decode(body.as_slice()).unwrap().kind
        else {
            continue;
        };
        for p in w.principals {
            out.push(Who {
                seq,
                start: w.window_start_unix_ms,
                card: w.gpu_uuid.clone(),
                pod_uid: p.k8s_pod_uid,
                namespace: p.k8s_namespace,
                pod: p.k8s_pod_name,
                container: p.k8s_container_name,
            });
        }
    }
    out
}

/// (card, pid, detail) of every pod device mismatch event, in ledger order.
fn mismatches(conn: &Connection) -> Vec<(String, i64, String)> {
    let mut st = conn
        .prepare(
            "SELECT gpu_uuid, code, detail FROM events WHERE kind = 'pod_device_mismatch'
             ORDER BY seq",
        )
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn named(w: &Who, pod: &str, container: &str) -> bool {
    w.namespace == "ml" && w.pod == pod && w.container == container
}

/// The agent's `/metrics` page.
async fn metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).await.unwrap();
    assert!(s.starts_with("HTTP/1.1 200 OK"), "{s}");
    s
}

/// The value of an unlabelled-but-`agent_id` series `name` on a metrics page.
fn metric(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Pods are named from the kubelet's allocation, a pod's process on another pod's card is
/// recorded once, and with the kubelet gone the agent warns once and falls back to the pod UIDs
/// of cgroup paths; when the kubelet answers again, names come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_named_from_the_kubelet_and_cgroup_paths_stand_in_while_it_is_gone() {
    bin("gpumeter-agent");
    let dir = TempDir::new().unwrap();
    let lib = dir.path().join("libnvidia-ml.so.1");
    fs::copy(target_dir().join("libnvidia_ml.so"), &lib).unwrap();
    write_scenario(dir.path(), &scenario(false));
    let proc_root = dir.path().join("proc");
    fake_process(&proc_root, TRAIN_PID, 2001, &pod_cgroup(TRAIN_UID, 1));
    fake_process(&proc_root, INFER_PID, 2002, &pod_cgroup(INFER_UID, 2));
    // The training pod's second process, which will turn up on the inference pod's card.
    fake_process(&proc_root, STRAY_PID, 2003, &pod_cgroup(TRAIN_UID, 3));

    let socket = dir.path().join("kubelet.sock");
    let kubelet = Kubelet {
        list: Arc::new(Mutex::new(node_pods())),
        calls: Arc::new(Mutex::new(0)),
    };
    let mut served = Served::start(&socket, kubelet.clone());

    // probe asks the same socket (from a thread: it runs its own runtime).
    let probe = {
        let (lib, socket) = (lib.clone(), socket.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(bin("gpumeter-agent"))
                .args(["probe", "--json", "--nvml-lib"])
                .arg(&lib)
                .arg("--kubelet-socket")
                .arg(&socket)
                .env_remove("GPUMETER_FAKE_NVML_SCENARIO")
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    assert!(probe.status.success(), "{probe:?}");
    let report: Value = serde_json::from_slice(&probe.stdout).unwrap();
    let k = &report["kubelet"];
    assert_eq!(k["up"], json!(true), "{k:#}");
    assert_eq!(k["pods"], json!(3));
    assert_eq!(k["cards"][CARD_A]["holders"], json!(["ml/train/trainer"]));
    assert_eq!(k["cards"][CARD_B]["holders"], json!(["ml/infer/server"]));
    assert_eq!(k["allocatable"]["nvidia.com/gpu"], json!([CARD_A, "1"]));

    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let conn = Connection::open(&db).unwrap();
    let metrics_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = dir.path().join("agent.toml");
    fs::write(
        &cfg,
        format!(
            r#"agent_id = "k8s-e2e"
host_id = "{HOST}"
csp = "kt"
state_dir = "{state}"
metrics_listen = "127.0.0.1:{metrics_port}"

[collector]
url = "{url}"
backoff_initial_ms = 50
backoff_max_ms = 500
{tls}

[sampling]
interval_ms = 1000
window_ms = 2000

[source]
kind = "nvml-lib"
path = "{lib}"

[attribution]
proc_root = "{proc}"
kubelet_pod_resources_socket = "{socket}"
kubelet_refresh_ms = 1000
"#,
            state = dir.path().join("state").display(),
            url = collector.url,
            lib = lib.display(),
            proc = proc_root.display(),
            socket = socket.display(),
            tls = gpumeter_e2e::agent_tls_toml("k8s-e2e", HOST, &dir.path().join("tls")),
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let child = Command::new(bin("gpumeter-agent"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env_remove("GPUMETER_FAKE_NVML_SCENARIO")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut agent = AgentProcess { child, log };

    // Each pod's process is named with the pod and container the kubelet allocated its card
    // to; the pod UID from the cgroup path stays beside the names.
    agent
        .until("windows naming both pods", || {
            let ps = principals(&conn);
            let a = ps.iter().any(|w| {
                w.card == CARD_A && w.pod_uid == TRAIN_UID && named(w, "train", "trainer")
            });
            let b = ps
                .iter()
                .any(|w| w.card == CARD_B && w.pod_uid == INFER_UID && named(w, "infer", "server"));
            (a && b).then_some(())
        })
        .await;
    assert!(
        mismatches(&conn).is_empty(),
        "{:?}\n{}",
        mismatches(&conn),
        agent.log()
    );

    // The training pod's process turns up on the inference pod's card: one event, however
    // many slots it stays there; the process is not named as the card's pod.
    write_scenario(dir.path(), &scenario(true));
    let (card, pid, detail) = agent
        .until("a pod device mismatch event", || {
            mismatches(&conn).into_iter().next()
        })
        .await;
    assert_eq!((card.as_str(), pid), (CARD_B, i64::from(STRAY_PID)));
    assert_eq!(
        detail,
        format!(
            "process of pod ml/train (uid {TRAIN_UID}) on a card the kubelet allocated to ml/infer/server"
        )
    );
    let seq_now = principals(&conn).last().unwrap().seq;
    agent
        .until("three more windows", || {
            (principals(&conn).iter().filter(|w| w.seq > seq_now).count() >= 6).then_some(())
        })
        .await;
    assert_eq!(mismatches(&conn).len(), 1, "{:?}", mismatches(&conn));
    let page = metrics(metrics_port).await;
    assert_eq!(
        metric(&page, "gpumeter_agent_kubelet_pod_resources_up"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        metric(&page, "gpumeter_agent_pod_device_mismatches_total"),
        Some(1.0),
        "{page}"
    );
    // The stray process runs as its own uid: its principal row on card B carries its pod UID
    // and no names.
    assert!(
        principals(&conn)
            .iter()
            .any(|w| w.card == CARD_B && w.pod_uid == TRAIN_UID && w.pod.is_empty()),
        "{:?}",
        principals(&conn)
    );

    // The kubelet goes away: one warning, however many refreshes fail; windows keep the pod
    // UIDs of the cgroup paths and carry no names.
    write_scenario(dir.path(), &scenario(false));
    served.stop().await;
    let gone_at = gpumeter_e2e::now_ms();
    agent
        .until("unnamed windows after the kubelet left", || {
            let ps = principals(&conn);
            let unnamed = |card: &str, uid: &str| {
                ps.iter().any(|w| {
                    w.start > gone_at + 2000
                        && w.card == card
                        && w.pod_uid == uid
                        && w.pod.is_empty()
                })
            };
            (unnamed(CARD_A, TRAIN_UID) && unnamed(CARD_B, INFER_UID)).then_some(())
        })
        .await;
    // At least three refreshes fail (1 s apart) before the warnings are counted.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let text = agent.log();
    let warned = text
        .lines()
        .filter(|l| l.contains("kubelet pod-resources API does not answer"))
        .count();
    assert_eq!(warned, 1, "{text}");
    assert!(text.contains("kubelet.sock"), "{text}");
    assert_eq!(
        mismatches(&conn).len(),
        1,
        "nothing is judged without the kubelet"
    );
    let page = metrics(metrics_port).await;
    assert_eq!(
        metric(&page, "gpumeter_agent_kubelet_pod_resources_up"),
        Some(0.0),
        "{page}"
    );
    assert!(
        metric(&page, "gpumeter_agent_kubelet_pod_resources_failures_total").unwrap() >= 3.0,
        "{page}"
    );

    // It answers again: said once more, and windows name the pods again.
    let calls_before = *kubelet.calls.lock().unwrap();
    let mut served = Served::start(&socket, kubelet.clone());
    let back_at = gpumeter_e2e::now_ms();
    agent
        .until("named windows after the kubelet came back", || {
            principals(&conn)
                .iter()
                .any(|w| w.start > back_at && w.card == CARD_A && named(w, "train", "trainer"))
                .then_some(())
        })
        .await;
    let text = agent.log();
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("kubelet pod-resources API answers"))
            .count(),
        2,
        "{text}"
    );
    // The answer is cached: List is asked about once a second (refresh 1 s), not once per
    // card or process per slot.
    let elapsed_s = (gpumeter_e2e::now_ms() - back_at) as f64 / 1000.0;
    let calls = *kubelet.calls.lock().unwrap() - calls_before;
    assert!(
        (calls as f64) <= elapsed_s + 2.0,
        "{calls} List calls in {elapsed_s} s"
    );

    served.stop().await;
    drop(agent);
    collector.stop().await.unwrap();
}

//! An agent speaks only for its own host and cards, and one client cannot hurt the others
//! (issue 9, items 3 and 4), end to end: real gRPC over loopback, real SQLite files, the real
//! collector binary where signals, file limits or pipes are the point.
//!
//! - A Hello listing another host's card leaves the card where it is (alarm); the impostor's
//!   windows for it count in no figure until an admin moves the card, then they count.
//! - A known agent id saying Hello for another host is refused.
//! - Windows from the future (two days ahead) or from before the agent registered are refused
//!   with INVALID_ARGUMENT naming the seq, an alarm, and nothing of the batch stored.
//! - A poison batch (the same principal twice in one window: its insert fails) fails alone
//!   while two honest agents keep acking, every ack within a second (in one of up to three
//!   rounds: this machine is shared, and any process can stall for a second under its load;
//!   a failed honest batch fails the test at once).
//! - 1,000 idle TCP connections and 200 stalled HTTP/2 streams against the collector binary
//!   under a 1,024 open-file limit: an honest agent keeps acking, a new agent still connects.
//! - A 4,096-card Hello with 3 KB strings is refused by the limit's name, the store unchanged.
//! - SIGTERM stops the collector binary with code 0; the agent reconnects to the next one.
//! - `gpumeter-collector alarms | head -1` exits 0 or 141, no panic.
//!
//! Scripted agents here speak the Ingest protocol with their own key, records and
//! checkpoints, through the clients of `gpumeter_e2e`, so a change of transport there carries
//! over.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use gpumeter_agent::clock::{Clock, ScaledClock, align_down, align_up};
use gpumeter_agent::config::SamplingConfig;
use gpumeter_agent::gpu::sim::{Scenario, SimSource};
use gpumeter_agent::run::{Agent, Parts, RunOptions};
use gpumeter_collector::server::ServerOptions;
use gpumeter_collector::store::sqlite::SqliteStore;
use gpumeter_e2e::{
    TestCollector, agent_config, bin, collector_serve_command, ingest_client, now_ms, query_at,
};
use gpumeter_proto::chain::{self, Hash};
use gpumeter_proto::v1::{self, agent_message, collector_message};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// A scripted agent

struct Scripted {
    id: String,
    host: String,
    key: SigningKey,
    gpus: Vec<String>,
    /// records[i] has seq i + 1.
    records: Vec<v1::Record>,
}

impl Scripted {
    fn new(id: &str, host: &str, key_byte: u8, gpus: &[&str]) -> Scripted {
        Scripted {
            id: id.into(),
            host: host.into(),
            key: SigningKey::from_bytes(&[key_byte; 32]),
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            records: Vec::new(),
        }
    }

    fn head(&self) -> Hash {
        match self.records.last() {
            None => chain::GENESIS,
            Some(r) => chain::record_hash(&chain::to_hash(&r.prev_hash).unwrap(), r.seq, &r.body),
        }
    }

    /// Appends a window of `gpu` over `[start, end)` with these principals; returns its seq.
    fn push_window(&mut self, gpu: &str, start: i64, end: i64, principals: &[&str]) -> u64 {
        let body = gpumeter_agent::record::encode_body(
            end,
            v1::record_body::Kind::CardWindow(v1::CardWindow {
                gpu_uuid: gpu.into(),
                window_start_unix_ms: start,
                window_end_unix_ms: end,
                sample_interval_ms: 10,
                expected_samples: ((end - start) / 10) as u32,
                good_samples: ((end - start) / 10) as u32,
                util_avg_pct: Some(50.0),
                energy_mj: Some(1_000),
                health: v1::Health::Ok as i32,
                assignment: Some(v1::AppliedAssignment {
                    status: v1::AssignmentStatus::Unassigned as i32,
                    ..Default::default()
                }),
                principals: principals
                    .iter()
                    .map(|p| v1::PrincipalUsage {
                        principal: p.to_string(),
                        occupied_ms: (end - start) as u64,
                        active_ms: (end - start) as u64 / 2,
                        process_count: 1,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        );
        let seq = self.records.len() as u64 + 1;
        let prev = self.head();
        self.records.push(v1::Record {
            seq,
            prev_hash: prev.to_vec(),
            body,
        });
        seq
    }

    /// The records `from..=to`, with a checkpoint over the last signed by this agent's key.
    fn batch(&self, from: u64, to: u64) -> v1::RecordBatch {
        let records = self.records[from as usize - 1..to as usize].to_vec();
        let last = records.last().unwrap();
        let head = chain::record_hash(
            &chain::to_hash(&last.prev_hash).unwrap(),
            last.seq,
            &last.body,
        );
        let signature = chain::sign_checkpoint(&self.key, &self.id, 1, last.seq, &head);
        v1::RecordBatch {
            checkpoint: Some(v1::Checkpoint {
                agent_id: self.id.clone(),
                epoch: 1,
                seq: last.seq,
                chain_hash: head.to_vec(),
                signature: signature.to_vec(),
            }),
            records,
        }
    }

    fn hello(&self) -> v1::Hello {
        v1::Hello {
            protocol_version: gpumeter_proto::PROTOCOL_VERSION,
            agent_id: self.id.clone(),
            host_id: self.host.clone(),
            csp: "kt".into(),
            hostname: format!("{}.example", self.host),
            public_key: self.key.verifying_key().to_bytes().to_vec(),
            epoch: 1,
            next_seq: self.records.len() as u64 + 1,
            chain_head: self.head().to_vec(),
            oldest_spooled_seq: 1,
            agent_time_unix_ms: now_ms(),
            gpus: self
                .gpus
                .iter()
                .enumerate()
                .map(|(i, g)| v1::GpuInfo {
                    uuid: g.clone(),
                    index: i as u32,
                    name: "scripted".into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
}

/// An open Ingest session of a scripted agent.
struct Session {
    tx: mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::CollectorMessage>,
    welcome: v1::Welcome,
}

const ANSWER: Duration = Duration::from_secs(10);

/// Held by every test here, so they run one at a time and do not load the machine for each
/// other (two of them time acks: the latency they measure must be the collector's). Each
/// builds the binaries first (`bin`), so no `cargo build` runs while one is timing.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    let guard = ONE_AT_A_TIME.lock().await;
    let _ = bin("gpumeter-collector");
    guard
}

/// Says Hello (retrying while the collector still holds this agent's previous session) and
/// waits for the Welcome.
async fn open(url: &str, hello: v1::Hello) -> Result<Session, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut client = ingest_client(url, Some((&hello.agent_id, &hello.host_id)))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        tx.send(v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello.clone())),
        })
        .await
        .unwrap();
        let opened = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let mut inbound = match opened {
            Err(s) if s.code() == tonic::Code::AlreadyExists && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(s) => return Err(s),
            Ok(r) => r.into_inner(),
        };
        let first = tokio::time::timeout(ANSWER, inbound.message())
            .await
            .expect("a welcome within 10 s");
        match first {
            Err(s) if s.code() == tonic::Code::AlreadyExists && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(s) => return Err(s),
            Ok(Some(v1::CollectorMessage {
                kind: Some(collector_message::Kind::Welcome(welcome)),
            })) => {
                return Ok(Session {
                    tx,
                    inbound,
                    welcome,
                });
            }
            Ok(other) => panic!("expected a welcome, got {other:?}"),
        }
    }
}

impl Session {
    /// Sends a batch and waits for its ack (the durable seq) or the session's error.
    async fn send(&mut self, batch: v1::RecordBatch) -> Result<u64, tonic::Status> {
        if self
            .tx
            .send(v1::AgentMessage {
                kind: Some(agent_message::Kind::Batch(batch)),
            })
            .await
            .is_err()
        {
            return Err(tonic::Status::cancelled("the session's sender closed"));
        }
        loop {
            match tokio::time::timeout(ANSWER, self.inbound.message())
                .await
                .expect("an answer within 10 s")?
            {
                Some(v1::CollectorMessage {
                    kind: Some(collector_message::Kind::Ack(a)),
                }) => return Ok(a.durable_seq),
                Some(_) => {}
                None => return Err(tonic::Status::cancelled("the session ended")),
            }
        }
    }

    /// Ends the session and waits for the collector to close it.
    async fn close(self) {
        let Session {
            tx, mut inbound, ..
        } = self;
        drop(tx);
        while let Ok(Ok(Some(_))) = tokio::time::timeout(ANSWER, inbound.message()).await {}
    }
}

// ---------------------------------------------------------------------------------------------
// What the ledger file holds

fn db_conn(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// (kind, seq, detail) of an agent's alarms, oldest first.
fn alarms_of(db: &Path, agent: &str) -> Vec<(String, Option<i64>, String)> {
    let c = db_conn(db);
    let mut st = c
        .prepare("SELECT kind, seq, detail FROM alarms WHERE agent_id = ?1 ORDER BY id")
        .unwrap();
    st.query_map([agent], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn count(db: &Path, sql: &str, arg: &str) -> i64 {
    db_conn(db).query_row(sql, [arg], |r| r.get(0)).unwrap()
}

fn records_of(db: &Path, agent: &str) -> i64 {
    count(
        db,
        "SELECT COUNT(*) FROM records WHERE agent_id = ?1",
        agent,
    )
}

/// (agent, card, windows) of every usage row over the span.
async fn usage_rows(url: &str, from: i64, until: i64) -> Vec<(String, String, u32)> {
    let mut q = query_at(url).await;
    let u = q
        .usage(v1::UsageRequest {
            from_unix_ms: from,
            until_unix_ms: until,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    u.cards
        .into_iter()
        .map(|c| (c.agent_id, c.gpu_uuid, c.windows))
        .collect()
}

/// (agent, host, cards) of every host, through the streamed listing.
async fn hosts(url: &str) -> Vec<(String, String, Vec<String>)> {
    let mut q = query_at(url).await;
    let mut s = q
        .stream_hosts(v1::HostsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(h) = s.message().await.unwrap() {
        out.push((
            h.agent_id,
            h.host_id,
            h.gpus.into_iter().map(|g| g.uuid).collect(),
        ));
    }
    out
}

fn strict() -> ServerOptions {
    ServerOptions::default()
}

const CARD_K: &str = "GPU-0000009a-0000-4000-8000-000000000000";
const CARD_H: &str = "GPU-0000009a-0000-4000-8000-000000000001";

// ---------------------------------------------------------------------------------------------
// Binding

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_listing_another_hosts_card_leaves_it_there_and_its_windows_count_after_move_card()
{
    let _one = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start_with(&db, "127.0.0.1:0", strict())
        .await
        .unwrap();
    let url = collector.url.clone();
    let t = align_down(now_ms(), 1_000);

    let mut k = Scripted::new("agent-k", "host-k", 11, &[CARD_K]);
    k.push_window(CARD_K, t, t + 1_000, &["user:k"]);
    k.push_window(CARD_K, t + 1_000, t + 2_000, &["user:k"]);
    let mut s = open(&url, k.hello()).await.unwrap();
    assert_eq!(s.send(k.batch(1, 2)).await.unwrap(), 2);
    s.close().await;

    // Host H lists K's card beside its own, and meters both.
    let mut h = Scripted::new("agent-h", "host-h", 12, &[CARD_K, CARD_H]);
    h.push_window(CARD_K, t + 2_000, t + 3_000, &["user:h"]);
    h.push_window(CARD_H, t + 2_000, t + 3_000, &["user:h"]);
    let mut s = open(&url, h.hello()).await.unwrap();
    assert_eq!(
        s.send(h.batch(1, 2)).await.unwrap(),
        2,
        "stored: the chain stays whole"
    );
    s.close().await;

    let kinds: Vec<(String, Option<i64>)> = alarms_of(&db, "agent-h")
        .into_iter()
        .map(|(k, s, _)| (k, s))
        .collect();
    assert_eq!(
        kinds,
        [
            ("card_claimed".to_string(), None),
            ("card_not_owned".to_string(), Some(1))
        ]
    );
    assert_eq!(
        hosts(&url).await,
        [
            ("agent-h".into(), "host-h".into(), vec![CARD_H.to_string()]),
            ("agent-k".into(), "host-k".into(), vec![CARD_K.to_string()]),
        ],
        "the card stays with the host that first reported it"
    );
    let (from, until) = (t - 60_000, t + 60_000);
    assert_eq!(
        usage_rows(&url, from, until).await,
        [
            ("agent-h".into(), CARD_H.into(), 1),
            ("agent-k".into(), CARD_K.into(), 2)
        ],
        "H's window for K's card counts in no figure"
    );

    // An admin gives the card to H: H's window counts, K's earlier ones still do.
    let out = Command::new(bin("gpumeter-collector"))
        .envs(gpumeter_e2e::cli_env())
        .args(["hosts", "move-card", CARD_K, "--to-host", "host-h"])
        .args(["--actor", "ops-kim", "--reason", "card moved to rack 2"])
        .args(["--server", &url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        // The actor is the token's name, not the ignored --actor.
        stdout.contains("moved from host host-k to host host-h (by test-admin"),
        "{stdout}"
    );
    assert_eq!(
        usage_rows(&url, from, until).await,
        [
            ("agent-h".into(), CARD_K.into(), 1),
            ("agent-h".into(), CARD_H.into(), 1),
            ("agent-k".into(), CARD_K.into(), 2)
        ]
    );
    let h_cards = hosts(&url)
        .await
        .into_iter()
        .find(|(a, ..)| a == "agent-h")
        .unwrap()
        .2;
    assert_eq!(h_cards.len(), 2, "{h_cards:?}");
    let history: (String, String, String, String) = db_conn(&db)
        .query_row(
            "SELECT from_host_id, to_host_id, actor, reason FROM card_moves WHERE gpu_uuid = ?1",
            [CARD_K],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    assert_eq!(
        history,
        (
            "host-k".into(),
            "host-h".into(),
            "test-admin".into(),
            "card moved to rack 2".into()
        )
    );
    assert!(
        alarms_of(&db, "agent-h")
            .iter()
            // The actor is the token's name (the CLI's --actor is ignored).
            .any(|(k, _, d)| k == "card_moved" && d.contains("test-admin"))
    );

    // A card nobody reported cannot be moved; the refusal says so.
    let out = Command::new(bin("gpumeter-collector"))
        .envs(gpumeter_e2e::cli_env())
        .args([
            "hosts",
            "move-card",
            "GPU-0000009a-0000-4000-8000-0000000000ff",
        ])
        .args(["--to-host", "host-h", "--server", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_agent_id_claiming_another_host_is_refused() {
    let _one = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start_with(&db, "127.0.0.1:0", strict())
        .await
        .unwrap();
    let a = Scripted::new("agent-a", "host-1", 13, &[CARD_K]);
    open(&collector.url, a.hello()).await.unwrap().close().await;

    let moved = Scripted::new("agent-a", "host-2", 13, &[CARD_H]);
    let e = open(&collector.url, moved.hello()).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("bound to host host-1"), "{e:?}");
    let alarms = alarms_of(&db, "agent-a");
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0].0, "host_mismatch");
    assert_eq!(
        hosts(&collector.url).await,
        [("agent-a".into(), "host-1".into(), vec![CARD_K.to_string()])],
        "nothing of the refused Hello is stored"
    );
    // The real host still gets in.
    open(&collector.url, a.hello()).await.unwrap().close().await;
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_from_the_future_or_from_before_registration_are_refused_and_nothing_is_written() {
    let _one = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start_with(&db, "127.0.0.1:0", strict())
        .await
        .unwrap();
    let url = collector.url.clone();
    let t = align_down(now_ms(), 1_000);
    let day = 86_400_000;

    let mut f = Scripted::new("agent-f", "host-f", 14, &[CARD_K]);
    f.push_window(CARD_K, t, t + 1_000, &["user:f"]);
    let mut s = open(&url, f.hello()).await.unwrap();
    assert_eq!(s.send(f.batch(1, 1)).await.unwrap(), 1);
    // Two days ahead: 24 GPU-hours that have not happened yet.
    for i in 0..24 {
        let start = t + 2 * day + i * 3_600_000;
        f.push_window(CARD_K, start, start + 3_600_000, &["user:f"]);
    }
    let e = s.send(f.batch(2, 25)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("record seq 2") && e.message().contains("limits.max_clock_skew_s"),
        "{e:?}"
    );
    assert_eq!(
        records_of(&db, "agent-f"),
        1,
        "nothing of the batch is written"
    );
    let alarms = alarms_of(&db, "agent-f");
    assert!(
        alarms
            .iter()
            .any(|(k, s, _)| k == "future_window" && *s == Some(2)),
        "{alarms:?}"
    );
    assert_eq!(
        usage_rows(&url, t - day, t + 3 * day).await,
        [("agent-f".into(), CARD_K.into(), 1)]
    );

    // A new agent id signing last week's windows.
    let mut b = Scripted::new("agent-b", "host-b", 15, &[CARD_H]);
    b.push_window(CARD_H, t - 7 * day, t - 7 * day + 60_000, &["user:b"]);
    let mut s = open(&url, b.hello()).await.unwrap();
    let e = s.send(b.batch(1, 1)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("record seq 1") && e.message().contains("first registered"),
        "{e:?}"
    );
    assert_eq!(records_of(&db, "agent-b"), 0);
    assert!(
        alarms_of(&db, "agent-b")
            .iter()
            .any(|(k, s, _)| k == "before_registration" && *s == Some(1))
    );

    // The collector is up: the first agent goes on from where it was.
    let mut f2 = Scripted::new("agent-f", "host-f", 14, &[CARD_K]);
    f2.records = f.records[..1].to_vec();
    f2.push_window(CARD_K, t + 1_000, t + 2_000, &["user:f"]);
    let mut s = open(&url, f2.hello()).await.unwrap();
    assert_eq!(s.welcome.durable_seq, 1);
    assert_eq!(s.send(f2.batch(2, 2)).await.unwrap(), 2);
    s.close().await;
    collector.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// One client cannot hurt the others

/// An honest scripted agent sending small batches back to back until `stop`; returns the
/// acks it got and the longest wait for one.
async fn honest_loop(
    url: String,
    id: String,
    key_byte: u8,
    gpu: &'static str,
    stop: Arc<AtomicBool>,
) -> (u64, Duration) {
    let mut a = Scripted::new(&id, &id, key_byte, &[gpu]);
    let t0 = align_down(now_ms(), 1_000);
    let mut s = open(&url, a.hello()).await.unwrap();
    let (mut acks, mut longest) = (0u64, Duration::ZERO);
    while !stop.load(Ordering::Relaxed) {
        let from = a.records.len() as u64 + 1;
        for _ in 0..4 {
            let i = a.records.len() as i64;
            a.push_window(gpu, t0 + i * 10, t0 + (i + 1) * 10, &["user:honest"]);
        }
        let to = a.records.len() as u64;
        let sent = Instant::now();
        let acked = s
            .send(a.batch(from, to))
            .await
            .unwrap_or_else(|e| panic!("{id}: honest batch failed: {e:?}"));
        longest = longest.max(sent.elapsed());
        assert_eq!(acked, to, "{id}");
        acks += 1;
    }
    s.close().await;
    (acks, longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_batch_fails_alone_while_two_honest_agents_keep_acking() {
    let _one = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start_with(&db, "127.0.0.1:0", strict())
        .await
        .unwrap();
    let url = collector.url.clone();
    // Rounds of 4 s, up to three: a failed honest batch fails the test at once; the stall
    // bound must hold in one round (a machine shared with other builds can stall any
    // process for a second now and then; poison that stalls honest agents stalls every round).
    let mut refused = 0;
    let mut rounds = Vec::new();
    for round in 0..3u8 {
        let stop = Arc::new(AtomicBool::new(false));
        let ids = [format!("honest-1-{round}"), format!("honest-2-{round}")];
        let honest: Vec<_> = ids
            .iter()
            .zip([(21 + 2 * round, CARD_K), (22 + 2 * round, CARD_H)])
            .map(|(id, (k, g))| {
                tokio::spawn(honest_loop(url.clone(), id.clone(), k, g, stop.clone()))
            })
            .collect();
        // Three poison agents: a validly signed window naming one principal twice, whose
        // insert fails; each reconnects and sends it again as fast as it can.
        let poison: Vec<_> = (0..3u8)
            .map(|i| {
                let url = url.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let id = format!("poison-{i}");
                    let gpu = format!("GPU-0000009b-0000-4000-8000-00000000000{i}");
                    let mut p = Scripted::new(&id, &id, 30 + i, &[&gpu]);
                    let t = align_down(now_ms(), 1_000);
                    p.push_window(&gpu, t, t + 10, &["user:x", "user:x"]);
                    let mut refused = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let mut s = open(&url, p.hello()).await.unwrap();
                        let e = s.send(p.batch(1, 1)).await.unwrap_err();
                        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
                        assert!(
                            e.message().contains("rolled back") || e.message().contains("refused"),
                            "{e:?}"
                        );
                        refused += 1;
                    }
                    refused
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(4)).await;
        stop.store(true, Ordering::Relaxed);
        for p in poison {
            refused += p.await.unwrap();
        }
        let mut longest_of_round = Duration::ZERO;
        for (h, id) in honest.into_iter().zip(&ids) {
            let (acks, longest) = h.await.unwrap();
            eprintln!("round {round}: {id}: {acks} acks, longest wait {longest:?}");
            assert!(acks >= 10, "{id}: only {acks} acks in 4 s");
            assert_eq!(
                records_of(&db, id),
                acks as i64 * 4,
                "{id}: every batch stored"
            );
            longest_of_round = longest_of_round.max(longest);
        }
        rounds.push(longest_of_round);
        if longest_of_round < Duration::from_secs(1) {
            break;
        }
    }
    assert!(
        rounds.iter().any(|l| *l < Duration::from_secs(1)),
        "the honest agents' longest ack stall, per round: {rounds:?}"
    );
    eprintln!("{refused} poison batches refused");
    assert!(refused >= 10, "the poison agents kept trying: {refused}");
    for i in 0..3 {
        let id = format!("poison-{i}");
        assert_eq!(
            records_of(&db, &id),
            0,
            "{id}: nothing of the poison stored"
        );
        assert!(
            alarms_of(&db, &id)
                .iter()
                .any(|(k, s, d)| k == "batch_failed" && *s == Some(1) && d.contains("UNIQUE")),
            "{id}: {:?}",
            alarms_of(&db, &id)
        );
    }
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4096_card_hello_with_3_kb_strings_is_refused_by_name_and_hosts_keeps_working() {
    let _one = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start_with(&db, "127.0.0.1:0", strict())
        .await
        .unwrap();
    let url = collector.url.clone();
    open(&url, Scripted::new("small", "small", 40, &[CARD_K]).hello())
        .await
        .unwrap()
        .close()
        .await;
    let before = (
        count(&db, "SELECT COUNT(*) FROM agents WHERE ?1 = ?1", ""),
        count(&db, "SELECT COUNT(*) FROM gpus WHERE ?1 = ?1", ""),
    );

    let huge = Scripted::new("huge", "huge", 41, &[]);
    let mut hello = huge.hello();
    hello.gpus = (0..4096)
        .map(|i| v1::GpuInfo {
            uuid: format!("GPU-{i:08x}-0000-4000-8000-000000000000"),
            index: i,
            name: "n".repeat(3_072),
            ..Default::default()
        })
        .collect();
    let e = open(&url, hello.clone()).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("limits.max_gpus_per_hello"), "{e:?}");
    hello.gpus.truncate(8);
    let e = open(&url, hello).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("hello.gpus[0].name")
            && e.message().contains("limits.max_string_bytes"),
        "{e:?}"
    );
    let after = (
        count(&db, "SELECT COUNT(*) FROM agents WHERE ?1 = ?1", ""),
        count(&db, "SELECT COUNT(*) FROM gpus WHERE ?1 = ?1", ""),
    );
    assert_eq!(before, after, "the store is unchanged");
    assert_eq!(
        alarms_of(&db, "huge")
            .iter()
            .filter(|(k, ..)| k == "hello_refused")
            .count(),
        2
    );
    let out = Command::new(bin("gpumeter-collector"))
        .envs(gpumeter_e2e::cli_env())
        .args(["hosts", "--server", &url])
        .output()
        .unwrap();
    assert!(out.status.success());
    // The header row and its rule, then the one agent.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        3,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    collector.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// The collector binary under floods, signals and closed pipes

/// The collector binary, killed when dropped.
struct Collector {
    child: Option<Child>,
    url: String,
    log: std::path::PathBuf,
}

impl Collector {
    /// Starts `serve` and waits until it answers gRPC.
    async fn start(port: u16, db: &Path, log: &Path, config: Option<&Path>) -> Collector {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = collector_serve_command(&format!("127.0.0.1:{port}"), db, config)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .unwrap();
        let c = Collector {
            child: Some(child),
            url: format!("https://127.0.0.1:{port}"),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
                && query_at(&c.url)
                    .await
                    .stream_hosts(v1::HostsRequest {})
                    .await
                    .is_ok()
            {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "collector never answered: {}",
                c.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_child(self.child.as_ref().unwrap())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// SIGTERM, then the exit code (within `limit`).
    async fn term(&mut self, limit: Duration) -> Option<i32> {
        rustix::process::kill_process(self.pid(), rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "no exit within {limit:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_stalled_streams_under_1024_files_cannot_lock_agents_out() {
    let _one = one_at_a_time().await;
    // This test holds ~1,300 sockets itself.
    let (_, hard) = {
        let l = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        (l.current, l.maximum)
    };
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: hard.map(|h| h.min(8192)).or(Some(8192)),
            maximum: hard,
        },
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let log = dir.path().join("collector.log");
    let port = free_port();
    let mut collector = Collector::start(port, &db, &log, None).await;
    // The usual limit of a systemd service.
    rustix::process::prlimit(
        Some(collector.pid()),
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(1024),
            maximum: Some(1024),
        },
    )
    .unwrap();
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", collector.pid().as_raw_nonzero()))
            .unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains("1024")),
        "{limits}"
    );
    let url = collector.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let honest = tokio::spawn(honest_loop(
        url.clone(),
        "steady".into(),
        50,
        CARD_K,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1,000 connections that never say a word, from another loopback address.
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(
            sock.connect(format!("127.0.0.1:{port}").parse().unwrap())
                .await
                .unwrap(),
        );
    }
    // 208 HTTP/2 streams that open a session and never say Hello (16 per connection).
    let mut stalled = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..13 {
        let client = ingest_client(&url, Some(("stalled", "stalled")))
            .await
            .unwrap();
        for _ in 0..16 {
            let mut client = client.clone();
            let (tx, rx) = mpsc::channel::<v1::AgentMessage>(1);
            senders.push(tx);
            stalled.push(tokio::spawn(async move {
                let _ = client
                    .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await;
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The collector closed what was over its limits and kept the rest.
    let mut closed = 0;
    for s in &idle {
        let mut b = [0u8; 1];
        match s.try_read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => closed += 1,
            Ok(_) => {}
        }
    }
    eprintln!("{closed} of 1000 idle connections closed by the collector");
    assert!(closed >= 700, "only {closed} refused");
    assert!(
        closed <= 1000 - 200,
        "{closed}: the per-address limit admits 256"
    );

    // A new agent still connects and is acknowledged.
    let mut newcomer = Scripted::new("newcomer", "newcomer", 51, &[CARD_H]);
    let t = align_down(now_ms(), 1_000);
    newcomer.push_window(CARD_H, t, t + 1_000, &["user:new"]);
    let started = Instant::now();
    let mut s = open(&url, newcomer.hello()).await.unwrap();
    assert_eq!(s.send(newcomer.batch(1, 1)).await.unwrap(), 1);
    eprintln!("newcomer acked in {:?}", started.elapsed());
    s.close().await;

    // While the flood holds its sockets: rounds of 2 s, up to three, in which an honest agent
    // must see every ack within a second in one round (see the poison test).
    let mut rounds = Vec::new();
    for round in 0..3u8 {
        let stop = Arc::new(AtomicBool::new(false));
        let probe = tokio::spawn(honest_loop(
            url.clone(),
            format!("probe-{round}"),
            60 + round,
            CARD_H,
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let (acks, longest) = probe.await.unwrap();
        eprintln!("round {round}: {acks} acks, longest wait {longest:?}");
        rounds.push(longest);
        if longest < Duration::from_secs(1) {
            break;
        }
    }
    assert!(
        rounds.iter().any(|l| *l < Duration::from_secs(1)),
        "longest ack stall under the flood, per round: {rounds:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let (acks, longest) = honest.await.unwrap();
    eprintln!("steady: {acks} acks, longest wait {longest:?}");
    assert!(acks >= 10, "the honest agent kept acking: {acks}");
    assert!(collector.running(), "the collector is up");
    let text = collector.log_text();
    assert!(
        text.contains("limits.max_connections_per_ip"),
        "refusals are logged by the limit's name"
    );
    assert!(!text.contains("panicked"), "{text}");
    drop(senders);
    drop(idle);
    for s in stalled {
        s.abort();
    }
    assert_eq!(collector.term(Duration::from_secs(20)).await, Some(0));
}

const SIG_CARD: &str = "GPU-0000009c-0000-4000-8000-000000000000";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_collector_with_code_0_and_the_agent_reconnects_to_the_next() {
    let _one = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let log = dir.path().join("collector.log");
    let port = free_port();
    let mut collector = Collector::start(port, &db, &log, None).await;
    let url = collector.url.clone();

    // A real agent (in-process, simulated card, real-time clock, 1 s windows).
    let id = "sig-agent";
    let sc: Scenario = toml::from_str(&format!(
        "[[cards]]\nuuid = \"{SIG_CARD}\"\nidle_power_w = 100\nmax_power_w = 500\n[[cards.phases]]\nfrom_s = 0\nutil_pct = 40\n"
    ))
    .unwrap();
    let mut cfg = agent_config(id, "kt", &url, &dir.path().join(id), 2);
    cfg.sampling = SamplingConfig {
        interval_ms: 100,
        window_ms: 1_000,
    };
    let start = align_up(now_ms() + 200, 1_000);
    let stop_at = start + 8_000;
    let clock: Arc<dyn Clock> = Arc::new(ScaledClock::new(now_ms(), 1.0));
    let agent = Agent::build(
        cfg,
        Parts {
            attributor: Box::new(sc.attributor()),
            source: Box::new(SimSource::new(sc, start)),
            clock,
        },
    )
    .unwrap();
    let task = tokio::spawn(async move {
        let (_tx, rx) = tokio::sync::watch::channel(false);
        agent
            .run(
                RunOptions {
                    stop_at: Some(stop_at),
                    start_at: Some(start),
                    drain: true,
                    await_assignments: None,
                },
                rx,
            )
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while count(&db, "SELECT COUNT(*) FROM records WHERE agent_id = ?1", id) < 3 {
        assert!(Instant::now() < deadline, "the agent never delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = records_of(&db, id);
    let stopping = Instant::now();
    assert_eq!(collector.term(Duration::from_secs(15)).await, Some(0));
    eprintln!("collector stopped {:?} after SIGTERM", stopping.elapsed());
    let text = collector.log_text();
    assert!(!text.contains("panicked"), "{text}");
    assert!(text.contains("collector stopped"), "{text}");

    let mut next = Collector::start(port, &db, &log, None).await;
    tokio::time::timeout(Duration::from_secs(40), task)
        .await
        .expect("the agent drains to the next collector")
        .unwrap()
        .unwrap();
    let (n, max): (i64, i64) = db_conn(&db)
        .query_row(
            "SELECT COUNT(*), MAX(seq) FROM records WHERE agent_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(n > before, "the agent delivered to the next collector");
    assert_eq!(n, max, "every seq once, no gap");
    let bad: Vec<_> = alarms_of(&db, id)
        .into_iter()
        .filter(|(k, ..)| k != "clock_skew")
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    let out = Command::new(bin("gpumeter-collector"))
        .envs(gpumeter_e2e::cli_env())
        .args(["verify", "--server", &next.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(next.term(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_piped_into_head_exits_quietly() {
    let _one = one_at_a_time().await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    drop(SqliteStore::open(&db).unwrap());
    {
        // More alarms than a pipe holds, so the listing is still writing when head exits.
        let mut c = db_conn(&db);
        let tx = c.transaction().unwrap();
        for i in 0..5_000 {
            tx.execute(
                "INSERT INTO alarms (agent_id, at_ms, kind, seq, detail) VALUES ('noisy', ?1, 'seq_gap', ?2, 'records never arrived, and this line is long enough to fill the pipe quickly')",
                rusqlite::params![i, i],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let collector = TestCollector::start_with(&db, "127.0.0.1:0", strict())
        .await
        .unwrap();
    // The streamed listing has them all; the unary one is within its limit here.
    let mut q = query_at(&collector.url).await;
    let mut s = q
        .stream_alarms(v1::AlarmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while s.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 5_000);
    for (binary, args) in [
        ("gpumeter-collector", "alarms --server \"$1\""),
        ("gpumeter-collector", "hosts --server \"$1\""),
        ("gpumeter-collector", "grants list --server \"$1\""),
        ("gpumeter-collector", "--help"),
        ("gpumeter-agent", "--help"),
    ] {
        let out = Command::new("bash")
            .envs(gpumeter_e2e::cli_env())
            .arg("-c")
            .arg(format!(
                "\"$0\" {args} | head -1 >/dev/null; echo \"status=${{PIPESTATUS[0]}}\""
            ))
            .arg(bin(binary))
            .arg(&collector.url)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let status = stdout.trim().strip_prefix("status=").unwrap_or("?");
        assert!(
            status == "0" || status == "141",
            "{args}: exit {status}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
            "{args}: {stderr}"
        );
    }
    collector.stop().await.unwrap();
}

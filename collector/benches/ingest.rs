//! Ingest benchmark (DESIGN.md §8): a simulated fleet streams signed card-window records over
//! loopback gRPC into an in-process collector, measured against bare rusqlite inserting the same
//! rows in the same run, plus ack latency at a fixed offered load and the agent-side costs
//! (spool appends, checkpoint signing). Then the same on PostgreSQL (`--pg URL`, default
//! `GPUMETER_TEST_PG`; skipped, saying why, without one), with two collectors sharing one
//! database: see `ingest/postgres.rs`.
//!
//! Run with `cargo bench -p gpumeter-collector --bench ingest [-- --quick | --agents N ...]`.
//! Every record body, chain link and checkpoint signature is built before any clock starts, so
//! the ingest figures measure the collector (and the loopback clients that feed it, which share
//! the machine's cores; their CPU time is reported separately). Targets are reported and
//! labelled PASS/FAIL, never asserted: the process exits 0 unless the benchmark itself breaks.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ed25519_dalek::SigningKey;
use gpumeter_agent::assignments::Status;
use gpumeter_agent::attribution::{Identity, ProcessIdentity};
use gpumeter_agent::record::{Sequencer, signed_batch, window_body};
use gpumeter_agent::spool::{Spool, SpoolConfig, SpooledRecord};
use gpumeter_agent::window::{Applied, Health, PrincipalWindow, WindowSummary};
use gpumeter_collector::convert::decode_body;
use gpumeter_collector::server::{self, ServerOptions};
use gpumeter_collector::store::sqlite::{MIGRATIONS, SqliteStore};
use gpumeter_collector::store::{CheckpointRow, IngestBatch, IngestRecord, RecordContent, Store};
use gpumeter_proto::chain::{self, GENESIS, Hash};
use gpumeter_proto::v1::{self, agent_message, collector_message, ingest_client::IngestClient};
use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

#[path = "ingest/postgres.rs"]
mod pg;

/// 2026-04-01T00:00:00+09:00, where the simulated windows start.
const BASE_MS: i64 = 1_774_969_200_000;
const WINDOW_MS: i64 = 60_000;
const EPOCH: u64 = 1;

const TARGET_RATIO: f64 = 0.60;
const TARGET_RATE: f64 = 100_000.0;
const TARGET_P99: Duration = Duration::from_millis(50);

#[derive(Parser, Debug, Clone)]
#[command(about = "gpumeter ingest benchmark (DESIGN.md §8)")]
struct Args {
    /// Simulated agents (one per host, each on its own connection).
    #[arg(long, default_value_t = 50)]
    agents: usize,
    /// Cards per agent.
    #[arg(long, default_value_t = 8)]
    cards: usize,
    /// Principals per window (Slurm jobs and Kubernetes pods in turn); more make bigger bodies.
    #[arg(long, default_value_t = 2)]
    principals: usize,
    /// Windows per card in the throughput run.
    #[arg(long, default_value_t = 500)]
    windows: usize,
    /// Records per batch in the throughput run (and per baseline transaction).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Batches each agent keeps in flight (unacknowledged) in the throughput run; the agent's
    /// uplink allows 8.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Offered load of the latency run, records per second over the whole fleet.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Length of the latency run, seconds.
    #[arg(long, default_value_t = 5.0)]
    latency_secs: f64,
    /// Records per batch in the latency run; default: one window close of every card of a
    /// host (`--cards`).
    #[arg(long)]
    latency_batch: Option<usize>,
    /// Longest each spool measurement runs, seconds.
    #[arg(long, default_value_t = 2.0)]
    spool_secs: f64,
    /// Records in the ledger `verify` re-checks (DESIGN.md §8: 1 million in under 10 s).
    #[arg(long, default_value_t = 1_000_000)]
    verify_records: u64,
    /// A small run (10 agents, 100 windows, 2 s latency run, 1 s spool runs, 100k records
    /// verified) to check it works.
    #[arg(long)]
    quick: bool,
    /// PostgreSQL server for the PostgreSQL section: a libpq connection string or URL of a
    /// role that may create databases (each run makes a scratch database there and drops it).
    /// Default: `GPUMETER_TEST_PG` when set; without either the section is skipped.
    #[arg(long)]
    pg: Option<String>,
    /// Skip the PostgreSQL section.
    #[arg(long, conflicts_with = "pg_only")]
    no_pg: bool,
    /// Only the PostgreSQL section (no SQLite runs, no verify, no agent-side figures).
    #[arg(long)]
    pg_only: bool,
    /// Internal: serve as one collector on this PostgreSQL database (the PostgreSQL section
    /// starts its collectors so, as child processes).
    #[arg(long, hide = true)]
    child_collector: Option<String>,
    /// Internal: the child collector's signing key file.
    #[arg(long, hide = true)]
    child_key: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    fn resolve(mut self) -> anyhow::Result<Self> {
        if self.quick {
            self.agents = self.agents.min(10);
            self.windows = self.windows.min(100);
            self.latency_secs = self.latency_secs.min(2.0);
            self.spool_secs = self.spool_secs.min(1.0);
            self.verify_records = self.verify_records.min(100_000);
        }
        let max_batch = gpumeter_collector::ingest::Limits::default().max_batch_records as usize;
        if self.agents == 0 || self.cards == 0 || self.windows == 0 {
            bail!("--agents, --cards and --windows must be at least 1");
        }
        if self.batch == 0 || self.batch > max_batch {
            bail!("--batch must be 1..={max_batch} (the collector's limit)");
        }
        if self.latency_batch.is_some_and(|b| b == 0 || b > max_batch) {
            bail!("--latency-batch must be 1..={max_batch}");
        }
        if self.in_flight == 0 || self.rate == 0 || self.latency_secs <= 0.0 {
            bail!("--in-flight, --rate and --latency-secs must be positive");
        }
        Ok(self)
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated fleet
// ---------------------------------------------------------------------------------------------

fn gpu_uuid(agent: usize, card: usize) -> String {
    format!(
        "GPU-{agent:08x}-{card:04x}-4e1f-9a2b-{:012x}",
        agent * 131 + card
    )
}

/// A Slurm job's process, with the workload fields the agent derives from its cgroup.
fn slurm_identity(uid: u32, user: &str, job: u32) -> Identity {
    Identity::from_parts(ProcessIdentity {
        uid: Some(uid),
        gid: Some(3000),
        user: Some(user.to_string()),
        group: Some("lab-nlp".into()),
        supplementary_gids: vec![3000, 3017],
        supplementary_groups: vec!["lab-nlp".into(), "gpu-users".into()],
        cgroup: Some(format!(
            "/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_0"
        )),
    })
}

/// A Kubernetes pod's process (pod UID and container id come from its cgroup path).
fn pod_identity(uid: u32, user: &str, pod: &str, container: u64) -> Identity {
    Identity::from_parts(ProcessIdentity {
        uid: Some(uid),
        gid: Some(3000),
        user: Some(user.to_string()),
        group: Some("lab-nlp".into()),
        supplementary_gids: vec![3000],
        supplementary_groups: vec!["lab-nlp".into()],
        cgroup: Some(format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container:064x}.scope",
            pod.replace('-', "_")
        )),
    })
}

/// One card's window as the agent's aggregator would close it: every optional figure present,
/// `principals` principals (Slurm jobs and Kubernetes pods in turn, attributed as the agent
/// does), values varying by window so no two bodies are alike.
fn summary(agent: usize, card: usize, window: usize, principals: usize) -> WindowSummary {
    let w = window as u64;
    let start = BASE_MS + window as i64 * WINDOW_MS;
    let good = 60 - u32::from(window % 17 == 0);
    let util = 35.0 + (w % 60) as f64;
    let occupied = u64::from(good) * 1000;
    let share = 1.0 / principals.max(1) as f64;
    let principals: Vec<PrincipalWindow> = (0..principals)
        .map(|k| {
            let uid = 1001 + k as u32;
            let user = format!("u{uid}");
            let identity = if k % 2 == 0 {
                slurm_identity(uid, &user, 4242 + (window * 7 + k) as u32)
            } else {
                let pod = format!("1b2c3d4e-{agent:04x}-4f{k:02x}-8a00-{card:012x}");
                pod_identity(uid, &user, &pod, 0x5151 + w)
            };
            PrincipalWindow {
                principal: format!("user:{user}"),
                identity: Some(identity),
                occupied_ms: occupied >> k.min(3),
                active_ms: (occupied as f64 * util / 100.0 * share) as u64,
                memory_max_bytes: 41_943_040_000 / (k as u64 + 1) + w * 4096,
                process_count: 1 + (k % 2) as u32,
                matches_grant: k == 0 || window % 5 != 0,
            }
        })
        .collect();
    let active = principals.iter().map(|p| p.active_ms).sum();
    WindowSummary {
        gpu_uuid: gpu_uuid(agent, card),
        start_ms: start,
        end_ms: start + WINDOW_MS,
        interval_ms: 1000,
        expected_samples: 60,
        good_samples: good,
        util_avg_pct: Some(util),
        util_max_pct: Some((util + 9.5).min(100.0)),
        mem_util_avg_pct: Some(util * 0.6),
        memory_used_max_bytes: Some(50_532_974_592 + w * 4096),
        memory_total_bytes: Some(85_899_345_920),
        energy_mj: Some(18_000_000 + w * 1_733),
        energy_estimated: false,
        power_avg_w: Some(300.0 + (w % 40) as f64 * 2.5),
        temperature_max_c: Some(60 + (window % 20) as u32),
        sm_clock_max_mhz: Some(1980),
        mem_clock_max_mhz: Some(2619),
        throttle_reasons: Some(0x4 | (w % 2)),
        ecc_corrected_total: Some(w / 100),
        ecc_uncorrected_total: Some(0),
        health: Health::Ok,
        unavailable_ms: 0,
        assignment: Applied {
            status: Status::Assigned,
            grant_id: format!("hpc-2026-{:04}", agent % 4000),
            principal: "user:alice;user:bob;group:lab-nlp".into(),
            version: 12,
        },
        principals,
        active_ms: active,
        occupied_ms: occupied,
        foreign_ms: if window % 5 == 0 { occupied / 2 } else { 0 },
        grantee_occupied_ms: occupied,
        unattributed_ms: 0,
        energy_estimated_mj: None,
    }
}

/// What every simulated host looks like.
#[derive(Debug, Clone, Copy)]
struct Shape {
    cards: usize,
    principals: usize,
}

/// One simulated agent: its key, its `Hello`, and its records already chained, batched and
/// signed exactly as the agent's uplink would send them.
struct SimAgent {
    hello: v1::Hello,
    batches: Vec<v1::RecordBatch>,
    /// Chain hash of every record, in seq order (what the baseline stores without hashing).
    hashes: Vec<Hash>,
}

fn agent_id(i: usize) -> String {
    format!("bench-agent-{i:05}")
}

fn hello(i: usize, cards: usize, key: &SigningKey) -> v1::Hello {
    v1::Hello {
        protocol_version: gpumeter_proto::PROTOCOL_VERSION,
        agent_id: agent_id(i),
        host_id: format!("bench-host-{i:05}"),
        csp: "bench-csp".into(),
        hostname: format!("gpu{i:05}.bench.example"),
        agent_version: "0.1.0".into(),
        public_key: key.verifying_key().to_bytes().to_vec(),
        driver_version: "550.54.15".into(),
        gpus: (0..cards)
            .map(|c| v1::GpuInfo {
                uuid: gpu_uuid(i, c),
                index: c as u32,
                name: "NVIDIA H100 80GB HBM3".into(),
                serial: format!("1650{i:05}{c:04}"),
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + c),
                memory_total_bytes: Some(85_899_345_920),
                mig_mode: "disabled".into(),
                ..Default::default()
            })
            .collect(),
        epoch: EPOCH,
        next_seq: 1,
        chain_head: GENESIS.to_vec(),
        oldest_spooled_seq: 1,
        agent_time_unix_ms: 0,
        ..Default::default()
    }
}

/// Builds agent `i`: `windows` window closes of `cards` cards each (one body per card per
/// window, in the order the agent spools them), cut into batches of `batch` records with a
/// signed checkpoint on each batch's last record.
fn build_agent(i: usize, shape: Shape, windows: usize, batch: usize) -> SimAgent {
    let cards = shape.cards;
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    seed[8] = 0xb7;
    let key = SigningKey::from_bytes(&seed);
    let id = agent_id(i);
    let mut seq = Sequencer::new(0, GENESIS);
    let mut records: Vec<SpooledRecord> = Vec::with_capacity(cards * windows);
    let mut hashes = Vec::with_capacity(cards * windows);
    for w in 0..windows {
        for c in 0..cards {
            let s = summary(i, c, w, shape.principals);
            let created = s.end_ms + 350;
            records.push(seq.next(window_body(created, &s)));
            hashes.push(seq.head().1);
        }
    }
    let mut batches = Vec::with_capacity(records.len().div_ceil(batch));
    let mut it = records.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<SpooledRecord> = it.by_ref().take(batch).collect();
        batches.extend(signed_batch(&key, &id, EPOCH, chunk));
    }
    SimAgent {
        hello: hello(i, cards, &key),
        batches,
        hashes,
    }
}

/// What each agent of `fleet` sends, copied (each run consumes its loads).
fn loads_of(fleet: &[SimAgent]) -> Vec<Load> {
    fleet
        .iter()
        .map(|a| Load {
            hello: a.hello.clone(),
            batches: a.batches.clone(),
        })
        .collect()
}

fn build_fleet(agents: usize, shape: Shape, windows: usize, batch: usize) -> Vec<SimAgent> {
    // Two builder threads: the build is not measured, only kept short.
    let half = agents.div_ceil(2);
    std::thread::scope(|s| {
        let second = s.spawn(move || {
            (half..agents)
                .map(|i| build_agent(i, shape, windows, batch))
                .collect::<Vec<_>>()
        });
        let mut fleet: Vec<SimAgent> = (0..half)
            .map(|i| build_agent(i, shape, windows, batch))
            .collect();
        match second.join() {
            Ok(rest) => fleet.extend(rest),
            Err(_) => fleet.extend((half..agents).map(|i| build_agent(i, shape, windows, batch))),
        }
        fleet
    })
}

// ---------------------------------------------------------------------------------------------
// Baseline: bare rusqlite, same rows, same tables, no gRPC, no hashing
// ---------------------------------------------------------------------------------------------

/// One batch as plain rows, in the order the collector would see it (agents interleaved).
struct BaseBatch {
    agent_id: String,
    records: Vec<BaseRecord>,
    cp: v1::Checkpoint,
}

struct BaseRecord {
    seq: u64,
    prev_hash: Vec<u8>,
    hash: Hash,
    body: Vec<u8>,
}

/// Batches of all agents interleaved round-robin, as they arrive at the collector.
fn baseline_batches(fleet: &[SimAgent]) -> Vec<BaseBatch> {
    let most = fleet.iter().map(|a| a.batches.len()).max().unwrap_or(0);
    let mut out = Vec::new();
    for b in 0..most {
        for a in fleet {
            let Some(batch) = a.batches.get(b) else {
                continue;
            };
            let Some(cp) = batch.checkpoint.clone() else {
                continue;
            };
            out.push(BaseBatch {
                agent_id: a.hello.agent_id.clone(),
                records: batch
                    .records
                    .iter()
                    .map(|r| BaseRecord {
                        seq: r.seq,
                        prev_hash: r.prev_hash.clone(),
                        hash: a.hashes[r.seq as usize - 1],
                        body: r.body.clone(),
                    })
                    .collect(),
                cp,
            });
        }
    }
    out
}

/// Bytes of a SQLite database with its WAL (the WAL is gone once the last connection closed).
fn db_bytes(db: &Path) -> u64 {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    [db.as_os_str().to_owned(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

struct BaselineResult {
    records: u64,
    /// Time inside transactions (begin to commit), summed.
    db_time: Duration,
    /// Of which: inserts into records, windows, window_principals, checkpoints, and the
    /// commit itself (WAL append, fsync, and the automatic checkpoint when it falls due).
    split: [Duration; 5],
    /// Database size once closed.
    bytes: u64,
    /// Bytes handed to write(2)/pwrite(2) while inserting (WAL appends, checkpoint copies).
    written: u64,
}

impl BaselineResult {
    fn rate(&self) -> f64 {
        self.records as f64 / self.db_time.as_secs_f64()
    }
}

/// Inserts every batch in its own transaction with prepared statements into a fresh database
/// with the collector's schema and PRAGMAs. Body decoding happens outside the timed region.
fn run_baseline(path: &Path, batches: &[BaseBatch]) -> anyhow::Result<BaselineResult> {
    let mut c = Connection::open(path).with_context(|| format!("open {}", path.display()))?;
    c.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let tx = c.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    let io = Path::new("/proc/thread-self/io");
    let wchar_before = wchar(io).unwrap_or(0);
    let mut db_time = Duration::ZERO;
    let mut split = [Duration::ZERO; 5];
    let mut records = 0u64;
    let mut names: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for b in batches {
        let decoded: Vec<(i64, RecordContent)> =
            b.records.iter().map(|r| decode_body(&r.body)).collect();
        let received_ms = gpumeter_collector::ingest::now_ms();
        let t = Instant::now();
        let tx = c.transaction()?;
        {
            let mut ins_rec = tx.prepare_cached(
                "INSERT INTO records (agent_id, seq, prev_hash, hash, body, kind, created_ms, received_ms)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8) ON CONFLICT(agent_id, seq) DO NOTHING",
            )?;
            // The schema's row tables, names interned (store::sqlite_names) and held in a
            // map across transactions, as a hand-written loader would.
            let mut ins_win = tx.prepare_cached(
                "INSERT INTO window_rows (agent_no, seq, card_no, start_ms, end_ms, interval_ms, expected_samples, good_samples,
                   util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes, energy_mj, energy_estimated, power_avg_w,
                   temperature_max_c, throttle_reasons, health, unavailable_ms, assignment_status, grant_no, principal_no,
                   active_ms, occupied_ms, foreign_ms)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,?16,?17,?18,?19,?20,?21,?22,?23,?24,?25)",
            )?;
            let mut ins_pr = tx.prepare_cached(
                "INSERT INTO window_principal_rows (agent_no, seq, principal_no, uid, occupied_ms, active_ms, memory_max_bytes, process_count, matches_grant)
                 VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
            )?;
            let mut no = |name: &str| -> rusqlite::Result<i64> {
                if let Some(&n) = names.get(name) {
                    return Ok(n);
                }
                tx.prepare_cached("INSERT INTO names (name) VALUES (?1)")?
                    .execute([name])?;
                let n = tx.last_insert_rowid();
                names.insert(name.to_owned(), n);
                Ok(n)
            };
            let mut ins_cp = tx.prepare_cached(
                "INSERT INTO checkpoints (agent_id, epoch, seq, chain_hash, signature, received_ms)
                 VALUES (?1,?2,?3,?4,?5,?6) ON CONFLICT(agent_id, seq) DO NOTHING",
            )?;
            for (r, (created_ms, content)) in b.records.iter().zip(&decoded) {
                let seq = r.seq as i64;
                let t0 = Instant::now();
                ins_rec.execute(params![
                    b.agent_id,
                    seq,
                    r.prev_hash,
                    &r.hash[..],
                    r.body,
                    content.kind(),
                    created_ms,
                    received_ms
                ])?;
                let t1 = Instant::now();
                split[0] += t1 - t0;
                if let RecordContent::Window(w) = content {
                    let agent_no = no(&b.agent_id)?;
                    ins_win.execute(params![
                        agent_no,
                        seq,
                        no(&w.gpu_uuid)?,
                        w.start_ms,
                        w.end_ms,
                        w.interval_ms as i64,
                        w.expected_samples,
                        w.good_samples,
                        w.util_avg_pct,
                        w.util_max_pct,
                        w.mem_util_avg_pct,
                        w.memory_used_max_bytes.map(|v| v as i64),
                        w.energy_mj.map(|v| v as i64),
                        w.energy_estimated,
                        w.power_avg_w,
                        w.temperature_max_c,
                        w.throttle_reasons.map(|v| v as i64),
                        w.health,
                        w.unavailable_ms as i64,
                        w.assignment_status,
                        no(&w.grant_id)?,
                        no(&w.principal)?,
                        w.active_ms as i64,
                        w.occupied_ms as i64,
                        w.foreign_ms as i64
                    ])?;
                    let t2 = Instant::now();
                    split[1] += t2 - t1;
                    for p in &w.principals {
                        let principal_no = no(&p.principal)?;
                        ins_pr.execute(params![
                            agent_no,
                            seq,
                            principal_no,
                            p.uid,
                            p.occupied_ms as i64,
                            p.active_ms as i64,
                            p.memory_max_bytes as i64,
                            p.process_count,
                            p.matches_grant
                        ])?;
                    }
                    split[2] += t2.elapsed();
                }
            }
            let t3 = Instant::now();
            ins_cp.execute(params![
                b.agent_id,
                b.cp.epoch as i64,
                b.cp.seq as i64,
                b.cp.chain_hash,
                b.cp.signature,
                received_ms
            ])?;
            split[3] += t3.elapsed();
        }
        let t4 = Instant::now();
        tx.commit()?;
        split[4] += t4.elapsed();
        db_time += t.elapsed();
        records += b.records.len() as u64;
    }
    let written = wchar(io).unwrap_or(0).saturating_sub(wchar_before);
    c.close().map_err(|(_, e)| e)?;
    Ok(BaselineResult {
        written,
        records,
        db_time,
        split,
        bytes: db_bytes(path),
    })
}

// ---------------------------------------------------------------------------------------------
// Ingest over loopback gRPC
// ---------------------------------------------------------------------------------------------

/// What one simulated agent sends.
#[derive(Clone)]
struct Load {
    hello: v1::Hello,
    batches: Vec<v1::RecordBatch>,
}

#[derive(Clone, Copy)]
enum Pace {
    /// Send as fast as acks allow, `in_flight` batches outstanding.
    Saturate { in_flight: usize },
    /// One batch every `period` per agent, agents staggered evenly across the period.
    Fixed { period: Duration },
}

#[derive(Default)]
struct AgentOutcome {
    records: u64,
    acked_seq: u64,
    first_send: Option<Instant>,
    last_send: Option<Instant>,
    last_ack: Option<Instant>,
    latencies: Vec<Duration>,
}

async fn drive_agent(
    url: String,
    load: Load,
    pace: Pace,
    index: usize,
    agents: usize,
    ready: mpsc::Sender<()>,
    mut start: watch::Receiver<Option<Instant>>,
) -> anyhow::Result<AgentOutcome> {
    let agent = load.hello.agent_id.clone();
    let channel = Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("{agent}: connect"))?;
    let mut client = IngestClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20);
    let window = match pace {
        Pace::Saturate { in_flight } => in_flight,
        Pace::Fixed { .. } => 64,
    };
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(window + 2);
    let mut hello = load.hello;
    hello.agent_time_unix_ms = gpumeter_collector::ingest::now_ms();
    tx.send(v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    })
    .await
    .map_err(|_| anyhow::anyhow!("{agent}: stream closed before hello"))?;
    let mut inbound = client
        .session(ReceiverStream::new(rx))
        .await
        .with_context(|| format!("{agent}: session"))?
        .into_inner();
    match inbound.message().await? {
        Some(v1::CollectorMessage {
            kind: Some(collector_message::Kind::Welcome(w)),
        }) if w.durable_seq == 0 => {}
        other => bail!("{agent}: expected a fresh Welcome, got {other:?}"),
    }
    let _ = ready.send(()).await;
    drop(ready);
    let t0 = *start
        .wait_for(|s| s.is_some())
        .await
        .map_err(|_| anyhow::anyhow!("{agent}: no start signal"))?;
    let Some(t0) = t0 else {
        bail!("{agent}: no start time");
    };

    let total_batches = load.batches.len();
    let last_seq = load
        .batches
        .last()
        .and_then(|b| b.checkpoint.as_ref())
        .map_or(0, |c| c.seq);
    let mut out = AgentOutcome {
        records: load.batches.iter().map(|b| b.records.len() as u64).sum(),
        latencies: Vec::with_capacity(total_batches),
        ..Default::default()
    };
    let mut batches = load.batches.into_iter();
    let mut pending: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut ticker = match pace {
        Pace::Fixed { period } => {
            let offset = period.mul_f64(index as f64 / agents as f64);
            Some(tokio::time::interval_at((t0 + offset).into(), period))
        }
        Pace::Saturate { .. } => {
            tokio::time::sleep_until(t0.into()).await;
            None
        }
    };
    let mut unsent = total_batches;
    while out.acked_seq < last_seq {
        let mut due = Vec::new();
        match (&mut ticker, pace) {
            (None, Pace::Saturate { in_flight }) => {
                while pending.len() + due.len() < in_flight {
                    let Some(b) = batches.next() else { break };
                    due.push((b, Instant::now()));
                }
            }
            (Some(t), _) if unsent > 0 => {
                // The next tick or an ack, whichever comes first.
                tokio::select! {
                    at = t.tick() => {
                        if let Some(b) = batches.next() {
                            // Latency counts from when the batch was due, not from when the
                            // sender got round to it, so a stalled collector cannot hide.
                            due.push((b, at.into_std()));
                        }
                    }
                    m = inbound.message() => {
                        on_message(&agent, m?, &mut pending, &mut out)?;
                        continue;
                    }
                }
            }
            _ => {}
        }
        let ticked = !due.is_empty() && ticker.is_some();
        for (b, at) in due {
            let through = b.checkpoint.as_ref().map_or(0, |c| c.seq);
            let now = Instant::now();
            out.first_send.get_or_insert(now);
            out.last_send = Some(now);
            pending.push_back((through, at));
            unsent -= 1;
            tx.send(v1::AgentMessage {
                kind: Some(agent_message::Kind::Batch(b)),
            })
            .await
            .map_err(|_| anyhow::anyhow!("{agent}: stream closed while sending"))?;
        }
        if ticked {
            continue;
        }
        let m = inbound.message().await?;
        on_message(&agent, m, &mut pending, &mut out)?;
    }
    drop(tx);
    Ok(out)
}

fn on_message(
    agent: &str,
    m: Option<v1::CollectorMessage>,
    pending: &mut VecDeque<(u64, Instant)>,
    out: &mut AgentOutcome,
) -> anyhow::Result<()> {
    match m {
        Some(v1::CollectorMessage {
            kind: Some(collector_message::Kind::Ack(a)),
        }) => {
            let now = Instant::now();
            out.acked_seq = out.acked_seq.max(a.durable_seq);
            out.last_ack = Some(now);
            while let Some(&(through, at)) = pending.front() {
                if through > a.durable_seq {
                    break;
                }
                out.latencies.push(now.saturating_duration_since(at));
                pending.pop_front();
            }
            Ok(())
        }
        Some(_) => Ok(()),
        None => bail!("{agent}: the collector closed the stream"),
    }
}

/// CPU time of this process's threads, by who they work for (from /proc, Linux only).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    collector: Duration,
    writer: Duration,
    clients: Duration,
    /// Bytes the writer thread handed to write(2)/pwrite(2): SQLite's WAL appends and
    /// checkpoint copies, i.e. its write amplification.
    writer_wchar: u64,
}

impl Cpu {
    fn read() -> Option<Cpu> {
        let mut cpu = Cpu::default();
        for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((name, t)) = stat_cpu(&stat) else {
                continue;
            };
            if name == "gpumeter-writer" {
                cpu.writer += t;
                cpu.writer_wchar += wchar(&entry.path().join("io")).unwrap_or(0);
            } else if name.starts_with("collector") {
                cpu.collector += t;
            } else {
                cpu.clients += t;
            }
        }
        Some(cpu)
    }

    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            collector: self.collector.saturating_sub(before.collector),
            writer: self.writer.saturating_sub(before.writer),
            clients: self.clients.saturating_sub(before.clients),
            writer_wchar: self.writer_wchar.saturating_sub(before.writer_wchar),
        }
    }

    /// Prints where the CPU went and what the writer wrote, per record.
    fn report(&self, wall: Duration, records: u64) {
        let w = wall.as_secs_f64();
        row(
            "cpu: collector rt / writer thread / clients",
            &format!(
                "{:.2} / {:.2} / {:.2} cores",
                self.collector.as_secs_f64() / w,
                self.writer.as_secs_f64() / w,
                self.clients.as_secs_f64() / w
            ),
            "",
            "",
        );
        row(
            "bytes the writer wrote per record",
            &format!("{:.0}", self.writer_wchar as f64 / records.max(1) as f64),
            "",
            "",
        );
    }
}

/// The name and user + system CPU time in a /proc `stat` file (of a process or a thread).
fn stat_cpu(stat: &str) -> Option<(&str, Duration)> {
    // Clock ticks are 100 Hz on every Linux this runs on (USER_HZ).
    const TICK: Duration = Duration::from_millis(10);
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let name = &stat[open + 1..close];
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based, man proc).
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<u64>().ok());
    Some((name, TICK * (ticks(14)? + ticks(15)?) as u32))
}

/// The `wchar` line of a /proc `io` file.
fn wchar(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
}

struct RunResult {
    records: u64,
    acked: u64,
    stored: u64,
    stored_windows: u64,
    stored_principals: u64,
    stored_checkpoints: u64,
    /// Ledger size once the collector closed it.
    bytes: u64,
    /// Pages per table and index (SQLite's `dbstat`), largest first.
    tables: Vec<(String, u64)>,
    /// After `retain` past every window and a `VACUUM`: the ledger's bytes (tables and
    /// indexes), and the window rows dropped.
    retained: Option<(u64, u64)>,
    /// First send to last ack, over the whole fleet.
    wall: Duration,
    /// First send to last send.
    send_span: Duration,
    latencies: Vec<Duration>,
    cpu: Option<Cpu>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.acked as f64 / self.wall.as_secs_f64()
    }
}

/// Drives `loads` against the collectors at `urls` (agent i talks to `urls[i % len]`): every
/// agent says Hello, then all start together. `sample` is taken just before the start and
/// just after the last ack (CPU readings of whoever does the work). The stored counts and
/// `cpu` are left for the caller.
fn drive_fleet<M>(
    clients: &tokio::runtime::Runtime,
    urls: &[String],
    loads: Vec<Load>,
    pace: Pace,
    sample: impl Fn() -> M,
) -> anyhow::Result<(RunResult, M, M)> {
    clients.block_on(async move {
        let agents = loads.len();
        let (ready_tx, mut ready_rx) = mpsc::channel::<()>(agents);
        let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
        let mut tasks = Vec::with_capacity(agents);
        for (i, load) in loads.into_iter().enumerate() {
            tasks.push(tokio::spawn(drive_agent(
                urls[i % urls.len()].clone(),
                load,
                pace,
                i,
                agents,
                ready_tx.clone(),
                start_rx.clone(),
            )));
        }
        drop(ready_tx);
        let mut ready = 0;
        while ready_rx.recv().await.is_some() {
            ready += 1;
        }
        if ready < agents {
            // Some agent failed before its Welcome; its task says why.
            for t in tasks {
                t.await??;
            }
            bail!("only {ready} of {agents} agents got a Welcome");
        }
        let before = sample();
        let _ = start_tx.send(Some(Instant::now() + Duration::from_millis(20)));
        let mut outcomes = Vec::with_capacity(agents);
        for t in tasks {
            outcomes.push(t.await??);
        }
        let after = sample();
        let first = outcomes.iter().filter_map(|o| o.first_send).min();
        let last_send = outcomes.iter().filter_map(|o| o.last_send).max();
        let last_ack = outcomes.iter().filter_map(|o| o.last_ack).max();
        let (Some(first), Some(last_send), Some(last_ack)) = (first, last_send, last_ack) else {
            bail!("nothing was sent");
        };
        let mut latencies: Vec<Duration> = outcomes
            .iter_mut()
            .flat_map(|o| std::mem::take(&mut o.latencies))
            .collect();
        latencies.sort_unstable();
        let result = RunResult {
            records: outcomes.iter().map(|o| o.records).sum(),
            acked: outcomes.iter().map(|o| o.acked_seq).sum(),
            stored: 0,
            stored_windows: 0,
            stored_principals: 0,
            stored_checkpoints: 0,
            bytes: 0,
            tables: Vec::new(),
            retained: None,
            wall: last_ack - first,
            send_span: last_send - first,
            latencies,
            cpu: None,
        };
        Ok((result, before, after))
    })
}

/// How the benchmark's collectors serve: as `serve` does, but admitting the simulated fleet's
/// replayed windows, which start before its agents registered (a production collector
/// refuses them: limits.max_backfill_s = 0).
fn bench_options() -> ServerOptions {
    let mut opts = ServerOptions::default();
    opts.limits.max_backfill_ms = 400 * 86_400_000;
    opts
}

/// Registers the fleet's agents (the collectors serve without TLS here, the baselines have
/// none either, where only agents an admin registered are admitted).
fn register(store: &dyn Store, loads: &[Load]) -> anyhow::Result<()> {
    for load in loads {
        let key: [u8; 32] = load.hello.public_key.as_slice().try_into()?;
        store.register_agent(&load.hello.agent_id, &key, "bench", "benchmark agent", 0)?;
    }
    Ok(())
}

/// Starts a collector on its own runtime (named `collector`, so its CPU time is told apart
/// from the clients') with a fresh database, drives it with `loads`, stops it.
fn ingest_run(
    clients: &tokio::runtime::Runtime,
    db: &Path,
    loads: Vec<Load>,
    pace: Pace,
) -> anyhow::Result<RunResult> {
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("collector")
        .enable_all()
        .build()?;
    let store = Arc::new(SqliteStore::open(db)?);
    register(store.as_ref(), &loads)?;
    let (addr_tx, addr_rx) = oneshot::channel::<SocketAddr>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = server_rt.spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let _ = addr_tx.send(listener.local_addr()?);
        server::run(listener, store, bench_options(), async move {
            let _ = stop_rx.await;
        })
        .await
    });
    let result = clients
        .block_on(addr_rx)
        .context("collector did not start")
        .and_then(|addr| drive_fleet(clients, &[format!("http://{addr}")], loads, pace, Cpu::read))
        .map(|(mut r, before, after)| {
            r.cpu = match (after, before) {
                (Some(a), Some(b)) => Some(a.since(b)),
                _ => None,
            };
            r
        });
    let _ = stop_tx.send(());
    // A failed run may leave client streams open, which a graceful stop would wait on.
    let stopped =
        clients.block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await });
    drop(server_rt);
    let mut result = result?;
    stopped
        .context("collector did not stop within 10 s")?
        .context("collector task")??;
    // What the ledger really holds, read back after the collector stopped.
    let c = Connection::open(db)?;
    let count = |t: &str| -> anyhow::Result<u64> {
        Ok(c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| {
            r.get::<_, i64>(0)
        })? as u64)
    };
    result.stored = count("records")?;
    result.stored_windows = count("windows")?;
    result.stored_principals = count("window_principals")?;
    result.stored_checkpoints = count("checkpoints")?;
    let mut st = c.prepare(
        "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name HAVING SUM(pgsize) > 0 ORDER BY 2 DESC",
    )?;
    result.tables = st
        .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?
        .collect::<Result<_, _>>()?;
    let pragma = |p: &str| -> anyhow::Result<u64> {
        Ok(c.query_row(&format!("PRAGMA {p}"), [], |r| r.get::<_, i64>(0))? as u64)
    };
    let page = pragma("page_size")?;
    result
        .tables
        .push(("(free pages)".into(), pragma("freelist_count")? * page));
    drop(st);
    drop(c);
    result.bytes = db_bytes(db);
    let wal = std::fs::metadata(format!("{}-wal", db.display())).map_or(0, |m| m.len());
    result.tables.push(("(write-ahead log)".into(), wal));
    result.retained = Some(retained_bytes(db)?);
    Ok(result)
}

/// Retention past every window stored (issue 12 item 6), then `VACUUM`: what the ledger keeps
/// once its raw windows are old (records, bodies, checkpoints, rollups), and the rows dropped.
fn retained_bytes(db: &Path) -> anyhow::Result<(u64, u64)> {
    use gpumeter_collector::store::Store;
    let store = gpumeter_collector::store::sqlite::SqliteStore::open(db)?;
    let last_end: i64 = Connection::open(db)?.query_row(
        "SELECT COALESCE(MAX(end_ms), 0) FROM windows",
        [],
        |r| r.get(0),
    )?;
    let req = gpumeter_collector::retention::RetainRequest {
        horizon_ms: gpumeter_collector::retention::horizon(last_end + 2 * 86_400_000, 1),
        at_ms: gpumeter_collector::ingest::now_ms(),
        actor: "bench".into(),
        edges: Vec::new(),
    };
    let done = store.retain(&req)?;
    store.vacuum()?;
    drop(store);
    let c = Connection::open(db)?;
    let bytes: i64 = c.query_row("SELECT SUM(pgsize) FROM dbstat", [], |r| r.get(0))?;
    Ok((bytes as u64, done.windows_dropped))
}

// ---------------------------------------------------------------------------------------------
// Agent-side costs
// ---------------------------------------------------------------------------------------------

struct SpoolResult {
    per_append: usize,
    records: u64,
    appends: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// Appends `records` to a fresh spool `per_append` at a time (each append fsync'd, as the
/// agent's ledger does at every window close) until they run out or `limit` passes.
fn spool_run(
    dir: &Path,
    records: &[SpooledRecord],
    per_append: usize,
    limit: Duration,
) -> anyhow::Result<SpoolResult> {
    let (mut spool, _) = Spool::open(SpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 4 << 30,
        segment_bytes: 8 << 20,
    })?;
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut done = 0u64;
    for chunk in records.chunks(per_append) {
        let t = Instant::now();
        spool.append(chunk)?;
        latencies.push(t.elapsed());
        done += chunk.len() as u64;
        if start.elapsed() >= limit {
            break;
        }
    }
    let elapsed = start.elapsed();
    latencies.sort_unstable();
    Ok(SpoolResult {
        per_append,
        records: done,
        appends: latencies.len() as u64,
        elapsed,
        latencies,
    })
}

// ---------------------------------------------------------------------------------------------
// Verification of a large ledger
// ---------------------------------------------------------------------------------------------

struct VerifyResult {
    records: u64,
    checkpoints: u64,
    agents: usize,
    /// Derived rows (windows and their principals) re-derived and compared.
    derived: u64,
    elapsed: Duration,
    /// `verify --heads` over one head of every agent, on top of `elapsed`.
    heads_elapsed: Duration,
    ok: bool,
}

/// Writes a ledger of `n` real window records (20 agents, chained, a signed checkpoint every
/// 256 records) through the store's own commit (records, derived rows, sanity flags and
/// checkpoints exactly as ingest writes them), signs a head, then times `verify` over it as
/// `verify --db` runs it (chains, signatures and every derived row), and `--heads` on top.
fn verify_run(path: &Path, n: u64, shape: Shape) -> anyhow::Result<VerifyResult> {
    let store = SqliteStore::open(path)?;
    let agents = 20usize;
    let per_agent = n.div_ceil(agents as u64);
    for a in 0..agents {
        let id = format!("verify-{a:02}");
        let key = SigningKey::from_bytes(&[a as u8 + 1; 32]);
        let mut h = gpumeter_collector::convert::hello_from_wire(&hello(a, shape.cards, &key), 0)?;
        h.agent_id = id.clone();
        h.host_id = id.clone();
        store.hello(&h)?;
        let mut head = GENESIS;
        let mut batch: Vec<IngestRecord> = Vec::with_capacity(256);
        let mut pending: Vec<IngestBatch> = Vec::new();
        for seq in 1..=per_agent {
            let w = (seq - 1) as usize / shape.cards;
            let body = window_body(
                0,
                &summary(a, (seq - 1) as usize % shape.cards, w, shape.principals),
            );
            let hash = chain::record_hash(&head, seq, &body);
            let (created_ms, content) = decode_body(&body);
            batch.push(IngestRecord {
                seq,
                prev_hash: head,
                hash,
                body,
                created_ms,
                content,
            });
            head = hash;
            if seq % 256 == 0 || seq == per_agent {
                let sig = chain::sign_checkpoint(&key, &id, EPOCH, seq, &hash);
                pending.push(IngestBatch {
                    agent_id: id.clone(),
                    records: std::mem::take(&mut batch),
                    checkpoint: CheckpointRow {
                        epoch: EPOCH,
                        seq,
                        chain_hash: hash,
                        signature: sig.to_vec(),
                    },
                    received_ms: 0,
                    alarms: Vec::new(),
                });
                if pending.len() == 16 || seq == per_agent {
                    store.commit(&pending)?;
                    pending.clear();
                }
            }
        }
    }
    let head = store.sign_head(0)?;
    drop(store);
    let ledger = gpumeter_collector::store::sqlite_ledger::SqliteLedger::open_read_only(path)?;
    let derived: u64 = {
        let c = Connection::open(path)?;
        let count = |t: &str| -> anyhow::Result<u64> {
            Ok(c.query_row(&format!("SELECT COUNT(*) FROM {t}"), [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
        };
        count("windows")? + count("window_principals")?
    };
    let t = Instant::now();
    let report = gpumeter_collector::verify::verify(&ledger)?;
    let elapsed = t.elapsed();
    let t = Instant::now();
    let heads = gpumeter_collector::heads::verify_heads(&[head], &ledger)?;
    let heads_elapsed = t.elapsed();
    Ok(VerifyResult {
        records: report.records,
        checkpoints: report.agents.iter().map(|a| a.checkpoints).sum(),
        agents: report.agents.len(),
        derived,
        elapsed,
        heads_elapsed,
        ok: report.ok && heads.is_empty(),
    })
}

/// The 1-minute load average, to judge how quiet the machine was (Linux only).
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Mean time of `f` over `n` calls.
fn per_call(n: u32, mut f: impl FnMut(u32)) -> Duration {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed() / n.max(1)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

fn row(what: &str, value: &str, target: &str, result: &str) {
    println!("  {what:<46} {value:>24}  {target:<18} {result}");
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse().resolve()?;
    if let Some(db) = &args.child_collector {
        return pg::child(db, args.child_key.as_deref());
    }
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("agents")
        .enable_all()
        .build()?;
    let tmp = tempfile::tempdir()?;

    // --- Build everything that is not the collector's work.
    let shape = Shape {
        cards: args.cards,
        principals: args.principals,
    };
    let t = Instant::now();
    let fleet = build_fleet(args.agents, shape, args.windows, args.batch);
    let lat_batch = args.latency_batch.unwrap_or(args.cards);
    let period = Duration::from_secs_f64((args.agents * lat_batch) as f64 / args.rate as f64);
    let lat_batches = (args.latency_secs / period.as_secs_f64()).ceil().max(1.0) as usize;
    let lat_windows = (lat_batches * lat_batch).div_ceil(args.cards);
    let lat_fleet = build_fleet(args.agents, shape, lat_windows, lat_batch);
    let base = baseline_batches(&fleet);
    let spool_records: Vec<SpooledRecord> = {
        let mut seq = Sequencer::new(0, GENESIS);
        base.iter()
            .flat_map(|b| b.records.iter())
            .take(400_000)
            .map(|r| seq.next(r.body.clone()))
            .collect()
    };
    let build = t.elapsed();
    let total: u64 = fleet
        .iter()
        .flat_map(|a| &a.batches)
        .map(|b| b.records.len() as u64)
        .sum();
    let body_bytes: u64 = fleet
        .iter()
        .flat_map(|a| &a.batches)
        .flat_map(|b| &b.records)
        .map(|r| r.body.len() as u64)
        .sum();

    println!("gpumeter ingest benchmark (DESIGN.md §8)");
    println!(
        "  fleet: {} agents x {} cards x {} windows = {} card-windows; {} records/batch, {} batches in flight per agent",
        args.agents,
        args.cards,
        args.windows,
        thousands(total as f64),
        args.batch,
        args.in_flight
    );
    println!(
        "  bodies: {:.0} bytes mean (CardWindow, {} principals, every optional field set); cores: {}",
        body_bytes as f64 / total.max(1) as f64,
        args.principals,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "  records, chain links and checkpoint signatures were built before timing ({:.2} s): the",
        build.as_secs_f64()
    );
    println!(
        "  figures below are the collector's work (plus its loopback clients on the same cores)."
    );
    println!(
        "  database files: {}; load average at start: {}",
        tmp.path().display(),
        loadavg()
    );
    println!();

    if args.pg_only {
        return pg::section(
            &args,
            &clients,
            &fleet,
            &lat_fleet,
            period,
            lat_batch,
            tmp.path(),
        );
    }

    // --- Baseline, ingest, baseline again (the machine is noisy: bracket the ingest run).
    let base1 = run_baseline(&tmp.path().join("baseline-1.db"), &base)?;
    eprintln!("baseline 1: {} records/s", thousands(base1.rate()));
    let sat = ingest_run(
        &clients,
        &tmp.path().join("ingest.db"),
        loads_of(&fleet),
        Pace::Saturate {
            in_flight: args.in_flight,
        },
    )?;
    eprintln!("ingest: {} records/s", thousands(sat.rate()));
    let base2 = run_baseline(&tmp.path().join("baseline-2.db"), &base)?;
    eprintln!("baseline 2: {} records/s", thousands(base2.rate()));
    drop(base);

    // --- Fixed offered load.
    let lat = ingest_run(
        &clients,
        &tmp.path().join("latency.db"),
        loads_of(&lat_fleet),
        Pace::Fixed { period },
    )?;
    eprintln!("latency run done");

    // --- Agent side.
    let limit = Duration::from_secs_f64(args.spool_secs);
    let spool_small = spool_run(
        &tmp.path().join("spool-small"),
        &spool_records,
        args.cards,
        limit,
    )?;
    let spool_big = spool_run(
        &tmp.path().join("spool-big"),
        &spool_records,
        args.batch,
        limit,
    )?;
    let key = SigningKey::from_bytes(&[0x5a; 32]);
    let vk = key.verifying_key();
    let head = spool_records.last().map_or(GENESIS, SpooledRecord::hash);
    let sig = chain::sign_checkpoint(&key, "bench-agent-00000", EPOCH, 1, &head);
    let sign = per_call(2000, |i| {
        std::hint::black_box(chain::sign_checkpoint(
            &key,
            "bench-agent-00000",
            EPOCH,
            u64::from(i),
            &head,
        ));
    });
    let verify = per_call(2000, |_| {
        let _ = std::hint::black_box(chain::verify_checkpoint(
            &vk,
            "bench-agent-00000",
            EPOCH,
            1,
            &head,
            &sig,
        ));
    });
    let sample: Vec<&SpooledRecord> = spool_records.iter().take(20_000).collect();
    let n = sample.len().max(1) as u32;
    let hash = per_call(n, |i| {
        let r = sample[i as usize % sample.len()];
        std::hint::black_box(chain::record_hash(&r.prev_hash, r.seq, &r.body));
    });
    let decode = per_call(n, |i| {
        let r = sample[i as usize % sample.len()];
        std::hint::black_box(decode_body(&r.body));
    });
    let summaries: Vec<WindowSummary> = (0..2000)
        .map(|w| summary(0, w % 8, w, args.principals))
        .collect();
    let encode = per_call(2000, |i| {
        std::hint::black_box(window_body(0, &summaries[i as usize]));
    });

    // --- Report.
    let base_rate = (base1.rate() + base2.rate()) / 2.0;
    let ratio = sat.rate() / base_rate;
    let lat_p50 = pct(&lat.latencies, 50.0);
    let lat_p99 = pct(&lat.latencies, 99.0);
    let complete = |r: &RunResult| r.acked == r.records && r.stored == r.records;
    println!(
        "throughput (saturated: every agent keeps {} batches in flight)",
        args.in_flight
    );
    row("measure", "value", "target", "result");
    row(
        "bare rusqlite baseline, before ingest",
        &format!("{} rec/s", thousands(base1.rate())),
        "",
        "",
    );
    row(
        "bare rusqlite baseline, after ingest",
        &format!("{} rec/s", thousands(base2.rate())),
        "",
        "",
    );
    {
        // Where the baseline's time goes, per record, both runs together.
        let n = (base1.records + base2.records).max(1) as u32;
        let part = |i: usize| us((base1.split[i] + base2.split[i]) / n);
        let rest = (base1.db_time + base2.db_time)
            .saturating_sub(base1.split.iter().chain(&base2.split).sum::<Duration>());
        row(
            "  per record: records / windows / principals",
            &format!("{} / {} / {}", part(0), part(1), part(2)),
            "",
            "",
        );
        row(
            "  per record: checkpoint / commit / other",
            &format!("{} / {} / {}", part(3), part(4), us(rest / n)),
            "",
            "",
        );
    }
    row(
        "collector ingest, durable + acknowledged",
        &format!("{} rec/s", thousands(sat.rate())),
        ">= 100,000 rec/s",
        verdict(sat.rate() >= TARGET_RATE),
    );
    row(
        "ratio ingest / baseline (mean of the two)",
        &format!("{ratio:.3}"),
        ">= 0.60",
        verdict(ratio >= TARGET_RATIO),
    );
    row(
        "records acked / stored / sent",
        &format!(
            "{} / {} / {}",
            thousands(sat.acked as f64),
            thousands(sat.stored as f64),
            thousands(sat.records as f64)
        ),
        "all",
        verdict(complete(&sat)),
    );
    row(
        "rows stored: windows / principals / checkpoints",
        &format!(
            "{} / {} / {}",
            thousands(sat.stored_windows as f64),
            thousands(sat.stored_principals as f64),
            thousands(sat.stored_checkpoints as f64)
        ),
        "",
        "",
    );
    row(
        "database files per record: ingest / baseline",
        &format!(
            "{:.0} / {:.0}",
            sat.bytes as f64 / sat.stored.max(1) as f64,
            base1.bytes as f64 / base1.records.max(1) as f64
        ),
        "",
        "",
    );
    let per_record = |b: u64| b as f64 / sat.stored.max(1) as f64;
    // What the ledger keeps: every table and index and the free pages. The write-ahead log
    // (still open here, as the collector's store is) is bounded by the checkpointer
    // (TRUNCATE past 256 MiB), so it is no part of what grows with the windows.
    let kept: u64 = sat
        .tables
        .iter()
        .filter(|(t, _)| t != "(write-ahead log)")
        .map(|(_, b)| b)
        .sum();
    row(
        "ledger bytes per card-window (WAL apart)",
        &format!("{:.0}", per_record(kept)),
        "<= 150 B",
        verdict(per_record(kept) <= 150.0),
    );
    for (table, b) in sat.tables.iter().filter(|(_, b)| per_record(*b) >= 1.0) {
        row(
            &format!("  of which {table}"),
            &format!("{:.0}", per_record(*b)),
            "",
            "",
        );
    }
    if let Some((bytes, dropped)) = sat.retained {
        row(
            "  once retention has dropped its raw windows",
            &format!(
                "{:.0} ({} window rows dropped)",
                per_record(bytes),
                thousands(dropped as f64)
            ),
            "",
            "",
        );
    }
    row(
        "baseline: bytes written per record",
        &format!(
            "{:.0}",
            (base1.written + base2.written) as f64 / (base1.records + base2.records).max(1) as f64
        ),
        "",
        "",
    );
    row(
        "wall time, first send to last ack",
        &format!("{:.2} s", sat.wall.as_secs_f64()),
        "",
        "",
    );
    row(
        "ack latency p50 / p99 (queueing: in flight / rate)",
        &format!(
            "{} / {}",
            ms(pct(&sat.latencies, 50.0)),
            ms(pct(&sat.latencies, 99.0))
        ),
        "",
        "",
    );
    if let Some(c) = sat.cpu {
        c.report(sat.wall, sat.stored);
    }
    println!();
    println!(
        "latency at a fixed offered load ({} agents each send one {}-record batch every {}, staggered; {:.1} s)",
        args.agents,
        lat_batch,
        ms(period),
        args.latency_secs
    );
    row("measure", "value", "target", "result");
    row(
        "offered load, achieved",
        &format!(
            "{} rec/s",
            thousands(lat.records as f64 / lat.send_span.as_secs_f64().max(1e-9))
        ),
        &format!("{} rec/s", thousands(args.rate as f64)),
        "",
    );
    row("ack latency p50", &ms(lat_p50), "", "");
    row(
        "ack latency p99",
        &ms(lat_p99),
        "< 50 ms",
        verdict(lat_p99 < TARGET_P99),
    );
    row(
        "ack latency max",
        &ms(lat.latencies.last().copied().unwrap_or_default()),
        "",
        "",
    );
    row(
        "records acked / stored / sent",
        &format!(
            "{} / {} / {}",
            thousands(lat.acked as f64),
            thousands(lat.stored as f64),
            thousands(lat.records as f64)
        ),
        "all",
        verdict(complete(&lat)),
    );
    if let Some(c) = lat.cpu {
        c.report(lat.wall, lat.stored);
    }
    println!();
    println!("ledger verification (gpumeter-collector verify --db)");
    let v = verify_run(&tmp.path().join("verify.db"), args.verify_records, shape)?;
    row("measure", "value", "target", "result");
    row(
        &format!(
            "verify {} records, {} agents, {} checkpoints",
            thousands(v.records as f64),
            v.agents,
            thousands(v.checkpoints as f64)
        ),
        &format!("{:.2} s", v.elapsed.as_secs_f64()),
        "< 10 s per 1M",
        verdict(v.ok && v.elapsed.as_secs_f64() * 1e6 / (v.records.max(1) as f64) < 10.0),
    );
    row(
        &format!(
            "  of which derived rows re-derived: {}",
            thousands(v.derived as f64)
        ),
        "",
        "",
        "",
    );
    let heads_ratio = v.heads_elapsed.as_secs_f64() / v.elapsed.as_secs_f64().max(1e-9);
    row(
        "verify --heads (one head over every agent), added",
        &format!(
            "{:.3} s ({:.1} %)",
            v.heads_elapsed.as_secs_f64(),
            heads_ratio * 100.0
        ),
        "< 10 %",
        verdict(heads_ratio < 0.10),
    );
    row(
        "verify rate",
        &format!(
            "{} rec/s",
            thousands(v.records as f64 / v.elapsed.as_secs_f64())
        ),
        "",
        "",
    );
    println!();
    println!("agent side and per-item cpu cost");
    row("measure", "value", "", "");
    for s in [&spool_small, &spool_big] {
        row(
            &format!("spool append, {} records/append, fsync'd", s.per_append),
            &format!(
                "{} rec/s",
                thousands(s.records as f64 / s.elapsed.as_secs_f64())
            ),
            "",
            "",
        );
        row(
            &format!("  append latency p50 / p99 ({} appends)", s.appends),
            &format!(
                "{} / {}",
                ms(pct(&s.latencies, 50.0)),
                ms(pct(&s.latencies, 99.0))
            ),
            "",
            "",
        );
    }
    row("sign checkpoint (agent, once per batch)", &us(sign), "", "");
    row(
        "verify checkpoint (collector, once per batch)",
        &us(verify),
        "",
        "",
    );
    row(
        "record hash, SHA-256 (both sides, per record)",
        &us(hash),
        "",
        "",
    );
    row(
        "encode CardWindow body (agent, per record)",
        &us(encode),
        "",
        "",
    );
    row(
        "decode body to rows (collector, per record)",
        &us(decode),
        "",
        "",
    );
    println!();
    println!(
        "  load average at the end: {} (other processes on these cores skew every figure)",
        loadavg()
    );
    println!(
        "  baseline = one transaction per {}-record batch, prepared statements, the collector's schema",
        args.batch
    );
    println!(
        "  and PRAGMAs (WAL, synchronous=FULL), agents interleaved; timed inside transactions only."
    );
    println!(
        "  ingest = Hello/Welcome, then batches over loopback gRPC, verified (chain + signature),"
    );
    println!("  group-committed by the collector's writer, acknowledged after commit.");
    pg::section(
        &args,
        &clients,
        &fleet,
        &lat_fleet,
        period,
        lat_batch,
        tmp.path(),
    )
}

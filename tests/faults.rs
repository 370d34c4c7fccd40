//! Faults, end to end (issue 6: nothing lost, nothing counted twice, nothing forged): a
//! collector killed mid-stream, agents killed mid-window, a long outage, connections cut
//! mid-batch, whole streams replayed, a record re-sent with other bytes, a corrupted spool and
//! an agent clock an hour off. Every test checks what is stored against the scenario's ground
//! truth exactly: each seq once and gapless (or missing exactly where the test destroyed a
//! record, with an alarm saying so), every window of every card there and contiguous with the
//! samples, energy and utilization the simulated cards produced (partial only where an agent
//! stopped or started, never with a sample counted twice), and `verify` passing. A stopped
//! agent's spool counts too: what the collector does not hold yet must still be there.
//!
//! The simulated agents started as real binaries run on a clock that starts at the real start
//! time: their scenario's t0 is the start of the window holding that instant. With a speed
//! above 1 the instant is not observable from outside, so those runs use a scenario whose
//! utilization changes every window in a pattern no shift of it repeats, and the test finds
//! the one t0 that explains every stored window exactly. Agents that are restarted run at
//! speed 1 (a real clock never goes back, a sped-up one restarted from real time does), with
//! short windows.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gpumeter_agent::clock::{Clock, ScaledClock, align_down, align_up};
use gpumeter_agent::config::{AgentConfig, SamplingConfig};
use gpumeter_agent::gpu::sim::{Scenario, SimSource};
use gpumeter_agent::ledger::Ledger;
use gpumeter_agent::run::{Agent, Parts, RunOptions};
use gpumeter_agent::spool::{Spool, SpoolConfig};
use gpumeter_agent::uplink::UplinkStatus;
use gpumeter_e2e::{TestCollector, agent_config, bin, now_ms};
use gpumeter_proto::chain::{self, Hash};
use gpumeter_proto::v1;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process that is killed (SIGKILL) and reaped when dropped, so a failing test leaves
/// nothing running behind it.
struct Proc {
    child: Option<Child>,
    what: String,
}

impl Proc {
    fn spawn(mut cmd: Command, what: &str, log: &Path) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Proc {
            child: Some(child),
            what: what.to_string(),
        }
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the process was started")
    }

    /// Its exit status, if it has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().unwrap()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `limit` for it to exit.
    async fn term(&mut self, limit: Duration) -> ExitStatus {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(self.child()),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.exited() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?} of SIGTERM",
                self.what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `gpumeter-collector serve` on a fixed port, once it accepts connections. A start that loses
/// the port to the process just killed (it exits at once) is retried.
async fn start_collector_proc(port: u16, db: &Path, log: &Path) -> Proc {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Agents here run sped-up clocks from the real start time, so their windows lie in
        // the collector's future: allow it (production refuses windows more than
        // limits.max_clock_skew_s ahead; tests/isolation.rs checks that).
        let config = db.with_extension("toml");
        std::fs::write(
            &config,
            "[limits]\nmax_clock_skew_s = 31536000\nmax_backfill_s = 86400\n",
        )
        .unwrap();
        let mut cmd = Command::new(bin("gpumeter-collector"));
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
            .arg(db)
            .args(gpumeter_e2e::serve_tls_args())
            .arg("--config")
            .arg(&config);
        let mut p = Proc::spawn(cmd, "collector", log);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return p;
            }
            if p.exited().is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "collector never listened on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Instant::now() < deadline,
            "collector never started on {port}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start_agent_proc(cfg: &Path, log: &Path) -> Proc {
    let mut cmd = Command::new(bin("gpumeter-agent"));
    cmd.args(["run", "--config"]).arg(cfg);
    Proc::spawn(cmd, "agent", log)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it holds; fails the test naming `what` after `limit`.
async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Deterministic pseudo-random moments; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn seeded(what: &str) -> Rng {
        let seed = std::env::var("GPUMETER_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| now_ms() as u64 | 1);
        eprintln!("{what}: seed {seed} (GPUMETER_FAULT_SEED)");
        Rng(seed)
    }

    /// xorshift64*.
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios and configs

const W60: i64 = 60_000;

/// Cards whose utilization changes every `phase_s` seconds, phase k at `(m·k + a) mod 101` %,
/// with m, a distinct per card: no shift of the pattern by fewer than 101 phases matches it.
fn phased_scenario(uuids: &[&str], phase_s: u64, phases: u64) -> String {
    let mut s = String::new();
    for (i, u) in uuids.iter().enumerate() {
        let (m, a) = ([37, 53, 71, 89][i % 4], 11 + 17 * i as u64);
        s.push_str(&format!(
            "[[cards]]\nuuid = \"{u}\"\nidle_power_w = 100\nmax_power_w = 500\n"
        ));
        for k in 0..phases {
            s.push_str(&format!(
                "[[cards.phases]]\nfrom_s = {}\nuntil_s = {}\nutil_pct = {}\n",
                k * phase_s,
                (k + 1) * phase_s,
                (m * k + a) % 101
            ));
        }
    }
    s
}

/// Cards at a constant utilization forever: constant power, so a window's energy is
/// power × its good samples × the interval, wherever t0 lies.
fn constant_scenario(cards: &[(&str, u32)]) -> String {
    cards
        .iter()
        .map(|(u, util)| {
            format!(
                "[[cards]]\nuuid = \"{u}\"\nidle_power_w = 100\nmax_power_w = 500\n[[cards.phases]]\nfrom_s = 0\nutil_pct = {util}\n"
            )
        })
        .collect()
}

/// Settings of a real agent binary with a simulated source.
struct BinAgent<'a> {
    id: &'a str,
    url: &'a str,
    scenario: &'a str,
    speed: f64,
    interval_ms: u64,
    window_ms: u64,
    batch: u32,
}

impl BinAgent<'_> {
    /// Writes the scenario and config under `dir/<id>`; returns (config, state_dir).
    fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let home = dir.join(self.id);
        std::fs::create_dir_all(&home).unwrap();
        let scenario = home.join("scenario.toml");
        std::fs::write(&scenario, self.scenario).unwrap();
        let state = home.join("state");
        let cfg = home.join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "agent_id = \"{id}\"\ncsp = \"kt\"\nstate_dir = \"{state}\"\n\n[collector]\nurl = \"{url}\"\n{tls}max_batch_records = {batch}\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\n\n[sampling]\ninterval_ms = {iv}\nwindow_ms = {w}\n\n[source]\nkind = \"sim\"\nscenario = \"{sc}\"\nspeed = {speed:?}\n",
                id = self.id,
                state = state.display(),
                url = self.url,
                tls = gpumeter_e2e::agent_tls_toml(self.id, self.id, &home.join("tls")),
                batch = self.batch,
                iv = self.interval_ms,
                w = self.window_ms,
                sc = scenario.display(),
                speed = self.speed,
            ),
        )
        .unwrap();
        (cfg, state)
    }
}

/// An agent built in-process on a scaled clock, sampling a replayable source from `start_at`
/// (its t0) to `stop_at` and then draining until everything is acknowledged.
struct InProc {
    task: JoinHandle<anyhow::Result<()>>,
    ledger: Ledger,
    status: watch::Receiver<UplinkStatus>,
}

fn start_in_process(
    cfg: AgentConfig,
    sc: Scenario,
    clock: ScaledClock,
    start_at: i64,
    stop_at: i64,
) -> InProc {
    let clock: Arc<dyn Clock> = Arc::new(clock);
    let parts = Parts {
        attributor: Box::new(sc.attributor()),
        source: Box::new(SimSource::new(sc, start_at)),
        clock,
    };
    let agent = Agent::build(cfg, parts).unwrap();
    let ledger = agent.ledger();
    let status = agent.status();
    let task = tokio::spawn(async move {
        let (tx, rx) = watch::channel(false);
        let r = agent
            .run(
                RunOptions {
                    stop_at: Some(stop_at),
                    start_at: Some(start_at),
                    drain: true,
                    await_assignments: None,
                },
                rx,
            )
            .await;
        drop(tx);
        r
    });
    InProc {
        task,
        ledger,
        status,
    }
}

fn sim_config(id: &str, url: &str, state: &Path, batch: u32, iv: u64, w: u64) -> AgentConfig {
    let mut cfg = agent_config(id, "kt", url, state, batch);
    cfg.sampling = SamplingConfig {
        interval_ms: iv,
        window_ms: w,
    };
    cfg
}

// ---------------------------------------------------------------------------------------------
// The ledger as stored, and as the agent still holds it

fn db_conn(db: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

/// Highest seq the collector holds for an agent (0 while it holds none or the file is new).
fn max_seq(db: &Path, agent: &str) -> u64 {
    let Ok(c) = rusqlite::Connection::open(db) else {
        return 0;
    };
    c.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM records WHERE agent_id = ?1",
        [agent],
        |r| r.get::<_, i64>(0),
    )
    .map_or(0, |s| s as u64)
}

fn count_events(db: &Path, agent: &str, kind: &str) -> u64 {
    let Ok(c) = rusqlite::Connection::open(db) else {
        return 0;
    };
    c.query_row(
        "SELECT COUNT(*) FROM events WHERE agent_id = ?1 AND kind = ?2",
        [agent, kind],
        |r| r.get::<_, i64>(0),
    )
    .map_or(0, |s| s as u64)
}

/// Window rows stored after the agent's last start.
fn windows_since_last_start(db: &Path, agent: &str) -> u64 {
    let Ok(c) = rusqlite::Connection::open(db) else {
        return 0;
    };
    c.query_row(
        "SELECT COUNT(*) FROM windows WHERE agent_id = ?1 AND seq > (SELECT COALESCE(MAX(seq), 0) FROM events WHERE agent_id = ?1 AND kind = 'agent_started')",
        [agent],
        |r| r.get::<_, i64>(0),
    )
    .map_or(0, |s| s as u64)
}

#[derive(Debug, Clone)]
struct StoredRecord {
    seq: u64,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
    body: Vec<u8>,
    created_ms: i64,
    received_ms: i64,
}

/// An agent's records as the ledger holds them: links and bodies read back through the
/// ledger's own reader (bodies lie in compressed blocks), times from the rows.
fn stored_records(db: &Path, agent: &str) -> Vec<StoredRecord> {
    use gpumeter_collector::verify::ChainSource;
    let mut chain = Vec::new();
    gpumeter_collector::store::sqlite_ledger::SqliteLedger::open_read_only(db)
        .unwrap()
        .scan_records(agent, &mut |r| chain.push(r))
        .unwrap();
    let c = db_conn(db);
    let mut st = c
        .prepare(
            "SELECT seq, created_ms, received_ms FROM records WHERE agent_id = ?1 ORDER BY seq",
        )
        .unwrap();
    let times: Vec<(u64, i64, i64)> = st
        .query_map([agent], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(chain.len(), times.len());
    chain
        .into_iter()
        .zip(times)
        .map(|(r, (seq, created_ms, received_ms))| {
            assert_eq!(r.seq, seq);
            assert_eq!(r.unreadable, None, "{agent} seq {seq}");
            StoredRecord {
                seq,
                prev_hash: r.prev_hash,
                hash: r.hash,
                body: r.body,
                created_ms,
                received_ms,
            }
        })
        .collect()
}

/// (kind, seq, detail) of an agent's alarms, oldest first.
fn alarms(db: &Path, agent: &str) -> Vec<(String, Option<i64>, String)> {
    let c = db_conn(db);
    let mut st = c
        .prepare("SELECT kind, seq, detail FROM alarms WHERE agent_id = ?1 ORDER BY id")
        .unwrap();
    st.query_map([agent], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Alarms other than clock skew (a sped-up simulated clock is always skewed).
fn alarms_but_skew(db: &Path, agent: &str) -> Vec<(String, Option<i64>, String)> {
    alarms(db, agent)
        .into_iter()
        .filter(|a| a.0 != "clock_skew")
        .collect()
}

/// Everything an agent ever wrote, as (seq, body): the collector's records, then what only its
/// spool still holds (a stopped agent keeps what was not acknowledged yet). Asserts that the
/// collector holds 1..=C with exactly the seqs in `lost` missing, each stored hash matches its
/// body and link, the spool never let go of a record the collector lacks, records both hold
/// are byte-identical, and the spool holds the rest up to its head without a gap.
/// Returns the records and C.
fn everything(db: &Path, agent: &str, state: &Path, lost: &[u64]) -> (Vec<(u64, Vec<u8>)>, u64) {
    let stored = stored_records(db, agent);
    let held = stored.last().map_or(0, |r| r.seq);
    let want: Vec<u64> = (1..=held).filter(|s| !lost.contains(s)).collect();
    let got: Vec<u64> = stored.iter().map(|r| r.seq).collect();
    assert_eq!(
        got, want,
        "{agent}: stored seqs, no gap or duplicate but {lost:?}"
    );
    for r in &stored {
        let prev = chain::to_hash(&r.prev_hash).unwrap();
        assert_eq!(
            r.hash,
            chain::record_hash(&prev, r.seq, &r.body).to_vec(),
            "{agent}: record {} hash",
            r.seq
        );
    }
    for pair in stored.windows(2) {
        if pair[1].seq == pair[0].seq + 1 {
            assert_eq!(
                pair[1].prev_hash, pair[0].hash,
                "{agent}: link at {}",
                pair[1].seq
            );
        }
    }

    let (spool, _) = Spool::open(SpoolConfig {
        dir: state.join("spool"),
        max_bytes: 1 << 30,
        segment_bytes: 8 << 20,
    })
    .unwrap();
    let (acked, _) = spool.acked();
    let (head, _) = spool.head();
    assert!(
        acked <= held,
        "{agent}: the spool dropped records through {acked} but the collector holds {held}"
    );
    let tail = spool.read_from(acked + 1, usize::MAX).unwrap();
    let tail_seqs: Vec<u64> = tail.iter().map(|r| r.seq).collect();
    let want_tail: Vec<u64> = (acked + 1..=head).filter(|s| !lost.contains(s)).collect();
    assert_eq!(
        tail_seqs, want_tail,
        "{agent}: spool holds its unacked records"
    );
    let by_seq: BTreeMap<u64, &StoredRecord> = stored.iter().map(|r| (r.seq, r)).collect();
    let mut all: Vec<(u64, Vec<u8>)> = stored.iter().map(|r| (r.seq, r.body.clone())).collect();
    for r in tail {
        match by_seq.get(&r.seq) {
            Some(s) => {
                assert_eq!(s.body, r.body, "{agent}: record {} differs", r.seq);
                assert_eq!(s.prev_hash, r.prev_hash.to_vec(), "{agent}: link {}", r.seq);
            }
            None => {
                assert!(
                    r.seq > held,
                    "{agent}: record {} missing below {held}",
                    r.seq
                );
                all.push((r.seq, r.body));
            }
        }
    }
    let all_seqs: Vec<u64> = all.iter().map(|r| r.0).collect();
    let want_all: Vec<u64> = (1..=head.max(held)).filter(|s| !lost.contains(s)).collect();
    assert_eq!(all_seqs, want_all, "{agent}: collector + spool");
    (all, held)
}

type WindowRowT = (u64, String, i64, i64, u32, u32, Option<i64>, Option<f64>);

/// The decoded `windows` rows equal the window bodies of the records the collector holds.
fn check_window_rows(db: &Path, agent: &str, all: &[(u64, Vec<u8>)], held: u64) {
    let c = db_conn(db);
    let mut st = c
        .prepare(
            "SELECT seq, gpu_uuid, start_ms, end_ms, expected_samples, good_samples, energy_mj, util_avg_pct
             FROM windows WHERE agent_id = ?1 ORDER BY seq",
        )
        .unwrap();
    let rows: Vec<WindowRowT> = st
        .query_map([agent], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let want: Vec<WindowRowT> = all
        .iter()
        .filter(|(s, _)| *s <= held)
        .filter_map(|(s, b)| match decode(*s, b).kind {
            Some(v1::record_body::Kind::CardWindow(w)) => Some((
                *s,
                w.gpu_uuid,
                w.window_start_unix_ms,
                w.window_end_unix_ms,
                w.expected_samples,
                w.good_samples,
                w.energy_mj.map(|e| e as i64),
                w.util_avg_pct,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        rows, want,
        "{agent}: windows table matches the stored bodies"
    );
}

fn decode(seq: u64, body: &[u8]) -> v1::RecordBody {
    v1::RecordBody::decode(body).unwrap_or_else(|e| panic!("record {seq} does not decode: {e}"))
}

/// One run of an agent process: from its `agent_started` event to the next.
#[derive(Debug)]
struct Life {
    started_at: i64,
    windows: Vec<v1::CardWindow>,
    /// Assignment sets applied (a fresh collector's first set is one).
    assignment_changes: u32,
}

/// Splits an agent's records into lives. Only starts, assignment changes and card windows
/// are expected from these scenarios (no processes, no faults of the cards).
fn lives_of(records: &[(u64, Vec<u8>)]) -> Vec<Life> {
    let mut lives: Vec<Life> = Vec::new();
    for (seq, body) in records {
        match decode(*seq, body).kind {
            Some(v1::record_body::Kind::Event(e))
                if e.kind == v1::EventKind::AgentStarted as i32 =>
            {
                lives.push(Life {
                    started_at: e.at_unix_ms,
                    windows: Vec::new(),
                    assignment_changes: 0,
                })
            }
            Some(v1::record_body::Kind::Event(e))
                if e.kind == v1::EventKind::AssignmentChanged as i32 =>
            {
                lives
                    .last_mut()
                    .unwrap_or_else(|| panic!("record {seq} before any agent start"))
                    .assignment_changes += 1
            }
            Some(v1::record_body::Kind::CardWindow(w)) => lives
                .last_mut()
                .unwrap_or_else(|| panic!("window record {seq} before any agent start"))
                .windows
                .push(w),
            other => panic!("unexpected record {seq}: {other:?}"),
        }
    }
    lives
}

fn windows_of<'a>(life: &'a Life, uuid: &str) -> Vec<&'a v1::CardWindow> {
    life.windows.iter().filter(|w| w.gpu_uuid == uuid).collect()
}

/// Checks one life against a phased scenario whose t0 is `t0`, exactly. The life must have at
/// least two windows per card; its first window may start late (it holds the slots after the
/// agent's first, baseline read, up to its end), its last may end early (the flush at
/// shutdown), every other one is whole. Energy is the counter's rise between the reads that
/// bound the window's samples; utilization is the mean of the per-slot readings.
fn check_phased(life: &Life, sc: &Scenario, t0: i64, iv: i64, w: i64) -> Result<(), String> {
    let per = (w / iv) as u32;
    let mut starts_of_first: Option<Vec<i64>> = None;
    for card in &sc.cards {
        let ws = windows_of(life, &card.uuid);
        if ws.len() < 2 {
            return Err(format!(
                "{}: {} windows, want 2 or more",
                card.uuid,
                ws.len()
            ));
        }
        let mut prev_end: Option<i64> = None;
        for (i, x) in ws.iter().enumerate() {
            let (start, end, n) = (
                x.window_start_unix_ms,
                x.window_end_unix_ms,
                i64::from(x.expected_samples),
            );
            let at = format!("{} window {i} [{start}, {end})", card.uuid);
            let last = i + 1 == ws.len();
            if let Err(e) = window_bounds(start, end, n, iv, w, i == 0, last) {
                return Err(format!("{at}: {e}"));
            }
            if x.sample_interval_ms != iv as u64 {
                return Err(format!("{at}: bad interval"));
            }
            if x.good_samples != x.expected_samples
                || n == 0
                || x.expected_samples > per
                || (i > 0 && !last && x.expected_samples != per)
            {
                return Err(format!(
                    "{at}: samples {}/{} of {per}",
                    x.good_samples, x.expected_samples
                ));
            }
            if x.unavailable_ms != 0 || x.health != v1::Health::Ok as i32 {
                return Err(format!("{at}: not healthy"));
            }
            if prev_end.is_some_and(|p| p != start) {
                return Err(format!(
                    "{at}: not contiguous with the window before (ends {prev_end:?})"
                ));
            }
            // The read before the window's first sample (at its start), and its samples.
            let (before, first) = (start, start + iv);
            let last_slot = first + (n - 1) * iv;
            let energy = card.energy_mj_at(last_slot - t0) - card.energy_mj_at(before - t0);
            let mut sum = 0.0;
            for k in 0..n {
                let slot = first + k * iv;
                sum += f64::from(card.phase_at(slot - 1 - t0).map_or(0, |p| p.util_pct));
            }
            let util = sum / n as f64;
            if x.energy_mj != Some(energy) {
                return Err(format!("{at}: energy {:?}, truth {energy}", x.energy_mj));
            }
            if x.util_avg_pct != Some(util) {
                return Err(format!("{at}: util {:?}, truth {util}", x.util_avg_pct));
            }
            prev_end = Some(end);
        }
        let starts: Vec<i64> = ws.iter().map(|x| x.window_start_unix_ms).collect();
        match &starts_of_first {
            None => starts_of_first = Some(starts),
            Some(s) if *s != starts => {
                return Err(format!(
                    "{}: windows differ from the other cards'",
                    card.uuid
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// A window spans the whole intervals it sampled inside its aligned period: all of it, except
/// that a life's first window may start late and a window closed at shutdown may end early.
fn window_bounds(
    start: i64,
    end: i64,
    n: i64,
    iv: i64,
    w: i64,
    first: bool,
    last: bool,
) -> Result<(), String> {
    let aligned = start - start.rem_euclid(w);
    if start.rem_euclid(iv) != 0 || end - start != n * iv || end > aligned + w {
        return Err(format!(
            "bounds: {n} samples of {iv} ms do not span it inside [{aligned}, {})",
            aligned + w
        ));
    }
    if !first && start != aligned {
        return Err("bounds: only a life's first window may start late".into());
    }
    if !last && end != aligned + w {
        return Err("bounds: only a window closed at shutdown may end early".into());
    }
    Ok(())
}

/// The one t0 (a window start at or before the first window) that explains every window of a
/// single-life binary agent exactly.
fn find_t0(life: &Life, sc: &Scenario, iv: i64, w: i64) -> i64 {
    let first = align_down(
        life.windows.first().expect("windows").window_start_unix_ms,
        w as u64,
    );
    let fits: Vec<i64> = (0..=40)
        .map(|j| first - j * w)
        .filter(|&t0| check_phased(life, sc, t0, iv, w).is_ok())
        .collect();
    assert_eq!(
        fits.len(),
        1,
        "exactly one t0 explains every window; at the first window's start: {:?}",
        check_phased(life, sc, first, iv, w)
    );
    assert!(
        fits[0] <= align_down(life.started_at, w as u64),
        "t0 {} is after the agent started ({})",
        fits[0],
        life.started_at
    );
    fits[0]
}

/// Checks lives of an agent whose cards run at constant utilization (speed 1, a real clock),
/// exactly: each window has good == expected samples, the card's utilization, and energy
/// power × samples × interval; within a life each card's windows are contiguous and the cards
/// agree; a life's samples all lie after its start and before the next life's start, so no
/// sample is counted twice and none is invented for the time the agent was down. A window
/// closes only when a sample of the next one is read, so a life killed with SIGKILL ends on a
/// whole window and loses the one it had open; only a life stopped with SIGTERM (`termed`)
/// flushes a partial last window.
fn check_constant_lives(lives: &[Life], sc: &Scenario, iv: i64, w: i64, termed: &[bool]) {
    let per = (w / iv) as u32;
    let mut per_window: BTreeMap<(String, i64), u32> = BTreeMap::new();
    for (l, life) in lives.iter().enumerate() {
        let mut starts_of_first: Option<Vec<i64>> = None;
        for card in &sc.cards {
            let ws = windows_of(life, &card.uuid);
            let util = card.phase_at(0).map_or(0, |p| p.util_pct);
            let power = card.power_mw_at(0) as i64;
            for (i, x) in ws.iter().enumerate() {
                let (start, end, n) = (
                    x.window_start_unix_ms,
                    x.window_end_unix_ms,
                    i64::from(x.expected_samples),
                );
                let at = format!("life {l}: {} window {i} [{start}, {end})", card.uuid);
                let flushed = termed[l] && i + 1 == ws.len();
                if let Err(e) = window_bounds(start, end, n, iv, w, i == 0, flushed) {
                    panic!("{at}: {e}");
                }
                assert!(
                    x.good_samples == x.expected_samples && n >= 1 && x.expected_samples <= per,
                    "{at}: samples {}/{}",
                    x.good_samples,
                    x.expected_samples
                );
                assert!(
                    i == 0 || flushed || x.expected_samples == per,
                    "{at}: a window closed by the next one is whole"
                );
                assert_eq!(
                    x.energy_mj,
                    Some((power * n * iv / 1000) as u64),
                    "{at}: energy"
                );
                assert_eq!(x.util_avg_pct, Some(f64::from(util)), "{at}: util");
                assert_eq!(
                    (x.unavailable_ms, x.health),
                    (0, v1::Health::Ok as i32),
                    "{at}: health"
                );
                if i > 0 {
                    assert_eq!(ws[i - 1].window_end_unix_ms, start, "{at}: contiguous");
                }
                // Slots: a window's last sample is at its end; a life's first window starts
                // at the read that set the baseline.
                let last_slot = end;
                let baseline = (i == 0).then_some(start);
                if let Some(b) = baseline {
                    assert!(
                        b >= life.started_at,
                        "{at}: baseline read at {b} before the agent started at {}",
                        life.started_at
                    );
                }
                if let Some(next) = lives.get(l + 1) {
                    assert!(
                        last_slot < next.started_at,
                        "{at}: a sample at {last_slot} after the next start at {}",
                        next.started_at
                    );
                }
                *per_window
                    .entry((card.uuid.clone(), align_down(start, w as u64)))
                    .or_default() += x.good_samples;
            }
            let starts: Vec<i64> = ws.iter().map(|x| x.window_start_unix_ms).collect();
            match &starts_of_first {
                None => starts_of_first = Some(starts),
                Some(s) => assert_eq!(*s, starts, "life {l}: {} vs the other cards", card.uuid),
            }
        }
    }
    for ((uuid, start), good) in per_window {
        assert!(
            good <= per,
            "{uuid} window {start}: {good} samples counted, the window has {per}"
        );
    }
}

/// Copies the ledger (VACUUM INTO) and runs `gpumeter-collector verify --db` on the copy.
fn verify_copy(db: &Path, dir: &Path, name: &str) -> (Option<i32>, String) {
    let copy = dir.join(format!("{name}-copy.db"));
    db_conn(db)
        .execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
        .unwrap();
    let out = Command::new(bin("gpumeter-collector"))
        .args(["verify", "--db"])
        .arg(&copy)
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. The collector killed ten times

const KA: [&str; 2] = [
    "GPU-000000f1-0000-4000-8000-000000000000",
    "GPU-000000f1-0000-4000-8000-000000000001",
];
const KB: [&str; 2] = [
    "GPU-000000f2-0000-4000-8000-000000000000",
    "GPU-000000f2-0000-4000-8000-000000000001",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_killed_ten_times_while_two_agents_stream_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let db = dir.path().join("ledger.db");
    let clog = dir.path().join("collector.log");
    let mut rng = Rng::seeded("collector kills");
    let (iv, w) = (5_000, W60);
    let mut collector = start_collector_proc(port, &db, &clog).await;

    let ids = ["kill-c-a", "kill-c-b"];
    let scenarios = [
        phased_scenario(&KA, 60, 1000),
        phased_scenario(&KB, 60, 1000),
    ];
    let mut agents = Vec::new();
    let mut states = Vec::new();
    for (id, sc) in ids.iter().zip(&scenarios) {
        let (cfg, state) = BinAgent {
            id,
            url: &url,
            scenario: sc,
            speed: 300.0,
            interval_ms: iv as u64,
            window_ms: w as u64,
            batch: 3,
        }
        .write(dir.path());
        agents.push(start_agent_proc(
            &cfg,
            &dir.path().join(format!("{id}.log")),
        ));
        states.push(state);
    }

    for round in 0..10 {
        // Each collector life sees both agents deliver before it dies, so every kill lands
        // on live sessions with batches in flight.
        let base: Vec<u64> = ids.iter().map(|id| max_seq(&db, id)).collect();
        wait_until(
            &format!("round {round}: both agents deliver to the restarted collector"),
            Duration::from_secs(30),
            || ids.iter().zip(&base).all(|(id, b)| max_seq(&db, id) > *b),
        )
        .await;
        for a in &mut agents {
            assert!(a.exited().is_none(), "an agent exited: {:?}", a.exited());
        }
        tokio::time::sleep(Duration::from_millis(rng.below(600))).await;
        collector.kill9();
        collector = start_collector_proc(port, &db, &clog).await;
    }
    let base: Vec<u64> = ids.iter().map(|id| max_seq(&db, id)).collect();
    wait_until(
        "both agents catch up after the last restart",
        Duration::from_secs(30),
        || {
            ids.iter()
                .zip(&base)
                .all(|(id, b)| max_seq(&db, id) >= b + 10)
        },
    )
    .await;
    for a in &mut agents {
        let st = a.term(Duration::from_secs(20)).await;
        assert!(st.success(), "agent exits cleanly on SIGTERM: {st:?}");
    }

    for ((id, sc), state) in ids.iter().zip(&scenarios).zip(&states) {
        let sc: Scenario = toml::from_str(sc).unwrap();
        let (all, held) = everything(&db, id, state, &[]);
        check_window_rows(&db, id, &all, held);
        let lives = lives_of(&all);
        assert_eq!(lives.len(), 1, "{id}: one run");
        let t0 = find_t0(&lives[0], &sc, iv, w);
        eprintln!(
            "{id}: {held} records stored, {} written; t0 {t0}, first window {}",
            all.len(),
            lives[0].windows[0].window_start_unix_ms
        );
        for card in &sc.cards {
            let n = windows_of(&lives[0], &card.uuid).len();
            assert!(n >= 10, "{id}: {} has only {n} windows", card.uuid);
        }
        assert_eq!(
            alarms_but_skew(&db, id),
            vec![],
            "{id}: no gap, no equivocation"
        );
        let log = std::fs::read_to_string(dir.path().join(format!("{id}.log"))).unwrap();
        let retries = log.matches("retrying").count();
        assert!(
            retries >= 10,
            "{id}: {retries} retries logged for 10 kills:\n{log}"
        );
    }
    let (code, out) = verify_copy(&db, dir.path(), "killed-collector");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("kill-c-a") && out.contains("kill-c-b"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The agent killed ten times

const KC: [&str; 2] = [
    "GPU-000000f3-0000-4000-8000-000000000000",
    "GPU-000000f3-0000-4000-8000-000000000001",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_ten_times_resumes_its_spool_and_counts_no_sample_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut collector = Some(TestCollector::start_on(&db, &addr).await.unwrap());
    let url = format!("https://{addr}");
    let mut rng = Rng::seeded("agent kills");
    let id = "kill-a";
    let (iv, w) = (50, 500);
    let scenario = constant_scenario(&[(KC[0], 40), (KC[1], 75)]);
    let (cfg, state) = BinAgent {
        id,
        url: &url,
        scenario: &scenario,
        speed: 1.0,
        interval_ms: iv as u64,
        window_ms: w as u64,
        batch: 4,
    }
    .write(dir.path());
    let spool_dir = state.join("spool");
    let log = dir.path().join("agent.log");
    let mut agent = start_agent_proc(&cfg, &log);
    // Runs 4 to 6 are killed while the collector is down, with what they metered still
    // unacknowledged in the spool; run 7 delivers it all.
    let mut spool_head = 0;
    let mut killed_with_backlog = 0;
    for round in 0..10u64 {
        if round == 4 {
            let c = collector.take().expect("the collector runs until round 4");
            c.stop().await.unwrap();
        }
        if round == 7 {
            collector = Some(TestCollector::start_on(&db, &addr).await.unwrap());
        }
        // Kill only once this run has spooled its start (delivered, or left in the spool
        // while the collector is down), so every run is in the ledger; then at a random point
        // of its sampling.
        wait_until(
            &format!("run {round} records its start"),
            Duration::from_secs(30),
            || {
                count_events(&db, id, "agent_started") == round + 1
                    || (collector.is_none()
                        && read_frames(&spool_dir).iter().any(|f| {
                            f.seq > spool_head
                                && matches!(
                                    decode(f.seq, &f.body).kind,
                                    Some(v1::record_body::Kind::Event(e))
                                        if e.kind == v1::EventKind::AgentStarted as i32
                                )
                        }))
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(rng.below(900))).await;
        assert!(agent.exited().is_none(), "agent exited on its own");
        agent.kill9();
        spool_head = read_frames(&spool_dir).last().map_or(spool_head, |f| f.seq);
        if spool_head > max_seq(&db, id) {
            killed_with_backlog += 1;
        }
        agent = start_agent_proc(&cfg, &log);
    }
    assert!(
        killed_with_backlog >= 3,
        "{killed_with_backlog} kills left unacknowledged records"
    );
    wait_until(
        "the last run delivers three windows per card",
        Duration::from_secs(30),
        || count_events(&db, id, "agent_started") == 11 && windows_since_last_start(&db, id) >= 6,
    )
    .await;
    let st = agent.term(Duration::from_secs(20)).await;
    assert!(st.success(), "agent exits cleanly on SIGTERM: {st:?}");

    let sc: Scenario = toml::from_str(&scenario).unwrap();
    let (all, held) = everything(&db, id, &state, &[]);
    check_window_rows(&db, id, &all, held);
    let lives = lives_of(&all);
    assert_eq!(lives.len(), 11, "one start per run, in one chain");
    eprintln!(
        "{held} records stored, {} written; windows per run: {:?}",
        all.len(),
        lives.iter().map(|l| l.windows.len()).collect::<Vec<_>>()
    );
    let mut termed = vec![false; 11];
    termed[10] = true;
    check_constant_lives(&lives, &sc, iv, w, &termed);
    assert_eq!(alarms(&db, id), vec![], "no gap, no equivocation, no skew");
    let (code, out) = verify_copy(&db, dir.path(), "killed-agent");
    assert_eq!(code, Some(0), "{out}");
    if let Some(c) = collector {
        c.stop().await.unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A long outage

const KD: [&str; 2] = [
    "GPU-000000f4-0000-4000-8000-000000000000",
    "GPU-000000f4-0000-4000-8000-000000000001",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_collector_outage_drains_hundreds_of_spooled_windows_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let collector = TestCollector::start_on(&db, &addr).await.unwrap();
    let id = "outage";
    let (iv, w, n) = (10_000, W60, 300);
    let sc: Scenario = toml::from_str(&phased_scenario(&KD, 60, 400)).unwrap();
    let start = align_down(now_ms() - 30 * 86_400_000, w as u64);
    let stop = start + n * w;
    let state = dir.path().join(id);
    let agent = start_in_process(
        sim_config(id, &collector.url, &state, 50, iv as u64, w as u64),
        sc.clone(),
        // 1,000× real time: the 300 windows take 18 s to meter, so however slowly the test
        // stops the collector after the first records (a loaded CI machine took long enough,
        // at 5,000×, for 454 of the 602 records to get through), hundreds are left to spool.
        ScaledClock::new(start, 1_000.0),
        start,
        stop,
    );
    wait_until("the first records arrive", Duration::from_secs(30), || {
        max_seq(&db, id) >= 20
    })
    .await;
    collector.stop().await.unwrap();
    // The start, the first assignment set (applied before the outage), two cards' windows.
    let total = 2 + 2 * n as u64;
    wait_until(
        "the agent meters the whole span into its spool",
        Duration::from_secs(60),
        || agent.ledger.head().0 == total,
    )
    .await;
    let (pending, acked) = {
        let g = agent.ledger.lock();
        (g.spool.pending(), g.spool.acked().0)
    };
    assert_eq!(pending, total - acked);
    assert!(pending >= 400, "a backlog of hundreds: {pending}");
    assert!(!agent.status.borrow().connected);
    assert!(agent.status.borrow().last_error.is_some());

    let collector = TestCollector::start_on(&db, &addr).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), agent.task)
        .await
        .expect("the backlog drains within 60 s")
        .unwrap()
        .unwrap();
    {
        let g = agent.ledger.lock();
        assert_eq!((g.spool.pending(), g.spool.segment_count()), (0, 0));
    }
    let (all, held) = everything(&db, id, &state, &[]);
    assert_eq!(held, total);
    check_window_rows(&db, id, &all, held);
    let lives = lives_of(&all);
    assert_eq!((lives.len(), lives[0].assignment_changes), (1, 1));
    check_phased(&lives[0], &sc, start, iv, w).unwrap();
    for card in &sc.cards {
        let ws = windows_of(&lives[0], &card.uuid);
        assert_eq!(ws.len(), n as usize, "{}", card.uuid);
        assert_eq!(
            (
                ws[0].window_start_unix_ms,
                ws[ws.len() - 1].window_end_unix_ms
            ),
            (start, stop)
        );
    }
    assert_eq!(alarms_but_skew(&db, id), vec![]);
    let (code, out) = verify_copy(&db, dir.path(), "outage");
    assert_eq!(code, Some(0), "{out}");
    collector.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Connections cut mid-batch

#[derive(Debug, Clone, Copy)]
enum Dir {
    /// Agent to collector: batches cut in the middle.
    Up,
    /// Collector to agent: acks lost after the commit.
    Down,
}

/// A loopback TCP proxy that cuts connections: the next cut of the plan applies to each new
/// connection until one reaches its byte count (a connection that ends sooner, such as one
/// the collector refuses while it still holds the previous session, leaves the cut for the
/// next); once the plan is used up, connections pass through.
struct CutProxy {
    addr: SocketAddr,
    cuts: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl CutProxy {
    async fn start(upstream: SocketAddr, plan: Vec<(Dir, usize)>) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cuts = Arc::new(AtomicUsize::new(0));
        let counter = cuts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let nth = counter.load(Ordering::SeqCst);
                let cut = plan.get(nth).copied();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let limit = |d: fn(Dir) -> bool| cut.filter(|c| d(c.0)).map(|c| c.1);
                    // Only one connection may carry out a given cut.
                    let claim = || {
                        counter
                            .compare_exchange(nth, nth + 1, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                    };
                    let up = relay(cr, sw, limit(|d| matches!(d, Dir::Up)), &claim);
                    let down = relay(sr, cw, limit(|d| matches!(d, Dir::Down)), &claim);
                    // Whichever direction ends first ends the connection: dropping both
                    // futures closes both sockets.
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
            }
        });
        CutProxy { addr, cuts, task }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes one way. With a limit, stops after exactly that many bytes if `claim` gives it
/// the cut, and passes everything on otherwise.
async fn relay(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut limit: Option<usize>,
    claim: &(dyn Fn() -> bool + Sync),
) {
    let mut buf = vec![0u8; 16 << 10];
    let mut sent = 0;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let take = limit.map_or(n, |l| n.min(l - sent));
        if to.write_all(&buf[..take]).await.is_err() {
            return;
        }
        sent += take;
        if limit == Some(sent) {
            if claim() {
                return;
            }
            limit = None;
            if to.write_all(&buf[take..n]).await.is_err() {
                return;
            }
        }
    }
}

const KE: [&str; 2] = [
    "GPU-000000f5-0000-4000-8000-000000000000",
    "GPU-000000f5-0000-4000-8000-000000000001",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_batch_by_a_proxy_still_deliver_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let plan = vec![
        (Dir::Up, 2_500),
        (Dir::Down, 300),
        (Dir::Up, 5_003),
        (Dir::Down, 500),
        (Dir::Up, 8_001),
    ];
    let proxy = CutProxy::start(collector.addr, plan.clone()).await;
    let id = "cut";
    let (iv, w, n) = (10_000, W60, 180);
    let sc: Scenario = toml::from_str(&phased_scenario(&KE, 60, 200)).unwrap();
    let start = align_down(now_ms() - 10 * 86_400_000, w as u64);
    let stop = start + n * w;
    let state = dir.path().join(id);
    let agent = start_in_process(
        sim_config(
            id,
            &format!("https://{}", proxy.addr),
            &state,
            8,
            iv as u64,
            w as u64,
        ),
        sc.clone(),
        ScaledClock::new(start, 3_000.0),
        start,
        stop,
    );
    let status = agent.status.clone();
    tokio::time::timeout(Duration::from_secs(60), agent.task)
        .await
        .expect("the agent delivers everything within 60 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        plan.len(),
        "every planned cut happened"
    );
    assert!(status.borrow().sessions > 1, "{:?}", *status.borrow());

    let (all, held) = everything(&db, id, &state, &[]);
    assert_eq!(held, 2 + 2 * n as u64);
    check_window_rows(&db, id, &all, held);
    let lives = lives_of(&all);
    assert_eq!((lives.len(), lives[0].assignment_changes), (1, 1));
    check_phased(&lives[0], &sc, start, iv, w).unwrap();
    for card in &sc.cards {
        assert_eq!(windows_of(&lives[0], &card.uuid).len(), n as usize);
    }
    assert_eq!(
        alarms_but_skew(&db, id),
        vec![],
        "no gap, no equivocation, no bad batch"
    );
    let (code, out) = verify_copy(&db, dir.path(), "cut");
    assert_eq!(code, Some(0), "{out}");
    drop(proxy);
    collector.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5 and 6. A scripted agent: replays and re-sends with other bytes

const RAW_GPU: &str = "GPU-000000f6-0000-4000-8000-000000000000";

/// An agent played by the test: its own key, records and checkpoints.
struct RawAgent {
    id: String,
    key: ed25519_dalek::SigningKey,
    /// records[i] has seq i + 1.
    records: Vec<v1::Record>,
    t0: i64,
}

impl RawAgent {
    fn new(id: &str, key_byte: u8, n: u64) -> RawAgent {
        let mut a = RawAgent {
            id: id.into(),
            key: ed25519_dalek::SigningKey::from_bytes(&[key_byte; 32]),
            records: Vec::new(),
            t0: align_down(now_ms() - 86_400_000, W60 as u64),
        };
        for seq in 1..=n {
            let body = a.window_body(seq, 1_000 + seq);
            a.push(body);
        }
        a
    }

    fn window_body(&self, seq: u64, energy: u64) -> Vec<u8> {
        let start = self.t0 + (seq as i64 - 1) * W60;
        gpumeter_agent::record::encode_body(
            start + W60,
            v1::record_body::Kind::CardWindow(v1::CardWindow {
                gpu_uuid: RAW_GPU.into(),
                window_start_unix_ms: start,
                window_end_unix_ms: start + W60,
                sample_interval_ms: 1_000,
                expected_samples: 60,
                good_samples: 60,
                util_avg_pct: Some((seq % 7 * 10) as f64),
                energy_mj: Some(energy),
                health: v1::Health::Ok as i32,
                assignment: Some(v1::AppliedAssignment {
                    status: v1::AssignmentStatus::Unassigned as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
    }

    fn hash(&self, seq: u64) -> Hash {
        if seq == 0 {
            return chain::GENESIS;
        }
        let r = &self.records[seq as usize - 1];
        chain::record_hash(&chain::to_hash(&r.prev_hash).unwrap(), r.seq, &r.body)
    }

    fn push(&mut self, body: Vec<u8>) {
        let seq = self.records.len() as u64 + 1;
        let prev = self.hash(seq - 1);
        self.records.push(v1::Record {
            seq,
            prev_hash: prev.to_vec(),
            body,
        });
    }

    /// A batch of `records` with a checkpoint over the last, signed with `key`.
    fn batch_signed(
        &self,
        records: Vec<v1::Record>,
        key: &ed25519_dalek::SigningKey,
    ) -> v1::RecordBatch {
        let last = records.last().expect("a batch has records");
        let head = chain::record_hash(
            &chain::to_hash(&last.prev_hash).unwrap(),
            last.seq,
            &last.body,
        );
        let signature = chain::sign_checkpoint(key, &self.id, 1, last.seq, &head);
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

    /// Batch of seqs `from..=to` as held.
    fn batch(&self, from: u64, to: u64) -> v1::RecordBatch {
        self.batch_signed(
            self.records[from as usize - 1..to as usize].to_vec(),
            &self.key,
        )
    }

    fn hello(&self) -> v1::Hello {
        let head = self.records.len() as u64;
        v1::Hello {
            protocol_version: gpumeter_proto::PROTOCOL_VERSION,
            agent_id: self.id.clone(),
            host_id: self.id.clone(),
            csp: "kt".into(),
            public_key: self.key.verifying_key().to_bytes().to_vec(),
            epoch: 1,
            next_seq: head + 1,
            chain_head: self.hash(head).to_vec(),
            oldest_spooled_seq: 1,
            agent_time_unix_ms: now_ms(),
            gpus: vec![v1::GpuInfo {
                uuid: RAW_GPU.into(),
                name: "raw".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }
}

/// What a scripted session got back.
#[derive(Debug)]
struct SessionOutcome {
    welcome: v1::Welcome,
    /// Durable seq of each ack, one per batch, in order.
    acks: Vec<u64>,
    /// The status the session ended with, if it failed.
    error: Option<tonic::Status>,
}

/// Opens a session (retrying while the collector still holds the previous one), sends the
/// batches one by one waiting for each ack, then closes the stream and waits for its end.
async fn raw_session(url: &str, hello: v1::Hello, batches: &[v1::RecordBatch]) -> SessionOutcome {
    use gpumeter_proto::v1::{agent_message, collector_message};
    let deadline = Instant::now() + Duration::from_secs(20);
    let limit = Duration::from_secs(10);
    loop {
        let mut client = gpumeter_e2e::ingest_client(url, Some((&hello.agent_id, &hello.host_id)))
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(v1::AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello.clone())),
        })
        .await
        .unwrap();
        let opened = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let first = match opened {
            Ok(r) => {
                let mut inbound = r.into_inner();
                let m = tokio::time::timeout(limit, inbound.message())
                    .await
                    .unwrap();
                m.map(|m| (inbound, m))
            }
            Err(s) => Err(s),
        };
        let (mut inbound, welcome) = match first {
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                assert!(
                    Instant::now() < deadline,
                    "the previous session never closed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(s) => panic!("session refused: {s:?}"),
            Ok((
                i,
                Some(v1::CollectorMessage {
                    kind: Some(collector_message::Kind::Welcome(w)),
                }),
            )) => (i, w),
            Ok((_, other)) => panic!("expected a welcome, got {other:?}"),
        };
        let mut acks = Vec::new();
        let mut error = None;
        'batches: for b in batches {
            if tx
                .send(v1::AgentMessage {
                    kind: Some(agent_message::Kind::Batch(b.clone())),
                })
                .await
                .is_err()
            {
                break;
            }
            loop {
                match tokio::time::timeout(limit, inbound.message())
                    .await
                    .expect("an answer within 10 s")
                {
                    Ok(Some(v1::CollectorMessage {
                        kind: Some(collector_message::Kind::Ack(a)),
                    })) => {
                        acks.push(a.durable_seq);
                        break;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break 'batches,
                    Err(s) => {
                        error = Some(s);
                        break 'batches;
                    }
                }
            }
        }
        drop(tx);
        if error.is_none() {
            loop {
                match tokio::time::timeout(limit, inbound.message())
                    .await
                    .expect("the session ends within 10 s")
                {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(s) => {
                        error = Some(s);
                        break;
                    }
                }
            }
        }
        return SessionOutcome {
            welcome,
            acks,
            error,
        };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_stream_replayed_three_times_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let mut agent = RawAgent::new("replayer", 21, 40);
    let batches: Vec<v1::RecordBatch> = (0..5).map(|i| agent.batch(8 * i + 1, 8 * i + 8)).collect();

    let first = raw_session(&collector.url, agent.hello(), &batches).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!(first.welcome.durable_seq, 0);
    assert_eq!(first.acks, vec![8, 16, 24, 32, 40]);
    for replay in 0..2 {
        let again = raw_session(&collector.url, agent.hello(), &batches).await;
        assert!(again.error.is_none(), "replay {replay}: {:?}", again.error);
        assert_eq!(again.welcome.durable_seq, 40, "replay {replay}");
        assert_eq!(
            again.welcome.durable_hash,
            agent.hash(40).to_vec(),
            "replay {replay}"
        );
        assert_eq!(
            again.acks,
            vec![40; 5],
            "replay {replay}: the same durable point"
        );
    }
    // After the replays the chain goes on where it was.
    for seq in 41..=48 {
        let body = agent.window_body(seq, 1_000 + seq);
        agent.push(body);
    }
    let mut tail = batches.clone();
    tail.push(agent.batch(41, 48));
    let last = raw_session(&collector.url, agent.hello(), &tail).await;
    assert!(last.error.is_none(), "{:?}", last.error);
    assert_eq!(last.acks, vec![40, 40, 40, 40, 40, 48]);

    let all: Vec<(u64, Vec<u8>)> = agent
        .records
        .iter()
        .map(|r| (r.seq, r.body.clone()))
        .collect();
    let stored = stored_records(&db, "replayer");
    assert_eq!(
        stored
            .iter()
            .map(|r| (r.seq, r.body.clone()))
            .collect::<Vec<_>>(),
        all,
        "each record once, byte for byte"
    );
    check_window_rows(&db, "replayer", &all, 48);
    let (energy, windows): (i64, i64) = db_conn(&db)
        .query_row(
            "SELECT SUM(energy_mj), COUNT(*) FROM windows WHERE agent_id = 'replayer'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((energy, windows), ((1..=48).map(|s| 1_000 + s).sum(), 48));
    let checkpoints: Vec<i64> = db_conn(&db)
        .prepare("SELECT seq FROM checkpoints WHERE agent_id = 'replayer' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(checkpoints, vec![8, 16, 24, 32, 40, 48]);
    assert_eq!(
        alarms(&db, "replayer"),
        vec![],
        "replays are not equivocation"
    );
    let (code, out) = verify_copy(&db, dir.path(), "replayed");
    assert_eq!(code, Some(0), "{out}");
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_resent_with_other_bytes_keeps_the_first_copy_and_raises_equivocation() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let mut agent = RawAgent::new("two-faced", 22, 10);
    let first = raw_session(
        &collector.url,
        agent.hello(),
        &[agent.batch(1, 5), agent.batch(6, 10)],
    )
    .await;
    assert_eq!(first.acks, vec![5, 10], "{:?}", first.error);

    // Seq 3 again with another energy: linked to seq 2 and signed by the agent's own key.
    // No checkpoint was stored at seq 3, so the re-send's checkpoint would be the first.
    let k = 3u64;
    let other = v1::Record {
        seq: k,
        prev_hash: agent.hash(k - 1).to_vec(),
        body: agent.window_body(k, 999_999),
    };
    assert_ne!(other.body, agent.records[k as usize - 1].body);
    let forged = agent.batch_signed(vec![other.clone()], &agent.key);
    let evidence = hex::encode(&forged.checkpoint.as_ref().unwrap().signature);
    for seq in 11..=12 {
        let body = agent.window_body(seq, 1_000 + seq);
        agent.push(body);
    }
    let second = raw_session(
        &collector.url,
        agent.hello(),
        &[forged, agent.batch(11, 12)],
    )
    .await;
    assert!(second.error.is_none(), "{:?}", second.error);
    assert_eq!(second.welcome.durable_seq, 10);
    assert_eq!(second.acks, vec![10, 12], "the ack never moves backwards");

    let stored = stored_records(&db, "two-faced");
    assert_eq!(stored.len(), 12);
    assert_eq!(
        stored[k as usize - 1].body,
        agent.records[k as usize - 1].body,
        "the first copy is kept"
    );
    let energy_k: i64 = db_conn(&db)
        .query_row(
            "SELECT energy_mj FROM windows WHERE agent_id = 'two-faced' AND seq = ?1",
            [k as i64],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(energy_k, 1_000 + k as i64);
    let a = alarms(&db, "two-faced");
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!((a[0].0.as_str(), a[0].1), ("equivocation", Some(k as i64)));
    assert!(
        a[0].2
            .contains(&format!("seq {k} re-sent with different bytes")),
        "{a:?}"
    );
    // The agent's signature over the other history is the evidence; it stays with the alarm,
    // not among the checkpoints of the kept chain.
    assert!(a[0].2.contains(&evidence), "{a:?}");
    let checkpoints: Vec<i64> = db_conn(&db)
        .prepare("SELECT seq FROM checkpoints WHERE agent_id = 'two-faced' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(checkpoints, vec![5, 10, 12]);

    // The same re-send signed by another key is no evidence against the agent: refused as a
    // bad batch, no second equivocation.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[99; 32]);
    let third = raw_session(
        &collector.url,
        agent.hello(),
        &[agent.batch_signed(vec![other], &stranger)],
    )
    .await;
    let err = third.error.expect("a forged checkpoint ends the session");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(third.acks.is_empty());
    let kinds: Vec<String> = alarms(&db, "two-faced").into_iter().map(|a| a.0).collect();
    assert_eq!(kinds, vec!["equivocation", "bad_batch"]);

    let all: Vec<(u64, Vec<u8>)> = agent
        .records
        .iter()
        .map(|r| (r.seq, r.body.clone()))
        .collect();
    check_window_rows(&db, "two-faced", &all, 12);
    let (code, out) = verify_copy(&db, dir.path(), "equivocation");
    assert_eq!(code, Some(0), "the kept chain verifies: {out}");
    collector.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 7. A corrupted spool

const KF: [&str; 2] = [
    "GPU-000000f7-0000-4000-8000-000000000000",
    "GPU-000000f7-0000-4000-8000-000000000001",
];

/// One spool frame as found on disk (see the format in `gpumeter_agent::spool`).
#[derive(Debug, Clone)]
struct Frame {
    file: PathBuf,
    offset: usize,
    seq: u64,
    prev_hash: Vec<u8>,
    body: Vec<u8>,
}

/// Every frame of every segment, in file order; each must decode.
fn read_frames(spool: &Path) -> Vec<Frame> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(spool) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".log"))
            })
            .collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let buf = std::fs::read(&file).unwrap();
        let mut pos = 0;
        while pos + 12 <= buf.len() {
            let word = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().unwrap());
            assert_eq!(word(pos), 0x4750_5352, "{}: magic at {pos}", file.display());
            let len = word(pos + 4) as usize;
            let Some(payload) = buf.get(pos + 12..pos + 12 + len) else {
                break; // being written right now
            };
            assert_eq!(
                gpumeter_agent::spool::crc32c(payload),
                word(pos + 8),
                "{}: crc at {pos}",
                file.display()
            );
            out.push(Frame {
                file: file.clone(),
                offset: pos,
                seq: u64::from_be_bytes(payload[..8].try_into().unwrap()),
                prev_hash: payload[8..40].to_vec(),
                body: payload[40..].to_vec(),
            });
            pos += 12 + len;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_spool_segment_delivers_what_decodes_and_the_gap_is_an_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let id = "corrupt";
    let (iv, w) = (20, 200);
    let scenario = constant_scenario(&[(KF[0], 30), (KF[1], 90)]);
    let (cfg, state) = BinAgent {
        id,
        url: &url,
        scenario: &scenario,
        speed: 1.0,
        interval_ms: iv as u64,
        window_ms: w as u64,
        batch: 4,
    }
    .write(dir.path());
    let spool_dir = state.join("spool");

    // Nobody listens: everything stays in the spool.
    let log1 = dir.path().join("agent-1.log");
    let mut agent = start_agent_proc(&cfg, &log1);
    wait_until("16 records spooled", Duration::from_secs(30), || {
        read_frames(&spool_dir).len() >= 16
    })
    .await;
    let st = agent.term(Duration::from_secs(20)).await;
    assert!(st.success(), "{st:?}");
    let frames = read_frames(&spool_dir);
    assert_eq!(
        frames.iter().map(|f| f.seq).collect::<Vec<_>>(),
        (1..=frames.len() as u64).collect::<Vec<_>>()
    );
    for pair in frames.windows(2) {
        let prev = chain::to_hash(&pair[0].prev_hash).unwrap();
        assert_eq!(
            pair[1].prev_hash,
            chain::record_hash(&prev, pair[0].seq, &pair[0].body).to_vec(),
            "the spool is one chain before the damage"
        );
    }
    let head = frames.len() as u64;
    let victim = frames[frames.len() / 2..]
        .iter()
        .find(|f| {
            matches!(
                decode(f.seq, &f.body).kind,
                Some(v1::record_body::Kind::CardWindow(_))
            )
        })
        .expect("a window record in the second half")
        .clone();
    let k = victim.seq;
    {
        let mut bytes = std::fs::read(&victim.file).unwrap();
        let mid = victim.offset + 12 + 40 + victim.body.len() / 2;
        for b in &mut bytes[mid..mid + 4] {
            *b ^= 0xA5;
        }
        std::fs::write(&victim.file, bytes).unwrap();
    }

    let collector = TestCollector::start_on(&db, &format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let log2 = dir.path().join("agent-2.log");
    let mut agent = start_agent_proc(&cfg, &log2);
    wait_until(
        "the restarted agent delivers the old spool and new windows",
        Duration::from_secs(30),
        || max_seq(&db, id) > head && windows_since_last_start(&db, id) >= 6,
    )
    .await;
    assert!(
        agent.exited().is_none(),
        "the agent keeps running on a damaged spool"
    );
    let st = agent.term(Duration::from_secs(20)).await;
    assert!(st.success(), "{st:?}");
    let log = std::fs::read_to_string(&log2).unwrap();
    assert!(
        log.contains("do not decode"),
        "the damage is logged:\n{log}"
    );
    assert!(log.contains("spool recovered with damage"), "{log}");

    let (all, held) = everything(&db, id, &state, &[k]);
    check_window_rows(&db, id, &all, held);
    let stored: BTreeMap<u64, Vec<u8>> = all.iter().cloned().collect();
    for f in &frames {
        if f.seq != k {
            assert_eq!(stored[&f.seq], f.body, "record {} as first spooled", f.seq);
        }
    }
    let a = alarms(&db, id);
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!((a[0].0.as_str(), a[0].1), ("seq_gap", Some(k as i64)));
    assert!(
        a[0].2.contains(&format!("records {k}..={k} never arrived")),
        "{a:?}"
    );

    // With the lost record put back, both runs are whole and exact: nothing else is missing
    // and nothing was made up.
    let mut with_victim = all.clone();
    with_victim.push((k, victim.body.clone()));
    with_victim.sort_by_key(|r| r.0);
    let lives = lives_of(&with_victim);
    assert_eq!(lives.len(), 2);
    let sc: Scenario = toml::from_str(&scenario).unwrap();
    check_constant_lives(&lives, &sc, iv, w, &[true, true]);

    let (code, out) = verify_copy(&db, dir.path(), "corrupt");
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("records {k}..={k} are missing")),
        "{out}"
    );
    for bad in [
        "rewritten",
        "does not link",
        "signature",
        "tail cut off",
        "no checkpoint",
    ] {
        assert!(!out.contains(bad), "only the gap is wrong: {out}");
    }
    collector.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 8. An agent clock an hour behind (one an hour ahead has its windows refused as from the
// future: tests/isolation.rs)

const KG: [&str; 2] = [
    "GPU-000000f8-0000-4000-8000-000000000000",
    "GPU-000000f8-0000-4000-8000-000000000001",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_clock_an_hour_behind_is_flagged_and_its_records_keep_their_times() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let id = "skewed";
    let skew = -3_600_000;
    let (iv, w, n) = (100, 1_000, 3);
    let sc: Scenario = toml::from_str(&phased_scenario(&KG, 1, 100)).unwrap();
    let real_before = now_ms();
    let clock = ScaledClock::new(real_before + skew, 1.0);
    let start = align_up(real_before + skew + 300, w as u64);
    let stop = start + n * w;
    let state = dir.path().join(id);
    let agent = start_in_process(
        sim_config(id, &collector.url, &state, 4, iv as u64, w as u64),
        sc.clone(),
        clock,
        start,
        stop,
    );
    tokio::time::timeout(Duration::from_secs(30), agent.task)
        .await
        .expect("the agent finishes within 30 s")
        .unwrap()
        .unwrap();
    let real_after = now_ms();

    let a = alarms(&db, id);
    assert!(!a.is_empty(), "a clock_skew alarm");
    for (kind, seq, detail) in &a {
        assert_eq!((kind.as_str(), *seq), ("clock_skew", None), "{a:?}");
        let ms: i64 = detail
            .strip_prefix("agent clock is ")
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("skew in {detail:?}"));
        assert!((ms - skew).abs() < 2_000, "{detail}");
    }

    let (all, held) = everything(&db, id, &state, &[]);
    assert_eq!(held, 2 + 2 * n as u64);
    check_window_rows(&db, id, &all, held);
    let lives = lives_of(&all);
    assert_eq!((lives.len(), lives[0].assignment_changes), (1, 1));
    check_phased(&lives[0], &sc, start, iv, w).unwrap();
    for card in &sc.cards {
        let ws = windows_of(&lives[0], &card.uuid);
        assert_eq!(
            ws.iter()
                .map(|x| x.window_start_unix_ms)
                .collect::<Vec<_>>(),
            (0..n).map(|i| start + i * w).collect::<Vec<_>>(),
            "windows keep the agent's times"
        );
    }
    for r in stored_records(&db, id) {
        assert!(
            (real_before..=real_after).contains(&r.received_ms),
            "record {}: received_ms {} is the collector's time",
            r.seq,
            r.received_ms
        );
        let ahead = r.created_ms - r.received_ms;
        assert!(
            (skew - 5_000..=skew + 1_000).contains(&ahead),
            "record {}: created {} ms from receipt",
            r.seq,
            ahead
        );
    }
    let (code, out) = verify_copy(&db, dir.path(), "skewed");
    assert_eq!(code, Some(0), "{out}");
    collector.stop().await.unwrap();
}

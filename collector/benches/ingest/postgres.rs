//! The ingest benchmark's PostgreSQL section (issue 12 item 8, DESIGN.md §8): the same signed
//! fleet over loopback gRPC into collectors on a PostgreSQL store, against bare multi-row
//! inserts of the same rows into the same schema in the same run; ack latency at the same
//! fixed offered load as the SQLite section; and the fleet split over two collectors sharing
//! one database, in records per collector CPU-second against one collector's.
//!
//! Each collector is a child process of the benchmark (this binary, started with the hidden
//! `--child-collector URL`), so its CPU time and peak RSS are its own and not the simulated
//! agents'. The PostgreSQL server's backends are measured apart (by the pids of the scratch
//! database's connections). Every run gets a scratch database of its own on the server the
//! section was given (`--pg`, or `GPUMETER_TEST_PG`), dropped at the end.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};

use gpumeter_collector::store::pg_testdb::TestPg;
use gpumeter_collector::store::postgres::PgStore;
use postgres::NoTls;

use super::*;

/// DESIGN.md §8 and issue 12: ingest at least 0.8 of bare inserts into the same backend.
const PG_TARGET_RATIO: f64 = 0.80;
/// Issue 12: ack p99 under 10 ms at 20,000 records/s.
const PG_TARGET_P99: Duration = Duration::from_millis(10);
/// Issue 12 item 3: at most 150 bytes per card-window stored, everything included.
const PG_TARGET_BYTES: f64 = 150.0;
/// DESIGN.md §8: several collectors' records per collector CPU-second within 10 % of one's.
const PG_TARGET_SHARED: f64 = 0.90;

// ---------------------------------------------------------------------------------------------
// The collector child process
// ---------------------------------------------------------------------------------------------

/// Serves as one collector on the PostgreSQL database `url` (`--child-collector`): prints
/// `listening ADDR` on stdout once bound, serves until stdin closes, then stops gracefully.
pub(crate) fn child(url: &str, key: Option<&Path>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("collector")
        .enable_all()
        .build()?;
    let store: Arc<dyn Store> = Arc::new(PgStore::open(url, key)?);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        // The parent stops this collector by closing its stdin.
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        let _ = stop_tx.send(());
    });
    let mut out = std::io::stdout();
    writeln!(out, "listening {addr}")?;
    out.flush()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        server::run(listener, store, bench_options(), async move {
            let _ = stop_rx.await;
        })
        .await
    })
}

/// A collector child process; killed if dropped still running (a failed run).
struct Collector {
    child: Child,
    pid: u32,
    url: String,
}

impl Collector {
    fn spawn(db_url: &str, key: &Path) -> anyhow::Result<Collector> {
        let exe = std::env::current_exe().context("the benchmark's own executable")?;
        let mut child = Command::new(exe)
            .arg("--child-collector")
            .arg(db_url)
            .arg("--child-key")
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start a collector child process")?;
        let stdout = child.stdout.take().context("collector child's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("collector child did not start (it said {line:?})");
        };
        Ok(Collector {
            pid: child.id(),
            url: format!("http://{addr}"),
            child,
        })
    }

    /// CPU time so far (the whole process, exited threads included) and the writer
    /// thread's; peak RSS.
    fn usage(&self) -> ProcUse {
        let writer = std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            .filter_map(|s| stat_cpu(&s).map(|(name, t)| (name == "gpumeter-writer", t)))
            .filter(|(w, _)| *w)
            .map(|(_, t)| t)
            .sum();
        ProcUse {
            cpu: proc_cpu(self.pid).unwrap_or_default(),
            writer,
            rss_peak_kb: status_kb(self.pid, "VmHWM:").unwrap_or(0),
        }
    }

    /// Closes its stdin and waits for a graceful stop.
    fn stop(&mut self) -> anyhow::Result<()> {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("collector child exited with {status}");
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("collector child did not stop within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a collector process used.
#[derive(Debug, Clone, Copy, Default)]
struct ProcUse {
    cpu: Duration,
    writer: Duration,
    rss_peak_kb: u64,
}

impl ProcUse {
    /// CPU used since `before`; the peak RSS is this one's.
    fn since(self, before: ProcUse) -> ProcUse {
        ProcUse {
            cpu: self.cpu.saturating_sub(before.cpu),
            writer: self.writer.saturating_sub(before.writer),
            rss_peak_kb: self.rss_peak_kb,
        }
    }
}

/// User + system CPU of a whole process (exited threads included), from /proc.
fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_cpu(&stat).map(|(_, t)| t)
}

/// A `kB` line of /proc/PID/status (`VmHWM:`, `VmRSS:`).
fn status_kb(pid: u32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------------------------

/// Where the section's server is, or why the section is skipped.
fn server_of(args: &Args) -> Result<String, String> {
    if args.no_pg {
        return Err("--no-pg".into());
    }
    match (&args.pg, std::env::var("GPUMETER_TEST_PG")) {
        (Some(s), _) => Ok(s.clone()),
        (None, Ok(s)) if !s.is_empty() => Ok(s),
        _ => Err("no --pg given and GPUMETER_TEST_PG is not set (see DEVELOPERS.md)".into()),
    }
}

/// A server connection string fit to print: a URL's password or a `password=` pair hidden.
fn printable(server: &str) -> String {
    if server.contains("://") {
        return gpumeter_collector::store::postgres::redact(server);
    }
    server
        .split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sum of `pg_total_relation_size` (heap, TOAST, indexes) over the schema's tables. Runs
/// subtract what the freshly migrated schema already takes (each table and index holds at
/// least a page), which a small run would otherwise count per card-window.
fn stored_bytes(c: &mut postgres::Client) -> anyhow::Result<u64> {
    let n: i64 = c
        .query_one(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::BIGINT
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')",
            &[],
        )?
        .get(0);
    Ok(n as u64)
}

/// Pids of the server's backends connected to database `name` (the server is local).
fn backend_pids(server: &str, name: &str) -> anyhow::Result<Vec<u32>> {
    let mut c = postgres::Client::connect(server, NoTls)?;
    Ok(c.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = $1",
        &[&name],
    )?
    .iter()
    .map(|r| r.get::<_, i32>(0) as u32)
    .collect())
}

struct PgBaseline {
    records: u64,
    /// Time inside transactions (begin to commit), summed.
    db_time: Duration,
    bytes: u64,
    /// CPU of the server backend that did the inserts.
    backend: Duration,
}

impl PgBaseline {
    fn rate(&self) -> f64 {
        self.records as f64 / self.db_time.as_secs_f64()
    }
}

/// Inserts every batch in its own transaction (`synchronous_commit = on`) into a fresh
/// database with the collector's schema: records, windows, window principals and the
/// checkpoint, each table in one multi-row `INSERT … SELECT FROM UNNEST` (the statements the
/// collector's commit uses, prepared). Bodies are decoded and columns built outside the timed
/// region.
fn pg_baseline(server: &str, batches: &[BaseBatch]) -> anyhow::Result<PgBaseline> {
    let db = TestPg::create_on(server, "bench_baseline").map_err(anyhow::Error::msg)?;
    drop(PgStore::open(&db.url, None)?);
    let mut c = postgres::Client::connect(&db.url, NoTls)?;
    c.batch_execute("SET synchronous_commit = on")?;
    let pid = c
        .query_one("SELECT pg_backend_pid()", &[])?
        .get::<_, i32>(0) as u32;
    let empty = stored_bytes(&mut c)?;
    let ins_rec = c.prepare(
        "INSERT INTO records (agent_id, seq, prev_hash, hash, body, kind, created_ms, received_ms)
         SELECT $1::text, u.seq, u.prev, u.hash, u.body, u.kind, u.created, $2::bigint
         FROM UNNEST($3::bigint[], $4::bytea[], $5::bytea[], $6::bytea[], $7::text[], $8::bigint[])
              AS u(seq, prev, hash, body, kind, created)
         ON CONFLICT (agent_id, seq) DO NOTHING",
    )?;
    let ins_win = c.prepare(
        "INSERT INTO windows (agent_id, seq, gpu_uuid, start_ms, end_ms, interval_ms, expected_samples, good_samples,
           util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes, energy_mj, energy_estimated, power_avg_w,
           temperature_max_c, throttle_reasons, health, unavailable_ms, assignment_status, grant_id, principal,
           active_ms, occupied_ms, foreign_ms, grantee_occupied_ms, unattributed_ms, energy_estimated_mj)
         SELECT $1::text, u.* FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
           $7::bigint[], $8::bigint[], $9::float8[], $10::float8[], $11::float8[], $12::bigint[], $13::bigint[],
           $14::bool[], $15::float8[], $16::bigint[], $17::bigint[], $18::text[], $19::bigint[], $20::text[],
           $21::text[], $22::text[], $23::bigint[], $24::bigint[], $25::bigint[], $26::bigint[], $27::bigint[],
           $28::bigint[]) AS u",
    )?;
    let ins_pr = c.prepare(
        "INSERT INTO window_principals (agent_id, seq, principal, uid, occupied_ms, active_ms, memory_max_bytes, process_count, matches_grant)
         SELECT $1::text, u.* FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
           $7::bigint[], $8::bigint[], $9::bool[]) AS u",
    )?;
    let ins_cp = c.prepare(
        "INSERT INTO checkpoints (agent_id, epoch, seq, chain_hash, signature, received_ms)
         VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (agent_id, seq) DO NOTHING",
    )?;
    let u64_ = |v: u64| v as i64;
    let opt = |v: Option<u64>| v.map(|v| v as i64);
    let cpu_before = proc_cpu(pid);
    let mut db_time = Duration::ZERO;
    let mut records = 0u64;
    for b in batches {
        let decoded: Vec<(i64, RecordContent)> =
            b.records.iter().map(|r| decode_body(&r.body)).collect();
        let received_ms = gpumeter_collector::ingest::now_ms();
        let seq: Vec<i64> = b.records.iter().map(|r| r.seq as i64).collect();
        let prev: Vec<&[u8]> = b.records.iter().map(|r| r.prev_hash.as_slice()).collect();
        let hash: Vec<&[u8]> = b.records.iter().map(|r| &r.hash[..]).collect();
        let body: Vec<&[u8]> = b.records.iter().map(|r| r.body.as_slice()).collect();
        let kind: Vec<&str> = decoded.iter().map(|(_, c)| c.kind()).collect();
        let created: Vec<i64> = decoded.iter().map(|(t, _)| *t).collect();
        let wins: Vec<(i64, &gpumeter_collector::store::WindowRow)> = seq
            .iter()
            .zip(&decoded)
            .filter_map(|(s, (_, c))| match c {
                RecordContent::Window(w) => Some((*s, w)),
                _ => None,
            })
            .collect();
        macro_rules! col {
            ($f:expr) => {
                wins.iter().map($f).collect::<Vec<_>>()
            };
        }
        let w_seq = col!(|(s, _)| *s);
        let w_gpu = col!(|(_, w)| w.gpu_uuid.as_str());
        let w_start = col!(|(_, w)| w.start_ms);
        let w_end = col!(|(_, w)| w.end_ms);
        let w_interval = col!(|(_, w)| u64_(w.interval_ms));
        let w_expected = col!(|(_, w)| i64::from(w.expected_samples));
        let w_good = col!(|(_, w)| i64::from(w.good_samples));
        let w_util = col!(|(_, w)| w.util_avg_pct);
        let w_util_max = col!(|(_, w)| w.util_max_pct);
        let w_mem_util = col!(|(_, w)| w.mem_util_avg_pct);
        let w_mem = col!(|(_, w)| opt(w.memory_used_max_bytes));
        let w_energy = col!(|(_, w)| opt(w.energy_mj));
        let w_estimated = col!(|(_, w)| w.energy_estimated);
        let w_power = col!(|(_, w)| w.power_avg_w);
        let w_temp = col!(|(_, w)| w.temperature_max_c.map(i64::from));
        let w_throttle = col!(|(_, w)| opt(w.throttle_reasons));
        let w_health = col!(|(_, w)| w.health);
        let w_unavail = col!(|(_, w)| u64_(w.unavailable_ms));
        let w_status = col!(|(_, w)| w.assignment_status);
        let w_grant = col!(|(_, w)| w.grant_id.as_str());
        let w_principal = col!(|(_, w)| w.principal.as_str());
        let w_active = col!(|(_, w)| u64_(w.active_ms));
        let w_occupied = col!(|(_, w)| u64_(w.occupied_ms));
        let w_foreign = col!(|(_, w)| u64_(w.foreign_ms));
        let w_grantee = col!(|(_, w)| opt(w.grantee_occupied_ms));
        let w_unattr = col!(|(_, w)| opt(w.unattributed_ms));
        let w_est_mj = col!(|(_, w)| opt(w.energy_estimated_mj));
        let prs: Vec<(i64, &gpumeter_collector::store::PrincipalRow)> = wins
            .iter()
            .flat_map(|(s, w)| w.principals.iter().map(move |p| (*s, p)))
            .collect();
        let p_seq: Vec<i64> = prs.iter().map(|(s, _)| *s).collect();
        let p_name: Vec<&str> = prs.iter().map(|(_, p)| p.principal.as_str()).collect();
        let p_uid: Vec<Option<i64>> = prs.iter().map(|(_, p)| p.uid.map(i64::from)).collect();
        let p_occ: Vec<i64> = prs.iter().map(|(_, p)| u64_(p.occupied_ms)).collect();
        let p_act: Vec<i64> = prs.iter().map(|(_, p)| u64_(p.active_ms)).collect();
        let p_mem: Vec<i64> = prs.iter().map(|(_, p)| u64_(p.memory_max_bytes)).collect();
        let p_n: Vec<i64> = prs
            .iter()
            .map(|(_, p)| i64::from(p.process_count))
            .collect();
        let p_match: Vec<bool> = prs.iter().map(|(_, p)| p.matches_grant).collect();
        let agent = b.agent_id.as_str();

        let t = Instant::now();
        let mut tx = c.transaction()?;
        tx.execute(
            &ins_rec,
            &[
                &agent,
                &received_ms,
                &seq,
                &prev,
                &hash,
                &body,
                &kind,
                &created,
            ],
        )?;
        if !w_seq.is_empty() {
            tx.execute(
                &ins_win,
                &[
                    &agent,
                    &w_seq,
                    &w_gpu,
                    &w_start,
                    &w_end,
                    &w_interval,
                    &w_expected,
                    &w_good,
                    &w_util,
                    &w_util_max,
                    &w_mem_util,
                    &w_mem,
                    &w_energy,
                    &w_estimated,
                    &w_power,
                    &w_temp,
                    &w_throttle,
                    &w_health,
                    &w_unavail,
                    &w_status,
                    &w_grant,
                    &w_principal,
                    &w_active,
                    &w_occupied,
                    &w_foreign,
                    &w_grantee,
                    &w_unattr,
                    &w_est_mj,
                ],
            )?;
        }
        if !p_seq.is_empty() {
            tx.execute(
                &ins_pr,
                &[
                    &agent, &p_seq, &p_name, &p_uid, &p_occ, &p_act, &p_mem, &p_n, &p_match,
                ],
            )?;
        }
        tx.execute(
            &ins_cp,
            &[
                &agent,
                &(b.cp.epoch as i64),
                &(b.cp.seq as i64),
                &b.cp.chain_hash,
                &b.cp.signature,
                &received_ms,
            ],
        )?;
        tx.commit()?;
        db_time += t.elapsed();
        records += b.records.len() as u64;
    }
    let backend = match (proc_cpu(pid), cpu_before) {
        (Some(a), Some(b)) => a.saturating_sub(b),
        _ => Duration::ZERO,
    };
    let bytes = stored_bytes(&mut c)?.saturating_sub(empty);
    drop(c);
    Ok(PgBaseline {
        records,
        db_time,
        bytes,
        backend,
    })
}

/// One ingest run on a PostgreSQL store.
struct PgRun {
    result: RunResult,
    /// Per collector, over the run (first send to last ack).
    collectors: Vec<ProcUse>,
    /// The server's backends serving the collectors, over the run.
    backends: Duration,
    /// The simulated agents (this process), over the run.
    clients: Duration,
    /// `pg_stat_database.deadlocks` of the run's database.
    deadlocks: i64,
    /// `batch_failed` alarms: batches rolled back alone (a deadlock victim is one).
    failed_batches: i64,
}

impl PgRun {
    fn collector_cpu(&self) -> Duration {
        self.collectors.iter().map(|c| c.cpu).sum()
    }

    /// Records stored per collector CPU-second (all collectors together).
    fn per_cpu_second(&self) -> f64 {
        self.result.stored as f64 / self.collector_cpu().as_secs_f64().max(1e-9)
    }
}

/// Starts `collectors` collector processes on one fresh database of `server`, drives `loads`
/// against them (agents divided round-robin), stops them and reads back what was stored.
fn pg_ingest(
    clients: &tokio::runtime::Runtime,
    server: &str,
    key: &Path,
    loads: Vec<Load>,
    pace: Pace,
    collectors: usize,
) -> anyhow::Result<PgRun> {
    let db = TestPg::create_on(server, "bench_ingest").map_err(anyhow::Error::msg)?;
    {
        let store = PgStore::open(&db.url, None)?;
        register(&store, &loads)?;
    }
    let empty = stored_bytes(&mut postgres::Client::connect(&db.url, NoTls)?)?;
    let mut procs = Vec::with_capacity(collectors);
    for _ in 0..collectors {
        procs.push(Collector::spawn(&db.url, key)?);
    }
    let urls: Vec<String> = procs.iter().map(|c| c.url.clone()).collect();
    let backends = backend_pids(server, &db.name)?;
    let sample = || {
        let backend_cpu: Duration = backends.iter().filter_map(|p| proc_cpu(*p)).sum();
        (
            Cpu::read(),
            procs.iter().map(Collector::usage).collect::<Vec<_>>(),
            backend_cpu,
        )
    };
    let (mut result, before, after) = drive_fleet(clients, &urls, loads, pace, sample)?;
    for p in &mut procs {
        p.stop()?;
    }
    let used: Vec<ProcUse> = after
        .1
        .iter()
        .zip(&before.1)
        .map(|(a, b)| a.since(*b))
        .collect();
    let clients_cpu = match (after.0, before.0) {
        (Some(a), Some(b)) => a.since(b).clients,
        _ => Duration::ZERO,
    };
    let mut c = postgres::Client::connect(&db.url, NoTls)?;
    let count = |c: &mut postgres::Client, t: &str| -> anyhow::Result<u64> {
        Ok(c.query_one(&format!("SELECT COUNT(*) FROM {t}"), &[])?
            .get::<_, i64>(0) as u64)
    };
    result.stored = count(&mut c, "records")?;
    result.stored_windows = count(&mut c, "windows")?;
    result.stored_principals = count(&mut c, "window_principals")?;
    result.stored_checkpoints = count(&mut c, "checkpoints")?;
    result.bytes = stored_bytes(&mut c)?.saturating_sub(empty);
    let failed_batches = c
        .query_one(
            "SELECT COUNT(*) FROM alarms WHERE kind = 'batch_failed'",
            &[],
        )?
        .get::<_, i64>(0);
    drop(c);
    // The server counts a deadlock when its backend reports its statistics (at the latest when
    // the collector's connection closes, just above).
    std::thread::sleep(Duration::from_millis(300));
    let deadlocks = postgres::Client::connect(server, NoTls)?
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = $1",
            &[&db.name],
        )?
        .get::<_, i64>(0);
    Ok(PgRun {
        result,
        collectors: used,
        backends: after.2.saturating_sub(before.2),
        clients: clients_cpu,
        deadlocks,
        failed_batches,
    })
}

// ---------------------------------------------------------------------------------------------
// The section
// ---------------------------------------------------------------------------------------------

fn mib(kb: u64) -> String {
    format!("{:.0} MiB", kb as f64 / 1024.0)
}

fn cores(cpu: Duration, wall: Duration) -> String {
    format!("{:.2}", cpu.as_secs_f64() / wall.as_secs_f64().max(1e-9))
}

/// Where a run's CPU went, in cores over its wall time, and the collectors' peak RSS.
fn report_use(r: &PgRun) {
    let wall = r.result.wall;
    let each: Vec<String> = r.collectors.iter().map(|c| cores(c.cpu, wall)).collect();
    let writers: Vec<String> = r.collectors.iter().map(|c| cores(c.writer, wall)).collect();
    row(
        "cpu: collector process (of which writer thread)",
        &format!("{} ({}) cores", each.join(" + "), writers.join(" + ")),
        "",
        "",
    );
    row(
        "cpu: postgres backends / clients",
        &format!(
            "{} / {} cores",
            cores(r.backends, wall),
            cores(r.clients, wall)
        ),
        "",
        "",
    );
    let rss: Vec<String> = r.collectors.iter().map(|c| mib(c.rss_peak_kb)).collect();
    row("collector peak RSS", &rss.join(" + "), "", "");
    row(
        "records per collector cpu-second",
        &thousands(r.per_cpu_second()),
        "",
        "",
    );
    row(
        "deadlocks (server) / batches failed alone",
        &format!("{} / {}", r.deadlocks, r.failed_batches),
        "0 / 0",
        verdict(r.deadlocks == 0 && r.failed_batches == 0),
    );
}

fn complete(r: &RunResult) -> bool {
    r.acked == r.records && r.stored == r.records
}

fn report_counts(what: &str, r: &RunResult) {
    row(
        &format!("records acked / stored / sent{what}"),
        &format!(
            "{} / {} / {}",
            thousands(r.acked as f64),
            thousands(r.stored as f64),
            thousands(r.records as f64)
        ),
        "all",
        verdict(complete(r)),
    );
}

/// The PostgreSQL section: skipped (with the reason printed) when no server is given or it
/// cannot be reached.
pub(crate) fn section(
    args: &Args,
    clients: &tokio::runtime::Runtime,
    fleet: &[SimAgent],
    lat_fleet: &[SimAgent],
    period: Duration,
    lat_batch: usize,
    tmp: &Path,
) -> anyhow::Result<()> {
    println!();
    let server = match server_of(args) {
        Ok(s) => s,
        Err(why) => {
            println!("postgresql: SKIPPED ({why})");
            return Ok(());
        }
    };
    let settings = postgres::Client::connect(&server, NoTls).and_then(|mut c| {
        let show = |c: &mut postgres::Client, what: &str| -> Result<String, postgres::Error> {
            Ok(c.query_one(&format!("SHOW {what}"), &[])?.get(0))
        };
        Ok((
            show(&mut c, "server_version")?,
            show(&mut c, "synchronous_commit")?,
            show(&mut c, "fsync")?,
        ))
    });
    let (version, sync, fsync) = match settings {
        Ok(s) => s,
        Err(e) => {
            println!(
                "postgresql: SKIPPED (cannot reach {}: {e})",
                printable(&server)
            );
            return Ok(());
        }
    };
    println!(
        "postgresql {version} at {} (synchronous_commit={sync}, fsync={fsync}); a scratch database per run, dropped after it",
        printable(&server)
    );
    println!(
        "  collectors run as child processes (their own CPU and RSS); load average now: {}",
        loadavg()
    );
    let key = tmp.join("pg-collector-key");
    let base = baseline_batches(fleet);
    let sat = Pace::Saturate {
        in_flight: args.in_flight,
    };

    // Bracketed as the SQLite section is: baseline, one collector, two, one again, baseline.
    let base1 = pg_baseline(&server, &base)?;
    eprintln!("pg baseline 1: {} records/s", thousands(base1.rate()));
    let one1 = pg_ingest(clients, &server, &key, loads_of(fleet), sat, 1)?;
    eprintln!(
        "pg ingest, 1 collector: {} records/s",
        thousands(one1.result.rate())
    );
    let two = pg_ingest(clients, &server, &key, loads_of(fleet), sat, 2)?;
    eprintln!(
        "pg ingest, 2 collectors: {} records/s",
        thousands(two.result.rate())
    );
    let one2 = pg_ingest(clients, &server, &key, loads_of(fleet), sat, 1)?;
    eprintln!(
        "pg ingest, 1 collector again: {} records/s",
        thousands(one2.result.rate())
    );
    let base2 = pg_baseline(&server, &base)?;
    eprintln!("pg baseline 2: {} records/s", thousands(base2.rate()));
    drop(base);
    let lat = pg_ingest(
        clients,
        &server,
        &key,
        loads_of(lat_fleet),
        Pace::Fixed { period },
        1,
    )?;
    eprintln!("pg latency run done");

    let base_rate = (base1.rate() + base2.rate()) / 2.0;
    let ingest_rate = (one1.result.rate() + one2.result.rate()) / 2.0;
    let ratio = ingest_rate / base_rate;
    println!(
        "throughput on PostgreSQL (saturated: every agent keeps {} batches in flight)",
        args.in_flight
    );
    row("measure", "value", "target", "result");
    for (what, b) in [("before", &base1), ("after", &base2)] {
        row(
            &format!("bare multi-row inserts, {what} ingest"),
            &format!("{} rec/s", thousands(b.rate())),
            "",
            "",
        );
    }
    row(
        "  baseline server backend cpu per record",
        &us((base1.backend + base2.backend) / (base1.records + base2.records).max(1) as u32),
        "",
        "",
    );
    for (what, r) in [("first", &one1), ("second", &one2)] {
        row(
            &format!("collector ingest, durable + acked ({what})"),
            &format!("{} rec/s", thousands(r.result.rate())),
            "",
            "",
        );
    }
    row(
        "ratio ingest / baseline (means of the two)",
        &format!("{ratio:.3}"),
        ">= 0.80",
        verdict(ratio >= PG_TARGET_RATIO),
    );
    report_counts(" (first)", &one1.result);
    report_counts(" (second)", &one2.result);
    let per_window = |bytes: u64, windows: u64| bytes as f64 / windows.max(1) as f64;
    let ingest_bytes = per_window(one1.result.bytes, one1.result.stored_windows);
    row(
        "bytes stored per card-window (tables + indexes)",
        &format!("{ingest_bytes:.0}"),
        "<= 150",
        verdict(ingest_bytes <= PG_TARGET_BYTES),
    );
    row(
        "  the baseline's (no rollups, flags, alarms)",
        &format!("{:.0}", per_window(base1.bytes, base1.records)),
        "",
        "",
    );
    row(
        "ack latency p50 / p99 (queueing: in flight / rate)",
        &format!(
            "{} / {}",
            ms(pct(&one1.result.latencies, 50.0)),
            ms(pct(&one1.result.latencies, 99.0))
        ),
        "",
        "",
    );
    report_use(&one1);

    println!();
    println!(
        "latency on PostgreSQL at a fixed offered load ({} agents each send one {}-record batch every {}, staggered; {:.1} s)",
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
            thousands(lat.result.records as f64 / lat.result.send_span.as_secs_f64().max(1e-9))
        ),
        &format!("{} rec/s", thousands(args.rate as f64)),
        "",
    );
    let p99 = pct(&lat.result.latencies, 99.0);
    row(
        "ack latency p50",
        &ms(pct(&lat.result.latencies, 50.0)),
        "",
        "",
    );
    row(
        "ack latency p99",
        &ms(p99),
        "< 10 ms",
        verdict(p99 < PG_TARGET_P99),
    );
    row(
        "ack latency max",
        &ms(lat.result.latencies.last().copied().unwrap_or_default()),
        "",
        "",
    );
    row(
        "acknowledged rate (sent to last ack)",
        &format!("{} rec/s", thousands(lat.result.rate())),
        "",
        "",
    );
    report_counts("", &lat.result);
    report_use(&lat);

    println!();
    println!(
        "two collectors on one PostgreSQL (agents divided between them; {} cores: cost, not speed-up)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    row("measure", "value", "target", "result");
    row(
        "ingest, two collectors together",
        &format!("{} rec/s", thousands(two.result.rate())),
        "",
        "",
    );
    report_counts("", &two.result);
    report_use(&two);
    let single = (one1.per_cpu_second() + one2.per_cpu_second()) / 2.0;
    let shared = two.per_cpu_second() / single;
    row(
        "records per collector cpu-second: 1 / 2 collectors",
        &format!(
            "{} / {}",
            thousands(single),
            thousands(two.per_cpu_second())
        ),
        "",
        "",
    );
    row(
        "ratio two / one (one: mean of the two runs)",
        &format!("{shared:.3}"),
        ">= 0.90",
        verdict(shared >= PG_TARGET_SHARED),
    );
    let with_server = |r: &PgRun| {
        r.result.stored as f64 / (r.collector_cpu() + r.backends).as_secs_f64().max(1e-9)
    };
    row(
        "  per (collector + backend) cpu-second: 1 / 2",
        &format!(
            "{} / {}",
            thousands((with_server(&one1) + with_server(&one2)) / 2.0),
            thousands(with_server(&two))
        ),
        "",
        "",
    );
    println!();
    println!(
        "  load average at the end: {} (other processes on these cores skew every figure)",
        loadavg()
    );
    println!(
        "  baseline = one transaction per {}-record batch, one multi-row INSERT … UNNEST per table",
        args.batch
    );
    println!(
        "  (records, windows, principals, checkpoint), prepared, synchronous_commit=on; timed inside"
    );
    println!(
        "  transactions only. ingest = the SQLite section's path on a PostgreSQL store: group commit"
    );
    println!(
        "  with the overlap and dedup rules, card locks and rollup upserts, acked after commit."
    );
    Ok(())
}

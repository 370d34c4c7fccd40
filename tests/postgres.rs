//! The PostgreSQL store through the real binary: `serve --db postgres://…` refuses to start
//! without `--collector-key` (the signing key never goes into the database), then serves
//! agents; `tokens`, `verify --db`, `heads --db` and `verify-report --db` work on the same
//! URL; tampering done directly in the database is caught. Skipped (with a `SKIPPED` line)
//! where no PostgreSQL server is reachable, unless GPUMETER_REQUIRE_ALL=1.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use gpumeter_agent::clock::align_down;
use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_e2e::{
    TestDb, agent_config, bin, cli, ensure_admin_token, now_ms, pg_rows, query_at, serve_tls_args,
    spawn_sim_agent,
};
use gpumeter_proto::v1;

/// Agent `n`'s two cards (each card of its own host, so no window is disputed).
fn scenario(n: u8) -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "GPU-0000000d-0000-4000-8000-0000000000{n}0"
[[cards.phases]]
from_s = 0
util_pct = 70
processes = [{{ pid = 5, uid = 1001, user = "alice" }}]
[[cards]]
uuid = "GPU-0000000d-0000-4000-8000-0000000000{n}1"
"#
    ))
    .unwrap()
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = cli().args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
async fn the_collector_binary_serves_a_postgres_ledger_that_the_cli_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let Some(backend) = TestDb::postgres("cli", dir.path()) else {
        return;
    };
    let url = backend.db_arg();
    let key = dir.path().join("collector-key");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");

    // Without a key file the collector refuses to start, naming the field.
    let out = std::process::Command::new(bin("gpumeter-collector"))
        .args(["serve", "--listen", &listen, "--db", &url])
        .args(serve_tls_args())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("collector_key") && err.contains("--collector-key"),
        "{err}"
    );

    // Tokens are managed on the database directly, as with a SQLite file.
    ensure_admin_token(backend.open().unwrap().as_ref()).unwrap();
    let (code, out, err) = run(&[
        "tokens", "create", "--role", "auditor", "--name", "aud", "--db", &url,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = run(&["tokens", "list", "--db", &url]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("aud\tauditor") && out.contains("test-admin"),
        "{out}"
    );

    // The agents replay the last two hours (production refuses windows from before an
    // agent's registration).
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, "[limits]\nmax_backfill_s = 86400\n").unwrap();
    let log = std::fs::File::create(dir.path().join("serve.log")).unwrap();
    let _serve = Serve(
        std::process::Command::new(bin("gpumeter-collector"))
            .args(["serve", "--listen", &listen, "--config"])
            .arg(&config)
            .args(backend.serve_args())
            .args(serve_tls_args())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let server = format!("https://{listen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
            && query_at(&server)
                .await
                .stream_hosts(v1::HostsRequest {})
                .await
                .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "collector never answered: {}",
            std::fs::read_to_string(dir.path().join("serve.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Two agents, 20 minutes each, small batches (many checkpoints).
    let start = align_down(now_ms() - 7_200_000, 60_000);
    let mut tasks = Vec::new();
    for (n, id) in [(1, "pg-a"), (2, "pg-b")] {
        tasks.push(
            spawn_sim_agent(
                agent_config(id, "kt", &server, &dir.path().join(id), 3),
                scenario(n),
                start,
                start + 1_200_000,
                5_000.0,
            )
            .unwrap(),
        );
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    let stored: i64 = pg_rows(&url, "SELECT COUNT(*) FROM windows")[0].get(0);
    assert_eq!(stored, 2 * 2 * 20, "every window of both agents is stored");

    // Live, and straight from the database.
    for args in [
        vec!["verify", "--server", &server],
        vec!["verify", "--db", &url],
    ] {
        let (code, out, err) = run(&args);
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
        assert!(
            out.contains("pg-a:") && out.contains("every chain and signature verifies"),
            "{out}"
        );
    }

    // Signed heads: fetched live, kept by the auditor, checked against the database; the key
    // lives in its file (0600), not in the database.
    let heads = dir.path().join("heads.jsonl");
    let (code, out, err) = run(&[
        "heads",
        "--server",
        &server,
        "--out",
        heads.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let secret = std::fs::read(&key).unwrap();
    let held: i64 = pg_rows(
        &url,
        &format!(
            "SELECT COUNT(*) FROM heads WHERE position('\\x{}'::bytea IN public_key || signature || leaves) > 0",
            hex::encode(&secret)
        ),
    )[0]
    .get(0);
    assert_eq!(held, 0, "the secret key is nowhere in the heads");
    let (code, out, err) = run(&["verify", "--db", &url, "--heads", heads.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let again = dir.path().join("heads-db.jsonl");
    let (code, out, err) = run(&["heads", "--db", &url, "--out", again.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("new heads appended"), "{out}");

    // A signed report checks against the database as of its head.
    let report = dir.path().join("report.json");
    let from = chrono::DateTime::from_timestamp_millis(start)
        .unwrap()
        .to_rfc3339();
    let until = chrono::DateTime::from_timestamp_millis(start + 1_200_000)
        .unwrap()
        .to_rfc3339();
    let period = format!("{from}..{until}");
    let (code, out, err) = run(&[
        "report",
        "--period",
        &period,
        "--format",
        "json",
        "--sign",
        "--server",
        &server,
        "--out",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = run(&["verify-report", report.to_str().unwrap(), "--db", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("matches the ledger as of head"), "{out}");

    // Bodies lie in compressed blocks (none kept in the row), and every one reads back.
    let kept = pg_rows(
        &url,
        "SELECT COUNT(*) FILTER (WHERE body IS NOT NULL), COUNT(*) FILTER (WHERE block IS NULL),
                (SELECT COUNT(*) FROM record_blocks) FROM records",
    );
    assert_eq!(
        (kept[0].get::<_, i64>(0), kept[0].get::<_, i64>(1)),
        (0, 0),
        "every body in a block"
    );
    assert!(kept[0].get::<_, i64>(2) > 0);

    // The same ledger as a collector before version 11 kept it (bodies and links verbatim in
    // their rows, no blocks) is compacted to the same verdict. (The synchronous client runs
    // on a thread of its own, off the test's runtime, as `pg_rows` does.)
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            for b in c
                .query("SELECT id, raw_len, data FROM record_blocks", &[])
                .unwrap()
            {
                let id: i64 = b.get(0);
                let data: Vec<u8> = b.get(2);
                for (seq, body) in
                    gpumeter_collector::store::body_block::decode(id, b.get(1), &data).unwrap()
                {
                    let n = c
                    .execute(
                        "UPDATE records SET body = $1, block = NULL WHERE block = $2 AND seq = $3",
                        &[&body, &id, &(seq as i64)],
                    )
                    .unwrap();
                    assert_eq!(n, 1);
                }
            }
            c.batch_execute(
                "UPDATE records r SET prev_hash = p.hash FROM records p
             WHERE r.prev_hash IS NULL AND p.agent_id = r.agent_id AND p.seq = r.seq - 1;
             DELETE FROM record_blocks;",
            )
            .unwrap();
        });
    });
    let counts = |sql: &str| -> i64 { pg_rows(&url, sql)[0].get(0) };
    let records = counts("SELECT COUNT(*) FROM records");
    assert_eq!(
        counts("SELECT COUNT(*) FROM records WHERE body IS NULL OR prev_hash IS NULL"),
        0
    );
    let (code, verbatim, err) = run(&["verify", "--db", &url]);
    assert_eq!(code, Some(0), "{verbatim}{err}");
    let (code, out, err) = run(&["compact", "--per-block", "7", "--vacuum", "--db", &url]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!("compacted {records} records of 2 agents")),
        "{out}"
    );
    assert_eq!(
        counts("SELECT COUNT(*) FROM records WHERE body IS NOT NULL"),
        0
    );
    assert!(counts("SELECT COUNT(*) FROM record_blocks") >= records / 7);
    assert!(counts("SELECT COUNT(*) FROM records WHERE prev_hash IS NULL") > records / 2);
    let (code, compacted, err) = run(&["verify", "--db", &url]);
    assert_eq!(code, Some(0), "{compacted}{err}");
    assert_eq!(compacted, verbatim, "verify says the same before and after");
    let (code, out, _) = run(&["compact", "--db", &url]);
    assert_eq!(code, Some(0));
    assert!(out.contains("compacted 0 records"), "{out}");

    // Retention, with every window two days past a one-day horizon: the same whole days'
    // figures before and after, the ledger still verifying, an edited rollup row below the
    // horizon caught from the bodies, and a report cutting inside a dropped hour refused.
    let kst = chrono::FixedOffset::east_opt(9 * 3600).unwrap();
    let day = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap()
            .with_timezone(&kst)
            .format("%Y-%m-%d")
            .to_string()
    };
    let days = format!("{}..{}", day(start), day(start + 1_200_000));
    let figures = |period: &str| {
        let (code, out, err) = run(&[
            "report", "--period", period, "--format", "json", "--server", &server,
        ]);
        (
            code,
            gpumeter_e2e::without_heads(serde_json::from_str(&out).unwrap_or_default()),
            err,
        )
    };
    let (code, before, err) = figures(&days);
    assert_eq!(code, Some(0), "{err}");
    let archive = dir.path().join("retained.archive");
    let now = chrono::DateTime::from_timestamp_millis(start + 2 * 86_400_000)
        .unwrap()
        .to_rfc3339();
    let (code, out, err) = run(&[
        "retain",
        "--db",
        &url,
        "--now",
        &now,
        "--max-age-days",
        "1",
        "--collector-key",
        key.to_str().unwrap(),
        "--archive",
        archive.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("2 agents' cuts moved"), "{out}");
    let (code, out, err) = run(&[
        "verify",
        "--db",
        &url,
        "--archive",
        archive.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("every record is the ledger's") && out.contains("of 2 agents"),
        "{out}"
    );
    // Nothing here pins an hour but the rule that keeps each Korean day's last hour.
    let left = counts("SELECT COUNT(*) FROM windows");
    let last_hour = counts(
        "SELECT COUNT(*) FROM windows
         WHERE (start_ms - start_ms % 3600000 + 36000000) % 86400000 = 0",
    );
    assert_eq!(left, last_hour, "{left} of {stored} windows left");
    let (code, after, err) = figures(&days);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(after, before);
    let (code, retained, err) = run(&["verify", "--db", &url]);
    assert_eq!(code, Some(0), "{retained}{err}");
    let (code, _, err) = figures(&period);
    assert_ne!(code, Some(0));
    assert!(err.contains("dropped by retention"), "{err}");
    let edit = |by: i64| {
        pg_rows(
            &url,
            &format!(
                "UPDATE card_hours SET good_ms = good_ms + {by}
                 WHERE (start_ms, gpu_uuid, agent_id) = (SELECT start_ms, gpu_uuid, agent_id FROM card_hours
                     WHERE agent_id = 'pg-a' AND NOT raw AND good_ms > 0 ORDER BY start_ms, gpu_uuid LIMIT 1)
                   AND NOT raw"
            ),
        )
    };
    edit(1000);
    let (code, out, err) = run(&["verify", "--db", &url]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("pg-a") && out.contains("card_hours"), "{out}");
    edit(-1000);
    let (code, out, err) = run(&["verify", "--db", &url]);
    assert_eq!(code, Some(0), "{out}{err}");

    // A body put back into its row with other bytes is caught.
    pg_rows(
        &url,
        "UPDATE records SET body = '\\x0a00'::bytea WHERE agent_id = 'pg-b' AND seq = 5",
    );
    let (code, out, err) = run(&["verify", "--db", &url]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("pg-b") && out.contains("record 5: stored hash does not match its body"),
        "{out}"
    );
    // So is a damaged block.
    pg_rows(
        &url,
        "UPDATE records SET body = NULL WHERE agent_id = 'pg-b' AND seq = 5",
    );
    pg_rows(
        &url,
        "UPDATE record_blocks SET data = substring(data from 1 for length(data) - 4)
         WHERE id = (SELECT block FROM records WHERE agent_id = 'pg-b' AND seq = 5)",
    );
    let (code, out, err) = run(&["verify", "--db", &url]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("record 5: its body cannot be read back: body block"),
        "{out}"
    );
}

/// A loopback TCP proxy whose upstream can be switched: the open connections are cut and
/// the next ones go to the new upstream (an agent behind a load balancer moved between
/// collectors).
struct SwitchProxy {
    addr: std::net::SocketAddr,
    upstream: std::sync::Arc<std::sync::Mutex<std::net::SocketAddr>>,
    open: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    /// Connections carried to each upstream.
    served:
        std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::SocketAddr, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SwitchProxy {
    async fn start(to: std::net::SocketAddr) -> SwitchProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = std::sync::Arc::new(std::sync::Mutex::new(to));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let served = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let (up, conns, count) = (upstream.clone(), open.clone(), served.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let to = *up.lock().unwrap();
                let count = count.clone();
                let h = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                        *count.lock().unwrap().entry(to).or_insert(0) += 1;
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                conns.lock().unwrap().push(h);
            }
        });
        SwitchProxy {
            addr,
            upstream,
            open,
            served,
            task,
        }
    }

    /// Sends new connections to `to` and cuts the open ones.
    fn switch(&self, to: std::net::SocketAddr) {
        *self.upstream.lock().unwrap() = to;
        for h in self.open.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

impl Drop for SwitchProxy {
    fn drop(&mut self) {
        self.task.abort();
        for h in self.open.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}

/// Cards of host `n`: one busy at 70 % for alice, one idle.
fn host_scenario(n: u32) -> (Scenario, [String; 2]) {
    let busy = format!("GPU-0000e{n:03x}-0000-4000-8000-000000000000");
    let idle = format!("GPU-0000e{n:03x}-0000-4000-8000-000000000001");
    let s = toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{busy}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 70
processes = [{{ pid = {pid}, uid = 1001, user = "alice", memory_bytes = 1000 }}]
[[cards]]
uuid = "{idle}"
idle_power_w = 100
max_power_w = 500
"#,
        pid = 100 + n
    ))
    .unwrap();
    (s, [busy, idle])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_on_one_postgres_serve_agents_that_move_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let Some(backend) = TestDb::postgres("two_collectors", dir.path()) else {
        return;
    };
    // Two collectors on one database (and one collector key, as they must share).
    let a = gpumeter_e2e::TestCollector::start_in(&backend)
        .await
        .unwrap();
    let b = gpumeter_e2e::TestCollector::start_in(&backend)
        .await
        .unwrap();

    // Twenty windows per card, replayed at 200x (6 s), in small batches so that many acks
    // are in flight whenever a connection is cut.
    let windows = 20;
    let start = align_down(now_ms() - 7_200_000, 60_000);
    let stop = start + windows * 60_000;
    let hosts: Vec<(String, Scenario, [String; 2])> = (1..=3)
        .map(|n| {
            let (s, cards) = host_scenario(n);
            (format!("move-{n}"), s, cards)
        })
        .collect();
    let mut proxies = Vec::new();
    let mut tasks = Vec::new();
    for (i, (id, s, _)) in hosts.iter().enumerate() {
        let first = if i % 2 == 0 { a.addr } else { b.addr };
        let proxy = SwitchProxy::start(first).await;
        let url = format!("https://{}", proxy.addr);
        tasks.push(
            spawn_sim_agent(
                agent_config(id, "kt", &url, &dir.path().join(id), 2),
                s.clone(),
                start,
                stop,
                200.0,
            )
            .unwrap(),
        );
        proxies.push(proxy);
    }
    // Every agent moves to the other collector, and back, mid-stream.
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        for (i, p) in proxies.iter().enumerate() {
            let to = if (i + round) % 2 == 0 { b.addr } else { a.addr };
            p.switch(to);
        }
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(90), t)
            .await
            .expect("agents finish within 90 s")
            .unwrap()
            .unwrap();
    }

    for (p, (id, _, _)) in proxies.iter().zip(&hosts) {
        let served = p.served.lock().unwrap().clone();
        assert!(
            served.contains_key(&a.addr) && served.contains_key(&b.addr),
            "{id} streamed to both collectors: {served:?}"
        );
    }

    // Stored once each, whichever collector took them.
    for (id, _, _) in &hosts {
        let rows = pg_rows(
            &backend.db_arg(),
            &format!("SELECT COUNT(*), MAX(seq) FROM records WHERE agent_id = '{id}'"),
        );
        let (n, max): (i64, i64) = (rows[0].get(0), rows[0].get(1));
        assert_eq!(n, max, "{id}: no hole, no record twice");
        let w: i64 = pg_rows(
            &backend.db_arg(),
            &format!("SELECT COUNT(*) FROM windows WHERE agent_id = '{id}'"),
        )[0]
        .get(0);
        assert_eq!(w, 2 * windows, "{id}: one window per card and minute");
    }
    let bad: Vec<String> = pg_rows(
        &backend.db_arg(),
        "SELECT kind || ': ' || detail FROM alarms
         WHERE kind IN ('equivocation', 'batch_failed', 'seq_gap', 'card_time_overlap', 'impossible_window')",
    )
    .iter()
    .map(|r| r.get(0))
    .collect();
    assert!(bad.is_empty(), "{bad:?}");

    // Both collectors give the same report, with every figure exact.
    let from = chrono::DateTime::from_timestamp_millis(start)
        .unwrap()
        .to_rfc3339();
    let until = chrono::DateTime::from_timestamp_millis(stop)
        .unwrap()
        .to_rfc3339();
    let period = format!("{from}..{until}");
    let mut reports = Vec::new();
    for c in [&a, &b] {
        let (code, out, err) = run(&[
            "report", "--view", "usage", "--format", "json", "--server", &c.url, "--period",
            &period,
        ]);
        assert_eq!(code, Some(0), "{out}{err}");
        reports.push(serde_json::from_str::<serde_json::Value>(&out).unwrap());
    }
    assert_eq!(reports[0], reports[1]);
    let report = &reports[0];
    let card = |uuid: &str| {
        report["cards"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["gpu_uuid"] == uuid)
            .unwrap_or_else(|| panic!("{uuid} in {report}"))
            .clone()
    };
    assert_eq!(report["cards"].as_array().unwrap().len(), 2 * hosts.len());
    for (_, s, [busy, idle]) in &hosts {
        for uuid in [busy, idle] {
            let c = s.cards.iter().find(|c| &c.uuid == uuid).unwrap();
            let e = c.energy_mj_at(windows * 60_000) - c.energy_mj_at(0);
            let r = card(uuid);
            assert_eq!(r["windows"], windows, "{uuid}");
            assert_eq!(r["metered_ms"], windows * 60_000, "{uuid}");
            assert_eq!(r["energy_mj"], e, "{uuid}");
        }
        assert_eq!(card(busy)["active_ms"], windows * 42_000);
        assert_eq!(card(busy)["util_avg_pct"], 70.0);
        assert_eq!(card(busy)["occupied_ms"], windows * 60_000);
        assert_eq!(card(idle)["active_ms"], 0);
    }

    // Both verify the shared ledger and sign heads under the one key, numbered in turn.
    for c in [&a, &b] {
        let (code, out, err) = run(&["verify", "--server", &c.url]);
        assert_eq!(code, Some(0), "{out}{err}");
    }
    let heads = dir.path().join("heads.jsonl");
    for c in [&a, &b] {
        let (code, out, err) = run(&[
            "heads",
            "--server",
            &c.url,
            "--out",
            heads.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(0), "{out}{err}");
    }
    let (code, out, err) = run(&[
        "verify",
        "--server",
        &b.url,
        "--heads",
        heads.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    drop(proxies);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A Hello for `agent_id` listing `gpu`; the session's inbound stream, and the sender that
/// keeps it open.
async fn open_session(
    url: &str,
    agent_id: &str,
    gpu: &str,
) -> Result<
    (
        tonic::Streaming<v1::CollectorMessage>,
        tokio::sync::mpsc::Sender<v1::AgentMessage>,
    ),
    tonic::Status,
> {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
            protocol_version: gpumeter_proto::PROTOCOL_VERSION,
            agent_id: agent_id.into(),
            host_id: agent_id.into(),
            csp: "kt".into(),
            hostname: agent_id.into(),
            agent_version: "test".into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            driver_version: "test".into(),
            gpus: vec![v1::GpuInfo {
                uuid: gpu.into(),
                name: "simulated".into(),
                ..Default::default()
            }],
            epoch: 1,
            next_seq: 1,
            chain_head: vec![0; 32],
            agent_time_unix_ms: now_ms(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut ingest = gpumeter_e2e::ingest_at(url, agent_id).await;
    let mut inbound = ingest
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    // Nothing is known to be refused until the first answer.
    match inbound.message().await? {
        Some(v1::CollectorMessage {
            kind: Some(v1::collector_message::Kind::Welcome(_)),
        }) => Ok((inbound, tx)),
        other => Err(tonic::Status::internal(format!("not a Welcome: {other:?}"))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_one_across_collectors_and_hears_grant_changes_made_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let Some(backend) = TestDb::postgres("push_across", dir.path()) else {
        return;
    };
    let a = gpumeter_e2e::TestCollector::start_in(&backend)
        .await
        .unwrap();
    let b = gpumeter_e2e::TestCollector::start_in(&backend)
        .await
        .unwrap();
    let gpu = "GPU-0000f001-0000-4000-8000-000000000000";
    let r = b
        .admin()
        .await
        .import_grants(v1::ImportGrantsRequest {
            csv: format!(
                "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
                 G-PUSH,research,Lab,user:alice,kt,push-host,{gpu},2020-01-01,2099-12-31\n"
            ),
            actor: String::new(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors.is_empty(), "{:?}", r.errors);

    // Live on A: a Hello to B for the same agent is refused, naming the other collector.
    let (mut inbound, tx) = open_session(&a.url, "push-host", gpu).await.unwrap();
    let refused = open_session(&b.url, "push-host", gpu).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    assert!(
        refused.message().contains("another collector"),
        "{refused:?}"
    );

    // A grant revoked through B reaches the session on A.
    let (code, out, err) = run(&[
        "grants", "revoke", "G-PUSH", "--at", "now", "--server", &b.url,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    // (A set pushed for the import, seen late, may come first: sets are whole, so a repeat
    // is harmless.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pushed = tokio::time::timeout_at(deadline.into(), inbound.message())
            .await
            .expect("the revocation pushed within 10 s")
            .unwrap()
            .unwrap();
        let Some(v1::collector_message::Kind::Assignments(set)) = pushed.kind else {
            panic!("expected a pushed AssignmentSet: {pushed:?}");
        };
        assert_eq!(set.assignments.len(), 1);
        assert_eq!(set.assignments[0].grant_id, "G-PUSH");
        if set.assignments[0].revoked {
            break;
        }
    }

    // The session ends on A; B admits the agent from then on.
    drop(tx);
    drop(inbound);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match open_session(&b.url, "push-host", gpu).await {
            Ok(_) => break,
            Err(s) if s.code() == tonic::Code::AlreadyExists && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

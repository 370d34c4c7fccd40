//! The verifiable ledger: `gpumeter-collector verify` re-checks every stored chain, on a live
//! collector (`--server`) and on a copy of the database (`--db`), and catches tampering done
//! directly in the SQLite file.

use std::path::Path;
use std::time::Duration;

use gpumeter_agent::clock::align_down;
use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_e2e::{TestCollector, TestDb, agent_config, now_ms, record_body, spawn_sim_agent};

fn scenario() -> Scenario {
    toml::from_str(
        r#"
[[cards]]
uuid = "GPU-0000000c-0000-4000-8000-000000000000"
[[cards.phases]]
from_s = 0
util_pct = 70
processes = [{ pid = 5, uid = 1001, user = "alice" }]
[[cards]]
uuid = "GPU-0000000c-0000-4000-8000-000000000001"
"#,
    )
    .unwrap()
}

/// A ledger of two agents, 20 minutes each, small batches (many checkpoints).
async fn build_ledger(dir: &Path) -> TestCollector {
    let collector = TestCollector::start(&dir.join("ledger.db")).await.unwrap();
    let start = align_down(now_ms() - 7_200_000, 60_000);
    let mut tasks = Vec::new();
    for id in ["verify-a", "verify-b"] {
        tasks.push(
            spawn_sim_agent(
                agent_config(id, "kt", &collector.url, &dir.join(id), 3),
                scenario(),
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
    collector
}

fn verify_db(db: &Path) -> (Option<i32>, String) {
    let out = gpumeter_e2e::cli()
        .args(["verify", "--db"])
        .arg(db)
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

/// Copies the ledger (a checkpointed WAL database) to a fresh file and tampers with it.
fn tampered(
    src: &Path,
    dir: &Path,
    name: &str,
    sql: impl FnOnce(&rusqlite::Connection),
) -> std::path::PathBuf {
    let dst = dir.join(format!("{name}.db"));
    let c = rusqlite::Connection::open(src).unwrap();
    c.execute("VACUUM INTO ?1", [dst.to_str().unwrap()])
        .unwrap();
    let t = rusqlite::Connection::open(&dst).unwrap();
    sql(&t);
    dst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_an_intact_ledger_and_catches_every_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let collector = build_ledger(dir.path()).await;
    let db = dir.path().join("ledger.db");

    // Live collector.
    let out = gpumeter_e2e::cli()
        .args(["verify", "--server", &collector.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("verify-a:") && text.contains("every chain and signature verifies"),
        "{text}"
    );

    let n: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT MAX(seq) FROM records WHERE agent_id = 'verify-a'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(n > 40, "enough records to tamper with: {n}");

    let clean = tampered(&db, dir.path(), "clean", |_| {});
    let (code, out) = verify_db(&clean);
    assert_eq!(code, Some(0), "{out}");

    // One byte of one body.
    let edited = tampered(&db, dir.path(), "edited", |c| {
        let mut b = record_body(c, "verify-a", 20);
        let last = b.len() - 1;
        b[last] ^= 0x01;
        c.execute(
            "UPDATE records SET body=?1 WHERE agent_id='verify-a' AND seq=20",
            [b],
        )
        .unwrap();
    });
    let (code, out) = verify_db(&edited);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 20: stored hash does not match its body"),
        "{out}"
    );
    assert!(
        out.contains("verify-b:") && out.contains("verify-a:"),
        "{out}"
    );

    // A deleted row.
    let deleted = tampered(&db, dir.path(), "deleted", |c| {
        c.execute(
            "DELETE FROM records WHERE agent_id='verify-a' AND seq=21",
            [],
        )
        .unwrap();
    });
    let (code, out) = verify_db(&deleted);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("records 21..=21 are missing"), "{out}");

    // Two rows swapped.
    let swapped = tampered(&db, dir.path(), "swapped", |c| {
        c.execute_batch(
            "UPDATE records SET seq=-1 WHERE agent_id='verify-b' AND seq=10;
             UPDATE records SET seq=10 WHERE agent_id='verify-b' AND seq=11;
             UPDATE records SET seq=11 WHERE agent_id='verify-b' AND seq=-1;",
        )
        .unwrap();
    });
    let (code, out) = verify_db(&swapped);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 10:") && out.contains("record 11:"),
        "{out}"
    );

    // The tail cut off.
    let truncated = tampered(&db, dir.path(), "truncated", |c| {
        c.execute(
            "DELETE FROM records WHERE agent_id='verify-b' AND seq > ?1",
            [n - 4],
        )
        .unwrap();
    });
    let (code, out) = verify_db(&truncated);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("tail cut off"), "{out}");

    // A forged body with its hash recomputed: the link and the signature give it away.
    let forged = tampered(&db, dir.path(), "forged", |c| {
        // Its prev_hash is the hash of the record before it (the row keeps no copy of it).
        let prev: Vec<u8> = c
            .query_row(
                "SELECT hash FROM records WHERE agent_id='verify-a' AND seq=29",
                [],
                |r| r.get(0),
            )
            .unwrap();
        let mut b = record_body(c, "verify-a", 30);
        b[3] ^= 0x10;
        let h = gpumeter_proto::chain::record_hash(&prev.try_into().unwrap(), 30, &b);
        c.execute(
            "UPDATE records SET body=?1, hash=?2 WHERE agent_id='verify-a' AND seq=30",
            rusqlite::params![b, h.to_vec()],
        )
        .unwrap();
    });
    let (code, out) = verify_db(&forged);
    assert_eq!(code, Some(1), "{out}");
    // Record 31's row keeps no prev_hash (it is record 30's hash), so the break shows there.
    assert!(
        out.contains("record 31: stored hash does not match its body and the record before it"),
        "{out}"
    );

    // Bodies lie in compressed blocks, one per batch. A damaged block: every record in it is
    // named as unreadable (zstd's checksum catches it), and the chain around it still checks.
    let block_of = |c: &rusqlite::Connection, seq: i64| -> (i64, i64, Vec<u8>) {
        c.query_row(
            "SELECT b.id, b.raw_len, b.data FROM record_blocks b JOIN records r ON r.block = b.id
             WHERE r.agent_id = 'verify-a' AND r.seq = ?1",
            [seq],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    };
    let damaged = tampered(&db, dir.path(), "damaged-block", |c| {
        let (id, _, mut data) = block_of(c, 25);
        let mid = data.len() / 2;
        data[mid] ^= 0x40;
        c.execute(
            "UPDATE record_blocks SET data = ?1 WHERE id = ?2",
            rusqlite::params![data, id],
        )
        .unwrap();
    });
    let (code, out) = verify_db(&damaged);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 25: its body cannot be read back: body block"),
        "{out}"
    );
    assert!(!out.contains("verify-b: 1"), "only verify-a's block: {out}");

    // A block re-compressed around a forged body: the body's hash gives it away.
    let recompressed = tampered(&db, dir.path(), "recompressed-block", |c| {
        let (id, raw_len, data) = block_of(c, 25);
        let mut bodies = gpumeter_collector::store::body_block::decode(id, raw_len, &data).unwrap();
        let body = &mut bodies.iter_mut().find(|(s, _)| *s == 25).unwrap().1;
        body[3] ^= 0x10;
        let z = gpumeter_collector::store::body_block::encode(
            bodies.iter().map(|(s, b)| (*s, b.as_slice())),
        );
        c.execute(
            "UPDATE record_blocks SET raw_len = ?1, data = ?2 WHERE id = ?3",
            rusqlite::params![z.raw_len as i64, z.data, id],
        )
        .unwrap();
    });
    let (code, out) = verify_db(&recompressed);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 25: stored hash does not match its body"),
        "{out}"
    );

    // A missing file or another database is named.
    let (code, out) = verify_db(&dir.path().join("nope.db"));
    assert_eq!(code, Some(1));
    assert!(out.contains("nope.db"), "{out}");
    collector.stop().await.unwrap();
}

/// An agent whose spool is lost (its key kept) starts a new epoch after what the collector
/// holds: the first record of the epoch names the collector's last record, the chain stays
/// linked, and `verify` still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_spool_starts_a_new_epoch_that_names_the_last_acked_record() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let start = align_down(now_ms() - 7_200_000, 60_000);
    let state = dir.path().join("agent");
    let run = |from: i64, to: i64| {
        spawn_sim_agent(
            agent_config("epoch-agent", "kt", &collector.url, &state, 16),
            scenario(),
            from,
            to,
            5_000.0,
        )
        .unwrap()
    };
    run(start, start + 300_000).await.unwrap().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let before: i64 = conn
        .query_row(
            "SELECT MAX(seq) FROM records WHERE agent_id='epoch-agent'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    std::fs::remove_dir_all(state.join("spool")).unwrap();
    run(start + 600_000, start + 900_000)
        .await
        .unwrap()
        .unwrap();

    let (seq, kind): (i64, String) = conn
        .query_row(
            "SELECT seq, kind FROM records WHERE agent_id='epoch-agent' AND seq = ?1",
            [before + 1],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((seq, kind.as_str()), (before + 1, "epoch_start"));
    let epochs: Vec<i64> = conn
        .prepare(
            "SELECT DISTINCT epoch FROM checkpoints WHERE agent_id='epoch-agent' ORDER BY epoch",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(epochs, vec![1, 2]);
    // ...and the collector raised an alarm for it.
    let alarm: (String, i64) = conn
        .query_row(
            "SELECT detail, seq FROM alarms WHERE agent_id='epoch-agent' AND kind='epoch_start'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(alarm.1, before + 1);
    assert!(
        alarm.0.contains(&format!("epoch 2 after seq {before}")),
        "{}",
        alarm.0
    );
    // The second life's windows are all there: 5 minutes x 2 cards.
    let windows: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM windows WHERE agent_id='epoch-agent' AND start_ms >= ?1",
            [start + 600_000],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(windows, 10);
    let (code, out) = verify_db(&{
        let copy = dir.path().join("copy.db");
        conn.execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
            .unwrap();
        copy
    });
    assert_eq!(code, Some(0), "{out}");
    collector.stop().await.unwrap();
}

async fn hello(
    url: &str,
    agent_id: &str,
    key: &ed25519_dalek::SigningKey,
) -> Result<(), tonic::Status> {
    use gpumeter_proto::v1;
    let mut c = gpumeter_e2e::ingest_client(url, Some((agent_id, agent_id)))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(v1::AgentMessage {
        kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
            protocol_version: 1,
            agent_id: agent_id.into(),
            host_id: agent_id.into(),
            csp: "kt".into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            epoch: 1,
            next_seq: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = c
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    inbound
        .message()
        .await?
        .map(|_| ())
        .ok_or_else(|| tonic::Status::aborted("closed"))
}

fn register(url: &str, agent_id: &str, key: &ed25519_dalek::SigningKey) -> (Option<i32>, String) {
    let out = gpumeter_e2e::cli()
        .args([
            "agents",
            "register",
            agent_id,
            "--reason",
            "reinstalled",
            "--server",
            url,
            "--key",
        ])
        .arg(hex::encode(key.verifying_key().to_bytes()))
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Keys are pinned on first use or by an admin beforehand; a changed key is refused until an
/// admin re-registers the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_is_refused_until_an_admin_re_registers_it() {
    let dir = tempfile::tempdir().unwrap();
    a_changed_key_is_refused(TestDb::sqlite(&dir.path().join("keys.db"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_key_is_refused_until_an_admin_re_registers_it_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let Some(db) = TestDb::postgres("changed_key", dir.path()) else {
        return;
    };
    a_changed_key_is_refused(db).await;
}

async fn a_changed_key_is_refused(backend: TestDb) {
    let collector = TestCollector::start_in(&backend).await.unwrap();
    let k1 = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
    let k2 = ed25519_dalek::SigningKey::from_bytes(&[2; 32]);

    // Pinned on first use.
    hello(&collector.url, "tofu", &k1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = hello(&collector.url, "tofu", &k2).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("tofu") && err.message().contains("re-register"),
        "{}",
        err.message()
    );
    let (code, out) = register(&collector.url, "tofu", &k2);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("replaced"), "{out}");
    hello(&collector.url, "tofu", &k2).await.unwrap();

    // Pre-registered before the agent ever connects: only that key gets in.
    let (code, out) = register(&collector.url, "prereg", &k1);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("pinned (new agent)"), "{out}");
    assert_eq!(
        hello(&collector.url, "prereg", &k2)
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied
    );
    hello(&collector.url, "prereg", &k1).await.unwrap();

    // Auditors see every key change among the alarms.
    let out = gpumeter_e2e::cli()
        .args(["alarms", "--agent", "tofu", "--server", &collector.url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("key_registered"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("replacing") && line.contains("reinstalled"),
        "{line}"
    );
    assert!(!text.contains("prereg"), "filtered to one agent: {text}");

    // A malformed key is a usage error naming the flag.
    let out = gpumeter_e2e::cli()
        .args([
            "agents",
            "register",
            "x",
            "--key",
            "zz",
            "--server",
            &collector.url,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--key"));
    collector.stop().await.unwrap();
}

/// The collector's Prometheus endpoint counts live sessions and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_metrics_count_sessions_and_commits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let opts = gpumeter_collector::server::ServerOptions {
        metrics_listen: Some(metrics_addr),
        ..gpumeter_e2e::replay_options()
    };
    let collector = TestCollector::start_with(&dir.path().join("m.db"), "127.0.0.1:0", opts)
        .await
        .unwrap();
    let url = collector.url.clone();
    let scrape = || async move {
        let mut c = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).await.unwrap();
        s
    };
    // An agent streams five minutes of windows and stays connected.
    let start = align_down(now_ms() - 7_200_000, 60_000);
    spawn_sim_agent(
        agent_config("metrics-agent", "kt", &url, &dir.path().join("a"), 16),
        scenario(),
        start,
        start + 300_000,
        5_000.0,
    )
    .unwrap()
    .await
    .unwrap()
    .unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (_tx, rx) = tokio::sync::mpsc::channel(2);
    _tx.send(gpumeter_proto::v1::AgentMessage {
        kind: Some(gpumeter_proto::v1::agent_message::Kind::Hello(
            gpumeter_proto::v1::Hello {
                protocol_version: 1,
                agent_id: "idle-agent".into(),
                host_id: "idle-agent".into(),
                csp: "kt".into(),
                public_key: key.verifying_key().to_bytes().to_vec(),
                epoch: 1,
                next_seq: 1,
                ..Default::default()
            },
        )),
    })
    .await
    .unwrap();
    let mut c = gpumeter_e2e::ingest_at(&url, "idle-agent").await;
    let mut inbound = c
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    inbound.message().await.unwrap().unwrap();
    let m = scrape().await;
    // One series each, labelled with the collector's id.
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| {
                let rest = l.strip_prefix(name)?.strip_prefix('{')?;
                rest.split_once("} ")?.1.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("no {name} in:\n{m}"))
    };
    assert_eq!(value("gpumeter_collector_live_sessions"), 1.0, "{m}");
    // 5 windows x 2 cards, plus the agent-started and assignment events.
    assert!(
        value("gpumeter_collector_records_committed_total") >= 10.0,
        "{m}"
    );
    assert_eq!(value("gpumeter_collector_failed_commits_total"), 0.0, "{m}");
    drop(inbound);
    drop(_tx);
    collector.stop().await.unwrap();
}

/// A ledger stored before the compact format (bodies and prev_hashes verbatim in their rows,
/// no blocks) is compacted by `gpumeter-collector compact`: the same records, the same
/// `verify` answer, a smaller file, and a second run finds nothing left to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_moves_verbatim_bodies_into_blocks_and_verify_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let collector = build_ledger(dir.path()).await;
    let db = dir.path().join("ledger.db");
    // The same ledger as a collector before version 11 kept it.
    let old = tampered(&db, dir.path(), "verbatim", |c| {
        // (agent, seq, prev_hash as stored, hash)
        type Row = (String, i64, Option<Vec<u8>>, Vec<u8>);
        let rows: Vec<Row> = c
            .prepare("SELECT agent_id, seq, prev_hash, hash FROM records ORDER BY agent_id, seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut before: Option<(String, i64, Vec<u8>)> = None;
        for (agent, seq, prev, hash) in &rows {
            let prev = prev.clone().unwrap_or_else(|| match &before {
                Some((a, s, h)) if a == agent && s + 1 == *seq => h.clone(),
                _ => panic!("{agent} seq {seq}: no prev_hash and no record before"),
            });
            let body = record_body(c, agent, *seq as u64);
            c.execute(
                "UPDATE records SET body = ?1, prev_hash = ?2, block = NULL
                 WHERE agent_id = ?3 AND seq = ?4",
                rusqlite::params![body, prev, agent, seq],
            )
            .unwrap();
            before = Some((agent.clone(), *seq, hash.clone()));
        }
        c.execute("DELETE FROM record_blocks", []).unwrap();
        c.execute_batch("VACUUM").unwrap();
    });
    let count = |sql: &str| -> i64 {
        rusqlite::Connection::open(&old)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    };
    let records = count("SELECT COUNT(*) FROM records");
    assert!(records > 80, "{records}");
    assert_eq!(count("SELECT COUNT(*) FROM records WHERE body IS NULL"), 0);
    let (code, verbatim_verdict) = verify_db(&old);
    assert_eq!(code, Some(0), "{verbatim_verdict}");
    let size_before = std::fs::metadata(&old).unwrap().len();

    let out = gpumeter_e2e::cli()
        // Small blocks: each agent's records in several, linked across their edges.
        .args(["compact", "--vacuum", "--per-block", "7", "--db"])
        .arg(&old)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("compacted {records} records of 2 agents")),
        "{text}"
    );
    assert_eq!(
        count("SELECT COUNT(*) FROM records WHERE body IS NOT NULL"),
        0
    );
    assert_eq!(count("SELECT COUNT(*) FROM records"), records);
    assert!(count("SELECT COUNT(*) FROM record_blocks") >= records / 7);
    assert!(
        count("SELECT COUNT(*) FROM records WHERE prev_hash IS NULL") > records / 2,
        "links to the record before are no longer stored"
    );
    let (code, compact_verdict) = verify_db(&old);
    assert_eq!(code, Some(0), "{compact_verdict}");
    let verdict = |v: &str| {
        v.lines()
            .filter(|l| !l.starts_with("verified in"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        verdict(&compact_verdict),
        verdict(&verbatim_verdict),
        "verify says the same of the ledger before and after"
    );
    let size_after = std::fs::metadata(&old).unwrap().len();
    assert!(
        size_after < size_before,
        "{size_after} bytes after, {size_before} before"
    );

    let again = gpumeter_e2e::cli()
        .args(["compact", "--db"])
        .arg(&old)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("compacted 0 records"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
    // Bad input is named.
    let missing = gpumeter_e2e::cli()
        .args(["compact", "--db"])
        .arg(dir.path().join("nowhere.db"))
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such ledger file"));
    collector.stop().await.unwrap();
}

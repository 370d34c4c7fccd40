//! Ledger integrity on real database files: derived rows re-derived by `verify`, signed heads
//! catching what the ledger alone cannot, key history across a re-registration, impossible
//! windows and card time counted twice kept out of every figure, and the alarms for each.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use gpumeter_agent::clock::align_down;
use gpumeter_agent::gpu::sim::Scenario;
use gpumeter_e2e::{TestCollector, agent_config, bin, now_ms, spawn_sim_agent};
use gpumeter_proto::chain::{self, GENESIS, Hash};
use gpumeter_proto::v1;
use prost::Message;
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;

const CARD: &str = "GPU-0000000d-0000-4000-8000-000000000000";

/// Agent `n`'s two cards (every card has a UUID of its own).
fn scenario(n: u8) -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "GPU-0000000e-0000-4000-8000-0000000000{n}0"
[[cards.phases]]
from_s = 0
util_pct = 70
processes = [{{ pid = 5, uid = 1001, user = "alice" }}]
[[cards]]
uuid = "GPU-0000000e-0000-4000-8000-0000000000{n}1"
"#
    ))
    .unwrap()
}

/// Two simulated agents, 20 minutes each, small batches (many checkpoints).
async fn build_ledger(dir: &Path) -> TestCollector {
    let collector = TestCollector::start(&dir.join("ledger.db")).await.unwrap();
    let start = align_down(now_ms() - 7_200_000, 60_000);
    let mut tasks = Vec::new();
    for (n, id) in [(1, "int-a"), (2, "int-b")] {
        tasks.push(
            spawn_sim_agent(
                agent_config(id, "kt", &collector.url, &dir.join(id), 3),
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
    collector
}

fn copy(src: &Path, dir: &Path, name: &str, sql: impl FnOnce(&rusqlite::Connection)) -> PathBuf {
    let dst = dir.join(format!("{name}.db"));
    let c = rusqlite::Connection::open(src).unwrap();
    c.execute("VACUUM INTO ?1", [dst.to_str().unwrap()])
        .unwrap();
    let t = rusqlite::Connection::open(&dst).unwrap();
    sql(&t);
    dst
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin("gpumeter-collector"))
        .envs(gpumeter_e2e::cli_env())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (agent, kind, seq) of each finding.
type Found = Vec<(String, String, u64)>;
/// Exit code, findings, head findings and the whole JSON of one `verify` run.
type Verified = (Option<i32>, Found, Found, Value);

/// `verify --db` (with `--heads` when given): exit code, (agent, kind, seq) of every finding,
/// the head findings as (agent, kind, seq), and the JSON.
fn verify_db(db: &Path, heads: Option<&Path>) -> Verified {
    let mut args = vec!["verify", "--json", "--db", db.to_str().unwrap()];
    if let Some(h) = heads {
        args.extend(["--heads", h.to_str().unwrap()]);
    }
    let (code, out, err) = run(&args);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    let mut findings = Vec::new();
    for a in v["agents"].as_array().unwrap() {
        for f in a["findings"].as_array().unwrap() {
            findings.push((
                a["agent_id"].as_str().unwrap().to_string(),
                f["kind"].as_str().unwrap().to_string(),
                f["seq"].as_u64().unwrap(),
            ));
        }
    }
    let heads = v["heads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["agent_id"].as_str().unwrap().to_string(),
                h["kind"].as_str().unwrap().to_string(),
                h["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    (code, findings, heads, v)
}

fn one(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_re_derives_every_derived_row_and_names_each_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let collector = build_ledger(dir.path()).await;
    let db = dir.path().join("ledger.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (code, f, _, _) = verify_db(&copy(&db, dir.path(), "clean", |_| {}), None);
    assert_eq!((code, f.clone()), (Some(0), vec![]), "{f:?}");

    // A window of int-a with principals, one of int-b, and an event of int-a.
    let wseq = one(
        &conn,
        "SELECT MIN(w.seq) FROM windows w JOIN window_principals p ON p.agent_id = w.agent_id AND p.seq = w.seq
         WHERE w.agent_id = 'int-a' AND w.seq > 10",
    );
    let eseq = one(
        &conn,
        "SELECT MIN(seq) FROM events WHERE agent_id = 'int-a'",
    );
    let cases: Vec<(&str, String, &str, &str, i64)> = vec![
        (
            "occupied",
            format!("UPDATE windows SET occupied_ms = occupied_ms + 1800000 WHERE agent_id='int-a' AND seq={wseq}"),
            "int-a", "derived_mismatch", wseq,
        ),
        (
            "active",
            format!("UPDATE window_principals SET active_ms = active_ms + 1000 WHERE agent_id='int-a' AND seq={wseq}"),
            "int-a", "derived_mismatch", wseq,
        ),
        (
            "energy",
            format!("UPDATE windows SET energy_mj = COALESCE(energy_mj, 0) + 1130000000 WHERE agent_id='int-a' AND seq={wseq}"),
            "int-a", "derived_mismatch", wseq,
        ),
        (
            "card_deleted",
            "DELETE FROM windows WHERE agent_id='int-b' AND gpu_uuid='GPU-0000000e-0000-4000-8000-000000000020'".into(),
            "int-b", "derived_missing", 0,
        ),
        (
            // One interned name rewritten changes every row that carries its number.
            "name_renamed",
            "UPDATE names SET name = 'GPU-0000000e-0000-4000-8000-0000000000ff'
             WHERE name = 'GPU-0000000e-0000-4000-8000-000000000020'".into(),
            "int-b", "derived_mismatch", 0,
        ),
        (
            // A row whose number names nothing drops out of the views, and is missed.
            "name_deleted",
            "DELETE FROM names WHERE name = 'GPU-0000000e-0000-4000-8000-000000000020'".into(),
            "int-b", "derived_missing", 0,
        ),
        (
            "principals_deleted",
            format!("DELETE FROM window_principals WHERE agent_id='int-a' AND seq={wseq}"),
            "int-a", "derived_missing", wseq,
        ),
        (
            "inserted",
            format!(
                "INSERT INTO windows SELECT agent_id, 99999, gpu_uuid, start_ms + 86400000, end_ms + 86400000, interval_ms,
                   expected_samples, good_samples, util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes,
                   energy_mj, energy_estimated, power_avg_w, temperature_max_c, throttle_reasons, health, unavailable_ms,
                   assignment_status, grant_id, principal, active_ms, occupied_ms, foreign_ms, grantee_occupied_ms,
                   unattributed_ms, energy_estimated_mj
                 FROM windows WHERE agent_id='int-a' AND seq={wseq}"
            ),
            "int-a", "derived_orphan", 99999,
        ),
        (
            "window_on_an_event",
            format!(
                "INSERT INTO windows SELECT agent_id, {eseq}, gpu_uuid, start_ms + 86400000, end_ms + 86400000, interval_ms,
                   expected_samples, good_samples, util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes,
                   energy_mj, energy_estimated, power_avg_w, temperature_max_c, throttle_reasons, health, unavailable_ms,
                   assignment_status, grant_id, principal, active_ms, occupied_ms, foreign_ms, grantee_occupied_ms,
                   unattributed_ms, energy_estimated_mj
                 FROM windows WHERE agent_id='int-a' AND seq={wseq}"
            ),
            "int-a", "derived_orphan", eseq,
        ),
        (
            "event_edited",
            format!("UPDATE events SET kind = 'gpu_lost' WHERE agent_id='int-a' AND seq={eseq}"),
            "int-a", "derived_mismatch", eseq,
        ),
        (
            "hidden_by_a_flag",
            format!("INSERT INTO window_flags VALUES ('int-a', {wseq}, 'impossible', NULL, NULL, 'forged')"),
            "int-a", "derived_orphan", wseq,
        ),
        (
            "hidden_by_an_overlap_flag",
            format!("INSERT INTO window_flags VALUES ('int-a', {wseq}, 'overlap', 'int-b', 1, 'forged')"),
            "int-a", "overlap_unfounded", wseq,
        ),
        (
            "unknown_agent",
            format!(
                "INSERT INTO windows SELECT 'ghost', seq, gpu_uuid, start_ms + 86400000, end_ms + 86400000, interval_ms,
                   expected_samples, good_samples, util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes,
                   energy_mj, energy_estimated, power_avg_w, temperature_max_c, throttle_reasons, health, unavailable_ms,
                   assignment_status, grant_id, principal, active_ms, occupied_ms, foreign_ms, grantee_occupied_ms,
                   unattributed_ms, energy_estimated_mj
                 FROM windows WHERE agent_id='int-a' AND seq={wseq}"
            ),
            "ghost", "derived_orphan", wseq,
        ),
    ];
    for (name, sql, agent, kind, seq) in cases {
        let tampered = copy(&db, dir.path(), name, |c| {
            assert!(
                gpumeter_e2e::rows_changed(c, &sql, []).unwrap() > 0,
                "{name}: {sql}"
            );
        });
        let (code, findings, _, v) = verify_db(&tampered, None);
        assert_eq!(code, Some(1), "{name}: {v}");
        let hit = findings
            .iter()
            .any(|(a, k, s)| a == agent && k == kind && (seq == 0 || *s == seq as u64));
        assert!(hit, "{name}: want ({agent}, {kind}, {seq}) in {findings:?}");
    }
    // The text form names the agent, the record and the kind.
    let t = copy(&db, dir.path(), "text", |c| {
        c.execute(
            &format!(
                "UPDATE windows SET active_ms = active_ms + 1 WHERE agent_id='int-a' AND seq={wseq}"
            ),
            [],
        )
        .unwrap();
    });
    let (code, out, _) = run(&["verify", "--db", t.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        out.contains("int-a:")
            && out.contains(&format!(
                "record {wseq}: its windows row differs from its signed body [derived_mismatch]"
            )),
        "{out}"
    );
    collector.stop().await.unwrap();
}

/// Re-hashes an agent's chain from `from` on after `edit` changed bodies, re-signing every
/// checkpoint with `key` and pinning it in place of the agent's own (an operator with the
/// database and a key of their own rewriting history).
fn rewrite_under_new_key(c: &rusqlite::Connection, agent: &str, key: &SigningKey) {
    let seqs: Vec<i64> = c
        .prepare("SELECT seq FROM records WHERE agent_id = ?1 ORDER BY seq")
        .unwrap()
        .query_map([agent], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let rows: Vec<(i64, Vec<u8>)> = seqs
        .into_iter()
        .map(|seq| (seq, gpumeter_e2e::record_body(c, agent, seq as u64)))
        .collect();
    let mut head: Hash = GENESIS;
    for (seq, body) in rows {
        let h = chain::record_hash(&head, seq as u64, &body);
        c.execute(
            "UPDATE records SET prev_hash = ?1, hash = ?2 WHERE agent_id = ?3 AND seq = ?4",
            rusqlite::params![&head[..], &h[..], agent, seq],
        )
        .unwrap();
        let epoch: Option<i64> = c
            .query_row(
                "SELECT epoch FROM checkpoints WHERE agent_id = ?1 AND seq = ?2",
                rusqlite::params![agent, seq],
                |r| r.get(0),
            )
            .ok();
        if let Some(epoch) = epoch {
            let sig = chain::sign_checkpoint(key, agent, epoch as u64, seq as u64, &h);
            c.execute(
                "UPDATE checkpoints SET chain_hash = ?1, signature = ?2 WHERE agent_id = ?3 AND seq = ?4",
                rusqlite::params![&h[..], &sig[..], agent, seq],
            )
            .unwrap();
        }
        head = h;
    }
    let pk = key.verifying_key().to_bytes().to_vec();
    c.execute(
        "UPDATE agents SET public_key = ?1 WHERE agent_id = ?2",
        rusqlite::params![pk, agent],
    )
    .unwrap();
    c.execute(
        "UPDATE agent_keys SET public_key = ?1 WHERE agent_id = ?2",
        rusqlite::params![pk, agent],
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_heads_catch_a_deleted_agent_a_cut_chain_and_a_rewrite_under_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let collector = build_ledger(dir.path()).await;
    let db = dir.path().join("ledger.db");
    let heads = dir.path().join("heads.jsonl");
    let (code, out, err) = run(&[
        "heads",
        "--server",
        &collector.url,
        "--out",
        heads.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("1 new heads appended"), "{out}");
    // Append-only: a second fetch adds only heads newer than the file's last.
    let (code, out, err) = run(&[
        "heads",
        "--server",
        &collector.url,
        "--out",
        heads.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    // Nothing was committed in between, so the latest head still states the ledger.
    assert!(
        out.contains("0 new heads appended") && out.contains("head 1 over 2 agents"),
        "{out}"
    );
    let lines = std::fs::read_to_string(&heads).unwrap();
    assert_eq!(lines.lines().count(), 1);
    // The live collector and a clean copy extend every head.
    let (code, out, err) = run(&[
        "verify",
        "--server",
        &collector.url,
        "--heads",
        heads.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, f, h, _) = verify_db(&copy(&db, dir.path(), "clean", |_| {}), Some(&heads));
    assert_eq!((code, f, h), (Some(0), vec![], vec![]));

    let conn = rusqlite::Connection::open(&db).unwrap();
    let cut_at = one(
        &conn,
        "SELECT seq FROM checkpoints WHERE agent_id='int-b' ORDER BY seq LIMIT 1 OFFSET 3",
    );
    let last_b = one(
        &conn,
        "SELECT MAX(seq) FROM checkpoints WHERE agent_id='int-b'",
    );
    let last_a = one(
        &conn,
        "SELECT MAX(seq) FROM checkpoints WHERE agent_id='int-a'",
    );
    let tables = [
        "records",
        "checkpoints",
        "windows",
        "window_principals",
        "events",
        "window_flags",
    ];
    type Tamper = Box<dyn Fn(&rusqlite::Connection)>;
    let cases: Vec<(&str, Tamper, &str, &str, i64)> = vec![
        (
            "agent_deleted",
            Box::new(move |c| {
                for t in tables.iter().chain(&["agent_keys", "agents", "alarms"]) {
                    c.execute(&format!("DELETE FROM {t} WHERE agent_id = 'int-b'"), [])
                        .unwrap();
                }
            }),
            "int-b",
            "agent_missing",
            last_b,
        ),
        (
            "chain_cut",
            Box::new(move |c| {
                for t in tables {
                    c.execute(
                        &format!("DELETE FROM {t} WHERE agent_id = 'int-b' AND seq > {cut_at}"),
                        [],
                    )
                    .unwrap();
                }
            }),
            "int-b",
            "chain_cut",
            last_b,
        ),
        (
            "rewritten_new_key",
            Box::new(|c| {
                // One window's energy rewritten, derived row included, then everything
                // re-hashed and re-signed under a key the operator holds.
                let seq: i64 = c
                    .query_row(
                        "SELECT r.seq FROM records r JOIN windows w ON w.agent_id = r.agent_id AND w.seq = r.seq
                         WHERE r.agent_id = 'int-a' AND w.energy_mj > 1000 ORDER BY r.seq LIMIT 1",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                let body = gpumeter_e2e::record_body(c, "int-a", seq as u64);
                let mut b = v1::RecordBody::decode(body.as_slice()).unwrap();
                let Some(v1::record_body::Kind::CardWindow(w)) = b.kind.as_mut() else {
                    panic!("not a window")
                };
                let e = w.energy_mj.unwrap() - 1000;
                w.energy_mj = Some(e);
                c.execute(
                    "UPDATE records SET body = ?1 WHERE agent_id = 'int-a' AND seq = ?2",
                    rusqlite::params![b.encode_to_vec(), seq],
                )
                .unwrap();
                c.execute(
                    "UPDATE windows SET energy_mj = ?1 WHERE agent_id = 'int-a' AND seq = ?2",
                    rusqlite::params![e as i64, seq],
                )
                .unwrap();
                rewrite_under_new_key(c, "int-a", &SigningKey::from_bytes(&[42; 32]));
            }),
            "int-a",
            "chain_rewritten",
            last_a,
        ),
    ];
    for (name, edit, agent, kind, seq) in cases {
        // A thorough tamperer derives the rollups again from what it left.
        let tampered = copy(&db, dir.path(), name, |c| {
            edit(c);
            c.execute_batch("DELETE FROM card_hours; DELETE FROM card_days;")
                .unwrap();
            gpumeter_collector::store::sqlite_rollup::backfill(c).unwrap();
        });
        // The ledger alone cannot tell...
        let (code, f, _, v) = verify_db(&tampered, None);
        assert_eq!((code, f), (Some(0), vec![]), "{name}: {v}");
        // ...an older head can.
        let (code, _, h, v) = verify_db(&tampered, Some(&heads));
        assert_eq!(code, Some(1), "{name}: {v}");
        assert!(
            h.iter()
                .any(|(a, k, s)| a == agent && k == kind && *s == seq as u64),
            "{name}: want ({agent}, {kind}, {seq}) in {h:?}"
        );
    }
    // A head under another collector key is refused by the heads file.
    let forged = copy(&db, dir.path(), "forged_heads", |c| {
        let other = SigningKey::from_bytes(&[9; 32]);
        let leaves = gpumeter_collector::heads::current_leaves(c).unwrap();
        let root = gpumeter_collector::heads::merkle_root(&leaves);
        let msg = gpumeter_collector::heads::head_message(99, 1, leaves.len() as u64, &root);
        use ed25519_dalek::Signer;
        let sig = other.sign(&msg).to_bytes();
        c.execute(
            "INSERT INTO heads VALUES (99, 1, ?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![
                leaves.len() as i64,
                &root[..],
                serde_json::to_vec(&leaves).unwrap(),
                other.verifying_key().to_bytes().to_vec(),
                &sig[..]
            ],
        )
        .unwrap();
    });
    let (code, out, err) = run(&[
        "heads",
        "--db",
        forged.to_str().unwrap(),
        "--out",
        heads.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("refusing to append"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&heads).unwrap(),
        lines,
        "nothing appended"
    );
    collector.stop().await.unwrap();
}

/// An agent talking raw gRPC: hand-made, signed records.
struct RawAgent {
    id: String,
    key: SigningKey,
    seq: u64,
    head: Hash,
    tx: tokio::sync::mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::CollectorMessage>,
}

fn gpu(uuid: &str, serial: &str, memory: u64) -> v1::GpuInfo {
    v1::GpuInfo {
        uuid: uuid.into(),
        name: "NVIDIA H100 80GB HBM3".into(),
        serial: serial.into(),
        pci_bus_id: "00000000:17:00.0".into(),
        memory_total_bytes: Some(memory),
        ..Default::default()
    }
}

impl RawAgent {
    async fn connect(
        url: &str,
        id: &str,
        key: SigningKey,
        gpus: Vec<v1::GpuInfo>,
        acked: u64,
    ) -> Self {
        let mut c = gpumeter_e2e::ingest_at(url, id).await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(v1::AgentMessage {
            kind: Some(v1::agent_message::Kind::Hello(v1::Hello {
                protocol_version: 1,
                agent_id: id.into(),
                host_id: id.into(),
                csp: "kt".into(),
                public_key: key.verifying_key().to_bytes().to_vec(),
                epoch: 1,
                next_seq: 1,
                gpus,
                acked_seq: acked,
                acked_hash: if acked > 0 { vec![7; 32] } else { vec![] },
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut inbound = c
            .session(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let Some(v1::CollectorMessage {
            kind: Some(v1::collector_message::Kind::Welcome(w)),
        }) = inbound.message().await.unwrap()
        else {
            panic!("no welcome")
        };
        RawAgent {
            id: id.into(),
            key,
            seq: w.durable_seq,
            head: w.durable_hash.as_slice().try_into().unwrap_or(GENESIS),
            tx,
            inbound,
        }
    }

    /// Sends the bodies as one signed batch and waits for its ack.
    async fn send(&mut self, bodies: Vec<v1::RecordBody>) {
        let mut records = Vec::new();
        for b in bodies {
            self.seq += 1;
            let body = b.encode_to_vec();
            let prev = self.head;
            self.head = chain::record_hash(&prev, self.seq, &body);
            records.push(v1::Record {
                seq: self.seq,
                prev_hash: prev.to_vec(),
                body,
            });
        }
        let sig = chain::sign_checkpoint(&self.key, &self.id, 1, self.seq, &self.head);
        self.tx
            .send(v1::AgentMessage {
                kind: Some(v1::agent_message::Kind::Batch(v1::RecordBatch {
                    records,
                    checkpoint: Some(v1::Checkpoint {
                        agent_id: self.id.clone(),
                        epoch: 1,
                        seq: self.seq,
                        chain_hash: self.head.to_vec(),
                        signature: sig.to_vec(),
                    }),
                })),
            })
            .await
            .unwrap();
        loop {
            match self.inbound.message().await.unwrap() {
                Some(v1::CollectorMessage {
                    kind: Some(v1::collector_message::Kind::Ack(a)),
                }) => {
                    if a.durable_seq >= self.seq {
                        return;
                    }
                }
                Some(_) => {}
                None => panic!("session closed"),
            }
        }
    }
}

/// 2026-04-10T00:00:00+09:00.
const DAY0: i64 = 1_775_746_800_000;

fn window(gpu: &str, minute: i64, good: u32, energy_mj: u64) -> v1::RecordBody {
    let start = DAY0 + minute * 60_000;
    v1::RecordBody {
        created_unix_ms: start + 60_000,
        kind: Some(v1::record_body::Kind::CardWindow(v1::CardWindow {
            gpu_uuid: gpu.into(),
            window_start_unix_ms: start,
            window_end_unix_ms: start + 60_000,
            sample_interval_ms: 1_000,
            expected_samples: 60,
            good_samples: good,
            util_avg_pct: Some(50.0),
            memory_total_bytes: Some(80 << 30),
            energy_mj: Some(energy_mj),
            health: v1::Health::Ok as i32,
            assignment: Some(v1::AppliedAssignment {
                status: v1::AssignmentStatus::Assigned as i32,
                grant_id: "G-INT".into(),
                principal: "user:alice".into(),
                assignment_version: 1,
            }),
            ..Default::default()
        })),
    }
}

async fn usage(url: &str, gpu: &str) -> v1::CardUsage {
    let mut q = gpumeter_e2e::query_at(url).await;
    let u = q
        .usage(v1::UsageRequest {
            from_unix_ms: DAY0 - 86_400_000,
            until_unix_ms: DAY0 + 86_400_000,
            host_id: String::new(),
            gpu_uuid: gpu.into(),
        })
        .await
        .unwrap()
        .into_inner();
    u.cards.into_iter().next().unwrap_or_default()
}

async fn alarms(url: &str, kind: &str) -> Vec<v1::Alarm> {
    let mut q = gpumeter_e2e::query_at(url).await;
    q.alarms(v1::AlarmsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .alarms
        .into_iter()
        .filter(|a| a.kind == kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_windows_are_kept_flagged_and_out_of_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("l.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let mut a = RawAgent::connect(
        &collector.url,
        "liar",
        SigningKey::from_bytes(&[3; 32]),
        vec![gpu(CARD, "S1", 80 << 30)],
        0,
    )
    .await;
    // Three one-minute windows: one claims u32::MAX good samples (4,294,967,295,000 ms), two
    // claim energy that sums past u64 (9.22e18 mJ each would wrap the sum).
    a.send(vec![
        window(CARD, 0, u32::MAX, 1_000),
        window(CARD, 1, 60, 9_223_372_036_854_775_000),
        window(CARD, 2, 60, 9_223_372_036_854_775_000),
        window(CARD, 3, 60, 42_000_000),
    ])
    .await;
    let u = usage(&collector.url, CARD).await;
    assert_eq!(
        (u.windows, u.metered_ms, u.energy_mj),
        (1, 60_000, 42_000_000),
        "{u:?}"
    );
    let flagged = alarms(&collector.url, "impossible_window").await;
    assert_eq!(
        flagged.iter().map(|a| a.seq.unwrap()).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(
        flagged[0].detail.contains("good samples"),
        "{}",
        flagged[0].detail
    );
    assert!(
        flagged[1].detail.contains("energy"),
        "{}",
        flagged[1].detail
    );
    collector.stop().await.unwrap();
    // Kept as evidence, verified, and listed.
    let conn = rusqlite::Connection::open(&db).unwrap();
    assert_eq!(
        one(&conn, "SELECT COUNT(*) FROM records WHERE agent_id='liar'"),
        4
    );
    let (code, f, _, v) = verify_db(&copy(&db, dir.path(), "c", |_| {}), None);
    assert_eq!((code, f), (Some(0), vec![]), "{v}");
    let listed: Vec<u64> = v["agents"][0]["flagged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, [1, 2, 3]);
    // Removing a flag brings no impossible window back unnoticed.
    let t = copy(&db, dir.path(), "unflagged", |c| {
        c.execute(
            "DELETE FROM window_flags WHERE agent_id='liar' AND seq=2",
            [],
        )
        .unwrap();
    });
    let (code, f, _, _) = verify_db(&t, None);
    assert_eq!(code, Some(1));
    assert!(
        f.contains(&("liar".into(), "derived_missing".into(), 2)),
        "{f:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_re_sent_under_new_seqs_to_cover_a_gap_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("g.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let csv = dir.path().join("grants.csv");
    std::fs::write(
        &csv,
        format!(
            "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
             G-INT,hpc,Acme,user:alice,kt,csp-host,{CARD},2026-04-01,2026-04-30\n"
        ),
    )
    .unwrap();
    let (code, out, err) = run(&[
        "grants",
        "import",
        csv.to_str().unwrap(),
        "--server",
        &collector.url,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut a = RawAgent::connect(
        &collector.url,
        "csp-host",
        SigningKey::from_bytes(&[4; 32]),
        vec![gpu(CARD, "S1", 80 << 30)],
        0,
    )
    .await;
    // Minutes 0..10 metered, 10..20 an outage, then minutes 0..10 sent again under new seqs.
    a.send((0..10).map(|m| window(CARD, m, 60, 6_000_000)).collect())
        .await;
    a.send((0..10).map(|m| window(CARD, m, 60, 6_000_000)).collect())
        .await;
    // And another agent claiming the same card's minute 5.
    let mut b = RawAgent::connect(
        &collector.url,
        "other-host",
        SigningKey::from_bytes(&[5; 32]),
        vec![],
        0,
    )
    .await;
    b.send(vec![window(CARD, 5, 60, 6_000_000)]).await;

    let u = usage(&collector.url, CARD).await;
    assert_eq!((u.metered_ms, u.energy_mj), (600_000, 60_000_000), "{u:?}");
    let mut q = gpumeter_e2e::query_at(&collector.url).await;
    let r = q
        .reconcile(v1::ReconcileRequest {
            period: "2026-04-10T00:00:00+09:00..2026-04-10T00:20:00+09:00".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let f = r.total.unwrap();
    assert_eq!(
        (f.allocated_ms, f.unmetered_ms, f.delivered_ms, f.energy_mj),
        (1_200_000, 600_000, 600_000, 60_000_000),
        "{f:?}"
    );
    let overlaps = alarms(&collector.url, "card_time_overlap").await;
    assert_eq!(overlaps.len(), 11, "{overlaps:?}");
    assert!(
        overlaps[0].detail.contains("csp-host seq 11")
            && overlaps[0].detail.contains("csp-host seq 1 "),
        "{}",
        overlaps[0].detail
    );
    assert!(
        overlaps[10].detail.contains("other-host seq 1")
            && overlaps[10].detail.contains("csp-host seq 6"),
        "{}",
        overlaps[10].detail
    );

    // Reports name their head and carry a content hash; a signed one verifies against the
    // ledger, and one digit edited is refused.
    let period = "2026-04-10T00:00:00+09:00..2026-04-10T00:20:00+09:00";
    let signed = dir.path().join("report.json");
    let (code, out, err) = run(&[
        "report",
        "--period",
        period,
        "--format",
        "json",
        "--sign",
        "--server",
        &collector.url,
        "--out",
        signed.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let text = std::fs::read_to_string(&signed).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["provenance"]["head_id"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(v["provenance"]["signature"].as_str().unwrap().len(), 128);
    let (code, out, err) = run(&[
        "verify-report",
        signed.to_str().unwrap(),
        "--server",
        &collector.url,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("matches the ledger as of head") && out.contains("signed by collector key"),
        "{out}"
    );
    let edited = dir.path().join("edited.json");
    assert!(text.contains("\"delivered_ms\": 600000"), "{text}");
    std::fs::write(
        &edited,
        text.replacen("\"delivered_ms\": 600000", "\"delivered_ms\": 600001", 1),
    )
    .unwrap();
    let (code, out, err) = run(&[
        "verify-report",
        edited.to_str().unwrap(),
        "--server",
        &collector.url,
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("REFUSED") && err.contains("edited"), "{err}");
    // Re-signed by a key of the forger's own, the file checks against itself, but not against
    // the key that signed the head it names.
    let forged = dir.path().join("forged.json");
    {
        use gpumeter_collector::provenance::{embed, extract};
        let (content, mut p) = extract(&text).unwrap();
        let forger = SigningKey::from_bytes(&[77; 32]);
        let sig = ed25519_dalek::Signer::sign(&forger, &p.signed_message());
        p.signature = hex::encode(sig.to_bytes());
        p.collector_key = hex::encode(forger.verifying_key().to_bytes());
        assert_eq!(p.verify_signature(), Ok(true));
        std::fs::write(&forged, embed(&content, &p)).unwrap();
    }
    let (code, out, err) = run(&[
        "verify-report",
        forged.to_str().unwrap(),
        "--server",
        &collector.url,
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("REFUSED") && err.contains("was signed by the collector's key"),
        "{err}"
    );
    // An auditor's heads file pins the head: the report's head is in it after `heads`, and a
    // file from before that head refuses it.
    let early = dir.path().join("early-heads.jsonl");
    std::fs::write(&early, "").unwrap();
    let witness = dir.path().join("heads.jsonl");
    let (code, out, err) = run(&[
        "heads",
        "--out",
        witness.to_str().unwrap(),
        "--server",
        &collector.url,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let with_heads = |heads: &Path| {
        run(&[
            "verify-report",
            signed.to_str().unwrap(),
            "--server",
            &collector.url,
            "--heads",
            heads.to_str().unwrap(),
        ])
    };
    let (code, out, err) = with_heads(&witness);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = with_heads(&early);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("is not in the heads file"), "{err}");
    // Every format carries it; a table checks against a copy of the database too.
    for format in ["table", "csv", "focus", "html"] {
        let f = dir.path().join(format!("report.{format}"));
        let (code, out, err) = run(&[
            "report",
            "--period",
            period,
            "--format",
            format,
            "--server",
            &collector.url,
            "--out",
            f.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(0), "{format}: {out}{err}");
        let (code, out, err) = run(&[
            "verify-report",
            f.to_str().unwrap(),
            "--server",
            &collector.url,
        ]);
        assert_eq!(code, Some(0), "{format}: {out}{err}");
    }
    let table = dir.path().join("report.table");
    collector.stop().await.unwrap();
    let (code, out, err) = run(&[
        "verify-report",
        table.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = run(&[
        "verify-report",
        forged.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("was signed by the collector's key"), "{err}");
    // On a ledger whose overlap flags were dropped, the same report no longer comes out.
    let unflagged = copy(&db, dir.path(), "unflagged", |c| {
        c.execute("DELETE FROM window_flags", []).unwrap();
    });
    let (code, out, err) = run(&[
        "verify-report",
        table.to_str().unwrap(),
        "--db",
        unflagged.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("does NOT match"), "{err}");
    let (code, f, _, v) = verify_db(&copy(&db, dir.path(), "c", |_| {}), None);
    assert_eq!((code, f), (Some(0), vec![]), "{v}");
    // Dropping an overlap flag makes two windows count for one instant: verify names both.
    let t = copy(&db, dir.path(), "double", |c| {
        c.execute(
            "DELETE FROM window_flags WHERE agent_id='csp-host' AND seq=13",
            [],
        )
        .unwrap();
    });
    let (code, f, _, _) = verify_db(&t, None);
    assert_eq!(code, Some(1));
    assert!(
        f.iter()
            .any(|(a, k, _)| a == "csp-host" && k == "overlap_counted"),
        "{f:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_registered_key_keeps_earlier_checkpoints_verifying() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("k.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let k1 = SigningKey::from_bytes(&[11; 32]);
    let k2 = SigningKey::from_bytes(&[12; 32]);
    let mut a = RawAgent::connect(&collector.url, "reinstalled", k1, vec![], 0).await;
    a.send((0..5).map(|m| window(CARD, m, 60, 1_000)).collect())
        .await;
    a.send((5..8).map(|m| window(CARD, m, 60, 1_000)).collect())
        .await;
    let (seq, head) = (a.seq, a.head);
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, out, err) = run(&[
        "agents",
        "register",
        "reinstalled",
        "--reason",
        "disk replaced",
        "--actor",
        "ops-kim",
        "--server",
        &collector.url,
        "--key",
        &hex::encode(k2.verifying_key().to_bytes()),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut a = RawAgent::connect(&collector.url, "reinstalled", k2, vec![], 0).await;
    assert_eq!((a.seq, a.head), (seq, head));
    a.send((8..12).map(|m| window(CARD, m, 60, 1_000)).collect())
        .await;
    drop(a);
    collector.stop().await.unwrap();
    let (code, f, _, v) = verify_db(&copy(&db, dir.path(), "c", |_| {}), None);
    assert_eq!((code, f), (Some(0), vec![]), "{v}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let history: Vec<(i64, String, String)> = conn
        .prepare("SELECT from_seq, actor, reason FROM agent_keys WHERE agent_id='reinstalled' ORDER BY idx")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        history,
        [
            (1, "first use".into(), String::new()),
            // The admin who re-registered it: the token's name.
            (9, "test-admin".into(), "disk replaced".into())
        ]
    );
    // A key history edited after a head was signed is caught by the head.
    let heads = dir.path().join("h.jsonl");
    let collector = TestCollector::start(&db).await.unwrap();
    let (code, out, err) = run(&[
        "heads",
        "--server",
        &collector.url,
        "--out",
        heads.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    collector.stop().await.unwrap();
    let t = copy(&db, dir.path(), "keys", |c| {
        c.execute(
            "UPDATE agent_keys SET actor = 'nobody' WHERE agent_id='reinstalled' AND idx = 1",
            [],
        )
        .unwrap();
    });
    let (code, _, h, _) = verify_db(&t, Some(&heads));
    assert_eq!(code, Some(1));
    assert!(
        h.iter()
            .any(|(a, k, _)| a == "reinstalled" && k == "keys_rewritten"),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_behind_an_agent_and_a_changed_card_raise_alarms() {
    let dir = tempfile::tempdir().unwrap();
    let collector = TestCollector::start(&dir.path().join("a.db"))
        .await
        .unwrap();
    let key = SigningKey::from_bytes(&[21; 32]);
    let a = RawAgent::connect(
        &collector.url,
        "swapper",
        key.clone(),
        vec![gpu(CARD, "S-ORIG", 80 << 30)],
        0,
    )
    .await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Same UUID, another serial and less memory; and the agent says it was acked through 50.
    let mut cheaper = gpu(CARD, "S-OTHER", 40 << 30);
    cheaper.name = "NVIDIA A100 40GB".into();
    let a = RawAgent::connect(&collector.url, "swapper", key, vec![cheaper], 50).await;
    drop(a);
    let changed = alarms(&collector.url, "card_changed").await;
    assert_eq!(changed.len(), 1, "{changed:?}");
    let d = &changed[0].detail;
    assert!(
        d.contains(CARD) && d.contains("S-ORIG") && d.contains("S-OTHER") && d.contains("A100"),
        "{d}"
    );
    let behind = alarms(&collector.url, "ledger_behind_agent").await;
    assert_eq!((behind.len(), behind[0].seq), (1, Some(50)), "{behind:?}");

    // A grant naming the model each card must be: a card already seen as another model, and
    // one first seen as another model after the grant, both raise an alarm.
    let csv = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        csv.path(),
        format!(
            "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until,gpu_model\n\
             G-M,hpc,Acme,user:a,kt,swapper,{CARD},2026-04-01,2026-04-30,H200\n\
             G-M,hpc,Acme,user:a,kt,swapper,GPU-0000000d-0000-4000-8000-0000000000f1,2026-04-01,2026-04-30,H100 80GB\n"
        ),
    )
    .unwrap();
    let (code, out, err) = run(&[
        "grants",
        "import",
        csv.path().to_str().unwrap(),
        "--server",
        &collector.url,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let a = RawAgent::connect(
        &collector.url,
        "swapper",
        SigningKey::from_bytes(&[21; 32]),
        vec![v1::GpuInfo {
            name: "NVIDIA A100 40GB".into(),
            ..gpu("GPU-0000000d-0000-4000-8000-0000000000f1", "S-3", 40 << 30)
        }],
        0,
    )
    .await;
    drop(a);
    let mut models: Vec<String> = alarms(&collector.url, "card_model_mismatch")
        .await
        .into_iter()
        .map(|a| a.detail)
        .collect();
    models.sort();
    assert_eq!(models.len(), 2, "{models:?}");
    assert!(
        models[0].contains(CARD) && models[0].contains("\"H200\""),
        "{models:?}"
    );
    assert!(
        models[1].contains("0000000000f1") && models[1].contains("\"H100 80GB\""),
        "{models:?}"
    );

    // The report shows each of them on the grant's cards, in every format; a report of
    // another program has no such card and shows none.
    let report = |format: &str, program: Option<&str>| {
        let mut args = vec!["report", "--period", "2026-04", "--format", format];
        if let Some(p) = program {
            args.extend(["--program", p]);
        }
        args.extend(["--server", &collector.url]);
        let (code, out, err) = run(&args);
        assert_eq!(code, Some(0), "{format}: {out}{err}");
        out
    };
    let json = report("json", None);
    let v: Value = serde_json::from_str(&json).unwrap();
    let shown: Vec<(String, String, Vec<Value>)> = v["card_alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["kind"].as_str().unwrap().to_owned(),
                a["gpu_uuid"].as_str().unwrap().to_owned(),
                a["grant_ids"].as_array().unwrap().clone(),
            )
        })
        .collect();
    let mut kinds: Vec<(&str, &str)> = shown
        .iter()
        .map(|(k, g, _)| (k.as_str(), g.as_str()))
        .collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        vec![
            ("card_changed", CARD),
            ("card_model_mismatch", CARD),
            (
                "card_model_mismatch",
                "GPU-0000000d-0000-4000-8000-0000000000f1"
            ),
        ],
        "{json}"
    );
    assert!(
        shown.iter().all(|(_, _, g)| g == &vec![Value::from("G-M")]),
        "{shown:?}"
    );
    let table = report("table", None);
    assert!(
        table.contains("Card identity alarms") && table.contains("card_changed  swapper"),
        "{table}"
    );
    let csv = report("csv", None);
    let total = csv.lines().find(|l| l.starts_with("total,")).unwrap();
    // Found by name: columns are added at the end of the CSV as reports grow.
    let header = csv.lines().next().unwrap().trim_start_matches('\u{feff}');
    let col = header
        .split(',')
        .position(|h| h == "card_identity_alarms")
        .unwrap();
    assert_eq!(total.split(',').nth(col), Some("3"), "{total}");
    let html = report("html", None);
    assert!(
        html.contains("id=\"card-identity\"") && html.contains("S-OTHER"),
        "card-identity section missing"
    );
    let other = report("json", Some("research"));
    let v: Value = serde_json::from_str(&other).unwrap();
    assert_eq!(
        v["card_alarms"].as_array().map(Vec::len),
        Some(0),
        "{other}"
    );
    collector.stop().await.unwrap();
}

/// One random edit of a ledger file.
#[derive(Debug, Clone)]
enum Edit {
    /// Flip one bit of one record body.
    BodyBit { pick: usize, byte: usize, bit: u8 },
    /// Flip one bit of one compressed body block, as it lies on disk.
    BlockBit { pick: usize, byte: usize, bit: u8 },
    /// Add to one column of one derived row.
    Column {
        table: &'static str,
        column: &'static str,
        pick: usize,
        delta: i64,
    },
    /// Delete one row.
    Delete { table: &'static str, pick: usize },
    /// Copy a windows row to a seq with no window record (past the tip, or an event's).
    InsertWindow { pick: usize, onto_event: bool },
    /// Add a principal to one window.
    InsertPrincipal { pick: usize },
}

fn edits() -> impl proptest::strategy::Strategy<Value = Edit> {
    use proptest::prelude::*;
    let window_cols = prop::sample::select(vec![
        "occupied_ms",
        "active_ms",
        "foreign_ms",
        "energy_mj",
        "good_samples",
        "unavailable_ms",
        "util_avg_pct",
        "start_ms",
        "memory_used_max_bytes",
        "grantee_occupied_ms",
    ]);
    let principal_cols = prop::sample::select(vec![
        "occupied_ms",
        "active_ms",
        "memory_max_bytes",
        "process_count",
    ]);
    prop_oneof![
        (any::<usize>(), any::<usize>(), 0u8..8).prop_map(|(pick, byte, bit)| Edit::BlockBit {
            pick,
            byte,
            bit
        }),
        (any::<usize>(), any::<usize>(), 0u8..8).prop_map(|(pick, byte, bit)| Edit::BodyBit {
            pick,
            byte,
            bit
        }),
        (window_cols, any::<usize>(), 1i64..1_000_000).prop_map(|(column, pick, delta)| {
            Edit::Column {
                table: "windows",
                column,
                pick,
                delta,
            }
        }),
        (principal_cols, any::<usize>(), 1i64..1_000_000).prop_map(|(column, pick, delta)| {
            Edit::Column {
                table: "window_principals",
                column,
                pick,
                delta,
            }
        }),
        (any::<usize>(), 1i64..100).prop_map(|(pick, delta)| Edit::Column {
            table: "events",
            column: "code",
            pick,
            delta,
        }),
        (
            prop::sample::select(vec!["records", "windows", "window_principals", "events"]),
            any::<usize>()
        )
            .prop_map(|(table, pick)| Edit::Delete { table, pick }),
        (any::<usize>(), any::<bool>())
            .prop_map(|(pick, onto_event)| Edit::InsertWindow { pick, onto_event }),
        any::<usize>().prop_map(|pick| Edit::InsertPrincipal { pick }),
    ]
}

/// The (agent_id, seq) of row `pick` (modulo the row count) of a table.
fn row_of(c: &rusqlite::Connection, table: &str, pick: usize) -> (String, i64) {
    let n = one(c, &format!("SELECT COUNT(*) FROM {table}")) as usize;
    c.query_row(
        &format!("SELECT agent_id, seq FROM {table} ORDER BY agent_id, seq LIMIT 1 OFFSET ?1"),
        [(pick % n) as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

const WINDOW_COLUMNS: &str = "gpu_uuid, start_ms, end_ms, interval_ms, expected_samples, good_samples,
    util_avg_pct, util_max_pct, mem_util_avg_pct, memory_used_max_bytes, energy_mj, energy_estimated,
    power_avg_w, temperature_max_c, throttle_reasons, health, unavailable_ms, assignment_status, grant_id,
    principal, active_ms, occupied_ms, foreign_ms, grantee_occupied_ms, unattributed_ms, energy_estimated_mj";

/// Applies an edit; returns the agent whose rows it touched.
fn apply(c: &rusqlite::Connection, e: &Edit) -> String {
    match e {
        Edit::BlockBit { pick, byte, bit } => {
            let n = one(c, "SELECT COUNT(*) FROM record_blocks") as usize;
            let (id, agent, mut data): (i64, String, Vec<u8>) = c
                .query_row(
                    "SELECT id, agent_id, data FROM record_blocks ORDER BY id LIMIT 1 OFFSET ?1",
                    [(pick % n) as i64],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            let i = byte % data.len();
            data[i] ^= 1 << bit;
            c.execute(
                "UPDATE record_blocks SET data = ?1 WHERE id = ?2",
                rusqlite::params![data, id],
            )
            .unwrap();
            agent
        }
        Edit::BodyBit { pick, byte, bit } => {
            let (agent, seq) = row_of(c, "records", *pick);
            let mut body = gpumeter_e2e::record_body(c, &agent, seq as u64);
            let i = byte % body.len();
            body[i] ^= 1 << bit;
            c.execute(
                "UPDATE records SET body = ?1 WHERE agent_id = ?2 AND seq = ?3",
                rusqlite::params![body, agent, seq],
            )
            .unwrap();
            agent
        }
        Edit::Column {
            table,
            column,
            pick,
            delta,
        } => {
            let (agent, seq) = row_of(c, table, *pick);
            let n = c
                .execute(
                    &format!(
                        "UPDATE {table} SET {column} = COALESCE({column}, 0) + ?1 WHERE rowid IN
                         (SELECT rowid FROM {table} WHERE agent_id = ?2 AND seq = ?3 LIMIT 1)"
                    ),
                    rusqlite::params![delta, agent, seq],
                )
                .map(|n| n as u64)
                .or_else(|_| {
                    // events and window_principals have no rowid: they are keyed by (agent_id,
                    // seq), and principals by their name within it too.
                    let one_principal = if *table == "window_principals" {
                        " AND principal = (SELECT MIN(principal) FROM window_principals
                                           WHERE agent_id = ?2 AND seq = ?3)"
                    } else {
                        ""
                    };
                    gpumeter_e2e::rows_changed(
                        c,
                        &format!(
                            "UPDATE {table} SET {column} = COALESCE({column}, 0) + ?1 WHERE agent_id = ?2 AND seq = ?3{one_principal}"
                        ),
                        rusqlite::params![delta, agent, seq],
                    )
                })
                .unwrap();
            assert_eq!(n, 1);
            agent
        }
        Edit::Delete { table, pick } => {
            let (agent, seq) = row_of(c, table, *pick);
            c.execute(
                &format!("DELETE FROM {table} WHERE agent_id = ?1 AND seq = ?2"),
                rusqlite::params![agent, seq],
            )
            .unwrap();
            agent
        }
        Edit::InsertWindow { pick, onto_event } => {
            let (agent, seq) = row_of(c, "windows", *pick);
            let target: i64 = if *onto_event {
                c.query_row(
                    "SELECT seq FROM events WHERE agent_id = ?1 ORDER BY seq LIMIT 1",
                    [&agent],
                    |r| r.get(0),
                )
                .unwrap()
            } else {
                c.query_row(
                    "SELECT MAX(seq) + 1 FROM records WHERE agent_id = ?1",
                    [&agent],
                    |r| r.get(0),
                )
                .unwrap()
            };
            c.execute(
                &format!(
                    "INSERT INTO windows (agent_id, seq, {WINDOW_COLUMNS}) SELECT agent_id, ?3, {WINDOW_COLUMNS}
                     FROM windows WHERE agent_id = ?1 AND seq = ?2"
                ),
                rusqlite::params![agent, seq, target],
            )
            .unwrap();
            agent
        }
        Edit::InsertPrincipal { pick } => {
            let (agent, seq) = row_of(c, "windows", *pick);
            c.execute(
                "INSERT INTO window_principals (agent_id, seq, principal, uid, occupied_ms, active_ms, memory_max_bytes, process_count, matches_grant)
                 VALUES (?1, ?2, 'user:mallory', 6666, 1000, 500, 1, 1, 1)",
                rusqlite::params![agent, seq],
            )
            .unwrap();
            agent
        }
    }
}

/// A ledger built once for the property test (kept for the whole test process).
fn base_ledger() -> &'static Path {
    static BASE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let collector = build_ledger(&dir).await;
            collector.stop().await.unwrap();
        });
        let base = dir.join("base.db");
        rusqlite::Connection::open(dir.join("ledger.db"))
            .unwrap()
            .execute("VACUUM INTO ?1", [base.to_str().unwrap()])
            .unwrap();
        base
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// Any edit of bodies, derived columns, or rows deleted or inserted is found by verify,
    /// at the agent whose rows were touched.
    #[test]
    fn verify_finds_every_random_edit(edit in edits()) {
        let base = base_ledger();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("edited.db");
        std::fs::copy(base, &db).unwrap();
        let agent = apply(&rusqlite::Connection::open(&db).unwrap(), &edit);
        let ledger = gpumeter_collector::store::sqlite_ledger::SqliteLedger::open_read_only(&db).unwrap();
        let report = gpumeter_collector::verify::verify(&ledger).unwrap();
        proptest::prop_assert!(!report.ok, "{edit:?} went unnoticed");
        let a = report.agents.iter().find(|a| a.agent_id == agent).unwrap();
        proptest::prop_assert!(!a.findings.is_empty(), "{edit:?}: nothing at {agent}: {report:?}");
    }
}

/// host-r's two cards over 22:00-01:00 KST across 2026-04-10 and 11: R0 granted to G-R0 from
/// 22:10 (an edge inside an hour), R1 to G-R1 for all of April.
const R0: &str = "GPU-0000000f-0000-4000-8000-000000000000";
const R1: &str = "GPU-0000000f-0000-4000-8000-000000000001";

fn retention_scenario() -> Scenario {
    toml::from_str(&format!(
        r#"
[[cards]]
uuid = "{R0}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 60
processes = [{{ pid = 7, uid = 1001, user = "alice" }}]
[[cards]]
uuid = "{R1}"
idle_power_w = 100
max_power_w = 500
[[cards.phases]]
from_s = 0
util_pct = 40
processes = [{{ pid = 8, uid = 1002, user = "bob" }}]
"#
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_raw_windows_and_every_answer_stays_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let url = collector.url.clone();
    let csv = format!(
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
         G-R0,hpc,Acme,user:alice,kt,host-r,{R0},2026-04-10T22:10:00+09:00,2026-04-30\n\
         G-R1,research,Lab,user:bob,kt,host-r,{R1},2026-04-01,2026-04-30\n"
    );
    let r = gpumeter_e2e::admin_at(&url)
        .await
        .import_grants(v1::ImportGrantsRequest {
            csv,
            actor: "test".into(),
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // A registered provider and host: the report's fleet table reads each card's health at
    // the period's end from its latest window.
    let providers = dir.path().join("providers.csv");
    std::fs::write(
        &providers,
        "csp,name_ko,name_en,committed_hpc,committed_research,committed_advanced\nkt,케이티,KT,1,1,0\n",
    )
    .unwrap();
    for args in [
        vec!["providers", "import", providers.to_str().unwrap()],
        vec!["hosts", "register", "host-r", "--csp", "kt"],
    ] {
        let (code, out, err) = run(&[args.as_slice(), &["--server", &url]].concat());
        assert_eq!(code, Some(0), "{args:?}: {out}{err}");
    }
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-04-10T22:00:00+09:00")
        .unwrap()
        .timestamp_millis();
    let agent = spawn_sim_agent(
        agent_config("host-r", "kt", &url, &dir.path().join("r"), 16),
        retention_scenario(),
        t0,
        t0 + 3 * 3_600_000,
        5_000.0,
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let report = |period: &str| {
        run(&[
            "report", "--period", period, "--format", "json", "--server", &url,
        ])
    };
    // The month, and the two days (the first ends at midnight: the fleet's health is read
    // from the windows of 23:45-24:00).
    let periods = ["2026-04", "2026-04-10", "2026-04-11"];
    let figures_of = |period: &str| {
        let (code, out, err) = report(period);
        assert_eq!(code, Some(0), "{period}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        gpumeter_e2e::without_heads(v)
    };
    let before: Vec<Value> = periods.iter().map(|p| figures_of(p)).collect();
    assert!(
        before[1].to_string().contains("healthy"),
        "the day's report has its fleet table: {}",
        before[1]
    );
    let (code, found, _, _) = verify_db(&db, None);
    assert_eq!((code, found), (Some(0), vec![]));
    let c = rusqlite::Connection::open(&db).unwrap();
    let windows = one(&c, "SELECT COUNT(*) FROM windows");
    assert!(windows >= 350, "{windows} windows");
    // The pinned hours: R0's 22:00-23:00 KST, which G-R0's start cuts, and both cards' last
    // hour of the day.
    let hour = |h: i64| (t0 + h * 3_600_000, t0 + (h + 1) * 3_600_000);
    let pinned_sql = format!(
        "SELECT COUNT(*) FROM windows WHERE (gpu_uuid = '{R0}' AND start_ms >= {} AND start_ms < {})
            OR (start_ms >= {} AND start_ms < {})",
        hour(0).0,
        hour(0).1,
        hour(1).0,
        hour(1).1
    );
    let in_pinned = one(&c, &pinned_sql);
    assert!(in_pinned >= 170, "{in_pinned}");

    // 400 days before 2027-05-20 falls after April 2026: every window is past the horizon.
    let retain = |now: &str, archive: &Path| {
        run(&[
            "retain",
            "--db",
            db.to_str().unwrap(),
            "--now",
            now,
            "--archive",
            archive.to_str().unwrap(),
            "--json",
        ])
    };
    let archive = dir.path().join("2026.archive");
    let (code, out, err) = retain("2027-05-20", &archive);
    assert_eq!(code, Some(0), "{err}");
    let done: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["cuts"].as_array().unwrap().len(), 1, "{done}");
    // The archive holds every record below the cut, each with its checkpoints.
    let cut = done["cuts"][0]["cut"].as_i64().unwrap();
    assert_eq!(done["archive"]["records"].as_i64().unwrap(), cut, "{done}");
    assert_eq!(
        done["archive"]["checkpoints"].as_i64().unwrap(),
        one(
            &c,
            &format!("SELECT COUNT(*) FROM checkpoints WHERE seq <= {cut}")
        )
    );
    assert!(done["pins_added"].as_u64().unwrap() >= 1, "{done}");
    let dropped = done["windows_dropped"].as_i64().unwrap();
    assert_eq!(one(&c, "SELECT COUNT(*) FROM windows"), windows - dropped);
    assert_eq!(
        one(&c, &pinned_sql),
        in_pinned,
        "the pinned hour keeps its windows"
    );
    assert!(
        dropped >= windows - in_pinned - 20,
        "{dropped} of {windows} dropped"
    );
    // Nothing signed is gone.
    assert_eq!(
        one(&c, "SELECT COUNT(*) FROM records"),
        one(&c, "SELECT MAX(seq) FROM records")
    );

    // The same figures, the ledger still verifying.
    for (p, b) in periods.iter().zip(&before) {
        assert_eq!(&figures_of(p), b, "{p}");
    }
    let (code, found, _, _) = verify_db(&db, None);
    assert_eq!((code, found), (Some(0), vec![]));
    let check_archive = |path: &Path| {
        let (code, out, err) = run(&[
            "verify",
            "--json",
            "--db",
            db.to_str().unwrap(),
            "--archive",
            path.to_str().unwrap(),
        ]);
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        (code, v["archives"][0].clone())
    };
    let (code, a) = check_archive(&archive);
    assert_eq!(code, Some(0), "{a}");
    assert_eq!(a["records"].as_i64().unwrap(), cut);
    assert_eq!(a["findings"], serde_json::json!([]));
    // An archive with one body byte changed, or cut short, is caught.
    let text = String::from_utf8(zstd::decode_all(std::fs::File::open(&archive).unwrap()).unwrap())
        .unwrap();
    let edited_body = {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        let i = (2..lines.len())
            .find(|&i| lines[i].contains(r#""kind":"record""#))
            .unwrap();
        let mut rec: Value = serde_json::from_str(&lines[i]).unwrap();
        let body = rec["body"].as_str().unwrap().to_owned();
        let flipped = if body.ends_with('0') { "1" } else { "0" };
        rec["body"] = format!("{}{flipped}", &body[..body.len() - 1]).into();
        lines[i] = rec.to_string();
        (i + 1, lines.join("\n") + "\n")
    };
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        p
    };
    let (code, a) = check_archive(&write("edited.archive", &edited_body.1));
    assert_eq!(code, Some(1), "{a}");
    let found = a["findings"].to_string();
    assert!(
        found.contains(&format!("line {}:", edited_body.0))
            && found.contains("does not match its body")
            && found.contains("end line"),
        "{found}"
    );
    let short: String = text.lines().take(9).map(|l| format!("{l}\n")).collect();
    let (code, a) = check_archive(&write("short.archive", &short));
    assert_eq!(code, Some(1), "{a}");
    assert!(a["findings"].to_string().contains("cut short"), "{a}");

    // A report cutting inside a dropped hour, the jobs view and the card's timeline say why.
    let (code, _, err) = report("2026-04-11T00:30:00+09:00..2026-04-11T02:00:00+09:00");
    assert_ne!(code, Some(0));
    assert!(
        err.contains("dropped by retention") && err.contains("GPU-0000000f"),
        "{err}"
    );
    let (code, _, err) = report("2026-04-10T00:00:00+09:00..2026-04-11T01:00:00+09:00");
    assert_ne!(code, Some(0));
    assert!(
        err.contains("dropped by retention") && err.contains("health"),
        "{err}"
    );
    let (code, _, err) = run(&[
        "report", "--period", "2026-04", "--view", "jobs", "--server", &url,
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("dropped by retention"), "{err}");
    let (code, _, err) = run(&[
        "timeline", "--gpu", R1, "--period", "2026-04", "--server", &url,
    ]);
    assert_ne!(code, Some(0));
    assert!(err.contains("dropped by retention"), "{err}");
    let refused = gpumeter_e2e::query_at(&url)
        .await
        .usage(v1::UsageRequest {
            from_unix_ms: t0,
            until_unix_ms: t0 + 3 * 3_600_000,
            host_id: String::new(),
            gpu_uuid: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    assert!(
        refused.message().contains("dropped by retention"),
        "{refused}"
    );

    // Again: nothing more to drop. A horizon never moves back.
    let (code, _, err) = retain("2027-05-20", &archive);
    assert_ne!(code, Some(0));
    assert!(err.contains("never overwritten"), "{err}");
    let (code, out, err) = retain("2027-05-20", &dir.path().join("again.archive"));
    assert_eq!(code, Some(0), "{err}");
    let again: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(again["windows_dropped"], 0, "{again}");
    assert_eq!(again["archive"]["records"], 0, "{again}");
    let (code, _, err) = retain("2027-01-01", &dir.path().join("back.archive"));
    assert_ne!(code, Some(0));
    assert!(err.contains("never moves back"), "{err}");

    // Below the horizon the rollups are re-derived from the bodies: an edited rollup row, a
    // pinned window deleted, or a dropped window's row put back altered are each caught.
    let hour_row = format!(
        "SELECT start_ms FROM card_hours WHERE gpu_uuid = '{R1}' AND raw = 0 ORDER BY start_ms LIMIT 1"
    );
    let edited = copy(&db, dir.path(), "rollup-edited", |t| {
        t.execute_batch(&format!(
            "UPDATE card_hours SET good_ms = good_ms + 1000 WHERE gpu_uuid = '{R1}' AND start_ms = ({hour_row})"
        ))
        .unwrap();
    });
    let (code, found, _, _) = verify_db(&edited, None);
    assert_eq!(code, Some(1));
    assert_eq!(
        found.iter().map(|f| f.1.as_str()).collect::<Vec<_>>(),
        vec!["rollup_mismatch"],
        "{found:?}"
    );
    let unpinned = copy(&db, dir.path(), "pinned-deleted", |t| {
        t.execute_batch(&format!(
            "DELETE FROM windows WHERE gpu_uuid = '{R0}' AND start_ms = {}",
            t0 + 20 * 60_000
        ))
        .unwrap();
    });
    let (code, found, _, _) = verify_db(&unpinned, None);
    assert_eq!(code, Some(1));
    assert!(found.iter().any(|f| f.1 == "derived_missing"), "{found:?}");
    drop(c);
    collector.stop().await.unwrap();
}

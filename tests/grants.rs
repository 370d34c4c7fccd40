//! Grants management end to end: the real `gpumeter-collector` CLI against an in-process
//! collector on a real SQLite file. Malformed grant files are refused naming line and field and
//! change nothing; revoke, extend and move change what `grants show` prints and leave a history
//! row with who and when; an extension that breaks a program rule or overlaps another grant is
//! refused naming the field; a live agent session is pushed a new assignment set on revoke.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use gpumeter_e2e::{TestCollector, bin, now_ms};
use gpumeter_proto::v1::{self, agent_message, collector_message};
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;

const HEADER: &str =
    "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n";

/// Card `n`, as NVML writes UUIDs.
fn card(n: u32) -> String {
    format!("GPU-{n:08x}-0000-4000-8000-{n:012x}")
}

/// Unix ms of 00:00 KST on a day.
fn kst(day: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&format!("{day}T00:00:00+09:00"))
        .expect("a valid day")
        .timestamp_millis()
}

/// The grants every test starts from.
fn held_csv() -> String {
    format!(
        "{HEADER}\
         G-HPC,hpc,Acme,user:alice,kt,host-a,{c1},2026-01-01,2026-12-31\n\
         G-HPC,hpc,Acme,user:alice,kt,host-b,{c2},2026-01-01,2026-12-31\n\
         G-HPC,hpc,Acme,user:alice,kt,host-a,{c5},2026-01-01,2026-12-31\n\
         G-ADV,advanced,Bio,user:erin,nhn,host-c,{c3},2026-03-01,2026-05-31\n\
         G-RES,research,Lab,group:lab,kt,host-a,{c4},2026-01-01,2026-06-30\n\
         G-NEXT,research,Lab Two,user:bob,kt,host-a,{c4},2026-08-01,2026-12-31\n\
         G-LIVE,research,Live,user:alice,kt,live-host,{c9},2020-01-01,2099-12-31\n",
        c1 = card(1),
        c2 = card(2),
        c3 = card(3),
        c4 = card(4),
        c5 = card(5),
        c9 = card(9),
    )
}

/// Runs the real CLI as the holder of `token`.
async fn cli_as(token: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(bin("gpumeter-collector"))
        .args(args)
        .envs(gpumeter_e2e::cli_env())
        .env("GPUMETER_TOKEN", token)
        .output()
        .await
        .expect("gpumeter-collector runs")
}

/// Runs the real CLI without blocking the collector's runtime.
async fn cli(args: &[&str]) -> Output {
    let exe = bin("gpumeter-collector");
    tokio::process::Command::new(exe)
        .args(args)
        .envs(gpumeter_e2e::cli_env())
        .env("USER", "tester")
        .output()
        .await
        .expect("gpumeter-collector runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

async fn import(url: &str, path: &Path) -> Output {
    let path = path.to_str().expect("temporary paths are UTF-8");
    cli(&["grants", "import", path, "--server", url]).await
}

async fn list_json(url: &str) -> Value {
    let o = cli(&["grants", "list", "--json", "--server", url]).await;
    assert_ok(&o);
    serde_json::from_slice(&o.stdout).expect("grants list --json prints JSON")
}

async fn show_json(url: &str, id: &str) -> Value {
    let o = cli(&["grants", "show", id, "--json", "--server", url]).await;
    assert_ok(&o);
    serde_json::from_slice(&o.stdout).expect("grants show --json prints JSON")
}

/// A collector holding [`held_csv`], imported through the CLI.
async fn setup(dir: &Path) -> TestCollector {
    let collector = TestCollector::start(&dir.join("ledger.db"))
        .await
        .expect("collector starts");
    let path = dir.join("held.csv");
    std::fs::write(&path, held_csv()).expect("writing the grants file");
    let o = import(&collector.url, &path).await;
    assert_ok(&o);
    assert!(
        stdout(&o).contains("imported 5 grants (7 cards)"),
        "{}",
        stdout(&o)
    );
    collector
}

/// The history entry a change just added: the last one, made by `actor` between `before` and
/// `after`.
#[track_caller]
fn last_change(show: &Value, action: &str, actor: &str, before: i64, after: i64) -> Value {
    let h = show["history"]
        .as_array()
        .and_then(|h| h.last())
        .expect("a history")
        .clone();
    assert_eq!(h["action"], action, "{h}");
    assert_eq!(h["actor"], actor, "{h}");
    let at = h["at_unix_ms"].as_i64().expect("at_unix_ms is a number");
    assert!(
        before <= at && at <= after,
        "{at} not in [{before}, {after}]"
    );
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_grant_files_are_refused_naming_line_and_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let collector = setup(dir.path()).await;
    let url = collector.url.clone();
    let before = list_json(&url).await;
    assert_eq!(before.as_array().unwrap().len(), 5);

    // Every file starts with a valid grant on line 2, which must not be imported either.
    let ok_row = format!(
        "N-OK,research,Fine,user:frank,kt,host-z,{},2026-04-01,2026-04-30\n",
        card(50)
    );
    let row = |id: &str,
               program: &str,
               principal: &str,
               host: &str,
               uuid: &str,
               from: &str,
               until: &str| {
        format!("{id},{program},Corp,{principal},kt,{host},{uuid},{from},{until}\n")
    };
    let (c60, c61, c62, c63) = (card(60), card(61), card(62), card(63));
    let cases: Vec<(&str, String, u32, &str, &str)> = vec![
        (
            "unknown program",
            row(
                "N1",
                "gaming",
                "user:x",
                "h1",
                &c60,
                "2026-04-01",
                "2026-04-30",
            ),
            3,
            "program",
            "gaming",
        ),
        (
            "malformed principal",
            row(
                "N1",
                "hpc",
                "uid:alice",
                "h1",
                &c60,
                "2026-04-01",
                "2026-04-30",
            ),
            3,
            "principal",
            "bad uid \"alice\"",
        ),
        (
            "malformed UUID",
            row(
                "N1",
                "hpc",
                "user:x",
                "h1",
                "GPU-1234",
                "2026-04-01",
                "2026-04-30",
            ),
            3,
            "gpu_uuid",
            "GPU-1234",
        ),
        (
            "malformed date",
            row(
                "N1",
                "hpc",
                "user:x",
                "h1",
                &c60,
                "2026-04-31",
                "2026-05-30",
            ),
            3,
            "valid_from",
            "2026-04-31",
        ),
        (
            "valid_until before valid_from",
            row(
                "N1",
                "hpc",
                "user:x",
                "h1",
                &c60,
                "2026-04-10",
                "2026-04-01",
            ),
            3,
            "valid_until",
            "not after it starts",
        ),
        (
            "rows of one grant disagree",
            row(
                "N1",
                "hpc",
                "user:x",
                "h1",
                &c60,
                "2026-04-01",
                "2026-04-30",
            ) + &row(
                "N1",
                "hpc",
                "user:y",
                "h1",
                &c61,
                "2026-04-01",
                "2026-04-30",
            ),
            4,
            "principal",
            "rows of one grant must agree",
        ),
        (
            "hpc on 3 hosts",
            row(
                "N1",
                "hpc",
                "user:x",
                "h1",
                &c60,
                "2026-04-01",
                "2026-04-30",
            ) + &row(
                "N1",
                "hpc",
                "user:x",
                "h2",
                &c61,
                "2026-04-01",
                "2026-04-30",
            ) + &row(
                "N1",
                "hpc",
                "user:x",
                "h3",
                &c62,
                "2026-04-01",
                "2026-04-30",
            ),
            5,
            "host_id",
            "3 hosts",
        ),
        (
            "advanced longer than 4 months",
            row(
                "N1",
                "advanced",
                "user:x",
                "h1",
                &c60,
                "2026-04-01",
                "2026-08-01",
            ),
            3,
            "valid_until",
            "4 calendar months",
        ),
        (
            "one card in two overlapping grants of the file",
            row(
                "N1",
                "research",
                "user:x",
                "h1",
                &c63,
                "2026-04-01",
                "2026-04-30",
            ) + &row(
                "N2",
                "research",
                "user:y",
                "h1",
                &c63,
                "2026-04-15",
                "2026-05-15",
            ),
            4,
            "gpu_uuid",
            "grant N1 (line 3)",
        ),
        (
            "a card a held grant has",
            row(
                "N1",
                "research",
                "user:x",
                "host-a",
                &card(1),
                "2026-06-01",
                "2026-06-30",
            ),
            3,
            "gpu_uuid",
            "grant G-HPC",
        ),
    ];
    assert_eq!(cases.len(), 10);
    for (i, (name, bad, line, field, says)) in cases.into_iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.csv"));
        std::fs::write(&path, format!("{HEADER}{ok_row}{bad}")).unwrap();
        let o = import(&url, &path).await;
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        let at = format!("error: {}:{line}: field {field}:", path.display());
        let named = err.lines().find(|l| l.contains(&at));
        assert!(
            named.is_some_and(|l| l.contains(says)),
            "{name}: expected {at} ... {says} in\n{err}"
        );
        assert!(err.contains("nothing imported"), "{name}: {err}");
        assert_eq!(list_json(&url).await, before, "{name}: held grants changed");
    }
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_extend_and_move_change_the_grant_and_its_history() {
    let dir = tempfile::tempdir().unwrap();
    let collector = setup(dir.path()).await;
    let url = collector.url.clone();
    // Each change is recorded under the name of the token that made it; `--actor` is ignored.
    let carol = collector.token("admin", "carol");
    let dave = collector.token("admin", "dave");
    let erin = collector.token("admin", "erin");

    // Extend: an advanced grant may run 4 calendar months, to 2026-06-30 inclusive.
    let adv = show_json(&url, "G-ADV").await;
    let o = cli(&[
        "grants",
        "extend",
        "G-ADV",
        "--until",
        "2026-07-01",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("field valid_until") && stderr(&o).contains("4 calendar months"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        show_json(&url, "G-ADV").await,
        adv,
        "a refused change changes nothing"
    );
    let t0 = now_ms();
    let o = cli_as(
        &carol,
        &[
            "grants",
            "extend",
            "G-ADV",
            "--until",
            "2026-06-30",
            "--actor",
            "mallory",
            "--server",
            &url,
        ],
    )
    .await;
    assert_ok(&o);
    let t1 = now_ms();
    let adv = show_json(&url, "G-ADV").await;
    assert_eq!(adv["grant"]["valid_until_unix_ms"], kst("2026-07-01"));
    let h = last_change(&adv, "extend", "carol", t0, t1);
    assert!(
        h["detail"]
            .as_str()
            .unwrap()
            .contains("2026-07-01T00:00:00+09:00"),
        "{h}"
    );
    assert_eq!(adv["history"].as_array().unwrap().len(), 2);

    // Extend into another grant's time on the same card: refused, naming the field and grant.
    let o = cli(&[
        "grants",
        "extend",
        "G-RES",
        "--until",
        "2026-08-15",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("field valid_until") && stderr(&o).contains("G-NEXT"),
        "{}",
        stderr(&o)
    );
    // Up to the day before is fine; the actor is the token's name, not $USER.
    let o = cli(&[
        "grants",
        "extend",
        "G-RES",
        "--until",
        "2026-07-31",
        "--server",
        &url,
    ])
    .await;
    assert_ok(&o);
    let res = show_json(&url, "G-RES").await;
    assert_eq!(res["grant"]["valid_until_unix_ms"], kst("2026-08-01"));
    assert_eq!(res["history"][1]["actor"], "test-admin");

    // Move: card 2 leaves G-HPC on 2026-04-01 and card 6 on host-d takes its place.
    let t0 = now_ms();
    let o = cli_as(
        &dave,
        &[
            "grants",
            "move",
            "G-HPC",
            "--card",
            &card(2),
            "--to-host",
            "host-d",
            "--to-card",
            &card(6),
            "--at",
            "2026-04-01",
            "--actor",
            "mallory",
            "--server",
            &url,
        ],
    )
    .await;
    assert_ok(&o);
    let t1 = now_ms();
    let hpc = show_json(&url, "G-HPC").await;
    let cards = hpc["grant"]["cards"].as_array().unwrap();
    assert_eq!(cards.len(), 4, "{hpc}");
    assert_eq!(cards[0]["gpu_uuid"], card(1));
    assert_eq!(cards[0]["until_unix_ms"], Value::Null);
    assert_eq!(
        (&cards[1]["gpu_uuid"], &cards[1]["until_unix_ms"]),
        (&Value::from(card(2)), &Value::from(kst("2026-04-01")))
    );
    assert_eq!(
        (
            &cards[3]["host_id"],
            &cards[3]["gpu_uuid"],
            &cards[3]["from_unix_ms"]
        ),
        (
            &Value::from("host-d"),
            &Value::from(card(6)),
            &Value::from(kst("2026-04-01"))
        )
    );
    let h = last_change(&hpc, "move_card", "dave", t0, t1);
    assert!(h["detail"].as_str().unwrap().contains(&card(6)), "{h}");
    // The card that left cannot be moved again after it left.
    let o = cli(&[
        "grants",
        "move",
        "G-HPC",
        "--card",
        &card(2),
        "--to-host",
        "host-d",
        "--to-card",
        &card(7),
        "--at",
        "2026-05-01",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("field from_gpu_uuid"), "{}", stderr(&o));
    // A third host for an hpc grant is refused naming the host field (card 5 stays on host-a).
    let o = cli(&[
        "grants",
        "move",
        "G-HPC",
        "--card",
        &card(1),
        "--to-host",
        "host-e",
        "--to-card",
        &card(7),
        "--at",
        "2026-05-01",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("field to_host_id"), "{}", stderr(&o));
    // A card another grant holds at that time is refused naming the card field.
    let o = cli(&[
        "grants",
        "move",
        "G-HPC",
        "--card",
        &card(1),
        "--to-host",
        "host-a",
        "--to-card",
        &card(4),
        "--at",
        "2026-05-01",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("field to_gpu_uuid") && stderr(&o).contains("G-RES"),
        "{}",
        stderr(&o)
    );

    // Revoke, with a reason; the text view shows it.
    let t0 = now_ms();
    let o = cli_as(
        &erin,
        &[
            "grants",
            "revoke",
            "G-HPC",
            "--at",
            "2026-09-01T12:00:00+09:00",
            "--reason",
            "idle for 30 days",
            "--actor",
            "mallory",
            "--server",
            &url,
        ],
    )
    .await;
    assert_ok(&o);
    let t1 = now_ms();
    let hpc = show_json(&url, "G-HPC").await;
    let revoked_at = kst("2026-09-01") + 12 * 3_600_000;
    assert_eq!(hpc["grant"]["revoked_at_unix_ms"], revoked_at);
    let h = last_change(&hpc, "revoke", "erin", t0, t1);
    assert!(
        h["detail"].as_str().unwrap().contains("idle for 30 days"),
        "{h}"
    );
    assert_eq!(hpc["history"].as_array().unwrap().len(), 3);
    let o = cli(&["grants", "show", "G-HPC", "--server", &url]).await;
    assert_ok(&o);
    let text = stdout(&o);
    assert!(
        text.contains("revoked_at   2026-09-01T12:00:00+09:00"),
        "{text}"
    );
    assert!(text.contains("\terin\trevoke\t"), "{text}");
    assert!(text.contains("\tdave\tmove_card\t"), "{text}");
    assert!(
        text.contains(&format!(
            "host-d\t{}\tfrom 2026-04-01T00:00:00+09:00",
            card(6)
        )),
        "{text}"
    );
    // Once revoked, it stays so: revoking again or extending is refused, naming the field.
    let o = cli(&["grants", "revoke", "G-HPC", "--at", "now", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("field grant_id") && stderr(&o).contains("already revoked"),
        "{}",
        stderr(&o)
    );
    let o = cli(&[
        "grants",
        "extend",
        "G-HPC",
        "--until",
        "2027-01-31",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("field grant_id"), "{}", stderr(&o));
    // Not before the grant starts.
    let o = cli(&[
        "grants",
        "revoke",
        "G-RES",
        "--at",
        "2025-12-31",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("field at_unix_ms"), "{}", stderr(&o));
    assert_eq!(
        show_json(&url, "G-HPC").await,
        hpc,
        "refusals change nothing"
    );

    // Unknown grants and usage errors.
    let o = cli(&["grants", "show", "G-NOPE", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("grant G-NOPE not found"),
        "{}",
        stderr(&o)
    );
    let o = cli(&[
        "grants",
        "revoke",
        "G-RES",
        "--at",
        "yesterday",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--at"), "{}", stderr(&o));
    let o = cli(&[
        "grants",
        "extend",
        "G-RES",
        "--until",
        "2026-02-30",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--until"), "{}", stderr(&o));
    let o = cli(&[
        "grants",
        "move",
        "G-RES",
        "--card",
        &card(4),
        "--to-host",
        "h",
        "--to-card",
        "GPU-x",
        "--server",
        &url,
    ])
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--to-card"), "{}", stderr(&o));
    let o = cli(&["grants", "revoke", "G-RES", "--server", &url]).await;
    assert_eq!(o.status.code(), Some(2), "--at is required");

    // The list shows the same state as show.
    let list = list_json(&url).await;
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["grant_id"] == "G-HPC")
        .unwrap();
    assert_eq!(listed, &hpc["grant"]);
    collector.stop().await.unwrap();
}

/// The next message of a session, within 10 s.
async fn next(inbound: &mut tonic::Streaming<v1::CollectorMessage>) -> v1::CollectorMessage {
    tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("a message within 10 s")
        .expect("the session does not fail")
        .expect("the session stays open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_is_pushed_a_new_assignment_set_on_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let collector = setup(dir.path()).await;
    let url = collector.url.clone();

    // Connect as an agent would: Hello first, then read the Welcome.
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(v1::Hello {
            protocol_version: gpumeter_proto::PROTOCOL_VERSION,
            agent_id: "live-host".into(),
            host_id: "live-host".into(),
            csp: "kt".into(),
            hostname: "live".into(),
            agent_version: "test".into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            driver_version: "test".into(),
            gpus: vec![v1::GpuInfo {
                uuid: card(9),
                name: "simulated".into(),
                ..Default::default()
            }],
            epoch: 1,
            next_seq: 1,
            chain_head: vec![0; 32],
            oldest_spooled_seq: 0,
            agent_time_unix_ms: now_ms(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut ingest = gpumeter_e2e::ingest_at(&url, "live-host").await;
    let mut inbound = ingest
        .session(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let Some(collector_message::Kind::Welcome(welcome)) = next(&mut inbound).await.kind else {
        panic!("the first message must be Welcome");
    };
    let first = welcome.assignments.unwrap();
    assert_eq!(first.assignments.len(), 1);
    let a = &first.assignments[0];
    assert_eq!(
        (a.gpu_uuid.as_str(), a.grant_id.as_str(), a.revoked),
        (card(9).as_str(), "G-LIVE", false)
    );

    let t0 = now_ms();
    let o = cli(&[
        "grants", "revoke", "G-LIVE", "--at", "now", "--server", &url,
    ])
    .await;
    assert_ok(&o);
    let t1 = now_ms();
    let Some(collector_message::Kind::Assignments(set)) = next(&mut inbound).await.kind else {
        panic!("expected a pushed AssignmentSet");
    };
    assert_eq!(set.host_id, "live-host");
    assert!(
        set.version > first.version,
        "{} > {}",
        set.version,
        first.version
    );
    assert_eq!(set.assignments.len(), 1);
    let a = &set.assignments[0];
    assert_eq!((a.grant_id.as_str(), a.revoked), ("G-LIVE", true));
    assert!(
        t0 <= a.revoked_at_unix_ms && a.revoked_at_unix_ms <= t1,
        "revoked at the collector's now: {} not in [{t0}, {t1}]",
        a.revoked_at_unix_ms
    );
    drop(tx);
    collector.stop().await.unwrap();
}

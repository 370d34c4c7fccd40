//! Who may speak to the collector, tried over real TLS on loopback: agents without a
//! certificate, with one from another CA, expired, revoked while the collector runs, or
//! claiming another agent or host; people without a token, with a revoked one, or with a
//! role that may not call Admin; and `serve` without TLS material. Each is refused with the
//! right status, writes nothing (the database is read to check), and leaves the collector
//! serving an honest agent.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gpumeter_collector::auth::ca::{Ca, Validity};
use gpumeter_e2e::{
    TestCollector, admin_client, bin, cli_env, ingest_with, now_ms, query_client, test_tls,
};
use gpumeter_proto::v1::{self, agent_message, collector_message, ingest_client::IngestClient};
use tonic::transport::Channel;

fn hello(agent_id: &str, host_id: &str, seed: u8) -> v1::Hello {
    let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    v1::Hello {
        protocol_version: gpumeter_proto::PROTOCOL_VERSION,
        agent_id: agent_id.into(),
        host_id: host_id.into(),
        csp: "kt".into(),
        hostname: "h".into(),
        agent_version: "test".into(),
        public_key: key.verifying_key().to_bytes().to_vec(),
        driver_version: "test".into(),
        gpus: vec![v1::GpuInfo {
            uuid: format!("GPU-0000{seed:04x}-0000-4000-8000-000000000000"),
            name: "simulated".into(),
            ..Default::default()
        }],
        epoch: 1,
        next_seq: 1,
        chain_head: vec![0; 32],
        oldest_spooled_seq: 0,
        agent_time_unix_ms: now_ms(),
        ..Default::default()
    }
}

/// Says Hello on a session and returns the Welcome, or the status the session was refused
/// with.
async fn say_hello(
    client: &mut IngestClient<Channel>,
    hello: v1::Hello,
) -> Result<v1::Welcome, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    })
    .await
    .unwrap();
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("an answer to Hello")?;
    drop(tx);
    match first {
        Some(v1::CollectorMessage {
            kind: Some(collector_message::Kind::Welcome(w)),
        }) => Ok(w),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// What the database holds about an agent: (agents rows, gpus rows, records, alarms).
fn written(db: &Path, agent_id: &str) -> (i64, i64, i64, i64) {
    let c = rusqlite::Connection::open(db).unwrap();
    let n = |sql: &str| -> i64 { c.query_row(sql, [agent_id], |r| r.get(0)).unwrap() };
    (
        n("SELECT COUNT(*) FROM agents WHERE agent_id = ?1"),
        n("SELECT COUNT(*) FROM gpus WHERE agent_id = ?1"),
        n("SELECT COUNT(*) FROM records WHERE agent_id = ?1"),
        n("SELECT COUNT(*) FROM alarms WHERE agent_id = ?1"),
    )
}

/// The collector still admits an honest agent with its own certificate.
async fn honest_agent_is_served(collector: &TestCollector, id: &str) {
    let mut c = collector.ingest(id, id).await;
    let w = say_hello(&mut c, hello(id, id, 200)).await.unwrap();
    assert_eq!(w.durable_seq, 0);
    assert_eq!(
        written(&collector.db, id).0,
        1,
        "the honest agent is stored"
    );
}

/// A handshake the collector refuses: either the connect fails, or (TLS 1.3 checks the
/// client's certificate after the client thinks the handshake is done) the first call fails
/// in the transport — the collector never answers it, so no gRPC status from the server.
async fn assert_handshake_refused(url: &str, cert_pem: &str, key_pem: &str, who: &str) {
    match ingest_with(url, test_tls().ca.cert_pem(), Some((cert_pem, key_pem))).await {
        Err(_) => {}
        Ok(mut c) => {
            let e = say_hello(&mut c, hello(who, who, 9))
                .await
                .expect_err("the collector must refuse the certificate");
            assert_transport_refusal(&e, who);
        }
    }
}

#[track_caller]
fn assert_transport_refusal(e: &tonic::Status, who: &str) {
    use std::error::Error;
    assert!(
        matches!(
            e.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{who}: {e:?}"
    );
    assert!(
        e.source()
            .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some()),
        "{who}: the refusal comes from the transport, not from a served call: {e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_a_good_certificate_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();

    // No client certificate: TLS works (people connect this way), Ingest does not.
    let mut anon = ingest_with(&collector.url, test_tls().ca.cert_pem(), None)
        .await
        .unwrap();
    let e = say_hello(&mut anon, hello("anon", "anon", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("certificate"), "{e:?}");
    assert_eq!(written(&db, "anon"), (0, 0, 0, 0));

    // A certificate from another CA, naming the agent correctly.
    let other = Ca::generate("another CA", Validity::days(1)).unwrap();
    let foreign = other
        .issue_agent("foreign", "foreign", Validity::days(1))
        .unwrap();
    assert_handshake_refused(
        &collector.url,
        &foreign.cert_pem,
        &foreign.key_pem,
        "foreign",
    )
    .await;
    assert_eq!(written(&db, "foreign"), (0, 0, 0, 0));

    // An expired certificate from the right CA.
    let expired = test_tls()
        .ca
        .issue_agent(
            "expired",
            "expired",
            Validity {
                not_before: rcgen_date(2020),
                not_after: rcgen_date(2021),
            },
        )
        .unwrap();
    assert_handshake_refused(
        &collector.url,
        &expired.cert_pem,
        &expired.key_pem,
        "expired",
    )
    .await;
    assert_eq!(written(&db, "expired"), (0, 0, 0, 0));

    honest_agent_is_served(&collector, "honest-1").await;
    collector.stop().await.unwrap();
}

fn rcgen_date(year: i32) -> time::OffsetDateTime {
    time::OffsetDateTime::new_utc(
        time::Date::from_calendar_date(year, time::Month::January, 1).unwrap(),
        time::Time::MIDNIGHT,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_the_collector_runs_is_refused_at_the_next_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let cert = test_tls()
        .ca
        .issue_agent("soon-revoked", "soon-revoked", Validity::days(1))
        .unwrap();
    let mut c = ingest_with(
        &collector.url,
        test_tls().ca.cert_pem(),
        Some((&cert.cert_pem, &cert.key_pem)),
    )
    .await
    .unwrap();
    say_hello(&mut c, hello("soon-revoked", "soon-revoked", 3))
        .await
        .unwrap();
    let before = written(&db, "soon-revoked");
    assert_eq!(before.0, 1);

    // Revoked with the real CLI, into the revocation list the running collector reads.
    let out = Command::new(bin("gpumeter-collector"))
        .args(["ca", "revoke", "--ca-dir"])
        .arg(&test_tls().ca_dir)
        .arg(cert.serial.to_uppercase())
        .args(["--reason", "key lost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked"));

    match ingest_with(
        &collector.url,
        test_tls().ca.cert_pem(),
        Some((&cert.cert_pem, &cert.key_pem)),
    )
    .await
    {
        Err(_) => {}
        Ok(mut c) => {
            let e = say_hello(&mut c, hello("soon-revoked", "soon-revoked", 3))
                .await
                .unwrap_err();
            assert_transport_refusal(&e, "soon-revoked");
        }
    }
    assert_eq!(written(&db, "soon-revoked"), before, "nothing more written");
    honest_agent_is_served(&collector, "honest-2").await;
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_for_another_agent_or_host_than_the_certificate_is_refused_with_an_alarm() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();

    // Agent A's certificate saying Hello as agent B.
    let mut a = collector.ingest("agent-a", "host-a").await;
    let e = say_hello(&mut a, hello("agent-b", "host-a", 4))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("agent_id"), "{e:?}");
    assert_eq!(written(&db, "agent-b"), (0, 0, 0, 0));
    // The alarm is stored under the certified agent, and nothing else about it.
    assert_eq!(written(&db, "agent-a"), (0, 0, 0, 1));

    // A certificate for host H whose Hello claims host K.
    let mut h = collector.ingest("agent-h", "host-h").await;
    let e = say_hello(&mut h, hello("agent-h", "host-k", 5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("host_id"), "{e:?}");
    assert_eq!(written(&db, "agent-h"), (0, 0, 0, 1));
    let c = rusqlite::Connection::open(&db).unwrap();
    let (kind, detail): (String, String) = c
        .query_row(
            "SELECT kind, detail FROM alarms WHERE agent_id = 'agent-h'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(kind, "identity_mismatch");
    assert!(
        detail.contains("host-h") && detail.contains("host-k"),
        "{detail}"
    );
    let hosts: i64 = c
        .query_row(
            "SELECT COUNT(*) FROM gpus WHERE host_id = 'host-k'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hosts, 0);

    // The same certificates saying who they are: admitted.
    let w = say_hello(&mut h, hello("agent-h", "host-h", 5))
        .await
        .unwrap();
    assert_eq!(w.durable_seq, 0);
    honest_agent_is_served(&collector, "honest-3").await;
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_only_an_agent_an_admin_registered_is_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start_insecure(&db).await.unwrap();
    assert!(collector.url.starts_with("http://"));
    let plain = |url: String| async move { IngestClient::connect(url).await.unwrap() };
    // Unknown, no certificate (there is no TLS), no registration: a first Hello is not enough.
    let mut c = plain(collector.url.clone()).await;
    let e = say_hello(&mut c, hello("newcomer", "newcomer", 6))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("register"), "{e:?}");
    assert_eq!(written(&db, "newcomer"), (0, 0, 0, 0));

    // An admin registers it (the token is still checked without TLS), then it is admitted.
    let key = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
    let out = Command::new(bin("gpumeter-collector"))
        .args(["agents", "register", "newcomer", "--key"])
        .arg(hex::encode(key.verifying_key().to_bytes()))
        .args(["--server", &collector.url])
        .envs(cli_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = plain(collector.url.clone()).await;
    say_hello(&mut c, hello("newcomer", "newcomer", 6))
        .await
        .unwrap();
    assert_eq!(written(&db, "newcomer").0, 1);

    // And without a token, even the insecure collector answers no Query.
    let mut q = query_client(&collector.url, None).await;
    let e = q.hosts(v1::HostsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    collector.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_who_may_query_and_who_may_change_and_name_the_actor() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let collector = TestCollector::start(&db).await.unwrap();
    let csv = "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n\
               G-1,hpc,Acme,user:acme,kt,host-1,GPU-00000001-0000-4000-8000-000000000000,2026-04-01,2026-06-30\n";
    let grants = |c: &rusqlite::Connection| -> i64 {
        c.query_row("SELECT COUNT(*) FROM grants", [], |r| r.get(0))
            .unwrap()
    };
    let conn = rusqlite::Connection::open(&db).unwrap();
    let import = v1::ImportGrantsRequest {
        csv: csv.into(),
        actor: "mallory".into(),
        dry_run: false,
    };

    // No token: unauthenticated, for Query and Admin alike.
    let e = query_client(&collector.url, None)
        .await
        .hosts(v1::HostsRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = admin_client(&collector.url, None)
        .await
        .import_grants(import.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A token this collector never issued.
    let e = admin_client(&collector.url, Some("gpm_0123"))
        .await
        .import_grants(import.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert_eq!(grants(&conn), 0);

    // An auditor may query, not change.
    let auditor = collector.token("auditor", "audit-lee");
    query_client(&collector.url, Some(&auditor))
        .await
        .hosts(v1::HostsRequest {})
        .await
        .unwrap();
    let e = admin_client(&collector.url, Some(&auditor))
        .await
        .import_grants(import.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("audit-lee"), "{e:?}");
    assert_eq!(grants(&conn), 0);

    // An admin token, made with the real CLI on the database beside the running collector;
    // the actor recorded is its name, not what the request says.
    let out = Command::new(bin("gpumeter-collector"))
        .args([
            "tokens", "create", "--role", "admin", "--name", "ops-kim", "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("gpm_"), "{token}");
    let stored: String = conn
        .query_row(
            "SELECT hash FROM api_tokens WHERE name = 'ops-kim'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(!stored.contains(&token[4..]), "only a hash is stored");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let grants_file = dir.path().join("grants.csv");
    std::fs::write(&grants_file, csv).unwrap();
    let out = Command::new(bin("gpumeter-collector"))
        .args(["grants", "import"])
        .arg(&grants_file)
        .args([
            "--actor",
            "mallory",
            "--server",
            &collector.url,
            "--token-file",
        ])
        .arg(&token_file)
        .arg("--ca-cert")
        .arg(&test_tls().ca_cert)
        .env_remove("GPUMETER_TOKEN")
        .env_remove("GPUMETER_CA_CERT")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let actor: String = conn
        .query_row(
            "SELECT actor FROM grant_history WHERE grant_id = 'G-1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(actor, "ops-kim");
    // Agent registration is recorded under the token's name too.
    let key = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
    admin_client(&collector.url, Some(&token))
        .await
        .register_agent(v1::RegisterAgentRequest {
            agent_id: "pre-reg".into(),
            public_key: key.verifying_key().to_bytes().to_vec(),
            actor: "mallory".into(),
            reason: "new host".into(),
        })
        .await
        .unwrap();
    let detail: String = conn
        .query_row(
            "SELECT detail FROM alarms WHERE agent_id = 'pre-reg' AND kind = 'key_registered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        detail.starts_with("ops-kim ") && !detail.contains("mallory"),
        "{detail}"
    );

    // Revoked with the real CLI while the collector runs: refused from the next call.
    let out = Command::new(bin("gpumeter-collector"))
        .args(["tokens", "revoke", "ops-kim", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success());
    let e = admin_client(&collector.url, Some(&token))
        .await
        .extend_grant(v1::ExtendGrantRequest {
            grant_id: "G-1".into(),
            valid_until: "2026-07-31".into(),
            actor: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked"), "{e:?}");
    let history: i64 = conn
        .query_row("SELECT COUNT(*) FROM grant_history", [], |r| r.get(0))
        .unwrap();
    assert_eq!(history, 1, "the refused change wrote nothing");
    let out = Command::new(bin("gpumeter-collector"))
        .args(["tokens", "list", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.lines()
            .any(|l| l.starts_with("ops-kim\tadmin") && l.contains("revoked")),
        "{list}"
    );
    assert!(!list.contains(&token), "tokens list never shows a secret");

    honest_agent_is_served(&collector, "honest-4").await;
    collector.stop().await.unwrap();
}

#[test]
fn serve_without_tls_material_refuses_to_start_and_says_what_to_pass() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");
    let out = Command::new(bin("gpumeter-collector"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    for flag in ["--ca-dir", "--tls-cert", "--insecure"] {
        assert!(err.contains(flag), "{flag}: {err}");
    }
    assert!(!db.exists(), "nothing was opened");
    // A CA directory without the server certificate: the missing file is named.
    let ca = dir.path().join("ca");
    let out = Command::new(bin("gpumeter-collector"))
        .args(["ca", "init", "--ca-dir"])
        .arg(&ca)
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = Command::new(bin("gpumeter-collector"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .arg("--ca-dir")
        .arg(&ca)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("server.pem"), "{err}");
}

/// The built-in CA from the command line, as an operator enrols a host: `ca init`, `ca
/// issue-server`, `tokens create`, `serve --ca-dir`; `ca issue-agent` and the agent's TLS
/// config; the CLI over https with `--ca-cert` and a token; `--insecure` warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_ca_enrols_a_host_and_the_real_binaries_speak_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let db = dir.path().join("ledger.db");
    let run = |args: &[&str]| {
        let out = Command::new(bin("gpumeter-collector"))
            .args(args)
            .env_remove("GPUMETER_TOKEN")
            .env_remove("GPUMETER_CA_CERT")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cas = ca.to_str().unwrap();
    let dbs = db.to_str().unwrap();
    assert_eq!(run(&["ca", "init", "--ca-dir", cas]).0, Some(0));
    let (code, _, err) = run(&["ca", "init", "--ca-dir", cas]);
    assert_eq!(code, Some(64), "a second init is refused: {err}");
    let (code, _, err) = run(&[
        "ca",
        "issue-server",
        "--ca-dir",
        cas,
        "--dns",
        "localhost",
        "--ip",
        "127.0.0.1",
    ]);
    assert_eq!(code, Some(0), "{err}");
    use std::os::unix::fs::PermissionsExt;
    for key in ["ca.key", "server.key"] {
        let mode = std::fs::metadata(ca.join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let (code, token, err) = run(&[
        "tokens",
        "create",
        "--role",
        "auditor",
        "--name",
        "auditor-1",
        "--db",
        dbs,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let token = token.trim().to_string();

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("https://{listen}");
    let log = std::fs::File::create(dir.path().join("collector.log")).unwrap();
    // The simulated agent below replays the last hour, which production limits refuse
    // (windows from before its registration): this collector allows two hours of backfill.
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, "[limits]\nmax_backfill_s = 7200\n").unwrap();
    let mut serve = Command::new(bin("gpumeter-collector"))
        .args(["serve", "--listen", &listen, "--db", dbs, "--ca-dir", cas])
        .arg("--config")
        .arg(&config)
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(std::time::Instant::now() < deadline, "serve never listened");
        assert!(serve.try_wait().unwrap().is_none(), "serve exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Enrol a host: one command at the collector, the files to the agent's config.
    let (code, out, err) = run(&[
        "ca",
        "issue-agent",
        "--ca-dir",
        cas,
        "--agent-id",
        "kt-gpu-07",
        "--host-id",
        "kt-gpu-07",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("serial "), "{out}");
    let mut cfg = gpumeter_agent::config::AgentConfig::simulated(
        "kt-gpu-07",
        "kt",
        &url,
        &dir.path().join("agent"),
        16,
    );
    cfg.collector.ca_cert = Some(ca.join("ca.pem"));
    cfg.collector.client_cert = Some(ca.join("agents/kt-gpu-07.pem"));
    cfg.collector.client_key = Some(ca.join("agents/kt-gpu-07.key"));
    cfg.validate().unwrap();
    let scenario: gpumeter_agent::gpu::sim::Scenario = toml::from_str(
        "[[cards]]\nuuid = \"GPU-00000777-0000-4000-8000-000000000000\"\n[[cards.phases]]\nfrom_s = 0\nutil_pct = 50\n",
    )
    .unwrap();
    let start = gpumeter_agent::clock::align_down(now_ms() - 3_600_000, 60_000);
    let agent =
        gpumeter_e2e::spawn_sim_agent(cfg, scenario, start, start + 300_000, 3_000.0).unwrap();
    tokio::time::timeout(Duration::from_secs(60), agent)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the agent was not acknowledged in time; collector log:\n{}",
                std::fs::read_to_string(dir.path().join("collector.log")).unwrap_or_default()
            )
        })
        .unwrap()
        .unwrap();

    // The CLI over https: the auditor sees the host; without the CA it says what to pass.
    let hosts = Command::new(bin("gpumeter-collector"))
        .args(["hosts", "--server", &url, "--ca-cert"])
        .arg(ca.join("ca.pem"))
        .env("GPUMETER_TOKEN", &token)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&hosts.stdout);
    assert!(
        hosts.status.success(),
        "{}",
        String::from_utf8_lossy(&hosts.stderr)
    );
    // A header row, then the agent: agent, host, CSP, hostname, version, cards, ….
    assert!(out.starts_with("AGENT "), "{out}");
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.starts_with("kt-gpu-07 "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        (&row[..3], row[5]),
        (&["kt-gpu-07", "kt-gpu-07", "kt"][..], "1"),
        "{out}"
    );
    let (code, _, err) = run(&["hosts", "--server", &url]);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("--ca-cert") && err.contains("GPUMETER_CA_CERT"),
        "{err}"
    );
    // An auditor may not change anything.
    let grants = dir.path().join("g.csv");
    std::fs::write(
        &grants,
        "grant_id,program,grantee,principal,csp,host_id,gpu_uuid,valid_from,valid_until\n",
    )
    .unwrap();
    let out = Command::new(bin("gpumeter-collector"))
        .args(["grants", "import"])
        .arg(&grants)
        .args(["--server", &url, "--ca-cert"])
        .arg(ca.join("ca.pem"))
        .env("GPUMETER_TOKEN", &token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not call Admin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(serve.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    );
    let status = serve.wait().unwrap();
    assert!(
        status.success(),
        "serve stopped cleanly on SIGINT: {status:?}"
    );

    // --insecure starts, and says loudly that it has no TLS.
    let log_path = dir.path().join("insecure.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut insecure = Command::new(bin("gpumeter-collector"))
        .args(["serve", "--listen", &listen, "--db", dbs, "--insecure"])
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("WITHOUT TLS") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no warning at start: {text}"
        );
        assert!(insecure.try_wait().unwrap().is_none(), "exited: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = insecure.kill();
    let _ = insecure.wait();
}

/// A client that opens a connection and never starts its TLS handshake is cut after
/// `limits.tls_handshake_timeout_s`, long before the connection idle timeout; a real client
/// still gets through meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_handshakes_is_closed_at_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut opts = gpumeter_e2e::replay_options();
    opts.connections.handshake_timeout = Duration::from_secs(1);
    opts.connections.idle_timeout = Duration::from_secs(120);
    let c = TestCollector::start_with(&dir.path().join("db"), "127.0.0.1:0", opts)
        .await
        .unwrap();
    let mut silent = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("the collector closes a connection that never handshakes")
        .unwrap_or(0);
    let waited = started.elapsed();
    assert_eq!(n, 0, "closed, not answered");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "closed after {waited:?}, the timeout is 1 s"
    );
    let mut q = query_client(&c.url, Some(&test_tls().admin_token)).await;
    q.hosts(v1::HostsRequest {}).await.unwrap();
    c.stop().await.unwrap();
}

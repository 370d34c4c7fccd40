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

fn scenario() -> Scenario {
    toml::from_str(
        r#"
[[cards]]
uuid = "GPU-0000000d-0000-4000-8000-000000000000"
[[cards.phases]]
from_s = 0
util_pct = 70
processes = [{ pid = 5, uid = 1001, user = "alice" }]
[[cards]]
uuid = "GPU-0000000d-0000-4000-8000-000000000001"
"#,
    )
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
    for id in ["pg-a", "pg-b"] {
        tasks.push(
            spawn_sim_agent(
                agent_config(id, "kt", &server, &dir.path().join(id), 3),
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

    // A body rewritten in the database is caught.
    pg_rows(
        &url,
        "UPDATE records SET body = body || '\\x00'::bytea WHERE agent_id = 'pg-b' AND seq = 5",
    );
    let (code, out, err) = run(&["verify", "--db", &url]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("pg-b"), "{out}");
}

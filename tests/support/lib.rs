//! Helpers shared by the end-to-end tests: an in-process collector on a real SQLite file (or,
//! through [`TestDb`], a PostgreSQL database of its own) and port 0, the real binaries, and
//! simulated agents.
//!
//! TLS is on everywhere, as in production: one CA per test process ([`test_tls`]) with a
//! server certificate for 127.0.0.1 and localhost; every collector serves it and holds the
//! process's admin token; [`agent_config`] issues the agent a certificate for its agent id
//! (its host id being the agent id) when the URL is `https://`; [`TestCollector::cli`] and
//! [`cli_env`] give the real CLI the CA and the admin token.

pub mod https;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use gpumeter_agent::clock::{Clock, ScaledClock};
use gpumeter_agent::config::AgentConfig;
use gpumeter_agent::gpu::sim::{Scenario, SimSource};
use gpumeter_agent::run::{Agent, Parts, RunOptions};
use gpumeter_collector::auth::ca::{Ca, CaDir, Validity};
use gpumeter_collector::auth::tls::{ServerTls, TlsFiles};
use gpumeter_collector::client::{AuthChannel, ClientAuth};
use gpumeter_collector::server::{ServerOptions, run};
use gpumeter_collector::store::Store;
use gpumeter_collector::store::pg_testdb::TestPg;
use gpumeter_collector::store::sqlite::SqliteStore;
use gpumeter_proto::v1::{
    admin_client::AdminClient, ingest_client::IngestClient, query_client::QueryClient,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Where a test collector keeps its ledger: a SQLite file, or a PostgreSQL database made for
/// the test (dropped when the last clone goes) with the collector's key in a file beside it.
#[derive(Clone, Debug)]
pub enum TestDb {
    Sqlite(PathBuf),
    Postgres { pg: Arc<TestPg>, key: PathBuf },
}

impl TestDb {
    pub fn sqlite(path: &Path) -> TestDb {
        TestDb::Sqlite(path.to_path_buf())
    }

    /// A fresh PostgreSQL database for the test `tag`, its collector key in `dir`; `None`
    /// (after a `SKIPPED` line) when no server is reachable and CI does not require one.
    pub fn postgres(tag: &str, dir: &Path) -> Option<TestDb> {
        Some(TestDb::Postgres {
            pg: Arc::new(TestPg::create(tag)?),
            key: dir.join("collector-key"),
        })
    }

    /// What `--db` takes.
    pub fn db_arg(&self) -> String {
        match self {
            TestDb::Sqlite(p) => p.display().to_string(),
            TestDb::Postgres { pg, .. } => pg.url.clone(),
        }
    }

    /// The `serve` arguments naming this database (and the PostgreSQL collector key).
    pub fn serve_args(&self) -> Vec<String> {
        let mut a = vec!["--db".to_string(), self.db_arg()];
        if let TestDb::Postgres { key, .. } = self {
            a.push("--collector-key".into());
            a.push(key.display().to_string());
        }
        a
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, TestDb::Postgres { .. })
    }

    /// The store, opened (and migrated) as the collector opens it.
    pub fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        let key = match self {
            TestDb::Sqlite(_) => None,
            TestDb::Postgres { key, .. } => Some(key.as_path()),
        };
        Ok(gpumeter_collector::store::open_store(&self.db_arg(), key)?)
    }
}

/// The body of one record as its agent signed it, read from a SQLite ledger wherever the
/// ledger keeps it (the row, or the batch's compressed block), for tests that tamper with it.
pub fn record_body(c: &rusqlite::Connection, agent: &str, seq: u64) -> Vec<u8> {
    gpumeter_collector::store::sqlite_ledger::record_body(c, agent, seq)
        .expect("reading a body")
        .unwrap_or_else(|| panic!("no record {agent} seq {seq}"))
}

/// Rows of `sql` run on the PostgreSQL database `url`, for tests that read its tables
/// straight (the client runs on a thread of its own: it must not block an async test).
pub fn pg_rows(url: &str, sql: &str) -> Vec<postgres::Row> {
    let (url, sql) = (url.to_string(), sql.to_string());
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connecting");
        let rows = c.query(&sql, &[]).expect("querying");
        drop(c);
        rows
    })
    .join()
    .expect("query thread")
}

/// A collector serving on loopback from a SQLite file (or the database `backend` names).
pub struct TestCollector {
    pub addr: SocketAddr,
    pub url: String,
    /// The SQLite file (for PostgreSQL: its URL, as `--db` takes it).
    pub db: PathBuf,
    pub backend: TestDb,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestCollector {
    /// Starts on port 0 on `backend`.
    pub async fn start_in(backend: &TestDb) -> anyhow::Result<Self> {
        Self::start_in_with(backend, "127.0.0.1:0", replay_options()).await
    }

    /// [`TestCollector::start_with`] on `backend`.
    pub async fn start_in_with(
        backend: &TestDb,
        addr: &str,
        mut opts: ServerOptions,
    ) -> anyhow::Result<Self> {
        if opts.tls.is_none() {
            opts.tls = Some(test_tls().server.clone());
        }
        Self::serve_on(backend, addr, opts).await
    }

    /// Starts on port 0.
    pub async fn start(db: &Path) -> anyhow::Result<Self> {
        Self::start_on(db, "127.0.0.1:0").await
    }

    /// Starts on a given address (to come back on the same port after a stop).
    pub async fn start_on(db: &Path, addr: &str) -> anyhow::Result<Self> {
        Self::start_with(db, addr, replay_options()).await
    }

    /// Starts with `opts`; TLS from [`test_tls`] unless `opts.tls` names its own.
    pub async fn start_with(
        db: &Path,
        addr: &str,
        mut opts: ServerOptions,
    ) -> anyhow::Result<Self> {
        if opts.tls.is_none() {
            opts.tls = Some(test_tls().server.clone());
        }
        Self::serve(db, addr, opts).await
    }

    /// Starts without TLS (`serve --insecure`): tokens are still checked, and only agents an
    /// admin registered are admitted.
    pub async fn start_insecure(db: &Path) -> anyhow::Result<Self> {
        let opts = ServerOptions {
            tls: None,
            ..ServerOptions::default()
        };
        Self::serve(db, "127.0.0.1:0", opts).await
    }

    async fn serve(db: &Path, addr: &str, opts: ServerOptions) -> anyhow::Result<Self> {
        Self::serve_on(&TestDb::sqlite(db), addr, opts).await
    }

    async fn serve_on(backend: &TestDb, addr: &str, opts: ServerOptions) -> anyhow::Result<Self> {
        let store = backend.open()?;
        ensure_admin_token(store.as_ref())?;
        let tls = opts.tls.is_some();
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(run(listener, store, opts, async move {
            let _ = rx.changed().await;
        }));
        Ok(Self {
            addr,
            url: format!("{}://{addr}", if tls { "https" } else { "http" }),
            db: PathBuf::from(backend.db_arg()),
            backend: backend.clone(),
            stop,
            task,
        })
    }

    /// A Query client holding the admin token.
    pub async fn query(&self) -> QueryClient<AuthChannel> {
        query_client(&self.url, Some(&test_tls().admin_token)).await
    }

    /// An Admin client holding the admin token.
    pub async fn admin(&self) -> AdminClient<AuthChannel> {
        admin_client(&self.url, Some(&test_tls().admin_token)).await
    }

    /// An Ingest client presenting a certificate for `agent_id` on `host_id`.
    pub async fn ingest(&self, agent_id: &str, host_id: &str) -> IngestClient<Channel> {
        ingest_client(&self.url, Some((agent_id, host_id)))
            .await
            .expect("connecting to the collector")
    }

    /// A token with `role` ("auditor" or "admin") named `name`, made in the collector's
    /// database.
    pub fn token(&self, role: &str, name: &str) -> String {
        let store = self.backend.open().expect("opening the test database");
        let role = gpumeter_collector::auth::tokens::Role::parse(role).expect("auditor or admin");
        gpumeter_collector::auth::tokens::create(store.as_ref(), name, role, now_ms())
            .expect("making a token")
    }

    /// The real CLI, with the test CA and the admin token in its environment.
    pub fn cli(&self) -> std::process::Command {
        let mut c = std::process::Command::new(bin("gpumeter-collector"));
        c.envs(cli_env());
        c
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await??;
        Ok(())
    }
}

/// Server options for simulations: simulated agents replay the past, so their windows may
/// start up to 400 days before the agent first registered. Production refuses that
/// (`limits.max_backfill_s = 0`); `ServerOptions::default()` is production's.
pub fn replay_options() -> ServerOptions {
    let mut o = ServerOptions::default();
    o.limits.max_backfill_ms = 400 * 86_400_000;
    o
}

/// Server options for agents on a sped-up clock that starts at the real time: their windows
/// lie in the collector's future, which production refuses beyond `limits.max_clock_skew_s`.
/// These allow a year ahead (and so raise no clock-skew alarm).
pub fn sped_up_options() -> ServerOptions {
    let mut o = replay_options();
    o.limits.max_clock_skew_ms = 365 * 86_400_000;
    o
}

/// `gpumeter-collector serve` on `listen` over the test CA's TLS with a SQLite file and, when
/// given, a config file:
/// the real binary, for tests that signal it, limit it or watch it from outside.
pub fn collector_serve_command(
    listen: &str,
    db: &Path,
    config: Option<&Path>,
) -> std::process::Command {
    // The test admin token, as every test collector's database holds it.
    if let Ok(store) = SqliteStore::open(db) {
        let _ = ensure_admin_token(&store);
    }
    let mut cmd = std::process::Command::new(bin("gpumeter-collector"));
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen)
        .arg("--db")
        .arg(db);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(serve_tls_args());
    cmd
}

/// An agent config for a simulated host; with an `https://` URL it holds a certificate from
/// the test CA for `agent_id` on host `agent_id`.
pub fn agent_config(agent_id: &str, csp: &str, url: &str, state: &Path, batch: u32) -> AgentConfig {
    agent_config_on_host(agent_id, agent_id, csp, url, state, batch)
}

/// [`agent_config`] for an agent whose host id is not its agent id.
pub fn agent_config_on_host(
    agent_id: &str,
    host_id: &str,
    csp: &str,
    url: &str,
    state: &Path,
    batch: u32,
) -> AgentConfig {
    let mut cfg = AgentConfig::simulated(agent_id, csp, url, state, batch);
    cfg.host_id = host_id.to_string();
    cfg.collector.backoff_max_ms = 500;
    if url.starts_with("https://") {
        let (ca, cert, key) = agent_tls(agent_id, host_id, &state.join("tls"));
        cfg.collector.ca_cert = Some(ca);
        cfg.collector.client_cert = Some(cert);
        cfg.collector.client_key = Some(key);
    }
    cfg
}

/// The TLS material of every test collector in this process.
pub struct TestTls {
    _dir: tempfile::TempDir,
    /// A built-in CA directory (`serve --ca-dir`): ca.pem, server.pem, server.key, revoked.txt.
    pub ca_dir: PathBuf,
    /// The CA certificate clients trust.
    pub ca_cert: PathBuf,
    pub ca: Ca,
    pub server: Arc<ServerTls>,
    /// The admin token every test collector's database holds (named `test-admin`).
    pub admin_token: String,
}

/// The process's test CA, server certificate and admin token, made on first use.
pub fn test_tls() -> &'static TestTls {
    static TLS: OnceLock<TestTls> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca_dir = CaDir::new(dir.path().join("ca"));
        let ca = gpumeter_collector::auth::ca::init(&ca_dir, 30).expect("test CA");
        gpumeter_collector::auth::ca::issue_server(
            &ca_dir,
            &["localhost".to_string()],
            &["127.0.0.1".parse().expect("loopback")],
            30,
        )
        .expect("test server certificate");
        let server = ServerTls::load(&TlsFiles::from_ca_dir(&ca_dir.dir)).expect("test server TLS");
        let admin_token = gpumeter_collector::auth::tokens::new_token().expect("random test token");
        TestTls {
            ca_cert: ca_dir.ca_cert(),
            ca_dir: ca_dir.dir.clone(),
            ca,
            server: Arc::new(server),
            admin_token,
            _dir: dir,
        }
    })
}

/// Stores the process's admin token (`test-admin`) in a database, once.
pub fn ensure_admin_token(store: &dyn Store) -> anyhow::Result<()> {
    let hash = gpumeter_collector::auth::tokens::token_hash(&test_tls().admin_token);
    if store.token_by_hash(&hash)?.is_none() {
        store.create_token(&gpumeter_collector::store::TokenRow {
            name: "test-admin".into(),
            role: "admin".into(),
            hash,
            created_ms: now_ms(),
            revoked_ms: None,
        })?;
    }
    Ok(())
}

/// Writes a certificate from the test CA for `agent_id` on `host_id` into `dir`; returns
/// (CA certificate, agent certificate, agent key).
pub fn agent_tls(agent_id: &str, host_id: &str, dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let issued = test_tls()
        .ca
        .issue_agent(agent_id, host_id, Validity::days(2))
        .expect("agent certificate");
    std::fs::create_dir_all(dir).expect("certificate directory");
    let cert = dir.join("agent.pem");
    let key = dir.join("agent.key");
    gpumeter_collector::auth::ca::write_file(&cert, issued.cert_pem.as_bytes(), 0o644)
        .expect("writing the certificate");
    gpumeter_collector::auth::ca::write_file(&key, issued.key_pem.as_bytes(), 0o600)
        .expect("writing the key");
    (test_tls().ca_cert.clone(), cert, key)
}

/// The `[collector]` lines of an agent.toml that give it a test certificate for `agent_id`
/// on `host_id` (written into `dir`).
pub fn agent_tls_toml(agent_id: &str, host_id: &str, dir: &Path) -> String {
    let (ca, cert, key) = agent_tls(agent_id, host_id, dir);
    format!(
        "ca_cert = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// The arguments that give `gpumeter-collector serve` the test TLS material.
pub fn serve_tls_args() -> Vec<String> {
    vec!["--ca-dir".into(), test_tls().ca_dir.display().to_string()]
}

/// The environment that gives the real CLI the test CA and the admin token.
pub fn cli_env() -> Vec<(&'static str, String)> {
    vec![
        ("GPUMETER_CA_CERT", test_tls().ca_cert.display().to_string()),
        ("GPUMETER_TOKEN", test_tls().admin_token.clone()),
    ]
}

/// A Query client for `url` trusting the test CA, with `token` (none: no token at all).
pub async fn query_client(url: &str, token: Option<&str>) -> QueryClient<AuthChannel> {
    gpumeter_collector::client::query(url, &client_auth(token))
        .await
        .expect("connecting to the collector")
}

/// An Admin client for `url` trusting the test CA, with `token`.
pub async fn admin_client(url: &str, token: Option<&str>) -> AdminClient<AuthChannel> {
    gpumeter_collector::client::admin(url, &client_auth(token))
        .await
        .expect("connecting to the collector")
}

fn client_auth(token: Option<&str>) -> ClientAuth {
    ClientAuth {
        ca_pem: Some(test_tls().ca.cert_pem().as_bytes().to_vec()),
        token: token.map(str::to_string),
    }
}

/// An Ingest client for `url` trusting the test CA and presenting a certificate for
/// (agent id, host id), or none. An error is a refused connection (a TLS handshake fails
/// here).
pub async fn ingest_client(
    url: &str,
    identity: Option<(&str, &str)>,
) -> Result<IngestClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(test_tls().ca.cert_pem().as_bytes()));
    if let Some((agent, host)) = identity {
        let issued = test_tls()
            .ca
            .issue_agent(agent, host, Validity::days(2))
            .expect("agent certificate");
        tls = tls.identity(Identity::from_pem(issued.cert_pem, issued.key_pem));
    }
    let mut ep = Endpoint::from_shared(url.to_string())?.tcp_nodelay(true);
    if url.starts_with("https://") {
        ep = ep.tls_config(tls)?;
    }
    let ch = ep.connect().await?;
    Ok(IngestClient::new(ch)
        .max_decoding_message_size(16 << 20)
        .max_encoding_message_size(16 << 20))
}

/// Runs a simulated agent in-process from `start` to `stop_at` (simulated time, at `speed`)
/// and until the collector has acknowledged everything.
pub fn spawn_sim_agent(
    cfg: AgentConfig,
    scenario: Scenario,
    start: i64,
    stop_at: i64,
    speed: f64,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let clock: Arc<dyn Clock> = Arc::new(ScaledClock::new(start, speed));
    let parts = Parts {
        attributor: Box::new(scenario.attributor()),
        source: Box::new(SimSource::new(scenario, start)),
        clock,
    };
    let agent = Agent::build(cfg, parts)?;
    Ok(tokio::spawn(async move {
        let (tx, rx) = watch::channel(false);
        let r = agent
            .run(
                RunOptions {
                    stop_at: Some(stop_at),
                    start_at: Some(start),
                    drain: true,
                    await_assignments: Some(std::time::Duration::from_secs(10)),
                },
                rx,
            )
            .await;
        drop(tx);
        r
    }))
}

/// Path of a workspace binary. The first call in a test process runs `cargo build` for the
/// binaries (a no-op when they are fresh), so tests never run a stale binary.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<bool>> = OnceLock::new();
    let path = target_dir().join(name);
    let mut built = BUILT
        .get_or_init(|| Mutex::new(false))
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if !*built {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args([
            "build",
            "-p",
            "gpumeter-agent",
            "-p",
            "gpumeter-collector",
            "-p",
            "fake-nvml",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if target_dir().file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo build runs");
        assert!(status.success(), "building the binaries failed");
        *built = true;
    }
    assert!(path.exists(), "{} missing after build", path.display());
    path
}

/// target/debug (or whichever profile runs the tests).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("test binary lives in target/<profile>/deps")
}

/// A report's JSON without what names the head it was computed under (provenance, head ids):
/// its figures, to compare reports computed under different heads.
pub fn without_heads(mut v: serde_json::Value) -> serde_json::Value {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !k.contains("provenance") && !k.contains("head"));
                m.values_mut().for_each(strip);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    strip(&mut v);
    v
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// [`admin_client`] with the admin token.
pub async fn admin_at(url: &str) -> AdminClient<AuthChannel> {
    admin_client(url, Some(&test_tls().admin_token)).await
}

/// [`query_client`] with the admin token.
pub async fn query_at(url: &str) -> QueryClient<AuthChannel> {
    query_client(url, Some(&test_tls().admin_token)).await
}

/// [`ingest_client`] with a certificate for `agent_id` on host `agent_id`.
pub async fn ingest_at(url: &str, agent_id: &str) -> IngestClient<Channel> {
    ingest_client(url, Some((agent_id, agent_id)))
        .await
        .expect("connecting to the collector")
}

/// The real `gpumeter-collector` CLI with the test CA and admin token in its environment.
pub fn cli() -> std::process::Command {
    let mut c = std::process::Command::new(bin("gpumeter-collector"));
    c.envs(cli_env());
    c
}

/// An Ingest client for `url` trusting `ca_pem` and presenting `identity` (certificate and
/// key, PEM), for tests of what the collector refuses.
pub async fn ingest_with(
    url: &str,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<IngestClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ch = Endpoint::from_shared(url.to_string())?
        .tcp_nodelay(true)
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(IngestClient::new(ch))
}

/// Runs one statement that edits a SQLite ledger by hand and returns how many rows it changed.
/// `windows` and `window_principals` are views whose INSTEAD OF triggers write the row tables
/// (`sqlite_names`), and SQLite counts no change for a statement on a view: the count here is
/// of every row written, triggers included.
pub fn rows_changed(
    c: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<u64> {
    let before = c.total_changes();
    c.execute(sql, params)?;
    Ok(c.total_changes() - before)
}

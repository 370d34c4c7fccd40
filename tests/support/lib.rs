//! Helpers shared by the end-to-end tests: an in-process collector on a real SQLite file and
//! port 0, the real binaries, and simulated agents.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use gpumeter_agent::clock::{Clock, ScaledClock};
use gpumeter_agent::config::AgentConfig;
use gpumeter_agent::gpu::sim::{Scenario, SimSource};
use gpumeter_agent::run::{Agent, Parts, RunOptions};
use gpumeter_collector::server::{ServerOptions, run};
use gpumeter_collector::store::sqlite::SqliteStore;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A collector serving on loopback from a SQLite file.
pub struct TestCollector {
    pub addr: SocketAddr,
    pub url: String,
    pub db: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestCollector {
    /// Starts on port 0.
    pub async fn start(db: &Path) -> anyhow::Result<Self> {
        Self::start_on(db, "127.0.0.1:0").await
    }

    /// Starts on a given address (to come back on the same port after a stop).
    pub async fn start_on(db: &Path, addr: &str) -> anyhow::Result<Self> {
        Self::start_with(db, addr, replay_options()).await
    }

    /// Starts with the given options (`ServerOptions::default()` is production's).
    pub async fn start_with(db: &Path, addr: &str, opts: ServerOptions) -> anyhow::Result<Self> {
        let store = Arc::new(SqliteStore::open(db)?);
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(run(listener, store, opts, async move {
            let _ = rx.changed().await;
        }));
        Ok(Self {
            addr,
            url: format!("http://{addr}"),
            db: db.to_path_buf(),
            stop,
            task,
        })
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

/// `gpumeter-collector serve` on `listen` with a SQLite file and, when given, a config file:
/// the real binary, for tests that signal it, limit it or watch it from outside.
pub fn collector_serve_command(
    listen: &str,
    db: &Path,
    config: Option<&Path>,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("gpumeter-collector"));
    cmd.arg("serve")
        .arg("--listen")
        .arg(listen)
        .arg("--db")
        .arg(db);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd
}

/// A Query client for a collector.
pub async fn query_client(
    url: &str,
) -> anyhow::Result<gpumeter_proto::v1::query_client::QueryClient<tonic::transport::Channel>> {
    Ok(gpumeter_proto::v1::query_client::QueryClient::connect(url.to_string()).await?)
}

/// An Admin client for a collector.
pub async fn admin_client(
    url: &str,
) -> anyhow::Result<gpumeter_proto::v1::admin_client::AdminClient<tonic::transport::Channel>> {
    Ok(gpumeter_proto::v1::admin_client::AdminClient::connect(url.to_string()).await?)
}

/// An Ingest client for a collector (for tests that speak the agent protocol by hand).
pub async fn ingest_client(
    url: &str,
) -> anyhow::Result<gpumeter_proto::v1::ingest_client::IngestClient<tonic::transport::Channel>> {
    Ok(gpumeter_proto::v1::ingest_client::IngestClient::connect(url.to_string()).await?)
}

/// An agent config for a simulated host.
pub fn agent_config(agent_id: &str, csp: &str, url: &str, state: &Path, batch: u32) -> AgentConfig {
    let mut cfg = AgentConfig::simulated(agent_id, csp, url, state, batch);
    cfg.collector.backoff_max_ms = 500;
    cfg
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

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

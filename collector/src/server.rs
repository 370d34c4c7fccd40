//! The collector's gRPC server: `run` takes an already bound listener and a shutdown future,
//! so tests bind port 0 and run it in-process. Connections go through
//! [`crate::auth::tls::incoming`] (TLS unless `tls` is `None`, i.e. `serve --insecure`);
//! Query and Admin calls through the bearer-token check ([`crate::auth::tokens::TokenCheck`]).

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpumeter_proto::v1::{
    admin_server::AdminServer, ingest_server::IngestServer, query_server::QueryServer,
};
use gpumeter_telemetry::http::Readiness;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tracing::{info, warn};

use crate::admin::AdminService;
use crate::auth::tokens::{Role, TokenCheck};
use crate::ingest::{IngestService, Limits};
use crate::query::QueryService;
use crate::store::Store;
use crate::store::writer::Writer;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub collector_id: String,
    pub limits: Limits,
    /// Most concurrent streams on one connection.
    pub max_streams_per_connection: u32,
    /// Connections in total and per peer address, and their idle timeout (see `limiter`).
    pub connections: crate::limiter::ConnectionLimits,
    pub http2_keepalive_interval: Duration,
    pub http2_keepalive_timeout: Duration,
    /// After the shutdown signal, how long open connections get to finish before `run`
    /// returns anyway (a silent socket must not hold a stopping collector).
    pub drain_timeout: Duration,
    /// Address of the Prometheus endpoint (`GET /metrics`); none by default.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often the collector signs a ledger head (see `crate::heads`).
    pub head_interval: Duration,
    /// TLS for every connection; `None` serves plain TCP (`serve --insecure`: tokens are still
    /// checked, and only admin-registered agents are admitted).
    pub tls: Option<Arc<crate::auth::tls::ServerTls>>,
    /// Where each closed month's reports are written (`serve --reports-dir`, see
    /// `crate::delivery`); none by default.
    pub reports_dir: Option<std::path::PathBuf>,
    /// How often the reports folder is brought up to date (first at start).
    pub reports_interval: Duration,
    /// Where the web console is served (`serve --console-listen`, see `crate::console`);
    /// none by default. Needs TLS.
    pub console: Option<ConsoleListen>,
    pub console_options: crate::console::ConsoleOptions,
}

/// Where the console listens: an address to bind, or a listener already bound (tests bind
/// port 0 and read the port before the server starts).
#[derive(Debug, Clone)]
pub enum ConsoleListen {
    Addr(std::net::SocketAddr),
    Bound(Arc<Mutex<Option<std::net::TcpListener>>>),
}

impl ConsoleListen {
    /// A listener bound now on `addr` (port 0 for any), and its address.
    pub fn bind(addr: &str) -> std::io::Result<(ConsoleListen, std::net::SocketAddr)> {
        let l = std::net::TcpListener::bind(addr)?;
        let a = l.local_addr()?;
        Ok((ConsoleListen::Bound(Arc::new(Mutex::new(Some(l)))), a))
    }

    async fn listener(&self) -> anyhow::Result<TcpListener> {
        match self {
            ConsoleListen::Addr(a) => Ok(TcpListener::bind(a).await?),
            ConsoleListen::Bound(l) => {
                let l = l
                    .lock()
                    .map_err(|_| anyhow::anyhow!("console listener lock poisoned"))?
                    .take()
                    .ok_or_else(|| anyhow::anyhow!("console listener already taken"))?;
                l.set_nonblocking(true)?;
                Ok(TcpListener::from_std(l)?)
            }
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            collector_id: "collector".into(),
            limits: Limits::default(),
            max_streams_per_connection: 16,
            connections: crate::limiter::ConnectionLimits::default(),
            http2_keepalive_interval: Duration::from_secs(30),
            http2_keepalive_timeout: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(10),
            metrics_listen: None,
            head_interval: Duration::from_secs(600),
            tls: None,
            reports_dir: None,
            reports_interval: Duration::from_secs(600),
            console: None,
            console_options: crate::console::ConsoleOptions::default(),
        }
    }
}

/// Serves Ingest, Query and Admin on `listener` until `shutdown` completes.
pub async fn run(
    listener: TcpListener,
    store: Arc<dyn Store>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    // Live figures (`crate::watch`): the writer tells the hub of every commit; Query.Watch and
    // the console subscribe to it.
    let live: Arc<Mutex<HashSet<String>>> = Arc::new(Mutex::new(HashSet::new()));
    let hub = crate::watch::Hub::start(
        store.clone(),
        crate::watch::HubOptions {
            connected: Some(crate::watch::live_set(live.clone())),
            ..Default::default()
        },
    );
    let writer = Writer::spawn_observed(store.clone(), Some(hub.observer()));
    let hub_closing = hub.clone();
    let (grants_tx, grants_rx) = watch::channel(0u64);
    let (closing_tx, closing_rx) = watch::channel(false);
    let max_msg = opts.limits.max_message_bytes as usize;
    let heads = crate::ingest::AgentHeads::default();
    let ingest = IngestService {
        store: store.clone(),
        writer,
        live,
        heads: heads.clone(),
        limits: opts.limits.clone(),
        collector_id: opts.collector_id.clone(),
        grants_version: grants_rx,
        closing: closing_rx,
    };
    let query = QueryService {
        store: store.clone(),
        agent_heads: heads,
        hub: hub.clone(),
    };
    let mut console_task = None;
    if let Some(listen) = &opts.console {
        let Some(tls) = &opts.tls else {
            anyhow::bail!(
                "the console needs TLS (its session cookie is Secure): drop --console-listen or --insecure"
            );
        };
        let listener = listen.listener().await?;
        let console = Arc::new(crate::console::Console::new(
            query.clone(),
            Some(crate::watch::live_set(ingest.live.clone())),
            &opts.console_options,
        ));
        let mut closing = closing_tx.subscribe();
        let tls = crate::auth::tls::ServerTls {
            config: tls.config.clone(),
            handshake_timeout: opts.connections.handshake_timeout,
        };
        console_task = Some(tokio::spawn(async move {
            let stop = async move {
                let _ = closing.wait_for(|c| *c).await;
            };
            if let Err(e) = crate::console::serve(listener, &tls, console, stop).await {
                tracing::error!(error = %e, "the console stopped");
            }
        }));
    }
    let store_for_heads = store.clone();
    let query_check = TokenCheck {
        store: store.clone(),
        need: Role::Auditor,
        service: "Query",
    };
    let admin_check = TokenCheck {
        store: store.clone(),
        need: Role::Admin,
        service: "Admin",
    };
    let grants_tx = Arc::new(grants_tx);
    if let Some(every) = store.shared_poll() {
        tokio::spawn(watch_shared_grants(
            store.clone(),
            every,
            grants_tx.clone(),
            closing_tx.subscribe(),
        ));
    }
    let admin = AdminService {
        store,
        grants_version: grants_tx,
        grants_lock: Arc::new(tokio::sync::Mutex::new(())),
    };
    let (ready_tx, ready_rx) = watch::channel(Readiness::NotReady("starting".into()));
    if let Some(maddr) = opts.metrics_listen {
        let listener = TcpListener::bind(maddr).await?;
        let registry = crate::metrics::registry(crate::metrics::CollectorMetrics::new(
            opts.collector_id.clone(),
            ingest.live.clone(),
            ingest.writer.stats.clone(),
            ingest.store.clone(),
        ));
        let mut closing = closing_tx.subscribe();
        tokio::spawn(gpumeter_telemetry::http::serve(
            listener,
            Arc::new(registry),
            ready_rx,
            async move {
                let _ = closing.wait_for(|c| *c).await;
            },
        ));
    }
    let _ = ready_tx.send(Readiness::Ready);
    if let Some(dir) = opts.reports_dir.clone() {
        tokio::spawn(deliver_reports(
            store_for_heads.clone(),
            dir,
            opts.reports_interval,
            closing_tx.subscribe(),
        ));
    }
    tokio::spawn(sign_heads(
        store_for_heads,
        opts.head_interval,
        closing_tx.subscribe(),
    ));
    match &opts.tls {
        Some(_) => {
            info!(%addr, "collector listening (TLS; agents by client certificate, people by token)")
        }
        None => {
            warn!(%addr, "collector listening WITHOUT TLS (--insecure): traffic and tokens travel in clear text; only admin-registered agents are admitted")
        }
    }
    // Accepted TCP connections pass the connection limiter (total, per address, idle) before
    // the TLS handshake, so a flood of idle sockets is refused before it costs a handshake.
    let limited = crate::limiter::incoming(
        listener,
        crate::limiter::Limiter::new(opts.connections.clone()),
    );
    let tls = opts.tls.as_ref().map(|t| {
        Arc::new(crate::auth::tls::ServerTls {
            config: t.config.clone(),
            handshake_timeout: opts.connections.handshake_timeout,
        })
    });
    let (incoming, accept_task) = crate::auth::tls::incoming(Box::pin(limited), tls);
    let mut draining = closing_tx.subscribe();
    let drain_timeout = opts.drain_timeout;
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(opts.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(opts.http2_keepalive_timeout))
        .max_concurrent_streams(opts.max_streams_per_connection)
        .add_service(InterceptedService::new(
            IngestServer::new(ingest)
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
            crate::auth::carry_identity,
        ))
        .add_service(InterceptedService::new(
            QueryServer::new(query).max_decoding_message_size(1 << 20),
            query_check,
        ))
        .add_service(InterceptedService::new(
            AdminServer::new(admin).max_decoding_message_size(max_msg * 2),
            admin_check,
        ))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = ready_tx.send(Readiness::NotReady("shutting down".into()));
            // Open sessions are long-lived streams: end them, or a graceful stop waits forever.
            let _ = closing_tx.send(true);
            hub_closing.close();
        });
    let result = tokio::select! {
        r = serve => r,
        _ = async {
            let _ = draining.wait_for(|c| *c).await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!(
                timeout_s = drain_timeout.as_secs(),
                "connections still open after the drain timeout; stopping anyway"
            );
            Ok(())
        }
    };
    // The accept task owns the listener: end it before returning, so the port is free.
    accept_task.abort();
    let _ = accept_task.await;
    if let Some(mut task) = console_task {
        if tokio::time::timeout(drain_timeout, &mut task)
            .await
            .is_err()
        {
            task.abort();
            let _ = task.await;
        }
    }
    result?;
    info!("collector stopped");
    Ok(())
}

/// Signs a ledger head every `interval` until the server closes. A failure is logged and
/// retried at the next tick: heads are witnesses, ingest does not wait on them.
async fn sign_heads(store: Arc<dyn Store>, interval: Duration, mut closing: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = closing.wait_for(|c| *c) => return,
            _ = tick.tick() => {}
        }
        let store = store.clone();
        let at = crate::ingest::now_ms();
        match tokio::task::spawn_blocking(move || store.sign_head(at)).await {
            Ok(Ok(h)) => info!(head = h.id, agents = h.agents, "signed a ledger head"),
            Ok(Err(e)) => tracing::error!(error = %e, "could not sign a ledger head"),
            Err(e) => tracing::error!(error = %e, "head signing task failed"),
        }
    }
}

/// Brings the reports folder up to date at start and every `interval` (`crate::delivery`):
/// closed months' missing files are written, so a restart catches up on what it missed.
async fn deliver_reports(
    store: Arc<dyn Store>,
    dir: std::path::PathBuf,
    interval: Duration,
    mut closing: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = closing.wait_for(|c| *c) => return,
            _ = tick.tick() => {}
        }
        let (store, d) = (store.clone(), dir.clone());
        let now = crate::ingest::now_ms();
        match tokio::task::spawn_blocking(move || {
            crate::delivery::catch_up(store.as_ref(), &d, now)
        })
        .await
        {
            Ok(Ok(pass)) if !pass.written.is_empty() => info!(
                dir = %dir.display(),
                files = pass.written.len(),
                "wrote closed months' reports"
            ),
            Ok(Ok(_)) => {}
            // Reports are not written, so an operator must act; the next pass tries again.
            Ok(Err(e)) => {
                tracing::error!(dir = %dir.display(), error = %e, "could not write closed months' reports")
            }
            Err(e) => tracing::error!(error = %e, "report delivery task failed"),
        }
    }
}

/// Bumps `grants` whenever the store's assignments version moves without this collector
/// (another collector sharing the store changed grants), so sessions here push the new
/// assignment sets. Read every `every` until the server closes.
async fn watch_shared_grants(
    store: Arc<dyn Store>,
    every: Duration,
    grants: Arc<watch::Sender<u64>>,
    mut closing: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen: Option<u64> = None;
    loop {
        tokio::select! {
            _ = closing.wait_for(|c| *c) => return,
            _ = tick.tick() => {}
        }
        let s = store.clone();
        // No host is named "": only the version is read.
        let version = match tokio::task::spawn_blocking(move || s.assignments("")).await {
            Ok(Ok((v, _))) => v,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not read the assignments version");
                continue;
            }
            Err(_) => continue,
        };
        if seen.is_some_and(|s| s != version) {
            grants.send_modify(|v| *v += 1);
        }
        seen = Some(version);
    }
}

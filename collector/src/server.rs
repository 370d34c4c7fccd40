//! The collector's gRPC server: `run` takes an already bound listener and a shutdown future,
//! so tests bind port 0 and run it in-process.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpumeter_proto::v1::{
    admin_server::AdminServer, ingest_server::IngestServer, query_server::QueryServer,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

use crate::admin::AdminService;
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
    let writer = Writer::spawn(store.clone());
    let (grants_tx, grants_rx) = watch::channel(0u64);
    let (closing_tx, closing_rx) = watch::channel(false);
    let max_msg = opts.limits.max_message_bytes as usize;
    let ingest = IngestService {
        store: store.clone(),
        writer,
        live: Arc::new(Mutex::new(HashSet::new())),
        limits: opts.limits.clone(),
        collector_id: opts.collector_id.clone(),
        grants_version: grants_rx,
        closing: closing_rx,
    };
    let query = QueryService {
        store: store.clone(),
    };
    let admin = AdminService {
        store,
        grants_version: Arc::new(grants_tx),
        grants_lock: Arc::new(tokio::sync::Mutex::new(())),
    };
    if let Some(maddr) = opts.metrics_listen {
        let listener = TcpListener::bind(maddr).await?;
        let live = ingest.live.clone();
        let stats = ingest.writer.stats.clone();
        let render: gpumeter_agent::metrics::Render = Arc::new(move || {
            use gpumeter_agent::metrics::metric;
            use std::sync::atomic::Ordering::Relaxed;
            let sessions = live.lock().map(|l| l.len()).unwrap_or(0);
            let mut out = String::new();
            metric(
                &mut out,
                "gpumeter_collector_live_sessions",
                "gauge",
                "Agents with an open session.",
                sessions as f64,
            );
            metric(
                &mut out,
                "gpumeter_collector_commits_total",
                "counter",
                "Ingest transactions committed.",
                stats.commits.load(Relaxed) as f64,
            );
            metric(
                &mut out,
                "gpumeter_collector_records_committed_total",
                "counter",
                "Records committed (duplicates included).",
                stats.records.load(Relaxed) as f64,
            );
            metric(
                &mut out,
                "gpumeter_collector_failed_commits_total",
                "counter",
                "Ingest transactions that failed (nothing acknowledged).",
                stats.failed_commits.load(Relaxed) as f64,
            );
            metric(
                &mut out,
                "gpumeter_collector_failed_batches_total",
                "counter",
                "Batches that failed alone (the rest of their commit went through).",
                stats.failed_batches.load(Relaxed) as f64,
            );
            out
        });
        let mut closing = closing_tx.subscribe();
        tokio::spawn(gpumeter_agent::metrics::serve(
            listener,
            render,
            async move {
                let _ = closing.wait_for(|c| *c).await;
            },
        ));
    }
    info!(%addr, "collector listening");
    let incoming = crate::limiter::incoming(
        listener,
        crate::limiter::Limiter::new(opts.connections.clone()),
    );
    let mut draining = closing_tx.subscribe();
    let drain_timeout = opts.drain_timeout;
    let serve = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(opts.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(opts.http2_keepalive_timeout))
        .max_concurrent_streams(opts.max_streams_per_connection)
        .add_service(
            IngestServer::new(ingest)
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(max_msg),
        )
        .add_service(QueryServer::new(query).max_decoding_message_size(1 << 20))
        .add_service(AdminServer::new(admin).max_decoding_message_size(max_msg * 2))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            // Open sessions are long-lived streams: end them, or a graceful stop waits forever.
            let _ = closing_tx.send(true);
        });
    tokio::select! {
        r = serve => r?,
        _ = async {
            let _ = draining.wait_for(|c| *c).await;
            tokio::time::sleep(drain_timeout).await;
        } => {
            tracing::warn!(
                timeout_s = drain_timeout.as_secs(),
                "connections still open after the drain timeout; stopping anyway"
            );
        }
    }
    info!("collector stopped");
    Ok(())
}

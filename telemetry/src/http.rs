//! The operators' HTTP endpoint, served by axum (already in the tree under tonic):
//!
//! - `GET|HEAD /metrics` — every metric of a prometheus-client [`Registry`]: OpenMetrics text
//!   to a client that asks for it in `Accept` (as Prometheus does), the classic Prometheus text
//!   format 0.0.4 to anyone else (curl, `promtool check metrics`); a query string is ignored,
//!   as scrapers add their own.
//! - `GET|HEAD /healthz` — 200 while the process serves HTTP at all (liveness).
//! - `GET|HEAD /readyz` — 200 while the program says it is doing its job, 503 with the reason
//!   otherwise (readiness): what "ready" means is the caller's, through [`Readiness`].
//!
//! Anything else is 404, other methods 405. Read-only: nothing here changes state.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::info;

/// Content type of the exposition prometheus-client writes.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the classic Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text exposition. They differ
/// only where prometheus-client's output uses OpenMetrics features: a counter's family is
/// named without `_total` in OpenMetrics and with it in the classic format, and the classic
/// format has no `# UNIT` or `# EOF` lines.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Whether the program is ready, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    NotReady(String),
}

#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    ready: watch::Receiver<Readiness>,
}

/// The router, for tests and for callers that serve it themselves.
pub fn router(registry: Arc<Registry>, ready: watch::Receiver<Readiness>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Shared { registry, ready })
}

/// Serves the endpoint on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    ready: watch::Receiver<Readiness>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics and health endpoint listening");
    }
    axum::serve(listener, router(registry, ready))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics(State(s): State<Shared>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) if openmetrics => {
            ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response()
        }
        Ok(()) => (
            [(header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            to_prometheus_text(&body),
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be encoded\n",
        )
            .into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Shared>) -> Response {
    let state = s.ready.borrow().clone();
    match state {
        Readiness::Ready => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Readiness::NotReady(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counter_families_with_total() {
        let om = "# HELP a_seconds Time.\n# TYPE a_seconds histogram\n# UNIT a_seconds seconds\na_seconds_sum 1.0\n# HELP b Bees.\n# TYPE b counter\nb_total{x=\"1\"} 2\n# HELP c Sees.\n# TYPE c gauge\nc 3\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_seconds Time.\n# TYPE a_seconds histogram\na_seconds_sum 1.0\n# HELP b_total Bees.\n# TYPE b_total counter\nb_total{x=\"1\"} 2\n# HELP c Sees.\n# TYPE c gauge\nc 3\n"
        );
    }
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Sends `request` in the given pieces (a pause between them) and reads the response.
    async fn exchange(addr: std::net::SocketAddr, pieces: &[&str]) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        for p in pieces {
            c.write_all(p.as_bytes()).await.unwrap();
            c.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        let mut s = String::new();
        c.read_to_string(&mut s).await.unwrap();
        s
    }

    #[tokio::test]
    async fn metrics_health_and_readiness_over_real_http() {
        let mut registry = Registry::default();
        let c = Counter::<u64>::default();
        c.inc_by(3);
        registry.register("gpumeter_x", "An x.", c);
        let (ready_tx, ready_rx) = watch::channel(Readiness::NotReady("store not open".into()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(registry), ready_rx, async move {
            let _ = stop_rx.await;
        }));
        let close = "Connection: close\r\n\r\n";

        let ok = exchange(addr, &["GET /metrics HTTP/1.1\r\nHost: x\r\n", close]).await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("gpumeter_x_total 3"), "{ok}");
        assert!(ok.contains("# TYPE gpumeter_x_total counter"), "{ok}");
        assert!(ok.contains("version=0.0.4"), "{ok}");
        assert!(!ok.contains("# EOF"), "{ok}");
        let om = exchange(
            addr,
            &["GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\n", close],
        )
        .await;
        assert!(om.contains("# TYPE gpumeter_x counter"), "{om}");
        assert!(om.contains("# EOF"), "{om}");
        // A query string and a request split across writes are still /metrics.
        let q = exchange(
            addr,
            &["GET /metrics?x=1 HT", "TP/1.1\r\nHost: x\r\n", close],
        )
        .await;
        assert!(q.contains("gpumeter_x_total 3"), "{q}");
        let head = exchange(
            addr,
            &[&format!("HEAD /metrics HTTP/1.1\r\nHost: x\r\n{close}")],
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !head.contains("gpumeter_x_total"),
            "HEAD has no body: {head}"
        );

        let live = exchange(
            addr,
            &[&format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{close}")],
        )
        .await;
        assert!(live.starts_with("HTTP/1.1 200"), "{live}");
        let not = exchange(
            addr,
            &[&format!("GET /readyz HTTP/1.1\r\nHost: x\r\n{close}")],
        )
        .await;
        assert!(not.starts_with("HTTP/1.1 503"), "{not}");
        assert!(not.contains("store not open"), "{not}");
        ready_tx.send(Readiness::Ready).unwrap();
        let yes = exchange(
            addr,
            &[&format!("GET /readyz HTTP/1.1\r\nHost: x\r\n{close}")],
        )
        .await;
        assert!(yes.starts_with("HTTP/1.1 200"), "{yes}");

        let missing = exchange(addr, &[&format!("GET / HTTP/1.1\r\nHost: x\r\n{close}")]).await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = exchange(
            addr,
            &[&format!(
                "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{close}"
            )],
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");

        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
    }
}

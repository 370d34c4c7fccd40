//! Prometheus metrics: a minimal HTTP endpoint serving the text exposition format on
//! `GET /metrics`, shared by the agent and the collector. Read-only; anything else gets 404.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::ledger::Ledger;
use crate::uplink::UplinkStatus;

/// Renders the current metrics as Prometheus text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// One metric in the text format: `# HELP`, `# TYPE` and its sample.
pub fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    out.push_str(&format!(
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
    ));
}

/// Serves `render` on `listener` until `shutdown` completes. Each connection gets one
/// response; a slow or silent client is dropped after 5 s.
pub async fn serve(
    listener: TcpListener,
    render: Render,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "metrics listening");
    }
    tokio::pin!(shutdown);
    loop {
        let (mut conn, _) = tokio::select! {
            c = listener.accept() => c?,
            _ = &mut shutdown => return Ok(()),
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let first = request.lines().next().unwrap_or_default();
            let (status, body) = if first.starts_with("GET /metrics ") || first == "GET /metrics" {
                ("200 OK", render())
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = conn.write_all(response.as_bytes()).await {
                debug!(error = %e, "metrics client went away");
            }
            let _ = conn.shutdown().await;
        });
    }
}

/// The agent's metrics, from its ledger and uplink status.
pub fn agent_render(ledger: Ledger, status: tokio::sync::watch::Receiver<UplinkStatus>) -> Render {
    Arc::new(move || {
        let (head, pending, bytes, epoch, acked) = {
            let g = ledger.lock();
            (
                g.spool.head().0,
                g.spool.pending(),
                g.spool.bytes(),
                g.spool.epoch(),
                g.spool.acked().0,
            )
        };
        let st = status.borrow().clone();
        let mut out = String::new();
        metric(
            &mut out,
            "gpumeter_agent_head_seq",
            "gauge",
            "Seq of the last record written to the spool.",
            head as f64,
        );
        metric(
            &mut out,
            "gpumeter_agent_acked_seq",
            "gauge",
            "Seq the collector has acknowledged as durable.",
            acked as f64,
        );
        metric(
            &mut out,
            "gpumeter_agent_spool_pending_records",
            "gauge",
            "Records spooled and not yet acknowledged.",
            pending as f64,
        );
        metric(
            &mut out,
            "gpumeter_agent_spool_bytes",
            "gauge",
            "Bytes of spool segment files on disk.",
            bytes as f64,
        );
        metric(
            &mut out,
            "gpumeter_agent_epoch",
            "gauge",
            "The agent's ledger epoch.",
            epoch as f64,
        );
        metric(
            &mut out,
            "gpumeter_agent_collector_connected",
            "gauge",
            "1 while a session with the collector is open.",
            if st.connected { 1.0 } else { 0.0 },
        );
        metric(
            &mut out,
            "gpumeter_agent_sessions_total",
            "counter",
            "Sessions opened with the collector.",
            st.sessions as f64,
        );
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_and_404s_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let render: Render = Arc::new(|| {
            let mut s = String::new();
            metric(&mut s, "x_total", "counter", "An x.", 3.0);
            s
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, render, async move {
            let _ = rx.await;
        }));
        let get = |path: &'static str| async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut s = String::new();
            c.read_to_string(&mut s).await.unwrap();
            s
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.ends_with("# HELP x_total An x.\n# TYPE x_total counter\nx_total 3\n"),
            "{ok}"
        );
        assert!(get("/").await.starts_with("HTTP/1.1 404"));
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }
}

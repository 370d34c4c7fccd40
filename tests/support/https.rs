//! A plain HTTP/1.1-over-TLS client for tests of the web console: one request per
//! connection, the server's certificate checked against the test CA, the answer's status,
//! headers and body as they came (no redirect followed), so tests see exactly what a browser
//! is sent.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// Header names lowercased, in order (a name may repeat).
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `method path` to the console at `addr` with `headers` (and `body`, form-encoded).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> anyhow::Result<Answer> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(
        crate::test_tls().ca.cert_pem().as_bytes(),
    )?)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    tls.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    // A server may close without a TLS close_notify; what was read counts.
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP answer: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status line: {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Posts the login form with `token`, to come back to `next` (an encoded path), as a browser
/// on the console's own page posts it (with its Origin); the answer as it came.
pub async fn post_login(addr: SocketAddr, token: &str, next: &str) -> anyhow::Result<Answer> {
    let origin = format!("https://{addr}");
    request(
        addr,
        "POST",
        "/login",
        &[("Origin", &origin)],
        Some(&format!("token={token}&next={next}")),
    )
    .await
}

/// Logs in with `token` by the login form and returns the `Cookie` header value that carries
/// the session.
pub async fn login(addr: SocketAddr, token: &str) -> anyhow::Result<String> {
    let a = post_login(addr, token, "%2F").await?;
    let set = a
        .header("set-cookie")
        .ok_or_else(|| anyhow::anyhow!("no session cookie: {a:?}"))?;
    Ok(set.split(';').next().unwrap_or_default().to_string())
}

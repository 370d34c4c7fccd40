//! The collector's TLS transport: a rustls server config whose client-certificate check
//! wraps the CA chain check with a revocation check read at every handshake, and the accept
//! path that turns a stream of accepted connections into TLS connections tonic serves.
//!
//! Accept path: any stream of accepted connections (`IO`: `AsyncRead + AsyncWrite + Unpin +
//! Connected`, e.g. `TcpStream`, or a wrapper that limits connections) → [`incoming`]: each
//! connection's handshake runs in its own task under a timeout, so a slow client holds up
//! nobody else → [`Conn`] (carrying [`ConnInfo`]: remote address, TLS or not, the certified
//! agent identity) → `tonic::transport::Server::serve_with_incoming_shutdown`.
//!
//! Client certificates are optional at the TLS layer (people calling Query and Admin present
//! bearer tokens, not certificates), but one that is presented must chain to the CA, be
//! within its validity and not be revoked, or the handshake fails. Ingest then refuses a
//! connection that proved no agent identity (see [`super::check_hello`]).
//! A revocation takes effect at the next handshake; a session already open when its
//! certificate is revoked continues until it reconnects.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{info, warn};

use super::{ConnInfo, identity_from_der};

/// Why the TLS material cannot be used (`serve` exits 64, naming the file).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS setup: {0}")]
    Config(String),
}

/// Where the server's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The collector's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA whose certificates agents present (PEM).
    pub client_ca: PathBuf,
    /// Revoked serials, one per line; read at every handshake.
    pub revoked: Option<PathBuf>,
}

impl TlsFiles {
    /// The layout of a built-in CA directory (see [`super::ca`]).
    pub fn from_ca_dir(dir: &Path) -> Self {
        let d = super::ca::CaDir::new(dir);
        Self {
            cert: d.server_cert(),
            key: d.server_key(),
            client_ca: d.ca_cert(),
            revoked: Some(d.revoked()),
        }
    }
}

/// The server side of TLS, ready to accept.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// A connection that has not finished its handshake by then is closed.
    pub handshake_timeout: Duration,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::File {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::File {
            what,
            path: path.display().to_string(),
            reason: "no PEM certificate in it".into(),
        });
    }
    Ok(certs)
}

impl ServerTls {
    /// Reads the server's certificate and key and the client CA.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let chain = certs("--tls-cert", &files.cert)?;
        let key_pem = read("--tls-key", &files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::File {
            what: "--tls-key",
            path: files.key.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut roots = RootCertStore::empty();
        for c in certs("--client-ca", &files.client_ca)? {
            roots.add(c).map_err(|e| TlsError::File {
                what: "--client-ca",
                path: files.client_ca.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        if let Some(r) = &files.revoked {
            // Fail at start, not at the first handshake, when the list is unreadable.
            super::ca::read_revoked(r).map_err(|e| TlsError::File {
                what: "--revoked",
                path: r.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let verifier = Arc::new(RevocationChecking {
            inner,
            revoked: files.revoked.clone(),
        });
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            handshake_timeout: Duration::from_secs(10),
        })
    }
}

/// The CA chain check, then the revocation list, read fresh at every handshake (a missing
/// list is empty; an unreadable one refuses every certificate: fail closed).
#[derive(Debug)]
struct RevocationChecking {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Option<PathBuf>,
}

impl ClientCertVerifier for RevocationChecking {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if let Some(path) = &self.revoked {
            let revoked = super::ca::read_revoked(path).map_err(|e| {
                warn!(error = %e, "revocation list unreadable; refusing client certificates");
                rustls::Error::General(format!("revocation list unreadable: {e}"))
            })?;
            use x509_parser::prelude::{FromDer, X509Certificate};
            let (_, cert) = X509Certificate::from_der(end_entity.as_ref())
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            let serial = super::serial_hex(cert.tbs_certificate.raw_serial());
            if revoked.contains(&serial) {
                info!(%serial, "refused a revoked client certificate");
                return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
            }
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The remote address in a connection's own connect info (implemented for tonic's
/// `TcpConnectInfo`; a wrapper with its own connect info implements it too).
pub trait RemoteAddr {
    fn remote_addr(&self) -> Option<SocketAddr>;
}

impl RemoteAddr for TcpConnectInfo {
    fn remote_addr(&self) -> Option<SocketAddr> {
        TcpConnectInfo::remote_addr(self)
    }
}

enum Io<IO> {
    Plain(IO),
    Tls(Box<tokio_rustls::server::TlsStream<IO>>),
}

/// An accepted connection, TLS or plain, with what it proves.
pub struct Conn<IO> {
    io: Io<IO>,
    info: ConnInfo,
}

impl<IO> Connected for Conn<IO> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// Handshakes one connection: the identity its certificate proves, if any.
async fn handshake<IO>(io: IO, tls: &ServerTls, remote: Option<SocketAddr>) -> io::Result<Conn<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config.clone());
    let stream = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(io))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let identity = match stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
    {
        Some(der) => identity_from_der(der.as_ref())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
        None => None,
    };
    Ok(Conn {
        io: Io::Tls(Box::new(stream)),
        info: ConnInfo {
            remote_addr: remote,
            tls: true,
            identity,
        },
    })
}

/// Turns accepted connections into connections tonic serves: TLS-handshaken when `tls` is
/// given (each in its own task, under the handshake timeout; a failed handshake is logged
/// and dropped), as they are otherwise. The returned task owns `accepted`: abort and await it
/// after the server stops, so the listener is closed before `run` returns.
pub fn incoming<S, IO>(
    accepted: S,
    tls: Option<Arc<ServerTls>>,
) -> (ReceiverStream<io::Result<Conn<IO>>>, JoinHandle<()>)
where
    S: Stream<Item = io::Result<IO>> + Send + Unpin + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: RemoteAddr,
{
    let (tx, rx) = mpsc::channel::<io::Result<Conn<IO>>>(64);
    let task = tokio::spawn(async move {
        let mut accepted = accepted;
        loop {
            let next = tokio::select! {
                _ = tx.closed() => return,
                n = accepted.next() => n,
            };
            let io = match next {
                None => return,
                Some(Ok(io)) => io,
                Some(Err(e)) => {
                    // Out of file descriptors and the like: say so, back off, keep serving.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let remote = io.connect_info().remote_addr();
            match &tls {
                None => {
                    let conn = Conn {
                        io: Io::Plain(io),
                        info: ConnInfo {
                            remote_addr: remote,
                            tls: false,
                            identity: None,
                        },
                    };
                    if tx.send(Ok(conn)).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let tls = tls.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match handshake(io, &tls, remote).await {
                            Ok(conn) => {
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Err(e) => {
                                info!(peer = ?remote, error = %e, "TLS handshake refused");
                            }
                        }
                    });
                }
            }
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Accepted TCP connections with `TCP_NODELAY` set (acks are small and latency-bound).
pub fn tcp_accepted(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = io::Result<tokio::net::TcpStream>> + Send + Unpin + 'static {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|r| {
        r.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    })
}

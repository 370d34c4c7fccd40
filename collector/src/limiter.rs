//! Connection limits at the TCP edge, before TLS or HTTP/2 see a byte.
//!
//! Rules:
//! - Every accepted connection holds a permit for its whole life: one of
//!   `limits.max_connections` in total and one of `limits.max_connections_per_ip` for its peer
//!   address. A connection over either limit is closed at once, with a warning that names the
//!   limit; the permits of the others are untouched, so a flood from one address cannot lock
//!   out agents elsewhere, and the collector never runs out of file descriptors under the
//!   usual 1,024 (the default total leaves room for the database and the process).
//! - A connection that reads nothing for `limits.connection_idle_timeout_s` is closed. HTTP/2
//!   keepalive pings (answered by every live client) count as reads, so a live agent between
//!   windows is never idle; a socket that never speaks, or stopped answering, is.
//! - TCP_NODELAY is set on every connection (acks are small and must not wait).
//!
//! [`LimitedStream`] is generic over the stream it wraps and implements `AsyncRead`,
//! `AsyncWrite` and tonic's `Connected` (delegating the connect info), so a TLS acceptor can
//! sit on top of it unchanged. [`incoming`] turns a bound listener into the stream of admitted
//! connections that `Server::serve_with_incoming_shutdown` takes.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;
use tracing::warn;

/// How many connections may be open, and how long one may stay silent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// `limits.max_connections`.
    pub max_total: usize,
    /// `limits.max_connections_per_ip`.
    pub max_per_ip: usize,
    /// `limits.connection_idle_timeout_s`.
    pub idle_timeout: Duration,
    /// `limits.tls_handshake_timeout_s`: a connection that has not finished its TLS
    /// handshake by then is closed.
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_total: 768,
            max_per_ip: 256,
            idle_timeout: Duration::from_secs(300),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{open} connections are open, the limit (limits.max_connections) is {limit}")]
    Total { open: usize, limit: usize },
    #[error(
        "{open} connections are open from {ip}, the limit (limits.max_connections_per_ip) is {limit}"
    )]
    PerIp {
        ip: IpAddr,
        open: usize,
        limit: usize,
    },
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Hands out connection permits; cloning shares the counts.
#[derive(Debug, Clone)]
pub struct Limiter {
    limits: ConnectionLimits,
    counts: Arc<Mutex<Counts>>,
}

/// A held place under the limits; released when dropped.
#[derive(Debug)]
pub struct Permit {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Limiter {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            counts: Arc::default(),
        }
    }

    pub fn limits(&self) -> &ConnectionLimits {
        &self.limits
    }

    /// Takes a permit for a connection from `ip`, or says which limit it is over.
    pub fn try_acquire(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.limits.max_total {
            return Err(Refusal::Total {
                open: c.total,
                limit: self.limits.max_total,
            });
        }
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.limits.max_per_ip {
            return Err(Refusal::PerIp {
                ip,
                open: from_ip,
                limit: self.limits.max_per_ip,
            });
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        Ok(Permit {
            counts: self.counts.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// An admitted connection: the stream, its permit, and its idle deadline.
#[derive(Debug)]
pub struct LimitedStream<S> {
    inner: S,
    _permit: Permit,
    idle_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> LimitedStream<S> {
    pub fn new(inner: S, permit: Permit, idle_timeout: Duration) -> Self {
        Self {
            inner,
            _permit: permit,
            idle_timeout,
            deadline: Box::pin(tokio::time::sleep(idle_timeout)),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LimitedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = Instant::now() + self.idle_timeout;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connection idle for {} s (limits.connection_idle_timeout_s)",
                        self.idle_timeout.as_secs()
                    ),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for LimitedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for LimitedStream<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The connections `listener` accepts that the limiter admits, with TCP_NODELAY set. Accept
/// errors (out of descriptors, a reset before accept) are logged and waited out briefly; the
/// stream never ends on its own.
pub fn incoming(
    listener: TcpListener,
    limiter: Limiter,
) -> impl Stream<Item = Result<LimitedStream<TcpStream>, io::Error>> + Send + 'static {
    futures::stream::unfold((listener, limiter), |(listener, limiter)| async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match limiter.try_acquire(peer.ip()) {
                Ok(permit) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        warn!(peer = %peer, error = %e, "cannot set TCP_NODELAY");
                    }
                    let idle = limiter.limits().idle_timeout;
                    let conn = LimitedStream::new(stream, permit, idle);
                    return Some((Ok(conn), (listener, limiter)));
                }
                Err(refusal) => {
                    warn!(peer = %peer, "connection refused: {refusal}");
                    drop(stream);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;

    #[test]
    fn permits_are_counted_per_address_and_released_on_drop() {
        let l = Limiter::new(ConnectionLimits {
            max_total: 3,
            max_per_ip: 2,
            idle_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = l.try_acquire(a).unwrap();
        let _p2 = l.try_acquire(a).unwrap();
        let e = l.try_acquire(a).unwrap_err();
        assert!(
            e.to_string().contains("limits.max_connections_per_ip"),
            "{e}"
        );
        let _p3 = l.try_acquire(b).unwrap();
        let e = l.try_acquire(b).unwrap_err();
        assert!(matches!(e, Refusal::Total { open: 3, limit: 3 }), "{e}");
        drop(p1);
        assert_eq!(l.open(), 2);
        assert!(l.try_acquire(b).is_ok());
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_idle_ones_time_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limiter = Limiter::new(ConnectionLimits {
            max_total: 10,
            max_per_ip: 1,
            idle_timeout: Duration::from_millis(300),
            handshake_timeout: Duration::from_secs(1),
        });
        let mut conns = Box::pin(incoming(listener, limiter.clone()));
        let _first = TcpStream::connect(addr).await.unwrap();
        let mut admitted = conns.next().await.unwrap().unwrap();
        assert!(admitted.get_ref().nodelay().unwrap());
        assert_eq!(
            admitted.connect_info().remote_addr().map(|a| a.ip()),
            Some("127.0.0.1".parse().unwrap())
        );
        // A second connection from the same address is closed by the server.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let closed = tokio::spawn(async move {
            let mut b = [0u8; 1];
            second.read(&mut b).await
        });
        // The refusal happens inside the stream, which looks for the next admitted one.
        let next = tokio::time::timeout(Duration::from_millis(500), conns.next()).await;
        assert!(next.is_err(), "the refused connection is not handed out");
        let r = tokio::time::timeout(Duration::from_secs(2), closed)
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "refused connection closed: {r:?}"
        );
        // The admitted one goes idle and its read fails with the limit's name.
        let mut b = [0u8; 1];
        let e = admitted.read(&mut b).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("connection_idle_timeout_s"), "{e}");
        drop(admitted);
        assert_eq!(limiter.open(), 0);
    }
}

//! The public listener: connections admitted under a cap (in all and per client address),
//! TLS, then HTTP/1.1 with bounded headers and timeouts at every stage, so that a slow or
//! idle client cannot hold a connection:
//!
//! | stage | bound |
//! |---|---|
//! | TCP accepted | over `max_connections_per_ip` from one address: served only for signed Discord interactions, `503 too_many_connections` for anything else; over `max_connections`: every request answered `503` with `Retry-After`, the connection closed after it, while a small overflow allowance lasts, then closed at once |
//! | TLS handshake | `handshake_timeout` |
//! | request line and headers | `header_timeout`, `max_header_bytes` (431 beyond) |
//! | idle between requests | `header_timeout` |
//! | body | the router's request timeout and body limit ([`crate::limits`]) |
//! | answer unread by the client | `send_timeout` without progress |

use crate::limits::client_of;
use axum::Router;
use axum_server::accept::Accept;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How the listener treats connections.
#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// Open requests get this long to finish once shutdown begins.
    pub drain: Duration,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub send_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            drain: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(15),
            send_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_connections: 1024,
            max_connections_per_ip: 64,
        }
    }
}

/// Serves `router` over TLS on an already bound listener until `shutdown` fires, then lets
/// open requests finish for up to `options.drain`.
pub async fn serve_tls(
    listener: std::net::TcpListener,
    tls: RustlsConfig,
    router: Router,
    shutdown: CancellationToken,
    options: &ListenerOptions,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    let drain = options.drain;
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopper.graceful_shutdown(Some(drain));
    });
    let gate = ConnectionGate::new(options);
    let acceptor = RustlsAcceptor::new(tls)
        .handshake_timeout(options.handshake_timeout)
        .acceptor(gate);
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(acceptor)
        .http1_only()
        .handle(handle)
        .accept_error_handler(|peer, error| {
            tracing::debug!(peer = ?peer, %error, "connection not served");
        });
    server
        .http_builder()
        .http1()
        .header_read_timeout(options.header_timeout)
        .max_buf_size(options.max_header_bytes.max(8192))
        .max_headers(100);
    server
        .serve(router.into_make_service_with_connect_info::<SocketAddr>())
        .await
}

/// What a connection may do, as the caps admitted it; every request it carries holds this
/// as an extension, and [`crate::limits::per_ip`] acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionAdmission {
    /// Within the caps.
    Full,
    /// Over `max_connections_per_ip`: its address holds as many connections as one client
    /// may. Signed Discord interactions still pass (Discord's few addresses carry every
    /// user's commands; they are limited per Discord user and per guild once verified);
    /// anything else is answered `503 too_many_connections`.
    OverAddressCap,
    /// Over `max_connections`: each request is answered `503 too_many_connections` with
    /// `Retry-After`, and the connection closed after it.
    OverTotalCap,
}

/// Admits a connection while the caps allow, and holds its place until it closes.
#[derive(Clone)]
struct ConnectionGate {
    total: Arc<Semaphore>,
    /// Connections past `max_connections` still answered with a 503 rather than reset.
    overflow: Arc<Semaphore>,
    per_ip: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max_per_ip: usize,
    send_timeout: Duration,
}

impl ConnectionGate {
    fn new(options: &ListenerOptions) -> Self {
        ConnectionGate {
            total: Arc::new(Semaphore::new(options.max_connections)),
            overflow: Arc::new(Semaphore::new((options.max_connections / 8).clamp(1, 256))),
            per_ip: Arc::new(Mutex::new(HashMap::new())),
            max_per_ip: options.max_connections_per_ip,
            send_timeout: options.send_timeout,
        }
    }

    fn admit(&self, stream: TcpStream) -> io::Result<(Guarded<TcpStream>, ConnectionAdmission)> {
        let refused = |reason: &'static str| {
            metrics::counter!("sparkle_connections_refused_total", "reason" => reason).increment(1);
            io::Error::new(io::ErrorKind::ConnectionRefused, reason)
        };
        let client = client_of(stream.peer_addr()?.ip());
        let (place, mut admission) = match self.total.clone().try_acquire_owned() {
            Ok(place) => (place, ConnectionAdmission::Full),
            Err(_) => {
                let place = self
                    .overflow
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| refused("max_connections"))?;
                metrics::counter!("sparkle_connections_refused_total", "reason" => "max_connections_answered").increment(1);
                (place, ConnectionAdmission::OverTotalCap)
            }
        };
        let slot = {
            let mut counts = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let count = counts.entry(client).or_insert(0);
            if *count >= self.max_per_ip && admission == ConnectionAdmission::Full {
                metrics::counter!("sparkle_connections_refused_total", "reason" => "max_connections_per_ip").increment(1);
                admission = ConnectionAdmission::OverAddressCap;
            }
            *count += 1;
            ClientSlot {
                client,
                counts: self.per_ip.clone(),
            }
        };
        metrics::gauge!("sparkle_connections_open").increment(1.0);
        let guarded = Guarded {
            inner: stream,
            send_timeout: self.send_timeout,
            stalled: None,
            _total: place,
            _slot: slot,
        };
        Ok((guarded, admission))
    }
}

impl<S: Send + 'static> Accept<TcpStream, S> for ConnectionGate {
    type Stream = Guarded<TcpStream>;
    type Service = tower_http::add_extension::AddExtension<S, ConnectionAdmission>;
    type Future = std::future::Ready<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        std::future::ready(self.admit(stream).map(|(guarded, admission)| {
            (
                guarded,
                tower_http::add_extension::AddExtension::new(service, admission),
            )
        }))
    }
}

/// A connection's place in the per-address count, given back when it closes.
struct ClientSlot {
    client: IpAddr,
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.client) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.client);
            }
        }
        metrics::gauge!("sparkle_connections_open").decrement(1.0);
    }
}

/// An admitted connection: it holds its places under the caps, and fails a write that makes
/// no progress for `send_timeout` (a client that stopped reading).
pub struct Guarded<S> {
    inner: S,
    send_timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    _total: OwnedSemaphorePermit,
    _slot: ClientSlot,
}

impl<S> Guarded<S> {
    /// The write is pending: fine until it has been for `send_timeout`.
    fn stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.send_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progressed<T>(
        &mut self,
        result: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progressed(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progressed(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.progressed(result, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progressed(result, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn guarded<S>(inner: S, send_timeout: Duration) -> Guarded<S> {
        let counts = Arc::new(Mutex::new(HashMap::from([(
            IpAddr::from([127, 0, 0, 1]),
            1,
        )])));
        Guarded {
            inner,
            send_timeout,
            stalled: None,
            _total: Arc::new(Semaphore::new(1))
                .try_acquire_owned()
                .expect("permit"),
            _slot: ClientSlot {
                client: IpAddr::from([127, 0, 0, 1]),
                counts,
            },
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_does_not_read_fails_after_the_send_timeout() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut conn = guarded(ours, Duration::from_secs(30));
        // Progress, however slow, keeps the connection.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                let _ = theirs.read(&mut buf).await;
            }
            theirs
        });
        conn.write_all(&[7u8; 2048]).await.expect("read in time");
        let _theirs = reader.await.expect("reader");
        // Then the client stops reading altogether.
        let started = tokio::time::Instant::now();
        let err = conn.write_all(&[7u8; 4096]).await.expect_err("stalled");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn over_a_cap_a_connection_is_answered_and_a_closed_one_gives_its_place_back() {
        let gate = ConnectionGate::new(&ListenerOptions {
            max_connections: 10,
            max_connections_per_ip: 2,
            ..ListenerOptions::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connect = || async {
            let client = TcpStream::connect(addr).await.expect("connect");
            let (stream, _) = listener.accept().await.expect("accept");
            (stream, client)
        };
        let mut modes = Vec::new();
        let mut held = Vec::new();
        for _ in 0..3 {
            let (stream, client) = connect().await;
            let (conn, mode) = gate.admit(stream).expect("admitted");
            modes.push(mode);
            held.push((conn, client));
        }
        assert_eq!(
            modes,
            [
                ConnectionAdmission::Full,
                ConnectionAdmission::Full,
                ConnectionAdmission::OverAddressCap
            ]
        );
        held.remove(0);
        held.remove(0);
        let (stream, _client) = connect().await;
        let (_, mode) = gate.admit(stream).expect("admitted");
        assert_eq!(mode, ConnectionAdmission::Full, "the places came back");

        // Over the total: answered while the overflow allowance (1 here) lasts, then closed.
        let gate = ConnectionGate::new(&ListenerOptions {
            max_connections: 1,
            max_connections_per_ip: 5,
            ..ListenerOptions::default()
        });
        let (a, _a) = connect().await;
        let first = gate.admit(a).expect("room for one");
        assert_eq!(first.1, ConnectionAdmission::Full);
        let (b, _b) = connect().await;
        let second = gate.admit(b).expect("answered");
        assert_eq!(second.1, ConnectionAdmission::OverTotalCap);
        let (c, _c) = connect().await;
        let refused = gate
            .admit(c)
            .map(|_| ())
            .expect_err("past the overflow too");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
        drop(first);
        let (d, _d) = connect().await;
        assert_eq!(gate.admit(d).expect("room").1, ConnectionAdmission::Full);
    }
}

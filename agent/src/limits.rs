//! Connection limits shared by the Unix socket and the container endpoint.
//!
//! Both serve tiny responses to local clients, some of which may misbehave:
//! connect and send nothing, send slowly, send huge or non-HTTP heads, or
//! open connections by the thousand. Each connection is bounded in header
//! size, header read time and lifetime, and the number open at once is
//! capped, so memory stays bounded and one client cannot starve the others
//! (see README, "Failure behaviour", for the measured cost).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// Limits that keep one client from starving the others.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has to send its request headers.
    pub header_timeout: Duration,
    /// The longest a connection may stay open.
    pub connection_lifetime: Duration,
    /// Largest request head, in bytes.
    pub max_header_bytes: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
        }
    }
}

/// A listener the limited server accepts connections from.
pub(crate) trait Accept {
    /// The accepted connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn next(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn next(&self) -> std::io::Result<UnixStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

impl Accept for TcpListener {
    type Stream = TcpStream;
    async fn next(&self) -> std::io::Result<TcpStream> {
        self.accept().await.map(|(stream, _)| stream)
    }
}

/// Serves HTTP/1.1 on `listener` within `limits` until `shutdown` resolves,
/// then lets open connections finish (bounded) and returns. `service_for`
/// picks the router for each accepted connection (after a peer check, say).
pub(crate) async fn serve_limited<L: Accept>(
    listener: L,
    limits: ServerLimits,
    mut service_for: impl FnMut(&L::Stream) -> Router,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.next() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: back off briefly.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                limit = limits.max_connections,
                "too many connections; closing a new one"
            );
            continue;
        };
        let service = TowerToHyperService::new(service_for(&stream));
        let mut stop = stop_tx.subscribe();
        let done = done_tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _done = done;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let lifetime = tokio::time::sleep(limits.connection_lifetime);
            tokio::pin!(lifetime);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.recv() => {}
                () = &mut lifetime => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
        });
    }
    drop(stop_tx);
    drop(done_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), done_rx.recv()).await;
}

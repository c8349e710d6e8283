//! The API's connections: at most a set number open at once, each handed to tonic only once
//! its handshake (TLS, when on) is done.
//!
//! A connection over the cap is closed as soon as it is accepted, so a client fails fast and
//! its load balancer tries another instance, rather than waiting in the listen backlog for a
//! slot. The place is held as long as the connection is; closing it frees the place.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

/// How long a client has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a refused connection is logged, at most (each is counted).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// A connection holding its place among the open ones.
#[derive(Debug)]
pub struct Held<IO> {
    io: IO,
    _place: OwnedSemaphorePermit,
}

impl<IO: Connected> Connected for Held<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Held<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Held<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections on `listener`, at most `max` open at once, and hands on those whose
/// `handshake` succeeded (each handshake in its own task, with a timeout, so a slow client
/// cannot stall the others).
pub fn incoming<IO, H, F>(
    listener: TcpListener,
    max: usize,
    handshake: H,
) -> ReceiverStream<Result<Held<IO>, io::Error>>
where
    IO: Send + 'static,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = io::Result<IO>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let places = Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS)));
    tokio::spawn(async move {
        let mut last_logged: Option<Instant> = None;
        let mut refused_since_log = 0u64;
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: the next accept may work.
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                // The server stopped taking connections.
                () = tx.closed() => break,
            };
            let Ok(place) = places.clone().try_acquire_owned() else {
                drop(tcp);
                metrics::counter!("occ_grpc_connections_refused_total").increment(1);
                refused_since_log += 1;
                if last_logged.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                    tracing::warn!(
                        %peer,
                        max_connections = max,
                        refused = refused_since_log,
                        "API connections at their cap (--grpc-max-connections): refusing new ones"
                    );
                    last_logged = Some(Instant::now());
                    refused_since_log = 0;
                }
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let handshake = handshake(tcp);
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok(Held { io, _place: place })).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "handshake refused"),
                    Err(_) => tracing::info!(%peer, "handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

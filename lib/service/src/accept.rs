//! The QUIC accept loop of hds and hbs: each connection's handshake and handling run in a task of their own, so a
//! slow or hostile peer never holds up the next; shutdown closes the endpoint.
//!
//! Under load the endpoint validates addresses first: past [`RETRY_ABOVE`] handshakes in flight, a client that has not
//! proven its address gets a Retry (one round trip; a spoofed source never gets an answer bigger than its packet),
//! and past [`REFUSE_ABOVE`] new connections are refused until the backlog drains.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use quinn::{Connection, ConnectionError, Endpoint};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

/// What becomes of running connections at shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtShutdown {
    /// Let each finish (hds: one request per stream), then wait for the endpoint to be idle.
    Finish,
    /// End them at once (hbs: sessions last as long as the NCU stays).
    Abort,
}

/// Handshakes in flight past which unvalidated clients get a Retry.
pub const RETRY_ABOVE: usize = 256;
/// Handshakes in flight past which new connections are refused.
pub const REFUSE_ABOVE: usize = 8192;

/// Accepts connections until `shutdown` and hands each to `handle` once its handshake is done or has failed (a
/// refused certificate, a wrong ALPN), in a task of its own and within a span naming the peer.
pub async fn serve<F, Fut>(endpoint: &Endpoint, shutdown: &CancellationToken, at_shutdown: AtShutdown, handle: F)
where
    F: Fn(Result<Connection, ConnectionError>, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with(endpoint, shutdown, at_shutdown, RETRY_ABOVE, handle).await;
}

/// [`serve`] with Retry past `retry_above` handshakes in flight (0: always).
pub async fn serve_with<F, Fut>(
    endpoint: &Endpoint,
    shutdown: &CancellationToken,
    at_shutdown: AtShutdown,
    retry_above: usize,
    handle: F,
) where
    F: Fn(Result<Connection, ConnectionError>, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let handshaking = Arc::new(AtomicUsize::new(0));
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let in_flight = handshaking.load(Ordering::Relaxed);
        if in_flight >= REFUSE_ABOVE {
            tracing::warn!(%remote, in_flight, "too many handshakes in flight; connection refused");
            incoming.refuse();
            continue;
        }
        if in_flight >= retry_above && !incoming.remote_address_validated() {
            tracing::debug!(%remote, in_flight, "asking the client to prove its address (Retry)");
            if incoming.retry().is_err() {
                tracing::debug!(%remote, "cannot send a Retry");
            }
            continue;
        }
        let handle = handle.clone();
        let counter = handshaking.clone();
        counter.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(
            async move {
                let connection = incoming.await;
                counter.fetch_sub(1, Ordering::Relaxed);
                handle(connection, remote).await;
            }
            .instrument(tracing::info_span!("peer", %remote)),
        );
        while tasks.try_join_next().is_some() {}
    }
    endpoint.close(0_u32.into(), b"shutting down");
    if at_shutdown == AtShutdown::Abort {
        tasks.abort_all();
    }
    while tasks.join_next().await.is_some() {}
    if at_shutdown == AtShutdown::Finish {
        endpoint.wait_idle().await;
    }
}

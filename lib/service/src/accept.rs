//! The QUIC accept loop of hds and hbs: each connection's handshake and handling run in a task of their own, so a
//! slow or hostile peer never holds up the next; shutdown closes the endpoint.

use std::{future::Future, net::SocketAddr};

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

/// Accepts connections until `shutdown` and hands each to `handle` once its handshake is done or has failed (a
/// refused certificate, a wrong ALPN), in a task of its own and within a span naming the peer.
pub async fn serve<F, Fut>(endpoint: &Endpoint, shutdown: &CancellationToken, at_shutdown: AtShutdown, handle: F)
where
    F: Fn(Result<Connection, ConnectionError>, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let handle = handle.clone();
        tasks.spawn(
            async move {
                let connection = incoming.await;
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

//! The control side of a simulated NCU, as `ncu run` does it: a QUIC connection with its client certificate, one
//! stream, `Register` with the full uplink set, `Registered` back; and hds asked for servers with `Assign`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use tether_pki::stream as frame;
use tether_proto::{
    control::{self, ToHbs, ToNcu, Uplink},
    hds::{self as proto, HeartbeatServer, Request, Response},
};

use crate::setup::SimNcu;

/// A registered control session, kept open (dropping it closes the connection).
pub(crate) struct Session {
    /// Kept for its lifetime.
    pub(crate) _connection: quinn::Connection,
    /// Kept open.
    pub(crate) _send: quinn::SendStream,
    /// Kept open.
    pub(crate) _recv: quinn::RecvStream,
    /// Session id.
    pub(crate) id: u64,
    /// Session key.
    pub(crate) key: [u8; 32],
    /// The server's heartbeat socket.
    pub(crate) heartbeat: SocketAddr,
}

/// Client transport settings of `ncu run`.
pub(crate) fn client_config(tls: Arc<rustls::ClientConfig>) -> anyhow::Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(Duration::from_secs(15).try_into()?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Connects to `server` (`host:port`, name checked against its certificate) and registers the NCU's uplinks.
pub(crate) async fn register(
    endpoint: &quinn::Endpoint,
    ncu: &SimNcu,
    port: u16,
    server: &str,
    timeout: Duration,
) -> anyhow::Result<Session> {
    tokio::time::timeout(timeout, register_inner(endpoint, ncu, port, server))
        .await
        .with_context(|| format!("no registration with {server} within {timeout:?}"))?
}

async fn register_inner(endpoint: &quinn::Endpoint, ncu: &SimNcu, port: u16, server: &str) -> anyhow::Result<Session> {
    let connection = dial_inner(endpoint, ncu, server).await?;
    register_on(connection, ncu, port).await
}

/// Connects to `server` without registering: the standby connection `ncu run` keeps to its backup.
pub(crate) async fn dial(
    endpoint: &quinn::Endpoint,
    ncu: &SimNcu,
    server: &str,
    timeout: Duration,
) -> anyhow::Result<quinn::Connection> {
    tokio::time::timeout(timeout, dial_inner(endpoint, ncu, server))
        .await
        .with_context(|| format!("no handshake with {server} within {timeout:?}"))?
}

async fn dial_inner(endpoint: &quinn::Endpoint, ncu: &SimNcu, server: &str) -> anyhow::Result<quinn::Connection> {
    let addr: SocketAddr = server.parse().with_context(|| format!("bad server address {server}"))?;
    Ok(endpoint.connect_with(client_config(ncu.tls.clone())?, addr, proto::host_of(server))?.await?)
}

/// Registers the NCU's uplinks on a new stream of an open connection (a standby one, when moving).
pub(crate) async fn register_on(connection: quinn::Connection, ncu: &SimNcu, port: u16) -> anyhow::Result<Session> {
    let (mut send, mut recv) = connection.open_bi().await?;
    let uplinks: Vec<Uplink> = ncu
        .ips
        .iter()
        .enumerate()
        .map(|(i, ip)| Uplink {
            name: format!("wan{i}"),
            index: u8::try_from(i).unwrap_or(u8::MAX),
            address: *ip,
            port,
            priority: 0,
            weight: 1,
        })
        .collect();
    frame::write(&mut send, control::VERSION, &ToHbs::Register { uplinks, generation: 0 }).await?;
    let first = frame::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME)
        .await?
        .context("the server closed the stream")?;
    let ToNcu::Registered { session, key, heartbeat_port, .. } = first else {
        bail!("registration refused: {first:?}");
    };
    let key: [u8; 32] = hex::decode(&key)?.try_into().map_err(|_| anyhow::anyhow!("session key is not 32 bytes"))?;
    let heartbeat = SocketAddr::new(connection.remote_address().ip(), heartbeat_port);
    Ok(Session { _connection: connection, _send: send, _recv: recv, id: session, key, heartbeat })
}

/// Asks hds for a primary and a backup, as `ncu` does (`failed` lists servers found unreachable).
pub(crate) async fn assign(
    hds: &str,
    ncu: &SimNcu,
    failed: &[String],
) -> anyhow::Result<(HeartbeatServer, Option<HeartbeatServer>)> {
    let mut tls = (*ncu.tls).clone();
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    let request = Request::Assign { failed: failed.to_vec() };
    match tether_pki::hds_client::request_any(&[hds.to_owned()], Arc::new(tls), &request).await? {
        Response::Assignment { primary, backup } => Ok((primary, backup)),
        other => bail!("unexpected answer from hds: {other:?}"),
    }
}

//! Validating an uplink by connecting out through it: the socket is bound to the uplink's interface
//! (SO_BINDTODEVICE) and address, so the kernel uses that uplink's route even with several default routes.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::warn;

use super::state::Candidate;

/// Where to connect to prove an uplink reaches the Internet.
#[derive(Debug, Clone)]
pub enum Target {
    /// A QUIC handshake with hds (the first server an NCU must reach), with the NCU's own identity.
    Hds {
        /// hds addresses, tried in turn.
        addresses: Vec<String>,
        /// TLS for the handshake.
        tls: Arc<rustls::ClientConfig>,
    },
    /// A TCP connection to a known server.
    Tcp(SocketAddr),
}

/// Whether binding to a device works here (it needs CAP_NET_RAW); warned about once.
static NO_DEVICE_BINDING: AtomicBool = AtomicBool::new(false);

/// Connects out through `uplink` within `timeout`.
pub async fn validate(uplink: &Candidate, target: &Target, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, attempt(uplink, target)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no connection through {} within {timeout:?}", uplink.interface)),
    }
}

async fn attempt(uplink: &Candidate, target: &Target) -> Result<(), String> {
    match target {
        Target::Tcp(server) => {
            let socket = bound(uplink, Type::STREAM, Protocol::TCP, server.is_ipv6())?;
            let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
            socket.connect(*server).await.map(drop).map_err(|e| format!("connect to {server}: {e}"))
        }
        Target::Hds { addresses, tls } => {
            let mut last = "no hds address".to_owned();
            for address in addresses {
                match handshake(uplink, address, tls.clone()).await {
                    Ok(()) => return Ok(()),
                    Err(error) => last = error,
                }
            }
            Err(last)
        }
    }
}

async fn handshake(uplink: &Candidate, address: &str, tls: Arc<rustls::ClientConfig>) -> Result<(), String> {
    let server = tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("resolving {address}: {e}"))?
        .find(|a| a.is_ipv6() == uplink.address.is_ipv6())
        .ok_or_else(|| format!("{address} has no address of the uplink's family"))?;
    let socket = bound(uplink, Type::DGRAM, Protocol::UDP, server.is_ipv6())?;
    let endpoint = tether_pki::client_endpoint(socket.into()).map_err(|e| e.to_string())?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let connection = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), server, tether_proto::hds::host_of(address))
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("QUIC handshake with {address}: {e}"))?;
    connection.close(0_u32.into(), b"validated");
    // The uplink is good now; the close is retransmitted through the draining period (three PTOs, ~100 ms) in the
    // background rather than delaying the uplink's registration.
    tokio::spawn(async move { endpoint.wait_idle().await });
    Ok(())
}

/// A non-blocking socket bound to the uplink's interface and address.
fn bound(uplink: &Candidate, kind: Type, protocol: Protocol, v6: bool) -> Result<Socket, String> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let socket = Socket::new(domain, kind, Some(protocol)).map_err(|e| e.to_string())?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    if let Err(error) = socket.bind_device(Some(uplink.interface.as_bytes()))
        && !NO_DEVICE_BINDING.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        warn!(%error, "cannot bind sockets to interfaces (needs CAP_NET_RAW); binding to the address only");
    }
    socket.bind(&SocketAddr::new(uplink.address, 0).into()).map_err(|e| format!("bind {}: {e}", uplink.address))?;
    Ok(socket)
}

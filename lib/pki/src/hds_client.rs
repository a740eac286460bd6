//! The client side of the hds protocol, used by ncu: one request per QUIC connection, hds addresses tried in turn.

use std::{net::SocketAddr, sync::Arc, time::Duration};

pub use tether_proto::hds::host_of;
use tether_proto::hds::{self as proto, ErrorCode, FrameError, Request, Response};

use crate::{self as pki, stream};

/// How long one hds gets to answer, handshake included.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No address could be resolved or reached.
    #[error("cannot reach hds at {address}: {reason}")]
    Unreachable {
        /// The address tried.
        address: String,
        /// What failed.
        reason: String,
    },
    /// The TLS handshake failed: a certificate was refused on one side.
    #[error("TLS with hds at {address} failed: {reason} (is the CA the operator's, and this NCU's certificate valid?)")]
    Handshake {
        /// The address tried.
        address: String,
        /// rustls' or quinn's words.
        reason: String,
    },
    /// hds answered with something this side cannot read.
    #[error("hds at {address} sent a bad answer: {source}")]
    Protocol {
        /// The address tried.
        address: String,
        /// The decoding error.
        source: FrameError,
    },
    /// hds refused the request.
    #[error("hds refused: {message}")]
    Refused {
        /// Machine-readable reason.
        code: ErrorCode,
        /// For a person.
        message: String,
    },
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// No hds address was given.
    #[error("no hds address configured")]
    NoAddress,
}

impl ClientError {
    /// True when another attempt later (or at another hds) may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::Protocol { .. } => true,
            Self::Refused { code, .. } => matches!(code, ErrorCode::NoServer | ErrorCode::Unavailable),
            Self::Handshake { .. } | Self::Pki(_) | Self::NoAddress => false,
        }
    }
}

/// Sends `request` to each address in turn until one answers; refusals other than transient ones end the search.
pub async fn request_any(
    addresses: &[String],
    tls: Arc<rustls::ClientConfig>,
    request: &Request,
) -> Result<Response, ClientError> {
    let mut last = ClientError::NoAddress;
    for address in addresses {
        match request_one(address, tls.clone(), request).await {
            Ok(Response::Error { code, message }) => {
                last = ClientError::Refused { code, message };
                if !last.is_transient() {
                    return Err(last);
                }
            }
            Ok(response) => return Ok(response),
            Err(error) => {
                tracing::debug!(%error, address, "hds attempt failed");
                last = error;
            }
        }
    }
    Err(last)
}

/// Sends one request to one hds.
pub async fn request_one(
    address: &str,
    tls: Arc<rustls::ClientConfig>,
    request: &Request,
) -> Result<Response, ClientError> {
    match tokio::time::timeout(TIMEOUT, exchange(address, tls, request)).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Unreachable {
            address: address.to_owned(),
            reason: format!("no answer within {TIMEOUT:?}"),
        }),
    }
}

async fn exchange(address: &str, tls: Arc<rustls::ClientConfig>, request: &Request) -> Result<Response, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable { address: address.to_owned(), reason };
    let target = resolve(address).await.map_err(unreachable)?;
    let server_name = host_of(address).to_owned();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ClientError::Pki(pki::PkiError::Pem(format!("QUIC client config: {e}"))))?;
    let bind: SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0_u16; 8], 0).into() };
    let socket = std::net::UdpSocket::bind(bind).map_err(|e| unreachable(e.to_string()))?;
    let endpoint = pki::client_endpoint(socket).map_err(|e| unreachable(e.to_string()))?;
    let connecting = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), target, &server_name)
        .map_err(|e| unreachable(e.to_string()))?;
    let connection = connecting.await.map_err(|e| classify(address, e))?;
    let result = async {
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| classify(address, e))?;
        stream::write_whole(&mut send, proto::VERSION, request).await.map_err(|e| unreachable(e.to_string()))?;
        let protocol = |source| ClientError::Protocol { address: address.to_owned(), source };
        match recv.read_to_end(proto::MAX_FRAME + 4).await {
            Ok(bytes) => proto::decode::<Response>(&bytes).map_err(protocol),
            Err(quinn::ReadToEndError::TooLong) => {
                Err(protocol(FrameError::TooLarge { size: proto::MAX_FRAME + 1, limit: proto::MAX_FRAME }))
            }
            // With TLS 1.3 the server judges the client certificate after the client thinks the handshake is done:
            // a refusal shows up here, as the connection closing with a TLS alert.
            Err(quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(error))) => Err(classify(address, error)),
            Err(quinn::ReadToEndError::Read(error)) => Err(unreachable(error.to_string())),
        }
    }
    .await;
    connection.close(0_u32.into(), b"done");
    // The answer is in; the close is retransmitted through the draining period (three PTOs) in the background.
    tokio::spawn(async move { endpoint.wait_idle().await });
    result
}

fn classify(address: &str, error: quinn::ConnectionError) -> ClientError {
    match &error {
        quinn::ConnectionError::TransportError(_) | quinn::ConnectionError::ConnectionClosed(_) => {
            ClientError::Handshake { address: address.to_owned(), reason: error.to_string() }
        }
        _ => ClientError::Unreachable { address: address.to_owned(), reason: error.to_string() },
    }
}

async fn resolve(address: &str) -> Result<SocketAddr, String> {
    let mut addrs = tokio::net::lookup_host(address).await.map_err(|e| format!("cannot resolve {address}: {e}"))?;
    addrs.next().ok_or_else(|| format!("{address} resolves to nothing"))
}

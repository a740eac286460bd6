//! The hds QUIC server: enrollment for NCUs without a certificate, assignment for enrolled ones.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use quinn::{Connection, Endpoint};
use rustls::pki_types::CertificateDer;
use sqlx::PgPool;
use tether_pki::{self as pki, stream};
use tether_proto::hds::{self as proto, ErrorCode, HeartbeatServer, Request, Response};
use tether_service::accept::{self, AtShutdown};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    assign,
    store::{self, EnrollError},
};

/// Streams one connection may have open at once.
const MAX_STREAMS: u32 = 4;

/// What every connection handler needs.
pub struct Context {
    /// Postgres.
    pub pool: PgPool,
    /// Signs NCU certificates.
    pub ca: pki::Ca,
    /// Lifetime of NCU certificates.
    pub ncu_cert_validity: Duration,
    /// Age after which a fleet row is ignored.
    pub stale_after: Duration,
}

/// Builds the QUIC endpoint on an already bound UDP socket.
pub fn endpoint(socket: std::net::UdpSocket, tls: rustls::ServerConfig) -> anyhow::Result<Endpoint> {
    pki::server_endpoint(socket, tls, MAX_STREAMS, Duration::from_secs(30), None)
}

/// Accepts connections until `shutdown`, then closes the endpoint and lets running requests finish.
pub async fn serve(endpoint: Endpoint, context: Arc<Context>, shutdown: CancellationToken) {
    accept::serve(&endpoint, &shutdown, AtShutdown::Finish, move |connection, _| {
        let context = context.clone();
        async move {
            match connection {
                Ok(connection) => handle_connection(connection, context).await,
                // Wrong ALPN, a certificate not from our CA, an expired one: refused at the handshake.
                Err(error) => info!(%error, "handshake refused"),
            }
        }
    })
    .await;
}

async fn handle_connection(connection: Connection, context: Arc<Context>) {
    let fingerprint = client_fingerprint(&connection);
    loop {
        let (mut send, mut recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(error) => {
                debug!(%error, "connection ended");
                return;
            }
        };
        let response = match stream::read_whole::<Request>(&mut recv, proto::VERSION, proto::MAX_FRAME).await {
            Ok(request) => handle_request(request, fingerprint.as_ref(), connection.remote_address(), &context).await,
            Err(error) => {
                warn!(%error, "bad frame");
                Response::error(proto::error_code(&error), error.to_string())
            }
        };
        if let Err(error) = stream::write_whole(&mut send, proto::VERSION, &response).await {
            debug!(%error, "cannot send the response");
        }
    }
}

async fn handle_request(
    request: Request,
    fingerprint: Option<&[u8; 32]>,
    remote: SocketAddr,
    context: &Context,
) -> Response {
    match request {
        Request::Enroll { token, csr, serial, mac } => enroll(context, &token, &csr, serial, mac).await,
        Request::Renew { csr } => {
            let Some(fingerprint) = fingerprint else {
                return Response::error(ErrorCode::CertificateRequired, "renewal needs the NCU's current certificate");
            };
            renew(context, fingerprint, &csr).await
        }
        Request::Assign { failed } => {
            let Some(fingerprint) = fingerprint else {
                return Response::error(
                    ErrorCode::CertificateRequired,
                    "assignment needs the NCU's client certificate",
                );
            };
            assign(context, fingerprint, &failed, remote).await
        }
    }
}

async fn enroll(context: &Context, token: &str, csr: &str, serial: Option<String>, mac: Option<String>) -> Response {
    let limit = |s: &Option<String>| s.as_deref().map(|v| v.chars().take(64).collect::<String>());
    let (serial, mac) = (limit(&serial), limit(&mac));
    let sign = signer(context, csr);
    match store::enroll(&context.pool, token, csr, serial.as_deref(), mac.as_deref(), sign).await {
        Ok((enrolled, certificate)) => {
            if enrolled.replayed {
                info!(ncu = enrolled.ncu_id, domain = %enrolled.domain, "enrollment repeated with the same CSR; same certificate");
            } else {
                info!(ncu = enrolled.ncu_id, domain = %enrolled.domain, "NCU enrolled");
            }
            Response::Enrolled { certificate, domain: enrolled.domain }
        }
        Err(error) => {
            warn!(%error, "enrollment refused");
            refusal(error)
        }
    }
}

/// Signs `csr` for a domain as an NCU certificate: its PEM and fingerprint.
fn signer<'a>(context: &'a Context, csr: &'a str) -> impl FnOnce(&str) -> Result<(String, [u8; 32]), String> + 'a {
    move |domain| {
        let pem = context.ca.sign_ncu(csr, domain, context.ncu_cert_validity).map_err(|e| e.to_string())?;
        let der = pki::cert_from_pem(&pem).map_err(|e| e.to_string())?;
        Ok((pem, pki::fingerprint(&der)))
    }
}

async fn renew(context: &Context, fingerprint: &[u8; 32], csr: &str) -> Response {
    let ncu = match tether_db::ncus::by_fingerprint(&context.pool, fingerprint).await {
        Ok(Some(ncu)) => ncu,
        Ok(None) => {
            warn!(fingerprint = %hex::encode(fingerprint), "renewal with the certificate of no enrolled NCU");
            return Response::error(ErrorCode::UnknownCertificate, "this certificate belongs to no enrolled NCU");
        }
        Err(error) => return refusal(error.into()),
    };
    let sign = signer(context, csr);
    match store::renew(&context.pool, ncu.id, &ncu.domain, csr, sign).await {
        Ok(certificate) => {
            info!(ncu = ncu.id, domain = %ncu.domain, "NCU certificate renewed");
            Response::Renewed { certificate }
        }
        Err(error) => {
            warn!(ncu = ncu.id, %error, "renewal refused");
            refusal(error)
        }
    }
}

async fn assign(context: &Context, fingerprint: &[u8; 32], failed: &[String], remote: SocketAddr) -> Response {
    let ncu = match tether_db::ncus::by_fingerprint(&context.pool, fingerprint).await {
        Ok(Some(ncu)) => ncu,
        Ok(None) => {
            warn!(fingerprint = %hex::encode(fingerprint), "certificate of no enrolled NCU (domain deleted?)");
            return Response::error(
                ErrorCode::UnknownCertificate,
                "this certificate belongs to no enrolled NCU (was its domain deleted?); enroll again",
            );
        }
        Err(error) => return refusal(error.into()),
    };
    let fleet = match store::fleet(&context.pool).await {
        Ok(fleet) => fleet,
        Err(error) => return refusal(error.into()),
    };
    match assign::choose(&fleet, failed, context.stale_after, fingerprint) {
        Ok(pair) => {
            debug!(ncu = ncu.id, %remote, primary = %pair.primary.name, "assigned");
            Response::Assignment {
                primary: HeartbeatServer { name: pair.primary.name, address: pair.primary.address },
                backup: pair.backup.map(|b| HeartbeatServer { name: b.name, address: b.address }),
            }
        }
        Err(error) => {
            warn!(ncu = ncu.id, %error, "no heartbeat server to assign");
            Response::error(ErrorCode::NoServer, error.to_string())
        }
    }
}

fn refusal(error: EnrollError) -> Response {
    let code = match &error {
        EnrollError::UnknownToken => ErrorCode::UnknownToken,
        EnrollError::TokenUsed => ErrorCode::TokenUsed,
        EnrollError::TokenExpired(_) => ErrorCode::TokenExpired,
        EnrollError::BadCsr(_) => ErrorCode::BadCsr,
        EnrollError::Database(e) => {
            warn!(error = %e, "database unavailable");
            return Response::error(ErrorCode::Unavailable, "hds cannot reach its database; retry later");
        }
    };
    Response::error(code, error.to_string())
}

fn client_fingerprint(connection: &Connection) -> Option<[u8; 32]> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(pki::fingerprint)
}

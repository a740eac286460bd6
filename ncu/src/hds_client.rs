//! Talking to hds: enrollment, and asking for heartbeat servers with backoff while none is available.

use std::{path::Path, sync::Arc, time::Duration};

use tether_pki::{
    self as pki,
    hds_client::{self as client, ClientError},
};
use tether_proto::hds::{self as proto, HeartbeatServer, Request, Response};
use tracing::warn;

use crate::identity::Identity;

/// Why enrollment or assignment failed.
#[derive(Debug, thiserror::Error)]
pub enum NcuError {
    /// hds could not be asked or refused.
    #[error(transparent)]
    Hds(#[from] ClientError),
    /// Keys, certificates or files.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// An identity exists already where enrollment would write.
    #[error("{0} already holds an NCU identity; remove it to enroll again")]
    AlreadyEnrolled(String),
    /// hds answered something that does not fit the request.
    #[error("unexpected answer from hds: {0:?}")]
    Unexpected(Box<Response>),
}

impl NcuError {
    /// True when asking again later (or another hds) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Hds(error) if error.is_transient())
    }
}

/// The servers hds assigned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Register here.
    pub primary: HeartbeatServer,
    /// Move here when the primary stops.
    pub backup: Option<HeartbeatServer>,
}

/// Generates a key and CSR, exchanges them and the one-time `token` for a certificate, and stores the identity in
/// `dir`. Returns the domain the certificate is bound to.
pub async fn enroll(
    hds: &[String],
    ca_pem: &str,
    token: &str,
    dir: &Path,
    serial: Option<String>,
    mac: Option<String>,
) -> Result<String, NcuError> {
    if Identity::exists(dir) {
        return Err(NcuError::AlreadyEnrolled(dir.display().to_string()));
    }
    let csr = pki::new_csr("tether ncu")?;
    let tls = Arc::new(pki::client_tls(ca_pem, None, proto::ALPN)?);
    let request = Request::Enroll { token: token.to_owned(), csr: csr.csr_pem, serial, mac };
    match client::request_any(hds, tls, &request).await? {
        Response::Enrolled { certificate, domain } => {
            Identity { ca_pem: ca_pem.to_owned(), key_pem: csr.key_pem, cert_pem: certificate }.save(dir)?;
            Ok(domain)
        }
        other => Err(NcuError::Unexpected(Box::new(other))),
    }
}

/// Renews the NCU's certificate: a new key and CSR here, exchanged with hds under the current certificate. The new
/// key and certificate replace the old pair in `dir` and are returned.
pub async fn renew(hds: &[String], identity: &Identity, dir: &Path) -> Result<Identity, NcuError> {
    let csr = pki::new_csr("tether ncu")?;
    let tls = Arc::new(pki::client_tls(&identity.ca_pem, Some((&identity.cert_pem, &identity.key_pem)), proto::ALPN)?);
    match client::request_any(hds, tls, &Request::Renew { csr: csr.csr_pem }).await? {
        Response::Renewed { certificate } => {
            let renewed = Identity { ca_pem: identity.ca_pem.clone(), key_pem: csr.key_pem, cert_pem: certificate };
            renewed.replace(dir)?;
            Ok(renewed)
        }
        other => Err(NcuError::Unexpected(Box::new(other))),
    }
}

/// Asks hds once for a primary and a backup, never one of `failed`.
pub async fn assign_once(hds: &[String], identity: &Identity, failed: &[String]) -> Result<Assignment, NcuError> {
    let tls = Arc::new(pki::client_tls(&identity.ca_pem, Some((&identity.cert_pem, &identity.key_pem)), proto::ALPN)?);
    match client::request_any(hds, tls, &Request::Assign { failed: failed.to_vec() }).await? {
        Response::Assignment { primary, backup } => Ok(Assignment { primary, backup }),
        other => Err(NcuError::Unexpected(Box::new(other))),
    }
}

/// [`assign_once`], retried with backoff (up to `patience`) while no server is available.
pub async fn assign(
    hds: &[String],
    identity: &Identity,
    failed: &[String],
    patience: Duration,
) -> Result<Assignment, NcuError> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut delay = Duration::from_millis(200);
    loop {
        match assign_once(hds, identity, failed).await {
            Err(error) if error.is_transient() && tokio::time::Instant::now() + delay < deadline => {
                warn!(%error, retry_in = ?delay, "no heartbeat servers yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            result => return result,
        }
    }
}

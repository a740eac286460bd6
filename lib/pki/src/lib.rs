//! The operator PKI: a CA made with rcgen, server certificates for hds and hbs, client certificates for NCUs signed
//! from their CSRs, and the rustls configurations that refuse anything the CA did not issue or that has expired; the
//! QUIC endpoints built on them, frames over their streams ([`stream`]) and the hds client ([`hds_client`]).

pub mod hds_client;
pub mod stream;

use std::{
    fs,
    io::Write,
    net::{IpAddr, SocketAddr},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{
    RootCertStore,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// File names inside a PKI directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key.
pub const CA_KEY: &str = "ca.key";

/// A PKI failure, with the path or input it concerns.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// rcgen refused the parameters or input.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// PEM input that holds no usable certificate or key.
    #[error("{0}")]
    Pem(String),
    /// rustls refused a configuration.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// A file that must not be overwritten exists.
    #[error("{0} exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// A name that cannot go into a certificate.
    #[error("invalid name {0:?}")]
    Name(String),
}

/// The operator CA, loaded for signing.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A certificate and its private key, PEM encoded.
pub struct Issued {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

/// A key pair and the CSR an NCU sends to hds.
pub struct Csr {
    /// The private key, PEM; never leaves the NCU.
    pub key_pem: String,
    /// The request, PEM.
    pub csr_pem: String,
}

impl Ca {
    /// Creates a new CA valid for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, validity);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self { issuer: Issuer::new(params, key), cert_pem })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_pem = read(&dir.join(CA_CERT))?;
        let key_pem = read(&dir.join(CA_KEY))?;
        let key = KeyPair::from_pem(&key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(Self { issuer, cert_pem })
    }

    /// Writes `ca.pem` and `ca.key` (0600) into `dir`, refusing to overwrite an existing CA.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        fs::create_dir_all(dir).map_err(|source| PkiError::Io { path: dir.to_owned(), source })?;
        write_new(&dir.join(CA_KEY), &self.issuer.key().serialize_pem(), 0o600)?;
        write_new(&dir.join(CA_CERT), &self.cert_pem, 0o644)
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for an hds or hbs instance: `sans` are DNS names or IP addresses.
    pub fn issue_server(&self, common_name: &str, sans: &[String], validity: Duration) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs an NCU's CSR. Only the public key is taken from the request: the subject, the SAN naming the domain,
    /// the usages and the validity are ours, so a request asking for more gets nothing extra.
    pub fn sign_ncu(&self, csr_pem: &str, domain: &str, validity: Duration) -> Result<String, PkiError> {
        let request = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("ncu {domain}"));
        params.subject_alt_names = vec![SanType::URI(
            format!("urn:tether:domain:{domain}").try_into().map_err(|_| PkiError::Name(domain.to_owned()))?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, validity);
        let signed =
            CertificateSigningRequestParams { params, public_key: request.public_key }.signed_by(&self.issuer)?;
        Ok(signed.pem())
    }

    /// A client certificate valid between two instants; for tests of expiry handling.
    pub fn issue_client_between(
        &self,
        common_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Generates an NCU key pair and a CSR for it.
pub fn new_csr(common_name: &str) -> Result<Csr, PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name);
    let csr = params.serialize_request(&key)?;
    Ok(Csr { key_pem: key.serialize_pem(), csr_pem: csr.pem()? })
}

/// When a certificate (the first in a PEM text) starts and stops being valid.
pub fn validity(pem: &str) -> Result<(std::time::SystemTime, std::time::SystemTime), PkiError> {
    let der = cert_from_pem(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::Pem(format!("unreadable certificate: {e}")))?;
    let at = |t: x509_parser::time::ASN1Time| {
        let seconds = u64::try_from(t.timestamp()).unwrap_or(0);
        std::time::UNIX_EPOCH + Duration::from_secs(seconds)
    };
    Ok((at(cert.validity().not_before), at(cert.validity().not_after)))
}

/// SHA-256 of a certificate's DER: how hds and hbs know an NCU.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// The first certificate in a PEM text.
pub fn cert_from_pem(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    certs_from_pem(pem)?.into_iter().next().ok_or_else(|| PkiError::Pem("no certificate in PEM input".into()))
}

/// Every certificate in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(format!("bad certificate PEM: {e}")))
}

/// A private key from PEM.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, PkiError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem(format!("bad private key PEM: {e}")))
}

/// The crypto provider every tether TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A QUIC server configuration: TLS 1.3, our certificate, client certificates verified against the operator CA.
/// With `client_auth_optional`, a client without a certificate is let through (enrollment); one with a certificate
/// the CA did not issue, or an expired one, is refused at the handshake either way.
pub fn server_tls(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    alpn: &[u8],
    client_auth_optional: bool,
) -> Result<rustls::ServerConfig, PkiError> {
    let roots = Arc::new(roots(ca_pem)?);
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider());
    let builder = if client_auth_optional { builder.allow_unauthenticated() } else { builder };
    let verifier = builder.build().map_err(|e| PkiError::Pem(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A QUIC server endpoint on an already bound UDP socket: at most `streams` concurrent bidirectional streams per
/// connection, no unidirectional ones, closed after `idle` without traffic, with keep-alives when given.
pub fn server_endpoint(
    socket: std::net::UdpSocket,
    tls: rustls::ServerConfig,
    streams: u32,
    idle: Duration,
    keep_alive: Option<Duration>,
) -> anyhow::Result<quinn::Endpoint> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(streams.into());
    transport.max_concurrent_uni_streams(0_u32.into());
    transport.max_idle_timeout(Some(idle.try_into()?));
    transport.keep_alive_interval(keep_alive);
    server.transport_config(Arc::new(transport));
    size_buffers(&socket);
    let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime for QUIC"))?;
    Ok(quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)?)
}

/// Socket buffers asked for a server's socket. A failover storm brings thousands of Initial packets (1,200 bytes
/// each) within a second; with the kernel's default 208 KiB most would be dropped and each dropped one costs its
/// client a retransmission timeout. The kernel caps the request at `net.core.rmem_max` / `wmem_max`, which
/// deploy/sysctl.d/90-tether.conf raises to match.
const SERVER_SOCKET_BUFFER: usize = 32 << 20;

/// Asks for [`SERVER_SOCKET_BUFFER`] each way; says once in the log when the kernel grants much less.
fn size_buffers(socket: &std::net::UdpSocket) {
    let Ok(state) = quinn::udp::UdpSocketState::new(socket.into()) else { return };
    let _ = state.set_recv_buffer_size(socket.into(), SERVER_SOCKET_BUFFER);
    let _ = state.set_send_buffer_size(socket.into(), SERVER_SOCKET_BUFFER);
    // Linux reports twice what it grants (bookkeeping included).
    match state.recv_buffer_size(socket.into()) {
        Ok(granted) if granted < SERVER_SOCKET_BUFFER / 2 => tracing::info!(
            granted,
            wanted = SERVER_SOCKET_BUFFER,
            "small UDP receive buffer: raise net.core.rmem_max so bursts of handshakes are not dropped"
        ),
        _ => {}
    }
}

/// A QUIC client configuration trusting only the operator CA, optionally presenting a client certificate.
pub fn client_tls(ca_pem: &str, identity: Option<(&str, &str)>, alpn: &[u8]) -> Result<rustls::ClientConfig, PkiError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match identity {
        Some((cert_pem, key_pem)) => {
            builder.with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Reads a whole file, naming it on failure.
pub fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// Writes a file that must not exist yet, with `mode` (0600 for keys) from the moment it is created.
pub fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|source| {
        match source.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::Exists(path.to_owned()),
            _ => PkiError::Io { path: path.to_owned(), source },
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(|source| PkiError::Io { path: path.to_owned(), source })?;
    // On disk before anyone acts on it (an enrolled NCU whose certificate a crash lost could not enroll again).
    file.sync_all().map_err(|source| PkiError::Io { path: path.to_owned(), source })?;
    // The umask may have narrowed the mode further; make it exact.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(PkiError::Pem("no CA certificate in PEM input".into()));
    }
    Ok(roots)
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "tether");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san(value: &str) -> Result<SanType, PkiError> {
    match value.parse::<IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => Ok(SanType::DnsName(value.try_into().map_err(|_| PkiError::Name(value.to_owned()))?)),
    }
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that lag behind the CA's.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + validity;
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    #[test]
    fn csr_signing_ignores_what_the_request_asks_for() {
        let ca = Ca::generate("test CA", YEAR).expect("ca");
        // A request that asks to be a CA with a server name.
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = params.serialize_request(&key).expect("csr").pem().expect("pem");
        let pem = ca.sign_ncu(&csr, "www.example.com", YEAR).expect("signed");
        let der = cert_from_pem(&pem).expect("der");
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        assert!(!cert.is_ca());
        let sans = cert.subject_alternative_name().expect("ext").expect("san");
        let text = format!("{:?}", sans.value.general_names);
        assert!(text.contains("urn:tether:domain:www.example.com"), "{text}");
        assert!(!text.contains("evil.example"), "{text}");
    }

    #[test]
    fn garbage_csr_is_an_error() {
        let ca = Ca::generate("test CA", YEAR).expect("ca");
        assert!(
            ca.sign_ncu(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "x.example",
                YEAR
            )
            .is_err()
        );
        assert!(ca.sign_ncu("not pem at all", "x.example", YEAR).is_err());
    }

    #[test]
    fn ca_round_trips_through_files_with_private_keys_0600() {
        let dir = std::env::temp_dir().join(format!("tether-pki-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = Ca::generate("test CA", YEAR).expect("ca");
        ca.save(&dir).expect("save");
        let mode = fs::metadata(dir.join(CA_KEY)).expect("key file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(ca.save(&dir), Err(PkiError::Exists(_))), "an existing CA is never overwritten");
        let loaded = Ca::load(&dir).expect("load");
        let issued = loaded.issue_server("hds", &["127.0.0.1".into(), "hds.example".into()], YEAR).expect("issue");
        assert!(server_tls(ca.cert_pem(), &issued.cert_pem, &issued.key_pem, b"x", false).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }
}

/// A QUIC client endpoint on `socket` (bound by the caller, e.g. to one uplink) for short request/response
/// exchanges, receiving one datagram per slot.
///
/// quinn sizes an endpoint's receive buffer for GRO batches (64 segments × 32 slots × 1472 bytes = 3 MiB). A client
/// that sends a few small frames never needs that, and on a router the buffer stays resident in the allocator once
/// the first endpoint is dropped. Here GRO is switched off on the socket and the endpoint told to expect single
/// datagrams: 47 KiB.
pub fn client_endpoint(socket: std::net::UdpSocket) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    let fd = socket.try_clone()?;
    let inner = runtime.wrap_udp_socket(socket)?;
    // quinn-udp turned GRO on while wrapping the socket; options belong to the socket, so the clone turns it off.
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::UdpGroSegment, &false)
        .map_err(std::io::Error::from)?;
    let socket: Arc<dyn quinn::AsyncUdpSocket> = Arc::new(SingleDatagrams(inner));
    quinn::Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), None, socket, runtime)
}

/// A socket that reports one datagram per receive slot (its GRO is off), delegating everything else.
#[derive(Debug)]
struct SingleDatagrams(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for SingleDatagrams {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> std::io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

//! An operator PKI in a temporary directory, hds servers in-process on port 0, and raw protocol access.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tether_config::Load as _;
use tether_pki as pki;
use tether_proto::hds as proto;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A CA and an hds server certificate for 127.0.0.1 and localhost.
pub struct Pki {
    /// Holds ca.pem, ca.key, hds.pem, hds.key.
    pub dir: tempfile::TempDir,
    /// The CA, for issuing test certificates.
    pub ca: pki::Ca,
}

impl Pki {
    /// Creates the CA and the hds certificate.
    pub fn new() -> Result<Self> {
        Self::with_sans(&["127.0.0.1", "localhost"])
    }

    /// Creates the CA and an hds certificate for these names and addresses.
    pub fn with_sans(sans: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tether-pki-").tempdir()?;
        let ca = pki::Ca::generate("test operator CA", Duration::from_secs(3600 * 24))?;
        ca.save(dir.path())?;
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let issued = ca.issue_server("hds", &sans, Duration::from_secs(3600))?;
        pki::write_new(&dir.path().join("hds.pem"), &issued.cert_pem, 0o644)?;
        pki::write_new(&dir.path().join("hds.key"), &issued.key_pem, 0o600)?;
        Ok(Self { dir, ca })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem().to_owned()
    }

    /// A path inside the PKI directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// An hds server running in this process.
pub struct HdsServer {
    /// Its QUIC address.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

impl HdsServer {
    /// Starts hds against `database_url`; `extra` is appended to the TOML (e.g. a `[publish]` table).
    pub async fn start(database_url: &str, pki: &Pki, extra: &str) -> Result<Self> {
        Self::start_on(std::net::UdpSocket::bind("127.0.0.1:0")?, database_url, pki, extra).await
    }

    /// Starts hds on an already bound socket (e.g. one made inside a network namespace).
    pub async fn start_on(socket: std::net::UdpSocket, database_url: &str, pki: &Pki, extra: &str) -> Result<Self> {
        let addr = socket.local_addr()?;
        let text = format!(
            "listen = '{addr}'\ndatabase_url = '{database_url}'\nca = '{}'\ncert = '{}'\nkey = '{}'\n{extra}",
            pki.path("ca.pem").display(),
            pki.path("hds.pem").display(),
            pki.path("hds.key").display(),
        );
        let config = hds::config::Config::parse(&text)?;
        config.validate()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(hds::run(socket, config, shutdown.clone()));
        Ok(Self { addr, shutdown, task: Some(task) })
    }

    /// `host:port` as ncu takes it.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Stops the server and returns what `run` returned.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for HdsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Sends raw bytes on one stream (with the given ALPN and optional client identity) and returns the answer's bytes.
pub async fn raw_exchange(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
    alpn: &[u8],
    bytes: &[u8],
) -> Result<Vec<u8>> {
    let tls = pki::client_tls(ca_pem, identity, alpn)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let connection = endpoint
        .connect_with(quinn::ClientConfig::new(Arc::new(crypto)), addr, "127.0.0.1")?
        .await
        .context("handshake")?;
    let (mut send, mut recv) = connection.open_bi().await?;
    send.write_all(bytes).await?;
    send.finish()?;
    let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(proto::MAX_FRAME + 4)).await??;
    connection.close(0_u32.into(), b"");
    Ok(answer)
}

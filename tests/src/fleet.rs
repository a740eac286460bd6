//! Heartbeat servers and NCU agents in-process on loopback, for the heartbeat tests.

use std::{net::SocketAddr, sync::Arc, time::Duration};
use tether_config::Load as _;

use anyhow::Result;
use hbs::driver::Counters;
use ncu::agent::{Drill, Status, UplinkSpec};
use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::hds_stack::Pki;

/// An hbs running in this process.
pub struct HbsServer {
    /// Its name.
    pub name: String,
    /// QUIC control address.
    pub control: SocketAddr,
    /// Heartbeat socket.
    pub heartbeat: SocketAddr,
    /// Heartbeat figures.
    pub counters: Arc<Counters>,
    /// `GET /metrics` and `GET /healthz`.
    pub metrics: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

impl HbsServer {
    /// Starts `name` with a certificate from `pki` and test-friendly timers.
    pub async fn start(database_url: &str, pki: &Pki, name: &str) -> Result<Self> {
        let control = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let heartbeat = std::net::UdpSocket::bind("127.0.0.1:0")?;
        Self::start_on(control, heartbeat, database_url, pki, name).await
    }

    /// Starts `name` on already bound sockets; its certificate names the control socket's address.
    pub async fn start_on(
        control_socket: std::net::UdpSocket,
        heartbeat_socket: std::net::UdpSocket,
        database_url: &str,
        pki: &Pki,
        name: &str,
    ) -> Result<Self> {
        let san = control_socket.local_addr()?.ip().to_string();
        let issued = pki.ca.issue_server(name, &[san], Duration::from_secs(3600))?;
        let cert = pki.path(&format!("{name}.pem"));
        let key = pki.path(&format!("{name}.key"));
        if !cert.exists() {
            tether_pki::write_new(&cert, &issued.cert_pem, 0o644)?;
            tether_pki::write_new(&key, &issued.key_pem, 0o600)?;
        }
        let control = control_socket.local_addr()?;
        let heartbeat = heartbeat_socket.local_addr()?;
        let text = format!(
            "name = '{name}'\ndatabase_url = '{database_url}'\nca = '{}'\ncert = '{}'\nkey = '{}'\n\
             fleet_every = '300ms'\nrehome_grace = '3s'\nsession_grace = '2s'\n",
            pki.path("ca.pem").display(),
            cert.display(),
            key.display(),
        );
        let config = hbs::config::Config::parse(&text)?;
        config.validate()?;
        let counters = Arc::new(Counters::default());
        let shutdown = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let metrics = listener.local_addr()?;
        let sockets = hbs::Sockets { control: control_socket, heartbeat: heartbeat_socket, metrics: Some(listener) };
        let task = tokio::spawn(hbs::run(sockets, config, counters.clone(), shutdown.clone()));
        Ok(Self { name: name.to_owned(), control, heartbeat, counters, metrics, shutdown, task: Some(task) })
    }

    /// Stops it gracefully.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }

    /// Kills it: every task and socket is dropped at once, nothing is cleaned up, as when the process dies.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for HbsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An NCU agent running in this process.
pub struct Agent {
    /// Silence uplinks.
    pub drill: Drill,
    /// What it is doing.
    pub status: watch::Receiver<Status>,
    /// Change its uplinks.
    pub uplinks: watch::Sender<Vec<UplinkSpec>>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<()>>>,
}

impl Agent {
    /// Starts an agent with an enrolled identity and uplinks on loopback addresses.
    pub fn start(hds: Vec<String>, identity: ncu::identity::Identity, uplinks: Vec<UplinkSpec>) -> Self {
        Self::start_with(hds, identity, uplinks, ncu::agent::SiteConfig::default())
    }

    /// [`Agent::start`] with services and a load source.
    pub fn start_with(
        hds: Vec<String>,
        identity: ncu::identity::Identity,
        uplinks: Vec<UplinkSpec>,
        site: ncu::agent::SiteConfig,
    ) -> Self {
        let (uplinks_tx, uplinks_rx) = watch::channel(uplinks);
        let (status_tx, status) = watch::channel(Status::default());
        let drill = Drill::default();
        let shutdown = CancellationToken::new();
        let setup =
            ncu::agent::Setup { hds, identity, failover_after: Duration::from_secs(3), site, identity_dir: None };
        let task = tokio::spawn(ncu::agent::run(setup, uplinks_rx, drill.clone(), status_tx, shutdown.clone()));
        Self { drill, status, uplinks: uplinks_tx, shutdown, task: Some(task) }
    }

    /// Stops the agent.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An uplink on a loopback address.
pub fn uplink(name: &str, address: &str) -> UplinkSpec {
    UplinkSpec {
        name: name.into(),
        address: address.parse().unwrap_or([127, 0, 0, 1].into()),
        interface: None,
        priority: 0,
        weight: 1,
    }
}

/// dns with a subscriber's domain `site.tether.test`, hds, one hbs and an NCU identity enrolled for the domain: what
/// an agent needs to register.
pub struct Site {
    /// dns, its admin API and Postgres.
    pub stack: crate::stack::Stack,
    /// hds.
    pub hds: crate::hds_stack::HdsServer,
    /// The heartbeat server.
    pub hbs: HbsServer,
    /// The enrolled identity.
    pub identity: ncu::identity::Identity,
    /// The subscriber's token.
    pub token: String,
    pki: Pki,
    _dir: tempfile::TempDir,
}

impl Site {
    /// Starts everything and enrolls the NCU.
    pub async fn start() -> Result<Self> {
        let (stack, acme) = crate::stack::Stack::with_acme().await?;
        stack.domain(&acme, serde_json::json!({ "name": "site.tether.test" })).await?;
        let pki = Pki::new()?;
        let hds = crate::hds_stack::HdsServer::start(&stack.pg.url(), &pki, "").await?;
        let hbs = HbsServer::start(&stack.pg.url(), &pki, "hbs-0").await?;
        let (status, body) = stack
            .api
            .call(reqwest::Method::POST, "/v1/domains/site.tether.test/enrollments", Some(&acme), None)
            .await?;
        anyhow::ensure!(status == reqwest::StatusCode::CREATED, "enrollment token: {status} {body}");
        let token = body["token"].as_str().unwrap_or_default();
        let dir = tempfile::tempdir()?;
        ncu::hds_client::enroll(&[hds.address()], &pki.ca_pem(), token, dir.path(), None, None).await?;
        let identity = ncu::identity::Identity::load(dir.path())?;
        Ok(Self { stack, hds, hbs, identity, token: acme, pki, _dir: dir })
    }

    /// Enrolls one more NCU (or server agent) for the domain; the identity lives in `dir`.
    pub async fn enroll(&self, dir: &std::path::Path) -> Result<ncu::identity::Identity> {
        let (status, body) = self
            .stack
            .api
            .call(reqwest::Method::POST, "/v1/domains/site.tether.test/enrollments", Some(&self.token), None)
            .await?;
        anyhow::ensure!(status == reqwest::StatusCode::CREATED, "enrollment token: {status} {body}");
        let token = body["token"].as_str().unwrap_or_default();
        ncu::hds_client::enroll(&[self.hds.address()], &self.pki.ca_pem(), token, dir, None, None).await?;
        Ok(ncu::identity::Identity::load(dir)?)
    }

    /// An agent with `uplinks`.
    pub fn agent(&self, uplinks: Vec<UplinkSpec>) -> Agent {
        Agent::start(vec![self.hds.address()], self.identity.clone(), uplinks)
    }

    /// Stops the servers.
    pub async fn stop(self) -> Result<()> {
        self.hbs.stop().await?;
        self.hds.stop().await
    }
}

/// One domain's site: its hds, one heartbeat server, and an NCU agent enrolled for the domain with two loopback
/// uplinks, `wan1` 127.0.0.2 and `wan2` 127.0.0.3 (the benches' setup).
pub struct LoopbackSite {
    /// The operator PKI.
    pub pki: Pki,
    /// hds.
    pub hds: crate::hds_stack::HdsServer,
    /// The heartbeat server.
    pub hbs: HbsServer,
    /// The agent.
    pub agent: Agent,
    _identity: tempfile::TempDir,
}

impl LoopbackSite {
    /// Starts hds and one hbs against `stack`'s Postgres and enrolls an agent for `domain` (owned by `token`).
    pub async fn start(stack: &crate::stack::Stack, token: &str, domain: &str) -> Result<Self> {
        let pki = Pki::new()?;
        let hds = crate::hds_stack::HdsServer::start(&stack.pg.url(), &pki, "").await?;
        let hbs = HbsServer::start(&stack.pg.url(), &pki, "hbs-bench").await?;
        let path = format!("/v1/domains/{domain}/enrollments");
        let (_, body) = stack.api.call(reqwest::Method::POST, &path, Some(token), None).await?;
        let enrollment = body["token"].as_str().map(str::to_owned);
        let enrollment = enrollment.ok_or_else(|| anyhow::anyhow!("no enrollment token: {body}"))?;
        let dir = tempfile::tempdir()?;
        tokio::time::sleep(Duration::from_millis(600)).await; // the fleet row
        ncu::hds_client::enroll(&[hds.address()], &pki.ca_pem(), &enrollment, dir.path(), None, None).await?;
        let identity = ncu::identity::Identity::load(dir.path())?;
        let uplinks = vec![uplink("wan1", "127.0.0.2"), uplink("wan2", "127.0.0.3")];
        let agent = Agent::start(vec![hds.address()], identity, uplinks);
        Ok(Self { pki, hds, hbs, agent, _identity: dir })
    }
}

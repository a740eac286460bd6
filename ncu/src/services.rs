//! Service tuples configure the site: the heartbeat server sends the tuples bound to this site's uplink addresses
//! ([`SiteService`]), and for each one the configuration names (`[services.<name>]`) the site
//! - forwards it to a LAN server (`to`): a DNAT rule in nftables, in a table of tether's own
//!   ([`tether_nft::FORWARDS_TABLE`]), removed when the tuple goes;
//! - or, on a server, runs it: `start` when the tuple appears, `stop` when it goes;
//! - and checks it every [`TICK`] (a TCP connect, or an HTTP GET expecting 2xx or 3xx, to `to` or else the tuple's
//!   own address and port), reporting each change as [`ToHbs::ServiceHealth`]: a failing service's tuple leaves the
//!   SRV answers while the uplink stays live.
//!
//! Tuples arrive on the control session rather than being read from DNS: they come from the heartbeat server that
//! already holds this site's authenticated session, at once when they change (no polling interval, no TTL), and
//! only this site's own tuples (a DNS read would need the site to know its names and trust a resolver's cache).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::Deserialize;
use tether_nft::Forward;
use tether_proto::control::{SiteService, ToHbs};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often every service is checked.
pub const TICK: Duration = Duration::from_secs(1);
/// How long one check may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// One `[services.<name>]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Forward the tuple's flows to this LAN server.
    pub to: Option<SocketAddr>,
    /// Run when a tuple of the service appears (program and arguments; no shell).
    #[serde(default)]
    pub start: Vec<String>,
    /// Run when the service's last tuple goes.
    #[serde(default)]
    pub stop: Vec<String>,
    /// `tcp` (default), `http` or `none`.
    #[serde(default)]
    pub check: CheckKind,
    /// The path an `http` check asks for.
    #[serde(default = "default_path")]
    pub path: String,
}

/// How a service is checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection is accepted.
    #[default]
    Tcp,
    /// `GET path` answers 2xx or 3xx.
    Http,
    /// Not checked: always healthy.
    None,
}

fn default_path() -> String {
    "/".into()
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self { to: None, start: Vec::new(), stop: Vec::new(), check: CheckKind::default(), path: default_path() }
    }
}

impl ServiceConfig {
    /// Checks what serde cannot.
    pub fn validate(&self, name: &str) -> Result<(), String> {
        let label = !name.is_empty() && name.len() <= 62 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !label {
            return Err(format!("{name:?}: a service name is 1-62 letters, digits or hyphens"));
        }
        if self.to.is_some_and(|to| to.port() == 0 || to.ip().is_unspecified()) {
            return Err(format!("{name}: `to` needs an address and a port"));
        }
        if self.to.is_some() && !self.start.is_empty() {
            return Err(format!("{name}: either `to` (a port forward) or `start` (a local service), not both"));
        }
        if !self.path.starts_with('/') || self.path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{name}: `path` must be an absolute path without spaces"));
        }
        Ok(())
    }
}

/// Keeps the site equal to the tuples in `wanted` until `shutdown`, then removes its forwards.
pub async fn run(
    config: BTreeMap<String, ServiceConfig>,
    mut wanted: watch::Receiver<Vec<SiteService>>,
    reports: mpsc::UnboundedSender<ToHbs>,
    shutdown: CancellationToken,
) {
    let mut site = Site { config, installed: None, running: BTreeSet::new(), health: BTreeMap::new() };
    let mut tick = tether_config::ticker(TICK);
    while tether_config::next_round(&shutdown, &mut wanted, &mut tick).await {
        let tuples = wanted.borrow_and_update().clone();
        site.forward(&tuples).await;
        site.start_and_stop(&tuples).await;
        for (id, healthy, reason) in site.check(&tuples).await {
            let _ = reports.send(ToHbs::ServiceHealth { id, healthy, reason });
        }
    }
    if site.installed.as_ref().is_some_and(|f| !f.is_empty()) {
        match tether_nft::apply_forwards(&[]).await {
            Ok(()) => info!("port forwards removed"),
            Err(error) => warn!(%error, "could not remove the port forwards"),
        }
    }
}

struct Site {
    config: BTreeMap<String, ServiceConfig>,
    /// The forwards the kernel holds; `None` until the first apply succeeds.
    installed: Option<Vec<Forward>>,
    /// Services started here.
    running: BTreeSet<String>,
    /// The last health reported, by tuple.
    health: BTreeMap<i64, (bool, Option<String>)>,
}

impl Site {
    /// The port forwards the tuples and the configuration ask for.
    fn forwards(&self, tuples: &[SiteService]) -> Vec<Forward> {
        let mut forwards: Vec<Forward> = tuples
            .iter()
            .filter_map(|t| {
                let to = self.config.get(&t.service)?.to?;
                let protocol = match t.transport.as_str() {
                    "tcp" | "tls" => "tcp",
                    "udp" => "udp",
                    _ => return None,
                };
                (to.is_ipv4() == t.address.is_ipv4()).then_some(Forward {
                    id: t.id,
                    from: t.address,
                    protocol,
                    port: t.port,
                    to,
                })
            })
            .collect();
        forwards.sort();
        forwards
    }

    async fn forward(&mut self, tuples: &[SiteService]) {
        let forwards = self.forwards(tuples);
        if self.installed.as_ref() == Some(&forwards) || (self.installed.is_none() && forwards.is_empty()) {
            return;
        }
        match tether_nft::apply_forwards(&forwards).await {
            Ok(()) => {
                for f in &forwards {
                    if !self.installed.as_ref().is_some_and(|i| i.contains(f)) {
                        info!(service = f.id, from = %f.from, port = f.port, to = %f.to, "port forward installed");
                    }
                }
                for f in self.installed.iter().flatten().filter(|f| !forwards.contains(f)) {
                    info!(service = f.id, from = %f.from, port = f.port, "port forward removed");
                }
                self.installed = Some(forwards);
            }
            Err(error) => warn!(%error, "cannot install the port forwards; retrying every second"),
        }
    }

    /// Runs `start` for services that gained a tuple and `stop` for those that lost their last one.
    async fn start_and_stop(&mut self, tuples: &[SiteService]) {
        let present: BTreeSet<String> = tuples.iter().map(|t| t.service.clone()).collect();
        for (name, config) in &self.config {
            let (here, running) = (present.contains(name), self.running.contains(name));
            let command = match (here, running) {
                (true, false) if !config.start.is_empty() => &config.start,
                (false, true) => &config.stop,
                _ => continue,
            };
            if here {
                self.running.insert(name.clone());
            } else {
                self.running.remove(name);
            }
            if command.is_empty() {
                continue;
            }
            let what = if here { "start" } else { "stop" };
            let status = tokio::process::Command::new(&command[0]).args(&command[1..]).kill_on_drop(true).status();
            match tokio::time::timeout(Duration::from_secs(30), status).await {
                Ok(Ok(status)) if status.success() => info!(service = %name, what, "service command ran"),
                Ok(Ok(status)) => warn!(service = %name, what, %status, "service command failed"),
                Ok(Err(error)) => warn!(service = %name, what, %error, "cannot run the service command"),
                Err(_) => warn!(service = %name, what, "service command still running after 30 s; left to finish"),
            }
        }
    }

    /// Checks every tuple at once; returns the tuples whose health changed (or is new).
    async fn check(&mut self, tuples: &[SiteService]) -> Vec<(i64, bool, Option<String>)> {
        let checks = tuples.iter().map(|t| {
            let config = self.config.get(&t.service).cloned().unwrap_or_default();
            let target = config.to.unwrap_or(SocketAddr::new(t.address, t.port));
            let udp = t.transport == "udp";
            async move { (t.id, check(&config, target, udp).await) }
        });
        let results = futures_util::future::join_all(checks).await;
        self.health.retain(|id, _| tuples.iter().any(|t| t.id == *id));
        let mut changed = Vec::new();
        for (id, result) in results {
            let now = match result {
                Ok(()) => (true, None),
                Err(reason) => (false, Some(reason)),
            };
            if self.health.get(&id) != Some(&now) {
                if now.0 {
                    info!(service = id, "service healthy");
                } else {
                    warn!(service = id, reason = now.1.as_deref().unwrap_or(""), "service failing");
                }
                self.health.insert(id, now.clone());
                changed.push((id, now.0, now.1));
            }
        }
        changed
    }
}

/// One check of one service at `target`.
async fn check(config: &ServiceConfig, target: SocketAddr, udp: bool) -> Result<(), String> {
    if config.check == CheckKind::None || udp {
        return Ok(());
    }
    let attempt = async {
        let mut stream = TcpStream::connect(target).await.map_err(|e| format!("connect to {target}: {e}"))?;
        if config.check == CheckKind::Http {
            let host = match target.ip() {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            };
            let request = format!("GET {} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: tether-ncu\r\n\r\n", config.path);
            stream.write_all(request.as_bytes()).await.map_err(|e| format!("send to {target}: {e}"))?;
            let mut head = [0_u8; 64];
            let n = stream.read(&mut head).await.map_err(|e| format!("read from {target}: {e}"))?;
            let line = String::from_utf8_lossy(&head[..n]);
            let status = line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
            match status {
                Some(200..=399) => {}
                Some(code) => return Err(format!("GET {} on {target}: status {code}", config.path)),
                None => return Err(format!("GET {} on {target}: not an HTTP answer", config.path)),
            }
        }
        Ok(())
    };
    tokio::time::timeout(CHECK_TIMEOUT, attempt)
        .await
        .map_err(|_| format!("{target}: no answer within {CHECK_TIMEOUT:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(id: i64, service: &str, transport: &str, port: u16) -> SiteService {
        SiteService {
            id,
            service: service.into(),
            transport: transport.into(),
            uplink: "wan1".into(),
            address: "198.18.1.2".parse().expect("ip"),
            port,
        }
    }

    #[test]
    fn only_mapped_tcp_and_udp_tuples_of_one_family_are_forwarded() {
        let mut config = BTreeMap::new();
        config.insert(
            "web".to_owned(),
            ServiceConfig { to: Some("198.19.1.10:8080".parse().expect("addr")), ..Default::default() },
        );
        config.insert(
            "v6".to_owned(),
            ServiceConfig { to: Some("[fd00::10]:53".parse().expect("addr")), ..Default::default() },
        );
        config.insert("local".to_owned(), ServiceConfig { start: vec!["true".into()], ..Default::default() });
        let site = Site { config, installed: None, running: BTreeSet::new(), health: BTreeMap::new() };
        let tuples = [
            tuple(1, "web", "tls", 443),
            tuple(2, "web", "sctp", 9),
            tuple(3, "v6", "udp", 53),
            tuple(4, "local", "tcp", 22),
            tuple(5, "other", "tcp", 1),
        ];
        let forwards = site.forwards(&tuples);
        assert_eq!(forwards.len(), 1, "{forwards:?}");
        assert_eq!((forwards[0].id, forwards[0].protocol, forwards[0].port), (1, "tcp", 443));
    }

    #[test]
    fn configurations_are_checked() {
        let ok = ServiceConfig { to: Some("198.19.1.10:80".parse().expect("addr")), ..Default::default() };
        assert!(ok.validate("web").is_ok());
        assert!(ok.validate("we b").is_err());
        let both = ServiceConfig { start: vec!["x".into()], ..ok.clone() };
        assert!(both.validate("web").unwrap_err().contains("not both"));
        let bad_path = ServiceConfig { path: "x y".into(), ..ok };
        assert!(bad_path.validate("web").is_err());
    }

    #[tokio::test]
    async fn checks_see_a_listener_come_and_go() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let target = listener.local_addr().expect("addr");
        let tcp = ServiceConfig::default();
        assert_eq!(check(&tcp, target, false).await, Ok(()));
        let http = ServiceConfig { check: CheckKind::Http, ..Default::default() };
        // Two connections: the TCP check's (still in the backlog), then the HTTP check's.
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut buf = [0_u8; 256];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.0 503 Service Unavailable\r\n\r\n").await;
            }
        });
        assert!(check(&http, target, false).await.unwrap_err().contains("status 503"));
        server.await.expect("server");
        assert!(check(&tcp, target, false).await.is_err(), "nothing listens any more");
        assert_eq!(check(&tcp, target, true).await, Ok(()), "UDP is not checked");
    }
}

//! The reference DNS servers from Debian's packages, NSD and Knot, started as processes on a loopback port of their
//! own and killed on drop: as primaries of a zone file, or as secondaries that transfer zones from tether.

use std::{
    fmt::Write as _,
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use hickory_proto::rr::RecordType;

use crate::{
    dns_client::{Transport, ask},
    eventually,
};

/// Which reference server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NSD (`nsd`).
    Nsd,
    /// Knot DNS (`knotd`).
    Knot,
}

/// A TSIG key as both servers' configurations name it.
#[derive(Debug, Clone)]
pub struct Key {
    /// Key name, without the trailing dot.
    pub name: String,
    /// `hmac-sha256` and the like.
    pub algorithm: String,
    /// Base64 secret.
    pub secret: String,
}

/// A zone a peer serves.
#[derive(Debug, Clone)]
pub enum Zone {
    /// From a zone file with this text.
    Primary { origin: String, text: String },
    /// Transferred from `primary`, which may NOTIFY it; signed with `key` when set.
    Secondary { origin: String, primary: SocketAddr, key: Option<Key> },
}

impl Zone {
    fn origin(&self) -> &str {
        match self {
            Self::Primary { origin, .. } | Self::Secondary { origin, .. } => origin,
        }
    }
}

/// A running reference server.
pub struct Peer {
    /// Which server this is.
    pub kind: Kind,
    /// Where it answers, over UDP and TCP.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Child,
}

impl Peer {
    /// Starts `kind` serving `zone_text` as zone `origin` (no trailing dot); see [`Peer::serve`].
    pub async fn start(kind: Kind, origin: &str, zone_text: &str) -> Result<Self> {
        Self::serve(kind, &[Zone::Primary { origin: origin.to_owned(), text: zone_text.to_owned() }]).await
    }

    /// Starts `kind` serving `zones` with minimal responses, no NSID and no cookies, and waits until it answers the
    /// SOA of each (for a secondary: once it has transferred the zone). A missing binary is an error naming the
    /// package.
    pub async fn serve(kind: Kind, zones: &[Zone]) -> Result<Self> {
        let binary = kind.binary()?;
        let mut last_error = None;
        // The port is found free and then handed to the server: another process may take it between the two.
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix(kind.name()).tempdir()?;
            for (i, zone) in zones.iter().enumerate() {
                if let Zone::Primary { text, .. } = zone {
                    std::fs::write(dir.path().join(format!("zone{i}")), text)?;
                }
            }
            let addr = free_port()?;
            let config = dir.path().join("server.conf");
            std::fs::write(&config, kind.config(dir.path(), addr, zones))?;
            let log = std::fs::File::create(dir.path().join("stderr.log"))?;
            let mut command = Command::new(&binary);
            match kind {
                Kind::Nsd => command.args(["-d", "-c"]),
                Kind::Knot => command.args(["-c"]),
            };
            let child = command
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            let peer = Self { kind, addr, dir, child };
            let mut answered = Ok(());
            for zone in zones {
                let apex = format!("{}.", zone.origin());
                answered = eventually(Duration::from_secs(20), &format!("{} to serve {apex}", kind.name()), || async {
                    let response = ask(addr, &apex, RecordType::SOA, Transport::Udp).await.ok()?;
                    (response.answers.len() == 1).then_some(())
                })
                .await;
                if answered.is_err() {
                    break;
                }
            }
            match answered {
                Ok(()) => return Ok(peer),
                Err(error) => last_error = Some(error.context(peer.logs())),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("{} never started", kind.name())))
    }

    /// The server's own logs, for failure messages and for what they say about transfers.
    pub fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{} logs:\n{}{}", self.kind.name(), read("stderr.log"), read("server.log"))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Kind {
    /// The server's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Nsd => "nsd",
            Self::Knot => "knot",
        }
    }

    fn binary(self) -> Result<PathBuf> {
        let (file, package) = match self {
            Self::Nsd => ("nsd", "nsd"),
            Self::Knot => ("knotd", "knot"),
        };
        let on_path = std::env::var_os("PATH")
            .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(file)).find(|p| p.exists()));
        match on_path.or_else(|| Some(Path::new("/usr/sbin").join(file)).filter(|p| p.exists())) {
            Some(path) => Ok(path),
            None => bail!("{file} not found: install the {package} package (scripts/install-deps does)"),
        }
    }

    fn config(self, dir: &Path, addr: SocketAddr, zones: &[Zone]) -> String {
        let dir = dir.display();
        let (ip, port) = (addr.ip(), addr.port());
        let mut keys: Vec<&Key> = Vec::new();
        for zone in zones {
            if let Zone::Secondary { key: Some(key), .. } = zone
                && !keys.iter().any(|k| k.name == key.name)
            {
                keys.push(key);
            }
        }
        let mut text = String::new();
        match self {
            // username "" keeps NSD from switching to a user that may not own the directory; no database file;
            // a transfer is served at once (no reload delay).
            Self::Nsd => {
                let _ = write!(
                    text,
                    "server:\n  ip-address: {ip}@{port}\n  port: {port}\n  username: \"\"\n  database: \"\"\n  \
                     zonesdir: \"{dir}\"\n  zonelistfile: \"{dir}/zone.list\"\n  xfrdfile: \"{dir}/xfrd.state\"\n  \
                     xfrdir: \"{dir}\"\n  pidfile: \"{dir}/nsd.pid\"\n  logfile: \"{dir}/server.log\"\n  \
                     minimal-responses: yes\n  hide-version: yes\n  verbosity: 3\n  xfrd-reload-timeout: 0\n\
                     remote-control:\n  control-enable: no\n"
                );
                for key in &keys {
                    let _ = write!(
                        text,
                        "key:\n  name: {}\n  algorithm: {}\n  secret: \"{}\"\n",
                        key.name, key.algorithm, key.secret
                    );
                }
                for (i, zone) in zones.iter().enumerate() {
                    let _ = write!(text, "zone:\n  name: {}\n  zonefile: zone{i}\n", zone.origin());
                    if let Zone::Secondary { primary, key, .. } = zone {
                        let key = key.as_ref().map_or("NOKEY", |k| k.name.as_str());
                        let _ = write!(
                            text,
                            "  request-xfr: {}@{} {key}\n  allow-notify: {} {key}\n",
                            primary.ip(),
                            primary.port(),
                            primary.ip()
                        );
                    }
                }
            }
            Self::Knot => {
                let _ = write!(
                    text,
                    "server:\n  listen: {ip}@{port}\n  rundir: \"{dir}\"\n  nsid: \"\"\n\
                     log:\n  - target: \"{dir}/server.log\"\n    any: info\n\
                     database:\n  storage: \"{dir}\"\n\
                     template:\n  - id: default\n    storage: \"{dir}\"\n"
                );
                if !keys.is_empty() {
                    text.push_str("key:\n");
                    for key in &keys {
                        let _ = write!(
                            text,
                            "  - id: {}\n    algorithm: {}\n    secret: {}\n",
                            key.name, key.algorithm, key.secret
                        );
                    }
                }
                let secondaries: Vec<(usize, SocketAddr, Option<&Key>)> = zones
                    .iter()
                    .enumerate()
                    .filter_map(|(i, z)| match z {
                        Zone::Secondary { primary, key, .. } => Some((i, *primary, key.as_ref())),
                        Zone::Primary { .. } => None,
                    })
                    .collect();
                if !secondaries.is_empty() {
                    text.push_str("remote:\n");
                    for (i, primary, key) in &secondaries {
                        let _ = write!(text, "  - id: primary{i}\n    address: {}@{}\n", primary.ip(), primary.port());
                        if let Some(key) = key {
                            let _ = writeln!(text, "    key: {}", key.name);
                        }
                    }
                    text.push_str("acl:\n");
                    for (i, primary, key) in &secondaries {
                        let _ = write!(text, "  - id: notify{i}\n    address: {}\n    action: notify\n", primary.ip());
                        if let Some(key) = key {
                            let _ = writeln!(text, "    key: {}", key.name);
                        }
                    }
                }
                text.push_str("zone:\n");
                for (i, zone) in zones.iter().enumerate() {
                    match zone {
                        Zone::Primary { origin, .. } => {
                            let _ =
                                write!(text, "  - domain: {origin}\n    file: zone{i}\n    journal-content: none\n");
                        }
                        Zone::Secondary { origin, .. } => {
                            let _ = write!(
                                text,
                                "  - domain: {origin}\n    file: zone{i}\n    master: primary{i}\n    acl: notify{i}\n"
                            );
                        }
                    }
                }
            }
        }
        text
    }
}

/// A loopback port free for both UDP and TCP just now.
fn free_port() -> Result<SocketAddr> {
    for _ in 0..16 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let addr = udp.local_addr()?;
        if TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no loopback port free for both UDP and TCP")
}

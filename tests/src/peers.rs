//! The reference DNS servers from Debian's packages, NSD and Knot, each serving one zone file on a loopback port of
//! its own, started as processes and killed on drop.

use std::{
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

/// A reference server answering for one zone.
pub struct Peer {
    /// Which server this is.
    pub kind: Kind,
    /// Where it answers, over UDP and TCP.
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Child,
}

impl Peer {
    /// Starts `kind` serving `zone_text` as zone `origin` (no trailing dot) with minimal responses, no NSID and no
    /// cookies, and waits until it answers the zone's SOA. A missing binary is an error naming the package.
    pub async fn start(kind: Kind, origin: &str, zone_text: &str) -> Result<Self> {
        let binary = kind.binary()?;
        let mut last_error = None;
        // The port is found free and then handed to the server: another process may take it between the two.
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix(kind.name()).tempdir()?;
            std::fs::write(dir.path().join("zone"), zone_text)?;
            let addr = free_port()?;
            let config = dir.path().join("server.conf");
            std::fs::write(&config, kind.config(dir.path(), addr, origin))?;
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
            let apex = format!("{origin}.");
            let answered = eventually(Duration::from_secs(10), &format!("{} to answer", kind.name()), || async {
                let response = ask(addr, &apex, RecordType::SOA, Transport::Udp).await.ok()?;
                (response.answers.len() == 1).then_some(())
            })
            .await;
            match answered {
                Ok(()) => return Ok(peer),
                Err(error) => last_error = Some(error.context(peer.logs())),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("{} never started", kind.name())))
    }

    /// The server's own logs, for failure messages.
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

    fn config(self, dir: &Path, addr: SocketAddr, origin: &str) -> String {
        let dir = dir.display();
        let (ip, port) = (addr.ip(), addr.port());
        match self {
            // username "" keeps NSD from switching to a user that may not own the directory; no database file.
            Self::Nsd => format!(
                "server:\n  ip-address: {ip}@{port}\n  port: {port}\n  username: \"\"\n  database: \"\"\n  \
                 zonesdir: \"{dir}\"\n  zonelistfile: \"{dir}/zone.list\"\n  xfrdfile: \"{dir}/xfrd.state\"\n  \
                 pidfile: \"{dir}/nsd.pid\"\n  logfile: \"{dir}/server.log\"\n  minimal-responses: yes\n  \
                 hide-version: yes\n  verbosity: 1\nremote-control:\n  control-enable: no\n\
                 zone:\n  name: {origin}\n  zonefile: zone\n"
            ),
            Self::Knot => format!(
                "server:\n  listen: {ip}@{port}\n  rundir: \"{dir}\"\n  nsid: \"\"\n\
                 log:\n  - target: \"{dir}/server.log\"\n    any: info\n\
                 database:\n  storage: \"{dir}\"\n\
                 template:\n  - id: default\n    storage: \"{dir}\"\n    journal-content: none\n\
                 zone:\n  - domain: {origin}\n    file: zone\n"
            ),
        }
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

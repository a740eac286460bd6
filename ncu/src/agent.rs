//! `ncu run`: registers the uplinks with the assigned heartbeat server, answers its heartbeats on every uplink from
//! a socket bound to that uplink's address, and moves to the backup server when the heartbeats stop (or when the
//! server drains). Uplinks come from a `watch` channel, so the configuration today and netlink discovery later plug
//! in the same way.
//!
//! One task drives everything: per-uplink reader tasks and the control-stream reader feed channels into it, so the
//! loop's `select!` only waits on cancel-safe channel receives and the responder's single timer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use tether_pki::{self as pki, stream as frame};
use tether_proto::{
    control::{self, ToHbs, ToNcu, Uplink},
    hds::HeartbeatServer,
    heartbeat::responder::{Responder, ResponderEvent, ResponderPolicy},
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    hds_client::{self, Assignment},
    identity::Identity,
    load,
};

/// An uplink as the agent is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkSpec {
    /// Interface name.
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// The interface to bind heartbeat sockets to, so replies leave through this uplink.
    pub interface: Option<String>,
    /// Lower is preferred.
    pub priority: u16,
    /// Share among equals.
    pub weight: u16,
}

/// Silences uplinks without deregistering them: heartbeats on a silenced uplink go unanswered, as when a link fails
/// silently. For failover drills and tests.
#[derive(Debug, Clone, Default)]
pub struct Drill {
    silenced: Arc<Mutex<BTreeSet<String>>>,
}

/// What the agent is doing, for status displays and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The heartbeat server registered with.
    pub hbs: Option<String>,
    /// The server to move to when it stops.
    pub backup: Option<String>,
    /// The current session.
    pub session: Option<u64>,
    /// Uplinks the server accepted.
    pub registered: Vec<String>,
    /// The backup an idle connection is open to, ready for a move.
    pub standby: Option<String>,
}

/// How long to wait for hds while no heartbeat server is known.
const ASSIGN_PATIENCE: Duration = Duration::from_secs(3600 * 24 * 365);
/// How long one connection attempt to a heartbeat server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a registration over the standby connection may take. No handshake is at stake: a slow answer means a
/// server busy with a storm of moves, and giving up would only add a handshake to its queue. A dead server closes
/// the connection (idle timeout) before this.
const STANDBY_TIMEOUT: Duration = Duration::from_secs(15);
/// After a move, an NCU asks hds for a new backup only once the move's storm is over: its peers, which noticed the
/// same server's silence within a second or so, have all registered within [`STANDBY_TIMEOUT`] (or given up on
/// their standby). Until then, the new server, hds and their shared Postgres are busy with the moves themselves.
pub const BACKUP_SETTLE: Duration = STANDBY_TIMEOUT;
/// ... and then after a further random delay below this, so that the requests reach hds as a few hundred
/// handshakes a second rather than as one burst of thousands. Should the new server fail meanwhile, the NCU simply
/// asks hds for a whole new assignment.
pub const BACKUP_SPREAD: Duration = Duration::from_secs(30);

/// How long an NCU that has just moved waits before it asks hds for a new backup.
fn backup_delay_after_move() -> Duration {
    BACKUP_SETTLE + BACKUP_SPREAD.mul_f64(rand::random())
}

impl Drill {
    /// Stops (or resumes) answering heartbeats on `uplink`.
    pub fn silence(&self, uplink: &str, silent: bool) {
        let mut set = self.silenced.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if silent {
            set.insert(uplink.to_owned());
        } else {
            set.remove(uplink);
        }
    }

    fn is_silenced(&self, uplink: &str) -> bool {
        self.silenced.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(uplink)
    }
}

/// Why a session ended.
enum Exit {
    /// Heartbeats stopped: move to the backup.
    PrimaryLost,
    /// The server asked us to move.
    Drain,
    /// The control connection closed.
    Closed(String),
    /// We are shutting down.
    Shutdown,
}

/// A bound uplink socket and the task reading it.
struct UplinkSocket {
    index: u8,
    spec: UplinkSpec,
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

/// One received heartbeat datagram: uplink index, bytes, source.
type Datagram = (u8, Vec<u8>, SocketAddr);

/// Runs the agent until `shutdown`.
pub async fn run(
    hds: Vec<String>,
    identity: Identity,
    failover_after: Duration,
    uplinks: watch::Receiver<Vec<UplinkSpec>>,
    drill: Drill,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tls = Arc::new(
        pki::client_tls(&identity.ca_pem, Some((&identity.cert_pem, &identity.key_pem)), control::ALPN)
            .context("building TLS from the NCU identity")?,
    );
    let (datagrams_tx, datagrams) = mpsc::channel(1024);
    let mut agent = Agent {
        hds,
        identity,
        tls,
        sockets: BTreeMap::new(),
        datagrams_tx,
        datagrams,
        responder: Responder::new(ResponderPolicy { failover_after, ..ResponderPolicy::default() }),
        drill,
        status,
        uplinks,
        uplinks_open: true,
        load: load::current(),
        standby: None,
    };
    agent.sync_sockets().await;
    let mut next: Option<Assignment> = None;
    let mut failed: Vec<String> = Vec::new();
    loop {
        // `moved`: not from hds but a move to a backup, whose search for a new backup waits (backup_delay_after_move).
        let (pair, moved) = match next.take() {
            Some(pair) => (pair, true),
            None => {
                let request = hds_client::assign(&agent.hds, &agent.identity, &failed, ASSIGN_PATIENCE);
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    pair = request => (pair.context("asking hds for heartbeat servers")?, false),
                }
            }
        };
        let target = pair.primary.clone();
        let connected = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            connected = agent.connect(&target) => connected,
        };
        match connected {
            Ok(session) => {
                failed.clear();
                let backup_delay = if moved { backup_delay_after_move() } else { Duration::ZERO };
                let (exit, backup) = agent.serve(session, &target, pair.backup, backup_delay, &shutdown).await;
                match exit {
                    Exit::Shutdown => return Ok(()),
                    Exit::PrimaryLost | Exit::Closed(_) => {
                        if let Exit::Closed(reason) = &exit {
                            warn!(hbs = %target.name, %reason, "control connection closed; moving to the backup");
                        } else {
                            warn!(hbs = %target.name, "heartbeats stopped; moving to the backup");
                        }
                        failed = vec![target.name.clone()];
                        next = backup.map(|primary| Assignment { primary, backup: None });
                    }
                    Exit::Drain => {
                        info!(hbs = %target.name, "server draining; asking hds for another");
                        next = None;
                    }
                }
            }
            Err(error) => {
                warn!(hbs = %target.name, error = %format!("{error:#}"), "cannot register; trying the backup");
                failed.push(target.name.clone());
                next = pair.backup.map(|primary| Assignment { primary, backup: None });
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }
}

struct Agent {
    hds: Vec<String>,
    identity: Identity,
    tls: Arc<rustls::ClientConfig>,
    sockets: BTreeMap<String, UplinkSocket>,
    datagrams_tx: mpsc::Sender<Datagram>,
    datagrams: mpsc::Receiver<Datagram>,
    responder: Responder,
    drill: Drill,
    status: watch::Sender<Status>,
    uplinks: watch::Receiver<Vec<UplinkSpec>>,
    /// False once the uplink source is gone: no more changes will come.
    uplinks_open: bool,
    load: u16,
    /// A connection to the backup, handshake done, kept idle so a failover costs one registration.
    standby: Option<Standby>,
}

/// An idle, authenticated connection to the backup server: the TLS handshake (the costly part of a move, and what
/// a storm of thousands of NCUs moving at once would queue on) is done while the primary is healthy.
struct Standby {
    server: HeartbeatServer,
    connection: quinn::Connection,
}

/// A registered control session.
struct Connected {
    connection: quinn::Connection,
    send: quinn::SendStream,
    messages: mpsc::UnboundedReceiver<Result<ToNcu, String>>,
    session: u64,
    key: [u8; 32],
    heartbeat: SocketAddr,
    accepted: Vec<String>,
}

impl Agent {
    /// Opens sockets for new uplinks and closes those of removed ones.
    async fn sync_sockets(&mut self) {
        let wanted: Vec<UplinkSpec> = self.uplinks.borrow_and_update().clone();
        let gone: Vec<String> = self
            .sockets
            .iter()
            .filter(|(name, s)| !wanted.iter().any(|w| &w.name == *name && w.address == s.spec.address))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(socket) = self.sockets.remove(&name) {
                socket.reader.abort();
                info!(uplink = %name, "uplink removed");
            }
        }
        for spec in wanted {
            if let Some(existing) = self.sockets.get_mut(&spec.name) {
                existing.spec = spec;
                continue;
            }
            let used: BTreeSet<u8> = self.sockets.values().map(|s| s.index).collect();
            let Some(index) = (0..16).find(|i| !used.contains(i)) else {
                warn!(uplink = %spec.name, "no free uplink index (15 uplinks at most)");
                continue;
            };
            let socket = match bind_uplink(&spec) {
                Ok(socket) => Arc::new(socket),
                Err(error) => {
                    warn!(uplink = %spec.name, address = %spec.address, %error, "cannot bind the uplink's address");
                    continue;
                }
            };
            let reader = tokio::spawn(read_uplink(index, socket.clone(), self.datagrams_tx.clone()));
            info!(uplink = %spec.name, address = %spec.address, index, "uplink added");
            self.sockets.insert(spec.name.clone(), UplinkSocket { index, spec, socket, reader });
        }
    }

    fn uplinks_for_hbs(&self) -> Vec<Uplink> {
        self.sockets
            .values()
            .map(|s| Uplink {
                name: s.spec.name.clone(),
                index: s.index,
                address: s.spec.address,
                port: s.socket.local_addr().map_or(0, |a| a.port()),
                priority: s.spec.priority,
                weight: s.spec.weight,
            })
            .collect()
    }

    /// Registers on the standby connection when it leads to `target` and is still open, else on a new one.
    async fn connect(&mut self, target: &HeartbeatServer) -> anyhow::Result<Connected> {
        let standby = self.standby.take_if(|s| s.server.name == target.name && s.connection.close_reason().is_none());
        if let Some(standby) = standby {
            match tokio::time::timeout(STANDBY_TIMEOUT, self.register(standby.connection, target)).await {
                Ok(Ok(connected)) => return Ok(connected),
                Ok(Err(error)) => debug!(hbs = %target.name, %error, "standby connection unusable; connecting anew"),
                Err(_) => debug!(hbs = %target.name, "no answer over the standby connection; connecting anew"),
            }
        }
        let fresh = async {
            let connection = dial(&self.tls, target).await?;
            self.register(connection, target).await
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fresh)
            .await
            .with_context(|| format!("no answer from {} within {CONNECT_TIMEOUT:?}", target.address))?
    }

    /// Sends the uplinks on a new control stream of `connection` and reads the server's answer.
    async fn register(&self, connection: quinn::Connection, target: &HeartbeatServer) -> anyhow::Result<Connected> {
        let (mut send, mut recv) = connection.open_bi().await?;
        frame::write(&mut send, control::VERSION, &ToHbs::Register { uplinks: self.uplinks_for_hbs() }).await?;
        let first = frame::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME)
            .await?
            .context("the server closed the stream")?;
        let ToNcu::Registered { session, key, heartbeat_port, accepted, refused, .. } = first else {
            bail!("registration refused: {first:?}");
        };
        for refusal in &refused {
            warn!(uplink = %refusal.name, reason = %refusal.reason, "uplink refused by the heartbeat server");
        }
        let key = decode_key(&key)?;
        let (tx, messages) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let message = match frame::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME).await {
                    Ok(Some(message)) => Ok(message),
                    Ok(None) => Err("stream finished".to_owned()),
                    Err(error) => Err(error.to_string()),
                };
                let end = message.is_err();
                if tx.send(message).is_err() || end {
                    return;
                }
            }
        });
        let heartbeat = SocketAddr::new(connection.remote_address().ip(), heartbeat_port);
        info!(hbs = %target.name, session, accepted = accepted.len(), "registered");
        Ok(Connected { connection, send, messages, session, key, heartbeat, accepted })
    }

    async fn serve(
        &mut self,
        mut session: Connected,
        target: &HeartbeatServer,
        mut backup: Option<HeartbeatServer>,
        backup_delay: Duration,
        shutdown: &CancellationToken,
    ) -> (Exit, Option<HeartbeatServer>) {
        let indexes: Vec<u8> = self.sockets.values().map(|s| s.index).collect();
        self.responder.set_session(
            session.session,
            session.key,
            session.heartbeat,
            &indexes,
            Instant::now().into_std(),
        );
        let mut refresh: Option<oneshot::Receiver<Option<HeartbeatServer>>> =
            if backup.is_none() { Some(self.find_backup(target, backup_delay)) } else { None };
        let mut dialing = self.prepare_standby(backup.as_ref());
        self.publish(target, backup.as_ref(), &session);
        let timer = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(timer);
        let mut load_tick = tokio::time::interval(Duration::from_secs(5));
        let mut backup_retry = tokio::time::interval(Duration::from_secs(30));
        let exit = loop {
            if let Some(deadline) = self.responder.poll_timeout() {
                timer.as_mut().reset(Instant::from_std(deadline));
            }
            let standby = self.standby.as_ref().map(|s| s.connection.clone());
            tokio::select! {
                () = shutdown.cancelled() => break Exit::Shutdown,
                Some((index, bytes, from)) = self.datagrams.recv() => self.answer(index, &bytes, from).await,
                () = &mut timer => self.responder.handle_timeout(Instant::now().into_std()),
                message = session.messages.recv() => match message {
                    Some(Ok(ToNcu::Registered { accepted, .. })) => {
                        session.accepted = accepted;
                        self.publish(target, backup.as_ref(), &session);
                    }
                    Some(Ok(ToNcu::Drain { reason })) => {
                        info!(%reason, "asked to move");
                        break Exit::Drain;
                    }
                    Some(Ok(ToNcu::Error { code, message })) => warn!(?code, %message, "heartbeat server refused"),
                    Some(Err(reason)) => break Exit::Closed(reason),
                    None => break Exit::Closed("control reader ended".into()),
                },
                changed = self.uplinks.changed(), if self.uplinks_open => {
                    if changed.is_err() {
                        // A fixed set (or a finished source): the uplinks stay as they are.
                        self.uplinks_open = false;
                        continue;
                    }
                    self.sync_sockets().await;
                    let uplinks = self.uplinks_for_hbs();
                    let indexes: Vec<u8> = uplinks.iter().map(|u| u.index).collect();
                    self.responder.set_uplinks(&indexes, Instant::now().into_std());
                    if let Err(error) = frame::write(&mut session.send, control::VERSION, &ToHbs::Register { uplinks }).await {
                        break Exit::Closed(error.to_string());
                    }
                }
                Some(found) = async { match refresh.as_mut() { Some(rx) => rx.await.ok(), None => None } } => {
                    refresh = None;
                    if found.is_some() {
                        backup = found;
                        dialing = self.prepare_standby(backup.as_ref());
                        self.publish(target, backup.as_ref(), &session);
                    }
                }
                Some(ready) = async { match dialing.as_mut() { Some(rx) => rx.await.ok(), None => None } } => {
                    dialing = None;
                    // Kept only while it still leads to the backup.
                    self.standby = ready.filter(|s| backup.as_ref().is_some_and(|b| b.name == s.server.name));
                    self.publish(target, backup.as_ref(), &session);
                }
                () = closed(standby.as_ref()) => {
                    info!(backup = ?backup.as_ref().map(|b| &b.name), "standby connection to the backup closed; will ask hds for another");
                    self.standby = None;
                    backup = None;
                    self.publish(target, None, &session);
                }
                _ = backup_retry.tick() => {
                    if backup.is_none() && refresh.is_none() {
                        refresh = Some(self.find_backup(target, Duration::ZERO));
                    } else if dialing.is_none() {
                        dialing = self.prepare_standby(backup.as_ref());
                    }
                }
                _ = load_tick.tick() => self.load = load::current(),
            }
            self.flush_hellos().await;
            let mut lost = false;
            while let Some(event) = self.responder.poll_event() {
                match event {
                    ResponderEvent::PrimaryLost { session: lost_session } if lost_session == session.session => {
                        lost = true
                    }
                    ResponderEvent::PrimaryLost { .. } => {}
                }
            }
            if lost {
                break Exit::PrimaryLost;
            }
        };
        session.connection.close(0_u32.into(), b"moving");
        self.status.send_modify(|s| {
            s.hbs = None;
            s.session = None;
        });
        (exit, backup)
    }

    async fn answer(&mut self, index: u8, bytes: &[u8], from: SocketAddr) {
        let Some(uplink) = self.sockets.values().find(|s| s.index == index) else {
            return;
        };
        if self.drill.is_silenced(&uplink.spec.name) {
            return;
        }
        if let Some(pong) = self.responder.handle_datagram(index, bytes, from, self.load, Instant::now().into_std())
            && let Err(error) = uplink.socket.send_to(&pong, from).await
        {
            debug!(uplink = %uplink.spec.name, %error, "reply not sent");
        }
    }

    async fn flush_hellos(&mut self) {
        while let Some(out) = self.responder.poll_transmit() {
            let Some(uplink) = self.sockets.values().find(|s| s.index == out.uplink) else {
                continue;
            };
            if self.drill.is_silenced(&uplink.spec.name) {
                continue;
            }
            if let Err(error) = uplink.socket.send_to(&out.payload, out.dest).await {
                debug!(uplink = %uplink.spec.name, %error, "hello not sent");
            }
        }
    }

    /// Dials `backup` in the background unless the standby connection already leads there (a standby to another
    /// server is dropped, which closes it). The receiver yields the new standby, or `None` when the dial failed.
    fn prepare_standby(&mut self, backup: Option<&HeartbeatServer>) -> Option<oneshot::Receiver<Option<Standby>>> {
        let open = |s: &Standby| s.connection.close_reason().is_none();
        if self.standby.as_ref().is_some_and(|s| open(s) && backup.is_some_and(|b| b.name == s.server.name)) {
            return None;
        }
        self.standby = None;
        let server = backup?.clone();
        let tls = self.tls.clone();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let standby = match tokio::time::timeout(CONNECT_TIMEOUT, dial(&tls, &server)).await {
                Ok(Ok(connection)) => {
                    debug!(backup = %server.name, "standby connection ready");
                    Some(Standby { server, connection })
                }
                Ok(Err(error)) => {
                    debug!(backup = %server.name, error = %format!("{error:#}"), "no standby connection");
                    None
                }
                Err(_) => {
                    debug!(backup = %server.name, "no standby connection within {CONNECT_TIMEOUT:?}");
                    None
                }
            };
            let _ = tx.send(standby);
        });
        Some(rx)
    }

    /// Asks hds, in the background and after `delay`, for a backup other than `current`.
    fn find_backup(&self, current: &HeartbeatServer, delay: Duration) -> oneshot::Receiver<Option<HeartbeatServer>> {
        let (tx, rx) = oneshot::channel();
        let hds = self.hds.clone();
        let identity = self.identity.clone();
        let current = current.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let found = match hds_client::assign(&hds, &identity, &[], Duration::from_secs(5)).await {
                Ok(pair) => [Some(pair.primary), pair.backup].into_iter().flatten().find(|s| s.name != current.name),
                Err(error) => {
                    debug!(%error, "no backup found yet");
                    None
                }
            };
            let _ = tx.send(found);
        });
        rx
    }

    fn publish(&self, target: &HeartbeatServer, backup: Option<&HeartbeatServer>, session: &Connected) {
        self.status.send_replace(Status {
            hbs: Some(target.name.clone()),
            backup: backup.map(|b| b.name.clone()),
            session: Some(session.session),
            registered: session.accepted.clone(),
            standby: self.standby.as_ref().map(|s| s.server.name.clone()),
        });
    }
}

/// Resolves when `connection` closes; never without one.
async fn closed(connection: Option<&quinn::Connection>) {
    match connection {
        Some(connection) => {
            connection.closed().await;
        }
        None => std::future::pending().await,
    }
}

async fn read_uplink(index: u8, socket: Arc<UdpSocket>, tx: mpsc::Sender<Datagram>) {
    let mut buf = vec![0_u8; 2048];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, from)) => {
                // A full queue means a flood: drop rather than fall behind.
                let _ = tx.try_send((index, buf[..n].to_vec(), from));
            }
            Err(error) => {
                debug!(index, %error, "uplink socket error");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A QUIC connection to `target` with the NCU's identity: keep-alives every 5 s, closed after 15 s of silence.
async fn dial(tls: &Arc<rustls::ClientConfig>, target: &HeartbeatServer) -> anyhow::Result<quinn::Connection> {
    let addr = tokio::net::lookup_host(&target.address)
        .await
        .with_context(|| format!("resolving {}", target.address))?
        .next()
        .with_context(|| format!("{} resolves to nothing", target.address))?;
    let bind: SocketAddr = if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0_u16; 8], 0).into() };
    let mut endpoint = pki::client_endpoint(std::net::UdpSocket::bind(bind)?)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.clone())?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    transport.max_idle_timeout(Some(Duration::from_secs(15).try_into()?));
    config.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(config);
    Ok(endpoint.connect(addr, tether_proto::hds::host_of(&target.address))?.await?)
}

/// A UDP socket on the uplink's address, bound to its interface when known (SO_BINDTODEVICE).
fn bind_uplink(spec: &UplinkSpec) -> std::io::Result<UdpSocket> {
    let domain = if spec.address.is_ipv6() { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    if let Some(interface) = &spec.interface
        && let Err(error) = socket.bind_device(Some(interface.as_bytes()))
    {
        debug!(%interface, %error, "cannot bind to the interface; using the address only");
    }
    socket.bind(&SocketAddr::new(spec.address, 0).into())?;
    UdpSocket::from_std(socket.into())
}

fn decode_key(hex_key: &str) -> anyhow::Result<[u8; 32]> {
    let bytes = hex::decode(hex_key).context("session key is not hex")?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("session key is not 32 bytes"))
}

//! `ncu run`: the driver of the control session ([`crate::session`], which decides) and of the heartbeat responder
//! ([`tether_proto::heartbeat::responder`], which answers): it owns the uplink sockets, the QUIC connections to hds
//! and the heartbeat servers, and one timer per machine, re-armed at their `poll_timeout()`. Each turn feeds one input
//! (a datagram, a deadline, a control message, an uplink change, the outcome of a background request) and carries
//! out the commands that come back. Uplinks come from a `watch` channel, so fixed uplinks from the configuration and
//! netlink discovery plug in the same way; at most [`MAX_UPLINKS`] of them are registered.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use rand::SeedableRng;
use tether_pki::{self as pki, stream as frame};
use tether_proto::{
    control::{self, MAX_UPLINKS, ToHbs, ToNcu, Uplink},
    hds::HeartbeatServer,
    heartbeat::responder::{Responder, ResponderEvent, ResponderPolicy},
};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::session::{BACKUP_SETTLE, BACKUP_SPREAD};
use crate::{
    hds_client::{self, Assignment, NcuError},
    identity::Identity,
    load, redirect, services,
    session::{CONNECT_TIMEOUT, Command, Input, STANDBY_TIMEOUT, Session},
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
    /// Uplinks not registered, and why (beyond the limit of [`MAX_UPLINKS`], or unbindable).
    pub refused: BTreeMap<String, String>,
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

/// A bound uplink socket and the task reading it.
struct UplinkSocket {
    index: u8,
    spec: UplinkSpec,
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

/// How long a new heartbeat server has to confirm the redirects and service tuples the last one sent.
const REDIRECTS_CONFIRM: Duration = Duration::from_secs(3);

/// One received heartbeat datagram: uplink index, bytes, source.
type Datagram = (u8, Vec<u8>, SocketAddr);

/// The outcome of a request made in the background, fed back to the session.
enum Done {
    Assigned(Result<Assignment, NcuError>),
    Registered(HeartbeatServer, anyhow::Result<Connected>),
    BackupFound(Option<HeartbeatServer>),
    Standby(HeartbeatServer, Option<quinn::Connection>),
    /// The certificate was renewed: new connections use the new identity.
    Renewed(Box<Identity>),
}

/// Who the agent is and what it runs besides its uplinks (no `Debug`: the identity holds the private key).
#[derive(Clone)]
pub struct Setup {
    /// hds addresses, tried in turn.
    pub hds: Vec<String>,
    /// The enrolled identity.
    pub identity: Identity,
    /// Move to the backup when heartbeats stop for this long.
    pub failover_after: Duration,
    /// Services and load.
    pub site: SiteConfig,
    /// Where the identity is stored: its certificate is renewed there before it expires (without one, never).
    pub identity_dir: Option<std::path::PathBuf>,
}

/// Runs the agent until `shutdown`; fails only when hds refuses this NCU for good (an unknown certificate).
pub async fn run(
    setup: Setup,
    uplinks: watch::Receiver<Vec<UplinkSpec>>,
    drill: Drill,
    status: watch::Sender<Status>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Setup { hds, identity, failover_after, site, identity_dir } = setup;
    let tls = Arc::new(
        pki::client_tls(&identity.ca_pem, Some((&identity.cert_pem, &identity.key_pem)), control::ALPN)
            .context("building TLS from the NCU identity")?,
    );
    let (datagrams_tx, mut datagrams) = mpsc::channel(1024);
    let (done_tx, mut done) = mpsc::unbounded_channel();
    // Host migrations moving this site and the service tuples it forwards or runs: their kernel rules live as long
    // as the agent; both report on the control session.
    let (redirects, redirects_rx) = watch::channel(Vec::new());
    let (services, services_rx) = watch::channel(Vec::new());
    let (reports_tx, mut redirect_reports) = mpsc::unbounded_channel();
    let relay_stop = shutdown.child_token();
    let relay = tokio::spawn(redirect::run(redirects_rx, reports_tx.clone(), relay_stop.clone()));
    let site_task = tokio::spawn(services::run(site.services, services_rx, reports_tx, relay_stop.clone()));
    let _stop_relay = relay_stop.clone().drop_guard();
    if let Some(dir) = identity_dir {
        let done = done_tx.clone();
        let renewed = move |identity| {
            let _ = done.send(Done::Renewed(Box::new(identity)));
        };
        tokio::spawn(crate::renewal::run(hds.clone(), identity.clone(), dir, renewed, relay_stop.clone()));
    }
    let mut agent = Agent {
        hds,
        identity,
        tls,
        sockets: BTreeMap::new(),
        refused: BTreeMap::new(),
        datagrams_tx,
        done: done_tx,
        responder: Responder::new(ResponderPolicy { failover_after, ..ResponderPolicy::default() }),
        drill,
        status,
        uplinks,
        uplinks_open: true,
        load: site.load.read(&BTreeSet::new()),
        standby: None,
        connected: None,
        redirects,
        services,
        confirm: Confirm::default(),
    };
    agent.sync_sockets().await;
    let mut session = Session::new();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let responder_timer = tokio::time::sleep(Duration::ZERO);
    let session_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(responder_timer, session_timer);
    let mut load_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        while let Some(command) = session.poll_command() {
            agent.execute(command);
        }
        // A standby the session does not want (it leads elsewhere, or was handed to a registration) is closed.
        if agent.standby.as_ref().map(|s| s.server.name.as_str()) != session.standby() {
            agent.standby = None;
        }
        agent.publish(&session);
        let responder_due = agent.responder.poll_timeout();
        if let Some(deadline) = responder_due {
            responder_timer.as_mut().reset(Instant::from_std(deadline));
        }
        let session_due = session.poll_timeout();
        if let Some(deadline) = session_due {
            session_timer.as_mut().reset(Instant::from_std(deadline));
        }
        let standby = agent.standby.as_ref().map(|s| (s.server.name.clone(), s.connection.clone()));
        let input = tokio::select! {
            () = shutdown.cancelled() => break,
            Some((index, bytes, from)) = datagrams.recv() => {
                agent.answer(index, &bytes, from).await;
                None
            }
            () = &mut responder_timer, if responder_due.is_some() => {
                agent.responder.handle_timeout(Instant::now().into_std());
                None
            }
            () = &mut session_timer, if session_due.is_some() => {
                session.handle_timeout(Instant::now().into_std());
                None
            }
            Some(done) = done.recv() => match agent.complete(done)? {
                // Uplinks that changed while the registration was on its way are sent now, on the new session.
                Some(Input::Registered) if agent.connected.as_ref().is_some_and(|c| c.sent != agent.uplinks_for_hbs()) => {
                    session.handle(Input::Registered, Instant::now().into_std(), &mut rng);
                    agent.uplinks_changed().await
                }
                other => other,
            },
            message = control_message(agent.connected.as_mut()) => match message {
                // This is the NCU's live session, so it is the newest: it registers again above the stored generation.
                Ok(ToNcu::Superseded { generation }) => {
                    warn!(generation, "the heartbeat server holds a newer generation of this NCU; registering again above it");
                    generation::adopt(generation);
                    if let Some(connected) = agent.connected.as_mut() {
                        connected.generation = generation::next();
                    }
                    agent.uplinks_changed().await
                }
                message => agent.control(message),
            },
            changed = agent.uplinks.changed(), if agent.uplinks_open => {
                if changed.is_err() {
                    // A fixed set (or a finished source): the uplinks stay as they are.
                    agent.uplinks_open = false;
                    None
                } else {
                    agent.uplinks_changed().await
                }
            }
            () = closed(standby.as_ref().map(|(_, connection)| connection)) => {
                let name = standby.map(|(name, _)| name).unwrap_or_default();
                info!(backup = %name, "standby connection to the backup closed");
                agent.standby = None;
                Some(Input::StandbyDown(name))
            }
            _ = load_tick.tick() => {
                let ports: BTreeSet<u16> = agent.services.borrow().iter().map(|s| s.port).collect();
                agent.load = site.load.read(&ports);
                None
            }
            Some(report) = redirect_reports.recv() => {
                agent.report_redirect(report).await;
                None
            }
            () = sleep_until(agent.confirm.next()), if agent.confirm.next().is_some() => {
                let now = Instant::now();
                if agent.confirm.redirects.is_some_and(|at| at <= now) {
                    info!("the new heartbeat server sent no redirects: dropping the old ones");
                    agent.confirm.redirects = None;
                    agent.redirects.send_replace(Vec::new());
                }
                if agent.confirm.services.is_some_and(|at| at <= now) {
                    info!("the new heartbeat server sent no service tuples: dropping the old ones");
                    agent.confirm.services = None;
                    agent.services.send_replace(Vec::new());
                }
                None
            }
        };
        if let Some(input) = input {
            session.handle(input, Instant::now().into_std(), &mut rng);
        }
        agent.flush_hellos().await;
        while let Some(ResponderEvent::PrimaryLost { session: lost }) = agent.responder.poll_event() {
            if agent.connected.as_ref().is_some_and(|c| c.session == lost) {
                warn!(hbs = ?session.serving().map(|s| &s.name), "heartbeats stopped; moving to the backup");
                session.handle(Input::PrimaryLost, Instant::now().into_std(), &mut rng);
            }
        }
    }
    if let Some(connected) = agent.connected.take() {
        connected.connection.close(0_u32.into(), b"shutting down");
    }
    relay_stop.cancel();
    let _ = relay.await;
    let _ = site_task.await;
    Ok(())
}

/// Resolves at `deadline`; never without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

struct Agent {
    hds: Vec<String>,
    identity: Identity,
    tls: Arc<rustls::ClientConfig>,
    sockets: BTreeMap<String, UplinkSocket>,
    /// Uplinks not registered, and why.
    refused: BTreeMap<String, String>,
    datagrams_tx: mpsc::Sender<Datagram>,
    done: mpsc::UnboundedSender<Done>,
    responder: Responder,
    drill: Drill,
    status: watch::Sender<Status>,
    uplinks: watch::Receiver<Vec<UplinkSpec>>,
    /// False once the uplink source is gone: no more changes will come.
    uplinks_open: bool,
    load: u16,
    /// A connection to the backup, handshake done, kept idle so a failover costs one registration.
    standby: Option<Standby>,
    /// The registered control session.
    connected: Option<Connected>,
    /// The redirects the heartbeat server asked for ([`redirect`]).
    redirects: watch::Sender<Vec<control::Redirect>>,
    /// The service tuples the heartbeat server sent ([`services`]).
    services: watch::Sender<Vec<control::SiteService>>,
    /// After a move to another server, what it does not confirm in time is dropped.
    confirm: Confirm,
}

/// Deadlines by which a new heartbeat server must confirm the redirects and the service tuples the last one sent
/// (it sends each set at once when it is not empty).
#[derive(Debug, Default)]
struct Confirm {
    redirects: Option<Instant>,
    services: Option<Instant>,
}

impl Confirm {
    fn next(&self) -> Option<Instant> {
        [self.redirects, self.services].into_iter().flatten().min()
    }
}

/// What configures the site besides its uplinks: its services (`[services.<name>]`) and its load source.
#[derive(Debug, Clone, Default)]
pub struct SiteConfig {
    /// By service name.
    pub services: BTreeMap<String, services::ServiceConfig>,
    /// The load announced in heartbeat replies.
    pub load: load::LoadSource,
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
    /// The uplinks the registration carried: when the set changed while it was on its way, the new one is sent.
    sent: Vec<Uplink>,
    /// The session's generation, sent with every `Register` on it.
    generation: u64,
}

impl Agent {
    /// Carries out one of the session's commands; requests run in the background and report to `done`.
    fn execute(&mut self, command: Command) {
        match command {
            Command::Assign { failed } => {
                let (hds, identity, done) = (self.hds.clone(), self.identity.clone(), self.done.clone());
                tokio::spawn(async move {
                    let _ = done.send(Done::Assigned(hds_client::assign_once(&hds, &identity, &failed).await));
                });
            }
            Command::Register { server } => {
                let standby = self
                    .standby
                    .take_if(|s| s.server.name == server.name && s.connection.close_reason().is_none())
                    .map(|s| s.connection);
                let (tls, uplinks, done) = (self.tls.clone(), self.uplinks_for_hbs(), self.done.clone());
                tokio::spawn(async move {
                    let result = connect(&tls, &server, standby, uplinks).await;
                    let _ = done.send(Done::Registered(server, result));
                });
            }
            Command::EndSession => {
                if let Some(connected) = self.connected.take() {
                    connected.connection.close(0_u32.into(), b"moving");
                }
            }
            Command::FindBackup { except } => {
                let (hds, identity, done) = (self.hds.clone(), self.identity.clone(), self.done.clone());
                tokio::spawn(async move {
                    let found = match hds_client::assign_once(&hds, &identity, &[]).await {
                        Ok(pair) => [Some(pair.primary), pair.backup].into_iter().flatten().find(|s| s.name != except),
                        Err(error) => {
                            debug!(%error, "no backup found yet");
                            None
                        }
                    };
                    let _ = done.send(Done::BackupFound(found));
                });
            }
            Command::Dial { server } => {
                self.standby = None;
                let (tls, done) = (self.tls.clone(), self.done.clone());
                tokio::spawn(async move {
                    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, dial(&tls, &server)).await {
                        Ok(Ok(connection)) => {
                            debug!(backup = %server.name, "standby connection ready");
                            Some(connection)
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
                    let _ = done.send(Done::Standby(server, connection));
                });
            }
        }
    }

    /// Turns a background request's outcome into the session's input; an error only when hds refuses this NCU
    /// for good.
    fn complete(&mut self, done: Done) -> anyhow::Result<Option<Input>> {
        Ok(Some(match done {
            Done::Renewed(identity) => {
                match pki::client_tls(&identity.ca_pem, Some((&identity.cert_pem, &identity.key_pem)), control::ALPN) {
                    Ok(tls) => {
                        info!("renewed certificate in use for new connections");
                        self.tls = Arc::new(tls);
                        self.identity = *identity;
                    }
                    Err(error) => warn!(%error, "the renewed identity is unusable; keeping the current one"),
                }
                return Ok(None);
            }
            Done::Assigned(Ok(Assignment { primary, backup })) => Input::Assigned { primary, backup },
            Done::Assigned(Err(error)) if error.is_transient() => {
                warn!(%error, "no heartbeat servers yet");
                Input::AssignFailed
            }
            Done::Assigned(Err(error)) => return Err(error).context("asking hds for heartbeat servers"),
            Done::Registered(server, Ok(connected)) => {
                let indexes: Vec<u8> = self.sockets.values().map(|s| s.index).collect();
                let now = Instant::now().into_std();
                self.responder.set_session(connected.session, connected.key, connected.heartbeat, &indexes, now);
                info!(hbs = %server.name, session = connected.session, accepted = connected.accepted.len(), "registered");
                self.connected = Some(connected);
                let deadline = Instant::now() + REDIRECTS_CONFIRM;
                self.confirm.redirects = (!self.redirects.borrow().is_empty()).then_some(deadline);
                self.confirm.services = (!self.services.borrow().is_empty()).then_some(deadline);
                Input::Registered
            }
            Done::Registered(server, Err(error)) => {
                warn!(hbs = %server.name, error = %format!("{error:#}"), "cannot register; trying the backup");
                Input::RegisterFailed
            }
            Done::BackupFound(found) => Input::BackupFound(found),
            Done::Standby(server, Some(connection)) => {
                let name = server.name.clone();
                self.standby = Some(Standby { server, connection });
                Input::StandbyUp(name)
            }
            Done::Standby(server, None) => Input::StandbyDown(server.name),
        }))
    }

    /// Handles a message (or the end) of the control stream.
    fn control(&mut self, message: Result<ToNcu, String>) -> Option<Input> {
        match message {
            Ok(ToNcu::Registered { accepted, .. }) => {
                if let Some(connected) = self.connected.as_mut() {
                    connected.accepted = accepted;
                }
                None
            }
            Ok(ToNcu::Services { services }) => {
                self.confirm.services = None;
                match control::validate_services(&services) {
                    Ok(()) => {
                        info!(services = services.len(), "service tuples from the heartbeat server");
                        self.services.send_replace(services);
                    }
                    Err(reason) => warn!(%reason, "service tuples refused"),
                }
                None
            }
            Ok(ToNcu::Redirect { redirects }) => {
                self.confirm.redirects = None;
                match control::validate_redirects(&redirects) {
                    Ok(()) => {
                        info!(redirects = redirects.len(), "redirects from the heartbeat server");
                        self.redirects.send_replace(redirects);
                    }
                    Err(reason) => warn!(%reason, "redirects refused"),
                }
                None
            }
            Ok(ToNcu::Drain { reason }) => {
                info!(%reason, "asked to move; asking hds for another server");
                Some(Input::Drain)
            }
            Ok(ToNcu::Error { code, message }) => {
                warn!(?code, %message, "heartbeat server refused");
                None
            }
            // Answered in the run loop, which can send.
            Ok(ToNcu::Superseded { .. }) => None,
            Err(reason) => {
                warn!(%reason, "control connection closed; moving to the backup");
                // Its reader is gone: never polled again, whatever the session makes of it.
                if let Some(connected) = self.connected.take() {
                    connected.connection.close(0_u32.into(), b"closed");
                }
                Some(Input::Closed)
            }
        }
    }

    /// Sends a redirect report on the running session; without one it is dropped (the next server asks again and
    /// the counts are sent again when they grow).
    async fn report_redirect(&mut self, report: ToHbs) {
        if let Some(connected) = self.connected.as_mut()
            && let Err(error) = frame::write(&mut connected.send, control::VERSION, &report).await
        {
            debug!(%error, "cannot send a redirect report");
        }
    }

    /// Applies an uplink change: sockets, the responder, and the registration of the running session.
    async fn uplinks_changed(&mut self) -> Option<Input> {
        self.sync_sockets().await;
        let uplinks = self.uplinks_for_hbs();
        let indexes: Vec<u8> = uplinks.iter().map(|u| u.index).collect();
        self.responder.set_uplinks(&indexes, Instant::now().into_std());
        let connected = self.connected.as_mut()?;
        let register = ToHbs::Register { uplinks, generation: connected.generation };
        match frame::write(&mut connected.send, control::VERSION, &register).await {
            Ok(()) => None,
            Err(error) => {
                warn!(%error, "cannot send the new uplinks; moving to the backup");
                Some(Input::Closed)
            }
        }
    }

    /// Opens sockets for new uplinks and closes those of removed ones; at most [`MAX_UPLINKS`], the rest wait for a
    /// free index.
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
        let mut refused = BTreeMap::new();
        for spec in wanted {
            if let Some(existing) = self.sockets.get_mut(&spec.name) {
                existing.spec = spec;
                continue;
            }
            let used: BTreeSet<u8> = self.sockets.values().map(|s| s.index).collect();
            let limit = u8::try_from(MAX_UPLINKS).unwrap_or(u8::MAX);
            let Some(index) = (0..limit).find(|i| !used.contains(i)) else {
                if !self.refused.contains_key(&spec.name) {
                    warn!(uplink = %spec.name, "not registered: at most {MAX_UPLINKS} uplinks");
                }
                refused.insert(spec.name, format!("at most {MAX_UPLINKS} uplinks"));
                continue;
            };
            let socket = match bind_uplink(&spec) {
                Ok(socket) => Arc::new(socket),
                Err(error) => {
                    warn!(uplink = %spec.name, address = %spec.address, %error, "cannot bind the uplink's address");
                    refused.insert(spec.name, format!("cannot bind {}: {error}", spec.address));
                    continue;
                }
            };
            let reader = tokio::spawn(read_uplink(index, socket.clone(), self.datagrams_tx.clone()));
            info!(uplink = %spec.name, address = %spec.address, index, "uplink added");
            self.sockets.insert(spec.name.clone(), UplinkSocket { index, spec, socket, reader });
        }
        self.refused = refused;
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

    fn publish(&self, session: &Session) {
        let connected = self.connected.as_ref().filter(|_| session.serving().is_some());
        let next = Status {
            hbs: connected.and(session.serving()).map(|s| s.name.clone()),
            backup: session.backup().map(|b| b.name.clone()),
            session: connected.map(|c| c.session),
            registered: connected.map(|c| c.accepted.clone()).unwrap_or_default(),
            standby: self.standby.as_ref().map(|s| s.server.name.clone()),
            refused: self.refused.clone(),
        };
        self.status.send_if_modified(|status| {
            let changed = *status != next;
            *status = next;
            changed
        });
    }
}

/// Registers with `target` over the `standby` connection when there is one (within [`STANDBY_TIMEOUT`]), else over a
/// new connection (within [`CONNECT_TIMEOUT`]).
async fn connect(
    tls: &Arc<rustls::ClientConfig>,
    target: &HeartbeatServer,
    standby: Option<quinn::Connection>,
    uplinks: Vec<Uplink>,
) -> anyhow::Result<Connected> {
    if let Some(standby) = standby {
        match tokio::time::timeout(STANDBY_TIMEOUT, register(standby, target, uplinks.clone())).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(error)) => debug!(hbs = %target.name, %error, "standby connection unusable; connecting anew"),
            Err(_) => debug!(hbs = %target.name, "no answer over the standby connection; connecting anew"),
        }
    }
    let fresh = async {
        let connection = dial(tls, target).await?;
        register(connection, target, uplinks).await
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fresh)
        .await
        .with_context(|| format!("no answer from {} within {CONNECT_TIMEOUT:?}", target.address))?
}

/// Sends the uplinks on a new control stream of `connection` and reads the server's answer; a task then forwards the
/// stream's further messages.
async fn register(
    connection: quinn::Connection,
    target: &HeartbeatServer,
    uplinks: Vec<Uplink>,
) -> anyhow::Result<Connected> {
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut generation = generation::next();
    let mut first = None;
    // A stored generation above this session's (a clock set back) is adopted once: this session is the newest.
    for _ in 0..2 {
        let register = ToHbs::Register { uplinks: uplinks.clone(), generation };
        frame::write(&mut send, control::VERSION, &register).await?;
        let answer = frame::read::<ToNcu>(&mut recv, control::VERSION, control::MAX_FRAME)
            .await?
            .context("the server closed the stream")?;
        if let ToNcu::Superseded { generation: newest } = answer {
            warn!(hbs = %target.name, newest, "a newer generation of this NCU is stored; registering above it");
            generation::adopt(newest);
            generation = generation::next();
            continue;
        }
        first = Some(answer);
        break;
    }
    let first = first.context("superseded twice")?;
    let ToNcu::Registered { session, key, heartbeat_port, accepted, refused, .. } = first else {
        bail!("registration refused by {}: {first:?}", target.name);
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
    Ok(Connected { connection, send, messages, session, key, heartbeat, accepted, sent: uplinks, generation })
}

/// The next message of the control session; never without one.
async fn control_message(connected: Option<&mut Connected>) -> Result<ToNcu, String> {
    match connected {
        Some(connected) => connected.messages.recv().await.unwrap_or_else(|| Err("control reader ended".into())),
        None => std::future::pending().await,
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

/// Session generations: each new control session takes a higher one than any before it in this process, starting
/// from the clock, so the newest session of the NCU owns its addresses even across restarts.
mod generation {
    use std::sync::atomic::{AtomicU64, Ordering};

    static LAST: AtomicU64 = AtomicU64::new(0);
    /// Far below `i64::MAX`: the server stores generations as a bigint.
    const CEILING: u64 = 1 << 62;

    /// A generation above every one taken or adopted so far, and at least the clock in microseconds.
    pub(super) fn next() -> u64 {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(CEILING));
        let next = |last: u64| Some(last.max(clock.min(CEILING)).saturating_add(1));
        let previous = LAST.fetch_update(Ordering::Relaxed, Ordering::Relaxed, next).unwrap_or_default();
        next(previous).unwrap_or_default()
    }

    /// Makes the next generation exceed `stored` (the server's newest, after the clock went back).
    pub(super) fn adopt(stored: u64) {
        LAST.fetch_max(stored.min(2 * CEILING), Ordering::Relaxed);
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn generations_rise_and_pass_an_adopted_one() {
            let a = super::next();
            let b = super::next();
            assert!(b > a);
            super::adopt(b + 1_000_000_000);
            assert_eq!(super::next(), b + 1_000_000_001);
        }
    }
}

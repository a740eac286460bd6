//! The control endpoint: QUIC with mutual TLS; the client certificate decides which domain an NCU may register
//! addresses for. One task per connection reads the NCU's frames, records uplinks in Postgres, tells the heartbeat
//! driver what to ping, and forwards a drain request when the operator drains this server.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use quinn::{Connection, Endpoint, SendStream};
use rustls::pki_types::CertificateDer;
use sqlx::PgPool;
use tether_pki::{
    self as pki,
    stream::{self as frame},
};
use tether_proto::{
    control::{self, ControlError, ToHbs, ToNcu, Uplink},
    frame::FrameError,
    heartbeat::monitor::Liveness,
};
use tether_service::accept::{self, AtShutdown};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{driver::Command, registrar, store};

/// What every connection needs.
pub struct Context {
    /// Postgres.
    pub pool: PgPool,
    /// This server's name.
    pub me: String,
    /// The heartbeat socket's port, told to NCUs.
    pub heartbeat_port: u16,
    /// Ping interval, told to NCUs.
    pub interval: Duration,
    /// Commands to the heartbeat driver.
    pub driver: mpsc::UnboundedSender<Command>,
    /// Registrations to write (batched).
    pub registrar: mpsc::UnboundedSender<registrar::Job>,
    /// True while the operator drains this server.
    pub draining: watch::Receiver<bool>,
    /// Held by the session being asked to move, so NCUs move one by one.
    pub drain_turn: Mutex<()>,
    /// How long a closed session keeps being pinged.
    pub session_grace: Duration,
    /// Control connections refused or failed, for the logs and tests.
    pub refused: Arc<AtomicU64>,
    /// Sessions and connections show here.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// What each NCU should hold: service tuples, host migrations' redirects.
    pub sites: watch::Receiver<crate::site::ByNcu>,
    /// Sessions open per NCU, for [`crate::site`] to find deleted ones.
    pub open_sessions: crate::site::Open,
    /// Sessions open per client certificate.
    pub per_certificate: Arc<std::sync::Mutex<std::collections::HashMap<[u8; 32], u32>>>,
}

/// Most sessions one certificate may hold at once here: a session, a reconnection overlapping it, and room to spare.
/// A stolen or cloned identity cannot open more.
pub const MAX_SESSIONS_PER_CERTIFICATE: u32 = 4;

/// A session's place under [`MAX_SESSIONS_PER_CERTIFICATE`], given back on drop.
struct CertificateSlot {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<[u8; 32], u32>>>,
    fingerprint: [u8; 32],
}

impl CertificateSlot {
    fn take(context: &Context, fingerprint: [u8; 32]) -> Option<Self> {
        let mut counts = context.per_certificate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(fingerprint).or_insert(0);
        if *count >= MAX_SESSIONS_PER_CERTIFICATE {
            return None;
        }
        *count += 1;
        Some(Self { counts: context.per_certificate.clone(), fingerprint })
    }
}

impl Drop for CertificateSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.fingerprint) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.fingerprint);
            }
        }
    }
}

/// Builds the QUIC endpoint on an already bound UDP socket. No keep-alives from this side: the NCU sends one every
/// 5 s (it is the side behind the NAT whose binding must stay open), each answered by an ACK, and a session that
/// hears nothing for 15 s is closed all the same. Keep-alives from both ends doubled the control packets, at about
/// 14,000 instructions each the largest cost per address after the heartbeat MACs (bench/hbs-cost).
pub fn endpoint(socket: std::net::UdpSocket, tls: rustls::ServerConfig) -> anyhow::Result<Endpoint> {
    pki::server_endpoint(socket, tls, 1, Duration::from_secs(15), None)
}

/// Accepts connections until `shutdown`, then ends every session.
pub async fn serve(endpoint: Endpoint, context: Arc<Context>, shutdown: CancellationToken) {
    let stop = shutdown.clone();
    accept::serve(&endpoint, &stop, AtShutdown::Abort, move |connection, _| {
        let (context, shutdown) = (context.clone(), shutdown.clone());
        async move {
            match connection {
                Ok(connection) => {
                    context.metrics.connections.inc();
                    session(connection, context, shutdown).await;
                }
                Err(error) => {
                    context.refused.fetch_add(1, Ordering::Relaxed);
                    info!(%error, "handshake refused");
                }
            }
        }
    })
    .await;
}

/// One NCU's session: the lifetime of its control connection.
struct Session {
    id: u64,
    key: [u8; 32],
    ncu_id: i64,
    domain_id: i64,
    remote: SocketAddr,
    /// Uplink name → (address row, uplink).
    targets: BTreeMap<String, (i64, Uplink)>,
    /// Its control connection, to tell whether the NCU is still there after a slow write.
    connection: Connection,
    /// True once a registration was answered: only then may unsolicited messages follow.
    registered: bool,
    /// The redirects last sent.
    redirects: Vec<control::Redirect>,
    /// The service tuples last sent.
    services: Vec<control::SiteService>,
    /// The generation of the NCU's last `Register` here (0 before one).
    generation: i64,
}

async fn session(connection: Connection, context: Arc<Context>, shutdown: CancellationToken) {
    let Some(fingerprint) = fingerprint(&connection) else {
        // The TLS configuration requires a certificate; this is belt and braces.
        connection.close(1_u32.into(), b"client certificate required");
        return;
    };
    // An NCU keeps an idle connection to its backup (its standby) and opens the stream only when it moves here:
    // the NCU is looked up meanwhile, so a storm of moves costs neither handshakes nor lookups.
    let (streams, found) =
        tokio::join!(connection.accept_bi(), tether_db::ncus::by_fingerprint(&context.pool, &fingerprint));
    let (mut send, recv) = match streams {
        Ok(streams) => streams,
        Err(error) => {
            debug!(%error, "connection ended before a stream");
            return;
        }
    };
    let ncu = match found {
        Ok(Some(ncu)) => ncu,
        Ok(None) => {
            context.refused.fetch_add(1, Ordering::Relaxed);
            warn!(fingerprint = %hex::encode(fingerprint), "certificate of no enrolled NCU");
            let _ = reply(
                &mut send,
                error(ControlError::UnknownCertificate, "this certificate belongs to no enrolled NCU"),
            )
            .await;
            let _ = send.finish();
            connection.closed().await;
            return;
        }
        Err(e) => {
            warn!(error = %e, "cannot look the NCU up");
            let _ = reply(&mut send, error(ControlError::Unavailable, "database unavailable; retry")).await;
            connection.close(2_u32.into(), b"unavailable");
            return;
        }
    };
    let mut session = Session {
        id: rand::random(),
        key: rand::random(),
        ncu_id: ncu.id,
        domain_id: ncu.domain_id,
        remote: connection.remote_address(),
        targets: BTreeMap::new(),
        connection: connection.clone(),
        registered: false,
        redirects: Vec::new(),
        services: Vec::new(),
        generation: 0,
    };
    let Some(_slot) = CertificateSlot::take(&context, fingerprint) else {
        context.refused.fetch_add(1, Ordering::Relaxed);
        warn!(ncu = ncu.id, "too many sessions with one certificate; refused");
        let message = format!("at most {MAX_SESSIONS_PER_CERTIFICATE} sessions per certificate");
        let _ = reply(&mut send, error(ControlError::Unavailable, &message)).await;
        let _ = send.finish();
        // The refusal is delivered before the connection goes: the client closes it, or it is closed after 5 s.
        if tokio::time::timeout(Duration::from_secs(5), connection.closed()).await.is_err() {
            connection.close(4_u32.into(), b"too many sessions");
        }
        return;
    };
    info!(ncu = ncu.id, domain = %ncu.domain, session = session.id, "NCU connected");
    let _open = OpenSession::new(&context.open_sessions, ncu.id);
    let mut deleted = false;
    context.metrics.sessions.inc();
    let mut draining = context.draining.clone();
    let mut sites = context.sites.clone();
    let mut asked_to_drain = false;
    let (reader, mut frames) = read_frames(recv);
    // The reader holds the stream (and so the connection): it goes with the session.
    let _reader = tokio_util::task::AbortOnDropHandle::new(reader);
    loop {
        let wants_drain = *draining.borrow() && !asked_to_drain && !session.targets.is_empty();
        tokio::select! {
            () = shutdown.cancelled() => break,
            frame = frames.recv() => match frame.unwrap_or(Ok(None)) {
                Ok(Some(message)) => {
                    if let Some(answer) = handle(&mut session, message, &context).await {
                        session.registered |= matches!(answer, ToNcu::Registered { .. });
                        if reply(&mut send, answer).await.is_err() {
                            break;
                        }
                    }
                    let all = sites.borrow_and_update().clone();
                    if all.deleted.contains(&session.ncu_id) {
                        deleted = true;
                        break;
                    }
                    if send_site(&mut session, &mut send, &all).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e @ (FrameError::Malformed(_) | FrameError::Version { .. })) => {
                    warn!(error = %e, "bad control frame");
                    if reply(&mut send, error(ControlError::Malformed, &e.to_string())).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    warn!(error = %e, "control stream unusable; closing");
                    let _ = reply(&mut send, error(ControlError::Malformed, &e.to_string())).await;
                    connection.close(3_u32.into(), b"bad frame");
                    break;
                }
            },
            changed = sites.changed() => {
                if changed.is_err() {
                    break;
                }
                let all = sites.borrow_and_update().clone();
                if all.deleted.contains(&session.ncu_id) {
                    deleted = true;
                    break;
                }
                if send_site(&mut session, &mut send, &all).await.is_err() {
                    break;
                }
            }
            changed = draining.changed(), if !asked_to_drain => {
                if changed.is_err() {
                    break;
                }
            }
            _guard = context.drain_turn.lock(), if wants_drain => {
                asked_to_drain = true;
                info!(session = session.id, "asking the NCU to move (draining)");
                if reply(&mut send, ToNcu::Drain { reason: "this heartbeat server is draining".into() }).await.is_err() {
                    break;
                }
                // Hold the turn until this NCU has gone (or a while), so they move one by one.
                let _ = tokio::time::timeout(Duration::from_secs(3), connection.closed()).await;
            }
        }
    }
    info!(session = session.id, "NCU disconnected");
    context.metrics.sessions.dec();
    if deleted {
        warn!(session = session.id, ncu = session.ncu_id, "the NCU was deleted; its session is closed");
        // Its rows are gone: nothing to ping through a grace time.
        let _ = context.driver.send(Command::RemoveSession(session.id));
        let message = "this NCU was deleted: its certificate is no longer enrolled";
        let _ = reply(&mut send, error(ControlError::UnknownCertificate, message)).await;
        let _ = send.finish();
        // The reason is delivered before the connection goes: the client closes it, or it is closed after 2 s.
        if tokio::time::timeout(Duration::from_secs(2), connection.closed()).await.is_err() {
            connection.close(5_u32.into(), b"NCU deleted");
        }
    } else {
        end_session(&session, &context);
    }
}

/// An NCU's entry in [`Context::open_sessions`] while its session runs.
struct OpenSession {
    open: crate::site::Open,
    ncu: i64,
}

impl OpenSession {
    fn new(open: &crate::site::Open, ncu: i64) -> Self {
        *open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(ncu).or_insert(0) += 1;
        Self { open: open.clone(), ncu }
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ncu) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ncu);
            }
        }
    }
}

/// How long a new session has to send its first frame (the NCU sends `Register` as it opens the stream).
pub const FIRST_FRAME_WITHIN: Duration = Duration::from_secs(10);

/// Reads the control stream's frames in a task of its own, so a frame is never cut by the session's other events;
/// the first must come within [`FIRST_FRAME_WITHIN`], and each frame's bytes within
/// [`frame::FRAME_DEADLINE`] of its first. Ends after the stream's end or an error that leaves it unusable.
fn read_frames(
    mut recv: quinn::RecvStream,
) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<Result<Option<ToHbs>, FrameError>>) {
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(async move {
        let first =
            tokio::time::timeout(FIRST_FRAME_WITHIN, frame::read(&mut recv, control::VERSION, control::MAX_FRAME));
        let mut next = first.await.unwrap_or_else(|_| {
            Err(FrameError::Stream(format!("no frame within {FIRST_FRAME_WITHIN:?} of the stream's opening")))
        });
        loop {
            let go_on = matches!(next, Ok(Some(_)) | Err(FrameError::Malformed(_) | FrameError::Version { .. }));
            if tx.send(next).await.is_err() || !go_on {
                return;
            }
            next = frame::read(&mut recv, control::VERSION, control::MAX_FRAME).await;
        }
    });
    (task, rx)
}

/// Sends the NCU its service tuples and redirects when they differ from what it was last sent (once registered).
async fn send_site(session: &mut Session, send: &mut SendStream, all: &crate::site::ByNcu) -> Result<(), FrameError> {
    if !session.registered {
        return Ok(());
    }
    let services = all.services.get(&session.ncu_id).cloned().unwrap_or_default();
    if services != session.services {
        info!(session = session.id, services = services.len(), "sending the NCU its service tuples");
        session.services.clone_from(&services);
        reply(send, ToNcu::Services { services }).await?;
    }
    let redirects = all.redirects.get(&session.ncu_id).cloned().unwrap_or_default();
    if redirects != session.redirects {
        info!(session = session.id, redirects = redirects.len(), "sending the NCU its redirects");
        session.redirects.clone_from(&redirects);
        reply(send, ToNcu::Redirect { redirects }).await?;
    }
    Ok(())
}

/// Writes an NCU's check of a tuple it was sent; a report on any other is ignored (and logged).
async fn service_health(session: &Session, context: &Context, id: i64, healthy: bool, reason: Option<String>) {
    if !session.services.iter().any(|s| s.id == id) {
        warn!(session = session.id, ncu = session.ncu_id, service = id, "health of a tuple never sent; ignored");
        return;
    }
    let reason = reason.map(bounded_reason);
    info!(session = session.id, service = id, healthy, reason = reason.as_deref().unwrap_or(""), "service health");
    if let Err(e) = crate::site::health(&context.pool, session.domain_id, id, healthy, reason.as_deref()).await {
        warn!(error = %e, service = id, "cannot write the service's health");
    }
}

/// At most [`control::MAX_REASON`] bytes, cut at a character boundary.
fn bounded_reason(mut text: String) -> String {
    if text.len() > control::MAX_REASON {
        let mut end = control::MAX_REASON;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Writes an NCU's report on a redirect it was sent; a report on any other is ignored (and logged).
async fn redirected(session: &Session, context: &Context, id: i64, flows: u64, error: Option<String>) {
    if !session.redirects.iter().any(|r| r.id == id) {
        warn!(session = session.id, ncu = session.ncu_id, migration = id, "report on a redirect never sent; ignored");
        return;
    }
    let error = error.map(bounded_reason);
    if let Some(text) = &error {
        warn!(session = session.id, migration = id, error = %text, "the NCU cannot redirect");
    }
    let relay = format!("ncu {}", session.ncu_id);
    if let Err(e) = crate::site::report(&context.pool, &relay, id, flows, error.as_deref()).await {
        warn!(error = %e, migration = id, "cannot write the NCU's redirect report");
    }
}

async fn handle(session: &mut Session, message: ToHbs, context: &Context) -> Option<ToNcu> {
    Some(match message {
        ToHbs::Redirected { id, flows, error } => {
            redirected(session, context, id, flows, error).await;
            return None;
        }
        ToHbs::ServiceHealth { id, healthy, reason } => {
            service_health(session, context, id, healthy, reason).await;
            return None;
        }
        other => register(session, other, context).await,
    })
}

async fn register(session: &mut Session, message: ToHbs, context: &Context) -> ToNcu {
    let (uplinks, replace_all) = match message {
        ToHbs::Register { uplinks, generation } => {
            if let Err(reason) = control::validate(&uplinks) {
                warn!(session = session.id, %reason, "registration refused");
                return error(ControlError::Invalid, &reason);
            }
            session.generation = i64::try_from(generation).unwrap_or(i64::MAX);
            (uplinks, true)
        }
        ToHbs::UplinkUp { uplink } => {
            let mut all: Vec<Uplink> =
                session.targets.values().map(|(_, u)| u.clone()).filter(|u| u.name != uplink.name).collect();
            all.push(uplink.clone());
            if let Err(reason) = control::validate(&all) {
                return error(ControlError::Invalid, &reason);
            }
            (vec![uplink], false)
        }
        ToHbs::UplinkDown { name } => {
            match store::withdraw(&context.pool, session.ncu_id, &name, session.generation).await {
                Ok(_) => {
                    if let Some((id, _)) = session.targets.remove(&name) {
                        let _ = context.driver.send(Command::Remove(id));
                    }
                    info!(session = session.id, uplink = %name, "uplink withdrawn");
                }
                Err(e) => return unavailable(&e),
            }
            return registered(session, context, Vec::new());
        }
        ToHbs::Redirected { .. } | ToHbs::ServiceHealth { .. } => {
            return error(ControlError::Invalid, "not a registration");
        }
    };
    if *context.draining.borrow() && session.targets.is_empty() {
        return error(ControlError::Unavailable, "this heartbeat server is draining; ask hds for another");
    }
    let registration = store::Registration {
        ncu_id: session.ncu_id,
        domain_id: session.domain_id,
        uplinks,
        replace_all,
        generation: session.generation,
    };
    let store::Outcome { accepted, refused, superseded } =
        match registrar::submit(&context.registrar, registration).await {
            Ok(result) => result,
            Err(e) => return unavailable(&e),
        };
    if let Some(newest) = superseded {
        // A newer session (most likely at another server) holds the NCU: this one writes nothing and pings nothing.
        warn!(
            session = session.id,
            ncu = session.ncu_id,
            generation = session.generation,
            newest,
            "registration of an older session; nothing written"
        );
        for (_, (id, _)) in std::mem::take(&mut session.targets) {
            let _ = context.driver.send(Command::Remove(id));
        }
        return ToNcu::Superseded { generation: u64::try_from(newest).unwrap_or(0) };
    }
    if let Some(reason) = session.connection.close_reason() {
        // The NCU gave up waiting and has most likely registered again on a new connection, whose targets are in
        // the driver already: pinging on for this session would replace them, and its end would stop them.
        debug!(session = session.id, %reason, "registration written after the NCU left; not pinging for it");
        return error(ControlError::Unavailable, "connection closed");
    }
    if replace_all {
        let keep: Vec<&str> = accepted.iter().map(|r| r.uplink.name.as_str()).collect();
        let gone: Vec<String> = session.targets.keys().filter(|n| !keep.contains(&n.as_str())).cloned().collect();
        for name in gone {
            if let Some((id, _)) = session.targets.remove(&name) {
                let _ = context.driver.send(Command::Remove(id));
            }
        }
    }
    for entry in &accepted {
        let uplink = &entry.uplink;
        let unchanged = session.targets.get(&uplink.name).is_some_and(|(id, u)| *id == entry.id && u == uplink);
        if unchanged {
            continue;
        }
        if let Some((old, _)) = session.targets.insert(uplink.name.clone(), (entry.id, uplink.clone()))
            && old != entry.id
        {
            let _ = context.driver.send(Command::Remove(old));
        }
        let _ = context.driver.send(Command::Add {
            id: entry.id,
            session: session.id,
            uplink: uplink.index,
            key: session.key,
            dest: SocketAddr::new(uplink.address, uplink.port),
            initial: if entry.live { Liveness::Live } else { Liveness::Pending },
        });
    }
    info!(session = session.id, accepted = accepted.len(), refused = refused.len(), "uplinks registered");
    registered(session, context, refused)
}

fn registered(session: &Session, context: &Context, refused: Vec<control::Refusal>) -> ToNcu {
    ToNcu::Registered {
        session: session.id,
        key: hex::encode(session.key),
        heartbeat_port: context.heartbeat_port,
        interval_ms: u64::try_from(context.interval.as_millis()).unwrap_or(u64::MAX),
        accepted: session.targets.keys().cloned().collect(),
        refused,
    }
}

/// Keeps pinging a closed session for a grace time (the NCU may be moving, or reconnecting), then stops.
fn end_session(session: &Session, context: &Context) {
    if session.targets.is_empty() {
        return;
    }
    let driver = context.driver.clone();
    let id = session.id;
    let grace = context.session_grace;
    debug!(session = id, remote = %session.remote, ?grace, "session closed; pinging on through the grace time");
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let _ = driver.send(Command::RemoveSession(id));
    });
}

async fn reply(send: &mut SendStream, message: ToNcu) -> Result<(), FrameError> {
    frame::write(send, control::VERSION, &message).await
}

fn error(code: ControlError, message: &str) -> ToNcu {
    ToNcu::Error { code, message: message.to_owned() }
}

fn unavailable(e: &tether_db::StoreError) -> ToNcu {
    warn!(error = %e, "database error during registration");
    error(ControlError::Unavailable, "database unavailable; retry")
}

fn fingerprint(connection: &Connection) -> Option<[u8; 32]> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(pki::fingerprint)
}

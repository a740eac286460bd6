//! The heartbeat driver: one task owning the UDP socket and the [`Monitor`]. Each turn it feeds commands,
//! datagrams or the timer into the machine, sends what it asks to send, passes its events on, and re-arms the one
//! timer at `poll_timeout()`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rand::SeedableRng;
use tokio::{net::UdpSocket, sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::heartbeat::{
    monitor::{Event, Liveness, Monitor, Policy, TargetId},
    packet::Key,
};

/// Most datagrams handled per turn before the timer gets a look in.
const RECV_BUDGET: usize = 256;

/// What the control side asks of the driver.
#[derive(Debug)]
pub enum Command {
    /// Start (or restart) pinging an address.
    Add {
        /// The `addresses` row.
        id: TargetId,
        /// The NCU's session.
        session: u64,
        /// Uplink index in packets.
        uplink: u8,
        /// Session key.
        key: Key,
        /// Where to ping until a hello says otherwise.
        dest: SocketAddr,
        /// `Live` for an address taken over from another server.
        initial: Liveness,
    },
    /// Stop pinging an address.
    Remove(TargetId),
    /// Stop pinging every address of a session.
    RemoveSession(u64),
}

/// Counters the driver publishes.
#[derive(Debug, Default)]
pub struct Counters {
    /// Addresses being monitored.
    pub targets: AtomicU64,
    /// Replies with a bad MAC.
    pub forged: AtomicU64,
    /// Replies matching no outstanding probe (replays, duplicates, very late).
    pub stale: AtomicU64,
    /// Datagrams that are not heartbeat packets.
    pub malformed: AtomicU64,
    /// Packets of unknown sessions or uplinks.
    pub unknown: AtomicU64,
    /// Pings sent.
    pub pings: AtomicU64,
    /// Valid replies.
    pub pongs: AtomicU64,
}

/// Runs until `shutdown` or until every command sender is gone.
pub async fn run(
    socket: UdpSocket,
    policy: Policy,
    mut commands: mpsc::UnboundedReceiver<Command>,
    events: mpsc::UnboundedSender<Event>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
) {
    let mut monitor = Monitor::new(policy);
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut buf = vec![0_u8; 2048];
    let timer = tokio::time::sleep(std::time::Duration::from_secs(3600));
    tokio::pin!(timer);
    loop {
        if let Some(deadline) = monitor.poll_timeout() {
            timer.as_mut().reset(Instant::from_std(deadline));
        }
        let armed = monitor.poll_timeout().is_some();
        tokio::select! {
            () = shutdown.cancelled() => return,
            command = commands.recv() => match command {
                Some(command) => apply(&mut monitor, command, std::time::Instant::now()),
                None => return,
            },
            received = socket.recv_from(&mut buf) => match received {
                Ok((n, from)) => {
                    let now = std::time::Instant::now();
                    monitor.handle_datagram(&buf[..n], from, now);
                    for _ in 1..RECV_BUDGET {
                        match socket.try_recv_from(&mut buf) {
                            Ok((n, from)) => monitor.handle_datagram(&buf[..n], from, now),
                            Err(_) => break,
                        }
                    }
                }
                // ICMP port unreachable from a previous send surfaces here on Linux; nothing to do.
                Err(error) => debug!(%error, "heartbeat socket receive error"),
            },
            () = &mut timer, if armed => monitor.handle_timeout(std::time::Instant::now(), &mut rng),
        }
        while let Some(transmit) = monitor.poll_transmit() {
            if let Err(error) = socket.send_to(&transmit.payload, transmit.dest).await {
                debug!(%error, dest = %transmit.dest, "ping not sent");
            }
        }
        while let Some(event) = monitor.poll_event() {
            if events.send(event).is_err() {
                warn!("state writer gone; stopping heartbeats");
                return;
            }
        }
        publish(&monitor, &counters);
    }
}

fn apply(monitor: &mut Monitor, command: Command, now: std::time::Instant) {
    match command {
        Command::Add { id, session, uplink, key, dest, initial } => {
            monitor.add(id, session, uplink, key, dest, initial, now);
        }
        Command::Remove(id) => monitor.remove(id),
        Command::RemoveSession(session) => monitor.remove_session(session),
    }
}

fn publish(monitor: &Monitor, counters: &Counters) {
    let stats = monitor.stats();
    counters.targets.store(monitor.len() as u64, Ordering::Relaxed);
    counters.forged.store(stats.forged, Ordering::Relaxed);
    counters.stale.store(stats.stale, Ordering::Relaxed);
    counters.malformed.store(stats.malformed, Ordering::Relaxed);
    counters.unknown.store(stats.unknown, Ordering::Relaxed);
    counters.pings.store(stats.pings, Ordering::Relaxed);
    counters.pongs.store(stats.pongs, Ordering::Relaxed);
}
